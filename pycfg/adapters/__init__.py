"""One adapter per diffusers pipeline family. ``find_adapter`` picks one by the pipeline's class."""

from __future__ import annotations

from .base import Adapter
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
from .qwenimage21 import QwenImage21Adapter
from .qwenimage_edit import QwenImageEditAdapter, QwenImageEditPlusAdapter
from .qwenimage_img2img import QwenImageEditInpaintAdapter, QwenImageImg2ImgAdapter, QwenImageInpaintAdapter
from .qwenimage_layered import QwenImageLayeredAdapter
from .sd3 import StableDiffusion3Adapter
from .wan import WanAdapter
from .wan_variants import WanImageToVideoAdapter, WanVACEAdapter
from .zimage import ZImageAdapter, ZImageImg2ImgAdapter

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


#: adapters registered with :func:`register_adapter`, by pipeline class name; they take precedence over the
#: built-in ones, so a user can also replace the adapter of a supported pipeline
_REGISTERED: dict[str, type[Adapter]] = {}


def register_adapter(pipeline: type | str, adapter: type[Adapter]) -> None:
    """Make ``pycfg.compile`` use ``adapter`` for ``pipeline`` (a pipeline class, or its class name) and its
    subclasses. A later registration for the same name replaces an earlier one.

    ``adapter`` is a subclass of ``pycfg.adapters.Adapter`` (usually of the family adapter whose pipeline yours
    extends); docs/adapters.md shows how to write one.
    """
    if isinstance(pipeline, type):
        name = pipeline.__name__
    elif isinstance(pipeline, str) and pipeline.isidentifier():
        name = pipeline
    else:
        raise TypeError(f"pipeline must be a pipeline class or its class name, got {pipeline!r}")
    if not (isinstance(adapter, type) and issubclass(adapter, Adapter)):
        raise TypeError(f"adapter must be a subclass of pycfg.adapters.Adapter, got {adapter!r}")
    _REGISTERED[name] = adapter


def supported_pipelines() -> list[str]:
    """The pipeline class names ``pycfg.compile`` accepts: the built-in adapters' and the registered ones."""
    return sorted({name for adapter in ADAPTERS for name in adapter.pipeline_classes} | set(_REGISTERED))


def find_adapter(pipeline):
    for klass in type(pipeline).__mro__:
        if klass.__name__ in _REGISTERED:
            return _REGISTERED[klass.__name__]
        for adapter in ADAPTERS:
            if klass.__name__ in adapter.pipeline_classes:
                return adapter
    raise TypeError(
        f"pycfg has no adapter for {type(pipeline).__name__}; supported pipelines: "
        f"{', '.join(supported_pipelines())}. Write an adapter and register it with pycfg.register_adapter "
        "(docs/adapters.md shows how)."
    )
