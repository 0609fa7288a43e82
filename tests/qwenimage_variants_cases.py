"""Per-rank bodies of the Qwen-Image variant tests (spawned by pycfg._launch.run_world; the fused kernel runs in
Triton's interpreter on CPU, chosen before anything imports triton).

A case is a plain dict: ``variant``, call overrides (``call``), compile options (``compile``) and optionally a
``seed`` and ``inputs`` (arguments of ``qwenimage_variant_inputs``). Every rank
builds each variant's pipeline once and runs all its cases through one world, so the tests start one world per
cfg_parallel_size.
"""

from __future__ import annotations

import os

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pycfg  # noqa: E402
from pycfg.guidance import APG, PAG, CFGZeroStar, SkipLayer  # noqa: E402
from pycfg.runtime.graphs import StepGraphs  # noqa: E402
from pycfg.tiny import qwenimage_variant_inputs, qwenimage_variant_pipeline  # noqa: E402

#: stock's output for Layered with output_type="latent" is an UnboundLocalError: its cases compare "pt"
DECODED = ("pil", "np", "pt")
POLICIES = {
    "cfg_zero_star": lambda: CFGZeroStar(4.0),
    "apg": lambda: APG(4.0, momentum=-0.5),
    # a third, perturbed branch at every step: three forwards, one per rank at size 3
    "pag": lambda: PAG(4.0, 2.0, layers=[0], start=0.0, stop=1.0),
    "skip_layer": lambda: SkipLayer(4.0, 2.0, layers=[1], start=0.0, stop=1.0),
}


def call_kwargs(case: dict) -> dict:
    """The full call of a case: the variant's tiny inputs, the case's overrides, a seeded generator."""
    call = dict(qwenimage_variant_inputs(case["variant"], seed=case.get("seed", 0), **case.get("inputs", {})))
    call.update(case.get("call", {}))
    call["generator"] = torch.Generator().manual_seed(case.get("seed", 0))
    return call


def images(output):
    """The first image (or Layered's stack of layers) of a pipeline output, as a tensor or an array."""
    first = output.images[0]
    if isinstance(first, list):  # Layered with "pil": one list of layer images per prompt
        return np.stack([np.asarray(im) for im in first])
    if hasattr(first, "getpixel"):  # a PIL image
        return np.asarray(first)
    return first


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)


def pipeline(case: dict, pipes: dict):
    """The case's pipeline, built once per process: by variant, and with a text encoder for prompt strings."""
    key = (case["variant"], case.get("inputs", {}).get("text", False))
    if key not in pipes:
        pipes[key] = qwenimage_variant_pipeline(key[0], text_encoder=key[1])
    return pipes[key]


def run_cases(rank: int, world: int, cases: list[dict], pipes: dict | None = None) -> list:
    """Every case at cfg_parallel_size ``world`` on this rank; returns the outputs (tensors or arrays) in order."""
    pipes = {} if pipes is None else pipes
    out = []
    for case in cases:
        options = dict(case.get("compile", {}))
        if "guidance" in options:
            options["guidance"] = POLICIES[options["guidance"]]()
        fast = pycfg.compile(pipeline(case, pipes), cfg_parallel_size=world, **options)
        if case.get("step_graphs"):
            fast.step_graphs = StepGraphs("cpu", capture=False)
            results = [images(fast(**call_kwargs(dict(case, seed=seed, inputs=inputs))))
                       for seed, inputs in case["step_graphs"]]
            out.append({"results": results, "stats": fast.step_graphs.describe()})
            continue
        out.append(images(fast(**call_kwargs(case))))
    return out


def stock_and_sizes_1_2(rank: int, world: int, stock: list[dict], size_1: list[dict], size_2: list[dict]) -> dict:
    """The stock outputs and the size-1 cases shared out over the ranks (each rank alone is a size-1 CFG group),
    then every size-2 case on every rank; one pipeline per variant serves all of them."""
    pipes: dict = {}
    stock_out = {k: images(pipeline(stock[k], pipes)(**call_kwargs(stock[k]))) for k in range(rank, len(stock), world)}
    mine = list(range(rank, len(size_1), world))
    size_1_out = dict(zip(mine, run_cases(rank, 1, [size_1[k] for k in mine], pipes)))
    return {"stock": stock_out, "size_1": size_1_out, "size_2": run_cases(rank, world, size_2, pipes)}
