"""The adapter contract: every hook the runtime calls on an adapter, and what an adapter can do, as data.

An :class:`Adapter` turns one call of a diffusers pipeline into a :class:`~pycfg.runtime.job.Job` and the
denoised latents back into the pipeline's own output. The runtime calls, per request and in this order:

1. :meth:`Adapter.check` ``(kwargs) -> args``: bind and validate the call (no model runs);
2. :meth:`Adapter.prepare` ``(args, policy) -> Job``: encode texts and images, prepare latents and timesteps,
   build the per-branch forward, the solver update and the decode (``Job.finish``);

and once at ``compile()`` with a user policy, :meth:`Adapter.check_policy`. :meth:`Adapter.default_policy`
gives the guidance the pipeline's own arguments select. Per-request choices (batched forwards or not) are
arguments of ``Job.forward``, never state on the adapter.

What an adapter can do is declared in :class:`AdapterCapabilities` (a class attribute), and read by the runtime
as it is: nothing is probed with ``getattr``.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar

import torch

from ..guidance.base import NEGATIVE, GuidancePolicy
from ..runtime.job import Job
from ..schedulers import make_scheduler_update


@dataclass(frozen=True)
class AdapterCapabilities:
    """What an adapter's jobs support; the runtime turns features on or off from these alone."""

    #: ``Job.forward`` honours ``batched=True``: active branches with the same input shapes (and the same
    #: perturbation) share one batched forward. False: always one forward per branch.
    batchable: bool = False
    #: ``Job.forward`` (and ``Job.after_update``) read per-step values only through ``StepIndex.select``, so one
    #: captured step serves every step (whole-step CUDA graphs); jobs may still opt out per request
    #: (``Job.not_graphable``)
    graph_steps: bool = False
    #: the adapter pads text inputs to ``text_bucket`` tokens with the padding masked out
    text_bucket: bool = False
    #: outputs per branch prediction (2 for video + audio); the exchange moves all of them in one collective
    outputs: int = 1
    #: the pipeline attributes holding denoising transformers that may exist (compiled, weight-keyed, checked
    #: against perturbations); absent or None ones are skipped
    transformer_modules: tuple[str, ...] = ("transformer",)
    #: call arguments whose values reach the denoising steps only through the job's ``graph_inputs`` tensors or
    #: the guidance scale (prompts, embeddings, seeds, scales) or not at all (output options): requests that
    #: differ only in these replay the same captured steps
    graph_value_args: tuple[str, ...] = ()

    @property
    def tuple_outputs(self) -> bool:
        return self.outputs > 1


class Adapter(ABC):
    """Turns one pipeline call into a :class:`~pycfg.runtime.job.Job`, and back into the pipeline's output.

    Subclasses name their pipeline classes, declare :attr:`capabilities`, and implement :meth:`check`,
    :meth:`default_policy` and :meth:`prepare`. A family adapter (one per diffusers model family) implements
    them from smaller hooks that its variants override (see ``docs/adapters.md``).
    """

    #: diffusers pipeline class names this adapter serves (matched along the pipeline's MRO)
    pipeline_classes: ClassVar[tuple[str, ...]] = ()
    capabilities: ClassVar[AdapterCapabilities] = AdapterCapabilities()

    def __init__(self, pipe, fused: bool | None = None, noise: str = "philox", text_bucket: int | None = None) -> None:
        if text_bucket is not None and not self.capabilities.text_bucket:
            raise ValueError(f"text_bucket: {type(self).__name__} does not pad text inputs")
        self.pipe = pipe
        self.fused = fused
        self.noise = noise
        #: pad text inputs to a multiple of this many tokens (zeros, masked out); None: exact lengths
        self.text_bucket = text_bucket
        self.signature = inspect.signature(type(pipe).__call__)

    # -- the hooks the runtime calls ------------------------------------------------------------------------------

    def check(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The call's arguments bound (defaults filled in) and validated with the pipeline's own checks.

        Raises ``TypeError`` / ``ValueError`` naming the argument before any model runs; never mutates
        ``kwargs`` or what it holds. The stock order: :meth:`bind`, :meth:`complete_args`, :meth:`check_inputs`,
        then the output type.
        """
        a = self.bind(kwargs)
        self.complete_args(a)
        self.check_inputs(a)
        check_output_type(a["output_type"])
        return a

    def complete_args(self, a: dict[str, Any]) -> None:  # noqa: B027  (optional hook: nothing by default)
        """Fill in, in place, what the stock call derives before it validates (default sizes, ...)."""

    def check_inputs(self, a: dict[str, Any]) -> None:
        """The pipeline's own ``check_inputs`` with the stock call's arguments (and any check the stock call
        makes itself before its first model runs). Every adapter implements it, unless it overrides
        :meth:`check` as a whole."""
        raise NotImplementedError(f"{type(self).__name__} implements neither check_inputs nor check")

    @abstractmethod
    def default_policy(self, args: dict[str, Any]) -> GuidancePolicy:
        """The guidance the pipeline's own arguments select (e.g. CFG iff a scale > 1 and a negative prompt)."""

    def check_policy(self, policy: GuidancePolicy) -> None:
        """Raise if ``policy`` cannot run on this pipeline (a perturbation out of range, a policy that cannot
        combine this pipeline's outputs); no model runs."""
        for transformer in self.transformers().values():
            policy.check_model(transformer)
        policy.check_outputs(self.capabilities.outputs)

    @abstractmethod
    def prepare(self, args: dict[str, Any], policy: GuidancePolicy | None) -> Job:
        """The request's job from :meth:`check`'s arguments; ``policy`` None selects :meth:`default_policy`.

        Never mutates the caller's ``policy`` (it is copied: policies keep per-request state)."""

    # -- helpers for implementations ------------------------------------------------------------------------------

    def transformers(self) -> dict[str, torch.nn.Module]:
        """The pipeline's denoising transformers that exist, by attribute name."""
        found = {}
        for name in self.capabilities.transformer_modules:
            model = getattr(self.pipe, name, None)
            if isinstance(model, torch.nn.Module):
                found[name] = model
        return found

    def request_policy(self, args: dict[str, Any], policy: GuidancePolicy | None) -> GuidancePolicy:
        """The policy one request runs: a copy of ``policy`` (or the default), checked against the pipeline."""
        policy = copy.deepcopy(policy) if policy is not None else self.default_policy(args)
        self.check_policy(policy)
        return policy

    @staticmethod
    def needs_negative(policy: GuidancePolicy) -> bool:
        """True when a branch of ``policy`` reads the negative prompt."""
        return any(policy.branch(name).source == NEGATIVE for name in policy.branches)

    def make_update(self, scheduler, timesteps, generator=None, **step_kwargs):
        """The per-step update for a configured private scheduler: the seam where the fused kernel plugs in.

        ``generator`` is the request's: stochastic solvers on the fused path derive their noise seed from it
        (see :func:`pycfg.schedulers.make_scheduler_update`). It is not passed to ``step()``: a pipeline that
        passes one names it in ``step_kwargs`` itself, exactly as its stock loop does.
        """
        return make_scheduler_update(scheduler, timesteps, step_kwargs, fused=self.fused, noise=self.noise,
                                     generator=generator, device=self.pipe._execution_device)

    @property
    def module(self) -> ModuleType:
        """The pipeline's own module, for its helpers (``retrieve_timesteps``, ``calculate_shift``, ...)."""
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
                    graph_inputs=None, after_update=None) -> Job:
        """The Job of a pipeline with one latent tensor and one prediction tensor per branch, with the fields
        every such adapter fills the same way (interrupt flag, progress bar)."""
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
            after_update=after_update,
            interrupted=lambda: self.pipe._interrupt,
            progress=self.progress,
            not_graphable=not_graphable,
            graph_inputs=graph_inputs,
        )

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
