"""QwenImagePipeline (text to image): the stock ``__call__`` split into prepare / per-branch forward / finish.

Every step of the stock pipeline is reproduced with the pipeline's own helpers (``check_inputs``,
``encode_prompt``, ``prepare_latents``, ``retrieve_timesteps``, ``calculate_shift``, ``_unpack_latents``) and
the same arithmetic, so pycfg at any cfg_parallel_size returns the stock pipeline's bits.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from ..guidance import CFG, GuidancePolicy, NoGuidance
from ..guidance.base import NEGATIVE
from ..guidance.perturb import perturbed
from ..runtime.job import Job
from ._common import batch_groups, check_latents_shape, check_same_batch, check_text_embeds, prompt_batch_size
from .base import Adapter, check_output_type, own_tensor


class QwenImageAdapter(Adapter):
    pipeline_classes = ("QwenImagePipeline",)
    #: forward() accepts the step as a 1-element device tensor, so a captured step reads its timestep on device
    graph_step_index = True
    #: pad text inputs to a multiple of this many tokens (zeros, masked out): fewer compiled shapes, and
    #: cond/uncond of different lengths can share one batched forward. None: exact lengths (stock behaviour).
    text_bucket: int | None = None
    graph_value_args = ("prompt", "negative_prompt", "prompt_embeds", "negative_prompt_embeds", "prompt_embeds_mask",
                        "negative_prompt_embeds_mask", "latents", "generator", "true_cfg_scale", "guidance_scale",
                        "output_type", "return_dict")

    def check(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Bind and validate with the pipeline's own ``check_inputs``; no model runs here."""
        pipe = self.pipe
        a = self.bind(kwargs)
        a["height"] = a["height"] or pipe.default_sample_size * pipe.vae_scale_factor
        a["width"] = a["width"] or pipe.default_sample_size * pipe.vae_scale_factor
        pipe.check_inputs(
            a["prompt"],
            a["height"],
            a["width"],
            negative_prompt=a["negative_prompt"],
            prompt_embeds=a["prompt_embeds"],
            negative_prompt_embeds=a["negative_prompt_embeds"],
            prompt_embeds_mask=a["prompt_embeds_mask"],
            negative_prompt_embeds_mask=a["negative_prompt_embeds_mask"],
            callback_on_step_end_tensor_inputs=a["callback_on_step_end_tensor_inputs"],
            max_sequence_length=a["max_sequence_length"],
        )
        if not isinstance(a["num_inference_steps"], int) or a["num_inference_steps"] < 1:
            if a["sigmas"] is None:
                raise ValueError(f"num_inference_steps must be a positive integer, got {a['num_inference_steps']!r}")
        check_output_type(a["output_type"])
        # shapes of the caller's tensors against what the pipeline builds: rejected here, not inside a forward
        dim = pipe.transformer.config.joint_attention_dim
        check_text_embeds(a, "prompt_embeds", "prompt_embeds_mask", dim)
        check_text_embeds(a, "negative_prompt_embeds", "negative_prompt_embeds_mask", dim)
        check_same_batch(a, "prompt_embeds", "negative_prompt_embeds")
        if a["latents"] is not None and isinstance(a["num_images_per_prompt"], int):
            batch = prompt_batch_size(a["prompt"], a["prompt_embeds"]) * a["num_images_per_prompt"]
            # the pipeline's own helper, drawing on the meta device: the shape, no numbers, no generator
            expected = pipe.prepare_latents(batch, pipe.transformer.config.in_channels // 4, a["height"], a["width"],
                                            torch.float32, torch.device("meta"), None).shape
            check_latents_shape(a, expected)
        return a

    def default_policy(self, a: dict[str, Any]) -> GuidancePolicy:
        has_negative = a["negative_prompt"] is not None or a["negative_prompt_embeds"] is not None
        if a["true_cfg_scale"] > 1 and has_negative:
            return CFG(a["true_cfg_scale"], renorm=True)
        return NoGuidance()

    def check_policy(self, policy: GuidancePolicy) -> None:
        """Raise if ``policy`` cannot run on this pipeline's transformer (no model runs)."""
        policy.check_model(self.pipe.transformer)
        policy.check_outputs(1)

    def prepare(self, a: dict[str, Any], policy: GuidancePolicy | None) -> Job:
        pipe, module = self.pipe, self.module
        policy = copy.deepcopy(policy) if policy is not None else self.default_policy(a)
        self.check_policy(policy)
        specs = {name: policy.branch(name) for name in policy.branches}
        needs_negative = any(spec.source == NEGATIVE for spec in specs.values())
        if needs_negative and a["negative_prompt"] is None and a["negative_prompt_embeds"] is None:
            raise ValueError(f"guidance {policy.describe()} needs negative_prompt or negative_prompt_embeds")

        # the pipeline's per-call attributes, as the stock __call__ sets them (callbacks read them)
        pipe._guidance_scale = a["guidance_scale"]
        pipe._attention_kwargs = a["attention_kwargs"]
        pipe._current_timestep = None
        pipe._interrupt = False

        prompt = a["prompt"]
        if prompt is not None and isinstance(prompt, str):
            batch_size = 1
        elif prompt is not None and isinstance(prompt, list):
            batch_size = len(prompt)
        else:
            batch_size = a["prompt_embeds"].shape[0]
        device = pipe._execution_device
        n_per = a["num_images_per_prompt"]
        max_len = a["max_sequence_length"]

        prompt_embeds, prompt_embeds_mask = pipe.encode_prompt(
            prompt=prompt,
            prompt_embeds=a["prompt_embeds"],
            prompt_embeds_mask=a["prompt_embeds_mask"],
            device=device,
            num_images_per_prompt=n_per,
            max_sequence_length=max_len,
        )
        # text inputs by source: every branch reading the prompt sees a callback's prompt_embeds update
        branch_text = {"prompt": (prompt_embeds, prompt_embeds_mask)}
        if needs_negative:
            branch_text[NEGATIVE] = pipe.encode_prompt(
                prompt=a["negative_prompt"],
                prompt_embeds=a["negative_prompt_embeds"],
                prompt_embeds_mask=a["negative_prompt_embeds_mask"],
                device=device,
                num_images_per_prompt=n_per,
                max_sequence_length=max_len,
            )

        height, width = a["height"], a["width"]
        num_channels_latents = pipe.transformer.config.in_channels // 4
        latents = pipe.prepare_latents(
            batch_size * n_per,
            num_channels_latents,
            height,
            width,
            prompt_embeds.dtype,
            device,
            a["generator"],
            a["latents"],
        )
        latents = own_tensor(latents, a["latents"])
        img_shapes = [[(1, height // pipe.vae_scale_factor // 2, width // pipe.vae_scale_factor // 2)]] * batch_size

        num_inference_steps = a["num_inference_steps"]
        sigmas = a["sigmas"]
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps) if sigmas is None else sigmas
        scheduler = self.private_scheduler()
        mu = module.calculate_shift(
            latents.shape[1],
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.15),
        )
        timesteps, num_inference_steps = module.retrieve_timesteps(
            scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu
        )
        pipe._num_timesteps = len(timesteps)

        transformer = pipe.transformer
        guidance_scale = a["guidance_scale"]
        if transformer.config.guidance_embeds and guidance_scale is None:
            raise ValueError("guidance_scale is required for guidance-distilled model.")
        elif transformer.config.guidance_embeds:
            guidance_value = torch.full([1], guidance_scale, device=device, dtype=torch.float32)
            guidance = guidance_value.expand(latents.shape[0])
        else:
            guidance_value = guidance = None
        if pipe._attention_kwargs is None:
            pipe._attention_kwargs = {}
        attention_kwargs = pipe._attention_kwargs
        scheduler.set_begin_index(0)
        policy.set_timesteps([t.item() for t in timesteps])
        bucket = getattr(self, "text_bucket", None)
        # the prompt as encoded: what callbacks are offered and replace, as in the stock loop
        prompt_text = branch_text["prompt"]
        if bucket:
            branch_text = {k: _pad_text(e, m, bucket) for k, (e, m) in branch_text.items()}
        # a captured step's text buffers are written by later requests: never the caller's tensors
        branch_text = {k: (own_tensor(e, a), own_tensor(m, a)) for k, (e, m) in branch_text.items()}

        def run(names: tuple[str, ...], x: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
            """One transformer forward for ``names`` (one branch, or same-shape branches stacked on batch)."""
            spec = specs[names[0]]
            texts = [branch_text[specs[n].source] for n in names]
            if len(names) == 1:
                embeds, mask = texts[0]
                xs, shapes = x, img_shapes
            else:
                embeds = torch.cat([e for e, _ in texts])
                masks = [m for _, m in texts]
                mask = None if any(m is None for m in masks) else torch.cat(masks)
                xs, shapes = torch.cat([x] * len(names)), img_shapes * len(names)
            timestep = t.expand(xs.shape[0]).to(xs.dtype)
            extra = spec.perturbation.forward_kwargs() if spec.perturbation is not None else {}
            with transformer.cache_context("+".join(names)), perturbed(transformer, spec.perturbation):
                out = transformer(
                    hidden_states=xs,
                    timestep=timestep / 1000,
                    guidance=guidance if guidance is None or len(names) == 1 else guidance.repeat(len(names)),
                    encoder_hidden_states_mask=mask,
                    encoder_hidden_states=embeds,
                    img_shapes=shapes,
                    attention_kwargs=attention_kwargs,
                    return_dict=False,
                    **extra,
                )[0]
            return [out] if len(names) == 1 else list(out.chunk(len(names)))

        def batch_key(name: str):
            # branches batch together when their forwards differ only in same-shape text inputs
            spec = specs[name]
            embeds, mask = branch_text[spec.source]
            return (spec.perturbation, tuple(embeds.shape), mask is None)

        def forward(names: tuple[str, ...], x: torch.Tensor, i: int) -> list[torch.Tensor]:
            # a tensor step index (CUDA graph replays) selects on device: no host value is baked in
            t = timesteps[i] if isinstance(i, int) else timesteps.index_select(0, i)[0]
            pipe._current_timestep = t
            # read per call: batch_branches="auto" is decided by measurement after prepare()
            batch = getattr(self, "batch_branches", False) is True
            preds: dict[str, torch.Tensor] = {}
            for group in batch_groups(names, batch, batch_key):
                preds.update(zip(group, run(tuple(group), x, t)))
            return [preds[name] for name in names]

        callback = a["callback_on_step_end"]
        callback_inputs = a["callback_on_step_end_tensor_inputs"]

        def step_end(i: int, x: torch.Tensor) -> torch.Tensor:
            if callback is None:
                return x
            nonlocal prompt_text
            values = {"latents": x, "prompt_embeds": prompt_text[0]}
            outputs = callback(pipe, i, timesteps[i], {k: values[k] for k in callback_inputs})
            x = outputs.pop("latents", x)
            if "prompt_embeds" in outputs:
                prompt_text = (outputs.pop("prompt_embeds"), prompt_text[1])
                branch_text["prompt"] = _pad_text(*prompt_text, bucket) if bucket else prompt_text
            return x

        output_type, return_dict = a["output_type"], a["return_dict"]

        def finish(x: torch.Tensor):
            pipe._current_timestep = None
            if output_type == "latent":
                image = x
            else:
                x = pipe._unpack_latents(x, height, width, pipe.vae_scale_factor)
                x = x.to(pipe.vae.dtype)
                z_dim = pipe.vae.config.z_dim
                latents_mean = torch.tensor(pipe.vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(x.device, x.dtype)
                latents_std = 1.0 / torch.tensor(pipe.vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(
                    x.device, x.dtype
                )
                x = x / latents_std + latents_mean
                image = pipe.vae.decode(x, return_dict=False)[0][:, :, 0]
                image = pipe.image_processor.postprocess(image, output_type=output_type)
            pipe.maybe_free_model_hooks()
            if not return_dict:
                return (image,)
            return module.QwenImagePipelineOutput(images=image)

        def graph_inputs() -> dict[str, torch.Tensor]:
            tensors = {"timesteps": timesteps}
            for source, (embeds, mask) in branch_text.items():
                tensors[f"{source}_embeds"] = embeds
                if mask is not None:
                    tensors[f"{source}_mask"] = mask
            if guidance_value is not None:
                tensors["guidance"] = guidance_value
            return tensors

        stepper = self.make_update(scheduler, timesteps, generator=a["generator"])
        return self.denoise_job(
            latents=latents, timesteps=timesteps, policy=policy, forward=forward, update=stepper,
            finish=finish,
            # no callback: nothing runs between steps, so whole steps can be captured as CUDA graphs
            step_end=step_end if callback is not None else None,
            prediction_dtype=transformer.dtype,
            graph_inputs=graph_inputs,
        )


def _pad_text(embeds: torch.Tensor, mask: torch.Tensor | None, bucket: int):
    """Zero-pad the text to a multiple of ``bucket`` tokens with the padding masked out.

    The transformer builds its joint attention mask from ``encoder_hidden_states_mask`` and gives text tokens
    RoPE positions by index, so real tokens keep their positions and no image token attends to padding.
    """
    length = embeds.shape[1]
    target = -(-length // bucket) * bucket
    if mask is None:
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    if target == length:
        return embeds, mask
    pad = target - length
    embeds = torch.cat([embeds, embeds.new_zeros(embeds.shape[0], pad, *embeds.shape[2:])], dim=1)
    mask = torch.cat([mask, mask.new_zeros(mask.shape[0], pad)], dim=1)
    return embeds, mask
