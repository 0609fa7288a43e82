"""FluxPipeline (text to image): true CFG as two separate forwards, the distilled guidance tensor on both.

A request with ``true_cfg_scale > 1`` and a negative prompt runs ``cond`` and ``uncond`` as separate branches
and combines them exactly as stock (``neg + s * (pos - neg)``); guidance-distilled requests (the ``guidance``
embedding only) run the single ``cond`` branch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..guidance import CFG, GuidancePolicy, NoGuidance
from ..guidance.base import NEGATIVE, PROMPT
from ..runtime.job import Job
from ..steps import StepIndex
from ._common import (
    begin_call,
    branch_forward,
    callback_tensor_inputs,
    default_size,
    make_finish,
    make_step_end,
    prompt_batch_size,
    require_negative,
)
from .base import Adapter, AdapterCapabilities, own_tensor


class FluxAdapter(Adapter):
    pipeline_classes = ("FluxPipeline",)
    capabilities = AdapterCapabilities(
        graph_steps=True,
        graph_value_args=("prompt", "prompt_2", "negative_prompt", "negative_prompt_2", "prompt_embeds",
                          "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds",
                          "latents", "generator", "true_cfg_scale", "guidance_scale", "output_type", "return_dict"),
    )

    def complete_args(self, a: dict[str, Any]) -> None:
        default_size(self.pipe, a)

    def check_inputs(self, a: dict[str, Any]) -> None:
        self.pipe.check_inputs(
            a["prompt"],
            a["prompt_2"],
            a["height"],
            a["width"],
            negative_prompt=a["negative_prompt"],
            negative_prompt_2=a["negative_prompt_2"],
            prompt_embeds=a["prompt_embeds"],
            negative_prompt_embeds=a["negative_prompt_embeds"],
            pooled_prompt_embeds=a["pooled_prompt_embeds"],
            negative_pooled_prompt_embeds=a["negative_pooled_prompt_embeds"],
            callback_on_step_end_tensor_inputs=a["callback_on_step_end_tensor_inputs"],
            max_sequence_length=a["max_sequence_length"],
        )
        # stock raises this one from __call__ itself, after check_inputs
        if self._true_cfg(a) and a["prompt_embeds"] is not None and a["negative_prompt_embeds"] is not None:
            if a["prompt_embeds"].shape != a["negative_prompt_embeds"].shape:
                raise ValueError(
                    "`prompt_embeds` and `negative_prompt_embeds` must have the same shape when passed directly, but"
                    f" got: `prompt_embeds` {a['prompt_embeds'].shape} != `negative_prompt_embeds`"
                    f" {a['negative_prompt_embeds'].shape}."
                )

    @staticmethod
    def _has_negative(a) -> bool:
        return a["negative_prompt"] is not None or (
            a["negative_prompt_embeds"] is not None and a["negative_pooled_prompt_embeds"] is not None
        )

    def _true_cfg(self, a) -> bool:
        return a["true_cfg_scale"] > 1 and self._has_negative(a)

    def default_policy(self, a: dict[str, Any]) -> GuidancePolicy:
        return CFG(a["true_cfg_scale"]) if self._true_cfg(a) else NoGuidance()

    def prepare(self, a: dict[str, Any], policy: GuidancePolicy | None) -> Job:
        pipe, module = self.pipe, self.module
        policy = self.request_policy(a, policy)
        require_negative(policy, self._has_negative(a),
                         "negative_prompt, or negative_prompt_embeds with negative_pooled_prompt_embeds")
        needs_negative = self.needs_negative(policy)
        begin_call(pipe, guidance_scale=a["guidance_scale"], joint_attention_kwargs=a["joint_attention_kwargs"])

        batch_size = prompt_batch_size(a["prompt"], a["prompt_embeds"])
        device = pipe._execution_device
        jak = a["joint_attention_kwargs"]
        lora_scale = jak.get("scale", None) if jak is not None else None
        n_per = a["num_images_per_prompt"]
        encode = dict(device=device, num_images_per_prompt=n_per, max_sequence_length=a["max_sequence_length"],
                      lora_scale=lora_scale)

        # text inputs by source: every branch reading the prompt sees a callback's prompt_embeds update; a
        # captured step's text buffers are written by later requests: never the caller's tensors
        text = {PROMPT: [own_tensor(t, a) for t in pipe.encode_prompt(
            prompt=a["prompt"], prompt_2=a["prompt_2"], prompt_embeds=a["prompt_embeds"],
            pooled_prompt_embeds=a["pooled_prompt_embeds"], **encode,
        )]}
        if needs_negative:
            text[NEGATIVE] = [own_tensor(t, a) for t in pipe.encode_prompt(
                prompt=a["negative_prompt"], prompt_2=a["negative_prompt_2"],
                prompt_embeds=a["negative_prompt_embeds"], pooled_prompt_embeds=a["negative_pooled_prompt_embeds"],
                **encode,
            )]

        height, width = a["height"], a["width"]
        num_channels_latents = pipe.transformer.config.in_channels // 4
        latents, latent_image_ids = pipe.prepare_latents(
            batch_size * n_per, num_channels_latents, height, width, text[PROMPT][0].dtype, device, a["generator"],
            a["latents"],
        )
        latents = own_tensor(latents, a["latents"])

        n_steps = a["num_inference_steps"]
        scheduler = self.private_scheduler()
        sigmas = a["sigmas"]
        sigmas = np.linspace(1.0, 1 / n_steps, n_steps) if sigmas is None else sigmas
        if hasattr(scheduler.config, "use_flow_sigmas") and scheduler.config.use_flow_sigmas:
            sigmas = None
        mu = module.calculate_shift(
            latents.shape[1],
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.15),
        )
        timesteps, n_steps = module.retrieve_timesteps(scheduler, n_steps, device, sigmas=sigmas, mu=mu)
        pipe._num_timesteps = len(timesteps)

        transformer = pipe.transformer
        guidance_value = guidance = None
        if transformer.config.guidance_embeds:
            guidance_value = torch.full([1], a["guidance_scale"], device=device, dtype=torch.float32)
            guidance = guidance_value.expand(latents.shape[0])

        ip_image, ip_embeds = a["ip_adapter_image"], a["ip_adapter_image_embeds"]
        neg_ip_image, neg_ip_embeds = a["negative_ip_adapter_image"], a["negative_ip_adapter_image_embeds"]
        # stock pairs a lone positive (or negative) IP-adapter image with a black one on the other side
        if (ip_image is not None or ip_embeds is not None) and (neg_ip_image is None and neg_ip_embeds is None):
            neg_ip_image = [np.zeros((width, height, 3), dtype=np.uint8)] * transformer.encoder_hid_proj.num_ip_adapters
        elif (ip_image is None and ip_embeds is None) and (neg_ip_image is not None or neg_ip_embeds is not None):
            ip_image = [np.zeros((width, height, 3), dtype=np.uint8)] * transformer.encoder_hid_proj.num_ip_adapters
        if pipe._joint_attention_kwargs is None:
            pipe._joint_attention_kwargs = {}
        image_embeds = {}
        if ip_image is not None or ip_embeds is not None:
            image_embeds[PROMPT] = pipe.prepare_ip_adapter_image_embeds(ip_image, ip_embeds, device,
                                                                        batch_size * n_per)
        if needs_negative and (neg_ip_image is not None or neg_ip_embeds is not None):
            image_embeds[NEGATIVE] = pipe.prepare_ip_adapter_image_embeds(neg_ip_image, neg_ip_embeds, device,
                                                                          batch_size * n_per)
        scheduler.set_begin_index(0)

        def forward(names: tuple[str, ...], x: torch.Tensor, step: StepIndex, batched: bool) -> list[torch.Tensor]:
            t = step.select(timesteps)
            pipe._current_timestep = t
            timestep = t.expand(x.shape[0]).to(x.dtype)
            attention_kwargs = pipe._joint_attention_kwargs
            preds = []
            for name in names:
                spec = policy.branch(name)
                if spec.source in image_embeds:
                    attention_kwargs["ip_adapter_image_embeds"] = image_embeds[spec.source]
                prompt_embeds, pooled_embeds, ids = text[spec.source]
                with branch_forward(transformer, name, spec) as extra:
                    preds.append(transformer(
                        hidden_states=x,
                        timestep=timestep / 1000,
                        guidance=guidance,
                        pooled_projections=pooled_embeds,
                        encoder_hidden_states=prompt_embeds,
                        txt_ids=ids,
                        img_ids=latent_image_ids,
                        joint_attention_kwargs=attention_kwargs,
                        return_dict=False,
                        **extra,
                    )[0])
            return preds

        def apply(outputs):
            if "prompt_embeds" in outputs:
                text[PROMPT][0] = outputs.pop("prompt_embeds")

        callback = a["callback_on_step_end"]
        step_end = make_step_end(
            pipe, callback, callback_tensor_inputs(callback, a["callback_on_step_end_tensor_inputs"]), timesteps,
            lambda x: {"latents": x, "prompt_embeds": text[PROMPT][0]}, apply,
        )

        def decode(x: torch.Tensor, output_type: str):
            x = pipe._unpack_latents(x, height, width, pipe.vae_scale_factor)
            x = (x / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
            x = x.to(module.get_module_execution_device(pipe.vae))
            image = pipe.vae.decode(x, return_dict=False)[0]
            return pipe.image_processor.postprocess(image, output_type=output_type)

        def graph_inputs() -> dict[str, torch.Tensor]:
            tensors = {"timesteps": timesteps, "img_ids": latent_image_ids}
            for source, parts in text.items():
                tensors.update({f"{source}_{k}": v for k, v in zip(("embeds", "pooled", "ids"), parts)})
            if guidance_value is not None:
                tensors["guidance"] = guidance_value
            return tensors

        policy.set_timesteps([t.item() for t in timesteps])
        return self.denoise_job(
            latents=latents, timesteps=timesteps, policy=policy, forward=forward,
            update=self.make_update(scheduler, timesteps, generator=a["generator"]),
            finish=make_finish(pipe, a, decode, module.FluxPipelineOutput, "images"),
            step_end=step_end,
            prediction_dtype=transformer.dtype,
            not_graphable="IP-Adapter image embeddings are switched per branch on the host" if image_embeds else None,
            graph_inputs=graph_inputs,
        )
