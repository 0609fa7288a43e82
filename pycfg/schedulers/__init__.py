"""Scheduler updates: the seam the fused kernel plugs into.

``SchedulerStep`` is the reference: the diffusers scheduler's own ``step()``, called on every rank on a
private copy of the user's scheduler, so every rank holds the same history by construction.
"""

from .step import SchedulerStep, tensors_in

__all__ = ["SchedulerStep", "tensors_in"]
