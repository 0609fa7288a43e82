"""FLUX.2 [klein] at a tiny size."""

from __future__ import annotations

import torch

from ._common import _embeds, _ready


def flux2_klein_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, is_distilled: bool = False,
                         scheduler=None):
    """A Flux2KleinPipeline (1 double + 1 single block, 1x VAE). ``is_distilled=False``: the base checkpoints,
    which run true CFG; ``True``: the distilled ones, one branch."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )

    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                          timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4],
                                          guidance_embeds=False)
    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(sample_size=32, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                             up_block_types=("UpDecoderBlock2D",), block_out_channels=(4,), layers_per_block=1,
                             latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False)
    pipe = Flux2KleinPipeline(scheduler=scheduler or FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                              tokenizer=None, transformer=transformer, is_distilled=is_distilled)
    return _ready(pipe, dtype)


def flux2_klein_inputs(seed: int = 0, batch: int = 1, pos_len: int = 7, neg_len: int = 5, image: bool = False,
                       dtype: torch.dtype = torch.float32) -> dict:
    """Positive and negative embeds (lengths may differ); 16x16. ``image=True`` adds a 64x64 reference image
    (the pipeline's image checks want at least 64 pixels a side)."""
    from .flux import tiny_image

    g = torch.Generator().manual_seed(seed + 1000)
    inputs = dict(prompt_embeds=_embeds(g, batch, pos_len, 16, dtype),
                  negative_prompt_embeds=_embeds(g, batch, neg_len, 16, dtype), height=16, width=16)
    if image:
        inputs["image"] = tiny_image(seed, (64, 64))
    return inputs
