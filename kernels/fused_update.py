"""One kernel per denoising step: guidance combine + normalization + solver update, from a coefficient table.

Per element, in fp32: ``p = base + scale * (c - u)`` (or ``p = c``: one branch or an already reduced sum);
optional std rescale (per sample) and renorm ``p * ||c|| / ||p||`` (per token, over the last dim); then row
``step`` of the solver table: ``[x', h_a, h_b] = C[step] @ [x, p, z, h_0 .. h_{K-1}]`` where z is Philox noise
keyed by (seed, step, element) and h are fp32 history slots. ``x'`` overwrites the latents in place; h_a and
h_b go to the slots the table names for this step. Every input is read once and every output written once;
history slots whose coefficients are all zero at this step are not read at all.

The step index and the noise seed are read at run time (the seed from device memory), so one compiled kernel
serves every step and every request, nothing syncs with the host, and a CUDA graph can capture the launch.
The std rescale needs per-sample statistics first: a small deterministic stats kernel (fixed-order
partials, merged in fp64), so all ranks get the same bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .table import FIXED_INPUTS, INPUT_V, INPUT_X, INPUT_Z, MAX_WRITES

# the kernel writes the next sample and MAX_WRITES history slots per step, as three accumulators
assert MAX_WRITES == 2, "the fused kernel is written for two history writes per step"

# rows of the last dim per program when renormalising; elements per row otherwise. Image and video latents
# (last dims 16..128, millions of elements) keep ~4K elements per program at these sizes.
ELEMENTS_PER_PROGRAM = 4096
STATS_BLOCK = 4096


@triton.jit
def _stats_kernel(c_ptr, u_ptr, out_ptr, scale_ptr, per_sample, n_blocks, scale,
                  HAS_UNCOND: tl.constexpr, ORIGINAL: tl.constexpr, WITH_COND: tl.constexpr,
                  SCALE_IN_MEMORY: tl.constexpr, BLOCK: tl.constexpr):
    # one (sample, block) per program: count, mean and M2 of the guided prediction (and of cond)
    if SCALE_IN_MEMORY:
        scale = tl.load(scale_ptr)
    b = tl.program_id(0)
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < per_sample
    base = b.to(tl.int64) * per_sample
    c = tl.load(c_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_UNCOND:
        u = tl.load(u_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        if ORIGINAL:
            p = c + scale * (c - u)
        else:
            p = u + scale * (c - u)
    else:
        p = c
    n = tl.sum(mask.to(tl.float32), axis=0)
    mean_p = tl.sum(p, axis=0) / n
    dp = tl.where(mask, p - mean_p, 0.0)
    out = out_ptr + (b * n_blocks + blk) * 5
    tl.store(out + 0, n)
    tl.store(out + 1, mean_p)
    tl.store(out + 2, tl.sum(dp * dp, axis=0))
    if WITH_COND:
        mean_c = tl.sum(c, axis=0) / n
        dc = tl.where(mask, c - mean_c, 0.0)
        tl.store(out + 3, mean_c)
        tl.store(out + 4, tl.sum(dc * dc, axis=0))


@triton.jit(do_not_specialize=["step"])
def _fused_update_kernel(x_ptr, c_ptr, u_ptr, cnorm_ptr, std_ptr, hist_ptr, coef_ptr, slots_ptr, seed_ptr,
                         scale_ptr, step, n_rows, row_len, numel, per_sample, scale, rescale,
                         HAS_UNCOND: tl.constexpr, ORIGINAL: tl.constexpr, RENORM: tl.constexpr,
                         COND_NORM_GIVEN: tl.constexpr, RESCALE: tl.constexpr, NOISE: tl.constexpr,
                         SCALE_IN_MEMORY: tl.constexpr, K: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_D: tl.constexpr, X_COL: tl.constexpr, V_COL: tl.constexpr, Z_COL: tl.constexpr,
                         FIXED: tl.constexpr):
    if SCALE_IN_MEMORY:
        scale = tl.load(scale_ptr)
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    cols = tl.arange(0, BLOCK_D)[None, :]
    elem = rows.to(tl.int64) * row_len + cols
    mask = (rows < n_rows) & (cols < row_len) & (elem < numel)

    c = tl.load(c_ptr + elem, mask=mask, other=0.0).to(tl.float32)
    if HAS_UNCOND:
        u = tl.load(u_ptr + elem, mask=mask, other=0.0).to(tl.float32)
        if ORIGINAL:
            p = c + scale * (c - u)
        else:
            p = u + scale * (c - u)
    else:
        p = c
    if RESCALE:
        sample = elem // per_sample
        std_c = tl.load(std_ptr + sample * 2, mask=mask, other=1.0)
        std_p = tl.load(std_ptr + sample * 2 + 1, mask=mask, other=1.0)
        p = rescale * (p * (std_c / std_p)) + (1 - rescale) * p
    if RENORM:
        if COND_NORM_GIVEN:
            norm_c = tl.load(cnorm_ptr + rows, mask=rows < n_rows, other=1.0)
        else:
            norm_c = tl.sqrt(tl.sum(c * c, axis=1))[:, None]
        norm_p = tl.sqrt(tl.sum(p * p, axis=1))[:, None]
        p = p * (norm_c / norm_p)

    # the table layout (pycfg.kernels.table): rows of 3 outputs (x', two history writes) by FIXED + K inputs
    n_in: tl.constexpr = FIXED + K
    row = coef_ptr + step * (3 * n_in)
    x_raw = tl.load(x_ptr + elem, mask=mask, other=0.0)
    x = x_raw.to(tl.float32)
    acc0 = tl.load(row + X_COL) * x
    acc1 = tl.load(row + n_in + X_COL) * x
    acc2 = tl.load(row + 2 * n_in + X_COL) * x
    acc0 += tl.load(row + V_COL) * p
    acc1 += tl.load(row + n_in + V_COL) * p
    acc2 += tl.load(row + 2 * n_in + V_COL) * p
    if NOISE:
        seed = tl.load(seed_ptr)
        z = tl.randn(seed, elem + (step.to(tl.int64) << 32))
        acc0 += tl.load(row + Z_COL) * z
        acc1 += tl.load(row + n_in + Z_COL) * z
        acc2 += tl.load(row + 2 * n_in + Z_COL) * z
    for k in tl.static_range(K):
        a0 = tl.load(row + FIXED + k)
        a1 = tl.load(row + n_in + FIXED + k)
        a2 = tl.load(row + 2 * n_in + FIXED + k)
        # a slot no output uses at this step is not read: masked-off lanes touch no memory
        used = (tl.zeros_like(x) + (tl.abs(a0) + tl.abs(a1) + tl.abs(a2))) != 0.0
        h = tl.load(hist_ptr + k * numel + elem, mask=mask & used, other=0.0)
        acc0 += a0 * h
        acc1 += a1 * h
        acc2 += a2 * h
    slot_a = tl.load(slots_ptr + step * 2)
    slot_b = tl.load(slots_ptr + step * 2 + 1)
    write_a = mask & ((tl.zeros_like(elem) + slot_a) >= 0)
    write_b = mask & ((tl.zeros_like(elem) + slot_b) >= 0)
    tl.store(hist_ptr + tl.maximum(slot_a, 0).to(tl.int64) * numel + elem, acc1, mask=write_a)
    tl.store(hist_ptr + tl.maximum(slot_b, 0).to(tl.int64) * numel + elem, acc2, mask=write_b)
    tl.store(x_ptr + elem, acc0.to(x_raw.dtype), mask=mask)


def _std_from_partials(partials: torch.Tensor, column: int) -> torch.Tensor:
    # Chan et al.'s merge of (count, mean, M2) in fp64, in a fixed order: identical bits on every rank
    p = partials.double()
    n, mean, m2 = p[..., 0], p[..., column], p[..., column + 1]
    total = n.sum(1, keepdim=True)
    grand = (n * mean).sum(1, keepdim=True) / total
    m2_all = m2.sum(1) + (n * (mean - grand) ** 2).sum(1)
    return torch.sqrt(m2_all / (total.squeeze(1) - 1)).float()


def _scale_args(scale, fallback: torch.Tensor) -> tuple[torch.Tensor, float, bool]:
    """(pointer, value, read from memory?): a tensor scale is read on device, so a captured launch can be
    replayed with a new scale written into the same memory."""
    if isinstance(scale, torch.Tensor):
        if scale.dtype != torch.float32 or scale.numel() != 1 or scale.device != fallback.device:
            raise ValueError("a tensor scale must be one float32 element on the latents' device")
        return scale, 0.0, True
    return fallback, float(scale), False  # any fp32 pointer: not read


def _sample_stds(cond, uncond, scale, original, cond_std, batch: int) -> torch.Tensor:
    per_sample = cond.numel() // batch
    n_blocks = triton.cdiv(per_sample, STATS_BLOCK)
    partials = torch.empty(batch, n_blocks, 5, dtype=torch.float32, device=cond.device)
    with_cond = cond_std is None
    scale_ptr, scale_value, in_memory = _scale_args(scale, partials)
    _stats_kernel[(batch, n_blocks)](cond, uncond if uncond is not None else cond, partials, scale_ptr, per_sample,
                                     n_blocks, scale_value, HAS_UNCOND=uncond is not None, ORIGINAL=bool(original),
                                     WITH_COND=with_cond, SCALE_IN_MEMORY=in_memory, BLOCK=STATS_BLOCK)
    std_p = _std_from_partials(partials, 1)
    std_c = _std_from_partials(partials, 3) if with_cond else cond_std.reshape(batch).float()
    return torch.stack([std_c, std_p], dim=1).contiguous()


def fused_guided_update(latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
                        history: torch.Tensor, coefficients: torch.Tensor, write_slots: torch.Tensor, step: int,
                        *, scale: float | torch.Tensor = 1.0, original: bool = False, renorm: bool = False,
                        rescale: float = 0.0, cond_norm: torch.Tensor | None = None,
                        cond_std: torch.Tensor | None = None, seed: torch.Tensor | None = None) -> torch.Tensor:
    """The fused update (see the module docstring); arguments as ``fused_update_ref.fused_guided_update_ref``.

    ``coefficients`` must be fp32 and contiguous on the latents' device, ``write_slots`` int32 there, and
    ``history`` fp32 of shape (K, numel); ``seed`` is an int64 tensor of one element, or None for no noise.
    ``scale`` is a number, or a one-element fp32 tensor on the device that the kernel reads at run time.
    """
    if not (latents.is_contiguous() and cond.is_contiguous() and (uncond is None or uncond.is_contiguous())):
        raise ValueError("fused_guided_update needs contiguous latents and predictions")
    if coefficients.dtype != torch.float32 or write_slots.dtype != torch.int32:
        raise ValueError("coefficients must be float32 and write_slots int32")
    numel = latents.numel()
    num_slots = coefficients.shape[-1] - FIXED_INPUTS
    if renorm:
        row_len = latents.shape[-1]
        block_d = triton.next_power_of_2(row_len)
        block_r = max(1, ELEMENTS_PER_PROGRAM // block_d)
    else:
        row_len = block_d = 1024
        block_r = max(1, ELEMENTS_PER_PROGRAM // block_d)
    n_rows = triton.cdiv(numel, row_len)
    batch = latents.shape[0] if latents.ndim > 1 else 1
    stds = (_sample_stds(cond, uncond, scale, original, cond_std, batch) if rescale > 0.0
            else coefficients)  # any fp32 pointer: not read without RESCALE
    noise = seed is not None
    scale_ptr, scale_value, in_memory = _scale_args(scale, coefficients)
    _fused_update_kernel[(triton.cdiv(n_rows, block_r),)](
        latents, cond, uncond if uncond is not None else cond,
        cond_norm if cond_norm is not None else coefficients, stds,
        history if history.numel() else coefficients, coefficients, write_slots,
        seed if noise else write_slots, scale_ptr,
        int(step), n_rows, row_len, numel, numel // batch, scale_value, float(rescale),
        HAS_UNCOND=uncond is not None, ORIGINAL=bool(original), RENORM=bool(renorm),
        COND_NORM_GIVEN=cond_norm is not None, RESCALE=rescale > 0.0, NOISE=noise,
        SCALE_IN_MEMORY=in_memory, K=num_slots, BLOCK_R=block_r, BLOCK_D=block_d,
        X_COL=INPUT_X, V_COL=INPUT_V, Z_COL=INPUT_Z, FIXED=FIXED_INPUTS,
    )
    return latents
