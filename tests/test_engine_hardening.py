"""The engine under hostile or careless use (real worker processes, real signals, no mocks).

One engine serves most of this module (starting workers dominates on a small machine); its tests run in order
and the failure tests last, each leaving it healthy. Every output is compared bit for bit with the stock
pipeline run in this process with one thread, as each worker runs with one thread. Time bounds are generous:
the machine running the suite is loaded.
"""

from __future__ import annotations

import functools
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch
from hardening_cases import mark_then_slow, raise_on_every_rank

import pycfg
from pycfg.engine import EngineState
from pycfg.tiny import qwenimage_inputs, qwenimage_pipeline

TIMEOUT = 10.0
DRIVER = os.path.join(os.path.dirname(__file__), "engine_driver.py")


def request(seed: int, **extra) -> dict:
    return dict(**qwenimage_inputs(seed=seed % 5), num_inference_steps=2, output_type="latent", true_cfg_scale=4.0,
                **extra)


@pytest.fixture(scope="module")
def stock():
    torch.set_num_threads(1)
    return qwenimage_pipeline()


@pytest.fixture(scope="module")
def engine():
    eng = pycfg.Engine(functools.partial(qwenimage_pipeline, "tiny"), cfg_parallel_size=2, timeout=TIMEOUT,
                       check_finite=True, limits=pycfg.Limits(max_request_bytes=1 << 20))
    yield eng
    eng.close()


def run(engine, seed: int):
    return engine.generate(**request(seed), generator=torch.Generator().manual_seed(seed)).images


def reference(stock, seed: int):
    return stock(**request(seed), generator=torch.Generator().manual_seed(seed)).images


def listening_sockets(pids: list[int]) -> list[tuple[int, str]]:
    """(pid, local address) of every listening TCP socket the processes hold, from /proc."""
    listening: dict[str, str] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # TCP_LISTEN
                    listening[fields[9]] = fields[1]
    found = []
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in listening:
                found.append((pid, listening[target[8:-1]]))
    return found


def is_loopback(hex_address: str) -> bool:
    host = hex_address.split(":")[0]
    if len(host) == 8:  # IPv4, little-endian
        return bytes.fromhex(host)[::-1][0] == 127
    words = [bytes.fromhex(host[i:i + 8])[::-1] for i in range(0, 32, 8)]
    raw = b"".join(words)
    return raw == b"\0" * 15 + b"\1" or (raw[:12] == b"\0" * 10 + b"\xff\xff" and raw[12] == 127)


def dead(engine, rank: int) -> None:
    """Wait until the engine's worker of ``rank`` has exited (all its threads: a killed process's main thread
    shows as a zombie while the others still unwind)."""
    while engine.health().workers_alive[rank]:
        time.sleep(0.01)


def gone(pid: int) -> bool:
    """The process exited (its main thread at least), whoever its parent is."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" in f.read()
    except FileNotFoundError:
        return True


# -- 4. nothing listens beyond loopback -------------------------------------------------------------------------


def test_workers_listen_on_loopback_only(engine):
    engine.warmup()  # connections are made lazily: listen and connect before looking
    sockets = listening_sockets([os.getpid(), *engine.worker_pids])
    print(f"\nlistening sockets of the driver and workers: {sockets}")
    assert all(is_loopback(address) for _, address in sockets), sockets
    mode = stat.S_IMODE(os.stat(engine._rendezvous_dir).st_mode)
    assert mode == 0o700, oct(mode)
    assert engine.health().state == EngineState.READY and engine.health().workers_alive == (True, True)


# -- 1. a bad request fails alone --------------------------------------------------------------------------------


BAD = {
    "negative_prompt_embeds": dict(negative_prompt_embeds=torch.randn(1, 5, 7)),
    "negative_prompt_embeds_mask": dict(negative_prompt_embeds_mask=torch.ones(1, 3, dtype=torch.long)),
    "latents must have shape": dict(latents=torch.randn(1, 9, 16)),
    "height": dict(height=4),
    "meta": dict(latents=torch.empty(1, 16, 16, device="meta")),
    "contains NaN": dict(prompt_embeds=torch.full((1, 7, 16), float("nan"))),  # check_finite=True
}


def test_bad_requests_fail_alone_and_the_queue_behind_them_runs_exact(engine, stock):
    pids = engine.worker_pids
    started = time.monotonic()
    futures = []
    for i, (needle, bad) in enumerate(BAD.items()):
        futures.append((needle, engine.submit(**{**request(0), **bad})))
        futures.append((i, engine.submit(**request(i), generator=torch.Generator().manual_seed(i))))
    for key, future in futures:
        if isinstance(key, str):
            with pytest.raises(pycfg.InvalidRequestError, match=key):
                future.result(timeout=120)
        else:
            assert torch.equal(future.result(timeout=120).images, reference(stock, key))
    elapsed = time.monotonic() - started
    print(f"\n{len(BAD)} bad and {len(BAD)} good requests, interleaved: {elapsed:.1f}s")
    assert elapsed < 120
    assert engine.healthy and engine.worker_pids == pids
    assert engine.describe()["requests"]["rejected"] >= len(BAD)


def test_limits_refuse_oversized_requests_in_the_driver_at_once(engine):
    before = engine.describe()["requests"]
    oversized = [(dict(height=100000, width=100000), "max_pixels"), (dict(num_images_per_prompt=10**6), "max_images"),
                 (dict(num_inference_steps=10**6), "max_steps"),
                 (dict(latents=torch.zeros(1, 512, 1024)), "max_request_bytes")]
    for bad, needle in oversized:
        started = time.monotonic()
        with pytest.raises(pycfg.InvalidRequestError, match=needle):
            engine.generate(**{**request(0), **bad})
        assert time.monotonic() - started < 1.0
    assert engine.describe()["requests"] == before  # no worker saw them
    assert engine.request_timeout == 600.0  # on by default
    assert engine.describe()["limits"]["max_request_bytes"] == 1 << 20
    with pytest.raises(ValueError, match="max_steps"):
        pycfg.Limits(max_steps=0)


def test_request_errors_fail_alone_and_the_next_request_is_exact(engine, stock):
    pids = engine.worker_pids
    for error, oom in (("raise", False), ("oom", True)):
        started = time.monotonic()
        with pytest.raises(pycfg.RequestFailedError, match="on purpose") as info:
            engine.generate(**request(0), callback_on_step_end=functools.partial(raise_on_every_rank, error))
        assert time.monotonic() - started < TIMEOUT
        assert info.value.out_of_memory is oom and "Traceback" in info.value.worker_text
        assert engine.healthy and engine.worker_pids == pids
        assert torch.equal(run(engine, 3), reference(stock, 3))


# -- 3. a worker that died while idle ----------------------------------------------------------------------------


def test_idle_worker_death_is_reported_with_its_cause_not_a_broken_pipe(engine, stock):
    victim = engine.worker_pids[1]
    os.kill(victim, signal.SIGKILL)
    dead(engine, 1)
    with pytest.raises(pycfg.EngineUnhealthyError, match=r"rank 1 .*killed by signal SIGKILL"):
        engine.generate(**request(0))
    assert not engine.healthy
    engine.restart()
    assert torch.equal(run(engine, 1), reference(stock, 1))


def test_idle_worker_death_with_auto_restart_serves_the_next_request(engine, stock):
    engine.auto_restart = True
    try:
        restarts = engine.health().restarts
        victim = engine.worker_pids[0]
        os.kill(victim, signal.SIGKILL)
        dead(engine, 0)
        assert torch.equal(run(engine, 2), reference(stock, 2))  # waits for the restart, then runs
        assert engine.health().restarts == restarts + 1 and victim not in engine.worker_pids
    finally:
        engine.auto_restart = False


# -- 2 and 3. a stuck worker is named; auto_restart fails the request first, restarts after -------------------


def test_stopped_worker_is_named_and_auto_restart_runs_after_the_failure(engine, stock, tmp_path):
    engine.auto_restart = True
    try:
        marker = tmp_path / "started"
        victim = engine.worker_pids[1]
        future = engine.submit(**{**request(0), "num_inference_steps": 40},
                               callback_on_step_end=functools.partial(mark_then_slow, str(marker)))
        while not marker.exists():
            time.sleep(0.05)
        os.kill(victim, signal.SIGSTOP)
        stopped = time.monotonic()
        queued = engine.submit(**request(4), generator=torch.Generator().manual_seed(4))
        with pytest.raises(pycfg.WorkerFailureError, match=rf"rank 1 \(pid {victim}.*stuck") as info:
            future.result(timeout=120)
        failed_after = time.monotonic() - stopped
        assert info.value.rank == 1
        # the failing request is answered before the restart: the engine is still restarting, or just done
        state = engine.state
        assert torch.equal(queued.result(timeout=300).images, reference(stock, 4))
        restarted_after = time.monotonic() - stopped
        print(f"\nSIGSTOP: request failed after {failed_after:.1f}s (state then {state.value}), queued request "
              f"answered after {restarted_after:.1f}s")
        assert failed_after < 2 * TIMEOUT + 10  # the peer's collective timeout plus the grace, on a loaded machine
        assert state in (EngineState.RESTARTING, EngineState.READY) and engine.healthy
        assert victim not in engine.worker_pids and gone(victim)
    finally:
        engine.auto_restart = False


# -- 5. orphans and Ctrl-C ---------------------------------------------------------------------------------------


def test_workers_exit_with_their_driver_and_ctrl_c_stops_the_engine(tmp_path):
    drivers = {}
    for how in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
        marker = tmp_path / f"started-{how.name}"
        proc = subprocess.Popen([sys.executable, DRIVER, str(marker)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        drivers[how] = proc
    pids = {}
    for how, proc in drivers.items():
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("workers"):
                pids[how] = [int(p) for p in line.split()[1:]]
            if line.startswith("started"):
                break
        assert how in pids and lines[-1].startswith("started"), "".join(lines)
    for how, proc in drivers.items():
        sent = time.monotonic()
        os.kill(proc.pid, how)
        deadline = sent + 5.0
        while time.monotonic() < deadline and not all(gone(p) for p in pids[how]):
            time.sleep(0.05)
        workers_gone = time.monotonic() - sent
        if how == signal.SIGINT:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))  # the driver itself stops within 5 s
        else:
            proc.wait(timeout=5)
        print(f"\n{how.name} to the driver: workers gone after {workers_gone:.2f}s")
        assert all(gone(p) for p in pids[how]), (how.name, pids[how])
        assert workers_gone < 5.0
