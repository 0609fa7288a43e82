"""StableDiffusion3Pipeline (text to image): its batched CFG split into branches, skip-layer guidance as a third.

Stock runs ``cat([neg, pos])`` as one batch; pycfg runs ``cond`` and ``uncond`` as separate forwards, so it
matches stock within fp32 rounding (a batch-2 matmul is not bit-identical to two batch-1 ones) while staying
bit-identical across cfg_parallel_size. With ``batch_branches=True`` at cfg_parallel_size 1 they run as stock's
own ``cat([neg, pos])`` batch instead, giving stock's bits. Skip-layer guidance (``skip_guidance_layers``) adds
the ``skip`` branch: the cond inputs with ``skip_layers=`` passed to the transformer, inside the stock
pipeline's own step window.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from ..guidance import CFG, GuidancePolicy, NoGuidance
from ..guidance.base import COND, NEGATIVE, PROMPT, UNCOND, Branch, Prediction, weighted_sum_fp32
from ..guidance.perturb import ForwardKwargs
from ..runtime.job import Job
from ._common import (
    batch_groups,
    branch_forward,
    branch_specs,
    callback_tensor_inputs,
    check_policy_on,
    make_step_end,
    prompt_batch_size,
    reads_negative,
)
from .base import Adapter, check_output_type, own_tensor


class SD3Guidance(GuidancePolicy):
    """SD3's CFG with optional skip-layer guidance, in the stock pipeline's arithmetic.

    ``p = u + w (c - u)``, then inside the window ``p = p + (c - s) * slg_scale`` where ``s`` is the cond
    prediction with layers skipped. The window is stock's, not the guiders' ``int(start*N) <= i < int(stop*N)``:
    strict on both ends and compared in floats, ``i > N*start and i < N*stop``, with N the pipeline's
    ``num_inference_steps``.
    """

    linear = True

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
    #: forward() accepts the step as a 1-element device tensor, so a captured step reads its timestep on device
    graph_step_index = True
    graph_value_args = ("prompt", "prompt_2", "prompt_3", "negative_prompt", "negative_prompt_2", "negative_prompt_3",
                        "prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                        "negative_pooled_prompt_embeds", "latents", "generator", "guidance_scale", "output_type",
                        "return_dict")

    def check(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        pipe = self.pipe
        a = self.bind(kwargs)
        a["height"] = a["height"] or pipe.default_sample_size * pipe.vae_scale_factor
        a["width"] = a["width"] or pipe.default_sample_size * pipe.vae_scale_factor
        a["callback_on_step_end_tensor_inputs"] = callback_tensor_inputs(
            a["callback_on_step_end"], a["callback_on_step_end_tensor_inputs"]
        )
        pipe.check_inputs(
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
        check_output_type(a["output_type"])
        return a

    def check_policy(self, policy: GuidancePolicy) -> None:
        check_policy_on(policy, self.pipe.transformer)

    def prepare(self, a: dict[str, Any], policy: GuidancePolicy | None) -> Job:
        pipe, module = self.pipe, self.module
        default_cfg = a["guidance_scale"] > 1
        needs_negative = reads_negative(branch_specs(policy)) if policy is not None else default_cfg

        pipe._guidance_scale = a["guidance_scale"]
        pipe._skip_layer_guidance_scale = a["skip_layer_guidance_scale"]
        pipe._clip_skip = a["clip_skip"]
        pipe._joint_attention_kwargs = a["joint_attention_kwargs"]
        pipe._interrupt = False

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

        if policy is not None:
            policy = copy.deepcopy(policy)
        elif default_cfg and a["skip_guidance_layers"] is None:
            # stock's combine is plain CFG's, u + w (c - u): the policy the fused kernel and step graphs take
            policy = CFG(a["guidance_scale"])
        elif default_cfg:
            policy = SD3Guidance(a["guidance_scale"], a["skip_guidance_layers"], a["skip_layer_guidance_scale"],
                                 a["skip_layer_guidance_start"], a["skip_layer_guidance_stop"], n_steps)
        else:
            policy = NoGuidance()
        self.check_policy(policy)
        specs = branch_specs(policy)
        if reads_negative(specs) and not needs_negative:
            raise ValueError(f"guidance {policy.describe()} needs a negative prompt or negative embeds")

        transformer = pipe.transformer

        def forward(names: tuple[str, ...], x: torch.Tensor, i: int) -> list[torch.Tensor]:
            # a tensor step index (CUDA graph replays) selects on device: no host value is baked in
            t = timesteps[i] if isinstance(i, int) else timesteps.index_select(0, i)[0]
            # read per call: batch_branches="auto" is decided by measurement after prepare()
            batch = getattr(self, "batch_branches", False) is True
            preds: dict[str, torch.Tensor] = {}
            for group in batch_groups(names, batch, batch_key):
                # stock's batch order, cat([neg, pos]): a batched cond + uncond forward is stock's own
                group = sorted(group, key=lambda m: specs[m].source != NEGATIVE)
                n, spec = len(group), specs[group[0]]
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
            spec = specs[name]
            return original if spec.perturbation is not None else text[spec.source]

        def batch_key(name: str):
            # branches batch together when their forwards differ only in same-shape text inputs
            embeds, pooled = branch_text(name)
            return (specs[name].perturbation, tuple(embeds.shape), tuple(pooled.shape))

        cfg_request = needs_negative

        def offered(x):
            # the stock loop's locals: with CFG, prompt embeds are the batched cat([neg, pos])
            values = {"latents": x, "prompt_embeds": text[PROMPT][0], "pooled_prompt_embeds": text[PROMPT][1]}
            if cfg_request:
                values["prompt_embeds"] = torch.cat([text[NEGATIVE][0], text[PROMPT][0]], dim=0)
                values["pooled_prompt_embeds"] = torch.cat([text[NEGATIVE][1], text[PROMPT][1]], dim=0)
            return values

        def apply(outputs):
            for j, key in enumerate(("prompt_embeds", "pooled_prompt_embeds")):
                if key in outputs:
                    value = outputs.pop(key)
                    if cfg_request:
                        text[NEGATIVE][j], text[PROMPT][j] = value.chunk(2)
                    else:
                        text[PROMPT][j] = value

        step_end = make_step_end(pipe, a["callback_on_step_end"], a["callback_on_step_end_tensor_inputs"], timesteps,
                                 offered, apply)
        output_type, return_dict = a["output_type"], a["return_dict"]

        def finish(x: torch.Tensor):
            if output_type == "latent":
                image = x
            else:
                x = (x / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
                image = pipe.vae.decode(x, return_dict=False)[0]
                image = pipe.image_processor.postprocess(image, output_type=output_type)
            pipe.maybe_free_model_hooks()
            if not return_dict:
                return (image,)
            return module.StableDiffusion3PipelineOutput(images=image)

        policy.set_timesteps([t.item() for t in timesteps])
        stepper = self.make_update(scheduler, timesteps, generator=a["generator"])
        return self.denoise_job(
            latents=latents, timesteps=timesteps, policy=policy, forward=forward, update=stepper,
            finish=finish,
            # no callback: nothing runs between steps, so whole steps can be captured as CUDA graphs
            step_end=step_end if a["callback_on_step_end"] is not None else None,
            prediction_dtype=transformer.dtype,
            graph_inputs=lambda: {"timesteps": timesteps, **{
                f"{source}_{part}": t for source, pair in text.items() for part, t in zip(("embeds", "pooled"), pair)
                if t is not None}},
        )
