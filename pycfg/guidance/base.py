"""The guidance-policy contract the runtime relies on.

A policy names its branches, says which are active at step i, and turns the branch predictions into the
guided prediction. The runtime never looks inside: it dispatches the active branches over ranks, moves their
predictions with one collective, and hands them back here.

Two ways in:
- ``combine(preds, i)`` gets every active branch's prediction (the ``gather`` exchange) and must use the same
  arithmetic, in the same order, as the stock pipeline, so parallel output is bit-identical to sequential.
- ``reduce_terms`` / ``reduce_finish`` (the ``reduce`` exchange, linear policies only): each rank turns the
  branches it ran into fp32 terms whose element-wise sum over ranks is everything ``reduce_finish`` needs.
"""

from __future__ import annotations

from typing import Sequence

import torch

Prediction = torch.Tensor


class GuidancePolicy:
    """Base class for guidance policies. Subclasses set ``branches`` and override the maths."""

    #: every branch this policy may use, in the order the stock pipeline runs them
    branches: tuple[str, ...] = ("cond",)
    #: True when the guided prediction is a fixed linear function of the branches plus side channels
    linear: bool = True

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

    def describe(self) -> str:
        return type(self).__name__


def weighted_sum_fp32(preds: dict[str, Prediction], weights: dict[str, float], like: Prediction) -> torch.Tensor:
    """sum(w_b * pred_b) over the branches present, accumulated in fp32; zeros when none are present."""
    total = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
    for name, pred in preds.items():
        total.add_(pred.float(), alpha=weights[name])
    return total


def check_window(name: str, start: float, stop: float) -> None:
    if not (0.0 <= start <= 1.0 and 0.0 <= stop <= 1.0):
        raise ValueError(f"{name}: start and stop must lie in [0, 1], got start={start}, stop={stop}")
    if start > stop:
        raise ValueError(f"{name}: start must not exceed stop, got start={start}, stop={stop}")


def in_window(i: int, num_steps: int, start: float, stop: float) -> bool:
    """diffusers' guider convention: active while int(start*N) <= i < int(stop*N)."""
    return int(start * num_steps) <= i < int(stop * num_steps)


def names(seq: Sequence[str]) -> tuple[str, ...]:
    return tuple(seq)
