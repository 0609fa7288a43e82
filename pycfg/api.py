"""``pycfg.compile``: pick the adapter, form the CFG group, return a callable that runs the pipeline's calls."""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist

from .adapters import find_adapter
from .adapters.base import Adapter
from .guidance import GuidancePolicy
from .options import CompileOptions
from .parallel.comm import Communicator, make_comm
from .parallel.context import check_pipeline, context_parallel_info
from .parallel.groups import form_cfg_group, release_cfg_group
from .runtime.checks import check_finite_result, check_job, check_tensor_arguments
from .runtime.compiled import choose_batching
from .runtime.compiled import compile_transformer as _compile_transformer
from .runtime.consistency import agree, describe_value, fingerprint
from .runtime.denoise import denoise
from .runtime.job import Job

logger = logging.getLogger("pycfg")


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

    def __init__(self, pipeline, adapter: Adapter, comm: Communicator, options: CompileOptions) -> None:
        self.pipeline = pipeline
        self.adapter = adapter
        self.comm = comm
        #: the validated options, with every "decide from the device" choice made
        self.options = options
        self._closed = False
        #: wall time of each denoising step of the last call, in seconds
        self.last_step_times: list[float] = []
        self._lock = threading.Lock()
        #: set by compile(): what was compiled
        self.compile_info: dict[str, Any] | None = None
        #: the CUDA-graph runner (None: steps run eagerly)
        self.step_graphs = None
        #: per request shape, the measured batching choice (``batch_branches="auto"``)
        self.batch_choices: dict[Any, dict[str, Any]] = {}
        self.warmup_times: dict[str, float] = {}
        #: set by compile() with ring_degree or ulysses_degree > 1: this rank's request mesh, and what runs it
        self.request_mesh = None
        self.context_parallel: dict[str, Any] | None = None
        #: every rank serving a request: the CFG group, or with context parallelism the whole request mesh (the
        #: same call, the same state after every step)
        self.request_comm: Communicator = comm

    @property
    def batch_mode(self) -> bool | str:
        """``"auto"`` (measured per request shape), True or False."""
        return self.options.batch_branches

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
        guidance = kwargs.pop("guidance", self.options.guidance)
        error: Exception | None = None
        args, job, key = kwargs, None, None
        try:
            if guidance is not None and not isinstance(guidance, GuidancePolicy):
                raise TypeError(f"guidance must be a pycfg.guidance policy, got {type(guidance).__name__}")
            args = self.adapter.check(kwargs)
            check_tensor_arguments(args, finite=self.options.check_finite)
        except Exception as err:  # agreed on below, so that every rank raises
            error = err
        digest, described = fingerprint({**args, "__guidance__": guidance, "__exchange__": self.options.exchange})
        if error is None:
            try:
                if self.request_mesh is not None:
                    from .parallel.context import check_split

                    check_split(self.adapter.context_parallel_lengths(args), self.request_mesh.layout)
                if guidance is not None:
                    _check_exchange(self.options.exchange, guidance, self.comm.size)
                key = _shape_key(args, guidance, self.comm.size)
                job = self.adapter.prepare(args, guidance)
                _check_exchange(self.options.exchange, job.policy, self.comm.size)
                check_job(job, args, finite=self.options.check_finite)
            except Exception as err:
                error = err
        # before any forward: every rank serving the request was called the same way and accepted the call, or
        # every rank raises
        agree(self.request_comm, digest, described, error)
        return AdmittedCall(args, guidance, job, key)

    def _run(self, call: AdmittedCall):
        args, job = call.args, call.job
        batched = self._batched(call.key, job)
        if self.step_graphs is not None:
            self.step_graphs.shape_key = (_graph_key(args, self.adapter), _weights_key(self.adapter))
        latents, self.last_step_times = denoise(
            job, self.comm, exchange=self.options.exchange, check_consistency=self.options.check_consistency,
            batched=batched, step_graphs=self.step_graphs, request_comm=self.request_comm,
        )
        if self.options.check_finite:
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

    def _batched(self, key: tuple, job) -> bool:
        """Whether this request's same-shape branches share batched forwards (measured once per shape for
        ``batch_branches="auto"``)."""
        mode = self.batch_mode
        if mode != "auto":
            return bool(mode)
        if key not in self.batch_choices:
            self.batch_choices[key] = choose_batching(job) if self.comm.size == 1 else {
                "batched": False, "why": "branches run on different ranks"}
        return self.batch_choices[key]["batched"]

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
            "exchange": self.options.exchange,
            "communicator": self.comm.name,
            "fused": self.options.fused,
            "update": "fused kernel" if self.options.fused or (self.options.fused is None
                                                               and self.device.type == "cuda")
            else "scheduler.step() (reference)",
            "check_consistency": self.options.check_consistency,
            "timeout": self.options.timeout,
            "check_finite": self.options.check_finite,
            "batch_branches": self.batch_mode,
            "batch_choices": {repr(k): v for k, v in self.batch_choices.items()},
            "text_bucket": self.adapter.text_bucket,
            "capabilities": asdict(self.adapter.capabilities),
            "compile_transformer": self.compile_info,
            "cuda_graphs": self.step_graphs.describe() if self.step_graphs is not None else False,
            "mesh": self.request_mesh.describe() if self.request_mesh is not None else None,
            "context_parallel": self.context_parallel,
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


def _graph_key(args: dict[str, Any], adapter: Adapter | type[Adapter]) -> tuple:
    """What a captured step bakes in from the call's arguments: tensors by shape, and the values of every
    argument but the adapter's ``graph_value_args`` (those reach the steps through the job's graph inputs)."""
    skip = set(adapter.capabilities.graph_value_args)
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


def _weights_key(adapter: Adapter) -> tuple:
    """The transformers' parameter and buffer addresses: a captured step reads weights from these, so weights
    swapped for new tensors (adapters loaded, modules replaced) must not replay it. In-place updates keep them."""
    return tuple((name, id(model), hash(tuple(t.data_ptr() for t in model.parameters())),
                  hash(tuple(t.data_ptr() for t in model.buffers())))
                 for name, model in adapter.transformers().items())


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
    ring_degree: int = 1,
    ulysses_degree: int = 1,
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
        ring_degree, ulysses_degree: context parallelism inside each CFG rank. With either above 1 the world is
            split into request groups of ``cfg_parallel_size * ring_degree * ulysses_degree`` ranks, each one
            ``DeviceMesh`` with dimensions ``("cfg", "ring", "ulysses")``; every branch forward runs over its
            ``("ring", "ulysses")`` sub-mesh through diffusers' context parallelism (Ulysses all-to-all, ring
            attention), and the per-step collective runs over ``"cfg"``. The transformer must have a ``_cp_plan``
            and a context-parallel attention backend; it is parallelised once, for one layout. Sequences must split
            evenly (Qwen-Image pads its text with a mask; see ``describe()["context_parallel"]``). Whole-step CUDA
            graphs are off with context parallelism (steps run eagerly).
        check_finite: raise a ``ValueError`` naming the argument when a tensor argument (embeddings, latents)
            holds NaN or Inf, and a ``FloatingPointError`` when the denoised latents do. Off (the default) it
            costs nothing.

    Returns:
        A :class:`CompiledPipeline`: call it like the pipeline; ``close()`` it (or use ``with``) when done.
    """
    options = CompileOptions(
        cfg_parallel_size=cfg_parallel_size, exchange=exchange, fused=fused, check_consistency=check_consistency,
        timeout=timeout, guidance=guidance, comm=comm, batch_branches=batch_branches, noise=noise,
        compile_transformer=compile_transformer, compile_mode=compile_mode, cuda_graphs=cuda_graphs,
        text_bucket=text_bucket, ring_degree=ring_degree, ulysses_degree=ulysses_degree, check_finite=check_finite,
    )
    return compile_with_options(pipeline, options, group=group)


def compile_with_options(pipeline, options: CompileOptions, *, group: dist.ProcessGroup | None = None
                         ) -> CompiledPipeline:
    """:func:`compile` from an options object (what an Engine's workers call with the options it validated)."""
    adapter_class = find_adapter(pipeline)
    device = _pipeline_device(pipeline)
    options = options.resolved(device.type)
    layout = options.layout
    # before any process group exists: a transformer that cannot run the layout fails here
    cp_backends = check_pipeline(pipeline, adapter_class, options.layout, device,
                                 compiled=options.compile_transformer is not None)
    text_bucket = options.text_bucket
    if layout.context_parallel and adapter_class.capabilities.text_bucket:
        # the split text must divide by the degree: pad it (with its mask) to a multiple of it
        text_bucket = math.lcm(text_bucket or 1, layout.context_degree)
    adapter = adapter_class(pipeline, fused=options.fused, noise=options.noise, text_bucket=text_bucket)
    cuda_graphs = options.cuda_graphs
    if cuda_graphs and not adapter.capabilities.graph_steps:
        logger.info("pycfg: %s does not support whole-step CUDA graphs; steps run eagerly", adapter_class.__name__)
        cuda_graphs = False
    if options.guidance is not None:
        # before any process group exists: a policy that cannot run fails here, not at the first call
        _check_exchange(options.exchange, options.guidance, options.cfg_parallel_size)
        adapter.check_policy(options.guidance)

    request_mesh = None
    if layout.context_parallel:
        from .parallel.context import enable_context_parallel
        from .parallel.mesh import form_request_mesh

        request_mesh = form_request_mesh(layout, device=device, timeout=options.timeout, group=group)
        for name, backend in cp_backends.items():
            enable_context_parallel(getattr(pipeline, name), request_mesh, device, backend)
        pg = request_mesh.cfg_group
    else:
        pg = form_cfg_group(options.cfg_parallel_size, device=device, timeout=options.timeout, group=group)
    try:
        comm = make_comm(pg, device=device, timeout=options.timeout, comm=options.comm)
    except BaseException:
        if request_mesh is None:
            release_cfg_group(pg)
        raise
    compiled = CompiledPipeline(pipeline, adapter, comm, options)
    if request_mesh is not None:
        compiled.request_mesh = request_mesh
        compiled.request_comm = make_comm(request_mesh.request_group, device=device, timeout=options.timeout,
                                            comm="torch")
        compiled.context_parallel = context_parallel_info(cp_backends, adapter.text_bucket,
                                                          compiled=options.compile_transformer is not None)
    if options.compile_transformer is not None:
        start = time.perf_counter()
        infos = [_compile_transformer(model, options.compile_transformer, options.compile_mode)
                 for model in adapter.transformers().values()]
        info = infos[0]
        # torch.compile is lazy: the real compile time shows up in warmup()'s cold call
        info["setup_s"] = time.perf_counter() - start
        compiled.compile_info = info
    if cuda_graphs:
        from .runtime.graphs import StepGraphs

        compiled.step_graphs = StepGraphs(device)
    logger.info("pycfg: %s", compiled.describe())
    return compiled
