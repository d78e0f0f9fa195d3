"""The shapes world itself: prompts, splits, rendering, defects and the dataset writers."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
from PIL import Image

from sspo.data.images import load_image
from sspo.errors import DataError, SSPOError
from sspo.io import write_parquet
from sspo.worlds.shapes.world import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLORS,
    DEFECTS,
    ShapeSpec,
    UnknownAttributeError,
    all_specs,
    make_split,
    parse_prompt,
    preference_pairs,
    render,
    render_defect,
    vocabulary,
    write_imagefolder,
)

SPEC = ShapeSpec("circle", "red", "large", "center", "white")


# --------------------------------------------------------------------------------------------------
# Prompts


def test_every_spec_round_trips_through_its_prompt():
    specs = all_specs()
    assert len(specs) == len(set(specs)) == np.prod([len(v) for v in ATTRIBUTES.values()])
    words = set(vocabulary())
    for spec in specs:
        assert parse_prompt(spec.prompt) == spec
        assert set(spec.prompt.replace(",", " ").split()) <= words


def test_parse_prompt_ignores_case_and_punctuation():
    assert parse_prompt("A LARGE Red circle, in the center,  white background") == SPEC
    assert SPEC.prompt == "a large red circle in the center, white background"


def test_unknown_word_raises_and_names_it():
    with pytest.raises(UnknownAttributeError, match="magenta"):
        parse_prompt("a large magenta circle in the center, white background")
    with pytest.raises(UnknownAttributeError, match="hexagon"):
        parse_prompt("a small red hexagon on the left, black background")
    assert issubclass(UnknownAttributeError, SSPOError)


def test_missing_attribute_and_bad_spec_raise():
    with pytest.raises(UnknownAttributeError, match="background"):
        parse_prompt("a large red circle in the center")
    with pytest.raises(UnknownAttributeError, match="'teal'"):
        ShapeSpec("circle", "teal", "large", "center", "white")
    with pytest.raises(UnknownAttributeError):
        SPEC.replace(size="huge")


# --------------------------------------------------------------------------------------------------
# Splits


def test_split_is_deterministic_disjoint_and_complete():
    a, b = make_split(3), make_split(3)
    assert a == b
    assert make_split(4) != a
    train, heldout = set(a.train), set(a.heldout)
    assert not train & heldout
    assert train | heldout == set(all_specs())
    assert len(a.train) + len(a.heldout) == len(all_specs())
    assert len(a.heldout) == round(0.25 * len(all_specs()))
    assert list(a.train) == sorted(a.train) and list(a.heldout) == sorted(a.heldout)


def test_validation_split_is_alignment_data_never_held_out(tmp_path, monkeypatch):
    from sspo.evaluation.scorers.prompts import load_prompt_set
    from sspo.worlds.shapes.world import cached_pickapic_parquet, parse_prompt

    for seed in range(3):
        split = make_split(seed)
        validation = set(split.validation)
        assert len(validation) == round(0.1 * len(all_specs()))
        assert validation <= set(split.train) and not validation & set(split.heldout)
        assert set(split.train_without_validation) == set(split.train) - validation
    # the validation prompt set scores exactly those combinations; the training data can leave them out
    prompts = load_prompt_set("shapes-validation", seed=0, per_split=1000)
    assert {parse_prompt(p.prompt) for p in prompts} == set(make_split(0).validation)
    assert {p.category for p in prompts} == {"validation"}
    monkeypatch.setenv("SSPO_CACHE", str(tmp_path))
    import pandas as pd

    captions = set(pd.read_parquet(cached_pickapic_parquet(0, 1, 32, without_validation=True))["caption"])
    assert captions == {spec.prompt for spec in make_split(0).train_without_validation}


# --------------------------------------------------------------------------------------------------
# Rendering and defects


@pytest.mark.parametrize("size", [32, 64])
def test_render_draws_the_spec(size):
    image = render(SPEC, size)
    assert image.mode == "RGB" and image.size == (size, size)
    pixels = np.asarray(image)
    assert tuple(pixels[0, 0]) == BACKGROUNDS["white"]
    assert tuple(pixels[size // 2, size // 2]) == COLORS["red"]
    left = np.asarray(render(SPEC.replace(position="left", size="small"), size))
    assert tuple(left[size // 2, int(0.28 * size)]) == COLORS["red"]
    assert tuple(left[size // 2, int(0.72 * size)]) == BACKGROUNDS["white"]


def coverage(spec: ShapeSpec, size: int = 32) -> np.ndarray:
    """How much of each pixel the object covers (0..1): a white object rendered on the black background."""
    white = render(spec.replace(background="black"), size, fill=(255, 255, 255))
    floor = float(BACKGROUNDS["black"][0])  # the black background is not 0: rescale so it reads 0
    luma = np.asarray(white.convert("L"), dtype=np.float32)
    return np.clip((luma - floor) / (255.0 - floor), 0.0, 1.0)


def test_a_render_covers_its_shapes_area():
    mask = coverage(SPEC)
    assert mask.shape == (32, 32)
    assert mask.min() == 0.0 and mask.max() == 1.0
    assert mask[0, 0] == 0.0 and mask[16, 16] == 1.0
    radius = 0.26 * 32
    assert mask.sum() == pytest.approx(np.pi * radius**2, rel=0.06)
    assert coverage(SPEC.replace(shape="triangle")).sum() < coverage(SPEC.replace(shape="diamond")).sum()


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_defects_are_deterministic_and_differ_from_clean(defect):
    clean = np.asarray(render(SPEC), dtype=np.int16)
    first = render_defect(SPEC, random.Random(7), 32, defect)
    again = render_defect(SPEC, random.Random(7), 32, defect)
    assert first.size == (32, 32) and first.mode == "RGB"
    assert np.array_equal(np.asarray(first), np.asarray(again))
    difference = np.abs(np.asarray(first, dtype=np.int16) - clean)
    # a local defect changes some pixels a lot; the background checkerboard changes half the image or
    # more by 10 or more gray levels (on a white background its bright cells are clipped at 255)
    assert difference.max() > 40 or np.mean(difference.max(axis=-1) >= 10) >= 0.5, (defect, difference.max())


def test_unknown_defect_raises():
    with pytest.raises(SSPOError, match="sparkle"):
        render_defect(SPEC, random.Random(0), 32, "sparkle")


# --------------------------------------------------------------------------------------------------
# Datasets


def test_preference_pairs_parquet_has_the_clean_render_as_winner(tmp_path):
    import pyarrow.parquet as pq

    specs = all_specs()[:6]
    rows = preference_pairs(specs, per_spec=2, seed=0)
    assert rows == preference_pairs(specs, per_spec=2, seed=0)
    path = write_parquet(tmp_path / "pairs.parquet", rows)
    assert [p.name for p in tmp_path.iterdir()] == ["pairs.parquet"]  # no temporary left behind
    table = pq.read_table(path)
    assert {"caption", "jpg_0", "jpg_1", "label_0"} <= set(table.column_names)
    assert table.num_rows == 12
    winner_columns = set()
    for row in table.to_pylist():
        spec = parse_prompt(row["caption"])
        assert row["label_0"] in (0.0, 1.0)
        winner, loser = ("jpg_0", "jpg_1") if row["label_0"] == 1.0 else ("jpg_1", "jpg_0")
        winner_columns.add(winner)
        clean = np.asarray(render(spec))
        assert np.array_equal(np.asarray(load_image(row[winner])), clean)
        assert not np.array_equal(np.asarray(load_image(row[loser])), clean)
    assert winner_columns == {"jpg_0", "jpg_1"}  # the winner's column is random


def test_preference_pairs_ties():
    rows = preference_pairs(all_specs()[:3], per_spec=2, seed=1, tie_fraction=1.0)
    assert [row["label_0"] for row in rows] == [0.5] * 6


def test_write_imagefolder_writes_metadata(tmp_path):
    specs = all_specs()[:4]
    folder = write_imagefolder(tmp_path / "folder", specs)
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    assert [e["text"] for e in entries] == [s.prompt for s in specs]
    for entry, spec in zip(entries, specs):
        assert set(entry) == {"file_name", "text"}
        image = Image.open(folder / entry["file_name"]).convert("RGB")
        assert np.array_equal(np.asarray(image), np.asarray(render(spec)))


def test_load_image_reads_and_names_corrupt_files(tmp_path):
    good = tmp_path / "good.png"
    render(SPEC).save(good)
    assert load_image(good).mode == "RGB"
    buffer = io.BytesIO()
    render(SPEC).convert("L").save(buffer, format="PNG")
    assert load_image(buffer.getvalue()).mode == "RGB"

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really an image")
    with pytest.raises(DataError, match="broken.png"):
        load_image(bad)
    with pytest.raises(DataError, match="row 3 of pairs.parquet"):
        load_image(b"garbage", where="row 3 of pairs.parquet")
    with pytest.raises(DataError, match="missing.png"):
        load_image(tmp_path / "missing.png")
