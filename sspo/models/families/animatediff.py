"""AnimateDiff: an SD UNet with motion modules (``UNetMotionModel``) over clip latents ``(B, C, F, H, W)``.

By default only the motion modules train (``model.train_modules: auto``), as AnimateDiff LoRAs
do; a full fine-tune saves them as ``motion_adapter/`` beside the pipeline, which
``MotionAdapter.from_pretrained`` reads alone.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from sspo.models.condition import TextCondition
from sspo.models.families.base import MOTION, ModelFamily, component_class, register
from sspo.models.lora_targets import check_lora_targets


@register
class AnimateDiff(ModelFamily):
    name = "animatediff"
    title = "AnimateDiff"
    video = True

    @classmethod
    def detects(cls, components: Mapping[str, Any]) -> bool:
        # A video UNet, whether or not its motion adapter is listed beside it.
        return "motion_adapter" in components or component_class(components, "unet") == "UNetMotionModel"

    @property
    def longest_clip(self) -> int | None:
        # The motion modules' positional encoding has this many frames.
        return self.denoiser.config.get("motion_max_seq_length")

    def predict(self, denoiser, noisy: torch.Tensor, timesteps: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        # The video UNet takes one text condition per frame, as AnimateDiffPipeline passes it.
        return super().predict(denoiser, noisy, timesteps, cond.repeat_each(noisy.shape[2]))

    def _sample_kwargs(self, latent_size: Sequence[int]) -> dict:
        return {"num_frames": latent_size[0]}

    def _sampled_latents(self, out, latent_size: Sequence[int]) -> torch.Tensor:
        return out.frames

    def lora_targets(self, denoiser, targets: Sequence[str], trained: str) -> list[str] | str:
        if trained != MOTION:
            return super().lora_targets(denoiser, targets, trained)
        check_lora_targets(denoiser, targets, motion_only=True, label=self.denoiser_label)
        return rf".*motion_modules\..*\.({'|'.join(re.escape(t) for t in targets)})"  # the layers inside motion modules only

    def freeze_untrained(self, denoiser, trained: str) -> None:
        if trained == MOTION:
            denoiser.freeze_unet2d_params()

    def full_components(self, denoiser) -> dict:
        # motion_adapter/ as trained: a pipeline's motion_adapter keeps the weights it was loaded with.
        return {**super().full_components(denoiser), "motion_adapter": motion_adapter_of(self.pipe.motion_adapter, denoiser)}


def motion_adapter_of(adapter, unet):
    """A ``MotionAdapter`` like ``adapter`` holding ``unet``'s motion modules as they are now (a
    pipeline's ``motion_adapter`` keeps the weights it was loaded with: training changes the UNet's)."""
    from diffusers import MotionAdapter

    # not the folder it was loaded from: the new adapter's weights are the UNet's
    adapter = MotionAdapter.from_config({key: value for key, value in adapter.config.items() if key != "_name_or_path"})
    state = {key: value for key, value in unet.state_dict().items() if "motion_modules." in key}
    adapter.load_state_dict(state)
    return adapter.to(next(unet.parameters()).dtype)
