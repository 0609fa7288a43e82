"""The families that existed before the adapter contract, after moving onto it: each at cfg_parallel_size=3 (one
rank idle) against P=1 and the stock pipeline, with CFG shown to change the stock output.

The 2-rank worlds of ``test_adapters_<family>.py`` cover each family's options; this one 3-rank world runs one
guided request per family and its unguided twin.
"""

from __future__ import annotations

import pytest
import test_adapters_cases as cases
import torch

from pycfg._launch import run_world

# (family scenario, the call argument that turns guidance off, whether stock runs the branches separately)
GUIDED = [
    (dict(pipeline="flux_pipeline", inputs="flux_inputs", call=dict(true_cfg_scale=4.0)), "true_cfg_scale", True),
    (dict(pipeline="sd3_pipeline", inputs="sd3_inputs", call=dict(guidance_scale=5.0)), "guidance_scale", False),
    (dict(pipeline="wan_pipeline", inputs="wan_inputs", call=dict(guidance_scale=5.0)), "guidance_scale", True),
    (dict(pipeline="wan_pipeline", inputs="wan_inputs", pipeline_kwargs=dict(two_experts=True),
          call=dict(guidance_scale=4.0, guidance_scale_2=2.0, num_inference_steps=4)), None, True),
    (dict(pipeline="ltx_pipeline", inputs="ltx_inputs", call=dict(guidance_scale=3.0)), "guidance_scale", False),
    (dict(pipeline="cogvideox_pipeline", inputs="cogvideox_inputs", call=dict(guidance_scale=6.0)),
     "guidance_scale", False),
    (dict(pipeline="hunyuanvideo_pipeline", inputs="hunyuanvideo_inputs",
          call=dict(true_cfg_scale=4.0, guidance_scale=6.0)), "true_cfg_scale", True),
]


def _scenarios() -> list[tuple[dict, dict | None, bool]]:
    out = []
    for i, (spec, off_arg, separate) in enumerate(GUIDED):
        guided = dict(spec, name=f"{spec['pipeline']}_{i}")
        off = None
        if off_arg is not None:
            off = dict(spec, name=f"{guided['name']}_off", call={**spec["call"], off_arg: 1.0})
        out.append((guided, off, separate))
    return out


SCENARIOS = _scenarios()


@pytest.fixture(scope="module")
def results():
    specs = [s for guided, off, _ in SCENARIOS for s in (guided, off) if s is not None]
    return run_world(cases.run_scenarios, 3, scenarios=specs)


@pytest.mark.parametrize("guided,off,separate", SCENARIOS, ids=[g["name"] for g, _, _ in SCENARIOS])
def test_p3_against_stock(results, guided, off, separate):
    cases.check_family(results, [guided] + ([off] if off else []), exact_stock=separate)
    if off is not None:
        stock = results[0]
        assert not torch.equal(stock[(guided["name"], "stock")], stock[(off["name"], "stock")]), \
            f"{guided['name']}: guidance changed nothing"
