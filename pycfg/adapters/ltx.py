"""LTXPipeline (text to video): batched CFG split into branches, with guidance rescale and the fp32 upcast.

Stock runs ``cat([neg, pos])`` as one batch with ``cat([neg_mask, pos_mask])``; pycfg runs each branch with its
own embeds and attention mask, so it matches stock within fp32 rounding and is bit-identical across
cfg_parallel_size. As stock, every prediction is upcast to fp32 before the combine and the scheduler step, and
``guidance_rescale > 0`` applies the pipeline module's own ``rescale_noise_cfg`` against the cond prediction.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from ..guidance import GuidancePolicy, NoGuidance
from ..guidance.base import NEGATIVE, PROMPT, Prediction, per_sample_std, weighted_sum_fp32
from ..runtime.job import Job
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


class LTXGuidance(GuidancePolicy):
    """``u + w (c - u)``, then, when ``rescale > 0``, the pipeline's ``rescale_noise_cfg(p, c, rescale)``.

    Unlike the generic CFG policy this calls the pipeline module's own rescale function (so a diffusers change
    to it is followed) and, as stock, puts no bound on ``rescale``.
    """

    branches = ("cond", "uncond")
    linear = True
    constant_weights = True

    def __init__(self, scale: float, rescale: float, rescale_fn: Callable) -> None:
        self.scale = scale
        self.rescale = rescale
        self.rescale_fn = rescale_fn

    def combine(self, preds: dict[str, Prediction], i: int) -> Prediction:
        if len(preds) == 1:
            return preds["cond"]
        c, u = preds["cond"], preds["uncond"]
        p = u + self.scale * (c - u)
        if self.rescale > 0:
            p = self.rescale_fn(p, c, guidance_rescale=self.rescale)
        return p

    def reduce_terms(self, preds, i, like):
        terms = [weighted_sum_fp32(preds, {"cond": self.scale, "uncond": 1.0 - self.scale}, like)]
        if self.rescale > 0:
            cond = preds.get("cond")
            shape = (like.shape[0],) + (1,) * (like.ndim - 1)
            terms.append(per_sample_std(cond.float()) if cond is not None
                         else torch.zeros(shape, dtype=torch.float32, device=like.device))
        return terms

    def reduce_finish(self, terms, i, like):
        p = terms[0]
        if self.rescale > 0:
            rescaled = p * (terms[1] / per_sample_std(p))
            p = self.rescale * rescaled + (1 - self.rescale) * p
        return p.to(like.dtype)

    def describe(self) -> str:
        return f"LTXGuidance(scale={self.scale}, rescale={self.rescale})"


def decode_noise(module, vae, x: torch.Tensor, a: dict[str, Any], batch_size: int, device):
    """LTX's decode-time noise, as stock: ``(latents, decode timestep)``; latents unchanged and no timestep for a
    VAE without timestep conditioning. The call's generator, in the same state on every rank, draws the noise."""
    if not vae.config.timestep_conditioning:
        return x, None
    noise = module.randn_tensor(x.shape, generator=a["generator"], device=device, dtype=x.dtype)
    dt, dns = a["decode_timestep"], a["decode_noise_scale"]
    if not isinstance(dt, list):
        dt = [dt] * batch_size
    if dns is None:
        dns = dt
    elif not isinstance(dns, list):
        dns = [dns] * batch_size
    timestep = torch.tensor(dt, device=device, dtype=x.dtype)
    dns = torch.tensor(dns, device=device, dtype=x.dtype)[:, None, None, None, None]
    return (1 - dns) * x + dns * noise, timestep


class LTXAdapter(Adapter):
    pipeline_classes = ("LTXPipeline",)

    def complete_args(self, a: dict[str, Any]) -> None:
        resolve_callback_inputs(a)

    def check_inputs(self, a: dict[str, Any]) -> None:
        self.pipe.check_inputs(
            prompt=a["prompt"],
            height=a["height"],
            width=a["width"],
            callback_on_step_end_tensor_inputs=a["callback_on_step_end_tensor_inputs"],
            prompt_embeds=a["prompt_embeds"],
            negative_prompt_embeds=a["negative_prompt_embeds"],
            prompt_attention_mask=a["prompt_attention_mask"],
            negative_prompt_attention_mask=a["negative_prompt_attention_mask"],
        )

    def default_policy(self, a: dict[str, Any]) -> GuidancePolicy:
        if a["guidance_scale"] > 1.0:
            return LTXGuidance(a["guidance_scale"], a["guidance_rescale"], self.module.rescale_noise_cfg)
        return NoGuidance()

    def prepare(self, a: dict[str, Any], policy: GuidancePolicy | None) -> Job:
        pipe, module = self.pipe, self.module
        policy = self.request_policy(a, policy)
        needs_negative = self.needs_negative(policy)
        begin_call(pipe, guidance_scale=a["guidance_scale"], guidance_rescale=a["guidance_rescale"],
                   attention_kwargs=a["attention_kwargs"])
        batch_size = prompt_batch_size(a["prompt"], a["prompt_embeds"])
        device = pipe._execution_device

        embeds, mask, neg_embeds, neg_mask = pipe.encode_prompt(
            prompt=a["prompt"],
            negative_prompt=a["negative_prompt"],
            do_classifier_free_guidance=needs_negative,
            num_videos_per_prompt=a["num_videos_per_prompt"],
            prompt_embeds=a["prompt_embeds"],
            negative_prompt_embeds=a["negative_prompt_embeds"],
            prompt_attention_mask=a["prompt_attention_mask"],
            negative_prompt_attention_mask=a["negative_prompt_attention_mask"],
            max_sequence_length=a["max_sequence_length"],
            device=device,
        )
        # text inputs by source: every branch reading the prompt sees a callback's prompt_embeds update
        text = {PROMPT: [embeds, mask]}
        if needs_negative:
            text[NEGATIVE] = [neg_embeds, neg_mask]

        height, width, num_frames = a["height"], a["width"], a["num_frames"]
        transformer = pipe.transformer
        latents = pipe.prepare_latents(
            batch_size * a["num_videos_per_prompt"], transformer.config.in_channels, height, width, num_frames,
            torch.float32, device, a["generator"], a["latents"],
        )
        latents = own_tensor(latents, a["latents"])

        latent_num_frames = (num_frames - 1) // pipe.vae_temporal_compression_ratio + 1
        latent_height = height // pipe.vae_spatial_compression_ratio
        latent_width = width // pipe.vae_spatial_compression_ratio
        n_steps = a["num_inference_steps"]
        sigmas = np.linspace(1.0, 1 / n_steps, n_steps)
        scheduler = self.private_scheduler()
        mu = module.calculate_shift(
            latent_num_frames * latent_height * latent_width,
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.15),
        )
        timesteps, n_steps = module.retrieve_timesteps(scheduler, n_steps, device, a["timesteps"], sigmas=sigmas,
                                                       mu=mu)
        pipe._num_timesteps = len(timesteps)
        rope_interpolation_scale = (
            pipe.vae_temporal_compression_ratio / a["frame_rate"],
            pipe.vae_spatial_compression_ratio,
            pipe.vae_spatial_compression_ratio,
        )
        attention_kwargs = a["attention_kwargs"]

        def run(name: str, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            spec = policy.branch(name)
            prompt_embeds, prompt_mask = text[spec.source]
            with branch_forward(transformer, name, spec) as extra:
                pred = transformer(
                    hidden_states=x.to(prompt_embeds.dtype),
                    encoder_hidden_states=prompt_embeds,
                    timestep=t.expand(x.shape[0]),
                    encoder_attention_mask=prompt_mask,
                    num_frames=latent_num_frames,
                    height=latent_height,
                    width=latent_width,
                    rope_interpolation_scale=rope_interpolation_scale,
                    attention_kwargs=attention_kwargs,
                    return_dict=False,
                    **extra,
                )[0]
            return pred.float()

        def forward(names: tuple[str, ...], x: torch.Tensor, step: StepIndex, batched: bool) -> list[torch.Tensor]:
            return run_branches(pipe, names, x, step.select(timesteps), run)

        offered, apply = batched_text_callbacks(text, {"prompt_embeds": 0}, cfg=NEGATIVE in text)
        step_end = make_step_end(pipe, a["callback_on_step_end"], a["callback_on_step_end_tensor_inputs"], timesteps,
                                 offered, apply)

        def decode(x: torch.Tensor, output_type: str):
            vae = pipe.vae
            x = pipe._unpack_latents(x, latent_num_frames, latent_height, latent_width,
                                     pipe.transformer_spatial_patch_size, pipe.transformer_temporal_patch_size)
            x = pipe._denormalize_latents(x, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
            x = x.to(text[PROMPT][0].dtype)
            x, timestep = decode_noise(module, vae, x, a, batch_size, device)
            x = x.to(vae.dtype)
            video = vae.decode(x, timestep, return_dict=False)[0]
            return pipe.video_processor.postprocess_video(video, output_type=output_type)

        policy.set_timesteps([t.item() for t in timesteps])
        stepper = self.make_update(scheduler, timesteps, generator=a["generator"])
        return self.denoise_job(
            latents=latents, timesteps=timesteps, policy=policy, forward=forward, update=stepper,
            finish=make_finish(pipe, a, decode, module.LTXPipelineOutput, "frames"),
            step_end=step_end,
            prediction_dtype=torch.float32,
        )
