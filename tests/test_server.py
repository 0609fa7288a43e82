"""examples/server.py as a real process (driver + 2 workers) answering concurrent HTTP requests on 127.0.0.1."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import queue
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from pycfg.tiny import qwenimage_inputs, qwenimage_pipeline

SERVER = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "server.py")


@pytest.fixture(scope="module")
def server():
    proc = subprocess.Popen([sys.executable, SERVER, "--port", "0", "--cfg-parallel-size", "2", "--timeout", "30"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    url, seen, deadline = None, [], time.monotonic() + 180
    while url is None:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            proc.kill()
            pytest.fail("the server did not start:\n" + "".join(seen))
        seen.append(line)
        if "listening on " in line:
            url = line.split("listening on ", 1)[1].split()[0]
    assert url.startswith("http://127.0.0.1:")
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail("the server did not stop on SIGTERM")
    assert proc.returncode == 0, "".join(seen) + "".join(lines.queue)


def post(url: str, body, path: str = "/generate") -> tuple[int, bytes, str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as res:
            return res.status, res.read(), res.headers["Content-Type"]
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers["Content-Type"]


def stock_image(pipe, seed: int, prompt_seed: int, steps: int, scale: float = 4.0) -> np.ndarray:
    out = pipe(**qwenimage_inputs("tiny", seed=prompt_seed), num_inference_steps=steps, true_cfg_scale=scale,
               output_type="pil", generator=torch.Generator().manual_seed(seed))
    return np.array(out.images[0])


def test_health(server):
    with urllib.request.urlopen(server + "/health", timeout=30) as res:
        info = json.loads(res.read())
    assert res.status == 200 and info["healthy"] and info["cfg_parallel_size"] == 2


def test_concurrent_requests_return_the_stock_images(server):
    torch.set_num_threads(1)
    pipe = qwenimage_pipeline()
    cases = [dict(seed=s, prompt_seed=s % 3, num_inference_steps=2 + s % 2) for s in range(12)]
    cases[5]["true_cfg_scale"] = 1.0  # guidance off
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda c: post(server, c), cases))
    for case, (status, body, kind) in zip(cases, answers):
        assert status == 200, body
        assert kind == "application/json"
        reply = json.loads(body)
        image = np.array(Image.open(io.BytesIO(base64.b64decode(reply["png_base64"]))))
        expected = stock_image(pipe, case["seed"], case["prompt_seed"], case["num_inference_steps"],
                               case.get("true_cfg_scale", 4.0))
        assert image.shape == (32, 32, 3) and np.array_equal(image, expected), case

    status, body, kind = post(server, dict(seed=3, prompt_seed=1, num_inference_steps=2, format="png"))
    assert status == 200 and kind == "image/png"
    assert np.array_equal(np.array(Image.open(io.BytesIO(body))), stock_image(pipe, 3, 1, 2))


@pytest.mark.parametrize("body, needle", [
    (dict(num_inference_steps=-1), "num_inference_steps"),
    (dict(colour="red"), "unknown field"),
    (b"{not json", "Expecting"),
    ([1, 2], "JSON object"),
])
def test_bad_requests_get_400_and_server_stays_healthy(server, body, needle):
    status, reply, _ = post(server, body)
    assert status == 400 and needle in json.loads(reply)["error"]
    with urllib.request.urlopen(server + "/health", timeout=30) as res:
        assert res.status == 200 and json.loads(res.read())["healthy"]
