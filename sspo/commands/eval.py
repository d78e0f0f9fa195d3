"""``sspo eval``: models x prompt set x seeds -> images -> metrics -> Table 1, on disk and resumable.

:func:`run_eval` generates one image per (model, prompt, seed) of :func:`sspo.evaluation.evaluate.eval_items`,
scores every image with every metric (a :func:`sspo.evaluation.scorers.build_scorer` name; the ``shapes``
metric adds a column per component) and writes, under ``out``::

    images/<model>/<prompt_index>-<seed>.png   every sample, written atomically; regenerated only when
                                               missing or damaged (.tiff for a video model: the clip's
                                               frames, lossless)
    images/<model>/manifest.json               the generation settings and the prompt of every index
    scores.csv                                 one row per image, one column per metric column: this
                                               call's images first, then every other row it held
    scorers.json                               the weights behind each metric column's scores
    summary.json, summary.md                   mean and 95% CI per model x category x metric, of this
                                               call's models, prompts and seeds
    reward_hist.png                            one panel per metric, one histogram per model (this call's)
    grid.png                                   rows = models, columns = the first prompts (first seed;
                                               a clip's middle frame)
    sspo-eval.json                             marks the folder as sspo eval's: any other folder that
                                               holds files is refused as --out

Everything is resumable and a re-run adds to the folder: images on disk are kept (a folder made
with other settings is an error, not silently mixed), and scores in ``scores.csv`` are reused while
the scorer's weights and the image's prompt are unchanged. Rows of models, seeds or prompt sets
this call does not ask for stay in ``scores.csv`` as they were. A damaged image is generated
again and a damaged score computed again, with a warning naming the file. Scorers are loaded one
at a time and each scores every model's images, so only one reward model is in memory.

Statistics: each prompt's score is the mean over its seeds; the mean and Student-t 95% interval
are over prompts (seeds of one prompt are not independent samples).
"""

from __future__ import annotations

import csv
import dataclasses
import gc
import hashlib
import io
import json
import logging
import math
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sspo.errors import DataError, SSPOError
from sspo.evaluation.evaluate import (
    DTYPES,
    PROMPT_SETS,
    EvalConfig,
    Item,
    check_scorers,
    check_scorers_load,
    load_scorer,
    metric_columns,
    score_columns,
    scores_clips,
    select_prompts,
    warn_unused_scorer_settings,
)
from sspo.evaluation.sampling import generate, image_grid, sampling_device, save_image
from sspo.evaluation.scorers import scorer_names
from sspo.evaluation.scorers.prompts import PromptItem
from sspo.evaluation.scorers.stats import mean_ci
from sspo.io import DamagedFileError, atomic_path, atomic_write_json, atomic_write_text, check_image, claimed_output_folder, file_stats, read_json, remove_temporaries
from sspo.models.pipeline import lora_location
from sspo.video_io import decode_clip, write_clip
from sspo.worlds.names import shared_guidance_scale

log = logging.getLogger(__name__)

ALL = "all"  # the summary group holding every prompt
# What sspo eval writes into --out, with or without --videos (sspo/commands/eval_videos.py).
OUTPUTS = ("images", "scores.csv", "scorers.json", "summary.json", "summary.md", "reward_hist.png", "grid.png",
           "video_scores.csv", "video_summary.json", "video_summary.md", "video_hist.png")
KEY_COLUMNS = ("model", "prompt_set", "category", "prompt_index", "seed", "prompt")
SCORE_CHUNK = 256  # images read from disk at a time while scoring
SCORER_FIX = "pass local weights with --scorer-path {metric}=PATH"  # a reward model that cannot load


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A row of the table: a diffusers folder or hub id, optionally with LoRA weights."""

    name: str
    path: str
    lora: str | None = None

    @property
    def folder(self) -> str:
        """The name made safe as a folder name."""
        return re.sub(r"[^A-Za-z0-9._+-]+", "_", self.name).strip("._") or "model"


def model_specs(models: Sequence[str], loras: Sequence[str] | None = None, names: Sequence[str] | None = None, models_flag: str = "--model") -> list[ModelSpec]:
    """Pair ``--model`` / ``--lora`` / ``--name`` values; a LoRA of ``none`` or ``-`` means the bare model.

    Default names are the model argument (plus `` + <lora>``); they must be unique. ``models_flag``:
    the flag that gave ``models`` (``--videos`` for clip folders).
    """
    loras, names = list(loras or []), list(names or [])
    for flag, values in (("--lora", loras), ("--name", names)):
        if values and len(values) != len(models):
            raise SSPOError(
                f"{len(models)} {models_flag} but {len(values)} {flag}: give one {flag} per {models_flag}, in the same order"
                + (" (--lora none for a model without one)" if flag == "--lora" else "")
            )
    specs = []
    for i, model in enumerate(models):
        lora = loras[i] if loras else None
        lora = None if lora in (None, "", "none", "-") else str(lora_location(lora))
        name = names[i] if names else model + (f" + {lora}" if lora else "")
        specs.append(ModelSpec(name, model, lora))
    check_models(specs)
    return specs


def _metric_media_error(metric: str, model: str, clips: bool) -> SSPOError:
    if clips:
        return SSPOError(f"metric {metric!r} scores images, but model {model!r} makes clips: score them with --metrics moving-shapes "
                         "(the moving-shapes world's exact evaluator), or save them and score with --videos DIR (the paper's video metrics)")
    return SSPOError(f"metric {metric!r} scores clips, but model {model!r} makes images: pick an image metric (--metrics shapes, pickscore, ...)")


def check_metrics_fit(model: ModelSpec, metrics: Sequence[str]) -> None:
    """Each metric scores what a model folder makes (images or clips), before anything is generated."""
    from sspo.models.families import family_of
    from sspo.models.pipeline import load_pipeline_config

    if not (Path(model.path).expanduser() / "model_index.json").is_file():
        return  # a hub model: checked when its samples are scored
    clips = family_of(load_pipeline_config(model.path)).video
    for metric in metrics:
        if scores_clips(metric) != clips:
            raise _metric_media_error(metric, model.name, clips)


def check_models(models: Sequence[ModelSpec]) -> None:
    if not models:
        raise SSPOError("no models to evaluate: pass at least one --model")
    for attr, what in (("name", "name"), ("folder", "folder name")):
        values = [getattr(m, attr) for m in models]
        dupes = sorted({v for v in values if values.count(v) > 1})
        if dupes:
            raise SSPOError(f"two models share the {what} {dupes[0]!r}; give each --model its own --name")


def sample_path(out: Path, model: ModelSpec, item: Item) -> Path:
    """Where ``item``'s sample lies: ``.png`` for an image, ``.tiff`` (every frame, lossless) for a
    video model's clip; the ``.png`` name while neither exists."""
    png = out / "images" / model.folder / f"{item.prompt_index}-{item.seed}.png"
    clip = png.with_suffix(".tiff")
    return clip if clip.is_file() else png


def _save_sample(sample, png: Path) -> None:
    if isinstance(sample, np.ndarray):  # a clip, uint8 [F, H, W, 3]
        write_clip(png.with_suffix(".tiff"), sample)
    else:
        save_image(sample, png)


_AGAIN = "delete it and run sspo eval again to generate it again"


def _load_sample(path: Path):
    try:
        if path.suffix == ".tiff":
            return decode_clip(path)
        with Image.open(path) as im:
            return im.convert("RGB")
    except (DataError, OSError, SyntaxError, ValueError) as exc:
        raise DamagedFileError(f"sample {path} is damaged ({str(exc).splitlines()[0]})", _AGAIN) from None


def _sample_damage(path: Path) -> str | None:
    """Why the sample file at ``path`` cannot be read back, or None (also when there is none yet)."""
    if not path.is_file():
        return None
    try:
        if path.suffix == ".tiff":
            _load_sample(path)
        else:
            check_image(path, what="sample", fix=_AGAIN)
    except DamagedFileError as exc:
        return exc.problem
    return None


def run_eval(
    models: Sequence[ModelSpec],
    cfg: EvalConfig,
    out: str | Path,
    *,
    scorer_paths: Mapping[str, str] | None = None,
    scorer_options: Mapping[str, Mapping] | None = None,
    device: str | None = None,
) -> dict:
    """Generate (what is missing), score (what is not cached) and write every output; returns the summary.

    ``scorer_paths`` / ``scorer_options``: per metric, the weights and ``build_scorer`` options.
    """
    out = Path(out)
    check_models(models)
    if cfg.guidance_scale is None:
        cfg = dataclasses.replace(cfg, guidance_scale=shared_guidance_scale([m.path for m in models]))
    metrics = cfg.metric_names
    scorer_paths, scorer_options = dict(scorer_paths or {}), {k: dict(v) for k, v in (scorer_options or {}).items()}
    check_scorers(scorer_names(), scorer_paths, scorer_options)
    warn_unused_scorer_settings(metrics, scorer_paths, scorer_options)
    device = device or sampling_device()

    set_name = cfg.prompts if cfg.prompts in PROMPT_SETS else Path(cfg.prompts).name
    try:
        selected = select_prompts(cfg)
    except DataError as exc:
        hint = " (CLI: --prompt-source PATH)" if cfg.prompts in PROMPT_SETS and cfg.world is None and cfg.prompt_source is None else ""
        raise DataError(f"{exc}{hint}") from None
    items = [Item(index, seed, p.prompt, p.category) for index, p in selected for seed in cfg.seeds]

    settings = {
        "prompt_set": set_name, "steps": cfg.steps, "guidance_scale": cfg.guidance_scale, "resolution": cfg.resolution,
        "dtype": str(DTYPES[cfg.dtype]).removeprefix("torch."), "device": torch.device(device).type, "frames": cfg.frames,
    }
    from sspo.models.pipeline import check_lora_path

    for model in models:  # before any folder is made
        if model.lora:
            check_lora_path(Path(model.lora).expanduser())
        check_metrics_fit(model, metrics)
    with claimed_output_folder(out, "--out", "eval", OUTPUTS):
        remove_temporaries(out)  # a killed eval's half-written files (the folder is held)
        plans = [missing_samples(model, items, out, settings) for model in models]  # every manifest checked before anything is generated
        if any(plan.todo for plan in plans):  # new images need every metric: a scorer that cannot load is found now, not after generating
            check_scorers_load(metrics, scorer_paths, {m: parse_scorer_options(o) for m, o in scorer_options.items()}, SCORER_FIX)
        generated = set()
        for plan in sorted(plans, key=lambda plan: plan.model.lora is None):  # a LoRA that does not fit its base is refused at load: before the base's images
            generate_missing(plan, len(items), settings, batch_size=cfg.batch_size, device=device, dtype=DTYPES[cfg.dtype])
            generated |= {(plan.model.name, item.prompt_index, item.seed) for item in plan.todo}

        identities = {m: {"path": scorer_paths.get(m), "options": {k: str(v) for k, v in sorted(scorer_options.get(m, {}).items())}} for m in metrics}
        rows = score_all(models, items, set_name, metrics, out, identities, scorer_batch_size=cfg.scorer_batch_size, device=device, generated=generated)
        columns = [c for m in metrics for c in metric_columns(m)]

        summary = {
            "prompt_set": set_name,
            "prompt_source": cfg.prompt_source,
            "n_prompts": len(selected),
            "seeds": list(cfg.seeds),
            "metrics": list(metrics),
            "columns": columns,
            "settings": settings | {"limit": cfg.limit} | ({"split_seed": cfg.split_seed, "prompts_per_split": cfg.prompts_per_split} if cfg.world is not None else {}),
            "models": [dataclasses.asdict(m) for m in models],
            "statistic": "mean over prompts of each prompt's mean over seeds; Student-t 95% CI over prompts",
            "results": stats_by_category(rows, models, columns),
        }
        atomic_write_json(out / "summary.json", json_safe(summary))
        atomic_write_text(out / "summary.md", format_summary(summary))
        plot_reward_hist(rows, models, metrics, out / "reward_hist.png")
        write_grid(models, selected, cfg.seeds[0], out, cfg.grid_prompts)
    return summary


def recorded_otherwise(recorded: Mapping[str, str], prompts: Sequence[tuple[int, str]]) -> tuple[int, str, str] | None:
    """The first ``(index, recorded prompt, prompt)`` where a manifest's ``recorded`` prompts (by
    index) name another prompt than ``prompts`` do; None where they agree."""
    return next(((index, recorded[str(index)], prompt) for index, prompt in prompts if recorded.get(str(index), prompt) != prompt), None)


@dataclasses.dataclass
class GenerationPlan:
    """What one model still has to generate: ``todo``, and the image manifest to record their prompts in first."""

    model: ModelSpec
    out: Path  # the eval folder
    manifest_path: Path
    manifest: dict
    todo: list[Item]


def missing_samples(model: ModelSpec, items: Sequence[Item], out: Path, settings: dict) -> GenerationPlan:
    """The items of ``model`` not on disk, or damaged there, once its manifest is read and found to
    match ``settings`` and the prompts; writes nothing."""
    folder = out / "images" / model.folder
    settings = {"model": _normalized(model.path), "lora": _normalized(model.lora), "weights": _weights_stamp(model)} | settings
    manifest_path = folder / "manifest.json"
    manifest = read_json(manifest_path, what="the image manifest", shape={"settings": dict, "prompts": {str: str}}, default=None,
                         fix=f"it records what the images in {folder} were made with: delete that folder to generate them again, or use another --out")
    manifest = manifest or {"settings": settings, "prompts": {}}
    if manifest["settings"] != settings:
        changed = ", ".join(
            "the model's or LoRA's weight files, rewritten since the images were made" if k == "weights" else f"{k}: {manifest['settings'].get(k)!r} -> {v!r}"
            for k, v in settings.items() if manifest["settings"].get(k) != v
        )
        raise SSPOError(
            f"{folder} holds images made with other settings ({changed}); delete that folder or use another --out"
        )
    if other := recorded_otherwise(manifest["prompts"], [(item.prompt_index, item.prompt) for item in items]):
        index, old, prompt = other
        raise SSPOError(f"{folder}: prompt {index} was generated for {old!r}, not {prompt!r} (another prompt set or file, or another --prompts-per-split or --limit?); "
                        "delete that folder or use another --out")
    damage = {item: _sample_damage(sample_path(out, model, item)) for item in items}
    for problem in filter(None, damage.values()):
        log.warning("%s; generating it again", problem)
    todo = [item for item in items if damage[item] or not sample_path(out, model, item).is_file()]
    return GenerationPlan(model, out, manifest_path, manifest, todo)


def generate_missing(plan: GenerationPlan, n_items: int, settings: dict, *, batch_size: int, device: str, dtype: torch.dtype) -> None:
    """Generate the samples of ``plan`` (of ``n_items`` in all, for the progress bar)."""
    from tqdm.auto import tqdm

    model, todo, out = plan.model, plan.todo, plan.out
    if not todo:
        return
    from sspo.evaluation.sampling import check_sample_size
    from sspo.models.pipeline import load_pipeline

    pipe = load_pipeline(model.path, lora=model.lora, dtype=dtype).to(device)  # a model that does not load leaves no manifest
    check_sample_size(pipe, settings["resolution"], "--resolution")  # nor one that cannot sample at that size
    # Record the prompts before any image exists, so that every image on disk has its prompt on record.
    plan.manifest["prompts"].update({str(item.prompt_index): item.prompt for item in todo})
    atomic_write_json(plan.manifest_path, plan.manifest)
    with tqdm(total=n_items, initial=n_items - len(todo), desc=f"generate {model.name}", unit="img") as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            images = generate(
                pipe, [i.prompt for i in chunk], [i.seed for i in chunk], steps=settings["steps"],
                guidance_scale=settings["guidance_scale"], batch_size=batch_size, size=settings["resolution"], frames=settings["frames"],
            )
            for item, image in zip(chunk, images):
                _save_sample(image, sample_path(out, model, item))
            bar.update(len(chunk))
    del pipe
    free_memory()


def _weights_stamp(model: ModelSpec) -> str:
    """A digest of the sizes and times of a local model's and LoRA's files: a model retrained into
    the same path has other images (a hub model's is its name alone)."""
    stats = [file_stats(Path(p).expanduser()) for p in (model.path, model.lora) if p is not None]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]


def _normalized(path: str | None) -> str | None:
    """A local path made absolute (so ``./run`` and ``run`` match on resume); hub ids as given."""
    if path is None or not Path(path).expanduser().exists():
        return path
    return str(Path(path).expanduser().resolve())


def free_memory() -> None:
    """Release a model just deleted, so that the next one (a scorer after the generator) fits."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def score_all(
    models: Sequence[ModelSpec], items: Sequence[Item], set_name: str, metrics: Sequence[str], out: Path,
    identities: dict[str, dict], *, scorer_batch_size: int, device: str, generated: Collection[tuple] = (),
) -> list[dict]:
    """Rows of ``scores.csv`` for every (model, item), cached scores reused, the rest computed metric by metric.

    ``generated``: ``(model name, prompt index, seed)`` of the images made by this call, whose
    cached scores (of an image since lost) do not count. The rows ``scores.csv`` holds for other
    models, seeds or prompt sets are written back as they were; their cells of a metric whose
    scorer changed are emptied, so that every score in the file is one of the scorer
    ``scorers.json`` names.
    """
    from tqdm.auto import tqdm

    csv_path, ident_path = out / "scores.csv", out / "scorers.json"
    cached_ident = read_json(ident_path, what="the scorer record", shape={str: dict}, fix="its scores are computed again", default={}, cache=True)
    valid = [m for m in metrics if cached_ident.get(m) == identities[m]]
    columns = {m: metric_columns(m) for m in metrics}
    old_columns, cache = read_scores(csv_path)
    ours = [c for m in metrics for c in columns[m]]
    rows = []
    for model in models:
        for item in items:
            row = {"model": model.name, "prompt_set": set_name, "category": item.category or "",
                   "prompt_index": item.prompt_index, "seed": item.seed, "prompt": item.prompt}
            old = cache.pop(row_key(row), None)
            if old is not None and old["prompt"] == item.prompt and (model.name, item.prompt_index, item.seed) not in generated:
                row |= {c: old[c] for c in old_columns if c not in ours}  # other metrics' scores of the same image, as they were
                row |= _cached_scores(old, [c for m in valid for c in columns[m]], csv_path)
            rows.append(row)
    kept = list(cache.values())
    for metric in metrics:
        if metric not in valid:
            for row in kept:
                row.update(dict.fromkeys(columns[metric], ""))
    others = {m: i for m, i in cached_ident.items() if m not in metrics}  # the scorers of the kept rows' other columns
    all_columns = [*ours, *old_columns]

    done = list(valid)
    for metric in metrics:
        missing = [r for r in rows if any(c not in r for c in columns[metric])]
        if not missing:
            continue
        options = {"batch_size": scorer_batch_size} | parse_scorer_options(identities[metric]["options"])
        scorer = load_scorer(metric, identities[metric]["path"], options, device, SCORER_FIX)
        by_name = {m.name: m for m in models}
        with tqdm(total=len(missing), desc=f"score {metric}", unit="img") as bar:
            for start in range(0, len(missing), SCORE_CHUNK):
                chunk = missing[start : start + SCORE_CHUNK]
                images = [_load_sample(sample_path(out, by_name[r["model"]], Item(r["prompt_index"], r["seed"], r["prompt"], None))) for r in chunk]
                for r, image in zip(chunk, images):
                    if isinstance(image, scorer.input_type):
                        continue
                    raise _metric_media_error(metric, r["model"], isinstance(image, np.ndarray))
                scores = score_columns(scorer, metric, images, [r["prompt"] for r in chunk])
                for k, r in enumerate(chunk):
                    r |= {c: values[k] for c, values in scores.items()}
                bar.update(len(chunk))
        del scorer
        free_memory()
        # scorers.json never claims a column that scores.csv does not hold from that scorer: drop, write, claim.
        atomic_write_json(ident_path, others | {m: identities[m] for m in done if m != metric})
        write_scores(csv_path, [*rows, *kept], all_columns)
        done.append(metric)
        atomic_write_json(ident_path, others | {m: identities[m] for m in done})
    write_scores(csv_path, [*rows, *kept], all_columns)
    atomic_write_json(ident_path, others | {m: identities[m] for m in metrics})
    return rows


def parse_scorer_options(options: Mapping[str, object]) -> dict:
    """``--scorer-option`` values as ``build_scorer`` keywords: numbers, booleans and ``null`` (the
    option's default of None, e.g. ``fid.frames=null``: every frame) parsed, anything else the string given."""
    from sspo.config import parse_yaml

    parsed = {}
    for key, given in options.items():
        raw = str(given)
        value = parse_yaml(raw) if raw else raw
        parsed[key] = value if value is None or isinstance(value, (int, float, bool)) else raw
    return parsed


def row_key(row: Mapping) -> tuple:
    """What a row of ``scores.csv`` is the scores of: (model, prompt set, prompt index, seed)."""
    return row["model"], row["prompt_set"], int(row["prompt_index"]), int(row["seed"])


def read_scores(path: Path) -> tuple[list[str], dict[tuple, dict]]:
    """The score columns of a scores file, and its rows (of strings) by :func:`row_key`, in file order.

    A file cut short, bytes that are not UTF-8, or a row without its key or with a cell too many or
    too few damage only their rows: those are left out with a warning naming the file and the
    line, and their scores computed again when their model is evaluated again.
    """
    if not path.is_file():
        return [], {}
    text = path.read_bytes().decode("utf-8", errors="replace")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, [])
        records = [(reader.line_num, record) for record in reader]
    except csv.Error as exc:
        log.warning("score cache %s is damaged (%s); every score is computed again", path, exc)
        return [], {}
    if header[: len(KEY_COLUMNS)] != list(KEY_COLUMNS):
        log.warning("score cache %s is damaged (its first line is not the header sspo writes); every score is computed again", path)
        return [], {}
    if records and not text.endswith("\n"):
        records[-1] = (records[-1][0], [])  # cut short: its last cell may be a prefix of the number written
    rows = {}
    for line, record in records:
        row = dict(zip(header, record))
        try:
            key = row_key(row) if len(record) == len(header) else None
        except ValueError:
            key = None
        if key is None or "\ufffd" in "".join(record[: len(KEY_COLUMNS)]):
            log.warning("score cache %s: leaving out line %d, damaged; its scores are computed again", path, line)
            continue
        rows[key] = row
    return header[len(KEY_COLUMNS) :], rows


def _cached_scores(row: dict, columns: Sequence[str], path: Path) -> dict[str, float]:
    """The cells of ``columns`` in a cached row that hold numbers (an empty or damaged cell is computed again)."""
    scores = {}
    for column in columns:
        try:
            scores[column] = float(row[column])
        except (KeyError, ValueError):
            if row.get(column):
                log.warning("score cache %s: %s of %s, prompt %s, seed %s is not a number (%r); computing it again",
                            path, column, row["model"], row["prompt_index"], row["seed"], row[column])
    return scores


def write_scores(path: Path, rows: Sequence[dict], columns: Sequence[str]) -> None:
    """``rows`` as a scores file: the key columns, then ``columns`` (each once, in order)."""
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=[*KEY_COLUMNS, *dict.fromkeys(columns)], restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})


def stats_by_category(rows: Sequence[dict], models: Sequence[ModelSpec], columns: Sequence[str]) -> dict:
    """``{model: {group: {column: mean_ci(...)}}}`` over prompts, each prompt's score its mean over seeds; groups: ``all``, then each category in order."""
    categories = list(dict.fromkeys(r["category"] for r in rows if r["category"]))
    results: dict = {}
    for model in models:
        mine = [r for r in rows if r["model"] == model.name]
        results[model.name] = {}
        for group in (ALL, *categories):
            members = [r for r in mine if group == ALL or r["category"] == group]
            per_prompt: dict[int, list[dict]] = {}
            for r in members:
                per_prompt.setdefault(r["prompt_index"], []).append(r)
            results[model.name][group] = {
                column: mean_ci(math.fsum(r[column] for r in rs) / len(rs) for rs in per_prompt.values())
                for column in columns
            }
    return results


def json_safe(obj):
    """``obj`` with every non-finite float as None (JSON has no NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _cell(stats: dict, best: bool) -> str:
    mean, low, high = stats["mean"], stats["ci95_low"], stats["ci95_high"]
    text = f"{mean:.3f}"
    if low is not None and high is not None and math.isfinite(low) and math.isfinite(high):
        text += f" ± {(high - low) / 2:.3f}"
    return f"**{text}**" if best else text


def metric_tables(results: dict, metrics: Sequence[str], headers: Sequence[str] | None = None, lower_is_better: Sequence[str] = (),
                  cells: dict[str, Callable[[dict, bool], str]] | None = None) -> list[str]:
    """Markdown lines: one table per category of ``results`` (``{model: {category: {metric: stats}}}``),
    models x metrics, the best mean in bold (the lowest for ``lower_is_better``); ``cells``: a cell
    formatter per metric (default: mean ± CI half-width)."""
    first = next(iter(results.values()))
    lines = []
    for group in first:
        n = first[group][metrics[0]]["n"]
        lines += ["", f"## {group} ({n} prompt{'s' if n != 1 else ''})", "", "| model | " + " | ".join(headers or metrics) + " |", "|---|" + "---|" * len(metrics)]
        best = {}
        for m in metrics:
            means = [r[group][m]["mean"] for r in results.values() if math.isfinite(r[group][m]["mean"])]
            best[m] = (min if m in lower_is_better else max)(means) if means else None
        for name, groups in results.items():
            row = [(cells or {}).get(m, _cell)(groups[group][m], len(results) > 1 and groups[group][m]["mean"] == best[m]) for m in metrics]
            lines.append(f"| {name} | " + " | ".join(row) + " |")
    return lines


def samples_line(summary: dict) -> str:
    """What a summary's statistics are over: ``"<n> prompts x <k> seeds (0, 1)"``."""
    seeds = summary["seeds"]
    return f"{summary['n_prompts']} prompts x {len(seeds)} seed{'s' if len(seeds) > 1 else ''} ({', '.join(map(str, seeds))})"


def format_summary(summary: dict) -> str:
    """Markdown: one Table-1-style table (models x metric columns, mean ± 95% CI half-width) per category."""
    results, metrics = summary["results"], summary["columns"]
    settings = summary["settings"]
    lines = [
        f"# Evaluation on {summary['prompt_set']}",
        "",
        f"{samples_line(summary)}, {settings['steps']} sampler steps, guidance scale {settings['guidance_scale']}. "
        "Cells: mean ± 95% CI half-width over prompts (each prompt averaged over its seeds); bold: the highest mean, not a test "
        "(`sspo compare` gives paired differences with CIs).",
    ]
    lines += metric_tables(results, metrics)
    lines += ["", "## Models", "", "| name | model | lora |", "|---|---|---|"]
    lines += [f"| {m['name']} | {m['path']} | {m['lora'] or '-'} |" for m in summary["models"]]
    return "\n".join(lines) + "\n"


def plot_reward_hist(rows: Sequence[dict], models: Sequence[ModelSpec], metrics: Sequence[str], path: str | Path) -> None:
    """Reward distributions (the paper's Figure 7): a panel per metric, a histogram and normal fit per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes[0], metrics):
        values = {m.name: np.array([r[metric] for r in rows if r["model"] == m.name], dtype=float) for m in models}
        everything = np.concatenate(list(values.values()))
        lo, hi = float(everything.min()), float(everything.max())
        if hi - lo < 1e-9:
            lo, hi = lo - 0.5, hi + 0.5
        bins = np.linspace(lo, hi, int(np.clip(np.sqrt(len(everything) / len(models)) * 2, 8, 40)) + 1)
        grid = np.linspace(lo, hi, 200)
        for i, (name, v) in enumerate(values.items()):
            color = colors[i % len(colors)]
            ax.hist(v, bins=bins, density=True, alpha=0.35, color=color, label=f"{name} (mean {v.mean():.3f})")
            ax.axvline(v.mean(), color=color, linestyle="--", linewidth=1)
            if len(v) > 1 and v.std() > 0:
                ax.plot(grid, np.exp(-0.5 * ((grid - v.mean()) / v.std()) ** 2) / (v.std() * math.sqrt(2 * math.pi)), color=color, linewidth=1.2)
        ax.set(title=metric, xlabel="score", ylabel="density")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_grid(models: Sequence[ModelSpec], selected: Sequence[tuple[int, PromptItem]], seed: int, out: Path, n_prompts: int) -> Path:
    """``grid.png``: a row per model, a column per prompt (taken from each category in turn), first seed."""
    by_category: dict[str | None, list[tuple[int, PromptItem]]] = {}
    for index, item in selected:
        by_category.setdefault(item.category, []).append((index, item))
    picks, queues = [], [list(q) for q in by_category.values()]
    while len(picks) < n_prompts and any(queues):
        for queue in queues:
            if queue and len(picks) < n_prompts:
                picks.append(queue.pop(0))
    items = [Item(index, seed, p.prompt, p.category) for index, p in picks]
    rows = []
    for model in models:
        row = []
        for item in items:
            sample = _load_sample(sample_path(out, model, item))
            row.append(Image.fromarray(sample[len(sample) // 2]) if isinstance(sample, np.ndarray) else sample)  # a clip: its middle frame
        rows.append(row)
    cell = max(96, min(256, rows[0][0].width)) if rows and rows[0] else 96
    captions = [f"[{i.category}] {i.prompt}" if i.category else i.prompt for i in items]
    return save_image(image_grid(rows, [m.name for m in models], captions, cell=cell), out / "grid.png")
