"""Pipeline benchmark: stock diffusers vs pycfg P=1 vs pycfg P=2, per denoising step.

Every mode runs in its own spawned processes with one thread each (as each rank would own one device):
stock and P=1 on one process, P=2 on two. Reports the median step time and the time per step spent outside
the transformer forward(s) (a forward hook measures the forwards). Writes JSON and a PNG chart.

    python benchmarks/bench_pipeline.py --configs tiny small --steps 6 --repeats 3

GPU mode (``--model``): one process, one realistic-size transformer with random weights built from the model's
published config (no downloads), measured in one run as stock eager, stock + torch.compile (diffusers'
regional ``compile_repeated_blocks``, what users reach for) and pycfg P=1 (compiled forwards, whole-step CUDA
graphs, fused update, batched CFG chosen by measurement). Per-step latency is the difference of two runs of
different lengths timed with CUDA events (so prompt handling and the first step's setup cancel out); the forward
alone is timed the same way to give the time per step outside the transformer.

    python benchmarks/bench_pipeline.py --model qwen-image --steps 6 --height 1024 --width 1024
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
    parser.add_argument("--out", default=None)
    parser.add_argument("--model", choices=sorted(GPU_MODELS), default=None,
                        help="GPU mode: a realistic-size random-weight transformer (see GPU_MODELS)")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=None, help="override the model's block count")
    parser.add_argument("--text-len", type=int, default=128, help="prompt and negative prompt tokens")
    parser.add_argument("--cfg-parallel-size", type=int, default=1)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-graphs", action="store_true")
    parser.add_argument("--no-fused", action="store_true")
    parser.add_argument("--exchange", choices=["gather", "reduce"], default="gather")
    parser.add_argument("--batch-branches", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--modes", nargs="+", default=["stock", "stock-compile", "pycfg-P1"],
                        choices=["stock", "stock-compile", "pycfg-P1"])
    args = parser.parse_args(argv)
    if args.model is not None:
        return gpu_main(args)
    args.out = args.out or os.path.join(os.path.dirname(__file__), "results", "bench_pipeline_cpu")

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


# --- GPU mode -------------------------------------------------------------------------------------------------

#: published transformer configs (diffusers' config.json of each model); random weights, no downloads
GPU_MODELS = {
    "qwen-image": dict(
        family="qwenimage",
        transformer=dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                         num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
                         axes_dims_rope=(16, 56, 56)),
        # Qwen-Image's scheduler config
        scheduler=dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9,
                       num_train_timesteps=1000,
                       shift=1.0, shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True),
    ),
}


def _qwen_pipeline(spec: dict, layers: int | None, dtype: torch.dtype, device: str):
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)

    cfg = dict(spec["transformer"])
    if layers is not None:
        cfg["num_layers"] = layers
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # a 20B model built in fp32 first would not fit
    try:
        with torch.device(device):
            transformer = QwenImageTransformer2DModel(**cfg)
    finally:
        torch.set_default_dtype(default)
    # a small VAE with the real one's latent channels and 8x scale factor: only its config is read (latent output)
    vae = AutoencoderKLQwenImage(base_dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True, True], latents_mean=[0.0] * 16,
                                 latents_std=[1.0] * 16)
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**spec["scheduler"]), vae=vae,
                             text_encoder=None, tokenizer=None, transformer=transformer)
    pipe.to(device)
    pipe.vae.to(dtype)
    transformer.eval()
    pipe.set_progress_bar_config(disable=True)
    params = sum(p.numel() for p in transformer.parameters())
    return pipe, params, cfg


def _sync():
    torch.cuda.synchronize()


def _timed(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    _sync()
    start.record()
    fn()
    end.record()
    _sync()
    return start.elapsed_time(end) / 1e3


class GpuBench:
    def __init__(self, args) -> None:
        self.args = args
        spec = GPU_MODELS[args.model]
        t0 = time.perf_counter()
        self.pipe, self.params, self.config = _qwen_pipeline(spec, args.layers, torch.bfloat16, "cuda")
        self.build_s = time.perf_counter() - t0
        g = torch.Generator("cuda").manual_seed(1)
        dim = self.config["joint_attention_dim"]
        embeds = lambda: torch.randn(1, args.text_len, dim, generator=g, device="cuda", dtype=torch.bfloat16)  # noqa
        ones = torch.ones(1, args.text_len, dtype=torch.long, device="cuda")
        self.inputs = dict(prompt_embeds=embeds(), prompt_embeds_mask=ones, negative_prompt_embeds=embeds(),
                           negative_prompt_embeds_mask=ones, height=args.height, width=args.width,
                           true_cfg_scale=4.0, output_type="latent")

    def call(self, runner, steps: int) -> float:
        return _timed(lambda: runner(**self.inputs, num_inference_steps=steps,
                                     generator=torch.Generator("cuda").manual_seed(0)))

    def per_step(self, runner, repeats: int = 3) -> dict:
        """(T(2 + n) - T(2)) / n: prompt handling, setup and the first steps' one-off work cancel out."""
        n = self.args.steps
        samples = []
        for _ in range(repeats):
            short = self.call(runner, 2)
            long = self.call(runner, 2 + n)
            samples.append((long - short) / n)
        return {"step_s": statistics.median(samples), "samples_s": samples}

    def forward_s(self, batch: int) -> float:
        """One transformer forward at this request's shapes (CUDA events, median of 5)."""
        pipe, a = self.pipe, self.args
        h, w = a.height // pipe.vae_scale_factor // 2, a.width // pipe.vae_scale_factor // 2
        x = torch.randn(batch, h * w, self.config["in_channels"], device="cuda", dtype=torch.bfloat16)
        text = torch.randn(batch, a.text_len, self.config["joint_attention_dim"], device="cuda", dtype=torch.bfloat16)
        t = torch.full((batch,), 0.5, device="cuda", dtype=torch.bfloat16)

        def fwd():
            pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=text, img_shapes=[[(1, h, w)]] * batch,
                             attention_kwargs={}, return_dict=False)

        with torch.no_grad():
            fwd()
            return statistics.median(_timed(fwd) for _ in range(5))

    def stock(self) -> dict:
        self.call(self.pipe, 2)
        return self.per_step(self.pipe)

    def stock_compile(self) -> dict:
        self.pipe.transformer.compile_repeated_blocks(dynamic=False)
        cold = self.call(self.pipe, 2)
        warm = self.call(self.pipe, 2)
        out = self.per_step(self.pipe)
        out.update(compile_cold_s=cold, compile_warm_s=warm)
        out["forward_b1_s"] = self.forward_s(1)
        return out

    def pycfg(self) -> dict:
        import pycfg

        a = self.args
        batch = {"auto": "auto", "on": True, "off": False}[a.batch_branches]
        fast = pycfg.compile(self.pipe, cfg_parallel_size=1, exchange=a.exchange, fused=False if a.no_fused else None,
                             compile_transformer=False if a.no_compile else "regional",
                             cuda_graphs=False if a.no_graphs else None, batch_branches=batch)
        warm = {k: v for k, v in self.inputs.items() if k != "output_type"}
        times = fast.warmup(**warm, num_inference_steps=3)
        if fast.step_graphs is not None:
            # a host-device sync inside a replayed step raises
            fast.step_graphs.sync_debug = "error"
        out = self.per_step(fast)
        info = fast.describe()
        out.update(compile_cold_s=times["cold_s"], compile_warm_s=times["warm_s"], describe=_jsonable(info))
        batched = any(c.get("batched") for c in fast.batch_choices.values())
        out["batched"] = batched
        out["forward_b1_s"] = self.forward_s(1)
        out["forward_b2_s"] = self.forward_s(2) if batched else None
        forwards = out["forward_b2_s"] if batched else 2 * out["forward_b1_s"]
        out["forwards_per_step_s"] = forwards
        out["outside_forward_s"] = out["step_s"] - forwards
        out["outside_fraction"] = out["outside_forward_s"] / out["step_s"]
        return out


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj if isinstance(obj, (int, float, str, bool, type(None))) else repr(obj)


def _collective_projection(latent_bytes: int) -> dict:
    """A modelled 2-rank all-gather on NVLink: NCCL's published small-message latency on 2xH100 plus bytes at
    an all-gather bus bandwidth typical of H100 NVLink. A projection, not a measurement."""
    latency_s, bandwidth = 10e-6, 350e9
    return {"bytes": latent_bytes, "latency_s": latency_s, "bus_bandwidth_Bps": bandwidth,
            "time_s": latency_s + latent_bytes / bandwidth, "source": "modelled (published 2xH100 NVLink figures)"}


def gpu_main(args) -> int:
    import diffusers

    if not torch.cuda.is_available():
        raise SystemExit("--model needs a CUDA device")
    bench = GpuBench(args)
    props = torch.cuda.get_device_properties(0)
    name = f"{args.model}_{args.height}x{args.width}"
    out_path = args.out or os.path.join(os.path.dirname(__file__), "results", f"bench_pipeline_gpu_{name}")
    report = {
        "benchmark": "bench_pipeline (GPU)",
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"{props.name}, {props.total_memory / 2**30:.0f} GiB",
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                     "diffusers": diffusers.__version__,
                     "triton": getattr(__import__("importlib").import_module("triton"), "__version__", None)},
        "model": {"name": args.model, "config": _jsonable(bench.config), "parameters": bench.params,
                  "dtype": "bfloat16", "weights": "random (published config)", "build_s": bench.build_s},
        "settings": {"height": args.height, "width": args.width, "text_len": args.text_len, "steps": args.steps,
                     "true_cfg_scale": 4.0, "cfg_parallel_size": args.cfg_parallel_size,
                     "compile": not args.no_compile, "graphs": not args.no_graphs, "fused": not args.no_fused,
                     "exchange": args.exchange, "batch_branches": args.batch_branches},
        "results": {},
    }
    os.makedirs(os.path.dirname(out_path), exist_ok=True)

    def save():
        with open(out_path + ".json", "w") as f:
            json.dump(report, f, indent=2)

    runs = {"stock": bench.stock, "stock-compile": bench.stock_compile, "pycfg-P1": bench.pycfg}
    for mode in args.modes:
        if mode == "pycfg-P1" and "stock-compile" in args.modes:
            # pycfg compiles from scratch, not from the stock run's dynamo cache (inductor's on-disk cache stays)
            for block in bench.pipe.transformer.transformer_blocks:
                block._compiled_call_impl = None
            torch._dynamo.reset()
        torch.cuda.reset_peak_memory_stats()
        result = runs[mode]()
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        report["results"][mode] = result
        print(f"{mode:14s} step {result['step_s'] * 1e3:9.2f} ms  peak {result['peak_memory_gib']:.1f} GiB"
              + (f"  compile cold {result['compile_cold_s']:.1f} s warm {result['compile_warm_s']:.2f} s"
                 if "compile_cold_s" in result else ""), flush=True)
        save()
    r = report["results"]
    ratios = {}
    if "pycfg-P1" in r:
        p1 = r["pycfg-P1"]
        for base in ("stock", "stock-compile"):
            if base in r:
                ratios[f"P1_speedup_over_{base}"] = r[base]["step_s"] / p1["step_s"]
        # P=2: each rank runs one batch-1 forward; the rest of the step is what P=1 spends outside its forwards
        pred = bench.pipe.transformer.config.in_channels * (args.height // 16) * (args.width // 16) * 2
        comm = _collective_projection(2 * pred)
        p2 = p1["forward_b1_s"] + max(p1["outside_forward_s"], 0.0) + comm["time_s"]
        unbatched_p1 = 2 * p1["forward_b1_s"] + max(p1["outside_forward_s"], 0.0)
        report["projection_P2"] = {
            "label": "PROJECTION (one GPU measured; second GPU not available)",
            "step_s": p2, "collective": comm,
            "speedup_over_P1_separate_forwards": unbatched_p1 / p2,
            "speedup_over_P1_as_run": p1["step_s"] / p2,
        }
        ratios["P2_projected_speedup_over_P1"] = p1["step_s"] / p2
    report["ratios"] = ratios
    save()
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}x")
    try:
        _plot_gpu(report, out_path + ".png")
    except ImportError as err:  # the JSON is the result; the chart is a convenience
        print(f"no chart: {err}")
    print(f"wrote {out_path}.json and {out_path}.png")
    return 0


def _plot_gpu(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = report["results"]
    labels = list(r) + (["pycfg-P2 (projected)"] if "projection_P2" in report else [])
    values = [r[m]["step_s"] * 1e3 for m in r]
    if "projection_P2" in report:
        values.append(report["projection_P2"]["step_s"] * 1e3)
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar(labels, values, color=["#888", "#5a8", "#36c", "#9bd"][: len(values)])
    ax.bar_label(bars, fmt="%.1f")
    s = report["settings"]
    ax.set_title(f"{report['model']['name']} {s['height']}x{s['width']}, {report['device']}: ms per step")
    ax.set_ylabel("ms per denoising step (CFG, 2 branches)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
