"""Evaluation: a prompt set, sampled with fixed seeds, scored by metrics. One config, two runners.

:func:`evaluate_pipeline` scores a pipeline in memory (the demo, ``sspo compare``, the trainer's
validation); :func:`sspo.commands.eval.run_eval` (``sspo eval``) does the same for several models
on disk, resumable, with confidence intervals. Both list their images with :func:`eval_items` and
score them with :func:`score_columns`, from one :class:`EvalConfig`.

Every world (:mod:`sspo.worlds`) is a prompt set named after it (seen combinations, which are in
the alignment data, then held-out ones; ``<world>-validation``: the combinations set aside for
choosing settings) and a metric named after it (the exact reward, with a column per component).
A method that only memorizes its data improves seen prompts, one that generalizes improves both.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from sspo.config import MAX_CLIP_FRAMES, MAX_RESOLUTION, MAX_SEED, setting, validate
from sspo.errors import ModelError, SSPOError
from sspo.evaluation.scorers import PAPER_METRICS, SCORER_CHOICES, build_scorer
from sspo.evaluation.scorers.prompts import PromptItem, load_prompt_set, prompt_set_names
from sspo.worlds import World, find_world, get_world, prompt_set_world

PROMPT_SETS = prompt_set_names()  # the worlds' (registered when sspo loads) and the benchmarks'; or a prompt file
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EvalConfig:
    # A prompt set (a world's, <world> or <world>-validation: shapes, moving-shapes, ...; pickapic_val | hpsv2 | parti) or a prompt file.
    prompts: str = setting("shapes", nonempty=True)
    metrics: tuple[str, ...] = setting((), choices=SCORER_CHOICES)  # scorers; empty: a world's exact evaluator for its prompts, else the paper's four
    seeds: tuple[int, ...] = setting((0, 1), at_least=0, at_most=MAX_SEED, nonempty=True)  # sampler seeds: one image per (prompt, seed)
    steps: int = setting(20, at_least=1)  # sampler steps
    # At most 1: no classifier-free guidance. None: the models' usual by their names (a world's base its world's,
    # else its family's default_guidance_scale); evaluate_pipeline, given no name, takes its pipeline family's.
    guidance_scale: float | None = setting(None, at_least=0)
    batch_size: int = setting(16, at_least=1)  # images per generation batch (a seed fixes its image whatever the batching)
    resolution: int | None = setting(None, at_least=8, at_most=MAX_RESOLUTION, multiple_of=8)  # image side in pixels (a multiple of the VAE's 8); None: the model's native
    frames: int = setting(8, at_least=1, at_most=MAX_CLIP_FRAMES)  # video models: frames per clip
    dtype: str = setting("fp32", choices=DTYPES)  # dtype of the diffusion model's weights: fp32 | fp16 | bf16
    limit: int | None = setting(None, at_least=1)  # at most N prompts per category (quick runs)
    split_seed: int = setting(0, at_least=0, at_most=MAX_SEED)  # a world's prompts: its train/held-out split (must match the training data's)
    prompts_per_split: int = setting(24, at_least=1)  # a world's prompts: prompts per split (seen, held-out)
    prompt_source: str | None = None  # a local copy of a named prompt set (default: its hub dataset)
    scorer_batch_size: int = setting(16, at_least=1)  # images per scorer batch
    grid_prompts: int = setting(8, at_least=1)  # sspo eval: columns of grid.png

    def __post_init__(self) -> None:
        self.metrics, self.seeds = tuple(dict.fromkeys(m.strip() for m in self.metrics if m.strip())), tuple(dict.fromkeys(self.seeds))
        validate(self)

    @property
    def world(self) -> World | None:
        """The world whose prompt set ``prompts`` names, if any."""
        found = prompt_set_world(self.prompts)
        return found[0] if found else None

    @property
    def metric_names(self) -> tuple[str, ...]:
        """A world's exact evaluator for its prompts, the paper's four reward models otherwise."""
        return self.metrics or ((self.world.name,) if self.world else PAPER_METRICS)


@dataclasses.dataclass(frozen=True)
class Item:
    """One image of every model: prompt ``prompt_index`` of the set, sampled with ``seed``."""

    prompt_index: int
    seed: int
    prompt: str
    category: str | None


def select_prompts(cfg: EvalConfig) -> list[tuple[int, PromptItem]]:
    """(index in the full set, prompt) of the set's prompts; ``limit`` keeps the first of every category."""
    items = load_prompt_set(cfg.prompts, cfg.prompt_source, seed=cfg.split_seed, per_split=cfg.prompts_per_split)
    taken: dict[str | None, int] = {}
    selected = []
    for index, item in enumerate(items):
        if cfg.limit is None or taken.get(item.category, 0) < cfg.limit:
            taken[item.category] = taken.get(item.category, 0) + 1
            selected.append((index, item))
    check_metric_prompts(cfg.metric_names, [item.prompt for _, item in selected])
    return selected


def check_metric_prompts(metrics: Sequence[str], prompts: Sequence[str], prompts_key: str = "--prompts") -> None:
    """Refuse prompts a world's metric among ``metrics`` cannot score (it scores its world's prompts
    only); ``prompts_key``: where the user sets the prompts."""
    for world in filter(None, map(find_world, metrics)):
        _check_world_prompts(world, prompts, prompts_key)


def scores_clips(metric: str) -> bool:
    """Whether ``metric`` scores clips (a clip world's exact evaluator); every other metric scores images."""
    world = find_world(metric)
    return world is not None and world.clips


def check_scorers(known: Sequence[str], scorer_paths: Mapping[str, str], scorer_options: Mapping[str, Mapping]) -> None:
    """Refuse weights or options for a metric not ``known``, local weights that are not there, and
    weights or an option other than ``batch_size`` for a world's exact evaluator."""
    for metric in [*scorer_paths, *scorer_options]:
        if metric not in known:
            raise SSPOError(f"scorer weights or options for unknown metric {metric!r}; expected one of {', '.join(known)}")
    for metric, path in scorer_paths.items():
        if find_world(metric) is not None:
            raise SSPOError(f"metric {metric!r} is its world's exact evaluator and loads no weights, got {path!r}; give weights for reward models only")
        if str(path).startswith(("/", ".", "~")) and not Path(path).expanduser().exists():
            raise ModelError(f"weights for metric {metric!r}: no such file or folder: {path}")
    for metric, options in scorer_options.items():
        if find_world(metric) is not None and (other := sorted(set(options) - {"batch_size"})):
            raise SSPOError(f"metric {metric!r} takes no option {other[0]!r}; its only option is batch_size")


def warn_unused_scorer_settings(metrics: Sequence[str], scorer_paths: Mapping[str, object], scorer_options: Mapping[str, Mapping]) -> None:
    """``--scorer-path`` / ``--scorer-option`` of a metric this call does not compute are ignored: say so."""
    unused = [metric for metric in dict.fromkeys([*scorer_paths, *scorer_options]) if metric not in metrics]
    if unused:
        log.warning("--scorer-path / --scorer-option given for %s, which is not among the metrics computed (%s): ignored",
                    ", ".join(unused), ", ".join(metrics))


def load_scorer(metric: str, path: str | None, options: Mapping, device, fix: str):
    """``build_scorer``; weights it cannot load are a ModelError naming the metric and ``fix``, how to
    pass local ones (``{metric}`` is filled in)."""
    try:
        return build_scorer(metric, path, device=device, **options)
    except ModelError as exc:
        raise ModelError(f"metric {metric!r}: {exc} ({fix.format(metric=metric)}; docs/scorers.md lists the files)") from None


def check_scorers_load(metrics: Sequence[str], scorer_paths: Mapping[str, str], scorer_options: Mapping[str, Mapping], fix: str) -> None:
    """Load each reward model of ``metrics`` once on the CPU and let it go: missing or unreachable
    weights are then one line before generating or training, which can take hours, rather than after."""
    for metric in metrics:
        if find_world(metric) is None:
            load_scorer(metric, scorer_paths.get(metric), scorer_options.get(metric, {}), "cpu", fix)


def eval_items(cfg: EvalConfig) -> list[Item]:
    """Every image the evaluation samples, prompt by prompt, seed by seed."""
    return [Item(index, seed, p.prompt, p.category) for index, p in select_prompts(cfg) for seed in cfg.seeds]


def _check_world_prompts(world: World, prompts, prompts_key: str) -> None:
    for prompt in prompts:
        try:
            world.parse_prompt(prompt)
        except SSPOError as exc:
            fix = f"use --prompts {world.name}" if prompts_key == "--prompts" else f"set {prompts_key} to prompts of that world"
            raise SSPOError(f"metric {world.name!r} scores its world's prompts only ({fix}): {exc}") from None


def metric_columns(metric: str) -> tuple[str, ...]:
    """A metric's score columns: its own, then ``<metric>.<part>`` where it has parts (the worlds')."""
    world = find_world(metric)
    return (metric, *(f"{metric}.{part}" for part in world.components if part != "reward")) if world else (metric,)


def score_columns(scorer, metric: str, images: Sequence, prompts: Sequence[str]) -> dict[str, list[float]]:
    """Every column of ``metric`` for (image, prompt) pairs, from one scorer pass."""
    parts = scorer.score_parts(images, prompts)
    return {column: parts[column.partition(".")[2]].tolist() for column in metric_columns(metric)}


def score_images(images: Sequence, prompts: Sequence[str], metrics: Sequence[str], *, device, batch_size: int | None = None,
                 scorer_paths: Mapping[str, str] | None = None, scorer_options: Mapping[str, Mapping] | None = None) -> dict[str, list[float]]:
    """Every column of every metric for (image, prompt) pairs, one scorer in memory at a time; a
    metric's weights from ``scorer_paths`` (default: its published ones), its ``build_scorer`` options from ``scorer_options``."""
    scores: dict[str, list[float]] = {}
    for metric in metrics:
        options = ({"batch_size": batch_size} if batch_size else {}) | dict((scorer_options or {}).get(metric, {}))
        scorer = build_scorer(metric, (scorer_paths or {}).get(metric), device=device, **options)
        scores |= score_columns(scorer, metric, images, prompts)
        del scorer
    return scores


def evaluate_pipeline(pipe, cfg: EvalConfig, device: str | torch.device | None = None) -> tuple[dict, list]:
    """Scores of ``pipe`` on ``cfg``'s prompts: per category the mean of every column over its images, and the images."""
    from sspo.evaluation.sampling import generate
    from sspo.models.families import family_of

    items = eval_items(cfg)
    guidance = family_of(pipe).default_guidance_scale if cfg.guidance_scale is None else cfg.guidance_scale
    images = generate(
        pipe, [i.prompt for i in items], [i.seed for i in items], steps=cfg.steps, guidance_scale=guidance,
        batch_size=cfg.batch_size, size=cfg.resolution, frames=cfg.frames,
    )
    prompts = [i.prompt for i in items]
    scores = score_images(images, prompts, cfg.metric_names, device=device or pipe.device, batch_size=cfg.scorer_batch_size)
    primary = cfg.metric_names[0]
    summary = {}
    for category in dict.fromkeys(i.category for i in items):
        members = [k for k, i in enumerate(items) if i.category == category]
        per_prompt: dict[int, list[float]] = {}
        for k in members:
            per_prompt.setdefault(items[k].prompt_index, []).append(scores[primary][k])
        summary[category or "all"] = {c: float(np.mean([values[k] for k in members])) for c, values in scores.items()} | {
            "n": len(members),
            # The first metric per image, in the fixed order of prompts and seeds, and per prompt (the
            # mean over its seeds): paired CIs between models are over prompts, since one prompt's
            # images are not independent samples.
            "per_image": [scores[primary][k] for k in members],
            "per_prompt": [float(np.mean(values)) for values in per_prompt.values()],
        }
    return summary, images


def evaluate_model(model: str | Path, cfg: EvalConfig, lora: str | Path | None = None, device: str | None = None) -> tuple[dict, list]:
    from sspo.evaluation.sampling import sampling_device
    from sspo.models.pipeline import load_pipeline

    device = device or sampling_device()
    pipe = load_pipeline(model, lora=lora, dtype=DTYPES[cfg.dtype]).to(device)
    return evaluate_pipeline(pipe, cfg, device)


SHOWCASE_PER_CATEGORY = 4  # prompts per category in a grid


def showcase(cfg: EvalConfig, images: Sequence) -> tuple[list, list[str]]:
    """The first seed's images of the first ``SHOWCASE_PER_CATEGORY`` prompts of each category, with captions."""
    items = eval_items(cfg)
    picks = showcase_picks(cfg)
    return [images[k] for k in picks], [f"[{items[k].category}] {items[k].prompt}" for k in picks]


def showcase_picks(cfg: EvalConfig) -> list[int]:
    """The places in ``eval_items(cfg)`` that :func:`showcase` shows."""
    items = eval_items(cfg)
    picks = []
    for category in dict.fromkeys(i.category for i in items):
        picks += [k for k, i in enumerate(items) if i.category == category and i.seed == cfg.seeds[0]][:SHOWCASE_PER_CATEGORY]
    return picks


def showcase_rewards(cfg: EvalConfig, summary: dict) -> list[float]:
    """The first metric of every image :func:`showcase` shows, from ``evaluate_pipeline``'s summary."""
    items = eval_items(cfg)
    per_item = {}
    for category in dict.fromkeys(i.category for i in items):
        members = [k for k, i in enumerate(items) if i.category == category]
        per_item |= dict(zip(members, summary[category or "all"]["per_image"]))
    return [per_item[k] for k in showcase_picks(cfg)]


def table_columns(world: str) -> tuple[str, ...]:
    """A world's results table: its reward, then the components its entry shows."""
    return (world, *(f"{world}.{part}" for part in get_world(world).table_columns))


def reward_gain(scores: dict, baseline: dict) -> dict:
    """Mean gain of the first metric over ``baseline``, with a 95% CI.

    Paired: each prompt's mean over its seeds is compared with the baseline's on the same prompt and
    seeds, so the interval is over prompts, not over two independent means (nor over images, which
    would count a prompt's correlated seeds as independent samples).
    """
    from sspo.evaluation.scorers.stats import mean_ci

    return mean_ci(np.subtract(scores["per_prompt"], baseline["per_prompt"]))


def _interval(stats: dict) -> str:
    return f"{stats['mean']:+.3f} [{stats['ci95_low']:+.3f}, {stats['ci95_high']:+.3f}]"


def format_table(results: dict[str, dict], columns: Sequence[str], baseline: str | None = None, target: tuple[str, float] | None = None) -> str:
    """A markdown table: one row per (model, category) of :func:`evaluate_pipeline` summaries; with
    ``baseline``, each model's gain over it in the first metric; with ``target`` (a name and a value,
    e.g. the training winners' mean reward), each model's first metric minus that value."""
    gain = baseline is not None and baseline in results
    header = list(columns) + ([f"{columns[0]} gain vs {baseline} [95% CI]"] if gain else [])
    header += [f"{columns[0]} - {target[0]} [95% CI]"] if target else []
    lines = ["| model | prompts | " + " | ".join(header) + " |", "|---|---|" + "---|" * len(header)]
    for model, summary in results.items():
        for category, scores in summary.items():
            cells = [f"{scores[c]:.3f}" for c in columns]
            if gain:
                cells.append("" if model == baseline else _interval(reward_gain(scores, results[baseline][category])))
            if target:
                from sspo.evaluation.scorers.stats import mean_ci

                cells.append(_interval(mean_ci(np.subtract(scores["per_prompt"], target[1]))))
            lines.append(f"| {model} | {category} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
