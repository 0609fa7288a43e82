"""HunyuanVideoPipeline through pycfg: true CFG as separate forwards (bit-identical), embedded guidance alone."""

from __future__ import annotations

import pytest
import test_adapters_cases as cases

from pycfg._launch import run_world

BASE = dict(pipeline="hunyuanvideo_pipeline", inputs="hunyuanvideo_inputs")
SCENARIOS = [
    dict(BASE, name="true_cfg", call=dict(true_cfg_scale=4.0, guidance_scale=6.0, num_inference_steps=4)),
    dict(BASE, name="embedded_only", call=dict(guidance_scale=6.0)),
    dict(BASE, name="batch2", inputs_kwargs=dict(batch=2), call=dict(true_cfg_scale=2.0, num_inference_steps=2)),
    dict(BASE, name="decoded_np", call=dict(true_cfg_scale=4.0, output_type="np", num_inference_steps=2)),
    dict(BASE, name="bad_size", error=True, call=dict(true_cfg_scale=4.0, height=20)),
    dict(BASE, name="bad_template", error=True, call=dict(true_cfg_scale=4.0, prompt_template={"crop_start": 0})),
]


@pytest.fixture(scope="module")
def results():
    return run_world(cases.run_scenarios, 2, scenarios=SCENARIOS)


def test_hunyuanvideo_family(results):
    cases.check_family(results, SCENARIOS, exact_stock=True)
