"""CogVideoXPipeline through pycfg: batched CFG as separate branches, dynamic CFG, the DDIM and DPM schedulers."""

from __future__ import annotations

import pytest
import test_adapters_cases as cases

from pycfg._launch import run_world

BASE = dict(pipeline="cogvideox_pipeline", inputs="cogvideox_inputs")
DPM = dict(BASE, scheduler="cogvideox_dpm")
SCENARIOS = [
    dict(BASE, name="cfg_ddim", call=dict(guidance_scale=6.0, num_inference_steps=4)),
    dict(BASE, name="dynamic_ddim", call=dict(guidance_scale=6.0, use_dynamic_cfg=True, num_inference_steps=4)),
    # the DPM scheduler: old_pred_original_sample carried between steps, noise drawn from the call's generator
    dict(DPM, name="dynamic_dpm", call=dict(guidance_scale=6.0, use_dynamic_cfg=True, num_inference_steps=4)),
    dict(DPM, name="cfg_off_dpm", exact=True, call=dict(guidance_scale=1.0)),
    dict(BASE, name="callback", callback="nudge", call=dict(
        guidance_scale=6.0, use_dynamic_cfg=True, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])),
    dict(BASE, name="cfg_off", exact=True, call=dict(guidance_scale=1.0)),
    dict(BASE, name="batch2", inputs_kwargs=dict(batch=2), call=dict(guidance_scale=5.0, num_inference_steps=2)),
    dict(BASE, name="decoded_np", call=dict(guidance_scale=6.0, output_type="np", num_inference_steps=2)),
    dict(BASE, name="bad_size", error=True, call=dict(guidance_scale=6.0, height=12)),
    dict(BASE, name="bad_callback_input", error=True,
         call=dict(guidance_scale=6.0, callback_on_step_end_tensor_inputs=["noise_pred"])),
]


@pytest.fixture(scope="module")
def results():
    return run_world(cases.run_scenarios, 2, scenarios=SCENARIOS)


def test_cogvideox_family(results):
    cases.check_family(results, SCENARIOS, exact_stock=False, rel=1e-5)


def test_dynamic_cfg_changes_the_result(results):
    r0 = results[0]
    assert not bool((r0[("dynamic_ddim", "p1")] == r0[("cfg_ddim", "p1")]).all())
