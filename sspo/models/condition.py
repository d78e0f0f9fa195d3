"""The text condition of a batch: whatever the denoiser needs besides the noisy latents (SDXL adds
pooled embeddings and ``add_time_ids``), computed once and shared by policy, reference and sampler."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch


@dataclasses.dataclass
class TextCondition:
    """Text conditioning of a batch, computed once and shared by policy, reference and sampler."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None  # pooled text embedding: SDXL, SD3, FLUX
    time_ids: torch.Tensor | None = None  # SDXL's size and crop conditioning
    mask: torch.Tensor | None = None  # the text tokens' attention mask: PixArt

    def _map(self, fn) -> TextCondition:
        return dataclasses.replace(self, **{f.name: None if (t := getattr(self, f.name)) is None else fn(t) for f in dataclasses.fields(self)})

    def to(self, device, dtype=None) -> TextCondition:
        return self._map(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() and dtype else t.dtype))

    def __getitem__(self, index) -> TextCondition:
        return self._map(lambda t: t[index])

    def repeat(self, times: int) -> TextCondition:
        return self._map(lambda t: torch.cat([t] * times))

    def repeat_each(self, times: int) -> TextCondition:
        return self._map(lambda t: t.repeat_interleave(times, dim=0))

    def __len__(self) -> int:
        return self.embeds.shape[0]

    @staticmethod
    def cat(conditions: Sequence[TextCondition]) -> TextCondition:
        first = conditions[0]
        fields = [f.name for f in dataclasses.fields(first)]
        return TextCondition(
            **{name: None if getattr(first, name) is None else torch.cat([getattr(c, name) for c in conditions]) for name in fields}
        )

    def pipeline_kwargs(self, negative: TextCondition | None) -> dict:
        """Arguments that make a diffusers pipeline skip its own text encoding."""
        kwargs = {"prompt_embeds": self.embeds}
        if negative is not None:
            kwargs["negative_prompt_embeds"] = negative.embeds
        if self.pooled is not None:
            kwargs["pooled_prompt_embeds"] = self.pooled
            if negative is not None:
                kwargs["negative_pooled_prompt_embeds"] = negative.pooled
        if self.mask is not None:
            kwargs["prompt_attention_mask"] = self.mask
            if negative is not None:
                kwargs["negative_prompt_attention_mask"] = negative.mask
        return kwargs
