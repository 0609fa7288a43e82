"""The Wan family (Wan 2.1 / 2.2): two separate forwards per step, one or two experts.

:class:`WanAdapter` serves ``WanPipeline`` (text to video) and is the base of the Wan variants
(:mod:`pycfg.adapters.wan_variants`: image to video, VACE). Wan 2.2 hands the denoising from ``transformer`` to
``transformer_2`` once the timestep drops below ``boundary_ratio * num_train_timesteps``, and its guidance scale
from ``guidance_scale`` to ``guidance_scale_2`` with it. The expert follows the step inside ``forward``; the scale
follows it in :class:`StepScaledCFG`, whose per-step scales are decided on the host from the same timesteps and
the same comparison as stock.

A request runs these hooks, each filling fields of one :class:`WanRequest`: :meth:`~WanAdapter.check_inputs`
(from the contract's ``check``), :meth:`~WanAdapter.fit_size`, the texts, the schedule,
:meth:`~WanAdapter.prepare_latents` (variants: the conditioning too), then per step
:meth:`~WanAdapter.model_input` and the branch forwards with ``req.forward_kwargs``, and at the end
:meth:`~WanAdapter.final_latents` and :meth:`~WanAdapter.decode`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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

WAN_VALUE_ARGS = ("prompt", "negative_prompt", "prompt_embeds", "negative_prompt_embeds", "latents", "generator",
                  "guidance_scale", "guidance_scale_2", "output_type", "return_dict")


@dataclass
class WanRequest:
    """One request's state, filled in by the family's hooks in order (see the module docstring)."""

    args: dict[str, Any]
    device: torch.device
    batch_size: int
    height: int
    width: int
    num_frames: int
    transformer_dtype: torch.dtype
    scheduler: Any = None
    timesteps: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    #: conditioning latents: concatenated to the latents on channels (I2V), or blended into the first frame
    #: (``expand_timesteps``)
    condition: torch.Tensor | None = None
    #: 0 on the frames the condition replaces, 1 elsewhere (``expand_timesteps``; all ones for text to video)
    frame_mask: torch.Tensor | None = None
    #: extra transformer arguments whose tensors are batch-first (repeated when branches share a forward)
    forward_kwargs: dict[str, Any] = field(default_factory=dict)
    #: extra transformer arguments shared as they are by every forward (VACE's per-layer scales)
    shared_kwargs: dict[str, Any] = field(default_factory=dict)
    #: leading latent frames that hold reference images, cut off before decoding (VACE)
    reference_frames: int = 0


class WanAdapter(Adapter):
    pipeline_classes = ("WanPipeline",)
    #: a run whose expert changes mid-way is never captured (its job says why): a captured step would replay one
    #: expert at every step
    capabilities = AdapterCapabilities(
        batchable=True,
        graph_steps=True,
        transformer_modules=("transformer", "transformer_2"),
        # context parallel: video tokens are split; text is not (Wan's plan keeps cross-attention keys whole)
        context_parallel=True,
        graph_value_args=WAN_VALUE_ARGS,
    )

    def context_parallel_lengths(self, a: dict[str, Any]) -> dict[str, tuple[int, str]]:
        # prepare()'s rounding of num_frames, height and width, then the patch grid
        pipe = self.pipe
        transformer = pipe.transformer if pipe.transformer is not None else pipe.transformer_2
        p_t, p_h, p_w = transformer.config.patch_size
        vae_t, vae_s = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
        frames = max(a["num_frames"] // vae_t * vae_t + 1 if a["num_frames"] % vae_t != 1 else a["num_frames"], 1)
        latent_frames = (frames - 1) // vae_t + 1
        grid_h = a["height"] // (vae_s * p_h) * (vae_s * p_h) // vae_s // p_h
        grid_w = a["width"] // (vae_s * p_w) * (vae_s * p_w) // vae_s // p_w
        return {"video tokens": (latent_frames // p_t * grid_h * grid_w, "num_frames, height and width")}

    # -- check ----------------------------------------------------------------------------------------------------

    def complete_args(self, a: dict[str, Any]) -> None:
        resolve_callback_inputs(a)

    def check_inputs(self, a: dict[str, Any]) -> None:
        """The pipeline's own ``check_inputs`` with this pipeline's arguments."""
        self.pipe.check_inputs(a["prompt"], a["negative_prompt"], a["height"], a["width"], a["prompt_embeds"],
                               a["negative_prompt_embeds"], a["callback_on_step_end_tensor_inputs"],
                               a["guidance_scale_2"])

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

    def _experts(self):
        pipe = self.pipe
        return pipe.transformer, pipe.transformer_2

    def _expert_config(self):
        transformer, transformer_2 = self._experts()
        return (transformer if transformer is not None else transformer_2).config

    # -- prepare: the hooks ---------------------------------------------------------------------------------------

    def fit_size(self, a: dict[str, Any]) -> tuple[int, int, int]:
        """(num_frames, height, width) rounded as stock rounds them, with its warnings."""
        pipe, module = self.pipe, self.module
        vae_t = pipe.vae_scale_factor_temporal
        num_frames = a["num_frames"]
        if num_frames % vae_t != 1:
            module.logger.warning(f"`num_frames - 1` has to be divisible by {vae_t}. Rounding to the nearest number.")
            num_frames = num_frames // vae_t * vae_t + 1
        num_frames = max(num_frames, 1)
        patch_size = self._expert_config().patch_size
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
        return num_frames, height, width

    def prepare_latents(self, req: WanRequest) -> None:
        """``req.latents`` (and, in variants, the conditioning), with the pipeline's own helpers."""
        a = req.args
        latents = self.pipe.prepare_latents(
            req.batch_size * a["num_videos_per_prompt"], self._expert_config().in_channels, req.height, req.width,
            req.num_frames, torch.float32, req.device, a["generator"], a["latents"],
        )
        req.latents = own_tensor(latents, a["latents"])
        req.frame_mask = torch.ones(latents.shape, dtype=torch.float32, device=req.device)

    def model_input(self, req: WanRequest, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states, timestep) of one forward of batch ``x.shape[0]`` at timestep ``t``."""
        if self.pipe.config.expand_timesteps:
            temp_ts = (req.frame_mask[0][0][:, ::2, ::2] * t).flatten()
            return x.to(req.transformer_dtype), temp_ts.unsqueeze(0).expand(x.shape[0], -1)
        return x.to(req.transformer_dtype), t.expand(x.shape[0])

    def final_latents(self, req: WanRequest, x: torch.Tensor) -> torch.Tensor:
        """The latents the pipeline returns or decodes, from the last step's."""
        return x

    def decode(self, req: WanRequest, x: torch.Tensor, output_type: str):
        pipe = self.pipe
        vae = pipe.vae
        x = x.to(self.module.get_module_execution_device(vae), dtype=vae.dtype)
        z_dim = vae.config.z_dim
        latents_mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(x.device, x.dtype)
        latents_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(x.device, x.dtype)
        x = x / latents_std + latents_mean
        video = vae.decode(x, return_dict=False)[0]
        return pipe.video_processor.postprocess_video(video, output_type=output_type)

    # -- the job --------------------------------------------------------------------------------------------------

    def prepare(self, a: dict[str, Any], policy: GuidancePolicy | None) -> Job:
        pipe = self.pipe
        transformer, transformer_2 = self._experts()
        num_frames, height, width = self.fit_size(a)

        guidance_scale, guidance_scale_2 = a["guidance_scale"], a["guidance_scale_2"]
        if pipe.config.boundary_ratio is not None and guidance_scale_2 is None:
            guidance_scale_2 = guidance_scale
        begin_call(pipe, guidance_scale=guidance_scale, guidance_scale_2=guidance_scale_2,
                   attention_kwargs=a["attention_kwargs"])
        device = pipe._execution_device

        needs_negative = self.needs_negative(policy) if policy is not None else guidance_scale > 1.0
        policy = self.request_policy(a, policy)
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
        dtype = transformer.dtype if transformer is not None else transformer_2.dtype
        req = WanRequest(args=a, device=device, batch_size=prompt_batch_size(a["prompt"], a["prompt_embeds"]),
                         height=height, width=width, num_frames=num_frames, transformer_dtype=dtype)
        # text inputs by source: every branch reading the prompt sees a callback's prompt_embeds update
        # a captured step's text buffers are written by later requests: never the caller's tensors
        text = {PROMPT: own_tensor(prompt_embeds.to(dtype), a)}
        if negative_prompt_embeds is not None:
            text[NEGATIVE] = own_tensor(negative_prompt_embeds.to(dtype), a)
        require_negative(policy, NEGATIVE in text)

        scheduler = req.scheduler = self.private_scheduler()
        scheduler.set_timesteps(a["num_inference_steps"], device=device)
        timesteps = req.timesteps = scheduler.timesteps
        self.prepare_latents(req)
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
            cache_kwargs = {"step_index": step.i, "sigma": sigmas[step.i], "num_inference_steps": len(timesteps)}
            preds: dict[str, torch.Tensor] = {}
            for group in batch_groups(names, batched, batch_key):
                n, spec = len(group), policy.branch(group[0])
                hidden, timestep = self.model_input(req, x if n == 1 else torch.cat([x] * n), t)
                embeds = text[spec.source] if n == 1 else torch.cat([text[policy.branch(m).source] for m in group])
                per_sample = {k: v if n == 1 or v is None else torch.cat([v] * n)
                              for k, v in req.forward_kwargs.items()}
                with branch_forward(model, "+".join(group), spec, **cache_kwargs) as extra:
                    out = model(
                        hidden_states=hidden,
                        timestep=timestep,
                        encoder_hidden_states=embeds,
                        attention_kwargs=attention_kwargs,
                        return_dict=False,
                        **per_sample,
                        **req.shared_kwargs,
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

        step_end = make_step_end(
            pipe, a["callback_on_step_end"], a["callback_on_step_end_tensor_inputs"], timesteps,
            lambda x: {"latents": x, "prompt_embeds": text[PROMPT], "negative_prompt_embeds": text.get(NEGATIVE)},
            apply,
        )

        finish = make_finish(pipe, a, lambda x, output_type: self.decode(req, x, output_type),
                             self.module.WanPipelineOutput, "frames")

        def graph_inputs() -> dict[str, torch.Tensor]:
            conditioning = {k: v for k, v in {**req.forward_kwargs, **req.shared_kwargs}.items()
                            if isinstance(v, torch.Tensor)}
            if req.condition is not None:
                conditioning["condition"] = req.condition
            return {"timesteps": timesteps, **{f"{k}_embeds": v for k, v in text.items()}, **conditioning}

        policy.set_timesteps([t.item() for t in timesteps])
        stepper = self.make_update(scheduler, timesteps, generator=a["generator"])
        model = transformer if transformer is not None else transformer_2
        return self.denoise_job(
            latents=req.latents, timesteps=timesteps, policy=policy, forward=forward, update=stepper,
            finish=lambda x: finish(self.final_latents(req, x)),
            step_end=step_end,
            prediction_dtype=model.dtype,
            not_graphable=None if len(set(first_expert)) <= 1 else
            "the two experts switch mid-run: one captured step would replay one expert at every step",
            # with two experts, which one a step runs is baked into its capture: graphs serve one request only
            graph_inputs=graph_inputs if boundary_timestep is None else None,
        )
