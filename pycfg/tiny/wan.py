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


def _wan_transformer(seed: int, in_channels: int = 16, image_dim: int | None = None):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                 in_channels=in_channels, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32,
                                 num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                 rope_max_seq_len=32, image_dim=image_dim)


def _wan_vae(seed: int):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True])


def wan_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, two_experts: bool = False,
                 boundary_ratio: float = 0.875, scheduler=None, text_encoder: bool = False):
    """A WanPipeline; ``two_experts=True`` makes it Wan 2.2 (a second, differently seeded transformer).

    ``text_encoder=True`` adds a tiny UMT5 encoder and tokenizer, so string prompts work.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    transformer = _wan_transformer(seed)
    transformer_2 = _wan_transformer(seed + 1) if two_experts else None
    vae = _wan_vae(seed)
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


def _clip_image_encoder(seed: int):
    """A tiny CLIP vision tower and its processor (Wan 2.1 I2V conditions on the image's CLIP features)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=4, projection_dim=4, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, intermediate_size=16, patch_size=1)
    return CLIPVisionModelWithProjection(config).eval(), CLIPImageProcessor(crop_size=32, size=32)


def wan_i2v_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, mode: str = "2.1",
                     boundary_ratio: float = 0.875, scheduler=None):
    """A WanImageToVideoPipeline. ``mode``: "2.1" (CLIP image features, conditioning latents on channels),
    "2.2" (two experts, no image encoder), "ti2v" (Wan 2.2 TI2V: ``expand_timesteps``, the first latent frame
    replaced by the image's latents)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline

    if mode not in ("2.1", "2.2", "ti2v"):
        raise ValueError(f"mode must be '2.1', '2.2' or 'ti2v', got {mode!r}")
    # channels of the model input: latents, plus (not with expand_timesteps) 4 mask and 16 condition channels
    in_channels = 16 if mode == "ti2v" else 36
    transformer = _wan_transformer(seed, in_channels, image_dim=4 if mode == "2.1" else None)
    transformer_2 = _wan_transformer(seed + 1, in_channels) if mode == "2.2" else None
    image_encoder, image_processor = _clip_image_encoder(seed) if mode == "2.1" else (None, None)
    pipe = WanImageToVideoPipeline(
        tokenizer=None, text_encoder=None, vae=_wan_vae(seed),
        scheduler=scheduler or FlowMatchEulerDiscreteScheduler(shift=3.0), image_processor=image_processor,
        image_encoder=image_encoder, transformer=transformer, transformer_2=transformer_2,
        boundary_ratio=boundary_ratio if mode == "2.2" else None, expand_timesteps=mode == "ti2v",
    )
    return _ready(pipe, dtype)


def wan_i2v_inputs(seed: int = 0, batch: int = 1, pos_len: int = 7, neg_len: int = 5, last_image: bool = False,
                   dtype: torch.dtype = torch.float32) -> dict:
    """The Wan text inputs with a 16x16 PIL first frame (and, with ``last_image``, a last one)."""
    from .flux import tiny_image

    inputs = dict(wan_inputs(seed, batch, pos_len, neg_len, dtype), image=tiny_image(seed, (16, 16)))
    if last_image:
        inputs["last_image"] = tiny_image(seed + 1, (16, 16))
    return inputs


def wan_vace_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, two_experts: bool = False,
                      boundary_ratio: float = 0.875, scheduler=None):
    """A WanVACEPipeline (VACE blocks after layers 0 and 2); ``two_experts=True`` makes it Wan 2.2."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanVACEPipeline, WanVACETransformer3DModel

    def vace_transformer(s: int):
        torch.manual_seed(s)
        return WanVACETransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                         in_channels=16, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32,
                                         num_layers=3, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                         rope_max_seq_len=32, vace_layers=[0, 2], vace_in_channels=96)

    pipe = WanVACEPipeline(
        tokenizer=None, text_encoder=None, vae=_wan_vae(seed),
        scheduler=scheduler or FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=vace_transformer(seed),
        transformer_2=vace_transformer(seed + 1) if two_experts else None,
        boundary_ratio=boundary_ratio if two_experts else None,
    )
    return _ready(pipe, dtype)


def wan_vace_inputs(seed: int = 0, batch: int = 1, pos_len: int = 7, neg_len: int = 5, reference: bool = False,
                    dtype: torch.dtype = torch.float32) -> dict:
    """The Wan text inputs with a 9-frame 16x16 control video and a mask repainting its right half (and, with
    ``reference``, a reference image, which prepends a latent frame)."""
    from .flux import tiny_image, tiny_mask

    video = [tiny_image(seed + k, (16, 16)) for k in range(9)]
    mask = [tiny_mask((16, 16)).convert("RGB")] * 9
    inputs = dict(wan_inputs(seed, batch, pos_len, neg_len, dtype), video=video, mask=mask)
    if reference:
        inputs["reference_images"] = [tiny_image(seed + 100, (16, 16))]
    return inputs
