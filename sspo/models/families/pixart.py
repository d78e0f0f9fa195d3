"""PixArt-Sigma and PixArt-Alpha: a DiT (``PixArtTransformer2DModel``) over 2x2 patches of image
latents, trained on SD's epsilon objective with a learned variance (its output is twice the latents'
channels: the noise, then the variance, which sspo does not train); conditioned on T5's token
embeddings and their attention mask, and PixArt-Alpha's 1024 px models on the image's size and
aspect ratio too.

diffusers gives neither PixArt pipeline a LoRA loader nor ``PixArtTransformer2DModel`` peft's
adapter methods. A pipeline bound to this family gets both (:func:`with_mixin`): the
transformer diffusers' ``PeftAdapterMixin`` (``add_adapter``, what the trainer adds LoRA with) and
the pipeline Sana's LoRA loader, whose file layout is this model's too (peft's keys under
``transformer.``). Class names stay as they were, so a folder saved from them is a plain PixArt
one. Outside sspo, peft loads the LoRA file (:meth:`PixArt.lora_loading_code`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from sspo.models.condition import TextCondition
from sspo.models.families.base import LORA_FILE, ModelFamily, component_class, register


@functools.cache
def _mixed(cls: type, mixin: type) -> type:
    """``cls`` with ``mixin`` added, under ``cls``'s own name and module (what save_pretrained records)."""
    return type(cls.__name__, (cls, mixin), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})


def with_mixin(obj, mixin: type):
    """``obj`` made an instance of its class plus ``mixin`` (unchanged if it is one already)."""
    if not isinstance(obj, mixin):
        obj.__class__ = _mixed(type(obj), mixin)
    return obj


def _with_adapters(denoiser):
    from diffusers.loaders.peft import PeftAdapterMixin

    return with_mixin(denoiser, PeftAdapterMixin)


@register
class PixArt(ModelFamily):
    name = "pixart"
    title = "PixArt"
    denoiser_component = "transformer"
    denoiser_label = "transformer"
    default_guidance_scale = 4.5  # the PixArt pipelines' default
    default_sampler = "dpm++"  # the scheduler PixArt models ship
    bench_config = "pixart-lora.yaml"

    def __init__(self, pipe, flow=None):
        super().__init__(pipe, flow)
        if not isinstance(pipe, Mapping):
            from diffusers.loaders.lora_pipeline import SanaLoraLoaderMixin

            with_mixin(pipe, SanaLoraLoaderMixin)
            if pipe.transformer is not None:
                _with_adapters(pipe.transformer)

    @classmethod
    def detects(cls, components: Mapping[str, Any]) -> bool:
        return component_class(components, "transformer") == "PixArtTransformer2DModel"

    @classmethod
    def image_sides(cls, denoiser_config: Mapping[str, Any], vae_scale: int) -> tuple[int, int | None]:
        # Latents are cut into patch_size patches; the sin-cos position embedding is computed for any size.
        return vae_scale * denoiser_config.get("patch_size", 2), None

    @classmethod
    def lora_writer(cls, pipeline_class: type) -> type:
        from diffusers.loaders.lora_pipeline import SanaLoraLoaderMixin

        return SanaLoraLoaderMixin

    def condition_kwargs(self, cond: TextCondition) -> dict:
        return {"encoder_hidden_states": cond.embeds, "encoder_attention_mask": cond.mask}

    def size_condition(self, noisy: torch.Tensor) -> dict:
        """The transformer's ``added_cond_kwargs`` for latents ``noisy``: their image's height and width in
        pixels and its aspect ratio, as the pipeline passes them to a size-conditioned model
        (PixArt-Alpha at 1024 px); None for the others (PixArt-Sigma), which read the keys only."""
        if not self.denoiser.config.get("use_additional_conditions"):
            return {"resolution": None, "aspect_ratio": None}
        height, width = (side * self.pipe.vae_scale_factor for side in noisy.shape[-2:])
        rows = noisy.shape[0]
        return {"resolution": noisy.new_tensor([[height, width]]).repeat(rows, 1), "aspect_ratio": noisy.new_tensor([[height / width]]).repeat(rows, 1)}

    def predict(self, denoiser, noisy: torch.Tensor, timesteps: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        """The predicted noise: the first half of the output channels when the model also predicts its variance."""
        out = denoiser(noisy, timestep=timesteps, **self.condition_kwargs(cond), added_cond_kwargs=self.size_condition(noisy), return_dict=False)[0]
        return out.chunk(2, dim=1)[0] if out.shape[1] == 2 * noisy.shape[1] else out

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], device, size: int | None = None,
                       sizes_and_crops: Sequence[Sequence[int]] | None = None) -> TextCondition:
        """The pipeline's own encoding: T5's token embeddings at its length (Sigma 300, Alpha 120) and their attention mask."""
        embeds, mask, _, _ = self.pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False, device=device, num_images_per_prompt=1,
                                                     clean_caption=False)
        return TextCondition(embeds, mask=mask)

    def _sample_kwargs(self, latent_size: Sequence[int]) -> dict:
        # Sampled at the size asked, not at PixArt's nearest aspect-ratio bin; its negative_prompt
        # defaults to "", which it refuses beside negative embeddings.
        return {"use_resolution_binning": False, "negative_prompt": None}

    @classmethod
    def pipeline_call_kwargs(cls) -> dict:
        # Captions as given: the pipeline's cleaning needs packages sspo does not install and rewrites prompts.
        return {"use_resolution_binning": False, "clean_caption": False}

    def lora_targets(self, denoiser, targets: Sequence[str], trained: str) -> list[str] | str:
        return super().lora_targets(_with_adapters(denoiser), targets, trained)

    @classmethod
    def lora_loading_code(cls, folder: str) -> list[str]:
        """peft's loading of the LoRA file into ``pipe.transformer``: diffusers has no PixArt LoRA loader."""
        path = json.dumps(f"{folder}/{LORA_FILE}", ensure_ascii=False)
        return [
            "import json",
            "from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict",
            "from safetensors import safe_open",
            "",
            "# diffusers has no LoRA loader for PixArt: peft loads the file, whose metadata holds the adapter's config",
            f"with safe_open({path}, \"pt\") as lora:",
            "    config = {key.removeprefix(\"transformer.\"): value for key, value in json.loads(lora.metadata()[\"lora_adapter_metadata\"]).items()}",
            "    weights = {key.removeprefix(\"transformer.\"): lora.get_tensor(key) for key in lora.keys()}",
            "inject_adapter_in_model(LoraConfig.from_peft_type(**config), pipe.transformer)",  # newer peft's keys dropped, with a warning
            "set_peft_model_state_dict(pipe.transformer, weights)",
        ]
