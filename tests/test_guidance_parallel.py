"""Every built-in policy on the tiny Qwen-Image pipeline over real gloo worlds of 1 to 4 ranks.

Each world size is spawned once and runs every policy: ``gather`` must equal the 1-rank run bit for bit with
identical state on all ranks after every step (``check_consistency=True``), ``reduce`` must stay within 1e-5
of it, and each step with more than one active branch must cost exactly one collective.
"""

from __future__ import annotations

import pytest
import torch

STEPS = 4


def policies():
    import pycfg.guidance as g

    return {
        "cfg-renorm": g.CFG(4.0, renorm=True),
        "cfg-rescale": g.CFG(4.0, rescale=0.7, start=0.25),
        "cfg-zero-star": g.CFGZeroStar(4.0, zero_init_steps=1),
        "apg": g.APG(4.0, momentum=-0.5, norm_threshold=2.0, eta=0.3),
        "skip-layer": g.SkipLayer(4.0, 2.0, [1], start=0.0, stop=1.0),
        "multibranch": g.MultiBranch(
            [g.Branch("cond"), g.Branch("uncond", "negative"), g.Branch("stg", perturbation=g.SkipBlocks([0])),
             g.Branch("pag", perturbation=g.SkipAttention([1]))],
            [g.Term("uncond", 3.0), g.Term("stg", 0.5, start=0.25), g.Term("pag", 0.7, stop=0.75)],
            rescale=0.5,
        ),
    }


def _multi_branch_steps(policy) -> int:
    policy.reset(STEPS)
    return sum(len(policy.active(i)) > 1 for i in range(STEPS))


def run_all(rank: int, world: int) -> dict:
    import pycfg
    from pycfg.tiny import qwenimage_inputs, qwenimage_pipeline

    pipe = qwenimage_pipeline()
    inputs = qwenimage_inputs()
    out = {}
    for exchange in ("gather", "reduce"):
        fast = pycfg.compile(pipe, cfg_parallel_size=world, exchange=exchange, check_consistency=True)
        for name, policy in policies().items():
            if exchange == "reduce" and not policy.linear:
                continue
            fast.comm.calls = 0
            latents = fast(**inputs, num_inference_steps=STEPS, output_type="latent", guidance=policy,
                           generator=torch.Generator().manual_seed(0)).images
            out[(exchange, name)] = (latents, fast.comm.calls)
    return out


@pytest.fixture(scope="module")
def reference():
    torch.set_num_threads(1)
    return run_all(0, 1)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_policies_on_real_worlds(world, reference):
    from pycfg._launch import run_world

    ranks = run_world(run_all, world, timeout=300)
    for (exchange, name), (ref, _) in reference.items():
        expected_calls = _multi_branch_steps(policies()[name])
        for rank, results in enumerate(ranks):
            latents, calls = results[(exchange, name)]
            assert calls == expected_calls, (world, exchange, name, rank, calls)
            if exchange == "gather":
                assert torch.equal(latents, ref), (world, name, rank)
            else:
                assert torch.equal(latents, ranks[0][(exchange, name)][0]), (world, name, rank)
                exact = reference[("gather", name)][0]
                err = ((latents - exact).norm() / exact.norm()).item()
                assert err <= 1e-5, (world, name, err)


def test_batched_branches_close_to_separate(reference):
    import pycfg
    import pycfg.guidance as g
    from pycfg.tiny import qwenimage_inputs, qwenimage_pipeline

    torch.set_num_threads(1)
    pipe = qwenimage_pipeline()
    inputs = qwenimage_inputs(pos_len=6, neg_len=6)  # same-length texts: cond and uncond batch together
    kwargs = dict(num_inference_steps=STEPS, output_type="latent", guidance=g.CFG(4.0, renorm=True))
    separate = pycfg.compile(pipe)(**inputs, **kwargs, generator=torch.Generator().manual_seed(0)).images
    batched = pycfg.compile(pipe, batch_branches=True)(**inputs, **kwargs,
                                                       generator=torch.Generator().manual_seed(0)).images
    assert ((batched - separate).norm() / separate.norm()).item() <= 1e-5


def test_default_policy_is_stock_pipeline(reference):
    import pycfg
    from pycfg.tiny import qwenimage_inputs, qwenimage_pipeline

    torch.set_num_threads(1)
    pipe = qwenimage_pipeline()
    inputs = qwenimage_inputs()
    kwargs = dict(num_inference_steps=STEPS, output_type="latent", true_cfg_scale=4.0)
    stock = pipe(**inputs, **kwargs, generator=torch.Generator().manual_seed(0)).images
    ours = pycfg.compile(pipe)(**inputs, **kwargs, generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(ours, stock)
    assert torch.equal(reference[("gather", "cfg-renorm")][0], stock)
