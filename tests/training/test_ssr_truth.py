"""SSR and RCR against ground truth: the agreement statistics, and the logging on the quick world."""

import math

import pytest
import torch

from sspo.errors import ConfigError
from sspo.io import read_jsonl
from sspo.training.ssr_truth import FILE, agreement, correlation, summarize_ssr_truth
from sspo.training.trainer import Trainer

from test_trainer import tiny_config


def test_agreement_counts_by_hand():
    # K=+1 on pairs 0, 1, 2; the reference's sample was as good on pairs 0, 3
    stats = agreement([True, True, True, False, False], [True, False, False, True, False])
    assert stats["n"] == 5
    assert stats["accuracy"] == pytest.approx(2 / 5)  # pairs 0 and 4
    assert stats["precision"] == pytest.approx(1 / 3)
    assert stats["recall"] == pytest.approx(1 / 2)
    assert stats["ssr_rate"] == pytest.approx(3 / 5)
    assert math.isnan(agreement([False, False], [False, False])["precision"])


def test_correlation_is_nan_when_undefined():
    assert correlation([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert correlation([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(correlation([1, 1, 1], [1, 2, 3]))
    assert math.isnan(correlation([1, 2], [1, 2]))


def test_summarize_by_iteration_and_checkpoint():
    rows = [
        {"iteration": 0, "checkpoint": 0, "margin": 0.2, "K": 1, "reward_l": 0.6, "reward_policy": 0.5},
        {"iteration": 0, "checkpoint": 0, "margin": -0.1, "K": -1, "reward_l": 0.4, "reward_policy": 0.5},
        {"iteration": 0, "checkpoint": 0, "margin": -0.3, "K": -1, "reward_l": 0.2, "reward_policy": None},
        {"iteration": 1, "checkpoint": 1, "margin": 0.1, "K": 1, "reward_l": 0.3, "reward_policy": 0.7},
    ]
    summary = summarize_ssr_truth(rows)
    assert summary["iterations"][0]["n"] == 2 and summary["iterations"][0]["accuracy"] == 1.0
    assert summary["iterations"][1]["accuracy"] == 0.0
    assert summary["overall"]["n"] == 3 and summary["overall"]["precision"] == pytest.approx(1 / 2)
    assert summary["negative_reward_by_checkpoint"] == {0: {"n": 3, "mean": pytest.approx(0.4)}, 1: {"n": 1, "mean": pytest.approx(0.3)}}


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.policy.named_parameters() if p.requires_grad}


@pytest.mark.slow
@pytest.mark.parametrize("ssr_draws", [1, 2])
def test_ground_truth_rows_on_the_quick_world_leave_training_unchanged(ssr_draws, quick_base, tmp_path):
    common = ["iterations=2", "steps_per_iteration=2", f"ssr_draws={ssr_draws}"]
    plain = Trainer(tiny_config(tmp_path / "plain", quick_base, *common))
    plain.train()
    watched = Trainer(tiny_config(tmp_path / "watched", quick_base, *common, "diagnostics.ssr_truth_per_batch=3"))
    watched.train()
    for name, value in _weights(plain).items():  # diagnostics draw no random numbers the run uses
        assert torch.equal(value, _weights(watched)[name]), name

    rows = read_jsonl(tmp_path / "watched" / FILE)
    batch = watched.cfg.optim.batch_size
    assert len(rows) == 2 * 2 * batch  # every negative of every step
    assert {r["step"] for r in rows} == {1, 2, 3, 4}
    for step in (1, 2, 3, 4):  # one micro-batch per step: its first 3 pairs get the policy's own sample
        assert [r["reward_policy"] is not None for r in rows if r["step"] == step] == [True] * 3 + [False] * (batch - 3)
    for iteration in (0, 1):
        assert {r["checkpoint"] for r in rows if r["iteration"] == iteration} <= set(range(iteration + 1))
    for row in rows:
        assert 0.0 <= row["reward_l"] <= 1.0
        assert row["K"] == (1 if row["margin"] > 0 else -1)
    summary = summarize_ssr_truth(rows)
    assert set(summary["iterations"]) == {0, 1} and summary["overall"]["n"] == 12


def test_needs_the_prompts_of_a_world_of_images(quick_base, tmp_path):
    for other in ("data.source=parquet", "validation.world=moving-shapes"):
        with pytest.raises(ConfigError, match=r"needs a world's prompts, of images \(shapes: "):
            tiny_config(tmp_path, quick_base, "diagnostics.ssr_truth_per_batch=2", other, "data.path=x.parquet", "data.source=parquet")
    # its pairs in a parquet (sspo pairs), scored as the world's
    cfg = tiny_config(tmp_path, quick_base, "diagnostics.ssr_truth_per_batch=2", "data.source=parquet", "data.path=x.parquet", "validation.world=shapes")
    assert cfg.diagnostics.ssr_truth_per_batch == 2
