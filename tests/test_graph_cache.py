"""Captured steps cached across requests (:mod:`pycfg.runtime.graphs`), checked on CPU.

The cached step runners run as plain step functions here (``StepGraphs(capture=False)``): the same runners,
static buffers, cache keys and loading as with CUDA graphs, with the graph record/replay left to the GPU tier
(``test_graphs_gpu.py``). A reused runner must give each request its own result, bit for bit equal to the plain
fused loop, so every value a request brings must reach the step through the static buffers.
"""

import graph_cache_cases
import pytest
import torch

from pycfg._launch import run_world
from pycfg.adapters.base import own_tensor
from pycfg.guidance import CFG, NoGuidance
from pycfg.runtime.graphs import policy_key


def check_results(out: dict) -> None:
    for k, r in enumerate(out["results"]):
        assert torch.equal(r["cached"], r["plain"]), f"request {k}"
        assert r["inputs_untouched"], f"request {k} wrote the caller's tensors"
        assert r["result_untouched"], f"request {k}'s returned latents were overwritten later"
    # different inputs, seeds and scales through the same runner give different images
    first, second, third = (r["cached"] for r in out["results"][:3])
    assert not torch.equal(first, second) and torch.equal(first, third)
    assert out["swapped_equal"]
    assert out["after_swap"]["reused"] == out["stats"]["reused"]  # new weights: a new runner


def test_cached_steps_p1():
    (out,) = run_world(graph_cache_cases.cached_requests, 1, exchange="gather")
    check_results(out)
    stats = out["stats"]
    # requests 1 and 2 reuse request 0's runner; the other three each bring a shape of their own
    assert stats["reused"] == 2 and stats["cached_shapes"] == 4, stats
    # one eager (warm-up) step per new shape, every other step replayed
    total = sum(steps for _, _, steps, _, _ in graph_cache_cases.REQUESTS)
    assert stats["eager_steps"] == 4 and stats["replays"] == total - 4 and stats["captures"] == 4, stats


@pytest.mark.parametrize("exchange", ["gather", "reduce"])
def test_cached_steps_p2(exchange):
    ranks = run_world(graph_cache_cases.cached_requests, 2, exchange=exchange)
    for out in ranks:
        check_results(out)
    for a, b in zip(ranks[0]["results"], ranks[1]["results"]):
        assert torch.equal(a["cached"], b["cached"])
    stats = ranks[0]["stats"]
    if exchange == "gather":
        assert stats["reused"] == 2 and stats["cached_shapes"] == 4, stats
    else:
        # the weighted all-reduce applies the scale as a host number: another scale, another runner
        assert stats["reused"] == 1 and stats["cached_shapes"] == 5, stats


def test_policy_key_leaves_out_device_read_scales():
    assert policy_key(CFG(4.0, renorm=True), "gather", 2) == policy_key(CFG(2.0, renorm=True), "gather", 2)
    assert policy_key(CFG(4.0), "gather", 1) != policy_key(CFG(4.0, renorm=True), "gather", 1)
    assert policy_key(CFG(4.0), "reduce", 2) != policy_key(CFG(2.0), "reduce", 2)
    assert policy_key(CFG(4.0), "reduce", 1) == policy_key(CFG(2.0), "reduce", 1)
    assert policy_key(NoGuidance(), "gather", 2) != policy_key(CFG(4.0), "gather", 2)


def test_own_tensor_copies_what_shares_the_callers_memory():
    mine, theirs = torch.zeros(3), torch.ones(4, 3)
    assert own_tensor(mine, {"a": theirs, "b": 1}) is mine
    view = theirs[1:]
    copied = own_tensor(view, {"a": theirs})
    assert copied is not view and torch.equal(copied, view)
    assert own_tensor(view, [mine, theirs]) is not view
    assert own_tensor(None, theirs) is None


@pytest.mark.parametrize("family", ["sd3", "wan"])
def test_cached_steps_other_families(family):
    (out,) = run_world(graph_cache_cases.family_requests, 1, family=family)
    assert out["stats"]["last_fallback"] is None and out["stats"]["reused"] == 1, out["stats"]
    for plain, cached in out["pairs"]:
        assert torch.equal(cached, plain)
    assert not torch.equal(out["pairs"][0][1], out["pairs"][1][1])


def test_graph_key_keeps_what_a_capture_bakes_in():
    from pycfg.adapters.qwenimage import QwenImageAdapter
    from pycfg.api import _graph_key

    base = dict(prompt="a cat", true_cfg_scale=4.0, height=64, attention_kwargs={"scale": 0.5},
                prompt_embeds=torch.zeros(1, 7, 8))

    def key(**changes):
        return _graph_key({**base, **changes}, QwenImageAdapter)

    # values that reach the steps through the static buffers (or not at all) share a key
    assert key(prompt="a dog", true_cfg_scale=2.0, prompt_embeds=torch.ones(1, 7, 8), output_type="np") == key(
        output_type="np")
    assert key(height=128) != key()
    assert key(attention_kwargs={"scale": 0.7}) != key()  # a host number inside the forward
    assert key(prompt_embeds=torch.zeros(1, 9, 8)) != key()  # another text length, other shapes
