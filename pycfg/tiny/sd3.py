"""Stable Diffusion 3 at a tiny size."""

from __future__ import annotations

import torch

from ._common import _embeds, _ready
from .flux import _flux_vae


def sd3_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, scheduler=None):
    """A StableDiffusion3Pipeline with a 2-block SD3 transformer (skip-layer guidance can skip block 1)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)
    torch.manual_seed(seed)
    vae = _flux_vae(4)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler or FlowMatchEulerDiscreteScheduler(), vae=vae,
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
        tokenizer_3=None,
    )
    return _ready(pipe, dtype)


def sd3_inputs(seed: int = 0, batch: int = 1, length: int = 6, dtype: torch.dtype = torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed + 1000)
    return dict(
        prompt_embeds=_embeds(g, batch, length, 32, dtype),
        pooled_prompt_embeds=torch.randn(batch, 64, generator=g).to(dtype),
        negative_prompt_embeds=_embeds(g, batch, length, 32, dtype),
        negative_pooled_prompt_embeds=torch.randn(batch, 64, generator=g).to(dtype),
        height=32,
        width=32,
    )
