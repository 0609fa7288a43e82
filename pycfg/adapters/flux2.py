"""FLUX.2 [klein] (text to image, with optional reference images): two separate forwards per step.

Stock runs true CFG (``u + s (c - u)``, ``cond`` and ``uncond`` under their own cache contexts) when
``guidance_scale > 1`` on the base (non-distilled) checkpoints; the step-distilled ones run ``cond`` alone. The
negative side is the empty prompt unless ``negative_prompt_embeds`` are given. Reference images are encoded to
latents appended to the image sequence (with their own position ids); each prediction is sliced back to the
generated tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..guidance import CFG, GuidancePolicy, NoGuidance
from ..guidance.base import NEGATIVE, PROMPT
from ..runtime.job import Job
from ..steps import StepIndex
from ._common import (
    begin_call,
    branch_forward,
    make_finish,
    make_step_end,
    prompt_batch_size,
    resolve_callback_inputs,
    run_branches,
)
from .base import Adapter, own_tensor


class Flux2KleinAdapter(Adapter):
    """No step graphs: the FLUX.2 transformer is untested under capture here; steps run eagerly."""

    pipeline_classes = ("Flux2KleinPipeline",)

    def complete_args(self, a: dict[str, Any]) -> None:
        resolve_callback_inputs(a)

    def check_inputs(self, a: dict[str, Any]) -> None:
        pipe = self.pipe
        pipe.check_inputs(prompt=a["prompt"], height=a["height"], width=a["width"], prompt_embeds=a["prompt_embeds"],
                          callback_on_step_end_tensor_inputs=a["callback_on_step_end_tensor_inputs"],
                          guidance_scale=a["guidance_scale"])
        images = a["image"] if isinstance(a["image"], list) else [a["image"]] if a["image"] is not None else []
        for image in images:
            pipe.image_processor.check_image_input(image)

    def default_policy(self, a: dict[str, Any]) -> GuidancePolicy:
        if a["guidance_scale"] > 1 and not self.pipe.config.is_distilled:
            return CFG(a["guidance_scale"])
        return NoGuidance()

    def condition_images(self, a: dict[str, Any]):
        """The reference images preprocessed as stock does, and the (height, width) they imply."""
        pipe = self.pipe
        height, width = a["height"], a["width"]
        if a["image"] is None:
            return None, height, width
        processed = []
        for img in a["image"] if isinstance(a["image"], list) else [a["image"]]:
            image_width, image_height = img.size
            if image_width * image_height > 1024 * 1024:
                img = pipe.image_processor._resize_to_target_area(img, 1024 * 1024)
                image_width, image_height = img.size
            multiple_of = pipe.vae_scale_factor * 2
            image_width = (image_width // multiple_of) * multiple_of
            image_height = (image_height // multiple_of) * multiple_of
            processed.append(pipe.image_processor.preprocess(img, height=image_height, width=image_width,
                                                             resize_mode="crop"))
            height = height or image_height
            width = width or image_width
        return processed, height, width

    def prepare(self, a: dict[str, Any], policy: GuidancePolicy | None) -> Job:
        pipe, module = self.pipe, self.module
        policy = self.request_policy(a, policy)
        begin_call(pipe, guidance_scale=a["guidance_scale"], attention_kwargs=a["attention_kwargs"])
        batch_size = prompt_batch_size(a["prompt"], a["prompt_embeds"])
        device = pipe._execution_device
        encode = dict(device=device, num_images_per_prompt=a["num_images_per_prompt"],
                      max_sequence_length=a["max_sequence_length"],
                      text_encoder_out_layers=a["text_encoder_out_layers"])
        text = {PROMPT: list(pipe.encode_prompt(prompt=a["prompt"], prompt_embeds=a["prompt_embeds"], **encode))}
        if self.needs_negative(policy):
            negative = [""] * len(a["prompt"]) if isinstance(a["prompt"], list) else ""
            text[NEGATIVE] = list(pipe.encode_prompt(prompt=negative, prompt_embeds=a["negative_prompt_embeds"],
                                                     **encode))

        images, height, width = self.condition_images(a)
        height = height or pipe.default_sample_size * pipe.vae_scale_factor
        width = width or pipe.default_sample_size * pipe.vae_scale_factor
        n = batch_size * a["num_images_per_prompt"]
        latents, latent_ids = pipe.prepare_latents(
            batch_size=n, num_latents_channels=pipe.transformer.config.in_channels // 4, height=height, width=width,
            dtype=text[PROMPT][0].dtype, device=device, generator=a["generator"], latents=a["latents"])
        latents = own_tensor(latents, a["latents"])
        image_latents = None
        ids = latent_ids
        if images is not None:
            image_latents, image_ids = pipe.prepare_image_latents(images=images, batch_size=n, generator=a["generator"],
                                                                  device=device, dtype=pipe.vae.dtype)
            ids = torch.cat([latent_ids, image_ids], dim=1)

        scheduler = self.private_scheduler()
        n_steps = a["num_inference_steps"]
        sigmas = np.linspace(1.0, 1 / n_steps, n_steps) if a["sigmas"] is None else a["sigmas"]
        if hasattr(scheduler.config, "use_flow_sigmas") and scheduler.config.use_flow_sigmas:
            sigmas = None
        mu = module.compute_empirical_mu(image_seq_len=latents.shape[1], num_steps=n_steps)
        timesteps, _ = module.retrieve_timesteps(scheduler, n_steps, device, sigmas=sigmas, mu=mu)
        pipe._num_timesteps = len(timesteps)
        scheduler.set_begin_index(0)
        transformer = pipe.transformer
        attention_kwargs = a["attention_kwargs"]

        def run(name: str, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            timestep = t.expand(x.shape[0]).to(x.dtype)
            model_input = x.to(transformer.dtype)
            if image_latents is not None:
                model_input = torch.cat([x, image_latents], dim=1).to(transformer.dtype)
            embeds, text_ids = text[policy.branch(name).source]
            with branch_forward(transformer, name, policy.branch(name)) as extra:
                out = transformer(hidden_states=model_input, timestep=timestep / 1000, guidance=None,
                                  encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=ids,
                                  joint_attention_kwargs=attention_kwargs, return_dict=False, **extra)[0]
            return out[:, : x.size(1):]  # the reference images' tokens are sliced off

        def forward(names: tuple[str, ...], x: torch.Tensor, step: StepIndex, batched: bool) -> list[torch.Tensor]:
            return run_branches(pipe, names, x, step.select(timesteps), run)

        def apply(outputs):
            if "prompt_embeds" in outputs:
                text[PROMPT][0] = outputs.pop("prompt_embeds")

        step_end = make_step_end(pipe, a["callback_on_step_end"], a["callback_on_step_end_tensor_inputs"], timesteps,
                                 lambda x: {"latents": x, "prompt_embeds": text[PROMPT][0]}, apply)
        def finish_latents(x: torch.Tensor) -> torch.Tensor:
            # stock unpacks and denormalises before its output-type switch: "latent" returns these
            latent_height = 2 * (int(height) // (pipe.vae_scale_factor * 2))
            latent_width = 2 * (int(width) // (pipe.vae_scale_factor * 2))
            x = pipe._unpack_latents_with_ids(x, latent_ids, latent_height // 2, latent_width // 2)
            bn_mean = pipe.vae.bn.running_mean.view(1, -1, 1, 1).to(x.device, x.dtype)
            bn_std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps).to(
                x.device, x.dtype)
            return pipe._unpatchify_latents(x * bn_std + bn_mean)

        def decode(x: torch.Tensor, output_type: str):
            x = x.to(module.get_module_execution_device(pipe.vae))
            image = pipe.vae.decode(x, return_dict=False)[0]
            return pipe.image_processor.postprocess(image, output_type=output_type)

        finish = make_finish(pipe, a, decode, module.Flux2PipelineOutput, "images")

        policy.set_timesteps([t.item() for t in timesteps])
        stepper = self.make_update(scheduler, timesteps, generator=a["generator"])
        return self.denoise_job(latents=latents, timesteps=timesteps, policy=policy, forward=forward,
                                update=stepper, finish=lambda x: finish(finish_latents(x)), step_end=step_end,
                                prediction_dtype=transformer.dtype)
