"""The seed of the counter-based noise stream (:mod:`pycfg.kernels.philox`) for one request.

The stream is not ``torch.randn``'s: results with stochastic solvers differ from the stock pipeline's for
the same seed (``pycfg.compile(..., noise="diffusers")`` keeps the stock draws).
"""

from __future__ import annotations

import hashlib

import torch

from ..kernels.philox import philox_randn

__all__ = ["philox_randn", "seed_from_generator"]


def seed_from_generator(generator: torch.Generator | list | None) -> int:
    """A 63-bit seed derived from a generator's state without drawing from it.

    Hashing the state (rather than drawing once) leaves the caller's generator exactly where the stock
    pipeline leaves it, and gives every rank the same seed whenever their generators are in the same state
    (which pycfg already checks before each call). Without a generator the default CPU generator's state
    is used: ranks then agree only if the user seeded them identically, as with the stock pipeline.
    """
    if isinstance(generator, (list, tuple)):
        states = b"".join(bytes(g.get_state().tolist()) for g in generator)
    else:
        g = generator if generator is not None else torch.default_generator
        states = bytes(g.get_state().tolist())
    # 63 bits: the seed travels as a signed int64 into the kernel
    return int.from_bytes(hashlib.sha256(states).digest()[:8], "little") >> 1
