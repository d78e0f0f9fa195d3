"""SDXL: two text encoders; the UNet also reads the pooled text embedding and the size/crop time ids."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from sspo.models.condition import TextCondition
from sspo.models.families.base import ModelFamily, component_class, register


@register
class StableDiffusionXL(ModelFamily):
    name = "sdxl"
    title = "SDXL"
    default_guidance_scale = 5.0
    frozen_components = ("vae", "text_encoder", "text_encoder_2")

    @classmethod
    def detects(cls, components: Mapping[str, Any]) -> bool:
        return component_class(components, "unet") == "UNet2DConditionModel" and component_class(components, "text_encoder_2") == "CLIPTextModelWithProjection"

    def condition_kwargs(self, cond: TextCondition) -> dict:
        return {"encoder_hidden_states": cond.embeds, "added_cond_kwargs": {"text_embeds": cond.pooled, "time_ids": cond.time_ids}}

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], device, size: int | None = None,
                       sizes_and_crops: Sequence[Sequence[int]] | None = None) -> TextCondition:
        """SDXL's ``add_time_ids``: for training images, each one's ``sizes_and_crops`` (its original
        size, where it was cropped after resizing, the size it was cropped to), as diffusers' SDXL
        training script sets them; without them "an uncropped ``size`` x ``size`` image", as the
        pipeline's own sampling at that resolution says (default: the model's native resolution)."""
        pipe, prompts = self.pipe, list(prompts)
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
        side = (size or pipe.default_sample_size * pipe.vae_scale_factor,) * 2
        geometry = sizes_and_crops or [(*side, 0, 0, *side)] * len(prompts)
        projection_dim = pipe.text_encoder_2.config.projection_dim
        time_ids = torch.cat([pipe._get_add_time_ids(tuple(g[0:2]), tuple(g[2:4]), tuple(g[4:6]), dtype=embeds.dtype, text_encoder_projection_dim=projection_dim)
                              for g in geometry])
        return TextCondition(embeds, pooled, time_ids.to(device))

    @torch.no_grad()
    def encode_unconditional(self, device, size: int | None = None) -> TextCondition:
        """The empty prompt as SDXL's classifier-free guidance uses it: zeros by default."""
        cond = self.encode_prompts([""], device, size)
        if self.pipe.config.force_zeros_for_empty_prompt:
            return TextCondition(torch.zeros_like(cond.embeds), torch.zeros_like(cond.pooled), cond.time_ids)
        return cond
