"""Per-rank bodies of the core multi-process tests (spawned by pycfg._launch.run_world; must be importable)."""

from __future__ import annotations

import os
import time

import torch
from helpers import make_scheduler

import pycfg
from pycfg.tiny import qwenimage_inputs, qwenimage_pipeline


def call(f, inputs, steps, seed=0, **kwargs):
    kwargs.setdefault("output_type", "latent")
    return f(**inputs, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), **kwargs).images


def parity(rank: int, world: int, size: int, schedulers=("euler", "unipc"), steps=(4, 8, 20),
           exchange_check: bool = False) -> dict:
    """Final latents of pycfg at cfg_parallel_size=size (with per-step consistency checks) and, on rank 0, of stock."""
    out: dict = {}
    inputs = qwenimage_inputs()
    for sched in schedulers:
        pipe = qwenimage_pipeline(scheduler=make_scheduler(sched))
        fast = pycfg.compile(pipe, cfg_parallel_size=size, check_consistency=True)
        for n in steps:
            out[("pycfg", sched, n)] = call(fast, inputs, n, true_cfg_scale=4.0)
            if rank == 0:
                out[("stock", sched, n)] = call(pipe, inputs, n, true_cfg_scale=4.0)
        if exchange_check:
            reduce = pycfg.compile(pipe, cfg_parallel_size=size, exchange="reduce", check_consistency=True)
            out[("reduce", sched, 8)] = call(reduce, inputs, 8, true_cfg_scale=4.0)
    return out


def variants(rank: int, world: int) -> dict:
    """Request variants at P=2: batches, guidance off, output types, callbacks, caller's tensors untouched."""
    out: dict = {}
    pipe = qwenimage_pipeline()
    fast = pycfg.compile(pipe, cfg_parallel_size=2, check_consistency=True)

    def both(inputs, steps=4, **kw):
        res = {"pycfg": call(fast, inputs, steps, **kw)}
        if rank == 0:
            res["stock"] = call(pipe, inputs, steps, **kw)
        return res

    batch2 = qwenimage_inputs(batch=2, pos_len=6, neg_len=9)
    out["batch2"] = both(batch2, true_cfg_scale=3.0)
    out["images_per_prompt"] = both(qwenimage_inputs(), true_cfg_scale=3.0, num_images_per_prompt=2)
    out["guidance_off_scale"] = both(qwenimage_inputs(), true_cfg_scale=1.0)
    no_negative = qwenimage_inputs()
    del no_negative["negative_prompt_embeds"], no_negative["negative_prompt_embeds_mask"]
    out["guidance_off_no_negative"] = both(no_negative, true_cfg_scale=4.0)
    out["custom_sigmas"] = both(qwenimage_inputs(), true_cfg_scale=4.0, sigmas=[1.0, 0.8, 0.5, 0.2])
    mask_padded = qwenimage_inputs(pos_len=8)
    mask_padded["prompt_embeds_mask"][:, 6:] = 0
    out["padded_mask"] = both(mask_padded, true_cfg_scale=4.0)

    # string prompts through the pipeline's own encode_prompt (a tiny text encoder built in code), batch of 2,
    # negative prompts of other lengths
    text_pipe = qwenimage_pipeline(text_encoder=True)
    text_fast = pycfg.compile(text_pipe, cfg_parallel_size=2, check_consistency=True)
    prompts = dict(prompt=["a lighthouse at dusk", "a photo of a cat"], negative_prompt=["blurry", "low quality"],
                   height=32, width=32, true_cfg_scale=4.0)
    out["string_prompts"] = {"pycfg": call(text_fast, prompts, 4)}
    if rank == 0:
        out["string_prompts"]["stock"] = call(text_pipe, prompts, 4)

    # user latents and the caller's tensors: unchanged afterwards
    inputs = qwenimage_inputs()
    inputs["latents"] = torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(5))
    before = {k: v.clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    out["user_latents"] = both(inputs, true_cfg_scale=4.0)
    out["caller_unchanged"] = all(torch.equal(before[k], inputs[k]) for k in before)

    for output_type in ("np", "pt", "pil"):
        res = {"pycfg": fast(**qwenimage_inputs(), true_cfg_scale=4.0, num_inference_steps=3,
                             generator=torch.Generator().manual_seed(0), output_type=output_type).images}
        if rank == 0:
            res["stock"] = pipe(**qwenimage_inputs(), true_cfg_scale=4.0, num_inference_steps=3,
                                generator=torch.Generator().manual_seed(0), output_type=output_type).images
        if output_type == "pil":
            import numpy as np

            res = {k: [np.asarray(im) for im in v] for k, v in res.items()}
        out[f"output_{output_type}"] = res
    as_tuple = fast(**qwenimage_inputs(), true_cfg_scale=4.0, num_inference_steps=2, output_type="latent",
                    generator=torch.Generator().manual_seed(0), return_dict=False)
    out["tuple_output"] = type(as_tuple).__name__

    # callbacks run on every rank with the same arguments, and may replace the latents
    seen = []

    def callback(p, i, t, kw):
        seen.append((i, float(t), kw["latents"].sum().item(), kw["prompt_embeds"].shape))
        return {"latents": kw["latents"] * 0.5} if i == 1 else {}

    out["callback"] = both(qwenimage_inputs(), true_cfg_scale=4.0, callback_on_step_end=callback,
                           callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    out["callback_seen"] = seen[: len(seen) if rank else len(seen) // 2]

    # the user's scheduler is never stepped by pycfg
    fresh = qwenimage_pipeline()
    state_before = repr(sorted((k, repr(v)) for k, v in vars(fresh.scheduler).items()))
    call(pycfg.compile(fresh, cfg_parallel_size=2), qwenimage_inputs(), 3, true_cfg_scale=4.0)
    out["scheduler_unchanged"] = state_before == repr(sorted((k, repr(v)) for k, v in vars(fresh.scheduler).items()))

    # bad input caught before any compute, and the group stays usable afterwards
    errors = {}
    for label, make in {
        "size_too_large": lambda: pycfg.compile(pipe, cfg_parallel_size=3),
        "exchange": lambda: pycfg.compile(pipe, cfg_parallel_size=2, exchange="broadcast"),
        "size_zero": lambda: pycfg.compile(pipe, cfg_parallel_size=0),
        "unknown_argument": lambda: fast(**qwenimage_inputs(), num_inference_steps=2, colour="red"),
        "pipeline_check_inputs": lambda: fast(**qwenimage_inputs(), num_inference_steps=2, max_sequence_length=2048),
        "mismatched_steps": lambda: fast(**qwenimage_inputs(), true_cfg_scale=4.0, num_inference_steps=3 + rank),
        "mismatched_seed": lambda: call(fast, qwenimage_inputs(), 3, seed=rank, true_cfg_scale=4.0),
    }.items():
        try:
            make()
            errors[label] = None
        except Exception as err:  # the test inspects type and message
            errors[label] = (type(err).__name__, str(err))
    out["errors"] = errors

    # a rank whose latents drift is named by the consistency check
    def drift(p, i, t, kw):
        return {"latents": kw["latents"] + 1e-3} if (i == 2 and rank == 1) else {}

    try:
        call(fast, qwenimage_inputs(), 4, true_cfg_scale=4.0, callback_on_step_end=drift)
        out["drift"] = None
    except Exception as err:
        out["drift"] = (type(err).__name__, str(err))
    out["after_errors"] = call(fast, qwenimage_inputs(), 4, true_cfg_scale=4.0)
    out["describe"] = fast.describe()
    return out


def groups_of_two(rank: int, world: int) -> dict:
    """World of 4 with cfg_parallel_size=2: two independent groups, each serving its own request."""
    pipe = qwenimage_pipeline()
    fast = pycfg.compile(pipe, cfg_parallel_size=2, check_consistency=True)
    seed = rank // 2
    res = {"pycfg": call(fast, qwenimage_inputs(seed=seed), 4, seed=seed, true_cfg_scale=4.0), "group_rank": fast.rank}
    if fast.rank == 0:
        res["stock"] = call(pipe, qwenimage_inputs(seed=seed), 4, seed=seed, true_cfg_scale=4.0)
    return res


def not_dividing(rank: int, world: int) -> tuple:
    pipe = qwenimage_pipeline()
    try:
        pycfg.compile(pipe, cfg_parallel_size=2)
    except ValueError as err:
        return ("ValueError", str(err))
    return (None, "")


def failing_peer(rank: int, world: int, mode: str, collective_timeout: float) -> dict:
    """Rank 1 dies (mode='kill') or raises (mode='raise') at step 1; rank 0 must raise within the timeout."""
    pipe = qwenimage_pipeline()
    fast = pycfg.compile(pipe, cfg_parallel_size=2, timeout=collective_timeout)
    call(fast, qwenimage_inputs(), 2, true_cfg_scale=4.0)  # a healthy request first

    def fail(p, i, t, kw):
        if rank == 1 and i == 1:
            if mode == "kill":
                os._exit(17)
            raise RuntimeError("injected failure on rank 1")
        return {}

    start = time.monotonic()
    try:
        call(fast, qwenimage_inputs(), 6, true_cfg_scale=4.0, callback_on_step_end=fail)
        return {"error": None, "elapsed": time.monotonic() - start}
    except Exception as err:
        return {"error": (type(err).__name__, str(err)), "elapsed": time.monotonic() - start}
