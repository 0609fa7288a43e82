"""Qwen-Image: the real architecture at tiny, demo and small sizes; an optional tiny Qwen2.5-VL text encoder."""

from __future__ import annotations

import torch

from ._common import _byte_level_tokenizer

QWENIMAGE_CONFIGS = {
    "tiny": dict(num_layers=2, attention_head_dim=16, num_attention_heads=3, joint_attention_dim=16,
                 axes_dims_rope=(8, 4, 4), height=32, width=32),
    # "tiny" with an even head count, so Ulysses (heads split over ranks) can run at degree 2 and 4
    "tiny-cp": dict(num_layers=2, attention_head_dim=16, num_attention_heads=4, joint_attention_dim=16,
                    axes_dims_rope=(8, 4, 4), height=32, width=32),
    "demo": dict(num_layers=4, attention_head_dim=64, num_attention_heads=4, joint_attention_dim=32,
                 axes_dims_rope=(8, 28, 28), height=128, width=128),
    "small": dict(num_layers=8, attention_head_dim=128, num_attention_heads=8, joint_attention_dim=64,
                  axes_dims_rope=(16, 56, 56), height=256, width=256),
}


def qwen_text_encoder(hidden_size: int, seed: int = 0):
    """(tokenizer, Qwen2.5-VL text encoder) at a tiny size, random weights, for the Qwen-Image pipelines."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = _byte_level_tokenizer([
        "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships",
        "a lighthouse at dusk", "a photo of a cat", "blurry, low quality",
    ])
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         intermediate_size=2 * hidden_size, vocab_size=len(tokenizer), max_position_embeddings=2048,
                         bos_token_id=eos, eos_token_id=eos, pad_token_id=pad,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, hidden_size // 4 - 2],
                                       "rope_theta": 10000.0}),
        vision_config=dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=32, out_hidden_size=hidden_size),
        bos_token_id=eos, eos_token_id=eos, pad_token_id=pad,
    )
    return tokenizer, Qwen2_5_VLForConditionalGeneration(config).eval()


def qwenimage_pipeline(config: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32,
                       scheduler=None, text_encoder: bool = False):
    """A QwenImagePipeline with the real architecture at a small size (VAE scale factor 4, 16 latent channels).

    "small" makes 1024 image tokens (256x256) with hidden size 1024 and 8 blocks. ``text_encoder=True`` adds a
    tiny text encoder and tokenizer so ``prompt=`` / ``negative_prompt=`` strings work.
    """
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    cfg = dict(QWENIMAGE_CONFIGS[config])
    cfg.pop("height"), cfg.pop("width")
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4,
                                              guidance_embeds=False, **cfg)
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    tokenizer, encoder = qwen_text_encoder(cfg["joint_attention_dim"], seed) if text_encoder else (None, None)
    pipe = QwenImagePipeline(
        scheduler=scheduler or FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.transformer.eval()
    pipe.vae.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def qwenimage_inputs(config: str = "tiny", seed: int = 0, batch: int = 1, pos_len: int = 7, neg_len: int = 5,
                     dtype: torch.dtype = torch.float32) -> dict:
    """Call arguments for :func:`qwenimage_pipeline`: random prompt embeds with masks, of unequal lengths."""
    cfg = QWENIMAGE_CONFIGS[config]
    g = torch.Generator().manual_seed(seed + 1000)
    dim = cfg["joint_attention_dim"]
    return dict(
        prompt_embeds=torch.randn(batch, pos_len, dim, generator=g).to(dtype),
        prompt_embeds_mask=torch.ones(batch, pos_len, dtype=torch.long),
        negative_prompt_embeds=torch.randn(batch, neg_len, dim, generator=g).to(dtype),
        negative_prompt_embeds_mask=torch.ones(batch, neg_len, dtype=torch.long),
        height=cfg["height"],
        width=cfg["width"],
    )
