"""The tiny Qwen-Image-Edit pipeline that takes prompt strings (what ``pycfg serve tiny:qwen-image-edit`` runs)."""

from __future__ import annotations

import torch

from .qwenimage_variants import qwenimage_variant_pipeline


def qwenimage_edit_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, scheduler=None):
    """The tiny edit pipeline of :func:`~pycfg.tiny.qwenimage_variant_pipeline` with its text encoder, so that
    ``prompt=`` / ``negative_prompt=`` strings work (encoded with the input image, as the real model does).

    Its VAE downsamples 64x (the pipeline encodes every input image at about one megapixel), so output sizes
    are multiples of 128.
    """
    return qwenimage_variant_pipeline("edit", seed=seed, dtype=dtype, scheduler=scheduler, text_encoder=True)
