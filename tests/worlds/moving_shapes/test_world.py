"""The moving-shapes world itself: prompts, splits, clips, temporal defects and the dataset writers."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from sspo.errors import SSPOError
from sspo.io import write_parquet
from sspo.video_io import decode_clip
from sspo.worlds.moving_shapes.world import (
    MOTION_DEFECTS,
    MOTION_WORDS,
    MOTIONS,
    MOVES,
    RESIZES,
    MotionSpec,
    all_motion_specs,
    cached_motion_parquet,
    frame_times,
    make_motion_split,
    motion_eval_prompts,
    motion_preference_pairs,
    motion_state,
    motion_vocabulary,
    parse_motion_prompt,
    render_clip,
    render_motion_defect,
    write_clip_folder,
)
from sspo.worlds.shapes.world import (
    BACKGROUNDS,
    COLORS,
    SHAPES,
    ShapeSpec,
    UnknownAttributeError,
    render,
    vocabulary,
)

MOVING = MotionSpec("circle", "red", "small", "left-to-right", "white")
GROWING = MotionSpec("square", "blue", "", "growing", "black")
TURNING = MotionSpec("triangle", "green", "large", "turning", "gray", "yellow")
EXAMPLES = (MOVING, GROWING, TURNING, MotionSpec("diamond", "orange", "", "shrinking", "white"))


# --------------------------------------------------------------------------------------------------
# Prompts


def test_combinations_and_prompts():
    specs = all_motion_specs()
    assert len(specs) == len(set(specs)) == 4 * 6 * (2 * 4 + 2 + 2 * 5) * 3 == 1440
    assert {s.motion for s in specs} == set(MOTIONS)
    assert MOVING.prompt == "a small red circle moving from left to right, white background"
    assert GROWING.prompt == "a blue square growing, black background"
    assert TURNING.prompt == "a large green triangle turning from green to yellow, gray background"
    assert EXAMPLES[3].prompt == "an orange diamond shrinking, white background"


def test_every_prompt_round_trips_and_fits_the_tokenizer(tmp_path):
    from sspo.models.tiny import write_word_tokenizer

    specs = all_motion_specs()
    tokenizer = write_word_tokenizer(tmp_path / "tokenizer", motion_vocabulary())
    ids = tokenizer([spec.prompt for spec in specs]).input_ids
    used = set()
    for spec, tokens in zip(specs, ids):
        assert parse_motion_prompt(spec.prompt) == spec
        words = spec.prompt.replace(",", " ,").split()
        used.update(words)
        assert len(tokens) == len(words) + 2 <= 16, spec.prompt  # every word one token, BOS and EOS
        assert len(words) <= 14
    assert used == set(motion_vocabulary())  # the vocabulary is exactly the words prompts use
    # the image world's words, plus only the motion words
    assert set(motion_vocabulary()) - set(vocabulary()) == set(MOTION_WORDS)


def test_parse_ignores_case_punctuation_and_the_repeated_color():
    assert parse_motion_prompt("A SMALL Red circle moving from LEFT to right,  white background") == MOVING
    assert parse_motion_prompt("a large triangle turning from green to yellow, gray background") == TURNING
    assert parse_motion_prompt("a blue square growing black background") == GROWING


@pytest.mark.parametrize(
    "prompt, named",
    [
        ("a small magenta circle moving from left to right, white background", "magenta"),
        ("a small red hexagon moving from left to right, white background", "hexagon"),
        ("a small red circle spinning, white background", "spinning"),
        ("a small red circle moving from left to top, white background", "left"),
        ("a small red circle, white background", "motion"),
        ("a small red circle growing moving from left to right, white background", "growing, moving"),
        ("a small red circle turning from blue to yellow, white background", "turning from"),
        ("a small red circle moving from left to right", "background"),
        ("a large red circle growing, white background", "no size"),
        ("a red circle moving from left to right, white background", "no size"),
        ("a small red circle on the left, white background", "on"),
    ],
)
def test_bad_prompts_raise_and_name_the_problem(prompt, named):
    with pytest.raises(UnknownAttributeError, match=named):
        parse_motion_prompt(prompt)
    assert issubclass(UnknownAttributeError, SSPOError)


def test_bad_specs_raise():
    for bad in (
        dict(size="huge"),
        dict(motion="spinning"),
        dict(motion="growing"),  # a resizing object has no size word
        dict(target="blue"),  # only a turning object has a target
        dict(motion="turning"),  # ... and it needs one
        dict(motion="turning", target="red"),  # another color than its own
        dict(background="pink"),
    ):
        with pytest.raises(UnknownAttributeError):
            MOVING.replace(**bad)


# --------------------------------------------------------------------------------------------------
# Clips


def test_clip_ends_are_the_image_worlds_renders():
    for spec in all_motion_specs()[::37]:
        clip = render_clip(spec)
        assert clip.shape == (8, 32, 32, 3) and clip.dtype == np.uint8
        if spec.motion in MOVES:
            ends = [ShapeSpec(spec.shape, spec.color, spec.size, place, spec.background) for place in MOVES[spec.motion]]
        elif spec.motion in RESIZES:
            ends = [ShapeSpec(spec.shape, spec.color, size, "center", spec.background) for size in RESIZES[spec.motion]]
        else:
            ends = [ShapeSpec(spec.shape, color, spec.size, "center", spec.background) for color in (spec.color, spec.target)]
        assert np.array_equal(clip[0], np.asarray(render(ends[0]))), spec.prompt
        assert np.array_equal(clip[-1], np.asarray(render(ends[1]))), spec.prompt
        assert all(not np.array_equal(a, b) for a, b in zip(clip, clip[1:])), spec.prompt  # it moves every frame


def test_progress_is_linear_and_the_object_stays_in_frame():
    assert np.allclose(frame_times(8), np.arange(8) / 7)
    with pytest.raises(SSPOError, match="at least 2 frames"):
        frame_times(1)
    for spec in all_motion_specs()[::11]:
        states = [motion_state(spec, t) for t in frame_times(8)]
        centers = np.array([s.center for s in states])
        radii = np.array([s.radius for s in states])
        assert np.allclose(np.diff(centers, n=2, axis=0), 0) and np.allclose(np.diff(radii, n=2), 0)
        assert (centers - radii[:, None] >= 0).all() and (centers + radii[:, None] <= 1).all(), spec.prompt


def test_turning_keeps_the_object_distinct_from_the_background():
    for spec in (s for s in all_motion_specs() if s.motion == "turning"):
        fills = np.array([motion_state(spec, t).fill for t in np.linspace(0, 1, 33)])
        assert np.linalg.norm(fills - BACKGROUNDS[spec.background], axis=1).min() > 100, spec.prompt
        assert motion_state(spec, 0).render_overrides()["fill"] == COLORS[spec.color]
        assert motion_state(spec, 1).render_overrides()["fill"] == COLORS[spec.target]


@pytest.mark.parametrize("frames, size", [(4, 32), (16, 64)])
def test_other_lengths_and_sizes(frames, size):
    clip = render_clip(TURNING, frames, size)
    assert clip.shape == (frames, size, size, 3)
    for name in MOTION_DEFECTS:
        assert render_motion_defect(TURNING, random.Random(0), frames, size, name).shape == clip.shape


# --------------------------------------------------------------------------------------------------
# Defects


@pytest.mark.parametrize("defect", sorted(MOTION_DEFECTS))
def test_defects_are_deterministic_and_differ_from_clean(defect):
    for spec in EXAMPLES:
        clean = render_clip(spec)
        first = render_motion_defect(spec, random.Random(7), 8, 32, defect)
        again = render_motion_defect(spec, random.Random(7), 8, 32, defect)
        assert first.shape == clean.shape and first.dtype == np.uint8
        assert np.array_equal(first, again)
        assert not np.array_equal(first, clean), (defect, spec.prompt)


def _frame_indices(clip: np.ndarray, clean: np.ndarray) -> list[int]:
    """Which clean frame each frame of ``clip`` is (-1: none)."""
    return [next((i for i, c in enumerate(clean) if np.array_equal(frame, c)), -1) for frame in clip]


def test_temporal_defects_retime_the_clean_clip():
    clean = render_clip(MOVING)
    rng = random.Random(3)
    assert _frame_indices(render_motion_defect(MOVING, rng, defect="reversed"), clean) == list(range(7, -1, -1))
    order = _frame_indices(render_motion_defect(MOVING, rng, defect="shuffled"), clean)
    assert sorted(order) == list(range(8)) and order != list(range(8))
    assert sum(b == a + 1 for a, b in zip(order, order[1:])) <= 1
    held = _frame_indices(render_motion_defect(MOVING, rng, defect="dropped"), clean)
    assert held[0] == 0 and held[-1] == 7 and held == sorted(held) and len(set(held)) == 4
    frozen = _frame_indices(render_motion_defect(MOVING, rng, defect="frozen"), clean)
    stop = frozen[-1]
    assert 2 <= stop <= 4 and frozen == [min(f, stop) for f in range(8)]
    static = render_motion_defect(MOVING, rng, defect="static")
    assert all(np.array_equal(frame, static[0]) for frame in static)
    vanished = render_motion_defect(MOVING, rng, defect="vanish")
    blank = [bool((frame == BACKGROUNDS["white"]).all()) for frame in vanished]
    assert sum(blank) == 2 and not blank[0]
    assert all(np.array_equal(a, b) for a, b, gone in zip(vanished, clean, blank) if not gone)


def test_attribute_defects_change_the_attribute():
    rng = random.Random(0)
    recolored = render_motion_defect(TURNING, rng, defect="wrong_color")
    colors = {tuple(recolored[0, 16, 16]), tuple(recolored[-1, 16, 16])}
    assert not colors & {COLORS["green"], COLORS["yellow"]} and colors <= set(COLORS.values())
    reshaped = render_motion_defect(MOVING, rng, defect="wrong_shape")
    assert any(np.array_equal(reshaped, render_clip(MOVING.replace(shape=s))) for s in SHAPES if s != "circle")


def test_unknown_defect_and_short_clips_raise():
    with pytest.raises(SSPOError, match="sparkle"):
        render_motion_defect(MOVING, random.Random(0), 8, 32, "sparkle")
    with pytest.raises(SSPOError, match="at least 4 frames"):
        render_motion_defect(MOVING, random.Random(0), 3, 32, "shuffled")


# --------------------------------------------------------------------------------------------------
# Splits and datasets


def test_split_is_deterministic_disjoint_and_complete():
    a = make_motion_split(3)
    assert a == make_motion_split(3) and a != make_motion_split(4)
    train, heldout, validation = set(a.train), set(a.heldout), set(a.validation)
    assert not train & heldout and train | heldout == set(all_motion_specs())
    assert len(heldout) == 360 and len(validation) == 144
    assert validation <= train and set(a.train_without_validation) == train - validation
    assert {s.motion for s in a.heldout} == set(MOTIONS)
    prompts = motion_eval_prompts(a, per_split=10, seed=5)
    assert prompts == motion_eval_prompts(a, per_split=10, seed=5)
    assert len(prompts["seen"]) == len(prompts["heldout"]) == 10
    assert set(prompts["seen"]) <= train and set(prompts["heldout"]) <= heldout


def test_preference_pairs_have_the_clean_clip_as_winner(tmp_path):
    import pyarrow.parquet as pq

    specs = all_motion_specs()[::120]
    rows = motion_preference_pairs(specs, per_spec=2, seed=0, frames=4, size=16)
    assert rows == motion_preference_pairs(specs, per_spec=2, seed=0, frames=4, size=16)
    table = pq.read_table(write_parquet(tmp_path / "pairs.parquet", rows))
    assert table.column_names == ["caption", "video_0", "video_1", "label_0", "defect"]
    winners = set()
    for row in table.to_pylist():
        spec = parse_motion_prompt(row["caption"])
        winner, loser = ("video_0", "video_1") if row["label_0"] == 1.0 else ("video_1", "video_0")
        winners.add(winner)
        assert row["defect"] in MOTION_DEFECTS
        assert np.array_equal(decode_clip(row[winner]), render_clip(spec, 4, 16))
        assert not np.array_equal(decode_clip(row[loser]), render_clip(spec, 4, 16))
    assert winners == {"video_0", "video_1"}


def test_cached_parquet_holds_the_training_prompts(tmp_path, monkeypatch):
    import pandas as pd

    monkeypatch.setenv("SSPO_CACHE", str(tmp_path))
    path = cached_motion_parquet(0, 1, frames=4, size=16, without_validation=True)
    assert path.parent == tmp_path / "data" and "-f4-r16-noval" in path.name
    assert cached_motion_parquet(0, 1, frames=4, size=16, without_validation=True) == path
    frame = pd.read_parquet(path)
    assert set(frame["caption"]) == {spec.prompt for spec in make_motion_split(0).train_without_validation}
    assert decode_clip(frame["video_0"][0]).shape == (4, 16, 16, 3)
    assert not [p for p in (tmp_path / "data").iterdir() if p.name.endswith(".tmp")]


def test_write_clip_folder(tmp_path):
    specs = list(EXAMPLES)
    folder = write_clip_folder(tmp_path / "clips", specs, frames=6)
    entries = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert entries == [{"file_name": f"{i:05d}.tiff", "text": spec.prompt} for i, spec in enumerate(specs)]
    for entry, spec in zip(entries, specs):
        assert np.array_equal(decode_clip(folder / entry["file_name"]), render_clip(spec, 6))
    assert sorted(p.name for p in folder.iterdir()) == sorted([e["file_name"] for e in entries] + ["metadata.jsonl"])
