"""One world of worker processes, as the driver sees it: start it, send it messages, judge the replies.

A :class:`World` is used by one thread at a time (the engine's executor thread). It turns the workers' replies
into one outcome per message, from their :class:`~pycfg.engine.wire.ErrorKind`:

- every rank rejected the request (they agree before any forward): :class:`InvalidRequestError`;
- every rank raised while running it and a probe collective then passes: :class:`RequestFailedError`, the world
  still in step;
- anything else (a death, a silent rank, an out-of-step reply, a rank that raised while its peers were left in a
  collective): :class:`WorldBroken`, carrying the root cause: the world must be torn down.
"""

from __future__ import annotations

import dataclasses
import multiprocessing.connection
import os
import signal
import socket
import threading
import time
from typing import Any, Callable

from . import wire
from .errors import InvalidRequestError, RequestFailedError, WorkerFailureError
from .wire import ErrorKind, Op
from .worker import worker_main


class WorldBroken(Exception):
    """The world of workers is broken; ``error`` is what the caller of the failed message gets."""

    def __init__(self, error: WorkerFailureError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclasses.dataclass
class Worker:
    rank: int
    process: Any
    conn: Any
    device: str

    @property
    def pid(self) -> int:
        return self.process.pid

    def describe(self) -> dict[str, Any]:
        return {"rank": self.rank, "pid": self.pid, "device": self.device, "alive": self.process.is_alive()}


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """What every world of one engine is started with."""

    devices: tuple[str, ...]
    factory: Callable[..., Any]
    compile_options: dict[str, Any]
    timeout: float
    startup_timeout: float
    worker_threads: int | None
    check_outputs: bool
    #: private (0700) directory holding the rendezvous files
    rendezvous_dir: str


def exit_text(code: int | None) -> str:
    if code is None:
        return "is still running"
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def loopback_interface() -> str | None:
    """The name of the loopback network interface, which the workers' data connections are bound to."""
    try:
        for _, name in socket.if_nameindex():
            if name == "lo" or name.startswith("lo0"):
                return name
    except OSError:
        pass
    return None


class World:
    """The workers of one start (or restart) of an engine."""

    def __init__(self, config: WorldConfig, number: int, interrupt: threading.Event) -> None:
        self.config = config
        self.interrupt = interrupt
        # how long the other ranks may take to report the same error as the first: past it they are stuck
        self.grace = min(config.timeout, 5.0)
        self.store = os.path.join(config.rendezvous_dir, f"world-{number}")
        self.workers: list[Worker] = []
        self.info: dict[str, Any] = {}
        self._seq = 0

    # -- lifetime ------------------------------------------------------------------------------------------------

    def start(self, ctx) -> None:
        """Spawn one worker per device and wait until each has compiled its pipeline; raises
        :class:`WorkerFailureError` with a worker's own error (the caller then calls :meth:`stop`)."""
        cfg = self.config
        loopback = loopback_interface()
        for rank, device in enumerate(cfg.devices):
            parent, child = ctx.Pipe(duplex=True)
            process = ctx.Process(
                target=worker_main, name=f"pycfg-worker-{rank}", daemon=True,
                args=(rank, len(cfg.devices), self.store, device, cfg.worker_threads, cfg.factory, cfg.timeout,
                      cfg.compile_options, os.getpid(), loopback, child),
            )
            process.start()
            child.close()  # so the driver sees EOF when the worker dies
            self.workers.append(Worker(rank, process, parent, device))
        deadline = time.monotonic() + cfg.startup_timeout
        pending = {w.rank: w for w in self.workers}
        while pending:
            if self.interrupt.is_set():
                raise WorkerFailureError("the workers' startup was interrupted: the engine is closing")
            if time.monotonic() > deadline:
                raise WorkerFailureError(f"workers {sorted(pending)} did not start within "
                                         f"startup_timeout={cfg.startup_timeout:g}s", min(pending))
            for w, reply in self._replies(pending, 0.5, "startup"):
                if reply["op"] != Op.READY:
                    raise WorkerFailureError(f"worker rank {w.rank} failed to start: {reply['text']}", w.rank,
                                             reply["trace"] or reply["text"])
                if w.rank == 0:
                    self.info = reply
                del pending[w.rank]

    def stop(self, graceful: bool) -> None:
        """Stop every worker: asked to finish (``graceful``, up to 10 s), else killed. Idempotent."""
        workers, self.workers = self.workers, []
        if graceful:
            for w in workers:
                try:
                    wire.send(w.conn, Op.CLOSE)
                except (OSError, ValueError):
                    pass
            deadline = time.monotonic() + 10.0
            for w in workers:
                w.process.join(timeout=max(0.0, deadline - time.monotonic()))
        for w in workers:
            if w.process.is_alive():
                w.process.kill()
            w.process.join(timeout=10.0)
            w.conn.close()
        if os.path.exists(self.store):
            os.remove(self.store)

    def dead_worker(self) -> WorkerFailureError | None:
        """The error of a worker that died while idle, if one did."""
        for w in self.workers:
            if not w.process.is_alive():
                w.process.join(timeout=1.0)
                return self._death(w, "while idle", exit_text(w.process.exitcode))
        return None

    # -- messages ------------------------------------------------------------------------------------------------

    def ping(self, label: str, limit: float | None = None) -> None:
        """A round trip with one collective across every worker; raises :class:`WorldBroken` unless all answer
        within ``limit`` seconds (default: the collective timeout plus the grace)."""
        seq = self._send_all(label, Op.PING)
        replies, pending = self._collect(seq, label, limit or self.config.timeout + self.grace)
        if pending or any(r["op"] != Op.PONG for r in replies.values()):
            raise WorldBroken(self._verdict(label, replies, pending, "did not answer the probe"))

    def run(self, label: str, request: int, payload: bytes, fingerprint: str, limit: float | None) -> Any:
        """Run one request on every worker; rank 0's output, or the outcome's error (see the module)."""
        seq = self._send_all(label, Op.RUN, request=request, payload=payload, fingerprint=fingerprint)
        replies, pending = self._collect(seq, label, limit)
        errors = {rank: r for rank, r in replies.items() if r["op"] == Op.ERROR}
        if not errors and not pending:
            return self._output(label, replies)
        if pending or len(errors) < len(replies):
            # some rank is still waiting in a collective the failing rank left, or finished without it
            raise WorldBroken(self._verdict(label, replies, pending, "were left waiting in a collective"))
        kinds = {r["kind"] for r in errors.values()}
        rank, first = min(errors.items())
        if kinds == {ErrorKind.INVALID}:
            raise InvalidRequestError(f"{label} rejected by the pipeline: {first['text']}")
        if all(kind.in_step for kind in kinds):
            # every rank raised at the same point; a collective round trip proves they are still in step
            self.ping(f"{label} (probe after its failure)")
            raise RequestFailedError(
                f"{label} failed on the workers (rank {rank}, pid {self.workers[rank].pid}): {first['text']}",
                rank, first["trace"] or first["text"], out_of_memory=first["kind"] == ErrorKind.OUT_OF_MEMORY)
        raise WorldBroken(self._verdict(label, replies, pending, "failed with it"))

    def _send_all(self, label: str, op: Op, **fields: Any) -> int:
        seq = self._seq
        self._seq += 1
        for w in self.workers:
            try:
                wire.send(w.conn, op, seq=seq, **fields)
            except (OSError, ValueError):
                w.process.join(timeout=1.0)  # it died: report how, not the broken pipe
                raise WorldBroken(self._death(w, label, exit_text(w.process.exitcode))) from None
        return seq

    def _collect(self, seq: int, label: str, limit: float | None) -> tuple[dict[int, dict], dict[int, Worker]]:
        """Replies to message ``seq`` until every worker answered, or shortly after the first error (the silent
        ones are then stuck); raises :class:`WorldBroken` on a death, an out-of-step reply, ``limit``
        seconds, or the engine's interrupt (``close(wait=False)``)."""
        pending = {w.rank: w for w in self.workers}
        replies: dict[int, dict] = {}
        started = time.monotonic()
        deadline: float | None = None  # set by the first error: when the silent ranks count as stuck
        while pending:
            now = time.monotonic()
            if self.interrupt.is_set():
                raise WorldBroken(WorkerFailureError(f"{label} was interrupted: the engine is closing"))
            if limit is not None and now - started > limit:
                raise WorldBroken(self._stuck(label, pending, f"did not finish within {limit:g}s"))
            if deadline is not None and now > deadline:
                break
            for w, reply in self._replies(pending, 0.2, label):
                del pending[w.rank]
                if reply.get("seq") != seq:
                    raise WorldBroken(WorkerFailureError(
                        f"{label}: worker rank {w.rank} answered message {reply.get('seq')} instead of {seq}: "
                        "out of step", w.rank))
                replies[w.rank] = reply
                if reply["op"] == Op.ERROR and deadline is None:
                    # a rank's own error: its peers may take a while to fail the same way; a peer's timeout
                    # comes after the collective timeout already: whoever is still silent is stuck
                    deadline = time.monotonic() + (1.0 if reply["kind"] == ErrorKind.PEER else self.grace)
        return replies, pending

    def _replies(self, pending: dict[int, Worker], wait: float, label: str):
        """(worker, reply) for each pending worker that answered within ``wait`` seconds; raises
        :class:`WorldBroken` (:class:`WorkerFailureError` during startup) when one died instead."""
        conns = {w.conn: w for w in pending.values()}
        sentinels = {w.process.sentinel: w for w in pending.values()}
        answered = set()
        for obj in multiprocessing.connection.wait(list(conns) + list(sentinels), timeout=wait):
            w = conns.get(obj) or sentinels.get(obj)
            if w is None or w.rank in answered:
                continue
            try:
                if obj in sentinels and not w.conn.poll():
                    raise EOFError
                reply = wire.recv(w.conn)
            except (EOFError, OSError):
                w.process.join(timeout=1.0)
                death = self._death(w, label, exit_text(w.process.exitcode))
                if label == "startup":
                    raise death from None
                raise WorldBroken(death) from None
            answered.add(w.rank)
            yield w, reply

    # -- judging ---------------------------------------------------------------------------------------------------

    def _output(self, label: str, replies: dict[int, dict]) -> Any:
        if self.config.check_outputs:
            differing = [rank for rank, r in replies.items() if r["digest"] != replies[0]["digest"]]
            if differing:
                raise WorldBroken(WorkerFailureError(
                    f"{label}: outputs of ranks {differing} differ from rank 0's: the workers drifted apart",
                    differing[0], "output digests differ"))
        return wire.load(replies[0]["output"], "cpu")

    def _verdict(self, label: str, replies: dict[int, dict], pending: dict[int, Worker],
                 others: str) -> WorkerFailureError:
        """The error of a broken world: the first rank's own error (not a peer's timeout), else the silent."""
        errors = {rank: r for rank, r in replies.items() if r["op"] == Op.ERROR}
        root = [(rank, r) for rank, r in sorted(errors.items()) if r["kind"] != ErrorKind.PEER]
        if root:
            rank, reply = root[0]
            note = f"; ranks {sorted(pending)} {others}" if pending else ""
            return WorkerFailureError(
                f"{label} failed on worker rank {rank} (pid {self.workers[rank].pid}): {reply['text']}{note}",
                rank, reply["trace"] or reply["text"])
        if pending:
            return self._stuck(label, pending, "did not answer while its peers waited for it in a collective")
        rank, reply = min(errors.items())
        return WorkerFailureError(f"{label} failed on worker rank {rank}: {reply['text']}", rank,
                                  reply["trace"] or reply["text"])

    @staticmethod
    def _stuck(label: str, pending: dict[int, Worker], why: str) -> WorkerFailureError:
        ranks = sorted(pending)
        who = ", ".join(f"rank {r} (pid {pending[r].pid}, {pending[r].device})" for r in ranks)
        text = f"worker {who} {why}: it is stuck (stopped, deadlocked or out of step)"
        return WorkerFailureError(f"{label} failed: {text}", ranks[0], text)

    @staticmethod
    def _death(w: Worker, label: str, how: str) -> WorkerFailureError:
        text = f"worker rank {w.rank} (pid {w.pid}, {w.device}) {how}"
        return WorkerFailureError(f"{label} failed: {text}", w.rank, text)


def default_devices(size: int) -> list[str]:
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() >= size:
        return [f"cuda:{i}" for i in range(size)]
    return ["cpu"] * size

