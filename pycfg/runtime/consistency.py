"""Checks that every rank of a CFG group is doing, and holding, the same thing."""

from __future__ import annotations

import enum
import hashlib
from typing import Any

import torch

from ..errors import ArgumentMismatchError, ConsistencyError, InvalidArgumentError, PreparationError
from ..parallel.comm import Communicator


def describe_value(value: Any) -> Any:
    """A small, picklable, rank-independent description of one call argument."""
    if isinstance(value, torch.Tensor) and value.device.type == "meta":
        return ("tensor", tuple(value.shape), str(value.dtype), "meta")
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
    if hasattr(value, "mode") and isinstance(getattr(value, "size", None), tuple):
        # a PIL image: its mode and size fix what a pipeline makes of it (sizes, token grids); its pixels reach
        # the steps only as tensors (image latents, text embeddings)
        return ("image", value.mode, value.size)
    text = repr(value)
    if " at 0x" in text:
        # a default repr holds a memory address, which differs between processes for the same argument
        return (type(value).__qualname__,)
    return (type(value).__name__, text[:200])


def fingerprint(arguments: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """(32-byte digest, per-argument descriptions) of a request's arguments."""
    described = {name: describe_value(v) for name, v in sorted(arguments.items())}
    return hashlib.sha256(repr(described).encode()).digest(), described


class Verdict(enum.IntEnum):
    """What a rank concluded about a call before any forward; travels as one byte."""

    ACCEPTED = 0
    #: the arguments were rejected (a ValueError or TypeError from the pipeline's or pycfg's checks)
    REJECTED = 1
    #: preparing the call failed otherwise (a bug, an out-of-memory error)
    FAILED = 2
    #: preparing the call ran out of memory
    OUT_OF_MEMORY = 3

    @classmethod
    def of(cls, err: BaseException | None) -> "Verdict":
        if err is None:
            return cls.ACCEPTED
        if isinstance(err, torch.OutOfMemoryError):
            return cls.OUT_OF_MEMORY
        if isinstance(err, (ValueError, TypeError)):
            return cls.REJECTED
        return cls.FAILED


#: error text travels as at most this many UTF-8 bytes
MAX_ERROR_BYTES = 4096


def all_gather_bytes(comm: Communicator, data: bytes) -> list[bytes]:
    """Every rank's ``data`` (any length), in rank order: a fixed-size length exchange, then the padded bytes.
    Raw bytes only, never pickles: nothing a peer sends is ever executed."""
    length = torch.tensor([len(data)], dtype=torch.int64, device=comm.device)
    lengths = comm.all_gather(length, count=False).cpu().reshape(-1).tolist()
    buf = torch.zeros(max(max(lengths), 1), dtype=torch.uint8)
    if data:
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    every = comm.all_gather(buf.to(comm.device), count=False).cpu()
    return [every[r, : lengths[r]].numpy().tobytes() for r in range(comm.size)]


def agree(comm: Communicator, digest: bytes, described: dict[str, Any], error: BaseException | None = None) -> None:
    """Before any forward: every rank must have been called the same way, and every rank must accept the call.

    One fixed-size all-gather of (32-byte argument digest, verdict byte) per call. A rank that rejected the call
    raises its own ``error``; every other rank raises :class:`InvalidArgumentError` (or
    :class:`PreparationError`) with the first rejecting rank's error text, so the failure is named on every rank
    at once instead of as a timeout. If all accept but the digests differ, every rank raises
    :class:`ArgumentMismatchError` naming the arguments that differ. Only bytes cross: digests, then on a
    failure UTF-8 text.
    """
    verdict = Verdict.of(error)
    if comm.size == 1:
        if error is not None:
            raise error
        return
    if len(digest) != 32:
        raise ValueError(f"digest must be 32 bytes, got {len(digest)}")
    record = torch.frombuffer(bytearray(digest + bytes([verdict])), dtype=torch.uint8).to(comm.device)
    every = comm.all_gather(record, count=False).cpu()
    verdicts = [Verdict(int(v)) for v in every[:, 32].tolist()]
    if any(v != Verdict.ACCEPTED for v in verdicts):
        mine = f"{type(error).__name__}: {error}" if error is not None else ""
        texts = all_gather_bytes(comm, mine.encode("utf-8", "replace")[:MAX_ERROR_BYTES])
        if error is not None:
            raise error
        rank = next(r for r, v in enumerate(verdicts) if v != Verdict.ACCEPTED)
        text = texts[rank].decode("utf-8", "replace")
        message = f"rank {rank} of the CFG group rejected the call before any forward: {text}"
        if verdicts[rank] == Verdict.REJECTED:
            raise InvalidArgumentError(message, rank)
        raise PreparationError(message, rank, out_of_memory=verdicts[rank] == Verdict.OUT_OF_MEMORY)
    if bool((every[:, :32] == every[0, :32]).all()):
        return
    # a mismatch: exchange one line per argument (name and a digest of its description), as text
    table = "\n".join(f"{name}\t{hashlib.sha256(repr(value).encode()).hexdigest()[:16]}"
                      for name, value in sorted(described.items()))
    tables = [dict(line.split("\t", 1) for line in t.decode("utf-8", "replace").splitlines() if "\t" in line)
              for t in all_gather_bytes(comm, table.encode())]
    differing = sorted({k for t in tables for k in set(t) | set(tables[0])
                        if t.get(k, "<missing>") != tables[0].get(k, "<missing>")})
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
