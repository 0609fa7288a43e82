"""Guidance policies: which branches run at each step, and how their predictions combine."""

from .base import GuidancePolicy
from .cfg import CFG, NoGuidance

__all__ = ["GuidancePolicy", "CFG", "NoGuidance"]
