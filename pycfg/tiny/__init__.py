"""Small random-weight pipelines built in code: no downloads, fixed seeds. Used by the demo, tests and benchmarks.

``text_encoder`` and ``tokenizer`` are None by default: pass ``prompt_embeds`` (+ masks) directly, as from any
encoder. ``qwenimage_pipeline(text_encoder=True)`` (a tiny Qwen2.5-VL), ``flux_pipeline(text_encoder=True)`` (tiny
CLIP + T5) and ``wan_pipeline(text_encoder=True)`` (a tiny UMT5) also build text encoders and byte-level BPE
tokenizers in code, so string prompts go through the pipeline's own ``encode_prompt``. LongCat-Image takes no
embeds without a prompt string, so its tiny pipelines always carry such an encoder (the edit one with a vision
tower).
"""

from .cogvideox import cogvideox_inputs, cogvideox_pipeline
from .flux import (
    flux_img2img_inputs,
    flux_img2img_pipeline,
    flux_inpaint_inputs,
    flux_inpaint_pipeline,
    flux_inputs,
    flux_kontext_inputs,
    flux_kontext_pipeline,
    flux_pipeline,
    flux_text_encoders,
    tiny_image,
    tiny_mask,
)
from .flux2 import flux2_klein_inputs, flux2_klein_pipeline
from .hunyuanvideo import hunyuanvideo_inputs, hunyuanvideo_pipeline
from .hunyuanvideo15 import (
    hunyuanvideo15_i2v_inputs,
    hunyuanvideo15_i2v_pipeline,
    hunyuanvideo15_inputs,
    hunyuanvideo15_pipeline,
)
from .longcat import longcat_edit_inputs, longcat_edit_pipeline, longcat_inputs, longcat_pipeline
from .ltx import ltx_inputs, ltx_pipeline
from .ltx2 import ltx2_inputs, ltx2_pipeline
from .qwenimage import QWENIMAGE_CONFIGS, qwen_text_encoder, qwenimage_inputs, qwenimage_pipeline
from .qwenimage_edit import qwenimage_edit_pipeline
from .qwenimage_variants import QWENIMAGE_VARIANTS, qwenimage_variant_inputs, qwenimage_variant_pipeline
from .sd3 import sd3_inputs, sd3_pipeline
from .wan import (
    wan_i2v_inputs,
    wan_i2v_pipeline,
    wan_inputs,
    wan_pipeline,
    wan_text_encoder,
    wan_vace_inputs,
    wan_vace_pipeline,
)
from .zimage import zimage_img2img_inputs, zimage_img2img_pipeline, zimage_inputs, zimage_pipeline

__all__ = [
    "QWENIMAGE_CONFIGS",
    "qwen_text_encoder",
    "qwenimage_pipeline",
    "qwenimage_inputs",
    "qwenimage_edit_pipeline",
    "QWENIMAGE_VARIANTS",
    "qwenimage_variant_pipeline",
    "qwenimage_variant_inputs",
    "flux_pipeline",
    "flux_inputs",
    "flux_kontext_pipeline",
    "flux_kontext_inputs",
    "flux_img2img_pipeline",
    "flux_img2img_inputs",
    "flux_inpaint_pipeline",
    "flux_inpaint_inputs",
    "tiny_image",
    "tiny_mask",
    "flux2_klein_pipeline",
    "flux2_klein_inputs",
    "zimage_pipeline",
    "zimage_inputs",
    "zimage_img2img_pipeline",
    "zimage_img2img_inputs",
    "longcat_pipeline",
    "longcat_inputs",
    "longcat_edit_pipeline",
    "longcat_edit_inputs",
    "hunyuanvideo15_pipeline",
    "hunyuanvideo15_inputs",
    "hunyuanvideo15_i2v_pipeline",
    "hunyuanvideo15_i2v_inputs",
    "flux_text_encoders",
    "sd3_pipeline",
    "sd3_inputs",
    "wan_pipeline",
    "wan_inputs",
    "wan_i2v_pipeline",
    "wan_i2v_inputs",
    "wan_vace_pipeline",
    "wan_vace_inputs",
    "wan_text_encoder",
    "ltx_pipeline",
    "ltx_inputs",
    "cogvideox_pipeline",
    "cogvideox_inputs",
    "hunyuanvideo_pipeline",
    "hunyuanvideo_inputs",
    "ltx2_pipeline",
    "ltx2_inputs",
]
