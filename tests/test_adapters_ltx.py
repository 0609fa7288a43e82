"""LTXPipeline through pycfg: batched CFG as separate branches with masks, guidance rescale, fp32 upcast."""

from __future__ import annotations

import pytest
import test_adapters_cases as cases

from pycfg._launch import run_world

BASE = dict(pipeline="ltx_pipeline", inputs="ltx_inputs")
SCENARIOS = [
    dict(BASE, name="cfg", call=dict(guidance_scale=3.0, num_inference_steps=4)),
    dict(BASE, name="cfg_rescale", call=dict(guidance_scale=3.0, guidance_rescale=0.7, num_inference_steps=4)),
    dict(BASE, name="cfg_off", exact=True, call=dict(guidance_scale=1.0)),
    dict(BASE, name="batch2", inputs_kwargs=dict(batch=2), call=dict(guidance_scale=2.0, guidance_rescale=0.5,
                                                                     num_inference_steps=2)),
    dict(BASE, name="decoded_pt", call=dict(guidance_scale=3.0, output_type="pt", num_inference_steps=2)),
    dict(BASE, name="bad_size", error=True, call=dict(guidance_scale=3.0, height=40)),
    dict(BASE, name="bad_callback_input", error=True,
         call=dict(guidance_scale=3.0, callback_on_step_end_tensor_inputs=["noise_pred"])),
]


@pytest.fixture(scope="module")
def results():
    return run_world(cases.run_scenarios, 2, scenarios=SCENARIOS)


def test_ltx_family(results):
    cases.check_family(results, SCENARIOS, exact_stock=False, rel=1e-5)


def test_rescale_changes_the_result(results):
    r0 = results[0]
    assert not bool((r0[("cfg_rescale", "p1")] == r0[("cfg", "p1")]).all())
