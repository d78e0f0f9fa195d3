"""``scripts/ci-coverage`` and ``scripts/recheck-claims``: the comparisons' statistics checked by simulation and on the recorded results."""

import re
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def test_coverage_is_printed_for_every_seed_prompt_and_spread_cell():
    done = subprocess.run([sys.executable, str(SCRIPTS / "ci-coverage"), "--trials", "40"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = re.findall(r"^\| (\d+) \| (\d+) \| [\d.]+ \| [\d.]+ \| ([\d.]+) \| ([\d.]+) \|$", done.stdout, re.M)
    assert len(rows) == 28 and all(0.5 < float(coverage) <= 1 and float(width) > 0 for *_, coverage, width in rows)


def test_recorded_claims_are_decided_again_beside_their_record():
    done = subprocess.run([sys.executable, str(SCRIPTS / "recheck-claims")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| clean | sft | 5 | -0.019 [-0.036, -0.002] | SSPO lower | " in done.stdout
    changed = [line for line in done.stdout.splitlines() if line.endswith(" (changed) |")]
    assert [line.split(" | ")[0:2] for line in changed] == [["| flow-5seeds", "sft"], ["| regimes-mid", "sft"], ["| regimes-mid-replay", "sft"]]
    assert done.stdout.rstrip().endswith("\n3 verdicts changed.")


def test_another_subject_decides_its_own_differences_and_the_swap_negates_sspos():
    def rows(*argv):
        done = subprocess.run([sys.executable, str(SCRIPTS / "recheck-claims"), *argv, str(SCRIPTS.parent / "docs/results/regimes-mid")],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return {line.split(" | ")[1]: line.split(" | ")[5] for line in done.stdout.splitlines() if line.startswith("| regimes-mid |")}

    sspo, spin = rows(), rows("--subject", "spin")
    assert sspo["spin"] == "-0.031 [-0.050, -0.013]" and spin["sspo"] == "+0.031 [+0.013, +0.050]"  # spin - SSPO
    assert set(spin) == {"sft", "dpo", "sspo", "ssr_off", "base"} and spin["sft"] != sspo["sft"]
    done = subprocess.run([sys.executable, str(SCRIPTS / "recheck-claims"), "--subject", "spn"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--subject spn: no comparison among those folders trained that arm" in done.stderr
