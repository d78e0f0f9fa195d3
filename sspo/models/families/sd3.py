"""Stable Diffusion 3 / 3.5: an MMDiT transformer over 16-channel latents, trained by flow matching;
conditioned on two CLIP encoders' and T5's token embeddings and the CLIPs' pooled embeddings."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from sspo.models.condition import TextCondition
from sspo.models.families.base import component_class, register
from sspo.models.families.flow import FlowMatchingFamily


@register
class StableDiffusion3(FlowMatchingFamily):
    name = "sd3"
    title = "SD3"
    frozen_components = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")
    default_guidance_scale = 7.0  # StableDiffusion3Pipeline's default
    default_beta = 500.0  # 5000 x the mean (1 - sigma)^2 of its logit-normal draws with shift 3, ~0.11
    bench_config = "sd35-lora.yaml"

    @classmethod
    def detects(cls, components: Mapping[str, Any]) -> bool:
        return component_class(components, "transformer") == "SD3Transformer2DModel"

    @classmethod
    def image_sides(cls, denoiser_config: Mapping[str, Any], vae_scale: int) -> tuple[int, int | None]:
        # Latents are cut into patch_size patches, whose positions a table of pos_embed_max_size^2 embeds.
        patch, table = denoiser_config.get("patch_size", 2), denoiser_config.get("pos_embed_max_size")
        return vae_scale * patch, table * patch * vae_scale if table else None

    def condition_kwargs(self, cond: TextCondition) -> dict:
        return {"encoder_hidden_states": cond.embeds, "pooled_projections": cond.pooled}

    def predict(self, denoiser, noisy: torch.Tensor, timesteps: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        return denoiser(hidden_states=noisy, timestep=timesteps, **self.condition_kwargs(cond)).sample

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], device, size: int | None = None,
                       sizes_and_crops: Sequence[Sequence[int]] | None = None) -> TextCondition:
        """The pipeline's own encoding (T5's embeddings are zeros in a pipeline saved without T5, as SD3 allows)."""
        prompts = list(prompts)
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, None, None, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
        return TextCondition(embeds, pooled)
