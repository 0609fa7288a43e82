"""What the driver checks before a request reaches any worker: names, basic values, and :class:`Limits`.

Also the one place where the engine's compile options are validated (:func:`check_compile_options`): the
workers pass them to :func:`pycfg.compile` as keyword arguments.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import pickle
from typing import TYPE_CHECKING, Any, Sequence

import torch

from .errors import InvalidRequestError

if TYPE_CHECKING:
    from ..options import CompileOptions

#: compile() options the engine sets itself, or that cannot cross a process boundary
ENGINE_OWNED_OPTIONS = ("pipeline", "cfg_parallel_size", "timeout", "group")


@dataclasses.dataclass(frozen=True)
class Limits:
    """Bounds on one request, enforced in the driver before any worker sees it.

    The defaults admit what the supported pipelines are made for (a 2048 x 2048 image, a few seconds of video,
    a batch of 8, 200 steps) and refuse requests that would hold the workers for hours or exhaust memory.
    ``None`` lifts a bound.
    """

    #: height * width of one image or frame (an unspecified side counts as the specified one)
    max_pixels: int | None = 2048 * 2048
    #: ``num_frames`` of a video request
    max_frames: int | None = 257
    #: images (or videos) per request: prompts in the batch times ``num_images_per_prompt``
    max_images_per_request: int | None = 8
    #: ``num_inference_steps`` (or the length of ``sigmas`` / ``timesteps``)
    max_steps: int | None = 200
    #: bytes of the request as it travels to the workers (tensors included)
    max_request_bytes: int | None = 256 << 20

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"Limits.{field.name} must be None or an integer >= 1, got {value!r}")

    def check(self, kwargs: dict[str, Any]) -> None:
        """Raise :class:`InvalidRequestError` naming the argument and the limit a request exceeds."""
        steps = kwargs.get("num_inference_steps")
        for name in ("sigmas", "timesteps"):
            if kwargs.get(name) is not None:
                steps = len(kwargs[name])
        _at_most("num_inference_steps", steps, self.max_steps, "max_steps")
        height, width = kwargs.get("height"), kwargs.get("width")
        if (height is not None or width is not None) and self.max_pixels is not None:
            pixels = (height or width) * (width or height)
            if pixels > self.max_pixels:
                raise InvalidRequestError(f"height x width = {height} x {width} is {pixels} pixels, over the "
                                          f"engine's limit of {self.max_pixels} (Limits.max_pixels)")
        _at_most("num_frames", kwargs.get("num_frames"), self.max_frames, "max_frames")
        images = request_batch(kwargs) * (kwargs.get("num_images_per_prompt") or 1)
        if self.max_images_per_request is not None and images > self.max_images_per_request:
            raise InvalidRequestError(f"the request asks for {images} images (batch x num_images_per_prompt), over "
                                      f"the engine's limit of {self.max_images_per_request} "
                                      "(Limits.max_images_per_request)")

    def check_size(self, nbytes: int) -> None:
        if self.max_request_bytes is not None and nbytes > self.max_request_bytes:
            raise InvalidRequestError(f"the request is {nbytes} bytes, over the engine's limit of "
                                      f"{self.max_request_bytes} (Limits.max_request_bytes)")


def _at_most(name: str, value: Any, limit: int | None, field: str) -> None:
    if value is not None and limit is not None and value > limit:
        raise InvalidRequestError(f"{name}={value} is over the engine's limit of {limit} (Limits.{field})")


def request_batch(kwargs: dict[str, Any]) -> int:
    """Prompts in a request: a list's length, else the batch of its prompt embeddings, else one."""
    prompt = kwargs.get("prompt")
    if isinstance(prompt, (list, tuple)):
        return len(prompt)
    embeds = kwargs.get("prompt_embeds")
    if isinstance(embeds, torch.Tensor) and embeds.ndim:
        return int(embeds.shape[0])
    return 1


_INTEGERS = ("num_inference_steps", "height", "width", "num_images_per_prompt", "num_frames", "max_sequence_length")


def check_value(name: str, value: Any) -> None:
    """Basic value checks a worker would otherwise only make after the request crossed a process boundary."""
    if value is None:
        return
    if name in _INTEGERS:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise InvalidRequestError(f"{name} must be an integer, got {value!r}")
        if value < 1:
            raise InvalidRequestError(f"{name} must be >= 1, got {value!r}")
    elif name.endswith("scale") or name.endswith("scale_2") or name in ("guidance_rescale", "eta", "strength"):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise InvalidRequestError(f"{name} must be a finite number, got {value!r}")
        if name == "strength" and not 0 <= value <= 1:
            raise InvalidRequestError(f"strength must be in [0, 1], got {value!r}")
    elif name in ("sigmas", "timesteps"):
        try:
            ok = all(isinstance(s, numbers.Real) and not isinstance(s, bool) and math.isfinite(s) for s in value)
        except TypeError:
            ok = False
        if not ok or len(value) == 0:
            raise InvalidRequestError(f"{name} must be a non-empty sequence of finite numbers, got {value!r}")
    elif name == "output_type" and not isinstance(value, str):
        raise InvalidRequestError(f"output_type must be a string, got {value!r}")


def check_request(kwargs: dict[str, Any], signature: Sequence[tuple[str, str, bool]], pipeline: str,
                  limits: Limits) -> None:
    """A request's argument names against the pipeline's ``__call__`` (``signature``: (name, kind, has_default)
    per parameter), its basic values, and the engine's limits."""
    names = {name for name, kind, _ in signature if kind not in ("VAR_POSITIONAL", "VAR_KEYWORD")}
    open_ended = any(kind == "VAR_KEYWORD" for _, kind, _ in signature)
    unknown = sorted(k for k in kwargs if k not in names and k != "guidance")
    if unknown and not open_ended:
        raise InvalidRequestError(
            f"{pipeline} takes no argument(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(sorted(names | {'guidance'}))}"
        )
    missing = [name for name, kind, has_default in signature
               if not has_default and kind in ("POSITIONAL_OR_KEYWORD", "KEYWORD_ONLY") and name not in kwargs]
    if missing:
        raise InvalidRequestError(f"missing required argument(s): {', '.join(missing)}")
    for name, value in kwargs.items():
        check_value(name, value)
    guidance = kwargs.get("guidance")
    if guidance is not None:
        from ..guidance import GuidancePolicy

        if not isinstance(guidance, GuidancePolicy):
            raise InvalidRequestError(f"guidance must be a pycfg.guidance policy, got {type(guidance).__name__}")
    limits.check(kwargs)


def check_compile_options(options: dict[str, Any], cfg_parallel_size: int, timeout: float) -> CompileOptions:
    """The compile options the engine's workers will pass to :func:`pycfg.compile`, validated once by the same
    :class:`~pycfg.options.CompileOptions` that ``compile()`` builds: known names, not ones the engine sets itself,
    allowed values, picklable. The one place they are checked before any worker starts."""
    from ..options import CompileOptions

    allowed = [name for name in CompileOptions.names() if name not in ENGINE_OWNED_OPTIONS]
    for name in options:
        if name in ENGINE_OWNED_OPTIONS:
            raise TypeError(f"Engine sets compile option {name!r} itself")
        if name not in allowed:
            raise TypeError(f"unknown compile option {name!r}; allowed: {', '.join(allowed)}")
    try:
        pickle.dumps(options)
    except Exception as err:
        raise TypeError(f"compile options must be picklable to reach the workers: {err}") from None
    return CompileOptions(cfg_parallel_size=cfg_parallel_size, timeout=timeout, **options)


def signature_info(pipe) -> list[tuple[str, str, bool]]:
    """(name, kind, has_default) of each parameter of the pipeline's ``__call__``: what the driver validates
    requests against, without ever holding the pipeline itself."""
    sig = inspect.signature(type(pipe).__call__)
    return [(p.name, p.kind.name, p.default is not inspect.Parameter.empty)
            for p in sig.parameters.values() if p.name != "self"]
