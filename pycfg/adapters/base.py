"""Shared pieces of the adapters: argument binding, the private scheduler copy, callbacks, progress bars."""

from __future__ import annotations

import contextlib
import inspect
import sys
from types import ModuleType
from typing import Any

import torch

from ..runtime.job import Job
from ..schedulers import SchedulerStep, make_scheduler_update  # noqa: F401


class Adapter:
    """Turns one pipeline call into a :class:`~pycfg.runtime.job.Job`, and back into the pipeline's output."""

    pipeline_classes: tuple[str, ...] = ()
    #: call arguments whose values reach the denoising steps only through the job's ``graph_inputs`` tensors or
    #: the guidance scale (prompts, embeddings, seeds, scales) or not at all (output options): requests that
    #: differ only in these replay the same captured steps
    graph_value_args: tuple[str, ...] = ()

    #: the transformer forward may run context-parallel (pycfg.compile's ring_degree / ulysses_degree): the
    #: adapter implements ``context_parallel_lengths`` and its transformer has a diffusers ``_cp_plan``
    context_parallel: bool = False

    def __init__(self, pipe, fused: bool | None = None, noise: str = "philox") -> None:
        self.pipe = pipe
        self.fused = fused
        self.noise = noise
        self.signature = inspect.signature(type(pipe).__call__)

    def make_update(self, scheduler, timesteps, generator=None, **step_kwargs):
        """The per-step update for a configured private scheduler: the seam where the fused kernel plugs in.

        ``generator`` is the request's: stochastic solvers on the fused path derive their noise seed from it
        (see :func:`pycfg.schedulers.make_scheduler_update`). It is not passed to ``step()``: a pipeline that
        passes one names it in ``step_kwargs`` itself, exactly as its stock loop does.
        """
        device = getattr(self.pipe, "_execution_device", None)
        return make_scheduler_update(scheduler, timesteps, step_kwargs, fused=self.fused, noise=self.noise,
                                     generator=generator, device=device)

    @property
    def module(self) -> ModuleType:
        """The pipeline's own module, for its helpers (``retrieve_timesteps``, ``calculate_shift``, ...).

        For a user's subclass of a stock pipeline, the module of the stock class this adapter serves: the
        subclass's own module does not define the stock helpers.
        """
        for klass in type(self.pipe).__mro__:
            if klass.__name__ in self.pipeline_classes:
                return sys.modules[klass.__module__]
        return sys.modules[type(self.pipe).__module__]

    def bind(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The call's arguments with the pipeline's defaults filled in; unknown names raise TypeError."""
        try:
            bound = self.signature.bind(self.pipe, **kwargs)
        except TypeError as err:
            allowed = [p for p in self.signature.parameters if p != "self"]
            raise TypeError(f"{type(self.pipe).__name__}: {err}; allowed arguments: {', '.join(allowed)}") from None
        bound.apply_defaults()
        args = dict(bound.arguments)
        args.pop("self")
        return args

    def private_scheduler(self):
        """A fresh scheduler from the pipeline scheduler's config, for one request.

        Built from the config rather than copied, so it carries no state from earlier runs of the user's
        scheduler: ranks whose schedulers have different histories still start from the same bits, and the
        user's object is never stepped.
        """
        scheduler = self.pipe.scheduler
        return type(scheduler).from_config(scheduler.config)

    def denoise_job(self, *, latents: torch.Tensor, timesteps, policy, forward, update, finish, step_end,
                    prediction_dtype: torch.dtype, not_graphable: str | None = None,
                    graph_inputs=None) -> Job:
        """The Job of a pipeline with one latent tensor and one prediction tensor per branch, with the fields
        every such adapter fills the same way (interrupt flag, progress bar, solver state)."""
        return Job(
            latents=latents,
            num_steps=len(timesteps),
            policy=policy,
            forward=forward,
            update=update,
            prediction_spec=[(tuple(latents.shape), prediction_dtype)],
            device=latents.device,
            finish=finish,
            step_end=step_end,
            interrupted=lambda: self.pipe._interrupt,
            progress=self.progress,
            state_tensors=update.state_tensors,
            not_graphable=not_graphable,
            graph_inputs=graph_inputs,
        )

    def context_parallel_lengths(self, a: dict[str, Any]) -> dict[str, tuple[int, str]]:
        """The sequences context parallelism splits for the checked call arguments ``a``, before any model runs:
        what -> (token count, the arguments that set it). Text an adapter pads to the degree is not listed."""
        raise NotImplementedError(f"{type(self).__name__} does not run context-parallel")

    def progress(self, total: int, enabled: bool):
        """The pipeline's own progress bar (honouring ``set_progress_bar_config``) on one rank only."""
        if enabled:
            return self.pipe.progress_bar(total=total)
        return contextlib.nullcontext()


OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def check_output_type(output_type: str) -> None:
    """The output types every supported pipeline's postprocessing takes."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(map(repr, OUTPUT_TYPES))}, got {output_type!r}")


def own_tensor(t: torch.Tensor | None, original) -> torch.Tensor | None:
    """``t``, copied if it still shares memory with the caller's ``original`` (a tensor, or a list or dict of
    call arguments), so nothing of theirs is ever written."""
    if t is None:
        return t
    if isinstance(original, dict):
        original = list(original.values())
    originals = original if isinstance(original, (list, tuple)) else [original]
    ptr = t.untyped_storage().data_ptr()
    if any(isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() == ptr for o in originals):
        return t.clone()
    return t
