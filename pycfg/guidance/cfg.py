"""Classifier-free guidance as diffusers pipelines compute it, plus the single-branch (no guidance) case."""

from __future__ import annotations

import torch

from .base import GuidancePolicy, Prediction, check_window, in_window, weighted_sum_fp32


class NoGuidance(GuidancePolicy):
    """One branch, no combine: requests without guidance run it on every rank with no collective."""

    branches = ("cond",)


def _per_sample_std(x: torch.Tensor) -> torch.Tensor:
    return x.std(dim=list(range(1, x.ndim)), keepdim=True)


class CFG(GuidancePolicy):
    """``u + scale * (c - u)`` (or ``c + scale * (c - u)`` with ``original_formulation``).

    ``renorm``: Qwen-Image's per-token renormalisation ``p * ||c|| / ||p||`` over the last dim.
    ``rescale``: std-based guidance rescale (``rescale_noise_cfg``) with factor ``rescale``.
    ``start`` / ``stop``: the step window, as fractions of the run, outside which only ``cond`` runs.
    """

    branches = ("cond", "uncond")
    linear = True

    def __init__(
        self,
        scale: float,
        renorm: bool = False,
        rescale: float = 0.0,
        start: float = 0.0,
        stop: float = 1.0,
        original_formulation: bool = False,
    ) -> None:
        check_window("CFG", start, stop)
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"CFG: rescale must lie in [0, 1], got {rescale}")
        self.scale = float(scale)
        self.renorm = bool(renorm)
        self.rescale = float(rescale)
        self.start, self.stop = float(start), float(stop)
        self.original_formulation = bool(original_formulation)
        self.num_steps = 0

    def active(self, i: int) -> tuple[str, ...]:
        if in_window(i, self.num_steps, self.start, self.stop):
            return self.branches
        return ("cond",)

    def _post(self, comb: torch.Tensor, cond_norm, cond_std) -> torch.Tensor:
        if self.rescale > 0.0:
            rescaled = comb * (cond_std / _per_sample_std(comb))
            comb = self.rescale * rescaled + (1 - self.rescale) * comb
        if self.renorm:
            comb = comb * (cond_norm / torch.norm(comb, dim=-1, keepdim=True))
        return comb

    def combine(self, preds: dict[str, Prediction], i: int) -> Prediction:
        if len(preds) == 1:
            return preds["cond"]
        c, u = preds["cond"], preds["uncond"]
        if self.original_formulation:
            comb = c + self.scale * (c - u)
        else:
            comb = u + self.scale * (c - u)
        cond_norm = torch.norm(c, dim=-1, keepdim=True) if self.renorm else None
        cond_std = _per_sample_std(c) if self.rescale > 0.0 else None
        return self._post(comb, cond_norm, cond_std)

    def _weights(self) -> dict[str, float]:
        if self.original_formulation:
            return {"cond": 1.0 + self.scale, "uncond": -self.scale}
        return {"cond": self.scale, "uncond": 1.0 - self.scale}

    def reduce_terms(self, preds: dict[str, Prediction], i: int, like: Prediction) -> list[torch.Tensor]:
        terms = [weighted_sum_fp32(preds, self._weights(), like)]
        cond = preds.get("cond")
        if self.renorm:
            shape = (*like.shape[:-1], 1)
            terms.append(
                torch.norm(cond.float(), dim=-1, keepdim=True)
                if cond is not None
                else torch.zeros(shape, dtype=torch.float32, device=like.device)
            )
        if self.rescale > 0.0:
            shape = (like.shape[0],) + (1,) * (like.ndim - 1)
            terms.append(
                _per_sample_std(cond.float())
                if cond is not None
                else torch.zeros(shape, dtype=torch.float32, device=like.device)
            )
        return terms

    def reduce_finish(self, terms: list[torch.Tensor], i: int, like: Prediction) -> Prediction:
        comb, rest = terms[0], list(terms[1:])
        cond_norm = rest.pop(0) if self.renorm else None
        cond_std = rest.pop(0) if self.rescale > 0.0 else None
        return self._post(comb, cond_norm, cond_std).to(like.dtype)

    def describe(self) -> str:
        extras = []
        if self.renorm:
            extras.append("renorm")
        if self.rescale:
            extras.append(f"rescale={self.rescale}")
        if (self.start, self.stop) != (0.0, 1.0):
            extras.append(f"window=[{self.start}, {self.stop})")
        return f"CFG(scale={self.scale}{''.join(', ' + e for e in extras)})"
