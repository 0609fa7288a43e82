"""`pycfg serve tiny:wan` (a video pipeline, CFG-parallel on 2 workers): /v1/videos answers an MP4 (H.264 through
PyAV) or PNG frames equal to the stock pipeline's frames."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
av = pytest.importorskip("av")

from serve_helpers import API_KEY, png_array, start_server, stop_server  # noqa: E402

MODEL = "tiny:wan"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("serve-video"), MODEL, "--cfg-parallel-size", "2",
                       "--devices", "cpu", "cpu", "--timeout", "20")
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


BODY = dict(model=MODEL, prompt="waves rolling onto a beach", negative_prompt="blurry", guidance_scale=5.0,
            num_inference_steps=2, seed=2, size="32x16", num_frames=9)


def test_video_as_png_frames_equals_stock(client):
    reply = client.post("/videos", body=dict(BODY, response_format="png_frames"), cast_to=object)
    (video,) = reply["data"]
    frames = [png_array(f) for f in video["frames"]]
    assert video["num_frames"] == 9 and video["size"] == "32x16" and frames[0].shape == (16, 32, 3)
    from pycfg.tiny import wan_pipeline

    torch.set_num_threads(1)
    pipe = wan_pipeline(text_encoder=True)
    kwargs = dict(prompt=BODY["prompt"], width=32, height=16, num_frames=9, num_inference_steps=2, output_type="pil")
    stock = pipe(negative_prompt="blurry", guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(2),
                 **kwargs).frames[0]
    assert all(np.array_equal(a, np.array(b)) for a, b in zip(frames, stock, strict=True))
    unguided = pipe(guidance_scale=1.0, generator=torch.Generator("cpu").manual_seed(2), **kwargs).frames[0]
    assert not all(np.array_equal(np.array(a), np.array(b)) for a, b in zip(stock, unguided))


def test_video_as_mp4(client):
    reply = client.post("/videos", body=BODY, cast_to=object)
    (video,) = reply["data"]
    assert video["output_format"] == "mp4"
    with av.open(io.BytesIO(base64.b64decode(video["b64_json"]))) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 9 and frames[0].shape == (16, 32, 3)


def test_video_errors(client):
    for extra, param in ((dict(num_frames=8), "num_frames"), (dict(size="24x16"), "size"),
                         (dict(response_format="gif"), "response_format")):
        with pytest.raises(openai.BadRequestError) as info:
            client.post("/videos", body=dict(BODY, **extra), cast_to=object)
        assert info.value.param == param
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(model=MODEL, prompt="a cat")
    assert info.value.param == "model"
