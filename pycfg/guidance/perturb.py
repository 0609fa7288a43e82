"""Perturbed forwards for perturbed-branch guidance (skip-layer / spatio-temporal guidance, PAG).

A perturbed branch runs the cond inputs through a deliberately weakened model. This module weakens a
transformer for the duration of one forward, without hooks that outlive it and without knowing the pipeline:

>>> from pycfg.guidance.perturb import SkipBlocks, SkipAttention, perturbed
>>> with perturbed(transformer, SkipBlocks([7, 8, 9])):       # those blocks return their inputs unchanged
...     pred_skip = transformer(**cond_inputs)[0]
>>> with perturbed(transformer, SkipAttention([2])):          # self/joint attention of block 2 returns V
...     pred_pag = transformer(**cond_inputs)[0]

Block indices count the transformer's block stacks in execution order: ``transformer_blocks`` first, then
``single_transformer_blocks`` (Flux, HunyuanVideo), or ``blocks`` (Wan). On Flux with 19 double and 38 single
blocks, index 19 is the first single block. :func:`transformer_blocks` lists them.

Skipping a block returns the block's own inputs in the block's return convention, which differs by class:
Qwen-Image, Flux and SD3 blocks return ``(encoder_hidden_states, hidden_states)``, CogVideoX and HunyuanVideo
``(hidden_states, encoder_hidden_states)``, Wan and LTX ``hidden_states``. Classes not listed in
:data:`BLOCK_OUTPUTS` raise; an adapter adds its own with :func:`register_block_outputs`.

Attention perturbation (PAG) replaces softmax(QK^T) with the identity inside the block's self/joint attention
modules (those not marked ``is_cross_attention``), so every token receives its own value vector. It works by
intercepting ``torch.nn.functional.scaled_dot_product_attention`` during those modules' forwards, which is
what diffusers' default (native) attention backend calls; a module whose attention does not go through it
(another backend) raises rather than silently running unperturbed.

A perturbation is a small frozen value object: hashable, comparable, and with ``describe()`` for logs and
the ranks' argument check. Model-argument perturbations (a transformer that takes e.g. LTX-2's
``spatio_temporal_guidance_blocks`` itself) use :class:`ForwardKwargs`, which the adapter merges into the
forward's keyword arguments; ``perturbed`` leaves the modules alone for those.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

#: block class name -> names of the forward's arguments that the block returns, in its return order
BLOCK_OUTPUTS: dict[str, tuple[str, ...]] = {
    "QwenImageTransformerBlock": ("encoder_hidden_states", "hidden_states"),
    "FluxTransformerBlock": ("encoder_hidden_states", "hidden_states"),
    "FluxSingleTransformerBlock": ("encoder_hidden_states", "hidden_states"),
    "JointTransformerBlock": ("encoder_hidden_states", "hidden_states"),
    "SD3SingleTransformerBlock": ("hidden_states",),
    "WanTransformerBlock": ("hidden_states",),
    "WanVACETransformerBlock": ("hidden_states",),
    "LTXVideoTransformerBlock": ("hidden_states",),
    "LTX2VideoTransformerBlock": ("hidden_states", "audio_hidden_states"),
    "CogVideoXBlock": ("hidden_states", "encoder_hidden_states"),
    "HunyuanVideoTransformerBlock": ("hidden_states", "encoder_hidden_states"),
    "HunyuanVideoSingleTransformerBlock": ("hidden_states", "encoder_hidden_states"),
    "HunyuanVideo15TransformerBlock": ("hidden_states", "encoder_hidden_states"),
    "LongCatImageTransformerBlock": ("encoder_hidden_states", "hidden_states"),
    "LongCatImageSingleTransformerBlock": ("encoder_hidden_states", "hidden_states"),
    "Flux2TransformerBlock": ("encoder_hidden_states", "hidden_states"),
    "BasicTransformerBlock": ("hidden_states",),
}

#: attributes holding a transformer's block stacks, in the order the transformer runs them
BLOCK_STACKS = ("transformer_blocks", "single_transformer_blocks", "blocks")


def register_block_outputs(class_name: str, outputs: Sequence[str]) -> None:
    """Declare what a block class returns: the names of its forward arguments, in return order.

    A single name means the block returns that tensor alone; several mean a tuple in that order.
    """
    outputs = tuple(outputs)
    if not outputs or not all(isinstance(o, str) for o in outputs):
        raise ValueError(f"outputs must be a non-empty sequence of argument names, got {outputs!r}")
    BLOCK_OUTPUTS[class_name] = outputs


def transformer_blocks(transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(qualified name, block) for every block of every stack, in execution order."""
    found = []
    for attr in BLOCK_STACKS:
        stack = getattr(transformer, attr, None)
        if isinstance(stack, torch.nn.ModuleList):
            found.extend((f"{attr}.{j}", block) for j, block in enumerate(stack))
    if not found:
        raise TypeError(
            f"{type(transformer).__name__} has none of the block stacks {', '.join(BLOCK_STACKS)}; "
            "perturbed-branch guidance cannot locate its transformer blocks"
        )
    return found


def _check_layers(what: str, layers: Sequence[int]) -> tuple[int, ...]:
    if isinstance(layers, int):
        layers = (layers,)
    try:
        out = tuple(layers)
    except TypeError:
        raise TypeError(f"{what}: layers must be an int or a sequence of ints, got {layers!r}") from None
    if not out:
        raise ValueError(f"{what}: layers must name at least one block")
    for j in out:
        if isinstance(j, bool) or not isinstance(j, int) or j < 0:
            raise ValueError(f"{what}: layer indices must be non-negative integers, got {j!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"{what}: layer indices repeat: {list(out)}")
    return tuple(sorted(out))


class Perturbation:
    """Base of the perturbation specs a branch can carry."""

    def check(self, transformer: torch.nn.Module) -> None:
        """Raise a clear error if this perturbation cannot apply to ``transformer`` (no model runs)."""

    def forward_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for the transformer's forward (model-argument perturbations)."""
        return {}

    def describe(self) -> str:
        return repr(self)


@dataclass(frozen=True)
class _LayerPerturbation(Perturbation):
    layers: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", _check_layers(type(self).__name__, self.layers))

    def blocks(self, transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        every = transformer_blocks(transformer)
        bad = [j for j in self.layers if j >= len(every)]
        if bad:
            stacks = [a for a in BLOCK_STACKS if isinstance(getattr(transformer, a, None), torch.nn.ModuleList)]
            raise ValueError(
                f"{type(self).__name__}: layer indices {bad} out of range: {type(transformer).__name__} has "
                f"{len(every)} blocks (valid indices 0..{len(every) - 1}, counting {' then '.join(stacks)})"
            )
        return [every[j] for j in self.layers]

    def describe(self) -> str:
        return f"{type(self).__name__}({list(self.layers)})"


@dataclass(frozen=True)
class SkipBlocks(_LayerPerturbation):
    """The chosen blocks return their inputs unchanged (skip-layer / spatio-temporal guidance)."""

    def check(self, transformer: torch.nn.Module) -> None:
        for name, block in self.blocks(transformer):
            _block_outputs(name, block)


@dataclass(frozen=True)
class SkipAttention(_LayerPerturbation):
    """Self/joint attention in the chosen blocks attends each token to itself only (PAG)."""

    def check(self, transformer: torch.nn.Module) -> None:
        for name, block in self.blocks(transformer):
            if not _self_attention_modules(block):
                raise ValueError(
                    f"SkipAttention: block {name} ({type(block).__name__}) has no self-attention module"
                )


@dataclass(frozen=True)
class ForwardKwargs(Perturbation):
    """A perturbation the transformer implements itself, selected by forward keyword arguments."""

    items: tuple[tuple[str, Any], ...] = field(default=())

    @classmethod
    def of(cls, **kwargs: Any) -> "ForwardKwargs":
        return cls(tuple(sorted((k, _freeze(v)) for k, v in kwargs.items())))

    def forward_kwargs(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.items}

    def describe(self) -> str:
        return f"ForwardKwargs({', '.join(f'{k}={v!r}' for k, v in self.items)})"


def _freeze(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _block_outputs(name: str, block: torch.nn.Module) -> tuple[str, ...]:
    cls = type(block).__name__
    outputs = BLOCK_OUTPUTS.get(cls)
    if outputs is None:
        raise TypeError(
            f"SkipBlocks: block {name} is a {cls}, whose return convention pycfg does not know; declare it with "
            f"pycfg.guidance.perturb.register_block_outputs({cls!r}, (<argument names it returns, in order>))"
        )
    params = inspect.signature(type(block).forward).parameters
    missing = [o for o in outputs if o not in params]
    if missing:
        raise TypeError(f"SkipBlocks: {cls}.forward has no argument(s) {missing}; fix its BLOCK_OUTPUTS entry")
    return outputs


def _self_attention_modules(block: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    # duck-typed diffusers attention: a processor and a value projection; cross-attention keeps its keys and
    # values from the text, so replacing its scores by the identity is undefined (different lengths)
    return [
        (name, m)
        for name, m in block.named_modules()
        if hasattr(m, "processor") and hasattr(m, "to_v") and not getattr(m, "is_cross_attention", False)
    ]


def _patch_forward(module: torch.nn.Module, make) -> Any:
    """Install ``make(previous_forward)`` as the module's forward; returns what to restore."""
    saved = module.__dict__.get("forward")  # a hook library may already have replaced it
    previous = saved if saved is not None else module.forward
    module.forward = make(previous)
    return saved


def _restore_forward(module: torch.nn.Module, saved: Any) -> None:
    if saved is None:
        module.__dict__.pop("forward", None)
    else:
        module.forward = saved


def _skip_forward(name: str, block: torch.nn.Module, outputs: tuple[str, ...]):
    signature = inspect.signature(type(block).forward)

    def make(previous):
        def skipped(*args, **kwargs):
            bound = signature.bind(block, *args, **kwargs)
            bound.apply_defaults()
            values = tuple(bound.arguments[o] for o in outputs)
            return values[0] if len(values) == 1 else values

        return skipped

    return make


class _IdentityAttention(TorchFunctionMode):
    """Answers scaled_dot_product_attention with its value tensor: attention probabilities = identity."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where
        self.hits = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            query = kwargs["query"] if "query" in kwargs else args[0]
            value = kwargs["value"] if "value" in kwargs else args[2]
            if query.shape[-2] != value.shape[-2]:
                raise ValueError(
                    f"SkipAttention: attention in {self.where} has {query.shape[-2]} queries but {value.shape[-2]} "
                    "values; identity attention needs self/joint attention"
                )
            if value.shape[-3] != query.shape[-3]:  # grouped-query attention: shared value heads
                value = value.repeat_interleave(query.shape[-3] // value.shape[-3], dim=-3)
            self.hits += 1
            return value
        return func(*args, **kwargs)


def _identity_attention_forward(where: str):
    def make(previous):
        def forward(*args, **kwargs):
            mode = _IdentityAttention(where)
            with mode:
                out = previous(*args, **kwargs)
            if mode.hits == 0:
                raise RuntimeError(
                    f"SkipAttention: the attention in {where} did not call "
                    "torch.nn.functional.scaled_dot_product_attention (a non-native attention backend?); "
                    "attention perturbation needs diffusers' native backend"
                )
            return out

        return forward

    return make


@contextlib.contextmanager
def perturbed(transformer: torch.nn.Module, spec: Perturbation | None) -> Iterator[None]:
    """Apply ``spec`` to ``transformer`` for the body of the ``with``; restore it on exit, even on error.

    ``spec=None`` and :class:`ForwardKwargs` leave the modules untouched. Not thread-safe against other
    forwards of the same transformer running concurrently.
    """
    if spec is None or isinstance(spec, ForwardKwargs):
        yield
        return
    if not isinstance(spec, (SkipBlocks, SkipAttention)):
        raise TypeError(f"unknown perturbation {spec!r}")
    patched: list[tuple[torch.nn.Module, Any]] = []
    try:
        for name, block in spec.blocks(transformer):
            if isinstance(spec, SkipBlocks):
                maker = _skip_forward(name, block, _block_outputs(name, block))
                patched.append((block, _patch_forward(block, maker)))
            else:
                modules = _self_attention_modules(block)
                if not modules:
                    raise ValueError(f"SkipAttention: block {name} ({type(block).__name__}) has no self-attention")
                for sub, attn in modules:
                    maker = _identity_attention_forward(f"{name}.{sub}")
                    patched.append((attn, _patch_forward(attn, maker)))
        yield
    finally:
        for module, saved in reversed(patched):
            _restore_forward(module, saved)
