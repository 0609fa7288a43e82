"""The Qwen-Image variants (edit, edit-plus, img2img, inpaint, edit-inpaint, layered) at a tiny size.

The edit pipelines resize every input image to about one megapixel (Layered to 640x640) whatever the requested
size, so their VAE downsamples 64x: a 1024x1024 input becomes 8x8 packed tokens. Img2img and inpaint honour
``height`` / ``width`` and keep the 4x VAE of :func:`~pycfg.tiny.qwenimage_pipeline`.

Text goes in as random prompt embeds (the edit pipelines' Qwen-VL processor needs torchvision for its video
part), except for Layered, whose ``__call__`` reads the text encoder's dtype and captions the image when no
prompt string is given: it gets the tiny Qwen2.5-VL text encoder and prompt strings. Qwen-Image 2.1 reads its
processor at construction and encodes the input image with the text (embeds cannot stand in for that): it gets
a tiny Qwen3-VL encoder and an image-and-text processor (no video part, so no torchvision), all built in code.
"""

from __future__ import annotations

import numpy as np
import torch

from ._common import _byte_level_tokenizer, _embeds, _ready
from .qwenimage import QWENIMAGE_CONFIGS, qwen_text_encoder

#: pipeline class by variant name
QWENIMAGE_VARIANTS = {
    "edit": "QwenImageEditPipeline",
    "edit_plus": "QwenImageEditPlusPipeline",
    "img2img": "QwenImageImg2ImgPipeline",
    "inpaint": "QwenImageInpaintPipeline",
    "edit_inpaint": "QwenImageEditInpaintPipeline",
    "layered": "QwenImageLayeredPipeline",
    "qwenimage21": "QwenImage21Pipeline",
}
#: variants whose input image is resized to a fixed area (they get the 64x VAE)
_FIXED_AREA = ("edit", "edit_plus", "edit_inpaint", "layered")


def _vae(downsamples: int):
    """A Qwen-Image VAE with ``downsamples`` spatial halvings (no temporal ones), 4 latent channels."""
    from diffusers import AutoencoderKLQwenImage

    if downsamples == 2:  # the family's tiny VAE (4x)
        return AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                      temperal_downsample=[False, True], latents_mean=[0.0] * 4,
                                      latents_std=[1.0] * 4)
    return AutoencoderKLQwenImage(base_dim=4, z_dim=4, dim_mult=[1] * (downsamples + 1), num_res_blocks=0,
                                  attn_scales=[], temperal_downsample=[False] * downsamples,
                                  latents_mean=[0.0] * 4, latents_std=[1.0] * 4)


def qwenimage_variant_pipeline(variant: str, seed: int = 0, dtype: torch.dtype = torch.float32, scheduler=None):
    """A tiny random-weight pipeline of one Qwen-Image variant (a key of ``QWENIMAGE_VARIANTS``)."""
    import diffusers

    if variant not in QWENIMAGE_VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(QWENIMAGE_VARIANTS)}, got {variant!r}")
    if variant == "qwenimage21":
        return qwenimage21_pipeline(seed, dtype, scheduler)
    cfg = dict(QWENIMAGE_CONFIGS["tiny"])
    cfg.pop("height"), cfg.pop("width")
    layered = variant == "layered"
    torch.manual_seed(seed)
    transformer = diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, guidance_embeds=False,
        # Layered's real transformer: a layer-aware RoPE and an extra timestep condition (RGB or not)
        use_additional_t_cond=layered, use_layer3d_rope=layered, **cfg)
    torch.manual_seed(seed)
    vae = _vae(6 if variant in _FIXED_AREA else 2)
    components = dict(scheduler=scheduler or diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae,
                      text_encoder=None, tokenizer=None, transformer=transformer)
    if layered:
        components["tokenizer"], components["text_encoder"] = qwen_text_encoder(cfg["joint_attention_dim"], seed)
    if variant in _FIXED_AREA:
        components["processor"] = None
    pipe = getattr(diffusers, QWENIMAGE_VARIANTS[variant])(**components)
    return _ready(pipe, dtype)


def qwenimage21_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, scheduler=None):
    """A tiny random-weight QwenImage21Pipeline: 16x VAE with 8 latent channels, Qwen3-VL text and vision."""
    import diffusers
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    z_dim, hidden = 8, 16
    torch.manual_seed(seed)
    transformer = diffusers.QwenImage21Transformer2DModel(
        patch_size=1, in_channels=z_dim, out_channels=z_dim, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, context_in_dim=hidden, mlp_ratio=2, axes_dims_rope=(4, 6, 6))
    torch.manual_seed(seed)
    # four spatial halvings: the 16x the pipeline assumes
    vae = diffusers.AutoencoderKLQwenImage21(
        base_dim=4, decoder_base_dim=4, z_dim=z_dim, dim_mult=[1] * 5, num_res_blocks=1, attn_scales=[],
        temperal_downsample=[False, True, True, True], latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim)
    tokenizer = _byte_level_tokenizer(["Comprehend and analyze the provided prompt.", "a photo of a cat",
                                       "a lighthouse at dusk", "blurry, low quality"],
                                      extra_special=_VISION_TOKENS)
    tokenizer.chat_template = _CHAT_TEMPLATE
    token = tokenizer.convert_tokens_to_ids
    torch.manual_seed(seed)
    config = Qwen3VLConfig(
        text_config=dict(hidden_size=hidden, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, head_dim=8, vocab_size=len(tokenizer),
                         rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[1, 1, 2])),
        # one merged vision token covers 32 pixels: the 2x2 latents of the 16x VAE it stands for
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=hidden,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                           deepstack_visual_indexes=[0]),
        image_token_id=token("<|image_pad|>"), video_token_id=token("<|video_pad|>"),
        vision_start_token_id=token("<|vision_start|>"), vision_end_token_id=token("<|vision_end|>"))
    text_encoder = Qwen3VLForConditionalGeneration(config).eval()
    image_processor = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2,
                                               min_pixels=32 * 32, max_pixels=64 * 64)
    processor = _image_text_processor()(image_processor, tokenizer, chat_template=_CHAT_TEMPLATE)
    pipe = diffusers.QwenImage21Pipeline(scheduler=scheduler or diffusers.FlowMatchEulerDiscreteScheduler(),
                                         vae=vae, text_encoder=text_encoder, processor=processor,
                                         transformer=transformer)
    return _ready(pipe, dtype)


_VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
#: the plain Qwen chat layout (text parts only), which the pipeline runs to count its system-prompt tokens
_CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for part in message['content'] %}"
                  "{{ part['text'] }}{% endfor %}<|im_end|>\n{% endfor %}")


def _image_text_processor():
    """Qwen3-VL's processor with its image and text parts only: the video part needs torchvision."""
    from transformers import Qwen3VLProcessor

    class Qwen3VLImageTextProcessor(Qwen3VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return Qwen3VLImageTextProcessor


def _image(seed: int, size: tuple[int, int]):
    from PIL import Image

    pixels = np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _mask(size: tuple[int, int]):
    """White (repaint) on the right half, black (keep) on the left."""
    from PIL import Image

    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    mask[:, size[0] // 2:] = 255
    return Image.fromarray(mask)


def qwenimage_variant_inputs(variant: str, seed: int = 0, pos_len: int = 7, neg_len: int = 5,
                             dtype: torch.dtype = torch.float32) -> dict:
    """Call arguments for :func:`qwenimage_variant_pipeline`: PIL input image(s), text of unequal lengths for
    the two branches, 2 steps, ``true_cfg_scale=4``; ``strength < 1`` where the pipeline takes one."""
    g = torch.Generator().manual_seed(seed + 1000)
    dim = QWENIMAGE_CONFIGS["tiny"]["joint_attention_dim"]
    inputs: dict = dict(true_cfg_scale=4.0, num_inference_steps=2)
    if variant == "qwenimage21":
        # 2.1 samples without guidance by default (scale 1): the tests turn it on
        inputs.update(prompt="a photo of a cat", negative_prompt="blurry, low quality", height=64, width=64,
                      output_resolution=64, image=_image(seed, (48, 32)).convert("RGBA"))
        return inputs
    if variant == "layered":
        inputs.update(prompt="a photo of a cat", negative_prompt="blurry, low quality", layers=2,
                      image=_image(seed, (48, 32)))
        return inputs
    inputs.update(
        prompt_embeds=_embeds(g, 1, pos_len, dim, dtype),
        prompt_embeds_mask=torch.ones(1, pos_len, dtype=torch.long),
        negative_prompt_embeds=_embeds(g, 1, neg_len, dim, dtype),
        negative_prompt_embeds_mask=torch.ones(1, neg_len, dtype=torch.long),
    )
    if variant in ("edit", "edit_plus"):
        # the output size is free (the input image is still encoded at about one megapixel)
        inputs.update(image=_image(seed, (64, 48)), height=256, width=256)
        if variant == "edit_plus":
            inputs["image"] = [inputs["image"], _image(seed + 1, (48, 48))]
    elif variant in ("img2img", "inpaint"):
        inputs.update(image=_image(seed, (40, 40)), height=32, width=32, strength=0.75, num_inference_steps=4)
    if variant == "inpaint":
        inputs["mask_image"] = _mask((40, 40))
    if variant == "edit_inpaint":
        inputs.update(image=_image(seed, (64, 64)), mask_image=_mask((64, 64)), strength=0.75,
                      num_inference_steps=4)
    return inputs
