"""The guidance-policy contract the runtime relies on.

A policy names its branches, says which are active at step i, and turns the branch predictions into the
guided prediction. The runtime never looks inside: it dispatches the active branches over ranks, moves their
predictions with one collective, and hands them back here.

Branches are declared with :class:`Branch`: a name and where the branch's inputs come from (the request's
prompt or negative prompt), optionally with a :class:`~pycfg.guidance.perturb.Perturbation` of the forward.
Adapters read ``policy.branch(name)`` to build each branch's inputs; they never special-case policy classes.

Two ways in:
- ``combine(preds, i)`` gets every active branch's prediction (the ``gather`` exchange) and must use the same
  arithmetic, in the same order, as the stock pipeline, so parallel output is bit-identical to sequential.
- ``reduce_terms`` / ``reduce_finish`` (the ``reduce`` exchange, linear policies only): each rank turns the
  branches it ran into fp32 terms whose element-wise sum over ranks is everything ``reduce_finish`` needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..kernels.guidance import KernelGuidance
from .perturb import Perturbation

Prediction = Any  # one tensor, or a tuple of tensors for models with several outputs

#: where a branch's inputs come from
PROMPT = "prompt"
NEGATIVE = "negative"
SOURCES = (PROMPT, NEGATIVE)


@dataclass(frozen=True)
class Branch:
    """One guidance branch: its name, the request inputs it reads, and an optional perturbed forward.

    ``source="prompt"`` runs the cond inputs, ``"negative"`` the negative prompt's; a ``perturbation``
    (e.g. ``SkipBlocks([7])``) runs that forward through a weakened transformer.
    """

    name: str
    source: str = PROMPT
    perturbation: Perturbation | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a branch name must be a non-empty string, got {self.name!r}")
        if self.source not in SOURCES:
            raise ValueError(f"branch {self.name!r}: source must be one of {SOURCES}, got {self.source!r}")
        if self.perturbation is not None and not isinstance(self.perturbation, Perturbation):
            raise TypeError(f"branch {self.name!r}: perturbation must be a pycfg.guidance.perturb spec")

    def describe(self) -> str:
        extra = f", {self.perturbation.describe()}" if self.perturbation is not None else ""
        return f"{self.name}<-{self.source}{extra}"


COND = Branch("cond", PROMPT)
UNCOND = Branch("uncond", NEGATIVE)


PASS_THROUGH = KernelGuidance()


class GuidancePolicy:
    """Base class for guidance policies. Subclasses set ``branches`` and override the maths."""

    #: every branch this policy may use, in the order the stock pipeline runs them
    branches: tuple[str, ...] = ("cond",)
    #: True when the guided prediction is a fixed linear function of the branches plus side channels
    linear: bool = True
    #: True when the host numbers ``combine`` / ``reduce_terms`` use (weights, flags) are the same at every step
    #: with the same active branches and the policy keeps no state across steps: a step captured once then
    #: serves every step with those branches, whatever the exchange
    constant_weights: bool = False

    def branch(self, name: str) -> Branch:
        """The declaration of branch ``name``: where its inputs come from and how its forward is perturbed."""
        specs = self.branch_specs()
        if name not in specs:
            raise KeyError(f"{self.describe()} has no branch {name!r}; its branches: {', '.join(self.branches)}")
        return specs[name]

    def branch_specs(self) -> dict[str, Branch]:
        """Every branch's declaration, by name (``cond`` from the prompt, ``uncond`` from the negative)."""
        return {b.name: b for b in (COND, UNCOND) if b.name in self.branches}

    def check_model(self, transformer: torch.nn.Module) -> None:
        """Raise if a perturbation cannot apply to ``transformer`` (layer out of range, unknown block class)."""
        for spec in self.branch_specs().values():
            if spec.perturbation is not None:
                spec.perturbation.check(transformer)

    def check_outputs(self, num_outputs: int) -> None:
        """Raise if this policy cannot combine predictions with ``num_outputs`` outputs per branch.

        The default combines single tensors; policies that handle tuple predictions (video + audio) override it.
        """
        if num_outputs > 1:
            raise ValueError(
                f"{self.describe()} combines single-tensor predictions, but this pipeline predicts {num_outputs} "
                "outputs per branch: use pycfg.guidance.MultiBranch (per-output scales) or the pipeline's default"
            )

    def set_timesteps(self, timesteps: Sequence[float]) -> None:
        """The request's timestep values, for schedules that depend on t (called by adapters before ``reset``)."""
        self.timesteps = [float(t) for t in timesteps]

    def reset(self, num_steps: int) -> None:
        """Called once per request before step 0; resets any state kept across steps."""
        self.num_steps = num_steps

    def active(self, i: int) -> tuple[str, ...]:
        """Branches that run at step ``i``; the first one is the one run alone when only one is active."""
        return self.branches

    def combine(self, preds: dict[str, Prediction], i: int) -> Prediction:
        """Guided prediction from every active branch (exact: the stock pipeline's arithmetic order)."""
        (name,) = preds
        return preds[name]

    def reduce_terms(self, preds: dict[str, Prediction], i: int, like: Prediction) -> list[torch.Tensor]:
        """fp32 terms this rank contributes, given the branches it ran (possibly none).

        ``like`` has the prediction's shape and dtype; use it to build zeros for terms this rank does not own.
        Every rank must return the same shapes in the same order.
        """
        raise NotImplementedError(f"{type(self).__name__} has no reduce path; use exchange='gather'")

    def reduce_finish(self, terms: list[torch.Tensor], i: int, like: Prediction) -> Prediction:
        """Guided prediction from the summed terms, cast to ``like``'s dtype."""
        raise NotImplementedError(f"{type(self).__name__} has no reduce path; use exchange='gather'")

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors carried across steps (checked for rank consistency)."""
        return {}

    def kernel_guidance(self, i: int, active: tuple[str, ...]) -> KernelGuidance | None:
        """What the fused kernel computes at step ``i`` with these branches active, or None when the kernel
        cannot compute this policy's combine (the combine then runs in PyTorch and the kernel does the solver
        update alone). Only single-output predictions reach the kernel."""
        return None

    def capture_key(self) -> tuple:
        """What a captured step bakes in of this policy besides the active branches and the kernel's structure
        (the default, the full description, is always safe; policies whose scale is read on device leave it
        out)."""
        return (self.describe(),)

    def describe(self) -> str:
        return type(self).__name__


def weighted_sum_fp32(preds: dict[str, torch.Tensor], weights: dict[str, float], like: torch.Tensor) -> torch.Tensor:
    """sum(w_b * pred_b) over the branches present, accumulated in fp32; zeros when none are present."""
    total = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
    for name, pred in preds.items():
        total.add_(pred.float(), alpha=weights[name])
    return total


def outputs_of(pred: Prediction) -> list[torch.Tensor]:
    return list(pred) if isinstance(pred, tuple) else [pred]


def per_sample_std(x: torch.Tensor) -> torch.Tensor:
    return x.std(dim=list(range(1, x.ndim)), keepdim=True)


def rescale_to(comb: torch.Tensor, cond_std: torch.Tensor, factor: float) -> torch.Tensor:
    """Guidance rescale (``rescale_noise_cfg``): blend ``comb`` with itself scaled to the cond's per-sample std."""
    rescaled = comb * (cond_std / per_sample_std(comb))
    return factor * rescaled + (1 - factor) * comb


def renorm_to(comb: torch.Tensor, cond_norm: torch.Tensor) -> torch.Tensor:
    """Qwen-Image's renormalisation: each token of ``comb`` gets the cond's per-token norm (last dim)."""
    return comb * (cond_norm / torch.norm(comb, dim=-1, keepdim=True))


class LinearPolicy(GuidancePolicy):
    """A policy whose guided prediction is ``post(sum_b w_b(i) * pred_b)``, with ``post`` depending on the
    base branch only through per-token norms (``renorm``) and per-sample stds (``rescale``).

    Subclasses implement ``weights(i, active, output)`` and the exact ``combine``; this class provides the
    ``reduce`` exchange: each rank's fp32 partial sum plus the base branch's side channels, per output.
    """

    linear = True
    renorm: bool = False
    rescale: float = 0.0
    base: str = "cond"

    def weights(self, i: int, active: tuple[str, ...], output: int) -> dict[str, float]:
        raise NotImplementedError

    def kernel_guidance(self, i: int, active: tuple[str, ...]) -> KernelGuidance | None:
        """The kernel computes ``u + s (c - u)`` then ``post``: any step whose only active branches are cond and
        uncond with weights (s, 1 - s) fits."""
        if self.base != "cond" or set(active) != {"cond", "uncond"}:
            return None
        w = self.weights(i, tuple(active), 0)
        if w["cond"] + w["uncond"] != 1.0:
            return None
        return KernelGuidance(uncond=True, scale=w["cond"], renorm=self.renorm, rescale=self.rescale_factor(0))

    def rescale_factor(self, output: int) -> float:
        return self.rescale

    def post(self, comb: torch.Tensor, cond_norm, cond_std, output: int = 0) -> torch.Tensor:
        factor = self.rescale_factor(output)
        if factor > 0.0:
            comb = rescale_to(comb, cond_std, factor)
        if self.renorm:
            comb = renorm_to(comb, cond_norm)
        return comb

    def post_exact(self, comb: torch.Tensor, cond: torch.Tensor, output: int = 0) -> torch.Tensor:
        """``post`` with the side channels computed from the base branch's prediction (the gather path)."""
        cond_norm = torch.norm(cond, dim=-1, keepdim=True) if self.renorm else None
        cond_std = per_sample_std(cond) if self.rescale_factor(output) > 0.0 else None
        return self.post(comb, cond_norm, cond_std, output)

    def reduce_terms(self, preds: dict[str, Prediction], i: int, like: Prediction) -> list[torch.Tensor]:
        active = self.active(i)
        unknown = set(preds) - set(active)
        if unknown:
            raise ValueError(f"{self.describe()}: branches {sorted(unknown)} are not active at step {i}")
        terms = []
        for k, like_k in enumerate(outputs_of(like)):
            mine = {name: outputs_of(p)[k] for name, p in preds.items()}
            terms.append(weighted_sum_fp32(mine, self.weights(i, active, k), like_k))
            base = mine.get(self.base)
            if self.renorm:
                terms.append(
                    torch.norm(base.float(), dim=-1, keepdim=True)
                    if base is not None
                    else like_k.new_zeros((*like_k.shape[:-1], 1), dtype=torch.float32)
                )
            if self.rescale_factor(k) > 0.0:
                terms.append(
                    per_sample_std(base.float())
                    if base is not None
                    else like_k.new_zeros((like_k.shape[0],) + (1,) * (like_k.ndim - 1), dtype=torch.float32)
                )
        return terms

    def reduce_finish(self, terms: list[torch.Tensor], i: int, like: Prediction) -> Prediction:
        rest = list(terms)
        outs = []
        for k, like_k in enumerate(outputs_of(like)):
            comb = rest.pop(0)
            cond_norm = rest.pop(0) if self.renorm else None
            cond_std = rest.pop(0) if self.rescale_factor(k) > 0.0 else None
            outs.append(self.post(comb, cond_norm, cond_std, k).to(like_k.dtype))
        return tuple(outs) if isinstance(like, tuple) else outs[0]


def check_window(name: str, start: float, stop: float) -> None:
    for v in (start, stop):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name}: start and stop must be numbers in [0, 1], got start={start!r}, stop={stop!r}")
    if not (0.0 <= start <= 1.0 and 0.0 <= stop <= 1.0):
        raise ValueError(f"{name}: start and stop must lie in [0, 1], got start={start}, stop={stop}")
    if start > stop:
        raise ValueError(f"{name}: start must not exceed stop, got start={start}, stop={stop}")


def in_window(i: int, num_steps: int, start: float, stop: float) -> bool:
    """diffusers' guider convention: active while int(start*N) <= i < int(stop*N)."""
    return int(start * num_steps) <= i < int(stop * num_steps)


def check_scale(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    return float(value)
