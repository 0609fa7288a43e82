"""Forming CFG groups: consecutive blocks of ``cfg_parallel_size`` ranks inside the torch.distributed world.

A world of k * P ranks serves k independent CFG groups of P ranks each. Groups are created with
``new_group`` so they can sit beside other parallelisms in a larger mesh, and carry pycfg's own timeout
(a user's default group may have torch's 10-30 minute default).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


def _env_world_size() -> int | None:
    value = os.environ.get("WORLD_SIZE")
    return int(value) if value else None


def check_size(cfg_parallel_size: int, world_size: int) -> None:
    if cfg_parallel_size > world_size:
        raise ValueError(
            f"cfg_parallel_size={cfg_parallel_size} is larger than the world size {world_size}; "
            f"launch at least {cfg_parallel_size} processes (torchrun --nproc-per-node {cfg_parallel_size})"
        )
    if world_size % cfg_parallel_size:
        raise ValueError(
            f"cfg_parallel_size={cfg_parallel_size} must divide the world size {world_size} "
            f"(allowed: {[p for p in range(1, world_size + 1) if world_size % p == 0]})"
        )


def init_world(size: int, *, device: torch.device, timeout: float, what: str, check) -> None:
    """Initialise the default process group from torchrun's environment (gloo for CPU pipelines, NCCL for CUDA)
    unless somebody has; ``check(size, world)`` validates the world size first. ``what`` names the option that
    asked for ``size`` processes, for the error."""
    if dist.is_initialized():
        return
    world = _env_world_size()
    if world is None:
        raise RuntimeError(
            f"{what} needs {size} processes: launch with `torchrun --nproc-per-node {size} app.py`, initialise "
            "torch.distributed yourself, or pass group="
        )
    check(size, world)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {}
    if device.type == "cuda":
        kwargs["device_id"] = device
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout), **kwargs)


@dataclass
class _Owned:
    """A CFG group pycfg created, shared by every compiled pipeline that uses it."""

    group: dist.ProcessGroup
    users: int


#: groups pycfg created, by (ranks, backend, timeout): compiling again reuses one instead of leaking a new one
_OWNED: dict[tuple, _Owned] = {}


def form_cfg_group(
    cfg_parallel_size: int,
    *,
    device: torch.device,
    timeout: float,
    group: dist.ProcessGroup | None = None,
) -> dist.ProcessGroup | None:
    """The CFG group this rank belongs to, or None for cfg_parallel_size=1 without a caller's group.

    Validates the size against the world before creating anything, and initialises the default process group
    from torchrun's environment (gloo for CPU pipelines, NCCL for CUDA) when nobody has. A group pycfg creates is
    shared by later compiles with the same ranks, backend and timeout, and destroyed by :func:`release_cfg_group`
    when its last user is closed. Every rank must make the same calls, in the same order (they are collective).
    """
    if group is not None:
        size = dist.get_world_size(group)
        if size != cfg_parallel_size:
            raise ValueError(
                f"group= has {size} ranks but cfg_parallel_size={cfg_parallel_size}; they must be equal"
            )
        return group
    if cfg_parallel_size == 1:
        return None

    init_world(cfg_parallel_size, device=device, timeout=timeout,
               what=f"cfg_parallel_size={cfg_parallel_size}", check=check_size)

    world = dist.get_world_size()
    check_size(cfg_parallel_size, world)
    rank = dist.get_rank()
    backend = "nccl" if device.type == "cuda" else "gloo"
    first = rank - rank % cfg_parallel_size
    key = (tuple(range(first, first + cfg_parallel_size)), world, backend, float(timeout))
    owned = _OWNED.get(key)
    if owned is not None:
        owned.users += 1
        return owned.group
    mine = None
    # every rank must create every group, in the same order
    for start in range(0, world, cfg_parallel_size):
        ranks = list(range(start, start + cfg_parallel_size))
        created = dist.new_group(ranks, timeout=timedelta(seconds=timeout), backend=backend)
        if rank in ranks:
            mine = created
    _OWNED[key] = _Owned(mine, 1)
    return mine


def release_cfg_group(group: dist.ProcessGroup | None) -> None:
    """One user of ``group`` is done with it. A group pycfg created is destroyed when its last user releases it;
    a caller's own group (``group=``) is left alone."""
    for key, owned in list(_OWNED.items()):
        if owned.group is group:
            owned.users -= 1
            if owned.users == 0:
                del _OWNED[key]
                if dist.is_initialized():
                    dist.destroy_process_group(group)
            return


def owned_groups() -> int:
    """How many CFG groups pycfg created are alive in this process."""
    return len(_OWNED)
