"""PyTorch reference of the fused guided update (same arguments and maths as ``fused_update.fused_guided_update``).

All maths in fp32: guidance combine, per-sample std rescale, per-token renorm over the last dim, then one row
of a solver coefficient table applied to (x, guided, noise, history slots). ``latents`` and the written
history slots are updated in place.
"""

from __future__ import annotations

import torch

from .philox import philox_randn
from .table import FIXED_INPUTS, INPUT_V, INPUT_X, INPUT_Z


def _per_sample_std(x: torch.Tensor) -> torch.Tensor:
    return x.std(dim=list(range(1, x.ndim)), keepdim=True)


def guided_fp32(cond: torch.Tensor, uncond: torch.Tensor | None, *, scale: float = 1.0, original: bool = False,
                renorm: bool = False, rescale: float = 0.0, cond_norm: torch.Tensor | None = None,
                cond_std: torch.Tensor | None = None) -> torch.Tensor:
    """The guided prediction in fp32: CFG combine (when ``uncond`` is given), then rescale, then renorm.

    Without ``uncond``, ``cond`` is taken as already combined (one branch, or the reduced weighted sum); the
    side channels ``cond_norm`` / ``cond_std`` then supply the cond branch's statistics.
    """
    c = cond.float()
    if uncond is None:
        comb = c
    else:
        u = uncond.float()
        comb = (c if original else u) + scale * (c - u)
    if rescale > 0.0:
        std_c = cond_std.float().reshape(-1, *([1] * (comb.ndim - 1))) if cond_std is not None else _per_sample_std(c)
        comb = rescale * (comb * (std_c / _per_sample_std(comb))) + (1 - rescale) * comb
    if renorm:
        norm_c = cond_norm.float().reshape(*comb.shape[:-1], 1) if cond_norm is not None else torch.norm(c, dim=-1,
                                                                                                        keepdim=True)
        comb = comb * (norm_c / torch.norm(comb, dim=-1, keepdim=True))
    return comb


def apply_row(latents: torch.Tensor, guided: torch.Tensor, history: torch.Tensor, coefficients: torch.Tensor,
              write_slots: torch.Tensor, step: int, seed: int | None) -> torch.Tensor:
    """Row ``step`` of the table on (x, guided, noise, history); writes ``latents`` and history in place."""
    row = coefficients[step].to(torch.float32)
    slots = write_slots[step].tolist()
    x = latents.reshape(-1).float()
    v = guided.reshape(-1).float()
    num_slots = coefficients.shape[-1] - FIXED_INPUTS
    z = None
    if seed is not None and bool((row[:, INPUT_Z] != 0).any()):
        z = philox_randn(seed, step, x.numel(), device=x.device)
    outs = []
    for o in range(row.shape[0]):
        if o > 0 and slots[o - 1] < 0:
            outs.append(None)
            continue
        acc = row[o, INPUT_X] * x
        acc = acc + row[o, INPUT_V] * v
        if z is not None:
            acc = acc + row[o, INPUT_Z] * z
        for k in range(num_slots):
            if bool((row[:, FIXED_INPUTS + k] != 0).any()):
                acc = acc + row[o, FIXED_INPUTS + k] * history[k]
        outs.append(acc)
    # every output is computed before anything is written: a written slot may also be an input of this step
    for o, acc in enumerate(outs[1:]):
        if acc is not None:
            history[slots[o]].copy_(acc)
    latents.copy_(outs[0].view(latents.shape))
    return latents


def fused_guided_update_ref(latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
                            history: torch.Tensor, coefficients: torch.Tensor, write_slots: torch.Tensor, step: int,
                            *, scale: float = 1.0, original: bool = False, renorm: bool = False,
                            rescale: float = 0.0, cond_norm: torch.Tensor | None = None,
                            cond_std: torch.Tensor | None = None, seed: int | None = None) -> torch.Tensor:
    guided = guided_fp32(cond, uncond, scale=scale, original=original, renorm=renorm, rescale=rescale,
                         cond_norm=cond_norm, cond_std=cond_std)
    return apply_row(latents, guided, history, coefficients, write_slots, step, seed)
