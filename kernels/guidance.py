"""What the fused update kernel computes from a step's branch predictions: the declaration a guidance policy
gives (``GuidancePolicy.kernel_guidance``) and the scheduler update turns into the kernel's arguments."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class KernelGuidance:
    """What the fused update kernel computes from one step's predictions, as a policy declares it.

    With ``uncond``: ``p = u + scale * (c - u)`` (``c + scale * (c - u)`` with ``original``) from the ``cond`` and
    ``uncond`` predictions; without: ``p = c``, the one active branch passed through. Then the std ``rescale``
    (per sample, factor ``rescale``) and Qwen-Image's per-token ``renorm``, in that order. On the ``reduce``
    exchange the kernel takes the reduced terms in :class:`LinearPolicy`'s layout (weighted sum, then the cond's
    norm if ``renorm``, then its std if ``rescale``) and applies only the rescale and renorm.

    ``scale`` is the one value a captured step reads from device memory: steps whose declarations differ only
    in ``scale`` replay one captured step (:meth:`structure`).
    """

    uncond: bool = False
    scale: float = 1.0
    original: bool = False
    renorm: bool = False
    rescale: float = 0.0

    def structure(self) -> KernelGuidance:
        """This declaration without its scale: what a captured step bakes in."""
        return replace(self, scale=0.0)

    def kernel_args(self) -> dict[str, Any]:
        """The kernel's keyword arguments for the combine (``gather``) path."""
        if not self.uncond:
            return {}
        return dict(scale=self.scale, original=self.original, renorm=self.renorm, rescale=self.rescale)
