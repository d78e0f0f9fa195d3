"""``sspo eval --videos``: folders of generated clips, one per model, scored with the paper's video metrics.

Every (prompt, seed) of the prompt set (``--prompts``, ``--seeds``, ``--limit`` as for images)
must have its clip ``<prompt_index>-<seed>.<ext>`` in each folder (the names ``sspo eval`` gives
its images); fid, fvd and psnr also need the prompt's reference clip ``<prompt_index>.<ext>`` in
the reference folder. Clips are read with :func:`sspo.video_io.read_clip`: video files,
multi-frame images or frame folders. Written under ``out``::

    video_scores.csv     one row per generated clip: its per-clip metrics (psnr, mtscore, chscore);
                         the rows of models, seeds or prompt sets this call does not score stay
    video_summary.json   per model x category x metric: value, 95% interval and n
    video_summary.md     the table
    video_hist.png       the per-clip metrics' distributions, one histogram per model

Statistics. Per-clip metrics: each prompt's score is the mean over its seeds, then the mean and
Student-t 95% interval over prompts, as for images. FID and FVD are one distance between two sets
of features, the generated clips' and the references', over the group's prompts; their interval is
a percentile bootstrap over prompts (the same resampled prompt sets for every model).
Backbones are loaded one at a time; everything this call asks for is recomputed on each run, and
the summary holds this call's models only.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from sspo.commands.eval import (
    ALL,
    OUTPUTS,
    ModelSpec,
    check_models,
    free_memory,
    json_safe,
    metric_tables,
    parse_scorer_options,
    plot_reward_hist,
    read_scores,
    recorded_otherwise,
    row_key,
    samples_line,
    stats_by_category,
    write_scores,
)
from sspo.config import Allowed
from sspo.errors import DataError, ModelError, SSPOError
from sspo.evaluation.evaluate import PROMPT_SETS, EvalConfig, select_prompts, warn_unused_scorer_settings
from sspo.evaluation.scorers.prompts import PromptItem
from sspo.evaluation.video_metrics import BACKBONES, VIDEO_METRICS, build_video_metric, check_option_value, check_options, frechet_distance
from sspo.io import atomic_write_json, atomic_write_text, check_output_folder, claimed_output_folder, read_json
from sspo.video_io import read_clip

log = logging.getLogger(__name__)

DISTANCE_METRICS = ("fid", "fvd")  # one number for a whole set of clips; lower is better
REFERENCE_METRICS = ("fid", "psnr", "fvd")
BOOTSTRAP = 200  # default replicates of the FID / FVD interval (option <metric>.bootstrap; 0: none)
_GENERATED, _REFERENCE = re.compile(r"(\d+)-(\d+)"), re.compile(r"(\d+)")


def find_clips(folder: str | Path, reference: bool = False) -> dict[tuple[int, ...], Path]:
    """The clips in ``folder`` by key: ``(prompt_index, seed)`` from names ``<prompt_index>-<seed>.<ext>``,
    or for ``reference`` clips ``(prompt_index,)`` from ``<prompt_index>.<ext>``. Files and folders
    (frame folders) count; other names are ignored. An empty or missing folder is a DataError."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"clip folder {folder} does not exist")
    pattern, example = (_REFERENCE, "0.tiff (prompt 0)") if reference else (_GENERATED, "0-0.tiff (prompt 0, seed 0)")
    clips: dict[tuple[int, ...], Path] = {}
    for entry in sorted(folder.iterdir()):
        match = pattern.fullmatch(entry.name.split(".", 1)[0])
        if match is None:
            continue
        key = tuple(int(g) for g in match.groups())
        if key in clips:
            raise DataError(f"{folder}: two clips for the same name: {clips[key].name} and {entry.name}")
        clips[key] = entry
    if not clips:
        raise DataError(f"no clips in {folder}: expected files named like {example}, in a form sspo.video_io.read_clip reads")
    return clips


def _check_recorded_prompts(folder: Path, prompts: Mapping[int, PromptItem]) -> None:
    """A clip folder ``sspo eval`` wrote records each index's prompt in ``manifest.json``: clips of
    other prompts (another prompt set, or another --prompts-per-split) are refused, never scored
    against these."""
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return
    recorded = read_json(manifest, what="the clips' manifest", shape={"prompts": {str: str}},
                         fix="it records the prompt of each clip sspo eval made; delete it if the clips are not sspo eval's")["prompts"]
    if other := recorded_otherwise(recorded, [(index, item.prompt) for index, item in prompts.items()]):
        index, old, prompt = other
        raise DataError(f"{folder}: clip {index} was generated for {old!r}, not {prompt!r}; "
                        "pass the --prompts and --prompts-per-split (or --limit) the clips were made with")


def run_video_eval(
    models: Sequence[ModelSpec],
    cfg: EvalConfig,
    out: str | Path,
    *,
    metrics: Sequence[str] = VIDEO_METRICS,
    reference: str | Path | None = None,
    scorer_paths: Mapping[str, str | Path | Callable] | None = None,
    scorer_options: Mapping[str, Mapping] | None = None,
    device: str | None = None,
) -> dict:
    """Score every model's clips (``ModelSpec.path``: its clip folder) with ``metrics``; write and return the summary.

    ``scorer_paths``: per metric, its backbone file (:data:`sspo.evaluation.video_metrics.BACKBONES`) or loaded module;
    ``scorer_options``: per metric, :func:`~sspo.evaluation.video_metrics.build_video_metric` options and ``bootstrap``.
    """
    out = Path(out)
    check_output_folder(out, "--out", "eval", OUTPUTS)  # before the clips are scored
    check_models(models)
    metrics = tuple(dict.fromkeys(m.strip() for m in metrics if m.strip()))
    scorer_paths = dict(scorer_paths or {})
    options = {m: parse_scorer_options(o) for m, o in (scorer_options or {}).items()}
    _check_arguments(metrics, scorer_paths, options, reference)
    warn_unused_scorer_settings(metrics, scorer_paths, options)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")  # not Apple's MPS: the Fréchet distances' algebra is float64

    set_name = cfg.prompts if cfg.prompts in PROMPT_SETS else Path(cfg.prompts).name
    selected = select_prompts(cfg)
    prompts = {index: item for index, item in selected}
    for m in models:
        _check_recorded_prompts(Path(m.path).expanduser(), prompts)
    generated = {m.name: _pick(find_clips(m.path), [(i, s) for i in prompts for s in cfg.seeds], m.path) for m in models}
    references = _pick(find_clips(reference, reference=True), [(i,) for i in prompts], reference) if reference else {}

    rows = [
        {"model": m.name, "prompt_set": set_name, "category": prompts[i].category or "", "prompt_index": i, "seed": s, "prompt": prompts[i].prompt}
        for m in models for i in prompts for s in cfg.seeds
    ]
    distances: dict[str, dict] = {}
    for metric in metrics:
        metric_options = dict(options.get(metric, {}))
        replicates = metric_options.pop("bootstrap", BOOTSTRAP) if metric in DISTANCE_METRICS else 0
        try:
            measure = build_video_metric(metric, scorer_paths.get(metric), device=device, **{"batch_size": cfg.scorer_batch_size} | metric_options)
        except ModelError as exc:
            raise ModelError(f"{exc} (pass it with --scorer-path {metric}=PATH; docs/video-metrics.md)") from None
        if metric in DISTANCE_METRICS:
            distances[metric] = _distance_results(metric, measure, models, generated, references, rows, replicates, device)
        else:
            _score_rows(metric, measure, generated, references, rows)
        del measure
        free_memory()

    per_clip = [m for m in metrics if m not in DISTANCE_METRICS]
    results = stats_by_category(rows, models, per_clip)
    for metric, by_model in distances.items():
        for model, groups in by_model.items():
            for group, stats in groups.items():
                results[model][group][metric] = stats
    results = {model: {group: {m: columns[m] for m in metrics} for group, columns in groups.items()} for model, groups in results.items()}

    summary = {
        "prompt_set": set_name,
        "prompt_source": cfg.prompt_source,
        "n_prompts": len(prompts),
        "seeds": list(cfg.seeds),
        "metrics": list(metrics),
        "columns": list(metrics),
        "reference": str(reference) if reference else None,
        "backbones": {m: {"path": _described(scorer_paths.get(m)), "options": {k: str(v) for k, v in sorted(options.get(m, {}).items())}} for m in metrics},
        "models": [dataclasses.asdict(m) for m in models],
        "statistic": "psnr, mtscore, chscore: mean over prompts of each prompt's mean over seeds, Student-t 95% CI over prompts; "
        "fid, fvd: the distance over all of the group's clips, 95% percentile bootstrap interval over prompts",
        "results": results,
    }
    with claimed_output_folder(out, "--out", "eval", OUTPUTS):
        old_columns, kept = read_scores(out / "video_scores.csv")
        for row in rows:
            kept.pop(row_key(row), None)
        write_scores(out / "video_scores.csv", [*rows, *kept.values()], [*per_clip, *old_columns])
        atomic_write_json(out / "video_summary.json", json_safe(summary))
        atomic_write_text(out / "video_summary.md", format_video_summary(summary))
        if per_clip:
            plot_reward_hist(rows, models, per_clip, out / "video_hist.png")
    return summary


def _check_arguments(metrics: Sequence[str], paths: Mapping[str, str], options: Mapping[str, Mapping], reference) -> None:
    """Every problem with the arguments, before any clip is read or backbone loaded."""
    if not metrics:
        raise SSPOError(f"no metrics: pass some of {','.join(VIDEO_METRICS)}")
    for metric in [*metrics, *paths, *options]:
        if metric not in VIDEO_METRICS:
            raise SSPOError(f"unknown video metric {metric!r}; expected some of {', '.join(VIDEO_METRICS)}")
    for metric in metrics:
        path = paths.get(metric)
        if metric in BACKBONES and path is None:
            raise ModelError(f"metric {metric!r} needs {BACKBONES[metric]}: pass --scorer-path {metric}=PATH (docs/video-metrics.md)")
        if isinstance(path, (str, Path)) and path != "pixels" and not Path(path).expanduser().is_file():
            raise ModelError(f"metric {metric!r}: no such file: {path} (set --scorer-path {metric}=PATH)")
    for metric, metric_options in options.items():
        metric_options = dict(metric_options)
        if metric in DISTANCE_METRICS and "bootstrap" in metric_options:
            check_option_value(metric, "bootstrap", metric_options.pop("bootstrap"), int, Allowed(at_least=0))
        check_options(metric, metric_options)
    needing = [m for m in metrics if m in REFERENCE_METRICS]
    if needing and reference is None:
        raise SSPOError(f"{', '.join(needing)} need{'s' if len(needing) == 1 else ''} reference clips: pass --reference-videos DIR (clips named <prompt_index>.<ext>)")


def _described(backbone) -> str | None:
    """A backbone as the summary records it: its path, or the type of a module passed in."""
    if isinstance(backbone, (str, Path)):
        return str(backbone)
    return None if backbone is None else type(backbone).__name__


def _pick(clips: dict[tuple[int, ...], Path], keys: Sequence[tuple[int, ...]], folder) -> dict[tuple[int, ...], Path]:
    """The clips of ``keys``; a missing one is an error naming it."""
    missing = [k for k in keys if k not in clips]
    if missing:
        names = ", ".join("-".join(map(str, k)) for k in missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise DataError(f"{folder} lacks {len(missing)} of the {len(keys)} clips the prompts and seeds ask for: {names}")
    return {k: clips[k] for k in keys}


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="clip")


def _score_rows(metric: str, measure, generated: dict, references: dict, rows: list[dict]) -> None:
    """Fill ``rows[metric]`` with the per-clip metric of each generated clip, prompt by prompt (each reference read once)."""
    with _progress(len(rows), f"score {metric}") as bar:
        for index in dict.fromkeys(r["prompt_index"] for r in rows):
            reference = read_clip(references[(index,)]) if metric in REFERENCE_METRICS else None
            for row in (r for r in rows if r["prompt_index"] == index):
                row[metric] = float(_measured(measure, generated[row["model"]][(index, row["seed"])], reference))
                bar.update()


def _measured(measure, path, *args):
    """``measure`` of the clip at ``path``; a clip it cannot measure (too few frames) is named."""
    clip = read_clip(path)
    try:
        return measure(clip, *args)
    except SSPOError as exc:
        raise SSPOError(f"clip {path}: {exc}") from None


def _distance_results(metric: str, measure, models: Sequence[ModelSpec], generated: dict, references: dict, rows: list[dict], replicates: int, device) -> dict:
    """``{model: {group: stats}}`` of a distance metric: features of every clip, then a distance per group."""
    with _progress(len(references) + len(rows), f"score {metric}") as bar:
        reference = {}
        for (index,), path in references.items():
            reference[index] = _measured(measure, path)
            bar.update()
        features: dict[str, dict[int, list[np.ndarray]]] = {m.name: {} for m in models}
        for row in rows:
            path = generated[row["model"]][(row["prompt_index"], row["seed"])]
            features[row["model"]].setdefault(row["prompt_index"], []).append(_measured(measure, path))
            bar.update()
    groups = {ALL: list(reference)}
    for row in rows:
        if row["category"]:
            groups.setdefault(row["category"], {})[row["prompt_index"]] = None  # an ordered set
    return {m.name: {g: distance_stats(features[m.name], reference, list(prompts), replicates, device) for g, prompts in groups.items()} for m in models}


def distance_stats(
    generated: Mapping[int, Sequence[np.ndarray]], reference: Mapping[int, np.ndarray], prompts: Sequence[int], replicates: int = BOOTSTRAP,
    device: str | torch.device | None = None,
) -> dict:
    """The Fréchet distance between the generated features (every clip of ``prompts``) and the
    reference features of the same prompts, with a 95% percentile bootstrap interval over prompts.

    Prompts, not clips, are resampled: a prompt's clips are not independent samples. The bootstrap
    draws are seeded, so every model gets the same resampled prompt sets. A set with fewer than 2
    feature rows has no distance (NaN), and draws without one are left out of the interval. The
    linear algebra runs on ``device`` (a GPU makes 2048-d Inception bootstraps fast).
    """

    def distance(sample) -> float:
        gen = np.concatenate([f for p in sample for f in generated[p]])
        ref = np.concatenate([reference[p] for p in sample])
        return frechet_distance(gen, ref, device) if min(len(gen), len(ref)) >= 2 else math.nan

    point = distance(prompts)
    if math.isnan(point):
        log.warning("a distance over %d prompt(s) has fewer than 2 clips (or frames) on a side: reported as NaN", len(prompts))
    low = high = math.nan
    if replicates and len(prompts) > 1:
        rng = np.random.default_rng(0)
        draws = [distance(rng.choice(prompts, size=len(prompts))) for _ in range(replicates)]
        finite = [d for d in draws if math.isfinite(d)]
        if finite:
            low, high = (float(q) for q in np.percentile(finite, [2.5, 97.5]))
    return {"mean": point, "ci95_low": low, "ci95_high": high, "n": len(prompts)}


def format_video_summary(summary: dict) -> str:
    """Markdown: one table per category, models x metrics; bold: the best (lowest FID / FVD, highest otherwise)."""
    results, metrics = summary["results"], summary["columns"]
    lines = [
        f"# Video evaluation on {summary['prompt_set']}",
        "",
        f"{samples_line(summary)}. "
        "psnr, mtscore, chscore: mean ± 95% CI half-width over prompts (each prompt averaged over its seeds); "
        "fid, fvd: the distance over all clips [95% bootstrap interval over prompts]. Bold: best.",
    ]
    headers = [f"{m} {'↓' if m in DISTANCE_METRICS else '↑'}" for m in metrics]
    lines += metric_tables(results, metrics, headers, DISTANCE_METRICS, {m: _distance_cell for m in DISTANCE_METRICS})
    lines += ["", "## Clips", "", "| name | folder |", "|---|---|"]
    lines += [f"| {m['name']} | {m['path']} |" for m in summary["models"]]
    if summary["reference"]:
        lines.append(f"| reference | {summary['reference']} |")
    return "\n".join(lines) + "\n"


def _distance_cell(stats: dict, best: bool) -> str:
    low, high = stats["ci95_low"], stats["ci95_high"]
    text = f"{stats['mean']:.3f}"
    if low is not None and high is not None and math.isfinite(low) and math.isfinite(high):
        text += f" [{low:.3f}, {high:.3f}]"
    return f"**{text}**" if best else text
