"""A world's exact evaluator as a scorer: its reward, computed from the pixels, no learned model."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from sspo.errors import SSPOError
from sspo.evaluation.scorers.base import Scorer
from sspo.worlds import World


class WorldScorer(Scorer):
    """``world.evaluate(sample, prompt)["reward"]`` (in [0, 1]) for each pair, in float64 (the
    evaluators' own precision); :meth:`score_parts` adds every component. Scores images, or clips
    (``uint8 [F, H, W, 3]``) for a world of clips."""

    def __init__(self, world: World, **kwargs):
        super().__init__(**kwargs)
        self.world = world
        self.name = world.name
        self.input_type = np.ndarray if world.clips else Image.Image

    def _score_batch(self, images, prompts):
        return self.score_parts(images, prompts)[""]

    def score_parts(self, images, prompts) -> dict[str, torch.Tensor]:
        scores = [self.world.evaluate(image, prompt) for image, prompt in zip(images, prompts)]
        parts = {name: torch.tensor([s[name] for s in scores], dtype=torch.float64) for name in scores[0]} if scores else {}
        return {"" if name == "reward" else name: values for name, values in parts.items()}

    @classmethod
    def from_pretrained(cls, path_or_id: str | None = None, *, world: World, **kwargs) -> WorldScorer:
        if path_or_id is not None:
            raise SSPOError(f"the {world.name} scorer has no weights to load, got {path_or_id!r}")
        kwargs.pop("dtype", None)  # nothing to cast: the evaluator is numpy analysis of the pixels
        return cls(world, **kwargs)
