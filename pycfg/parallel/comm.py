"""Communicators: the one collective per step, behind a small interface.

``LocalComm`` is a group of one; ``TorchComm`` runs torch.distributed collectives (gloo on CPU, NCCL on CUDA)
on a CFG group. Both raise :class:`RankFailureError` when a peer fails or the group's timeout expires, and
count the collectives they run so tests can check there is exactly one per step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import RankFailureError


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
        out = torch.empty((self.size, flat.numel()), dtype=flat.dtype, device=flat.device)
        try:
            dist.all_gather_into_tensor(out, flat.reshape(-1), group=self.group)
        except Exception as err:  # gloo raises RuntimeError, NCCL DistBackendError
            raise self._failed("all_gather", err) from err
        return out

    def all_reduce_(self, flat: torch.Tensor, count: bool = True) -> torch.Tensor:
        """Element-wise sum over ranks, in place."""
        self.calls += count
        try:
            dist.all_reduce(flat, group=self.group)
        except Exception as err:
            raise self._failed("all_reduce", err) from err
        return flat


COMMS = ("auto", "torch")


def make_comm(group: dist.ProcessGroup | None, *, device: torch.device, timeout: float, comm: str = "auto"):
    """The communicator for a CFG group: local for a group of one, torch.distributed otherwise."""
    if comm not in COMMS:
        raise ValueError(f"comm must be one of {', '.join(map(repr, COMMS))}, got {comm!r}")
    if group is None:
        return LocalComm(device)
    comm_device = device if device.type == "cuda" else torch.device("cpu")
    return TorchComm(group, timeout=timeout, device=comm_device)
