"""Stable Diffusion 1.x / 2.x: a UNet over image latents, CLIP text embeddings as its only condition.

The shapes world's tiny pipelines are this family too (stock ``StableDiffusionPipeline`` classes
with small sizes).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sspo.models.families.base import ModelFamily, register


@register
class StableDiffusion(ModelFamily):
    name = "sd"
    title = "SD-1.5"

    @classmethod
    def detects(cls, components: Mapping[str, Any]) -> bool:
        return "unet" in components and "text_encoder_2" not in components and "motion_adapter" not in components and not is_motion_model(components["unet"])


def is_motion_model(denoiser) -> bool:
    """A video UNet (AnimateDiff's ``UNetMotionModel``), whether or not a motion adapter is listed beside it."""
    return type(denoiser).__name__ == "UNetMotionModel"
