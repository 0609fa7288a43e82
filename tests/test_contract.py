"""The declared contracts: adapters, compile options, and capture of any linear policy the kernel can run."""

from __future__ import annotations

import dataclasses
import inspect

import graph_cache_cases
import pytest
import torch

from pycfg._launch import run_world
from pycfg.adapters import ADAPTERS
from pycfg.adapters.base import Adapter, AdapterCapabilities
from pycfg.api import compile as pycfg_compile
from pycfg.options import CompileOptions


def test_every_adapter_implements_the_contract():
    for adapter in ADAPTERS:
        assert issubclass(adapter, Adapter) and not inspect.isabstract(adapter), adapter
        assert isinstance(adapter.capabilities, AdapterCapabilities), adapter
        assert adapter.pipeline_classes, adapter
    with pytest.raises(TypeError):
        Adapter(None)  # abstract


def test_options_are_validated_once_and_frozen():
    names = [p for p in inspect.signature(pycfg_compile).parameters if p not in ("pipeline", "group")]
    assert sorted(names) == sorted(CompileOptions.names())  # compile() and the Engine share one vocabulary
    options = CompileOptions.from_kwargs({"compile_transformer": True, "exchange": "reduce"})
    assert options.compile_transformer == "full"
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.exchange = "gather"
    with pytest.raises(TypeError, match="unknown compile option.*'fuse'.*allowed"):
        CompileOptions.from_kwargs({"fuse": True})
    with pytest.raises(ValueError, match="noise must be one of 'philox', 'diffusers', got 'numpy'"):
        CompileOptions(noise="numpy")
    with pytest.raises(ValueError, match="comm must be one of"):
        CompileOptions(comm="mpi")
    with pytest.raises(ValueError, match="fused must be None, True or False"):
        CompileOptions(fused=1)
    assert CompileOptions().resolved("cpu").batch_branches is False
    assert CompileOptions(compile_transformer="regional").resolved("cuda").cuda_graphs is True
    with pytest.raises(ValueError, match="cuda_graphs=True needs the pipeline on a CUDA device"):
        CompileOptions(cuda_graphs=True).resolved("cpu")


def test_linear_policies_other_than_cfg_are_captured():
    (out,) = run_world(graph_cache_cases.linear_policies, 1)
    for name, r in out.items():
        assert r["stats"]["last_fallback"] is None, (name, r["stats"])
        assert torch.equal(r["cached"], r["plain"]), name
    assert out["dynamic"]["stats"]["replays"] > 0
    # PAG's three-branch steps are their own captured step
    assert out["pag"]["stats"]["captures"] > out["pag_outside_window"]["stats"]["captures"]
