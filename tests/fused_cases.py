"""Per-rank bodies of the fused-update multi-process tests (spawned by pycfg._launch.run_world)."""

from __future__ import annotations

import copy
import os

import torch  # noqa: E402

# the kernel runs in Triton's interpreter on CPU, chosen before anything imports triton; on a CUDA machine this
# module is also imported by the GPU test process, whose kernels must compile
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import make_scheduler  # noqa: E402

import pycfg  # noqa: E402
from pycfg.tiny import qwenimage_inputs, qwenimage_pipeline  # noqa: E402


def qwen_runs(rank: int, world: int, scheduler: str, runs: list[dict]) -> list:
    """Each run: compile options + steps + seed; returns the latents (and the user's scheduler state)."""
    pipe = qwenimage_pipeline("tiny", scheduler=make_scheduler(scheduler))
    user_state = copy.deepcopy(pipe.scheduler.__dict__)
    inputs = qwenimage_inputs("tiny")
    out = []
    for run in runs:
        run = dict(run)
        steps, seed = run.pop("steps"), run.pop("seed", 0)
        fast = pycfg.compile(pipe, cfg_parallel_size=world, check_consistency=True, **run)
        latents = fast(**inputs, true_cfg_scale=4.0, num_inference_steps=steps, output_type="latent",
                       generator=torch.Generator().manual_seed(seed)).images
        out.append((latents, type(fast.adapter.make_update.__self__).__name__))
    unchanged = all(
        torch.equal(v, pipe.scheduler.__dict__[k]) if isinstance(v, torch.Tensor) else v == pipe.scheduler.__dict__[k]
        for k, v in user_state.items() if k != "config"
    )
    return [(lat, unchanged) for lat, _ in out]


def _toy_model(seed: int = 0, dim: int = 16):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(dim, dim, generator=g) / dim**0.5
    bias = {"cond": torch.randn(dim, generator=g), "uncond": torch.randn(dim, generator=g)}

    def model(name: str, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ weight + bias[name])

    return model


def toy_stock(scheduler: str, steps: int, scale: float = 3.0) -> torch.Tensor:
    """The sequential loop a stock pipeline runs: both branches, CFG with renorm, scheduler.step()."""
    from pycfg.guidance import CFG

    s = make_scheduler(scheduler)
    s.set_timesteps(steps)
    model, policy = _toy_model(), CFG(scale, renorm=True)
    policy.reset(steps)
    x = torch.randn(2, 32, 16, generator=torch.Generator().manual_seed(5))
    for i, t in enumerate(s.timesteps):
        preds = {name: model(name, x) for name in ("cond", "uncond")}
        x = s.step(policy.combine(preds, i), t, x, return_dict=False)[0]
    return x


def toy_fused(rank: int, world: int, scheduler: str, steps: int, scale: float = 3.0, exchange: str = "gather"):
    """The same loop through pycfg's runtime at P=world with the fused update (kernel, interpreter on CPU)."""
    from pycfg.guidance import CFG
    from pycfg.parallel.comm import make_comm
    from pycfg.parallel.groups import form_cfg_group
    from pycfg.runtime.denoise import denoise
    from pycfg.runtime.job import Job
    from pycfg.schedulers import PlanUpdate, make_scheduler_update

    device = torch.device("cpu")
    comm = make_comm(form_cfg_group(world, device=device, timeout=60.0), device=device, timeout=60.0)
    s = make_scheduler(scheduler)
    s.set_timesteps(steps)
    update = make_scheduler_update(s, s.timesteps, fused=True, generator=torch.Generator().manual_seed(9))
    assert isinstance(update, PlanUpdate)
    model = _toy_model()
    x = torch.randn(2, 32, 16, generator=torch.Generator().manual_seed(5))
    job = Job(latents=x, num_steps=steps, policy=CFG(scale, renorm=True),
              forward=lambda names, lat, step, batched: [model(n, lat) for n in names], update=update,
              prediction_spec=[(tuple(x.shape), x.dtype)], device=device, finish=lambda lat: lat)
    latents, _ = denoise(job, comm, exchange=exchange, check_consistency=True)
    return latents


def stock_after_fused(rank: int, world: int) -> bool:
    """A fused run leaves the user's scheduler untouched; the stock pipeline then gives its own bits."""
    pipe = qwenimage_pipeline("tiny", scheduler=make_scheduler("unipc"))
    before = copy.deepcopy(pipe.scheduler.config)
    call = dict(qwenimage_inputs("tiny"), true_cfg_scale=4.0, num_inference_steps=4, output_type="latent")
    fresh = qwenimage_pipeline("tiny", scheduler=make_scheduler("unipc"))
    expected = fresh(**call, generator=torch.Generator().manual_seed(0)).images
    pycfg.compile(pipe, fused=True)(**call, generator=torch.Generator().manual_seed(0))
    assert pipe.scheduler.config == before and pipe.scheduler.step_index is None
    return torch.equal(pipe(**call, generator=torch.Generator().manual_seed(0)).images, expected)
