"""What an adapter hands the runtime for one request: no diffusers types cross this line."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Protocol, Sequence

import torch

from ..guidance.base import GuidancePolicy, Prediction  # noqa: F401  (re-exported for the runtime)
from ..steps import StepIndex


class Forward(Protocol):
    def __call__(self, names: tuple[str, ...], latents: Any, step: StepIndex, batched: bool) -> list[Prediction]:
        """One prediction per name, in order. ``batched``: same-shape branches may share one batched forward
        (a per-request choice of the runtime); otherwise one batch-1 forward per branch, the stock numerics."""
        ...


class Update(Protocol):
    """The per-step solver update: the scheduler's own ``step()`` (:class:`pycfg.schedulers.SchedulerStep`), the
    fused kernel (:class:`pycfg.schedulers.PlanUpdate`) or an adapter's own."""

    #: True for an update that also fuses the combine (:class:`pycfg.schedulers.PlanUpdate`): the loop then hands
    #: it the branch predictions (``fused_step``) instead of the guided prediction
    fused: bool

    def __call__(self, guided: Prediction, step: StepIndex, latents: Any) -> Any:
        """The next latents from the guided prediction at ``step``."""
        ...

    def fused_step(self, inputs: Any, policy: GuidancePolicy, step: StepIndex, latents: Any) -> Any:
        """Only called when :attr:`fused`: the next latents from the active branches' predictions by name
        (``gather``) or the reduced terms (``reduce``), combine included."""
        ...

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Solver state carried across steps (checked for rank consistency)."""
        ...


@dataclass
class Job:
    latents: Any
    num_steps: int
    policy: GuidancePolicy
    #: forward(branch names, latents, step, batched) -> one prediction per name, in order
    forward: Forward
    #: the solver update (see :class:`Update`); a :class:`pycfg.schedulers.PlanUpdate` also fuses the combine
    update: Update
    #: (shape, dtype) of each output of one branch's prediction, so idle ranks need no forward to know it
    prediction_spec: Sequence[tuple[tuple[int, ...], torch.dtype]]
    device: torch.device
    #: finish(latents) -> the pipeline's own output (decode, postprocess, output class)
    finish: Callable[[Any], Any]
    #: step_end(step, latents) -> latents: the pipeline's callbacks; runs on every rank, between steps, on the
    #: host (a job with one is never captured). None when the call has no callback.
    step_end: Callable[[int, Any], Any] | None = None
    #: after_update(step, latents) -> latents: part of the step itself, after the solver update (an inpainting
    #: blend with the noised input image, ...). Runs inside a captured step too: it reads per-step values only
    #: through ``step.select`` and keeps shapes.
    after_update: Callable[[StepIndex, Any], Any] | None = None
    interrupted: Callable[[], bool] = lambda: False
    progress: Callable[[int, bool], ContextManager] = field(default=lambda total, enabled: contextlib.nullcontext())
    #: why one captured step cannot serve every step of this request (e.g. the model changes mid-run); None if it can
    not_graphable: str | None = None
    #: graph_inputs() -> by name, every tensor of this request that ``forward`` and ``after_update`` read (texts,
    #: timesteps, image latents, ...), none of them the caller's own. A step captured for an earlier request of
    #: the same shape is replayed after these values are copied into that request's tensors. None: captured
    #: steps serve one request only.
    graph_inputs: Callable[[], dict[str, torch.Tensor]] | None = None

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Solver state carried across steps (checked for rank consistency)."""
        return self.update.state_tensors()
