"""The moving-shapes world's exact evaluator: clean clips score ~1, each defect hits its component, and the
VAE round trip keeps the temporal defects."""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path

import numpy as np
import pytest

from sspo.errors import ModelError, SSPOError
from sspo.worlds.moving_shapes.evaluator import (
    ATTRIBUTE_NAMES,
    COHERENCE_NAMES,
    COMPONENT_NAMES,
    MOTION_NAMES,
    MotionScore,
    evaluate_clip,
    evaluate_clips,
    load_vae,
    round_trip_clip_scores,
    round_trip_clips,
)
from sspo.worlds.moving_shapes.world import MOTION_DEFECTS, MOTIONS, RESIZES, MotionSpec, render_clip, render_motion_defect
from sspo.worlds.shapes.evaluator import mean_scores
from sspo.worlds.shapes.world import BACKGROUNDS, COLORS, SHAPES, SIZES

VAE = Path(__file__).resolve().parents[3] / "sspo" / "worlds" / "shapes" / "weights" / "shapes-base"
_COLORS, _BACKGROUNDS = tuple(COLORS), tuple(BACKGROUNDS)


def covering(n: int, offset: int = 0) -> list[MotionSpec]:
    """``n`` specs cycling through every motion, shape, color, size, background (and target)."""
    specs = []
    for i in range(n):
        j, motion = i + offset, MOTIONS[i % len(MOTIONS)]
        color = _COLORS[j % 6]
        target = _COLORS[(j % 6 + 1 + j % 5) % 6] if motion == "turning" else ""
        size = "" if motion in RESIZES else SIZES[j % 2]
        specs.append(MotionSpec(SHAPES[j % 4], color, size, motion, _BACKGROUNDS[j % 3], target))
    return specs


SPECS = covering(42)  # 6 per motion; every shape, color, size and background with every motion kind
DEFECT_SPECS = covering(14, offset=5)

# defect -> (the component it must hit, the most it may score on any clip, on average)
DEFECT_COMPONENT = {
    "frozen": ("amplitude", 0.2, 0.1),
    "static": ("amplitude", 0.05, 0.05),
    "reversed": ("direction", 0.1, 0.05),
    "shuffled": ("smoothness", 0.2, 0.05),
    "jitter": ("smoothness", 0.6, 0.15),
    "flicker": ("smoothness", 0.1, 0.05),
    "dropped": ("smoothness", 0.5, 0.2),
    "vanish": ("persistence", 0.5, 0.5),
    "wrong_color": ("color", 0.4, 0.1),
    "wrong_shape": ("shape", 0.1, 0.05),
    "blur": ("quality", 0.65, 0.55),
    "noise": ("quality", 0.35, 0.2),
    "smear": ("quality", 0.7, 0.6),
    "checker": ("quality", 0.85, 0.7),
}
# what breaks with them: the progress of a clip that stops or stands still, or runs backwards
SECOND_COMPONENT = {"frozen": ("progress", 0.85), "static": ("progress", 0.7), "reversed": ("progress", 0.4)}


def _check_valid(score: MotionScore) -> None:
    for name, value in score.as_dict().items():
        assert isinstance(value, float) and not math.isnan(value), name
        assert 0.0 <= value <= 1.0, (name, value)


def test_component_names_cover_the_score():
    assert set(COMPONENT_NAMES) == {f.name for f in dataclasses.fields(MotionScore)}
    assert ATTRIBUTE_NAMES == ("background", "color", "shape", "size", "position")
    assert MOTION_NAMES == ("progress", "direction", "amplitude")
    assert COHERENCE_NAMES == ("smoothness", "persistence")
    assert set(DEFECT_COMPONENT) == set(MOTION_DEFECTS)


def test_clean_clips_score_high():
    assert {s.motion for s in SPECS} == set(MOTIONS)
    for attribute, values in (("shape", SHAPES), ("color", _COLORS), ("background", _BACKGROUNDS)):
        for motion in ("left-to-right", "growing", "turning"):
            assert {getattr(s, attribute) for s in SPECS if s.motion == motion} == set(values), (attribute, motion)
    for spec in SPECS:
        score = evaluate_clip(render_clip(spec), spec)
        _check_valid(score)
        assert score.reward >= 0.95, (spec.prompt, score)
        assert min(score.as_dict().values()) >= 0.95, (spec.prompt, score)


def test_score_combination():
    spec = SPECS[2]
    clips = [render_clip(spec), render_motion_defect(spec, random.Random(0), 8, 32, "dropped"), _random_clip(0)]
    for clip in clips:
        score = evaluate_clip(clip, spec)
        assert score.attributes == pytest.approx(np.mean([getattr(score, n) for n in ATTRIBUTE_NAMES]))
        assert score.motion == pytest.approx(np.mean([getattr(score, n) for n in MOTION_NAMES]))
        assert score.coherence == pytest.approx(math.sqrt(score.smoothness * score.persistence))
        assert score.reward == pytest.approx(score.attributes * score.motion * score.coherence * score.quality)
        assert score.steady == float(score.smoothness >= 0.5)
        assert list(score.as_dict()) == list(COMPONENT_NAMES)


def test_steady_marks_the_jerky_defects_and_no_others():
    """``steady`` reads a visible temporal defect off a clip: the defects that make a clip jump,
    shake or flicker are flagged, clips that are wrong in other ways are not."""
    def steady(defect: str) -> float:
        return float(np.mean([evaluate_clip(render_motion_defect(s, random.Random(i), 8, 32, defect), s).steady for i, s in enumerate(DEFECT_SPECS)]))

    assert all(evaluate_clip(render_clip(s), s).steady == 1.0 for s in DEFECT_SPECS)
    for defect in ("shuffled", "jitter", "flicker", "dropped"):
        assert steady(defect) <= 0.15, defect
    for defect in ("frozen", "reversed", "static", "vanish", "wrong_shape", "checker"):
        assert steady(defect) == 1.0, defect


@pytest.mark.parametrize("defect", sorted(DEFECT_COMPONENT))
def test_each_defect_lowers_its_component_and_the_reward(defect):
    component, ceiling, mean_ceiling = DEFECT_COMPONENT[defect]
    values = []
    for i, spec in enumerate(DEFECT_SPECS):
        clean = evaluate_clip(render_clip(spec), spec)
        bad = evaluate_clip(render_motion_defect(spec, random.Random(i), 8, 32, defect), spec)
        _check_valid(bad)
        assert getattr(bad, component) <= ceiling, (defect, spec.prompt, bad)
        assert bad.reward <= clean.reward - 0.15, (defect, spec.prompt, clean, bad)
        if defect in SECOND_COMPONENT:
            name, limit = SECOND_COMPONENT[defect]
            assert getattr(bad, name) <= limit, (defect, spec.prompt, bad)
        values.append(getattr(bad, component))
    assert np.mean(values) <= mean_ceiling, (defect, values)


def test_a_reversed_clip_is_right_in_every_frame():
    """Timing is scored by the motion components only: every frame of a reversed clip is a state of
    the prompted motion, so its attributes stay perfect."""
    for spec in SPECS[:7]:
        score = evaluate_clip(render_clip(spec)[::-1], spec)
        assert score.attributes >= 0.95 and score.amplitude >= 0.95 and score.smoothness >= 0.95, (spec.prompt, score)
        assert score.direction <= 0.05


def _random_clip(seed: int, frames: int = 8, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, size, size, 3), dtype=np.uint8)


def test_random_and_blank_clips_score_near_zero():
    for i, spec in enumerate(SPECS[:7]):
        noisy = evaluate_clip(_random_clip(i), spec)
        _check_valid(noisy)
        assert noisy.reward <= 0.1, (spec.prompt, noisy)
        blank = evaluate_clip(np.full((8, 32, 32, 3), BACKGROUNDS[spec.background], dtype=np.uint8), spec)
        _check_valid(blank)
        assert blank.background == pytest.approx(1.0)
        assert blank.reward == blank.amplitude == blank.quality == 0.0 and blank.persistence <= 1e-3


def test_other_lengths_and_sizes():
    for frames, size in ((4, 32), (16, 32), (8, 64)):
        for spec in SPECS[:7]:
            clean = evaluate_clip(render_clip(spec, frames, size), spec)
            assert clean.reward >= 0.95, (frames, size, spec.prompt, clean)
            reversed_ = evaluate_clip(render_clip(spec, frames, size)[::-1], spec)
            assert reversed_.direction <= 0.1 and reversed_.reward <= 0.6, (frames, size, spec.prompt, reversed_)


def test_bad_input_is_a_clear_error():
    spec = SPECS[0]
    with pytest.raises(SSPOError, match="at least 2 frames"):
        evaluate_clip(render_clip(spec)[:1], spec)
    for clip in (np.zeros((32, 32, 3)), np.zeros((8, 32, 32, 4)), np.zeros((8, 32, 16, 3))):
        with pytest.raises(SSPOError):
            evaluate_clip(clip, spec)
    with pytest.raises(SSPOError, match="2 clips but 1 specs"):
        evaluate_clips([render_clip(spec)] * 2, [spec])
    with pytest.raises(SSPOError, match="spinning"):
        evaluate_clip(render_clip(spec), "a small red circle spinning, white background")


def test_prompt_array_and_batch_agree():
    specs = SPECS[:7]
    clips = np.stack([render_clip(spec) for spec in specs])
    direct = [evaluate_clip(clip, spec) for clip, spec in zip(clips, specs)]
    assert evaluate_clips(clips, [spec.prompt for spec in specs]) == direct
    floats = evaluate_clips(list(clips.astype(np.float32) / 255.0), specs)  # read as 0..1, as the image evaluator reads them
    assert [s.reward for s in floats] == pytest.approx([s.reward for s in direct], abs=1e-3)
    means = mean_scores(direct, COMPONENT_NAMES)
    assert list(means) == list(COMPONENT_NAMES)
    assert means["reward"] == pytest.approx(np.mean([s.reward for s in direct]))
    assert math.isnan(mean_scores([], COMPONENT_NAMES)["reward"])


# --------------------------------------------------------------------------------------------------
# The VAE round trip


def test_round_trip_keeps_the_temporal_defects():
    """The shipped image VAE holds moving and resizing clips (their ceiling is its image ceiling,
    ~0.85) and the temporal defects survive it; see the module docstring for turning clips."""
    vae = load_vae(VAE)
    specs = [s for s in DEFECT_SPECS if s.motion != "turning"][:6]
    names = ("reversed", "static", "shuffled", "dropped", "vanish")
    defective = [render_motion_defect(s, random.Random(i), 8, 32, d) for d in names for i, s in enumerate(specs)]
    clips = np.stack([render_clip(s) for s in specs] + defective)
    decoded = round_trip_clips(vae, clips)
    assert decoded.shape == clips.shape and decoded.dtype == np.uint8
    scores = evaluate_clips(decoded, specs * (1 + len(names)))
    clean = scores[: len(specs)]
    defects = {name: scores[(k + 1) * len(specs) : (k + 2) * len(specs)] for k, name in enumerate(names)}
    assert all(s.reward >= 0.6 and s.motion >= 0.9 and s.smoothness >= 0.6 for s in clean), clean
    assert max(s.direction for s in defects["reversed"]) <= 0.1
    assert max(s.amplitude for s in defects["static"]) <= 0.1
    assert max(s.smoothness for s in defects["shuffled"]) <= 0.2
    assert np.mean([s.smoothness for s in defects["dropped"]]) <= 0.3
    assert np.mean([s.persistence for s in defects["vanish"]]) <= 0.9
    for name in names:
        assert np.mean([s.reward for s in defects[name]]) <= np.mean([s.reward for s in clean]) - 0.15, name


def test_round_trip_scores_table():
    table = round_trip_clip_scores(VAE, n=7, seed=0)
    assert list(table) == ["clean", *MOTION_DEFECTS]
    assert all(0.0 <= v <= 1.0 for v in table.values())
    assert table["clean"] >= 0.5
    for name in ("reversed", "static", "shuffled", "jitter", "dropped"):
        assert table[name] <= table["clean"] - 0.2, (name, table)
    with pytest.raises(ModelError, match="no VAE"):
        load_vae(VAE / "unet" / "missing")


def test_a_clip_that_changes_shape_midway_loses_persistence():
    spec = covering(1)[0]
    clip = render_clip(spec)
    other = render_clip(dataclasses.replace(spec, shape="circle" if spec.shape != "circle" else "square"))
    morphed = clip.copy()
    morphed[3] = other[3]
    assert evaluate_clip(clip, spec).persistence == pytest.approx(1.0)
    assert evaluate_clip(morphed, spec).persistence < 0.9  # one frame of another shape is not the same object


def test_an_identity_tie_goes_to_the_shape_the_prompt_names():
    from sspo.worlds.moving_shapes.evaluator import _identity_shape

    frames = [{"found": True, "plausible": ["circle", "square"]}] * 8  # every frame fits both equally
    assert _identity_shape(frames, "square") == "square" and _identity_shape(frames, "circle") == "circle"
