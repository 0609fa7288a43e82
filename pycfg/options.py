"""The options of :func:`pycfg.compile` (and of every worker an :class:`~pycfg.Engine` starts), as one frozen
value validated once.

Every allowed value lives here. ``compile()`` builds a :class:`CompileOptions` from its keyword arguments; the
Engine builds the same object from its ``**compile_options`` with :meth:`CompileOptions.from_kwargs`, so a bad
option fails in the caller's process, before any worker starts, with the same message.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, Union

from .choices import BATCH_CHOICES, COMMS, COMPILE_CHOICES, EXCHANGES, NOISE_SOURCES, check_choice, is_one_of
from .guidance.base import GuidancePolicy
from .parallel.mesh import MeshLayout

Exchange = Literal["gather", "reduce"]
Comm = Literal["auto", "torch", "nccl-ext"]
Noise = Literal["philox", "diffusers"]
CompileHow = Literal["full", "regional"]
#: ``"auto"``: measured per request shape; True / False: always / never batched
Batching = Union[bool, Literal["auto"]]



def _optional_bool(name: str, value: Any) -> None:
    if not is_one_of(value, (None, True, False)):
        raise ValueError(f"{name} must be None, True or False, got {value!r}")


@dataclass(frozen=True)
class CompileOptions:
    """Validated options of one compiled pipeline (see :func:`pycfg.compile` for what each one does).

    ``None`` in ``fused``, ``batch_branches`` and ``cuda_graphs`` means "decide from the device and the other
    options"; :meth:`resolved` makes that decision once the pipeline's device is known.
    """

    cfg_parallel_size: int = 1
    exchange: Exchange = "gather"
    fused: bool | None = None
    check_consistency: bool = False
    timeout: float = 60.0
    guidance: GuidancePolicy | None = None
    comm: Comm = "auto"
    batch_branches: Batching | None = None
    noise: Noise = "philox"
    #: None (off), "full" or "regional"; ``compile_transformer=True`` arrives here as "full"
    compile_transformer: CompileHow | None = None
    compile_mode: str | None = None
    cuda_graphs: bool | None = None
    text_bucket: int | None = None
    #: context parallelism inside each CFG rank (see ``layout``)
    ring_degree: int = 1
    ulysses_degree: int = 1
    #: raise on NaN/Inf in tensor arguments and in the denoised latents (free when off)
    check_finite: bool = False

    def __post_init__(self) -> None:
        size = self.cfg_parallel_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"cfg_parallel_size must be an integer >= 1, got {size!r}")
        check_choice("exchange", self.exchange, EXCHANGES)
        _optional_bool("fused", self.fused)
        check_choice("noise", self.noise, NOISE_SOURCES)
        timeout = self.timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        object.__setattr__(self, "timeout", float(timeout))
        if self.guidance is not None and not isinstance(self.guidance, GuidancePolicy):
            raise TypeError(f"guidance must be a pycfg.guidance policy, got {type(self.guidance).__name__}")
        check_choice("comm", self.comm, COMMS)
        if not is_one_of(self.batch_branches, BATCH_CHOICES):
            raise ValueError(f"batch_branches must be True, False, 'auto' or None, got {self.batch_branches!r}")
        how = self.compile_transformer
        if how is not None:
            check_choice("compile_transformer", how, COMPILE_CHOICES)
        object.__setattr__(self, "compile_transformer", {True: "full", False: None}.get(how, how))
        if self.compile_mode is not None and not isinstance(self.compile_mode, str):
            raise ValueError(f"compile_mode must be a torch.compile mode name or None, got {self.compile_mode!r}")
        _optional_bool("cuda_graphs", self.cuda_graphs)
        if self.cuda_graphs and self.compile_mode == "reduce-overhead":
            raise ValueError("compile_mode='reduce-overhead' uses torch's own CUDA graphs: it cannot run inside "
                             "pycfg's step graphs (pass cuda_graphs=False, or another compile_mode)")
        bucket = self.text_bucket
        if bucket is not None and (isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 1):
            raise ValueError(f"text_bucket must be a positive integer or None, got {bucket!r}")
        object.__setattr__(self, "check_consistency", bool(self.check_consistency))
        if self.check_finite not in (True, False):
            raise ValueError(f"check_finite must be True or False, got {self.check_finite!r}")
        object.__setattr__(self, "check_finite", bool(self.check_finite))
        layout = self.layout  # validates ring_degree and ulysses_degree
        if self.cuda_graphs and layout.context_parallel:
            raise ValueError("cuda_graphs=True cannot be combined with ring_degree/ulysses_degree > 1: diffusers' "
                             "context-parallel collectives (size exchanges on the host, mask gathers) are not "
                             "capturable; steps run eagerly (pass cuda_graphs=None or False)")

    @property
    def layout(self) -> MeshLayout:
        """Ranks per request along ("cfg", "ring", "ulysses")."""
        return MeshLayout(self.cfg_parallel_size, self.ring_degree, self.ulysses_degree)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_kwargs(cls, options: dict[str, Any]) -> CompileOptions:
        """The options from keyword arguments; an unknown name raises ``TypeError`` listing the allowed ones."""
        unknown = sorted(set(options) - set(cls.names()))
        if unknown:
            raise TypeError(f"unknown compile option(s) {', '.join(map(repr, unknown))}; allowed: "
                            f"{', '.join(cls.names())}")
        return cls(**options)

    def as_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``compile()`` that build these options again."""
        out = asdict(self)
        out["guidance"] = self.guidance  # asdict would deep-copy the policy
        out["compile_transformer"] = self.compile_transformer or False
        return out

    def resolved(self, device_type: str) -> CompileOptions:
        """These options with every "decide later" settled for a pipeline on ``device_type``: batching is
        ``"auto"`` when the transformer is compiled, else off; step graphs are on for a compiled transformer on
        CUDA (outside torch's own ``reduce-overhead`` graphs). Raises if step graphs were asked for off CUDA."""
        batch = self.batch_branches
        if batch is None:
            batch = "auto" if self.compile_transformer is not None else False
        graphs = self.cuda_graphs
        if graphs is None:
            graphs = (device_type == "cuda" and self.compile_transformer is not None
                      and self.compile_mode != "reduce-overhead" and not self.layout.context_parallel)
        if graphs and device_type != "cuda":
            raise ValueError(f"cuda_graphs=True needs the pipeline on a CUDA device, not {device_type}")
        return CompileOptions(**{**self.as_kwargs(), "batch_branches": batch, "cuda_graphs": graphs})
