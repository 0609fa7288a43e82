"""Fused guided update vs the eager combine + diffusers step() it replaces; achieved memory bandwidth.

    python benchmarks/bench_kernels.py [--out DIR | --save-results] [--device cuda|cpu]

On CUDA: the Triton kernel (one launch per step) over latent sizes from 1 to 256 MiB, its bandwidth as a
fraction of a measured device copy, and per-step time against the eager path on a 1024x1024 Qwen-Image latent
(4096 x 64, bf16, CFG + renorm, UniPC-2 with flow sigmas). On CPU: the PyTorch reference only, small sizes.
Writes bench_kernels_<device>.json (+ .png when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from functools import partial

import torch
from results_dir import add_output_arguments, output_dir


def _timer(device: torch.device):
    if device.type == "cuda":
        def run(fn, iters: int) -> float:
            fn()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3 / iters
    else:
        def run(fn, iters: int) -> float:
            fn()
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            return (time.perf_counter() - t0) / iters
    return run


def graph_timed(fn, iters: int) -> float:
    """Device time per call with launch overhead removed: ``fn`` captured once in a CUDA graph, then replayed,
    as the runtime replays a whole step."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # warm-up outside capture: compiles the kernel, settles the allocator
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def copy_bandwidth(device: torch.device, nbytes: int, timed) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), 20)
    return 2 * nbytes / seconds


def make_plan(steps: int):
    from diffusers import UniPCMultistepScheduler

    from pycfg.schedulers import build_plan

    s = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True)
    s.set_timesteps(steps)
    return s, build_plan(s, s.timesteps)


def update_bytes(plan, step: int, numel: int, pred_bytes: int, latent_bytes: int, branches: int) -> int:
    """Bytes the step must move: every input read once, every output written once."""
    row = plan.coefficients[step]
    reads = int((row[:, 3:] != 0).any(0).sum())
    writes = int((plan.write_slots[step] >= 0).sum())
    return numel * (2 * latent_bytes + branches * pred_bytes + 4 * (reads + writes))


def bench_sizes(device, timed, fn, dtype, sizes_mib, iters):
    """Per size: the fused update at a mid-run UniPC step (reads 3 slots, writes 2)."""
    rows = []
    _, plan = make_plan(20)
    step = 5
    for mib in sizes_mib:
        numel = int(mib * 2**20) // torch.empty((), dtype=dtype).element_size()
        shape = (1, numel // 64, 64)
        x = torch.randn(shape, device=device).to(dtype)
        c, u = torch.randn_like(x), torch.randn_like(x)
        hist = torch.randn(plan.num_slots, x.numel(), device=device)
        coef = plan.coefficients.to(device, torch.float32).contiguous()
        slots = plan.write_slots.to(device)

        go = partial(fn, x, c, u, hist, coef, slots, step, scale=4.0, renorm=True)
        seconds = timed(go, iters)
        nbytes = update_bytes(plan, step, x.numel(), x.element_size(), x.element_size(), 2)
        row = dict(latent_mib=mib, numel=x.numel(), seconds=seconds, bytes=nbytes,
                   bandwidth_gbs=nbytes / seconds / 1e9)
        if device.type == "cuda":
            # eager back-to-back launches are bound by host launch cost at small sizes; a graph replay is not
            graph_seconds = graph_timed(go, iters)
            row.update(graph_seconds=graph_seconds, graph_bandwidth_gbs=nbytes / graph_seconds / 1e9)
        rows.append(row)
        del x, c, u, hist
    return rows


def bench_qwen_step(device, timed, fn, dtype, steps: int, iters: int):
    """Whole runs of `steps` steps: eager (combine + renorm + step()) vs fused, per-step time."""
    import copy

    from pycfg.guidance import CFG

    sched, plan = make_plan(steps)
    shape = (1, 4096, 64)
    x0 = torch.randn(shape, device=device).to(dtype)
    c, u = torch.randn_like(x0), torch.randn_like(x0)
    policy = CFG(4.0, renorm=True)

    def eager():
        s = copy.deepcopy(sched)
        x = x0
        for i, t in enumerate(s.timesteps):
            x = s.step(policy.combine({"cond": c, "uncond": u}, i), t, x, return_dict=False)[0]
        return x

    coef = plan.coefficients.to(device, torch.float32).contiguous()
    slots = plan.write_slots.to(device)
    hist = torch.zeros(plan.num_slots, x0.numel(), device=device)
    x = x0.clone()

    def fused():
        for i in range(steps):
            fn(x, c, u, hist, coef, slots, i, scale=4.0, renorm=True)

    eager_s = timed(eager, iters) / steps
    fused_s = timed(fused, iters) / steps
    return dict(shape=list(shape), dtype=str(dtype), steps=steps, eager_step_seconds=eager_s,
                fused_step_seconds=fused_s, speedup=eager_s / fused_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_output_arguments(ap)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    timed = _timer(device)
    result = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                  torch=torch.__version__, time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if device.type == "cuda":
        import triton
        from pycfg.kernels.fused_update import fused_guided_update as fn

        result["engine"] = f"triton {triton.__version__} kernel"
        result["copy_bandwidth_gbs"] = copy_bandwidth(device, 1 << 30, timed) / 1e9
        result["sizes"] = bench_sizes(device, timed, fn, torch.bfloat16, [1, 4, 16, 64, 256], 50)
        for row in result["sizes"]:
            row["fraction_of_copy"] = row["bandwidth_gbs"] / result["copy_bandwidth_gbs"]
            row["graph_fraction_of_copy"] = row["graph_bandwidth_gbs"] / result["copy_bandwidth_gbs"]
        result["qwen_1024"] = [bench_qwen_step(device, timed, fn, torch.bfloat16, 20, 10)]
    else:
        from pycfg.kernels.fused_update_ref import fused_guided_update_ref as fn

        result["engine"] = "PyTorch reference"
        result["copy_bandwidth_gbs"] = copy_bandwidth(device, 64 << 20, timed) / 1e9
        result["sizes"] = bench_sizes(device, timed, fn, torch.float32, [0.25, 1, 4], 5)
        for row in result["sizes"]:
            row["fraction_of_copy"] = row["bandwidth_gbs"] / result["copy_bandwidth_gbs"]
        result["qwen_1024"] = [bench_qwen_step(device, timed, fn, torch.float32, 8, 2)]
    path = os.path.join(output_dir(args, "bench_kernels"), f"bench_kernels_{device.type}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = result["sizes"]
    ax.plot([r["latent_mib"] for r in sizes], [r["bandwidth_gbs"] for r in sizes], "o-",
            label="fused update, eager launches")
    if "graph_bandwidth_gbs" in sizes[0]:
        ax.plot([r["latent_mib"] for r in sizes], [r["graph_bandwidth_gbs"] for r in sizes], "s-",
                label="fused update, CUDA graph replay")
    ax.axhline(result["copy_bandwidth_gbs"], ls="--", c="gray", label="device copy")
    ax.axhline(0.8 * result["copy_bandwidth_gbs"], ls=":", c="gray", label="80% of copy")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("latent size (MiB)")
    ax.set_ylabel("GB/s")
    q = result["qwen_1024"][0]
    ax.set_title(f"{result['device']}: Qwen 1024px step {q['speedup']:.1f}x vs eager")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path.replace(".json", ".png"), dpi=120)


if __name__ == "__main__":
    main()
