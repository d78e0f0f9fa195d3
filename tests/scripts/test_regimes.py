"""``scripts/regimes``: levels' comparisons gathered into one table and the reward-vs-R_win figure."""

import json
import subprocess
import sys
from pathlib import Path

from sspo.commands import compare
from sspo.commands.pairs import level_pairs

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "compare-shapes.yaml"


def test_levels_are_gathered_with_their_r_values_and_paired_differences(quick_base, tmp_path):
    folder, record = level_pairs("shapes", "mid", quick=True)
    tiny = [f"model.pretrained={quick_base}", "data.max_samples=16", "negatives.steps=2", "optim.batch_size=4"]
    level = [*tiny, "data.source=parquet", f"data.path={folder / 'pairs.parquet'}", "validation.world=shapes"]
    compare.run_compare(CONFIG, ["base", "sft", "sspo"], [0, 1], tmp_path / "mid", overrides=level, quick=True, prompts_per_split=2)
    compare.run_compare(CONFIG, ["ssr_draws_8"], [0, 1], tmp_path / "mid-more", overrides=level, quick=True, prompts_per_split=2)
    compare.run_compare(CONFIG, ["base", "sft", "sspo"], [0, 1], tmp_path / "clean", overrides=tiny, quick=True, prompts_per_split=2,
                        chosen_in=tmp_path / "mid" / "results.json")
    out = tmp_path / "regimes"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "regimes"), "--level", f"mid={tmp_path / 'mid'},{tmp_path / 'mid-more'}",
                           "--level", f"clean={tmp_path / 'clean'}", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.with_suffix(".json").read_text())
    mid, clean = report["levels"]["mid"], report["levels"]["clean"]
    assert (mid["R_base"], mid["R_win"], mid["R_ceil"], mid["pairs"]) == (record["R_base"], record["R_win"], record["R_ceil"], record["pairs"])
    assert clean["R_win"] == clean["R_ceil"] == record["R_ceil"] and clean["R_base"] == record["R_base"]
    assert set(mid["arms"]) == {"base", "sft", "sspo", "ssr_draws_8"} and len(mid["commands"]) == 2
    assert mid["seeds"] == [0, 1] and mid["selection_seeds"] == 2  # the default, though no grid chose anything
    assert mid["settings_from"] == [] and clean["settings_from"] == [str(tmp_path / "mid" / "results.json")]
    sft = mid["arms"]["sft"]
    difference = sft["sspo_minus_arm"]["heldout"]["mean"]
    assert abs(difference - (mid["arms"]["sspo"]["heldout"]["mean"] - sft["heldout"]["mean"])) < 1e-9  # paired: the same prompts and seeds
    assert "sspo_minus_arm" not in mid["arms"]["sspo"]
    assert out.with_suffix(".png").stat().st_size > 0
    assert not out.with_suffix(".md").exists()  # the page of that name is written by hand
    table = out.with_name(out.name + "-tables.md").read_text()
    assert "### clean: R_base" in table and "| ssr_draws_8 |" in table
