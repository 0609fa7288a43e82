"""QwenImage21Pipeline: Qwen-Image 2.1, text to image or conditioned on input images.

What its ``__call__`` does beyond QwenImagePipeline's (it shares the family's loop, combine order and text
handling, with another transformer, VAE and text encoder):

- input images (PIL or numpy, one flat list) are resized to ``output_resolution`` squared at their aspect ratio,
  the last one setting the default size; the Qwen3-VL encoder reads them with the prompt, and ``encode_prompt``
  also returns which text positions hold image tokens (``image_pad_mask``); no ``guidance_scale`` or
  ``max_sequence_length`` arguments;
- latents are unpatched (``in_channels`` channels, one token per 16x16 pixels); the image latents are put
  *before* the latents in every forward's sequence and the output is sliced to its last ``latents.size(1)``
  tokens; ``img_shapes`` lists the images first;
- every forward takes ``img_mask``: the branch's own ``image_pad_mask`` extended by one slot per 2x2 latents;
- with ``use_kv_cache`` (and a ``causal_condition`` transformer) each branch keeps a key/value cache of its text
  and image tokens: filled at the first step (``"extract"``), read at the others (``"cached"``). The cache is
  per branch, so those branches never share a batched forward, and a step's mode is a host choice, so such
  requests are not captured as one step graph;
- sigmas default to the pipeline's configured ``sample_sigmas``; the combine has no renormalisation;
- decoding multiplies by the latents' std (not divides by its inverse), and the output has 4 channels (RGBA).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch

from ..guidance.base import NEGATIVE, PROMPT
from ._common import branch_forward
from .base import own_tensor
from .qwenimage import QwenImageAdapter, QwenRequest


class QwenImage21Adapter(QwenImageAdapter):
    pipeline_classes = ("QwenImage21Pipeline",)
    # per-branch caches and image masks: one forward per branch; padded text would move the RoPE positions
    capabilities = replace(QwenImageAdapter.capabilities, batchable=False, text_bucket=False, graph_steps=False,
                           graph_value_args=("prompt", "negative_prompt", "prompt_embeds", "negative_prompt_embeds",
                                             "prompt_embeds_mask", "negative_prompt_embeds_mask", "latents",
                                             "generator", "true_cfg_scale", "output_type", "return_dict"))

    def default_size(self, a: dict[str, Any]) -> None:
        image, resolution = a["image"], a["output_resolution"]
        if image is not None:
            a["image"] = images = [_as_pil(im) for im in (image if isinstance(image, list) else [image])]
            width, height = self.input_size(images[-1], resolution)
            a["width"], a["height"] = a["width"] or width, a["height"] or height
        a["width"], a["height"] = a["width"] or resolution, a["height"] or resolution
        a["guidance_scale"] = None  # no distilled guidance in this family member

    def input_size(self, image, resolution: int) -> tuple[int, int]:
        return self.module.calculate_dimensions(resolution * resolution, image.size[0] / image.size[1])[:2]

    def check_inputs(self, a: dict[str, Any]) -> None:
        self.pipe.check_inputs(a["prompt"], a["height"], a["width"], a["prompt_embeds"],
                               a["callback_on_step_end_tensor_inputs"])
        multiple = self.pipe.vae_scale_factor * 2
        a["width"], a["height"] = a["width"] // multiple * multiple, a["height"] // multiple * multiple

    def renorm(self, a: dict[str, Any]) -> bool:
        return False

    def prepare_images(self, req: QwenRequest) -> None:
        pipe, resolution = self.pipe, req.args["output_resolution"]
        sizes, prompt_images, vae_images = [], None, None
        if req.args["image"] is not None:
            prompt_images, vae_images = [], []
            for image in req.args["image"]:
                image = image.convert("RGBA") if image.mode != "RGBA" else image
                width, height = self.input_size(image, resolution)
                sizes.append((width, height))
                prompt_images.append(pipe.image_processor.resize(image, width=width, height=height))
                vae_images.append(pipe.image_processor.preprocess(image, width=width, height=height).unsqueeze(2))
        req.images = (prompt_images, vae_images, sizes)

    def encode_texts(self, req: QwenRequest, needs_negative: bool) -> None:
        a, sources = req.args, {PROMPT: "", NEGATIVE: "negative_"} if needs_negative else {PROMPT: ""}
        for source, prefix in sources.items():
            embeds, mask, pad_mask = self.pipe.encode_prompt(
                image=req.images[0], prompt=a[f"{prefix}prompt"], prompt_embeds=a[f"{prefix}prompt_embeds"],
                prompt_embeds_mask=a[f"{prefix}prompt_embeds_mask"], device=req.device,
                num_images_per_prompt=a["num_images_per_prompt"])
            req.texts[source] = (embeds, mask)
            req.step_tensors[f"{source}_image_pad_mask"] = pad_mask

    def prepare_latents(self, req: QwenRequest) -> None:
        pipe, a = self.pipe, req.args
        latents, req.image_latents = pipe.prepare_latents(
            req.images[1], req.batch_size * a["num_images_per_prompt"], pipe.transformer.config.in_channels,
            req.height, req.width, req.texts[PROMPT][0].dtype, req.device, a["generator"], a["latents"])
        req.latents = own_tensor(latents, a["latents"])
        scale = pipe.vae_scale_factor
        grids = [(1, height // scale, width // scale) for width, height in [*req.images[2], (req.width, req.height)]]
        req.img_shapes = [grids] * req.batch_size
        for key, mask in req.step_tensors.items():  # one slot per 2x2 generated latents
            req.step_tensors[key] = torch.cat([mask, mask.new_ones(mask.shape[0], latents.shape[1] // 4)], dim=1)

    def prepare_guidance_embeds(self, req: QwenRequest) -> None:
        """No guidance-distilled 2.1 transformer."""

    def sigmas(self, req: QwenRequest):
        steps, sigmas = req.args["num_inference_steps"], req.args["sigmas"]
        sigmas = self.pipe.config.sample_sigmas if sigmas is None else sigmas
        return np.linspace(1.0, 1 / steps, steps) if sigmas is None else sigmas

    def branch_forward(self, req: QwenRequest, names: tuple[str, ...], x: torch.Tensor,
                       t: torch.Tensor) -> list[torch.Tensor]:
        (name,) = names  # never batched (see ``capabilities``)
        transformer, spec = self.pipe.transformer, req.policy.branch(name)
        cache = None
        if req.args["use_kv_cache"] and transformer.config.causal_condition:
            caches = req.variant_state.setdefault("kv_caches", {})
            cache = caches.setdefault(name, self.module.QwenImage21KVCache(len(transformer.transformer_blocks)))
        mode = None if cache is None else "extract" if cache.get_layer(0).k is None else "cached"
        embeds, mask = req.texts[spec.source]
        xin = x if req.image_latents is None else torch.cat([req.image_latents, x], dim=1)
        with branch_forward(transformer, name, spec) as extra:
            out = transformer(hidden_states=xin, timestep=t.expand(x.shape[0]).to(x.dtype) / 1000,
                              encoder_hidden_states=embeds, encoder_hidden_states_mask=mask,
                              img_shapes=req.img_shapes, img_mask=req.step_tensors[f"{spec.source}_image_pad_mask"],
                              attention_kwargs=self.pipe._attention_kwargs, kv_cache=cache, kv_cache_mode=mode,
                              return_dict=False, **extra)[0]
        return [out[:, -x.size(1):]]

    def decode(self, req: QwenRequest, x: torch.Tensor):
        pipe, output_type = self.pipe, req.args["output_type"]
        if output_type == "latent":
            return x
        x = pipe._unpack_latents(x, req.height, req.width, pipe.vae_scale_factor).to(pipe.vae.dtype)
        z_dim = pipe.vae.config.z_dim
        latents_mean = torch.tensor(pipe.vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(x.device, x.dtype)
        latents_std = torch.tensor(pipe.vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(x.device, x.dtype)
        image = pipe.vae.decode(x * latents_std + latents_mean, return_dict=False)[0][:, :, 0]
        return pipe.image_processor.postprocess(image, output_type=output_type)


def _as_pil(image):
    """An input image as the stock call takes it: a PIL image, or a numpy array made one."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        return Image.fromarray(image)
    raise ValueError(f"image must be a PIL image or a numpy array, or a flat list of them; got {type(image).__name__}")
