"""The one type a step is given as, to forwards, updates and step hooks alike.

A leaf module (it imports nothing from pycfg), so the runtime, the scheduler updates and the adapters share it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepIndex:
    """The step being run, given two ways, always both.

    ``i`` is the host step number. ``device`` is a one-element int64 tensor on the latents' device holding the
    step number *at run time*: a step captured as a CUDA graph and replayed later sees the replayed step there,
    while ``i`` stays the step it was captured at. Code that selects per-step values (timesteps, tables) reads
    them through :meth:`select`, so one captured step serves every step; code that branches on ``i`` on the
    host must keep its job out of capture (``Job.not_graphable``).
    """

    i: int
    device: torch.Tensor

    def select(self, table: torch.Tensor) -> torch.Tensor:
        """``table[step]`` read on device (0-dim for a 1-D table): the bits of ``table[i]``, no host value."""
        return table.index_select(0, self.device)[0]

    @staticmethod
    def counter(device: torch.device | str) -> torch.Tensor:
        """A fresh device step counter (one int64 element, 0) for a loop to advance."""
        return torch.zeros(1, dtype=torch.long, device=device)
