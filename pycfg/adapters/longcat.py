"""LongCat-Image (text to image): two separate forwards per step, then LongCat's clamped renormalisation.

Stock runs ``cond`` and ``uncond`` under their own cache contexts, combines ``u + s (c - u)`` and, with
``enable_cfg_renorm`` (the default), scales each token of the result by ``||c|| / (||p|| + 1e-8)`` clamped to
``[cfg_renorm_min, 1]``. That renormalisation is LongCat's own (Qwen-Image's has no clamp and no epsilon), so it
stays in the family as :class:`LongCatCFG`; with it off, stock's guidance is plain :class:`~pycfg.guidance.CFG`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..guidance import CFG, GuidancePolicy, NoGuidance
from ..guidance.base import NEGATIVE, PROMPT, KernelGuidance, Prediction
from ..runtime.job import Job
from ..steps import StepIndex
from ._common import begin_call, branch_forward, default_size, make_finish, prompt_batch_size, run_branches
from .base import Adapter, check_output_type, own_tensor


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


class LongCatImageAdapter(Adapter):
    """No step graphs: LongCat's transformer is untested under capture here; steps run eagerly."""

    pipeline_classes = ("LongCatImagePipeline",)

    def check(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        pipe = self.pipe
        a = self.bind(kwargs)
        default_size(pipe, a)
        pipe.check_inputs(a["prompt"], a["height"], a["width"], negative_prompt=a["negative_prompt"],
                          prompt_embeds=a["prompt_embeds"], negative_prompt_embeds=a["negative_prompt_embeds"])
        check_output_type(a["output_type"])
        return a

    def default_policy(self, a: dict[str, Any]) -> GuidancePolicy:
        if not a["guidance_scale"] > 1:
            return NoGuidance()
        if a["enable_cfg_renorm"]:
            return LongCatCFG(a["guidance_scale"], a["cfg_renorm_min"])
        return CFG(a["guidance_scale"])

    def encode(self, prompt, prompt_embeds, a, device):
        """(embeds, text ids) of one side, with the pipeline's own ``encode_prompt``."""
        return self.pipe.encode_prompt(prompt=prompt, prompt_embeds=prompt_embeds,
                                       num_images_per_prompt=a["num_images_per_prompt"])

    def prepare(self, a: dict[str, Any], policy: GuidancePolicy | None) -> Job:
        pipe, module = self.pipe, self.module
        policy = self.request_policy(a, policy)
        begin_call(pipe, guidance_scale=a["guidance_scale"], joint_attention_kwargs=a["joint_attention_kwargs"])
        batch_size = prompt_batch_size(a["prompt"], a["prompt_embeds"])
        device = pipe._execution_device

        prompt = a["prompt"]
        if a["enable_prompt_rewrite"]:
            prompt = pipe.rewire_prompt(prompt, device)
        text = {PROMPT: list(self.encode(prompt, a["prompt_embeds"], a, device))}
        if self.needs_negative(policy):
            negative = "" if a["negative_prompt"] is None else a["negative_prompt"]
            text[NEGATIVE] = list(self.encode(negative, a["negative_prompt_embeds"], a, device))

        height, width = a["height"], a["width"]
        latents, image_ids = pipe.prepare_latents(batch_size * a["num_images_per_prompt"], 16, height, width,
                                                  text[PROMPT][0].dtype, device, a["generator"], a["latents"])
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
            timestep = t.expand(x.shape[0]).to(x.dtype)
            with branch_forward(transformer, name, policy.branch(name)) as extra:
                return transformer(hidden_states=x, timestep=timestep / 1000, guidance=None,
                                   encoder_hidden_states=embeds, txt_ids=ids, img_ids=image_ids, return_dict=False,
                                   **extra)[0]

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
