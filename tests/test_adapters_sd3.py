"""StableDiffusion3Pipeline through pycfg: batched CFG as separate branches, skip-layer guidance as a third."""

from __future__ import annotations

import pytest
import test_adapters_cases as cases

from pycfg._launch import run_world
from pycfg.adapters.sd3 import SD3Guidance

BASE = dict(pipeline="sd3_pipeline", inputs="sd3_inputs")
SLG = dict(skip_guidance_layers=[1], skip_layer_guidance_scale=2.5)
SCENARIOS = [
    dict(BASE, name="cfg", call=dict(guidance_scale=5.0, num_inference_steps=4)),
    # stock window at 10 steps, start 0.1, stop 0.5: steps 2..4 (strictly inside 1.0 and 5.0)
    dict(BASE, name="slg", call=dict(guidance_scale=5.0, num_inference_steps=10, skip_layer_guidance_start=0.1,
                                     skip_layer_guidance_stop=0.5, **SLG)),
    dict(BASE, name="slg_defaults", call=dict(guidance_scale=4.0, num_inference_steps=6, skip_guidance_layers=[0, 1])),
    # callbacks see (and may change) the batched cat([neg, pos]) embeds, as in the stock loop
    dict(BASE, name="callback", callback="nudge", call=dict(
        guidance_scale=5.0, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds", "pooled_prompt_embeds"])),
    dict(BASE, name="cfg_off", exact=True, call=dict(guidance_scale=1.0)),
    dict(BASE, name="batch2", inputs_kwargs=dict(batch=2), call=dict(guidance_scale=3.0, **SLG,
                                                                     skip_layer_guidance_stop=0.9)),
    dict(BASE, name="decoded_np", call=dict(guidance_scale=5.0, output_type="np", num_inference_steps=2)),
    dict(BASE, name="bad_callback_input", error=True,
         call=dict(guidance_scale=5.0, callback_on_step_end_tensor_inputs=["noise_pred"])),
    dict(BASE, name="too_long", error=True, call=dict(guidance_scale=5.0, max_sequence_length=1000)),
]


@pytest.fixture(scope="module")
def results():
    return run_world(cases.run_scenarios, 2, scenarios=SCENARIOS)


def test_sd3_family(results):
    cases.check_family(results, SCENARIOS, exact_stock=False, rel=1e-5)


def test_slg_changes_the_result(results):
    r0 = results[0]
    assert not bool((r0[("slg", "p1")] == r0[("cfg", "p1")]).all())


def test_slg_window_is_stock():
    policy = SD3Guidance(5.0, [1], 2.5, 0.1, 0.5, num_inference_steps=10)
    policy.reset(10)
    assert [i for i in range(10) if "skip" in policy.active(i)] == [2, 3, 4]
