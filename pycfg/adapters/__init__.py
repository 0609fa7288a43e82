"""One adapter per diffusers pipeline family. ``find_adapter`` picks one by the pipeline's class."""

from __future__ import annotations

from .cogvideox import CogVideoXAdapter
from .flux import FluxAdapter
from .flux2 import Flux2KleinAdapter
from .flux_variants import FluxImg2ImgAdapter, FluxInpaintAdapter, FluxKontextAdapter
from .hunyuanvideo import HunyuanVideoAdapter
from .hunyuanvideo15 import HunyuanVideo15Adapter, HunyuanVideo15ImageToVideoAdapter
from .longcat import LongCatImageAdapter, LongCatImageEditAdapter
from .ltx import LTXAdapter
from .ltx2 import LTX2Adapter
from .qwenimage import QwenImageAdapter
from .sd3 import StableDiffusion3Adapter
from .wan import WanAdapter
from .wan_variants import WanImageToVideoAdapter, WanVACEAdapter
from .zimage import ZImageAdapter, ZImageImg2ImgAdapter

ADAPTERS = [
    QwenImageAdapter,
    FluxAdapter,
    FluxKontextAdapter,
    FluxImg2ImgAdapter,
    FluxInpaintAdapter,
    StableDiffusion3Adapter,
    WanAdapter,
    WanImageToVideoAdapter,
    WanVACEAdapter,
    LTXAdapter,
    LTX2Adapter,
    CogVideoXAdapter,
    HunyuanVideoAdapter,
    ZImageAdapter,
    ZImageImg2ImgAdapter,
    LongCatImageAdapter,
    LongCatImageEditAdapter,
    Flux2KleinAdapter,
    HunyuanVideo15Adapter,
    HunyuanVideo15ImageToVideoAdapter,
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
