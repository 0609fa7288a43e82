"""CFG x context parallel on one DeviceMesh ("cfg", "ring", "ulysses"), through diffusers' context parallelism.

One spawned world of 4 gloo ranks (tests/context_parallel_cases.py) runs Qwen-Image, Flux and Wan at cfg 2 x
Ulysses 2, cfg 1 x Ulysses 2 (two request groups), cfg 2 x ring 2 and cfg 1 x ring 2, plus the stock pipelines.

- parallel = sequential along "cfg": cfg 2 x U 2 is bit-identical to cfg 1 x U 2 (and ring likewise), on all ranks;
- against the stock pipeline without parallelism: within what context parallelism itself costs (sharded
  attention sums in another order): measured at most 4.2e-7 relative over 3 steps, tested at CP_TOLERANCE.
"""

from __future__ import annotations

import pytest
import torch
from context_parallel_cases import FAMILIES, QWEN_EXTRA
from helpers import rel_err

import pycfg
import pycfg.tiny as tiny
from pycfg._launch import run_world
from pycfg.parallel.mesh import MeshLayout, check_world

#: relative error allowed against the unparallelised stock pipeline (measured: <= 4.2e-7 on these cases)
CP_TOLERANCE = 2e-6


@pytest.fixture(scope="module")
def results():
    import context_parallel_cases

    return run_world(context_parallel_cases.run_layouts, 4, timeout=600)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_layouts_exact_along_cfg_and_close_to_stock(results, family):
    r0 = results[0]
    stock = r0[(family, "stock", "cfg")]
    for layout in FAMILIES[family][2]:
        out = r0[(family, layout, "cfg")]
        # every rank of every request group ends with the same bits
        for rank, r in enumerate(results):
            assert torch.equal(r[(family, layout, "cfg")], out), (family, layout, rank)
        assert rel_err(out, stock) <= CP_TOLERANCE, (family, layout, rel_err(out, stock))
    # parallel = sequential along the cfg dimension, for Ulysses and for ring
    assert torch.equal(r0[(family, "c2u2", "cfg")], r0[(family, "c1u2", "cfg")])
    assert torch.equal(r0[(family, "c2r2", "cfg")], r0[(family, "c1r2", "cfg")])


def test_cfg_changes_the_stock_output(results):
    r0 = results[0]
    assert rel_err(r0[("qwen", "stock", "off")], r0[("qwen", "stock", "cfg")]) > 1e-3


@pytest.mark.parametrize("request_name", sorted(QWEN_EXTRA))
def test_one_and_three_branches(results, request_name):
    # guidance off: every CP group runs the one branch; three branches over two CFG ranks: one runs two
    r0 = results[0]
    out = r0[("qwen", "c2u2", request_name)]
    assert torch.equal(out, r0[("qwen", "c1u2", request_name)])
    for r in results:
        assert torch.equal(r[("qwen", "c2u2", request_name)], out)
    assert not torch.equal(out, r0[("qwen", "c2u2", "cfg")])
    if request_name == "off":
        assert rel_err(out, r0[("qwen", "stock", "off")]) <= CP_TOLERANCE


def test_consistency_checked_over_the_whole_mesh(results):
    # every layout ran with check_consistency=True; latents nudged on one rank of each Ulysses pair (each CFG
    # group still agrees with itself) are caught at the first step, on every rank
    for r in results:
        kind, text = r["error_inconsistent"]
        assert kind == "ConsistencyError" and "step 0" in text, (kind, text)


def test_describe_reports_the_mesh(results):
    coords = set()
    for rank, r in enumerate(results):
        info = r[("qwen", "c2u2", "describe")]
        assert info["mesh"]["dims"] == {"cfg": 2, "ring": 1, "ulysses": 2}
        assert info["mesh"]["ranks"] == [0, 1, 2, 3]
        assert info["cfg_parallel_size"] == 2
        coords.add(tuple(info["mesh"]["coordinates"].values()))
        assert info["context_parallel"]["text_bucket"] == 2  # text padded (masked) to the degree
        two_groups = r[("qwen", "c1u2", "describe")]["mesh"]
        assert two_groups["request_group"] == rank // 2 and two_groups["ranks"] == [rank // 2 * 2, rank // 2 * 2 + 1]
        assert r[("qwen", "c2r2", "describe")]["context_parallel"]["attention_backend"] == {
            "transformer": "pycfg_cpu_lse"}
    assert coords == {(c, 0, u) for c in range(2) for u in range(2)}


def test_clear_errors_in_the_world(results):
    r0 = results[0]
    for r in results:
        assert r["error_image_size"] == r0["error_image_size"]
    kind, text = r0["error_image_size"]
    assert kind == "ValueError" and "image tokens: 25" in text and "height and width" in text
    kind, text = r0["error_flux_text"]
    assert kind == "ValueError" and "text tokens (prompt): 7" in text
    for name in ("error_relayout", "error_cfg_only"):
        kind, text = r0[name]
        assert kind == "ValueError" and "already runs context-parallel as cfg 2 x ring 1 x ulysses 2" in text
    for r in results:
        kind, text = r["error_mismatch"]
        assert kind == "ArgumentMismatchError" and "true_cfg_scale" in text, (kind, text)
    assert torch.equal(r0["after_errors"], r0[("qwen", "c2u2", "cfg")])


# errors raised before any process group exists: no world needed

def test_head_count_must_divide():
    with pytest.raises(ValueError, match=r"ulysses_degree=2 must divide transformer's attention head count 3"):
        pycfg.compile(tiny.qwenimage_pipeline("tiny"), ulysses_degree=2)


def test_pipeline_without_context_parallel_plan():
    with pytest.raises(ValueError, match=r"does not run context-parallel; pipelines that do: Qwen-Image, Flux, Wan"):
        pycfg.compile(tiny.sd3_pipeline(), ulysses_degree=2)


def test_backend_without_context_parallel_support():
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    default = _AttentionBackendRegistry._active_backend
    pipe = tiny.flux_pipeline()
    try:
        pipe.transformer.set_attention_backend("_native_math")  # also diffusers' process-wide default
        with pytest.raises(ValueError, match=r"'_native_math', which has no context-parallel support; supported: "
                                             r".*native"):
            pycfg.compile(pipe, ulysses_degree=2)
    finally:
        _AttentionBackendRegistry.set_active_backend(default)


@pytest.mark.parametrize("option", ["ring_degree", "ulysses_degree"])
def test_bad_degrees(option):
    pipe = tiny.flux_pipeline()
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match=option):
            pycfg.compile(pipe, **{option: bad})
    with pytest.raises(ValueError, match="cuda_graphs=True cannot be combined"):
        pycfg.compile(pipe, cuda_graphs=True, **{option: 2})


def test_world_must_hold_whole_request_groups():
    check_world(MeshLayout(2, 1, 2), 8)
    with pytest.raises(ValueError, match=r"needs 4 ranks, and the world size 6 is not a multiple"):
        check_world(MeshLayout(2, 1, 2), 6)



def test_engine_runs_one_request_mesh(results):
    """The Engine passes ring/ulysses through: cfg 2 x Ulysses 2 is 4 workers, one mesh, and its output matches
    the same layout compiled in the 4-rank world bit for bit."""
    import functools

    from context_parallel_cases import _run, qwen_inputs

    engine = pycfg.Engine(functools.partial(tiny.qwenimage_pipeline, "tiny-cp"), cfg_parallel_size=2,
                          ulysses_degree=2, timeout=120)
    try:
        d = engine.describe()
        assert d["world_size"] == 4 and d["devices"] == ["cpu"] * 4
        assert d["mesh"]["dims"] == {"cfg": 2, "ring": 1, "ulysses": 2}
        out = _run(engine.generate, qwen_inputs())
    finally:
        engine.close()
    assert torch.equal(out, results[0][("qwen", "c2u2", "cfg")])


def test_compiled_masked_text_refused_on_cpu():
    with pytest.raises(ValueError, match=r"inductor's CPU code generation fails .* compile_transformer=False"):
        pycfg.compile(tiny.qwenimage_pipeline("tiny-cp"), ulysses_degree=2, compile_transformer="regional")


def test_ring_with_masked_text_refused_where_wrong():
    with pytest.raises(ValueError, match=r"ring_degree > 1 together with ulysses_degree > 1 cannot run"):
        pycfg.compile(tiny.qwenimage_pipeline("tiny-cp"), cfg_parallel_size=1, ring_degree=2, ulysses_degree=2)
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    default = _AttentionBackendRegistry._active_backend
    pipe = tiny.qwenimage_pipeline("tiny-cp")
    try:
        pipe.transformer.set_attention_backend("_native_flash")
        with pytest.raises(ValueError, match=r"applies each rank's local mask to every key/value chunk .* "
                                             r"'_native_flash'; use ulysses_degree"):
            pycfg.compile(pipe, ring_degree=2)
    finally:
        _AttentionBackendRegistry.set_active_backend(default)
