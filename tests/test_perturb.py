"""Perturbed forwards on the tiny Qwen-Image, Flux, SD3 and Wan transformers, against hand-written references."""

from __future__ import annotations

import copy

import pytest
import torch

from pycfg.guidance.perturb import (
    SkipAttention,
    SkipBlocks,
    perturbed,
    register_block_outputs,
    transformer_blocks,
)

torch.set_num_threads(1)


def _qwen():
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                        attention_head_dim=16, num_attention_heads=3, joint_attention_dim=16,
                                        guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    gen = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 16, 16, generator=gen),
                  encoder_hidden_states=torch.randn(1, 7, 16, generator=gen),
                  encoder_hidden_states_mask=torch.ones(1, 7, dtype=torch.long),
                  timestep=torch.tensor([0.6]), img_shapes=[[(1, 4, 4)]])
    return model, inputs


def _flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    gen = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 16, 4, generator=gen),
                  encoder_hidden_states=torch.randn(1, 7, 32, generator=gen),
                  pooled_projections=torch.randn(1, 32, generator=gen), timestep=torch.tensor([0.6]),
                  img_ids=torch.rand(16, 3, generator=gen), txt_ids=torch.zeros(7, 3))
    return model, inputs


def _sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                                  num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                  pooled_projection_dim=64, out_channels=4)
    gen = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 4, 8, 8, generator=gen),
                  encoder_hidden_states=torch.randn(1, 7, 32, generator=gen),
                  pooled_projections=torch.randn(1, 64, generator=gen), timestep=torch.tensor([600.0]))
    return model, inputs


def _wan():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                                  out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    gen = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 16, 3, 8, 8, generator=gen),
                  encoder_hidden_states=torch.randn(1, 7, 32, generator=gen), timestep=torch.tensor([600]))
    return model, inputs


MODELS = {"qwenimage": _qwen, "flux": _flux, "sd3": _sd3, "wan": _wan}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    transformer, inputs = MODELS[request.param]()
    return request.param, transformer.eval(), inputs


def _run(transformer, inputs):
    with torch.no_grad():
        return transformer(**inputs, return_dict=False)[0]


def _without_blocks(transformer, layers):
    """Reference: a copy of the model whose block stacks simply do not contain the skipped blocks."""
    ref = copy.deepcopy(transformer)
    index = 0
    for attr in ("transformer_blocks", "single_transformer_blocks", "blocks"):
        stack = getattr(ref, attr, None)
        if isinstance(stack, torch.nn.ModuleList):
            kept = [b for j, b in enumerate(stack) if index + j not in layers]
            index += len(stack)
            setattr(ref, attr, torch.nn.ModuleList(kept))
    return ref


class _IdentityAttentionProcessor:
    """Reference attention with probabilities = identity: each token's output is its own projected value."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        img = attn.to_v(hidden_states)
        txt = None
        if encoder_hidden_states is not None and getattr(attn, "add_v_proj", None) is not None:
            txt = attn.add_v_proj(encoder_hidden_states)
        if getattr(attn, "to_out", None) is not None:
            img = attn.to_out[1](attn.to_out[0](img))
        if txt is not None and getattr(attn, "to_add_out", None) is not None:
            txt = attn.to_add_out(txt)
        return img if txt is None else (img, txt)


def _self_attention(block):
    return [m for _, m in block.named_modules()
            if hasattr(m, "processor") and hasattr(m, "to_v") and not getattr(m, "is_cross_attention", False)]


def _relerr(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_skip_blocks_equals_model_without_those_blocks(model):
    name, transformer, inputs = model
    plain = _run(transformer, inputs)
    count = len(transformer_blocks(transformer))
    for layers in ([0], [count - 1], list(range(count))):
        with perturbed(transformer, SkipBlocks(layers)):
            skipped = _run(transformer, inputs)
        reference = _run(_without_blocks(transformer, set(layers)), inputs)
        assert torch.equal(skipped, reference), (name, layers, _relerr(skipped, reference))
        assert not torch.equal(skipped, plain)
    # the model is itself again after the context
    assert torch.equal(_run(transformer, inputs), plain)


def test_skip_blocks_sd3_equals_its_own_skip_layers():
    transformer, inputs = _sd3()
    transformer.eval()
    for layers in ([0], [1]):
        with perturbed(transformer, SkipBlocks(layers)):
            ours = _run(transformer, inputs)
        with torch.no_grad():
            theirs = transformer(**inputs, skip_layers=layers, return_dict=False)[0]
        assert torch.equal(ours, theirs)


def test_skip_attention_equals_identity_attention_reference(model):
    name, transformer, inputs = model
    plain = _run(transformer, inputs)
    blocks = transformer_blocks(transformer)
    for layer in range(len(blocks)):
        with perturbed(transformer, SkipAttention([layer])):
            ours = _run(transformer, inputs)
        assert torch.equal(_run(transformer, inputs), plain)
        ref = copy.deepcopy(transformer)
        modules = _self_attention(transformer_blocks(ref)[layer][1])
        assert modules, name
        for attn in modules:
            attn.processor = _IdentityAttentionProcessor()
        reference = _run(ref, inputs)
        assert _relerr(ours, reference) <= 1e-6, (name, layer, _relerr(ours, reference))
        assert not torch.equal(ours, plain)


def test_wan_cross_attention_is_left_alone():
    transformer, _ = _wan()
    block = transformer_blocks(transformer)[0][1]
    chosen = _self_attention(block)
    assert chosen == [block.attn1]


def test_attention_outside_sdpa_raises():
    transformer, inputs = _qwen()
    transformer.eval()
    for attn in _self_attention(transformer_blocks(transformer)[1][1]):
        attn.processor = _IdentityAttentionProcessor()  # never calls scaled_dot_product_attention
    with pytest.raises(RuntimeError, match="did not call"):
        with perturbed(transformer, SkipAttention([1])):
            _run(transformer, inputs)
    assert "forward" not in vars(transformer_blocks(transformer)[1][1].attn)  # restored after the error


def test_errors_name_the_problem():
    transformer, _ = _flux()
    with pytest.raises(ValueError, match=r"out of range.*2 blocks.*transformer_blocks then single_transformer_blocks"):
        SkipBlocks([2]).check(transformer)
    with pytest.raises(ValueError, match="out of range"):
        with perturbed(transformer, SkipAttention([5])):
            pass

    class Block(torch.nn.Module):
        def forward(self, hidden_states, context):
            return hidden_states * 2

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer_blocks = torch.nn.ModuleList([Block(), Block()])

        def forward(self, x):
            for block in self.transformer_blocks:
                x = block(x, None)
            return x

    toy = Toy()
    with pytest.raises(TypeError, match="register_block_outputs"):
        SkipBlocks([0]).check(toy)
    register_block_outputs("Block", ("hidden_states",))
    with perturbed(toy, SkipBlocks([1])):
        assert torch.equal(toy(torch.ones(2)), torch.full((2,), 2.0))
    assert torch.equal(toy(torch.ones(2)), torch.full((2,), 4.0))
    with pytest.raises(TypeError, match="block stacks"):
        SkipBlocks([0]).check(torch.nn.Linear(2, 2))
