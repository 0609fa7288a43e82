"""Guidance policies against diffusers' guiders (driven directly on tensors) and the pipelines' own formulas."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from diffusers.guiders import (
    AdaptiveProjectedGuidance,
    ClassifierFreeGuidance,
    ClassifierFreeZeroStarGuidance,
    PerturbedAttentionGuidance,
    SkipLayerGuidance,
)
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer
from diffusers.guiders.ltx2_guidance import LTX2Guidance

import pycfg
import pycfg.guidance as g

logging.getLogger("diffusers").setLevel(logging.ERROR)  # the guiders warn that they are experimental

SHAPE = (2, 64, 12)  # batch, tokens, channels
N = 10


def _preds(step: int, names=("cond", "uncond", "p3", "p4", "skip", "perturbed"), shape=SHAPE):
    gen = torch.Generator().manual_seed(100 + step)
    return {n: torch.randn(shape, generator=gen) for n in names}


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-6) -> None:
    err = (a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)
    assert err <= rel, f"relative error {err:.3g} > {rel}"


def _run_policy(policy, step: int, preds: dict) -> torch.Tensor:
    active = policy.active(step)
    return policy.combine({n: preds[n] for n in active}, step)


def _guider_forward(guider, step: int, preds: dict, names: list[str]) -> torch.Tensor:
    guider.set_state(step, N, torch.tensor(999 - step))
    args = [preds[n] for n in names]
    # outside its windows a guider takes fewer predictions; it names them by position
    return guider.forward(*args[: guider.num_conditions]).pred


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(scale=4.0),
        dict(scale=4.0, rescale=0.7),
        dict(scale=3.0, original_formulation=True),
        dict(scale=5.0, start=0.2, stop=0.7),
        dict(scale=1.0),
    ],
)
def test_cfg_matches_classifier_free_guidance(kwargs):
    policy = g.CFG(**kwargs)
    guider = ClassifierFreeGuidance(
        guidance_scale=kwargs["scale"],
        guidance_rescale=kwargs.get("rescale", 0.0),
        use_original_formulation=kwargs.get("original_formulation", False),
        start=kwargs.get("start", 0.0),
        stop=kwargs.get("stop", 1.0),
    )
    policy.reset(N)
    for i in range(N):
        preds = _preds(i)
        guider.set_state(i, N, torch.tensor(0))
        assert len(policy.active(i)) == guider.num_conditions, i
        _close(_run_policy(policy, i, preds), _guider_forward(guider, i, preds, ["cond", "uncond"]))


def test_cfg_renorm_is_qwen_pipeline_arithmetic():
    # QwenImagePipeline: comb = neg + s * (pos - neg); comb * (norm(pos) / norm(comb)), bit for bit
    policy = g.CFG(4.0, renorm=True)
    policy.reset(N)
    preds = _preds(0)
    c, u = preds["cond"], preds["uncond"]
    comb = u + 4.0 * (c - u)
    expected = comb * (torch.norm(c, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
    assert torch.equal(_run_policy(policy, 0, preds), expected)


def test_dynamic_cfg_is_cogvideox_schedule():
    timesteps = [999, 874, 749, 624, 499, 374, 249, 124, 50, 1]
    policy = g.DynamicCFG(6.0)
    policy.set_timesteps(timesteps)
    policy.reset(len(timesteps))
    n = len(timesteps)
    for i, t in enumerate(timesteps):
        # CogVideoXPipeline with use_dynamic_cfg=True
        w = 1 + 6.0 * ((1 - math.cos(math.pi * ((n - t) / n) ** 5.0)) / 2)
        preds = _preds(i)
        c, u = preds["cond"], preds["uncond"]
        assert torch.equal(_run_policy(policy, i, preds), u + w * (c - u))


@pytest.mark.parametrize("kwargs", [dict(scale=5.0, zero_init_steps=2), dict(scale=4.0, zero_init_steps=0, rescale=0.5),
                                    dict(scale=4.0, zero_init_steps=1, start=0.0, stop=0.6)])
def test_cfg_zero_star_matches_guider(kwargs):
    policy = g.CFGZeroStar(**kwargs)
    guider = ClassifierFreeZeroStarGuidance(
        guidance_scale=kwargs["scale"], zero_init_steps=kwargs["zero_init_steps"],
        guidance_rescale=kwargs.get("rescale", 0.0), start=kwargs.get("start", 0.0), stop=kwargs.get("stop", 1.0),
    )
    policy.reset(N)
    for i in range(N):
        preds = _preds(i)
        guider.set_state(i, N, torch.tensor(0))
        ours = _run_policy(policy, i, preds)
        theirs = guider.forward(preds["cond"], preds["uncond"]).pred
        if i < kwargs["zero_init_steps"]:
            assert torch.equal(ours, torch.zeros_like(ours))  # (the guider's rescale turns its zeros into NaN)
            continue
        _close(ours, theirs)


@pytest.mark.parametrize("kwargs", [
    dict(scale=5.0, momentum=-0.5, norm_threshold=2.0, eta=0.0),
    dict(scale=7.0, momentum=0.3, norm_threshold=0.0, eta=0.5, rescale=0.3),
    dict(scale=4.0, momentum=None, norm_threshold=15.0, eta=1.0, start=0.2, stop=0.8),
    dict(scale=4.0, momentum=-0.7, norm_threshold=3.0, eta=0.2, norm_dim=-1),
])
def test_apg_matches_guider_over_ten_steps(kwargs):
    policy = g.APG(**kwargs)
    guider = AdaptiveProjectedGuidance(
        guidance_scale=kwargs["scale"], adaptive_projected_guidance_momentum=kwargs["momentum"],
        adaptive_projected_guidance_rescale=kwargs["norm_threshold"], eta=kwargs["eta"],
        guidance_rescale=kwargs.get("rescale", 0.0), start=kwargs.get("start", 0.0), stop=kwargs.get("stop", 1.0),
        adaptive_projected_guidance_norm_dim=kwargs.get("norm_dim"),
    )
    for request in range(2):  # the momentum must restart with each request
        policy.reset(N)
        if kwargs["momentum"] is not None:
            guider.momentum_buffer = MomentumBuffer(kwargs["momentum"])  # what the guider does at step 0
        for i in range(N):
            preds = _preds(i + 50 * request)
            guider.set_state(i, N, torch.tensor(0))
            assert len(policy.active(i)) == guider.num_conditions
            _close(_run_policy(policy, i, preds), _guider_forward(guider, i, preds, ["cond", "uncond"]))
            if kwargs["momentum"] is not None and i >= 2:
                state = policy.state_tensors()["apg.momentum"]
                _close(state, guider.momentum_buffer.running_average)


@pytest.mark.parametrize("klass,guider_class,extra", [
    (g.SkipLayer, SkipLayerGuidance, "skip"),
    (g.PAG, PerturbedAttentionGuidance, "perturbed"),
])
@pytest.mark.parametrize("kwargs", [
    dict(start=0.0, stop=1.0),
    dict(start=0.1, stop=0.6, cfg_start=0.3, cfg_stop=0.9),
    dict(start=0.2, stop=0.8, original_formulation=True, rescale=0.4),
])
def test_perturbed_guidance_matches_guider(klass, guider_class, extra, kwargs):
    policy = klass(4.5, 2.5, [1], **kwargs)
    if guider_class is SkipLayerGuidance:
        guider = SkipLayerGuidance(
            guidance_scale=4.5, skip_layer_guidance_scale=2.5, skip_layer_guidance_layers=[1],
            skip_layer_guidance_start=kwargs["start"], skip_layer_guidance_stop=kwargs["stop"],
            guidance_rescale=kwargs.get("rescale", 0.0),
            use_original_formulation=kwargs.get("original_formulation", False),
            start=kwargs.get("cfg_start", 0.0), stop=kwargs.get("cfg_stop", 1.0),
        )
    else:
        guider = PerturbedAttentionGuidance(
            guidance_scale=4.5, perturbed_guidance_scale=2.5, perturbed_guidance_layers=[1],
            perturbed_guidance_start=kwargs["start"], perturbed_guidance_stop=kwargs["stop"],
            guidance_rescale=kwargs.get("rescale", 0.0),
            use_original_formulation=kwargs.get("original_formulation", False),
            start=kwargs.get("cfg_start", 0.0), stop=kwargs.get("cfg_stop", 1.0),
        )
    policy.reset(N)
    seen = set()
    for i in range(N):
        preds = _preds(i, names=("cond", "uncond", extra))
        guider.set_state(i, N, torch.tensor(0))
        active = policy.active(i)
        seen.add(active)
        cfg_on, pert_on = guider._is_cfg_enabled(), guider._is_slg_enabled()
        assert active == ("cond",) + (("uncond",) if cfg_on else ()) + ((extra,) if pert_on else ()), i
        theirs = guider.forward(preds["cond"], preds["uncond"] if cfg_on else None,
                                preds[extra] if pert_on else None).pred
        _close(_run_policy(policy, i, preds), theirs)
    assert len(seen) > 1 or kwargs["start"] == 0.0


def test_multibranch_matches_ltx2_guider():
    w, s_stg, m, rescale = 3.0, 1.5, 2.0, 0.6
    policy = g.MultiBranch(
        [g.Branch("cond"), g.Branch("uncond", "negative"), g.Branch("stg", perturbation=g.SkipBlocks([1])),
         g.Branch("mod", perturbation=g.ForwardKwargs.of(isolate_modalities=True))],
        [g.Term("uncond", w - 1.0), g.Term("stg", s_stg), g.Term("mod", m - 1.0)],
        rescale=rescale,
    )
    guider = LTX2Guidance(guidance_scale=w, stg_scale=s_stg, modality_scale=m, guidance_rescale=rescale)
    policy.reset(N)
    for i in range(N):
        preds = _preds(i, names=("cond", "uncond", "stg", "mod"))
        guider.set_state(i, N, torch.tensor(0))
        theirs = guider.forward(preds["cond"], preds["uncond"], preds["stg"], preds["mod"]).pred
        assert policy.active(i) == ("cond", "uncond", "stg", "mod")
        _close(_run_policy(policy, i, preds), theirs)


def test_multibranch_per_output_and_windows():
    policy = g.MultiBranch(
        [g.Branch("cond"), g.Branch("uncond", "negative"), g.Branch("stg", perturbation=g.SkipBlocks([0]))],
        [g.Term("uncond", (2.0, 6.0)), g.Term("stg", (1.0, 0.0), start=0.3, stop=0.6)],
        rescale=(0.5, 0.0),
    )
    policy.check_outputs(2)
    with pytest.raises(ValueError, match="per-output"):
        policy.check_outputs(1)
    policy.reset(N)
    assert policy.active(0) == ("cond", "uncond") and policy.active(4) == ("cond", "uncond", "stg")
    video = _preds(4, names=("cond", "uncond", "stg"))
    audio = _preds(5, names=("cond", "uncond", "stg"), shape=(2, 16, 8))
    preds = {n: (video[n], audio[n]) for n in video}
    out = _run_policy(policy, 4, preds)
    for k, (w, s, r, src) in enumerate([(3.0, 1.0, 0.5, video), (7.0, 0.0, 0.0, audio)]):
        guider = LTX2Guidance(guidance_scale=w, stg_scale=s, guidance_rescale=r)
        guider.set_state(4, N, torch.tensor(0))
        _close(out[k], guider.forward(src["cond"], src["uncond"], src["stg"]).pred)


def _reduce_over_ranks(policy, i: int, preds: dict, size: int):
    """reduce_terms on each rank's share of the dispatch plan, summed the way the all-reduce sums them."""
    from pycfg.parallel.dispatch import dispatch_branches

    like = next(iter(preds.values()))
    plan = dispatch_branches(policy.active(i), size)
    every = [policy.reduce_terms({n: preds[n] for n in names}, i, like) for names in plan]
    summed = [sum(ts) for ts in zip(*every)]
    return policy.reduce_finish(summed, i, like)


@pytest.mark.parametrize("make", [
    lambda: g.CFG(4.0, renorm=True), lambda: g.CFG(4.0, rescale=0.7, original_formulation=True),
    lambda: g.SkipLayer(4.0, 2.0, [0], start=0.0, stop=1.0, rescale=0.3),
    lambda: g.PAG(4.0, 2.0, [0], start=0.0, stop=1.0, cfg_start=0.5),
    lambda: g.DynamicCFG(5.0),
    lambda: g.MultiBranch([g.Branch("cond"), g.Branch("uncond", "negative"),
                           g.Branch("p3", perturbation=g.SkipBlocks([0])),
                           g.Branch("p4", perturbation=g.SkipAttention([0]))],
                          [g.Term("uncond", 3.0), g.Term("p3", 0.5, 0.2), g.Term("p4", -0.7)],
                          rescale=0.5, renorm=True),
])
@pytest.mark.parametrize("size", [2, 3])
def test_reduce_terms_match_combine(make, size):
    policy = make()
    policy.set_timesteps([999 - 100 * k for k in range(N)])
    policy.reset(N)
    for i in range(N):
        preds = _preds(i)
        exact = _run_policy(policy, i, preds)
        if len(policy.active(i)) > 1:
            _close(_reduce_over_ranks(policy, i, preds, size), exact, rel=1e-5)


def test_reduce_terms_tuple_outputs():
    policy = g.MultiBranch([g.Branch("cond"), g.Branch("uncond", "negative"),
                            g.Branch("p3", perturbation=g.SkipBlocks([0]))],
                           [g.Term("uncond", (2.0, 5.0)), g.Term("p3", (0.5, 1.0))], rescale=(0.0, 0.7))
    policy.reset(N)
    video = _preds(1, names=("cond", "uncond", "p3"))
    audio = _preds(2, names=("cond", "uncond", "p3"), shape=(2, 5, 3))
    preds = {n: (video[n], audio[n]) for n in video}
    exact = _run_policy(policy, 1, preds)
    reduced = _reduce_over_ranks(policy, 1, preds, 2)
    for a, b in zip(reduced, exact):
        _close(a, b, rel=1e-5)


def test_validation_errors():
    with pytest.raises(ValueError, match="start must not exceed stop"):
        g.CFG(4.0, start=0.6, stop=0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        g.SkipLayer(4.0, 2.0, [1], start=-0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        g.APG(4.0, stop=1.5)
    with pytest.raises(ValueError, match="non-negative"):
        g.SkipLayer(4.0, 2.0, [-1])
    with pytest.raises(ValueError, match="repeat"):
        g.PAG(4.0, 2.0, [1, 1])
    branches = [g.Branch("cond"), g.Branch("uncond", "negative")]
    with pytest.raises(ValueError, match="unknown branch 'stg'"):
        g.MultiBranch(branches, [g.Term("uncond", 2.0), g.Term("stg", 1.0)])
    with pytest.raises(ValueError, match="have no term"):
        g.MultiBranch(branches + [g.Branch("x")], [g.Term("uncond", 2.0)])
    with pytest.raises(ValueError, match="different lengths"):
        g.MultiBranch(branches + [g.Branch("x")], [g.Term("uncond", (2.0, 1.0)), g.Term("x", (1.0, 2.0, 3.0))])
    with pytest.raises(ValueError, match="different lengths"):
        g.MultiBranch(branches, [g.Term("uncond", (2.0, 1.0))], rescale=(0.1, 0.2, 0.3))
    with pytest.raises(ValueError, match="base branch"):
        g.MultiBranch(branches, [g.Term("uncond", 2.0)], base="positive")
    with pytest.raises(ValueError, match="source"):
        g.Branch("x", "image")
    with pytest.raises(KeyError, match="no branch 'nope'"):
        g.CFG(3.0).branch("nope")
    with pytest.raises(ValueError, match="start must not exceed stop"):
        g.MultiBranch(branches, [g.Term("uncond", 2.0, start=0.5, stop=0.2)])


def test_reduce_with_nonlinear_policy_fails_at_compile_time():
    from pycfg.tiny import qwenimage_pipeline

    pipe = qwenimage_pipeline()
    # raised before any process group is needed
    for policy in (g.APG(4.0, momentum=-0.5), g.CFGZeroStar(4.0)):
        with pytest.raises(ValueError, match="exchange='reduce' needs a linear guidance policy"):
            pycfg.compile(pipe, cfg_parallel_size=2, exchange="reduce", guidance=policy)
    with pytest.raises(ValueError, match="out of range"):
        pycfg.compile(pipe, guidance=g.SkipLayer(4.0, 2.0, [2]))
    with pytest.raises(ValueError, match="batch_branches"):
        pycfg.compile(pipe, batch_branches="yes")
