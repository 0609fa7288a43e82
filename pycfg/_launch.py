"""Run a function on N local processes with a real torch.distributed world (gloo on CPU).

Used by ``make demo``, the multi-process tests and the benchmarks: each rank is a fresh spawned Python
process with torchrun's environment variables, so pycfg initialises its groups exactly as under torchrun.
"""

from __future__ import annotations

import io
import os
import queue
import socket
import time
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _encode(value: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


def _decode(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


def _child(rank: int, world: int, port: int, threads: int, fn: Callable, kwargs: dict, results) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(threads)
    try:
        results.put((rank, True, _encode(fn(rank, world, **kwargs))))
    except BaseException as err:  # report, never hang the parent
        results.put((rank, False, f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


class RankError(RuntimeError):
    def __init__(self, rank: int, text: str) -> None:
        super().__init__(f"rank {rank} failed:\n{text}")
        self.rank = rank
        self.text = text


def run_world(fn: Callable, world: int, *, threads: int = 1, timeout: float = 600.0, raise_errors: bool = True,
              **kwargs) -> list[Any]:
    """``fn(rank, world, **kwargs)`` on ``world`` spawned processes; returns each rank's result, in rank order.

    ``fn`` must be importable (module level). With ``raise_errors=False`` a failed rank's entry is its
    :class:`RankError` instead of raising. Processes still running after ``timeout`` seconds are killed.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, world, port, threads, fn, kwargs, results), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    dead_since: dict[int, float] = {}
    try:
        while len(out) < world and time.monotonic() < deadline:
            try:
                rank, ok, payload = results.get(timeout=0.5)
                out[rank] = _decode(payload) if ok else RankError(rank, payload)
            except queue.Empty:
                pass
            # a rank that died without reporting (killed, or aborted inside a C++ library) is not waited for
            now = time.monotonic()
            for r, p in enumerate(procs):
                if r not in out and p.exitcode is not None:
                    if now - dead_since.setdefault(r, now) > 5.0:
                        out[r] = RankError(r, f"process exited with code {p.exitcode} without a result")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    for r in range(world):
        if r not in out:
            out[r] = RankError(r, f"no result (exit code {procs[r].exitcode})")
    if raise_errors:
        for r in range(world):
            if isinstance(out[r], RankError):
                raise out[r]
    return [out[r] for r in range(world)]
