"""Small helpers several test modules share."""

from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of ``b`` (in float64)."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def make_scheduler(name: str | None):
    """A scheduler by the name the tests use (None: keep the pipeline's own)."""
    import diffusers

    flow = dict(prediction_type="flow_prediction", use_flow_sigmas=True)
    makers = {
        "euler": lambda: diffusers.FlowMatchEulerDiscreteScheduler(),
        "euler_shift3": lambda: diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        "flow-stochastic": lambda: diffusers.FlowMatchEulerDiscreteScheduler(stochastic_sampling=True),
        "unipc": lambda: diffusers.UniPCMultistepScheduler(**flow),
        "unipc_shift3": lambda: diffusers.UniPCMultistepScheduler(**flow, flow_shift=3.0),
        "dpm++2m": lambda: diffusers.DPMSolverMultistepScheduler(**flow),
        "sde-dpm++2m": lambda: diffusers.DPMSolverMultistepScheduler(**flow, algorithm_type="sde-dpmsolver++"),
        "cogvideox_ddim": lambda: diffusers.CogVideoXDDIMScheduler(),
        "cogvideox_dpm": lambda: diffusers.CogVideoXDPMScheduler(),
    }
    if name is None:
        return None
    if name not in makers:
        raise ValueError(f"unknown test scheduler {name!r}; known: {', '.join(makers)}")
    return makers[name]()


class ForwardCounter:
    """Counts a module's forward calls (a pre-hook: the forward itself is untouched)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        module.register_forward_pre_hook(self._count)

    def _count(self, *args) -> None:
        self.calls += 1
