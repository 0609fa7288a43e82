"""CogVideoX at a tiny size."""

from __future__ import annotations

import torch

from ._common import _embeds, _ready


def cogvideox_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, scheduler=None):
    """A CogVideoXPipeline; the default scheduler is CogVideoXDDIMScheduler (pass a CogVideoXDPMScheduler too)."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel(num_attention_heads=4, attention_head_dim=8, in_channels=4,
                                              out_channels=4, time_embed_dim=2, text_embed_dim=32, num_layers=1,
                                              sample_width=2, sample_height=2, sample_frames=9, patch_size=2,
                                              temporal_compression_ratio=4, max_text_seq_length=16)
    torch.manual_seed(seed)
    blocks = 4
    vae = AutoencoderKLCogVideoX(in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * blocks,
                                 up_block_types=("CogVideoXUpBlock3D",) * blocks, block_out_channels=(8,) * blocks,
                                 latent_channels=4, layers_per_block=1, norm_num_groups=2,
                                 temporal_compression_ratio=4)
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                             scheduler=scheduler or CogVideoXDDIMScheduler())
    return _ready(pipe, dtype)


def cogvideox_inputs(seed: int = 0, batch: int = 1, dtype: torch.dtype = torch.float32) -> dict:
    """16x16, 9 frames; embeds of the transformer's fixed text length (16)."""
    g = torch.Generator().manual_seed(seed + 1000)
    return dict(
        prompt_embeds=_embeds(g, batch, 16, 32, dtype),
        negative_prompt_embeds=_embeds(g, batch, 16, 32, dtype),
        height=16,
        width=16,
        num_frames=9,
    )
