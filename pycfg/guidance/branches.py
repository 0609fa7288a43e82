"""Guidance with more than two branches: perturbed-branch guidance (SLG/STG, PAG) and general linear mixes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .base import COND, UNCOND, Branch, LinearPolicy, Prediction, check_scale, check_window, in_window, outputs_of
from .cfg import _check_rescale, _window_text
from .perturb import Perturbation, SkipAttention, SkipBlocks


class _PerturbedGuidance(LinearPolicy):
    """CFG plus a perturbed cond branch, with the arithmetic of diffusers' ``SkipLayerGuidance``:

    ``u + scale * (c - u) + perturbed_scale * (c - p)`` while both are enabled; ``p + perturbed_scale * (c - p)``
    when only the perturbed term is; plain CFG when only CFG is. CFG runs inside ``[cfg_start, cfg_stop)``
    (``int(start*N) <= i < int(stop*N)``); the perturbed branch strictly inside ``(start, stop)``
    (``int(start*N) < i < int(stop*N)``), which is diffusers' convention for these guiders.
    """

    perturbed_name = "perturbed"
    scale_label = "perturbed_scale"
    #: the weights depend on the step only through which branches are active
    constant_weights = True

    def __init__(
        self,
        scale: float,
        perturbed_scale: float,
        perturbation: Perturbation,
        start: float,
        stop: float,
        rescale: float,
        original_formulation: bool,
        cfg_start: float,
        cfg_stop: float,
    ) -> None:
        name = type(self).__name__
        check_window(name, start, stop)
        check_window(f"{name} (cfg window)", cfg_start, cfg_stop)
        self.scale = check_scale(f"{name}: scale", scale)
        self.perturbed_scale = check_scale(f"{name}: {self.perturbed_name} scale", perturbed_scale)
        self.perturbation = perturbation
        self.start, self.stop = float(start), float(stop)
        self.cfg_start, self.cfg_stop = float(cfg_start), float(cfg_stop)
        self.rescale = _check_rescale(name, rescale)
        self.original_formulation = bool(original_formulation)
        self.branches = ("cond", "uncond", self.perturbed_name)
        self.num_steps = 0

    def branch_specs(self) -> dict[str, Branch]:
        return {"cond": COND, "uncond": UNCOND,
                self.perturbed_name: Branch(self.perturbed_name, "prompt", self.perturbation)}

    def _cfg_enabled(self, i: int) -> bool:
        neutral = math.isclose(self.scale, 0.0 if self.original_formulation else 1.0)
        return in_window(i, self.num_steps, self.cfg_start, self.cfg_stop) and not neutral

    def _perturbed_enabled(self, i: int) -> bool:
        n = self.num_steps
        inside = int(self.start * n) < i < int(self.stop * n)
        return inside and not math.isclose(self.perturbed_scale, 0.0)

    def active(self, i: int) -> tuple[str, ...]:
        names = ["cond"]
        if self._cfg_enabled(i):
            names.append("uncond")
        if self._perturbed_enabled(i):
            names.append(self.perturbed_name)
        return tuple(names)

    def combine(self, preds: dict[str, Prediction], i: int) -> Prediction:
        c = preds["cond"]
        u = preds.get("uncond")
        p = preds.get(self.perturbed_name)
        w, s = self.scale, self.perturbed_scale
        if u is None and p is None:
            return c
        if u is None:
            pred = (c if self.original_formulation else p) + s * (c - p)
        elif p is None:
            pred = (c if self.original_formulation else u) + w * (c - u)
        else:
            pred = (c if self.original_formulation else u) + w * (c - u) + s * (c - p)
        return self.post_exact(pred, c)

    def weights(self, i: int, active: tuple[str, ...], output: int) -> dict[str, float]:
        # the combine's anchor (c, or else u, or else p) gets weight 1; each shift moves weight onto cond
        out = dict.fromkeys(active, 0.0)
        anchor = "cond" if self.original_formulation or len(active) == 1 else active[1]
        out[anchor] += 1.0
        if "uncond" in active:
            out["cond"] += self.scale
            out["uncond"] -= self.scale
        if self.perturbed_name in active:
            out["cond"] += self.perturbed_scale
            out[self.perturbed_name] -= self.perturbed_scale
        return out

    def describe(self) -> str:
        extras = f", rescale={self.rescale}" if self.rescale else ""
        extras += ", original_formulation" if self.original_formulation else ""
        if (self.cfg_start, self.cfg_stop) != (0.0, 1.0):
            extras += f", cfg_window=[{self.cfg_start}, {self.cfg_stop})"
        return (f"{type(self).__name__}(scale={self.scale}, {self.scale_label}={self.perturbed_scale}, "
                f"{self.perturbation.describe()}, window=({self.start}, {self.stop}){extras})")


class SkipLayer(_PerturbedGuidance):
    """Skip-layer guidance (SD3.5's SLG, STG for video): a third branch runs the cond inputs with the blocks
    ``layers`` skipped (they return their inputs unchanged), combined as diffusers' ``SkipLayerGuidance``.

    ``layers`` index the transformer's blocks in execution order (see :mod:`pycfg.guidance.perturb`).
    """

    perturbed_name = "skip"
    scale_label = "skip_scale"

    def __init__(
        self,
        scale: float,
        skip_scale: float,
        layers: int | Sequence[int],
        start: float = 0.01,
        stop: float = 0.2,
        rescale: float = 0.0,
        original_formulation: bool = False,
        cfg_start: float = 0.0,
        cfg_stop: float = 1.0,
    ) -> None:
        super().__init__(scale, skip_scale, SkipBlocks(layers), start, stop, rescale, original_formulation,
                         cfg_start, cfg_stop)

    @property
    def skip_scale(self) -> float:
        return self.perturbed_scale


class PAG(_PerturbedGuidance):
    """Perturbed-attention guidance: a third branch runs the cond inputs with the self/joint attention of the
    blocks ``layers`` replaced by the identity (each token gets its own value), combined as diffusers'
    ``PerturbedAttentionGuidance``.
    """

    perturbed_name = "perturbed"
    scale_label = "pag_scale"

    def __init__(
        self,
        scale: float,
        pag_scale: float,
        layers: int | Sequence[int],
        start: float = 0.01,
        stop: float = 0.2,
        rescale: float = 0.0,
        original_formulation: bool = False,
        cfg_start: float = 0.0,
        cfg_stop: float = 1.0,
    ) -> None:
        super().__init__(scale, pag_scale, SkipAttention(layers), start, stop, rescale, original_formulation,
                         cfg_start, cfg_stop)

    @property
    def pag_scale(self) -> float:
        return self.perturbed_scale


@dataclass(frozen=True)
class Term:
    """``scale * (base - branch)`` added to the guided prediction inside ``[start, stop)``.

    ``scale`` is a number, or one number per output for models that predict a tuple (video, audio).
    """

    branch: str
    scale: float | tuple[float, ...]
    start: float = 0.0
    stop: float = 1.0


class MultiBranch(LinearPolicy):
    """A general linear mix of named branches (LTX-2's form): ``base + sum_j k_j * (base - b_j)``.

    ``branches`` declares every branch (``Branch(name, source, perturbation)``), the ``base`` among them;
    ``terms`` add one ``Term`` per non-base branch, in the order they are summed. A term runs inside its own
    window and is skipped (no forward) where all its scales are 0. With tuple predictions, a tuple scale gives
    each output its own weight; ``rescale`` (a number or one per output) applies ``rescale_noise_cfg`` against
    the base's output. CFG with scale ``w`` is the term ``Term("uncond", w - 1)``.
    """

    #: the weights depend on the step only through which terms are active
    constant_weights = True

    def __init__(
        self,
        branches: Sequence[Branch],
        terms: Sequence[Term],
        base: str = "cond",
        rescale: float | Sequence[float] = 0.0,
        renorm: bool = False,
    ) -> None:
        specs: dict[str, Branch] = {}
        for b in branches:
            if not isinstance(b, Branch):
                raise TypeError(f"MultiBranch: branches must be pycfg.guidance.Branch declarations, got {b!r}")
            if b.name in specs:
                raise ValueError(f"MultiBranch: branch {b.name!r} is declared twice")
            specs[b.name] = b
        if base not in specs:
            raise ValueError(f"MultiBranch: base branch {base!r} is not among the declared branches {list(specs)}")
        lengths = set()
        seen = set()
        checked = []
        for term in terms:
            if not isinstance(term, Term):
                raise TypeError(f"MultiBranch: terms must be pycfg.guidance.Term, got {term!r}")
            if term.branch not in specs:
                raise ValueError(f"MultiBranch: term names unknown branch {term.branch!r}; declared: {list(specs)}")
            if term.branch == base:
                raise ValueError(f"MultiBranch: the base branch {base!r} cannot have a term")
            if term.branch in seen:
                raise ValueError(f"MultiBranch: branch {term.branch!r} has more than one term")
            seen.add(term.branch)
            check_window(f"MultiBranch term {term.branch!r}", term.start, term.stop)
            if isinstance(term.scale, (list, tuple)):
                scale = tuple(check_scale(f"MultiBranch term {term.branch!r} scale", s) for s in term.scale)
                if not scale:
                    raise ValueError(f"MultiBranch term {term.branch!r}: empty scale list")
                lengths.add(len(scale))
            else:
                scale = check_scale(f"MultiBranch term {term.branch!r} scale", term.scale)
            checked.append(Term(term.branch, scale, float(term.start), float(term.stop)))
        unused = set(specs) - seen - {base}
        if unused:
            raise ValueError(f"MultiBranch: declared branches {sorted(unused)} have no term")
        if isinstance(rescale, (list, tuple)):
            rescale = tuple(_check_rescale("MultiBranch", r) for r in rescale)
            lengths.add(len(rescale))
        else:
            rescale = _check_rescale("MultiBranch", rescale)
        if len(lengths) > 1:
            raise ValueError(f"MultiBranch: per-output scale lists have different lengths {sorted(lengths)}")
        self.num_outputs = lengths.pop() if lengths else None
        self.specs = specs
        self.terms = tuple(checked)
        self.base = base
        self.rescale = rescale
        self.renorm = bool(renorm)
        self.branches = (base,) + tuple(t.branch for t in self.terms)
        self.num_steps = 0

    def branch_specs(self) -> dict[str, Branch]:
        return dict(self.specs)

    def check_outputs(self, num_outputs: int) -> None:
        if self.num_outputs is not None and self.num_outputs != num_outputs:
            raise ValueError(
                f"MultiBranch: per-output scales have {self.num_outputs} entries but the model predicts "
                f"{num_outputs} output(s) per branch"
            )

    def rescale_factor(self, output: int) -> float:
        return self.rescale[output] if isinstance(self.rescale, tuple) else self.rescale

    @staticmethod
    def _scale(term: Term, output: int) -> float:
        return term.scale[output] if isinstance(term.scale, tuple) else term.scale

    def _term_active(self, term: Term, i: int) -> bool:
        scales = term.scale if isinstance(term.scale, tuple) else (term.scale,)
        return in_window(i, self.num_steps, term.start, term.stop) and not all(s == 0.0 for s in scales)

    def active(self, i: int) -> tuple[str, ...]:
        return (self.base,) + tuple(t.branch for t in self.terms if self._term_active(t, i))

    def combine(self, preds: dict[str, Prediction], i: int) -> Prediction:
        base = preds[self.base]
        outs = []
        for k, c in enumerate(outputs_of(base)):
            pred = c
            for term in self.terms:
                if term.branch in preds:
                    pred = pred + self._scale(term, k) * (c - outputs_of(preds[term.branch])[k])
            outs.append(self.post_exact(pred, c, k) if len(preds) > 1 else pred)
        return tuple(outs) if isinstance(base, tuple) else outs[0]

    def weights(self, i: int, active: tuple[str, ...], output: int) -> dict[str, float]:
        out = {self.base: 1.0}
        for term in self.terms:
            if term.branch in active:
                k = self._scale(term, output)
                out[self.base] += k
                out[term.branch] = -k
        return out

    def describe(self) -> str:
        terms = ", ".join(f"{t.branch}:{t.scale}{_window_text(t.start, t.stop)}" for t in self.terms)
        specs = ", ".join(b.describe() for b in self.specs.values())
        return (f"MultiBranch(base={self.base}, branches=[{specs}], terms=[{terms}], rescale={self.rescale}"
                f"{', renorm' if self.renorm else ''})")

