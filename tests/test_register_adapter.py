"""``pycfg.register_adapter``: a user's adapter, defined here, for a pipeline class of the user's own."""

from __future__ import annotations

import pytest
import torch
from diffusers import QwenImagePipeline

import pycfg
import pycfg.adapters
from pycfg.adapters.qwenimage import QwenImageAdapter
from pycfg.guidance import CFGZeroStar
from pycfg.tiny import qwenimage_inputs, qwenimage_pipeline


class StudioPipeline(QwenImagePipeline):
    """A user's own pipeline class; without a registration it gets the adapter of its base class."""


class ZeroStarAdapter(QwenImageAdapter):
    """The Qwen-Image adapter with CFG-Zero* as the default guidance instead of CFG with renormalisation."""

    def default_policy(self, a):
        has_negative = a["negative_prompt"] is not None or a["negative_prompt_embeds"] is not None
        if a["true_cfg_scale"] > 1 and has_negative:
            return CFGZeroStar(a["true_cfg_scale"])
        return super().default_policy(a)


@pytest.fixture(autouse=True)
def empty_registry(monkeypatch):
    # registrations are process-wide: each test starts from none and leaves none behind
    monkeypatch.setattr(pycfg.adapters, "_REGISTERED", {})


def _studio_pipeline() -> StudioPipeline:
    return StudioPipeline(**qwenimage_pipeline("tiny").components)


def _latents(fast, **kwargs):
    return fast(**qwenimage_inputs("tiny"), true_cfg_scale=4.0, num_inference_steps=3, output_type="latent",
                generator=torch.Generator().manual_seed(0), **kwargs).images


def test_registered_adapter_serves_its_pipeline_class():
    assert type(pycfg.compile(_studio_pipeline()).adapter) is QwenImageAdapter
    pycfg.register_adapter(StudioPipeline, ZeroStarAdapter)
    assert "StudioPipeline" in pycfg.supported_pipelines()
    fast = pycfg.compile(_studio_pipeline())
    assert isinstance(fast.adapter, ZeroStarAdapter)

    stock_fast = pycfg.compile(qwenimage_pipeline("tiny"))
    expected = _latents(stock_fast, guidance=CFGZeroStar(4.0))
    assert torch.equal(_latents(fast), expected)
    # the registered default really differs from the built-in one (CFG with renormalisation)
    assert not torch.equal(_latents(stock_fast), expected)


def test_registration_by_name_takes_precedence_over_the_built_in_adapter():
    pycfg.register_adapter("QwenImagePipeline", ZeroStarAdapter)
    # a subclass of a registered class is served by the registered adapter too
    assert isinstance(pycfg.compile(_studio_pipeline()).adapter, ZeroStarAdapter)
    assert isinstance(pycfg.compile(qwenimage_pipeline("tiny")).adapter, ZeroStarAdapter)


def test_unknown_pipeline_names_the_registration_api():
    from diffusers import DiffusionPipeline

    class Unknown(DiffusionPipeline):
        pass

    with pytest.raises(TypeError, match="pycfg.register_adapter"):
        pycfg.compile(Unknown())


def test_bad_registrations_raise_clearly():
    with pytest.raises(TypeError, match="subclass of pycfg.adapters.Adapter"):
        pycfg.register_adapter(StudioPipeline, object)
    with pytest.raises(TypeError, match="pipeline class or its class name"):
        pycfg.register_adapter("not a name", ZeroStarAdapter)
    with pytest.raises(TypeError, match="pipeline class or its class name"):
        pycfg.register_adapter(42, ZeroStarAdapter)
