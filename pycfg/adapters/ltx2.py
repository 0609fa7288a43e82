"""LTX2Pipeline (text to video + audio): two outputs per forward and up to four guidance branches per step.

The stock loop runs cond and uncond as one batch, then a spatio-temporal-guidance (STG) forward with the
self-attention of the named blocks bypassed and a modality-isolated forward with the audio<->video cross
attention off, converts every prediction to x0 space (``x - sigma * v``) and combines per modality::

    g = c + (w - 1)(c - u) + s(c - c_stg) + (m - 1)(c - c_mod)      then rescale_noise_cfg(g, c, r) if r > 0

with separate ``w, s, m, r`` for video and audio, before converting back to a velocity for two schedulers.

Here each branch's prediction is the tuple ``(video_x0, audio_x0)`` in fp32, from its own batch-1 forward
(``batch_branches`` stacks branches with the same perturbation instead): the runtime moves both outputs of
every branch in one collective, :class:`LTX2Guidance` applies the stock combine, and the update converts back
to velocities and steps a private scheduler per modality. Output is bit-identical across cfg_parallel_size and
matches stock within fp32 rounding (stock batches cond and uncond); with CFG off stock runs batch-1 forwards
too and the output is stock's bits.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from ..guidance import Branch, GuidancePolicy, MultiBranch, Term
from ..guidance.base import NEGATIVE, PROMPT, Prediction, outputs_of
from ..guidance.perturb import ForwardKwargs, perturbed
from ..runtime.job import Job, Update
from ..steps import StepIndex
from ._common import batch_groups, begin_call, make_step_end, prompt_batch_size, resolve_callback_inputs
from .base import Adapter, AdapterCapabilities, own_tensor
from .ltx import decode_noise

#: branch names of the default policy, in the order the stock loop runs them
COND, UNCOND, STG, MODALITY = "cond", "uncond", "stg", "modality"


class LTX2Guidance(MultiBranch):
    """LTX-2's x0-space combine with per-modality scales, operation for operation as ``LTX2Pipeline``.

    Differs from the generic :class:`MultiBranch` where the stock pipeline does: the rescale runs whenever its
    factor is positive, even on a step with the cond branch alone (``0.7 * g + 0.3 * g`` is not ``g`` in floating
    point), it calls the pipeline module's own ``rescale_noise_cfg``, and, as stock, the rescale factor is not
    bounded to [0, 1].
    """

    def __init__(self, terms: list[Term], specs: dict[str, Branch], rescale: tuple[float, float],
                 rescale_fn: Callable) -> None:
        super().__init__([specs[COND]] + [specs[t.branch] for t in terms], terms, base=COND)
        self.rescale = tuple(float(r) for r in rescale)
        self.rescale_fn = rescale_fn
        self.num_outputs = 2

    def active(self, i: int) -> tuple[str, ...]:
        # the stock pipeline decides its forwards once per call, not per step
        return self.branches

    def combine(self, preds: dict[str, Prediction], i: int) -> Prediction:
        base = outputs_of(preds[self.base])
        outs = []
        for k, c in enumerate(base):
            g = c
            for term in self.terms:
                if term.branch in preds:
                    g = g + self._scale(term, k) * (c - outputs_of(preds[term.branch])[k])
            factor = self.rescale_factor(k)
            outs.append(self.rescale_fn(g, c, guidance_rescale=factor) if factor > 0 else g)
        return tuple(outs)

    def describe(self) -> str:
        terms = ", ".join(f"{t.branch}:{t.scale}" for t in self.terms)
        return f"LTX2Guidance(terms=[{terms}], rescale={self.rescale})"


def ltx2_policy(guidance_scale: float, stg_scale: float, modality_scale: float, guidance_rescale: float,
                audio_guidance_scale: float, audio_stg_scale: float, audio_modality_scale: float,
                audio_guidance_rescale: float, spatio_temporal_guidance_blocks, rescale_fn: Callable) -> LTX2Guidance:
    """The stock call's guidance as a policy; scales are (video, audio) and already resolved against defaults.

    A branch runs when the stock pipeline would run its forward: CFG when either modality's scale exceeds 1, STG
    when either STG scale is positive, modality isolation when either modality scale exceeds 1. The other
    modality then gets its (possibly neutral) delta added exactly as stock adds it.
    """
    specs = {COND: Branch(COND, PROMPT)}
    terms = []
    if guidance_scale > 1.0 or audio_guidance_scale > 1.0:
        specs[UNCOND] = Branch(UNCOND, NEGATIVE)
        terms.append(Term(UNCOND, (guidance_scale - 1, audio_guidance_scale - 1)))
    if stg_scale > 0.0 or audio_stg_scale > 0.0:
        blocks = ForwardKwargs.of(spatio_temporal_guidance_blocks=list(spatio_temporal_guidance_blocks))
        specs[STG] = Branch(STG, PROMPT, blocks)
        terms.append(Term(STG, (stg_scale, audio_stg_scale)))
    if modality_scale > 1.0 or audio_modality_scale > 1.0:
        specs[MODALITY] = Branch(MODALITY, PROMPT, ForwardKwargs.of(isolate_modalities=True))
        terms.append(Term(MODALITY, (modality_scale - 1, audio_modality_scale - 1)))
    return LTX2Guidance(terms, specs, (guidance_rescale, audio_guidance_rescale), rescale_fn)


def _resolve_audio(a: dict[str, Any]) -> None:
    # the stock call's own defaulting: an audio value of None (or 0) falls back to the video value
    a["audio_guidance_scale"] = a["audio_guidance_scale"] or a["guidance_scale"]
    a["audio_stg_scale"] = a["audio_stg_scale"] or a["stg_scale"]
    a["audio_modality_scale"] = a["audio_modality_scale"] or a["modality_scale"]
    a["audio_guidance_rescale"] = a["audio_guidance_rescale"] or a["guidance_rescale"]


class TwoModalityUpdate:
    """The stock update of both modalities: the combined x0 back to a velocity per modality, then each modality's
    own private scheduler (or fused update)."""

    fused = False

    def __init__(self, pipe, video_step: Update, audio_step: Update, video_scheduler, audio_scheduler) -> None:
        self.pipe = pipe
        self.video_step, self.audio_step = video_step, audio_step
        self.video_scheduler, self.audio_scheduler = video_scheduler, audio_scheduler

    def __call__(self, guided, step: StepIndex, x):
        video, audio = x
        g_video, g_audio = guided
        v_video = self.pipe.convert_x0_to_velocity(video, g_video, step.i, self.video_scheduler)
        v_audio = self.pipe.convert_x0_to_velocity(audio, g_audio, step.i, self.audio_scheduler)
        return self.video_step(v_video, step, video), self.audio_step(v_audio, step, audio)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        state = {f"video.{k}": v for k, v in self.video_step.state_tensors().items()}
        state.update({f"audio.{k}": v for k, v in self.audio_step.state_tensors().items()})
        return state


class LTX2Adapter(Adapter):
    pipeline_classes = ("LTX2Pipeline",)
    #: the x0 conversion reads the step's sigma on the host: steps are never captured
    capabilities = AdapterCapabilities(batchable=True, outputs=2)

    def complete_args(self, a: dict[str, Any]) -> None:
        resolve_callback_inputs(a)
        _resolve_audio(a)

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
            spatio_temporal_guidance_blocks=a["spatio_temporal_guidance_blocks"],
            stg_scale=a["stg_scale"],
            audio_stg_scale=a["audio_stg_scale"],
            system_prompt=a["system_prompt"],
            enable_prompt_enhancement=a["enable_prompt_enhancement"],
            num_frames=a["num_frames"],
            min_seconds=a["min_seconds"],
            max_seconds=a["max_seconds"],
        )

    def default_policy(self, a: dict[str, Any]) -> LTX2Guidance:
        return ltx2_policy(
            a["guidance_scale"], a["stg_scale"], a["modality_scale"], a["guidance_rescale"],
            a["audio_guidance_scale"], a["audio_stg_scale"], a["audio_modality_scale"], a["audio_guidance_rescale"],
            a["spatio_temporal_guidance_blocks"] or (), self.module.rescale_noise_cfg,
        )

    def prepare(self, a: dict[str, Any], policy: GuidancePolicy | None) -> Job:
        pipe, module = self.pipe, self.module
        policy = self.request_policy(a, policy)
        specs = {name: policy.branch(name) for name in policy.branches}
        needs_negative = self.needs_negative(policy)
        begin_call(pipe, **{name: a[name] for name in (
            "guidance_scale", "stg_scale", "modality_scale", "guidance_rescale", "audio_guidance_scale",
            "audio_stg_scale", "audio_modality_scale", "audio_guidance_rescale", "attention_kwargs")})

        prompt = a["prompt"]
        batch_size = prompt_batch_size(prompt, a["prompt_embeds"])
        device = pipe._execution_device
        generator = a["generator"]
        frame_rate = a["frame_rate"]
        conditioning_frame_rate = module.get_conditioning_frame_rate(frame_rate, a["motion_speed"])
        num_frames = a["num_frames"]
        auto_duration = num_frames is None and getattr(pipe, "duration_head", None) is not None
        if num_frames is None and not auto_duration:
            num_frames = 121
        if a["enable_prompt_enhancement"] and prompt is not None:
            system_prompt = a["system_prompt"]
            if system_prompt is None:
                system_prompt = module.LTX2_5_T2V_DEFAULT_SYSTEM_PROMPT
            prompt = pipe.enhance_prompt(
                prompt=prompt,
                system_prompt=system_prompt,
                max_new_tokens=a["prompt_max_new_tokens"],
                seed=a["prompt_enhancement_seed"],
                generator=generator,
                generation_kwargs=a["prompt_enhancement_kwargs"],
                device=device,
            )

        n_per = a["num_videos_per_prompt"]
        embeds, mask, neg_embeds, neg_mask = pipe.encode_prompt(
            prompt=prompt,
            negative_prompt=a["negative_prompt"],
            do_classifier_free_guidance=needs_negative,
            num_videos_per_prompt=n_per,
            prompt_embeds=a["prompt_embeds"],
            negative_prompt_embeds=a["negative_prompt_embeds"],
            prompt_attention_mask=a["prompt_attention_mask"],
            negative_prompt_attention_mask=a["negative_prompt_attention_mask"],
            max_sequence_length=a["max_sequence_length"],
            device=device,
        )
        # the connectors run once, on the batch the stock loop feeds them (negative first), and are split after
        padding_side = "left"
        if getattr(pipe, "tokenizer", None) is not None:
            padding_side = getattr(pipe.tokenizer, "padding_side", "left")
        text_embeds = torch.cat([neg_embeds, embeds]) if needs_negative else embeds
        text_mask = torch.cat([neg_mask, mask]) if needs_negative else mask
        video_text, audio_text, text_mask = pipe.connectors(text_embeds, text_mask, padding_side=padding_side)
        if needs_negative:
            v_neg, v_pos = video_text.chunk(2)
            a_neg, a_pos = audio_text.chunk(2)
            m_neg, m_pos = text_mask.chunk(2)
            branch_text = {PROMPT: (v_pos, a_pos, m_pos), NEGATIVE: (v_neg, a_neg, m_neg)}
        else:
            branch_text = {PROMPT: (video_text, audio_text, text_mask)}
        # stock keeps the batched embeds for its callback; a callback's replacement only changes their dtype
        callback_embeds = {"prompt_embeds": text_embeds, "negative_prompt_embeds": neg_embeds}

        if auto_duration:
            v_tokens, a_tokens, _ = branch_text[PROMPT]
            num_frames = pipe.duration_head.predict_num_frames(
                v_tokens[:1],
                a_tokens[:1],
                frame_rate=frame_rate,
                temporal_compression_ratio=pipe.vae_temporal_compression_ratio,
                min_seconds=a["min_seconds"],
                max_seconds=a["max_seconds"],
            )

        latent_num_frames = (num_frames - 1) // pipe.vae_temporal_compression_ratio + 1
        latent_height = a["height"] // pipe.vae_spatial_compression_ratio
        latent_width = a["width"] // pipe.vae_spatial_compression_ratio
        user_latents, user_audio = a["latents"], a["audio_latents"]
        if user_latents is not None:
            if user_latents.ndim == 5:
                _, _, latent_num_frames, latent_height, latent_width = user_latents.shape
            elif user_latents.ndim != 3:
                raise ValueError(
                    f"latents must be packed (3D) or [batch, channels, frames, height, width] (5D), got shape "
                    f"{tuple(user_latents.shape)}"
                )
        transformer = pipe.transformer
        latents = pipe.prepare_latents(
            batch_size * n_per, transformer.config.in_channels, a["height"], a["width"], num_frames,
            a["noise_scale"], torch.float32, device, generator, user_latents,
        )
        latents = own_tensor(latents, user_latents)

        duration_s = num_frames / frame_rate
        audio_per_second = pipe.audio_sampling_rate / pipe.audio_hop_length / float(
            pipe.audio_vae_temporal_compression_ratio
        )
        audio_num_frames = round(duration_s * audio_per_second)
        if user_audio is not None:
            if user_audio.ndim == 4:
                _, _, audio_num_frames, _ = user_audio.shape
            elif user_audio.ndim != 3:
                raise ValueError(
                    f"audio_latents must be packed (3D) or [batch, channels, length, mel_bins] (4D), got shape "
                    f"{tuple(user_audio.shape)}"
                )
        has_audio_vae = getattr(pipe, "audio_vae", None) is not None
        num_mel_bins = pipe.audio_vae.config.mel_bins if has_audio_vae else 64
        latent_mel_bins = num_mel_bins // pipe.audio_vae_mel_compression_ratio
        audio_channels = pipe.audio_vae.config.latent_channels if has_audio_vae else 8
        audio_latents = pipe.prepare_audio_latents(
            batch_size * n_per,
            num_channels_latents=audio_channels,
            audio_latent_length=audio_num_frames,
            num_mel_bins=num_mel_bins,
            noise_scale=a["noise_scale"],
            dtype=torch.float32,
            device=device,
            generator=generator,
            latents=user_audio,
        )
        audio_latents = own_tensor(audio_latents, user_audio)

        n_steps = a["num_inference_steps"]
        sigmas = a["sigmas"]
        sigmas = np.linspace(1.0, 1 / n_steps, n_steps) if sigmas is None else sigmas
        video_scheduler = self.private_scheduler()
        audio_scheduler = self.private_scheduler()
        config = video_scheduler.config
        mu = module.calculate_shift(
            latents.shape[1],
            config.get("base_image_seq_len", 1024),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.95),
            config.get("max_shift", 2.05),
        )
        module.retrieve_timesteps(audio_scheduler, n_steps, device, a["timesteps"], sigmas=sigmas, mu=mu)
        timesteps, n_steps = module.retrieve_timesteps(video_scheduler, n_steps, device, a["timesteps"],
                                                       sigmas=sigmas, mu=mu)
        pipe._num_timesteps = len(timesteps)
        video_scheduler.set_begin_index(0)
        audio_scheduler.set_begin_index(0)
        policy.set_timesteps([t.item() for t in timesteps])

        video_coords = transformer.rope.prepare_video_coords(
            latents.shape[0], latent_num_frames, latent_height, latent_width, latents.device,
            fps=conditioning_frame_rate,
        )
        audio_coords = transformer.audio_rope.prepare_audio_coords(
            audio_latents.shape[0], audio_num_frames, audio_latents.device
        )
        attention_kwargs = a["attention_kwargs"]
        use_cross_timestep = a["use_cross_timestep"]

        def run(group: list[str], video: torch.Tensor, audio: torch.Tensor, t: torch.Tensor):
            """One transformer forward for ``group``: one branch, or same-perturbation branches on the batch."""
            n = len(group)
            spec = specs[group[0]]
            texts = [branch_text[specs[name].source] for name in group]
            v_text, a_text, text_mask_b = (torch.cat(parts) if n > 1 else parts[0] for parts in zip(*texts))
            model_dtype = callback_embeds["prompt_embeds"].dtype
            repeat = (lambda z: torch.cat([z] * n)) if n > 1 else (lambda z: z)
            timestep = t.expand(video.shape[0] * n)
            extra = dict(isolate_modalities=False, spatio_temporal_guidance_blocks=None)
            if spec.perturbation is not None:
                extra.update(spec.perturbation.forward_kwargs())
            with transformer.cache_context("+".join(group)), perturbed(transformer, spec.perturbation):
                v_video, v_audio = transformer(
                    hidden_states=repeat(video).to(model_dtype),
                    audio_hidden_states=repeat(audio).to(model_dtype),
                    encoder_hidden_states=v_text,
                    audio_encoder_hidden_states=a_text,
                    timestep=timestep,
                    sigma=timestep,
                    encoder_attention_mask=text_mask_b,
                    audio_encoder_attention_mask=text_mask_b,
                    num_frames=latent_num_frames,
                    height=latent_height,
                    width=latent_width,
                    fps=conditioning_frame_rate,
                    audio_num_frames=audio_num_frames,
                    video_coords=repeat(video_coords),
                    audio_coords=repeat(audio_coords),
                    perturbation_mask=None,
                    use_cross_timestep=use_cross_timestep,
                    attention_kwargs=attention_kwargs,
                    return_dict=False,
                    **extra,
                )
            return zip(v_video.float().chunk(n), v_audio.float().chunk(n))

        def forward(names: tuple[str, ...], x, step: StepIndex, batched: bool) -> list[tuple[torch.Tensor, ...]]:
            video, audio = x
            i = step.i
            t = step.select(timesteps)
            pipe._current_timestep = t
            velocities = {}
            for group in batch_groups(names, batched, batch_key):
                velocities.update(zip(group, run(group, video, audio, t)))
            # the stock combine works on x0 = x - sigma * v, per modality with its own scheduler's sigma
            return [(pipe.convert_velocity_to_x0(video, velocities[name][0], i, video_scheduler),
                     pipe.convert_velocity_to_x0(audio, velocities[name][1], i, audio_scheduler)) for name in names]

        def batch_key(name: str):
            spec = specs[name]
            return (spec.perturbation, tuple(branch_text[spec.source][0].shape))

        update = TwoModalityUpdate(pipe, self.make_update(video_scheduler, timesteps),
                                   self.make_update(audio_scheduler, timesteps), video_scheduler, audio_scheduler)

        def offered(video):
            return {"latents": video, **callback_embeds}

        def apply(outputs):
            if "prompt_embeds" in outputs:
                callback_embeds["prompt_embeds"] = outputs.pop("prompt_embeds")

        video_step_end = make_step_end(pipe, a["callback_on_step_end"], a["callback_on_step_end_tensor_inputs"],
                                       timesteps, offered, apply)

        def step_end(i: int, x):
            # the stock callback may replace the video latents only; audio latents are not offered
            return video_step_end(i, x[0]), x[1]

        step_end = step_end if video_step_end is not None else None

        output_type, return_dict = a["output_type"], a["return_dict"]

        def finish(x):
            pipe._current_timestep = None
            video_latents, audio_out = x
            vae = pipe.vae
            video_latents = pipe._unpack_latents(video_latents, latent_num_frames, latent_height, latent_width,
                                                 pipe.transformer_spatial_patch_size,
                                                 pipe.transformer_temporal_patch_size)
            audio_out = pipe._denormalize_audio_latents(audio_out, pipe.audio_vae.latents_mean,
                                                        pipe.audio_vae.latents_std)
            audio_out = pipe._unpack_audio_latents(audio_out, audio_num_frames, num_mel_bins=latent_mel_bins)
            if output_type == "latent":
                video = pipe._denormalize_latents(video_latents, vae.latents_mean, vae.latents_std,
                                                  vae.config.scaling_factor)
                audio = audio_out
            else:
                video_latents = video_latents.to(callback_embeds["prompt_embeds"].dtype)
                video_latents, timestep = decode_noise(module, vae, video_latents, a, batch_size, device)
                video_latents = pipe._denormalize_latents(video_latents, vae.latents_mean, vae.latents_std,
                                                          vae.config.scaling_factor)
                video = vae.decode(video_latents.to(vae.dtype), timestep, return_dict=False)[0]
                video = pipe.video_processor.postprocess_video(video, output_type=output_type)
                mel = pipe.audio_vae.decode(audio_out.to(pipe.audio_vae.dtype), return_dict=False)[0]
                audio = pipe.vocoder(mel)
            pipe.maybe_free_model_hooks()
            if not return_dict:
                return (video, audio)
            return module.LTX2PipelineOutput(frames=video, audio=audio)

        return Job(
            latents=(latents, audio_latents),
            num_steps=len(timesteps),
            policy=policy,
            forward=forward,
            update=update,
            prediction_spec=[(tuple(latents.shape), torch.float32), (tuple(audio_latents.shape), torch.float32)],
            device=latents.device,
            finish=finish,
            step_end=step_end,
            interrupted=lambda: pipe._interrupt,
            progress=self.progress,
        )
