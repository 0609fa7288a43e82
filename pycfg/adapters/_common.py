"""Small pieces several family adapters share: batch size, callbacks, per-step CFG scales."""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Sequence

import torch

from ..guidance.base import (
    NEGATIVE,
    PASS_THROUGH,
    PROMPT,
    GuidancePolicy,
    KernelGuidance,
    Prediction,
    weighted_sum_fp32,
)


def prompt_batch_size(prompt, prompt_embeds) -> int:
    """The stock pipelines' batch size rule: a string is one, a list its length, else the embeds' batch."""
    if prompt is not None and isinstance(prompt, str):
        return 1
    if prompt is not None and isinstance(prompt, list):
        return len(prompt)
    return prompt_embeds.shape[0]


def check_text_embeds(a: dict[str, Any], embeds: str, mask: str | None, dim: int) -> None:
    """A caller's text embeddings (and mask) have the shapes the transformer takes: (batch, tokens, ``dim``)
    and (batch, tokens); raised here, before any forward, instead of inside one."""
    e = a.get(embeds)
    if e is None:
        return
    if not isinstance(e, torch.Tensor) or not e.is_floating_point():
        raise TypeError(f"{embeds} must be a floating-point tensor, got {_kind(e)}")
    if e.ndim != 3 or e.shape[-1] != dim or e.shape[0] == 0 or e.shape[1] == 0:
        raise ValueError(f"{embeds} must have shape (batch, tokens, {dim}) with batch, tokens >= 1, "
                         f"got {tuple(e.shape)}")
    m = a.get(mask) if mask else None
    if m is not None and (not isinstance(m, torch.Tensor) or tuple(m.shape) != tuple(e.shape[:2])):
        raise ValueError(f"{mask} must have shape {tuple(e.shape[:2])} (the batch and tokens of {embeds}), "
                         f"got {_kind(m)}")


def check_same_batch(a: dict[str, Any], first: str, second: str) -> None:
    """Two tensor arguments that must share the batch dimension do."""
    x, y = a.get(first), a.get(second)
    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape[0] != y.shape[0]:
        raise ValueError(f"{second} has batch {y.shape[0]} but {first} has batch {x.shape[0]}; they must be equal")


def check_latents_shape(a: dict[str, Any], expected: Sequence[int], name: str = "latents") -> None:
    """Caller's latents have the shape the pipeline would have drawn for this request."""
    x = a.get(name)
    if x is None:
        return
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {_kind(x)}")
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} for this request (its size, batch and "
                         f"num_images_per_prompt), got {tuple(x.shape)}")


def _kind(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def callback_tensor_inputs(callback, names: list[str]) -> list[str]:
    """``PipelineCallback`` objects name their own tensor inputs, overriding the call's list (as stock does)."""
    from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

    if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
        return callback.tensor_inputs
    return names


def resolve_callback_inputs(a: dict[str, Any]) -> None:
    """As the stock calls that honour it: a ``PipelineCallback`` names the tensors it reads, overriding
    ``callback_on_step_end_tensor_inputs``."""
    a["callback_on_step_end_tensor_inputs"] = callback_tensor_inputs(a["callback_on_step_end"],
                                                                     a["callback_on_step_end_tensor_inputs"])


def make_step_end(pipe, callback, names: list[str], timesteps, values: Callable[[Any], dict[str, Any]],
                  apply: Callable[[dict[str, Any]], None] | None = None):
    """A ``step_end`` running the pipeline's ``callback_on_step_end`` with the tensors the stock loop offers, or
    None without a callback (nothing then runs between steps, so whole steps can be captured).

    ``values(latents)`` gives every tensor the callback may ask for; ``apply(outputs)`` takes back what the
    callback returned besides the latents (changed prompt embeds, ...).
    """
    if callback is None:
        return None

    def step_end(i: int, x):
        offered = values(x)
        outputs = callback(pipe, i, timesteps[i], {k: offered[k] for k in names})
        x = outputs.pop("latents", x)
        if apply is not None:
            apply(outputs)
        return x

    return step_end


def batched_text_callbacks(text: dict[str, list], parts: dict[str, int], cfg: bool):
    """``(offered, apply)`` for :func:`make_step_end` in pipelines whose stock loop runs ``cat([neg, pos])``.

    ``text[source]`` holds a branch's text tensors; ``parts`` names the ones a callback may read, by index.
    With ``cfg`` the callback sees them batched as stock's locals are (negative first) and a returned tensor is
    split back into the branches; without, the prompt's alone.
    """

    def offered(x) -> dict[str, Any]:
        values = {"latents": x}
        for key, j in parts.items():
            values[key] = torch.cat([text[NEGATIVE][j], text[PROMPT][j]], dim=0) if cfg else text[PROMPT][j]
        return values

    def apply(outputs: dict[str, Any]) -> None:
        for key, j in parts.items():
            if key in outputs:
                value = outputs.pop(key)
                if cfg:
                    text[NEGATIVE][j], text[PROMPT][j] = value.chunk(2)
                else:
                    text[PROMPT][j] = value

    return offered, apply


def run_branches(pipe, names: Sequence[str], x, t: torch.Tensor, run: Callable[[str, Any, torch.Tensor], Any]):
    """One forward per branch (``run(name, latents, timestep)``), for adapters that never batch branches;
    sets the pipeline's ``_current_timestep`` as the stock loop does."""
    pipe._current_timestep = t
    return [run(name, x, t) for name in names]


def begin_call(pipe, **attributes: Any) -> None:
    """Set the per-call attributes the stock ``__call__`` sets (``_guidance_scale=...`` as ``guidance_scale=``),
    with ``_current_timestep`` and ``_interrupt`` cleared: callbacks and the pipeline's properties read them."""
    for name, value in attributes.items():
        setattr(pipe, f"_{name}", value)
    pipe._current_timestep = None
    pipe._interrupt = False


def make_finish(pipe, args: dict[str, Any], decode: Callable[[Any, str], Any], output_class, field: str):
    """The stock call's ending: ``decode(latents, output_type)`` unless ``output_type="latent"``, free the
    offload hooks, then the pipeline's output class (``field=`` the result) or a tuple with ``return_dict=False``."""
    output_type, return_dict = args["output_type"], args["return_dict"]

    def finish(x):
        pipe._current_timestep = None
        result = x if output_type == "latent" else decode(x, output_type)
        pipe.maybe_free_model_hooks()
        if not return_dict:
            return (result,)
        return output_class(**{field: result})

    return finish


def require_negative(policy: GuidancePolicy, available: bool, what: str = "negative_prompt or negative_prompt_embeds"
                     ) -> None:
    """Raise before any compute when a branch of ``policy`` reads a negative prompt the call does not give."""
    if not available and any(policy.branch(name).source == NEGATIVE for name in policy.branches):
        raise ValueError(f"guidance {policy.describe()} needs {what}")


def default_size(pipe, a: dict[str, Any]) -> None:
    """Image pipelines' default ``height`` / ``width``: the transformer's sample size in pixels."""
    a["height"] = a["height"] or pipe.default_sample_size * pipe.vae_scale_factor
    a["width"] = a["width"] or pipe.default_sample_size * pipe.vae_scale_factor


class StepScaledCFG(GuidancePolicy):
    """``u + s_i * (c - u)`` with a scale chosen per step.

    Wan 2.2 switches scale with its expert (``guidance_scale`` / ``guidance_scale_2``); CogVideoX's dynamic
    CFG recomputes it from the timestep. The scales are computed on the host before the loop, with the stock
    pipeline's own Python float arithmetic, so the combine is the stock one bit for bit.
    """

    branches = ("cond", "uncond")
    linear = True

    def __init__(self, scales: Sequence[float]) -> None:
        self.scales = [float(s) for s in scales]

    def kernel_guidance(self, i: int, active: tuple[str, ...]) -> KernelGuidance | None:
        return KernelGuidance(uncond=True, scale=self.scales[i]) if len(active) == 2 else PASS_THROUGH

    def capture_key(self) -> tuple:
        return ()  # the per-step scale is read on device

    def combine(self, preds: dict[str, Prediction], i: int) -> Prediction:
        if len(preds) == 1:
            return preds["cond"]
        c, u = preds["cond"], preds["uncond"]
        return u + self.scales[i] * (c - u)

    def reduce_terms(self, preds, i, like):
        s = self.scales[i]
        return [weighted_sum_fp32(preds, {"cond": s, "uncond": 1.0 - s}, like)]

    def reduce_finish(self, terms, i, like):
        return terms[0].to(like.dtype)

    def describe(self) -> str:
        lo, hi = min(self.scales, default=0.0), max(self.scales, default=0.0)
        return f"StepScaledCFG(scales in [{lo:g}, {hi:g}])"


@contextlib.contextmanager
def branch_forward(transformer, name: str, spec, cache: bool = True, **cache_kwargs):
    """The context one branch's forward runs in: its cache context and its perturbation (if any).

    ``cache=False`` for pipelines whose stock loop opens no cache context (SD3's transformer has none).
    Yields the extra forward keyword arguments the perturbation selects (e.g. SD3's ``skip_layers``).
    """
    from ..guidance.perturb import perturbed

    extra = spec.perturbation.forward_kwargs() if spec.perturbation is not None else {}
    context = transformer.cache_context(name, **cache_kwargs) if cache else contextlib.nullcontext()
    with context, perturbed(transformer, spec.perturbation):
        yield extra


def batch_groups(names: Sequence[str], batch: bool, key: Callable[[str], Any]) -> list[list[str]]:
    """``names`` split into the groups that run as one forward each.

    Without ``batch``, one batch-1 forward per branch, whatever rank runs it: that is what makes every
    cfg_parallel_size give the same bits. With it, branches whose ``key`` is equal (same perturbation, same
    text shapes) share one batched forward.
    """
    groups: list[list[str]] = []
    for name in names:
        fits = [g for g in groups if batch and key(g[0]) == key(name)]
        if fits:
            fits[0].append(name)
        else:
            groups.append([name])
    return groups


def inpaint_step_tensors(pipe, req, channels: int, dtype: torch.dtype, image_latents: torch.Tensor,
                         noise: torch.Tensor) -> dict[str, torch.Tensor]:
    """What a stock inpainting loop blends with after each step, computed before the loop so that captured steps
    replay it: the packed mask (the pipeline's own ``prepare_mask_latents``) and the image latents noised to each
    step's next timestep (clean after the last step).

    ``req`` is the family's request (``args``, ``images`` with ``init``, ``resize_mode`` and ``crops_coords``,
    size, batch, device, the private ``scheduler`` and ``timesteps``).
    """
    a, images = req.args, req.images
    condition = pipe.mask_processor.preprocess(a["mask_image"], height=req.height, width=req.width,
                                               resize_mode=images.resize_mode, crops_coords=images.crops_coords)
    masked = images.init * (condition < 0.5) if a["masked_image_latents"] is None else a["masked_image_latents"]
    mask, _ = pipe.prepare_mask_latents(condition, masked, req.batch_size, channels, a["num_images_per_prompt"],
                                        req.height, req.width, dtype, req.device, a["generator"])
    # as the stock blend reads them after step i: ``scale_noise`` on a copy of the scheduler standing at that step
    noiser, begin = copy.deepcopy(req.scheduler), req.scheduler.begin_index
    noised = []
    for i in range(len(req.timesteps) - 1):
        noiser.set_begin_index(begin + i + 1)
        noised.append(noiser.scale_noise(image_latents, torch.tensor([req.timesteps[i + 1]]), noise))
    return {"mask": mask, "noised_image_latents": torch.stack([*noised, image_latents])}
