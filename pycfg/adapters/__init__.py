"""One adapter per diffusers pipeline family. ``find_adapter`` picks one by the pipeline's class."""

from __future__ import annotations

from .qwenimage import QwenImageAdapter

ADAPTERS = [QwenImageAdapter]


def supported_pipelines() -> list[str]:
    return sorted(name for adapter in ADAPTERS for name in adapter.pipeline_classes)


def find_adapter(pipeline):
    for klass in type(pipeline).__mro__:
        for adapter in ADAPTERS:
            if klass.__name__ in adapter.pipeline_classes:
                return adapter
    raise TypeError(
        f"pycfg has no adapter for {type(pipeline).__name__}; supported pipelines: "
        f"{', '.join(supported_pipelines())}. See the README's 'Writing an adapter' section to add one."
    )
