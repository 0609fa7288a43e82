"""FluxKontextPipeline, FluxImg2ImgPipeline and FluxInpaintPipeline on the Flux family's hooks.

What their ``__call__`` does beyond FluxPipeline's:

- Kontext: the generation size is fitted to ``max_area``; the input image is resized (to a preferred Kontext
  resolution with ``_auto_resize``) and encoded; its tokens, with their own position ids, are appended to every
  forward's sequence and each prediction is sliced back to the generated tokens;
- img2img: ``mu`` comes from the requested size; the schedule is cut by ``strength`` (``get_timesteps``, which
  also sets the scheduler's begin index); the initial latents are the encoded image noised to the first
  remaining timestep (``prepare_latents``, ``scheduler.scale_noise``);
- inpaint: as img2img, with an optional crop around the mask (``padding_mask_crop``); after every solver step
  the latents are blended ``(1 - mask) * image_latents_noised + mask * latents``, the image latents noised to the
  next timestep (clean after the last step); the decoded image is pasted back over the crop.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, NamedTuple

import torch

from ..guidance.base import PROMPT
from ..steps import StepIndex
from ._common import inpaint_step_tensors
from ._pipeline_view import with_scheduler
from .base import own_tensor
from .flux import FluxAdapter, FluxRequest

#: call arguments of the image variants that reach the steps only through graph inputs (the encoded image)
# the variants leave context parallelism off: it is declared and checked for the families' own sequences
IMAGE_VALUE_ARGS = FluxAdapter.capabilities.graph_value_args + ("image",)


class FluxKontextAdapter(FluxAdapter):
    pipeline_classes = ("FluxKontextPipeline",)
    capabilities = replace(FluxAdapter.capabilities, context_parallel=False, graph_value_args=IMAGE_VALUE_ARGS)

    def default_size(self, a: dict[str, Any]) -> None:
        # stock fits the requested aspect ratio to max_area, rounded to the packing multiple (inline, no helper)
        super().default_size(a)
        aspect_ratio = a["width"] / a["height"]
        multiple_of = self.pipe.vae_scale_factor * 2
        width = round((a["max_area"] * aspect_ratio) ** 0.5) // multiple_of * multiple_of
        height = round((a["max_area"] / aspect_ratio) ** 0.5) // multiple_of * multiple_of
        if (height, width) != (a["height"], a["width"]):
            self.module.logger.warning(f"Generation `height` and `width` have been adjusted to {height} and {width} "
                                       "to fit the model requirements.")
        a["height"], a["width"] = height, width

    def prepare_images(self, req: FluxRequest) -> None:
        pipe, image = self.pipe, req.args["image"]
        if image is not None and not (isinstance(image, torch.Tensor) and image.size(1) == pipe.latent_channels):
            first = image[0] if isinstance(image, list) else image
            image_height, image_width = pipe.image_processor.get_default_height_width(first)
            if req.args["_auto_resize"]:
                aspect_ratio = image_width / image_height
                _, image_width, image_height = min(
                    (abs(aspect_ratio - w / h), w, h) for w, h in self.module.PREFERRED_KONTEXT_RESOLUTIONS)
            multiple_of = pipe.vae_scale_factor * 2
            image_width = image_width // multiple_of * multiple_of
            image_height = image_height // multiple_of * multiple_of
            image = pipe.image_processor.resize(image, image_height, image_width)
            image = pipe.image_processor.preprocess(image, image_height, image_width)
        req.images = image

    def prepare_latents(self, req: FluxRequest) -> None:
        a = req.args
        latents, req.image_latents, latent_ids, image_ids = self.pipe.prepare_latents(
            req.images, req.batch_size * a["num_images_per_prompt"], self.latent_channels(), req.height, req.width,
            req.texts[PROMPT][0].dtype, req.device, a["generator"], a["latents"])
        req.latents = own_tensor(latents, a["latents"])
        req.latent_ids = latent_ids if image_ids is None else torch.cat([latent_ids, image_ids], dim=0)


class FluxImg2ImgAdapter(FluxAdapter):
    pipeline_classes = ("FluxImg2ImgPipeline",)
    capabilities = replace(FluxAdapter.capabilities, context_parallel=False, graph_value_args=IMAGE_VALUE_ARGS)

    def check_inputs(self, a: dict[str, Any]) -> None:
        self.pipe.check_inputs(a["prompt"], a["prompt_2"], a["strength"], a["height"], a["width"],
                               **self.text_check_kwargs(a))

    def prepare_images(self, req: FluxRequest) -> None:
        image = self.pipe.image_processor.preprocess(req.args["image"], height=req.height, width=req.width)
        req.images = image.to(dtype=torch.float32)

    def init_image(self, req: FluxRequest) -> torch.Tensor:
        return req.images

    def prepare_latents_and_timesteps(self, req: FluxRequest) -> None:
        a, scale = req.args, self.pipe.vae_scale_factor
        self.prepare_timesteps(req, image_seq_len=(int(req.height) // scale // 2) * (int(req.width) // scale // 2))
        view = with_scheduler(self.pipe, req.scheduler)
        req.timesteps, steps = view.get_timesteps(len(req.timesteps), a["strength"], req.device)
        if steps < 1:
            raise ValueError(
                f"After adjusting the num_inference_steps by strength parameter: {a['strength']}, the number of "
                f"pipeline steps is {steps} which is < 1 and not appropriate for this pipeline.")
        batch = req.batch_size * a["num_images_per_prompt"]
        outputs = view.prepare_latents(self.init_image(req), req.timesteps[:1].repeat(batch), batch,
                                       self.latent_channels(), req.height, req.width, req.texts[PROMPT][0].dtype,
                                       req.device, a["generator"], a["latents"])
        self.take_latents(req, outputs)

    def take_latents(self, req: FluxRequest, outputs) -> None:
        """Keep what the pipeline's ``prepare_latents`` returned."""
        latents, req.latent_ids = outputs
        req.latents = own_tensor(latents, req.args["latents"])


class InpaintImages(NamedTuple):
    original: Any  # what the output is pasted back over (with a crop)
    init: torch.Tensor  # the preprocessed image
    crops_coords: Any
    resize_mode: str


class FluxInpaintAdapter(FluxImg2ImgAdapter):
    pipeline_classes = ("FluxInpaintPipeline",)
    capabilities = replace(FluxAdapter.capabilities, context_parallel=False,
                           graph_value_args=IMAGE_VALUE_ARGS + ("mask_image", "masked_image_latents"))

    def check_inputs(self, a: dict[str, Any]) -> None:
        self.pipe.check_inputs(a["prompt"], a["prompt_2"], a["image"], a["mask_image"], a["strength"], a["height"],
                               a["width"], a["output_type"], padding_mask_crop=a["padding_mask_crop"],
                               **self.text_check_kwargs(a))

    def prepare_images(self, req: FluxRequest) -> None:
        pipe, a = self.pipe, req.args
        crops, mode = None, "default"
        if a["padding_mask_crop"] is not None:
            crops = pipe.mask_processor.get_crop_region(a["mask_image"], req.width, req.height,
                                                        pad=a["padding_mask_crop"])
            mode = "fill"
        init = pipe.image_processor.preprocess(a["image"], height=req.height, width=req.width, crops_coords=crops,
                                               resize_mode=mode)
        req.images = InpaintImages(a["image"], init.to(dtype=torch.float32), crops, mode)

    def init_image(self, req: FluxRequest) -> torch.Tensor:
        return req.images.init

    def take_latents(self, req: FluxRequest, outputs) -> None:
        pipe, a = self.pipe, req.args
        latents, noise, image_latents, req.latent_ids = outputs
        req.latents = own_tensor(latents, a["latents"])
        dtype = req.texts[PROMPT][0].dtype
        req.step_tensors.update(inpaint_step_tensors(pipe, req, self.latent_channels(), dtype, image_latents, noise))

    def after_update(self, req: FluxRequest):
        mask, noised = req.step_tensors["mask"], req.step_tensors["noised_image_latents"]

        def blend(step: StepIndex, x: torch.Tensor) -> torch.Tensor:
            return (1 - mask) * step.select(noised) + mask * x

        return blend

    def decode(self, req: FluxRequest, x: torch.Tensor, output_type: str):
        images = super().decode(req, x, output_type)
        if req.args["padding_mask_crop"] is None:
            return images
        overlay = self.pipe.image_processor.apply_overlay
        return [overlay(req.args["mask_image"], req.images.original, im, req.images.crops_coords) for im in images]
