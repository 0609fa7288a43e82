"""Compile-path hardening with real processes (gloo): rank-local rejections are agreed on at once, compile/close
cycles leak nothing, check_finite, and what a call writes to."""

from __future__ import annotations

import pytest
import torch

import pycfg
from pycfg._launch import run_world
from pycfg.tiny import qwenimage_inputs, qwenimage_pipeline

CYCLES = 60


@pytest.fixture(scope="module")
def world():
    import hardening_cases

    return run_world(hardening_cases.compile_path, 2, cycles=CYCLES, timeout=600)


def test_a_call_one_rank_rejects_fails_on_every_rank_at_once_naming_it(world):
    r0, r1 = world[0]["rejections"], world[1]["rejections"]
    # the rank that rejects raises its own (the pipeline's) error; its peer names that rank and the argument
    assert r1["negative_on_rank_1"][0] == "ValueError" and "negative_prompt_embeds" in r1["negative_on_rank_1"][1]
    assert r0["negative_on_rank_1"][0] == "InvalidArgumentError"
    assert "rank 1" in r0["negative_on_rank_1"][1] and "negative_prompt_embeds" in r0["negative_on_rank_1"][1]
    assert r0["steps_on_rank_0"][0] == "ValueError"
    assert r1["steps_on_rank_0"][0] == "InvalidArgumentError" and "num_inference_steps" in r1["steps_on_rank_0"][1]
    assert r0["meta_latents_on_rank_1"][0] == "InvalidArgumentError" and "meta" in r0["meta_latents_on_rank_1"][1]
    for res in (r0, r1):
        for label in ("negative_on_rank_1", "steps_on_rank_0", "meta_latents_on_rank_1"):
            assert res[label][2] < 5.0, (label, res[label])  # not the 60 s collective timeout
        assert res["closed"]
    assert torch.equal(r0["after"], r1["after"])  # the group stayed in step


def test_compile_close_cycles_leave_descriptors_and_threads_flat(world):
    for rank, res in enumerate(world):
        counts = res["cycles"]["counts"]
        print(f"\nrank {rank}: (fds, threads) after cycle 1: {counts[0]}, after cycle {CYCLES}: {counts[-1]}")
        assert counts[-1] == counts[0], counts
        assert res["cycles"]["same"] and res["cycles"]["shared"] and res["cycles"]["still"]
        assert res["cycles"]["owned_after"] == 0


def test_check_finite_and_what_a_call_writes_to():
    torch.set_num_threads(1)
    pipe = qwenimage_pipeline()
    inputs = dict(qwenimage_inputs(), num_inference_steps=2, output_type="latent", true_cfg_scale=4.0)
    nan = {**inputs, "negative_prompt_embeds": torch.full_like(inputs["negative_prompt_embeds"], float("nan"))}
    with pycfg.compile(pipe, check_finite=True) as fast:
        with pytest.raises(ValueError, match="negative_prompt_embeds contains NaN"):
            fast(**nan)
        with pytest.raises(ValueError, match="latents contains NaN"):
            fast(**inputs, latents=torch.full((1, 16, 16), float("inf")))
    with pycfg.compile(pipe) as fast:  # off: no check, NaN runs through as in stock
        assert torch.isnan(fast(**nan).images).all()
        # the caller's generator advances exactly as stock advances it (latents drawn from it), nothing else
        mine, theirs = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        before = {k: v.clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        out = fast(**inputs, generator=mine).images
        ref = pipe(**inputs, generator=theirs).images
        assert torch.equal(out, ref) and torch.equal(mine.get_state(), theirs.get_state())
        assert all(torch.equal(inputs[k], v) for k, v in before.items())
    assert fast.closed
    with pytest.raises(RuntimeError, match="closed"):
        fast(**inputs)
