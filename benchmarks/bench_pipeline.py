"""Pipeline benchmark: stock diffusers vs pycfg P=1 vs pycfg P=2, per denoising step.

Every mode runs in its own spawned processes with one thread each (as each rank would own one device):
stock and P=1 on one process, P=2 on two. Reports the median step time and the time per step spent outside
the transformer forward(s) (a forward hook measures the forwards). Writes JSON and a PNG chart.

    python benchmarks/bench_pipeline.py --configs tiny small --steps 6 --repeats 3

GPU mode (``--model qwen-image | wan2.1-1.3b | sd3-medium``): one process, one realistic-size transformer with
random weights built from the model's published config (no downloads, no text encoders: embeddings of the real
encoders' shapes are passed in), measured in one run as stock eager, stock + torch.compile (diffusers' regional
``compile_repeated_blocks``, what users reach for) and pycfg P=1 (compiled forwards, whole-step CUDA graphs,
fused update, batched CFG chosen by measurement where the adapter batches). Per-step latency is the difference of
two runs of different lengths timed with CUDA events (so prompt handling and the first step's setup cancel out);
the forward alone is timed the same way to give the time per step outside the transformer. The longer run's
whole latency is reported too (``request_s``): a warm request as a server sees it, where pycfg replays the step
graphs captured by earlier requests of the same shape.

    python benchmarks/bench_pipeline.py --model qwen-image --steps 6 --height 1024 --width 1024
    python benchmarks/bench_pipeline.py --model wan2.1-1.3b --steps 3 --repeats 2      # 480x832, 33 frames
    python benchmarks/bench_pipeline.py --model sd3-medium --steps 6 --repeats 2       # 1024x1024

Without CUDA (or with ``--device cpu``) the same modes run on the CPU, timed by wall clock: a smoke test, e.g.
``--model wan2.1-1.3b --layers 1 --height 64 --width 64 --frames 5 --text-len 16 --steps 1 --repeats 1``.
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
    parser.add_argument("--height", type=int, default=None, help="GPU mode (default: the model's, see GPU_MODELS)")
    parser.add_argument("--width", type=int, default=None, help="GPU mode (default: the model's)")
    parser.add_argument("--frames", type=int, default=None, help="GPU mode, video models (default: the model's)")
    parser.add_argument("--layers", type=int, default=None, help="override the model's block count")
    parser.add_argument("--text-len", type=int, default=None,
                        help="prompt and negative prompt tokens (default: the model's encoder length)")
    parser.add_argument("--device", default=None,
                        help="GPU mode: cuda when available, else cpu (a smoke run with --layers 1 and small sizes)")
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

#: published configs (diffusers' config.json of each model's transformer and scheduler); random weights, no
#: downloads. ``height`` / ``width`` / ``frames`` / ``text_len`` are the run's defaults; ``guidance`` names the
#: pipeline argument that turns CFG on and its scale.
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
        height=1024, width=1024, frames=None, text_len=128, guidance=("true_cfg_scale", 4.0),
    ),
    # Wan-AI/Wan2.1-T2V-1.3B-Diffusers; text embeds are UMT5-XXL's, 512 tokens of 4096
    "wan2.1-1.3b": dict(
        family="wan",
        transformer=dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                         out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                         cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None,
                         added_kv_proj_dim=None, rope_max_seq_len=1024),
        scheduler=dict(beta_end=0.02, beta_schedule="linear", beta_start=0.0001, disable_corrector=[],
                       dynamic_thresholding_ratio=0.995, final_sigmas_type="zero", flow_shift=3.0,
                       lower_order_final=True, num_train_timesteps=1000, predict_x0=True,
                       prediction_type="flow_prediction", rescale_betas_zero_snr=False, sample_max_value=1.0,
                       solver_order=2, solver_p=None, solver_type="bh2", steps_offset=0, thresholding=False,
                       timestep_spacing="linspace", trained_betas=None, use_beta_sigmas=False,
                       use_exponential_sigmas=False, use_flow_sigmas=True, use_karras_sigmas=False),
        # 480p as published; 33 frames (9 latent frames, 14040 tokens) rather than 81 keeps a run to minutes
        height=480, width=832, frames=33, text_len=512, guidance=("guidance_scale", 5.0),
    ),
    # stabilityai/stable-diffusion-3-medium-diffusers; text embeds are CLIP-L/G (77) + T5-XXL (256) tokens of 4096,
    # pooled embeds CLIP-L + CLIP-G (2048)
    "sd3-medium": dict(
        family="sd3",
        transformer=dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                         num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                         pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192),
        scheduler=dict(num_train_timesteps=1000, shift=3.0),
        height=1024, width=1024, frames=None, text_len=333, guidance=("guidance_scale", 7.0),
    ),
}


def _build(cls, cfg: dict, dtype: torch.dtype, device: str):
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # a 20B model built in fp32 first would not fit
    try:
        with torch.device(device):
            return cls(**cfg)
    finally:
        torch.set_default_dtype(default)


def _qwen_pipeline(spec: dict, cfg: dict, dtype: torch.dtype, device: str):
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    transformer = _build(QwenImageTransformer2DModel, cfg, dtype, device)
    # a small VAE with the real one's latent channels and 8x scale factor: only its config is read (latent output)
    vae = AutoencoderKLQwenImage(base_dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True, True], latents_mean=[0.0] * 16,
                                 latents_std=[1.0] * 16)
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**spec["scheduler"]), vae=vae,
                             text_encoder=None, tokenizer=None, transformer=transformer)


def _wan_pipeline(spec: dict, cfg: dict, dtype: torch.dtype, device: str):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    transformer = _build(WanTransformer3DModel, cfg, dtype, device)
    # the real VAE's 16 latent channels, 8x spatial and 4x temporal scale at a tiny width: only its config is read
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    return WanPipeline(tokenizer=None, text_encoder=None, vae=vae,
                       scheduler=UniPCMultistepScheduler(**spec["scheduler"]), transformer=transformer)


def _sd3_pipeline(spec: dict, cfg: dict, dtype: torch.dtype, device: str):
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    transformer = _build(SD3Transformer2DModel, cfg, dtype, device)
    # 16 latent channels and four blocks (8x scale), as the real VAE, at a tiny width: only its config is read
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8,) * 4, layers_per_block=1,
                        latent_channels=16, norm_num_groups=1, shift_factor=0.0609, scaling_factor=1.5305)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**spec["scheduler"]), vae=vae,
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
        tokenizer_3=None,
    )


_BUILDERS = {"qwenimage": _qwen_pipeline, "wan": _wan_pipeline, "sd3": _sd3_pipeline}


def _pipeline(spec: dict, layers: int | None, dtype: torch.dtype, device: str):
    cfg = dict(spec["transformer"])
    if layers is not None:
        cfg["num_layers"] = layers
    pipe = _BUILDERS[spec["family"]](spec, cfg, dtype, device)
    pipe.to(device)
    pipe.vae.to(dtype)
    pipe.transformer.eval()
    pipe.set_progress_bar_config(disable=True)
    params = sum(p.numel() for p in pipe.transformer.parameters())
    return pipe, params, cfg


def _stock_regional_compile(transformer) -> str:
    """What a user reaches for: diffusers' ``compile_repeated_blocks``, or the same recipe by hand."""
    if getattr(transformer, "_repeated_blocks", None):
        transformer.compile_repeated_blocks(dynamic=False)
        return "transformer.compile_repeated_blocks(dynamic=False)"
    # SD3Transformer2DModel names no _repeated_blocks, so compile_repeated_blocks refuses it
    for block in transformer.transformer_blocks:
        block.compile(dynamic=False)
    return "block.compile(dynamic=False) for each of transformer.transformer_blocks (no _repeated_blocks declared)"


class GpuBench:
    def __init__(self, args) -> None:
        self.args = args
        self.spec = spec = GPU_MODELS[args.model]
        self.family = spec["family"]
        self.device = torch.device(args.device)
        self.dtype = torch.bfloat16
        t0 = time.perf_counter()
        self.pipe, self.params, self.config = _pipeline(spec, args.layers, self.dtype, args.device)
        self.build_s = time.perf_counter() - t0
        self.guidance_arg, self.guidance_scale = spec["guidance"]
        g = torch.Generator(args.device).manual_seed(1)
        self._g = g
        n = args.text_len
        if self.family == "qwenimage":
            ones = torch.ones(1, n, dtype=torch.long, device=args.device)
            self.inputs = dict(prompt_embeds=self._randn(1, n, self.config["joint_attention_dim"]),
                               prompt_embeds_mask=ones,
                               negative_prompt_embeds=self._randn(1, n, self.config["joint_attention_dim"]),
                               negative_prompt_embeds_mask=ones)
        elif self.family == "wan":
            self.inputs = dict(prompt_embeds=self._randn(1, n, self.config["text_dim"]),
                               negative_prompt_embeds=self._randn(1, n, self.config["text_dim"]),
                               num_frames=args.frames)
        else:
            self.inputs = dict(prompt_embeds=self._randn(1, n, self.config["joint_attention_dim"]),
                               pooled_prompt_embeds=self._randn(1, self.config["pooled_projection_dim"]),
                               negative_prompt_embeds=self._randn(1, n, self.config["joint_attention_dim"]),
                               negative_pooled_prompt_embeds=self._randn(1, self.config["pooled_projection_dim"]))
        self.inputs.update(height=args.height, width=args.width, output_type="latent")
        self.inputs[self.guidance_arg] = self.guidance_scale

    def _randn(self, *shape) -> torch.Tensor:
        return torch.randn(*shape, generator=self._g, device=self.device, dtype=self.dtype)

    def latent_numel(self) -> int:
        """Elements of one branch's prediction (what a 2-rank exchange moves per branch)."""
        a, h, w = self.args, self.args.height // 8, self.args.width // 8
        if self.family == "qwenimage":
            return self.config["in_channels"] * (h // 2) * (w // 2)
        if self.family == "wan":
            return self.config["in_channels"] * ((a.frames - 1) // 4 + 1) * h * w
        return self.config["in_channels"] * h * w

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, fn) -> float:
        """Seconds of ``fn()``: CUDA events on a GPU, wall time elsewhere."""
        if self.device.type != "cuda":
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.sync()
        start.record()
        fn()
        end.record()
        self.sync()
        return start.elapsed_time(end) / 1e3

    def call(self, runner, steps: int) -> float:
        return self.timed(lambda: runner(**self.inputs, num_inference_steps=steps,
                                         generator=torch.Generator(self.args.device).manual_seed(0)))

    def per_step(self, runner) -> dict:
        """(T(2 + n) - T(2)) / n: prompt handling, setup and the first steps' one-off work cancel out."""
        n = self.args.steps
        samples, requests = [], []
        for _ in range(self.args.repeats):
            short = self.call(runner, 2)
            long = self.call(runner, 2 + n)
            samples.append((long - short) / n)
            requests.append(long)
        # a whole warm request of 2 + n steps, as a server sees it (text inputs, every step, latents out)
        return {"step_s": statistics.median(samples), "samples_s": samples,
                "request_s": statistics.median(requests), "request_steps": 2 + n}

    def forward_s(self, batch: int) -> float:
        """One transformer forward at this request's shapes (median of 5)."""
        pipe, a, cfg = self.pipe, self.args, self.config
        text = self._randn(batch, a.text_len, cfg.get("joint_attention_dim") or cfg["text_dim"])
        if self.family == "qwenimage":
            h, w = a.height // pipe.vae_scale_factor // 2, a.width // pipe.vae_scale_factor // 2
            x = self._randn(batch, h * w, cfg["in_channels"])
            t = torch.full((batch,), 0.5, device=self.device, dtype=self.dtype)
            kwargs = dict(img_shapes=[[(1, h, w)]] * batch, attention_kwargs={})
        elif self.family == "wan":
            f = (a.frames - 1) // pipe.vae_scale_factor_temporal + 1
            s = pipe.vae_scale_factor_spatial
            x = self._randn(batch, cfg["in_channels"], f, a.height // s, a.width // s)
            # UniPC's timesteps are integers: the dtype the pipeline passes, so no new compile
            t = torch.full((batch,), 500, device=self.device, dtype=torch.long)
            kwargs = dict(attention_kwargs=None)
        else:
            s = pipe.vae_scale_factor
            x = self._randn(batch, cfg["in_channels"], a.height // s, a.width // s)
            t = torch.full((batch,), 500.0, device=self.device, dtype=torch.float32)
            kwargs = dict(pooled_projections=self._randn(batch, cfg["pooled_projection_dim"]),
                          joint_attention_kwargs=None)

        def fwd():
            pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False, **kwargs)

        with torch.no_grad():
            fwd()
            return statistics.median(self.timed(fwd) for _ in range(5))

    def stock(self) -> dict:
        self.call(self.pipe, 2)
        return self.per_step(self.pipe)

    def stock_compile(self) -> dict:
        how = _stock_regional_compile(self.pipe.transformer)
        cold = self.call(self.pipe, 2)
        warm = self.call(self.pipe, 2)
        out = self.per_step(self.pipe)
        out.update(compile_cold_s=cold, compile_warm_s=warm, compiled_with=how)
        out["forward_b1_s"] = self.forward_s(1)
        return out

    def pycfg(self) -> dict:
        import pycfg

        a = self.args
        batch = {"auto": "auto", "on": True, "off": False}[a.batch_branches]
        # the pipeline's own guidance, chosen by the adapter from the call's arguments, as a drop-in user gets it
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
        out["graphs"] = self._graphs(fast)
        batched = any(c.get("batched") for c in fast.batch_choices.values())
        out["batched"] = batched
        out["forward_b1_s"] = self.forward_s(1)
        out["forward_b2_s"] = self.forward_s(2) if batched else None
        forwards = out["forward_b2_s"] if batched else 2 * out["forward_b1_s"]
        out["forwards_per_step_s"] = forwards
        out["outside_forward_s"] = out["step_s"] - forwards
        out["outside_fraction"] = out["outside_forward_s"] / out["step_s"]
        return out

    def _graphs(self, fast) -> dict:
        """Whether steps replayed as CUDA graphs, and if not, why."""
        a, graphs = self.args, fast.step_graphs
        if graphs is not None:
            used = graphs.replays > 0
            return {"used": used, "why_not": None if used else graphs.reason, **graphs.describe()}
        if a.no_graphs:
            why = "--no-graphs"
        elif self.device.type != "cuda":
            why = "not on a CUDA device"
        elif a.no_compile:
            why = "the transformer is not compiled (--no-compile)"
        elif not fast.adapter.capabilities.graph_steps:
            why = f"{type(fast.adapter).__name__} does not take a device step index"
        else:
            why = "off"
        return {"used": False, "why_not": why}


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


def _resolve_gpu_args(args) -> None:
    spec = GPU_MODELS[args.model]
    for name in ("height", "width", "frames", "text_len"):
        if getattr(args, name) is None:
            setattr(args, name, spec[name])
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"


def _versions() -> dict:
    import diffusers

    try:
        import triton
        triton_version = getattr(triton, "__version__", None)
    except ImportError:
        triton_version = None
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "diffusers": diffusers.__version__, "triton": triton_version}


def gpu_main(args) -> int:
    _resolve_gpu_args(args)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA device (use --device cpu for a smoke run)")
    bench = GpuBench(args)
    on_cuda = bench.device.type == "cuda"
    if on_cuda:
        props = torch.cuda.get_device_properties(bench.device)
        device_name = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    else:
        device_name = f"CPU: {cpu_name()}, {os.cpu_count()} cores"
    name = f"{args.model}_{args.height}x{args.width}" + (f"x{args.frames}f" if args.frames else "")
    out_path = args.out or os.path.join(os.path.dirname(__file__), "results", f"bench_pipeline_gpu_{name}")
    settings = {"height": args.height, "width": args.width, "text_len": args.text_len, "steps": args.steps,
                "repeats": args.repeats, bench.guidance_arg: bench.guidance_scale,
                "cfg_parallel_size": args.cfg_parallel_size, "compile": not args.no_compile,
                "graphs": not args.no_graphs, "fused": not args.no_fused, "exchange": args.exchange,
                "batch_branches": args.batch_branches}
    if args.frames:
        settings["frames"] = args.frames
    report = {
        "benchmark": "bench_pipeline (GPU)",
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name,
        "versions": _versions(),
        "model": {"name": args.model, "pipeline": type(bench.pipe).__name__, "config": _jsonable(bench.config),
                  "parameters": bench.params, "dtype": "bfloat16", "weights": "random (published config)",
                  "build_s": bench.build_s},
        "settings": settings,
        "results": {},
    }
    os.makedirs(os.path.dirname(out_path), exist_ok=True)

    def save():
        with open(out_path + ".json", "w") as f:
            json.dump(report, f, indent=2)

    runs = {"stock": bench.stock, "stock-compile": bench.stock_compile, "pycfg-P1": bench.pycfg}
    for mode in args.modes:
        if mode == "pycfg-P1" and "stock-compile" in args.modes:
            from pycfg.runtime.compiled import repeated_blocks

            # pycfg compiles from scratch, not from the stock run's dynamo cache (inductor's on-disk cache stays)
            for block in repeated_blocks(bench.pipe.transformer):
                block._compiled_call_impl = None
            torch._dynamo.reset()
        if on_cuda:
            torch.cuda.reset_peak_memory_stats(bench.device)
        result = runs[mode]()
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(bench.device) / 2**30 if on_cuda else None
        report["results"][mode] = result
        peak = f"  peak {result['peak_memory_gib']:.1f} GiB" if on_cuda else ""
        print(f"{mode:14s} step {result['step_s'] * 1e3:9.2f} ms  request ({result['request_steps']} steps) "
              f"{result['request_s'] * 1e3:9.1f} ms{peak}"
              + (f"  compile cold {result['compile_cold_s']:.1f} s warm {result['compile_warm_s']:.2f} s"
                 if "compile_cold_s" in result else "")
              + (f"  graphs {'on' if result['graphs']['used'] else 'off: ' + str(result['graphs']['why_not'])}"
                 if "graphs" in result else ""), flush=True)
        save()
    r = report["results"]
    ratios = {}
    if "pycfg-P1" in r:
        p1 = r["pycfg-P1"]
        for base in ("stock", "stock-compile"):
            if base in r:
                ratios[f"P1_speedup_over_{base}"] = r[base]["step_s"] / p1["step_s"]
                ratios[f"P1_request_speedup_over_{base}"] = r[base]["request_s"] / p1["request_s"]
        # P=2: each rank runs one batch-1 forward; the rest of the step is what P=1 spends outside its forwards
        pred = bench.latent_numel() * bench.dtype.itemsize
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
    frames = f"x{s['frames']}f" if s.get("frames") else ""
    ax.set_title(f"{report['model']['name']} {s['height']}x{s['width']}{frames}, {report['device']}: ms per step")
    ax.set_ylabel("ms per denoising step (CFG, 2 branches)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
