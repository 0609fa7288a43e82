"""Shared pieces of the adapters: argument binding, the private scheduler copy, callbacks, progress bars."""

from __future__ import annotations

import contextlib
import copy
import inspect
import sys
from types import ModuleType
from typing import Any

import torch

from ..schedulers import SchedulerStep


class Adapter:
    """Turns one pipeline call into a :class:`~pycfg.runtime.job.Job`, and back into the pipeline's output."""

    pipeline_classes: tuple[str, ...] = ()

    def __init__(self, pipe, fused: bool | None = None) -> None:
        self.pipe = pipe
        self.fused = fused
        self.signature = inspect.signature(type(pipe).__call__)

    def make_update(self, scheduler, timesteps, **step_kwargs):
        """The per-step update for a configured private scheduler: the seam where the fused kernel plugs in."""
        return SchedulerStep(scheduler, timesteps, step_kwargs)

    @property
    def module(self) -> ModuleType:
        """The pipeline's own module, for its helpers (``retrieve_timesteps``, ``calculate_shift``, ...)."""
        return sys.modules[type(self.pipe).__module__]

    def bind(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The call's arguments with the pipeline's defaults filled in; unknown names raise TypeError."""
        try:
            bound = self.signature.bind(self.pipe, **kwargs)
        except TypeError as err:
            allowed = [p for p in self.signature.parameters if p != "self"]
            raise TypeError(f"{type(self.pipe).__name__}: {err}; allowed arguments: {', '.join(allowed)}") from None
        bound.apply_defaults()
        args = dict(bound.arguments)
        args.pop("self")
        return args

    def private_scheduler(self):
        """A copy of the pipeline's scheduler for one request: the user's object is never stepped."""
        return copy.deepcopy(self.pipe.scheduler)

    def progress(self, total: int, enabled: bool):
        """The pipeline's own progress bar (honouring ``set_progress_bar_config``) on one rank only."""
        if enabled:
            return self.pipe.progress_bar(total=total)
        return contextlib.nullcontext()


def own_tensor(t: torch.Tensor | None, original: torch.Tensor | None) -> torch.Tensor | None:
    """``t``, copied if it still shares memory with the caller's ``original`` (so nothing of theirs is written)."""
    if t is None or original is None or not isinstance(original, torch.Tensor):
        return t
    if t.untyped_storage().data_ptr() == original.untyped_storage().data_ptr():
        return t.clone()
    return t
