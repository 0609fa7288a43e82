"""Flux at a tiny size; optional tiny CLIP and T5 text encoders built in code."""

from __future__ import annotations

import torch

from ._common import _byte_level_tokenizer, _embeds, _ready

_FLUX_CORPUS = ["a lighthouse at dusk", "a photo of a cat", "blurry, low quality", "a red cube on a table"]


def flux_text_encoders(seed: int = 0):
    """(CLIP tokenizer, CLIP text model, T5 tokenizer, T5 encoder) at a tiny size with random weights.

    Hidden sizes match :func:`flux_pipeline`'s transformer (pooled projection 32, joint attention 32). The byte-level
    tokenizers stand in for CLIP's and T5's own: the pipeline's ``encode_prompt`` runs unchanged on them.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_tokenizer = _byte_level_tokenizer(_FLUX_CORPUS)
    clip_tokenizer.model_max_length = 77  # the pipeline pads CLIP prompts to this length
    t5_tokenizer = _byte_level_tokenizer(_FLUX_CORPUS)
    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=32,
        bos_token_id=clip_tokenizer.eos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
        pad_token_id=clip_tokenizer.pad_token_id,
    )).eval()
    torch.manual_seed(seed)
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=t5_tokenizer.pad_token_id,
        eos_token_id=t5_tokenizer.eos_token_id, decoder_start_token_id=t5_tokenizer.pad_token_id,
    )).eval()
    return clip_tokenizer, clip, t5_tokenizer, t5


def _flux_vae(latent_channels: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)


def flux_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, guidance_embeds: bool = False, scheduler=None,
                  text_encoder: bool = False):
    """A FluxPipeline (1 double + 1 single block); ``guidance_embeds=True`` makes it guidance-distilled.

    ``text_encoder=True`` adds tiny CLIP and T5 encoders with their tokenizers, so string prompts work.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
                                         guidance_embeds=guidance_embeds)
    torch.manual_seed(seed)
    vae = _flux_vae(1)
    tokenizer, clip, tokenizer_2, t5 = flux_text_encoders(seed) if text_encoder else (None, None, None, None)
    pipe = FluxPipeline(scheduler=scheduler or FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip,
                        tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer_2, transformer=transformer)
    return _ready(pipe, dtype)


def flux_inputs(seed: int = 0, batch: int = 1, length: int = 6, neg_length: int | None = None,
                dtype: torch.dtype = torch.float32) -> dict:
    """Positive and negative embeds with pooled embeds; 32x32 image. Stock true CFG wants equal lengths."""
    g = torch.Generator().manual_seed(seed + 1000)
    return dict(
        prompt_embeds=_embeds(g, batch, length, 32, dtype),
        pooled_prompt_embeds=torch.randn(batch, 32, generator=g).to(dtype),
        negative_prompt_embeds=_embeds(g, batch, length if neg_length is None else neg_length, 32, dtype),
        negative_pooled_prompt_embeds=torch.randn(batch, 32, generator=g).to(dtype),
        height=32,
        width=32,
    )


def _flux_variant(pipeline_class: str, seed: int, dtype: torch.dtype, guidance_embeds: bool, scheduler):
    import diffusers

    base = flux_pipeline(seed, torch.float32, guidance_embeds, scheduler)
    pipe = getattr(diffusers, pipeline_class)(**base.components)
    return _ready(pipe, dtype)


def flux_kontext_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, guidance_embeds: bool = False,
                          scheduler=None):
    """A FluxKontextPipeline on the tiny Flux components: the input image's tokens join the sequence."""
    return _flux_variant("FluxKontextPipeline", seed, dtype, guidance_embeds, scheduler)


def flux_img2img_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, guidance_embeds: bool = False,
                          scheduler=None):
    """A FluxImg2ImgPipeline on the tiny Flux components."""
    return _flux_variant("FluxImg2ImgPipeline", seed, dtype, guidance_embeds, scheduler)


def flux_inpaint_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, guidance_embeds: bool = False,
                          scheduler=None):
    """A FluxInpaintPipeline on the tiny Flux components."""
    return _flux_variant("FluxInpaintPipeline", seed, dtype, guidance_embeds, scheduler)


def tiny_image(seed: int = 0, size: tuple[int, int] = (32, 32)):
    """A random RGB PIL image of ``size`` (width, height)."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed + 2000)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def tiny_mask(size: tuple[int, int] = (32, 32)):
    """A PIL mask of ``size`` (width, height): white (repaint) on the right half, black (keep) on the left."""
    from PIL import Image

    pixels = torch.zeros(size[1], size[0], dtype=torch.uint8)
    pixels[:, size[0] // 2:] = 255
    return Image.fromarray(pixels.numpy(), mode="L")


def flux_kontext_inputs(seed: int = 0, batch: int = 1, length: int = 6, image_size: tuple[int, int] = (24, 32),
                        dtype: torch.dtype = torch.float32) -> dict:
    """The Flux embeds with a PIL input image (kept at its size: no preferred-resolution resizing) and a 32x32
    generation area."""
    return dict(flux_inputs(seed, batch, length, dtype=dtype), image=tiny_image(seed, image_size),
                max_area=32 * 32, _auto_resize=False)


def flux_img2img_inputs(seed: int = 0, batch: int = 1, length: int = 6, strength: float = 0.7,
                        dtype: torch.dtype = torch.float32) -> dict:
    """The Flux embeds with a 32x32 PIL input image; ``strength < 1`` so the image shapes the output."""
    return dict(flux_inputs(seed, batch, length, dtype=dtype), image=tiny_image(seed), strength=strength)


def flux_inpaint_inputs(seed: int = 0, batch: int = 1, length: int = 6, strength: float = 0.7,
                        dtype: torch.dtype = torch.float32) -> dict:
    """The Flux img2img inputs with a mask repainting the right half."""
    return dict(flux_img2img_inputs(seed, batch, length, strength, dtype), mask_image=tiny_mask())
