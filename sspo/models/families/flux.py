"""FLUX.1 (dev, schnell): an MMDiT transformer over 2x2 patches of 16-channel latents, trained by
flow matching; conditioned on T5's token embeddings and CLIP's pooled embedding, and (FLUX-dev) on
a distilled guidance scale fed to an embedding instead of classifier-free guidance.

Latents stay ``(B, C, H, W)`` everywhere outside this family: :meth:`Flux.predict` packs them into
the transformer's token sequence and unpacks its prediction, as diffusers' FLUX training script
does, so the velocity target and the per-sample errors are those of every other flow family.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from sspo.errors import ModelError
from sspo.models.condition import TextCondition
from sspo.models.families.base import component_class, register
from sspo.models.families.flow import FlowMatchingFamily


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` latents to FLUX's ``(B, H/2 * W/2, 4C)`` sequence of 2x2 patches."""
    from diffusers import FluxPipeline

    batch, channels, height, width = latents.shape
    if height % 2 or width % 2:
        raise ModelError(
            f"FLUX packs 2x2 patches of latents, but these are {height}x{width}; "
            "use a data.resolution that is a multiple of twice the VAE's scale factor (16 for FLUX.1)"
        )
    return FluxPipeline._pack_latents(latents, batch, channels, height, width)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """FLUX's patch sequence back to ``(B, C, height, width)`` latents (sides in latent pixels)."""
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(packed, height, width, vae_scale_factor=1)


@register
class Flux(FlowMatchingFamily):
    name = "flux"
    title = "FLUX.1"
    frozen_components = ("vae", "text_encoder", "text_encoder_2")
    default_guidance_scale = 3.5  # FluxPipeline's default (FLUX-dev's guidance embedding; schnell has none)
    default_beta = 1500.0  # 5000 x the mean (1 - sigma)^2 of uniform draws, 1/3, rounded down
    bench_config = "flux-lora.yaml"
    # FluxPipeline's negative prompt is true CFG (true_cfg_scale), off in its usual call: negatives
    # are sampled with the guidance embedding alone.
    samples_with_negative_prompt = False

    @classmethod
    def image_sides(cls, denoiser_config: Mapping[str, Any], vae_scale: int) -> tuple[int, int | None]:
        return vae_scale * 2, None  # 2x2 patches of latents (pack_latents); rotary positions: no largest side

    @classmethod
    def detects(cls, components: Mapping[str, Any]) -> bool:
        return component_class(components, "transformer") == "FluxTransformer2DModel"

    def condition_kwargs(self, cond: TextCondition) -> dict:
        """T5's token embeddings and CLIP's pooled one; text tokens all have position id 0, as FluxPipeline gives them."""
        text_ids = torch.zeros(cond.embeds.shape[1], 3, device=cond.embeds.device, dtype=cond.embeds.dtype)
        return {"encoder_hidden_states": cond.embeds, "pooled_projections": cond.pooled, "txt_ids": text_ids}

    @classmethod
    def takes_guidance_embedding(cls, denoiser_config: Mapping[str, Any]) -> bool:
        return bool(denoiser_config.get("guidance_embeds"))  # FLUX.1-dev's; schnell has none

    def guidance(self, batch: int, device) -> torch.Tensor | None:
        """FLUX-dev's guidance embedding input in training (``flow.guidance_scale``); None for a model without one."""
        if not self.takes_guidance_embedding(self.denoiser.config):
            return None
        return torch.full((batch,), self.flow.guidance_scale, device=device, dtype=torch.float32)

    def predict(self, denoiser, noisy: torch.Tensor, timesteps: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        """The velocity for ``(B, C, H, W)`` latents: packed in, unpacked out; the transformer is told sigma, as FluxPipeline does."""
        from diffusers import FluxPipeline

        batch, _, height, width = noisy.shape
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, noisy.device, noisy.dtype)
        sigmas = self.sigmas(timesteps, 1).reshape(-1).to(noisy.device)
        packed = denoiser(hidden_states=pack_latents(noisy), timestep=sigmas, img_ids=image_ids, guidance=self.guidance(batch, noisy.device),
                          **self.condition_kwargs(cond), return_dict=False)[0]
        return unpack_latents(packed, height, width)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], device, size: int | None = None,
                       sizes_and_crops: Sequence[Sequence[int]] | None = None) -> TextCondition:
        """The pipeline's own encoding: T5's token embeddings and CLIP's pooled embedding."""
        embeds, pooled, _ = self.pipe.encode_prompt(list(prompts), None, device=device, num_images_per_prompt=1)
        return TextCondition(embeds, pooled)

    def _sampled_latents(self, out, latent_size: Sequence[int]) -> torch.Tensor:
        return unpack_latents(out.images, *latent_size[-2:])
