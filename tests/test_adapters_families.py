"""Flux and Wan variants, Z-Image, LongCat-Image, FLUX.2-klein, HunyuanVideo-1.5 through pycfg, against stock.

One 2-rank world runs every scenario (rank 0 also runs stock and P=1); one 3-rank world runs one pipeline per
family. Stock runs the branches as separate forwards in every family here but Z-Image, so those are compared bit
for bit; Z-Image batches its branches: separate forwards match within fp32 rounding, and ``batch_branches=True``
at P=1 makes stock's own batched call, bit for bit.
"""

from __future__ import annotations

import os

import pytest
import torch
from families_cases import run_family_scenarios
from test_adapters_cases import assert_close, assert_same

from pycfg._launch import run_world
from pycfg.guidance import APG, CFG, PAG, CFGZeroStar, SkipLayer

os.environ.setdefault("TRITON_INTERPRET", "1")  # the fused update's kernel, interpreted on CPU (spawned ranks)

ZIMAGE = dict(pipeline="zimage_pipeline", inputs="zimage_inputs", family="zimage")
ZIMAGE_I2I = dict(pipeline="zimage_img2img_pipeline", inputs="zimage_img2img_inputs", family="zimage")
LONGCAT = dict(pipeline="longcat_pipeline", inputs="longcat_inputs", family="longcat")
LONGCAT_EDIT = dict(pipeline="longcat_edit_pipeline", inputs="longcat_edit_inputs", family="longcat")
FLUX2 = dict(pipeline="flux2_klein_pipeline", inputs="flux2_klein_inputs", family="flux2")
HV15 = dict(pipeline="hunyuanvideo15_pipeline", inputs="hunyuanvideo15_inputs", family="hunyuanvideo15")
KONTEXT = dict(pipeline="flux_kontext_pipeline", inputs="flux_kontext_inputs", family="flux")
FLUX_I2I = dict(pipeline="flux_img2img_pipeline", inputs="flux_img2img_inputs", family="flux")
INPAINT = dict(pipeline="flux_inpaint_pipeline", inputs="flux_inpaint_inputs", family="flux")
WAN_I2V = dict(pipeline="wan_i2v_pipeline", inputs="wan_i2v_inputs", family="wan")
WAN_I2V_22 = dict(WAN_I2V, pipeline_kwargs=dict(mode="2.2"))
WAN_TI2V = dict(WAN_I2V, pipeline_kwargs=dict(mode="ti2v"))
VACE = dict(pipeline="wan_vace_pipeline", inputs="wan_vace_inputs", family="wan")
HV15_I2V = dict(pipeline="hunyuanvideo15_i2v_pipeline", inputs="hunyuanvideo15_i2v_inputs", family="hunyuanvideo15")

SCENARIOS = [
    # Flux variants: separate forwards (true CFG with a negative prompt)
    dict(KONTEXT, name="fk_cfg_off", call=dict(true_cfg_scale=1.0)),
    dict(KONTEXT, name="fk_cfg", changes="fk_cfg_off", call=dict(true_cfg_scale=4.0)),
    dict(KONTEXT, name="fk_callback", callback="nudge",
         call=dict(true_cfg_scale=4.0, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])),
    dict(KONTEXT, name="fk_decoded_pil", call=dict(true_cfg_scale=4.0, output_type="pil", num_inference_steps=2)),
    dict(KONTEXT, name="fk_apg", guidance=APG(4.0)),
    dict(FLUX_I2I, name="fi_cfg_off", call=dict(true_cfg_scale=1.0)),
    dict(FLUX_I2I, name="fi_cfg", changes="fi_cfg_off", call=dict(true_cfg_scale=4.0, num_inference_steps=4)),
    dict(FLUX_I2I, name="fi_strength", changes="fi_cfg", inputs_kwargs=dict(strength=0.5),
         call=dict(true_cfg_scale=4.0, num_inference_steps=4)),
    dict(FLUX_I2I, name="fi_fused", options=dict(fused=True), call=dict(true_cfg_scale=4.0)),
    dict(FLUX_I2I, name="fi_bad_strength", error=True, inputs_kwargs=dict(strength=1.5)),
    dict(INPAINT, name="fp_cfg_off", call=dict(true_cfg_scale=1.0)),
    dict(INPAINT, name="fp_cfg", changes="fp_cfg_off", call=dict(true_cfg_scale=4.0, num_inference_steps=4)),
    dict(INPAINT, name="fp_crop", call=dict(true_cfg_scale=4.0, padding_mask_crop=4, output_type="pil")),
    dict(INPAINT, name="fp_callback", callback="nudge", call=dict(true_cfg_scale=4.0)),
    dict(INPAINT, name="fp_reduce", options=dict(exchange="reduce"), call=dict(true_cfg_scale=4.0)),
    # Wan variants: separate forwards; 2.2 switches expert and scale at the boundary
    dict(WAN_I2V, name="wi_cfg_off", call=dict(guidance_scale=1.0)),
    dict(WAN_I2V, name="wi_cfg", changes="wi_cfg_off", call=dict(guidance_scale=4.0)),
    dict(WAN_I2V_22, name="wi22_cfg", call=dict(guidance_scale=4.0, num_inference_steps=4)),
    dict(WAN_I2V_22, name="wi22_scale2", changes="wi22_cfg",
         call=dict(guidance_scale=4.0, guidance_scale_2=2.0, num_inference_steps=4)),
    dict(WAN_I2V_22, name="wi22_callback", callback="nudge",
         call=dict(guidance_scale=4.0, callback_on_step_end_tensor_inputs=["latents", "negative_prompt_embeds"])),
    dict(WAN_I2V_22, name="wi22_last_image", inputs_kwargs=dict(last_image=True), call=dict(guidance_scale=4.0)),
    dict(WAN_I2V_22, name="wi22_fused", options=dict(fused=True), call=dict(guidance_scale=4.0, guidance_scale_2=2.0)),
    dict(WAN_TI2V, name="wt_cfg_off", call=dict(guidance_scale=1.0)),
    dict(WAN_TI2V, name="wt_cfg", changes="wt_cfg_off", call=dict(guidance_scale=4.0)),
    dict(WAN_TI2V, name="wt_zero_star", guidance=CFGZeroStar(4.0)),
    dict(WAN_I2V, name="wi_no_image", error=True, inputs_kwargs=dict(), call=dict(image=None)),
    dict(VACE, name="wv_cfg_off", call=dict(guidance_scale=1.0)),
    dict(VACE, name="wv_cfg", changes="wv_cfg_off", call=dict(guidance_scale=4.0)),
    dict(VACE, name="wv_two_experts", pipeline_kwargs=dict(two_experts=True),
         call=dict(guidance_scale=4.0, guidance_scale_2=3.0, num_inference_steps=4)),
    dict(VACE, name="wv_decoded", call=dict(guidance_scale=4.0, conditioning_scale=0.5, output_type="np",
                                            num_inference_steps=2)),
    dict(VACE, name="wv_reduce", options=dict(exchange="reduce"), call=dict(guidance_scale=4.0)),
    dict(VACE, name="wv_reference", inputs_kwargs=dict(reference=True),
         call=dict(guidance_scale=4.0, output_type="pt", num_inference_steps=2)),
    dict(VACE, name="wv_bad_scale", error=True, call=dict(guidance_scale=4.0, conditioning_scale=[1.0, 1.0, 1.0])),
    # Z-Image: stock batches cond + uncond in one call
    dict(ZIMAGE, name="z_cfg_off", call=dict(guidance_scale=0.0)),
    dict(ZIMAGE, name="z_cfg", changes="z_cfg_off", batched_p1=True, call=dict(guidance_scale=4.0)),
    dict(ZIMAGE, name="z_norm_trunc", changes="z_cfg", batched_p1=True,
         call=dict(guidance_scale=4.0, cfg_normalization=1.1, cfg_truncation=0.5, num_inference_steps=4)),
    dict(ZIMAGE, name="z_batch2", batched_p1=True, inputs_kwargs=dict(batch=2),
         call=dict(guidance_scale=3.0, cfg_normalization=True, callback_on_step_end_tensor_inputs=["latents"]),
         callback="nudge"),
    dict(ZIMAGE, name="z_fused", options=dict(fused=True), call=dict(guidance_scale=4.0)),
    dict(ZIMAGE, name="z_reduce", options=dict(exchange="reduce"), call=dict(guidance_scale=4.0, cfg_truncation=0.5)),
    dict(ZIMAGE, name="z_decoded", call=dict(guidance_scale=4.0, output_type="np", num_inference_steps=2)),
    dict(ZIMAGE, name="z_zero_star", guidance=CFGZeroStar(4.0)),
    dict(ZIMAGE, name="z_pag_unsupported", pycfg_error="block stacks", guidance=PAG(4.0, 2.0, [0])),
    dict(ZIMAGE, name="z_bad_height", error=True, call=dict(guidance_scale=4.0, height=17)),
    dict(ZIMAGE_I2I, name="zi_cfg_off", call=dict(guidance_scale=0.0)),
    dict(ZIMAGE_I2I, name="zi_cfg", changes="zi_cfg_off", batched_p1=True, call=dict(guidance_scale=4.0)),
    dict(ZIMAGE_I2I, name="zi_strength", changes="zi_cfg", batched_p1=True, inputs_kwargs=dict(strength=0.4),
         call=dict(guidance_scale=4.0, cfg_normalization=1.05, num_inference_steps=5)),
    dict(ZIMAGE_I2I, name="zi_bad_strength", error=True, inputs_kwargs=dict(strength=1.5)),
    # LongCat-Image: separate forwards; the renormalisation is on by default
    dict(LONGCAT, name="lc_cfg_off", call=dict(guidance_scale=1.0)),
    dict(LONGCAT, name="lc_cfg", changes="lc_cfg_off", call=dict(guidance_scale=4.0)),
    dict(LONGCAT, name="lc_no_renorm", changes="lc_cfg", call=dict(guidance_scale=4.0, enable_cfg_renorm=False)),
    dict(LONGCAT, name="lc_renorm_min", call=dict(guidance_scale=4.0, cfg_renorm_min=0.99)),
    dict(LONGCAT, name="lc_fused", options=dict(fused=True), call=dict(guidance_scale=4.0)),
    dict(LONGCAT, name="lc_batch2", inputs_kwargs=dict(batch=2), call=dict(guidance_scale=3.0)),
    dict(LONGCAT, name="lc_apg", guidance=APG(4.0)),
    dict(LONGCAT, name="lc_skip", guidance=SkipLayer(4.0, 2.0, [0], start=0.0, stop=1.0)),
    dict(LONGCAT_EDIT, name="lce_cfg_off", call=dict(guidance_scale=1.0, num_inference_steps=2)),
    dict(LONGCAT_EDIT, name="lce_cfg", changes="lce_cfg_off", call=dict(guidance_scale=4.0, num_inference_steps=2)),
    dict(LONGCAT, name="lc_reduce_renorm", pycfg_error="exchange='reduce'", options=dict(exchange="reduce"),
         call=dict(guidance_scale=4.0)),
    # FLUX.2-klein: true CFG on the base checkpoints only
    dict(FLUX2, name="f2_cfg_off", call=dict(guidance_scale=1.0)),
    dict(FLUX2, name="f2_cfg", changes="f2_cfg_off", call=dict(guidance_scale=4.0)),
    dict(FLUX2, name="f2_image", inputs_kwargs=dict(image=True), call=dict(guidance_scale=4.0)),
    dict(FLUX2, name="f2_callback", callback="nudge",
         call=dict(guidance_scale=4.0, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])),
    dict(FLUX2, name="f2_decoded", call=dict(guidance_scale=4.0, output_type="pt", num_inference_steps=2)),
    dict(FLUX2, name="f2_reduce_fused", options=dict(exchange="reduce", fused=True), call=dict(guidance_scale=4.0)),
    dict(FLUX2, name="f2_skip", guidance=SkipLayer(4.0, 2.0, [0], start=0.0, stop=1.0)),
    dict(FLUX2, name="f2_distilled", pipeline_kwargs=dict(is_distilled=True), call=dict(guidance_scale=4.0)),
    dict(FLUX2, name="f2_bad_callback", error=True,
         call=dict(guidance_scale=4.0, callback_on_step_end_tensor_inputs=["noise_pred"])),
    # HunyuanVideo-1.5: the pipeline's ClassifierFreeGuidance guider, configured at construction
    dict(HV15, name="hv_cfg_off", pipeline_kwargs=dict(guidance_scale=1.0)),
    dict(HV15, name="hv_cfg", changes="hv_cfg_off"),
    dict(HV15, name="hv_window_rescale", changes="hv_cfg",
         pipeline_kwargs=dict(guidance_rescale=0.7, start=0.25, stop=0.75), call=dict(num_inference_steps=4)),
    dict(HV15, name="hv_fused_window", options=dict(fused=True),
         pipeline_kwargs=dict(guidance_rescale=0.7, start=0.25, stop=0.75), call=dict(num_inference_steps=4)),
    dict(HV15, name="hv_reduce", options=dict(exchange="reduce")),
    dict(HV15, name="hv_original", pipeline_kwargs=dict(guidance_scale=3.0, use_original_formulation=True)),
    dict(HV15, name="hv_policy", guidance=CFG(2.5, rescale=0.5)),
    dict(HV15, name="hv_pag", guidance=PAG(4.0, 2.0, [0])),
    dict(HV15_I2V, name="hvi_cfg_off", pipeline_kwargs=dict(guidance_scale=1.0)),
    dict(HV15_I2V, name="hvi_cfg", changes="hvi_cfg_off"),
    dict(HV15_I2V, name="hvi_decoded", call=dict(output_type="np", num_inference_steps=2)),
]

#: one pipeline per family at cfg_parallel_size 3 (one rank idle at every step)
# every class once at P=3 (an idle rank), with CFG on
P3 = ["fk_cfg", "fi_cfg", "fp_cfg", "wi_cfg", "wi22_scale2", "wt_cfg", "wv_cfg", "z_norm_trunc", "zi_cfg", "lc_cfg",
      "lce_cfg", "f2_cfg", "f2_image", "hv_window_rescale", "hvi_cfg"]


def check(results: list[dict], scenarios: list[dict]) -> None:
    r0 = results[0]
    for spec in scenarios:
        name = spec["name"]
        pn = r0[(name, "pN")]
        for other in results[1:]:
            assert_same(other[(name, "pN")], pn)  # every rank returns the same output
        if spec.get("pycfg_error"):
            assert pn[0] == "error" and spec["pycfg_error"] in pn[2], (name, pn)
            continue
        p1 = r0[(name, "p1")]
        options = spec.get("options", {})
        if options.get("exchange") == "reduce":
            assert_close(pn, p1, 1e-6)  # the weighted sums are added in another order
        else:
            assert_same(pn, p1)  # parallel = sequential, bit for bit
        if spec.get("error"):
            assert p1[0] == "error", f"{name}: pycfg accepted a request the pipeline rejects"
            assert_same(p1, r0[(name, "stock")])  # the pipeline's own error, type and message
            continue
        if (name, "stock") not in r0:
            continue
        stock = r0[(name, "stock")]
        if spec["family"] == "zimage" or options.get("fused") or options.get("exchange") == "reduce":
            assert_close(p1, stock, 1e-5)
        else:
            assert_same(p1, stock)
        if spec.get("batched_p1") and (name, "p1_batched") in r0:
            assert_same(r0[(name, "p1_batched")], stock)  # stock's own batched call, bit for bit
        if spec.get("changes") and (spec["changes"], "stock") in r0:
            assert not torch.equal(stock, r0[(spec["changes"], "stock")]), f"{name}: guidance changed nothing"


@pytest.fixture(scope="module")
def results2():
    return run_world(run_family_scenarios, 2, scenarios=SCENARIOS)


@pytest.fixture(scope="module")
def results3():
    # P=1 against stock is the 2-rank world's check: here P=3 against P=1
    return run_world(run_family_scenarios, 3, scenarios=[s for s in SCENARIOS if s["name"] in P3], stock=False)


@pytest.mark.parametrize("family", ["flux", "wan", "zimage", "longcat", "flux2", "hunyuanvideo15"])
def test_family_p2(results2, family):
    check(results2, [s for s in SCENARIOS if s["family"] == family])


def test_families_p3(results3):
    check(results3, [s for s in SCENARIOS if s["name"] in P3])


def test_supported_pipelines():
    from pycfg.adapters import supported_pipelines

    for name in ("FluxKontextPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline", "WanImageToVideoPipeline",
                 "WanVACEPipeline", "ZImagePipeline", "ZImageImg2ImgPipeline", "LongCatImagePipeline",
                 "LongCatImageEditPipeline", "Flux2KleinPipeline", "HunyuanVideo15Pipeline",
                 "HunyuanVideo15ImageToVideoPipeline"):
        assert name in supported_pipelines()


def test_zimage_rejects_unknown_callback_tensor_before_any_compute():
    import pycfg
    from pycfg.tiny import zimage_inputs, zimage_pipeline

    fast = pycfg.compile(zimage_pipeline())
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        fast(**zimage_inputs(), callback_on_step_end=lambda *args: {},
             callback_on_step_end_tensor_inputs=["noise_pred"])


#: variants whose family captures whole steps: their image / control latents and masks are graph inputs
CACHED = [
    dict(name="kontext", pipeline="flux_kontext_pipeline", inputs="flux_kontext_inputs", scale="true_cfg_scale"),
    dict(name="inpaint", pipeline="flux_inpaint_pipeline", inputs="flux_inpaint_inputs", scale="true_cfg_scale"),
    dict(name="wan_i2v", pipeline="wan_i2v_pipeline", inputs="wan_i2v_inputs", scale="guidance_scale"),
    dict(name="wan_ti2v", pipeline="wan_i2v_pipeline", pipeline_kwargs=dict(mode="ti2v"), inputs="wan_i2v_inputs",
         scale="guidance_scale"),
    dict(name="vace", pipeline="wan_vace_pipeline", inputs="wan_vace_inputs", scale="guidance_scale"),
]


def test_variant_steps_replay_with_each_requests_inputs():
    from families_cases import cached_variant_requests

    (out,) = run_world(cached_variant_requests, 1, cases=CACHED)
    for name, r in out.items():
        assert r["stats"]["last_fallback"] is None and r["stats"]["reused"] == 1, (name, r["stats"])
        for plain, cached in r["pairs"]:
            assert torch.equal(cached, plain), name
        assert not torch.equal(r["pairs"][0][1], r["pairs"][1][1]), name


def test_engine_serves_an_inpainting_request_with_pil_inputs():
    """The input image and mask (PIL) travel to the workers; the result is stock's, bit for bit."""
    import functools

    import pycfg
    from pycfg.tiny import flux_inpaint_inputs, flux_inpaint_pipeline

    call = dict(flux_inpaint_inputs(), true_cfg_scale=4.0, num_inference_steps=3, output_type="pt")
    stock = flux_inpaint_pipeline()(**call, generator=torch.Generator().manual_seed(0)).images
    with pycfg.Engine(functools.partial(flux_inpaint_pipeline), cfg_parallel_size=2, timeout=300) as engine:
        out = engine.generate(**call, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.images, stock)
