"""Z-Image (text to image, image to image) at a tiny size."""

from __future__ import annotations

import torch

from ._common import _ready


def _zimage_components(seed: int, scheduler) -> dict:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel

    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
        axes_dims=[8, 4, 4], axes_lens=[256, 32, 32],
    )
    # the pad tokens start as torch.empty: give them values, or a padded batch reads garbage
    with torch.no_grad():
        transformer.x_pad_token.copy_(torch.ones_like(transformer.x_pad_token))
        transformer.cap_pad_token.copy_(torch.ones_like(transformer.cap_pad_token))
    torch.manual_seed(seed)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.1159, scaling_factor=0.3611)
    return dict(transformer=transformer, vae=vae, scheduler=scheduler or FlowMatchEulerDiscreteScheduler(),
                text_encoder=None, tokenizer=None)


def zimage_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, scheduler=None):
    """A ZImagePipeline (2 layers, 1 refiner layer, 4 latent channels, 1x VAE)."""
    from diffusers import ZImagePipeline

    return _ready(ZImagePipeline(**_zimage_components(seed, scheduler)), dtype)


def zimage_img2img_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, scheduler=None):
    """A ZImageImg2ImgPipeline on the tiny Z-Image components."""
    from diffusers import ZImageImg2ImgPipeline

    return _ready(ZImageImg2ImgPipeline(**_zimage_components(seed, scheduler)), dtype)


def zimage_inputs(seed: int = 0, batch: int = 1, pos_len: int = 7, neg_len: int = 5,
                  dtype: torch.dtype = torch.float32) -> dict:
    """Per-sample embeds as Z-Image takes them (lists of (length, 16) tensors; the lengths may differ); 16x16."""
    g = torch.Generator().manual_seed(seed + 1000)
    return dict(
        prompt_embeds=[torch.randn(pos_len + j, 16, generator=g).to(dtype) for j in range(batch)],
        negative_prompt_embeds=[torch.randn(neg_len + j, 16, generator=g).to(dtype) for j in range(batch)],
        height=16,
        width=16,
    )


def zimage_img2img_inputs(seed: int = 0, batch: int = 1, pos_len: int = 7, neg_len: int = 5, strength: float = 0.7,
                          dtype: torch.dtype = torch.float32) -> dict:
    """The Z-Image embeds with a 16x16 PIL input image; ``strength < 1`` so the image shapes the output."""
    from .flux import tiny_image

    return dict(zimage_inputs(seed, batch, pos_len, neg_len, dtype), image=tiny_image(seed, (16, 16)),
                strength=strength)
