"""Communicators: the one collective per step, behind a small interface.

``LocalComm`` is a group of one; ``TorchComm`` runs torch.distributed collectives (gloo on CPU, NCCL on CUDA)
on a CFG group; ``NcclComm`` (pycfg/parallel/nccl.py) drives NCCL directly through the C++ extension. All raise
:class:`RankFailureError` when a peer fails or the group's timeout expires, and count the collectives they run so
tests can check there is exactly one per step.
"""

from __future__ import annotations

import logging
from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist

from ..choices import COMMS, check_choice
from ..errors import RankFailureError

# torch >= 2.13 names the flat all-gather all_gather_single; older releases all_gather_into_tensor
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@runtime_checkable
class Communicator(Protocol):
    """What the runtime needs from a CFG group's communicator: the group's shape and the step's collectives.

    ``count=False`` marks debug traffic (consistency checks) that is not part of the per-step exchange; ``calls``
    counts the others, so tests can check there is one collective per step.
    """

    #: this rank's index in the CFG group, and the group's size
    rank: int
    size: int
    #: "local", "torch" or "nccl-ext" (which collectives a CUDA graph may capture depends on it)
    name: str
    device: torch.device
    #: the torch.distributed group the CFG group runs on (None for a group of one); object collectives use it
    group: dist.ProcessGroup | None
    calls: int

    def all_gather(self, flat: torch.Tensor, count: bool = True) -> torch.Tensor:
        """Every rank's ``flat`` stacked into (size, numel); all inputs must have the same numel."""
        ...

    def all_reduce_(self, flat: torch.Tensor, count: bool = True) -> torch.Tensor:
        """Element-wise sum over ranks, in place; returns ``flat``."""
        ...

    def synchronize(self) -> None:
        """Wait until the enqueued collectives finished; raise :class:`RankFailureError` if a peer failed."""
        ...


class LocalComm:
    rank = 0
    size = 1
    name = "local"
    group = None

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.calls = 0

    def all_gather(self, flat: torch.Tensor, count: bool = True) -> torch.Tensor:
        self.calls += count
        return flat.reshape(1, -1)

    def all_reduce_(self, flat: torch.Tensor, count: bool = True) -> torch.Tensor:
        self.calls += count
        return flat

    def synchronize(self) -> None:
        """Nothing is in flight in a group of one."""

    def close(self) -> None:
        """Nothing to free."""


class TorchComm:
    """torch.distributed collectives on one process group."""

    name = "torch"

    def __init__(self, group: dist.ProcessGroup, timeout: float, device: torch.device) -> None:
        self.group = group
        self.device = torch.device(device)
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.timeout = timeout
        self.calls = 0

    def _failed(self, op: str, err: Exception) -> RankFailureError:
        return RankFailureError(
            f"{op} across the CFG group (rank {self.rank} of {self.size}) did not complete: a peer rank failed, "
            f"died or did not reach the same point within timeout={self.timeout:g}s. Cause: {err}"
        )

    def all_gather(self, flat: torch.Tensor, count: bool = True) -> torch.Tensor:
        """Every rank's ``flat`` stacked into (size, numel); all inputs must have the same numel.

        ``count=False`` marks debug traffic (consistency checks) that is not part of the per-step exchange.
        """
        self.calls += count
        out = torch.empty(self.size * flat.numel(), dtype=flat.dtype, device=flat.device)
        try:
            _all_gather_flat(out, flat.reshape(-1), group=self.group)
        except Exception as err:  # gloo raises RuntimeError, NCCL DistBackendError
            raise self._failed("all_gather", err) from err
        return out.view(self.size, -1)

    def all_reduce_(self, flat: torch.Tensor, count: bool = True) -> torch.Tensor:
        """Element-wise sum over ranks, in place."""
        self.calls += count
        try:
            dist.all_reduce(flat, group=self.group)
        except Exception as err:
            raise self._failed("all_reduce", err) from err
        return flat

    def synchronize(self) -> None:
        """torch.distributed's collectives here complete before they return (gloo), or are checked by its own
        watchdog (NCCL): nothing to wait for."""

    def close(self) -> None:
        """Nothing of its own to free: the group belongs to whoever created it (see parallel.groups)."""



logger = logging.getLogger("pycfg")


def _group_agrees(group: dist.ProcessGroup, mine: bool) -> bool:
    """True only if every rank of ``group`` says yes: all ranks must pick the same communicator."""
    votes: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(votes, mine, group=group)
    return all(votes)


def make_comm(group: dist.ProcessGroup | None, *, device: torch.device, timeout: float,
              comm: str = "auto") -> Communicator:
    """The communicator for a CFG group: local for a group of one; for CUDA groups the NCCL extension when every
    rank can load it (``comm="auto"``, or forced with ``comm="nccl-ext"``), torch.distributed otherwise."""
    check_choice("comm", comm, COMMS)
    device = torch.device(device)
    if group is None:
        return LocalComm(device)
    if device.type != "cuda":
        if comm == "nccl-ext":
            raise ValueError(f"comm='nccl-ext' needs a CUDA pipeline; this one is on {device} (use comm='torch')")
        return TorchComm(group, timeout=timeout, device=torch.device("cpu"))
    if comm == "torch":
        logger.info("pycfg: communicator torch.distributed (requested with comm='torch')")
        return TorchComm(group, timeout=timeout, device=device)

    from . import nccl

    reason = nccl.unavailable_reason()
    if comm == "nccl-ext":
        if reason is not None:
            raise RuntimeError(f"comm='nccl-ext' cannot be used: {reason}")
    elif not _group_agrees(group, reason is None):
        logger.info("pycfg: communicator torch.distributed (NCCL extension not usable on every rank%s)",
                    f": {reason}" if reason else "")
        return TorchComm(group, timeout=timeout, device=device)
    chosen = nccl.NcclComm(group, device=device, timeout=timeout)
    logger.info("pycfg: communicator nccl-ext (NCCL %s from %s)", ".".join(map(str, nccl.version())),
                nccl.library_path())
    return chosen
