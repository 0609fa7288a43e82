"""Flux at a tiny size."""

from __future__ import annotations

import torch

from ._common import _embeds, _ready


def _flux_vae(latent_channels: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)


def flux_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, guidance_embeds: bool = False, scheduler=None):
    """A FluxPipeline (1 double + 1 single block); ``guidance_embeds=True`` makes it guidance-distilled."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
                                         guidance_embeds=guidance_embeds)
    torch.manual_seed(seed)
    vae = _flux_vae(1)
    pipe = FluxPipeline(scheduler=scheduler or FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    return _ready(pipe, dtype)


def flux_inputs(seed: int = 0, batch: int = 1, length: int = 6, neg_length: int | None = None,
                dtype: torch.dtype = torch.float32) -> dict:
    """Positive and negative embeds with pooled embeds; 32x32 image. Stock true CFG wants equal lengths."""
    g = torch.Generator().manual_seed(seed + 1000)
    return dict(
        prompt_embeds=_embeds(g, batch, length, 32, dtype),
        pooled_prompt_embeds=torch.randn(batch, 32, generator=g).to(dtype),
        negative_prompt_embeds=_embeds(g, batch, length if neg_length is None else neg_length, 32, dtype),
        negative_pooled_prompt_embeds=torch.randn(batch, 32, generator=g).to(dtype),
        height=32,
        width=32,
    )
