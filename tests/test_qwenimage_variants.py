"""The Qwen-Image variants (edit, edit-plus, img2img, inpaint, edit-inpaint, layered, 2.1) against their stock
pipelines, with real gloo processes.

``gather`` is bit-identical to stock at cfg_parallel_size 1, 2 and 3 with the input image given as a PIL image:
every output type at size 1, the denoised latents at sizes 2 and 3 (Layered: "pt"; the decode after the loop is
the same code on identical latents, and the consistency check holds every rank to them). Two worlds: one of two
ranks computes the stock outputs and the size-1 cases shared out over its ranks, then the size-2 cases; one of
three ranks runs the size-3 cases. At size 2 the features ride along: ``reduce``, the fused update, batched
branches and cached step runners (within fp32 rounding of stock), guidance policies (equal across sizes).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import qwenimage_variants_cases as cases
import torch
from helpers import ForwardCounter, rel_err

import pycfg
from pycfg._launch import run_world
from pycfg.tiny import QWENIMAGE_VARIANTS, qwenimage_variant_inputs, qwenimage_variant_pipeline

VARIANTS = list(QWENIMAGE_VARIANTS)
#: stock Layered cannot return latents (an UnboundLocalError in diffusers 0.42.1)
OUTPUT_TYPES = {v: ("pil", "np", "pt") if v == "layered" else ("pil", "np", "pt", "latent") for v in VARIANTS}
LATENTS = {v: "pt" if v == "layered" else "latent" for v in VARIANTS}
FEATURE_VARIANTS = ("img2img", "inpaint", "edit")  # small images, and the three ways an image enters
#: guidance policies (by name in ``cases.POLICIES``), checked equal across sizes and different from stock's CFG
POLICY_CASES = [dict(variant=v, call=dict(output_type="latent"), compile=dict(guidance=p))
                for v, p in (("img2img", "cfg_zero_star"), ("inpaint", "apg"), ("edit", "cfg_zero_star"),
                             ("img2img", "pag"), ("inpaint", "skip_layer"))]
#: the edit pipelines with prompt strings, which their Qwen-VL encoder reads with the input image
TEXT_CASES = [dict(variant=v, call=dict(output_type="latent"), compile={}, inputs=dict(text=True))
              for v in ("edit", "edit_plus")]
#: the requests through one cached step runner: (seed, arguments of ``qwenimage_variant_inputs``)
STEP_GRAPH_REQUESTS = [(0, {}), (1, {}), (0, {}), (0, dict(portrait=True))]
#: both branches' texts of one length, so batch_branches=True really runs one batched forward
SAME_LENGTH = dict(pos_len=7, neg_len=7)


def case(variant: str, output_type: str, **compile_options) -> dict:
    return dict(variant=variant, call=dict(output_type=output_type), compile=compile_options)


def feature_cases() -> dict[str, list[dict]]:
    return {
        "reduce": [case(v, "latent", exchange="reduce") for v in FEATURE_VARIANTS],
        "fused": [case(v, "latent", fused=True) for v in FEATURE_VARIANTS],
        "batched": [dict(case(v, "latent", batch_branches=True), inputs=SAME_LENGTH) for v in FEATURE_VARIANTS],
        # one cached step runner across requests with other input images, texts and seeds (fused, as graphs
        # run), then an input image on its side (the same shapes, another token grid): the plain fused loop's
        # results for the second and the last beside them
        "step_graphs": [dict(case(v, "latent", fused=True), step_graphs=STEP_GRAPH_REQUESTS)
                        for v in ("inpaint", "edit")],
        "fused_seed1": [dict(case(v, "latent", fused=True), seed=1) for v in ("inpaint", "edit")],
        "fused_portrait": [dict(case("edit", "latent", fused=True), inputs=dict(portrait=True))],
    }


def size_cases(world: int) -> list[dict]:
    if world == 1:
        # inpainting inside a crop around the mask, pasted back over the input image
        crop = dict(variant="inpaint", compile={},
                    call=dict(output_type="pil", padding_mask_crop=4, height=40, width=40))
        return [case(v, t) for v in VARIANTS for t in OUTPUT_TYPES[v]] + [crop] + TEXT_CASES + POLICY_CASES
    exact = [case(v, LATENTS[v], check_consistency=True) for v in VARIANTS] + TEXT_CASES
    if world == 3:
        return exact + POLICY_CASES
    return exact + POLICY_CASES + [c for group in feature_cases().values() for c in group]


def is_exact(c: dict) -> bool:
    return set(c["compile"]) <= {"check_consistency"}


def stock_key(c: dict, **call) -> tuple:
    return (c["variant"], tuple(sorted({**c["call"], **call}.items())), c.get("seed", 0),
            tuple(sorted(c.get("inputs", {}).items())))


def stock_cases() -> list[dict]:
    """Every stock run a case is compared with, and each variant with guidance off."""
    wanted = {stock_key(c): c for world in (1, 2, 3) for c in size_cases(world) if "guidance" not in c["compile"]}
    for c in guided_cases():
        off = dict(c, call=dict(c["call"], true_cfg_scale=1.0))
        wanted[stock_key(off)] = off
    return list(wanted.values())


def guided_cases() -> list[dict]:
    """One case per variant (and per text path) whose stock output must change with guidance off."""
    return [case(v, LATENTS[v]) for v in VARIANTS] + TEXT_CASES


@pytest.fixture(scope="module")
def runs() -> dict:
    """Both worlds, run once: stock outputs by key, and each size's outputs (per rank for sizes 2 and 3)."""
    stock, size_1, size_2 = stock_cases(), size_cases(1), size_cases(2)
    pair = run_world(cases.stock_and_sizes_1_2, 2, stock=stock, size_1=size_1, size_2=size_2, timeout=900)
    triple = run_world(cases.run_cases, 3, cases=size_cases(3), timeout=900)
    merged = {k: out for rank in pair for k, out in rank["stock"].items()}
    size_1_out = {k: out for rank in pair for k, out in rank["size_1"].items()}
    return {"stock": {stock_key(stock[k]): merged[k] for k in range(len(stock))},
            1: [[size_1_out[k] for k in range(len(size_1))]], 2: [rank["size_2"] for rank in pair], 3: triple}


def test_guidance_changes_the_stock_output(runs):
    """Else parity with stock passes vacuously (Qwen's template cuts can leave prompt == negative)."""
    stock = runs["stock"]
    for c in guided_cases():
        assert not cases.same(stock[stock_key(c)], stock[stock_key(c, true_cfg_scale=1.0)]), c


@pytest.mark.parametrize("world", [1, 2, 3])
def test_gather_is_stock_bit_for_bit(world, runs):
    for rank, outputs in enumerate(runs[world]):
        for c, out in zip(size_cases(world), outputs):
            if is_exact(c):
                assert cases.same(out, runs["stock"][stock_key(c)]), (world, rank, c)


def test_policies_equal_across_sizes(runs):
    for world in (2, 3):
        for rank, outputs in enumerate(runs[world]):
            got = [out for c, out in zip(size_cases(world), outputs) if c in POLICY_CASES]
            for c, one, out in zip(POLICY_CASES, [o for c, o in zip(size_cases(1), runs[1][0]) if c in POLICY_CASES],
                                   got):
                assert torch.equal(out, one), (world, rank, c)
                assert not torch.equal(one, runs["stock"][stock_key(c)]), f"{c}: the policy changed nothing"


def test_features_at_size_2(runs):
    by_case = {repr(c): outs for c, *outs in zip(size_cases(2), *runs[2])}
    groups, stock = feature_cases(), runs["stock"]
    for name in ("reduce", "fused", "batched"):
        for c in groups[name]:
            rank0, rank1 = by_case[repr(c)]
            assert torch.equal(rank0, rank1), c  # every rank holds the same result
            assert rel_err(rank0, stock[stock_key(c)]) < 1e-5, (c, rel_err(rank0, stock[stock_key(c)]))
    for c, plain in zip(groups["step_graphs"], groups["fused_seed1"]):
        for out in by_case[repr(c)]:
            first, second, third, fourth = out["results"]
            assert torch.equal(first, third) and not torch.equal(first, second), c
            assert torch.equal(second, by_case[repr(plain)][0]), c
            assert rel_err(first, stock[stock_key(c)]) < 1e-5, c
            if c["variant"] == "edit":  # another token grid: a runner of its own, the plain loop's result
                assert torch.equal(fourth, by_case[repr(groups["fused_portrait"][0])][0]), c
                assert out["stats"]["reused"] == 2 and out["stats"]["cached_shapes"] == 2, out["stats"]
            else:
                assert out["stats"]["reused"] == 3, out["stats"]


def test_engine_takes_pil_images(runs):
    """An input image and a mask, both PIL images, travel to the workers."""
    variant = "inpaint"
    inputs = dict(qwenimage_variant_inputs(variant), output_type="np")
    with pycfg.Engine(functools.partial(qwenimage_variant_pipeline, variant), cfg_parallel_size=2) as engine:
        got = cases.images(engine.generate(**inputs, generator=torch.Generator().manual_seed(0)))
    assert cases.same(got, runs["stock"][stock_key(case(variant, "np"))])


def test_bad_input_fails_before_any_model_runs():
    layered, edit_plus, edit = (qwenimage_variant_pipeline(v) for v in ("layered", "edit_plus", "edit"))
    counters = [ForwardCounter(module) for pipe in (layered, edit_plus, edit)
                for module in (pipe.transformer, pipe.vae.encoder)]
    inputs = qwenimage_variant_inputs("layered")
    with pytest.raises(ValueError, match="output_type must be 'pil', 'np' or 'pt'"):
        pycfg.compile(layered)(**inputs, output_type="latent")
    with pytest.raises(ValueError, match="resolution must be one of"):
        pycfg.compile(layered)(**inputs, resolution=512)
    inputs = qwenimage_variant_inputs("edit_plus")
    two = {k: torch.cat([v, v]) for k, v in inputs.items() if k.startswith(("prompt", "negative"))}
    with pytest.raises(ValueError, match="batch size 1"):
        pycfg.compile(edit_plus)(**{**inputs, **two})
    image = np.zeros((48, 64, 3), dtype=np.uint8)
    with pytest.raises(TypeError, match="image must be a PIL image"):
        pycfg.compile(edit)(**{**qwenimage_variant_inputs("edit"), "image": image})
    assert all(counter.calls == 0 for counter in counters)
