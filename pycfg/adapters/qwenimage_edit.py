"""QwenImageEditPipeline and QwenImageEditPlusPipeline: Qwen-Image with input images.

What their ``__call__`` does beyond QwenImagePipeline's:

- the input image sets the default size (about one megapixel at its aspect ratio, rounded to the packing
  multiple) and is resized to that area whatever the requested size; Edit-Plus takes several images, resized to
  384x384-ish for the text encoder and to one megapixel for the VAE, the last one setting the default size;
- ``encode_prompt`` reads the resized image(s) too (Qwen-VL sees the image with the instruction);
- ``prepare_latents`` also encodes the image(s) with the VAE (mode, no sampling) into packed image latents;
- every forward reads ``cat([latents, image_latents], dim=1)`` with one ``img_shapes`` entry per image, and its
  output is sliced back to the generated tokens (``[:, :latents.size(1)]``);
- Edit-Plus refuses a batch of prompts.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, NamedTuple

from ._common import prompt_batch_size
from .base import own_tensor
from .qwenimage import QwenImageAdapter, QwenRequest


def pil_size(image, index: int) -> tuple[int, int]:
    """The (width, height) of ``image`` (or of ``image[index]`` for a list): the stock calls read the size of
    a PIL image there, so anything else fails here, before any model runs."""
    first = image[index] if isinstance(image, list) and image else image
    if not (hasattr(first, "size") and isinstance(first.size, tuple)):
        raise TypeError(f"image must be a PIL image or a list of them, got {type(first).__name__}")
    return first.size


class EditImages(NamedTuple):
    """An edit request's input images, preprocessed as the stock call does."""

    #: what ``encode_prompt`` reads (resized PIL images)
    prompt: Any
    #: what ``prepare_latents`` encodes (a preprocessed tensor, or a list of them)
    vae: Any
    #: (width, height) of each VAE input, for ``img_shapes``
    vae_sizes: list[tuple[int, int]]


class QwenImageEditAdapter(QwenImageAdapter):
    pipeline_classes = ("QwenImageEditPipeline",)
    # context parallelism is declared by the family for its own sequence only: not checked for the variants
    capabilities = replace(QwenImageAdapter.capabilities, context_parallel=False)

    def input_size(self, a: dict[str, Any]) -> tuple[int, int]:
        """(width, height) the stock call derives from the input image: one megapixel at its aspect ratio."""
        width, height = pil_size(a["image"], 0)
        return self.module.calculate_dimensions(1024 * 1024, width / height)[:2]

    def default_size(self, a: dict[str, Any]) -> None:
        width, height = self.input_size(a)
        multiple = self.pipe.vae_scale_factor * 2
        a["width"] = (a["width"] or width) // multiple * multiple
        a["height"] = (a["height"] or height) // multiple * multiple

    def prepare_images(self, req: QwenRequest) -> None:
        pipe = self.pipe
        width, height = self.input_size(req.args)
        image = pipe.image_processor.resize(req.args["image"], height, width)
        req.images = EditImages(image, pipe.image_processor.preprocess(image, height, width).unsqueeze(2),
                                [(width, height)])

    def latents_shape(self, a: dict[str, Any]) -> None:
        return None  # this prepare_latents encodes the input images first: the pipeline checks the shape itself

    def prompt_kwargs(self, req: QwenRequest) -> dict[str, Any]:
        return {"image": req.images.prompt}

    def prepare_latents(self, req: QwenRequest) -> None:
        a = req.args
        latents, req.image_latents = self.pipe.prepare_latents(
            req.images.vae, req.batch_size * a["num_images_per_prompt"], self.latent_channels(), req.height,
            req.width, req.texts["prompt"][0].dtype, req.device, a["generator"], a["latents"])
        req.latents = own_tensor(latents, a["latents"])
        grids = [self.latent_grid(height, width) for width, height in req.images.vae_sizes]
        req.img_shapes = [[self.latent_grid(req.height, req.width), *grids]] * req.batch_size


class QwenImageEditPlusAdapter(QwenImageEditAdapter):
    pipeline_classes = ("QwenImageEditPlusPipeline",)

    def input_size(self, a: dict[str, Any], image=None) -> tuple[int, int]:
        width, height = pil_size(image if image is not None else a["image"], -1)
        return self.module.calculate_dimensions(self.module.VAE_IMAGE_SIZE, width / height)

    def check_inputs(self, a: dict[str, Any]) -> None:
        super().check_inputs(a)
        batch = prompt_batch_size(a["prompt"], a["prompt_embeds"])
        if batch > 1:
            raise ValueError(f"QwenImageEditPlusPipeline takes one prompt per call (batch size 1), got {batch}")

    def prepare_images(self, req: QwenRequest) -> None:
        pipe, module = self.pipe, self.module
        images = req.args["image"] if isinstance(req.args["image"], list) else [req.args["image"]]
        prompt_images, vae_images, vae_sizes = [], [], []
        for image in images:
            width, height = image.size
            cond_width, cond_height = module.calculate_dimensions(module.CONDITION_IMAGE_SIZE, width / height)
            vae_width, vae_height = self.input_size(req.args, image)
            prompt_images.append(pipe.image_processor.resize(image, cond_height, cond_width))
            vae_images.append(pipe.image_processor.preprocess(image, vae_height, vae_width).unsqueeze(2))
            vae_sizes.append((vae_width, vae_height))
        req.images = EditImages(prompt_images, vae_images, vae_sizes)
