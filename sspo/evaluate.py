"""``sspo eval``: sample the shapes world's evaluation prompts with fixed seeds and score them exactly.

Seen prompts are attribute combinations in the alignment data, held-out ones are not: a method
that only memorizes its data improves seen prompts, one that generalizes improves both.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .config import check
from .io import atomic_write_json
from .models.pipeline import load_pipeline
from .sample import generate
from .worlds import shapes
from .worlds.shapes_eval import evaluate as score_image


@dataclasses.dataclass
class EvalConfig:
    split_seed: int = 0  # the world's train/held-out split (must match the training data's)
    prompts_per_split: int = 24
    seeds: tuple[int, ...] = (0, 1)
    steps: int = 20
    guidance_scale: float = 5.0
    batch_size: int = 48

    def __post_init__(self) -> None:
        check(self.prompts_per_split > 0, "prompts_per_split", "must be positive")
        check(len(self.seeds) > 0, "seeds", "needs at least one seed")


def shapes_eval_items(cfg: EvalConfig) -> list[tuple[str, shapes.ShapeSpec, int]]:
    """(split name, spec, seed) for every image the evaluation generates, in a fixed order."""
    specs = shapes.eval_prompts(shapes.make_split(cfg.split_seed), cfg.prompts_per_split, seed=cfg.split_seed)
    return [(split, spec, seed) for split, items in specs.items() for spec in items for seed in cfg.seeds]


def evaluate_pipeline(pipe, cfg: EvalConfig) -> tuple[dict, list]:
    """Scores of ``pipe`` on the world's evaluation prompts: a summary per split and the images."""
    items = shapes_eval_items(cfg)
    images = generate(
        pipe, [spec.prompt for _, spec, _ in items], [seed for *_, seed in items],
        steps=cfg.steps, guidance_scale=cfg.guidance_scale, batch_size=cfg.batch_size,
    )
    per_split: dict[str, list[dict]] = {}
    for (split, spec, _), image in zip(items, images):
        per_split.setdefault(split, []).append(score_image(image, spec).as_dict())
    # Per-image rewards (fixed order of prompts and seeds) for paired confidence intervals.
    summary = {
        split: {key: float(np.mean([s[key] for s in scores])) for key in scores[0]}
        | {"n": len(scores), "rewards": [s["reward"] for s in scores]}
        for split, scores in per_split.items()
    }
    return summary, images


def evaluate_model(model: str | Path, cfg: EvalConfig, lora: str | Path | None = None, device: str | None = None) -> tuple[dict, list]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(model, lora=lora).to(device)
    return evaluate_pipeline(pipe, cfg)


def showcase(cfg: EvalConfig, images: Sequence, per_split: int = 4) -> tuple[list, list[str]]:
    """The first seed's images of ``per_split`` seen and held-out prompts, with captions."""
    items = shapes_eval_items(cfg)
    n_seeds = len(cfg.seeds)
    block = cfg.prompts_per_split * n_seeds
    picks = [i * n_seeds for i in range(per_split)] + [block + i * n_seeds for i in range(per_split)]
    return [images[i] for i in picks], [f"[{items[i][0]}] {items[i][1].prompt}" for i in picks]


TABLE_COLUMNS = ("reward", "color", "shape", "size", "position", "background", "quality")


def reward_gain(scores: dict, baseline: dict) -> dict:
    """Mean reward gain over ``baseline`` on the same images' prompts and seeds, with a 95% CI.

    Paired: each (prompt, seed) is compared with the baseline's image of the same prompt and seed,
    so the interval is over prompts and seeds, not over two independent means.
    """
    from .scorers.stats import summarize

    return summarize(np.subtract(scores["rewards"], baseline["rewards"]))


def format_table(results: dict[str, dict], columns: Sequence[str] = TABLE_COLUMNS, baseline: str | None = None) -> str:
    """A markdown table: one row per (model, split); with ``baseline``, each model's reward gain over it."""
    gain = baseline is not None and baseline in results
    header = list(columns) + (["reward gain vs " + baseline + " [95% CI]"] if gain else [])
    lines = ["| model | prompts | " + " | ".join(header) + " |", "|---|---|" + "---|" * len(header)]
    for model, summary in results.items():
        for split, scores in summary.items():
            cells = [f"{scores[c]:.3f}" for c in columns]
            if gain:
                if model == baseline:
                    cells.append("")
                else:
                    g = reward_gain(scores, results[baseline][split])
                    cells.append(f"{g['mean']:+.3f} [{g['ci95_low']:+.3f}, {g['ci95_high']:+.3f}]")
            lines.append(f"| {model} | {split} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(results: dict, path: str | Path) -> None:
    atomic_write_json(path, results)
