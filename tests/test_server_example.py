"""examples/server.py: the Engine embedded in a user's own FastAPI app answers with the stock pipeline's image."""

from __future__ import annotations

import base64
import importlib.util
import io
import os

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "server.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the example's engine picks GPUs when there are enough; this "
                    "test compares with the CPU pipeline")
def test_embedded_engine_returns_the_stock_image():
    from fastapi.testclient import TestClient
    from PIL import Image

    from pycfg.tiny import qwenimage_pipeline

    spec = importlib.util.spec_from_file_location("pycfg_example_server", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with TestClient(example.app) as client:  # runs the lifespan: starts and stops the engine's workers
        reply = client.post("/generate", params=dict(prompt="a photo of a cat", seed=4, steps=2, size=32))
        assert reply.status_code == 200, reply.text
        workers = example.app.state.engine.worker_pids
    image = np.array(Image.open(io.BytesIO(base64.b64decode(reply.json()["png_base64"]))))
    torch.set_num_threads(1)
    stock = qwenimage_pipeline("tiny", text_encoder=True)(
        prompt="a photo of a cat", negative_prompt="blurry", true_cfg_scale=4.0, num_inference_steps=2, height=32,
        width=32, generator=torch.Generator().manual_seed(4)).images[0]
    assert np.array_equal(image, np.array(stock))
    assert len(workers) == 2 and not any(os.path.exists(f"/proc/{pid}/cmdline") and
                                         open(f"/proc/{pid}/stat").read().split()[2] != "Z" for pid in workers)
