"""WanImageToVideoPipeline and WanVACEPipeline on the Wan family's hooks.

What their ``__call__`` does beyond WanPipeline's:

- image to video: the first (and optional last) frame is encoded to conditioning latents concatenated to the
  latents on channels, with the frame mask (Wan 2.1 / 2.2 I2V); with ``expand_timesteps`` (Wan 2.2 TI2V) they
  replace the first latent frame instead, which also gets timestep 0, and the final latents keep it; with an
  image encoder (Wan 2.1) the image's CLIP features join every forward;
- VACE: the control video, mask and reference images are encoded to control latents every forward takes with
  ``conditioning_scale`` per VACE layer; the reference images prepend latent frames, cut off before decoding.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from .base import own_tensor
from .wan import WAN_VALUE_ARGS, WanAdapter, WanRequest


def repeat_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    """``t`` repeated along the batch to ``batch`` samples (branches sharing one forward)."""
    return t if t.shape[0] == batch else torch.cat([t] * (batch // t.shape[0]))


# the variants leave context parallelism off: it is declared and checked for the family's own sequence
class WanImageToVideoAdapter(WanAdapter):
    pipeline_classes = ("WanImageToVideoPipeline",)
    capabilities = replace(WanAdapter.capabilities, context_parallel=False,
                           graph_value_args=WAN_VALUE_ARGS + ("image", "last_image", "image_embeds"))

    def check_inputs(self, a: dict[str, Any]) -> None:
        self.pipe.check_inputs(a["prompt"], a["negative_prompt"], a["image"], a["height"], a["width"],
                               a["prompt_embeds"], a["negative_prompt_embeds"], a["image_embeds"],
                               a["callback_on_step_end_tensor_inputs"], a["guidance_scale_2"])

    def prepare_latents(self, req: WanRequest) -> None:
        pipe, a = self.pipe, req.args
        image_embeds = a["image_embeds"]
        if pipe.transformer is not None and pipe.transformer.config.image_dim is not None:
            if image_embeds is None:
                images = a["image"] if a["last_image"] is None else [a["image"], a["last_image"]]
                image_embeds = pipe.encode_image(images, req.device)
            image_embeds = image_embeds.repeat(req.batch_size, 1, 1).to(req.transformer_dtype)
        req.forward_kwargs["encoder_hidden_states_image"] = image_embeds
        processor = pipe.video_processor
        image = processor.preprocess(a["image"], height=req.height, width=req.width).to(req.device, torch.float32)
        last_image = a["last_image"]
        if last_image is not None:
            last_image = processor.preprocess(last_image, height=req.height, width=req.width).to(req.device,
                                                                                                 torch.float32)
        outputs = pipe.prepare_latents(image, req.batch_size * a["num_videos_per_prompt"], pipe.vae.config.z_dim,
                                       req.height, req.width, req.num_frames, torch.float32, req.device,
                                       a["generator"], a["latents"], last_image)
        if pipe.config.expand_timesteps:
            latents, req.condition, req.frame_mask = outputs
        else:
            latents, req.condition = outputs
        req.latents = own_tensor(latents, a["latents"])

    def model_input(self, req: WanRequest, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        condition = repeat_batch(req.condition, x.shape[0])
        if self.pipe.config.expand_timesteps:
            hidden = ((1 - req.frame_mask) * condition + req.frame_mask * x).to(req.transformer_dtype)
            temp_ts = (req.frame_mask[0][0][:, ::2, ::2] * t).flatten()
            return hidden, temp_ts.unsqueeze(0).expand(x.shape[0], -1)
        return torch.cat([x, condition], dim=1).to(req.transformer_dtype), t.expand(x.shape[0])

    def final_latents(self, req: WanRequest, x: torch.Tensor) -> torch.Tensor:
        if self.pipe.config.expand_timesteps:
            return (1 - req.frame_mask) * req.condition + req.frame_mask * x
        return x


class WanVACEAdapter(WanAdapter):
    pipeline_classes = ("WanVACEPipeline",)
    capabilities = replace(WanAdapter.capabilities, context_parallel=False, graph_value_args=WAN_VALUE_ARGS + (
        "video", "mask", "reference_images", "conditioning_scale"))

    def check_inputs(self, a: dict[str, Any]) -> None:
        self.pipe.check_inputs(a["prompt"], a["negative_prompt"], a["height"], a["width"], a["prompt_embeds"],
                               a["negative_prompt_embeds"], a["callback_on_step_end_tensor_inputs"],
                               video=a["video"], mask=a["mask"], reference_images=a["reference_images"],
                               guidance_scale_2=a["guidance_scale_2"])
        self.conditioning_scale(a, torch.device("cpu"), torch.float32)  # its errors, before any compute

    def fit_size(self, a: dict[str, Any]) -> tuple[int, int, int]:
        # stock rounds the frame count only: check_inputs rejects a size that does not fit the patches
        num_frames, _, _ = super().fit_size({**a, "height": 0, "width": 0})
        return num_frames, a["height"], a["width"]

    def conditioning_scale(self, a: dict[str, Any], device, dtype) -> torch.Tensor:
        """``conditioning_scale`` as one value per VACE layer, as stock converts it in ``__call__``."""
        vace_layers = self._expert_config().vace_layers
        scale = a["conditioning_scale"]
        if isinstance(scale, (int, float)):
            scale = [scale] * len(vace_layers)
        if isinstance(scale, list):
            if len(scale) != len(vace_layers):
                raise ValueError(f"Length of `conditioning_scale` {len(scale)} does not match number of layers "
                                 f"{len(vace_layers)}.")
            scale = torch.tensor(scale)
        if scale.size(0) != len(vace_layers):
            raise ValueError(f"Length of `conditioning_scale` {scale.size(0)} does not match number of layers "
                             f"{len(vace_layers)}.")
        return scale.to(device=device, dtype=dtype)

    def prepare_latents(self, req: WanRequest) -> None:
        pipe, a = self.pipe, req.args
        req.shared_kwargs["control_hidden_states_scale"] = self.conditioning_scale(a, req.device,
                                                                                   req.transformer_dtype)
        video, mask, references = pipe.preprocess_conditions(a["video"], a["mask"], a["reference_images"],
                                                             req.batch_size, req.height, req.width, req.num_frames,
                                                             torch.float32, req.device)
        req.reference_frames = len(references[0])
        conditioning = pipe.prepare_video_latents(video, mask, references, a["generator"], req.device)
        mask = pipe.prepare_masks(mask, references, a["generator"])
        conditioning = torch.cat([conditioning, mask], dim=1).to(req.transformer_dtype)
        req.forward_kwargs["control_hidden_states"] = conditioning
        latents = pipe.prepare_latents(
            req.batch_size * a["num_videos_per_prompt"], self._expert_config().in_channels, req.height, req.width,
            req.num_frames + req.reference_frames * pipe.vae_scale_factor_temporal, torch.float32, req.device,
            a["generator"], a["latents"])
        if conditioning.shape[2] != latents.shape[2]:
            self.module.logger.warning("The number of frames in the conditioning latents does not match the number "
                                       "of frames to be generated. Generation quality may be affected.")
        req.latents = own_tensor(latents, a["latents"])

    def model_input(self, req: WanRequest, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.to(req.transformer_dtype), t.expand(x.shape[0])

    def decode(self, req: WanRequest, x: torch.Tensor, output_type: str):
        return super().decode(req, x[:, :, req.reference_frames:], output_type)
