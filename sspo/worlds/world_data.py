"""What any world builds its data with: the split of its combinations, its fixed evaluation specs,
its preference rows, their cached parquet and its captioned sample folders.

A world brings its specs (sortable, each with a ``prompt``) and how to render and encode them; the
shapes world (:mod:`sspo.worlds.shapes.world`) and the moving-shapes world
(:mod:`sspo.worlds.moving_shapes.world`) build their data from these.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from sspo.io import write_parquet


@dataclasses.dataclass(frozen=True)
class Split:
    """Attribute combinations used for alignment data (``train``) and held out of it (``heldout``).

    ``validation`` is a part of ``train`` set aside for choosing training settings (learning rate,
    beta): runs that choose settings train on ``train_without_validation`` and score ``validation``,
    so no choice ever looks at a held-out combination.
    """

    train: tuple[Any, ...]
    heldout: tuple[Any, ...]
    validation: tuple[Any, ...] = ()

    @property
    def train_without_validation(self) -> tuple[Any, ...]:
        excluded = set(self.validation)
        return tuple(spec for spec in self.train if spec not in excluded)


def split_specs(specs: Sequence, seed: int, heldout_fraction: float, validation_fraction: float) -> Split:
    """Deterministic split of a world's combinations (any sortable specs) into alignment-train and
    held-out sets, and a validation part of train (``validation_fraction`` of all combinations)."""
    specs = list(specs)
    random.Random(seed).shuffle(specs)
    n_heldout = int(round(len(specs) * heldout_fraction))
    n_validation = int(round(len(specs) * validation_fraction))
    return Split(
        train=tuple(sorted(specs[n_heldout:])),
        heldout=tuple(sorted(specs[:n_heldout])),
        validation=tuple(sorted(specs[n_heldout : n_heldout + n_validation])),
    )


def eval_prompts(split: Split, per_split: int = 24, seed: int = 0) -> dict[str, list]:
    """Fixed evaluation specs: ``per_split`` seen (train) and ``per_split`` held-out combinations."""
    rng = random.Random(seed + 1)
    return {
        "seen": sorted(rng.sample(list(split.train), min(per_split, len(split.train)))),
        "heldout": sorted(rng.sample(list(split.heldout), min(per_split, len(split.heldout)))),
    }


def png_bytes(image: Image.Image) -> bytes:
    """An image as PNG bytes (lossless): what the world's parquet columns hold."""
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def pair_rows(
    specs: Iterable,
    per_spec: int,
    seed: int,
    clean: Callable[[object], bytes],
    defective: Callable[[object, random.Random, str], bytes],
    defects: Sequence[str],
    columns: tuple[str, str],
    tie_fraction: float = 0.0,
) -> list[dict]:
    """Preference rows of any world: ``caption``, the two ``columns`` (encoded media), ``label_0``
    and ``defect``. ``clean(spec)`` wins against ``defective(spec, rng, defect)`` for a defect
    drawn from ``defects``; the winner's column is random; ``tie_fraction`` of rows are ties."""
    from tqdm.auto import tqdm

    rng = random.Random(seed)
    first, second = columns
    rows = []
    specs = list(specs)
    # Shown only when rendering is slow (large sizes): built once, then read from the cache.
    for spec in tqdm(specs, desc="rendering the world's pairs (once, then cached)", unit="prompt", leave=False, delay=2):
        for _ in range(per_spec):
            good = clean(spec)
            defect = rng.choice(defects)
            bad = defective(spec, rng, defect)
            tie = rng.random() < tie_fraction
            if rng.random() < 0.5:
                row = {first: good, second: bad, "label_0": 1.0}
            else:
                row = {first: bad, second: good, "label_0": 0.0}
            if tie:
                row["label_0"] = 0.5
            rows.append({"caption": spec.prompt, **row, "defect": defect})
    return rows


def cached_parquet(name: str, rows: Callable[[], list[dict]]) -> Path:
    """``cache_root()/data/name``, written from ``rows()`` once: under a file lock (parallel workers
    share one build) and atomically; the name must carry every setting the rows depend on."""
    from filelock import FileLock

    from sspo.paths import cache_root

    path = cache_root() / "data" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not path.is_file():
            write_parquet(path, rows())
    return path


def write_captioned_folder(folder: str | Path, specs: Iterable, suffix: str, save: Callable[[object, Path], None]) -> Path:
    """An imagefolder-style folder of any world: ``save(spec, path)`` writes each spec's file
    (``00000.<suffix>``, ...; atomically, through a temporary path) and ``metadata.jsonl`` has a
    line ``{"file_name", "text": spec.prompt}`` for each."""
    from sspo.io import atomic_path, atomic_write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, spec in enumerate(specs):
        name = f"{i:05d}.{suffix}"
        with atomic_path(folder / name) as tmp:
            save(spec, tmp)
        lines.append(json.dumps({"file_name": name, "text": spec.prompt}))
    atomic_write_text(folder / "metadata.jsonl", "\n".join(lines) + "\n")
    return folder
