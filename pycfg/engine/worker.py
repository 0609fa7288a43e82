"""The worker process: build the pipeline, join the workers' private world, compile once, serve messages.

A worker runs one message at a time, in the driver's order. Each request passes two agreements across the
ranks before any forward (same message at the same place in the stream; then the compiled pipeline's own
argument agreement), so a request any rank rejects is rejected by every rank at once and the world stays in
step. A worker never outlives its driver: it exits within a fraction of a second of the driver's death, even in
the middle of a request.
"""

from __future__ import annotations

import inspect
import os
import signal
import threading
import time
from datetime import timedelta
from typing import Any, Callable

import torch

from ..runtime.consistency import agree, fingerprint
from . import wire
from .validation import signature_info
from .wire import Op


def build_pipeline(factory: Callable, device: torch.device):
    """Call the factory, passing ``device=`` when it takes one; otherwise move what it built onto the device."""
    try:
        takes_device = "device" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        takes_device = False
    pipe = factory(device=device) if takes_device else factory()
    if not takes_device and device.type != "cpu":
        pipe = pipe.to(device)
    return pipe


def _exit_with_driver(driver_pid: int) -> None:
    """Exit as soon as the driver is gone (killed, crashed): a request in progress is abandoned and the device
    freed. Reparenting is how Linux and macOS tell a child its parent died; polled, as the main thread may be
    deep inside a forward."""

    def watch() -> None:
        while os.getppid() == driver_pid:
            time.sleep(0.2)
        os._exit(3)

    threading.Thread(target=watch, name="pycfg-driver-watch", daemon=True).start()


def _join_world(rank: int, world: int, store: str, device: torch.device, timeout: float) -> None:
    """The workers' process group, rendezvous through a file in the driver's private (0700) directory: no
    socket of the rendezvous is reachable from another host. Data connections stay on the loopback interface."""
    import torch.distributed as dist

    kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{store}",
                            rank=rank, world_size=world, timeout=timedelta(seconds=timeout), **kwargs)


def worker_main(rank: int, world: int, store: str, device: str, threads: int | None, factory: Callable,
                timeout: float, compile_options: dict, driver_pid: int, loopback: str | None, conn) -> None:
    _exit_with_driver(driver_pid)
    # Ctrl-C reaches the whole terminal's process group: the driver decides when workers stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    if loopback is not None:
        os.environ.update(GLOO_SOCKET_IFNAME=loopback, NCCL_SOCKET_IFNAME=loopback)
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

    from ..api import compile as pycfg_compile

    dev = torch.device(device)
    try:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        pipe = build_pipeline(factory, dev)
        if world > 1:
            _join_world(rank, world, store, dev, timeout)
        # the world is one request group: cfg_parallel_size x ring_degree x ulysses_degree ranks
        context_degree = compile_options.get("ring_degree", 1) * compile_options.get("ulysses_degree", 1)
        fast = pycfg_compile(pipe, cfg_parallel_size=world // context_degree, timeout=timeout, **compile_options)
        wire.send(conn, Op.READY, rank=rank, pid=os.getpid(), device=str(dev), signature=signature_info(pipe),
                  pipeline=type(pipe).__name__, describe=fast.describe(), threads=torch.get_num_threads())
    except BaseException as err:  # the driver reports it; a hang here would only time out
        wire.send(conn, Op.ERROR, seq=None, **wire.error_fields(err))
        return
    try:
        _serve(fast, rank, dev, conn)
    finally:
        fast.close()
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def _serve(fast, rank: int, dev: torch.device, conn) -> None:
    expected = 0
    location = wire.map_location(dev)
    while True:
        try:
            msg = wire.recv(conn)
        except (EOFError, OSError):
            return  # the driver is gone
        op, seq = msg["op"], msg.get("seq")
        if op == Op.CLOSE:
            return
        if seq != expected:
            wire.send(conn, Op.ERROR, seq=seq, kind=wire.ErrorKind.MISMATCH, trace="",
                      text=f"worker rank {rank} expected message {expected} but got {seq}: out of step")
            return
        expected += 1
        if op == Op.PING:
            try:
                _agree_on_message(fast, seq, "ping", None)
                wire.send(conn, Op.PONG, seq=seq)
            except BaseException as err:
                wire.send(conn, Op.ERROR, seq=seq, **wire.error_fields(err))
            continue
        wire.send(conn, **_run(fast, msg, dev, location))


def _agree_on_message(fast, seq: int, what: Any, error: BaseException | None) -> None:
    """Every rank is at the same message of the stream, holding the same bytes, and could decode them."""
    digest, described = fingerprint({"__seq__": seq, "__message__": what})
    agree(fast.comm, digest, described, error)


def _run(fast, msg: dict, dev: torch.device, location) -> dict[str, Any]:
    seq = msg["seq"]
    kwargs, error = None, None
    try:
        payload = msg["payload"]
        if wire.fingerprint(payload) != msg["fingerprint"]:
            raise RuntimeError(f"request {msg['request']}: its bytes were corrupted on the way to this worker")
        kwargs = {k: wire.rebuild_generators(v, dev) for k, v in wire.load(payload, location).items()}
    except Exception as err:
        error = err
    try:
        _agree_on_message(fast, seq, (msg["request"], msg["fingerprint"]), error)
        call = fast.admit(**kwargs)
    except BaseException as err:
        return {"op": Op.ERROR, "seq": seq, **wire.error_fields(err, admitted=False)}
    try:
        started = time.perf_counter()
        output = fast.run(call)
        seconds = time.perf_counter() - started
        digest = wire.output_digest(output)
        body = wire.dump(output) if fast.rank == 0 else None
        return {"op": Op.RESULT, "seq": seq, "digest": digest, "output": body, "seconds": seconds}
    except BaseException as err:
        reply = {"op": Op.ERROR, "seq": seq, **wire.error_fields(err)}
        del call, kwargs
        if isinstance(err, torch.OutOfMemoryError) and dev.type == "cuda":
            torch.cuda.empty_cache()  # recovered: the next request starts from a clean allocator
        return reply
