"""FluxPipeline through pycfg: true CFG as two separate forwards (bit-identical to stock), distilled guidance."""

from __future__ import annotations

import pytest
import test_adapters_cases as cases

from pycfg._launch import run_world

BASE = dict(pipeline="flux_pipeline", inputs="flux_inputs")
SCENARIOS = [
    dict(BASE, name="true_cfg", call=dict(true_cfg_scale=4.0, num_inference_steps=4)),
    dict(BASE, name="true_cfg_distilled", pipeline_kwargs=dict(guidance_embeds=True),
         call=dict(true_cfg_scale=3.0, guidance_scale=3.5)),
    # guidance-distilled request: no true CFG, one branch on every rank
    dict(BASE, name="distilled_only", pipeline_kwargs=dict(guidance_embeds=True), call=dict(guidance_scale=3.5)),
    dict(BASE, name="callback", callback="nudge",
         call=dict(true_cfg_scale=4.0, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])),
    dict(BASE, name="cfg_off", call=dict(true_cfg_scale=1.0)),
    dict(BASE, name="batch2", inputs_kwargs=dict(batch=2), call=dict(true_cfg_scale=2.5)),
    dict(BASE, name="decoded_np", call=dict(true_cfg_scale=4.0, output_type="np", num_inference_steps=2)),
    dict(BASE, name="too_long", error=True, call=dict(true_cfg_scale=4.0, max_sequence_length=1000)),
    dict(BASE, name="bad_callback_input", error=True,
         call=dict(true_cfg_scale=4.0, callback_on_step_end_tensor_inputs=["not_a_tensor"])),
    dict(BASE, name="neg_shape_mismatch", error=True, inputs_kwargs=dict(neg_length=4),
         call=dict(true_cfg_scale=4.0)),
]


@pytest.fixture(scope="module")
def results():
    return run_world(cases.run_scenarios, 2, scenarios=SCENARIOS)


def test_flux_family(results):
    cases.check_family(results, SCENARIOS, exact_stock=True)
