"""``pycfg.compile``: pick the adapter, form the CFG group, return a callable that runs the pipeline's calls."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .adapters import find_adapter
from .guidance import GuidancePolicy
from .parallel.comm import make_comm
from .parallel.groups import form_cfg_group, release_cfg_group
from .runtime.checks import check_finite_result, check_job, check_tensor_arguments
from .runtime.compiled import check_compile_option, choose_batching
from .runtime.compiled import compile_transformer as _compile_transformer
from .runtime.consistency import agree, describe_value, fingerprint
from .runtime.denoise import denoise
from .runtime.job import Job
from .schedulers import NOISE_SOURCES

logger = logging.getLogger("pycfg")

EXCHANGES = ("gather", "reduce")


@dataclass(frozen=True)
class AdmittedCall:
    """A call every rank of the group checked, prepared and agreed on (see :meth:`CompiledPipeline.admit`); no
    forward has run yet."""

    args: dict[str, Any]
    guidance: GuidancePolicy | None
    job: Job
    key: tuple


class CompiledPipeline:
    """A diffusers pipeline whose guidance branches run in parallel over a CFG group.

    Call it with the pipeline's own keyword arguments (plus an optional ``guidance=`` policy); it returns the
    pipeline's own output type, the same on every rank of the group. ``close()`` (or ``with``) releases its
    process group and communicator.
    """

    def __init__(self, pipeline, adapter, comm, *, exchange: str, fused: bool | None, check_consistency: bool,
                 guidance: GuidancePolicy | None, timeout: float, check_finite: bool = False) -> None:
        self.pipeline = pipeline
        self.adapter = adapter
        self.comm = comm
        self.exchange = exchange
        self.fused = fused
        self.check_consistency = check_consistency
        self.guidance = guidance
        self.timeout = timeout
        self.check_finite = check_finite
        self._closed = False
        #: wall time of each denoising step of the last call, in seconds
        self.last_step_times: list[float] = []
        self._lock = threading.Lock()
        #: set by compile(): what was compiled, the CUDA-graph runner, the batching mode ("auto" or fixed)
        self.compile_info: dict[str, Any] | None = None
        self.step_graphs = None
        self.batch_mode: bool | str = bool(getattr(adapter, "batch_branches", False))
        self.batch_choices: dict[Any, dict[str, Any]] = {}
        self.warmup_times: dict[str, float] = {}

    @property
    def device(self) -> torch.device:
        return _pipeline_device(self.pipeline)

    @property
    def cfg_parallel_size(self) -> int:
        return self.comm.size

    @property
    def rank(self) -> int:
        return self.comm.rank

    def __call__(self, **kwargs: Any):
        with self._lock, torch.no_grad():
            return self._run(self._admit(kwargs))

    def admit(self, **kwargs: Any) -> AdmittedCall:
        """Check and prepare a call on this rank, and agree on it with every rank, before any forward.

        Raises (every rank, at once) if any rank rejects the call: that rank its own error, the others
        :class:`~pycfg.errors.InvalidArgumentError` or :class:`~pycfg.errors.PreparationError` naming it.
        ``fast(**kw)`` is ``fast.run(fast.admit(**kw))``; a caller that must tell a rejected call from one that
        failed while running calls the two halves itself.
        """
        with self._lock, torch.no_grad():
            return self._admit(kwargs)

    def run(self, call: AdmittedCall):
        """Run an admitted call (see :meth:`admit`) and return the pipeline's output."""
        with self._lock, torch.no_grad():
            return self._run(call)

    def _admit(self, kwargs: dict[str, Any]) -> AdmittedCall:
        if self._closed:
            raise RuntimeError("this compiled pipeline was closed; compile the pipeline again")
        guidance = kwargs.pop("guidance", self.guidance)
        error: Exception | None = None
        args, job, key = kwargs, None, None
        try:
            if guidance is not None and not isinstance(guidance, GuidancePolicy):
                raise TypeError(f"guidance must be a pycfg.guidance policy, got {type(guidance).__name__}")
            args = self.adapter.check(kwargs)
            check_tensor_arguments(args, finite=self.check_finite)
        except Exception as err:  # agreed on below, so that every rank raises
            error = err
        digest, described = fingerprint({**args, "__guidance__": guidance, "__exchange__": self.exchange})
        if error is None:
            try:
                if guidance is not None:
                    _check_exchange(self.exchange, guidance, self.comm.size)
                key = _shape_key(args, guidance, self.comm.size)
                if self.batch_mode == "auto":
                    # decided before prepare() binds the choice into the job's forward
                    self.adapter.batch_branches = self.batch_choices.get(key, {}).get("batched", False)
                job = self.adapter.prepare(args, guidance)
                _check_exchange(self.exchange, job.policy, self.comm.size)
                check_job(job, args, finite=self.check_finite)
            except Exception as err:
                error = err
        # before any forward: every rank was called the same way and accepted the call, or every rank raises
        agree(self.comm, digest, described, error)
        return AdmittedCall(args, guidance, job, key)

    def _run(self, call: AdmittedCall):
        args, job, key = call.args, call.job, call.key
        if self.batch_mode == "auto" and key not in self.batch_choices:
            choice = choose_batching(self.adapter, job) if self.comm.size == 1 else {
                "batched": False, "why": "branches run on different ranks"}
            self.batch_choices[key] = choice
            self.adapter.batch_branches = choice["batched"]
        if self.step_graphs is not None:
            self.step_graphs.shape_key = (_graph_key(args, self.adapter), self.adapter.batch_branches,
                                          _weights_key(self.pipeline))
        latents, self.last_step_times = denoise(
            job, self.comm, exchange=self.exchange, check_consistency=self.check_consistency,
            step_graphs=self.step_graphs,
        )
        if self.check_finite:
            check_finite_result(latents)
        return job.finish(latents)

    def close(self) -> None:
        """Release what :func:`compile` created for this pipeline: the communicator, and the CFG group when pycfg
        created it and no other compiled pipeline uses it (a ``group=`` of yours is left alone). The pipeline
        itself is untouched. Idempotent; calls afterwards raise. Every rank must close, as every rank compiled.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.step_graphs = None
            self.comm.close()
            release_cfg_group(self.comm.group)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> CompiledPipeline:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def warmup(self, **kwargs: Any) -> dict[str, float]:
        """Run the call twice with these arguments (a short run by default) so compiles, autotuning, the
        batching choice and CUDA-graph capture happen now; returns the cold and warm wall times (seconds).

        Warm-up is per shape: call it with the height, width, text lengths and batch size you will serve.
        """
        kwargs.setdefault("num_inference_steps", 3)
        kwargs.setdefault("output_type", "latent")
        times = {}
        for name in ("cold_s", "warm_s"):
            start = time.perf_counter()
            self(**kwargs)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            times[name] = time.perf_counter() - start
        self.warmup_times = times
        return dict(times)

    def describe(self) -> dict[str, Any]:
        """How this pipeline runs: adapter, group, exchange, communicator, update path."""
        return {
            "pipeline": type(self.pipeline).__name__,
            "adapter": type(self.adapter).__name__,
            "cfg_parallel_size": self.comm.size,
            "rank": self.comm.rank,
            "exchange": self.exchange,
            "communicator": self.comm.name,
            "fused": self.fused,
            "update": "fused kernel" if self.fused or (self.fused is None and self.device.type == "cuda")
            else "scheduler.step() (reference)",
            "check_consistency": self.check_consistency,
            "check_finite": self.check_finite,
            "timeout": self.timeout,
            "batch_branches": self.batch_mode,
            "batch_choices": {repr(k): v for k, v in self.batch_choices.items()},
            "text_bucket": getattr(self.adapter, "text_bucket", None),
            "compile_transformer": self.compile_info,
            "cuda_graphs": self.step_graphs.describe() if self.step_graphs is not None else False,
            "warmup": dict(self.warmup_times),
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


def _shape_key(args: dict[str, Any], guidance, size: int) -> tuple:
    """What fixes a request's step shapes: tensor shapes, sizes, prompts (their token counts), the policy."""
    parts = []
    for name, value in sorted(args.items()):
        if isinstance(value, torch.Tensor):
            parts.append((name, tuple(value.shape), str(value.dtype)))
        elif name in ("num_inference_steps", "generator"):
            continue  # neither changes a step's shapes
        elif isinstance(value, (int, str, bool, type(None))):
            # floats (scales) change no shape: a new guidance scale reuses the compiled code and the choice
            parts.append((name, value))
        elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            parts.append((name, tuple(value)))
    policy = (type(guidance).__name__, tuple(guidance.branches)) if guidance is not None else None
    return (tuple(parts), policy, size)


def _graph_key(args: dict[str, Any], adapter) -> tuple:
    """What a captured step bakes in from the call's arguments: tensors by shape, and the values of every
    argument but the adapter's ``graph_value_args`` (those reach the steps through the job's graph inputs)."""
    skip = set(adapter.graph_value_args)
    return tuple((name, _key_value(value)) for name, value in sorted(args.items())
                 if name not in skip or isinstance(value, torch.Tensor))


def _key_value(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype), str(value.device))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_key_value(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((str(k), _key_value(v)) for k, v in value.items())))
    return repr(describe_value(value))


def _weights_key(pipeline) -> tuple:
    """The transformers' parameter and buffer addresses: a captured step reads weights from these, so weights
    swapped for new tensors (adapters loaded, modules replaced) must not replay it. In-place updates keep them."""
    key = []
    for name in ("transformer", "transformer_2"):
        model = getattr(pipeline, name, None)
        if isinstance(model, torch.nn.Module):
            key.append((name, id(model), hash(tuple(t.data_ptr() for t in model.parameters())),
                        hash(tuple(t.data_ptr() for t in model.buffers()))))
    return tuple(key)


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
    batch_branches: bool | str | None = None,
    noise: str = "philox",
    compile_transformer: bool | str = False,
    compile_mode: str | None = None,
    cuda_graphs: bool | None = None,
    text_bucket: int | None = None,
    check_finite: bool = False,
) -> CompiledPipeline:
    """Make ``pipeline`` CFG-parallel over ``cfg_parallel_size`` ranks.

    Args:
        pipeline: a stock diffusers pipeline (see ``pycfg.supported_pipelines()``), already on its device.
        cfg_parallel_size: ranks per CFG group. Under torchrun a world of k * cfg_parallel_size ranks forms k
            groups of consecutive ranks; 1 needs no process group at all.
        exchange: ``"gather"`` (all-gather the branch predictions, combine on every rank: bit-identical to the
            sequential pipeline) or ``"reduce"`` (one fp32 weighted all-reduce; linear policies only).
        fused: run combine + scheduler update as one fused kernel. ``None``: the Triton kernel on CUDA, the
            scheduler's own ``step()`` elsewhere (bit-identical to the stock pipeline); ``True``: always the
            kernel (on CPU in Triton's interpreter, TRITON_INTERPRET=1); ``False``: always ``step()``.
            Schedulers without a coefficient table use ``step()`` in any case.
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
        batch_branches: run several same-shape branches dispatched to one rank as one batched forward.
            ``"auto"``: time both ways on the first request of each shape and keep the faster. ``None``
            (default): ``"auto"`` when the transformer is compiled, else ``False``. Pass ``False`` for the stock
            pipeline's bits: a batched forward's numerics can differ from separate batch-1 forwards.
        compile_transformer: ``torch.compile`` the transformer in place: ``True`` / ``"full"`` (the whole
            model), ``"regional"`` (each repeated block; the same code serves every block, so cold starts take
            about one block's compile) or ``False``. Shapes are exact (no dynamic shapes) and every per-step
            value is a tensor, so steps and guidance scales never recompile; each new image size or text length
            compiles once (see ``text_bucket`` and :meth:`CompiledPipeline.warmup`).
        compile_mode: the ``torch.compile`` mode (``None`` for its default, ``"max-autotune-no-cudagraphs"``,
            ...). ``"reduce-overhead"`` brings torch's own CUDA graphs and cannot be combined with pycfg's.
        cuda_graphs: capture each denoising step (forwards, collective, fused update) as one CUDA graph and
            replay it. Graphs are kept per request shape, and later requests of that shape replay them with
            their own inputs and guidance scale. ``None``: on when the pipeline is on CUDA and the transformer
            is compiled.
        text_bucket: pad text inputs to a multiple of this many tokens, with the padding masked out (adapters
            whose model honours text masks only): fewer shapes to compile, and cond/uncond texts of different
            lengths can share a batched forward. ``None``: exact lengths.
        check_finite: raise a ``ValueError`` naming the argument when a tensor argument (embeddings, latents)
            holds NaN or Inf, and a ``FloatingPointError`` when the denoised latents do. Off (the default) it
            costs nothing.

    Returns:
        A :class:`CompiledPipeline`: call it like the pipeline; ``close()`` it (or use ``with``) when done.
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
    if check_finite not in (True, False):
        raise ValueError(f"check_finite must be True or False, got {check_finite!r}")
    if batch_branches not in (True, False, None, "auto"):
        raise ValueError(f"batch_branches must be True, False, 'auto' or None, got {batch_branches!r}")
    how = check_compile_option(compile_transformer, compile_mode)
    if cuda_graphs not in (None, True, False):
        raise ValueError(f"cuda_graphs must be None, True or False, got {cuda_graphs!r}")
    if cuda_graphs and compile_mode == "reduce-overhead":
        raise ValueError("compile_mode='reduce-overhead' uses torch's own CUDA graphs: it cannot run inside "
                         "pycfg's step graphs (pass cuda_graphs=False, or another compile_mode)")
    if text_bucket is not None and (isinstance(text_bucket, bool) or not isinstance(text_bucket, int)
                                    or text_bucket < 1):
        raise ValueError(f"text_bucket must be a positive integer or None, got {text_bucket!r}")
    adapter_class = find_adapter(pipeline)
    device = _pipeline_device(pipeline)
    adapter = adapter_class(pipeline, fused=fused, noise=noise)
    if text_bucket is not None:
        if not hasattr(adapter_class, "text_bucket"):
            raise ValueError(f"text_bucket: {adapter_class.__name__} does not pad text inputs")
        adapter.text_bucket = text_bucket
    if batch_branches is None:
        batch_branches = "auto" if how is not None else False
    adapter.batch_branches = batch_branches if batch_branches != "auto" else False
    if cuda_graphs is None:
        cuda_graphs = device.type == "cuda" and how is not None and compile_mode != "reduce-overhead"
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs the pipeline on a CUDA device, not {device}")
    if cuda_graphs and not getattr(adapter_class, "graph_step_index", False):
        logger.info("pycfg: %s does not support whole-step CUDA graphs; steps run eagerly", adapter_class.__name__)
        cuda_graphs = False
    if guidance is not None:
        # before any process group exists: a policy that cannot run fails here, not at the first call
        _check_exchange(exchange, guidance, cfg_parallel_size)
        if hasattr(adapter, "check_policy"):
            adapter.check_policy(guidance)

    pg = form_cfg_group(cfg_parallel_size, device=device, timeout=float(timeout), group=group)
    try:
        comm = make_comm(pg, device=device, timeout=float(timeout), comm=comm)
    except BaseException:
        release_cfg_group(pg)
        raise
    compiled = CompiledPipeline(
        pipeline,
        adapter,
        comm,
        exchange=exchange,
        fused=fused,
        check_consistency=check_consistency,
        guidance=guidance,
        timeout=float(timeout),
        check_finite=check_finite,
    )
    compiled.batch_mode = batch_branches
    if how is not None:
        start = time.perf_counter()
        info = _compile_transformer(pipeline.transformer, how, compile_mode)
        for extra in ("transformer_2",):
            if getattr(pipeline, extra, None) is not None:
                _compile_transformer(getattr(pipeline, extra), how, compile_mode)
        # torch.compile is lazy: the real compile time shows up in warmup()'s cold call
        info["setup_s"] = time.perf_counter() - start
        compiled.compile_info = info
    if cuda_graphs:
        from .runtime.graphs import StepGraphs

        compiled.step_graphs = StepGraphs(device)
    logger.info("pycfg: %s", compiled.describe())
    return compiled
