"""Small helpers several test modules share."""

from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of ``b`` (in float64)."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


class ForwardCounter:
    """Counts a module's forward calls (a pre-hook: the forward itself is untouched)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        module.register_forward_pre_hook(self._count)

    def _count(self, *args) -> None:
        self.calls += 1
