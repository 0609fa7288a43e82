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
from pycfg.guidance import APG, CFGZeroStar  # noqa: E402
from pycfg.runtime.graphs import StepGraphs  # noqa: E402
from pycfg.tiny import qwenimage_variant_inputs, qwenimage_variant_pipeline  # noqa: E402

#: stock's output for Layered with output_type="latent" is an UnboundLocalError: its cases compare "pt"
DECODED = ("pil", "np", "pt")
POLICIES = {"cfg_zero_star": lambda: CFGZeroStar(4.0), "apg": lambda: APG(4.0, momentum=-0.5)}


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


def stock_output(case: dict):
    pipe = qwenimage_variant_pipeline(case["variant"])
    return images(pipe(**call_kwargs(case)))


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)


def run_cases(rank: int, world: int, cases: list[dict]) -> list:
    """Every case on this rank; returns the outputs (tensors or arrays) in case order."""
    pipes: dict[str, object] = {}
    out = []
    for case in cases:
        variant = case["variant"]
        if variant not in pipes:
            pipes[variant] = qwenimage_variant_pipeline(variant)
        options = dict(case.get("compile", {}))
        if "guidance" in options:
            options["guidance"] = POLICIES[options["guidance"]]()
        fast = pycfg.compile(pipes[variant], cfg_parallel_size=world, **options)
        if case.get("step_graphs"):
            fast.step_graphs = StepGraphs("cpu", capture=False)
            results = [images(fast(**call_kwargs(dict(case, seed=seed)))) for seed in case["step_graphs"]]
            out.append({"results": results, "stats": fast.step_graphs.describe()})
            continue
        out.append(images(fast(**call_kwargs(case))))
    return out
