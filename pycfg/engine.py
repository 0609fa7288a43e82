"""A driver-worker engine for long-lived callers (web servers) that cannot be launched by torchrun.

The caller's process is the driver: it starts one worker process per rank, each of which builds the pipeline,
joins a torch.distributed world of the workers and compiles the pipeline once with :func:`pycfg.compile`.
Requests go through one queue and run in order on every worker; the driver returns rank 0's output.

    engine = pycfg.Engine(functools.partial(load_pipeline, "Qwen/Qwen-Image"), cfg_parallel_size=2)
    image = engine.generate(prompt="...", negative_prompt="...", true_cfg_scale=4.0,
                            generator=torch.Generator().manual_seed(0)).images[0]

Failure behaviour: a request is checked in the driver (argument names against the pipeline's ``__call__``,
basic values) before any worker sees it; a request every worker rejects in its own local checks fails with
:class:`InvalidRequestError` and leaves the engine healthy; a worker that raises while running a request, or
dies, fails that request at once with the worker's error text, the world of workers is torn down (its
survivors would otherwise wait in a collective) and the engine is unhealthy until :meth:`Engine.restart`
(or at once with ``auto_restart=True``).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hashlib
import inspect
import io
import logging
import math
import multiprocessing.connection
import numbers
import os
import pickle
import signal
import threading
import time
import traceback
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.multiprocessing as mp

from .errors import PycfgError, RankFailureError

logger = logging.getLogger("pycfg.engine")

# compile() options the engine sets itself, or that cannot cross a process boundary
_ENGINE_OWNED_OPTIONS = ("pipeline", "cfg_parallel_size", "timeout", "group")


class EngineError(PycfgError):
    """Base class of the errors an :class:`Engine` raises on purpose."""


class InvalidRequestError(EngineError, ValueError, TypeError):
    """A request was rejected before it ran (unknown argument, bad value, not transferable); the engine stays
    healthy. Also a ``ValueError`` and ``TypeError``, as the stock pipeline would raise one of those."""


class WorkerFailureError(RankFailureError, EngineError):
    """A worker raised while running a request, died, or stopped answering. ``rank`` and ``worker_text`` (the
    worker's own error and traceback, or how it died) say which and why."""

    def __init__(self, message: str, rank: int | None = None, worker_text: str = "") -> None:
        super().__init__(message)
        self.rank = rank
        self.worker_text = worker_text


class EngineUnhealthyError(EngineError):
    """The engine lost its workers after an earlier failure; call :meth:`Engine.restart`."""


class EngineClosedError(EngineError):
    """The engine was closed."""


class GeneratorState(NamedTuple):
    """How a ``torch.Generator`` travels to the workers: its device type and its full state.

    Each worker rebuilds a generator with this state on its own device, so every rank draws the same numbers the
    driver's generator would have drawn. The driver's generator itself is not advanced.
    """

    device_type: str
    state: torch.Tensor


# -- wire format ----------------------------------------------------------------------------------------------
# Envelopes are plain pickles of small dicts; payloads (arguments, outputs) are torch.save bytes, which carry
# tensors by value (torch.multiprocessing's default reduction would move them into shared memory segments that
# outlive the request).


def _dump(value: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


def _load(data: bytes, map_location: Any = None) -> Any:
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)


def _send(conn, **message: Any) -> None:
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def _recv(conn) -> dict:
    return pickle.loads(conn.recv_bytes())


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


# -- the worker process ---------------------------------------------------------------------------------------


def _build_pipeline(factory: Callable, device: torch.device):
    """Call the factory, passing ``device=`` when it takes one; otherwise move what it built onto the device."""
    try:
        takes_device = "device" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        takes_device = False
    pipe = factory(device=device) if takes_device else factory()
    if not takes_device and device.type != "cpu":
        pipe = pipe.to(device)
    return pipe


def _signature_info(pipe) -> list[tuple[str, str, bool]]:
    """(name, kind, has_default) of each parameter of the pipeline's ``__call__``: what the driver validates
    requests against, without ever holding the pipeline itself."""
    sig = inspect.signature(type(pipe).__call__)
    return [(p.name, p.kind.name, p.default is not inspect.Parameter.empty)
            for p in sig.parameters.values() if p.name != "self"]


def _map_location(device: torch.device):
    # a server's driver holds CPU tensors; the worker's pipeline wants them on its own device (the stock
    # pipelines do not move caller-provided embeds). Generator states are moved back by _rebuild_generators.
    if device.type == "cuda":
        return lambda storage, loc: storage.cuda(device.index or 0)
    return "cpu"


def _rebuild_generators(value: Any, device: torch.device) -> Any:
    if isinstance(value, GeneratorState):
        g = torch.Generator(device=device if value.device_type == device.type else value.device_type)
        g.set_state(value.state.cpu())  # set_state takes a CPU byte tensor on every device
        return g
    if isinstance(value, list):
        return [_rebuild_generators(v, device) for v in value]
    return value


def _precheck(fast, kwargs: dict) -> None:
    """The compiled pipeline's own local argument checks, run before any collective.

    They are deterministic and every rank gets the same bytes, so either every rank rejects a request here or
    none does, and a rejection leaves the world in step.
    """
    from .guidance import GuidancePolicy

    guidance = kwargs.get("guidance")
    if guidance is not None and not isinstance(guidance, GuidancePolicy):
        raise TypeError(f"guidance must be a pycfg.guidance policy, got {type(guidance).__name__}")
    args = {k: v for k, v in kwargs.items() if k != "guidance"}
    fast.adapter.check(args)


def _error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}\n{traceback.format_exc()}"


def _worker_main(rank: int, world: int, addr: str, port: int, device: str, threads: int | None,
                 factory: Callable, timeout: float, compile_options: dict, conn) -> None:
    os.environ.update(
        MASTER_ADDR=addr, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
    )
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        # tqdm's default lock is a multiprocessing semaphore; a worker the engine kills on purpose would leave it
        # to the resource tracker, which warns at exit. Progress bars here never span processes.
        from tqdm.auto import tqdm

        tqdm.set_lock(threading.RLock())
    except ImportError:
        pass
    import torch.distributed as dist

    from .api import compile as pycfg_compile
    from .runtime.consistency import check_same_arguments

    dev = torch.device(device)
    try:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        pipe = _build_pipeline(factory, dev)
        # the world is one request group: cfg_parallel_size x ring_degree x ulysses_degree ranks
        context_degree = compile_options.get("ring_degree", 1) * compile_options.get("ulysses_degree", 1)
        fast = pycfg_compile(pipe, cfg_parallel_size=world // context_degree, timeout=timeout, **compile_options)
        _send(conn, op="ready", rank=rank, pid=os.getpid(), device=str(dev), signature=_signature_info(pipe),
              pipeline=type(pipe).__name__, describe=fast.describe(), threads=torch.get_num_threads())
    except BaseException as err:  # the driver reports it; a hang here would only time out
        _send(conn, op="failed", rank=rank, seq=None, text=_error_text(err))
        return

    expected = 0
    location = _map_location(dev)
    try:
        while True:
            try:
                msg = _recv(conn)
            except (EOFError, OSError):
                break  # the driver is gone
            op = msg["op"]
            if op == "close":
                break
            seq = msg["seq"]
            if seq != expected:
                _send(conn, op="failed", rank=rank, seq=seq,
                      text=f"worker rank {rank} expected message {expected} but got {seq}: out of step")
                break
            expected += 1
            try:
                if op == "ping":
                    check_same_arguments(fast.comm, {"__seq__": seq, "__op__": "ping"})
                    _send(conn, op="pong", rank=rank, seq=seq)
                    continue
                payload = msg["payload"]
                if hashlib.sha256(payload).hexdigest() != msg["fingerprint"]:
                    raise RuntimeError(f"request {msg['request']}: argument fingerprint mismatch in transfer")
                kwargs = {k: _rebuild_generators(v, dev) for k, v in _load(payload, location).items()}
            except BaseException as err:
                _send(conn, op="failed", rank=rank, seq=seq, text=_error_text(err))
                continue
            try:
                _precheck(fast, kwargs)
            except Exception as err:
                _send(conn, op="rejected", rank=rank, seq=seq, text=f"{type(err).__name__}: {err}")
                continue
            try:
                # all ranks run the same request, in the same place in the stream, with the same bytes
                check_same_arguments(fast.comm, {"__seq__": seq, "__request__": msg["request"],
                                                 "__fingerprint__": msg["fingerprint"]})
                started = time.perf_counter()
                output = fast(**kwargs)
                seconds = time.perf_counter() - started
                digest = output_digest(output)
                body = _dump(output) if rank == 0 else None
                del output, kwargs
                _send(conn, op="result", rank=rank, seq=seq, digest=digest, output=body, seconds=seconds)
            except BaseException as err:
                _send(conn, op="failed", rank=rank, seq=seq, text=_error_text(err))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


# -- the driver -----------------------------------------------------------------------------------------------


class _Item:
    __slots__ = ("kind", "future", "payload", "fingerprint", "request", "submitted")

    def __init__(self, kind: str, future: concurrent.futures.Future, payload: bytes | None = None,
                 fingerprint: str | None = None, request: int | None = None) -> None:
        self.kind = kind
        self.future = future
        self.payload = payload
        self.fingerprint = fingerprint
        self.request = request
        self.submitted = time.monotonic()


class _Failure(Exception):
    """Internal: the world of workers is broken; carries the error to give the caller."""

    def __init__(self, error: WorkerFailureError) -> None:
        super().__init__(str(error))
        self.error = error


class _Worker:
    __slots__ = ("rank", "process", "conn", "pid", "device")

    def __init__(self, rank: int, process, conn, device: str) -> None:
        self.rank = rank
        self.process = process
        self.conn = conn
        self.pid = process.pid
        self.device = device


def _exit_text(code: int | None) -> str:
    if code is None:
        return "is still running"
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _free_port(addr: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def _default_devices(size: int) -> list[str]:
    if torch.cuda.is_available() and torch.cuda.device_count() >= size:
        return [f"cuda:{i}" for i in range(size)]
    return ["cpu"] * size


_VALUE_STEPS = ("num_inference_steps",)
_VALUE_POSITIVE = ("height", "width", "num_images_per_prompt", "num_frames", "max_sequence_length")


def _check_value(name: str, value: Any) -> None:
    """Basic value checks a worker would otherwise only make after the request crossed a process boundary."""
    if value is None:
        return
    if name in _VALUE_STEPS or name in _VALUE_POSITIVE:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise InvalidRequestError(f"{name} must be an integer, got {value!r}")
        if value < 1:
            raise InvalidRequestError(f"{name} must be >= 1, got {value!r}")
    elif name.endswith("scale") or name.endswith("scale_2") or name in ("guidance_rescale", "eta", "strength"):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise InvalidRequestError(f"{name} must be a finite number, got {value!r}")
        if name == "strength" and not 0 <= value <= 1:
            raise InvalidRequestError(f"strength must be in [0, 1], got {value!r}")
    elif name == "sigmas" or name == "timesteps":
        try:
            ok = all(isinstance(s, numbers.Real) and not isinstance(s, bool) and math.isfinite(s) for s in value)
        except TypeError:
            ok = False
        if not ok or len(value) == 0:
            raise InvalidRequestError(f"{name} must be a non-empty sequence of finite numbers, got {value!r}")
    elif name == "output_type" and not isinstance(value, str):
        raise InvalidRequestError(f"output_type must be a string, got {value!r}")


def _wire_generator(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, torch.Generator):
        return GeneratorState(value.device.type, value.get_state().clone())
    if isinstance(value, (list, tuple)) and value and all(isinstance(g, torch.Generator) for g in value):
        return [_wire_generator(g) for g in value]
    raise InvalidRequestError(
        f"generator must be a torch.Generator or a list of them, got {type(value).__name__} "
        "(each worker rebuilds the generator from its state)"
    )


class Engine:
    """CFG-parallel inference for a long-lived process: one spawned worker per rank, driven from here.

    Args:
        pipeline_factory: builds the pipeline in each worker. It must be picklable (a module-level function, or a
            ``functools.partial`` of one) and is only ever called in the workers, on their own devices: with
            ``device=`` when it has a ``device`` parameter, otherwise with no arguments, and what it returns is
            then moved with ``.to(device)`` (unless the device is the CPU).
        cfg_parallel_size: ranks in the CFG group. With ``ring_degree`` / ``ulysses_degree`` compile options the
            engine runs ``cfg_parallel_size * ring_degree * ulysses_degree`` workers, one request mesh.
        devices: one device per rank; default: ``cuda:0 .. cuda:P-1`` when that many GPUs exist, else the CPU for
            every rank. The workers' world uses gloo on CPU and NCCL on CUDA.
        timeout: seconds a collective may wait for a failed or dead peer (passed to :func:`pycfg.compile`); also
            how long the other workers may lag behind the first one to answer a request.
        auto_restart: restart the workers at once after a failure instead of waiting for :meth:`restart`.
        request_timeout: seconds one request may run before it fails and the workers are restarted or torn
            down; None (default) for no limit. A dead worker is noticed at once regardless.
        startup_timeout: seconds for the workers to import, build and compile.
        worker_threads: ``torch.set_num_threads`` in each worker (1 by default: one core per rank, and the
            numerics of a single-threaded stock pipeline); None leaves torch's default.
        check_outputs: compare a digest of every rank's output with rank 0's; a difference fails the request as
            a worker failure (the ranks drifted apart).
        **compile_options: any other :func:`pycfg.compile` option (``exchange``, ``fused``, ``guidance``, ...).

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
        request_timeout: float | None = None,
        startup_timeout: float = 300.0,
        worker_threads: int | None = 1,
        check_outputs: bool = True,
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
        self._check_compile_options(compile_options)
        from .parallel.mesh import MeshLayout

        layout = MeshLayout(cfg_parallel_size, compile_options.get("ring_degree", 1),
                            compile_options.get("ulysses_degree", 1))
        try:
            pickle.dumps(pipeline_factory)
        except Exception as err:
            raise TypeError(
                f"pipeline_factory must be picklable to reach the worker processes (a module-level function or "
                f"a functools.partial of one): {err}"
            ) from None
        if devices is None:
            devices = _default_devices(layout.size)
        devices = [str(torch.device(d)) for d in devices]
        if len(devices) != layout.size:
            raise ValueError(f"devices has {len(devices)} entries but the engine runs {layout.size} ranks "
                             f"({layout.describe()})")

        self.cfg_parallel_size = cfg_parallel_size
        #: worker processes: one request mesh of cfg x ring x ulysses ranks
        self.world_size = layout.size
        self.devices = devices
        self.timeout = float(timeout)
        self.auto_restart = bool(auto_restart)
        self.request_timeout = None if request_timeout is None else float(request_timeout)
        self.startup_timeout = float(startup_timeout)
        self.worker_threads = worker_threads
        self.check_outputs = bool(check_outputs)
        self._factory = pipeline_factory
        self._compile_options = dict(compile_options)
        self._addr = "127.0.0.1"

        self._ctx = mp.get_context("spawn")
        self._workers: list[_Worker] = []
        self._seq = 0
        self._state = "starting"
        self._last_error: str | None = None
        self._signature: list[tuple[str, str, bool]] | None = None
        self._info: dict[str, Any] = {}
        self._counts = collections.Counter()
        self._restarts = 0
        self._next_request = 0

        self._lock = threading.Lock()  # state, counters, the queue
        self._cond = threading.Condition(self._lock)
        self._queue: collections.deque[_Item] = collections.deque()
        self._closing = False
        self._interrupt = threading.Event()

        self._start_world()  # raises, leaving nothing running, if the workers cannot start
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
        first with ``wait=True``, or fails at once with ``wait=False``. Idempotent."""
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
        self._teardown(graceful=True)
        with self._lock:
            self._state = "closed"

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def healthy(self) -> bool:
        """True while every worker is up and in step."""
        with self._lock:
            return self._state == "ready"

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the current workers, in rank order (empty while none run)."""
        with self._lock:
            return [w.pid for w in self._workers]

    def describe(self) -> dict[str, Any]:
        """Devices, ranks, communicator, compile state and health of the engine and its workers."""
        with self._lock:
            workers = [{"rank": w.rank, "pid": w.pid, "device": w.device, "alive": w.process.is_alive()}
                       for w in self._workers]
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
                "state": self._state,
                "healthy": self._state == "ready",
                "last_error": self._last_error,
                "restarts": self._restarts,
                "auto_restart": self.auto_restart,
                "timeout": self.timeout,
                "request_timeout": self.request_timeout,
                "queued": len(self._queue),
                "requests": {k: self._counts[k] for k in ("completed", "rejected", "failed")},
            }

    def __repr__(self) -> str:
        return f"Engine(cfg_parallel_size={self.cfg_parallel_size}, devices={self.devices}, state={self._state!r})"

    # -- validation and encoding (in the caller's thread) ------------------------------------------------------

    @staticmethod
    def _check_compile_options(options: dict[str, Any]) -> None:
        from .api import compile as pycfg_compile

        allowed = [p for p in inspect.signature(pycfg_compile).parameters if p not in _ENGINE_OWNED_OPTIONS]
        for name in options:
            if name in _ENGINE_OWNED_OPTIONS:
                raise TypeError(f"Engine sets compile option {name!r} itself")
            if name not in allowed:
                raise TypeError(f"unknown compile option {name!r}; allowed: {', '.join(allowed)}")
        try:
            pickle.dumps(options)
        except Exception as err:
            raise TypeError(f"compile options must be picklable to reach the workers: {err}") from None

    def _validate(self, kwargs: dict[str, Any]) -> None:
        signature = self._signature or []
        names = {name for name, kind, _ in signature if kind not in ("VAR_POSITIONAL", "VAR_KEYWORD")}
        open_ended = any(kind == "VAR_KEYWORD" for _, kind, _ in signature)
        unknown = sorted(k for k in kwargs if k not in names and k != "guidance")
        if unknown and not open_ended:
            raise InvalidRequestError(
                f"{self._info.get('pipeline', 'the pipeline')} takes no argument(s) {', '.join(map(repr, unknown))}; "
                f"allowed: {', '.join(sorted(names | {'guidance'}))}"
            )
        missing = [name for name, kind, has_default in signature
                   if not has_default and kind in ("POSITIONAL_OR_KEYWORD", "KEYWORD_ONLY") and name not in kwargs]
        if missing:
            raise InvalidRequestError(f"missing required argument(s): {', '.join(missing)}")
        for name, value in kwargs.items():
            _check_value(name, value)
        guidance = kwargs.get("guidance")
        if guidance is not None:
            from .guidance import GuidancePolicy

            if not isinstance(guidance, GuidancePolicy):
                raise InvalidRequestError(f"guidance must be a pycfg.guidance policy, got {type(guidance).__name__}")

    def _encode_request(self, kwargs: dict[str, Any]) -> tuple[bytes, str]:
        if self._closing:
            raise EngineClosedError("the engine is closed")
        self._validate(kwargs)
        wire = dict(kwargs)
        if "generator" in wire:
            wire["generator"] = _wire_generator(wire["generator"])
        try:
            payload = _dump(wire)
        except Exception as err:
            culprits = []
            for name, value in wire.items():
                try:
                    _dump(value)
                except Exception:
                    culprits.append(name)
            raise InvalidRequestError(
                f"argument(s) {', '.join(culprits) or '?'} cannot be sent to the worker processes ({err}); "
                "callables must be module-level functions or picklable objects"
            ) from None
        return payload, hashlib.sha256(payload).hexdigest()

    def _control(self, kind: str, front: bool = False) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._closing:
                raise EngineClosedError("the engine is closed")
            item = _Item(kind, future)
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
                while not self._queue and not self._closing:
                    self._cond.wait(timeout=1.0)
                    if not self._queue:
                        break  # a periodic look at the workers while idle
                item = self._queue.popleft() if self._queue else None
                closing = self._closing
            if item is None:
                if closing:
                    return
                self._watch_idle()
                continue
            if not item.future.set_running_or_notify_cancel():
                continue
            try:
                item.future.set_result(self._handle(item))
            except BaseException as err:
                item.future.set_exception(err)

    def _handle(self, item: _Item) -> Any:
        if item.kind == "restart":
            self._restart_world()
            return None
        with self._lock:
            state, last = self._state, self._last_error
        if state != "ready":
            raise EngineUnhealthyError(
                f"the engine is unhealthy after an earlier failure; call restart(). Last error: {last}"
            )
        try:
            if item.kind == "ping":
                self._dispatch(op="ping")
                return None
            output = self._dispatch(op="run", request=item.request, payload=item.payload,
                                    fingerprint=item.fingerprint)
        except InvalidRequestError:
            self._count("rejected")
            raise
        except _Failure as failure:
            self._count("failed")
            self._fail(failure.error)
            raise failure.error from None
        self._count("completed")
        return output

    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def _dispatch(self, **message: Any) -> Any:
        seq = self._seq
        self._seq += 1
        request = message.get("request")
        label = f"request {request}" if request is not None else message["op"]
        for w in self._workers:
            try:
                _send(w.conn, seq=seq, **message)
            except (OSError, ValueError) as err:
                raise _Failure(self._death(w, label, f"could not be reached ({err})")) from None
        replies = self._collect(seq, label)
        if message["op"] == "ping":
            return None
        kinds = {r["op"] for r in replies.values()}
        if kinds == {"rejected"}:
            raise InvalidRequestError(f"{label} rejected by the pipeline: {replies[0]['text']}")
        if kinds != {"result"}:
            ranks = {rank: r["op"] for rank, r in sorted(replies.items())}
            raise _Failure(WorkerFailureError(f"{label}: workers disagreed on whether it is valid ({ranks}); "
                                              "they may have drifted out of step", None, str(ranks)))
        if self.check_outputs:
            differing = [rank for rank, r in replies.items() if r["digest"] != replies[0]["digest"]]
            if differing:
                raise _Failure(WorkerFailureError(
                    f"{label}: outputs of ranks {differing} differ from rank 0's: the workers drifted apart",
                    differing[0], "output digests differ"))
        return _load(replies[0]["output"], "cpu")

    def _collect(self, seq: int, label: str) -> dict[int, dict]:
        """Every worker's reply to message ``seq``; raises :class:`_Failure` at the first failure or death.

        A worker whose collective failed because a peer died usually reports before the driver notices that
        death; such a report waits a moment for the root cause (a death, or another worker's own error).
        """
        pending = {w.rank: w for w in self._workers}
        replies: dict[int, dict] = {}
        started = time.monotonic()
        first_reply: float | None = None
        peer_failure: WorkerFailureError | None = None
        peer_grace = 0.0
        while pending:
            now = time.monotonic()
            if peer_failure is not None and now > peer_grace:
                raise _Failure(peer_failure)
            if self._interrupt.is_set():
                raise _Failure(WorkerFailureError(f"{label} was interrupted by close(wait=False)"))
            if self.request_timeout is not None and now - started > self.request_timeout:
                raise _Failure(WorkerFailureError(
                    f"{label} did not finish within request_timeout={self.request_timeout:g}s "
                    f"(no answer from ranks {sorted(pending)})"))
            if first_reply is not None and now - first_reply > self.timeout + 5.0:
                raise _Failure(WorkerFailureError(
                    f"{label}: ranks {sorted(pending)} did not answer within timeout={self.timeout:g}s of rank(s) "
                    f"{sorted(replies)}; they are stuck or out of step", min(pending)))
            conns = {w.conn: w for w in pending.values()}
            sentinels = {w.process.sentinel: w for w in pending.values()}
            ready = multiprocessing.connection.wait(list(conns) + list(sentinels), timeout=0.2)
            for obj in ready:
                w = conns.get(obj) or sentinels.get(obj)
                if w is None or w.rank not in pending:
                    continue
                try:
                    if obj in sentinels and not w.conn.poll():
                        raise EOFError
                    reply = _recv(w.conn)
                except (EOFError, OSError):
                    w.process.join(timeout=1.0)
                    raise _Failure(self._death(w, label, _exit_text(w.process.exitcode))) from None
                del pending[w.rank]
                if reply.get("seq") != seq:
                    raise _Failure(WorkerFailureError(
                        f"{label}: worker rank {w.rank} answered message {reply.get('seq')} instead of {seq}: "
                        "out of step", w.rank))
                if reply["op"] == "failed":
                    error = WorkerFailureError(f"{label} failed on worker rank {w.rank} (pid {w.pid}): "
                                               f"{reply['text']}", w.rank, reply["text"])
                    if not reply["text"].startswith(RankFailureError.__name__):
                        raise _Failure(error)
                    if peer_failure is None:
                        peer_failure, peer_grace = error, time.monotonic() + 2.0
                    continue
                replies[w.rank] = reply
                if first_reply is None:
                    first_reply = time.monotonic()
        if peer_failure is not None:
            raise _Failure(peer_failure)
        return replies

    @staticmethod
    def _death(w: _Worker, label: str, how: str) -> WorkerFailureError:
        text = f"worker rank {w.rank} (pid {w.pid}, {w.device}) {how}"
        return WorkerFailureError(f"{label} failed: {text}", w.rank, text)

    def _fail(self, error: WorkerFailureError) -> None:
        """The world is broken: its survivors would wait in a collective, so tear it down; maybe restart."""
        (logger.info if self._closing else logger.error)("pycfg engine: %s", error)
        with self._lock:
            self._state = "unhealthy"
            self._last_error = str(error)
        self._teardown(graceful=False)
        if self.auto_restart and not self._closing:
            try:
                self._restart_world()
            except Exception as err:  # stays unhealthy; the next restart() may succeed
                logger.error("pycfg engine: automatic restart failed: %s", err)

    def _watch_idle(self) -> None:
        with self._lock:
            if self._state != "ready":
                return
            dead = [w for w in self._workers if not w.process.is_alive()]
        if dead:
            w = dead[0]
            self._fail(self._death(w, "while idle", _exit_text(w.process.exitcode)))

    # -- starting and stopping workers ------------------------------------------------------------------------

    def _restart_world(self) -> None:
        self._teardown(graceful=False)
        with self._lock:
            self._restarts += 1
        self._interrupt.clear()
        self._start_world()

    def _start_world(self) -> None:
        with self._lock:
            self._state = "starting"
        for attempt in range(3):
            try:
                self._spawn()
                break
            except WorkerFailureError as err:
                self._teardown(graceful=False)
                # another process may take the rendezvous port between choosing and binding it
                if attempt < 2 and "address already in use" in str(err).lower():
                    continue
                with self._lock:
                    self._state = "unhealthy"
                    self._last_error = str(err)
                raise
        with self._lock:
            self._state = "ready"
            self._last_error = None

    def _spawn(self) -> None:
        port = _free_port(self._addr)
        workers = []
        for rank, device in enumerate(self.devices):
            parent, child = self._ctx.Pipe(duplex=True)
            process = self._ctx.Process(
                target=_worker_main, name=f"pycfg-worker-{rank}", daemon=True,
                args=(rank, self.world_size, self._addr, port, device, self.worker_threads, self._factory,
                      self.timeout, self._compile_options, child),
            )
            process.start()
            child.close()  # so the driver sees EOF when the worker dies
            workers.append(_Worker(rank, process, parent, device))
        with self._lock:
            self._workers = workers
        self._seq = 0
        deadline = time.monotonic() + self.startup_timeout
        pending = {w.rank: w for w in workers}
        infos: dict[int, dict] = {}
        while pending:
            if time.monotonic() > deadline:
                raise WorkerFailureError(f"workers {sorted(pending)} did not start within "
                                         f"startup_timeout={self.startup_timeout:g}s", min(pending))
            conns = {w.conn: w for w in pending.values()}
            sentinels = {w.process.sentinel: w for w in pending.values()}
            for obj in multiprocessing.connection.wait(list(conns) + list(sentinels), timeout=0.5):
                w = conns.get(obj) or sentinels.get(obj)
                if w is None or w.rank not in pending:
                    continue
                try:
                    if obj in sentinels and not w.conn.poll():
                        raise EOFError
                    reply = _recv(w.conn)
                except (EOFError, OSError):
                    w.process.join(timeout=1.0)
                    raise self._death(w, "startup", _exit_text(w.process.exitcode)) from None
                if reply["op"] != "ready":
                    raise WorkerFailureError(f"worker rank {w.rank} failed to start: {reply['text']}", w.rank,
                                             reply["text"])
                infos[w.rank] = reply
                del pending[w.rank]
        with self._lock:
            self._info = infos[0]
            self._signature = infos[0]["signature"]

    def _teardown(self, graceful: bool) -> None:
        with self._lock:
            workers, self._workers = self._workers, []
        if graceful:
            for w in workers:
                try:
                    _send(w.conn, op="close")
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

    def __del__(self) -> None:
        # a forgotten engine must not leave workers behind; daemonic workers also die with the interpreter
        try:
            if not self._closing:
                self._closing = True
                self._teardown(graceful=False)
        except Exception:
            pass
