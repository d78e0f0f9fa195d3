import json
from pathlib import Path

import pytest

from sspo import compare
from sspo.errors import ConfigError

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "compare-shapes.yaml"


def test_compare_writes_tables_and_figures_and_reuses_finished_arms(quick_base, tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    overrides = [f"model.pretrained={quick_base}", "data.max_samples=64", "negatives.steps=2", "optim.batch_size=4"]
    results = compare.run_compare(CONFIG, ["base", "sft", "sspo", "ssr_off"], [0, 1], out, overrides=overrides, quick=True, command="test")
    assert len(results["base"]) == 1 and len(results["sspo"]) == 2  # the base is not trained: one seed
    report = (out / "results.md").read_text()
    assert "Table 1: methods — held-out prompts" in report and "Table 6: SSPO ablations — seen prompts" in report
    assert "| sspo | " in report and "±" in report
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["results"]) == {"base", "sft", "sspo", "ssr_off"}
    for name in ("figure9_reward.png", "figure4_ssr_rate.png", "grid.png"):
        assert (out / name).stat().st_size > 0
    # Every arm shares the budget: same steps, batch and learning rate.
    configs = [json.loads(json.dumps(compare.arm_config(CONFIG, arm, 0, out, [*compare.QUICK, *overrides]).optim.__dict__)) for arm in ("sft", "sspo")]
    assert configs[0] == configs[1]

    def no_training(*args, **kwargs):
        raise AssertionError("a finished arm was trained again")

    monkeypatch.setattr(compare, "train", no_training)
    again = compare.run_compare(CONFIG, ["base", "sft", "sspo", "ssr_off"], [0, 1], out, overrides=overrides, quick=True)
    assert again == results


def test_unknown_arm_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown arm 'ppo'"):
        compare.run_compare(CONFIG, ["ppo"], [0], tmp_path)
