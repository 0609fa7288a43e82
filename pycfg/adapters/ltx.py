"""LTXPipeline (text to video): batched CFG split into branches, with guidance rescale and the fp32 upcast.

Stock runs ``cat([neg, pos])`` as one batch with ``cat([neg_mask, pos_mask])``; pycfg runs each branch with its
own embeds and attention mask, so it matches stock within fp32 rounding and is bit-identical across
cfg_parallel_size. As stock, every prediction is upcast to fp32 before the combine and the scheduler step, and
``guidance_rescale > 0`` applies the pipeline module's own ``rescale_noise_cfg`` against the cond prediction.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import numpy as np
import torch

from ..guidance import GuidancePolicy, NoGuidance
from ..guidance.base import NEGATIVE, PROMPT, Prediction, weighted_sum_fp32
from ..runtime.job import Job
from ._common import (
    branch_forward,
    branch_specs,
    callback_tensor_inputs,
    check_policy_on,
    make_step_end,
    prompt_batch_size,
    reads_negative,
)
from .base import Adapter, check_output_type, own_tensor


def _per_sample_std(x: torch.Tensor) -> torch.Tensor:
    return x.std(dim=list(range(1, x.ndim)), keepdim=True)


class LTXGuidance(GuidancePolicy):
    """``u + w (c - u)``, then, when ``rescale > 0``, the pipeline's ``rescale_noise_cfg(p, c, rescale)``.

    Unlike the generic CFG policy this calls the pipeline module's own rescale function (so a diffusers change
    to it is followed) and, as stock, puts no bound on ``rescale``.
    """

    branches = ("cond", "uncond")
    linear = True

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
            terms.append(_per_sample_std(cond.float()) if cond is not None
                         else torch.zeros(shape, dtype=torch.float32, device=like.device))
        return terms

    def reduce_finish(self, terms, i, like):
        p = terms[0]
        if self.rescale > 0:
            rescaled = p * (terms[1] / _per_sample_std(p))
            p = self.rescale * rescaled + (1 - self.rescale) * p
        return p.to(like.dtype)

    def describe(self) -> str:
        return f"LTXGuidance(scale={self.scale}, rescale={self.rescale})"


class LTXAdapter(Adapter):
    pipeline_classes = ("LTXPipeline",)

    def check(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        pipe = self.pipe
        a = self.bind(kwargs)
        a["callback_on_step_end_tensor_inputs"] = callback_tensor_inputs(
            a["callback_on_step_end"], a["callback_on_step_end_tensor_inputs"]
        )
        pipe.check_inputs(
            prompt=a["prompt"],
            height=a["height"],
            width=a["width"],
            callback_on_step_end_tensor_inputs=a["callback_on_step_end_tensor_inputs"],
            prompt_embeds=a["prompt_embeds"],
            negative_prompt_embeds=a["negative_prompt_embeds"],
            prompt_attention_mask=a["prompt_attention_mask"],
            negative_prompt_attention_mask=a["negative_prompt_attention_mask"],
        )
        check_output_type(a["output_type"])
        return a

    def check_policy(self, policy: GuidancePolicy) -> None:
        check_policy_on(policy, self.pipe.transformer)

    def prepare(self, a: dict[str, Any], policy: GuidancePolicy | None) -> Job:
        pipe, module = self.pipe, self.module
        guidance_scale, guidance_rescale = a["guidance_scale"], a["guidance_rescale"]
        if policy is not None:
            policy = copy.deepcopy(policy)
        elif guidance_scale > 1.0:
            policy = LTXGuidance(guidance_scale, guidance_rescale, module.rescale_noise_cfg)
        else:
            policy = NoGuidance()
        self.check_policy(policy)
        specs = branch_specs(policy)
        needs_negative = reads_negative(specs)

        pipe._guidance_scale = guidance_scale
        pipe._guidance_rescale = guidance_rescale
        pipe._attention_kwargs = a["attention_kwargs"]
        pipe._interrupt = False
        pipe._current_timestep = None
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

        def forward(names: tuple[str, ...], x: torch.Tensor, i: int) -> list[torch.Tensor]:
            t = timesteps[i]
            pipe._current_timestep = t
            timestep = t.expand(x.shape[0])
            preds = []
            for name in names:
                spec = specs[name]
                prompt_embeds, prompt_mask = text[spec.source]
                with branch_forward(transformer, name, spec) as extra:
                    pred = transformer(
                        hidden_states=x.to(prompt_embeds.dtype),
                        encoder_hidden_states=prompt_embeds,
                        timestep=timestep,
                        encoder_attention_mask=prompt_mask,
                        num_frames=latent_num_frames,
                        height=latent_height,
                        width=latent_width,
                        rope_interpolation_scale=rope_interpolation_scale,
                        attention_kwargs=attention_kwargs,
                        return_dict=False,
                        **extra,
                    )[0]
                preds.append(pred.float())
            return preds

        cfg_request = NEGATIVE in text

        def offered(x):
            # the stock loop's locals: with CFG, prompt embeds are the batched cat([neg, pos])
            embeds = text[PROMPT][0]
            if cfg_request:
                embeds = torch.cat([text[NEGATIVE][0], embeds], dim=0)
            return {"latents": x, "prompt_embeds": embeds}

        def apply(outputs):
            if "prompt_embeds" in outputs:
                value = outputs.pop("prompt_embeds")
                if cfg_request:
                    text[NEGATIVE][0], text[PROMPT][0] = value.chunk(2)
                else:
                    text[PROMPT][0] = value

        step_end = make_step_end(pipe, a["callback_on_step_end"], a["callback_on_step_end_tensor_inputs"], timesteps,
                                 offered, apply)
        output_type, return_dict = a["output_type"], a["return_dict"]
        decode_timestep, decode_noise_scale = a["decode_timestep"], a["decode_noise_scale"]
        generator = a["generator"]

        def finish(x: torch.Tensor):
            if output_type == "latent":
                video = x
            else:
                vae = pipe.vae
                x = pipe._unpack_latents(x, latent_num_frames, latent_height, latent_width,
                                         pipe.transformer_spatial_patch_size, pipe.transformer_temporal_patch_size)
                x = pipe._denormalize_latents(x, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
                x = x.to(text[PROMPT][0].dtype)
                if not vae.config.timestep_conditioning:
                    timestep = None
                else:
                    # the same generator, in the same state on every rank, draws the decode noise as stock does
                    noise = module.randn_tensor(x.shape, generator=generator, device=device, dtype=x.dtype)
                    dt, dns = decode_timestep, decode_noise_scale
                    if not isinstance(dt, list):
                        dt = [dt] * batch_size
                    if dns is None:
                        dns = dt
                    elif not isinstance(dns, list):
                        dns = [dns] * batch_size
                    timestep = torch.tensor(dt, device=device, dtype=x.dtype)
                    dns = torch.tensor(dns, device=device, dtype=x.dtype)[:, None, None, None, None]
                    x = (1 - dns) * x + dns * noise
                x = x.to(vae.dtype)
                video = vae.decode(x, timestep, return_dict=False)[0]
                video = pipe.video_processor.postprocess_video(video, output_type=output_type)
            pipe.maybe_free_model_hooks()
            if not return_dict:
                return (video,)
            return module.LTXPipelineOutput(frames=video)

        policy.set_timesteps([t.item() for t in timesteps])
        stepper = self.make_update(scheduler, timesteps, generator=a["generator"])
        return self.denoise_job(
            latents=latents, timesteps=timesteps, policy=policy, forward=forward, update=stepper,
            finish=finish,
            step_end=step_end,
            prediction_dtype=torch.float32,
        )
