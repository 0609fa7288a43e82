"""Coefficient tables against the schedulers' own step(): every configuration, 4/8/20/50 steps, fp32."""

import copy
import logging
import sys

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)
from pycfg.kernels.fused_update_ref import apply_row

from pycfg.schedulers import (
    PlanUpdate,
    SchedulerStep,
    UnsupportedScheduler,
    build_plan,
    make_scheduler_update,
    philox_randn,
)

SEED = 1234

CONFIGS = {
    "flow-euler": (FlowMatchEulerDiscreteScheduler, {}, {}),
    "flow-euler-shift": (FlowMatchEulerDiscreteScheduler, dict(shift=3.0), {}),
    "flow-euler-stochastic": (FlowMatchEulerDiscreteScheduler, dict(stochastic_sampling=True), {}),
    "unipc-flow-bh2": (UniPCMultistepScheduler, dict(prediction_type="flow_prediction", use_flow_sigmas=True), {}),
    "unipc-flow-bh1-o3": (UniPCMultistepScheduler, dict(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                         solver_type="bh1", solver_order=3,
                                                         final_sigmas_type="sigma_min"), {}),
    "unipc-eps-bh2-o3": (UniPCMultistepScheduler, dict(solver_order=3), {}),
    "unipc-eps-bh1-o1": (UniPCMultistepScheduler, dict(solver_order=1, solver_type="bh1",
                                                       final_sigmas_type="sigma_min"), {}),
    "unipc-v-o2-no-lof": (UniPCMultistepScheduler, dict(prediction_type="v_prediction", lower_order_final=False,
                                                                  final_sigmas_type="sigma_min"), {}),
    "unipc-eps-o3-disable-corrector": (UniPCMultistepScheduler, dict(solver_order=3, disable_corrector=[0, 2]), {}),
    "unipc-eps-noise-space": (UniPCMultistepScheduler, dict(predict_x0=False, final_sigmas_type="sigma_min"), {}),
    "dpm++1": (DPMSolverMultistepScheduler, dict(solver_order=1), {}),
    "dpm++2m": (DPMSolverMultistepScheduler, {}, {}),
    "dpm++2m-heun-v": (DPMSolverMultistepScheduler, dict(solver_type="heun", prediction_type="v_prediction"), {}),
    "dpm++3m": (DPMSolverMultistepScheduler, dict(solver_order=3), {}),
    "dpm++2m-flow": (DPMSolverMultistepScheduler, dict(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                       flow_shift=3.0), {}),
    "sde-dpm++2m": (DPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++"), {}),
    "sde-dpm++3m-heun": (DPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++", solver_order=3,
                                                           solver_type="heun"), {}),
    "ddim": (DDIMScheduler, dict(clip_sample=False), {}),
    "ddim-eta": (DDIMScheduler, dict(clip_sample=False), dict(eta=0.7)),
    "ddim-v": (DDIMScheduler, dict(clip_sample=False, prediction_type="v_prediction", set_alpha_to_one=False), {}),
    "euler": (EulerDiscreteScheduler, {}, {}),
    "euler-v": (EulerDiscreteScheduler, dict(prediction_type="v_prediction"), {}),
    "euler-ancestral": (EulerAncestralDiscreteScheduler, {}, {}),
    "ddpm-fixed-small": (DDPMScheduler, dict(clip_sample=False), {}),
}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def trajectory_errors(scheduler, steps: int, step_kwargs: dict, shape=(2, 6, 8)) -> list[float]:
    """Per-step relative error of the plan against step(), both fed the same sample and model output."""
    scheduler.set_timesteps(steps)
    plan = build_plan(scheduler, scheduler.timesteps, step_kwargs)
    reference = copy.deepcopy(scheduler)
    module = sys.modules[type(scheduler).__module__]
    own_randn = getattr(module, "randn_tensor", None)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * float(getattr(reference, "init_noise_sigma", 1.0))
    history = torch.zeros(plan.num_slots, x.numel())
    coefficients = plan.coefficients.float()
    errors = []
    try:
        for i, t in enumerate(scheduler.timesteps):
            v = torch.randn(shape, generator=g)
            # step() draws this step's Philox noise, so both sides add the same numbers
            if own_randn is not None:
                module.randn_tensor = lambda shp, i=i, **kw: philox_randn(SEED, i, torch.Size(shp).numel()).view(shp)
            expected = reference.step(v, t, x, return_dict=False, **step_kwargs)[0]
            mine = x.clone()
            apply_row(mine, v, history, coefficients, plan.write_slots, i, SEED if plan.stochastic else None)
            errors.append(relative(mine, expected))
            x = expected
    finally:
        if own_randn is not None:
            module.randn_tensor = own_randn
    return errors


@pytest.mark.parametrize("steps", [4, 8, 20, 50])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_plan_matches_step(name, steps):
    cls, config, step_kwargs = CONFIGS[name]
    errors = trajectory_errors(cls(**config), steps, step_kwargs)
    assert max(errors) < 1e-6, f"{name} at {steps} steps: worst step {errors.index(max(errors))}: {max(errors):.3g}"


def test_stochastic_flags():
    s = DDPMScheduler(clip_sample=False)
    s.set_timesteps(8)
    plan = build_plan(s, s.timesteps)
    assert plan.stochastic and plan.noise[:-1] == (True,) * 7 and plan.noise[-1] is False  # t = 0 adds none
    s = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True)
    s.set_timesteps(8)
    assert not build_plan(s, s.timesteps).stochastic


def test_history_slots_reused():
    s = UniPCMultistepScheduler(solver_order=3)
    s.set_timesteps(50)
    plan = build_plan(s, s.timesteps)
    # UniPC-3 keeps m_{i-1}, m_{i-2}, m_{i-3} and the corrected sample: four slots for any length
    assert plan.num_slots == 4
    s = FlowMatchEulerDiscreteScheduler()
    s.set_timesteps(50)
    assert build_plan(s, s.timesteps).num_slots == 0


@pytest.mark.parametrize("make, kwargs, why", [
    (lambda: DDIMScheduler(), {}, "clip_sample"),
    (lambda: DDPMScheduler(thresholding=True, clip_sample=False), {}, "thresholding"),
    (lambda: UniPCMultistepScheduler(thresholding=True), {}, "thresholding"),
    (lambda: DPMSolverMultistepScheduler(thresholding=True), {}, "thresholding"),
    (lambda: DPMSolverMultistepScheduler(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"), {},
     "algorithm_type"),
    (lambda: EulerDiscreteScheduler(), {"s_churn": 1.0}, "s_churn"),
    (lambda: HeunDiscreteScheduler(), {}, "no coefficient table"),
    # step() itself fails (singular system, NaN) at the last step: it is left to fail the same way
    (lambda: UniPCMultistepScheduler(solver_order=3, lower_order_final=False), {}, "no well-defined table"),
])
def test_fallback_logs_reason(make, kwargs, why, caplog):
    s = make()
    s.set_timesteps(8)
    with pytest.raises(UnsupportedScheduler, match=why):
        build_plan(s, s.timesteps, kwargs)
    with caplog.at_level(logging.INFO, logger="pycfg"):
        update = make_scheduler_update(s, s.timesteps, kwargs, fused=True)
    assert isinstance(update, SchedulerStep)
    assert any(why in r.getMessage() and "step()" in r.getMessage() for r in caplog.records)


def test_selection_rules():
    s = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True)
    s.set_timesteps(8)
    # CPU default and fused=False keep diffusers' own step(): bit-identical to the stock pipeline
    assert isinstance(make_scheduler_update(s, s.timesteps, fused=None, device="cpu"), SchedulerStep)
    assert isinstance(make_scheduler_update(s, s.timesteps, fused=False, device="cuda"), SchedulerStep)
    assert isinstance(make_scheduler_update(s, s.timesteps, fused=True, device="cpu"), PlanUpdate)
    sde = DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")
    sde.set_timesteps(8)
    g = torch.Generator().manual_seed(3)
    assert isinstance(make_scheduler_update(sde, sde.timesteps, fused=True, noise="diffusers", generator=g),
                      SchedulerStep)
    update = make_scheduler_update(sde, sde.timesteps, fused=True, generator=g)
    assert isinstance(update, PlanUpdate) and update.seed is not None
    with pytest.raises(ValueError, match="noise"):
        make_scheduler_update(sde, sde.timesteps, fused=True, noise="numpy")


def test_scheduler_not_mutated():
    s = UniPCMultistepScheduler(solver_order=3)
    s.set_timesteps(20)
    before = copy.deepcopy(s.__dict__)
    build_plan(s, s.timesteps)
    for key, value in before.items():
        now = s.__dict__[key]
        assert (torch.equal(now, value) if isinstance(value, torch.Tensor) else now == value) or key == "config"
    assert s.step_index is None and s.model_outputs == [None] * 3


def test_seed_from_generator_does_not_draw():
    from pycfg.schedulers import seed_from_generator

    g = torch.Generator().manual_seed(7)
    state = g.get_state().clone()
    a = seed_from_generator(g)
    assert torch.equal(g.get_state(), state)
    assert a == seed_from_generator(torch.Generator().manual_seed(7))
    assert a != seed_from_generator(torch.Generator().manual_seed(8))
    assert 0 <= a < 2**63
