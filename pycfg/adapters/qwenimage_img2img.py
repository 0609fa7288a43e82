"""QwenImageImg2ImgPipeline, QwenImageInpaintPipeline and QwenImageEditInpaintPipeline.

What their ``__call__`` does beyond QwenImagePipeline's:

- img2img: the input image is preprocessed at the requested size; ``mu`` comes from that size; the schedule is
  cut by ``strength`` (``get_timesteps``, which also sets the scheduler's begin index); the initial latents are
  the encoded image noised to the first remaining timestep (``prepare_latents``, ``scheduler.scale_noise``);
  nothing is appended to the forwards' inputs;
- inpaint: as img2img, with an optional crop around the mask (``padding_mask_crop``); ``prepare_latents`` also
  returns the noise and the clean image latents, ``prepare_mask_latents`` the packed mask; after every solver
  step the latents are blended ``(1 - mask) * image_latents_noised + mask * latents``, the image latents noised
  to the next timestep (clean after the last step); the decoded image is pasted back over the crop;
- edit-inpaint: as inpaint, at the edit pipelines' one-megapixel size (the requested size is ignored), with the
  resized input image read by ``encode_prompt`` and its latents appended to every forward as in Edit.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, NamedTuple

import torch

from ..steps import StepIndex
from ._common import inpaint_step_tensors
from ._pipeline_view import with_scheduler
from .base import own_tensor
from .qwenimage import QwenImageAdapter, QwenRequest
from .qwenimage_edit import QwenImageEditAdapter


class QwenImageImg2ImgAdapter(QwenImageAdapter):
    pipeline_classes = ("QwenImageImg2ImgPipeline",)
    # context parallelism is declared by the family for its own sequence only: not checked for the variants
    capabilities = replace(QwenImageAdapter.capabilities, context_parallel=False)

    def check_inputs(self, a: dict[str, Any]) -> None:
        self.pipe.check_inputs(a["prompt"], a["strength"], a["height"], a["width"], **self.text_check_kwargs(a))

    def prepare_images(self, req: QwenRequest) -> None:
        image = self.pipe.image_processor.preprocess(req.args["image"], height=req.height, width=req.width)
        req.images = image.to(dtype=torch.float32)

    def image_seq_len(self, req: QwenRequest) -> int:
        scale = self.pipe.vae_scale_factor
        return (int(req.height) // scale // 2) * (int(req.width) // scale // 2)

    def prepare_latents_and_timesteps(self, req: QwenRequest) -> None:
        a = req.args
        self.prepare_timesteps(req)
        view = with_scheduler(self.pipe, req.scheduler)  # the pipeline, seeing the private scheduler
        req.timesteps, steps = view.get_timesteps(len(req.timesteps), a["strength"], req.device)
        if steps < 1:
            raise ValueError(f"strength={a['strength']} leaves {steps} of {a['num_inference_steps']} steps")
        batch = req.batch_size * a["num_images_per_prompt"]
        self.prepare_noised_latents(req, view, req.timesteps[:1].repeat(batch), batch)
        grids = [self.latent_grid(height, width) for width, height in self.input_sizes(req)]
        req.img_shapes = [[self.latent_grid(req.height, req.width), *grids]] * req.batch_size

    def input_sizes(self, req: QwenRequest) -> list[tuple[int, int]]:
        """(width, height) of the images whose latents every forward appends: none here."""
        return []

    def begin_index(self, req: QwenRequest) -> int:
        return req.scheduler.begin_index  # ``get_timesteps`` set it where the cut schedule starts

    def prepare_noised_latents(self, req: QwenRequest, view, timestep, batch: int) -> None:
        """``req.latents``: the input image's latents noised to ``timestep`` by the pipeline's ``prepare_latents``."""
        a = req.args
        latents = view.prepare_latents(req.images, timestep, batch, self.latent_channels(), req.height,
                            req.width, req.texts["prompt"][0].dtype, req.device, a["generator"], a["latents"])
        req.latents = own_tensor(latents, a["latents"])


class InpaintImages(NamedTuple):
    #: the input image (edit-inpaint: resized): what ``encode_prompt`` reads and the output is pasted over
    original: Any
    #: preprocessed (cropped, resized, normalised) for the VAE
    init: torch.Tensor
    crops_coords: Any
    resize_mode: str


class QwenImageInpaintAdapter(QwenImageImg2ImgAdapter):
    pipeline_classes = ("QwenImageInpaintPipeline",)

    def check_inputs(self, a: dict[str, Any]) -> None:
        self.pipe.check_inputs(a["prompt"], a["image"], a["mask_image"], a["strength"], a["height"], a["width"],
                               a["output_type"], padding_mask_crop=a["padding_mask_crop"],
                               **self.text_check_kwargs(a))

    def prepare_images(self, req: QwenRequest, size: tuple[int, int] | None = None) -> None:
        """Crop region and preprocessing as stock; ``size`` (edit-inpaint): resize the image to it first."""
        pipe, a = self.pipe, req.args
        crops, mode = None, "default"
        if a["padding_mask_crop"] is not None:
            crops, mode = pipe.mask_processor.get_crop_region(a["mask_image"], req.width, req.height,
                                                              pad=a["padding_mask_crop"]), "fill"
        image = a["image"] if size is None else pipe.image_processor.resize(a["image"], size[1], size[0])
        height, width = (req.height, req.width) if size is None else (size[1], size[0])
        init = pipe.image_processor.preprocess(image, height=height, width=width, crops_coords=crops,
                                               resize_mode=mode)
        req.images = InpaintImages(image, init.to(dtype=torch.float32), crops, mode)

    def prepare_noised_latents(self, req: QwenRequest, view, timestep, batch: int) -> None:
        """As img2img, plus the packed mask and the image latents the blend reads at each step."""
        pipe, a, images = self.pipe, req.args, req.images
        dtype = req.texts["prompt"][0].dtype
        latents, noise, image_latents = view.prepare_latents(
            images.init, timestep, batch, self.latent_channels(), req.height, req.width, dtype,
            req.device, a["generator"], a["latents"])
        req.latents = own_tensor(latents, a["latents"])
        req.image_latents = self.appended_latents(image_latents)
        req.step_tensors.update(inpaint_step_tensors(pipe, req, self.latent_channels(), dtype, image_latents, noise))

    def appended_latents(self, image_latents: torch.Tensor) -> torch.Tensor | None:
        """What every forward appends to its sequence: nothing here."""
        return None

    def after_update(self, req: QwenRequest):
        mask, noised = req.step_tensors["mask"], req.step_tensors["noised_image_latents"]

        def blend(step: StepIndex, x: torch.Tensor) -> torch.Tensor:
            return (1 - mask) * step.select(noised) + mask * x

        return blend

    def decode(self, req: QwenRequest, x: torch.Tensor):
        images = super().decode(req, x)
        if req.args["padding_mask_crop"] is None or req.args["output_type"] == "latent":
            return images
        overlay = self.pipe.image_processor.apply_overlay
        return [overlay(req.args["mask_image"], req.images.original, im, req.images.crops_coords) for im in images]


class QwenImageEditInpaintAdapter(QwenImageInpaintAdapter):
    pipeline_classes = ("QwenImageEditInpaintPipeline",)
    input_size = QwenImageEditAdapter.input_size

    def default_size(self, a: dict[str, Any]) -> None:
        width, height = self.input_size(a)
        multiple = self.pipe.vae_scale_factor * 2
        a["width"], a["height"] = width // multiple * multiple, height // multiple * multiple

    def prepare_images(self, req: QwenRequest) -> None:
        super().prepare_images(req, size=self.input_size(req.args))

    def prompt_kwargs(self, req: QwenRequest) -> dict[str, Any]:
        return {"image": req.images.original}

    def input_sizes(self, req: QwenRequest) -> list[tuple[int, int]]:
        return [self.input_size(req.args)]

    def appended_latents(self, image_latents: torch.Tensor) -> torch.Tensor | None:
        return image_latents  # the clean image latents extend every forward's sequence, as in Edit

