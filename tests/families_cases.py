"""Per-rank body of the family tests (spawned by pycfg._launch.run_world; must be importable).

A scenario is one request on one tiny pipeline. ``run_family_scenarios`` runs every scenario through pycfg at
cfg_parallel_size = world on every rank (with per-step consistency checks) and, on rank 0 only, through the stock
pipeline (unless ``stock=False``) and through pycfg at cfg_parallel_size 1 (and, if asked, with
``batch_branches=True``), so one world covers many pipelines. This module holds no tests itself.

Scenario keys: ``name``, ``pipeline`` / ``inputs`` (names in ``pycfg.tiny``), ``pipeline_kwargs``,
``inputs_kwargs``, ``call`` (call arguments), ``options`` (``pycfg.compile`` options), ``guidance`` (a policy:
pycfg only, no stock run), ``error`` (the call must fail, as stock fails), ``batched_p1`` (also run at P=1 with
``batch_branches=True``), ``pycfg_error`` (pycfg must reject the call at cfg_parallel_size = world, before any
compute, where stock has nothing to reject: only that run is made).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import PIL.Image
import torch
from test_adapters_cases import CALLBACKS, _plain

import pycfg
import pycfg.tiny as tiny


def _call(f, spec: dict, guidance=None) -> Any:
    inputs = getattr(tiny, spec["inputs"])(**spec.get("inputs_kwargs", {}))
    kwargs = dict(spec.get("call", {}))
    kwargs.setdefault("output_type", "latent")
    kwargs.setdefault("num_inference_steps", 3)
    if spec.get("callback"):
        kwargs["callback_on_step_end"] = CALLBACKS[spec["callback"]]
    if guidance is not None:
        kwargs["guidance"] = guidance
    generator = torch.Generator().manual_seed(spec.get("seed", 0))
    try:
        out = f(**{**inputs, **kwargs}, generator=generator)
    except Exception as err:  # validation errors: compared as (type, message)
        if not (spec.get("error") or spec.get("pycfg_error")):
            raise
        return ("error", type(err).__name__, str(err))
    if spec.get("error") or spec.get("pycfg_error"):
        return ("no error",)
    images = out[0]
    if isinstance(images, list) and images and isinstance(images[0], PIL.Image.Image):
        images = [torch.from_numpy(np.asarray(im).copy()) for im in images]
    return _plain(images)


def run_family_scenarios(rank: int, world: int, scenarios: list[dict], stock: bool = True) -> dict:
    out: dict = {}
    pipes: dict = {}
    compiled: dict = {}

    def compiled_for(key, pipe, size: int, options: dict):
        ckey = (key, size, repr(sorted(options.items())))
        if ckey not in compiled:
            extra = dict(check_consistency=True, timeout=300) if size > 1 else {}
            compiled[ckey] = pycfg.compile(pipe, cfg_parallel_size=size, **extra, **options)
        return compiled[ckey]

    for spec in scenarios:
        key = (spec["pipeline"], repr(sorted(spec.get("pipeline_kwargs", {}).items())))
        if key not in pipes:
            pipes[key] = getattr(tiny, spec["pipeline"])(**spec.get("pipeline_kwargs", {}))
        pipe, name, options = pipes[key], spec["name"], spec.get("options", {})
        guidance = spec.get("guidance")
        out[(name, "pN")] = _call(compiled_for(key, pipe, world, options), spec, guidance)
        if spec.get("pycfg_error"):
            continue
        if rank == 0:
            out[(name, "p1")] = _call(compiled_for(key, pipe, 1, options), spec, guidance)
            if guidance is None and (stock or spec.get("error")):
                out[(name, "stock")] = _call(pipe, spec)
            if spec.get("batched_p1") and stock:
                out[(name, "p1_batched")] = _call(compiled_for(key, pipe, 1, dict(batch_branches=True)), spec)
    return out


def cached_variant_requests(rank: int, world: int, cases: list[dict]) -> dict:
    """Per case, two requests of one shape (other seed, input image, texts and scale) through cached step runners
    (run as step functions, not graphs: the CPU stand-in for replayed CUDA graphs) and the plain fused loop."""
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")
    from pycfg.runtime.graphs import StepGraphs

    out = {}
    for case in cases:
        pipe = getattr(tiny, case["pipeline"])(**case.get("pipeline_kwargs", {}))
        plain = pycfg.compile(pipe, cfg_parallel_size=world, fused=True)
        cached = pycfg.compile(pipe, cfg_parallel_size=world, fused=True)
        cached.step_graphs = StepGraphs("cpu", capture=False)
        pairs = []
        for seed, scale in ((0, 5.0), (1, 3.0)):
            call = dict(getattr(tiny, case["inputs"])(seed=seed), num_inference_steps=3, output_type="latent")
            call[case["scale"]] = scale
            pairs.append([runner(**call, generator=torch.Generator().manual_seed(seed))[0]
                          for runner in (plain, cached)])
        out[case["name"]] = {"pairs": pairs, "stats": cached.step_graphs.describe()}
    return out
