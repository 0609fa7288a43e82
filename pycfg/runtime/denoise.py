"""The denoising loop. Every rank runs every step; only the branch forwards are split between ranks.

Per step: the policy names the active branches; each rank runs the forwards dispatched to it (none on an idle
rank); one collective makes every prediction (``gather``) or the weighted sum (``reduce``) available on every
rank; every rank then computes the same guided prediction and the same scheduler update from the same bits.

There is one loop (:func:`denoise`): reset, progress bar, interruption, timing and the final synchronisation.
How it runs a step is a :class:`StepStrategy`: :class:`EagerSteps` here, or
:class:`pycfg.runtime.graphs.ReplaySteps`, which replays captured steps. Both run the same step code,
:func:`run_step`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Any

import torch

from ..guidance.base import outputs_of
from ..parallel.comm import Communicator
from ..parallel.dispatch import dispatch_branches
from ..steps import StepIndex
from .consistency import check_ranks_agree
from .job import Job, Prediction, Update

_ALIGN = 16  # bytes; keeps every packed tensor's offset a multiple of its element size


def _nbytes(shape, dtype: torch.dtype) -> int:
    return torch.Size(shape).numel() * dtype.itemsize


class Exchange:
    """Packs this rank's branch predictions into one buffer, runs the step's single collective, unpacks."""

    def __init__(self, comm: Communicator, spec, device: torch.device) -> None:
        self.comm = comm
        self.spec = [(tuple(s), d) for s, d in spec]
        self.tuple_output = len(self.spec) > 1
        self.nbytes = [_nbytes(s, d) for s, d in self.spec]
        self.segments = [-(-n // _ALIGN) * _ALIGN for n in self.nbytes]
        self.branch_bytes = sum(self.segments)
        self.device = device
        # what the reduce path's policies read shape, dtype and device from (never written): made once per request
        outs = tuple(torch.empty(s, dtype=d, device=device) for s, d in self.spec)
        self._like = outs if self.tuple_output else outs[0]

    def like(self) -> Prediction:
        return self._like

    def gather(self, plan: tuple[tuple[str, ...], ...], local: list[Prediction]) -> dict[str, Prediction]:
        slots = max(len(names) for names in plan)
        buf = torch.zeros(slots * self.branch_bytes, dtype=torch.uint8, device=self.device)
        for j, pred in enumerate(local):
            offset = j * self.branch_bytes
            for out, seg in zip(outputs_of(pred), self.segments):
                raw = out.detach().contiguous().reshape(-1).view(torch.uint8)
                buf[offset : offset + raw.numel()].copy_(raw)
                offset += seg
        every = self.comm.all_gather(buf)
        preds: dict[str, Prediction] = {}
        for rank, names in enumerate(plan):
            for j, name in enumerate(names):
                offset = j * self.branch_bytes
                outs = []
                for (shape, dtype), nbytes, seg in zip(self.spec, self.nbytes, self.segments):
                    outs.append(every[rank, offset : offset + nbytes].view(dtype).view(shape))
                    offset += seg
                preds[name] = tuple(outs) if self.tuple_output else outs[0]
        return preds

    def reduce(self, policy, local: dict[str, Prediction], i: int, finish: bool = True):
        like = self.like()
        terms = policy.reduce_terms(local, i, like)
        flat = torch.cat([t.reshape(-1) for t in terms]) if len(terms) > 1 else terms[0].reshape(-1).clone()
        self.comm.all_reduce_(flat)
        summed, offset = [], 0
        for t in terms:
            summed.append(flat[offset : offset + t.numel()].view(t.shape))
            offset += t.numel()
        if not finish:  # the fused update applies the post-combine maths itself
            return summed
        return policy.reduce_finish(summed, i, like)


def step_inputs(job: Job, comm: Communicator, xchg: Exchange, active: tuple[str, ...], latents, step: StepIndex,
                exchange: str, batched: bool, finish: bool):
    """What this step's combine takes, on every rank: the active branches' predictions by name, or with
    ``exchange="reduce"`` the reduced terms (combined by the policy unless not ``finish``).

    Every rank runs the forwards dispatched to it (all of them in a group of one or a single-branch step, none on
    an idle rank), then one collective.
    """
    if comm.size == 1 or len(active) == 1:
        return dict(zip(active, job.forward(active, latents, step, batched)))
    plan = dispatch_branches(active, comm.size)
    mine = plan[comm.rank]
    local = job.forward(mine, latents, step, batched) if mine else []
    if exchange == "gather":
        return xchg.gather(plan, local)
    return xchg.reduce(job.policy, dict(zip(mine, local)), step.i, finish=finish)


def run_step(job: Job, comm: Communicator, xchg: Exchange, update: Update, active: tuple[str, ...], latents,
             step: StepIndex, exchange: str, batched: bool):
    """One denoising step, the same code eager and captured: forwards, the collective, combine + update (fused
    when the update fuses them), then the job's ``after_update``. Returns the next latents."""
    policy = job.policy
    inputs = step_inputs(job, comm, xchg, active, latents, step, exchange, batched, finish=not update.fused)
    if update.fused:
        latents = update.fused_step(inputs, policy, step, latents)
    else:
        guided = policy.combine(inputs, step.i) if isinstance(inputs, dict) else inputs
        latents = update(guided, step, latents)
    if job.after_update is not None:
        latents = job.after_update(step, latents)
    return latents


class StepStrategy(ABC):
    """How the loop runs step ``i``: eagerly, or by replaying a captured step. Holds the latents between steps."""

    #: the latents after the last step run (the job's initial latents before any)
    latents: Any

    @abstractmethod
    def step(self, i: int) -> None:
        """Run step ``i`` (the loop calls this once per step, in order, skipping none unless interrupted)."""

    def result(self) -> Any:
        """The final latents, owned by the caller."""
        return self.latents


class EagerSteps(StepStrategy):
    """Every step run as Python code; callbacks between steps and the consistency check run here."""

    def __init__(self, job: Job, comm: Communicator, *, exchange: str, batched: bool,
                 check_consistency: bool) -> None:
        self.job, self.comm, self.exchange, self.batched = job, comm, exchange, batched
        self.check_consistency = check_consistency
        self.xchg = Exchange(comm, job.prediction_spec, job.device)
        self.index = StepIndex.counter(job.device)
        self.latents = job.latents

    def step(self, i: int) -> None:
        job = self.job
        self.index.fill_(i)
        step = StepIndex(i, self.index)
        latents = run_step(job, self.comm, self.xchg, job.update, job.policy.active(i), self.latents, step,
                           self.exchange, self.batched)
        if job.step_end is not None:
            latents = job.step_end(i, latents)
        if self.check_consistency:
            state = {"latents": latents} if isinstance(latents, torch.Tensor) else {
                f"latents[{k}]": v for k, v in enumerate(latents)
            }
            state.update(job.state_tensors())
            state.update({f"guidance.{k}": v for k, v in job.policy.state_tensors().items()})
            check_ranks_agree(self.comm, i, state)
        self.latents = latents


def denoise(job: Job, comm: Communicator, *, exchange: str = "gather", check_consistency: bool = False,
            batched: bool = False, step_graphs=None) -> tuple[Any, list[float]]:
    """Run the loop on this rank; returns the final latents and the wall time of each step (seconds).

    ``batched``: same-shape branches on one rank share a batched forward (see ``Job.forward``).
    ``step_graphs`` (a :class:`pycfg.runtime.graphs.StepGraphs`) replays captured steps where the job allows it;
    otherwise, and always with ``check_consistency``, steps run eagerly. Either way this one loop runs them:
    reset, progress bar, interruption, timing and the final synchronisation are the same.
    """
    job.policy.reset(job.num_steps)
    strategy: StepStrategy | None = None
    if step_graphs is not None and not check_consistency:
        strategy = step_graphs.strategy(job, comm, exchange=exchange, batched=batched)
    if strategy is None:
        strategy = EagerSteps(job, comm, exchange=exchange, batched=batched, check_consistency=check_consistency)
    step_times: list[float] = []
    with job.progress(job.num_steps, comm.rank == 0) as bar:
        for i in range(job.num_steps):
            if job.interrupted():
                continue
            t0 = time.perf_counter()
            strategy.step(i)
            step_times.append(time.perf_counter() - t0)
            if bar is not None:
                bar.update()
    # collectives are enqueued without host syncs: surface a failed peer here, bounded by the timeout, rather
    # than in whatever copies the result to the host next
    comm.synchronize()
    return strategy.result(), step_times
