"""HunyuanVideoPipeline (text to video): the true-CFG path as two separate forwards.

HunyuanVideo is guidance-distilled: ``guidance_scale`` feeds an embedded guidance tensor to every forward.
Only ``true_cfg_scale > 1`` with a negative prompt adds the ``uncond`` branch (``neg + s * (pos - neg)``, as
stock); embedded-guidance requests run the single ``cond`` branch on every rank.
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
    require_negative,
    resolve_callback_inputs,
    run_branches,
)
from .base import Adapter, own_tensor


class HunyuanVideoAdapter(Adapter):
    pipeline_classes = ("HunyuanVideoPipeline",)

    def complete_args(self, a: dict[str, Any]) -> None:
        resolve_callback_inputs(a)

    def check_inputs(self, a: dict[str, Any]) -> None:
        self.pipe.check_inputs(
            a["prompt"],
            a["prompt_2"],
            a["height"],
            a["width"],
            a["prompt_embeds"],
            a["callback_on_step_end_tensor_inputs"],
            a["prompt_template"],
        )

    @staticmethod
    def _has_negative(a) -> bool:
        return a["negative_prompt"] is not None or (
            a["negative_prompt_embeds"] is not None and a["negative_pooled_prompt_embeds"] is not None
        )

    def default_policy(self, a: dict[str, Any]) -> GuidancePolicy:
        if a["true_cfg_scale"] > 1 and self._has_negative(a):
            return CFG(a["true_cfg_scale"])
        return NoGuidance()

    def prepare(self, a: dict[str, Any], policy: GuidancePolicy | None) -> Job:
        pipe, module = self.pipe, self.module
        policy = self.request_policy(a, policy)
        require_negative(policy, self._has_negative(a),
                         "negative_prompt, or negative_prompt_embeds with negative_pooled_prompt_embeds")
        needs_negative = self.needs_negative(policy)
        begin_call(pipe, guidance_scale=a["guidance_scale"], attention_kwargs=a["attention_kwargs"])
        device = pipe._execution_device
        batch_size = prompt_batch_size(a["prompt"], a["prompt_embeds"])
        transformer = pipe.transformer
        transformer_dtype = transformer.dtype
        encode = dict(prompt_template=a["prompt_template"], num_videos_per_prompt=a["num_videos_per_prompt"],
                      device=device, max_sequence_length=a["max_sequence_length"])

        def encoded(prompt, prompt_2, embeds, pooled, mask):
            embeds, pooled, mask = pipe.encode_prompt(prompt=prompt, prompt_2=prompt_2, prompt_embeds=embeds,
                                                      pooled_prompt_embeds=pooled, prompt_attention_mask=mask,
                                                      **encode)
            return [embeds.to(transformer_dtype), mask.to(transformer_dtype), pooled.to(transformer_dtype)]

        # text inputs by source: every branch reading the prompt sees a callback's prompt_embeds update
        text = {PROMPT: encoded(a["prompt"], a["prompt_2"], a["prompt_embeds"], a["pooled_prompt_embeds"],
                                a["prompt_attention_mask"])}
        if needs_negative:
            text[NEGATIVE] = encoded(a["negative_prompt"], a["negative_prompt_2"], a["negative_prompt_embeds"],
                                     a["negative_pooled_prompt_embeds"], a["negative_prompt_attention_mask"])

        n_steps = a["num_inference_steps"]
        sigmas = a["sigmas"]
        sigmas = np.linspace(1.0, 0.0, n_steps + 1)[:-1] if sigmas is None else sigmas
        scheduler = self.private_scheduler()
        timesteps, n_steps = module.retrieve_timesteps(scheduler, n_steps, device, sigmas=sigmas)

        latents = pipe.prepare_latents(
            batch_size * a["num_videos_per_prompt"], transformer.config.in_channels, a["height"], a["width"],
            a["num_frames"], torch.float32, device, a["generator"], a["latents"],
        )
        latents = own_tensor(latents, a["latents"])
        guidance = torch.tensor([a["guidance_scale"]] * latents.shape[0], dtype=transformer_dtype,
                                device=device) * 1000.0
        scheduler.set_begin_index(0)
        pipe._num_timesteps = len(timesteps)
        attention_kwargs = a["attention_kwargs"]

        def run(name: str, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            spec = policy.branch(name)
            embeds, mask, pooled = text[spec.source]
            with branch_forward(transformer, name, spec) as extra:
                return transformer(
                    hidden_states=x.to(transformer_dtype),
                    timestep=t.expand(x.shape[0]).to(x.dtype),
                    encoder_hidden_states=embeds,
                    encoder_attention_mask=mask,
                    pooled_projections=pooled,
                    guidance=guidance,
                    attention_kwargs=attention_kwargs,
                    return_dict=False,
                    **extra,
                )[0]

        def forward(names: tuple[str, ...], x: torch.Tensor, step: StepIndex, batched: bool) -> list[torch.Tensor]:
            return run_branches(pipe, names, x, step.select(timesteps), run)

        def apply(outputs):
            if "prompt_embeds" in outputs:
                text[PROMPT][0] = outputs.pop("prompt_embeds")

        step_end = make_step_end(pipe, a["callback_on_step_end"], a["callback_on_step_end_tensor_inputs"], timesteps,
                                 lambda x: {"latents": x, "prompt_embeds": text[PROMPT][0]}, apply)

        def decode(x: torch.Tensor, output_type: str):
            x = x.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor
            video = pipe.vae.decode(x, return_dict=False)[0]
            return pipe.video_processor.postprocess_video(video, output_type=output_type)

        policy.set_timesteps([t.item() for t in timesteps])
        stepper = self.make_update(scheduler, timesteps, generator=a["generator"])
        return self.denoise_job(
            latents=latents, timesteps=timesteps, policy=policy, forward=forward, update=stepper,
            finish=make_finish(pipe, a, decode, module.HunyuanVideoPipelineOutput, "frames"),
            step_end=step_end,
            prediction_dtype=transformer_dtype,
        )
