"""Choosing the per-step update, and the plan-based update (fused kernel, or its PyTorch reference).

Which update a request gets (``pycfg.compile(fused=...)``):

- ``fused=False``, and ``fused=None`` off CUDA: :class:`SchedulerStep`, the scheduler's own ``step()`` on a
  private copy, on every rank. This keeps pycfg bit-identical to the stock pipeline.
- ``fused=True``, and ``fused=None`` on CUDA: :class:`PlanUpdate` running the Triton kernel from the
  scheduler's coefficient table (on CPU in Triton's interpreter, ``TRITON_INTERPRET=1``). It matches
  ``step()`` to fp32 rounding, not bit for bit: the guided prediction stays fp32 instead of being rounded to
  the model dtype, and the scalars are folded into one coefficient per input.
- Schedulers or configurations without a table, and stochastic solvers with ``noise="diffusers"``, fall back
  to :class:`SchedulerStep` with a one-line info log saying why.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import torch

from ..choices import NOISE_SOURCES, check_choice
from ..kernels.guidance import KernelGuidance
from ..steps import StepIndex
from .philox import seed_from_generator
from .plan import FIXED_INPUTS, SchedulerPlan, UnsupportedScheduler, build_plan
from .step import SchedulerStep

logger = logging.getLogger("pycfg")


def load_fused_kernel(device: torch.device):
    """The Triton launcher; on CPU it must run in Triton's interpreter, which has to be on before import."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        import sys

        if "triton" in sys.modules:
            # triton's own library functions (tl.randn, ...) were defined for compilation at its import
            raise RuntimeError(
                "fused=True on a CPU device runs the Triton kernel in Triton's interpreter, which must be chosen "
                "before triton is first imported: set TRITON_INTERPRET=1 in the environment before starting "
                "Python (or use fused=False / fused=None on CPU)"
            )
        os.environ["TRITON_INTERPRET"] = "1"
    from ..kernels import fused_update

    interpreted = type(fused_update._fused_update_kernel).__name__ == "InterpretedFunction"
    if device.type != "cuda" and not interpreted:
        raise RuntimeError("fused=True on CPU needs TRITON_INTERPRET=1 set before triton compiles pycfg's kernels")
    return fused_update.fused_guided_update


class PlanUpdate:
    """Applies row i of a :class:`SchedulerPlan`; holds the solver history as fp32 slots, same on every rank.

    ``__call__(guided, i, latents)`` takes the guided prediction; :meth:`fused_step` takes the branch predictions
    (a dict, ``gather``) or the reduced terms (a list, ``reduce``) and does combine + update in one pass, as the
    policy's :meth:`~pycfg.guidance.GuidancePolicy.kernel_guidance` declares it. Latents are updated in place.

    A captured step uses :meth:`for_captured_steps`: the same update reading its table row by the device step
    index and the guidance scale from device memory, over the same history (:meth:`static_buffers`).
    """

    fused = True

    def __init__(self, plan: SchedulerPlan, *, seed: int | None = None, use_kernel: bool = True) -> None:
        if plan.stochastic and seed is None:
            raise ValueError(f"{plan.describe()} draws noise: it needs a seed")
        self.plan = plan
        self.seed = seed if plan.stochastic else None
        self.use_kernel = use_kernel
        self.history: torch.Tensor | None = None
        self.coefficients: torch.Tensor | None = None
        self.write_slots: torch.Tensor | None = None
        self.seed_tensor: torch.Tensor | None = None
        self._device: torch.device | None = None
        self._kernel = None

    @property
    def stochastic(self) -> bool:
        """True when the solver draws noise (keyed by the host step number: no captured step serves it)."""
        return self.plan.stochastic

    def ready(self, latents: torch.Tensor) -> None:
        """Upload the tables and allocate the history on the latents' device (once per request and device)."""
        if self._device == latents.device and self.history is not None:
            return
        device = latents.device
        self._device = device
        self.coefficients = self.plan.coefficients.to(device=device, dtype=torch.float32).contiguous()
        self.write_slots = self.plan.write_slots.to(device).contiguous()
        self.history = torch.zeros(self.plan.num_slots, latents.numel(), dtype=torch.float32, device=device)
        self.seed_tensor = (torch.tensor([self.seed], dtype=torch.int64, device=device)
                            if self.seed is not None else None)
        if self.use_kernel:
            self._kernel = load_fused_kernel(device)

    def static_buffers(self, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every tensor a captured step of this update reads or writes, by name (tables and history), made
        ready on the latents' device: a later request's values are copied into these to replay the step."""
        self.ready(latents)
        return {"plan.coefficients": self.coefficients, "plan.write_slots": self.write_slots,
                "plan.history": self.history}

    def for_captured_steps(self, latents: torch.Tensor) -> CapturedPlanUpdate:
        """This update as a captured step runs it: same tables and history, row and scale read on device."""
        self.ready(latents)
        return CapturedPlanUpdate(self)

    def _row(self, step: StepIndex) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(table, slots, row index) the kernel reads at ``step``."""
        return self.coefficients, self.write_slots, step.i

    def _scale(self, guidance: KernelGuidance) -> float | torch.Tensor:
        return guidance.scale

    def _run(self, latents, cond, uncond, step: StepIndex, **guidance) -> torch.Tensor:
        self.ready(latents)
        table, slots, row = self._row(step)
        if not latents.is_contiguous():
            latents = latents.contiguous()
        if self.use_kernel:
            return self._kernel(latents, cond.contiguous(), None if uncond is None else uncond.contiguous(),
                                self.history, table, slots, row, seed=self.seed_tensor, **guidance)
        from ..kernels.fused_update_ref import fused_guided_update_ref

        return fused_guided_update_ref(latents, cond, uncond, self.history, table, slots, row, seed=self.seed,
                                       **guidance)

    def __call__(self, guided: torch.Tensor, step: StepIndex, latents: torch.Tensor) -> torch.Tensor:
        return self._run(latents, guided, None, step)

    def fused_step(self, inputs, policy, step: StepIndex, latents: torch.Tensor) -> torch.Tensor:
        """Combine + update in one pass: ``inputs`` are the active branches' predictions by name (``gather``)
        or the reduced terms (``reduce``, :class:`~pycfg.guidance.LinearPolicy`'s layout)."""
        i = step.i
        if isinstance(inputs, dict):
            how = policy.kernel_guidance(i, tuple(inputs))
            if how is None:
                return self._run(latents, policy.combine(inputs, i), None, step)
            if not how.uncond:
                (cond,) = inputs.values()
                return self._run(latents, cond, None, step)
            args = how.kernel_args()
            args["scale"] = self._scale(how)
            return self._run(latents, inputs["cond"], inputs["uncond"], step, **args)
        terms = list(inputs)
        how = policy.kernel_guidance(i, policy.active(i))
        if how is None or not how.uncond:
            return self._run(latents, policy.reduce_finish(terms, i, latents), None, step)
        rest = terms[1:]
        cond_norm = rest.pop(0) if how.renorm else None
        cond_std = rest.pop(0) if how.rescale > 0.0 else None
        # the reduced sum already holds the combine: only the post-combine maths remain
        return self._run(latents, terms[0], None, step, renorm=how.renorm, rescale=how.rescale,
                         cond_norm=cond_norm, cond_std=cond_std)

    @property
    def order(self) -> int:
        return 1

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {} if self.history is None else {"plan.history": self.history}

    def describe(self) -> str:
        engine = "Triton kernel" if self.use_kernel else "PyTorch reference"
        return f"{self.plan.describe()} via the {engine}"


class CapturedPlanUpdate(PlanUpdate):
    """A :class:`PlanUpdate` as one captured step serves every step: the step's table row is gathered by the
    device step index into one-row buffers, and the guidance scale is read from :attr:`scale` (written by
    :meth:`write_scale` before each step), so nothing per step is a host number inside the step."""

    def __init__(self, base: PlanUpdate) -> None:
        super().__init__(base.plan, seed=base.seed, use_kernel=base.use_kernel)
        self.base = base
        self._device, self._kernel, self.seed_tensor = base._device, base._kernel, base.seed_tensor
        self.history = base.history
        self.full_coefficients, self.full_write_slots = base.coefficients, base.write_slots
        self.coefficients = torch.empty_like(base.coefficients[:1])
        self.write_slots = torch.empty_like(base.write_slots[:1])
        self.scale = torch.ones(1, dtype=torch.float32, device=base.coefficients.device)

    def write_scale(self, value: float) -> None:
        """The guidance scale the next step reads (a device write, no host sync)."""
        self.scale.fill_(float(value))

    def _row(self, step: StepIndex) -> tuple[torch.Tensor, torch.Tensor, int]:
        torch.index_select(self.full_coefficients, 0, step.device, out=self.coefficients)
        torch.index_select(self.full_write_slots, 0, step.device, out=self.write_slots)
        return self.coefficients, self.write_slots, 0

    def _scale(self, guidance: KernelGuidance) -> float | torch.Tensor:
        return self.scale


def make_scheduler_update(scheduler: Any, timesteps: Sequence, step_kwargs: dict | None = None, *,
                          fused: bool | None = None, noise: str = "philox", generator=None,
                          device: torch.device | str | None = None):
    """The update for one request (see the module docstring for the rules)."""
    check_choice("noise", noise, NOISE_SOURCES)
    step_kwargs = dict(step_kwargs or {})
    device = torch.device(device) if device is not None else torch.device("cpu")
    if fused is False or (fused is None and device.type != "cuda"):
        return SchedulerStep(scheduler, timesteps, step_kwargs)
    name = type(scheduler).__name__
    try:
        plan = build_plan(scheduler, timesteps, {k: v for k, v in step_kwargs.items() if k != "generator"})
    except UnsupportedScheduler as why:
        logger.info("pycfg: %s; using the scheduler's own step() on every rank", why)
        return SchedulerStep(scheduler, timesteps, step_kwargs)
    if plan.stochastic and noise == "diffusers":
        logger.info("pycfg: noise='diffusers': %s steps with the scheduler's own step() and torch.randn", name)
        return SchedulerStep(scheduler, timesteps, step_kwargs)
    use_kernel = True
    if fused is None:
        try:
            import triton  # noqa: F401
        except ImportError:
            logger.info("pycfg: triton is not installed; the fused update runs its PyTorch reference")
            use_kernel = False
    seed = seed_from_generator(generator) if plan.stochastic else None
    return PlanUpdate(plan, seed=seed, use_kernel=use_kernel)


__all__ = ["PlanUpdate", "CapturedPlanUpdate", "make_scheduler_update", "load_fused_kernel", "NOISE_SOURCES",
           "FIXED_INPUTS"]
