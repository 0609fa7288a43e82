"""Small random-weight pipelines built in code: no downloads, fixed seeds. Used by the demo, tests and benchmarks.

``text_encoder`` and ``tokenizer`` are None: pass ``prompt_embeds`` (+ masks) directly, as from any encoder.
"""

from __future__ import annotations

import torch

# transformer sizes: "tiny" for tests, "small" for benchmarks where the transformer forward dominates
QWENIMAGE_CONFIGS = {
    "tiny": dict(num_layers=2, attention_head_dim=16, num_attention_heads=3, joint_attention_dim=16,
                 axes_dims_rope=(8, 4, 4), height=32, width=32),
    "small": dict(num_layers=8, attention_head_dim=128, num_attention_heads=8, joint_attention_dim=64,
                  axes_dims_rope=(16, 56, 56), height=256, width=256),
}


def qwenimage_pipeline(config: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32,
                       scheduler=None):
    """A QwenImagePipeline with the real architecture at a small size (VAE scale factor 4, 16 latent channels).

    "small" makes 1024 image tokens (256x256) with hidden size 1024 and 8 blocks.
    """
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)

    cfg = dict(QWENIMAGE_CONFIGS[config])
    cfg.pop("height"), cfg.pop("width")
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4,
                                              guidance_embeds=False, **cfg)
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    pipe = QwenImagePipeline(
        scheduler=scheduler or FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
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
