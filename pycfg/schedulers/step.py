from __future__ import annotations

from typing import Any, Sequence

import torch

from ..steps import StepIndex


def tensors_in(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensors held in an object's attributes (directly or in lists/tuples), by dotted name."""
    found: dict[str, torch.Tensor] = {}
    for key, value in sorted(vars(obj).items()):
        if isinstance(value, torch.Tensor):
            found[prefix + key] = value
        elif isinstance(value, (list, tuple)):
            for j, item in enumerate(value):
                if isinstance(item, torch.Tensor):
                    found[f"{prefix}{key}[{j}]"] = item
    return found


class SchedulerStep:
    """x_{i+1} = scheduler.step(guided, t_i, x_i) on a scheduler copy that only this request uses."""

    fused = False

    def __init__(self, scheduler: Any, timesteps: Sequence[torch.Tensor], step_kwargs: dict | None = None) -> None:
        self.scheduler = scheduler
        self.timesteps = timesteps
        self.step_kwargs = step_kwargs or {}

    @property
    def order(self) -> int:
        return getattr(self.scheduler, "order", 1)

    def __call__(self, guided: torch.Tensor, step: StepIndex, latents: torch.Tensor) -> torch.Tensor:
        return self.scheduler.step(guided, self.timesteps[step.i], latents, **self.step_kwargs, return_dict=False)[0]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return tensors_in(self.scheduler, "scheduler.")

    def describe(self) -> str:
        return f"{type(self.scheduler).__name__}.step() (reference)"
