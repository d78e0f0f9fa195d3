"""The shapes world's exact evaluator as a scorer: its reward, computed from the pixels, no learned model."""

from __future__ import annotations

import torch

from ..errors import SSPOError
from .base import Scorer


class ShapesScorer(Scorer):
    """``sspo.worlds.shapes_eval.evaluate_prompt(image, prompt).reward`` (in [0, 1]) for each pair."""

    name = "shapes"

    def _score_batch(self, images, prompts):
        from ..worlds.shapes_eval import evaluate_prompt

        return torch.tensor([evaluate_prompt(image, prompt).reward for image, prompt in zip(images, prompts)])

    @classmethod
    def from_pretrained(cls, path_or_id: str | None = None, **kwargs) -> "ShapesScorer":
        if path_or_id is not None:
            raise SSPOError(f"the shapes scorer has no weights to load, got {path_or_id!r}")
        kwargs.pop("dtype", None)  # nothing to cast: the evaluator is numpy analysis of the pixels
        return cls(**kwargs)
