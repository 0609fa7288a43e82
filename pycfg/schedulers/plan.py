"""Diffusers schedulers as per-step coefficient tables.

Every supported solver step is linear in the current sample ``x``, the guided model output ``v``, a noise
draw ``z`` and a few tensors kept from earlier steps (converted model outputs, UniPC's corrected sample). The
derivations below restate each scheduler's own ``step()`` formulas on symbolic linear combinations
(:class:`Lin`), computing every scalar with the scheduler's own fp32 tensors in the same order as diffusers,
so the resulting coefficients agree with ``step()`` to fp32 rounding. A lowering pass then gives every kept
tensor a history slot (slots are reused once their last reader has run, and values nobody reads later are
never written) and flattens step i into row i of a table:

    outputs  [x_next, write_0, write_1]  =  coefficients[i] @ inputs [x, v, z, slot_0 .. slot_{K-1}]

Configurations with data-dependent (non-linear) parts raise :class:`UnsupportedScheduler` with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..kernels.table import FIXED_INPUTS, INPUT_V, INPUT_X, INPUT_Z, MAX_WRITES  # noqa: F401  (the one layout)


class UnsupportedScheduler(Exception):
    """The scheduler (or this configuration of it) has no coefficient table; the reason is the message."""


class Lin(dict):
    """A linear combination of named tensors: ``{name: coefficient}`` with float64 coefficients."""

    @classmethod
    def of(cls, name: str) -> "Lin":
        return cls({name: 1.0})

    def __add__(self, other: "Lin") -> "Lin":
        out = Lin(self)
        for k, c in other.items():
            out[k] = out.get(k, 0.0) + c
        return out

    def __neg__(self) -> "Lin":
        return Lin({k: -c for k, c in self.items()})

    def __sub__(self, other: "Lin") -> "Lin":
        return self + (-other)

    def __mul__(self, scalar) -> "Lin":
        s = float(scalar)
        return Lin({k: c * s for k, c in self.items()})

    __rmul__ = __mul__

    def __truediv__(self, scalar) -> "Lin":
        # dividing (not multiplying by the reciprocal) keeps the rounding of diffusers' own division
        s = float(scalar)
        return Lin({k: _ieee_div(c, s) for k, c in self.items()})


def _ieee_div(a: float, b: float) -> float:
    # division by zero gives inf / nan as in torch, so a degenerate step is reproduced rather than refused
    if b != 0.0:
        return a / b
    if a == 0.0 or math.isnan(a):
        return math.nan
    return math.copysign(math.inf, a) * math.copysign(1.0, b)


ZERO = Lin()
X, V, Z = Lin.of("x"), Lin.of("v"), Lin.of("z")


def _kept(name: str, step: int) -> Lin:
    return Lin.of(f"{name}@{step}")


@dataclass
class StepSpec:
    """One step before lowering: the next sample and the tensors later steps read, as linear combinations."""

    x_next: Lin
    keep: dict[str, Lin]


@dataclass
class SchedulerPlan:
    """Row i of ``coefficients`` turns (x, v, z, history slots) into (x_next, write_0, write_1) at step i.

    ``write_slots[i, w]`` is the history slot output ``1 + w`` goes to (-1: not written). ``noise[i]`` says
    whether step i draws noise. Coefficients are float64 here; the update casts them to fp32 once.
    """

    scheduler: str
    num_steps: int
    num_slots: int
    coefficients: torch.Tensor  # (num_steps, 1 + MAX_WRITES, FIXED_INPUTS + num_slots), float64
    write_slots: torch.Tensor  # (num_steps, MAX_WRITES), int32
    noise: tuple[bool, ...]

    @property
    def stochastic(self) -> bool:
        return any(self.noise)

    def describe(self) -> str:
        kind = "stochastic" if self.stochastic else "deterministic"
        return f"{self.scheduler} plan ({self.num_steps} steps, {self.num_slots} history slots, {kind})"


def lower(name: str, steps: Sequence[StepSpec]) -> SchedulerPlan:
    """Assign history slots and flatten the symbolic steps into a coefficient table."""
    last_read: dict[str, int] = {}
    for i, spec in enumerate(steps):
        for expr in [spec.x_next, *spec.keep.values()]:
            for sym in expr:
                if "@" in sym:
                    last_read[sym] = i
    slot_of: dict[str, int] = {}
    free: list[int] = []
    num_slots = 0
    rows, writes = [], []
    for i, spec in enumerate(steps):
        kept = {f"{n}@{i}": e for n, e in spec.keep.items() if last_read.get(f"{n}@{i}", -1) > i}
        if len(kept) > MAX_WRITES:
            raise UnsupportedScheduler(f"{name} keeps {len(kept)} tensors in one step (at most {MAX_WRITES})")
        row_inputs = {sym for e in [spec.x_next, *kept.values()] for sym in e if "@" in sym}
        missing = [s for s in row_inputs if s not in slot_of]
        if missing:
            raise AssertionError(f"{name} step {i} reads {missing} before any step kept them")
        input_slots = {sym: slot_of[sym] for sym in row_inputs}
        # a slot whose last reader is this step may take this step's write: the update reads every input
        # of an element before it writes any output of that element
        for sym in sorted(row_inputs):
            if last_read[sym] == i:
                free.append(slot_of.pop(sym))
        free.sort(reverse=True)
        exprs, step_writes = [spec.x_next], []
        for sym, expr in kept.items():
            if free:
                slot = free.pop()
            else:
                slot, num_slots = num_slots, num_slots + 1
            slot_of[sym] = slot
            exprs.append(expr)
            step_writes.append(slot)
        rows.append((exprs, input_slots))
        writes.append(step_writes)
    n_in = FIXED_INPUTS + num_slots
    coefficients = torch.zeros(len(steps), 1 + MAX_WRITES, n_in, dtype=torch.float64)
    write_slots = torch.full((len(steps), MAX_WRITES), -1, dtype=torch.int32)
    noise = []
    for i, ((exprs, slots), w) in enumerate(zip(rows, writes)):
        for o, expr in enumerate(exprs):
            for sym, c in expr.items():
                col = {"x": INPUT_X, "v": INPUT_V, "z": INPUT_Z}.get(sym)
                if col is None:
                    col = FIXED_INPUTS + slots[sym]
                coefficients[i, o, col] += c
        write_slots[i, : len(w)] = torch.tensor(w, dtype=torch.int32)
        noise.append(bool((coefficients[i, :, INPUT_Z] != 0).any()))
    return SchedulerPlan(name, len(steps), num_slots, coefficients, write_slots, tuple(noise))


# ----------------------------------------------------------------------------------------------------------
# derivations, one per scheduler family; each mirrors that scheduler's step() in diffusers


def _start_index(s, timesteps) -> int:
    begin = getattr(s, "begin_index", None)
    if begin is not None:
        return int(begin)
    if getattr(s, "step_index", None) is not None:
        return int(s.step_index)
    return int(s.index_for_timestep(timesteps[0]))


def _check_kwargs(name: str, step_kwargs: dict, allowed: Sequence[str]) -> None:
    extra = sorted(k for k, v in step_kwargs.items() if k not in allowed and v is not None)
    if extra:
        raise UnsupportedScheduler(f"{name}.step() arguments {extra} have no coefficient table")


def _flow_match_euler(s, timesteps, kw) -> list[StepSpec]:
    _check_kwargs("FlowMatchEulerDiscreteScheduler", kw, ("generator", "s_churn", "s_tmin", "s_tmax", "s_noise"))
    sig = s.sigmas.detach().cpu()
    start = _start_index(s, timesteps)
    steps = []
    for i in range(len(timesteps)):
        sigma, sigma_next = sig[start + i], sig[start + i + 1]
        if s.config.stochastic_sampling:
            x0 = X - sigma * V
            steps.append(StepSpec((1.0 - sigma_next) * x0 + sigma_next * Z, {}))
        else:
            steps.append(StepSpec(X + (sigma_next - sigma) * V, {}))
    return steps


def _euler(s, timesteps, kw) -> list[StepSpec]:
    _check_kwargs("EulerDiscreteScheduler", kw, ("generator", "s_tmin", "s_tmax", "s_noise", "s_churn"))
    if float(kw.get("s_churn", 0.0) or 0.0) > 0.0:
        raise UnsupportedScheduler("EulerDiscreteScheduler with s_churn > 0")
    pt = s.config.prediction_type
    sig = s.sigmas.detach().cpu()
    start = _start_index(s, timesteps)
    steps = []
    for i in range(len(timesteps)):
        sigma = sig[start + i]
        sigma_hat = sigma * (0.0 + 1)
        if pt in ("original_sample", "sample"):
            x0 = V
        elif pt == "epsilon":
            x0 = X - sigma_hat * V
        elif pt == "v_prediction":
            x0 = V * (-sigma / (sigma**2 + 1) ** 0.5) + X / (sigma**2 + 1)
        else:
            raise UnsupportedScheduler(f"EulerDiscreteScheduler prediction_type={pt!r}")
        derivative = (X - x0) / sigma_hat
        dt = sig[start + i + 1] - sigma_hat
        steps.append(StepSpec(X + derivative * dt, {}))
    return steps


def _euler_ancestral(s, timesteps, kw) -> list[StepSpec]:
    _check_kwargs("EulerAncestralDiscreteScheduler", kw, ("generator",))
    pt = s.config.prediction_type
    sig = s.sigmas.detach().cpu()
    start = _start_index(s, timesteps)
    steps = []
    for i in range(len(timesteps)):
        sigma = sig[start + i]
        if pt == "epsilon":
            x0 = X - sigma * V
        elif pt == "v_prediction":
            x0 = V * (-sigma / (sigma**2 + 1) ** 0.5) + X / (sigma**2 + 1)
        else:
            raise UnsupportedScheduler(f"EulerAncestralDiscreteScheduler prediction_type={pt!r}")
        sigma_from, sigma_to = sig[start + i], sig[start + i + 1]
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        derivative = (X - x0) / sigma
        steps.append(StepSpec(X + derivative * (sigma_down - sigma) + Z * sigma_up, {}))
    return steps


def _x0_eps_from_alpha_prod(pt: str, name: str, alpha_prod_t, beta_prod_t) -> tuple[Lin, Lin]:
    if pt == "epsilon":
        return (X - beta_prod_t ** (0.5) * V) / alpha_prod_t ** (0.5), V
    if pt == "sample":
        return V, (X - alpha_prod_t ** (0.5) * V) / beta_prod_t ** (0.5)
    if pt == "v_prediction":
        return (alpha_prod_t**0.5) * X - (beta_prod_t**0.5) * V, (alpha_prod_t**0.5) * V + (beta_prod_t**0.5) * X
    raise UnsupportedScheduler(f"{name} prediction_type={pt!r}")


def _ddim(s, timesteps, kw) -> list[StepSpec]:
    _check_kwargs("DDIMScheduler", kw, ("generator", "eta", "use_clipped_model_output"))
    if s.config.thresholding or s.config.clip_sample:
        raise UnsupportedScheduler("DDIMScheduler with thresholding or clip_sample (data-dependent clamp)")
    eta = float(kw.get("eta", 0.0) or 0.0)
    clipped_eps = bool(kw.get("use_clipped_model_output", False))
    steps = []
    for t in timesteps:
        prev_timestep = t - s.config.num_train_timesteps // s.num_inference_steps
        alpha_prod_t = s.alphas_cumprod[t]
        alpha_prod_t_prev = s.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else s.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        x0, eps = _x0_eps_from_alpha_prod(s.config.prediction_type, "DDIMScheduler", alpha_prod_t, beta_prod_t)
        variance = s._get_variance(t, prev_timestep)
        std_dev_t = eta * variance ** (0.5)
        if clipped_eps:
            eps = (X - alpha_prod_t ** (0.5) * x0) / beta_prod_t ** (0.5)
        direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * eps
        x_next = alpha_prod_t_prev ** (0.5) * x0 + direction
        if eta > 0:
            x_next = x_next + std_dev_t * Z
        steps.append(StepSpec(x_next, {}))
    return steps


def _ddpm(s, timesteps, kw) -> list[StepSpec]:
    _check_kwargs("DDPMScheduler", kw, ("generator",))
    if s.config.thresholding or s.config.clip_sample:
        raise UnsupportedScheduler("DDPMScheduler with thresholding or clip_sample (data-dependent clamp)")
    vt = s.variance_type
    if vt not in ("fixed_small", "fixed_small_log", "fixed_large"):
        raise UnsupportedScheduler(f"DDPMScheduler variance_type={vt!r} (learned variances are data-dependent)")
    steps = []
    for t in timesteps:
        prev_t = s.previous_timestep(t)
        alpha_prod_t = s.alphas_cumprod[t]
        alpha_prod_t_prev = s.alphas_cumprod[prev_t] if prev_t >= 0 else s.one
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t
        x0, _ = _x0_eps_from_alpha_prod(s.config.prediction_type, "DDPMScheduler", alpha_prod_t, beta_prod_t)
        x0_coeff = (alpha_prod_t_prev ** (0.5) * current_beta_t) / beta_prod_t
        sample_coeff = current_alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t
        x_next = x0_coeff * x0 + sample_coeff * X
        if t > 0:
            variance = s._get_variance(t)
            scale = variance if vt == "fixed_small_log" else variance**0.5
            x_next = x_next + scale * Z
        steps.append(StepSpec(x_next, {}))
    return steps


def _lambda(s, sigma) -> torch.Tensor:
    alpha_t, sigma_t = s._sigma_to_alpha_sigma_t(sigma)
    return torch.log(alpha_t) - torch.log(sigma_t)


def _convert_x0(s, name: str, sig, k: int) -> Lin:
    """The data prediction ``x0`` both multistep solvers build from (x, v) at sigma index k."""
    pt = s.config.prediction_type
    alpha_t, sigma_t = s._sigma_to_alpha_sigma_t(sig[k])
    if pt == "epsilon":
        return (X - sigma_t * V) / alpha_t
    if pt == "sample":
        return V
    if pt == "v_prediction":
        return alpha_t * X - sigma_t * V
    if pt == "flow_prediction":
        return X - sig[k] * V
    raise UnsupportedScheduler(f"{name} prediction_type={pt!r}")


def _unipc_convert(s, sig, k: int) -> Lin:
    if s.predict_x0:
        return _convert_x0(s, "UniPCMultistepScheduler", sig, k)
    pt = s.config.prediction_type
    alpha_t, sigma_t = s._sigma_to_alpha_sigma_t(sig[k])
    if pt == "epsilon":
        return V
    if pt == "sample":
        return (X - alpha_t * V) / sigma_t
    if pt == "v_prediction":
        return alpha_t * V + sigma_t * X
    raise UnsupportedScheduler(f"UniPCMultistepScheduler predict_x0=False with prediction_type={pt!r}")


def _unipc_bh(s, sig, x: Lin, m0: Lin, older: list[Lin], t_k: int, s0_k: int, older_ks: list[int], order: int,
              model_t: Lin | None) -> Lin:
    """UniP (``model_t`` None) or UniC (B(h) variants) as in ``multistep_uni_{p,c}_bh_update``."""
    alpha_t, sigma_t = s._sigma_to_alpha_sigma_t(sig[t_k])
    alpha_s0, sigma_s0 = s._sigma_to_alpha_sigma_t(sig[s0_k])
    lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
    lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
    h = lambda_t - lambda_s0
    rks, D1s = [], []
    for mi, k in zip(older, older_ks):
        rk = (_lambda(s, sig[k]) - lambda_s0) / h
        rks.append(rk)
        D1s.append((mi - m0) / rk)
    rks.append(torch.ones(()))
    rks = torch.stack(rks)
    hh = -h if s.predict_x0 else h
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial_i = 1
    if s.config.solver_type == "bh1":
        B_h = hh
    elif s.config.solver_type == "bh2":
        B_h = torch.expm1(hh)
    else:
        raise UnsupportedScheduler(f"UniPCMultistepScheduler solver_type={s.config.solver_type!r}")
    R, b = [], []
    for i in range(1, order + 1):
        R.append(torch.pow(rks, i - 1))
        b.append(h_phi_k * factorial_i / B_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial_i
    R, b = torch.stack(R), torch.stack(b)
    res = ZERO
    if model_t is None:
        if D1s:
            rhos = [0.5] if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
            for rho, d in zip(rhos, D1s):
                res = res + rho * d
    else:
        rhos = [0.5] if order == 1 else torch.linalg.solve(R, b).tolist()
        for rho, d in zip(rhos[:-1], D1s):
            res = res + rho * d
        res = res + rhos[-1] * (model_t - m0)
    if s.predict_x0:
        return (sigma_t / sigma_s0) * x - (alpha_t * h_phi_1) * m0 - (alpha_t * B_h) * res
    return (alpha_t / alpha_s0) * x - (sigma_t * h_phi_1) * m0 - (sigma_t * B_h) * res


def _unipc(s, timesteps, kw) -> list[StepSpec]:
    _check_kwargs("UniPCMultistepScheduler", kw, ())
    cfg = s.config
    if cfg.thresholding:
        raise UnsupportedScheduler("UniPCMultistepScheduler with thresholding (data-dependent clamp)")
    if getattr(s, "solver_p", None) is not None:
        raise UnsupportedScheduler("UniPCMultistepScheduler with solver_p (an arbitrary predictor)")
    sig = s.sigmas.detach().cpu()
    start = _start_index(s, timesteps)
    total = len(s.timesteps)
    solver_order = cfg.solver_order
    disabled = set(getattr(s, "disable_corrector", None) or [])
    lower_order_nums, last_order = 0, None
    steps = []
    for i in range(len(timesteps)):
        k = start + i
        m = _unipc_convert(s, sig, k)
        sample = X
        if i > 0 and (k - 1) not in disabled:
            hist = [_kept("m", i - 1 - j) for j in range(last_order)]
            sample = _unipc_bh(s, sig, _kept("s", i - 1), hist[0], hist[1:], k, k - 1,
                               [k - 1 - j for j in range(1, last_order)], last_order, m)
        this_order = min(solver_order, total - k) if cfg.lower_order_final else solver_order
        this_order = min(this_order, lower_order_nums + 1)
        older = [_kept("m", i - j) for j in range(1, this_order)]
        x_next = _unipc_bh(s, sig, sample, m, older, k + 1, k, [k - j for j in range(1, this_order)], this_order,
                           None)
        steps.append(StepSpec(x_next, {"m": m, "s": sample}))
        if lower_order_nums < solver_order:
            lower_order_nums += 1
        last_order = this_order
    return steps


def _dpm_first(s, sig, x: Lin, m0: Lin, k: int, sde: bool) -> Lin:
    alpha_t, sigma_t = s._sigma_to_alpha_sigma_t(sig[k + 1])
    alpha_s, sigma_s = s._sigma_to_alpha_sigma_t(sig[k])
    h = (torch.log(alpha_t) - torch.log(sigma_t)) - (torch.log(alpha_s) - torch.log(sigma_s))
    if not sde:
        return (sigma_t / sigma_s) * x - (alpha_t * (torch.exp(-h) - 1.0)) * m0
    return ((sigma_t / sigma_s * torch.exp(-h)) * x + (alpha_t * (1 - torch.exp(-2.0 * h))) * m0
            + (sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h))) * Z)


def _dpm_second(s, sig, x: Lin, m0: Lin, m1: Lin, k: int, sde: bool) -> Lin:
    alpha_t, sigma_t = s._sigma_to_alpha_sigma_t(sig[k + 1])
    alpha_s0, sigma_s0 = s._sigma_to_alpha_sigma_t(sig[k])
    lambda_t, lambda_s0, lambda_s1 = _lambda(s, sig[k + 1]), _lambda(s, sig[k]), _lambda(s, sig[k - 1])
    h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
    r0 = h_0 / h
    D0, D1 = m0, (1.0 / r0) * (m0 - m1)
    midpoint = s.config.solver_type == "midpoint"
    if not sde:
        out = (sigma_t / sigma_s0) * x - (alpha_t * (torch.exp(-h) - 1.0)) * D0
        if midpoint:
            return out - (0.5 * (alpha_t * (torch.exp(-h) - 1.0))) * D1
        return out + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * D1
    out = (sigma_t / sigma_s0 * torch.exp(-h)) * x + (alpha_t * (1 - torch.exp(-2.0 * h))) * D0
    if midpoint:
        out = out + (0.5 * (alpha_t * (1 - torch.exp(-2.0 * h)))) * D1
    else:
        out = out + (alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * D1
    return out + (sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h))) * Z


def _dpm_third(s, sig, x: Lin, m0: Lin, m1: Lin, m2: Lin, k: int, sde: bool) -> Lin:
    alpha_t, sigma_t = s._sigma_to_alpha_sigma_t(sig[k + 1])
    alpha_s0, sigma_s0 = s._sigma_to_alpha_sigma_t(sig[k])
    lambda_t, lambda_s0 = _lambda(s, sig[k + 1]), _lambda(s, sig[k])
    lambda_s1, lambda_s2 = _lambda(s, sig[k - 1]), _lambda(s, sig[k - 2])
    h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
    r0, r1 = h_0 / h, h_1 / h
    D0 = m0
    D1_0, D1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
    D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
    D2 = (1.0 / (r0 + r1)) * (D1_0 - D1_1)
    if not sde:
        return ((sigma_t / sigma_s0) * x - (alpha_t * (torch.exp(-h) - 1.0)) * D0
                + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * D1
                - (alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5)) * D2)
    return ((sigma_t / sigma_s0 * torch.exp(-h)) * x + (alpha_t * (1.0 - torch.exp(-2.0 * h))) * D0
            + (alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * D1
            + (alpha_t * ((1.0 - torch.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5)) * D2
            + (sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h))) * Z)


def _dpm_multistep(s, timesteps, kw) -> list[StepSpec]:
    _check_kwargs("DPMSolverMultistepScheduler", kw, ("generator",))
    cfg = s.config
    if cfg.algorithm_type not in ("dpmsolver++", "sde-dpmsolver++"):
        raise UnsupportedScheduler(f"DPMSolverMultistepScheduler algorithm_type={cfg.algorithm_type!r}")
    if cfg.thresholding:
        raise UnsupportedScheduler("DPMSolverMultistepScheduler with thresholding (data-dependent clamp)")
    if cfg.variance_type in ("learned", "learned_range"):
        raise UnsupportedScheduler("DPMSolverMultistepScheduler with a learned variance")
    sde = cfg.algorithm_type == "sde-dpmsolver++"
    sig = s.sigmas.detach().cpu()
    start = _start_index(s, timesteps)
    total = len(s.timesteps)
    order, lower_order_nums = cfg.solver_order, 0
    steps = []
    for i in range(len(timesteps)):
        k = start + i
        final = (k == total - 1) and (cfg.euler_at_final or (cfg.lower_order_final and total < 15)
                                      or cfg.final_sigmas_type == "zero")
        second = (k == total - 2) and cfg.lower_order_final and total < 15
        m = _convert_x0(s, "DPMSolverMultistepScheduler", sig, k)
        if order == 1 or lower_order_nums < 1 or final:
            x_next = _dpm_first(s, sig, X, m, k, sde)
        elif order == 2 or lower_order_nums < 2 or second:
            x_next = _dpm_second(s, sig, X, m, _kept("m", i - 1), k, sde)
        else:
            x_next = _dpm_third(s, sig, X, m, _kept("m", i - 1), _kept("m", i - 2), k, sde)
        steps.append(StepSpec(x_next, {"m": m}))
        if lower_order_nums < order:
            lower_order_nums += 1
    return steps


_DERIVATIONS = {
    "FlowMatchEulerDiscreteScheduler": _flow_match_euler,
    "UniPCMultistepScheduler": _unipc,
    "DPMSolverMultistepScheduler": _dpm_multistep,
    "DDIMScheduler": _ddim,
    "EulerDiscreteScheduler": _euler,
    "EulerAncestralDiscreteScheduler": _euler_ancestral,
    "DDPMScheduler": _ddpm,
}


def build_plan(scheduler: Any, timesteps: Sequence, step_kwargs: dict | None = None) -> SchedulerPlan:
    """The coefficient table of a scheduler on which ``set_timesteps`` has run; the scheduler is only read.

    ``timesteps`` are the ones the pipeline will step through (``step()`` is called with each in turn);
    ``step_kwargs`` the extra arguments it passes to ``step()``. Raises :class:`UnsupportedScheduler`.
    """
    name = type(scheduler).__name__
    derive = _DERIVATIONS.get(name)
    if derive is None:
        raise UnsupportedScheduler(f"{name} has no coefficient table")
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise UnsupportedScheduler(f"{name}: set_timesteps has not run")
    if len(timesteps) == 0:
        raise UnsupportedScheduler(f"{name}: no timesteps")
    with torch.no_grad():
        try:
            steps = derive(scheduler, list(timesteps), dict(step_kwargs or {}))
        except (RuntimeError, ZeroDivisionError) as err:  # e.g. a singular UniPC system: step() fails alike
            raise UnsupportedScheduler(f"{name}: this schedule has no well-defined table ({err})") from None
        plan = lower(name, steps)
    bad = (~torch.isfinite(plan.coefficients)).nonzero()
    if len(bad):
        raise UnsupportedScheduler(f"{name}: non-finite coefficients at step {int(bad[0, 0])} "
                                   "(step() gives NaN/inf there too; it runs as is)")
    return plan
