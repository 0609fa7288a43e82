"""Guidance policies: which branches run at each step, where their inputs come from, and how they combine.

Built-ins follow diffusers' guiders (or the pipelines' own code) operation for operation:

- :class:`CFG` (Qwen renorm, rescale, step window), :class:`DynamicCFG` (CogVideoX's cosine schedule)
- :class:`CFGZeroStar`, :class:`APG` (stateful momentum): not linear, ``gather`` exchange only
- :class:`SkipLayer` (SLG/STG) and :class:`PAG`: a third, perturbed cond branch (see :mod:`.perturb`)
- :class:`MultiBranch`: any linear mix of named branches with per-term windows and per-output scales

Pass one per call (``fast(..., guidance=pycfg.guidance.APG(5.0, momentum=-0.5))``) or to ``pycfg.compile``.
"""

from .base import NEGATIVE, PROMPT, Branch, GuidancePolicy, LinearPolicy
from .branches import PAG, MultiBranch, SkipLayer, Term
from .cfg import APG, CFG, CFGZeroStar, DynamicCFG, NoGuidance
from .perturb import ForwardKwargs, Perturbation, SkipAttention, SkipBlocks, perturbed

__all__ = [
    "GuidancePolicy",
    "LinearPolicy",
    "Branch",
    "PROMPT",
    "NEGATIVE",
    "CFG",
    "DynamicCFG",
    "CFGZeroStar",
    "APG",
    "SkipLayer",
    "PAG",
    "MultiBranch",
    "Term",
    "NoGuidance",
    "Perturbation",
    "SkipBlocks",
    "SkipAttention",
    "ForwardKwargs",
    "perturbed",
]
