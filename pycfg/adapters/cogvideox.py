"""CogVideoXPipeline (text to video): batched CFG split into branches, dynamic CFG, its own schedulers.

Stock runs ``cat([neg, pos])`` as one batch; pycfg runs the branches separately, so it matches stock within fp32
rounding while staying bit-identical across cfg_parallel_size. ``use_dynamic_cfg`` recomputes the scale every
step from the timestep; pycfg computes the same per-step scales on the host, with the same float arithmetic.

CogVideoX's schedulers are stepped through their own ``step()`` on every rank: ``CogVideoXDDIMScheduler`` as
usual, ``CogVideoXDPMScheduler`` with its extra arguments (the previous step's ``old_pred_original_sample`` and
the previous timestep), which :class:`CogVideoXUpdate` carries between steps. Its noise comes from the call's
generator, which every rank holds in the same state (the ranks' arguments are checked to match).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..guidance import CFG, DynamicCFG, GuidancePolicy, NoGuidance
from ..guidance.base import NEGATIVE, PROMPT
from ..runtime.job import Job
from ..schedulers import tensors_in
from ..steps import StepIndex
from ._common import (
    batched_text_callbacks,
    begin_call,
    branch_forward,
    make_finish,
    make_step_end,
    prompt_batch_size,
    resolve_callback_inputs,
    run_branches,
)
from .base import Adapter, own_tensor


class CogVideoXUpdate:
    """The stock loop's scheduler call, including the DPM scheduler's two-value return and extra arguments."""

    fused = False

    def __init__(self, scheduler, timesteps, extra_step_kwargs: dict, dpm: bool, dtype: torch.dtype,
                 on_step=None) -> None:
        self.scheduler = scheduler
        self.timesteps = timesteps
        self.extra = extra_step_kwargs
        self.dpm = dpm
        self.dtype = dtype
        self.on_step = on_step
        self.old_pred_original_sample: torch.Tensor | None = None

    def __call__(self, guided: torch.Tensor, step: StepIndex, latents: torch.Tensor) -> torch.Tensor:
        i = step.i
        if self.on_step is not None:
            self.on_step(i)
        t = self.timesteps[i]
        if not self.dpm:
            latents = self.scheduler.step(guided, t, latents, **self.extra, return_dict=False)[0]
        else:
            latents, self.old_pred_original_sample = self.scheduler.step(
                guided,
                self.old_pred_original_sample,
                t,
                self.timesteps[i - 1] if i > 0 else None,
                latents,
                **self.extra,
                return_dict=False,
            )
        return latents.to(self.dtype)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        state = tensors_in(self.scheduler, "scheduler.")
        if self.old_pred_original_sample is not None:
            state["old_pred_original_sample"] = self.old_pred_original_sample
        return state

    def describe(self) -> str:
        return f"{type(self.scheduler).__name__}.step() (reference)"


class CogVideoXAdapter(Adapter):
    pipeline_classes = ("CogVideoXPipeline",)

    def complete_args(self, a: dict[str, Any]) -> None:
        pipe = self.pipe
        resolve_callback_inputs(a)
        config = pipe.transformer.config
        a["height"] = a["height"] or config.sample_height * pipe.vae_scale_factor_spatial
        a["width"] = a["width"] or config.sample_width * pipe.vae_scale_factor_spatial
        a["num_frames"] = a["num_frames"] or config.sample_frames
        # stock ignores the argument: one video per prompt
        a["num_videos_per_prompt"] = 1

    def check_inputs(self, a: dict[str, Any]) -> None:
        self.pipe.check_inputs(
            a["prompt"],
            a["height"],
            a["width"],
            a["negative_prompt"],
            a["callback_on_step_end_tensor_inputs"],
            a["prompt_embeds"],
            a["negative_prompt_embeds"],
        )

    def default_policy(self, a: dict[str, Any]) -> GuidancePolicy:
        if a["guidance_scale"] <= 1.0:
            return NoGuidance()
        if a["use_dynamic_cfg"]:
            # DynamicCFG's schedule is the pipeline's expression: 1 + w (1 - cos(pi ((N - t) / N) ** 5)) / 2
            return DynamicCFG(a["guidance_scale"])
        return CFG(a["guidance_scale"])

    def prepare(self, a: dict[str, Any], policy: GuidancePolicy | None) -> Job:
        pipe, module = self.pipe, self.module
        guidance_scale = a["guidance_scale"]
        policy = self.request_policy(a, policy)
        needs_negative = self.needs_negative(policy)
        begin_call(pipe, guidance_scale=guidance_scale, attention_kwargs=a["attention_kwargs"])
        batch_size = prompt_batch_size(a["prompt"], a["prompt_embeds"])
        device = pipe._execution_device

        embeds, neg_embeds = pipe.encode_prompt(
            a["prompt"],
            a["negative_prompt"],
            needs_negative,
            num_videos_per_prompt=1,
            prompt_embeds=a["prompt_embeds"],
            negative_prompt_embeds=a["negative_prompt_embeds"],
            max_sequence_length=a["max_sequence_length"],
            device=device,
        )
        # text inputs by source: every branch reading the prompt sees a callback's prompt_embeds update
        text = {PROMPT: [embeds]}
        if needs_negative:
            text[NEGATIVE] = [neg_embeds]
        embeds_dtype = embeds.dtype

        scheduler = self.private_scheduler()
        timesteps, n_steps = module.retrieve_timesteps(scheduler, a["num_inference_steps"], device, a["timesteps"])
        pipe._num_timesteps = len(timesteps)

        num_frames, height, width = a["num_frames"], a["height"], a["width"]
        latent_frames = (num_frames - 1) // pipe.vae_scale_factor_temporal + 1
        patch_size_t = pipe.transformer.config.patch_size_t
        additional_frames = 0
        if patch_size_t is not None and latent_frames % patch_size_t != 0:
            additional_frames = patch_size_t - latent_frames % patch_size_t
            num_frames += additional_frames * pipe.vae_scale_factor_temporal
        transformer = pipe.transformer
        latents = pipe.prepare_latents(
            batch_size, transformer.config.in_channels, num_frames, height, width, embeds_dtype, device,
            a["generator"], a["latents"],
        )
        latents = own_tensor(latents, a["latents"])
        extra_step_kwargs = pipe.prepare_extra_step_kwargs(a["generator"], a["eta"])
        image_rotary_emb = (
            pipe._prepare_rotary_positional_embeddings(height, width, latents.size(1), device)
            if transformer.config.use_rotary_positional_embeddings
            else None
        )

        policy.set_timesteps([t.item() for t in timesteps])
        # what stock stores on the pipeline as the step's scale (callbacks read it)
        scales = [
            1 + guidance_scale * ((1 - math.cos(math.pi * ((n_steps - t.item()) / n_steps) ** 5.0)) / 2)
            for t in timesteps
        ] if a["use_dynamic_cfg"] else None

        attention_kwargs = a["attention_kwargs"]

        def run(name: str, model_input: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            spec = policy.branch(name)
            with branch_forward(transformer, name, spec) as extra:
                pred = transformer(
                    hidden_states=model_input,
                    encoder_hidden_states=text[spec.source][0],
                    timestep=t.expand(model_input.shape[0]),
                    image_rotary_emb=image_rotary_emb,
                    attention_kwargs=attention_kwargs,
                    return_dict=False,
                    **extra,
                )[0]
            return pred.float()

        def forward(names: tuple[str, ...], x: torch.Tensor, step: StepIndex, batched: bool) -> list[torch.Tensor]:
            t = step.select(timesteps)
            return run_branches(pipe, names, scheduler.scale_model_input(x, t), t, run)

        def on_step(i: int) -> None:
            # stock keeps the dynamic scale on the pipeline, where callbacks read it
            if scales is not None:
                pipe._guidance_scale = scales[i]

        dpm = isinstance(scheduler, module.CogVideoXDPMScheduler)
        update = CogVideoXUpdate(scheduler, timesteps, extra_step_kwargs, dpm, embeds_dtype, on_step)
        batched_values, apply = batched_text_callbacks(text, {"prompt_embeds": 0}, cfg=NEGATIVE in text)

        def offered(x):
            return {**batched_values(x), "negative_prompt_embeds": text[NEGATIVE][0] if NEGATIVE in text else None}

        def decode(x: torch.Tensor, output_type: str):
            video = pipe.decode_latents(x[:, additional_frames:])
            return pipe.video_processor.postprocess_video(video=video, output_type=output_type)

        return self.denoise_job(
            latents=latents, timesteps=timesteps, policy=policy, forward=forward, update=update,
            finish=make_finish(pipe, a, decode, module.CogVideoXPipelineOutput, "frames"),
            step_end=make_step_end(pipe, a["callback_on_step_end"], a["callback_on_step_end_tensor_inputs"],
                                   timesteps, offered, apply),
            prediction_dtype=torch.float32,
        )
