"""Whole-step CUDA graphs and compiled forwards on a GPU (tier ``gpu``; skipped without CUDA).

Graph replays must give the eager fused loop's results, never sync with the host, and be reused by later requests
of the same shape with their own inputs and guidance scale; the compiled + graphed + batched path must stay close
to the stock pipeline.
"""

from __future__ import annotations

import pytest
import torch

import pycfg
from pycfg.runtime.denoise import denoise
from pycfg.tiny import qwenimage_inputs, qwenimage_pipeline

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def run(runner, steps=4, scale=4.0, **inputs):
    return runner(**inputs, true_cfg_scale=scale, num_inference_steps=steps, output_type="latent",
                  generator=torch.Generator("cuda").manual_seed(0)).images


def cuda_inputs(**kw):
    return {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in qwenimage_inputs("tiny", **kw).items()}


@pytest.fixture(scope="module")
def pipe():
    return qwenimage_pipeline("tiny").to("cuda")


def test_graph_replays_match_the_eager_fused_loop(pipe):
    inputs = cuda_inputs()
    eager = run(pycfg.compile(pipe, fused=True, cuda_graphs=False), **inputs)
    graphed = pycfg.compile(pipe, fused=True, cuda_graphs=True)
    first = run(graphed, **inputs)  # step 0 eager (warm-up), then capture and replay
    kept = first.clone()
    stats = graphed.step_graphs.describe()
    assert stats["eager_steps"] == 1 and stats["captures"] == 1 and stats["replays"] == 3, stats
    graphed.step_graphs.sync_debug = "error"  # any host-device sync in a replayed step raises
    second = run(graphed, scale=2.0, **inputs)
    again = run(graphed, **inputs)
    stats = graphed.step_graphs.describe()
    # the later requests replay the first one's graphs, with their own values copied into its buffers
    assert stats["eager_steps"] == 1 and stats["captures"] == 1 and stats["reused"] == 2, stats
    assert stats["replays"] == 3 + 4 + 4, stats
    torch.testing.assert_close(first, eager, rtol=1e-6, atol=1e-6)
    assert torch.equal(first, kept)  # a returned result is never a cached buffer
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    # the scale is read from device memory, so a new guidance scale is honoured by the same graphs
    assert not torch.equal(second, first)
    expected = run(pycfg.compile(pipe, fused=True, cuda_graphs=False), scale=2.0, **inputs)
    torch.testing.assert_close(second, expected, rtol=1e-6, atol=1e-6)


def test_cached_graphs_take_each_requests_inputs(pipe):
    eager = pycfg.compile(pipe, fused=True, cuda_graphs=False)
    graphed = pycfg.compile(pipe, fused=True, cuda_graphs=True)
    for seed in (0, 1, 2):
        inputs = cuda_inputs(seed=seed)
        before = {k: v.clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        out = run(graphed, **inputs)
        torch.testing.assert_close(out, run(eager, **inputs), rtol=1e-6, atol=1e-6)
        assert all(torch.equal(inputs[k], v) for k, v in before.items())  # the caller's tensors are not written
    stats = graphed.step_graphs.describe()
    assert stats["captures"] == 1 and stats["reused"] == 2 and stats["cached_shapes"] == 1, stats
    run(graphed, **cuda_inputs(pos_len=9))  # another text length: its own graphs
    assert graphed.step_graphs.describe()["cached_shapes"] == 2


def test_eager_fused_loop_has_no_host_sync(pipe):
    inputs = cuda_inputs()
    fast = pycfg.compile(pipe, fused=True, cuda_graphs=False)
    run(fast, **inputs)  # lazy device caches (RoPE tables, kernels) fill here
    args = fast.adapter.check({**inputs, "true_cfg_scale": 4.0, "num_inference_steps": 4,
                               "output_type": "latent", "generator": torch.Generator("cuda").manual_seed(0)})
    job = fast.adapter.prepare(args, None)
    job.update.ready(job.latents)  # the per-request table upload is setup, not a step
    torch.cuda.set_sync_debug_mode("error")
    try:
        denoise(job, fast.comm)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_compiled_graphed_batched_close_to_stock():
    torch._dynamo.reset()
    pipe = qwenimage_pipeline("tiny").to("cuda")
    inputs = cuda_inputs(pos_len=6, neg_len=6)
    stock = run(pipe, **inputs)
    fast = pycfg.compile(pipe, compile_transformer="regional", batch_branches=True)
    assert fast.describe()["cuda_graphs"] is not False
    fast.warmup(**inputs, true_cfg_scale=4.0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = run(fast, **inputs)
        run(fast, steps=5, scale=3.0, **inputs)
    assert fast.step_graphs.describe()["replays"] > 0
    err = ((out - stock).abs().max() / stock.abs().max()).item()
    assert err < 1e-3, err  # fp32 on GPU: compiled kernels and the fused fp32 update vs stock's step()
