"""LongCat-Image (text to image): two separate forwards per step, then LongCat's clamped renormalisation.

Stock runs ``cond`` and ``uncond`` under their own cache contexts, combines ``u + s (c - u)`` and, with
``enable_cfg_renorm`` (the default), scales each token of the result by ``||c|| / (||p|| + 1e-8)`` clamped to
``[cfg_renorm_min, 1]``. That renormalisation is LongCat's own (Qwen-Image's has no clamp and no epsilon), so it
stays in the family as :class:`LongCatCFG`; with it off, stock's guidance is plain :class:`~pycfg.guidance.CFG`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..guidance import CFG, GuidancePolicy, NoGuidance
from ..guidance.base import NEGATIVE, PROMPT, KernelGuidance, Prediction
from ..runtime.job import Job
from ..steps import StepIndex
from ._common import begin_call, branch_forward, default_size, make_finish, prompt_batch_size, run_branches
from .base import Adapter, own_tensor


class LongCatCFG(CFG):
    """``p = u + s (c - u)``, then per token ``p * clamp(||c|| / (||p|| + 1e-8), renorm_min, 1)`` (norms over
    the last dim), as LongCat-Image's ``enable_cfg_renorm``. Not linear in the branches: ``gather`` only."""

    linear = False

    def __init__(self, scale: float, renorm_min: float = 0.0) -> None:
        super().__init__(scale)
        self.renorm_min = float(renorm_min)

    def kernel_guidance(self, i: int, active: tuple[str, ...]) -> KernelGuidance | None:
        return None  # the kernel has no clamped renorm: the combine runs here, the kernel does the update alone

    def combine(self, preds: dict[str, Prediction], i: int) -> Prediction:
        comb = super().combine(preds, i)
        if len(preds) == 1:
            return comb
        cond_norm = torch.norm(preds["cond"], dim=-1, keepdim=True)
        comb_norm = torch.norm(comb, dim=-1, keepdim=True)
        return comb * (cond_norm / (comb_norm + 1e-8)).clamp(min=self.renorm_min, max=1.0)

    def describe(self) -> str:
        return f"LongCatCFG(scale={self.scale}, renorm_min={self.renorm_min}{self._extras()})"


@dataclass
class LongCatImages:
    """The edit variant's input image, preprocessed for the VAE, and the half-size copy its prompt reads."""

    image: Any
    prompt_image: Any


class LongCatImageAdapter(Adapter):
    """No step graphs: LongCat's transformer is untested under capture here; steps run eagerly."""

    pipeline_classes = ("LongCatImagePipeline",)

    # -- what the variants override ---------------------------------------------------------------------------

    def size(self, a: dict[str, Any]) -> tuple[int, int]:
        """The generated image's (height, width)."""
        default_size(self.pipe, a)
        return a["height"], a["width"]

    def prepare_images(self, a: dict[str, Any], height: int, width: int) -> LongCatImages | None:
        """The variant's input image(s) (text to image: none)."""
        return None

    def encode(self, prompt, prompt_embeds, a, images: LongCatImages | None):
        """(embeds, text ids) of one side, with the pipeline's own ``encode_prompt``."""
        return self.pipe.encode_prompt(prompt=prompt, prompt_embeds=prompt_embeds,
                                       num_images_per_prompt=a["num_images_per_prompt"])

    def rewrite(self, a: dict[str, Any], prompt, device):
        """The prompt stock encodes (text to image may rewrite it with the text encoder)."""
        return self.pipe.rewire_prompt(prompt, device) if a["enable_prompt_rewrite"] else prompt

    def prepare_latents(self, a, images: LongCatImages | None, batch: int, height: int, width: int, dtype, device,
                        text_length: int):
        """(latents, position ids of every token a forward sees, image latents appended to the sequence)."""
        latents, ids = self.pipe.prepare_latents(batch, 16, height, width, dtype, device, a["generator"], a["latents"])
        return latents, ids, None

    # -- the family -------------------------------------------------------------------------------------------

    def complete_args(self, a: dict[str, Any]) -> None:
        a["size"] = self.size(a)

    def check_inputs(self, a: dict[str, Any]) -> None:
        self.pipe.check_inputs(a["prompt"], *a["size"], negative_prompt=a["negative_prompt"],
                               prompt_embeds=a["prompt_embeds"], negative_prompt_embeds=a["negative_prompt_embeds"])

    def default_policy(self, a: dict[str, Any]) -> GuidancePolicy:
        if not a["guidance_scale"] > 1:
            return NoGuidance()
        if a.get("enable_cfg_renorm"):
            return LongCatCFG(a["guidance_scale"], a["cfg_renorm_min"])
        return CFG(a["guidance_scale"])

    def prepare(self, a: dict[str, Any], policy: GuidancePolicy | None) -> Job:
        pipe, module = self.pipe, self.module
        policy = self.request_policy(a, policy)
        begin_call(pipe, guidance_scale=a["guidance_scale"], joint_attention_kwargs=a["joint_attention_kwargs"])
        batch_size = prompt_batch_size(a["prompt"], a["prompt_embeds"])
        device = pipe._execution_device
        height, width = a["size"]
        images = self.prepare_images(a, height, width)

        prompt = self.rewrite(a, a["prompt"], device)
        text = {PROMPT: list(self.encode(prompt, a["prompt_embeds"], a, images))}
        if self.needs_negative(policy):
            negative = "" if a["negative_prompt"] is None else a["negative_prompt"]
            text[NEGATIVE] = list(self.encode(negative, a["negative_prompt_embeds"], a, images))

        latents, image_ids, image_latents = self.prepare_latents(
            a, images, batch_size * a["num_images_per_prompt"], height, width, text[PROMPT][0].dtype, device,
            text[PROMPT][0].shape[1])
        latents = own_tensor(latents, a["latents"])
        scheduler = self.private_scheduler()
        n_steps = a["num_inference_steps"]
        sigmas = np.linspace(1.0, 1.0 / n_steps, n_steps) if a["sigmas"] is None else a["sigmas"]
        config = scheduler.config
        mu = module.calculate_shift(latents.shape[1], config.get("base_image_seq_len", 256),
                                    config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                    config.get("max_shift", 1.15))
        timesteps, _ = module.retrieve_timesteps(scheduler, n_steps, device, sigmas=sigmas, mu=mu)
        pipe._num_timesteps = len(timesteps)
        if pipe._joint_attention_kwargs is None:
            pipe._joint_attention_kwargs = {}
        transformer = pipe.transformer

        def run(name: str, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            embeds, ids = text[policy.branch(name).source]
            hidden = x if image_latents is None else torch.cat([x, image_latents], dim=1)
            timestep = t.expand(hidden.shape[0]).to(x.dtype)
            with branch_forward(transformer, name, policy.branch(name)) as extra:
                out = transformer(hidden_states=hidden, timestep=timestep / 1000, guidance=None,
                                  encoder_hidden_states=embeds, txt_ids=ids, img_ids=image_ids, return_dict=False,
                                  **extra)[0]
            # the edit variant's image tokens are sliced off: the prediction covers the generated ones
            return out if image_latents is None else out[:, : x.size(1)]

        def forward(names: tuple[str, ...], x: torch.Tensor, step: StepIndex, batched: bool) -> list[torch.Tensor]:
            return run_branches(pipe, names, x, step.select(timesteps), run)

        def decode(x: torch.Tensor, output_type: str):
            x = pipe._unpack_latents(x, height, width, pipe.vae_scale_factor)
            x = (x / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
            if x.dtype != pipe.vae.dtype:
                x = x.to(dtype=pipe.vae.dtype)
            image = pipe.vae.decode(x, return_dict=False)[0]
            return pipe.image_processor.postprocess(image, output_type=output_type)

        policy.set_timesteps([t.item() for t in timesteps])
        stepper = self.make_update(scheduler, timesteps, generator=a["generator"])
        return self.denoise_job(latents=latents, timesteps=timesteps, policy=policy, forward=forward,
                                update=stepper, finish=make_finish(pipe, a, decode, module.LongCatImagePipelineOutput,
                                                                   "images"),
                                step_end=None, prediction_dtype=transformer.dtype)


class LongCatImageEditAdapter(LongCatImageAdapter):
    """LongCatImageEditPipeline: the input image sets a one-megapixel size, its half-size copy is read by the
    prompt encoder, its latents are appended to every forward's sequence; plain CFG (no renormalisation)."""

    pipeline_classes = ("LongCatImageEditPipeline",)

    def size(self, a: dict[str, Any]) -> tuple[int, int]:
        image = a["image"]
        image_size = image[0].size if isinstance(image, list) else image.size
        width, height = self.module.calculate_dimensions(1024 * 1024, image_size[0] * 1.0 / image_size[1])
        return height, width

    def rewrite(self, a: dict[str, Any], prompt, device):
        return prompt

    def prepare_images(self, a: dict[str, Any], height: int, width: int) -> LongCatImages:
        pipe, image, prompt_image = self.pipe, a["image"], None
        if image is not None and not (isinstance(image, torch.Tensor) and image.size(1) == pipe.latent_channels):
            image = pipe.image_processor.resize(image, height, width)
            prompt_image = pipe.image_processor.resize(image, height // 2, width // 2)
            image = pipe.image_processor.preprocess(image, height, width)
        return LongCatImages(image, prompt_image)

    def encode(self, prompt, prompt_embeds, a, images: LongCatImages):
        return self.pipe.encode_prompt(prompt=prompt, image=images.prompt_image, prompt_embeds=prompt_embeds,
                                       num_images_per_prompt=a["num_images_per_prompt"])

    def prepare_latents(self, a, images: LongCatImages, batch: int, height: int, width: int, dtype, device,
                        text_length: int):
        latents, image_latents, ids, image_ids = self.pipe.prepare_latents(
            images.image, batch, 16, height, width, dtype, text_length, device, a["generator"], a["latents"])
        return latents, ids if images.image is None else torch.cat([ids, image_ids], dim=0), image_latents
