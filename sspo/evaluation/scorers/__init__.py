"""Preference scorers behind one interface: ``build_scorer(name).score(images, prompts) -> tensor [N]``.

Every scorer loads the published weights (hub id or local path) with this project's transformers;
see docs/scorers.md for the files and state-dict layouts each one expects.
"""

from __future__ import annotations

import importlib
import re

import torch

from sspo.config import Registered
from sspo.errors import SSPOError
from sspo.evaluation.scorers.base import Scorer
from sspo.worlds import WORLDS, find_world

# name -> (module, class, fixed options); modules are imported on use so `import sspo.evaluation.scorers` stays light.
_REGISTRY: dict[str, tuple[str, str, dict]] = {
    "pickscore": ("clip", "PickScoreScorer", {}),
    "hpsv2": ("hps", "HPSv2Scorer", {"version": "hpsv2"}),
    "hpsv21": ("hps", "HPSv2Scorer", {"version": "hpsv21"}),
    "imagereward": ("imagereward", "ImageRewardScorer", {}),
    "aesthetic": ("clip", "AestheticScorer", {}),
    "clip": ("clip", "ClipScoreScorer", {}),
}


SCORER_CHOICES = Registered(WORLDS, *_REGISTRY)  # the reward models, then every registered world's exact evaluator (sspo.worlds)


def scorer_names() -> tuple[str, ...]:
    """Every scorer, the worlds registered since sspo loaded among them."""
    return tuple(SCORER_CHOICES)
# The metrics of the paper's tables, in its column order.
PAPER_METRICS = ("pickscore", "hpsv2", "imagereward", "aesthetic")


def build_scorer(
    name: str,
    path_or_id: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **options,
) -> Scorer:
    """Load scorer ``name`` from ``path_or_id`` (None: its published default).

    ``options`` go to the scorer's ``from_pretrained``: ``batch_size`` for all; ``processor`` for
    pickscore / clip / hpsv2 / hpsv21 (tokenizer, preprocessor and, for HPS, architecture source);
    ``clip_model`` for aesthetic; ``tokenizer`` for imagereward.
    """
    world = find_world(name)
    if world is not None:
        module, cls_name, fixed = "world", "WorldScorer", {"world": world}
    elif name in _REGISTRY:
        module, cls_name, fixed = _REGISTRY[name]
    else:
        raise SSPOError(f"unknown scorer {name!r}; expected one of {', '.join(scorer_names())}")
    cls = getattr(importlib.import_module(f"{__name__}.{module}"), cls_name)
    try:
        return cls.from_pretrained(path_or_id, device=device, dtype=dtype, **fixed, **options)
    except TypeError as exc:
        if (option := re.search(r"unexpected keyword argument '(\w+)'", str(exc))) and option[1] in options:  # not a library's own mistake
            raise SSPOError(f"scorer {name!r} takes no option {option[1]!r}; docs/scorers.md lists each scorer's options") from None
        raise


__all__ = ["Scorer", "build_scorer", "scorer_names", "SCORER_CHOICES", "PAPER_METRICS"]
