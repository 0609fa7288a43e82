"""What an adapter hands the runtime for one request: no diffusers types cross this line."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Sequence

import torch

from ..guidance.base import GuidancePolicy, Prediction  # noqa: F401  (re-exported for the runtime)


@dataclass
class Job:
    latents: Any
    num_steps: int
    policy: GuidancePolicy
    #: forward(branch names, latents, step) -> one prediction per name, in order
    forward: Callable[[tuple[str, ...], Any, int], list[Prediction]]
    #: update(guided prediction, step, latents) -> next latents (scheduler step, or the fused kernel)
    update: Callable[[Prediction, int, Any], Any]
    #: (shape, dtype) of each output of one branch's prediction, so idle ranks need no forward to know it
    prediction_spec: Sequence[tuple[tuple[int, ...], torch.dtype]]
    device: torch.device
    #: finish(latents) -> the pipeline's own output
    finish: Callable[[Any], Any]
    #: step_end(step, latents) -> latents: the pipeline's callbacks; runs on every rank
    step_end: Callable[[int, Any], Any] | None = None
    interrupted: Callable[[], bool] = lambda: False
    progress: Callable[[int, bool], ContextManager] = field(default=lambda total, enabled: contextlib.nullcontext())
    #: solver state carried across steps (checked for rank consistency)
    state_tensors: Callable[[], dict[str, torch.Tensor]] = dict
    #: why one captured step cannot serve every step of this request (e.g. the model changes mid-run); None if it can
    not_graphable: str | None = None
    #: graph_inputs() -> by name, every tensor of this request that ``forward`` reads (texts, timesteps, ...),
    #: none of them the caller's own. A step captured for an earlier request of the same shape is replayed after
    #: these values are copied into that request's tensors. None: captured steps serve one request only.
    graph_inputs: Callable[[], dict[str, torch.Tensor]] | None = None
