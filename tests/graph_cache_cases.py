"""Per-rank body of the step-cache tests (spawned by pycfg._launch.run_world; fused kernel in Triton's
interpreter on CPU, chosen before anything imports triton)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pycfg  # noqa: E402
from pycfg.runtime.graphs import StepGraphs  # noqa: E402
from pycfg.tiny import qwenimage_inputs, qwenimage_pipeline  # noqa: E402

#: (inputs seed, prompt length, steps, true_cfg_scale, generator seed): 0-2 share a shape, 3-5 each change one
#: thing a captured step bakes in (text length, step count, guidance on/off)
REQUESTS = [
    (0, 7, 4, 4.0, 0),
    (1, 7, 4, 2.5, 1),
    (0, 7, 4, 4.0, 0),
    (2, 9, 4, 4.0, 2),
    (3, 7, 5, 4.0, 3),
    (4, 7, 4, 1.0, 4),
]


def cached_requests(rank: int, world: int, exchange: str) -> dict:
    """Every request through cached step runners (run as step functions, not graphs) and through the plain
    fused loop: both results, the caller's inputs afterwards, and the cache's counters."""
    pipe = qwenimage_pipeline("tiny")
    plain = pycfg.compile(pipe, cfg_parallel_size=world, fused=True, exchange=exchange)
    cached = pycfg.compile(pipe, cfg_parallel_size=world, fused=True, exchange=exchange)
    cached.step_graphs = StepGraphs("cpu", capture=False)
    results = []
    for inputs_seed, length, steps, scale, seed in REQUESTS:
        inputs = qwenimage_inputs("tiny", seed=inputs_seed, pos_len=length)
        before = {k: v.clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        outs = []
        for runner in (plain, cached):
            outs.append(runner(**inputs, true_cfg_scale=scale, num_inference_steps=steps, output_type="latent",
                               generator=torch.Generator().manual_seed(seed)).images)
        untouched = all(torch.equal(inputs[k], v) for k, v in before.items())
        results.append({"plain": outs[0], "cached": outs[1], "kept": outs[1].clone(), "inputs_untouched": untouched})
    # a later request of the same shape writes the cached buffers, never a result handed out before
    for r in results:
        r["result_untouched"] = torch.equal(r["cached"], r["kept"])
        del r["kept"]

    # new weight tensors (a module swapped, an adapter loaded) must not replay steps captured on the old ones
    proj = pipe.transformer.proj_out
    proj.weight = torch.nn.Parameter(proj.weight.detach() * 1.01)
    inputs = qwenimage_inputs("tiny", seed=0)
    before = cached.step_graphs.describe()
    swapped = [runner(**inputs, true_cfg_scale=4.0, num_inference_steps=4, output_type="latent",
                      generator=torch.Generator().manual_seed(0)).images for runner in (plain, cached)]
    return {"results": results, "stats": before, "after_swap": cached.step_graphs.describe(),
            "swapped_equal": torch.equal(*swapped)}


def family_requests(rank: int, world: int, family: str) -> dict:
    """Two requests of one shape (other seed, texts and scale) through a cached runner and the plain fused loop,
    with the pipeline's default guidance."""
    from pycfg import tiny

    pipe = getattr(tiny, f"{family}_pipeline")()
    make_inputs = getattr(tiny, f"{family}_inputs")
    output = "frames" if family == "wan" else "images"
    plain = pycfg.compile(pipe, cfg_parallel_size=world, fused=True)
    cached = pycfg.compile(pipe, cfg_parallel_size=world, fused=True)
    cached.step_graphs = StepGraphs("cpu", capture=False)
    pairs = []
    for seed, scale in ((0, 5.0), (1, 3.0)):
        call = dict(make_inputs(seed=seed), guidance_scale=scale, num_inference_steps=3, output_type="latent")
        pairs.append([getattr(runner(**call, generator=torch.Generator().manual_seed(seed)), output)
                      for runner in (plain, cached)])
    return {"pairs": pairs, "stats": cached.step_graphs.describe()}


def linear_policies(rank: int, world: int) -> dict:
    """Linear policies other than CFG through cached step runners and the plain fused loop: DynamicCFG (a scale
    per step, read from device memory), PAG outside its window (the generic LinearPolicy declaration: cond and
    uncond only) and PAG inside it on two of four steps (three branches, combined in PyTorch with constant
    weights inside the step). Returns both results per policy and the runner's counters."""
    from pycfg.guidance import PAG, DynamicCFG

    pipe = qwenimage_pipeline("tiny")
    plain = pycfg.compile(pipe, cfg_parallel_size=world, fused=True)
    cached = pycfg.compile(pipe, cfg_parallel_size=world, fused=True)
    cached.step_graphs = StepGraphs("cpu", capture=False)
    policies = {"dynamic": DynamicCFG(4.0, renorm=True),
                "pag_outside_window": PAG(3.0, 2.0, [0], start=0.0, stop=0.0),
                "pag": PAG(3.0, 2.0, [0], start=0.0, stop=0.8)}
    out = {}
    for name, policy in policies.items():
        call = dict(qwenimage_inputs("tiny"), true_cfg_scale=4.0, num_inference_steps=4, output_type="latent",
                    guidance=policy)
        results = [runner(**call, generator=torch.Generator().manual_seed(0)).images for runner in (plain, cached)]
        out[name] = {"plain": results[0], "cached": results[1], "stats": cached.step_graphs.describe()}
    return out
