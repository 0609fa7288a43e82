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

from .philox import seed_from_generator
from .plan import FIXED_INPUTS, SchedulerPlan, UnsupportedScheduler, build_plan
from .step import SchedulerStep

logger = logging.getLogger("pycfg")

NOISE_SOURCES = ("philox", "diffusers")


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


def _guidance_args(policy, n_inputs: int) -> dict | None:
    """The kernel's guidance arguments for policies it implements (CFG, NoGuidance); None for any other."""
    from ..guidance.cfg import CFG, NoGuidance

    if type(policy) is NoGuidance or (type(policy) is CFG and n_inputs == 1):
        # CFG outside its window runs cond alone and returns it unchanged
        return {}
    if type(policy) is CFG:
        return dict(scale=policy.scale, original=policy.original_formulation, renorm=policy.renorm,
                    rescale=policy.rescale)
    return None


class PlanUpdate:
    """Applies row i of a :class:`SchedulerPlan`; holds the solver history as fp32 slots, same on every rank.

    ``__call__(guided, i, latents)`` takes the guided prediction; ``fused_step`` takes the branch predictions
    (a dict, ``gather``) or the reduced terms (a list, ``reduce``) and does combine + update in one pass.
    Latents are updated in place.
    """

    fused = True

    def __init__(self, plan: SchedulerPlan, *, seed: int | None = None, use_kernel: bool = True) -> None:
        if plan.stochastic and seed is None:
            raise ValueError(f"{plan.describe()} draws noise: it needs a seed")
        self.plan = plan
        self.seed = seed if plan.stochastic else None
        self.use_kernel = use_kernel
        self.history: torch.Tensor | None = None
        self._device: torch.device | None = None
        self._kernel = None
        #: a one-element fp32 device tensor the guidance scale is read from instead of the policy's number:
        #: a captured step then serves any scale written there (set by the CUDA-graph runner)
        self.scale_source: torch.Tensor | None = None

    def _ready(self, latents: torch.Tensor) -> None:
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

    def _run(self, latents, cond, uncond, i: int, **guidance) -> torch.Tensor:
        self._ready(latents)
        if self.scale_source is not None and "scale" in guidance:
            guidance["scale"] = self.scale_source
        if not latents.is_contiguous():
            latents = latents.contiguous()
        if self.use_kernel:
            return self._kernel(latents, cond.contiguous(), None if uncond is None else uncond.contiguous(),
                                self.history, self.coefficients, self.write_slots, i, seed=self.seed_tensor,
                                **guidance)
        from ..kernels.fused_update_ref import fused_guided_update_ref

        return fused_guided_update_ref(latents, cond, uncond, self.history, self.coefficients, self.write_slots, i,
                                       seed=self.seed, **guidance)

    def __call__(self, guided: torch.Tensor, i: int, latents: torch.Tensor) -> torch.Tensor:
        return self._run(latents, guided, None, i)

    def fused_step(self, inputs, policy, i: int, latents: torch.Tensor) -> torch.Tensor:
        if isinstance(inputs, dict):
            args = _guidance_args(policy, len(inputs))
            if args is None:
                return self(policy.combine(inputs, i), i, latents)
            if len(inputs) == 1:
                (cond,) = inputs.values()
                return self._run(latents, cond, None, i)
            return self._run(latents, inputs["cond"], inputs["uncond"], i, **args)
        terms = list(inputs)
        args = _guidance_args(policy, 2)
        if not args:
            return self(policy.reduce_finish(terms, i, latents), i, latents)
        rest = terms[1:]
        cond_norm = rest.pop(0) if args["renorm"] else None
        cond_std = rest.pop(0) if args["rescale"] > 0.0 else None
        # the reduced sum already holds the combine: only the post-combine maths remain
        return self._run(latents, terms[0], None, i, renorm=args["renorm"], rescale=args["rescale"],
                         cond_norm=cond_norm, cond_std=cond_std)

    @property
    def order(self) -> int:
        return 1

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {} if self.history is None else {"plan.history": self.history}

    def describe(self) -> str:
        engine = "Triton kernel" if self.use_kernel else "PyTorch reference"
        return f"{self.plan.describe()} via the {engine}"


def make_scheduler_update(scheduler: Any, timesteps: Sequence, step_kwargs: dict | None = None, *,
                          fused: bool | None = None, noise: str = "philox", generator=None,
                          device: torch.device | str | None = None):
    """The update for one request (see the module docstring for the rules)."""
    if noise not in NOISE_SOURCES:
        raise ValueError(f"noise must be one of {', '.join(map(repr, NOISE_SOURCES))}, got {noise!r}")
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


__all__ = ["PlanUpdate", "make_scheduler_update", "load_fused_kernel", "NOISE_SOURCES", "FIXED_INPUTS"]
