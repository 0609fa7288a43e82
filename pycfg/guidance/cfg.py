"""Classifier-free guidance and its two-branch variants, with the arithmetic of diffusers' guiders/pipelines.

Every ``combine`` reproduces the reference's operation order, so the ``gather`` exchange is bit-identical to
the sequential pipeline; the linear ones also provide the ``reduce`` exchange through :class:`LinearPolicy`.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .base import (
    PASS_THROUGH,
    GuidancePolicy,
    KernelGuidance,
    LinearPolicy,
    Prediction,
    check_scale,
    check_window,
    in_window,
    per_sample_std,
    rescale_to,
)


class NoGuidance(GuidancePolicy):
    """One branch, no combine: requests without guidance run it on every rank with no collective."""

    branches = ("cond",)
    constant_weights = True

    def check_outputs(self, num_outputs: int) -> None:
        pass  # passes the branch's prediction through, whatever its structure

    def kernel_guidance(self, i: int, active: tuple[str, ...]) -> KernelGuidance | None:
        return PASS_THROUGH

    def capture_key(self) -> tuple:
        return ()


def _check_rescale(name: str, rescale: float) -> float:
    rescale = check_scale(f"{name}: rescale", rescale)
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"{name}: rescale must lie in [0, 1], got {rescale}")
    return rescale


def _window_text(start: float, stop: float) -> str:
    return "" if (start, stop) == (0.0, 1.0) else f", window=[{start}, {stop})"


class CFG(LinearPolicy):
    """``u + scale * (c - u)`` (or ``c + scale * (c - u)`` with ``original_formulation``).

    ``renorm``: Qwen-Image's per-token renormalisation ``p * ||c|| / ||p||`` over the last dim.
    ``rescale``: std-based guidance rescale (``rescale_noise_cfg``) with factor ``rescale``.
    ``start`` / ``stop``: the step window, as fractions of the run, outside which only ``cond`` runs. As in
    diffusers' ``ClassifierFreeGuidance``, a scale of 1 (0 with ``original_formulation``) runs ``cond`` only.
    """

    branches = ("cond", "uncond")
    constant_weights = True

    def __init__(
        self,
        scale: float,
        renorm: bool = False,
        rescale: float = 0.0,
        start: float = 0.0,
        stop: float = 1.0,
        original_formulation: bool = False,
    ) -> None:
        name = type(self).__name__
        check_window(name, start, stop)
        self.scale = check_scale(f"{name}: scale", scale)
        self.renorm = bool(renorm)
        self.rescale = _check_rescale(name, rescale)
        self.start, self.stop = float(start), float(stop)
        self.original_formulation = bool(original_formulation)
        self.num_steps = 0

    def scale_at(self, i: int) -> float:
        """The guidance scale at step ``i`` (constant here; per-step schedules override this)."""
        return self.scale

    def _neutral(self) -> bool:
        return math.isclose(self.scale, 0.0 if self.original_formulation else 1.0)

    def active(self, i: int) -> tuple[str, ...]:
        if in_window(i, self.num_steps, self.start, self.stop) and not self._neutral():
            return self.branches
        return ("cond",)

    def combine(self, preds: dict[str, Prediction], i: int) -> Prediction:
        if len(preds) == 1:
            return preds["cond"]
        c, u = preds["cond"], preds["uncond"]
        s = self.scale_at(i)
        # the pipelines' own order: u + s * (c - u)
        comb = c + s * (c - u) if self.original_formulation else u + s * (c - u)
        return self.post_exact(comb, c)

    def weights(self, i: int, active: tuple[str, ...], output: int) -> dict[str, float]:
        s = self.scale_at(i)
        if self.original_formulation:
            return {"cond": 1.0 + s, "uncond": -s}
        return {"cond": s, "uncond": 1.0 - s}

    def kernel_guidance(self, i: int, active: tuple[str, ...]) -> KernelGuidance | None:
        if len(active) == 1:
            return PASS_THROUGH  # outside the window (or neutral): cond alone, unchanged
        return KernelGuidance(uncond=True, scale=self.scale_at(i), original=self.original_formulation,
                              renorm=self.renorm, rescale=self.rescale)

    def capture_key(self) -> tuple:
        # the scale is read on device; the window only selects active sets, which key the captured steps
        return (self.renorm, self.rescale, self.original_formulation)

    def _extras(self) -> str:
        extras = []
        if self.renorm:
            extras.append("renorm")
        if self.rescale:
            extras.append(f"rescale={self.rescale}")
        if self.original_formulation:
            extras.append("original_formulation")
        return "".join(", " + e for e in extras) + _window_text(self.start, self.stop)

    def describe(self) -> str:
        return f"{type(self).__name__}(scale={self.scale}{self._extras()})"


class DynamicCFG(CFG):
    """CFG with CogVideoX's cosine schedule: ``w_t = 1 + scale * (1 - cos(pi * ((N - t) / N) ** 5)) / 2``.

    ``t`` is the step's timestep value and ``N`` the number of steps, exactly as CogVideoX's pipeline computes
    it (``use_dynamic_cfg=True``). Adapters pass the timesteps with ``set_timesteps``; both branches run at
    every step inside the window, as in that pipeline.
    """

    constant_weights = False  # the scale changes every step (a captured step reads it from device memory)

    def scale_at(self, i: int) -> float:
        timesteps = getattr(self, "timesteps", None)
        if timesteps is None:
            raise RuntimeError("DynamicCFG needs the request's timesteps; the adapter must call set_timesteps()")
        n = self.num_steps
        return 1 + self.scale * ((1 - math.cos(math.pi * ((n - timesteps[i]) / n) ** 5.0)) / 2)

    def active(self, i: int) -> tuple[str, ...]:
        if in_window(i, self.num_steps, self.start, self.stop):
            return self.branches
        return ("cond",)


def zero_star_alpha(cond: torch.Tensor, uncond: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """CFG-Zero*'s optimised scale ``<c, u> / (||u||^2 + eps)`` per sample, in fp32, cast back to c's dtype."""
    c = cond.flatten(1).float()
    u = uncond.flatten(1).float()
    alpha = torch.sum(c * u, dim=1, keepdim=True) / (torch.sum(u**2, dim=1, keepdim=True) + eps)
    return alpha.to(cond.dtype).view(-1, *(1,) * (cond.ndim - 1))


class CFGZeroStar(GuidancePolicy):
    """CFG-Zero*: ``alpha * u + scale * (c - alpha * u)`` with the per-sample ``alpha`` above; the guided
    prediction is zero for the first ``zero_init_steps`` steps (diffusers' ``ClassifierFreeZeroStarGuidance``).

    Not linear in the predictions (``alpha`` needs both branches): use the ``gather`` exchange. Zero-init steps
    run the cond branch alone, on every rank and without a collective, instead of both branches.
    """

    branches = ("cond", "uncond")
    linear = False

    def __init__(
        self,
        scale: float,
        zero_init_steps: int = 1,
        rescale: float = 0.0,
        start: float = 0.0,
        stop: float = 1.0,
        original_formulation: bool = False,
    ) -> None:
        check_window("CFGZeroStar", start, stop)
        if isinstance(zero_init_steps, bool) or not isinstance(zero_init_steps, int) or zero_init_steps < 0:
            raise ValueError(f"CFGZeroStar: zero_init_steps must be a non-negative integer, got {zero_init_steps!r}")
        self.scale = check_scale("CFGZeroStar: scale", scale)
        self.zero_init_steps = zero_init_steps
        self.rescale = _check_rescale("CFGZeroStar", rescale)
        self.start, self.stop = float(start), float(stop)
        self.original_formulation = bool(original_formulation)
        self.num_steps = 0

    def _cfg_enabled(self, i: int) -> bool:
        neutral = math.isclose(self.scale, 0.0 if self.original_formulation else 1.0)
        return in_window(i, self.num_steps, self.start, self.stop) and not neutral

    def active(self, i: int) -> tuple[str, ...]:
        if i >= self.zero_init_steps and self._cfg_enabled(i):
            return self.branches
        return ("cond",)

    def combine(self, preds: dict[str, Prediction], i: int) -> Prediction:
        c = preds["cond"]
        if i < self.zero_init_steps:
            return torch.zeros_like(c)
        if len(preds) == 1:
            pred = c
        else:
            u = preds["uncond"] * zero_star_alpha(c, preds["uncond"])
            shift = c - u
            pred = (c if self.original_formulation else u) + self.scale * shift
        if self.rescale > 0.0:
            pred = rescale_to(pred, per_sample_std(c), self.rescale)
        return pred

    def describe(self) -> str:
        extra = f", rescale={self.rescale}" if self.rescale else ""
        extra += ", original_formulation" if self.original_formulation else ""
        return (f"CFGZeroStar(scale={self.scale}, zero_init_steps={self.zero_init_steps}{extra}"
                f"{_window_text(self.start, self.stop)})")


class APG(GuidancePolicy):
    """Adaptive projected guidance (diffusers' ``AdaptiveProjectedGuidance``).

    ``d = c - u``; with ``momentum`` the running average ``R <- d + momentum * R`` replaces ``d`` (state kept
    across the steps of one request, reset per request); ``d`` is clipped to norm ``norm_threshold`` (0: no
    clipping), split in fp64 into parts parallel and orthogonal to ``c``, and ``u + scale * (d_orth + eta *
    d_par)`` is the guided prediction. Norms run over ``norm_dim`` (default: every non-batch dim).

    Not linear in the predictions: use the ``gather`` exchange. Every rank updates the same momentum from the
    same gathered bits, so the state stays identical on all ranks.
    """

    branches = ("cond", "uncond")
    linear = False

    def __init__(
        self,
        scale: float,
        momentum: float | None = None,
        norm_threshold: float = 15.0,
        eta: float = 1.0,
        rescale: float = 0.0,
        start: float = 0.0,
        stop: float = 1.0,
        original_formulation: bool = False,
        norm_dim: int | Sequence[int] | None = None,
    ) -> None:
        check_window("APG", start, stop)
        self.scale = check_scale("APG: scale", scale)
        self.momentum = None if momentum is None else check_scale("APG: momentum", momentum)
        self.norm_threshold = check_scale("APG: norm_threshold", norm_threshold)
        if self.norm_threshold < 0:
            raise ValueError(f"APG: norm_threshold must be >= 0, got {norm_threshold}")
        self.eta = check_scale("APG: eta", eta)
        self.rescale = _check_rescale("APG", rescale)
        self.start, self.stop = float(start), float(stop)
        self.original_formulation = bool(original_formulation)
        self.norm_dim = norm_dim if norm_dim is None or isinstance(norm_dim, int) else tuple(norm_dim)
        self.num_steps = 0
        self.running: torch.Tensor | float = 0.0

    def reset(self, num_steps: int) -> None:
        super().reset(num_steps)
        self.running = 0.0

    def active(self, i: int) -> tuple[str, ...]:
        neutral = math.isclose(self.scale, 0.0 if self.original_formulation else 1.0)
        if in_window(i, self.num_steps, self.start, self.stop) and not neutral:
            return self.branches
        return ("cond",)

    def _dims(self, ndim: int) -> list[int]:
        if self.norm_dim is None:
            return [-k for k in range(1, ndim)]
        return [self.norm_dim] if isinstance(self.norm_dim, int) else list(self.norm_dim)

    def combine(self, preds: dict[str, Prediction], i: int) -> Prediction:
        c = preds["cond"]
        if len(preds) == 1:
            pred = c
        else:
            u = preds["uncond"]
            diff = c - u
            dims = self._dims(diff.ndim)
            if self.momentum is not None:
                self.running = diff + self.momentum * self.running
                diff = self.running
            if self.norm_threshold > 0:
                norm = diff.norm(p=2, dim=dims, keepdim=True)
                diff = diff * torch.minimum(torch.ones_like(diff), self.norm_threshold / norm)
            d64 = diff.double()
            unit = torch.nn.functional.normalize(c.double(), dim=dims)
            parallel = (d64 * unit).sum(dim=dims, keepdim=True) * unit
            orthogonal = (d64 - parallel).to(diff.dtype)
            update = orthogonal + self.eta * parallel.to(diff.dtype)
            pred = (c if self.original_formulation else u) + self.scale * update
        if self.rescale > 0.0:
            pred = rescale_to(pred, per_sample_std(c), self.rescale)
        return pred

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"apg.momentum": self.running} if isinstance(self.running, torch.Tensor) else {}

    def describe(self) -> str:
        return (f"APG(scale={self.scale}, momentum={self.momentum}, norm_threshold={self.norm_threshold}, "
                f"eta={self.eta}, rescale={self.rescale}, original_formulation={self.original_formulation}, "
                f"norm_dim={self.norm_dim}{_window_text(self.start, self.stop)})")
