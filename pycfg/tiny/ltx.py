"""LTX-Video at a tiny size."""

from __future__ import annotations

import torch

from ._common import _embeds, _ready


def ltx_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, scheduler=None):
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    torch.manual_seed(seed)
    transformer = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                             num_attention_heads=4, attention_head_dim=8, cross_attention_dim=32,
                                             num_layers=1, caption_channels=32)
    torch.manual_seed(seed)
    vae = AutoencoderKLLTXVideo(latent_channels=8, block_out_channels=(8, 8, 8, 8),
                                spatio_temporal_scaling=(True, True, False, False), layers_per_block=(1, 1, 1, 1, 1),
                                patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False)
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    pipe = LTXPipeline(scheduler=scheduler or FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                       tokenizer=None, transformer=transformer)
    return _ready(pipe, dtype)


def ltx_inputs(seed: int = 0, batch: int = 1, length: int = 8, dtype: torch.dtype = torch.float32) -> dict:
    """32x32, 9 frames; bool-valued masks, the negative one with padding (stock batches both: same length)."""
    g = torch.Generator().manual_seed(seed + 1000)
    neg_mask = torch.ones(batch, length, dtype=torch.long)
    neg_mask[:, length - 3:] = 0
    return dict(
        prompt_embeds=_embeds(g, batch, length, 32, dtype),
        prompt_attention_mask=torch.ones(batch, length, dtype=torch.long),
        negative_prompt_embeds=_embeds(g, batch, length, 32, dtype),
        negative_prompt_attention_mask=neg_mask,
        height=32,
        width=32,
        num_frames=9,
    )
