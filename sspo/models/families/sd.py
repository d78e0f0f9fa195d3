"""Stable Diffusion 1.x / 2.x: a UNet over image latents, CLIP text embeddings as its only condition.

The shapes world's tiny pipelines are this family too (stock ``StableDiffusionPipeline`` classes
with small sizes).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sspo.models.families.base import ModelFamily, component_class, register


@register
class StableDiffusion(ModelFamily):
    name = "sd"
    title = "SD-1.5"

    @classmethod
    def detects(cls, components: Mapping[str, Any]) -> bool:
        return (component_class(components, "unet") == "UNet2DConditionModel" and component_class(components, "text_encoder") == "CLIPTextModel"
                and "text_encoder_2" not in components and "motion_adapter" not in components)
