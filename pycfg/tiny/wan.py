"""Wan 2.1 / 2.2 (text to video) at a tiny size; an optional tiny UMT5 text encoder built in code."""

from __future__ import annotations

import torch

from ._common import _byte_level_tokenizer, _embeds, _ready


def wan_text_encoder(seed: int = 0):
    """(tokenizer, UMT5 encoder) at a tiny size with random weights; hidden size 32 as the tiny transformer's
    ``text_dim``. The byte-level tokenizer stands in for UMT5's own: the pipeline's ``encode_prompt`` runs on it."""
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = _byte_level_tokenizer(["a lighthouse at dusk", "a photo of a cat", "blurry, low quality",
                                       "waves rolling onto a beach"])
    torch.manual_seed(seed)
    encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )).eval()
    return tokenizer, encoder


def _wan_transformer(seed: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                                 out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def wan_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, two_experts: bool = False,
                 boundary_ratio: float = 0.875, scheduler=None, text_encoder: bool = False):
    """A WanPipeline; ``two_experts=True`` makes it Wan 2.2 (a second, differently seeded transformer).

    ``text_encoder=True`` adds a tiny UMT5 encoder and tokenizer, so string prompts work.
    """
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    transformer = _wan_transformer(seed)
    transformer_2 = _wan_transformer(seed + 1) if two_experts else None
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    tokenizer, encoder = wan_text_encoder(seed) if text_encoder else (None, None)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae,
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
