"""What `pycfg serve MODEL` serves: a local diffusers folder or a built-in tiny random-weight model.

A :class:`ModelSpec` is everything the HTTP layer must know about the pipeline without holding it (the driver
never builds the pipeline; the Engine's workers do): which endpoint it answers, its default size and the
multiple every size must be, and a picklable factory for the workers.
"""

from __future__ import annotations

import enum
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

TINY_PREFIX = "tiny:"
DEFAULT_MODEL = "tiny:qwen-image"


class Task(enum.Enum):
    """Which endpoint a pipeline answers."""

    IMAGE = "image"  # /v1/images/generations
    EDIT = "edit"  # /v1/images/edits (edit, img2img, inpaint: the pipeline takes ``image``)
    VIDEO = "video"  # /v1/videos


@dataclass(frozen=True)
class ModelSpec:
    """A servable model.

    ``factory`` builds the pipeline inside each worker (called with ``device=``); it is a module-level function
    or a ``functools.partial`` of one, so it crosses the process boundary. Sizes are ``(width, height)``.
    """

    name: str
    pipeline_class: str
    task: Task
    factory: Callable[..., Any]
    size_multiple: int
    default_size: tuple[int, int] | None = None  # None: the pipeline's own default
    default_frames: int | None = None  # video only; None: the pipeline's own default
    frame_multiple: int = 1  # video only: num_frames - 1 must divide by this (the VAE's temporal downscale)
    fps: int = 16

    def describe(self) -> dict[str, Any]:
        return {"pipeline": self.pipeline_class, "task": self.task.value, "size_multiple": self.size_multiple,
                "default_size": None if self.default_size is None else "{}x{}".format(*self.default_size)}


# -- worker-side factories (module level: they are pickled to the workers) ----------------------------------------


def _tiny_qwen_image(device=None):
    from ..tiny import qwenimage_pipeline

    return qwenimage_pipeline("tiny", text_encoder=True).to(device)


def _tiny_qwen_image_edit(device=None):
    from ..tiny import qwenimage_edit_pipeline

    return qwenimage_edit_pipeline().to(device)


def _tiny_flux(device=None):
    from ..tiny import flux_pipeline

    return flux_pipeline(text_encoder=True).to(device)


def _tiny_wan(device=None):
    from ..tiny import wan_pipeline

    return wan_pipeline(text_encoder=True).to(device)


def _local_pipeline(path: str, dtype: str | None, device=None):
    import torch
    from diffusers import DiffusionPipeline

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=dtypes[dtype] if dtype else None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


# -- specs ----------------------------------------------------------------------------------------------------------

TINY_MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        # tiny Qwen-Image VAE: scale factor 4, 2x2 patches
        ModelSpec("tiny:qwen-image", "QwenImagePipeline", Task.IMAGE, _tiny_qwen_image, 8, (32, 32)),
        # tiny edit VAE: scale factor 64 (inputs are encoded at about one megapixel), 2x2 patches
        ModelSpec("tiny:qwen-image-edit", "QwenImageEditPipeline", Task.EDIT, _tiny_qwen_image_edit, 128,
                  (128, 128)),
        # tiny Flux VAE: scale factor 1, latents packed 2x2
        ModelSpec("tiny:flux", "FluxPipeline", Task.IMAGE, _tiny_flux, 2, (32, 32)),
        # tiny Wan VAE: spatial scale factor 8, 2x2 patches
        ModelSpec("tiny:wan", "WanPipeline", Task.VIDEO, _tiny_wan, 16, (16, 16), default_frames=9, frame_multiple=4),
    )
}

_VIDEO_FAMILIES = ("Wan", "LTX", "CogVideoX", "HunyuanVideo")
_EDIT_MARKERS = ("Edit", "Img2Img", "Inpaint", "Kontext", "ImageToVideo")


def _task_of(pipeline_class: str) -> Task:
    if any(pipeline_class.startswith(family) for family in _VIDEO_FAMILIES):
        return Task.VIDEO
    if any(marker in pipeline_class for marker in _EDIT_MARKERS):
        return Task.EDIT
    return Task.IMAGE


def _vae_multiples(folder: Path) -> tuple[int, int]:
    """(what every width and height must divide by, what num_frames - 1 must divide by): the VAE's spatial
    downscale times the 2x2 latent patches, and its temporal downscale, read from the VAE's config as the
    pipelines compute their ``vae_scale_factor``."""
    config_file = folder / "vae" / "config.json"
    if not config_file.is_file():
        return 16, 1
    vae = json.loads(config_file.read_text())
    temporal = 1
    if "temperal_downsample" in vae:  # the Qwen-Image and Wan VAEs
        spatial = 2 ** len(vae["temperal_downsample"])
        temporal = 2 ** sum(bool(t) for t in vae["temperal_downsample"])
    elif "spatial_compression_ratio" in vae:
        spatial = int(vae["spatial_compression_ratio"])
        temporal = int(vae.get("temporal_compression_ratio", 1))
    elif "block_out_channels" in vae:
        spatial = 2 ** (len(vae["block_out_channels"]) - 1)
    else:
        spatial = 8
    return 2 * spatial, temporal


def load_model_spec(model: str, dtype: str | None = None) -> ModelSpec:
    """The spec of ``model``: a ``tiny:*`` name or the path of a local diffusers model folder (read offline).

    Raises ``ValueError`` naming the allowed values for an unknown tiny name, a missing folder, or a pipeline
    pycfg has no adapter for.
    """
    from .. import supported_pipelines

    if model.startswith(TINY_PREFIX):
        if model not in TINY_MODELS:
            raise ValueError(f"unknown built-in model {model!r}; allowed: {', '.join(TINY_MODELS)}")
        spec = TINY_MODELS[model]
        if spec.pipeline_class not in supported_pipelines():
            raise ValueError(f"{model} needs {spec.pipeline_class} support, which this pycfg version lacks; "
                             f"supported: {', '.join(supported_pipelines())}")
        return spec
    folder = Path(model).expanduser()
    index = folder / "model_index.json"
    if not index.is_file():
        raise ValueError(f"MODEL must be a local diffusers model folder (with model_index.json) or one of "
                         f"{', '.join(TINY_MODELS)}; {model!r} is neither")
    pipeline_class = json.loads(index.read_text()).get("_class_name", "")
    if pipeline_class not in supported_pipelines():
        raise ValueError(f"{model!r} holds a {pipeline_class or 'pipeline of unknown class'}, which pycfg does not "
                         f"support; supported: {', '.join(supported_pipelines())}")
    if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be one of float32, bfloat16, float16; got {dtype!r}")
    size_multiple, frame_multiple = _vae_multiples(folder)
    return ModelSpec(
        name=folder.resolve().name,
        pipeline_class=pipeline_class,
        task=_task_of(pipeline_class),
        factory=functools.partial(_local_pipeline, str(folder.resolve()), dtype),
        size_multiple=size_multiple,
        frame_multiple=frame_multiple,
    )
