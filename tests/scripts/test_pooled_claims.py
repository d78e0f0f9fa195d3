"""``scripts/pooled-claims``: one effect pooled over comparisons that share their seeds and prompts."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
RESULTS = SCRIPTS.parent / "docs" / "results"


def pooled(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / "pooled-claims"), *map(str, argv)], capture_output=True, text=True, timeout=300)


def comparison(folder: Path, sspo: list[list[float]], sft: list[list[float]], seeds=(10, 11)) -> Path:
    """A results.json of two training seeds, one sampler seed, the rewards [seed][prompt] given."""
    def runs(rows):
        return [{"seen": {"per_image": row}, "heldout": {"per_image": row}} for row in rows]

    folder.mkdir()
    (folder / "results.json").write_text(json.dumps({"seeds": list(seeds), "sampler_seeds": 1, "results": {"sspo": runs(sspo), "sft": runs(sft)}}))
    return folder


def rows(stdout: str) -> dict[str, list[str]]:
    return {line.split(" | ")[0].removeprefix("| "): line.split(" | ")[1:] for line in stdout.splitlines()[2:]}


def test_the_pool_is_the_interval_of_the_comparisons_averaged_per_seed_and_prompt(tmp_path):
    from sspo.evaluation.scorers.stats import mean_ci_crossed

    a = comparison(tmp_path / "a", sspo=[[1.0, 3.0, 5.0], [4.0, 6.0, 7.0]], sft=[[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    b = comparison(tmp_path / "b", sspo=[[2.0, 2.0, 3.0], [3.0, 6.0, 6.0]], sft=[[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    done = pooled(a, b)
    assert done.returncode == 0, done.stderr
    # SSPO - SFT: a's [[0, 2, 4], [3, 5, 6]] and b's [[2, 2, 3], [3, 6, 6]] average to [[1, 2, 3.5], [3, 5.5, 6]].
    want, first = mean_ci_crossed([[1.0, 2.0, 3.5], [3.0, 5.5, 6.0]]), mean_ci_crossed([[0.0, 2.0, 4.0], [3.0, 5.0, 6.0]])
    cells = rows(done.stdout)["sft"]
    assert cells[2] == f"{want['mean']:+.3f} [{want['ci95_low']:+.3f}, {want['ci95_high']:+.3f}]"
    assert cells[0] == f"{first['mean']:+.3f} [{first['ci95_low']:+.3f}, {first['ci95_high']:+.3f}]" and len(cells) == 4
    # Two seeds are too few to decide, whatever the interval.
    assert cells[3] == "undecided (2 training seeds are too few to decide: train 3 or more) |"
    swapped = rows(pooled("--subject", "sft", a, b).stdout)["sspo"][2]
    assert swapped == f"{-want['mean']:+.3f} [{-want['ci95_high']:+.3f}, {-want['ci95_low']:+.3f}]"


def test_comparisons_trained_on_other_seeds_are_refused(tmp_path):
    a = comparison(tmp_path / "a", sspo=[[1.0], [2.0]], sft=[[0.0], [0.0]])
    b = comparison(tmp_path / "b", sspo=[[1.0], [2.0]], sft=[[0.0], [0.0]], seeds=(0, 1))
    done = pooled(a, b)
    assert done.returncode == 2 and f"{b} has training seeds [0, 1], {a} [10, 11]: pool comparisons trained and scored alike" in done.stderr
    c = comparison(tmp_path / "c", sspo=[[1.0, 2.0], [2.0, 3.0]], sft=[[0.0, 0.0], [0.0, 0.0]])  # two prompts, not one
    done = pooled(a, c)
    assert done.returncode == 2 and f"{c} has heldout images 2, {a} 1: pool comparisons trained and scored alike" in done.stderr
    done = pooled("--subject", "dpo", a)
    assert done.returncode == 2 and f"--subject dpo: {a} did not train that arm" in done.stderr


def test_the_recorded_levels_pooled():
    levels = [RESULTS / f"regimes-{level}-fresh" for level in ("low", "mid", "high")]
    held_out, seen = rows(pooled(*levels).stdout), rows(pooled("--split", "seen", *levels).stdout)
    assert held_out["sft"][3:] == ["+0.024 [+0.009, +0.038]", "SSPO higher |"]
    assert seen["sft"][3:] == ["+0.031 [+0.013, +0.050]", "SSPO higher |"]
    assert held_out["ssr_off"][3:] == ["-0.080 [-0.113, -0.048]", "SSPO lower |"]
