"""Checks of a call's tensors that need no pipeline knowledge: run on every rank before any forward."""

from __future__ import annotations

from typing import Any, Iterator

import torch

from .job import Job

#: arguments that size the latents, named when the latents come out empty
_SIZE_ARGUMENTS = ("height", "width", "num_frames")


def _tensors(value: Any, name: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield name, value
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _tensors(item, f"{name}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{name}[{key!r}]")


def check_tensor_arguments(args: dict[str, Any], finite: bool = False) -> None:
    """Every tensor argument holds data (none on the meta device) and, with ``finite``, no NaN or Inf."""
    for name, value in args.items():
        for label, t in _tensors(value, name):
            if t.device.type == "meta":
                raise ValueError(f"{label} is on the meta device (a tensor without data); pass a tensor with values")
            if finite and (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{label} contains NaN or Inf values (check_finite=True)")


def check_job(job: Job, args: dict[str, Any], finite: bool = False) -> None:
    """The prepared latents are not empty (an image size below the pipeline's smallest) and, with ``finite``,
    hold no NaN or Inf."""
    for label, t in _tensors(job.latents, "latents"):
        if t.numel() == 0:
            sizes = ", ".join(f"{n}={args[n]!r}" for n in _SIZE_ARGUMENTS if n in args)
            raise ValueError(f"{sizes or 'the requested size'} gives empty latents of shape {tuple(t.shape)}: "
                             "the size is below this pipeline's smallest (a multiple of its VAE's downscale)")
        if finite and not bool(torch.isfinite(t).all()):
            raise ValueError(f"the prepared {label} contain NaN or Inf values (check_finite=True)")


def check_finite_result(latents: Any) -> None:
    """Raise if the denoised latents hold NaN or Inf (``check_finite=True``)."""
    for label, t in _tensors(latents, "latents"):
        if not bool(torch.isfinite(t).all()):
            raise FloatingPointError(f"the denoised {label} contain NaN or Inf values (check_finite=True)")
