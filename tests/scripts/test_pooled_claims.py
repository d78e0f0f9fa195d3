"""``scripts/pooled-claims``: one effect pooled over comparisons that share their seeds and prompts."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
RESULTS = SCRIPTS.parent / "docs" / "results"


def pooled(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / "pooled-claims"), *map(str, argv)], capture_output=True, text=True, timeout=300)


def comparison(folder: Path, seeds=(10, 11), **arms: list[list[float]]) -> Path:
    """A results.json of two training seeds, one sampler seed, each arm's rewards [seed][prompt] given."""
    def runs(rows):
        return [{"seen": {"per_image": row}, "heldout": {"per_image": row}} for row in rows]

    folder.mkdir()
    (folder / "results.json").write_text(json.dumps({"seeds": list(seeds), "sampler_seeds": 1, "results": {arm: runs(rows) for arm, rows in arms.items()}}))
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


def test_the_recorded_sft_at_five_times_its_steps_paired_with_the_levels():
    levels = [RESULTS / f"regimes-{level}-fresh" for level in ("low", "mid", "high")]
    longer = "sft-5x=sft:" + ",".join(str(RESULTS / f"regimes-{level}-sft5x") for level in ("low", "mid", "high"))
    held_out = rows(pooled(*levels, "--add-arm", longer).stdout)
    assert held_out["sft-5x"] == ["-0.004 [-0.038, +0.031]", "+0.036 [+0.003, +0.068]", "+0.034 [+0.015, +0.052]",
                                  "+0.022 [+0.004, +0.040]", "SSPO higher |"]
    assert rows(pooled("--subject", "sft", *levels, "--add-arm", longer).stdout)["sft-5x"][3] == "-0.002 [-0.016, +0.013]"


def test_an_arm_of_other_comparisons_is_paired_with_the_subject(tmp_path):
    from sspo.evaluation.scorers.stats import mean_ci_crossed

    base = [[0.5, 0.25, 0.75], [0.5, 0.25, 0.75]]  # the same images wherever it is scored
    a = comparison(tmp_path / "a", sspo=[[1.0, 3.0, 5.0], [4.0, 6.0, 7.0]], sft=[[9.0] * 3] * 2, base=base)
    b = comparison(tmp_path / "b", sspo=[[2.0, 2.0, 3.0], [3.0, 6.0, 6.0]], sft=[[9.0] * 3] * 2, base=base)
    a_more = comparison(tmp_path / "a-more", sft=[[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], base=base)
    b_more = comparison(tmp_path / "b-more", sft=[[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], base=base)
    done = pooled(a, b, "--add-arm", f"sft-longer=sft:{a_more},{b_more}")
    assert done.returncode == 0, done.stderr
    # a's SSPO minus a-more's SFT, b's minus b-more's: the first test's numbers, pooled the same way.
    want, first = mean_ci_crossed([[1.0, 2.0, 3.5], [3.0, 5.5, 6.0]]), mean_ci_crossed([[0.0, 2.0, 4.0], [3.0, 5.0, 6.0]])
    cells = rows(done.stdout)["sft-longer"]
    assert cells[0] == f"{first['mean']:+.3f} [{first['ci95_low']:+.3f}, {first['ci95_high']:+.3f}]"
    assert cells[2] == f"{want['mean']:+.3f} [{want['ci95_low']:+.3f}, {want['ci95_high']:+.3f}]"
    assert rows(done.stdout)["sft"][2].startswith("-")  # the comparisons' own SFT row is still theirs


def test_an_added_arm_must_be_trained_and_scored_as_its_comparison(tmp_path):
    base = [[0.5, 0.25], [0.5, 0.25]]
    a = comparison(tmp_path / "a", sspo=[[1.0, 2.0], [2.0, 3.0]], base=base)
    elsewhere = comparison(tmp_path / "elsewhere", sft=[[0.0, 0.0], [0.0, 0.0]], base=[[0.5, 0.3], [0.5, 0.3]])
    done = pooled(a, "--add-arm", f"x=sft:{elsewhere}")
    assert done.returncode == 2 and f"the base's heldout rewards differ between {a} and {elsewhere} (1 of 2 images): they scored other" in done.stderr
    unscored = comparison(tmp_path / "unscored", sft=[[0.0, 0.0], [0.0, 0.0]])
    assert f"{a} or {unscored} did not score the base" in pooled(a, "--add-arm", f"x=sft:{unscored}").stderr
    other_seeds = comparison(tmp_path / "other-seeds", seeds=(0, 1), sft=[[0.0, 0.0], [0.0, 0.0]], base=base)
    assert f"{other_seeds} has training seeds [0, 1], {a} [10, 11]: pair comparisons" in pooled(a, "--add-arm", f"x=sft:{other_seeds}").stderr
    fewer = comparison(tmp_path / "fewer", sft=[[0.0], [0.0]], base=[[0.5], [0.5]])
    assert f"{fewer} has heldout images 1, {a} 2: pair comparisons" in pooled(a, "--add-arm", f"x=sft:{fewer}").stderr
    assert f"{elsewhere} did not train dpo" in pooled(a, "--add-arm", f"x=dpo:{elsewhere}").stderr
    assert "2 folders for 1 comparison: give one for each" in pooled(a, "--add-arm", f"x=sft:{elsewhere},{elsewhere}").stderr
    assert "expected LABEL=ARM:FOLDER,FOLDER" in pooled(a, "--add-arm", "sft").stderr
    assert "the comparisons have an arm base already; name the added one otherwise" in pooled(a, "--add-arm", f"base=sft:{elsewhere}").stderr


def test_another_cpus_rounding_may_tip_one_image_in_twenty(tmp_path):
    base = [[0.5] * 20] * 2
    a = comparison(tmp_path / "a", sspo=[[1.0] * 20, [2.0] * 20], base=base)
    one_tipped = comparison(tmp_path / "one", sft=[[0.0] * 20] * 2, base=[[0.5] * 19 + [0.51]] * 2)
    assert pooled(a, "--add-arm", f"x=sft:{one_tipped}").returncode == 0
    two_tipped = comparison(tmp_path / "two", sft=[[0.0] * 20] * 2, base=[[0.5] * 18 + [0.51] * 2] * 2)
    assert "(2 of 20 images)" in pooled(a, "--add-arm", f"x=sft:{two_tipped}").stderr
