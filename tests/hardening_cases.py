"""Per-rank bodies of tests/test_hardening.py (spawned by pycfg._launch.run_world; must be importable)."""

from __future__ import annotations

import os
import threading
import time

import torch

import pycfg
from pycfg.tiny import qwenimage_inputs, qwenimage_pipeline


def _timed(make) -> tuple[str, str, float]:
    started = time.monotonic()
    try:
        make()
    except Exception as err:
        return type(err).__name__, str(err), time.monotonic() - started
    return "no error", "", time.monotonic() - started


def rank_local_rejections(rank: int, world: int) -> dict:
    """Requests that only one rank rejects: every rank raises at once (not after the 60 s timeout), naming the
    rank and the argument; the group stays usable."""
    pipe = qwenimage_pipeline()
    out = {}
    with pycfg.compile(pipe, cfg_parallel_size=2, timeout=60) as fast:
        good = dict(qwenimage_inputs(), num_inference_steps=2, output_type="latent", true_cfg_scale=4.0)
        bad_negative = dict(good)
        if rank == 1:  # the rank that runs the negative branch gets a wrong-shaped negative
            bad_negative["negative_prompt_embeds"] = bad_negative["negative_prompt_embeds"][..., :5]
        out["negative_on_rank_1"] = _timed(lambda: fast(**bad_negative))
        bad_steps = dict(good, num_inference_steps=0 if rank == 0 else 2)
        out["steps_on_rank_0"] = _timed(lambda: fast(**bad_steps))
        meta = dict(good, latents=torch.empty(1, 16, 16, device="meta")) if rank == 1 else good
        out["meta_latents_on_rank_1"] = _timed(lambda: fast(**meta))
        out["after"] = fast(**good, generator=torch.Generator().manual_seed(0)).images
    out["closed"] = fast.closed
    return out


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def compile_close_cycles(rank: int, world: int, cycles: int) -> dict:
    """``cycles`` compile/close rounds at P=2 on one pipeline: file descriptors and threads stay flat."""
    pipe = qwenimage_pipeline()
    inputs = dict(qwenimage_inputs(), num_inference_steps=2, output_type="latent", true_cfg_scale=4.0)
    counts = []
    first = None
    for i in range(cycles):
        with pycfg.compile(pipe, cfg_parallel_size=2) as fast:
            if i in (0, cycles - 1):
                out = fast(**inputs, generator=torch.Generator().manual_seed(0)).images
                first = out if first is None else first
                same = torch.equal(out, first)
        counts.append((_fds(), _threads()))
    # compiling the same pipeline twice while both are open shares one group; closing both releases it
    a = pycfg.compile(pipe, cfg_parallel_size=2)
    b = pycfg.compile(pipe, cfg_parallel_size=2)
    shared = a.comm.group is b.comm.group
    a.close()
    still = b(**inputs, generator=torch.Generator().manual_seed(0)).images
    b.close()
    from pycfg.parallel.groups import owned_groups

    return {"counts": counts, "same": same, "shared": shared, "still": torch.equal(still, first),
            "owned_after": owned_groups(), "python_threads": threading.active_count()}


def compile_path(rank: int, world: int, cycles: int) -> dict:
    """Both compile-path checks in one spawned world."""
    return {"rejections": rank_local_rejections(rank, world), "cycles": compile_close_cycles(rank, world, cycles)}


# -- callbacks the engine's workers import ---------------------------------------------------------------------


def raise_on_every_rank(error: str, pipe, i, t, kwargs):
    if i == 1:
        if error == "oom":
            raise torch.OutOfMemoryError("out of memory on purpose")
        raise RuntimeError("callback failed on purpose on every rank")
    return {}


def mark_then_slow(marker: str, pipe, i, t, kwargs):
    """Marks that the request started (rank 0), then makes every step slow enough to act in between."""
    if i == 0 and os.environ.get("RANK") == "0":
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
    time.sleep(0.5)
    return {}
