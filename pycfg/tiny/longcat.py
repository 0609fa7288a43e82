"""LongCat-Image (text to image) at a tiny size.

LongCat's ``encode_prompt`` takes no embeds without a prompt string (it counts the prompts), so these pipelines
always carry a tiny Qwen2.5-VL text encoder and a byte-level tokenizer built in code. Call them with
``enable_prompt_rewrite=False``: rewriting generates text with the encoder.
"""

from __future__ import annotations

import torch

from ._common import _ready
from .qwenimage import qwen_text_encoder

TEXT_DIM = 32


def _longcat_components(seed: int, scheduler) -> dict:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, LongCatImageTransformer2DModel

    torch.manual_seed(seed)
    # 16 latent channels, packed 2x2: 64 channels per token
    transformer = LongCatImageTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                                 attention_head_dim=16, num_attention_heads=2,
                                                 joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM,
                                                 axes_dims_rope=[4, 6, 6])
    torch.manual_seed(seed)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=16, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    tokenizer, text_encoder = qwen_text_encoder(TEXT_DIM, seed)
    return dict(scheduler=scheduler or FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                tokenizer=tokenizer, transformer=transformer)


def longcat_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, scheduler=None):
    """A LongCatImagePipeline (1 double + 1 single block, 1x VAE with 16 latent channels)."""
    from diffusers import LongCatImagePipeline

    return _ready(LongCatImagePipeline(**_longcat_components(seed, scheduler), text_processor=None), dtype)


def longcat_inputs(seed: int = 0, batch: int = 1) -> dict:
    """Prompt strings (the text encoder runs), 16x16, prompt rewriting off."""
    prompts = ["a photo of a cat", "a lighthouse at dusk"][:batch] if batch > 1 else "a photo of a cat"
    return dict(prompt=prompts, negative_prompt="blurry, low quality" if batch == 1 else ["blurry"] * batch,
                height=16, width=16, enable_prompt_rewrite=False)
