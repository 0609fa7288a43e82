"""Z-Image (text to image, image to image): a family whose stock loop batches its branches.

Stock runs cond and uncond as one transformer call on a list of per-sample inputs (``repeat(2)``, the prompt and
negative embed lists concatenated), then combines per sample in fp32 with the original formulation
``c + s (c - u)``, and hands the scheduler the negated result. Here each branch's forward returns its samples'
predictions upcast to fp32 and negated, which changes no bit of the combine (negation is exact and every step of
the combine is sign-symmetric), so generic policies apply as on any other family.

Z-Image's two guidance options stay in the family, in :class:`ZImageCFG`: ``cfg_truncation`` (the scale drops to
0, and only ``cond`` runs, once the normalised time ``(1000 - t) / 1000`` passes it) and ``cfg_normalization``
(each sample's guided prediction is scaled down to at most that multiple of the cond prediction's norm).

Separate forwards pad each branch's texts on their own, so they match stock's batch within fp32 rounding;
``batch_branches=True`` at cfg_parallel_size 1 makes stock's own batched call and is bit-identical.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..guidance import CFG, GuidancePolicy, NoGuidance
from ..guidance.base import NEGATIVE, PROMPT, KernelGuidance, Prediction
from ..runtime.job import Job
from ..steps import StepIndex
from ._common import (
    batch_groups,
    begin_call,
    branch_forward,
    make_finish,
    make_step_end,
    require_negative,
    resolve_callback_inputs,
)
from ._pipeline_view import with_scheduler
from .base import Adapter, AdapterCapabilities, own_tensor


def clamp_to_cond_norm(comb: torch.Tensor, cond: torch.Tensor, factor: float) -> torch.Tensor:
    """Each sample of ``comb`` scaled down to at most ``factor`` times its cond sample's norm (Z-Image's
    ``cfg_normalization``), sample by sample as stock computes it, without a host synchronisation."""
    out = []
    for j in range(comb.shape[0]):
        new_norm = torch.linalg.vector_norm(comb[j])
        max_norm = torch.linalg.vector_norm(cond[j]) * factor
        out.append(torch.where(new_norm > max_norm, comb[j] * (max_norm / new_norm), comb[j]))
    return torch.stack(out)


class ZImageCFG(CFG):
    """Z-Image's guidance: ``c + s_i (c - u)`` with a per-step scale (0 past ``cfg_truncation``: ``cond`` alone
    runs) and, with ``normalization > 0``, each sample clamped to ``normalization`` times the cond's norm.

    The per-step scales come from the adapter, computed with stock's own tensor arithmetic. Linear (``reduce``
    exchange, fused update) without normalization; the clamp needs every branch (``gather``).
    """

    def __init__(self, scale: float, step_scales: Sequence[float], normalization: float = 0.0) -> None:
        super().__init__(scale, original_formulation=True)
        self.step_scales = [float(s) for s in step_scales]
        self.normalization = float(normalization)
        self.linear = self.normalization == 0.0

    def scale_at(self, i: int) -> float:
        return self.step_scales[i]

    def active(self, i: int) -> tuple[str, ...]:
        return self.branches if self.step_scales[i] > 0 else ("cond",)

    def kernel_guidance(self, i: int, active: tuple[str, ...]) -> KernelGuidance | None:
        # the kernel has no norm clamp: with one, the combine runs here and the kernel does the update alone
        return None if self.normalization > 0.0 else super().kernel_guidance(i, active)

    def combine(self, preds: dict[str, Prediction], i: int) -> Prediction:
        comb = super().combine(preds, i)
        if len(preds) == 1 or self.normalization <= 0.0:
            return comb
        return clamp_to_cond_norm(comb, preds["cond"], self.normalization)

    def describe(self) -> str:
        cut = sum(1 for s in self.step_scales if s <= 0)
        extra = f", normalization={self.normalization}" if self.normalization else ""
        return f"ZImageCFG(scale={self.scale}{extra}, cond only for {cut} of {len(self.step_scales)} steps)"


class ZImageAdapter(Adapter):
    pipeline_classes = ("ZImagePipeline",)
    #: no step graphs: the transformer takes Python lists of per-sample tensors and pads them on the host
    #: every call (untested under capture), so steps run eagerly
    capabilities = AdapterCapabilities(batchable=True)

    # -- what the variants override ---------------------------------------------------------------------------

    def size(self, a: dict[str, Any]) -> tuple[int, int]:
        """The generated image's (height, width)."""
        return a["height"] or 1024, a["width"] or 1024

    def check_variant(self, a: dict[str, Any]) -> None:
        """The variant's own argument checks (stock raises these from ``__call__``)."""

    def latents_and_timesteps(self, a, view, batch: int, dtype: torch.dtype, device):
        """Initial latents and the timesteps, from the pipeline's own helpers called on ``view`` (the pipeline
        with the request's private scheduler)."""
        module = self.module
        height, width = a["size"]
        latents = view.prepare_latents(batch, view.transformer.in_channels, height, width, torch.float32, device,
                                       a["generator"], a["latents"])
        mu = self._mu(view.scheduler, (latents.shape[2] // 2) * (latents.shape[3] // 2))
        sigmas = a["sigmas"] if a["sigmas"] is not None else module.get_default_z_image_sigmas(a["num_inference_steps"])
        timesteps, _ = module.retrieve_timesteps(view.scheduler, a["num_inference_steps"], device, sigmas=sigmas,
                                                 mu=mu)
        view.scheduler.set_begin_index(0)
        return latents, timesteps

    # -- the family -------------------------------------------------------------------------------------------

    @staticmethod
    def _mu(scheduler, image_seq_len: int) -> float:
        from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift

        config = scheduler.config
        return calculate_shift(image_seq_len, config.get("base_image_seq_len", 256),
                               config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                               config.get("max_shift", 1.15))

    def complete_args(self, a: dict[str, Any]) -> None:
        resolve_callback_inputs(a)

    def check_inputs(self, a: dict[str, Any]) -> None:
        # Z-Image has no check_inputs: these are the checks its __call__ makes before the first model runs
        pipe = self.pipe
        self.check_variant(a)
        height, width = self.size(a)
        vae_scale = pipe.vae_scale_factor * 2
        for name, value in (("Height", height), ("Width", width)):
            if value % vae_scale != 0:
                raise ValueError(f"{name} must be divisible by {vae_scale} (got {value}). "
                                 f"Please adjust the {name.lower()} to a multiple of {vae_scale}.")
        a["size"] = (height, width)
        if a["prompt_embeds"] is not None and a["prompt"] is None and a["guidance_scale"] > 0 \
                and a["negative_prompt_embeds"] is None:
            raise ValueError("When `prompt_embeds` is provided without `prompt`, "
                             "`negative_prompt_embeds` must also be provided for classifier-free guidance.")
        unknown = [k for k in a["callback_on_step_end_tensor_inputs"] if k not in pipe._callback_tensor_inputs]
        if unknown and a["callback_on_step_end"] is not None:
            # stock reads them only when it calls the callback, failing at the first step: fail before it
            raise ValueError(f"`callback_on_step_end_tensor_inputs` has to be in {pipe._callback_tensor_inputs}, "
                             f"but found {unknown}")

    def default_policy(self, a: dict[str, Any], timesteps=None) -> GuidancePolicy:
        scale = a["guidance_scale"]
        if not scale > 0:
            return NoGuidance()
        normalization = a["cfg_normalization"]
        normalization = float(normalization) if normalization and float(normalization) > 0.0 else 0.0
        truncation = a["cfg_truncation"]
        step_scales = [scale] * (len(timesteps) if timesteps is not None else 0)
        if timesteps is not None and truncation is not None and float(truncation) <= 1:
            # stock's own tensor arithmetic for the normalised time, then its comparison
            t_norms = ((1000 - timesteps.float()) / 1000).tolist()
            step_scales = [0.0 if t_norm > truncation else scale for t_norm in t_norms]
        if normalization == 0.0 and all(s == scale for s in step_scales):
            return CFG(scale, original_formulation=True)
        return ZImageCFG(scale, step_scales, normalization)

    def prepare(self, a: dict[str, Any], policy: GuidancePolicy | None) -> Job:
        pipe, module = self.pipe, self.module
        transformer = pipe.transformer
        device = pipe._execution_device
        begin_call(pipe, guidance_scale=a["guidance_scale"], joint_attention_kwargs=a["joint_attention_kwargs"],
                   cfg_normalization=a["cfg_normalization"], cfg_truncation=a["cfg_truncation"])
        needs_negative = self.needs_negative(policy) if policy is not None else a["guidance_scale"] > 0

        prompt = a["prompt"]
        batch_size = 1 if isinstance(prompt, str) else len(prompt) if isinstance(prompt, list) else len(
            a["prompt_embeds"])
        prompt_embeds, negative_embeds = a["prompt_embeds"], a["negative_prompt_embeds"]
        if prompt_embeds is None or a["prompt"] is not None:
            prompt_embeds, negative_embeds = pipe.encode_prompt(
                prompt=a["prompt"], negative_prompt=a["negative_prompt"], do_classifier_free_guidance=needs_negative,
                prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, device=device,
                max_sequence_length=a["max_sequence_length"],
            )
        n_per = a["num_images_per_prompt"]
        # lists of per-sample tensors, never the caller's own list
        prompt_embeds = [pe for pe in prompt_embeds for _ in range(n_per)]
        text = {PROMPT: prompt_embeds}
        if negative_embeds:
            text[NEGATIVE] = [npe for npe in negative_embeds for _ in range(n_per)]

        scheduler = self.private_scheduler()
        latents, timesteps = self.latents_and_timesteps(a, with_scheduler(pipe, scheduler), batch_size * n_per,
                                                        prompt_embeds[0].dtype, device)
        latents = own_tensor(latents, a["latents"])
        pipe._num_timesteps = len(timesteps)

        # the default policy needs the schedule (cfg_truncation compares the normalised time step by step)
        policy = self.request_policy(a, policy) if policy is not None else self.default_policy(a, timesteps)
        self.check_policy(policy)
        require_negative(policy, NEGATIVE in text)
        attention_kwargs = a["joint_attention_kwargs"]

        def forward(names: tuple[str, ...], x: torch.Tensor, step: StepIndex, batched: bool) -> list[torch.Tensor]:
            t = step.select(timesteps)
            timestep = (1000 - t.expand(x.shape[0])) / 1000
            model_input = x.to(transformer.dtype)
            preds: dict[str, torch.Tensor] = {}
            for group in batch_groups(names, batched, lambda name: policy.branch(name).perturbation):
                n, spec = len(group), policy.branch(group[0])
                # stock's batch: the latents repeated, the prompt list then the negative list
                hidden = model_input if n == 1 else model_input.repeat(n, 1, 1, 1)
                captions = [e for name in group for e in text[policy.branch(name).source]]
                with branch_forward(transformer, "+".join(group), spec, cache=False) as extra:
                    out = transformer(list(hidden.unsqueeze(2).unbind(dim=0)),
                                      timestep if n == 1 else timestep.repeat(n), captions,
                                      joint_attention_kwargs=attention_kwargs, return_dict=False, **extra)[0]
                # stock's fp32 upcast and its final negation, per branch (exact: see the module docstring)
                pred = -torch.stack([o.float() for o in out], dim=0).squeeze(2)
                preds.update(zip(group, pred.chunk(n)))
            return [preds[name] for name in names]

        def apply(outputs):
            if "prompt_embeds" in outputs:
                text[PROMPT] = outputs.pop("prompt_embeds")
            if "negative_prompt_embeds" in outputs:
                text[NEGATIVE] = outputs.pop("negative_prompt_embeds")

        step_end = make_step_end(
            pipe, a["callback_on_step_end"], a["callback_on_step_end_tensor_inputs"], timesteps,
            lambda x: {"latents": x, "prompt_embeds": text[PROMPT]}, apply,
        )
        def decode(x: torch.Tensor, output_type: str):
            x = x.to(pipe.vae.dtype)
            x = (x / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
            image = pipe.vae.decode(x, return_dict=False)[0]
            return pipe.image_processor.postprocess(image, output_type=output_type)

        policy.set_timesteps([t.item() for t in timesteps])
        stepper = self.make_update(scheduler, timesteps, generator=a["generator"])
        return self.denoise_job(
            latents=latents, timesteps=timesteps, policy=policy, forward=forward, update=stepper,
            finish=make_finish(pipe, a, decode, module.ZImagePipelineOutput, "images"), step_end=step_end,
            prediction_dtype=torch.float32,
        )


class ZImageImg2ImgAdapter(ZImageAdapter):
    """ZImageImg2ImgPipeline: the input image noised to ``strength``, the schedule truncated to match."""

    pipeline_classes = ("ZImageImg2ImgPipeline",)

    def check_variant(self, a: dict[str, Any]) -> None:
        if a["strength"] < 0 or a["strength"] > 1:
            raise ValueError(f"The value of strength should be in [0.0, 1.0] but is {a['strength']}")
        if a["image"] is None:
            raise ValueError("`image` is required: the image to start from")

    def size(self, a: dict[str, Any]) -> tuple[int, int]:
        # stock preprocesses at the image's own (rounded) size and takes height and width from it
        image = a["image"][0] if isinstance(a["image"], list) else a["image"]
        default_height, default_width = self.pipe.image_processor.get_default_height_width(image)
        return a["height"] or default_height, a["width"] or default_width

    def latents_and_timesteps(self, a, view, batch: int, dtype: torch.dtype, device):
        module = self.module
        height, width = a["size"]
        init_image = view.image_processor.preprocess(a["image"]).to(dtype=torch.float32)
        latent_height = 2 * (int(height) // (view.vae_scale_factor * 2))
        latent_width = 2 * (int(width) // (view.vae_scale_factor * 2))
        mu = self._mu(view.scheduler, (latent_height // 2) * (latent_width // 2))
        n_steps = a["num_inference_steps"]
        sigmas = a["sigmas"] if a["sigmas"] is not None else module.get_default_z_image_sigmas(n_steps)
        _, n_steps = module.retrieve_timesteps(view.scheduler, n_steps, device, sigmas=sigmas, mu=mu)
        timesteps, n_steps = view.get_timesteps(n_steps, a["strength"], device)
        if n_steps < 1:
            raise ValueError(
                f"After adjusting the num_inference_steps by strength parameter: {a['strength']}, the number of "
                f"pipeline steps is {n_steps} which is < 1 and not appropriate for this pipeline.")
        latents = view.prepare_latents(init_image, timesteps[:1].repeat(batch), batch, view.transformer.in_channels,
                                       height, width, dtype, device, a["generator"], a["latents"])
        return latents, timesteps
