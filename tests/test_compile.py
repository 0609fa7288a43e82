"""Compiled forwards, text-length buckets and the batched-CFG choice on CPU (inductor's CPU backend).

Compiling is slow on a small machine: one tiny pipeline, one text length, few steps, regional compilation
(one block's code serves both blocks).
"""

from __future__ import annotations

import pytest
import torch
from helpers import ForwardCounter, rel_err

import pycfg
from pycfg.tiny import qwenimage_inputs, qwenimage_pipeline


def run(runner, steps=2, scale=4.0, **inputs):
    return runner(**inputs, true_cfg_scale=scale, num_inference_steps=steps, output_type="latent",
                  generator=torch.Generator().manual_seed(0)).images


def test_options_are_checked():
    pipe = qwenimage_pipeline("tiny")
    with pytest.raises(ValueError, match="compile_transformer"):
        pycfg.compile(pipe, compile_transformer="everything")
    with pytest.raises(ValueError, match="reduce-overhead"):
        pycfg.compile(pipe, compile_transformer=True, compile_mode="reduce-overhead", cuda_graphs=True)
    with pytest.raises(ValueError, match="CUDA"):
        pycfg.compile(pipe, cuda_graphs=True)
    with pytest.raises(ValueError, match="text_bucket"):
        pycfg.compile(pipe, text_bucket=0)
    with pytest.raises(ValueError, match="batch_branches"):
        pycfg.compile(pipe, batch_branches="sometimes")
    d = pycfg.compile(pipe).describe()
    assert d["compile_transformer"] is None and d["cuda_graphs"] is False and d["batch_branches"] is False


def test_text_buckets_do_not_change_the_output():
    pipe = qwenimage_pipeline("tiny")
    inputs = qwenimage_inputs("tiny", pos_len=7, neg_len=5)
    exact = run(pycfg.compile(pipe), **inputs)
    bucketed = run(pycfg.compile(pipe, text_bucket=8), **inputs)
    assert rel_err(bucketed, exact) < 1e-5
    # padded to the same length, the two texts share one batched forward per step
    counter = ForwardCounter(pipe.transformer)
    batched = run(pycfg.compile(pipe, text_bucket=8, batch_branches=True), steps=3, **inputs)
    assert counter.calls == 3
    assert rel_err(batched, run(pycfg.compile(pipe), steps=3, **inputs)) < 1e-5


def test_auto_batching_is_measured_once_per_shape():
    pipe = qwenimage_pipeline("tiny")
    inputs = qwenimage_inputs("tiny", pos_len=6, neg_len=6)
    fast = pycfg.compile(pipe, batch_branches="auto")
    out = run(fast, **inputs)
    run(fast, scale=3.0, **inputs)  # a new scale is the same shape: no second measurement
    choices = fast.describe()["batch_choices"]
    assert len(choices) == 1
    (choice,) = choices.values()
    assert choice["why"] == "measured" and choice["separate_s"] > 0 and choice["batched_s"] > 0
    assert rel_err(out, run(pipe, **inputs)) < 1e-5


def test_regional_compile_matches_eager_and_never_recompiles():
    torch._dynamo.reset()
    pipe = qwenimage_pipeline("tiny")
    inputs = qwenimage_inputs("tiny", pos_len=6, neg_len=6)
    eager = run(pipe, steps=3, **inputs)
    fast = pycfg.compile(pipe, compile_transformer="regional", batch_branches=False)
    times = fast.warmup(**inputs, true_cfg_scale=4.0, num_inference_steps=2)
    assert times["cold_s"] > times["warm_s"] > 0
    info = fast.describe()
    assert info["compile_transformer"]["how"] == "regional" and info["compile_transformer"]["modules"] == 2
    assert info["warmup"] == times
    # other step counts, timesteps and guidance scales reuse the compiled code
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = run(fast, steps=3, **inputs)
        other = run(fast, steps=4, scale=2.5, **inputs)
    assert rel_err(compiled, eager) < 1e-5
    assert rel_err(other, run(pipe, steps=4, scale=2.5, **inputs)) < 1e-5
    for block in pipe.transformer.transformer_blocks:
        block._compiled_call_impl = None  # back to eager for the other tests in this process


def test_text_buckets_with_a_callback_that_replaces_the_prompt():
    pipe = qwenimage_pipeline("tiny")
    inputs = qwenimage_inputs("tiny", pos_len=7, neg_len=5)
    offered = []

    def brighten(p, i, t, tensors):
        offered.append(tuple(tensors["prompt_embeds"].shape))
        return {"prompt_embeds": tensors["prompt_embeds"] * 1.5}

    kw = dict(callback_on_step_end=brighten, callback_on_step_end_tensor_inputs=["prompt_embeds"])
    exact = run(pycfg.compile(pipe), steps=3, **inputs, **kw)
    bucketed = run(pycfg.compile(pipe, text_bucket=8), steps=3, **inputs, **kw)
    # the callback sees the prompt as encoded (7 tokens), and its replacement is padded like the original
    assert set(offered) == {(1, 7, inputs["prompt_embeds"].shape[-1])}
    assert rel_err(bucketed, exact) < 1e-5
    assert torch.equal(exact, run(pipe, steps=3, **inputs, **kw))  # the stock pipeline's bits without buckets
