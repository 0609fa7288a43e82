"""Pieces every tiny family shares: a byte-level tokenizer trained in code, eval mode, random embeds."""

from __future__ import annotations

import torch


def _byte_level_tokenizer(corpus: list[str], vocab_size: int = 300, extra_special: list[str] = ()):
    """A byte-level BPE tokenizer trained on ``corpus``, with Qwen's chat-template special tokens (and
    ``extra_special`` ones after them)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", *extra_special]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>")


def _ready(pipe, dtype: torch.dtype):
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    for name in ("transformer", "transformer_2", "vae"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _embeds(g: torch.Generator, batch: int, length: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(batch, length, dim, generator=g).to(dtype)
