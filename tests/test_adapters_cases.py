"""Per-rank body shared by the family adapter tests (spawned by pycfg._launch.run_world; must be importable).

A scenario is one request: which tiny pipeline, which inputs, which call arguments. ``run_scenarios`` runs every
scenario at cfg_parallel_size=world on every rank (with per-step consistency checks) and, on rank 0 only, through
the stock pipeline and through pycfg at cfg_parallel_size=1, so one world covers a whole family.
This module holds no tests itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from helpers import make_scheduler

import pycfg
import pycfg.tiny as tiny


def nudge(pipe, i, t, tensors: dict) -> dict:
    """A callback that changes what it is offered at step 1, so a mishandled callback shows in the output."""
    if i == 1:
        return {k: v * 0.9 if v is not None else v for k, v in tensors.items()}
    return tensors


CALLBACKS = {"nudge": nudge}


def _plain(value: Any) -> Any:
    """Outputs as tensors / arrays only, so they travel back to the parent and compare bitwise."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _call(f, spec: dict) -> Any:
    inputs = getattr(tiny, spec["inputs"])(**spec.get("inputs_kwargs", {}))
    kwargs = dict(spec.get("call", {}))
    kwargs.setdefault("output_type", "latent")
    kwargs.setdefault("num_inference_steps", 3)
    if spec.get("callback"):
        kwargs["callback_on_step_end"] = CALLBACKS[spec["callback"]]
    generator = torch.Generator().manual_seed(spec.get("seed", 0))
    try:
        out = f(**{**inputs, **kwargs}, generator=generator)
    except Exception as err:  # the pipeline's own validation: compared as (type, message)
        if not spec.get("error"):
            raise
        return ("error", type(err).__name__, str(err))
    if spec.get("error"):
        return ("no error",)
    return _plain(out[0])


def run_scenarios(rank: int, world: int, scenarios: list[dict]) -> dict:
    out: dict = {}
    pipes: dict = {}
    for spec in scenarios:
        key = (spec["pipeline"], repr(sorted(spec.get("pipeline_kwargs", {}).items())), spec.get("scheduler"))
        if key not in pipes:
            kwargs = dict(spec.get("pipeline_kwargs", {}))
            kwargs["scheduler"] = make_scheduler(spec.get("scheduler"))
            pipe = getattr(tiny, spec["pipeline"])(**kwargs)
            pipes[key] = (
                pipe,
                pycfg.compile(pipe, cfg_parallel_size=world, check_consistency=True, timeout=300),
                pycfg.compile(pipe, cfg_parallel_size=1) if rank == 0 else None,
            )
        pipe, fast_n, fast1 = pipes[key]
        name = spec["name"]
        out[(name, "pN")] = _call(fast_n, spec)
        if rank == 0:
            out[(name, "stock")] = _call(pipe, spec)
            out[(name, "p1")] = _call(fast1, spec)
    return out


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def assert_same(a, b) -> None:
    """Bitwise equality of two outputs (tensors, or lists of them, or error tuples)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype, (a, b)
        assert torch.equal(a, b), f"not bit-identical: max abs diff {float((a.double() - b.double()).abs().max())}"
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b, (a, b)


def assert_close(a, b, rel: float = 1e-5) -> None:
    if isinstance(a, list):
        for x, y in zip(a, b):
            assert_close(x, y, rel)
        return
    assert a.shape == b.shape and a.dtype == b.dtype
    assert max_rel(a, b) <= rel, f"relative error {max_rel(a, b):.3g} > {rel}"


def check_family(results: list[dict], scenarios: list[dict], exact_stock: bool, rel: float = 1e-5) -> None:
    """The acceptance checks for one family's scenarios, from every rank's results."""
    r0 = results[0]
    for spec in scenarios:
        name = spec["name"]
        pn, p1, stock = r0[(name, "pN")], r0[(name, "p1")], r0[(name, "stock")]
        for other in results[1:]:
            assert_same(other[(name, "pN")], pn)  # every rank returns the same output
        assert_same(pn, p1)  # parallel = sequential, bit for bit
        if spec.get("error"):
            assert pn[0] == "error", f"{name}: pycfg accepted a request the pipeline rejects"
            assert_same(pn, stock)  # the pipeline's own error, type and message
        elif exact_stock or spec.get("exact"):
            assert_same(p1, stock)
        else:
            assert_close(p1, stock, rel)
