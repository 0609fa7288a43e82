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
(callbacks between steps, stochastic or table-less schedulers, non-constant guidance weights) run eagerly;
:attr:`StepGraphs.reason` says why.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from typing import Any, Callable

import torch

from .denoise import Exchange, step_inputs

#: communicators whose collectives can be captured (torch.distributed's NCCL watchdog is not graph-aware)
CAPTURABLE_COMMS = ("local", "nccl-ext")


def _policy_ok(policy) -> bool:
    from ..guidance.cfg import CFG, NoGuidance

    # these policies' weights are the same at every step where the same branches are active, so a graph
    # keyed by the active set replays them correctly
    return type(policy) in (CFG, NoGuidance)


def policy_key(policy, exchange: str, size: int) -> tuple:
    """What of a policy a captured step bakes in: its kind and options, and the scale itself only where it is a
    host number in the step (the reduce exchange weights each rank's prediction before the all-reduce);
    elsewhere the fused kernel reads the scale on device."""
    from ..guidance.cfg import CFG

    if type(policy) is not CFG:
        return (type(policy).__name__,)
    key = (type(policy).__name__, policy.renorm, policy.rescale, policy.original_formulation)
    return key + ((policy.scale,) if exchange == "reduce" and size > 1 else ())


def _buffers(job, latents: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every request tensor a captured step reads, by name (the update's tables made ready first)."""
    update = job.update
    update._ready(latents)
    tensors = {"latents": latents, "plan.coefficients": update.coefficients, "plan.write_slots": update.write_slots,
               "plan.history": update.history}
    if job.graph_inputs is not None:
        tensors.update({f"job.{k}": v for k, v in job.graph_inputs().items()})
    return tensors


class StepRunner:
    """One request's step function and the static buffers it reads; its graphs, one per active set."""

    def __init__(self, job, comm, exchange: str) -> None:
        update, policy = job.update, job.policy
        x = job.latents if job.latents.is_contiguous() else job.latents.contiguous()
        self.static = _buffers(job, x)
        self.x = x
        table, slots = update.coefficients, update.write_slots
        # the update reads row 0 of these; the step fills them from the full tables by the device step index
        row, slot_row = torch.empty_like(table[:1]), torch.empty_like(slots[:1])
        update.coefficients, update.write_slots = row, slot_row
        self.scale = torch.ones(1, dtype=torch.float32, device=x.device)
        update.scale_source = self.scale
        index = self.index = torch.zeros(1, dtype=torch.long, device=x.device)
        xchg = Exchange(comm, job.prediction_spec, job.device)

        def step(active: tuple[str, ...], i: int) -> None:
            torch.index_select(table, 0, index, out=row)
            torch.index_select(slots, 0, index, out=slot_row)
            # i only picks the reduce path's policy weights, the same at every step of this active set
            inputs = step_inputs(job, comm, xchg, active, x, index, i, exchange, finish=False)
            out = update.fused_step(inputs, policy, 0, x)
            if out is not x:
                x.copy_(out)
            index.add_(1)

        self.step: Callable[[tuple[str, ...], int], None] = step
        self.graphs: dict[tuple[str, ...], Any] = {}

    @staticmethod
    def spec_of(job) -> tuple:
        """Names, shapes, dtypes and devices of the buffers a runner for ``job`` has: a request must match a
        runner's to reuse it."""
        buffers = sorted(_buffers(job, job.latents).items())
        return tuple((name, tuple(t.shape), t.dtype, t.device) for name, t in buffers)

    def load(self, job) -> None:
        """Write ``job``'s values into the static buffers (device copies, no host sync)."""
        for name, value in _buffers(job, job.latents).items():
            self.static[name].copy_(value)

    def set_scale(self, policy) -> None:
        scale = getattr(policy, "scale", None)
        if scale is not None:
            self.scale.fill_(float(scale))


class StepGraphs:
    """Captures, caches and replays whole denoising steps on one CUDA device (see the module docstring).

    ``capture=False`` runs the cached step functions directly instead of replaying graphs: the same runners,
    static buffers and cache, with no CUDA graph, so the CPU tests can check that a reused step reads only its
    static buffers.
    """

    def __init__(self, device: torch.device, *, max_cached: int = 8, capture: bool = True) -> None:
        self.device = torch.device(device)
        self.capture = capture
        #: how many request shapes keep their runner (and graphs) after the request; least recent goes first
        self.max_cached = max_cached
        self.cache: OrderedDict[Any, StepRunner] = OrderedDict()
        #: (request shapes, active branches) whose eager step has run in this process
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

    def unsupported(self, job, comm) -> str | None:
        from ..schedulers.update import PlanUpdate

        if self.capture:
            if self.device.type != "cuda" or not torch.cuda.is_available():
                return "not on a CUDA device"
            if not isinstance(job.latents, torch.Tensor) or job.latents.device.type != "cuda":
                return "latents are not one CUDA tensor"
            if getattr(comm, "name", None) not in CAPTURABLE_COMMS:
                return f"the {getattr(comm, 'name', '?')} communicator's collectives are not captured"
        elif not isinstance(job.latents, torch.Tensor):
            return "latents are not one tensor"
        if not isinstance(job.update, PlanUpdate):
            return "the scheduler update is the scheduler's own step() (fused=False, or no coefficient table)"
        if job.update.plan.stochastic:
            return "a stochastic solver keys its noise on the host's step number"
        if not _policy_ok(job.policy):
            return f"guidance {type(job.policy).__name__} may change its weights from step to step"
        if job.not_graphable is not None:
            return job.not_graphable
        if job.step_end is not None:
            return "a step-end callback runs between steps"
        return None

    def runner_for(self, job, comm, exchange: str) -> tuple[StepRunner, Any]:
        """A cached runner loaded with ``job``'s values, or a new one; and the cache key (None: not cached).

        The key: the caller's :attr:`shape_key` (the call's sizes and options, the weights' addresses), the
        buffers' shapes, what the policy bakes in (:func:`policy_key`), the group size and the exchange.
        """
        key = None
        if job.graph_inputs is not None:
            key = (self.shape_key, StepRunner.spec_of(job), policy_key(job.policy, exchange, comm.size), comm.size,
                   exchange)
            runner = self.cache.get(key)
            if runner is not None:
                self.cache.move_to_end(key)
                runner.load(job)
                self.reused += 1
                return runner, key
        runner = StepRunner(job, comm, exchange)
        if key is not None:
            self.cache[key] = runner
            while len(self.cache) > self.max_cached:
                self.cache.popitem(last=False)
        return runner, key

    def denoise(self, job, comm, *, exchange: str = "gather"):
        """Run the loop with graphs; None (nothing run) when this job cannot use them."""
        self.reason = self.unsupported(job, comm)
        if self.reason is not None:
            return None
        policy = job.policy
        policy.reset(job.num_steps)
        runner, key = self.runner_for(job, comm, exchange)
        # the shapes a step's compiled code was specialised for: the call's sizes and the job's input buffers
        shapes = (self.shape_key, key[1] if key is not None else None, comm.size, exchange)
        runner.set_scale(policy)
        runner.index.zero_()
        next_index = 0
        step_times: list[float] = []
        with job.progress(job.num_steps, comm.rank == 0) as bar:
            for i in range(job.num_steps):
                if job.interrupted():
                    continue
                t0 = time.perf_counter()
                if next_index != i:
                    runner.index.fill_(i)
                active = policy.active(i)
                warm_key = (shapes, active)
                graph = runner.graphs.get(active)
                if graph is None and warm_key in self.warm:
                    graph = runner.graphs[active] = self._capture(runner.step, active, i)
                if graph is not None:
                    with self._sync_debug():
                        self._replay(graph, runner.step, active, i)
                    self.replays += 1
                else:
                    runner.step(active, i)
                    self.eager_steps += 1
                    self.warm.add(warm_key)
                next_index = i + 1
                step_times.append(time.perf_counter() - t0)
                if bar is not None:
                    bar.update()
        if hasattr(comm, "synchronize"):
            comm.synchronize()
        # a cached runner's latents are overwritten by the next request of its shape
        return (runner.x.clone() if key is not None else runner.x), step_times

    def _capture(self, step, active, i: int):
        if not self.capture:
            self.captures += 1
            return (active, i)  # the step function itself stands in for the graph
        start = time.perf_counter()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # capture records kernels without running them: the step index, latents and history do not move
        with torch.cuda.graph(graph, pool=self._pool):
            step(active, i)
        self.captures += 1
        self.capture_s += time.perf_counter() - start
        return graph

    def _replay(self, graph, step, active, i: int) -> None:
        if self.capture:
            graph.replay()
        else:
            step(active, graph[1])  # the step index of the capture, as a graph would replay it

    def _sync_debug(self):
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
