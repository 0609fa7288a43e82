"""Whole-step CUDA graphs: branch forward(s), the step's collective and the fused update, replayed per step.

One graph per step shape (the set of active branches; sizes are fixed within a request). Nothing per step is
baked into a graph: the step index lives in a 1-element device tensor that the graph itself advances, the
adapter's forward selects the timestep with it, and the scheduler's coefficient row and history-slot row are
gathered from the device tables into static one-row buffers inside the graph. A step therefore costs one
``replay()`` on the host and no host-device synchronisation.

A shape is captured only once its eager step has run in this process (compiles, autotunes, lazy CUDA and NCCL
initialisation and the first collective all happen outside capture). The first request of a shape runs that
step eagerly as its real step and captures from the next step on; later requests capture at their first step.
Graphs hold the request's own tensors (latents, text embeddings, solver history), so they live for one request;
capture costs host time of about one eager step, never device time.

Text encoders and the VAE run outside, in the adapter's prepare and finish. Steps that cannot be captured
(callbacks between steps, stochastic or table-less schedulers, non-constant guidance weights) run eagerly;
:attr:`StepGraphs.reason` says why.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch

from ..parallel.dispatch import dispatch_branches
from .denoise import Exchange

#: communicators whose collectives can be captured (torch.distributed's NCCL watchdog is not graph-aware)
CAPTURABLE_COMMS = ("local", "nccl-ext")


def _policy_ok(policy) -> bool:
    from ..guidance.cfg import CFG, NoGuidance

    # these policies' weights are the same at every step where the same branches are active, so a graph
    # keyed by the active set replays them correctly
    return type(policy) in (CFG, NoGuidance)


class StepGraphs:
    """Captures and replays whole denoising steps on one CUDA device (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        #: (request shape key, active branches) whose eager step has run in this process
        self.warm: set = set()
        #: set per call by the caller: what makes two requests' steps the same shape (sizes, lengths, options)
        self.shape_key: Any = None
        #: a torch.cuda sync-debug mode ("warn" / "error") held around every replayed step, or None
        self.sync_debug: str | None = None
        self.reason: str | None = None
        self.captures = 0
        self.replays = 0
        self.eager_steps = 0
        self.capture_s = 0.0

    def unsupported(self, job, comm) -> str | None:
        from ..schedulers.update import PlanUpdate

        if self.device.type != "cuda" or not torch.cuda.is_available():
            return "not on a CUDA device"
        if not isinstance(job.latents, torch.Tensor) or job.latents.device.type != "cuda":
            return "latents are not one CUDA tensor"
        if getattr(comm, "name", None) not in CAPTURABLE_COMMS:
            return f"the {getattr(comm, 'name', '?')} communicator's collectives are not captured"
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

    def denoise(self, job, comm, *, exchange: str = "gather"):
        """Run the loop with graphs; None (nothing run) when this job cannot use them."""
        self.reason = self.unsupported(job, comm)
        if self.reason is not None:
            return None
        policy, update = job.policy, job.update
        policy.reset(job.num_steps)
        size, rank = comm.size, comm.rank
        x = job.latents if job.latents.is_contiguous() else job.latents.contiguous()
        update._ready(x)
        table, slots = update.coefficients, update.write_slots
        # the update reads row 0 of these; the step fills them from the full tables by the device step index
        row, slot_row = torch.empty_like(table[:1]), torch.empty_like(slots[:1])
        update.coefficients, update.write_slots = row, slot_row
        index = torch.zeros(1, dtype=torch.long, device=x.device)
        xchg = Exchange(comm, job.prediction_spec, job.device)

        def step(active: tuple[str, ...], i: int) -> None:
            torch.index_select(table, 0, index, out=row)
            torch.index_select(slots, 0, index, out=slot_row)
            if size == 1 or len(active) == 1:
                inputs = dict(zip(active, job.forward(active, x, index)))
            else:
                plan = dispatch_branches(active, size)
                mine = plan[rank]
                local = job.forward(mine, x, index) if mine else []
                if exchange == "gather":
                    inputs = xchg.gather(plan, local)
                else:
                    # i only picks the policy's weights, the same for every step of this active set
                    inputs = xchg.reduce(policy, dict(zip(mine, local)), i, finish=False)
            out = update.fused_step(inputs, policy, 0, x)
            if out is not x:
                x.copy_(out)
            index.add_(1)

        graphs: dict[tuple[str, ...], torch.cuda.CUDAGraph] = {}
        pool = None
        next_index = 0
        step_times: list[float] = []
        try:
            with job.progress(job.num_steps, rank == 0) as bar:
                for i in range(job.num_steps):
                    if job.interrupted():
                        continue
                    t0 = time.perf_counter()
                    if next_index != i:
                        index.fill_(i)
                    active = policy.active(i)
                    warm_key = (self.shape_key, active, size, exchange)
                    graph = graphs.get(active)
                    if graph is None and warm_key in self.warm:
                        if pool is None:
                            pool = torch.cuda.graph_pool_handle()
                        graph = graphs[active] = self._capture(step, active, i, pool)
                    if graph is not None:
                        with self._sync_debug():
                            graph.replay()
                        self.replays += 1
                    else:
                        step(active, i)
                        self.eager_steps += 1
                        self.warm.add(warm_key)
                    next_index = i + 1
                    step_times.append(time.perf_counter() - t0)
                    if bar is not None:
                        bar.update()
        finally:
            update.coefficients, update.write_slots = table, slots
        if hasattr(comm, "synchronize"):
            comm.synchronize()
        return x, step_times

    def _capture(self, step, active, i: int, pool) -> torch.cuda.CUDAGraph:
        start = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        # capture records kernels without running them: the step index, latents and history do not move
        with torch.cuda.graph(graph, pool=pool):
            step(active, i)
        self.captures += 1
        self.capture_s += time.perf_counter() - start
        return graph

    def _sync_debug(self):
        if not self.sync_debug:
            return contextlib.nullcontext()
        return _sync_mode(self.sync_debug)

    def describe(self) -> dict[str, Any]:
        return {"captures": self.captures, "replays": self.replays, "eager_steps": self.eager_steps,
                "capture_s": round(self.capture_s, 4), "last_fallback": self.reason}


@contextlib.contextmanager
def _sync_mode(mode: str):
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)
