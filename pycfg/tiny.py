"""Small random-weight pipelines built in code: no downloads, fixed seeds. Used by the demo, tests and benchmarks.

``text_encoder`` and ``tokenizer`` are None by default: pass ``prompt_embeds`` (+ masks) directly, as from any
encoder. ``qwenimage_pipeline(text_encoder=True)`` also builds a tiny Qwen2.5-VL text encoder and a byte-level
BPE tokenizer in code, so string prompts go through the pipeline's own ``encode_prompt``.
"""

from __future__ import annotations

import torch

# transformer sizes: "tiny" for tests, "small" for benchmarks where the transformer forward dominates
QWENIMAGE_CONFIGS = {
    "tiny": dict(num_layers=2, attention_head_dim=16, num_attention_heads=3, joint_attention_dim=16,
                 axes_dims_rope=(8, 4, 4), height=32, width=32),
    "demo": dict(num_layers=4, attention_head_dim=64, num_attention_heads=4, joint_attention_dim=32,
                 axes_dims_rope=(8, 28, 28), height=128, width=128),
    "small": dict(num_layers=8, attention_head_dim=128, num_attention_heads=8, joint_attention_dim=64,
                  axes_dims_rope=(16, 56, 56), height=256, width=256),
}


def _byte_level_tokenizer(corpus: list[str], vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on ``corpus``, with Qwen's chat-template special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>")


def qwen_text_encoder(hidden_size: int, seed: int = 0):
    """(tokenizer, Qwen2.5-VL text encoder) at a tiny size, random weights, for the Qwen-Image pipelines."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = _byte_level_tokenizer([
        "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships",
        "a lighthouse at dusk", "a photo of a cat", "blurry, low quality",
    ])
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         intermediate_size=2 * hidden_size, vocab_size=len(tokenizer), max_position_embeddings=2048,
                         bos_token_id=eos, eos_token_id=eos, pad_token_id=pad,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, hidden_size // 4 - 2],
                                       "rope_theta": 10000.0}),
        vision_config=dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=32, out_hidden_size=hidden_size),
        bos_token_id=eos, eos_token_id=eos, pad_token_id=pad,
    )
    return tokenizer, Qwen2_5_VLForConditionalGeneration(config).eval()


def qwenimage_pipeline(config: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32,
                       scheduler=None, text_encoder: bool = False):
    """A QwenImagePipeline with the real architecture at a small size (VAE scale factor 4, 16 latent channels).

    "small" makes 1024 image tokens (256x256) with hidden size 1024 and 8 blocks. ``text_encoder=True`` adds a
    tiny text encoder and tokenizer so ``prompt=`` / ``negative_prompt=`` strings work.
    """
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)

    cfg = dict(QWENIMAGE_CONFIGS[config])
    cfg.pop("height"), cfg.pop("width")
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4,
                                              guidance_embeds=False, **cfg)
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    tokenizer, encoder = qwen_text_encoder(cfg["joint_attention_dim"], seed) if text_encoder else (None, None)
    pipe = QwenImagePipeline(
        scheduler=scheduler or FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.transformer.eval()
    pipe.vae.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def qwenimage_inputs(config: str = "tiny", seed: int = 0, batch: int = 1, pos_len: int = 7, neg_len: int = 5,
                     dtype: torch.dtype = torch.float32) -> dict:
    """Call arguments for :func:`qwenimage_pipeline`: random prompt embeds with masks, of unequal lengths."""
    cfg = QWENIMAGE_CONFIGS[config]
    g = torch.Generator().manual_seed(seed + 1000)
    dim = cfg["joint_attention_dim"]
    return dict(
        prompt_embeds=torch.randn(batch, pos_len, dim, generator=g).to(dtype),
        prompt_embeds_mask=torch.ones(batch, pos_len, dtype=torch.long),
        negative_prompt_embeds=torch.randn(batch, neg_len, dim, generator=g).to(dtype),
        negative_prompt_embeds_mask=torch.ones(batch, neg_len, dtype=torch.long),
        height=cfg["height"],
        width=cfg["width"],
    )


# --- other families: tiny sizes only, built the same way (seeded constructors, no text encoders) ---


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


def _flux_vae(latent_channels: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)


def flux_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, guidance_embeds: bool = False, scheduler=None):
    """A FluxPipeline (1 double + 1 single block); ``guidance_embeds=True`` makes it guidance-distilled."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
                                         guidance_embeds=guidance_embeds)
    torch.manual_seed(seed)
    vae = _flux_vae(1)
    pipe = FluxPipeline(scheduler=scheduler or FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    return _ready(pipe, dtype)


def flux_inputs(seed: int = 0, batch: int = 1, length: int = 6, neg_length: int | None = None,
                dtype: torch.dtype = torch.float32) -> dict:
    """Positive and negative embeds with pooled embeds; 32x32 image. Stock true CFG wants equal lengths."""
    g = torch.Generator().manual_seed(seed + 1000)
    return dict(
        prompt_embeds=_embeds(g, batch, length, 32, dtype),
        pooled_prompt_embeds=torch.randn(batch, 32, generator=g).to(dtype),
        negative_prompt_embeds=_embeds(g, batch, length if neg_length is None else neg_length, 32, dtype),
        negative_pooled_prompt_embeds=torch.randn(batch, 32, generator=g).to(dtype),
        height=32,
        width=32,
    )


def sd3_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, scheduler=None):
    """A StableDiffusion3Pipeline with a 2-block SD3 transformer (skip-layer guidance can skip block 1)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)
    torch.manual_seed(seed)
    vae = _flux_vae(4)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler or FlowMatchEulerDiscreteScheduler(), vae=vae,
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
        tokenizer_3=None,
    )
    return _ready(pipe, dtype)


def sd3_inputs(seed: int = 0, batch: int = 1, length: int = 6, dtype: torch.dtype = torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed + 1000)
    return dict(
        prompt_embeds=_embeds(g, batch, length, 32, dtype),
        pooled_prompt_embeds=torch.randn(batch, 64, generator=g).to(dtype),
        negative_prompt_embeds=_embeds(g, batch, length, 32, dtype),
        negative_pooled_prompt_embeds=torch.randn(batch, 64, generator=g).to(dtype),
        height=32,
        width=32,
    )


def _wan_transformer(seed: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                                 out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def wan_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, two_experts: bool = False,
                 boundary_ratio: float = 0.875, scheduler=None):
    """A WanPipeline; ``two_experts=True`` makes it Wan 2.2 (a second, differently seeded transformer)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    transformer = _wan_transformer(seed)
    transformer_2 = _wan_transformer(seed + 1) if two_experts else None
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae,
                       scheduler=scheduler or FlowMatchEulerDiscreteScheduler(shift=3.0),
                       transformer=transformer, transformer_2=transformer_2,
                       boundary_ratio=boundary_ratio if two_experts else None)
    return _ready(pipe, dtype)


def wan_inputs(seed: int = 0, batch: int = 1, pos_len: int = 7, neg_len: int = 5,
               dtype: torch.dtype = torch.float32) -> dict:
    """16x16, 9 frames (3 latent frames); text lengths may differ between the branches."""
    g = torch.Generator().manual_seed(seed + 1000)
    return dict(
        prompt_embeds=_embeds(g, batch, pos_len, 32, dtype),
        negative_prompt_embeds=_embeds(g, batch, neg_len, 32, dtype),
        height=16,
        width=16,
        num_frames=9,
    )


def ltx_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, scheduler=None):
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

    torch.manual_seed(seed)
    transformer = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                             num_attention_heads=4, attention_head_dim=8, cross_attention_dim=32,
                                             num_layers=1, caption_channels=32)
    torch.manual_seed(seed)
    vae = AutoencoderKLLTXVideo(latent_channels=8, block_out_channels=(8, 8, 8, 8),
                                spatio_temporal_scaling=(True, True, False, False), layers_per_block=(1, 1, 1, 1, 1),
                                patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False)
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    pipe = LTXPipeline(scheduler=scheduler or FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                       tokenizer=None, transformer=transformer)
    return _ready(pipe, dtype)


def ltx_inputs(seed: int = 0, batch: int = 1, length: int = 8, dtype: torch.dtype = torch.float32) -> dict:
    """32x32, 9 frames; bool-valued masks, the negative one with padding (stock batches both: same length)."""
    g = torch.Generator().manual_seed(seed + 1000)
    neg_mask = torch.ones(batch, length, dtype=torch.long)
    neg_mask[:, length - 3:] = 0
    return dict(
        prompt_embeds=_embeds(g, batch, length, 32, dtype),
        prompt_attention_mask=torch.ones(batch, length, dtype=torch.long),
        negative_prompt_embeds=_embeds(g, batch, length, 32, dtype),
        negative_prompt_attention_mask=neg_mask,
        height=32,
        width=32,
        num_frames=9,
    )


def cogvideox_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, scheduler=None):
    """A CogVideoXPipeline; the default scheduler is CogVideoXDDIMScheduler (pass a CogVideoXDPMScheduler too)."""
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline,
                           CogVideoXTransformer3DModel)

    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel(num_attention_heads=4, attention_head_dim=8, in_channels=4,
                                              out_channels=4, time_embed_dim=2, text_embed_dim=32, num_layers=1,
                                              sample_width=2, sample_height=2, sample_frames=9, patch_size=2,
                                              temporal_compression_ratio=4, max_text_seq_length=16)
    torch.manual_seed(seed)
    blocks = 4
    vae = AutoencoderKLCogVideoX(in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * blocks,
                                 up_block_types=("CogVideoXUpBlock3D",) * blocks, block_out_channels=(8,) * blocks,
                                 latent_channels=4, layers_per_block=1, norm_num_groups=2,
                                 temporal_compression_ratio=4)
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                             scheduler=scheduler or CogVideoXDDIMScheduler())
    return _ready(pipe, dtype)


def cogvideox_inputs(seed: int = 0, batch: int = 1, dtype: torch.dtype = torch.float32) -> dict:
    """16x16, 9 frames; embeds of the transformer's fixed text length (16)."""
    g = torch.Generator().manual_seed(seed + 1000)
    return dict(
        prompt_embeds=_embeds(g, batch, 16, 32, dtype),
        negative_prompt_embeds=_embeds(g, batch, 16, 32, dtype),
        height=16,
        width=16,
        num_frames=9,
    )


def hunyuanvideo_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, scheduler=None):
    from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                           HunyuanVideoTransformer3DModel)

    torch.manual_seed(seed)
    transformer = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                                 attention_head_dim=10, num_layers=1, num_single_layers=1,
                                                 num_refiner_layers=1, patch_size=1, patch_size_t=1,
                                                 guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8,
                                                 rope_axes_dim=(2, 4, 4))
    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanVideo(in_channels=3, out_channels=3, latent_channels=4,
                                    down_block_types=("HunyuanVideoDownBlock3D",) * 4,
                                    up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8,) * 4,
                                    layers_per_block=1, act_fn="silu", norm_num_groups=4, scaling_factor=0.476986,
                                    spatial_compression_ratio=8, temporal_compression_ratio=4,
                                    mid_block_add_attention=True)
    pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=vae,
                                scheduler=scheduler or FlowMatchEulerDiscreteScheduler(shift=7.0),
                                text_encoder_2=None, tokenizer_2=None)
    return _ready(pipe, dtype)


def hunyuanvideo_inputs(seed: int = 0, batch: int = 1, pos_len: int = 7, neg_len: int = 5,
                        dtype: torch.dtype = torch.float32) -> dict:
    """16x16, 9 frames; embeds with masks (the negative one padded) and pooled embeds."""
    g = torch.Generator().manual_seed(seed + 1000)
    neg_mask = torch.ones(batch, neg_len, dtype=torch.long)
    neg_mask[:, neg_len - 2:] = 0
    return dict(
        prompt_embeds=_embeds(g, batch, pos_len, 16, dtype),
        prompt_attention_mask=torch.ones(batch, pos_len, dtype=torch.long),
        pooled_prompt_embeds=torch.randn(batch, 8, generator=g).to(dtype),
        negative_prompt_embeds=_embeds(g, batch, neg_len, 16, dtype),
        negative_prompt_attention_mask=neg_mask,
        negative_pooled_prompt_embeds=torch.randn(batch, 8, generator=g).to(dtype),
        height=16,
        width=16,
        num_frames=9,
    )


# --- LTX-2: video + audio (two VAEs, a vocoder, text connectors) ---

#: width of the per-layer text-encoder states the connectors take: 16 channels times 3 stacked layers
LTX2_TEXT_DIM = 16 * 3


def ltx2_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, scheduler=None):
    """An LTX2Pipeline at a tiny size: 2 blocks with perturbable self-attention (so STG changes the prediction)
    and cross-attention modulation (LTX-2.3's ``sigma`` path), 4 video and 2 audio latent channels.

    At 32x32 and 5 frames the video has 3x16x16 latent tokens and the audio 5 latent frames.
    """
    from diffusers import (AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video, FlowMatchEulerDiscreteScheduler,
                           LTX2Pipeline, LTX2VideoTransformer3DModel)
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

    torch.manual_seed(seed)
    transformer = LTX2VideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
        audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=2, caption_channels=16,
        rope_double_precision=False, rope_type="split", perturbed_attn=True, cross_attn_mod=True,
        audio_cross_attn_mod=True,
    )
    torch.manual_seed(seed)
    connectors = LTX2TextConnectors(
        caption_channels=16, text_proj_in_factor=3, video_connector_num_attention_heads=2,
        video_connector_attention_head_dim=8, video_connector_num_layers=1,
        video_connector_num_learnable_registers=None, audio_connector_num_attention_heads=2,
        audio_connector_attention_head_dim=8, audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=None, connector_rope_base_seq_len=32,
        rope_double_precision=False, rope_type="split",
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLLTX2Video(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), decoder_block_out_channels=(8,),
        layers_per_block=(1,), decoder_layers_per_block=(1, 1), spatio_temporal_scaling=(True,),
        decoder_spatio_temporal_scaling=(True,), decoder_inject_noise=(False, False), downsample_type=("spatial",),
        upsample_residual=(False,), upsample_factor=(1,), timestep_conditioning=False, patch_size=1,
        patch_size_t=1, encoder_causal=True, decoder_causal=False,
    )
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    torch.manual_seed(seed)
    audio_vae = AutoencoderKLLTX2Audio(
        base_channels=4, output_channels=2, ch_mult=(1,), num_res_blocks=1, attn_resolutions=None, in_channels=2,
        resolution=32, latent_channels=2, norm_type="pixel", causality_axis="height", dropout=0.0,
        mid_block_add_attention=False, sample_rate=16000, mel_hop_length=160, is_causal=True, mel_bins=8,
    )
    torch.manual_seed(seed)
    vocoder = LTX2Vocoder(
        in_channels=2 * 8, hidden_channels=16, out_channels=2, upsample_kernel_sizes=[4, 4],
        upsample_factors=[2, 2], resnet_kernel_sizes=[3], resnet_dilations=[[1, 3, 5]],
        leaky_relu_negative_slope=0.1, output_sampling_rate=16000,
    )
    pipe = LTX2Pipeline(
        scheduler=scheduler or FlowMatchEulerDiscreteScheduler(), vae=vae, audio_vae=audio_vae, text_encoder=None,
        tokenizer=None, connectors=connectors, transformer=transformer, vocoder=vocoder,
    )
    for module in (connectors, audio_vae, vocoder):
        module.eval()
    return _ready(pipe, dtype)


def ltx2_inputs(seed: int = 0, batch: int = 1, length: int = 8, dtype: torch.dtype = torch.float32) -> dict:
    """32x32, 5 frames at 25 fps; per-layer text states with left-padded masks, as the stock Gemma encoder pads."""
    g = torch.Generator().manual_seed(seed + 1000)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[:, : length // 4] = 0
    return dict(
        prompt_embeds=_embeds(g, batch, length, LTX2_TEXT_DIM, dtype),
        prompt_attention_mask=mask,
        negative_prompt_embeds=_embeds(g, batch, length, LTX2_TEXT_DIM, dtype),
        negative_prompt_attention_mask=mask.clone(),
        height=32,
        width=32,
        num_frames=5,
        frame_rate=25.0,
    )
