"""Scheduler updates: the seam the fused kernel plugs into.

``SchedulerStep`` is the reference: the diffusers scheduler's own ``step()``, called on every rank on a
private copy of the user's scheduler, so every rank holds the same history by construction.
``SchedulerPlan`` turns a configured scheduler into per-step coefficients for the fused update
(``PlanUpdate``); ``make_scheduler_update`` picks between them.
"""

from .philox import philox_randn, seed_from_generator
from .plan import SchedulerPlan, UnsupportedScheduler, build_plan
from .step import SchedulerStep, tensors_in
from .update import NOISE_SOURCES, PlanUpdate, make_scheduler_update

__all__ = [
    "SchedulerStep", "tensors_in", "SchedulerPlan", "UnsupportedScheduler", "build_plan", "PlanUpdate",
    "make_scheduler_update", "NOISE_SOURCES", "philox_randn", "seed_from_generator",
]
