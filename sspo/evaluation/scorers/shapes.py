"""The worlds' exact evaluators as scorers: their reward, computed from the pixels, no learned model."""

from __future__ import annotations

import numpy as np
import torch

from sspo.errors import SSPOError
from sspo.evaluation.scorers.base import Scorer


class ShapesScorer(Scorer):
    """``sspo.worlds.shapes.evaluator.evaluate_prompt(image, prompt).reward`` (in [0, 1]) for each pair,
    in float64 (the evaluator's own precision); :meth:`score_parts` adds every component."""

    name = "shapes"

    def _score_batch(self, images, prompts):
        return self.score_parts(images, prompts)[""]

    @staticmethod
    def _evaluate(image, prompt: str) -> dict[str, float]:
        from sspo.worlds.shapes.evaluator import evaluate_prompt

        return evaluate_prompt(image, prompt).as_dict()

    def score_parts(self, images, prompts) -> dict[str, torch.Tensor]:
        scores = [self._evaluate(image, prompt) for image, prompt in zip(images, prompts)]
        parts = {name: torch.tensor([s[name] for s in scores], dtype=torch.float64) for name in scores[0]} if scores else {}
        return {"" if name == "reward" else name: values for name, values in parts.items()}

    @classmethod
    def from_pretrained(cls, path_or_id: str | None = None, **kwargs) -> "ShapesScorer":
        if path_or_id is not None:
            raise SSPOError(f"the {cls.name} scorer has no weights to load, got {path_or_id!r}")
        kwargs.pop("dtype", None)  # nothing to cast: the evaluator is numpy analysis of the pixels
        return cls(**kwargs)


class MotionScorer(ShapesScorer):
    """The moving-shapes world's exact temporal evaluator: ``sspo.worlds.moving_shapes.evaluator.evaluate_clip``
    of each clip (``uint8 [F, H, W, 3]``) and prompt, its reward and every component."""

    name = "motion"
    input_type = np.ndarray

    @staticmethod
    def _evaluate(clip, prompt: str) -> dict[str, float]:
        from sspo.worlds.moving_shapes.evaluator import evaluate_clip

        return evaluate_clip(clip, prompt).as_dict()
