"""Context parallelism through diffusers' own engine: ``ContextParallelConfig(mesh=...)`` and its hooks.

Each CFG rank's branch forward runs over its ``("ring", "ulysses")`` sub-mesh: diffusers' split/gather hooks (the
transformer's ``_cp_plan``) cut the sequence into ``ring * ulysses`` shards before the blocks and gather the output
after ``proj_out``, and its attention templates run Ulysses all-to-alls and ring passes. Every rank of a
sub-mesh ends a forward with the same full prediction, so the runtime above sees an ordinary forward.

``ModelMixin.enable_parallelism`` picks its device as ``rank % torch.accelerator.device_count()``, which divides by
zero on a CPU-only torch. The same steps are taken here through diffusers' lower-level pieces
(``ParallelConfig.setup``, the processors' ``_parallel_config``, ``apply_context_parallel``) with the pipeline's
own device, on CPU and CUDA alike.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .mesh import MeshLayout, RequestMesh

#: backends whose context-parallel path cannot run ring attention (they refuse ``return_lse=True``)
_NO_LSE_BACKENDS = ("native", "_native_math", "_native_npu", "xformers")

#: the layout each transformer was parallelised with: a transformer is parallelised once, for one layout
_PARALLELISED: "weakref.WeakKeyDictionary[torch.nn.Module, ContextParallelState]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class ContextParallelState:
    layout: MeshLayout
    backend: str
    ranks: tuple[int, ...]


def _attention_processors(model: torch.nn.Module) -> list:
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention, MochiAttention

    classes = (Attention, MochiAttention, AttentionModuleMixin)
    return [m.processor for m in model.modules() if isinstance(m, classes) and m.processor is not None]


def attention_backend_of(model: torch.nn.Module) -> str:
    """The attention backend the model's processors dispatch to (the active default when they name none)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    for processor in _attention_processors(model):
        if hasattr(processor, "_attention_backend"):
            backend = processor._attention_backend
            if backend is None:
                backend, _ = _AttentionBackendRegistry.get_active_backend()
            return getattr(backend, "value", str(backend))
    backend, _ = _AttentionBackendRegistry.get_active_backend()
    return backend.value


def _supported_backends() -> list[str]:
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    return sorted(_AttentionBackendRegistry._supports_context_parallel)


def check_transformer(model: torch.nn.Module, layout: MeshLayout, device: torch.device, *, name: str) -> str:
    """Raise, before any process group exists, unless ``model`` can run this layout; returns the attention backend
    it will use (on CPU, ring attention switches the default ``native`` backend to pycfg's log-sum-exp one)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    from .cpu_attention import CPU_LSE_BACKEND, register_cpu_lse_backend

    cls = type(model).__name__
    state = _PARALLELISED.get(model)
    if state is not None:
        if state.layout != layout:
            raise ValueError(
                f"{name} ({cls}) already runs context-parallel as {state.layout.describe()}; it cannot be "
                f"parallelised again as {layout.describe()}: compile a freshly loaded pipeline for another layout"
            )
        return state.backend
    if getattr(model, "_parallel_config", None) is not None:
        raise ValueError(f"{name} ({cls}) was parallelised outside pycfg (enable_parallelism or from_pretrained "
                         "with parallel_config=); pass the pipeline without parallelism and let pycfg apply it")
    if not layout.context_parallel:
        return attention_backend_of(model)
    if getattr(model, "_cp_plan", None) is None:
        raise ValueError(
            f"ring_degree/ulysses_degree > 1 need a transformer with a context-parallel plan (_cp_plan); {name} "
            f"({cls}) has none. diffusers 0.42.1 has plans for Qwen-Image, Flux, FLUX.2, Wan, LTX and LTX-2 "
            "transformers"
        )
    heads = getattr(model.config, "num_attention_heads", None)
    if heads is not None and heads % layout.ulysses:
        allowed = [u for u in range(1, heads + 1) if heads % u == 0]
        raise ValueError(
            f"ulysses_degree={layout.ulysses} must divide {name}'s attention head count {heads} (Ulysses gives "
            f"each rank heads/ulysses_degree heads); allowed: {allowed}"
        )
    backend = attention_backend_of(model)
    if device.type == "cpu":
        register_cpu_lse_backend()
        if layout.ring > 1 and backend == "native":
            backend = CPU_LSE_BACKEND
    if backend not in _AttentionBackendRegistry._supports_context_parallel:
        raise ValueError(
            f"{name} ({cls}) uses attention backend {backend!r}, which has no context-parallel support; "
            f"supported: {', '.join(_supported_backends())} (transformer.set_attention_backend(...))"
        )
    if layout.ring > 1 and backend in _NO_LSE_BACKENDS:
        raise ValueError(
            f"ring_degree > 1 needs an attention backend that returns the log-sum-exp; {name} uses {backend!r}. "
            f"Use ulysses_degree instead, or a backend such as '_native_cudnn', 'flash' or '_flash_3'"
            + (f" (on CPU: {CPU_LSE_BACKEND!r})" if device.type == "cpu" else "")
        )
    if backend == CPU_LSE_BACKEND and model.dtype != torch.float32:
        raise ValueError(f"attention backend {CPU_LSE_BACKEND!r} (ring attention on CPU) runs float32 only; "
                         f"{name} is {model.dtype}")
    return backend


def enable_context_parallel(model: torch.nn.Module, request: RequestMesh, device: torch.device, backend: str) -> None:
    """Apply diffusers' context parallelism to ``model`` over the request mesh's ("ring", "ulysses") sub-mesh,
    once; a second call with the same layout keeps the first one's hooks. Collective over the world (the mesh's
    flattened groups are created here): every rank calls it in the same order."""
    from diffusers.hooks.context_parallel import apply_context_parallel
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig

    layout = request.layout
    if model in _PARALLELISED or not layout.context_parallel:
        return
    if backend != attention_backend_of(model):
        # what set_attention_backend does to the processors, without also making it the process-wide default
        from diffusers.models.attention_dispatch import AttentionBackendName

        for processor in _attention_processors(model):
            if hasattr(processor, "_attention_backend"):
                processor._attention_backend = AttentionBackendName(backend)
    cp = ContextParallelConfig(ring_degree=layout.ring, ulysses_degree=layout.ulysses, mesh=request.mesh)
    config = ParallelConfig(context_parallel_config=cp)
    config.setup(dist.get_rank(), dist.get_world_size(), torch.device(device), mesh=request.mesh)
    model._parallel_config = config
    for processor in _attention_processors(model):
        if hasattr(processor, "_parallel_config"):
            processor._parallel_config = config
    apply_context_parallel(model, cp, model._cp_plan)
    _PARALLELISED[model] = ContextParallelState(layout=layout, backend=backend, ranks=request.ranks)


def check_split(lengths: dict[str, tuple[int, str]], layout: MeshLayout) -> None:
    """Raise unless every split sequence divides by the context-parallel degree. ``lengths``: what -> (length,
    which call arguments set it)."""
    degree = layout.context_degree
    for what, (length, hint) in lengths.items():
        if length % degree:
            raise ValueError(
                f"{what}: {length} tokens cannot be split evenly over ring_degree x ulysses_degree = {degree} "
                f"ranks; choose {hint} so that it is a multiple of {degree}"
            )


def check_pipeline(pipeline, adapter_class, layout: MeshLayout, device: torch.device, *, compiled: bool
                   ) -> dict[str, str]:
    """Every transformer's attention backend for ``layout`` (by pipeline attribute), from the adapter's declared
    capabilities; raises if one cannot run it, or if it was parallelised for another layout. Runs before any
    process group is made, so every rank fails alike."""
    from .cpu_attention import CPU_LSE_BACKEND

    capabilities = adapter_class.capabilities
    name = type(pipeline).__name__
    if layout.context_parallel and not capabilities.context_parallel:
        raise ValueError(f"ring_degree/ulysses_degree > 1: {adapter_class.__name__} ({name}) does not run "
                         "context-parallel; pipelines that do: Qwen-Image, Flux, Wan")
    backends = {}
    for attr in capabilities.transformer_modules:
        model = getattr(pipeline, attr, None)
        if isinstance(model, torch.nn.Module):
            backends[attr] = check_transformer(model, layout, device, name=attr)
    if not layout.context_parallel:
        return backends
    masked_text = capabilities.text_bucket  # texts padded with a mask to split evenly
    if masked_text and layout.ring > 1:
        if layout.ulysses > 1:
            raise ValueError(f"ring_degree > 1 together with ulysses_degree > 1 cannot run {name}'s masked text "
                             "attention correctly; use one of the two")
        wrong = sorted(b for b in backends.values() if b != CPU_LSE_BACKEND)
        if wrong:
            raise ValueError(
                f"ring_degree > 1 with {name}'s masked text: diffusers' ring attention applies each rank's local "
                f"mask to every key/value chunk (wrong results) with backend {wrong[0]!r}; use ulysses_degree "
                f"instead (pycfg's {CPU_LSE_BACKEND!r} CPU backend masks each chunk correctly)"
            )
    if masked_text and compiled and device.type == "cpu":
        raise ValueError(
            "compile_transformer with ring_degree/ulysses_degree > 1 on CPU: inductor's CPU code generation fails "
            f"on the gathered text attention mask of {name} (torch {torch.__version__}); pass "
            "compile_transformer=False on CPU (pipelines without text masks, e.g. Flux and Wan, compile)"
        )
    return backends


def context_parallel_info(backends: dict[str, str], text_bucket: int | None, *, compiled: bool) -> dict:
    """What ``describe()["context_parallel"]`` reports: the engine, backends, text padding, and what runs eagerly."""
    return {
        "engine": "diffusers ContextParallelConfig(mesh=...) over the ('ring', 'ulysses') sub-mesh",
        "attention_backend": dict(backends),
        "text_bucket": text_bucket,
        "cuda_graphs": "off: diffusers' context-parallel collectives are not capturable; steps run eagerly",
        "compiled_forward": "torch.compile traces the forward with graph breaks at diffusers' host-side collectives"
        if compiled else None,
    }
