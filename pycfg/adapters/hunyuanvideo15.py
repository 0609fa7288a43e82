"""HunyuanVideo-1.5 (text to video, image to video): guidance through the pipeline's own guider component.

Stock hands each step to ``pipe.guider`` (a diffusers ``ClassifierFreeGuidance``): the guider splits the inputs
into a ``cond`` and (inside its step window, away from its neutral scale) an ``uncond`` batch, the loop runs one
forward per batch, and the guider combines them. pycfg reads the guider's configuration once per request and runs
its batches as pycfg branches: :func:`guider_policy` gives the same branches at every step and the guider's own
combine arithmetic (``u + s (c - u)``, or ``c + s (c - u)`` with ``use_original_formulation``, then the std
rescale). The user's guider object is never stepped.

One difference, where stock fails: stock encodes the negative prompt only if its guider, in the state its last
step left it in, still counts two conditions; after a run that ended outside a ``stop < 1`` window it skips the
negative and then feeds ``None`` to the uncond forward. Here the negative is encoded whenever a branch reads it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..guidance import CFG, GuidancePolicy, NoGuidance
from ..guidance.base import NEGATIVE, PROMPT, Prediction
from ..runtime.job import Job
from ..steps import StepIndex
from ._common import begin_call, branch_forward, make_finish, prompt_batch_size, run_branches
from .base import Adapter, own_tensor

TEXT_INPUTS = ("prompt_embeds", "prompt_embeds_mask", "prompt_embeds_2", "prompt_embeds_mask_2")


class GuiderCFG(CFG):
    """:class:`~pycfg.guidance.CFG` with one difference of diffusers' ``ClassifierFreeGuidance``: its std rescale
    also runs on steps where ``cond`` runs alone (outside the window, or with the guider disabled), where it
    rounds the cond prediction against itself."""

    def __init__(self, scale: float, rescale: float, start: float = 0.0, stop: float = 1.0,
                 original_formulation: bool = False, enabled: bool = True) -> None:
        super().__init__(scale, rescale=rescale, start=start, stop=stop, original_formulation=original_formulation)
        self.enabled = bool(enabled)
        self.linear = False

    def active(self, i: int) -> tuple[str, ...]:
        return super().active(i) if self.enabled else ("cond",)

    def combine(self, preds: dict[str, Prediction], i: int) -> Prediction:
        if len(preds) == 1:
            return self.post_exact(preds["cond"], preds["cond"])
        return super().combine(preds, i)

    def describe(self) -> str:
        return f"GuiderCFG(scale={self.scale}{self._extras()}{'' if self.enabled else ', disabled'})"


def guider_policy(guider) -> GuidancePolicy:
    """The pycfg policy that runs a diffusers ``ClassifierFreeGuidance`` guider's branches and combine."""
    config = guider.config
    kwargs = dict(start=config.start, stop=config.stop, original_formulation=config.use_original_formulation)
    if config.guidance_rescale > 0.0:
        return GuiderCFG(config.guidance_scale, config.guidance_rescale, enabled=config.enabled, **kwargs)
    if not config.enabled:
        return NoGuidance()
    return CFG(config.guidance_scale, **kwargs)


class HunyuanVideo15Adapter(Adapter):
    """No step graphs: the HunyuanVideo-1.5 transformer is untested under capture here; steps run eagerly."""

    pipeline_classes = ("HunyuanVideo15Pipeline",)

    # -- what the variants override ---------------------------------------------------------------------------

    def check_variant_inputs(self, a: dict[str, Any]) -> dict[str, Any]:
        """The pipeline's own ``check_inputs`` arguments besides the texts."""
        return dict(height=a["height"], width=a["width"])

    def size(self, a: dict[str, Any]) -> tuple[int, int]:
        pipe = self.pipe
        if a["height"] is None and a["width"] is None:
            return pipe.video_processor.calculate_default_height_width(
                pipe.default_aspect_ratio[1], pipe.default_aspect_ratio[0], pipe.target_size)
        return a["height"], a["width"]

    def conditioning(self, a, latents, batch: int, height: int, width: int, device):
        """(condition latents and mask concatenated to the model input on channels, image embeds)."""
        pipe = self.pipe
        dtype = pipe.transformer.dtype
        cond_latents, mask = pipe.prepare_cond_latents_and_mask(latents, dtype, device)
        image_embeds = torch.zeros(batch // a["num_videos_per_prompt"], pipe.vision_num_semantic_tokens,
                                   pipe.vision_states_dim, dtype=dtype, device=device)
        return cond_latents, mask, image_embeds

    def step_inputs(self, i: int, x: torch.Tensor, timesteps, device) -> dict[str, torch.Tensor]:
        """Extra forward arguments at step ``i``."""
        return {}

    # -- the family -------------------------------------------------------------------------------------------

    def check_inputs(self, a: dict[str, Any]) -> None:
        negatives = {f"negative_{name}": a[f"negative_{name}"] for name in TEXT_INPUTS}
        self.pipe.check_inputs(prompt=a["prompt"], negative_prompt=a["negative_prompt"],
                               **{name: a[name] for name in TEXT_INPUTS}, **negatives,
                               **self.check_variant_inputs(a))

    def default_policy(self, a: dict[str, Any]) -> GuidancePolicy:
        return guider_policy(self.pipe.guider)

    def prepare(self, a: dict[str, Any], policy: GuidancePolicy | None) -> Job:
        pipe, module = self.pipe, self.module
        policy = self.request_policy(a, policy)
        height, width = self.size(a)
        begin_call(pipe, attention_kwargs=a["attention_kwargs"])
        device = pipe._execution_device
        batch_size = prompt_batch_size(a["prompt"], a["prompt_embeds"])
        n_per = a["num_videos_per_prompt"]
        transformer = pipe.transformer

        def encode(prefix: str, prompt) -> dict[str, torch.Tensor]:
            encoded = pipe.encode_prompt(prompt=prompt, device=device, dtype=transformer.dtype,
                                         batch_size=batch_size, num_videos_per_prompt=n_per,
                                         **{name: a[prefix + name] for name in TEXT_INPUTS})
            return dict(zip(("encoder_hidden_states", "encoder_attention_mask", "encoder_hidden_states_2",
                             "encoder_attention_mask_2"), encoded))

        text = {PROMPT: encode("", a["prompt"])}
        if self.needs_negative(policy):
            text[NEGATIVE] = encode("negative_", a["negative_prompt"])

        scheduler = self.private_scheduler()
        n_steps = a["num_inference_steps"]
        sigmas = np.linspace(1.0, 0.0, n_steps + 1)[:-1] if a["sigmas"] is None else a["sigmas"]
        timesteps, n_steps = module.retrieve_timesteps(scheduler, n_steps, device, sigmas=sigmas)
        latents = pipe.prepare_latents(batch_size * n_per, pipe.num_channels_latents, height, width, a["num_frames"],
                                       transformer.dtype, device, a["generator"], a["latents"])
        latents = own_tensor(latents, a["latents"])
        cond_latents, mask, image_embeds = self.conditioning(a, latents, batch_size * n_per, height,
                                                                          width, device)
        pipe._num_timesteps = len(timesteps)
        attention_kwargs = a["attention_kwargs"]

        def forward(names: tuple[str, ...], x: torch.Tensor, step: StepIndex, batched: bool) -> list[torch.Tensor]:
            model_input = torch.cat([x, cond_latents, mask], dim=1)
            extra_inputs = self.step_inputs(step.i, x, timesteps, device)

            def run(name: str, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                timestep = t.expand(model_input.shape[0]).to(model_input.dtype)
                with branch_forward(transformer, name, policy.branch(name)) as extra:
                    return transformer(hidden_states=model_input, image_embeds=image_embeds, timestep=timestep,
                                       attention_kwargs=attention_kwargs, return_dict=False,
                                       **text[policy.branch(name).source], **extra_inputs, **extra)[0]

            return run_branches(pipe, names, x, step.select(timesteps), run)

        def decode(x: torch.Tensor, output_type: str):
            x = x.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor
            video = pipe.vae.decode(x, return_dict=False)[0]
            return pipe.video_processor.postprocess_video(video, output_type=output_type)

        policy.set_timesteps([t.item() for t in timesteps])
        stepper = self.make_update(scheduler, timesteps, generator=a["generator"])
        return self.denoise_job(latents=latents, timesteps=timesteps, policy=policy, forward=forward,
                                update=stepper,
                                finish=make_finish(pipe, a, decode, module.HunyuanVideo15PipelineOutput, "frames"),
                                step_end=None, prediction_dtype=transformer.dtype)


class HunyuanVideo15ImageToVideoAdapter(HunyuanVideo15Adapter):
    """HunyuanVideo15ImageToVideoPipeline: the first frame's latents and SigLIP embeds condition every branch;
    MeanFlow checkpoints also take the next step's timestep."""

    pipeline_classes = ("HunyuanVideo15ImageToVideoPipeline",)

    def check_variant_inputs(self, a: dict[str, Any]) -> dict[str, Any]:
        return dict(image=a["image"])

    def size(self, a: dict[str, Any]) -> tuple[int, int]:
        image = a["image"]
        return self.pipe.video_processor.calculate_default_height_width(
            height=image.size[1], width=image.size[0], target_size=self.pipe.target_size)

    def conditioning(self, a, latents, batch: int, height: int, width: int, device):
        pipe = self.pipe
        dtype = pipe.transformer.dtype
        image = pipe.video_processor.resize(a["image"], height=height, width=width, resize_mode="crop")
        image_embeds = pipe.encode_image(image=image, batch_size=batch, device=device, dtype=dtype)
        cond_latents, mask = pipe.prepare_cond_latents_and_mask(latents=latents, image=image, batch_size=batch,
                                                                height=height, width=width, dtype=dtype,
                                                                device=device)
        return cond_latents, mask, image_embeds

    def step_inputs(self, i: int, x: torch.Tensor, timesteps, device) -> dict[str, torch.Tensor]:
        if not self.pipe.transformer.config.use_meanflow:
            return {}
        r = torch.tensor([0.0], device=device) if i == len(timesteps) - 1 else timesteps[i + 1]
        return {"timestep_r": r.expand(x.shape[0]).to(x.dtype)}
