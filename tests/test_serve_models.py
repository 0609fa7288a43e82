"""What `pycfg serve` serves (built-in tiny models, local diffusers folders) and its command line, without a server."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")

from pycfg.cli import main  # noqa: E402
from pycfg.serve import TINY_MODELS, Task, load_model_spec  # noqa: E402
from pycfg.serve.server import exposure_warning  # noqa: E402


def test_tiny_models_and_bad_names():
    assert load_model_spec("tiny:qwen-image").task is Task.IMAGE
    assert load_model_spec("tiny:wan").task is Task.VIDEO
    assert set(TINY_MODELS) == {"tiny:qwen-image", "tiny:qwen-image-edit", "tiny:flux", "tiny:wan"}
    with pytest.raises(ValueError, match="allowed: tiny:qwen-image"):
        load_model_spec("tiny:sdxl")
    with pytest.raises(ValueError, match="local diffusers model folder"):
        load_model_spec("/no/such/folder")


def test_local_folder_loads_offline_and_generates_the_same_image(tmp_path):
    from pycfg.tiny import qwenimage_pipeline

    torch.set_num_threads(1)
    pipe = qwenimage_pipeline("tiny", text_encoder=True)
    pipe.save_pretrained(tmp_path / "tiny-qwen")
    spec = load_model_spec(str(tmp_path / "tiny-qwen"))
    assert (spec.name, spec.pipeline_class, spec.task, spec.size_multiple) == ("tiny-qwen", "QwenImagePipeline",
                                                                              Task.IMAGE, 8)
    loaded = spec.factory(device=torch.device("cpu"))
    args = dict(prompt="a cat", negative_prompt="blurry", true_cfg_scale=4.0, num_inference_steps=2, height=32,
                width=32)
    a = pipe(**args, generator=torch.Generator("cpu").manual_seed(0)).images[0]
    b = loaded(**args, generator=torch.Generator("cpu").manual_seed(0)).images[0]
    assert np.array_equal(np.array(a), np.array(b))


def test_command_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["serve", "--help"])
    assert info.value.code == 0 and "--cfg-parallel-size" in capsys.readouterr().out
    assert main(["serve", "tiny:nope"]) == 2
    assert "allowed: tiny:qwen-image" in capsys.readouterr().err
    assert exposure_warning("0.0.0.0", None) and "--api-key" in exposure_warning("0.0.0.0", None)
    assert exposure_warning("0.0.0.0", "key") is None and exposure_warning("127.0.0.1", None) is None
