"""HunyuanVideo at a tiny size."""

from __future__ import annotations

import torch

from ._common import _embeds, _ready


def hunyuanvideo_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, scheduler=None):
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )

    torch.manual_seed(seed)
    transformer = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                                 attention_head_dim=10, num_layers=1, num_single_layers=1,
                                                 num_refiner_layers=1, patch_size=1, patch_size_t=1,
                                                 guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8,
                                                 rope_axes_dim=(2, 4, 4))
    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanVideo(in_channels=3, out_channels=3, latent_channels=4,
                                    down_block_types=("HunyuanVideoDownBlock3D",) * 4,
                                    up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8,) * 4,
                                    layers_per_block=1, act_fn="silu", norm_num_groups=4, scaling_factor=0.476986,
                                    spatial_compression_ratio=8, temporal_compression_ratio=4,
                                    mid_block_add_attention=True)
    pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=vae,
                                scheduler=scheduler or FlowMatchEulerDiscreteScheduler(shift=7.0),
                                text_encoder_2=None, tokenizer_2=None)
    return _ready(pipe, dtype)


def hunyuanvideo_inputs(seed: int = 0, batch: int = 1, pos_len: int = 7, neg_len: int = 5,
                        dtype: torch.dtype = torch.float32) -> dict:
    """16x16, 9 frames; embeds with masks (the negative one padded) and pooled embeds."""
    g = torch.Generator().manual_seed(seed + 1000)
    neg_mask = torch.ones(batch, neg_len, dtype=torch.long)
    neg_mask[:, neg_len - 2:] = 0
    return dict(
        prompt_embeds=_embeds(g, batch, pos_len, 16, dtype),
        prompt_attention_mask=torch.ones(batch, pos_len, dtype=torch.long),
        pooled_prompt_embeds=torch.randn(batch, 8, generator=g).to(dtype),
        negative_prompt_embeds=_embeds(g, batch, neg_len, 16, dtype),
        negative_prompt_attention_mask=neg_mask,
        negative_pooled_prompt_embeds=torch.randn(batch, 8, generator=g).to(dtype),
        height=16,
        width=16,
        num_frames=9,
    )
