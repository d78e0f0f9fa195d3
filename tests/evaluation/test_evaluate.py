"""What the evaluation shows of its samples: the showcase's picks, their rewards and the grid's notes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sspo.evaluation.evaluate import EvalConfig, eval_items, showcase, showcase_picks, showcase_rewards
from sspo.evaluation.sampling import clip_grid, image_grid


def test_showcase_rewards_are_the_rewards_of_the_images_it_shows():
    cfg = EvalConfig(prompts="shapes", prompts_per_split=6, seeds=(0, 1))
    items = eval_items(cfg)
    # A made-up reward per image, distinct, from which each image's place can be read back.
    rewards = [k / 1000 for k in range(len(items))]
    summary = {}
    for category in dict.fromkeys(i.category for i in items):
        summary[category] = {"per_image": [rewards[k] for k, i in enumerate(items) if i.category == category]}
    picks = showcase_picks(cfg)
    assert len(picks) == 8 and all(items[k].seed == 0 for k in picks)
    assert showcase_rewards(cfg, summary) == [rewards[k] for k in picks]
    shown, captions = showcase(cfg, list(range(len(items))))
    assert shown == picks and all(items[k].prompt in caption for k, caption in zip(picks, captions))


def test_grid_notes_are_drawn_under_their_cells():
    cells = [[Image.new("RGB", (8, 8), "white")] * 2] * 2
    plain = image_grid(cells, ["a", "b"], cell=32)
    noted = image_grid(cells, ["a", "b"], cell=32, notes=[["0.10", "0.20"], ["0.30", "0.40"]])
    assert noted.height == plain.height + 2 * 12 and noted.width == plain.width
    under_first = np.asarray(noted)[32:44, 90:122]  # the strip under row a's first cell
    assert (under_first < 128).any()  # text drawn
    clip = np.zeros((3, 8, 8, 3), dtype=np.uint8) + 255
    frames = clip_grid([[clip, clip]], ["a"], cell=32, notes=[["x", "y"]])
    assert len(frames) == 3 and frames[0].height == 32 + 12


def test_a_reward_gain_is_the_model_minus_its_baseline_over_prompts():
    from sspo.evaluation.evaluate import reward_gain

    gain = reward_gain({"per_prompt": [2.0, 2.1, 1.9]}, {"per_prompt": [1.0, 1.0, 1.0]})
    assert gain["mean"] == pytest.approx(1.0) and gain["ci95_low"] > 0 and gain["n"] == 3


def test_the_summary_averages_each_prompts_seeds_for_the_intervals(monkeypatch):
    """Two seeds of one prompt are not independent samples: the gains' CIs are over prompts."""
    from sspo.evaluation import evaluate, sampling

    cfg = EvalConfig(prompts="shapes", prompts_per_split=2, seeds=(0, 1), guidance_scale=1.0)
    items = eval_items(cfg)
    monkeypatch.setattr(sampling, "generate", lambda pipe, prompts, seeds, **options: list(range(len(prompts))))
    monkeypatch.setattr(evaluate, "score_images", lambda images, prompts, metrics, **options: {metrics[0]: [k / 10 for k in images]})
    summary, _ = evaluate.evaluate_pipeline(None, cfg, device="cpu")
    for category, scores in summary.items():
        members = [k for k, i in enumerate(items) if i.category == category]
        assert scores["per_image"] == [k / 10 for k in members]
        assert scores["per_prompt"] == pytest.approx([(a + b) / 20 for a, b in zip(members[::2], members[1::2])])
