"""Per-rank body of the CFG x context-parallel tests (spawned by pycfg._launch.run_world; must be importable).

One 4-rank world runs every layout of every family: each layout compiles its own freshly built tiny pipeline (a
transformer is parallelised once, for one layout), every rank runs every request, and rank 0 also runs the stock
pipeline without parallelism. Outputs come back to the parent, which compares them. No tests here.
"""

from __future__ import annotations

import os
import warnings

import torch

import pycfg
import pycfg.guidance as g
import pycfg.tiny as tiny

STEPS = 3

#: (cfg, ring, ulysses) per layout name
LAYOUTS = {"c2u2": (2, 1, 2), "c1u2": (1, 1, 2), "c2r2": (2, 2, 1), "c1r2": (1, 2, 1)}


def qwen():
    return tiny.qwenimage_pipeline("tiny-cp")


def qwen_inputs():
    # text of 7 and 5 tokens: padded (masked) to 8 and 6 for a degree of 2, so the padding of the prompt sits in
    # the second rank's text shard (ring attention must give that chunk its own mask)
    return dict(tiny.qwenimage_inputs("tiny-cp", pos_len=7, neg_len=5), true_cfg_scale=4.0)


def flux():
    return tiny.flux_pipeline()


def flux_inputs():
    return dict(tiny.flux_inputs(length=6), true_cfg_scale=4.0)


def wan():
    return tiny.wan_pipeline()


def wan_inputs():
    # 32x32, 9 frames: 3 latent frames of 2x2 patches, 12 video tokens
    return dict(tiny.wan_inputs(), height=32, width=32, guidance_scale=5.0)


FAMILIES = {
    "qwen": (qwen, qwen_inputs, ("c2u2", "c1u2", "c2r2", "c1r2")),
    "flux": (flux, flux_inputs, ("c2u2", "c1u2", "c2r2", "c1r2")),
    "wan": (wan, wan_inputs, ("c2u2", "c1u2", "c2r2", "c1r2")),
}

#: requests run on the Qwen-Image layouts besides plain CFG: guidance off (one branch: every CP group runs it)
#: and three branches over two CFG ranks (one CFG rank runs two forwards, the other one)
QWEN_EXTRA = {
    "off": dict(true_cfg_scale=1.0),
    "skip": dict(guidance=g.SkipLayer(4.0, 2.0, [1], start=0.0, stop=1.0)),
}


def nudge_odd_ranks(pipe, i, t, tensors: dict) -> dict:
    """A callback that changes the latents on the odd ranks only: in a cfg 2 x Ulysses 2 mesh those are the
    second rank of each Ulysses pair, so each CFG group ({0, 2} and {1, 3}) still agrees with itself."""
    if int(os.environ["RANK"]) % 2:
        tensors = {**tensors, "latents": tensors["latents"] * 1.001}
    return tensors


def _run(f, inputs: dict, **extra) -> torch.Tensor:
    kwargs = {**inputs, "num_inference_steps": STEPS, "output_type": "latent", **extra}
    return f(**kwargs, generator=torch.Generator().manual_seed(0))[0].detach().clone()


def _error(fn) -> tuple[str, str]:
    try:
        fn()
    except Exception as err:
        return (type(err).__name__, str(err))
    return ("no error", "")


def run_layouts(rank: int, world: int) -> dict:
    warnings.filterwarnings("ignore", category=FutureWarning)
    out: dict = {}
    compiled = {}
    for family, (build, inputs, layouts) in FAMILIES.items():
        for name in layouts:
            cfg, ring, ulysses = LAYOUTS[name]
            fast = pycfg.compile(build(), cfg_parallel_size=cfg, ring_degree=ring, ulysses_degree=ulysses,
                                 check_consistency=True, timeout=300)
            compiled[(family, name)] = fast
            out[(family, name, "cfg")] = _run(fast, inputs())
            if family == "qwen" and name in ("c2u2", "c1u2"):
                for request, extra in QWEN_EXTRA.items():
                    out[(family, name, request)] = _run(fast, inputs(), **extra)
            out[(family, name, "describe")] = {k: fast.describe()[k] for k in ("mesh", "context_parallel",
                                                                                "cfg_parallel_size")}
        if rank == 0:
            out[(family, "stock", "cfg")] = _run(build(), inputs())
            if family == "qwen":
                out[(family, "stock", "off")] = _run(build(), inputs(), true_cfg_scale=1.0)

    # clear errors, raised on every rank alike before any compute or collective
    qwen_c2u2 = compiled[("qwen", "c2u2")]
    out["error_image_size"] = _error(lambda: qwen_c2u2(**{**qwen_inputs(), "height": 40, "width": 40}))
    out["error_flux_text"] = _error(lambda: compiled[("flux", "c2u2")](**{**flux_inputs(), **tiny.flux_inputs(
        length=7)}))
    out["error_relayout"] = _error(lambda: pycfg.compile(qwen_c2u2.pipeline, cfg_parallel_size=1, ulysses_degree=2))
    out["error_cfg_only"] = _error(lambda: pycfg.compile(qwen_c2u2.pipeline, cfg_parallel_size=2))
    # a Ulysses pair's ranks sit in different CFG groups: the whole request mesh must agree on the call
    out["error_mismatch"] = _error(lambda: qwen_c2u2(**{**qwen_inputs(), "true_cfg_scale": 4.0 + (rank == 1)}))
    # state that differs inside a Ulysses pair only is caught by the consistency check over the whole mesh
    out["error_inconsistent"] = _error(lambda: qwen_c2u2(**qwen_inputs(), callback_on_step_end=nudge_odd_ranks))
    # the pipeline still runs after the refusals
    out["after_errors"] = _run(qwen_c2u2, qwen_inputs())
    return out


def run_idle(rank: int, world: int) -> dict:
    """6 ranks: cfg 3 x Ulysses 2 (one request group, the third CFG rank's Ulysses pair idle under two-branch CFG)
    and cfg 1 x Ulysses 2 (three request groups) on the same request."""
    from helpers import ForwardCounter

    warnings.filterwarnings("ignore", category=FutureWarning)
    out: dict = {}
    for name, cfg in (("c3u2", 3), ("c1u2", 1)):
        fast = pycfg.compile(qwen(), cfg_parallel_size=cfg, ulysses_degree=2, check_consistency=True,
                             timeout=300)
        counter = ForwardCounter(fast.pipeline.transformer)
        out[name] = _run(fast, qwen_inputs())
        out[(name, "forwards")] = counter.calls
        out[(name, "coordinates")] = fast.describe()["mesh"]["coordinates"]
    return out
