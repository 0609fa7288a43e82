"""WanPipeline (text to video), Wan 2.1 and 2.2: two separate forwards per step, one or two experts.

Wan 2.2 hands the denoising from ``transformer`` to ``transformer_2`` once the timestep drops below
``boundary_ratio * num_train_timesteps``, and its guidance scale from ``guidance_scale`` to ``guidance_scale_2``
with it. The expert follows the step inside ``forward``; the scale follows it in :class:`StepScaledCFG`, whose
per-step scales are decided on the host from the same timesteps and the same comparison as stock.
"""

from __future__ import annotations

from typing import Any

import torch

from ..guidance import CFG, GuidancePolicy, NoGuidance
from ..guidance.base import NEGATIVE, PROMPT
from ..runtime.job import Job
from ..steps import StepIndex
from ._common import (
    StepScaledCFG,
    batch_groups,
    begin_call,
    branch_forward,
    make_finish,
    make_step_end,
    prompt_batch_size,
    require_negative,
    resolve_callback_inputs,
)
from .base import Adapter, AdapterCapabilities, own_tensor


class WanAdapter(Adapter):
    pipeline_classes = ("WanPipeline",)
    #: a run whose expert changes mid-way is never captured (its job says why): a captured step would replay one
    #: expert at every step
    capabilities = AdapterCapabilities(
        batchable=True,
        graph_steps=True,
        transformer_modules=("transformer", "transformer_2"),
        graph_value_args=("prompt", "negative_prompt", "prompt_embeds", "negative_prompt_embeds", "latents",
                          "generator", "guidance_scale", "guidance_scale_2", "output_type", "return_dict"),
    )

    def complete_args(self, a: dict[str, Any]) -> None:
        resolve_callback_inputs(a)

    def check_inputs(self, a: dict[str, Any]) -> None:
        self.pipe.check_inputs(
            a["prompt"],
            a["negative_prompt"],
            a["height"],
            a["width"],
            a["prompt_embeds"],
            a["negative_prompt_embeds"],
            a["callback_on_step_end_tensor_inputs"],
            a["guidance_scale_2"],
        )

    def boundary_timestep(self) -> float | None:
        """Wan 2.2: the timestep below which ``transformer_2`` denoises; None for one expert."""
        ratio = self.pipe.config.boundary_ratio
        return None if ratio is None else ratio * self.pipe.scheduler.config.num_train_timesteps

    def default_policy(self, a: dict[str, Any]) -> GuidancePolicy:
        # the stock loop: CFG iff guidance_scale > 1 (the property), whatever guidance_scale_2 is
        if a["guidance_scale"] <= 1.0:
            return NoGuidance()
        if self.boundary_timestep() is None:
            # one expert, one scale: stock's combine is plain CFG's, which the fused kernel and step graphs take
            return CFG(a["guidance_scale"])
        # the scale follows the expert, step by step, as stock decides it
        scale, scale_2 = a["guidance_scale"], a["guidance_scale_2"]
        scale_2 = scale if scale_2 is None else scale_2
        return StepScaledCFG([scale if first else scale_2 for first in self.first_expert(a["num_inference_steps"])])

    def first_expert(self, num_inference_steps: int, device=None) -> list[bool]:
        """Per step, whether ``transformer`` (not ``transformer_2``) denoises it: stock's comparison of the
        scheduler's timesteps with the boundary."""
        scheduler = self.private_scheduler()
        scheduler.set_timesteps(num_inference_steps, device=device)
        boundary = self.boundary_timestep()
        return [bool(boundary is None or t >= boundary) for t in scheduler.timesteps]

    def prepare(self, a: dict[str, Any], policy: GuidancePolicy | None) -> Job:
        pipe, module = self.pipe, self.module
        transformer, transformer_2 = pipe.transformer, pipe.transformer_2
        model0 = transformer if transformer is not None else transformer_2
        vae_t = pipe.vae_scale_factor_temporal

        num_frames = a["num_frames"]
        if num_frames % vae_t != 1:
            module.logger.warning(
                f"`num_frames - 1` has to be divisible by {vae_t}. Rounding to the nearest number."
            )
            num_frames = num_frames // vae_t * vae_t + 1
        num_frames = max(num_frames, 1)
        patch_size = model0.config.patch_size
        h_multiple_of = pipe.vae_scale_factor_spatial * patch_size[1]
        w_multiple_of = pipe.vae_scale_factor_spatial * patch_size[2]
        height, width = a["height"], a["width"]
        calc_height = height // h_multiple_of * h_multiple_of
        calc_width = width // w_multiple_of * w_multiple_of
        if height != calc_height or width != calc_width:
            module.logger.warning(
                f"`height` and `width` must be multiples of ({h_multiple_of}, {w_multiple_of}) for proper "
                f"patchification. Adjusting ({height}, {width}) -> ({calc_height}, {calc_width})."
            )
            height, width = calc_height, calc_width

        guidance_scale, guidance_scale_2 = a["guidance_scale"], a["guidance_scale_2"]
        if pipe.config.boundary_ratio is not None and guidance_scale_2 is None:
            guidance_scale_2 = guidance_scale
        begin_call(pipe, guidance_scale=guidance_scale, guidance_scale_2=guidance_scale_2,
                   attention_kwargs=a["attention_kwargs"])
        device = pipe._execution_device

        needs_negative = self.needs_negative(policy) if policy is not None else guidance_scale > 1.0
        policy = self.request_policy(a, policy)
        batch_size = prompt_batch_size(a["prompt"], a["prompt_embeds"])
        prompt_embeds, negative_prompt_embeds = pipe.encode_prompt(
            prompt=a["prompt"],
            negative_prompt=a["negative_prompt"],
            do_classifier_free_guidance=needs_negative,
            num_videos_per_prompt=a["num_videos_per_prompt"],
            prompt_embeds=a["prompt_embeds"],
            negative_prompt_embeds=a["negative_prompt_embeds"],
            max_sequence_length=a["max_sequence_length"],
            device=device,
        )
        transformer_dtype = model0.dtype
        # text inputs by source: every branch reading the prompt sees a callback's prompt_embeds update
        # a captured step's text buffers are written by later requests: never the caller's tensors
        text = {PROMPT: own_tensor(prompt_embeds.to(transformer_dtype), a)}
        if negative_prompt_embeds is not None:
            text[NEGATIVE] = own_tensor(negative_prompt_embeds.to(transformer_dtype), a)
        require_negative(policy, NEGATIVE in text)

        scheduler = self.private_scheduler()
        scheduler.set_timesteps(a["num_inference_steps"], device=device)
        timesteps = scheduler.timesteps

        latents = pipe.prepare_latents(
            batch_size * a["num_videos_per_prompt"], model0.config.in_channels, height, width, num_frames,
            torch.float32, device, a["generator"], a["latents"],
        )
        latents = own_tensor(latents, a["latents"])
        mask = torch.ones(latents.shape, dtype=torch.float32, device=device)
        pipe._num_timesteps = len(timesteps)
        scheduler.set_begin_index(0)

        boundary_timestep = self.boundary_timestep()
        first_expert = [bool(boundary_timestep is None or t >= boundary_timestep) for t in timesteps]
        attention_kwargs = a["attention_kwargs"]
        # the cache context's per-step values, read on the host once (never a device read inside a step)
        sigmas = [float(sigma) for sigma in scheduler.sigmas[: len(timesteps)]]

        def forward(names: tuple[str, ...], x: torch.Tensor, step: StepIndex, batched: bool) -> list[torch.Tensor]:
            # the expert is a host choice: runs that switch experts are never captured (not_graphable below)
            t = step.select(timesteps)
            model = transformer if first_expert[step.i] else transformer_2
            pipe._current_timestep = t
            model_input = x.to(transformer_dtype)
            cache_kwargs = {"step_index": step.i, "sigma": sigmas[step.i], "num_inference_steps": len(timesteps)}
            preds: dict[str, torch.Tensor] = {}
            for group in batch_groups(names, batched, batch_key):
                n, spec = len(group), policy.branch(group[0])
                hidden = model_input if n == 1 else torch.cat([model_input] * n)
                embeds = text[spec.source] if n == 1 else torch.cat([text[policy.branch(m).source] for m in group])
                if pipe.config.expand_timesteps:
                    temp_ts = (mask[0][0][:, ::2, ::2] * t).flatten()
                    timestep = temp_ts.unsqueeze(0).expand(hidden.shape[0], -1)
                else:
                    timestep = t.expand(hidden.shape[0])
                with branch_forward(model, "+".join(group), spec, **cache_kwargs) as extra:
                    out = model(
                        hidden_states=hidden,
                        timestep=timestep,
                        encoder_hidden_states=embeds,
                        attention_kwargs=attention_kwargs,
                        return_dict=False,
                        **extra,
                    )[0]
                preds.update(zip(group, out.chunk(n)))
            return [preds[name] for name in names]

        def batch_key(name: str):
            # branches batch together when their forwards differ only in same-shape text inputs
            spec = policy.branch(name)
            return (spec.perturbation, tuple(text[spec.source].shape))

        def apply(outputs):
            if "prompt_embeds" in outputs:
                text[PROMPT] = outputs.pop("prompt_embeds")
            if "negative_prompt_embeds" in outputs:
                text[NEGATIVE] = outputs.pop("negative_prompt_embeds")

        def decode(x: torch.Tensor, output_type: str):
            vae = pipe.vae
            x = x.to(module.get_module_execution_device(vae), dtype=vae.dtype)
            z_dim = vae.config.z_dim
            latents_mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(x.device, x.dtype)
            latents_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(x.device, x.dtype)
            x = x / latents_std + latents_mean
            video = vae.decode(x, return_dict=False)[0]
            return pipe.video_processor.postprocess_video(video, output_type=output_type)

        policy.set_timesteps([t.item() for t in timesteps])
        return self.denoise_job(
            latents=latents, timesteps=timesteps, policy=policy, forward=forward,
            update=self.make_update(scheduler, timesteps, generator=a["generator"]),
            finish=make_finish(pipe, a, decode, module.WanPipelineOutput, "frames"),
            step_end=make_step_end(
                pipe, a["callback_on_step_end"], a["callback_on_step_end_tensor_inputs"], timesteps,
                lambda x: {"latents": x, "prompt_embeds": text[PROMPT], "negative_prompt_embeds": text.get(NEGATIVE)},
                apply,
            ),
            prediction_dtype=model0.dtype,
            not_graphable=None if len(set(first_expert)) <= 1 else
            "the two experts switch mid-run: one captured step would replay one expert at every step",
            # with two experts, which one a step runs is baked into its capture: graphs serve one request only
            graph_inputs=(lambda: {"timesteps": timesteps, **{f"{k}_embeds": v for k, v in text.items()}})
            if boundary_timestep is None else None,
        )
