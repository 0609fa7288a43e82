"""LTX2Pipeline through pycfg: video + audio predictions, up to four branches, one collective per step.

cfg_parallel_size 1 runs in this process next to the stock pipeline; each larger group is one spawned gloo world
that runs every scenario (see ltx2_cases.py) with per-step rank-consistency checks.
"""

from __future__ import annotations

import ltx2_cases as cases
import pytest
import torch
from ltx2_cases import SCENARIOS, STEPS

import pycfg
from pycfg._launch import run_world
from pycfg.parallel.dispatch import dispatch_branches
from pycfg.tiny import ltx2_inputs, ltx2_pipeline

SIZES = (2, 3, 4)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def p1():
    torch.set_num_threads(1)
    pipe = ltx2_pipeline()
    counter = cases.ForwardCounter(pipe.transformer)
    fast = pycfg.compile(pipe)
    out = {}
    for name in SCENARIOS:
        out[("pycfg", name)] = cases.measured(fast, counter, name)
        out[("stock", name)] = cases.call(pipe, name)
    out["decoded"] = cases.call(fast, "four", output_type="pt")
    out["decoded_stock"] = cases.call(pipe, "four", output_type="pt")
    out["callback"] = cases.call(fast, "four", callback_on_step_end=cases.nudge)
    out["callback_stock"] = cases.call(pipe, "four", callback_on_step_end=cases.nudge)
    out["user_policy"] = cases.measured(fast, counter, "two", guidance=cases.user_policy())
    batched = pycfg.compile(pipe, batch_branches=True)
    out["batched"] = cases.measured(batched, counter, "four")
    return out


@pytest.fixture(scope="module")
def worlds():
    return {
        2: run_world(cases.world, 2, decoded=True, reduce=True),
        3: run_world(cases.world, 3),
        4: run_world(cases.world, 4, reduce=True),
    }


def test_branches_follow_the_stock_switches(worlds):
    plans = worlds[2][0]["plans"]
    assert plans == {"four": ("cond", "uncond", "stg", "modality"), "three": ("cond", "uncond", "stg"),
                     "two": ("cond", "uncond"), "no_cfg": ("cond", "stg", "modality")}


@pytest.mark.parametrize("name", SCENARIOS)
def test_p1_matches_stock(p1, name):
    got, stock = p1[("pycfg", name)], p1[("stock", name)]
    for k, output in enumerate(("video", "audio")):
        if name == "no_cfg":  # stock runs every branch as its own batch-1 forward here too
            assert torch.equal(got[output], stock[k]), output
        else:  # stock batches cond with uncond
            assert rel(got[output], stock[k]) <= 1e-5, output


def test_p1_decoded_video_and_audio_match_stock(p1):
    (video, audio), (video_stock, audio_stock) = p1["decoded"], p1["decoded_stock"]
    assert video.shape == video_stock.shape and audio.shape == audio_stock.shape
    assert rel(video, video_stock) <= 1e-5 and rel(audio, audio_stock) <= 1e-5


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", SCENARIOS)
def test_parallel_bit_identical_to_p1(p1, worlds, size, name):
    want = p1[("pycfg", name)]
    for rank, res in enumerate(worlds[size]):
        got = res[("gather", name)]
        assert torch.equal(got["video"], want["video"]), f"rank {rank}: video"
        assert torch.equal(got["audio"], want["audio"]), f"rank {rank}: audio"


def test_decoded_outputs_identical_across_sizes(p1, worlds):
    video, audio = p1["decoded"]
    for rank, res in enumerate(worlds[2]):
        assert torch.equal(res["decoded"][0], video) and torch.equal(res["decoded"][1], audio), f"rank {rank}"


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", SCENARIOS)
def test_one_collective_per_step(worlds, size, name):
    for rank, res in enumerate(worlds[size]):
        assert res[("gather", name)]["collectives"] == STEPS, f"rank {rank}"


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", SCENARIOS)
def test_each_rank_runs_only_its_branches(p1, worlds, size, name):
    branches = worlds[size][0]["plans"][name]
    plan = dispatch_branches(branches, size)
    assert p1[("pycfg", name)]["forwards"] == STEPS * len(branches)
    for rank, res in enumerate(worlds[size]):
        assert res[("gather", name)]["forwards"] == STEPS * len(plan[rank]), f"rank {rank}"


def test_idle_ranks_run_no_forward(worlds):
    # STG and modality guidance off on four ranks: two ranks hold no branch and run no (dummy) forward
    assert [res[("gather", "two")]["forwards"] for res in worlds[4]] == [STEPS, STEPS, 0, 0]
    # four branches on three ranks: rank 0 runs cond and modality isolation
    assert [res[("gather", "four")]["forwards"] for res in worlds[3]] == [2 * STEPS, STEPS, STEPS]


@pytest.mark.parametrize("size", (2, 4))
@pytest.mark.parametrize("name", ("four", "two"))
def test_reduce_exchange_with_tuple_outputs(p1, worlds, size, name):
    # one fp32 all-reduce carries both outputs' weighted sums and the cond's per-sample stds for the rescale
    want = p1[("pycfg", name)]
    ranks = worlds[size]
    for rank, res in enumerate(ranks):
        got = res[("reduce", name)]
        assert got["collectives"] == STEPS, f"rank {rank}"
        assert rel(got["video"], want["video"]) <= 1e-5 and rel(got["audio"], want["audio"]) <= 1e-5
        assert torch.equal(got["video"], ranks[0][("reduce", name)]["video"])
        assert torch.equal(got["audio"], ranks[0][("reduce", name)]["audio"])


@pytest.mark.parametrize("size", SIZES)
def test_callback_on_every_rank(p1, worlds, size):
    video, audio = p1["callback"]
    assert rel(video, p1["callback_stock"][0]) <= 1e-5 and rel(audio, p1["callback_stock"][1]) <= 1e-5
    assert not torch.equal(video, p1[("pycfg", "four")]["video"])
    for rank, res in enumerate(worlds[size]):
        assert torch.equal(res["callback"][0], video) and torch.equal(res["callback"][1], audio), f"rank {rank}"


def test_batched_branches_close_to_stock(p1):
    got, stock = p1["batched"], p1[("stock", "four")]
    # cond and uncond share one forward; STG and modality isolation each need their own
    assert got["forwards"] == STEPS * 3
    assert rel(got["video"], stock[0]) <= 1e-5 and rel(got["audio"], stock[1]) <= 1e-5


def test_audio_scales_default_to_video_scales():
    from pycfg.adapters.ltx2 import LTX2Adapter

    adapter = LTX2Adapter(ltx2_pipeline())
    args = adapter.check(dict(ltx2_inputs(), guidance_scale=2.0, audio_guidance_scale=None, stg_scale=0.5,
                              audio_stg_scale=None, modality_scale=1.5, audio_modality_scale=None,
                              guidance_rescale=0.4, audio_guidance_rescale=None, spatio_temporal_guidance_blocks=[0]))
    policy = adapter.default_policy(args)
    assert [t.scale for t in policy.terms] == [(1.0, 1.0), (0.5, 0.5), (0.5, 0.5)]
    assert policy.rescale == (0.4, 0.4)
    # audio guidance alone still runs the uncond forward, with a neutral video delta
    args = adapter.check(dict(ltx2_inputs(), guidance_scale=1.0, audio_guidance_scale=4.0, stg_scale=0.0,
                              audio_stg_scale=0.0, modality_scale=1.0, audio_modality_scale=1.0,
                              spatio_temporal_guidance_blocks=None))
    policy = adapter.default_policy(args)
    assert policy.branches == ("cond", "uncond") and policy.terms[0].scale == (0.0, 3.0)


def test_stg_without_blocks_is_rejected_by_the_pipeline_check():
    fast = pycfg.compile(ltx2_pipeline())
    with pytest.raises(ValueError, match="no STG blocks"):
        fast(**ltx2_inputs(), stg_scale=1.0, spatio_temporal_guidance_blocks=None, num_inference_steps=2)


@pytest.mark.parametrize("size", SIZES)
def test_caller_policy_with_block_skipping(p1, worlds, size):
    want = p1["user_policy"]
    assert want["forwards"] == STEPS * 3
    assert rel(want["video"], p1[("pycfg", "two")]["video"]) > 1e-3
    for rank, res in enumerate(worlds[size]):
        got = res["user_policy"]
        assert torch.equal(got["video"], want["video"]) and torch.equal(got["audio"], want["audio"]), f"rank {rank}"
        assert got["collectives"] == STEPS


def test_policy_with_wrong_output_count_is_rejected_at_compile():
    from pycfg.guidance import Branch, MultiBranch, Term

    policy = MultiBranch([Branch("cond"), Branch("uncond", "negative")], [Term("uncond", (2.0, 4.0, 1.0))])
    with pytest.raises(ValueError, match="3 entries but the model predicts 2"):
        pycfg.compile(ltx2_pipeline(), guidance=policy)
