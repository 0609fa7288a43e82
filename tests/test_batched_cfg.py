"""Batched CFG at cfg_parallel_size 1 (``batch_branches=True``) for SD3 and Wan.

SD3's stock loop runs ``cat([neg, pos])`` as one forward; batched pycfg runs that same forward and so gives
stock's bits. Wan's stock loop runs two forwards; batched pycfg runs one, within fp32 rounding of stock.
"""

from __future__ import annotations

import torch
from helpers import ForwardCounter, rel_err

import pycfg
from pycfg import tiny


def test_sd3_batched_is_the_stock_forward():
    pipe = tiny.sd3_pipeline()
    inputs = tiny.sd3_inputs()
    call = dict(guidance_scale=5.0, num_inference_steps=4, output_type="latent")
    stock = pipe(**inputs, **call, generator=torch.Generator().manual_seed(0)).images
    fast = pycfg.compile(pipe, batch_branches=True)
    counter = ForwardCounter(pipe.transformer)
    out = fast(**inputs, **call, generator=torch.Generator().manual_seed(0)).images
    assert counter.calls == 4  # one forward per step
    assert torch.equal(out, stock)
    separate = pycfg.compile(pipe)(**inputs, **call, generator=torch.Generator().manual_seed(0)).images
    assert rel_err(separate, stock) < 1e-5


def test_sd3_batched_with_skip_layer_guidance():
    pipe = tiny.sd3_pipeline()
    inputs = tiny.sd3_inputs()
    # the skip branch has its own perturbation: it stays a separate forward inside the window
    call = dict(guidance_scale=5.0, num_inference_steps=6, skip_guidance_layers=[1], skip_layer_guidance_scale=2.5,
                skip_layer_guidance_start=0.0, skip_layer_guidance_stop=0.5, output_type="latent")
    stock = pipe(**inputs, **call, generator=torch.Generator().manual_seed(0)).images
    counter = ForwardCounter(pipe.transformer)
    out = pycfg.compile(pipe, batch_branches=True)(**inputs, **call, generator=torch.Generator().manual_seed(0)).images
    assert counter.calls == 6 + 2  # stock's skip window at 6 steps, (0.0, 0.5) exclusive: steps 1 and 2
    assert torch.equal(out, stock)


def test_wan_batched_matches_separate_forwards():
    pipe = tiny.wan_pipeline()
    inputs = tiny.wan_inputs(pos_len=7, neg_len=7)  # real Wan pads every text to max_sequence_length
    call = dict(guidance_scale=5.0, num_inference_steps=3, output_type="latent")
    stock = pipe(**inputs, **call, generator=torch.Generator().manual_seed(0)).frames
    counter = ForwardCounter(pipe.transformer)
    out = pycfg.compile(pipe, batch_branches=True)(**inputs, **call, generator=torch.Generator().manual_seed(0)).frames
    assert counter.calls == 3
    assert rel_err(out, stock) < 1e-5
    # texts of different lengths cannot share a batch: two forwards per step, stock's bits
    inputs = tiny.wan_inputs(pos_len=7, neg_len=5)
    stock = pipe(**inputs, **call, generator=torch.Generator().manual_seed(0)).frames
    counter.calls = 0
    out = pycfg.compile(pipe, batch_branches=True)(**inputs, **call, generator=torch.Generator().manual_seed(0)).frames
    assert counter.calls == 6 and torch.equal(out, stock)
