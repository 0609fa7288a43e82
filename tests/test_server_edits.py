"""`pycfg serve tiny:qwen-image-edit --cfg-parallel-size 2` called with the official openai client's
``images.edit`` (a multipart form): the edited image equals the stock edit pipeline's for that seed."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import pycfg

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from serve_helpers import API_KEY, assert_clean_error, png_array, start_server, stop_server  # noqa: E402

MODEL = "tiny:qwen-image-edit"

pytestmark = pytest.mark.skipif("QwenImageEditPipeline" not in pycfg.supported_pipelines(),
                                reason="this pycfg has no adapter for QwenImageEditPipeline")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("serve-edits"), MODEL, "--cfg-parallel-size", "2",
                       "--devices", "cpu", "cpu", "--timeout", "20")
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def input_png() -> bytes:
    from PIL import Image

    pixels = np.random.RandomState(0).randint(0, 256, (96, 160, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def stock_edit(png: bytes, seed: int, **kwargs) -> np.ndarray:
    from PIL import Image

    from pycfg.tiny import qwenimage_edit_pipeline

    torch.set_num_threads(1)
    pipe = qwenimage_edit_pipeline()
    image = Image.open(io.BytesIO(png)).convert("RGB")
    out = pipe(image=image, prompt="make it blue", width=128, height=128, num_inference_steps=2, output_type="pil",
               generator=torch.Generator("cpu").manual_seed(seed), **kwargs)
    return np.array(out.images[0])


def test_edit_equals_the_stock_edit_pipeline(client):
    png = input_png()
    result = client.images.edit(model=MODEL, image=("in.png", png, "image/png"), prompt="make it blue",
                                size="128x128", response_format="b64_json",
                                extra_body=dict(negative_prompt="blurry", true_cfg_scale=4.0, num_inference_steps=2,
                                                seed=3))
    image = png_array(result.data[0].b64_json)
    assert image.shape == (128, 128, 3)
    expected = stock_edit(png, 3, negative_prompt="blurry", true_cfg_scale=4.0)
    assert np.array_equal(image, expected)
    assert not np.array_equal(expected, stock_edit(png, 3)), "CFG must change the stock image"


def test_edit_errors_name_the_field(client):
    png = input_png()
    cases = [
        (dict(image=("in.png", b"not an image", "image/png")), "image"),
        (dict(image=("in.png", png, "image/png"), mask=("m.png", png, "image/png")), "mask"),  # no mask_image
        (dict(image=("in.png", png, "image/png"), size="100x100"), "size"),
    ]
    for files, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.images.edit(model=MODEL, prompt="make it blue", extra_body=dict(num_inference_steps=1), **files)
        assert info.value.param == param, info.value.body
        assert_clean_error({"error": info.value.body})
