"""Pipeline benchmark: stock diffusers vs pycfg P=1 vs pycfg P=2, per denoising step.

Every mode runs in its own spawned processes with one thread each (as each rank would own one device):
stock and P=1 on one process, P=2 on two. Reports the median step time and the time per step spent outside
the transformer forward(s) (a forward hook measures the forwards). Writes JSON and a PNG chart.

    python benchmarks/bench_pipeline.py --configs tiny small --steps 6 --repeats 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

MODES = {"stock": 1, "pycfg-P1": 1, "pycfg-P2": 2}


class _ForwardTimer:
    """Sums wall time spent inside a module's forward."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.total = 0.0
        self._start = 0.0
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _pre(self, *args):
        self._start = time.perf_counter()

    def _post(self, *args):
        self.total += time.perf_counter() - self._start


def measure(rank: int, world: int, mode: str, config: str, steps: int, repeats: int) -> dict:
    import pycfg
    from pycfg.tiny import qwenimage_inputs, qwenimage_pipeline

    pipe = qwenimage_pipeline(config)
    runner = pipe if mode == "stock" else pycfg.compile(pipe, cfg_parallel_size=world)
    timer = _ForwardTimer(pipe.transformer)
    stamps: list[float] = []

    def clock(p, i, t, kw):
        stamps.append(time.perf_counter())
        return {}

    def once(n: int) -> tuple[list[float], float]:
        stamps.clear()
        timer.total = 0.0
        stamps.append(time.perf_counter())
        runner(**qwenimage_inputs(config), true_cfg_scale=4.0, num_inference_steps=n, output_type="latent",
               generator=torch.Generator().manual_seed(0), callback_on_step_end=clock)
        return [b - a for a, b in zip(stamps, stamps[1:])], timer.total

    once(2)  # warm-up
    step_times, forward_per_step = [], []
    for _ in range(repeats):
        times, forward = once(steps)
        step_times += times
        forward_per_step.append(forward / steps)
    step = statistics.median(step_times)
    forward = statistics.median(forward_per_step)
    return {"step_s": step, "forward_s": forward, "outside_s": max(step - forward, 0.0), "all_step_s": step_times}


def run(configs: list[str], steps: int, repeats: int) -> dict:
    from pycfg._launch import run_world

    results: dict = {}
    for config in configs:
        results[config] = {}
        for mode, world in MODES.items():
            ranks = run_world(measure, world, mode=mode, config=config, steps=steps, repeats=repeats, timeout=3600)
            results[config][mode] = ranks[0]
            print(f"{config:6s} {mode:9s} step {ranks[0]['step_s'] * 1e3:9.2f} ms   "
                  f"outside forward {ranks[0]['outside_s'] * 1e3:7.3f} ms", flush=True)
        r = results[config]
        r["ratios"] = {
            "P1_over_stock": r["pycfg-P1"]["step_s"] / r["stock"]["step_s"],
            "P2_speedup_over_P1": r["pycfg-P1"]["step_s"] / r["pycfg-P2"]["step_s"],
            "P2_speedup_over_stock": r["stock"]["step_s"] / r["pycfg-P2"]["step_s"],
        }
        print(f"{config:6s} P1/stock {r['ratios']['P1_over_stock']:.3f}x   "
              f"P2 speedup over P1 {r['ratios']['P2_speedup_over_P1']:.3f}x", flush=True)
    return results


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(results)
    fig, axes = plt.subplots(1, len(configs), figsize=(5 * len(configs), 4), squeeze=False)
    for ax, config in zip(axes[0], configs):
        modes = list(MODES)
        forward = [results[config][m]["forward_s"] * 1e3 for m in modes]
        outside = [results[config][m]["outside_s"] * 1e3 for m in modes]
        ax.bar(modes, forward, label="transformer forward(s)")
        ax.bar(modes, outside, bottom=forward, label="outside the forward")
        ax.set_title(f"{config}: time per denoising step")
        ax.set_ylabel("ms")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "small"], choices=["tiny", "small"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "bench_pipeline_cpu"))
    args = parser.parse_args(argv)

    import diffusers

    results = run(args.configs, args.steps, args.repeats)
    report = {
        "benchmark": "bench_pipeline",
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"CPU: {cpu_name()}, {os.cpu_count()} cores, 1 thread per rank",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "diffusers": diffusers.__version__},
        "steps": args.steps,
        "repeats": args.repeats,
        "results": results,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=2)
    plot(results, args.out + ".png")
    print(f"wrote {args.out}.json and {args.out}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
