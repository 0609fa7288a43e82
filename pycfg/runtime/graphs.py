"""Whole-step CUDA graphs: branch forward(s), the step's collective and the fused update, replayed per step.

One graph per step shape (the set of active branches; sizes are fixed within a request). Nothing per step is
baked into a graph: the step index lives in a 1-element device tensor that the graph itself advances, the
adapter's forward selects the timestep with it, and the scheduler's coefficient row and history-slot row are
gathered from the device tables into static one-row buffers inside the graph. The guidance scale is read from
a 1-element device tensor too. A step therefore costs one ``replay()`` on the host and no host-device
synchronisation.

Graphs are cached across requests. A :class:`StepRunner` is one request's step function together with every
tensor that function reads (the static buffers: latents, solver tables and history, the scale, and what the
job lists in ``graph_inputs``: text embeddings, timesteps, ...). A later request whose cache key matches (same
sizes, same options, same weights; see :meth:`StepGraphs.runner_for`) copies its own values into those buffers
and replays the graphs captured for the earlier one. Jobs without ``graph_inputs`` keep their graphs for one
request. A returned latent tensor is always a copy, never a cached buffer.

A shape is captured only once its eager step has run in this process (compiles, autotunes, lazy CUDA and NCCL
initialisation and the first collective all happen outside capture). The first request of a shape runs that
step eagerly as its real step and captures from the next step on. All graphs share one memory pool: no tensor
allocated inside a step outlives it, and steps never run concurrently.

Text encoders and the VAE run outside, in the adapter's prepare and finish. Steps that cannot be captured
(callbacks between steps, stochastic or table-less schedulers, guidance whose host numbers change from step to
step) run eagerly; :attr:`StepGraphs.reason` says why. Which guidance can be captured is the policy's own
declaration (:meth:`~pycfg.guidance.GuidancePolicy.kernel_guidance`, ``constant_weights``): a step whose kernel
guidance differs from another's only in the scale replays the same graph, the scale written to device memory.

The captured step is :func:`pycfg.runtime.denoise.run_step`, the eager loop's own step, run with the update's
captured form (:meth:`pycfg.schedulers.PlanUpdate.for_captured_steps`); the loop around it is the one loop of
:func:`pycfg.runtime.denoise.denoise`, with :class:`ReplaySteps` as its step strategy.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from typing import Any

import torch

from ..guidance.base import GuidancePolicy, KernelGuidance
from ..parallel.comm import Communicator
from ..schedulers.update import PlanUpdate
from ..steps import StepIndex
from .denoise import Exchange, StepStrategy, run_step
from .job import Job

#: communicators whose collectives can be captured (torch.distributed's NCCL watchdog is not graph-aware)
CAPTURABLE_COMMS = ("local", "nccl-ext")


def policy_key(policy: GuidancePolicy, exchange: str, size: int) -> tuple:
    """What of a policy a captured step bakes in: its kind and :meth:`~GuidancePolicy.capture_key`, plus its
    whole description where the reduce exchange weights each rank's prediction with host numbers before the
    all-reduce; elsewhere the fused kernel reads the scale on device."""
    key = (type(policy).__name__, *policy.capture_key())
    return key + ((policy.describe(),) if exchange == "reduce" and size > 1 else ())


#: (active branches, the kernel guidance without its scale): one captured step per distinct key in a request
StepKey = tuple[tuple[str, ...], Any]


def step_keys(policy: GuidancePolicy, num_steps: int, exchange: str, size: int) -> tuple[list[StepKey] | None, str]:
    """Per step, the key of the captured step that serves it; or None and why no captured step can.

    A step is captured when every host number in it is the same at every step with its key: either the policy
    says so (``constant_weights``), or the kernel computes its combine and only the scale, read on device,
    changes. The reduce exchange weights predictions with host numbers before its collective, so there (with
    more than one rank) only constant weights qualify.
    """
    keys: list[StepKey] = []
    reduce_weights = exchange == "reduce" and size > 1
    for i in range(num_steps):
        active = tuple(policy.active(i))
        how: KernelGuidance | None = policy.kernel_guidance(i, active)
        if not policy.constant_weights and (how is None or reduce_weights):
            return None, f"guidance {policy.describe()} changes host numbers inside the step from step to step"
        keys.append((active, how.structure() if how is not None else None))
    return keys, ""


class StepRunner:
    """One request's step function and the static buffers it reads; its captured steps, one per step key."""

    def __init__(self, job: Job, comm: Communicator, exchange: str, batched: bool) -> None:
        x = job.latents if job.latents.is_contiguous() else job.latents.contiguous()
        self.x = x
        self.update = job.update.for_captured_steps(x)
        self.static = self.buffers(job, x)
        self.index = StepIndex.counter(x.device)
        self.graphs: dict[StepKey, Any] = {}
        xchg = Exchange(comm, job.prediction_spec, job.device)

        def step(key: StepKey, i: int) -> None:
            # i is the host step at capture: only the reduce exchange's constant weights and the eager-only
            # branches of run_step read it; per-step values come from the device index
            out = run_step(job, comm, xchg, self.update, key[0], x, StepIndex(i, self.index), exchange, batched)
            if out is not x:
                x.copy_(out)
            self.index.add_(1)

        self.step = step

    @staticmethod
    def buffers(job: Job, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every request tensor a captured step reads, by name."""
        tensors = {"latents": latents, **job.update.static_buffers(latents)}
        if job.graph_inputs is not None:
            tensors.update({f"job.{k}": v for k, v in job.graph_inputs().items()})
        return tensors

    @classmethod
    def spec_of(cls, job: Job) -> tuple:
        """Names, shapes, dtypes and devices of the buffers a runner for ``job`` has: a request must match a
        runner's to reuse it."""
        return tuple((name, tuple(t.shape), t.dtype, t.device) for name, t in sorted(cls.buffers(job,
                                                                                          job.latents).items()))

    def load(self, job: Job) -> None:
        """Write ``job``'s values into the static buffers (device copies, no host sync)."""
        for name, value in self.buffers(job, job.latents).items():
            self.static[name].copy_(value)


class ReplaySteps(StepStrategy):
    """The step strategy of a job whose steps replay captured graphs (captured after one eager step per key)."""

    def __init__(self, graphs: StepGraphs, job: Job, runner: StepRunner, keys: list[StepKey], shapes: Any) -> None:
        self.graphs, self.job, self.runner, self.keys, self.shapes = graphs, job, runner, keys, shapes
        self.next_index = 0
        runner.index.zero_()
        self.latents = runner.x

    def step(self, i: int) -> None:
        runner, graphs = self.runner, self.graphs
        if self.next_index != i:  # an interrupted request skipped steps
            runner.index.fill_(i)
        key = self.keys[i]
        how = self.job.policy.kernel_guidance(i, key[0])
        if how is not None:
            runner.update.write_scale(how.scale)
        warm_key = (self.shapes, key)
        graph = runner.graphs.get(key)
        if graph is None and warm_key in graphs.warm:
            graph = runner.graphs[key] = graphs.capture(runner.step, key, i)
        if graph is not None:
            with graphs.sync_debug_mode():
                graphs.replay(graph, runner.step, key)
            graphs.replays += 1
        else:
            runner.step(key, i)
            graphs.eager_steps += 1
            graphs.warm.add(warm_key)
        self.next_index = i + 1

    def result(self) -> Any:
        # a cached runner's latents are overwritten by the next request of its shape
        return self.runner.x.clone() if self.graphs.cached(self.runner) else self.runner.x


class StepGraphs:
    """Captures, caches and replays whole denoising steps on one CUDA device (see the module docstring).

    ``capture=False`` runs the cached step functions directly instead of replaying graphs: the same runners,
    static buffers and cache, with no CUDA graph, so the CPU tests can check that a reused step reads only its
    static buffers.
    """

    def __init__(self, device: torch.device, *, max_cached: int = 8, capture: bool = True) -> None:
        self.device = torch.device(device)
        self.capture_graphs = capture
        #: how many request shapes keep their runner (and graphs) after the request; least recent goes first
        self.max_cached = max_cached
        self.cache: OrderedDict[Any, StepRunner] = OrderedDict()
        #: (request shapes, step key) whose eager step has run in this process
        self.warm: set = set()
        #: set per call by the caller: what a captured step bakes in from the call's arguments (sizes,
        #: options, the model's weights), without the values that reach it through static buffers
        self.shape_key: Any = None
        #: a torch.cuda sync-debug mode ("warn" / "error") held around every replayed step, or None
        self.sync_debug: str | None = None
        self.reason: str | None = None
        self.captures = 0
        self.replays = 0
        self.eager_steps = 0
        self.reused = 0
        self.capture_s = 0.0
        self._pool = None

    def unsupported(self, job: Job, comm: Communicator) -> str | None:
        """Why this job's steps cannot be captured, or None."""
        if self.capture_graphs:
            if self.device.type != "cuda" or not torch.cuda.is_available():
                return "not on a CUDA device"
            if not isinstance(job.latents, torch.Tensor) or job.latents.device.type != "cuda":
                return "latents are not one CUDA tensor"
            if comm.name not in CAPTURABLE_COMMS:
                return f"the {comm.name} communicator's collectives are not captured"
        elif not isinstance(job.latents, torch.Tensor):
            return "latents are not one tensor"
        if not isinstance(job.update, PlanUpdate):
            return "the scheduler update is the scheduler's own step() (fused=False, or no coefficient table)"
        if job.update.stochastic:
            return "a stochastic solver keys its noise on the host's step number"
        if job.not_graphable is not None:
            return job.not_graphable
        if job.step_end is not None:
            return "a step-end callback runs between steps"
        return None

    def strategy(self, job: Job, comm: Communicator, *, exchange: str, batched: bool) -> ReplaySteps | None:
        """The replaying step strategy for ``job`` (its policy already reset), or None (and :attr:`reason`)
        when its steps cannot be captured."""
        self.reason = self.unsupported(job, comm)
        if self.reason is None:
            keys, why = step_keys(job.policy, job.num_steps, exchange, comm.size)
            self.reason = why or None
        if self.reason is not None:
            return None
        runner, key = self.runner_for(job, comm, exchange, batched)
        # the shapes a step's compiled code was specialised for: the call's sizes and the job's input buffers
        shapes = (self.shape_key, key[1] if key is not None else None, comm.size, exchange, batched)
        return ReplaySteps(self, job, runner, keys, shapes)

    def runner_for(self, job: Job, comm: Communicator, exchange: str, batched: bool) -> tuple[StepRunner, Any]:
        """A cached runner loaded with ``job``'s values, or a new one; and the cache key (None: not cached).

        The key: the caller's :attr:`shape_key` (the call's sizes and options, the weights' addresses), the
        buffers' shapes, what the policy bakes in (:func:`policy_key`), the group size, the exchange and
        whether forwards are batched.
        """
        key = None
        if job.graph_inputs is not None:
            key = (self.shape_key, StepRunner.spec_of(job), policy_key(job.policy, exchange, comm.size), comm.size,
                   exchange, batched)
            runner = self.cache.get(key)
            if runner is not None:
                self.cache.move_to_end(key)
                runner.load(job)
                self.reused += 1
                return runner, key
        runner = StepRunner(job, comm, exchange, batched)
        if key is not None:
            self.cache[key] = runner
            while len(self.cache) > self.max_cached:
                self.cache.popitem(last=False)
        return runner, key

    def cached(self, runner: StepRunner) -> bool:
        return any(r is runner for r in self.cache.values())

    def capture(self, step, key: StepKey, i: int):
        if not self.capture_graphs:
            self.captures += 1
            return (key, i)  # the step function itself stands in for the graph
        start = time.perf_counter()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # capture records kernels without running them: the step index, latents and history do not move
        with torch.cuda.graph(graph, pool=self._pool):
            step(key, i)
        self.captures += 1
        self.capture_s += time.perf_counter() - start
        return graph

    def replay(self, graph, step, key: StepKey) -> None:
        if self.capture_graphs:
            graph.replay()
        else:
            step(key, graph[1])  # the host step of the capture, as a graph would replay it

    def sync_debug_mode(self):
        if not self.sync_debug:
            return contextlib.nullcontext()
        return _sync_mode(self.sync_debug)

    def describe(self) -> dict[str, Any]:
        return {"captures": self.captures, "replays": self.replays, "eager_steps": self.eager_steps,
                "cached_shapes": len(self.cache), "reused": self.reused, "capture_s": round(self.capture_s, 4),
                "last_fallback": self.reason}


@contextlib.contextmanager
def _sync_mode(mode: str):
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)
