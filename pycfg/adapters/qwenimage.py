"""The Qwen-Image family: the stock ``__call__`` split into hooks that the family's pipelines share.

:class:`QwenImageAdapter` serves ``QwenImagePipeline`` (text to image) and is the base of every Qwen-Image
variant. A request runs these hooks, in order, each filling fields of one :class:`QwenRequest`:

1. :meth:`~QwenImageAdapter.default_size` and :meth:`~QwenImageAdapter.check_inputs` (from ``check``): sizes,
   then the pipeline's own ``check_inputs``;
2. :meth:`~QwenImageAdapter.prepare_images`: input images (edit, img2img, inpaint: resize and preprocess);
3. :meth:`~QwenImageAdapter.encode_texts`: ``encode_prompt`` for the prompt and, when a branch reads it, the
   negative prompt, with :meth:`~QwenImageAdapter.prompt_kwargs` (edit pipelines add the image);
4. :meth:`~QwenImageAdapter.prepare_latents_and_timesteps`: by default :meth:`prepare_latents` (noise; image
   latents that the forward appends to the sequence, ``img_shapes``) then :meth:`prepare_timesteps` (sigmas,
   ``mu``, ``retrieve_timesteps``); img2img reverses the order and truncates the schedule by ``strength``;
5. the job: :meth:`branch_forward` per branch (image latents appended, output sliced back to the generated
   tokens, :attr:`QwenRequest.forward_kwargs` passed on), the update, :meth:`after_update` (inpainting's blend),
   the callbacks, and :meth:`decode` + :meth:`output` at the end.

Every step reproduces the stock pipeline with its own helpers (``check_inputs``, ``encode_prompt``,
``prepare_latents``, ``retrieve_timesteps``, ``calculate_shift``, ``_unpack_latents``) and arithmetic, so pycfg
at any cfg_parallel_size returns the stock pipeline's bits.
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
    batch_groups,
    begin_call,
    branch_forward,
    check_latents_shape,
    check_same_batch,
    check_text_embeds,
    default_size,
    prompt_batch_size,
    require_negative,
)
from .base import Adapter, AdapterCapabilities, own_tensor

#: text inputs of one source: (embeddings, mask or None)
Text = tuple[torch.Tensor, "torch.Tensor | None"]


@dataclass
class QwenRequest:
    """One request's state, filled in by the family's hooks in order (see the module docstring)."""

    args: dict[str, Any]
    policy: GuidancePolicy
    device: torch.device
    batch_size: int
    height: int
    width: int
    #: the variant's preprocessed input image(s), as its hooks need them (None for text to image)
    images: Any = None
    #: text inputs by source ("prompt", "negative"), as the forwards read them (bucketed, never the caller's)
    texts: dict[str, Text] = field(default_factory=dict)
    #: the prompt's text as encoded: what callbacks are offered and may replace
    prompt_text: Text | None = None
    scheduler: Any = None
    timesteps: torch.Tensor | None = None
    #: packed latents (batch, tokens, channels) of the generated image
    latents: torch.Tensor | None = None
    #: packed latents appended to the sequence of every forward (edit pipelines' input images); the forward's
    #: output is sliced back to the generated tokens
    image_latents: torch.Tensor | None = None
    #: the transformer's ``img_shapes`` for one batch of latents (+ image latents)
    img_shapes: list | None = None
    #: guidance-distilled models' embedded guidance (one value; expanded over the batch in ``guidance``)
    guidance_value: torch.Tensor | None = None
    guidance: torch.Tensor | None = None
    #: extra transformer keyword arguments of the variant; tensors here are per sample (batch first) and are
    #: repeated along the batch when branches share a batched forward
    forward_kwargs: dict[str, Any] = field(default_factory=dict)
    #: the variant's own tensors that forwards or ``after_update`` read (masks, noised image latents, ...):
    #: graph inputs, so captured steps are replayed with each request's values
    step_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    #: the variant's other per-request objects (2.1's key/value caches): never shared between requests
    variant_state: dict[str, Any] = field(default_factory=dict)


class QwenImageAdapter(Adapter):
    pipeline_classes = ("QwenImagePipeline",)
    capabilities = AdapterCapabilities(
        batchable=True,
        graph_steps=True,
        text_bucket=True,
        # context parallel: text is padded to the degree with its mask (text_bucket); image tokens split as made
        context_parallel=True,
        graph_value_args=("prompt", "negative_prompt", "prompt_embeds", "negative_prompt_embeds",
                          "prompt_embeds_mask", "negative_prompt_embeds_mask", "latents", "generator",
                          "true_cfg_scale", "guidance_scale", "output_type", "return_dict"),
    )

    # -- check ----------------------------------------------------------------------------------------------------

    def context_parallel_lengths(self, a: dict[str, Any]) -> dict[str, tuple[int, str]]:
        # prepare_latents' arithmetic: latents of 2 * (size // (vae_scale_factor * 2)), packed 2x2
        step = self.pipe.vae_scale_factor * 2
        return {"image tokens": ((a["height"] // step) * (a["width"] // step), "height and width")}

    def complete_args(self, a: dict[str, Any]) -> None:
        self.default_size(a)
        if not isinstance(a["num_inference_steps"], int) or a["num_inference_steps"] < 1:
            if a.get("sigmas") is None:
                raise ValueError(f"num_inference_steps must be a positive integer, got {a['num_inference_steps']!r}")

    def default_size(self, a: dict[str, Any]) -> None:
        """Fill ``height`` / ``width`` as the stock call does before its checks."""
        default_size(self.pipe, a)

    def check_inputs(self, a: dict[str, Any]) -> None:
        """The pipeline's own ``check_inputs`` with this pipeline's arguments, then the shapes of the caller's
        tensors against what the pipeline builds: rejected here, not inside a forward."""
        pipe = self.pipe
        pipe.check_inputs(
            a["prompt"], a["height"], a["width"], **self.text_check_kwargs(a),
        )
        dim = pipe.transformer.config.joint_attention_dim
        check_text_embeds(a, "prompt_embeds", "prompt_embeds_mask", dim)
        check_text_embeds(a, "negative_prompt_embeds", "negative_prompt_embeds_mask", dim)
        check_same_batch(a, "prompt_embeds", "negative_prompt_embeds")
        if a["latents"] is not None and isinstance(a["num_images_per_prompt"], int):
            expected = self.latents_shape(a)
            if expected is not None:
                check_latents_shape(a, expected)

    def latents_shape(self, a: dict[str, Any]) -> tuple[int, ...] | None:
        """The packed latents' shape for these arguments (None: not checked before the call)."""
        batch = prompt_batch_size(a["prompt"], a["prompt_embeds"]) * a["num_images_per_prompt"]
        # the pipeline's own helper, drawing on the meta device: the shape, no numbers, no generator
        return tuple(self.pipe.prepare_latents(batch, self.latent_channels(), a["height"], a["width"],
                                               torch.float32, torch.device("meta"), None).shape)

    @staticmethod
    def text_check_kwargs(a: dict[str, Any]) -> dict[str, Any]:
        """The text arguments every Qwen-Image ``check_inputs`` takes."""
        return dict(
            negative_prompt=a["negative_prompt"],
            prompt_embeds=a["prompt_embeds"],
            negative_prompt_embeds=a["negative_prompt_embeds"],
            prompt_embeds_mask=a["prompt_embeds_mask"],
            negative_prompt_embeds_mask=a["negative_prompt_embeds_mask"],
            callback_on_step_end_tensor_inputs=a["callback_on_step_end_tensor_inputs"],
            max_sequence_length=a["max_sequence_length"],
        )

    # -- guidance -------------------------------------------------------------------------------------------------

    @staticmethod
    def has_negative(a: dict[str, Any]) -> bool:
        return a["negative_prompt"] is not None or a["negative_prompt_embeds"] is not None

    def renorm(self, a: dict[str, Any]) -> bool:
        """Whether the stock combine renormalises to the cond's per-token norm (Layered makes it optional)."""
        return True

    def default_policy(self, a: dict[str, Any]) -> GuidancePolicy:
        if a["true_cfg_scale"] > 1 and self.has_negative(a):
            return CFG(a["true_cfg_scale"], renorm=self.renorm(a))
        return NoGuidance()

    # -- prepare: the hooks, in the order they run ----------------------------------------------------------------

    def prepare(self, a: dict[str, Any], policy: GuidancePolicy | None) -> Job:
        pipe = self.pipe
        policy = self.request_policy(a, policy)
        require_negative(policy, self.has_negative(a))
        begin_call(pipe, guidance_scale=a["guidance_scale"], attention_kwargs=a["attention_kwargs"])
        req = QwenRequest(args=a, policy=policy, device=pipe._execution_device,
                          batch_size=prompt_batch_size(a["prompt"], a["prompt_embeds"]),
                          height=a["height"], width=a["width"])
        self.prepare_images(req)
        self.encode_texts(req, self.needs_negative(policy))
        req.scheduler = self.private_scheduler()
        self.prepare_latents_and_timesteps(req)
        pipe._num_timesteps = len(req.timesteps)
        self.prepare_guidance_embeds(req)
        if pipe._attention_kwargs is None:
            pipe._attention_kwargs = {}
        req.scheduler.set_begin_index(self.begin_index(req))
        policy.set_timesteps([t.item() for t in req.timesteps])
        req.prompt_text = req.texts[PROMPT]
        if self.text_bucket:
            req.texts = {k: _pad_text(e, m, self.text_bucket) for k, (e, m) in req.texts.items()}
        # a captured step's text buffers are written by later requests: never the caller's tensors
        req.texts = {k: (own_tensor(e, a), own_tensor(m, a)) for k, (e, m) in req.texts.items()}
        return self.make_job(req)

    def prepare_images(self, req: QwenRequest) -> None:
        """Preprocess the variant's input image(s) into ``req.images`` (text to image: none)."""

    def prompt_kwargs(self, req: QwenRequest) -> dict[str, Any]:
        """Extra ``encode_prompt`` arguments (edit pipelines pass the input image)."""
        return {}

    def encode_texts(self, req: QwenRequest, needs_negative: bool) -> None:
        """``req.texts``: the pipeline's own ``encode_prompt`` for the prompt and, if a branch reads it, the
        negative prompt."""
        a = req.args
        common = dict(device=req.device, num_images_per_prompt=a["num_images_per_prompt"],
                      max_sequence_length=a["max_sequence_length"], **self.prompt_kwargs(req))
        req.texts[PROMPT] = self.pipe.encode_prompt(prompt=a["prompt"], prompt_embeds=a["prompt_embeds"],
                                                    prompt_embeds_mask=a["prompt_embeds_mask"], **common)
        if needs_negative:
            req.texts[NEGATIVE] = self.pipe.encode_prompt(
                prompt=a["negative_prompt"], prompt_embeds=a["negative_prompt_embeds"],
                prompt_embeds_mask=a["negative_prompt_embeds_mask"], **common)

    def prepare_latents_and_timesteps(self, req: QwenRequest) -> None:
        """Latents, then the schedule (``mu`` depends on the latents' length); img2img reverses the order."""
        self.prepare_latents(req)
        self.prepare_timesteps(req)

    def latent_channels(self) -> int:
        return self.pipe.transformer.config.in_channels // 4

    def latent_grid(self, height: int, width: int) -> tuple[int, int, int]:
        """One ``img_shapes`` entry: the packed token grid of an image of this size."""
        scale = self.pipe.vae_scale_factor
        return (1, height // scale // 2, width // scale // 2)

    def prepare_latents(self, req: QwenRequest) -> None:
        """``req.latents`` from the pipeline's ``prepare_latents`` (the caller's latents copied, never written),
        and ``req.img_shapes``."""
        a = req.args
        latents = self.pipe.prepare_latents(req.batch_size * a["num_images_per_prompt"], self.latent_channels(),
                                            req.height, req.width, req.texts[PROMPT][0].dtype, req.device,
                                            a["generator"], a["latents"])
        req.latents = own_tensor(latents, a["latents"])
        req.img_shapes = [[self.latent_grid(req.height, req.width)]] * req.batch_size

    def sigmas(self, req: QwenRequest):
        steps = req.args["num_inference_steps"]
        sigmas = req.args["sigmas"]
        return np.linspace(1.0, 1 / steps, steps) if sigmas is None else sigmas

    def image_seq_len(self, req: QwenRequest) -> int:
        return req.latents.shape[1]

    def mu(self, req: QwenRequest) -> float:
        config = req.scheduler.config
        return self.module.calculate_shift(
            self.image_seq_len(req),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )

    def prepare_timesteps(self, req: QwenRequest) -> None:
        """``req.timesteps`` from the pipeline's ``retrieve_timesteps`` on the request's private scheduler."""
        req.timesteps, _ = self.module.retrieve_timesteps(req.scheduler, req.args["num_inference_steps"], req.device,
                                                          sigmas=self.sigmas(req), mu=self.mu(req))

    def begin_index(self, req: QwenRequest) -> int:
        """Where the scheduler starts in its schedule: 0, or where img2img's ``strength`` cut it."""
        return 0

    def prepare_guidance_embeds(self, req: QwenRequest) -> None:
        """Guidance-distilled transformers take the guidance scale as an input."""
        scale = req.args["guidance_scale"]
        if not self.pipe.transformer.config.guidance_embeds:
            return
        if scale is None:
            raise ValueError("guidance_scale is required for guidance-distilled model.")
        req.guidance_value = torch.full([1], scale, device=req.device, dtype=torch.float32)
        req.guidance = req.guidance_value.expand(req.latents.shape[0])

    # -- the steps ------------------------------------------------------------------------------------------------

    def model_input(self, req: QwenRequest, x: torch.Tensor) -> torch.Tensor:
        """What the transformer reads for latents ``x``: the image latents appended along the sequence."""
        return x if req.image_latents is None else torch.cat([x, req.image_latents], dim=1)

    def model_output(self, req: QwenRequest, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The prediction for the generated tokens only."""
        return out if req.image_latents is None else out[:, : x.size(1)]

    def branch_forward(self, req: QwenRequest, names: tuple[str, ...], x: torch.Tensor,
                       t: torch.Tensor) -> list[torch.Tensor]:
        """One transformer forward for ``names`` (one branch, or same-shape branches stacked on the batch)."""
        transformer, n = self.pipe.transformer, len(names)
        spec = req.policy.branch(names[0])
        texts = [req.texts[req.policy.branch(name).source] for name in names]
        xin = self.model_input(req, x)
        kwargs = dict(req.forward_kwargs)
        if n == 1:
            (embeds, mask), shapes, guidance = texts[0], req.img_shapes, req.guidance
        else:
            embeds = torch.cat([e for e, _ in texts])
            masks = [m for _, m in texts]
            mask = None if any(m is None for m in masks) else torch.cat(masks)
            xin, shapes = torch.cat([xin] * n), req.img_shapes * n
            guidance = req.guidance.repeat(n) if req.guidance is not None else None
            kwargs = {k: torch.cat([v] * n) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        timestep = t.expand(xin.shape[0]).to(xin.dtype)
        with branch_forward(transformer, "+".join(names), spec) as extra:
            out = transformer(
                hidden_states=xin,
                timestep=timestep / 1000,
                guidance=guidance,
                encoder_hidden_states_mask=mask,
                encoder_hidden_states=embeds,
                img_shapes=shapes,
                attention_kwargs=self.pipe._attention_kwargs,
                return_dict=False,
                **kwargs,
                **extra,
            )[0]
        outs = [out] if n == 1 else list(out.chunk(n))
        return [self.model_output(req, o, x) for o in outs]

    def batch_key(self, req: QwenRequest, name: str):
        """Branches batch together when their forwards differ only in same-shape text inputs."""
        spec = req.policy.branch(name)
        embeds, mask = req.texts[spec.source]
        return (spec.perturbation, tuple(embeds.shape), mask is None)

    def after_update(self, req: QwenRequest) -> Callable[[StepIndex, torch.Tensor], torch.Tensor] | None:
        """A per-step function run after the solver update, inside the step (inpainting's blend); None here."""
        return None

    def callback_values(self, req: QwenRequest, x: torch.Tensor) -> dict[str, Any]:
        """The tensors the stock loop offers a step-end callback."""
        return {"latents": x, "prompt_embeds": req.prompt_text[0]}

    def apply_callback(self, req: QwenRequest, outputs: dict[str, Any]) -> None:
        """Take back what a callback returned besides the latents (a new prompt embedding)."""
        if "prompt_embeds" in outputs:
            req.prompt_text = (outputs.pop("prompt_embeds"), req.prompt_text[1])
            text = req.prompt_text
            req.texts[PROMPT] = _pad_text(*text, self.text_bucket) if self.text_bucket else text

    def decode(self, req: QwenRequest, x: torch.Tensor):
        """Latents to the output images (unpack, de-normalise, VAE decode, postprocess), as stock."""
        pipe, output_type = self.pipe, req.args["output_type"]
        if output_type == "latent":
            return x
        x = pipe._unpack_latents(x, req.height, req.width, pipe.vae_scale_factor)
        x = x.to(pipe.vae.dtype)
        z_dim = pipe.vae.config.z_dim
        latents_mean = torch.tensor(pipe.vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(x.device, x.dtype)
        latents_std = 1.0 / torch.tensor(pipe.vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(x.device, x.dtype)
        x = x / latents_std + latents_mean
        image = pipe.vae.decode(x, return_dict=False)[0][:, :, 0]
        return pipe.image_processor.postprocess(image, output_type=output_type)

    def output(self, req: QwenRequest, images):
        if not req.args["return_dict"]:
            return (images,)
        return self.module.QwenImagePipelineOutput(images=images)

    def graph_inputs(self, req: QwenRequest) -> dict[str, torch.Tensor]:
        """Every request tensor the steps read (the captured steps' inputs)."""
        tensors = {"timesteps": req.timesteps}
        for source, (embeds, mask) in req.texts.items():
            tensors[f"{source}_embeds"] = embeds
            if mask is not None:
                tensors[f"{source}_mask"] = mask
        if req.guidance_value is not None:
            tensors["guidance"] = req.guidance_value
        if req.image_latents is not None:
            tensors["image_latents"] = req.image_latents
        tensors.update({k: v for k, v in req.forward_kwargs.items() if isinstance(v, torch.Tensor)})
        tensors.update(req.step_tensors)
        return tensors

    def make_job(self, req: QwenRequest) -> Job:
        pipe = self.pipe
        timesteps = req.timesteps

        def forward(names: tuple[str, ...], x: torch.Tensor, step: StepIndex, batched: bool) -> list[torch.Tensor]:
            t = step.select(timesteps)
            pipe._current_timestep = t
            preds: dict[str, torch.Tensor] = {}
            for group in batch_groups(names, batched, lambda name: self.batch_key(req, name)):
                preds.update(zip(group, self.branch_forward(req, tuple(group), x, t)))
            return [preds[name] for name in names]

        callback = req.args["callback_on_step_end"]
        callback_inputs = req.args["callback_on_step_end_tensor_inputs"]

        def step_end(i: int, x: torch.Tensor) -> torch.Tensor:
            offered = self.callback_values(req, x)
            outputs = callback(pipe, i, timesteps[i], {k: offered[k] for k in callback_inputs})
            x = outputs.pop("latents", x)
            self.apply_callback(req, outputs)
            return x

        def finish(x: torch.Tensor):
            pipe._current_timestep = None
            images = self.decode(req, x)
            pipe.maybe_free_model_hooks()
            return self.output(req, images)

        return self.denoise_job(
            latents=req.latents, timesteps=timesteps, policy=req.policy, forward=forward,
            update=self.make_update(req.scheduler, timesteps, generator=req.args["generator"]),
            finish=finish,
            # no callback: nothing runs between steps, so whole steps can be captured as CUDA graphs
            step_end=step_end if callback is not None else None,
            after_update=self.after_update(req),
            prediction_dtype=pipe.transformer.dtype,
            graph_inputs=lambda: self.graph_inputs(req),
        )


def _pad_text(embeds: torch.Tensor, mask: torch.Tensor | None, bucket: int) -> Text:
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
