"""One adapter per diffusers pipeline family. ``find_adapter`` picks one by the pipeline's class."""

from __future__ import annotations

from .cogvideox import CogVideoXAdapter
from .flux import FluxAdapter
from .hunyuanvideo import HunyuanVideoAdapter
from .ltx import LTXAdapter
from .ltx2 import LTX2Adapter
from .qwenimage import QwenImageAdapter
from .qwenimage21 import QwenImage21Adapter
from .qwenimage_edit import QwenImageEditAdapter, QwenImageEditPlusAdapter
from .qwenimage_img2img import QwenImageEditInpaintAdapter, QwenImageImg2ImgAdapter, QwenImageInpaintAdapter
from .qwenimage_layered import QwenImageLayeredAdapter
from .sd3 import StableDiffusion3Adapter
from .wan import WanAdapter

ADAPTERS = [
    QwenImageAdapter,
    QwenImageEditAdapter,
    QwenImageEditPlusAdapter,
    QwenImageImg2ImgAdapter,
    QwenImageInpaintAdapter,
    QwenImageEditInpaintAdapter,
    QwenImageLayeredAdapter,
    QwenImage21Adapter,
    FluxAdapter,
    StableDiffusion3Adapter,
    WanAdapter,
    LTXAdapter,
    LTX2Adapter,
    CogVideoXAdapter,
    HunyuanVideoAdapter,
]


def supported_pipelines() -> list[str]:
    return sorted(name for adapter in ADAPTERS for name in adapter.pipeline_classes)


def find_adapter(pipeline):
    for klass in type(pipeline).__mro__:
        for adapter in ADAPTERS:
            if klass.__name__ in adapter.pipeline_classes:
                return adapter
    raise TypeError(
        f"pycfg has no adapter for {type(pipeline).__name__}; supported pipelines: "
        f"{', '.join(supported_pipelines())}. docs/adapters.md explains how to write one."
    )
