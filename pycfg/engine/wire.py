"""What travels between the driver and its workers, over each worker's private socket pair.

Envelopes are small dicts with an :class:`Op` and, for failures, an :class:`ErrorKind`: what went wrong is data
the worker decides from the exception's type, never something the driver guesses from error text. Payloads
(arguments, outputs) are ``torch.save`` bytes, which carry tensors by value (torch.multiprocessing's default
reduction would move them into shared memory segments that outlive the request). Both ends are the same
program on the same host; nothing here is read from anyone else.
"""

from __future__ import annotations

import enum
import hashlib
import io
import pickle
import traceback
from typing import Any, NamedTuple

import torch

from ..errors import ArgumentMismatchError, PreparationError, RankFailureError


class Op(str, enum.Enum):
    # driver -> worker
    RUN = "run"
    PING = "ping"
    CLOSE = "close"
    # worker -> driver
    READY = "ready"
    RESULT = "result"
    PONG = "pong"
    ERROR = "error"


class ErrorKind(str, enum.Enum):
    """Why a worker failed a message, as the worker knows it."""

    #: the request's arguments were rejected on some rank, and every rank agreed before any forward
    INVALID = "invalid"
    #: the request raised while running (a callback, the pipeline); this rank is still in step
    REQUEST = "request"
    #: an out-of-memory error this rank recovered from (caches freed); still in step
    OUT_OF_MEMORY = "out_of_memory"
    #: a collective with the other ranks failed or timed out: a peer died, raised alone or is stuck
    PEER = "peer"
    #: this rank saw different arguments or messages than its peers: the world drifted apart
    MISMATCH = "mismatch"
    #: the worker itself cannot go on (startup failure, broken message, interrupt)
    FATAL = "fatal"

    @property
    def in_step(self) -> bool:
        """Whether a rank that failed this way is still ready for the next message."""
        return self in (ErrorKind.INVALID, ErrorKind.REQUEST, ErrorKind.OUT_OF_MEMORY)


def classify(err: BaseException, admitted: bool) -> ErrorKind:
    """The kind of a worker's failure, from the exception's type and whether every rank had already admitted
    the request (before that, a ``ValueError``/``TypeError`` is a rejected argument; after, a request error)."""
    if isinstance(err, ArgumentMismatchError):
        return ErrorKind.MISMATCH
    if isinstance(err, RankFailureError):
        return ErrorKind.PEER
    if isinstance(err, torch.OutOfMemoryError) or (isinstance(err, PreparationError) and err.out_of_memory):
        return ErrorKind.OUT_OF_MEMORY
    if not admitted and isinstance(err, (ValueError, TypeError)):
        return ErrorKind.INVALID
    if isinstance(err, Exception):
        return ErrorKind.REQUEST
    return ErrorKind.FATAL  # KeyboardInterrupt, SystemExit and the like


def error_fields(err: BaseException, admitted: bool = True) -> dict[str, Any]:
    """The fields of an :data:`Op.ERROR` reply for ``err`` (call inside the ``except`` block)."""
    return {"kind": classify(err, admitted), "text": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()}


def send(conn, op: Op, **fields: Any) -> None:
    conn.send_bytes(pickle.dumps({"op": op, **fields}, protocol=pickle.HIGHEST_PROTOCOL))


def recv(conn) -> dict[str, Any]:
    return pickle.loads(conn.recv_bytes())


def dump(value: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


def load(data: bytes, map_location: Any = None) -> Any:
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)


def fingerprint(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


class GeneratorState(NamedTuple):
    """How a ``torch.Generator`` travels to the workers: its device type and its full state.

    Each worker rebuilds a generator with this state on its own device, so every rank draws the same numbers the
    driver's generator would have drawn. The driver's generator itself is not advanced.
    """

    device_type: str
    state: torch.Tensor


def wire_generator(value: Any) -> Any:
    """A generator argument as it travels: a :class:`GeneratorState` (or a list of them). Raises TypeError for
    anything else."""
    if value is None:
        return None
    if isinstance(value, torch.Generator):
        return GeneratorState(value.device.type, value.get_state().clone())
    if isinstance(value, (list, tuple)) and value and all(isinstance(g, torch.Generator) for g in value):
        return [wire_generator(g) for g in value]
    raise TypeError(
        f"generator must be a torch.Generator or a list of them, got {type(value).__name__} "
        "(each worker rebuilds the generator from its state)"
    )


def rebuild_generators(value: Any, device: torch.device) -> Any:
    if isinstance(value, GeneratorState):
        g = torch.Generator(device=device if value.device_type == device.type else value.device_type)
        g.set_state(value.state.cpu())  # set_state takes a CPU byte tensor on every device
        return g
    if isinstance(value, list):
        return [rebuild_generators(v, device) for v in value]
    return value


def map_location(device: torch.device):
    """Where a worker loads request tensors: its own device. A server's driver holds CPU tensors and the stock
    pipelines do not move caller-provided embeds. Generator states are moved back by rebuild_generators."""
    if device.type == "cuda":
        return lambda storage, loc: storage.cuda(device.index or 0)
    return "cpu"


def output_digest(value: Any) -> str:
    """A digest of a pipeline output that changes with any bit of its tensors, arrays or images."""
    h = hashlib.sha256()

    def walk(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            data = v.detach().to("cpu").contiguous()
            h.update(f"T{tuple(data.shape)}{data.dtype}".encode())
            if data.numel():
                h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif type(v).__module__ == "numpy" and hasattr(v, "tobytes"):
            h.update(f"A{getattr(v, 'shape', ())}{getattr(v, 'dtype', '')}".encode())
            h.update(v.tobytes())
        elif hasattr(v, "mode") and hasattr(v, "size") and hasattr(v, "tobytes"):  # a PIL image
            h.update(f"I{v.mode}{v.size}".encode())
            h.update(v.tobytes())
        elif isinstance(v, dict):
            h.update(f"D{type(v).__name__}{len(v)}".encode())
            for key in v:
                h.update(repr(key).encode())
                walk(v[key])
        elif isinstance(v, (list, tuple)):
            h.update(f"L{type(v).__name__}{len(v)}".encode())
            for item in v:
                walk(item)
        else:
            h.update(repr(v).encode())

    walk(value)
    return h.hexdigest()
