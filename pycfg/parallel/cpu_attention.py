"""A CPU attention backend for diffusers' dispatcher that returns the log-sum-exp, so ring attention runs on CPU.

diffusers' ring attention merges the partial results of each key/value chunk through their log-sum-exp; its
``native`` backend cannot return one and ``_native_flash`` has no CPU kernel. torch's
``aten::_scaled_dot_product_flash_attention_for_cpu`` returns the output and the log-sum-exp, so this backend
wraps it in diffusers' forward-op form and registers it with ``supports_context_parallel=True``; Ulysses and ring
then run through diffusers' own templates.

Masks: diffusers 0.42.1's ring template hands every key/value chunk the *local* rank's mask, which is wrong as soon
as the mask is not all ones (text padded to split evenly). This backend makes it right: on a ring's first chunk it
all-gathers the ring's local masks and gives chunk ``(rank + i) mod ring_degree`` (the order diffusers' ring loop
visits them) its own mask. Ring and Ulysses together with a mask are refused.

fp32 only: it is the reference backend for testing the layouts on CPU, not a fast path.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

#: the backend's name, as ``transformer.set_attention_backend`` takes it
CPU_LSE_BACKEND = "pycfg_cpu_lse"
_MEMBER = "PYCFG_CPU_LSE"


def _backend_member():
    """diffusers' ``AttentionBackendName`` member for this backend, added once.

    The dispatcher keys backends by members of that enum, and ``set_attention_backend`` validates names against
    it, so a backend from outside diffusers needs a member of its own.
    """
    from diffusers.models.attention_dispatch import AttentionBackendName

    existing = AttentionBackendName._value2member_map_.get(CPU_LSE_BACKEND)
    if existing is not None:
        return existing
    member = str.__new__(AttentionBackendName, CPU_LSE_BACKEND)
    member._name_ = _MEMBER
    member._value_ = CPU_LSE_BACKEND
    member._sort_order_ = len(AttentionBackendName._member_names_)
    AttentionBackendName._member_map_[_MEMBER] = member
    AttentionBackendName._value2member_map_[CPU_LSE_BACKEND] = member
    AttentionBackendName._member_names_.append(_MEMBER)
    return member


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def _chunk_mask(ctx, attn_mask: torch.Tensor, first: bool, parallel_config) -> torch.Tensor:
    """The mask of the key/value chunk this call attends to (see the module docstring)."""
    cp = parallel_config.context_parallel_config
    if cp.ring_degree == 1:
        return attn_mask  # Ulysses gathers the full-length mask before the op
    if cp.ulysses_degree > 1:
        raise ValueError(f"attention backend {CPU_LSE_BACKEND!r}: ring_degree > 1 together with ulysses_degree > 1 "
                         "does not support attention masks; use one of the two")
    if first:
        local = attn_mask.contiguous()
        masks = [torch.empty_like(local) for _ in range(cp.ring_degree)]
        dist.all_gather(masks, local, group=cp._ring_mesh.get_group())
        ctx.pycfg_ring_masks = masks
        ctx.pycfg_ring_chunk = cp._ring_local_rank
    index = ctx.pycfg_ring_chunk
    ctx.pycfg_ring_chunk = (index + 1) % cp.ring_degree
    return ctx.pycfg_ring_masks[index]


def _forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
    """One attention on (batch, sequence, heads, head_dim) tensors, with the log-sum-exp as (batch, seq, heads)."""
    if enable_gqa:
        raise ValueError(f"attention backend {CPU_LSE_BACKEND!r} does not support enable_gqa")
    if query.dtype != torch.float32:
        raise ValueError(f"attention backend {CPU_LSE_BACKEND!r} runs float32 only, got {query.dtype}")
    if attn_mask is not None and _parallel_config is not None:
        attn_mask = _chunk_mask(ctx, attn_mask, _save_ctx, _parallel_config)
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, dropout_p, is_causal, attn_mask=_additive(attn_mask, q.dtype), scale=scale
    )
    out = out.transpose(1, 2)
    return (out, lse.transpose(1, 2)) if return_lse else out


def _backward_op(ctx, grad_out, *args, **kwargs):
    raise NotImplementedError(f"attention backend {CPU_LSE_BACKEND!r} is for inference only")


def _cpu_lse_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                       enable_gqa=False, return_lse=False, _parallel_config=None):
    from diffusers.models.attention_dispatch import _templated_context_parallel_attention

    if _parallel_config is None:
        return _forward_op(None, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse)
    return _templated_context_parallel_attention(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
        forward_op=_forward_op, backward_op=_backward_op, _parallel_config=_parallel_config,
    )


def register_cpu_lse_backend() -> str:
    """Register the backend with diffusers' attention dispatcher (once); returns its name."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    member = _backend_member()
    if member not in _AttentionBackendRegistry._backends:
        _AttentionBackendRegistry.register(member, supports_context_parallel=True)(_cpu_lse_attention)
    return CPU_LSE_BACKEND
