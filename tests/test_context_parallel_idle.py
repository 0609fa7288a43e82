"""More CFG ranks than branches with context parallelism: the idle Ulysses pair runs no forward, and the result
is still cfg 1 x Ulysses 2's bits on every rank (one 6-rank gloo world, tests/context_parallel_cases.py)."""

from __future__ import annotations

import torch

from pycfg._launch import run_world


def test_idle_context_parallel_group_runs_no_forward():
    import context_parallel_cases

    results = run_world(context_parallel_cases.run_idle, 6, timeout=600)
    reference = results[0]["c1u2"]
    for rank, r in enumerate(results):
        assert torch.equal(r["c3u2"], reference), rank
        assert torch.equal(r["c1u2"], reference), rank
        steps = context_parallel_cases.STEPS
        # cond on the first CFG rank's pair, uncond on the second's, nothing on the third's
        expected = {0: steps, 1: steps, 2: 0}[r[("c3u2", "coordinates")]["cfg"]]
        assert r[("c3u2", "forwards")] == expected, (rank, r[("c3u2", "forwards")])
        assert r[("c1u2", "forwards")] == 2 * steps
