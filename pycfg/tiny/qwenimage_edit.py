"""A tiny QwenImageEditPipeline that takes string prompts: a Qwen2.5-VL text-and-vision encoder, a byte-level
tokenizer with Qwen's vision tokens and an image-and-text processor, all built in code (no torchvision: the
processor has no video part)."""

from __future__ import annotations

import torch

from ._common import _byte_level_tokenizer
from .qwenimage import QWENIMAGE_CONFIGS
from .qwenimage_variants import qwenimage_variant_pipeline

_VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def _image_text_processor():
    """Qwen2.5-VL's processor with its image and text parts only: the video part needs torchvision."""
    from transformers import Qwen2_5_VLProcessor

    class Qwen2_5_VLImageTextProcessor(Qwen2_5_VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return Qwen2_5_VLImageTextProcessor


def qwen_vl_text_encoder(hidden_size: int, seed: int = 0):
    """(processor, tokenizer, Qwen2.5-VL encoder with a vision tower) at a tiny size, random weights.

    The image processor shrinks every input image to at most 56x56 pixels: 4 merged vision tokens per image.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    tokenizer = _byte_level_tokenizer([
        "Describe the key features of the input image (color, shape, size, texture, objects, background)",
        "a photo of a cat", "make it blue", "blurry, low quality",
    ], extra_special=_VISION_TOKENS)
    token = tokenizer.convert_tokens_to_ids
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         intermediate_size=2 * hidden_size, vocab_size=len(tokenizer), max_position_embeddings=2048,
                         bos_token_id=eos, eos_token_id=eos, pad_token_id=pad,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, hidden_size // 4 - 2],
                                       "rope_theta": 10000.0}),
        vision_config=dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=32, out_hidden_size=hidden_size),
        image_token_id=token("<|image_pad|>"), video_token_id=token("<|video_pad|>"),
        vision_start_token_id=token("<|vision_start|>"), vision_end_token_id=token("<|vision_end|>"),
        bos_token_id=eos, eos_token_id=eos, pad_token_id=pad,
    )
    encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    image_processor = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2,
                                               min_pixels=28 * 28, max_pixels=56 * 56)
    return _image_text_processor()(image_processor, tokenizer), tokenizer, encoder


def qwenimage_edit_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, scheduler=None):
    """The tiny edit pipeline of :func:`~pycfg.tiny.qwenimage_variant_pipeline` with a text encoder, so that
    ``prompt=`` / ``negative_prompt=`` strings work (encoded with the input image, as the real model does).

    Its VAE downsamples 64x (the pipeline encodes every input image at about one megapixel), so output sizes
    are multiples of 128.
    """
    pipe = qwenimage_variant_pipeline("edit", seed=seed, dtype=dtype, scheduler=scheduler)
    processor, tokenizer, encoder = qwen_vl_text_encoder(QWENIMAGE_CONFIGS["tiny"]["joint_attention_dim"], seed)
    pipe.register_modules(text_encoder=encoder.to(dtype), tokenizer=tokenizer, processor=processor)
    return pipe
