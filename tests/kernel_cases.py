"""The fused Triton update against its PyTorch reference (collected through test_kernels.py).

On CPU these run in Triton's interpreter, which must be chosen before triton is first imported.
"""

import os

if not __import__("torch").cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

triton = pytest.importorskip("triton")

from diffusers import (  # noqa: E402
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from pycfg.kernels.fused_update import fused_guided_update  # noqa: E402
from pycfg.kernels.fused_update_ref import fused_guided_update_ref  # noqa: E402

from pycfg.schedulers import build_plan, philox_randn  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SEED = 987654321


def relative(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def test_philox_matches_tl_randn():
    import triton.language as tl

    @triton.jit
    def draw(out, seed, step, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out + offs, tl.randn(seed, offs.to(tl.int64) + (step.to(tl.int64) << 32)), mask=offs < n)

    for seed, step in [(0, 0), (SEED, 3), (2**63 - 5, 49)]:
        n = 3000
        out = torch.empty(n, device=DEVICE)
        draw[(triton.cdiv(n, 1024),)](out, seed, step, n, BLOCK=1024)
        ref = philox_randn(seed, step, n, device=DEVICE)
        if DEVICE == "cpu":
            assert torch.equal(out, ref)  # the interpreter's numbers, bit for bit
        else:
            assert relative(out, ref) < 1e-6


def test_philox_stream_statistics():
    z = philox_randn(SEED, 0, 1_000_000)
    assert abs(z.mean().item()) < 3e-3 and abs(z.std().item() - 1) < 3e-3
    # steps and seeds give independent streams
    assert abs(torch.corrcoef(torch.stack([z[:100_000], philox_randn(SEED, 1, 100_000)]))[0, 1].item()) < 0.02
    assert not torch.equal(z[:1000], philox_randn(SEED + 1, 0, 1000))


def _plan(kind: str, steps: int):
    s = {
        "unipc3": lambda: UniPCMultistepScheduler(solver_order=3),
        "unipc-flow": lambda: UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True),
        "dpm2m": lambda: DPMSolverMultistepScheduler(),
        "sde-dpm": lambda: DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=3),
        "flow-stochastic": lambda: FlowMatchEulerDiscreteScheduler(stochastic_sampling=True),
        "ddpm": lambda: DDPMScheduler(clip_sample=False),
    }[kind]()
    s.set_timesteps(steps)
    return build_plan(s, s.timesteps)


GUIDANCE = {
    "none": dict(),
    "cfg": dict(scale=4.0),
    "cfg-original": dict(scale=2.5, original=True),
    "cfg-renorm": dict(scale=4.0, renorm=True),
    "cfg-rescale": dict(scale=5.0, rescale=0.7),
    "cfg-rescale-renorm": dict(scale=3.0, rescale=0.5, renorm=True),
}


def _run_both(plan, guidance: str, shape, dtype, steps_to_run, reduced: bool = False):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(shape, generator=g).to(DEVICE, dtype)
    states = []
    for fn in (fused_guided_update_ref, fused_guided_update):
        x = x0.clone()
        hist = torch.zeros(plan.num_slots, x.numel(), device=DEVICE)
        coef = plan.coefficients.to(DEVICE, torch.float32).contiguous()
        slots = plan.write_slots.to(DEVICE)
        gen = torch.Generator().manual_seed(2)
        outs = []
        for i in range(steps_to_run):
            c = torch.randn(shape, generator=gen).to(DEVICE, dtype)
            u = torch.randn(shape, generator=gen).to(DEVICE, dtype)
            kw = dict(GUIDANCE[guidance])
            if guidance == "none":
                u = None
            if reduced and u is not None:
                # the reduce exchange's terms: fp32 weighted sum plus the cond side channels
                s = kw.pop("scale")
                kw.pop("original", None)
                cf = c.float()
                if kw.get("renorm"):
                    kw["cond_norm"] = torch.norm(cf, dim=-1, keepdim=True)
                if kw.get("rescale"):
                    kw["cond_std"] = cf.std(dim=list(range(1, cf.ndim)), keepdim=True)
                c, u = (s * cf + (1 - s) * u.float()).contiguous(), None
            seed = (torch.tensor([SEED], device=DEVICE) if fn is fused_guided_update else SEED) \
                if plan.stochastic else None
            fn(x, c, u, hist, coef, slots, i, seed=seed, **kw)
            outs.append((x.clone(), hist.clone()))
        states.append(outs)
    return states


@pytest.mark.parametrize("kind, guidance", [
    ("unipc3", "cfg"), ("unipc3", "cfg-renorm"), ("unipc-flow", "cfg-rescale-renorm"), ("dpm2m", "none"),
    ("dpm2m", "cfg-original"), ("sde-dpm", "cfg-rescale"), ("flow-stochastic", "cfg-renorm"), ("ddpm", "cfg"),
])
def test_kernel_matches_reference(kind, guidance):
    steps = 8
    plan = _plan(kind, steps)
    ref, ker = _run_both(plan, guidance, (2, 40, 24), torch.float32, steps)
    for i, ((xr, hr), (xk, hk)) in enumerate(zip(ref, ker)):
        assert relative(xk, xr) < 1e-6, f"step {i}"
        if hr.numel():
            assert relative(hk, hr) < 1e-6, f"history at step {i}"


@pytest.mark.parametrize("guidance", ["cfg-renorm", "cfg-rescale-renorm"])
def test_kernel_reduced_terms(guidance):
    plan = _plan("unipc3", 4)
    ref, ker = _run_both(plan, guidance, (2, 40, 24), torch.float32, 4, reduced=True)
    for (xr, _), (xk, _) in zip(ref, ker):
        assert relative(xk, xr) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_low_precision_inputs(dtype):
    plan = _plan("unipc-flow", 4)
    # one step from the same state: later steps start from latents that may already differ by an ulp
    ref, ker = _run_both(plan, "cfg-renorm", (1, 64, 16), dtype, 1)
    (xr, hr), (xk, hk) = ref[0], ker[0]
    assert xk.dtype == dtype
    # both compute in fp32 and round once to the latent dtype: at most one ulp apart; history stays fp32
    assert relative(xk, xr) < 1e-2 and relative(hk, hr) < 1e-6


def test_kernel_odd_sizes():
    plan = _plan("dpm2m", 4)
    ref, ker = _run_both(plan, "cfg", (3, 7, 13), torch.float32, 4)
    for (xr, _), (xk, _) in zip(ref, ker):
        assert relative(xk, xr) < 1e-6
    ref, ker = _run_both(plan, "cfg-renorm", (3, 7, 13), torch.float32, 4)
    for (xr, _), (xk, _) in zip(ref, ker):
        assert relative(xk, xr) < 1e-6


@pytest.mark.parametrize("guidance", ["cfg", "cfg-original", "cfg-rescale-renorm"])
def test_kernel_scale_from_device_memory(guidance):
    # a captured launch reads the scale from memory, so a replay honours a new request's scale
    plan = _plan("unipc3", 3)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 40, 24, generator=g).to(DEVICE)
    c, u = torch.randn(2, 2, 40, 24, generator=g).to(DEVICE)
    kw = dict(GUIDANCE[guidance])
    scale = kw.pop("scale")
    results = []
    for s in (scale, torch.tensor([scale], device=DEVICE)):
        x = x0.clone()
        hist = torch.zeros(plan.num_slots, x.numel(), device=DEVICE)
        coef, slots = plan.coefficients.to(DEVICE, torch.float32).contiguous(), plan.write_slots.to(DEVICE)
        for i in range(3):
            fused_guided_update(x, c, u, hist, coef, slots, i, scale=s, **kw)
        results.append(x)
    assert torch.equal(results[0], results[1])
    with pytest.raises(ValueError, match="one float32 element"):
        fused_guided_update(x0.clone(), c, u, hist, coef, slots, 0, scale=torch.tensor([scale, scale], device=DEVICE))
