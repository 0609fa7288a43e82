"""The Flux family: true CFG as two separate forwards, the distilled guidance tensor on both.

:class:`FluxAdapter` serves ``FluxPipeline`` (text to image) and is the base of the Flux variants
(:mod:`pycfg.adapters.flux_variants`). A request with ``true_cfg_scale > 1`` and a negative prompt runs ``cond``
and ``uncond`` as separate branches, combined exactly as stock (``neg + s * (pos - neg)``); guidance-distilled
requests (the ``guidance`` embedding only) run the single ``cond`` branch.

A request runs these hooks, in order, each filling fields of one :class:`FluxRequest`:

1. :meth:`~FluxAdapter.default_size` (from ``complete_args``) and :meth:`~FluxAdapter.check_inputs` (from the
   contract's ``check``);
2. :meth:`~FluxAdapter.prepare_images`: the variant's input image(s) (text to image: none);
3. the texts (``encode_prompt``), then :meth:`~FluxAdapter.prepare_latents_and_timesteps`: by default
   :meth:`prepare_latents` (noise, position ids, image tokens a forward appends) then :meth:`prepare_timesteps`;
4. the job: per branch, the latents plus ``req.image_latents`` (if any) as the sequence, the output sliced back
   to the generated tokens; :meth:`after_update` (inpainting's blend); callbacks; :meth:`decode` at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

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


@dataclass
class FluxRequest:
    """One request's state, filled in by the family's hooks in order (see the module docstring)."""

    args: dict[str, Any]
    device: torch.device
    batch_size: int
    height: int
    width: int
    #: the variant's preprocessed input image(s) (None for text to image)
    images: Any = None
    #: text inputs by source: [embeds, pooled embeds, text ids]
    texts: dict[str, list] = field(default_factory=dict)
    scheduler: Any = None
    timesteps: torch.Tensor | None = None
    #: packed latents (batch, tokens, channels) of the generated image, and the position ids of every token a
    #: forward sees (the generated ones, then any appended image tokens)
    latents: torch.Tensor | None = None
    latent_ids: torch.Tensor | None = None
    #: packed image latents appended to every forward's sequence (Kontext); outputs are sliced back
    image_latents: torch.Tensor | None = None
    #: the variant's own tensors that ``after_update`` reads (inpainting's mask and noised image latents): graph
    #: inputs, so captured steps are replayed with each request's values
    step_tensors: dict[str, torch.Tensor] = field(default_factory=dict)


class FluxAdapter(Adapter):
    pipeline_classes = ("FluxPipeline",)
    capabilities = AdapterCapabilities(
        graph_steps=True,
        # context parallel: text and image tokens are both split as given (Flux attends to its text without a
        # mask, so padding would change the result): their lengths must divide by the degree
        context_parallel=True,
        graph_value_args=("prompt", "prompt_2", "negative_prompt", "negative_prompt_2", "prompt_embeds",
                          "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds",
                          "latents", "generator", "true_cfg_scale", "guidance_scale", "output_type", "return_dict"),
    )

    def context_parallel_lengths(self, a: dict[str, Any]) -> dict[str, tuple[int, str]]:
        # prepare_latents' arithmetic: latents of 2 * (size // (vae_scale_factor * 2)), packed 2x2
        step = self.pipe.vae_scale_factor * 2
        lengths = {"image tokens": ((a["height"] // step) * (a["width"] // step), "height and width")}
        for name in ("prompt_embeds", "negative_prompt_embeds"):
            embeds = a[name]
            text = embeds.shape[1] if embeds is not None else a["max_sequence_length"]
            lengths[f"text tokens ({name.replace('_embeds', '')})"] = (
                text, f"the length of {name}" if embeds is not None else "max_sequence_length")
        return lengths

    # -- check ----------------------------------------------------------------------------------------------------

    def complete_args(self, a: dict[str, Any]) -> None:
        self.default_size(a)

    def default_size(self, a: dict[str, Any]) -> None:
        """Fill ``height`` / ``width`` as the stock call does before its checks."""
        default_size(self.pipe, a)

    def check_inputs(self, a: dict[str, Any]) -> None:
        """The pipeline's own ``check_inputs`` with this pipeline's arguments, then the check its ``__call__``
        makes itself."""
        self.pipe.check_inputs(a["prompt"], a["prompt_2"], a["height"], a["width"], **self.text_check_kwargs(a))
        self.check_embeds_shapes(a)

    def check_embeds_shapes(self, a: dict[str, Any]) -> None:
        """Stock (text to image, Kontext) raises this one from ``__call__`` itself, after ``check_inputs``."""
        if self._true_cfg(a) and a["prompt_embeds"] is not None and a["negative_prompt_embeds"] is not None:
            if a["prompt_embeds"].shape != a["negative_prompt_embeds"].shape:
                raise ValueError(
                    "`prompt_embeds` and `negative_prompt_embeds` must have the same shape when passed directly, but"
                    f" got: `prompt_embeds` {a['prompt_embeds'].shape} != `negative_prompt_embeds`"
                    f" {a['negative_prompt_embeds'].shape}."
                )

    @staticmethod
    def text_check_kwargs(a: dict[str, Any]) -> dict[str, Any]:
        """The text arguments every Flux ``check_inputs`` takes."""
        return dict(
            negative_prompt=a["negative_prompt"],
            negative_prompt_2=a["negative_prompt_2"],
            prompt_embeds=a["prompt_embeds"],
            negative_prompt_embeds=a["negative_prompt_embeds"],
            pooled_prompt_embeds=a["pooled_prompt_embeds"],
            negative_pooled_prompt_embeds=a["negative_pooled_prompt_embeds"],
            callback_on_step_end_tensor_inputs=a["callback_on_step_end_tensor_inputs"],
            max_sequence_length=a["max_sequence_length"],
        )

    # -- guidance -------------------------------------------------------------------------------------------------

    @staticmethod
    def _has_negative(a) -> bool:
        return a["negative_prompt"] is not None or (
            a["negative_prompt_embeds"] is not None and a["negative_pooled_prompt_embeds"] is not None
        )

    def _true_cfg(self, a) -> bool:
        return a["true_cfg_scale"] > 1 and self._has_negative(a)

    def default_policy(self, a: dict[str, Any]) -> GuidancePolicy:
        return CFG(a["true_cfg_scale"]) if self._true_cfg(a) else NoGuidance()

    # -- prepare: the hooks, in the order they run ----------------------------------------------------------------

    def prepare_images(self, req: FluxRequest) -> None:
        """Preprocess the variant's input image(s) into ``req.images`` (text to image: none)."""

    def prepare_latents_and_timesteps(self, req: FluxRequest) -> None:
        """Latents, then the schedule (``mu`` depends on the latents' length); img2img reverses the order."""
        self.prepare_latents(req)
        self.prepare_timesteps(req, image_seq_len=req.latents.shape[1])
        req.scheduler.set_begin_index(0)

    def latent_channels(self) -> int:
        return self.pipe.transformer.config.in_channels // 4

    def prepare_latents(self, req: FluxRequest) -> None:
        a = req.args
        latents, req.latent_ids = self.pipe.prepare_latents(
            req.batch_size * a["num_images_per_prompt"], self.latent_channels(), req.height, req.width,
            req.texts[PROMPT][0].dtype, req.device, a["generator"], a["latents"],
        )
        req.latents = own_tensor(latents, a["latents"])

    def prepare_timesteps(self, req: FluxRequest, image_seq_len: int) -> None:
        """The stock sigmas and ``mu`` for ``image_seq_len`` image tokens, through ``retrieve_timesteps``."""
        a, module, scheduler = req.args, self.module, req.scheduler
        n_steps = a["num_inference_steps"]
        sigmas = np.linspace(1.0, 1 / n_steps, n_steps) if a["sigmas"] is None else a["sigmas"]
        if hasattr(scheduler.config, "use_flow_sigmas") and scheduler.config.use_flow_sigmas:
            sigmas = None
        config = scheduler.config
        mu = module.calculate_shift(image_seq_len, config.get("base_image_seq_len", 256),
                                    config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                    config.get("max_shift", 1.15))
        req.timesteps, _ = module.retrieve_timesteps(scheduler, n_steps, req.device, sigmas=sigmas, mu=mu)

    def after_update(self, req: FluxRequest) -> Callable[[StepIndex, torch.Tensor], torch.Tensor] | None:
        """What the step does to the latents after the solver update (inpainting's blend); None: nothing."""
        return None

    def decode(self, req: FluxRequest, x: torch.Tensor, output_type: str):
        """The postprocessed images from the final packed latents."""
        pipe = self.pipe
        x = pipe._unpack_latents(x, req.height, req.width, pipe.vae_scale_factor)
        x = (x / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
        x = x.to(self.module.get_module_execution_device(pipe.vae))
        image = pipe.vae.decode(x, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type=output_type)

    # -- the job --------------------------------------------------------------------------------------------------

    def prepare(self, a: dict[str, Any], policy: GuidancePolicy | None) -> Job:
        pipe = self.pipe
        policy = self.request_policy(a, policy)
        require_negative(policy, self._has_negative(a),
                         "negative_prompt, or negative_prompt_embeds with negative_pooled_prompt_embeds")
        begin_call(pipe, guidance_scale=a["guidance_scale"], joint_attention_kwargs=a["joint_attention_kwargs"])
        req = FluxRequest(args=a, device=pipe._execution_device,
                          batch_size=prompt_batch_size(a["prompt"], a["prompt_embeds"]),
                          height=a["height"], width=a["width"])
        self.prepare_images(req)
        self.encode_texts(req, self.needs_negative(policy))
        req.scheduler = self.private_scheduler()
        self.prepare_latents_and_timesteps(req)
        pipe._num_timesteps = len(req.timesteps)
        return self.make_job(req, policy)

    def encode_texts(self, req: FluxRequest, needs_negative: bool) -> None:
        """``req.texts``: the pipeline's own ``encode_prompt`` for the prompt and, if a branch reads it, the
        negative prompt."""
        a = req.args
        jak = a["joint_attention_kwargs"]
        encode = dict(device=req.device, num_images_per_prompt=a["num_images_per_prompt"],
                      max_sequence_length=a["max_sequence_length"],
                      lora_scale=jak.get("scale", None) if jak is not None else None)
        # text inputs by source: every branch reading the prompt sees a callback's prompt_embeds update; a
        # captured step's text buffers are written by later requests: never the caller's tensors
        req.texts[PROMPT] = [own_tensor(t, a) for t in self.pipe.encode_prompt(
            prompt=a["prompt"], prompt_2=a["prompt_2"], prompt_embeds=a["prompt_embeds"],
            pooled_prompt_embeds=a["pooled_prompt_embeds"], **encode)]
        if needs_negative:
            req.texts[NEGATIVE] = [own_tensor(t, a) for t in self.pipe.encode_prompt(
                prompt=a["negative_prompt"], prompt_2=a["negative_prompt_2"],
                prompt_embeds=a["negative_prompt_embeds"], pooled_prompt_embeds=a["negative_pooled_prompt_embeds"],
                **encode)]

    def ip_adapter_embeds(self, req: FluxRequest, needs_negative: bool) -> dict[str, Any]:
        """IP-adapter image embeds by source; stock pairs a lone positive (or negative) IP-adapter image with a
        black one on the other side."""
        pipe, a = self.pipe, req.args
        ip_image, ip_embeds = a["ip_adapter_image"], a["ip_adapter_image_embeds"]
        neg_ip_image, neg_ip_embeds = a["negative_ip_adapter_image"], a["negative_ip_adapter_image_embeds"]
        if (ip_image is not None or ip_embeds is not None) and (neg_ip_image is None and neg_ip_embeds is None):
            neg_ip_image = self.black_ip_image(req)
        elif (ip_image is None and ip_embeds is None) and (neg_ip_image is not None or neg_ip_embeds is not None):
            ip_image = self.black_ip_image(req)
        n = req.batch_size * a["num_images_per_prompt"]
        embeds = {}
        if ip_image is not None or ip_embeds is not None:
            embeds[PROMPT] = pipe.prepare_ip_adapter_image_embeds(ip_image, ip_embeds, req.device, n)
        if needs_negative and (neg_ip_image is not None or neg_ip_embeds is not None):
            embeds[NEGATIVE] = pipe.prepare_ip_adapter_image_embeds(neg_ip_image, neg_ip_embeds, req.device, n)
        return embeds

    def black_ip_image(self, req: FluxRequest):
        """The black IP-adapter image stock pairs with a lone one on the other side: one per IP adapter."""
        black = np.zeros((req.width, req.height, 3), dtype=np.uint8)
        return [black] * self.pipe.transformer.encoder_hid_proj.num_ip_adapters

    def make_job(self, req: FluxRequest, policy: GuidancePolicy) -> Job:
        pipe, a, timesteps = self.pipe, req.args, req.timesteps
        transformer = pipe.transformer
        guidance_value = guidance = None
        if transformer.config.guidance_embeds:
            guidance_value = torch.full([1], a["guidance_scale"], device=req.device, dtype=torch.float32)
            guidance = guidance_value.expand(req.latents.shape[0])
        image_embeds = self.ip_adapter_embeds(req, NEGATIVE in req.texts)
        if pipe._joint_attention_kwargs is None:
            pipe._joint_attention_kwargs = {}
        text = req.texts

        def forward(names: tuple[str, ...], x: torch.Tensor, step: StepIndex, batched: bool) -> list[torch.Tensor]:
            t = step.select(timesteps)
            pipe._current_timestep = t
            timestep = t.expand(x.shape[0]).to(x.dtype)
            hidden = x if req.image_latents is None else torch.cat([x, req.image_latents], dim=1)
            attention_kwargs = pipe._joint_attention_kwargs
            preds = []
            for name in names:
                spec = policy.branch(name)
                if spec.source in image_embeds:
                    attention_kwargs["ip_adapter_image_embeds"] = image_embeds[spec.source]
                prompt_embeds, pooled_embeds, text_ids = text[spec.source]
                with branch_forward(transformer, name, spec) as extra:
                    out = transformer(hidden_states=hidden, timestep=timestep / 1000, guidance=guidance,
                                      pooled_projections=pooled_embeds, encoder_hidden_states=prompt_embeds,
                                      txt_ids=text_ids, img_ids=req.latent_ids, joint_attention_kwargs=attention_kwargs,
                                      return_dict=False, **extra)[0]
                # appended image tokens (Kontext) are sliced off: the prediction covers the generated ones
                preds.append(out if req.image_latents is None else out[:, : x.size(1)])
            return preds

        callback = a["callback_on_step_end"]

        def apply(outputs):
            if "prompt_embeds" in outputs:
                text[PROMPT][0] = outputs.pop("prompt_embeds")

        step_end = make_step_end(
            pipe, callback, callback_tensor_inputs(callback, a["callback_on_step_end_tensor_inputs"]), timesteps,
            lambda x: {"latents": x, "prompt_embeds": text[PROMPT][0]}, apply,
        )

        def graph_inputs() -> dict[str, torch.Tensor]:
            tensors = {"timesteps": timesteps, "img_ids": req.latent_ids, **req.step_tensors}
            for source, parts in text.items():
                tensors.update({f"{source}_{k}": v for k, v in zip(("embeds", "pooled", "ids"), parts)})
            if guidance_value is not None:
                tensors["guidance"] = guidance_value
            if req.image_latents is not None:
                tensors["image_latents"] = req.image_latents
            return tensors

        policy.set_timesteps([t.item() for t in timesteps])
        return self.denoise_job(
            latents=req.latents, timesteps=timesteps, policy=policy, forward=forward,
            update=self.make_update(req.scheduler, timesteps, generator=a["generator"]),
            finish=make_finish(pipe, a, lambda x, output_type: self.decode(req, x, output_type),
                               self.module.FluxPipelineOutput, "images"),
            step_end=step_end,
            after_update=self.after_update(req),
            prediction_dtype=transformer.dtype,
            not_graphable="IP-Adapter image embeddings are switched per branch on the host" if image_embeds else None,
            graph_inputs=graph_inputs,
        )
