"""The driver: :class:`Engine`, the caller-facing half, and the executor thread that talks to the workers.

One executor thread owns the workers (a :class:`~pycfg.engine.world.World`): it takes requests from one queue,
in order, and runs each on every worker. What a failure does to the engine follows from the workers' reported
:class:`~pycfg.engine.wire.ErrorKind`, never from error text:

- every rank rejected the request (they agree before any forward): :class:`InvalidRequestError`, healthy;
- every rank raised while running it, at the same point, and a probe collective then passes: the request fails
  alone with :class:`RequestFailedError`, healthy;
- a worker died, stopped answering, answered out of step, or raised while its peers were left waiting in a
  collective: the request fails at once with that cause (:class:`WorkerFailureError`), the workers are torn
  down, the engine is unhealthy, and with ``auto_restart`` a restart runs right after, before the next request.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import enum
import logging
import pickle
import shutil
import tempfile
import threading
import time
from typing import Any, Callable, Sequence

import torch
import torch.multiprocessing as mp

from . import wire
from .errors import EngineClosedError, EngineUnhealthyError, InvalidRequestError, RequestFailedError, WorkerFailureError
from .validation import Limits, check_compile_options, check_request
from .world import World, WorldBroken, WorldConfig, default_devices

logger = logging.getLogger("pycfg.engine")


class EngineState(str, enum.Enum):
    """Where an :class:`Engine` is in its life; only ``READY`` serves requests."""

    STARTING = "starting"
    READY = "ready"
    #: the workers failed and are being replaced (``auto_restart``); requests queue until it is done
    RESTARTING = "restarting"
    #: the workers failed; :meth:`Engine.restart` brings them back
    UNHEALTHY = "unhealthy"
    CLOSED = "closed"


@dataclasses.dataclass(frozen=True)
class EngineHealth:
    """A snapshot of an engine's health (:meth:`Engine.health`)."""

    state: EngineState
    #: why the engine last became unhealthy (None while it has not, or since it recovered)
    last_error: str | None
    restarts: int
    #: requests waiting behind the running one
    queued: int
    #: whether each worker process, in rank order, is alive
    workers_alive: tuple[bool, ...]

    @property
    def healthy(self) -> bool:
        return self.state == EngineState.READY


class _Item:
    __slots__ = ("op", "future", "payload", "fingerprint", "request")

    def __init__(self, op: str, future: concurrent.futures.Future, payload: bytes | None = None,
                 fingerprint: str | None = None, request: int | None = None) -> None:
        self.op, self.future, self.payload, self.fingerprint, self.request = op, future, payload, fingerprint, request


class Engine:
    """CFG-parallel inference for a long-lived process: one spawned worker per rank, driven from here.

    Args:
        pipeline_factory: builds the pipeline in each worker. It must be picklable (a module-level function, or a
            ``functools.partial`` of one) and is only ever called in the workers, on their own devices: with
            ``device=`` when it has a ``device`` parameter, otherwise with no arguments, and what it returns is
            then moved with ``.to(device)`` (unless the device is the CPU).
        cfg_parallel_size: ranks in the CFG group. With the ``ring_degree`` / ``ulysses_degree`` compile options the
            engine runs ``cfg_parallel_size * ring_degree * ulysses_degree`` workers, one request mesh.
        devices: one device per rank; default: ``cuda:0 .. cuda:P-1`` when that many GPUs exist, else the CPU for
            every rank. The workers' world uses gloo on CPU and NCCL on CUDA, reachable from this host only.
        timeout: seconds a collective may wait for a failed or dead peer (passed to :func:`pycfg.compile`); a
            failing request is reported within it, with the failing worker's own error.
        auto_restart: after a worker failure, replace the workers at once (in the background of the callers:
            the failing request fails first; requests queued meanwhile wait for the restart, up to
            ``startup_timeout``, then run or fail with :class:`EngineUnhealthyError`).
        request_timeout: seconds one request may run before it fails and the workers are replaced (they are
            stuck); None for no limit. A dead worker is noticed at once regardless.
        startup_timeout: seconds for the workers to import, build and compile.
        worker_threads: ``torch.set_num_threads`` in each worker (1 by default: one core per rank, and the
            numerics of a single-threaded stock pipeline); None leaves torch's default.
        check_outputs: compare a digest of every rank's output with rank 0's; a difference fails the request as
            a worker failure (the ranks drifted apart).
        limits: bounds on each request (:class:`Limits`), checked here before any worker sees it.
        **compile_options: any other :func:`pycfg.compile` option (``exchange``, ``fused``, ``guidance``,
            ``check_finite``, ...), checked once by :func:`~pycfg.engine.validation.check_compile_options`.

    Generators: pass ``generator=torch.Generator().manual_seed(s)`` (or a list of them) as to the pipeline. Its
    state travels to the workers, which each rebuild an identical generator on their device; the caller's
    generator is not advanced. Outputs are rank 0's, moved to the CPU.
    """

    def __init__(
        self,
        pipeline_factory: Callable[..., Any],
        *,
        cfg_parallel_size: int = 2,
        devices: Sequence[str | torch.device] | None = None,
        timeout: float = 60.0,
        auto_restart: bool = False,
        request_timeout: float | None = 600.0,
        startup_timeout: float = 300.0,
        worker_threads: int | None = 1,
        check_outputs: bool = True,
        limits: Limits | None = None,
        **compile_options: Any,
    ) -> None:
        if not callable(pipeline_factory):
            raise TypeError(f"pipeline_factory must be callable, got {type(pipeline_factory).__name__}")
        if isinstance(cfg_parallel_size, bool) or not isinstance(cfg_parallel_size, int) or cfg_parallel_size < 1:
            raise ValueError(f"cfg_parallel_size must be an integer >= 1, got {cfg_parallel_size!r}")
        for name, value in (("timeout", timeout), ("startup_timeout", startup_timeout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if request_timeout is not None and (not isinstance(request_timeout, (int, float)) or request_timeout <= 0):
            raise ValueError(f"request_timeout must be None or a positive number of seconds, got {request_timeout!r}")
        if worker_threads is not None and (not isinstance(worker_threads, int) or worker_threads < 1):
            raise ValueError(f"worker_threads must be None or an integer >= 1, got {worker_threads!r}")
        if limits is not None and not isinstance(limits, Limits):
            raise TypeError(f"limits must be a pycfg.Limits, got {type(limits).__name__}")
        options = check_compile_options(compile_options, cfg_parallel_size, timeout)
        layout = options.layout
        try:
            pickle.dumps(pipeline_factory)
        except Exception as err:
            raise TypeError(
                f"pipeline_factory must be picklable to reach the worker processes (a module-level function or "
                f"a functools.partial of one): {err}"
            ) from None
        if devices is None:
            devices = default_devices(layout.size)
        devices = [str(torch.device(d)) for d in devices]
        if len(devices) != layout.size:
            raise ValueError(f"devices has {len(devices)} entries but the engine runs {layout.size} ranks "
                             f"({layout.describe()})")

        self.cfg_parallel_size = cfg_parallel_size
        #: worker processes: one request mesh of cfg x ring x ulysses ranks (the CFG group without them)
        self.world_size = layout.size
        self.devices = devices
        self.timeout = float(timeout)
        self.auto_restart = bool(auto_restart)
        self.request_timeout = None if request_timeout is None else float(request_timeout)
        self.startup_timeout = float(startup_timeout)
        self.worker_threads = worker_threads
        self.check_outputs = bool(check_outputs)
        self.limits = limits if limits is not None else Limits()
        self._factory = pipeline_factory
        self._compile_options = compile_options

        self._ctx = mp.get_context("spawn")
        self._rendezvous_dir = tempfile.mkdtemp(prefix="pycfg-engine-")  # mode 0700: this user only
        self._config = WorldConfig(tuple(devices), pipeline_factory, compile_options, self.timeout,
                                   self.startup_timeout, worker_threads, self.check_outputs, self._rendezvous_dir)
        self._worlds = 0
        self._world: World | None = None
        self._state = EngineState.STARTING
        self._last_error: str | None = None
        self._info: dict[str, Any] = {}
        self._counts = collections.Counter()
        self._restarts = 0
        self._restart_due = False
        self._next_request = 0

        self._lock = threading.Lock()  # state, counters, the queue
        self._cond = threading.Condition(self._lock)
        self._queue: collections.deque[_Item] = collections.deque()
        self._closing = False
        self._interrupt = threading.Event()

        try:
            self._start_world()  # raises, leaving nothing running, if the workers cannot start
        except BaseException:
            shutil.rmtree(self._rendezvous_dir, ignore_errors=True)
            raise
        self._thread = threading.Thread(target=self._serve, name="pycfg-engine", daemon=True)
        self._thread.start()

    # -- public API -------------------------------------------------------------------------------------------

    def submit(self, **kwargs: Any) -> concurrent.futures.Future:
        """Queue one request (the pipeline's keyword arguments, plus ``guidance=``); returns a future of rank
        0's output. Invalid requests raise :class:`InvalidRequestError` here, before any worker sees them."""
        payload, fingerprint = self._encode_request(kwargs)
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._closing:
                raise EngineClosedError("the engine is closed")
            self._next_request += 1
            self._queue.append(_Item("run", future, payload, fingerprint, self._next_request))
            self._cond.notify_all()
        return future

    def generate(self, **kwargs: Any) -> Any:
        """Run one request on every worker and return rank 0's output (the pipeline's own output type).

        Thread-safe: concurrent callers' requests queue and run one at a time, in order.
        """
        return self.submit(**kwargs).result()

    async def agenerate(self, **kwargs: Any) -> Any:
        """:meth:`generate` for asyncio; cancelling the awaiting task drops the request if it has not started."""
        return await asyncio.wrap_future(self.submit(**kwargs))

    __call__ = generate

    def warmup(self, **kwargs: Any) -> float:
        """Exercise the workers once; returns the seconds it took.

        With no arguments, a round trip with one collective across the workers (connections are set up lazily);
        with arguments, one full request whose output is dropped (first-call allocations, compiled kernels).
        """
        started = time.perf_counter()
        if kwargs:
            self.generate(**kwargs)
        else:
            self._control("ping").result()
        return time.perf_counter() - started

    def restart(self) -> None:
        """Replace the workers with fresh ones and become healthy again.

        Runs before any queued request (an in-flight one finishes first); raises :class:`WorkerFailureError` if
        the new workers cannot start.
        """
        self._control("restart", front=True).result()

    def close(self, wait: bool = True) -> None:
        """Stop the workers. Queued requests fail with :class:`EngineClosedError`; the running one finishes
        first with ``wait=True``, or fails at once with ``wait=False`` (the workers are killed). Idempotent."""
        with self._cond:
            self._closing = True
            dropped = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for item in dropped:
            if item.future.set_running_or_notify_cancel():
                item.future.set_exception(EngineClosedError("the engine was closed before this request ran"))
        if not wait:
            self._interrupt.set()
        self._thread.join()
        self._teardown(graceful=wait)
        with self._lock:
            self._state = EngineState.CLOSED
        shutil.rmtree(self._rendezvous_dir, ignore_errors=True)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, exc_type, *exc: Any) -> None:
        # leaving on an error (Ctrl-C included) does not wait for the running request
        self.close(wait=exc_type is None)

    @property
    def state(self) -> EngineState:
        with self._lock:
            return self._state

    @property
    def healthy(self) -> bool:
        """True while every worker is up and in step."""
        return self.state == EngineState.READY

    def health(self) -> EngineHealth:
        """State, last error, restarts, queue length and worker liveness, read together."""
        with self._lock:
            workers = self._world.workers if self._world is not None else []
            return EngineHealth(self._state, self._last_error, self._restarts, len(self._queue),
                                tuple(w.process.is_alive() for w in workers))

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the current workers, in rank order (empty while none run)."""
        with self._lock:
            return [w.pid for w in self._world.workers] if self._world is not None else []

    def describe(self) -> dict[str, Any]:
        """Devices, ranks, communicator, compile state, limits and health of the engine and its workers."""
        with self._lock:
            workers = [w.describe() for w in self._world.workers] if self._world is not None else []
            compiled = dict(self._info.get("describe", {}))
            return {
                "pipeline": self._info.get("pipeline"),
                "cfg_parallel_size": self.cfg_parallel_size,
                "devices": list(self.devices),
                "world_size": self.world_size,
                "mesh": compiled.get("mesh"),
                "workers": workers,
                "worker_threads": self._info.get("threads", self.worker_threads),
                "communicator": compiled.get("communicator"),
                "compiled": compiled,
                "compile_options": {k: repr(v) for k, v in self._compile_options.items()},
                "limits": dataclasses.asdict(self.limits),
                "state": self._state.value,
                "healthy": self._state == EngineState.READY,
                "last_error": self._last_error,
                "restarts": self._restarts,
                "auto_restart": self.auto_restart,
                "timeout": self.timeout,
                "request_timeout": self.request_timeout,
                "queued": len(self._queue),
                "requests": {k: self._counts[k] for k in ("completed", "rejected", "failed")},
            }

    def __repr__(self) -> str:
        return (f"Engine(cfg_parallel_size={self.cfg_parallel_size}, devices={self.devices}, "
                f"state={self._state.value!r})")

    # -- validation and encoding (in the caller's thread) ------------------------------------------------------

    def _encode_request(self, kwargs: dict[str, Any]) -> tuple[bytes, str]:
        if self._closing:
            raise EngineClosedError("the engine is closed")
        check_request(kwargs, self._info.get("signature", []), self._info.get("pipeline", "the pipeline"),
                      self.limits)
        wire_args = dict(kwargs)
        if "generator" in wire_args:
            try:
                wire_args["generator"] = wire.wire_generator(wire_args["generator"])
            except TypeError as err:
                raise InvalidRequestError(str(err)) from None
        try:
            payload = wire.dump(wire_args)
        except Exception as err:
            culprits = []
            for name, value in wire_args.items():
                try:
                    wire.dump(value)
                except Exception:
                    culprits.append(name)
            raise InvalidRequestError(
                f"argument(s) {', '.join(culprits) or '?'} cannot be sent to the worker processes ({err}); "
                "callables must be module-level functions or picklable objects"
            ) from None
        self.limits.check_size(len(payload))
        return payload, wire.fingerprint(payload)

    def _control(self, op: str, front: bool = False) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._closing:
                raise EngineClosedError("the engine is closed")
            item = _Item(op, future)
            if front:
                self._queue.appendleft(item)
            else:
                self._queue.append(item)
            self._cond.notify_all()
        return future

    # -- the executor thread: the only one that talks to workers ----------------------------------------------

    def _serve(self) -> None:
        while True:
            with self._cond:
                if not self._queue and not self._closing:
                    self._cond.wait(timeout=1.0)  # at most a second between looks at idle workers
                item = self._queue.popleft() if self._queue else None
                closing = self._closing
            if item is None:
                if closing:
                    return
                self._watch_idle()
            elif item.future.set_running_or_notify_cancel():
                try:
                    item.future.set_result(self._handle(item))
                except BaseException as err:
                    item.future.set_exception(err)
            # after the failing request has its answer: callers queued meanwhile wait for this
            self._restart_if_due()

    def _handle(self, item: _Item) -> Any:
        if item.op == "restart":
            self._restart_world()
            return None
        self._watch_idle()
        self._restart_if_due()  # a worker died while idle: with auto_restart this request runs on fresh ones
        with self._lock:
            state, last = self._state, self._last_error
        if state != EngineState.READY:
            raise EngineUnhealthyError(f"the engine is {state.value} after an earlier failure; call restart(). "
                                       f"Last error: {last}")
        world = self._world
        try:
            if item.op == "ping":
                world.ping("ping")
                return None
            output = world.run(f"request {item.request}", item.request, item.payload, item.fingerprint,
                               self.request_timeout)
        except InvalidRequestError:
            self._count("rejected")
            raise
        except RequestFailedError:
            self._count("failed")
            raise
        except WorldBroken as broken:
            self._count("failed")
            self._fail(broken.error)
            raise broken.error from None
        self._count("completed")
        return output

    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def _fail(self, error: WorkerFailureError) -> None:
        """The world is broken: its survivors could wait in a collective, so tear it down; maybe restart."""
        (logger.info if self._closing else logger.error)("pycfg engine: %s", error)
        restart = self.auto_restart and not self._closing
        with self._lock:
            self._state = EngineState.RESTARTING if restart else EngineState.UNHEALTHY
            self._last_error = str(error)
            self._restart_due = restart
        self._teardown(graceful=False)

    def _restart_if_due(self) -> None:
        with self._lock:
            due, self._restart_due = self._restart_due and not self._closing, False
        if due:
            try:
                self._restart_world()
            except Exception as err:  # stays unhealthy; the next restart() may succeed
                logger.error("pycfg engine: automatic restart failed: %s", err)

    def _watch_idle(self) -> None:
        with self._lock:
            world = self._world if self._state == EngineState.READY else None
        death = world.dead_worker() if world is not None else None
        if death is not None:
            self._fail(death)

    # -- starting and stopping workers ------------------------------------------------------------------------

    def _restart_world(self) -> None:
        self._teardown(graceful=False)
        with self._lock:
            self._restarts += 1
            if self._closing:
                raise EngineClosedError("the engine is closed")
            self._interrupt.clear()
        self._start_world()

    def _start_world(self) -> None:
        with self._lock:
            if self._state != EngineState.RESTARTING:
                self._state = EngineState.STARTING
            self._worlds += 1
            world = self._world = World(self._config, self._worlds, self._interrupt)
        try:
            world.start(self._ctx)
        except BaseException as err:
            self._teardown(graceful=False)
            with self._lock:
                self._state = EngineState.UNHEALTHY
                self._last_error = str(err)
            raise
        with self._lock:
            self._info = world.info
            self._state = EngineState.READY
            self._last_error = None

    def _teardown(self, graceful: bool) -> None:
        with self._lock:
            world, self._world = self._world, None
        if world is not None:
            world.stop(graceful)

    def __del__(self) -> None:
        # a forgotten engine must not leave workers behind; daemonic workers also die with the interpreter
        try:
            if not self._closing:
                self._closing = True
                self._teardown(graceful=False)
                shutil.rmtree(self._rendezvous_dir, ignore_errors=True)
        except Exception:
            pass
