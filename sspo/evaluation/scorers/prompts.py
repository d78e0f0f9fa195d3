"""Evaluation prompt sets: the paper's three benchmarks, plain prompt files, and the worlds'.

``load_prompt_set(name_or_path, source)``:

* ``pickapic_val`` -- Pick-a-Pic v2 ``validation_unique`` (500 prompts): a parquet file or folder with a
  ``caption`` column (captions are de-duplicated in order, which is what makes the ``_unique`` split
  from ``validation``), or by default hub dataset ``yuvalkirstain/pickapic_v2``.
* ``hpsv2`` -- the HPSv2 benchmark (3,200 prompts): a folder with ``anime.json``, ``concept-art.json``,
  ``paintings.json``, ``photo.json`` (each a JSON list of prompts; category = style), or by default
  hub dataset ``zhwang/HPDv2`` (``benchmark/*.json``).
* ``parti`` -- PartiPrompts (1,632 prompts): ``PartiPrompts.tsv`` (``Prompt`` and ``Category``
  columns), or by default hub dataset ``nateraw/parti-prompts``.
* ``<world>`` (``shapes``, ``moving-shapes`` or a registered one, :mod:`sspo.worlds`) -- the world's
  evaluation specs, seen then held-out combinations (category ``seen`` / ``heldout``), from its
  ``make_split`` and ``eval_specs``.
* ``<world>-validation`` -- the split's validation combinations (category ``validation``): for
  choosing training settings, never the held-out ones.
* a path to a ``.txt`` (one prompt a line), ``.json``, ``.jsonl``, ``.tsv``, ``.csv`` or ``.parquet``
  file with a prompt column (``prompt``, ``Prompt``, ``caption`` or ``text``) and optionally a
  category column (``category``, ``Category`` or ``style``).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import random
from collections.abc import Callable, Iterable
from pathlib import Path

from sspo.errors import DataError
from sspo.worlds import World, prompt_set_world, world_names

PICKAPIC_HUB = ("yuvalkirstain/pickapic_v2", "validation_unique")
HPSV2_HUB = "zhwang/HPDv2"
HPSV2_STYLES = ("anime", "concept-art", "paintings", "photo")
PARTI_HUB = ("nateraw/parti-prompts", "train")
PROMPT_COLUMNS = ("prompt", "Prompt", "caption", "text")
CATEGORY_COLUMNS = ("category", "Category", "style")


@dataclasses.dataclass(frozen=True)
class PromptItem:
    prompt: str
    category: str | None = None


def load_prompt_set(
    name_or_path: str, source: str | None = None, *, seed: int = 0, per_split: int = 24
) -> list[PromptItem]:
    """The prompts of a named set (``source``: its local file/folder, default its hub id) or of a file.

    ``seed`` and ``per_split`` pick a world's split.
    """
    if found := prompt_set_world(name_or_path):
        items = _world(*found, seed, per_split)
    elif name_or_path in _NAMED:
        items = _NAMED[name_or_path](source)
    elif Path(name_or_path).expanduser().exists():
        items = read_prompt_file(Path(name_or_path).expanduser())
    else:
        raise DataError(
            f"unknown prompt set {name_or_path!r}: not one of {', '.join(prompt_set_names())} and no such file"
        )
    if not items:
        raise DataError(f"prompt set {name_or_path!r} ({source or 'default source'}) has no prompts")
    return items


def read_prompt_file(path: Path) -> list[PromptItem]:
    """Prompts from one file, by suffix; a folder holding the HPSv2 style files reads as that benchmark."""
    if path.is_dir():
        if any((path / f"{style}.json").is_file() for style in HPSV2_STYLES):
            return _hpsv2(str(path))
        raise DataError(f"{path} is a folder; pass a prompt file (.txt, .json, .jsonl, .tsv, .csv, .parquet)")
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            return [PromptItem(line.strip()) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if suffix == ".json":
            return _from_json(json.loads(path.read_text(encoding="utf-8")), path)
        if suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            return _from_rows(rows, path)
        if suffix in (".tsv", ".csv"):
            with path.open(newline="", encoding="utf-8") as f:
                return _from_rows(list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")), path)
        if suffix == ".parquet":
            return _from_rows(_read_parquet([path]), path)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read prompts from {path}: {exc}") from None
    raise DataError(f"{path}: unsupported prompt file type {suffix!r} (use .txt, .json, .jsonl, .tsv, .csv, .parquet)")


def _from_json(data, where) -> list[PromptItem]:
    if isinstance(data, dict):  # {category: [prompts]}
        for category, prompts in data.items():
            if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
                raise DataError(f"{where}: category {category!r} holds {json.dumps(prompts)[:60]}, not a list of prompts; write {{category: [prompts]}}")
        return [PromptItem(p, str(c)) for c, prompts in data.items() for p in prompts]
    if isinstance(data, list) and all(isinstance(p, str) for p in data):
        return [PromptItem(p) for p in data]
    if isinstance(data, list) and all(isinstance(p, dict) for p in data):
        return _from_rows(data, where)
    raise DataError(f"{where}: expected a list of prompts, a list of objects or {{category: [prompts]}}")


def _from_rows(rows: list[dict], where) -> list[PromptItem]:
    if not rows:
        return []
    prompt_col = next((c for c in PROMPT_COLUMNS if c in rows[0]), None)
    if prompt_col is None:
        raise DataError(
            f"{where}: no prompt column; expected one of {', '.join(PROMPT_COLUMNS)}, got {', '.join(rows[0])}"
        )
    category_col = next((c for c in CATEGORY_COLUMNS if c in rows[0]), None)
    def category(row: dict) -> str | None:
        return None if category_col is None or row[category_col] is None else str(row[category_col])

    return [PromptItem(str(row[prompt_col]), category(row)) for row in rows]


def _read_parquet(files: Iterable[Path], columns: list[str] | None = None) -> list[dict]:
    import pyarrow.parquet as pq

    rows: list[dict] = []
    for file in files:
        table = pq.read_table(file, columns=columns)  # column pruning: Pick-a-Pic rows carry images
        rows.extend(table.to_pylist())
    return rows


def _dedup(prompts: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(prompts))


def _pickapic(source: str | None) -> list[PromptItem]:
    if source is None:
        (captions,) = _hub_columns(*PICKAPIC_HUB, ["caption"])
        return [PromptItem(p) for p in _dedup(captions)]
    path = Path(source).expanduser()
    files = sorted(path.glob("**/*.parquet")) if path.is_dir() else [path]
    if path.is_dir():  # a full Pick-a-Pic download: take the validation_unique shards if present
        unique = [f for f in files if "validation_unique" in f.name]
        files = unique or files
    if not files or not all(f.is_file() for f in files):
        raise DataError(f"pickapic_val: no parquet files at {source}")
    try:
        rows = _read_parquet(files, columns=["caption"])
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"pickapic_val: cannot read a 'caption' column from {source}: {exc}") from None
    return [PromptItem(p) for p in _dedup(r["caption"] for r in rows)]


def _hpsv2(source: str | None) -> list[PromptItem]:
    items = []
    for style in HPSV2_STYLES:
        file = _hpsv2_file(source, style)
        try:
            prompts = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(f"hpsv2: cannot read {file}: {exc}") from None
        items.extend(PromptItem(str(p), style) for p in prompts)
    return items


def _hpsv2_file(source: str | None, style: str) -> Path:
    if source is None:
        from huggingface_hub import hf_hub_download

        _check_hub(HPSV2_HUB, f"{HPSV2_HUB} benchmark/{style}.json", "the folder holding the 4 style files", f"benchmark/{style}.json")
        try:
            return Path(hf_hub_download(HPSV2_HUB, f"{style}.json", subfolder="benchmark", repo_type="dataset"))
        except Exception as exc:
            hint = _hub_hint(f"{HPSV2_HUB} benchmark/{style}.json", exc, "the folder holding the 4 style files")
            raise DataError(hint) from None
    for candidate in (Path(source) / f"{style}.json", Path(source) / "benchmark" / f"{style}.json"):
        if candidate.expanduser().is_file():
            return candidate.expanduser()
    raise DataError(f"hpsv2: {source} has no {style}.json; expected {', '.join(s + '.json' for s in HPSV2_STYLES)}")


def _parti(source: str | None) -> list[PromptItem]:
    if source is None:
        prompts, categories = _hub_columns(*PARTI_HUB, ["Prompt", "Category"])
        return [PromptItem(p, c) for p, c in zip(prompts, categories)]
    if not Path(source).expanduser().is_file():
        raise DataError(f"parti: no such file {source} (expected PartiPrompts.tsv)")
    return read_prompt_file(Path(source).expanduser())


def prompt_set_names() -> tuple[str, ...]:
    """Every named prompt set: each registered world's two, then the benchmarks."""
    return (*(name for world in world_names() for name in (world, f"{world}-validation")), *_NAMED)


def _world(world: World, validation: bool, seed: int, per_split: int) -> list[PromptItem]:
    """A world's seen and held-out combinations, or its validation ones."""
    split = world.make_split(seed)
    if validation:
        specs = random.Random(seed + 2).sample(list(split.validation), min(per_split, len(split.validation)))
        return [PromptItem(spec.prompt, "validation") for spec in sorted(specs)]
    groups = world.eval_specs(split, per_split, seed)
    return [PromptItem(spec.prompt, group) for group in ("seen", "heldout") for spec in groups[group]]


def _check_hub(dataset_id: str, what: str, local: str, downloaded: str) -> None:
    """One line at once when the hub cannot be reached and offline mode is off, not a minute of the
    download's retries and log lines. ``downloaded``: a file the download keeps in the hub's cache,
    whose presence says the set can load offline."""
    from huggingface_hub import constants, try_to_load_from_cache

    from sspo.models import pipeline

    if constants.is_offline_mode() or pipeline.hub_reachable():
        return
    cached = isinstance(try_to_load_from_cache(dataset_id, downloaded, repo_type="dataset"), str)
    fix = "it is in the local cache: set HF_HUB_OFFLINE=1 to load it from there" if cached else f"download it where the hub is reachable and pass {local} as the source"
    raise DataError(f"cannot load {what}: the Hugging Face hub ({constants.ENDPOINT}) is unreachable; {fix}")


def _hub_columns(dataset_id: str, split: str, columns: list[str]) -> list[list]:
    _check_hub(dataset_id, f"{dataset_id} (split {split})", "a local copy", "README.md")  # load_dataset reads the card first
    try:
        import datasets

        dataset = datasets.load_dataset(dataset_id, split=split).select_columns(columns)
        return [dataset[c] for c in columns]
    except Exception as exc:  # offline, missing, auth: one message that says what to do instead
        raise DataError(_hub_hint(f"{dataset_id} (split {split})", exc, "a local copy")) from None


def _hub_hint(what: str, exc: Exception, local: str) -> str:
    return f"cannot load {what} from the hub ({type(exc).__name__}: {exc}); download it and pass {local} as the source"


_NAMED: dict[str, Callable[[str | None], list[PromptItem]]] = {
    "pickapic_val": _pickapic,
    "hpsv2": _hpsv2,
    "parti": _parti,
}
