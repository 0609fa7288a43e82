"""Per-rank body of the LTX-2 tests (spawned by pycfg._launch.run_world; must be importable).

One world per cfg_parallel_size runs every scenario with per-step consistency checks and reports, per scenario,
the final video and audio latents, how many collectives the call counted and how many transformer forwards this
rank ran.
"""

from __future__ import annotations

import torch
from helpers import ForwardCounter

import pycfg
from pycfg.tiny import ltx2_inputs, ltx2_pipeline

STEPS = 3
STG_BLOCKS = [1]

#: name -> call arguments; per-modality scales differ so a swapped output or scale shows
SCENARIOS = {
    # cond, uncond, STG, modality isolation
    "four": dict(guidance_scale=3.0, audio_guidance_scale=5.0, stg_scale=1.0, audio_stg_scale=0.5,
                 modality_scale=2.0, audio_modality_scale=3.0, guidance_rescale=0.7, audio_guidance_rescale=0.3,
                 spatio_temporal_guidance_blocks=STG_BLOCKS),
    # modality guidance off
    "three": dict(guidance_scale=3.0, audio_guidance_scale=5.0, stg_scale=1.0, audio_stg_scale=0.5,
                  modality_scale=1.0, audio_modality_scale=1.0, guidance_rescale=0.7, audio_guidance_rescale=0.3,
                  spatio_temporal_guidance_blocks=STG_BLOCKS),
    # STG and modality guidance off: cond and uncond only
    "two": dict(guidance_scale=3.0, audio_guidance_scale=5.0, stg_scale=0.0, audio_stg_scale=0.0,
                modality_scale=1.0, audio_modality_scale=1.0, guidance_rescale=0.7, audio_guidance_rescale=0.3,
                spatio_temporal_guidance_blocks=None),
    # CFG off: stock runs batch-1 forwards too, so P=1 must be stock's bits
    "no_cfg": dict(guidance_scale=1.0, audio_guidance_scale=1.0, stg_scale=1.0, audio_stg_scale=0.5,
                   modality_scale=2.0, audio_modality_scale=3.0, guidance_rescale=0.7, audio_guidance_rescale=0.3,
                   spatio_temporal_guidance_blocks=STG_BLOCKS),
}


def user_policy():
    """A caller's own policy: CFG plus a branch with a whole block skipped (pycfg's perturbation, not the model's
    STG argument), per-output scales."""
    from pycfg.guidance import Branch, MultiBranch, SkipBlocks, Term

    return MultiBranch([Branch("cond"), Branch("uncond", "negative"), Branch("skip", "prompt", SkipBlocks([1]))],
                       [Term("uncond", (2.0, 4.0)), Term("skip", (1.0, 0.5))], rescale=(0.5, 0.0))


def nudge(pipe, i, t, tensors: dict) -> dict:
    """Scales the video latents at step 1, so a callback that is dropped or mis-applied shows in the output."""
    return {"latents": tensors["latents"] * 0.9} if i == 1 else {}


def call(f, name: str, output_type: str = "latent", **extra):
    out = f(**ltx2_inputs(), **SCENARIOS[name], num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
            output_type=output_type, **extra)
    return out.frames, out.audio


def measured(f, counter: ForwardCounter, name: str, **extra) -> dict:
    calls, forwards = f.comm.calls, counter.calls
    video, audio = call(f, name, **extra)
    return {"video": video, "audio": audio, "collectives": f.comm.calls - calls, "forwards": counter.calls - forwards}


def world(rank: int, world: int, decoded: bool = False, reduce: bool = False) -> dict:
    torch.set_num_threads(1)
    pipe = ltx2_pipeline()
    counter = ForwardCounter(pipe.transformer)
    fast = pycfg.compile(pipe, cfg_parallel_size=world, check_consistency=True)
    out = {("gather", name): measured(fast, counter, name) for name in SCENARIOS}
    adapter = fast.adapter
    out["plans"] = {name: adapter.default_policy(adapter.check({**ltx2_inputs(), **SCENARIOS[name]})).branches
                    for name in SCENARIOS}
    out["callback"] = call(fast, "four", callback_on_step_end=nudge)
    out["user_policy"] = measured(fast, counter, "two", guidance=user_policy())
    if reduce:
        fused = pycfg.compile(pipe, cfg_parallel_size=world, exchange="reduce", check_consistency=True)
        for name in ("four", "two"):
            out[("reduce", name)] = measured(fused, counter, name)
    if decoded:
        out["decoded"] = call(fast, "four", output_type="pt")
    return out
