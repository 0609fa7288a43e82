"""Core runtime on the tiny Qwen-Image pipeline: real processes, real gloo collectives, no mocks.

Each world is spawned once per module (process start and imports dominate on a small machine) and runs every
scenario; the tests below assert on what each rank returned.
"""

from __future__ import annotations

import core_cases
import numpy as np
import pytest
import torch

import pycfg
from pycfg._launch import run_world
from pycfg.tiny import qwenimage_inputs, qwenimage_pipeline

STEPS = (4, 8, 20)
SCHEDULERS = ("euler", "unipc")


@pytest.fixture(scope="module")
def world2():
    return run_world(core_cases.parity, 2, size=2, schedulers=SCHEDULERS, steps=STEPS, exchange_check=True)


@pytest.fixture(scope="module")
def world3():
    return run_world(core_cases.parity, 3, size=3, schedulers=SCHEDULERS, steps=STEPS)


@pytest.fixture(scope="module")
def variants():
    return run_world(core_cases.variants, 2)


@pytest.mark.parametrize("sched", SCHEDULERS)
@pytest.mark.parametrize("steps", STEPS)
def test_p1_bit_identical_to_stock(sched, steps):
    torch.set_num_threads(1)
    pipe = qwenimage_pipeline(scheduler=core_cases.make_scheduler(sched))
    inputs = qwenimage_inputs()
    stock = core_cases.call(pipe, inputs, steps, true_cfg_scale=4.0)
    fast = core_cases.call(pycfg.compile(pipe), inputs, steps, true_cfg_scale=4.0)
    assert torch.equal(stock, fast)


@pytest.mark.parametrize("sched", SCHEDULERS)
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("size", (2, 3))
def test_parallel_bit_identical_to_stock(world2, world3, size, sched, steps):
    ranks = world2 if size == 2 else world3
    stock = ranks[0][("stock", sched, steps)]
    for rank, res in enumerate(ranks):
        assert torch.equal(res[("pycfg", sched, steps)], stock), f"rank {rank} differs from stock"


@pytest.mark.parametrize("sched", SCHEDULERS)
def test_reduce_close_to_gather(world2, sched):
    for res in world2:
        gather, reduce = world2[0][("pycfg", sched, 8)], res[("reduce", sched, 8)]
        rel = ((reduce - gather).norm() / gather.norm()).item()
        assert rel <= 1e-5, rel
    assert torch.equal(world2[0][("reduce", sched, 8)], world2[1][("reduce", sched, 8)])


VARIANTS = ("string_prompts", "batch2", "images_per_prompt", "guidance_off_scale", "guidance_off_no_negative",
            "custom_sigmas", "padded_mask", "user_latents", "callback", "output_np", "output_pt", "output_pil")


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_matches_stock_on_every_rank(variants, name):
    stock = variants[0][name]["stock"]
    for rank, res in enumerate(variants):
        got = res[name]["pycfg"]
        if isinstance(stock, list):
            assert all(np.array_equal(a, b) for a, b in zip(got, stock)), f"rank {rank}"
        elif isinstance(stock, np.ndarray):
            assert np.array_equal(got, stock), f"rank {rank}"
        else:
            assert torch.equal(got, stock), f"rank {rank}"


def test_string_prompts_through_encode_prompt_p1():
    torch.set_num_threads(1)
    pipe = qwenimage_pipeline(text_encoder=True)
    request = dict(prompt="a lighthouse at dusk", negative_prompt="blurry, low quality", height=32, width=32,
                   true_cfg_scale=4.0, num_images_per_prompt=2)
    stock = core_cases.call(pipe, request, 4)
    assert torch.equal(core_cases.call(pycfg.compile(pipe), request, 4), stock)


def test_callbacks_run_on_every_rank_with_same_arguments(variants):
    seen0, seen1 = variants[0]["callback_seen"], variants[1]["callback_seen"]
    assert [s[0] for s in seen0] == [0, 1, 2, 3]
    assert seen0 == seen1


def test_caller_objects_unchanged(variants):
    for res in variants:
        assert res["caller_unchanged"]
        assert res["scheduler_unchanged"]
        assert res["tuple_output"] == "tuple"


def test_bad_input_raises_clearly(variants):
    for res in variants:
        errors = res["errors"]
        assert errors["size_too_large"][0] == "ValueError"
        assert "larger than the world size 2" in errors["size_too_large"][1]
        assert errors["exchange"][0] == "ValueError" and "'gather', 'reduce'" in errors["exchange"][1]
        assert errors["size_zero"][0] == "ValueError" and "cfg_parallel_size" in errors["size_zero"][1]
        assert errors["unknown_argument"][0] == "TypeError" and "colour" in errors["unknown_argument"][1]
        assert errors["pipeline_check_inputs"][0] == "ValueError"
        assert "max_sequence_length" in errors["pipeline_check_inputs"][1]
        assert errors["mismatched_steps"][0] == "ArgumentMismatchError", errors["mismatched_steps"]
        assert "num_inference_steps" in errors["mismatched_steps"][1]
        assert errors["mismatched_seed"][0] == "ArgumentMismatchError" and "generator" in errors["mismatched_seed"][1]


def test_consistency_check_names_step_and_tensor(variants):
    for res in variants:
        kind, message = res["drift"]
        assert kind == "ConsistencyError"
        assert "after step 2" in message and "`latents`" in message
    # the group is still usable after every error above, and still exact
    assert torch.equal(variants[0]["after_errors"], variants[1]["after_errors"])
    assert variants[0]["describe"]["cfg_parallel_size"] == 2


def test_world_of_four_forms_two_groups():
    ranks = run_world(core_cases.groups_of_two, 4)
    assert [r["group_rank"] for r in ranks] == [0, 1, 0, 1]
    for first in (0, 2):
        for r in (first, first + 1):
            assert torch.equal(ranks[r]["pycfg"], ranks[first]["stock"])
    assert not torch.equal(ranks[0]["stock"], ranks[2]["stock"])


def test_size_must_divide_world():
    results = run_world(core_cases.not_dividing, 3)
    for kind, message in results:
        assert kind == "ValueError" and "must divide the world size 3" in message


@pytest.mark.parametrize("mode", ("kill", "raise"))
def test_failed_peer_makes_others_raise_within_timeout(mode):
    timeout = 5.0
    results = run_world(core_cases.failing_peer, 2, mode=mode, collective_timeout=timeout, raise_errors=False)
    rank0 = results[0]
    assert rank0["error"] is not None and rank0["error"][0] == "RankFailureError", rank0
    assert rank0["elapsed"] < timeout + 10.0, rank0["elapsed"]


def test_compile_rejects_bad_arguments_without_a_world():
    pipe = qwenimage_pipeline()
    with pytest.raises(ValueError, match="cfg_parallel_size must be an integer >= 1"):
        pycfg.compile(pipe, cfg_parallel_size=0)
    with pytest.raises(ValueError, match="cfg_parallel_size must be an integer >= 1"):
        pycfg.compile(pipe, cfg_parallel_size="2")
    with pytest.raises(ValueError, match="exchange must be one of 'gather', 'reduce'"):
        pycfg.compile(pipe, exchange="allreduce")
    with pytest.raises(RuntimeError, match="torchrun --nproc-per-node 2"):
        pycfg.compile(pipe, cfg_parallel_size=2)
    with pytest.raises(TypeError, match="supported pipelines: .*QwenImagePipeline"):
        pycfg.compile(object())


def test_progress_bar_honours_pipeline_config(capsys):
    pipe = qwenimage_pipeline()
    pipe.set_progress_bar_config(desc="denoising-check", disable=False)
    core_cases.call(pycfg.compile(pipe), qwenimage_inputs(), 3, true_cfg_scale=4.0)
    err = capsys.readouterr().err
    assert "denoising-check" in err and "3/3" in err
