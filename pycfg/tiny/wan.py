"""Wan 2.1 / 2.2 (text to video) at a tiny size."""

from __future__ import annotations

import torch

from ._common import _embeds, _ready


def _wan_transformer(seed: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                                 out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def wan_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, two_experts: bool = False,
                 boundary_ratio: float = 0.875, scheduler=None):
    """A WanPipeline; ``two_experts=True`` makes it Wan 2.2 (a second, differently seeded transformer)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    transformer = _wan_transformer(seed)
    transformer_2 = _wan_transformer(seed + 1) if two_experts else None
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae,
                       scheduler=scheduler or FlowMatchEulerDiscreteScheduler(shift=3.0),
                       transformer=transformer, transformer_2=transformer_2,
                       boundary_ratio=boundary_ratio if two_experts else None)
    return _ready(pipe, dtype)


def wan_inputs(seed: int = 0, batch: int = 1, pos_len: int = 7, neg_len: int = 5,
               dtype: torch.dtype = torch.float32) -> dict:
    """16x16, 9 frames (3 latent frames); text lengths may differ between the branches."""
    g = torch.Generator().manual_seed(seed + 1000)
    return dict(
        prompt_embeds=_embeds(g, batch, pos_len, 32, dtype),
        negative_prompt_embeds=_embeds(g, batch, neg_len, 32, dtype),
        height=16,
        width=16,
        num_frames=9,
    )
