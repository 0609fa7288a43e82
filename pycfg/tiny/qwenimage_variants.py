"""The Qwen-Image variants (edit, edit-plus, img2img, inpaint, edit-inpaint, layered) at a tiny size.

The edit pipelines resize every input image to about one megapixel (Layered to 640x640) whatever the requested
size, so their VAE downsamples 64x: a 1024x1024 input becomes 8x8 packed tokens. Img2img and inpaint honour
``height`` / ``width`` and keep the 4x VAE of :func:`~pycfg.tiny.qwenimage_pipeline`.

Text goes in as random prompt embeds (the edit pipelines' Qwen-VL processor needs torchvision for its video
part), except for Layered, whose ``__call__`` reads the text encoder's dtype and captions the image when no
prompt string is given: it gets the tiny Qwen2.5-VL text encoder and prompt strings.
"""

from __future__ import annotations

import numpy as np
import torch

from ._common import _embeds, _ready
from .qwenimage import QWENIMAGE_CONFIGS, qwen_text_encoder

#: pipeline class by variant name
QWENIMAGE_VARIANTS = {
    "edit": "QwenImageEditPipeline",
    "edit_plus": "QwenImageEditPlusPipeline",
    "img2img": "QwenImageImg2ImgPipeline",
    "inpaint": "QwenImageInpaintPipeline",
    "edit_inpaint": "QwenImageEditInpaintPipeline",
    "layered": "QwenImageLayeredPipeline",
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
