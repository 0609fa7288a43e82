"""`pycfg serve tiny:qwen-image --cfg-parallel-size 2` as a real process on 127.0.0.1, called with the official
openai client and with raw sockets: exact images, OpenAI-shaped errors, malformed traffic, a worker killed."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import threading
import time

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from serve_helpers import (  # noqa: E402
    API_KEY,
    assert_clean_error,
    chunked,
    get,
    health,
    http_post,
    png_array,
    proc_status,
    raw_request,
    start_server,
    stop_server,
    worker_pids,
)

MODEL = "tiny:qwen-image"
GEN = "/v1/images/generations"
MAX_BODY = 256 * 1024
# a request that runs for seconds on the tiny model (128x128, many steps): long enough to act while it runs
SLOW = dict(size="128x128", extra_body=dict(negative_prompt="blurry", true_cfg_scale=4.0, num_inference_steps=200,
                                            seed=3))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("serve"), MODEL, "--cfg-parallel-size", "2", "--devices", "cpu", "cpu",
                       "--max-queue", "1", "--max-steps", "200", "--max-body-bytes", str(MAX_BODY),
                       "--header-timeout", "2", "--body-timeout", "2", "--timeout", "20")
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def stock():
    from pycfg.tiny import qwenimage_pipeline

    torch.set_num_threads(1)  # the workers' numerics (Engine's worker_threads=1)
    return qwenimage_pipeline("tiny", text_encoder=True)


def stock_images(pipe, prompt: str, seed: int, width: int, height: int, n: int = 1, **kwargs) -> list[np.ndarray]:
    out = pipe(prompt=prompt, width=width, height=height, num_images_per_prompt=n, output_type="pil",
               generator=torch.Generator("cpu").manual_seed(seed), **kwargs)
    return [np.array(image) for image in out.images]


def generate(client, prompt="a photo of a cat", size="40x24", n=1, **extra):
    body = dict(negative_prompt="blurry", true_cfg_scale=4.0, num_inference_steps=2, seed=7)
    body.update(extra)
    return client.images.generate(model=MODEL, prompt=prompt, size=size, n=n, response_format="b64_json",
                                  extra_body=body)


def test_generations_are_pngs_of_the_size_asked_and_stock_exact(server, client, stock):
    first = generate(client)
    again = generate(client)
    assert len(first.data) == 1 and first.data[0].b64_json == again.data[0].b64_json
    image = png_array(first.data[0].b64_json)
    assert image.shape == (24, 40, 3)
    expected = stock_images(stock, "a photo of a cat", 7, 40, 24, negative_prompt="blurry", true_cfg_scale=4.0,
                            num_inference_steps=2)[0]
    assert np.array_equal(image, expected)
    unguided = stock_images(stock, "a photo of a cat", 7, 40, 24, num_inference_steps=2)[0]
    assert not np.array_equal(expected, unguided), "CFG must change the stock image, or parity is vacuous"


def test_n_images_equal_stock(client, stock):
    result = generate(client, prompt="a lighthouse at dusk", size="32x32", n=2, seed=11)
    images = [png_array(d.b64_json) for d in result.data]
    expected = stock_images(stock, "a lighthouse at dusk", 11, 32, 32, n=2, negative_prompt="blurry",
                            true_cfg_scale=4.0, num_inference_steps=2)
    assert len(images) == 2 and not np.array_equal(images[0], images[1])
    assert all(np.array_equal(a, b) for a, b in zip(images, expected))


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    info = health(server)
    assert info["status"] == "ready" and info["cfg_parallel_size"] == 2
    status, text = get(server.url, "/metrics")
    assert status == 200
    text = text.decode()
    for name in ("pycfg_requests_total", "pycfg_queue_depth", "pycfg_request_seconds_bucket",
                 "pycfg_step_seconds_bucket", "pycfg_engine_restarts_total", "pycfg_engine_healthy 1.0"):
        assert name in text
    assert 'pycfg_requests_total{endpoint="/v1/images/generations",outcome="ok"}' in text


@pytest.mark.parametrize("extra, param", [
    (dict(size="33x33"), "size"),
    (dict(size="big"), "size"),
    (dict(size="4096x4096"), "size"),
    (dict(n=9), "n"),
    (dict(response_format="url"), "response_format"),
    (dict(colour="red"), "colour"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(num_inference_steps=500), "num_inference_steps"),
    (dict(seed=-1), "seed"),
    (dict(true_cfg_scale="high"), "true_cfg_scale"),
    (dict(prompt=""), "prompt"),
])
def test_bad_input_is_400_naming_the_field(client, extra, param):
    body = dict(model=MODEL, prompt="a cat", negative_prompt="blurry", num_inference_steps=1, size="32x32")
    body.update(extra)
    with pytest.raises(openai.BadRequestError) as info:
        client.post("/images/generations", body=body, cast_to=object)
    assert info.value.status_code == 400 and info.value.param == param, info.value.body
    assert_clean_error({"error": info.value.body})


def test_auth_unknown_model_and_wrong_endpoint(server, client):
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        wrong.images.generate(model=MODEL, prompt="a cat")
    assert info.value.code == "invalid_api_key"
    status, body = get(server.url, "/v1/models", key=None)
    assert status == 401 and assert_clean_error(body)["code"] == "invalid_api_key"
    assert get(server.url, "/metrics", key="wrong")[0] == 401
    assert get(server.url, "/health", key=None)[0] == 200  # open: load balancers probe it
    with pytest.raises(openai.NotFoundError):
        client.images.generate(model="dall-e-3", prompt="a cat")
    with pytest.raises(openai.BadRequestError) as info:
        client.images.edit(model=MODEL, image=("a.png", b"\x89PNG", "image/png"), prompt="a cat")
    assert info.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        client.get("/no/such/path", cast_to=object)


def test_body_over_the_limit_is_413(server, client):
    with pytest.raises(openai.APIStatusError) as info:
        generate(client, negative_prompt="x" * (MAX_BODY + 1))
    assert info.value.status_code == 413
    assert_clean_error({"error": info.value.body})
    assert 'outcome="too_large"} 1.0' in get(server.url, "/metrics")[1].decode()


def test_malformed_traffic(server):
    body = json.dumps(dict(prompt="a cat", size="24x16", num_inference_steps=1, seed=1)).encode()
    # a chunked body is read, not ignored: the image has the size it asks for
    status, _, reply = raw_request(server.port, http_post(GEN, chunked(body), {"Transfer-Encoding": "chunked"}))
    assert status == 200 and png_array(json.loads(reply)["data"][0]["b64_json"]).shape == (16, 24, 3)
    # a chunked body past the limit
    big = chunked(b'{"prompt": "' + b"x" * (MAX_BODY + 10) + b'"}', size=32768)
    status, _, reply = raw_request(server.port, http_post(GEN, big, {"Transfer-Encoding": "chunked"}))
    assert status == 413 and assert_clean_error(reply)
    # a declared length past the limit is refused before the body is sent
    status, _, reply = raw_request(server.port, http_post(GEN, b"", {"Content-Length": str(10**12)}))
    assert status == 413 and assert_clean_error(reply)
    # negative or non-numeric Content-Length: refused by the HTTP parser
    for value in ("-1", "abc"):
        status, _, _ = raw_request(server.port, http_post(GEN, body, {"Content-Length": value}))
        assert status == 400
    # no Content-Length and no body
    status, _, reply = raw_request(server.port, http_post(GEN, b"", {"Content-Length": None}))
    assert status == 400 and assert_clean_error(reply)
    # a body shorter than its Content-Length that then stalls: 408 after --body-timeout, no stuck handler
    started = time.monotonic()
    status, _, reply = raw_request(server.port, http_post(GEN, body[:10], {"Content-Length": str(len(body))}))
    assert status == 408 and time.monotonic() - started < 30 and assert_clean_error(reply)
    # deep JSON and not-JSON
    for bad in (b"[" * 100_000, b"{" * 50_000, b'{"prompt": ', b"\xff\xfe", b"[1, 2]"):
        status, _, reply = raw_request(server.port, http_post(GEN, bad))
        assert status == 400 and assert_clean_error(reply), bad[:20]
    assert health(server)["status"] == "ready"


def test_half_open_connections_and_50_concurrent_clients(server, client):
    generate(client)  # the driver's first answer loads what every later one reuses: measure from a warm server
    before = proc_status(server.proc.pid)
    # 100 connections that send half a request head and stop: no thread each, closed after --header-timeout
    half_open = []
    for _ in range(100):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
        half_open.append(sock)
    assert health(server)["status"] == "ready"  # others are served meanwhile
    assert proc_status(server.proc.pid)["Threads"] <= before["Threads"] + 4
    for sock in half_open:
        assert sock.recv(1024) == b""  # closed by the server (the read times out after 30 s otherwise)
        sock.close()

    # 50 concurrent clients: each answered (200) or refused at once (429: max_queue=1)
    def one(i: int) -> tuple[int, bytes]:
        body = json.dumps(dict(prompt="a cat", size="16x16", num_inference_steps=1, seed=i)).encode()
        status, _, reply = raw_request(server.port, http_post(GEN, body), read_timeout=120)
        return status, reply

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(one, range(50)))
    statuses = [s for s, _ in answers]
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 1 and statuses.count(429) >= 1, statuses
    for status, reply in answers:
        if status == 200:
            assert png_array(json.loads(reply)["data"][0]["b64_json"]).shape == (16, 16, 3)
        else:
            assert assert_clean_error(reply)["type"] == "rate_limit_exceeded"
    after = proc_status(server.proc.pid)
    # bounds: a few threads (the thread pool that encodes PNGs), 64 MiB of memory (measured: +1 thread, +1 MiB)
    assert after["Threads"] <= before["Threads"] + 8, (before, after)
    assert after["VmRSS"] <= before["VmRSS"] + 64 * 1024, (before, after)
    wait_for(lambda: health(server)["queue_depth"] == 0, 10, "every handler to return")
    assert health(server)["status"] == "ready"


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def slow_request_bytes(steps: int) -> bytes:
    body = dict(prompt="a cat", size=SLOW["size"], **SLOW["extra_body"])
    body["num_inference_steps"] = steps
    return http_post(GEN, json.dumps(body).encode())


def test_queue_bound_and_disconnecting_clients(server, client):
    a = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    a.sendall(slow_request_bytes(steps=120))
    wait_for(lambda: health(server)["queue_depth"] == 1, 30, "the slow request to be admitted")
    b = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    b.sendall(http_post(GEN, json.dumps(dict(prompt="a cat", size="16x16", num_inference_steps=1)).encode()))
    wait_for(lambda: health(server)["queue_depth"] == 2, 30, "the second request to be queued")
    with pytest.raises(openai.RateLimitError) as info:  # max_queue=1: one running, one waiting
        generate(client)
    assert_clean_error({"error": info.value.body})
    b.close()  # the waiting request's client leaves: dropped, its handler returns
    wait_for(lambda: health(server)["queue_depth"] == 1, 10, "the abandoned request to be dropped")
    a.close()  # the running request's client leaves: its handler returns without waiting for the engine
    wait_for(lambda: health(server)["queue_depth"] == 0, 10, "the running request's handler to return")
    status, text = get(server.url, "/metrics")
    assert 'outcome="disconnected"} 2.0' in text.decode()
    assert health(server)["status"] == "ready"


def test_worker_killed_during_a_request(server, client, stock):
    wait_for(lambda: health(server)["engine_pending"] == 0, 60, "an idle engine")
    workers = worker_pids(server)
    assert len(workers) == 2
    outcome: dict = {}

    def slow() -> None:
        try:
            client.images.generate(model=MODEL, prompt="a cat", **SLOW)
        except openai.APIStatusError as err:
            outcome["error"] = err

    thread = threading.Thread(target=slow)
    thread.start()
    wait_for(lambda: health(server)["queue_depth"] == 1, 30, "the slow request to be admitted")
    time.sleep(1.0)
    os.kill(workers[1], signal.SIGKILL)
    saw_503 = False
    deadline = time.monotonic() + 180
    while health(server)["status"] != "ready" or thread.is_alive():
        if time.monotonic() > deadline:
            pytest.fail("the engine did not restart:\n" + server.log_text())
        if not saw_503 and health(server)["status"] != "ready":
            try:
                generate(client)
            except openai.InternalServerError as err:
                saw_503 = err.status_code == 503
                assert_clean_error({"error": err.body})
        time.sleep(0.1)
    thread.join()
    err = outcome["error"]
    assert err.status_code in (500, 503) and isinstance(err, openai.InternalServerError)
    assert_clean_error({"error": err.body})
    assert saw_503, "requests during the restart get 503"
    assert health(server)["restarts"] == 1 and set(worker_pids(server)).isdisjoint(workers)
    # later requests succeed and are exact
    image = png_array(generate(client, size="32x32", seed=5).data[0].b64_json)
    expected = stock_images(stock, "a photo of a cat", 5, 32, 32, negative_prompt="blurry", true_cfg_scale=4.0,
                            num_inference_steps=2)[0]
    assert np.array_equal(image, expected)
    assert "pycfg_engine_restarts_total 1.0" in get(server.url, "/metrics")[1].decode()
    assert "Traceback" in server.log_text() or "killed" in server.log_text()  # the details stay in the log
