"""A driver process for tests/test_engine_hardening.py: starts an Engine, runs a slow request, and waits to be
killed, terminated or interrupted. Prints the worker pids, then "started" once the request runs."""

from __future__ import annotations

import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from hardening_cases import mark_then_slow  # noqa: E402

import pycfg  # noqa: E402
from pycfg.tiny import qwenimage_inputs, qwenimage_pipeline  # noqa: E402


def main(marker: str) -> None:
    with pycfg.Engine(functools.partial(qwenimage_pipeline, "tiny"), cfg_parallel_size=2, timeout=30) as engine:
        print("workers", *engine.worker_pids, flush=True)
        request = dict(qwenimage_inputs(), num_inference_steps=200, output_type="latent", true_cfg_scale=4.0,
                       generator=torch.Generator().manual_seed(0),
                       callback_on_step_end=functools.partial(mark_then_slow, marker))
        future = engine.submit(**request)
        while not os.path.exists(marker):
            time.sleep(0.05)
        print("started", flush=True)
        future.result()


if __name__ == "__main__":
    main(sys.argv[1])
