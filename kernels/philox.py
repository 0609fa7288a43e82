"""Counter-based normal noise: Philox 4x32-10 plus Box-Muller, bit for bit the stream of Triton's ``tl.randn``.

Every draw is a pure function of (seed, step, element): the 64-bit seed is the Philox key, the counter is
(element, step, 0, 0). Triton's ``tl.randn(seed, offset)`` with a 64-bit ``offset = (step << 32) | element``
produces exactly this counter, so the fused kernel and this PyTorch version draw the same integers, and every
rank draws them without talking to any other rank. The normals are bit-identical to the kernel's under
``TRITON_INTERPRET=1``; compiled for a GPU the kernel's log/cos may round differently from torch's by an ulp
(every rank runs the same code, so ranks still agree bit for bit).
"""

from __future__ import annotations

import numpy as np
import torch

_MASK32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
# Triton's constants for the int32 -> [0, 1) and Box-Muller steps, as fp32
_UNIFORM_SCALE = 4.6566127342e-10
_TWO_PI = 6.283185307179586
_U_MIN = 1.0e-7


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # b holds uint32 values in int64; the 64-bit product wraps in int64 with the same low 64 bits as uint64
    p = b * a
    return (p >> 32) & _MASK32, p & _MASK32


def philox4x32(seed: int, c0: torch.Tensor, c1: torch.Tensor, rounds: int = 10) -> tuple[torch.Tensor, ...]:
    """Philox 4x32 with key = seed (lo, hi words) and counter (c0, c1, 0, 0); words as int64 in [0, 2**32)."""
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    c0 = c0 & _MASK32
    c1 = c1 & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def _uniform(word: torch.Tensor) -> torch.Tensor:
    signed = torch.where(word >= 2**31, word - 2**32, word)
    signed = torch.where(signed < 0, -signed - 1, signed)
    return signed.to(torch.int32).to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32,
                                                                   device=word.device)


def philox_randn(seed: int, step: int, numel: int, device: torch.device | str = "cpu",
                 start: int = 0) -> torch.Tensor:
    """fp32 normal draws for elements ``start .. start + numel - 1`` of ``step``: ``tl.randn``'s numbers."""
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must lie in [0, 2**64), got {seed}")
    if start + numel > 2**32:
        raise ValueError("at most 2**32 elements per step")
    elements = torch.arange(start, start + numel, dtype=torch.int64, device=device)
    w0, w1, _, _ = philox4x32(seed, elements, torch.full_like(elements, step))
    u1 = torch.clamp_min(_uniform(w0), torch.tensor(_U_MIN, dtype=torch.float32, device=w0.device))
    u2 = _uniform(w1)
    if u1.device.type == "cpu":
        # Triton's CPU interpreter evaluates log/sqrt/cos with NumPy's fp32 functions, which round differently
        # from torch's in about a third of cases: use the same ones so both give the same bits
        a, b = u1.numpy(), u2.numpy()
        theta = np.float32(_TWO_PI) * b
        radius = np.sqrt(np.float32(-2.0) * np.log(a))
        return torch.from_numpy(radius * np.cos(theta))
    theta = torch.tensor(_TWO_PI, dtype=torch.float32, device=u2.device) * u2
    radius = torch.sqrt(torch.tensor(-2.0, dtype=torch.float32, device=u1.device) * torch.log(u1))
    return radius * torch.cos(theta)
