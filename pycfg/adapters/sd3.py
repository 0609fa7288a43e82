"""StableDiffusion3Pipeline (text to image): its batched CFG split into branches, skip-layer guidance as a third.

Stock runs ``cat([neg, pos])`` as one batch; pycfg runs ``cond`` and ``uncond`` as separate forwards, so it
matches stock within fp32 rounding (a batch-2 matmul is not bit-identical to two batch-1 ones) while staying
bit-identical across cfg_parallel_size. With ``batch_branches=True`` at cfg_parallel_size 1 they run as stock's
own ``cat([neg, pos])`` batch instead, giving stock's bits. Skip-layer guidance (``skip_guidance_layers``) adds
the ``skip`` branch: the cond inputs with ``skip_layers=`` passed to the transformer, inside the stock
pipeline's own step window.
"""

from __future__ import annotations

from typing import Any

import torch

from ..guidance import CFG, GuidancePolicy, NoGuidance
from ..guidance.base import COND, NEGATIVE, PROMPT, UNCOND, Branch, Prediction, weighted_sum_fp32
from ..guidance.perturb import ForwardKwargs
from ..runtime.job import Job
from ..steps import StepIndex
from ._common import (
    batch_groups,
    batched_text_callbacks,
    begin_call,
    branch_forward,
    default_size,
    make_finish,
    make_step_end,
    prompt_batch_size,
    require_negative,
    resolve_callback_inputs,
)
from .base import Adapter, AdapterCapabilities, own_tensor


class SD3Guidance(GuidancePolicy):
    """SD3's CFG with optional skip-layer guidance, in the stock pipeline's arithmetic.

    ``p = u + w (c - u)``, then inside the window ``p = p + (c - s) * slg_scale`` where ``s`` is the cond
    prediction with layers skipped. The window is stock's, not the guiders' ``int(start*N) <= i < int(stop*N)``:
    strict on both ends and compared in floats, ``i > N*start and i < N*stop``, with N the pipeline's
    ``num_inference_steps``.
    """

    linear = True
    #: the weights depend on the step only through whether the skip branch runs
    constant_weights = True

    def __init__(self, scale: float, skip_layers: list[int] | None = None, skip_scale: float = 2.8,
                 skip_start: float = 0.01, skip_stop: float = 0.2, num_inference_steps: int | None = None) -> None:
        self.scale = scale
        self.skip_layers = list(skip_layers) if skip_layers is not None else None
        self.skip_scale = skip_scale
        self.skip_start, self.skip_stop = skip_start, skip_stop
        self.num_inference_steps = num_inference_steps
        self.branches = ("cond", "uncond", "skip") if self.skip_layers is not None else ("cond", "uncond")

    def reset(self, num_steps: int) -> None:
        super().reset(num_steps)
        if self.num_inference_steps is None:
            self.num_inference_steps = num_steps

    def branch_specs(self) -> dict[str, Branch]:
        specs = {"cond": COND, "uncond": UNCOND}
        if self.skip_layers is not None:
            # SD3Transformer2DModel skips these blocks itself when given skip_layers= in its forward
            specs["skip"] = Branch("skip", PROMPT, ForwardKwargs.of(skip_layers=self.skip_layers))
        return specs

    def skipping(self, i: int) -> bool:
        n = self.num_inference_steps
        return self.skip_layers is not None and (i > n * self.skip_start and i < n * self.skip_stop)

    def active(self, i: int) -> tuple[str, ...]:
        return ("cond", "uncond", "skip") if self.skipping(i) else ("cond", "uncond")

    def combine(self, preds: dict[str, Prediction], i: int) -> Prediction:
        c, u = preds["cond"], preds["uncond"]
        p = u + self.scale * (c - u)
        if "skip" in preds:
            p = p + (c - preds["skip"]) * self.skip_scale
        return p

    def _weights(self, i: int) -> dict[str, float]:
        if self.skipping(i):
            return {"cond": self.scale + self.skip_scale, "uncond": 1.0 - self.scale, "skip": -self.skip_scale}
        return {"cond": self.scale, "uncond": 1.0 - self.scale}

    def reduce_terms(self, preds, i, like):
        return [weighted_sum_fp32(preds, self._weights(i), like)]

    def reduce_finish(self, terms, i, like):
        return terms[0].to(like.dtype)

    def describe(self) -> str:
        if self.skip_layers is None:
            return f"SD3Guidance(scale={self.scale})"
        return (f"SD3Guidance(scale={self.scale}, skip_layers={self.skip_layers}, skip_scale={self.skip_scale}, "
                f"window=({self.skip_start}, {self.skip_stop}))")


class StableDiffusion3Adapter(Adapter):
    pipeline_classes = ("StableDiffusion3Pipeline",)
    capabilities = AdapterCapabilities(
        batchable=True,
        graph_steps=True,
        graph_value_args=("prompt", "prompt_2", "prompt_3", "negative_prompt", "negative_prompt_2",
                          "negative_prompt_3", "prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                          "negative_pooled_prompt_embeds", "latents", "generator", "guidance_scale", "output_type",
                          "return_dict"),
    )

    def complete_args(self, a: dict[str, Any]) -> None:
        default_size(self.pipe, a)
        resolve_callback_inputs(a)

    def check_inputs(self, a: dict[str, Any]) -> None:
        self.pipe.check_inputs(
            a["prompt"],
            a["prompt_2"],
            a["prompt_3"],
            a["height"],
            a["width"],
            negative_prompt=a["negative_prompt"],
            negative_prompt_2=a["negative_prompt_2"],
            negative_prompt_3=a["negative_prompt_3"],
            prompt_embeds=a["prompt_embeds"],
            negative_prompt_embeds=a["negative_prompt_embeds"],
            pooled_prompt_embeds=a["pooled_prompt_embeds"],
            negative_pooled_prompt_embeds=a["negative_pooled_prompt_embeds"],
            callback_on_step_end_tensor_inputs=a["callback_on_step_end_tensor_inputs"],
            max_sequence_length=a["max_sequence_length"],
        )
        if a["ip_adapter_image"] is not None or a["ip_adapter_image_embeds"] is not None:
            raise NotImplementedError("pycfg's StableDiffusion3Pipeline adapter does not support IP-Adapter inputs yet")

    def default_policy(self, a: dict[str, Any]) -> GuidancePolicy:
        if a["guidance_scale"] <= 1:
            return NoGuidance()
        if a["skip_guidance_layers"] is None:
            # stock's combine is plain CFG's, u + w (c - u): the policy the fused kernel and step graphs take
            return CFG(a["guidance_scale"])
        # its step window counts the request's steps (set at reset, from the job)
        return SD3Guidance(a["guidance_scale"], a["skip_guidance_layers"], a["skip_layer_guidance_scale"],
                           a["skip_layer_guidance_start"], a["skip_layer_guidance_stop"])

    def prepare(self, a: dict[str, Any], policy: GuidancePolicy | None) -> Job:
        pipe, module = self.pipe, self.module
        # stock encodes a negative iff guidance_scale > 1; a user policy decides by its branches
        needs_negative = self.needs_negative(policy) if policy is not None else a["guidance_scale"] > 1
        policy = self.request_policy(a, policy)
        require_negative(policy, needs_negative, "a negative prompt or negative embeds")
        begin_call(pipe, guidance_scale=a["guidance_scale"], skip_layer_guidance_scale=a["skip_layer_guidance_scale"],
                   clip_skip=a["clip_skip"], joint_attention_kwargs=a["joint_attention_kwargs"])

        batch_size = prompt_batch_size(a["prompt"], a["prompt_embeds"])
        device = pipe._execution_device
        jak = a["joint_attention_kwargs"]
        lora_scale = jak.get("scale", None) if jak is not None else None
        n_per = a["num_images_per_prompt"]
        embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
            prompt=a["prompt"],
            prompt_2=a["prompt_2"],
            prompt_3=a["prompt_3"],
            negative_prompt=a["negative_prompt"],
            negative_prompt_2=a["negative_prompt_2"],
            negative_prompt_3=a["negative_prompt_3"],
            do_classifier_free_guidance=needs_negative,
            prompt_embeds=a["prompt_embeds"],
            negative_prompt_embeds=a["negative_prompt_embeds"],
            pooled_prompt_embeds=a["pooled_prompt_embeds"],
            negative_pooled_prompt_embeds=a["negative_pooled_prompt_embeds"],
            device=device,
            clip_skip=a["clip_skip"],
            num_images_per_prompt=n_per,
            max_sequence_length=a["max_sequence_length"],
            lora_scale=lora_scale,
        )
        # text inputs by source; perturbed branches read the prompt as encoded, as stock's skip-layer forward
        # reads original_prompt_embeds, which a callback's update does not reach
        # a captured step's text buffers are written by later requests: never the caller's tensors
        embeds, neg_embeds, pooled, neg_pooled = (own_tensor(t, a) for t in (embeds, neg_embeds, pooled, neg_pooled))
        text = {PROMPT: [embeds, pooled], NEGATIVE: [neg_embeds, neg_pooled]}
        original = (embeds, pooled)

        latents = pipe.prepare_latents(
            batch_size * n_per, pipe.transformer.config.in_channels, a["height"], a["width"], embeds.dtype, device,
            a["generator"], a["latents"],
        )
        latents = own_tensor(latents, a["latents"])

        scheduler = self.private_scheduler()
        scheduler_kwargs = {}
        mu = a["mu"]
        if scheduler.config.get("use_dynamic_shifting", None) and mu is None:
            _, _, h, w = latents.shape
            patch = pipe.transformer.config.patch_size
            mu = module.calculate_shift(
                (h // patch) * (w // patch),
                scheduler.config.get("base_image_seq_len", 256),
                scheduler.config.get("max_image_seq_len", 4096),
                scheduler.config.get("base_shift", 0.5),
                scheduler.config.get("max_shift", 1.16),
            )
            scheduler_kwargs["mu"] = mu
        elif mu is not None:
            scheduler_kwargs["mu"] = mu
        timesteps, n_steps = module.retrieve_timesteps(
            scheduler, a["num_inference_steps"], device, sigmas=a["sigmas"], **scheduler_kwargs
        )
        pipe._num_timesteps = len(timesteps)
        transformer = pipe.transformer

        def forward(names: tuple[str, ...], x: torch.Tensor, step: StepIndex, batched: bool) -> list[torch.Tensor]:
            t = step.select(timesteps)
            preds: dict[str, torch.Tensor] = {}
            for group in batch_groups(names, batched, batch_key):
                # stock's batch order, cat([neg, pos]): a batched cond + uncond forward is stock's own
                group = sorted(group, key=lambda m: policy.branch(m).source != NEGATIVE)
                n, spec = len(group), policy.branch(group[0])
                texts = [branch_text(m) for m in group]
                hidden = x if n == 1 else torch.cat([x] * n)
                with branch_forward(transformer, "+".join(group), spec, cache=False) as extra:
                    out = transformer(
                        hidden_states=hidden,
                        timestep=t.expand(hidden.shape[0]),
                        encoder_hidden_states=texts[0][0] if n == 1 else torch.cat([e for e, _ in texts]),
                        pooled_projections=texts[0][1] if n == 1 else torch.cat([p for _, p in texts]),
                        joint_attention_kwargs=pipe._joint_attention_kwargs,
                        return_dict=False,
                        **extra,
                    )[0]
                preds.update(zip(group, out.chunk(n)))
            return [preds[name] for name in names]

        def branch_text(name: str):
            spec = policy.branch(name)
            return original if spec.perturbation is not None else text[spec.source]

        def batch_key(name: str):
            # branches batch together when their forwards differ only in same-shape text inputs
            embeds, pooled = branch_text(name)
            return (policy.branch(name).perturbation, tuple(embeds.shape), tuple(pooled.shape))

        offered, apply = batched_text_callbacks(text, {"prompt_embeds": 0, "pooled_prompt_embeds": 1},
                                                cfg=needs_negative)

        def decode(x: torch.Tensor, output_type: str):
            x = (x / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
            image = pipe.vae.decode(x, return_dict=False)[0]
            return pipe.image_processor.postprocess(image, output_type=output_type)

        policy.set_timesteps([t.item() for t in timesteps])
        return self.denoise_job(
            latents=latents, timesteps=timesteps, policy=policy, forward=forward,
            update=self.make_update(scheduler, timesteps, generator=a["generator"]),
            finish=make_finish(pipe, a, decode, module.StableDiffusion3PipelineOutput, "images"),
            step_end=make_step_end(pipe, a["callback_on_step_end"], a["callback_on_step_end_tensor_inputs"],
                                   timesteps, offered, apply),
            prediction_dtype=transformer.dtype,
            graph_inputs=lambda: {"timesteps": timesteps, **{
                f"{source}_{part}": t for source, pair in text.items() for part, t in zip(("embeds", "pooled"), pair)
                if t is not None}},
        )
