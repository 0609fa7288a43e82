"""LongCat-Image (text to image) at a tiny size.

LongCat's ``encode_prompt`` takes no embeds without a prompt string (it counts the prompts), so these pipelines
always carry a tiny Qwen2.5-VL text encoder and a byte-level tokenizer built in code. Call them with
``enable_prompt_rewrite=False``: rewriting generates text with the encoder.
"""

from __future__ import annotations

import torch

from ._common import _byte_level_tokenizer, _ready
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


_VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|placeholder|>"]


def _vision_text_encoder(seed: int):
    """(tokenizer, Qwen2.5-VL encoder with a vision tower, processor): the edit pipeline's prompt reads the
    input image. The processor has its image and text parts only (the video part needs torchvision); its image
    processor keeps images to a few merged tokens."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessorPil,
    )

    tokenizer = _byte_level_tokenizer(["make the cat blue", "a photo of a cat", "blurry, low quality"])
    tokenizer.add_special_tokens({"additional_special_tokens": _VISION_TOKENS})
    token = tokenizer.convert_tokens_to_ids
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=TEXT_DIM, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         intermediate_size=2 * TEXT_DIM, vocab_size=len(tokenizer), max_position_embeddings=2048,
                         bos_token_id=eos, eos_token_id=eos, pad_token_id=pad,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, TEXT_DIM // 4 - 2],
                                       "rope_theta": 10000.0}),
        vision_config=dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=32, out_hidden_size=TEXT_DIM,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=token("<|image_pad|>"), video_token_id=token("<|video_pad|>"),
        vision_start_token_id=token("<|vision_start|>"), vision_end_token_id=token("<|vision_end|>"),
        bos_token_id=eos, eos_token_id=eos, pad_token_id=pad,
    )
    encoder = Qwen2_5_VLForConditionalGeneration(config).eval()

    class ImageTextProcessor(Qwen2_5_VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    image_processor = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2,
                                               min_pixels=28 * 28, max_pixels=56 * 56)
    return tokenizer, encoder, ImageTextProcessor(image_processor, tokenizer)


def longcat_edit_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, scheduler=None):
    """A LongCatImageEditPipeline. It generates at about one megapixel whatever the input size, so its VAE
    downsamples 32x (1024x1024 -> 16x16 tokens), and its text encoder sees the image through a tiny vision tower."""
    from diffusers import AutoencoderKL, LongCatImageEditPipeline

    components = _longcat_components(seed, scheduler)
    torch.manual_seed(seed)
    components["vae"] = AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 6,
        up_block_types=("UpDecoderBlock2D",) * 6, block_out_channels=(4,) * 6, layers_per_block=1,
        latent_channels=16, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035)
    tokenizer, encoder, processor = _vision_text_encoder(seed)
    components.update(tokenizer=tokenizer, text_encoder=encoder)
    return _ready(LongCatImageEditPipeline(**components, text_processor=processor), dtype)


def longcat_edit_inputs(seed: int = 0) -> dict:
    """An edit instruction, a negative prompt and a 64x64 PIL input image (square: the one-megapixel size it
    implies, 1024x1024, fits the 32x VAE's packing)."""
    from .flux import tiny_image

    return dict(prompt="make the cat blue", negative_prompt="blurry, low quality", image=tiny_image(seed, (64, 64)))
