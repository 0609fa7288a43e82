"""Compiled branch forwards: torch.compile of the transformer, whole or block by block, and the batching choice.

Every per-step value the transformer sees (timestep, guidance) is a tensor, and shapes are exact
(``dynamic=False``): a compiled forward is specialised once per input shape and never recompiles from step to
step or from one guidance scale to the next. Regional compilation compiles the repeated transformer block
once and reuses the code for every instance, so a 60-block model cold-starts in the time of one block.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from ..steps import StepIndex
from .job import Job


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: the classes it names in ``_repeated_blocks`` (diffusers' convention), else
    the members of its longest ModuleList."""
    names = set(getattr(model, "_repeated_blocks", None) or ())
    if names:
        blocks = [m for m in model.modules() if type(m).__name__ in names]
        if blocks:
            return blocks
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        return []
    return list(max(lists, key=len))


def compile_transformer(model: torch.nn.Module, how: str, mode: str | None = None) -> dict[str, Any]:
    """Compile ``model`` in place (its ``__call__`` runs the compiled code); returns what was compiled.

    In place, like ``module.compile()``: the pipeline's own transformer is the one that runs, so hooks, offload
    and attention-processor settings keep working and no second copy of the weights exists.
    """
    options = dict(mode=mode, dynamic=False)
    if how == "regional":
        blocks = repeated_blocks(model)
        if not blocks:
            raise ValueError(f"{type(model).__name__} has no repeated blocks to compile: use compile_transformer=True")
        for block in blocks:
            block.compile(**options)
        return {"how": how, "mode": mode or "default", "modules": len(blocks), "block": type(blocks[0]).__name__}
    model.compile(**options)
    return {"how": how, "mode": mode or "default", "modules": 1, "block": type(model).__name__}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forwards(run: Callable[[], Any], device: torch.device, repeats: int = 3) -> float:
    """Median seconds of ``run()`` after one untimed call (which also compiles a new shape)."""
    run()
    _synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def choose_batching(job: Job, repeats: int = 3) -> dict[str, Any]:
    """Time the step's active branches as one batched forward and as separate forwards; keep the faster.

    Runs on the prepared job's own inputs at step 0 (outputs discarded, no state touched). Ties go to separate
    forwards, whose numerics are the stock pipeline's.
    """
    job.policy.reset(job.num_steps)  # its step window needs the step count (denoise resets it again)
    active = job.policy.active(0)
    if len(active) < 2:
        return {"batched": False, "why": "one active branch"}
    step = StepIndex(0, StepIndex.counter(job.device))
    times = {batched: time_forwards(lambda b=batched: job.forward(active, job.latents, step, b), job.device,
                                    repeats)
             for batched in (False, True)}
    batched = times[True] < times[False]
    # branches the adapter cannot batch (different text lengths) run separately either way: the choice is moot
    return {"batched": batched, "separate_s": times[False], "batched_s": times[True], "why": "measured"}
