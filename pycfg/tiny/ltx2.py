"""LTX-2 (video + audio) at a tiny size."""

from __future__ import annotations

import torch

from ._common import _embeds, _ready

#: width of the per-layer text-encoder states the connectors take: 16 channels times 3 stacked layers
LTX2_TEXT_DIM = 16 * 3


def ltx2_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, scheduler=None):
    """An LTX2Pipeline at a tiny size: 2 blocks with perturbable self-attention (so STG changes the prediction)
    and cross-attention modulation (LTX-2.3's ``sigma`` path), 4 video and 2 audio latent channels.

    At 32x32 and 5 frames the video has 3x16x16 latent tokens and the audio 5 latent frames.
    """
    from diffusers import (
        AutoencoderKLLTX2Audio,
        AutoencoderKLLTX2Video,
        FlowMatchEulerDiscreteScheduler,
        LTX2Pipeline,
        LTX2VideoTransformer3DModel,
    )
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
