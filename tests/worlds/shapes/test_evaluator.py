"""The shapes world's exact evaluator: clean renders score ~1, each defect hits its component."""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import pytest

from sspo.errors import SSPOError
from sspo.worlds.shapes.evaluator import (
    ATTRIBUTE_NAMES,
    COMPONENT_NAMES,
    QUALITY_NAMES,
    ShapeScore,
    evaluate,
    evaluate_batch,
    evaluate_prompt,
    mean_scores,
)
from sspo.worlds.shapes.world import BACKGROUNDS, COLORS, DEFECTS, all_specs, render, render_defect

SPECS = random.Random(0).sample(all_specs(), 40)
DEFECT_SPECS = random.Random(1).sample(all_specs(), 16)

# defect -> (the component it must hit, the most that component may score on any image)
DEFECT_COMPONENT = {
    "blur": ("sharpness", 0.6),
    "smear": ("sharpness", 0.8),
    "noise": ("noise", 0.2),
    "checker": ("noise", 0.75),
    "wrong_color": ("color", 0.1),
    "wrong_shape": ("shape", 0.1),
    "wrong_position": ("position", 0.1),
}


def _random_image(seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _check_valid(score: ShapeScore) -> None:
    for name, value in score.as_dict().items():
        assert isinstance(value, float), name
        assert not math.isnan(value), name
        assert 0.0 <= value <= 1.0, (name, value)


def test_component_names_cover_the_score():
    assert ATTRIBUTE_NAMES == ("background", "color", "shape", "size", "position")
    assert QUALITY_NAMES == ("noise", "sharpness")
    assert set(COMPONENT_NAMES) == {f.name for f in dataclasses.fields(ShapeScore)}
    assert set(ATTRIBUTE_NAMES) | set(QUALITY_NAMES) <= set(COMPONENT_NAMES)


def test_clean_renders_score_high():
    for spec in SPECS:
        score = evaluate(render(spec), spec)
        _check_valid(score)
        assert score.reward >= 0.95, (spec.prompt, score)
        assert score.quality >= 0.95, (spec.prompt, score)
        for name in ATTRIBUTE_NAMES:
            assert getattr(score, name) >= 0.95, (spec.prompt, name, score)


def test_score_combination():
    spec = SPECS[0]
    for image in (render(spec), render_defect(spec, random.Random(0), 32, "blur"), _random_image(0)):
        score = evaluate(image, spec)
        assert score.attributes == pytest.approx(np.mean([getattr(score, n) for n in ATTRIBUTE_NAMES]))
        assert score.quality == pytest.approx(math.sqrt(score.noise * score.sharpness))
        assert score.reward == pytest.approx(score.attributes * score.quality)
        assert list(score.as_dict()) == list(COMPONENT_NAMES)
    with pytest.raises(dataclasses.FrozenInstanceError):
        score.reward = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("defect", sorted(DEFECT_COMPONENT))
def test_each_defect_lowers_its_component_and_the_reward(defect):
    component, ceiling = DEFECT_COMPONENT[defect]
    assert defect in DEFECTS
    clean_values, bad_values = [], []
    for i, spec in enumerate(DEFECT_SPECS):
        clean = evaluate(render(spec), spec)
        bad = evaluate(render_defect(spec, random.Random(i), 32, defect), spec)
        _check_valid(bad)
        assert getattr(bad, component) <= ceiling, (defect, spec.prompt, bad)
        assert bad.reward <= clean.reward - 0.15, (defect, spec.prompt, clean, bad)
        clean_values.append(getattr(clean, component))
        bad_values.append(getattr(bad, component))
    assert np.mean(bad_values) <= np.mean(clean_values) - 0.4


def test_wrong_size_and_background_hit_their_components():
    for spec in DEFECT_SPECS:
        other_size = spec.replace(size="large" if spec.size == "small" else "small")
        score = evaluate(render(other_size), spec)
        assert score.size <= 0.1 and score.reward <= 0.85, (spec.prompt, score)
        other_bg = spec.replace(background=next(b for b in BACKGROUNDS if b != spec.background))
        score = evaluate(render(other_bg), spec)
        assert score.background <= 0.1 and score.reward <= 0.85, (spec.prompt, score)
        assert score.color >= 0.95 and score.shape >= 0.95  # judged against the observed background


def test_random_noise_scores_near_zero():
    for i, spec in enumerate(SPECS[:20]):
        score = evaluate(_random_image(100 + i), spec)
        _check_valid(score)
        assert score.reward <= 0.15, (spec.prompt, score)
        assert score.noise <= 0.1


def test_blank_background_scores_low():
    for spec in SPECS[:10]:
        blank = np.full((32, 32, 3), BACKGROUNDS[spec.background], dtype=np.uint8)
        score = evaluate(blank, spec)
        _check_valid(score)
        assert score.background == pytest.approx(1.0)
        assert score.color == score.shape == score.size == score.position == 0.0
        assert score.reward <= 0.05


def test_degenerate_images_do_not_crash():
    spec = SPECS[0]
    checker = ((np.indices((32, 32)).sum(0) % 2) * 255).astype(np.uint8)
    half = np.zeros((32, 32, 3), dtype=np.uint8)
    half[:, :16] = 255
    speck = np.full((32, 32, 3), BACKGROUNDS[spec.background], dtype=np.uint8)
    speck[5, 7] = COLORS[spec.color]
    images = [
        np.full((32, 32, 3), COLORS[spec.color], dtype=np.uint8),  # all object color
        np.zeros((32, 32, 3), dtype=np.uint8),
        np.full((32, 32, 3), 255, dtype=np.uint8),
        checker,  # grayscale HxW
        half,
        speck,
        np.random.default_rng(0).random((32, 32, 3)),  # float in [0, 1]
        np.zeros((8, 8, 3), dtype=np.uint8),
        np.dstack([np.asarray(render(spec)), np.full((32, 32), 255, np.uint8)]),  # RGBA
    ]
    for image in images:
        _check_valid(evaluate(image, spec))
    assert evaluate(images[0], spec).reward <= 0.05


def test_bad_input_is_a_clear_error():
    spec = SPECS[0]
    for image in (np.zeros((32, 16, 3)), np.zeros((32, 32, 5)), np.full((32, 32, 3), np.nan)):
        with pytest.raises(SSPOError):
            evaluate(image, spec)
    with pytest.raises(SSPOError, match="2 images but 1 specs"):
        evaluate_batch([render(spec), render(spec)], [spec])


def test_pil_array_prompt_and_batch_agree():
    specs = SPECS[:6]
    images = [render(spec) for spec in specs]
    direct = [evaluate(image, spec) for image, spec in zip(images, specs)]
    assert [evaluate(np.asarray(image), spec) for image, spec in zip(images, specs)] == direct
    assert [evaluate_prompt(image, spec.prompt) for image, spec in zip(images, specs)] == direct
    stacked = np.stack([np.asarray(image) for image in images])
    assert evaluate_batch(stacked, specs) == direct
    assert evaluate_batch(images, [spec.prompt for spec in specs]) == direct
    means = mean_scores(direct)
    assert means["reward"] == pytest.approx(np.mean([s.reward for s in direct]))


def test_works_at_64():
    for i, spec in enumerate(SPECS[:8]):
        clean = evaluate(render(spec, 64), spec)
        assert clean.reward >= 0.95, (spec.prompt, clean)
        assert min(getattr(clean, n) for n in ATTRIBUTE_NAMES) >= 0.95, (spec.prompt, clean)
        blurred = evaluate(render_defect(spec, random.Random(i), 64, "blur"), spec)
        assert blurred.sharpness <= 0.6 and blurred.reward <= clean.reward - 0.15
        recolored = evaluate(render_defect(spec, random.Random(i), 64, "wrong_color"), spec)
        assert recolored.color <= 0.1
    assert evaluate(_random_image(7, 64), SPECS[0]).reward <= 0.15


def test_a_blurred_object_is_sized_by_any_shape_that_fits_about_as_well():
    from PIL import Image, ImageFilter

    from sspo.worlds.shapes.world import ShapeSpec

    spec = ShapeSpec(shape="triangle", color="green", size="small", position="left", background="gray")
    blurred = Image.fromarray(np.asarray(render(spec, 32))).filter(ImageFilter.GaussianBlur(1.5))
    assert evaluate(blurred, spec).size > 0.9  # sized as the best fit alone (a circle), it reads as the wrong size (~0.3)
