"""The Qwen-Image variants (edit, edit-plus, img2img, inpaint, edit-inpaint, layered, 2.1) against their stock
pipelines, with real gloo processes.

``gather`` is bit-identical to stock at cfg_parallel_size 1, 2 and 3, with the input image given as a PIL image
and every output type. One world per size runs every case of that size; the stock outputs are computed once,
here, with one thread (as each rank runs). At size 2 the features ride along: ``reduce``, the fused update,
batched branches and cached step runners (within fp32 rounding of stock), guidance policies (equal across
sizes), the consistency check (on every exact case).
"""

from __future__ import annotations

import functools

import pytest
import qwenimage_variants_cases as cases
import torch
from helpers import rel_err

import pycfg
from pycfg._launch import run_world
from pycfg.tiny import QWENIMAGE_VARIANTS, qwenimage_variant_inputs, qwenimage_variant_pipeline

VARIANTS = list(QWENIMAGE_VARIANTS)
#: stock Layered cannot return latents (an UnboundLocalError in diffusers 0.42.1)
OUTPUT_TYPES = {v: ("pil", "np", "pt") if v == "layered" else ("pil", "np", "pt", "latent") for v in VARIANTS}
FEATURE_VARIANTS = ("img2img", "inpaint", "edit")  # small images, the three ways an image enters
#: guidance policies (by name in ``cases.POLICIES``), checked equal across sizes and different from stock's CFG
POLICY_CASES = [dict(variant=v, call=dict(output_type="latent"), compile=dict(guidance=p))
                for v, p in (("img2img", "cfg_zero_star"), ("inpaint", "apg"), ("edit", "cfg_zero_star"))]
# the same texts' lengths for both branches, so batch_branches=True really runs one batched forward
SAME_LENGTH = dict(pos_len=7, neg_len=7)


def case(variant: str, output_type: str, **compile_options) -> dict:
    return dict(variant=variant, call=dict(output_type=output_type), compile=compile_options)


def feature_cases() -> dict[str, list[dict]]:
    latent = "latent"
    return {
        "reduce": [case(v, latent, exchange="reduce") for v in FEATURE_VARIANTS],
        "fused": [case(v, latent, fused=True) for v in FEATURE_VARIANTS],
        "batched": [dict(case(v, latent, batch_branches=True), inputs=SAME_LENGTH) for v in FEATURE_VARIANTS],
        # one cached step runner across requests with other input images, texts and seeds (fused, as graphs
        # run); the plain fused loop's result for seed 1 beside it
        "step_graphs": [dict(case(v, latent, fused=True), step_graphs=[0, 1, 0]) for v in ("inpaint", "edit")],
        "fused_seed1": [dict(case(v, latent, fused=True), seed=1) for v in ("inpaint", "edit")],
    }


def size_cases(world: int) -> list[dict]:
    """Every case one world of ``world`` ranks runs: exactness first, then (at 2) the features."""
    if world != 2:
        return [case(v, "pt") for v in VARIANTS] + POLICY_CASES
    exact = [case(v, t, check_consistency=True) for v in VARIANTS for t in OUTPUT_TYPES[v]]
    return exact + POLICY_CASES + [c for group in feature_cases().values() for c in group]


def stock_key(c: dict, **call) -> tuple:
    return (c["variant"], tuple(sorted({**c["call"], **call}.items())), c.get("seed", 0),
            tuple(sorted(c.get("inputs", {}).items())))


def is_exact(c: dict) -> bool:
    return set(c["compile"]) <= {"check_consistency"}


@pytest.fixture(scope="module")
def stock() -> dict:
    """The stock pipelines' outputs for every case compared with them, and each variant without guidance."""
    torch.set_num_threads(1)
    wanted = {stock_key(c): c for world in (1, 2, 3) for c in size_cases(world) if "guidance" not in c["compile"]}
    for v in VARIANTS:
        wanted[stock_key(case(v, "pt"), true_cfg_scale=1.0)] = dict(case(v, "pt"), call=dict(output_type="pt",
                                                                                          true_cfg_scale=1.0))
    pipes = {v: qwenimage_variant_pipeline(v) for v in VARIANTS}
    return {key: cases.images(pipes[c["variant"]](**cases.call_kwargs(c))) for key, c in wanted.items()}


@pytest.fixture(scope="module")
def worlds() -> dict:
    """Every size's world, run once: each rank's outputs, by size."""
    return {world: run_world(cases.run_cases, world, cases=size_cases(world), timeout=900) for world in (1, 2, 3)}


def test_guidance_changes_the_stock_output(stock):
    """Else parity with stock passes vacuously (Qwen's template cuts can leave prompt == negative)."""
    for v in VARIANTS:
        assert not cases.same(stock[stock_key(case(v, "pt"))], stock[stock_key(case(v, "pt"), true_cfg_scale=1.0)]), v


@pytest.mark.parametrize("world", [1, 2, 3])
def test_gather_is_stock_bit_for_bit(world, worlds, stock):
    for rank, outputs in enumerate(worlds[world]):
        for c, out in zip(size_cases(world), outputs):
            if is_exact(c):
                assert cases.same(out, stock[stock_key(c)]), (world, rank, c)


def test_policies_equal_across_sizes(worlds, stock):
    by_size = {world: [out for c, out in zip(size_cases(world), worlds[world][0]) if c in POLICY_CASES]
               for world in worlds}
    for k, c in enumerate(POLICY_CASES):
        one = by_size[1][k]
        assert torch.equal(by_size[2][k], one) and torch.equal(by_size[3][k], one), c
        assert not torch.equal(one, stock[stock_key(c)]), f"{c}: the policy changed nothing"


def test_features_at_size_2(worlds, stock):
    by_case = {repr(c): outs for c, *outs in zip(size_cases(2), *worlds[2])}
    groups = feature_cases()
    for name in ("reduce", "fused", "batched"):
        for c in groups[name]:
            rank0, rank1 = by_case[repr(c)]
            assert torch.equal(rank0, rank1), c  # every rank holds the same result
            assert rel_err(rank0, stock[stock_key(c)]) < 1e-5, (c, rel_err(rank0, stock[stock_key(c)]))
    for c, plain in zip(groups["step_graphs"], groups["fused_seed1"]):
        for out in by_case[repr(c)]:
            first, second, third = out["results"]
            assert torch.equal(first, third) and not torch.equal(first, second), c
            assert torch.equal(second, by_case[repr(plain)][0]), c
            assert rel_err(first, stock[stock_key(c)]) < 1e-5, c
            assert out["stats"]["reused"] >= 1, out["stats"]


def test_engine_takes_a_pil_input_image(stock):
    variant = "edit"
    inputs = dict(qwenimage_variant_inputs(variant), output_type="np")
    factory = functools.partial(qwenimage_variant_pipeline, variant)
    with pycfg.Engine(factory, cfg_parallel_size=2, timeout=60.0) as engine:
        got = cases.images(engine.generate(**inputs, generator=torch.Generator().manual_seed(0)))
    assert cases.same(got, stock[stock_key(case(variant, "np"))])
