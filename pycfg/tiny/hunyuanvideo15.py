"""HunyuanVideo-1.5 (text to video, image to video) at a tiny size.

Both pipelines run their guidance through a diffusers ``ClassifierFreeGuidance`` guider component, built here
with the scale (and options) the caller asks for.
"""

from __future__ import annotations

import torch

from ._common import _embeds, _ready


def _hv15_components(seed: int, scheduler, guider_kwargs: dict, task_type: str) -> dict:
    from diffusers import AutoencoderKLHunyuanVideo15, FlowMatchEulerDiscreteScheduler, HunyuanVideo15Transformer3DModel
    from diffusers.guiders import ClassifierFreeGuidance

    torch.manual_seed(seed)
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_refiner_layers=1,
        mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=32, image_embed_dim=12,
        rope_axes_dim=(2, 2, 4), target_size=16, task_type=task_type,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanVideo15(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16),
                                      layers_per_block=1, spatial_compression_ratio=4, temporal_compression_ratio=2,
                                      downsample_match_channel=False, upsample_match_channel=False)
    return dict(transformer=transformer, vae=vae, scheduler=scheduler or FlowMatchEulerDiscreteScheduler(shift=7.0),
                text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                guider=ClassifierFreeGuidance(**{"guidance_scale": 4.0, **guider_kwargs}))


def hunyuanvideo15_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, scheduler=None, **guider_kwargs):
    """A HunyuanVideo15Pipeline; ``guider_kwargs`` configure its ClassifierFreeGuidance (scale 4 by default)."""
    from diffusers import HunyuanVideo15Pipeline

    return _ready(HunyuanVideo15Pipeline(**_hv15_components(seed, scheduler, guider_kwargs, "t2v")), dtype)


def _siglip(seed: int):
    """A tiny SigLIP vision tower (hidden size = the transformer's image_embed_dim) and its processor."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    config = SiglipVisionConfig(hidden_size=12, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                image_size=32, patch_size=8)
    return SiglipVisionModel(config).eval(), SiglipImageProcessor(size={"height": 32, "width": 32})


def hunyuanvideo15_i2v_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, scheduler=None, **guider_kwargs):
    """A HunyuanVideo15ImageToVideoPipeline with a tiny SigLIP image encoder."""
    from diffusers import HunyuanVideo15ImageToVideoPipeline

    image_encoder, feature_extractor = _siglip(seed)
    components = _hv15_components(seed, scheduler, guider_kwargs, "i2v")
    pipe = HunyuanVideo15ImageToVideoPipeline(**components, image_encoder=image_encoder,
                                              feature_extractor=feature_extractor)
    return _ready(pipe, dtype)


def hunyuanvideo15_inputs(seed: int = 0, batch: int = 1, pos_len: int = 7, neg_len: int = 5,
                          dtype: torch.dtype = torch.float32) -> dict:
    """Both text encoders' embeds and masks, given directly (lengths differ between the branches); 16x16,
    9 frames."""
    g = torch.Generator().manual_seed(seed + 1000)
    inputs = {}
    for prefix, length in (("", pos_len), ("negative_", neg_len)):
        inputs[f"{prefix}prompt_embeds"] = _embeds(g, batch, length, 16, dtype)
        inputs[f"{prefix}prompt_embeds_mask"] = torch.ones(batch, length, dtype=torch.long)
        inputs[f"{prefix}prompt_embeds_2"] = _embeds(g, batch, length + 2, 32, dtype)
        inputs[f"{prefix}prompt_embeds_mask_2"] = torch.ones(batch, length + 2, dtype=torch.long)
    return dict(inputs, height=16, width=16, num_frames=9)


def hunyuanvideo15_i2v_inputs(seed: int = 0, batch: int = 1, pos_len: int = 7, neg_len: int = 5,
                              dtype: torch.dtype = torch.float32) -> dict:
    """The text inputs with a 16x16 PIL first frame (the size follows the image)."""
    from .flux import tiny_image

    inputs = hunyuanvideo15_inputs(seed, batch, pos_len, neg_len, dtype)
    del inputs["height"], inputs["width"]
    return dict(inputs, image=tiny_image(seed, (16, 16)))
