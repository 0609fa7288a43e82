"""QwenImageLayeredPipeline: an input image decomposed into ``layers`` image layers.

What its ``__call__`` does beyond QwenImagePipeline's:

- the size comes from the input image alone: ``resolution`` (640 or 1024) squared at its aspect ratio; there are
  no ``height`` / ``width`` arguments; the image is preprocessed in the text encoder's dtype;
- without a prompt the text encoder captions the image (``get_image_caption``), and that caption is the prompt;
- the latents hold ``layers + 1`` frames (the composite and each layer); the image latents are appended to every
  forward's sequence and the output sliced back, as in Edit, with one ``img_shapes`` entry per frame and image;
- the forward takes ``additional_t_cond`` (0: RGB) as well;
- sigmas default to ``linspace(1, 0, steps + 1)[:-1]``, and ``mu`` is the square root of the image latents'
  length over 256;
- the combine renormalises only with ``cfg_normalize=True``;
- decoding drops the composite frame and decodes each layer; the output is one list of layers per prompt.
  ``output_type="latent"`` fails in the stock call (an UnboundLocalError), so it is refused here up front.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ._common import prompt_batch_size
from .base import own_tensor
from .qwenimage import QwenImageAdapter, QwenRequest
from .qwenimage_edit import EditImages, pil_size

RESOLUTIONS = (640, 1024)


class QwenImageLayeredAdapter(QwenImageAdapter):
    pipeline_classes = ("QwenImageLayeredPipeline",)

    def input_size(self, a: dict[str, Any]) -> tuple[int, int]:
        width, height = pil_size(a["image"], 0)
        return self.module.calculate_dimensions(a["resolution"] ** 2, width / height)

    def default_size(self, a: dict[str, Any]) -> None:
        if a["resolution"] not in RESOLUTIONS:
            raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {a['resolution']!r}")
        if a["output_type"] == "latent":
            raise ValueError("output_type must be 'pil', 'np' or 'pt' for QwenImageLayeredPipeline: its own call "
                             "fails on 'latent' (diffusers 0.42.1)")
        width, height = self.input_size(a)
        multiple = self.pipe.vae_scale_factor * 2
        a["width"], a["height"] = width // multiple * multiple, height // multiple * multiple

    def check_inputs(self, a: dict[str, Any]) -> None:
        self.pipe.check_inputs(a["height"], a["width"], **self.text_check_kwargs(a))

    def renorm(self, a: dict[str, Any]) -> bool:
        return a["cfg_normalize"]

    def prepare_images(self, req: QwenRequest) -> None:
        pipe, a = self.pipe, req.args
        width, height = self.input_size(a)
        image = pipe.image_processor.resize(a["image"], height, width)
        vae_image = pipe.image_processor.preprocess(image, height, width).unsqueeze(2)
        req.images = EditImages(image, vae_image.to(dtype=pipe.text_encoder.dtype), [(width, height)])
        if a["prompt"] is None or a["prompt"] in ("", " "):
            caption = pipe.get_image_caption(image, use_en_prompt=a["use_en_prompt"], device=req.device)
            req.args = {**a, "prompt": caption}
            req.batch_size = prompt_batch_size(caption, a["prompt_embeds"])

    def prepare_latents(self, req: QwenRequest) -> None:
        a, layers = req.args, req.args["layers"]
        latents, req.image_latents = self.pipe.prepare_latents(
            req.images.vae, req.batch_size * a["num_images_per_prompt"], self.latent_channels(), req.height,
            req.width, layers, req.texts["prompt"][0].dtype, req.device, a["generator"], a["latents"])
        req.latents = own_tensor(latents, a["latents"])
        (width, height), = req.images.vae_sizes
        frames = [self.latent_grid(req.height, req.width)] * (layers + 1)
        req.img_shapes = [[*frames, self.latent_grid(height, width)]] * req.batch_size
        req.forward_kwargs["additional_t_cond"] = torch.tensor([0] * req.batch_size).to(req.device, torch.long)

    def sigmas(self, req: QwenRequest):
        steps, sigmas = req.args["num_inference_steps"], req.args["sigmas"]
        return np.linspace(1.0, 0, steps + 1)[:-1] if sigmas is None else sigmas

    def mu(self, req: QwenRequest) -> float:
        return (req.image_latents.shape[1] / (256 * 256 / 16 / 16)) ** 0.5

    def decode(self, req: QwenRequest, x: torch.Tensor):
        pipe = self.pipe
        x = pipe._unpack_latents(x, req.height, req.width, req.args["layers"], pipe.vae_scale_factor)
        x = x.to(pipe.vae.dtype)
        z_dim = pipe.vae.config.z_dim
        latents_mean = torch.tensor(pipe.vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(x.device, x.dtype)
        latents_std = 1.0 / torch.tensor(pipe.vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(x.device, x.dtype)
        x = x / latents_std + latents_mean
        b, c, f, h, w = x.shape
        x = x[:, :, 1:].permute(0, 2, 1, 3, 4).reshape(-1, c, 1, h, w)  # the layers, without the composite
        image = pipe.image_processor.postprocess(pipe.vae.decode(x, return_dict=False)[0].squeeze(2),
                                                 output_type=req.args["output_type"])
        return [image[k * f:(k + 1) * f] for k in range(b)]
