"""Request bodies of the OpenAI-compatible endpoints and what each becomes as pipeline arguments.

OpenAI's fields (``model``, ``prompt``, ``n``, ``size``, ``response_format``, ``user``) sit beside the pipeline's
own (``negative_prompt``, ``true_cfg_scale`` / ``guidance_scale``, ``num_inference_steps``, ``seed``), all in one
JSON body (what OpenAI clients send as ``extra_body``) or one multipart form. Unknown fields are refused, naming
them. Only the fields a client sets reach the pipeline; the rest keep the pipeline's own defaults.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..engine import Limits
from .errors import APIError, invalid
from .models import ModelSpec

MAX_SEED = 2**63 - 1
_SIZE = re.compile(r"^([1-9][0-9]{0,5})x([1-9][0-9]{0,5})$")


@dataclass(frozen=True)
class RequestLimits:
    """Bounds of requests over HTTP beside the engine's own :class:`pycfg.Limits` (pixels, frames, images, steps),
    which the HTTP layer checks too, to answer 400 naming the request field before the engine sees it."""

    max_prompt_chars: int = 4000  # prompt and negative_prompt, each
    max_input_images: int = 4  # image files of one edit request

    def __post_init__(self) -> None:
        for name in ("max_prompt_chars", "max_input_images"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(1, ge=1)
    size: str | None = None
    response_format: str | None = None
    user: str | None = None
    negative_prompt: str | None = None
    true_cfg_scale: float | None = Field(None, ge=0)
    guidance_scale: float | None = Field(None, ge=0)
    num_inference_steps: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)

    def task_arguments(self, spec: ModelSpec, bounds: Limits) -> dict[str, Any]:
        """The arguments only this endpoint's pipelines take."""
        return {"num_images_per_prompt": self.n}


class ImageGenerationRequest(_Request):
    """``POST /v1/images/generations`` (JSON)."""


class ImageEditRequest(_Request):
    """``POST /v1/images/edits`` (multipart form; the ``image`` and ``mask`` files travel beside these fields)."""

    strength: float | None = Field(None, ge=0, le=1)

    def task_arguments(self, spec: ModelSpec, bounds: Limits) -> dict[str, Any]:
        args = super().task_arguments(spec, bounds)
        if self.strength is not None:
            args["strength"] = self.strength
        return args


class VideoRequest(_Request):
    """``POST /v1/videos`` (JSON). ``response_format``: ``"mp4"`` (default) or ``"png_frames"``."""

    num_frames: int | None = Field(None, ge=1)
    fps: int | None = Field(None, ge=1, le=120)

    def task_arguments(self, spec: ModelSpec, bounds: Limits) -> dict[str, Any]:
        args: dict[str, Any] = {"num_videos_per_prompt": self.n}
        frames = self.num_frames if self.num_frames is not None else spec.default_frames
        if frames is not None:
            if bounds.max_frames is not None and frames > bounds.max_frames:
                raise invalid(f"num_frames must be at most {bounds.max_frames}, got {frames}.", "num_frames")
            if (frames - 1) % spec.frame_multiple:
                raise invalid(f"num_frames - 1 must be a multiple of {spec.frame_multiple} for this model, got "
                              f"{frames}.", "num_frames")
            args["num_frames"] = frames
        return args


def parse(model: type[_Request], data: Any) -> _Request:
    """Validate ``data`` as ``model``; a 400 naming the first offending field otherwise."""
    if not isinstance(data, dict):
        raise invalid("The request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors(include_url=False, include_input=False)[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        message = first["msg"]
        if first["type"] == "extra_forbidden":
            allowed = ", ".join(model.model_fields)
            message = f"Unknown field {param!r}; allowed: {allowed}."
        elif first["type"] == "missing":
            message = f"Missing required field {param!r}."
        else:
            message = f"Invalid value for {param!r}: {message}."
        raise invalid(message, param=param) from None


def _size(spec: ModelSpec, size: str | None, bounds: Limits) -> tuple[int, int] | None:
    if size is None or size == "auto":
        return spec.default_size
    match = _SIZE.match(size)
    if not match:
        raise invalid(f"Invalid size {size!r}: expected 'WIDTHxHEIGHT' such as '1024x1024', or 'auto'.", "size")
    width, height = int(match.group(1)), int(match.group(2))
    m = spec.size_multiple
    if width % m or height % m:
        raise invalid(f"Invalid size {size!r}: width and height must be multiples of {m} for this model.", "size")
    max_pixels = bounds.max_pixels
    if max_pixels is not None and width * height > max_pixels:
        raise invalid(f"Invalid size {size!r}: at most {max_pixels} pixels per image.", "size")
    return width, height


def pipeline_arguments(spec: ModelSpec, req: _Request, limits: RequestLimits, bounds: Limits) -> dict[str, Any]:
    """The pipeline keyword arguments of a validated request (plus ``generator``); 400 naming the field for
    values past ``limits`` or the engine's ``bounds``.

    ``seed`` becomes ``torch.Generator("cpu").manual_seed(seed)``: the image equals the stock pipeline's for the
    same arguments and that generator. Without a seed, a random one is drawn (and reported in the response).
    """
    import torch

    if req.model is not None and req.model != spec.name:
        raise APIError(404, f"The model {req.model!r} does not exist; this server serves {spec.name!r}.",
                       param="model", code="model_not_found")
    for name in ("prompt", "negative_prompt"):
        text = getattr(req, name)
        if text is not None and len(text) > limits.max_prompt_chars:
            raise invalid(f"{name} is longer than {limits.max_prompt_chars} characters.", name)
    if bounds.max_images_per_request is not None and req.n > bounds.max_images_per_request:
        raise invalid(f"n must be at most {bounds.max_images_per_request}, got {req.n}.", "n")
    steps = req.num_inference_steps
    if steps is not None and bounds.max_steps is not None and steps > bounds.max_steps:
        raise invalid(f"num_inference_steps must be at most {bounds.max_steps}, got {steps}.", "num_inference_steps")
    kwargs: dict[str, Any] = {"prompt": req.prompt}
    for name in ("negative_prompt", "true_cfg_scale", "guidance_scale", "num_inference_steps"):
        value = getattr(req, name)
        if value is not None:
            kwargs[name] = value
    size = _size(spec, req.size, bounds)
    if size is not None:
        kwargs["width"], kwargs["height"] = size
    seed = req.seed if req.seed is not None else secrets.randbelow(MAX_SEED + 1)
    kwargs["generator"] = torch.Generator("cpu").manual_seed(seed)
    kwargs["output_type"] = "pil"
    kwargs.update(req.task_arguments(spec, bounds))
    return kwargs


# pipeline argument -> the request field a client knows it by
API_FIELD = {"height": "size", "width": "size", "num_images_per_prompt": "n", "num_videos_per_prompt": "n",
             "mask_image": "mask", "generator": "seed"}


def seed_of(kwargs: dict[str, Any]) -> int:
    return kwargs["generator"].initial_seed()
