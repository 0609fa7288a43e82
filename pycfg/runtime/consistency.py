"""Checks that every rank of a CFG group is doing, and holding, the same thing."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from ..errors import ArgumentMismatchError, ConsistencyError
from ..parallel.comm import Communicator


def describe_value(value: Any) -> Any:
    """A small, picklable, rank-independent description of one call argument."""
    if isinstance(value, torch.Tensor):
        data = value.detach().to("cpu").contiguous()
        digest = hashlib.sha256(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"").hexdigest()[:16]
        return ("tensor", tuple(value.shape), str(value.dtype), digest)
    if isinstance(value, torch.Generator):
        return ("generator", str(value.device), hashlib.sha256(bytes(value.get_state().tolist())).hexdigest()[:16])
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [describe_value(v) for v in value])
    if isinstance(value, dict):
        return ("dict", sorted((str(k), describe_value(v)) for k, v in value.items()))
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if callable(value):
        return ("callable", getattr(value, "__qualname__", type(value).__qualname__))
    if hasattr(value, "describe"):
        return (type(value).__name__, value.describe())
    text = repr(value)
    if " at 0x" in text:
        # a default repr holds a memory address, which differs between processes for the same argument
        return (type(value).__qualname__,)
    return (type(value).__name__, text[:200])


def fingerprint(arguments: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """(32-byte digest, per-argument descriptions) of a request's arguments."""
    described = {name: describe_value(v) for name, v in sorted(arguments.items())}
    return hashlib.sha256(repr(described).encode()).digest(), described


def check_same_arguments(comm: Communicator, arguments: dict[str, Any]) -> None:
    """One small all-gather; on a mismatch every rank raises, naming the arguments that differ."""
    if comm.size == 1:
        return
    digest, described = fingerprint(arguments)
    mine = torch.frombuffer(bytearray(digest), dtype=torch.uint8).to(comm.device)
    every = comm.all_gather(mine, count=False).cpu()
    if bool((every == every[0]).all()):
        return
    import torch.distributed as dist  # only reached with a real group

    gathered: list = [None] * comm.size
    dist.all_gather_object(gathered, described, group=comm.group)
    differing = sorted(
        {k for d in gathered for k in set(d) | set(gathered[0])
         if d.get(k, "<missing>") != gathered[0].get(k, "<missing>")}
    )
    raise ArgumentMismatchError(
        f"ranks of the CFG group were called with different arguments: {', '.join(differing)} differ "
        f"(every rank must make the same call, with identically seeded generators)"
    )


def checksum(t: torch.Tensor) -> torch.Tensor:
    """Two int64 words that change with any bit of ``t``: a plain and a position-weighted sum of its bytes."""
    data = t.detach().contiguous().reshape(-1).view(torch.uint8).to(torch.int64)
    weights = torch.arange(1, data.numel() + 1, device=data.device, dtype=torch.int64)
    return torch.stack([data.sum(), (data * weights).sum()])


def check_ranks_agree(comm: Communicator, step: int, tensors: dict[str, torch.Tensor]) -> None:
    """Raise on every rank, naming the step and tensor, if any rank's tensors differ in any bit."""
    if comm.size == 1 or not tensors:
        return
    names = sorted(tensors)
    # a fixed-size header first: ranks holding different sets of state must raise, not mismatch a collective
    header = hashlib.sha256(repr([(n, tuple(tensors[n].shape), str(tensors[n].dtype)) for n in names]).encode())
    mine = torch.frombuffer(bytearray(header.digest()), dtype=torch.uint8).to(comm.device)
    headers = comm.all_gather(mine, count=False).cpu()
    if not bool((headers == headers[0]).all()):
        raise ConsistencyError(
            f"after step {step}, ranks hold different sets of state tensors (names, shapes or dtypes); "
            f"this rank has: {', '.join(names)}"
        )
    local = torch.stack([checksum(tensors[n]) for n in names]).reshape(-1).to(comm.device)
    every = comm.all_gather(local, count=False).cpu().reshape(comm.size, len(names), 2)
    for j, name in enumerate(names):
        if not bool((every[:, j] == every[0, j]).all()):
            ranks = [r for r in range(comm.size) if not bool((every[r, j] == every[0, j]).all())]
            raise ConsistencyError(f"after step {step}, `{name}` differs between rank 0 and ranks {ranks}")
