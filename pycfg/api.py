"""``pycfg.compile``: pick the adapter, form the CFG group, return a callable that runs the pipeline's calls."""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch
import torch.distributed as dist

from .adapters import find_adapter
from .guidance import GuidancePolicy
from .parallel.comm import make_comm
from .parallel.groups import form_cfg_group
from .runtime.consistency import check_same_arguments
from .runtime.denoise import denoise
from .schedulers import NOISE_SOURCES

logger = logging.getLogger("pycfg")

EXCHANGES = ("gather", "reduce")


class CompiledPipeline:
    """A diffusers pipeline whose guidance branches run in parallel over a CFG group.

    Call it with the pipeline's own keyword arguments (plus an optional ``guidance=`` policy); it returns the
    pipeline's own output type, the same on every rank of the group.
    """

    def __init__(self, pipeline, adapter, comm, *, exchange: str, fused: bool | None, check_consistency: bool,
                 guidance: GuidancePolicy | None, timeout: float) -> None:
        self.pipeline = pipeline
        self.adapter = adapter
        self.comm = comm
        self.exchange = exchange
        self.fused = fused
        self.check_consistency = check_consistency
        self.guidance = guidance
        self.timeout = timeout
        #: wall time of each denoising step of the last call, in seconds
        self.last_step_times: list[float] = []
        self._lock = threading.Lock()

    @property
    def cfg_parallel_size(self) -> int:
        return self.comm.size

    @property
    def rank(self) -> int:
        return self.comm.rank

    def __call__(self, **kwargs: Any):
        guidance = kwargs.pop("guidance", self.guidance)
        if guidance is not None and not isinstance(guidance, GuidancePolicy):
            raise TypeError(f"guidance must be a pycfg.guidance policy, got {type(guidance).__name__}")
        with self._lock, torch.no_grad():
            args = self.adapter.check(kwargs)
            # before any compute: every rank must have been called the same way
            check_same_arguments(
                self.comm, {**args, "__guidance__": guidance, "__exchange__": self.exchange}
            )
            if guidance is not None:
                _check_exchange(self.exchange, guidance, self.comm.size)
            job = self.adapter.prepare(args, guidance)
            _check_exchange(self.exchange, job.policy, self.comm.size)
            latents, self.last_step_times = denoise(
                job, self.comm, exchange=self.exchange, check_consistency=self.check_consistency
            )
            return job.finish(latents)

    def describe(self) -> dict[str, Any]:
        """How this pipeline runs: adapter, group, exchange, communicator, update path."""
        return {
            "pipeline": type(self.pipeline).__name__,
            "adapter": type(self.adapter).__name__,
            "cfg_parallel_size": self.comm.size,
            "rank": self.comm.rank,
            "exchange": self.exchange,
            "communicator": self.comm.name,
            "fused": bool(self.fused),
            "check_consistency": self.check_consistency,
            "timeout": self.timeout,
            "batch_branches": bool(getattr(self.adapter, "batch_branches", False)),
        }

    def __getattr__(self, name: str):
        # anything else (components, config, progress bar settings) is the pipeline's own
        if name == "pipeline":
            raise AttributeError(name)
        return getattr(self.pipeline, name)


def _check_exchange(exchange: str, policy: GuidancePolicy, size: int) -> None:
    if exchange == "reduce" and not policy.linear and size > 1:
        raise ValueError(
            f"exchange='reduce' needs a linear guidance policy; {policy.describe()} is not linear in the branch "
            "predictions: use exchange='gather'"
        )


def _pipeline_device(pipeline) -> torch.device:
    device = getattr(pipeline, "_execution_device", None) or getattr(pipeline, "device", None)
    return torch.device(device) if device is not None else torch.device("cpu")


def compile(
    pipeline,
    *,
    cfg_parallel_size: int = 1,
    exchange: str = "gather",
    fused: bool | None = None,
    check_consistency: bool = False,
    timeout: float = 60.0,
    group: dist.ProcessGroup | None = None,
    guidance: GuidancePolicy | None = None,
    comm: str = "auto",
    batch_branches: bool = False,
    noise: str = "philox",
) -> CompiledPipeline:
    """Make ``pipeline`` CFG-parallel over ``cfg_parallel_size`` ranks.

    Args:
        pipeline: a stock diffusers pipeline (see ``pycfg.supported_pipelines()``), already on its device.
        cfg_parallel_size: ranks per CFG group. Under torchrun a world of k * cfg_parallel_size ranks forms k
            groups of consecutive ranks; 1 needs no process group at all.
        exchange: ``"gather"`` (all-gather the branch predictions, combine on every rank: bit-identical to the
            sequential pipeline) or ``"reduce"`` (one fp32 weighted all-reduce; linear policies only).
        fused: run combine + scheduler update as one fused kernel:            ``None``: the Triton kernel on CUDA, the scheduler's own ``step()`` elsewhere (bit-identical to the
            stock pipeline); ``True``: always the kernel (on CPU in Triton's interpreter, TRITON_INTERPRET=1);
            ``False``: always ``step()``. Schedulers without a coefficient table use ``step()`` in any case.
        check_consistency: after every step, verify with a checksum collective that all ranks hold identical
            latents and solver state; raise naming the step and tensor if not.
        timeout: seconds after which a collective that a failed or dead peer never joins raises.
        group: an existing process group to use as the CFG group (its size must equal cfg_parallel_size).
        guidance: a default guidance policy; without one the pipeline's own arguments select it per call.
        noise: where stochastic solvers' noise comes from on the fused path: ``"philox"`` (counter-based,
            keyed by a seed derived from the request's generator, the step and the element: identical on every
            rank with no communication, but not torch.randn's numbers) or ``"diffusers"`` (the scheduler's own
            ``step()`` with the request's generator: the stock pipeline's bits).
        comm: which communicator carries the per-step collective: ``"auto"`` (the NCCL extension for CUDA groups
            when every rank can load it, else torch.distributed), ``"nccl-ext"`` or ``"torch"``.
        batch_branches: run several same-shape branches dispatched to one rank as one batched forward. Off by
            default: a batched forward's numerics can differ from separate batch-1 forwards in the last bits.

    Returns:
        A :class:`CompiledPipeline`: call it like the pipeline.
    """
    if isinstance(cfg_parallel_size, bool) or not isinstance(cfg_parallel_size, int) or cfg_parallel_size < 1:
        raise ValueError(f"cfg_parallel_size must be an integer >= 1, got {cfg_parallel_size!r}")
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {', '.join(map(repr, EXCHANGES))}, got {exchange!r}")
    if fused not in (None, True, False):
        raise ValueError(f"fused must be None, True or False, got {fused!r}")
    if noise not in NOISE_SOURCES:
        raise ValueError(f"noise must be one of {', '.join(map(repr, NOISE_SOURCES))}, got {noise!r}")
    if not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if guidance is not None and not isinstance(guidance, GuidancePolicy):
        raise TypeError(f"guidance must be a pycfg.guidance policy, got {type(guidance).__name__}")
    if batch_branches not in (True, False):
        raise ValueError(f"batch_branches must be True or False, got {batch_branches!r}")
    adapter_class = find_adapter(pipeline)
    device = _pipeline_device(pipeline)
    adapter = adapter_class(pipeline, fused=fused, noise=noise)
    adapter.batch_branches = batch_branches
    if guidance is not None:
        # before any process group exists: a policy that cannot run fails here, not at the first call
        _check_exchange(exchange, guidance, cfg_parallel_size)
        if hasattr(adapter, "check_policy"):
            adapter.check_policy(guidance)

    pg = form_cfg_group(cfg_parallel_size, device=device, timeout=float(timeout), group=group)
    comm = make_comm(pg, device=device, timeout=float(timeout), comm=comm)
    compiled = CompiledPipeline(
        pipeline,
        adapter,
        comm,
        exchange=exchange,
        fused=fused,
        check_consistency=check_consistency,
        guidance=guidance,
        timeout=float(timeout),
    )
    logger.info("pycfg: %s", compiled.describe())
    return compiled
