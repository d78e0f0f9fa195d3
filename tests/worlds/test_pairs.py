"""Pick-a-Pic-shaped pairs of a world: G's two samples per prompt, ranked by the exact reward."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sspo.errors import ConfigError
from sspo.worlds.pairs import PairsConfig, rank_pairs, training_specs
from sspo.worlds.shapes.world import make_split

QUICK = PairsConfig(steps=2, base="shapes-base:quick", max_prompts=16)  # what `sspo pairs --quick` builds


# --------------------------------------------------------------------------------------------------
# Ranking (no model)


def test_ties_are_dropped_and_the_higher_reward_wins_on_a_random_side():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0, 1, 400), rng.uniform(0, 1, 400)
    b[:50] = a[:50] + rng.uniform(-0.019, 0.019, 50)  # near-ties
    ranked = rank_pairs(a, b, tie_threshold=0.02, bt_temperature=0.0, seed=3)
    assert len(ranked) == int((np.abs(a - b) >= 0.02).sum()) <= 350
    assert all(r.index >= 50 or abs(a[r.index] - b[r.index]) >= 0.02 for r in ranked)
    for r in ranked:
        scores = (r.reward_a, r.reward_b)
        assert scores[r.winner] > scores[1 - r.winner]
    first = np.mean([r.winner_first for r in ranked])
    assert 0.4 < first < 0.6  # label_0 is not constant: the winner's column is a fair draw
    assert rank_pairs(a, b, 0.02, 0.0, seed=3) == ranked
    assert rank_pairs(a, b, 0.02, 0.0, seed=4) != ranked


def test_bradley_terry_labels_agree_with_the_reward_as_often_as_the_model_says():
    a = np.full(4000, 0.7)
    b = np.full(4000, 0.6)  # every difference is 0.1
    ranked = rank_pairs(a, b, tie_threshold=0.0, bt_temperature=0.1, seed=0)
    agree = np.mean([r.winner == 0 for r in ranked])
    assert agree == pytest.approx(1 / (1 + math.exp(-1)), abs=0.03)  # sigmoid(0.1 / 0.1)
    assert all(r.winner == 0 for r in rank_pairs(a, b, 0.0, 0.0, seed=0))  # off: the reward decides


def test_prompts_are_training_combinations_never_validation_or_held_out():
    split = make_split(0)
    specs = training_specs(PairsConfig(steps=1))
    assert set(specs) == set(split.train_without_validation)
    assert not set(specs) & (set(split.validation) | set(split.heldout))
    assert set(training_specs(QUICK)) < set(specs) and len(training_specs(QUICK)) == 16


def test_clip_pairs_draw_from_the_video_worlds_training_combinations():
    from sspo.worlds.moving_shapes.world import make_motion_split

    split = make_motion_split(0)
    specs = training_specs(PairsConfig(steps=1, base="moving-shapes-base", max_prompts=480))
    assert len(specs) == 480 and set(specs) < set(split.train_without_validation)
    assert all(spec.motion for spec in specs)


@pytest.mark.parametrize("base", ["sd15", "nowhere-base", "shapes-base:huge"])
def test_a_base_of_no_world_with_pairs_is_a_config_error(base):
    with pytest.raises(ConfigError, match="base"):
        PairsConfig(steps=1, base=base)


@pytest.mark.parametrize("reward, fix", [
    (0.001, "G makes nothing the evaluator scores: give it more SFT steps (--steps N), or the full base (without --quick)"),
    (0.6, "lower --tie-threshold"),
], ids=["samples that score about 0", "close samples"])
def test_all_ties_are_refused_with_the_fix_for_their_cause(reward, fix):
    from sspo.errors import SSPOError
    from sspo.worlds.pairs import Measured, require_kept

    measured = Measured(specs=[None] * 16, samples=[], stored=(np.zeros(16), np.zeros(16)), round_trip=(np.zeros(16), np.zeros(16)),
                        ranked=[], stats={"R_G": reward})
    with pytest.raises(SSPOError) as raised:
        require_kept(measured, 0.02)
    assert str(raised.value) == f"every one of G's 16 pairs is a tie below 0.02 (G's mean exact reward {reward:.3f}); {fix}"
