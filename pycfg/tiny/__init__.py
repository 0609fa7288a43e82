"""Small random-weight pipelines built in code: no downloads, fixed seeds. Used by the demo, tests and benchmarks.

``text_encoder`` and ``tokenizer`` are None by default: pass ``prompt_embeds`` (+ masks) directly, as from any
encoder. ``qwenimage_pipeline(text_encoder=True)`` (a tiny Qwen2.5-VL), ``flux_pipeline(text_encoder=True)`` (tiny
CLIP + T5) and ``wan_pipeline(text_encoder=True)`` (a tiny UMT5) also build text encoders and byte-level BPE
tokenizers in code, so string prompts go through the pipeline's own ``encode_prompt``.
"""

from .cogvideox import cogvideox_inputs, cogvideox_pipeline
from .flux import flux_inputs, flux_pipeline, flux_text_encoders
from .hunyuanvideo import hunyuanvideo_inputs, hunyuanvideo_pipeline
from .ltx import ltx_inputs, ltx_pipeline
from .ltx2 import ltx2_inputs, ltx2_pipeline
from .qwenimage import QWENIMAGE_CONFIGS, qwen_text_encoder, qwenimage_inputs, qwenimage_pipeline
from .qwenimage_edit import qwen_vl_text_encoder, qwenimage_edit_pipeline
from .qwenimage_variants import QWENIMAGE_VARIANTS, qwenimage_variant_inputs, qwenimage_variant_pipeline
from .sd3 import sd3_inputs, sd3_pipeline
from .wan import wan_inputs, wan_pipeline, wan_text_encoder

__all__ = [
    "QWENIMAGE_CONFIGS",
    "qwen_text_encoder",
    "qwenimage_pipeline",
    "qwenimage_inputs",
    "qwen_vl_text_encoder",
    "qwenimage_edit_pipeline",
    "QWENIMAGE_VARIANTS",
    "qwenimage_variant_pipeline",
    "qwenimage_variant_inputs",
    "flux_pipeline",
    "flux_inputs",
    "flux_text_encoders",
    "sd3_pipeline",
    "sd3_inputs",
    "wan_pipeline",
    "wan_inputs",
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
