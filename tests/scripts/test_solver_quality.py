"""``scripts/solver-quality``: paired differences from the reference, what matches, the smallest matching steps."""

import importlib.machinery
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "solver-quality"


def load_script():
    loader = importlib.machinery.SourceFileLoader("solver_quality", str(SCRIPT))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("solver_quality", loader))
    loader.exec_module(module)
    return module


sq = load_script()


def row(steps: int, match: bool) -> dict:
    return {"steps": steps, "match": match}


@pytest.mark.parametrize("results, expected", [
    ({4: False, 6: True, 8: True, 10: True}, 6),
    ({4: True, 6: False, 8: True, 10: True}, 8),  # a match below a mismatch is not the threshold
    ({4: True, 6: True, 8: True}, 4),
    ({4: True, 6: True, 8: False}, None),  # the largest measured does not match
])
def test_the_smallest_steps_is_the_lowest_of_an_unbroken_run_of_matches_up_to_the_largest(results, expected):
    rows = {"ddim=20": {"steps": 20}, **{f"dpm++={s}": row(s, m) for s, m in results.items()}, "unipc=4": row(4, True), "unipc=10": row(10, False)}
    assert sq.choose_steps(rows) == {"dpm++": expected, "unipc": None}


def test_a_match_needs_every_ci_to_contain_zero_and_resolution_is_the_widest_bound():
    close = {"mean": {"diff": 0.01, "ci95_low": -0.02, "ci95_high": 0.04}, "p50": {"diff": 0.0, "ci95_low": 0.0, "ci95_high": 0.0}}
    assert sq.matches(close) and sq.resolution(close) == pytest.approx(0.04)
    off = close | {"p90": {"diff": -0.05, "ci95_low": -0.09, "ci95_high": -0.01}}
    assert not sq.matches(off) and sq.resolution(off) == pytest.approx(0.09)


def synthetic_rewards(prompts: int = 30, seeds: int = 4):
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(prompts), seeds)
    reference = np.clip(rng.normal(0.5, 0.2, prompts)[groups] + rng.normal(0, 0.1, len(groups)), 0, 1)
    return reference, groups, rng


def test_paired_differences_of_identical_samples_are_zero_and_a_shift_is_found():
    reference, groups, rng = synthetic_rewards()
    same = sq.paired_differences(reference.copy(), reference, groups, resamples=200)
    assert all(d == {"diff": 0.0, "ci95_low": 0.0, "ci95_high": 0.0} for d in same.values()) and sq.matches(same)
    assert list(same) == ["mean", "p10", "p25", "p50", "p75", "p90"]
    shifted = sq.paired_differences(reference - 0.1, reference, groups, resamples=200)
    assert shifted["mean"]["diff"] == pytest.approx(-0.1) and shifted["mean"]["ci95_high"] < 0
    assert shifted["p50"]["ci95_high"] < 0 and not sq.matches(shifted)
    noisy = sq.paired_differences(reference + rng.normal(0, 0.05, len(reference)), reference, groups, resamples=200)
    assert sq.matches(noisy) and 0 < sq.resolution(noisy) < 0.1  # unbiased noise: no difference, and a narrow CI says so


def test_solver_arguments_are_parsed_and_bad_ones_refused():
    assert sq.parse_solver("unipc=4,8") == [("unipc", 4), ("unipc", 8)]
    for bad in ("plms=4", "dpm++", "dpm++=4,x", "dpm++=0"):
        with pytest.raises(Exception, match="expected|steps must"):
            sq.parse_solver(bad)


def test_the_script_writes_the_reference_and_each_sampler_on_the_quick_base(quick_base, tmp_path):
    out = tmp_path / "solver-quality"
    done = subprocess.run([sys.executable, str(SCRIPT), "--model", "shapes-base:quick", "--limit", "3", "--seeds", "2", "--bootstrap", "50",
                           "--solver", "unipc=2,3", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["n_prompts"] == 3 and report["guidance_scale"] == 5.0 and report["prompts"] == "shapes-validation"
    rows = report["models"]["base"]["rows"]
    assert list(rows) == ["ddim=20", "unipc=2", "unipc=3"] and "vs_reference" not in rows["ddim=20"]
    assert set(rows["unipc=2"]["vs_reference"]) == {"mean", "p10", "p25", "p50", "p75", "p90"}
    assert set(report["models"]["base"]["chosen"]) == {"unipc"}
    assert "| unipc | 3 | 0.15 |" in out.with_suffix(".md").read_text()
