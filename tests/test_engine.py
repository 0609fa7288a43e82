"""pycfg.Engine with real worker processes (spawned, gloo world) serving the tiny Qwen-Image pipeline.

One engine serves the whole module (starting workers dominates on a small machine); the failure tests run last
and restart it. Every output is compared bit for bit with the stock pipeline run in this process with one thread,
as each worker runs with one thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import signal
import time

import numpy as np
import pytest
import torch

import pycfg
from pycfg.engine import EngineClosedError
from pycfg.tiny import qwenimage_inputs, qwenimage_pipeline

TIMEOUT = 30.0


# -- callbacks the workers import from this module ---------------------------------------------------------------


def slow_callback(marker: str, pipe, i, t, kwargs):
    """Marks that the request started, then makes every step slow enough to be interrupted."""
    if i == 0 and os.environ.get("RANK") == "0":
        with open(marker, "w") as f:
            f.write("started")
    time.sleep(0.3)
    return {}


def exit_callback(rank: str, pipe, i, t, kwargs):
    if i == 1 and os.environ.get("RANK") == rank:
        os._exit(7)
    return {}


def raise_callback(rank: str, pipe, i, t, kwargs):
    if i == 1 and os.environ.get("RANK") == rank:
        raise RuntimeError("callback failed on purpose")
    return {}


def failing_factory():
    if os.environ.get("RANK") == "1":
        raise RuntimeError("no weights on this rank")
    return qwenimage_pipeline()


# -- helpers ------------------------------------------------------------------------------------------------------


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def request(seed: int) -> dict:
    """Small requests of several kinds: mostly latents with CFG, some guidance-off, some decoded images."""
    kwargs = dict(**qwenimage_inputs(seed=seed % 7), num_inference_steps=2 + seed % 2, output_type="latent",
                  true_cfg_scale=4.0)
    if seed % 10 == 3:
        kwargs["true_cfg_scale"] = 1.0  # guidance off by scale
    if seed % 10 == 7:
        del kwargs["negative_prompt_embeds"], kwargs["negative_prompt_embeds_mask"]  # guidance off: no negative
    if seed % 25 == 11:
        kwargs["output_type"] = "np"
    return kwargs


def images(output):
    return output.images


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return np.array_equal(a, b)


@pytest.fixture(scope="module")
def stock():
    torch.set_num_threads(1)
    return qwenimage_pipeline()


@pytest.fixture(scope="module")
def engine():
    eng = pycfg.Engine(functools.partial(qwenimage_pipeline, "tiny"), cfg_parallel_size=2, timeout=TIMEOUT)
    yield eng
    eng.close()


def reference(stock, seed: int):
    return images(stock(**request(seed), generator=torch.Generator().manual_seed(seed)))


def run(engine, seed: int):
    return images(engine.generate(**request(seed), generator=torch.Generator().manual_seed(seed)))


# -- tests --------------------------------------------------------------------------------------------------------


def test_describe(engine):
    d = engine.describe()
    assert d["healthy"] and d["state"] == "ready"
    assert d["pipeline"] == "QwenImagePipeline"
    assert d["cfg_parallel_size"] == 2 and d["devices"] == ["cpu", "cpu"]
    assert [w["rank"] for w in d["workers"]] == [0, 1] and all(w["alive"] for w in d["workers"])
    assert d["communicator"] == "torch" and d["compiled"]["cfg_parallel_size"] == 2
    assert d["worker_threads"] == 1
    assert engine.warmup() >= 0


def test_200_sequential_requests_match_stock_with_bounded_memory(engine, stock):
    for seed in [*range(10), 11]:  # every kind of request once: warm both sides before measuring memory
        assert same(run(engine, seed), reference(stock, seed))
    pids = [os.getpid(), *engine.worker_pids]
    before = [rss_mib(p) for p in pids]
    mismatched = []
    for seed in range(200):
        got = run(engine, seed)
        if not same(got, reference(stock, seed)):
            mismatched.append(seed)
    after = [rss_mib(p) for p in pids]
    growth = [a - b for a, b in zip(after, before)]
    print(f"\nRSS MiB before/after 200 requests (driver, worker 0, worker 1): "
          f"{[round(b, 1) for b in before]} -> {[round(a, 1) for a in after]}, growth {[round(g, 1) for g in growth]}")
    assert not mismatched, f"requests {mismatched} differ from the stock pipeline"
    assert engine.worker_pids == pids[1:], "workers were replaced"
    # the driver also computes the stock references, so its bound covers those allocations too
    assert all(g < 64 for g in growth), growth
    assert engine.describe()["requests"]["failed"] == 0


def test_50_concurrent_requests_from_8_threads(engine, stock):
    seeds = list(range(1000, 1050))
    expected = {s: reference(stock, s) for s in seeds}
    pids = engine.worker_pids
    before = [rss_mib(p) for p in pids]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = dict(zip(seeds, pool.map(lambda s: run(engine, s), seeds)))
    after = [rss_mib(p) for p in pids]
    print(f"\nworker RSS MiB before/after 50 concurrent requests: {[round(b, 1) for b in before]} -> "
          f"{[round(a, 1) for a in after]}")
    assert [s for s in seeds if not same(got[s], expected[s])] == []
    assert all(a - b < 64 for a, b in zip(after, before))
    assert engine.healthy


def test_asyncio_requests(engine, stock):
    seeds = [7, 8, 9, 10]

    async def main():
        return await asyncio.gather(*(engine.agenerate(**request(s), generator=torch.Generator().manual_seed(s))
                                      for s in seeds))

    outs = asyncio.run(main())
    assert all(same(images(o), reference(stock, s)) for o, s in zip(outs, seeds))


def test_generator_is_rebuilt_in_workers_and_callers_is_untouched(engine, stock):
    g = torch.Generator().manual_seed(123)
    state = g.get_state().clone()
    out = engine.generate(**request(0), generator=g)
    assert torch.equal(g.get_state(), state)
    assert same(images(out), images(stock(**request(0), generator=torch.Generator().manual_seed(123))))
    batch = dict(**qwenimage_inputs(batch=2), num_inference_steps=2, output_type="latent", true_cfg_scale=3.0)
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    out = engine.generate(**batch, generator=gens)
    ref = stock(**batch, generator=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    assert torch.equal(out.images, ref.images)


@pytest.mark.parametrize("bad, match", [
    (dict(num_inference_steps=-2), "num_inference_steps must be >= 1"),
    (dict(num_inference_steps=2.5), "num_inference_steps must be an integer"),
    (dict(bogus_argument=1), "bogus_argument"),
    (dict(true_cfg_scale=float("nan")), "finite"),
    (dict(generator=42), "torch.Generator"),
    (dict(callback_on_step_end=lambda *a: {}), "cannot be sent"),
    (dict(output_type="gif"), "output_type must be one of"),  # rejected by every worker's own checks
    (dict(prompt="a cat"), "Cannot forward both"),  # the pipeline's check_inputs, in the workers
])
def test_malformed_request_is_rejected_and_engine_stays_healthy(engine, stock, bad, match):
    kwargs = {**request(0), **bad}
    with pytest.raises(pycfg.InvalidRequestError, match=match):
        engine.generate(**kwargs)
    assert engine.healthy
    assert same(run(engine, 5), reference(stock, 5))


def test_rejections_are_counted_and_checked_in_the_driver(engine):
    pids = engine.worker_pids
    before = engine.describe()["requests"]
    with pytest.raises(ValueError):
        engine.generate(**{**request(0), "num_inference_steps": 0})
    with pytest.raises(TypeError):
        engine.generate(**request(0), not_an_argument=True)
    after = engine.describe()["requests"]
    assert after == before  # refused in the driver: no worker saw them
    assert engine.worker_pids == pids


def test_worker_killed_mid_request_fails_it_then_restart_recovers(engine, stock, tmp_path):
    marker = tmp_path / "started"
    victim = engine.worker_pids[1]
    future = engine.submit(**{**request(0), "num_inference_steps": 8},
                           callback_on_step_end=functools.partial(slow_callback, str(marker)))
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.05)
    queued = engine.submit(**request(1), generator=torch.Generator().manual_seed(1))  # behind the doomed one
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    with pytest.raises(pycfg.WorkerFailureError, match=r"rank 1 .*killed by signal SIGKILL") as info:
        future.result(timeout=TIMEOUT)
    assert time.monotonic() - killed_at < TIMEOUT
    assert info.value.rank == 1
    with pytest.raises(pycfg.EngineUnhealthyError, match="restart"):
        queued.result(timeout=TIMEOUT)
    assert not engine.healthy and "SIGKILL" in engine.describe()["last_error"]
    with pytest.raises(pycfg.EngineUnhealthyError):
        engine.generate(**request(2))

    engine.restart()
    assert engine.healthy and victim not in engine.worker_pids
    for seed in (1, 2, 3):
        assert same(run(engine, seed), reference(stock, seed))


def test_worker_raising_fails_request_with_its_error(engine, stock):
    started = time.monotonic()
    with pytest.raises(pycfg.WorkerFailureError, match="callback failed on purpose") as info:
        engine.generate(**request(0), callback_on_step_end=functools.partial(raise_callback, "1"))
    assert time.monotonic() - started < TIMEOUT  # rank 0 waits in a collective; the request does not
    assert info.value.rank == 1 and "Traceback" in info.value.worker_text
    assert not engine.healthy
    engine.restart()
    assert same(run(engine, 4), reference(stock, 4))


def test_worker_exiting_with_auto_restart(engine, stock):
    engine.auto_restart = True
    try:
        old, restarts = engine.worker_pids, engine.describe()["restarts"]
        with pytest.raises(pycfg.WorkerFailureError, match=r"rank 0 .*exited with code 7"):
            engine.generate(**request(0), callback_on_step_end=functools.partial(exit_callback, "0"))
        # the next request waits for the automatic restart, then runs
        assert same(run(engine, 6), reference(stock, 6))
        assert engine.healthy and set(engine.worker_pids).isdisjoint(old)
        assert engine.describe()["restarts"] == restarts + 1
    finally:
        engine.auto_restart = False


def test_startup_failure_raises_the_workers_error():
    started = time.monotonic()
    with pytest.raises(pycfg.WorkerFailureError, match="rank 1 failed to start.*no weights on this rank"):
        pycfg.Engine(failing_factory, cfg_parallel_size=2, timeout=TIMEOUT)
    assert time.monotonic() - started < 120


def test_unpicklable_factory_and_bad_options_are_refused_before_starting():
    with pytest.raises(TypeError, match="picklable"):
        pycfg.Engine(lambda: qwenimage_pipeline(), cfg_parallel_size=2)
    with pytest.raises(TypeError, match="unknown compile option"):
        pycfg.Engine(qwenimage_pipeline, cfg_parallel_size=2, not_an_option=True)
    with pytest.raises(ValueError, match="devices"):
        pycfg.Engine(qwenimage_pipeline, cfg_parallel_size=2, devices=["cpu"])


@pytest.mark.gpu
def test_engine_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    size = 2 if torch.cuda.device_count() >= 2 else 1
    # fused=False: the reference update, bit-identical to stock (the fused kernel matches to fp32 rounding)
    with pycfg.Engine(functools.partial(qwenimage_pipeline, "tiny"), cfg_parallel_size=size,
                      timeout=TIMEOUT, fused=False) as eng:
        assert eng.describe()["devices"] == [f"cuda:{i}" for i in range(size)]
        out = eng.generate(**request(0), generator=torch.Generator().manual_seed(0)).images
    assert out.device.type == "cpu"
    pipe = qwenimage_pipeline().to("cuda:0")
    # the stock pipeline does not move caller-provided embeds; the Engine's workers do
    on_gpu = {k: v.to("cuda:0") if isinstance(v, torch.Tensor) else v for k, v in request(0).items()}
    ref = pipe(**on_gpu, generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(out, ref.cpu())


def test_close(engine):
    pids = engine.worker_pids
    engine.close()
    assert engine.describe()["state"] == "closed"
    with pytest.raises(EngineClosedError):
        engine.generate(**request(0))
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read()
