import json
from pathlib import Path

import pytest

from sspo.commands import compare
from sspo.errors import ConfigError

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "compare-shapes.yaml"


def test_compare_writes_tables_and_figures_and_reuses_finished_arms(quick_base, tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    overrides = [f"model.pretrained={quick_base}", "data.max_samples=64", "negatives.steps=2", "optim.batch_size=4"]
    results = compare.run_compare(CONFIG, ["base", "sft", "sspo", "ssr_off"], [0, 1], out, overrides=overrides, quick=True, command="test")
    assert len(results["base"]) == 1 and len(results["sspo"]) == 2  # the base is not trained: one seed
    report = (out / "results.md").read_text()
    assert "**A smoke test (--quick): a few steps per arm at tiny sizes; these numbers are not a result.**" in report
    assert "Table 1: methods — held-out prompts" in report and "Table 6: SSPO ablations — seen prompts" in report
    assert "| sspo | " in report and "SSPO - arm [95% CI]" in report
    assert "## The paper's claims on held-out prompts" in report and "| sft | higher |" in report
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["results"]) == {"base", "sft", "sspo", "ssr_off"}
    assert [claim["arm"] for claim in saved["claims"]] == ["sft", "ssr_off", "base"]
    for claim in saved["claims"]:  # two training seeds decide nothing, and the table says so
        assert claim["verdict"] == "undecided (2 training seeds are too few to decide: train 3 or more)"
        row = report.split(f"\n| {claim['arm']} | {claim['paper']} | ", 1)[1].split("\n", 1)[0]
        assert row.endswith(f"| {claim['verdict']} |")
    for name in ("figure9_reward.png", "figure4_ssr_rate.png", "grid.png"):
        assert (out / name).stat().st_size > 0
    # Without a grid every arm shares the budget: same steps, batch and learning rate.
    configs = [json.loads(json.dumps(compare.arm_config(CONFIG, arm, 0, out / arm, [*compare.QUICK, *overrides]).optim.__dict__)) for arm in ("sft", "sspo")]
    assert configs[0] == configs[1]

    def no_training(*args, **kwargs):
        raise AssertionError("a finished arm was trained again")

    monkeypatch.setattr(compare, "train", no_training)
    again = compare.run_compare(CONFIG, ["base", "sft", "sspo", "ssr_off"], [0, 1], out, overrides=overrides, quick=True)
    assert again == results


def test_grid_settings_are_chosen_per_arm_on_the_validation_split(quick_base, tmp_path):
    from sspo.config import load_yaml

    out = tmp_path / "cmp"
    overrides = [f"model.pretrained={quick_base}", "data.max_samples=64", "negatives.steps=2", "optim.batch_size=4"]
    grid = ["optim.learning_rate=1e-4,1e-3", "beta=500,5000"]
    compare.run_compare(CONFIG, ["sft", "sspo"], [0], out, overrides=overrides, quick=True, grid=grid, selection_seeds=1)
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["chosen"]["sft"]["grid"]) == 2 and len(saved["chosen"]["sspo"]["grid"]) == 4  # beta: preference arms only
    for arm, chosen in saved["chosen"].items():
        best = max(chosen["grid"], key=lambda row: row["validation_reward"])
        assert chosen["overrides"] == best["overrides"]
        final = load_yaml(out / "runs" / compare.run_name(arm, chosen["overrides"], 0) / "config.yaml")
        for override in chosen["overrides"]:
            key, _, value = override.partition("=")
            section, _, name = key.rpartition(".")
            assert float((final[section] if section else final)[name]) == float(value)
    selection_runs = sorted((out / "select").iterdir())
    assert len(selection_runs) == 6
    # Seed 0 is reported: the choice is made by another seed, whose luck the reported run cannot share.
    assert all(run.name.endswith("-seed1000") for run in selection_runs)
    for run in selection_runs:  # chosen on the validation combinations, trained without them
        assert load_yaml(run / "config.yaml")["data"]["world_without_validation"] is True
        evaluated = json.loads((run / "eval.json").read_text())
        assert set(evaluated) == {"validation", "settings"} and evaluated["settings"]["evaluation"]["prompts"] == "shapes-validation"
    report = (out / "results.md").read_text()
    assert "## Settings chosen on the validation split" in report
    assert "On the grid's edge" in report and "With one training seed the CIs are over prompts alone" in report  # two values a key, one seed


def test_a_choice_at_a_grids_highest_or_lowest_number_is_named():
    grid = [{"overrides": [f"optim.learning_rate={lr}", f"beta={beta}"]} for lr in ("1e-4", "3e-4", "1e-3") for beta in ("500", "5000")]
    assert compare.grid_edges({"overrides": ["optim.learning_rate=3e-4", "beta=5000"], "grid": grid}) == ["beta=5000 (the highest tried)"]
    assert compare.grid_edges({"overrides": ["optim.learning_rate=1e-4", "beta=500"], "grid": grid}) == [
        "optim.learning_rate=1e-4 (the lowest tried)", "beta=500 (the lowest tried)"]
    assert compare.grid_edges({"overrides": ["optim.learning_rate=3e-4"], "grid": grid[2:4]}) == []  # one value tried: no edge to widen
    cross = [{"overrides": [f"optim.learning_rate={lr}", "beta=500"]} for lr in ("1e-4", "3e-4", "1e-3")] + [
        {"overrides": ["optim.learning_rate=3e-4", f"beta={beta}"]} for beta in ("50", "5000")] + [{"overrides": ["optim.learning_rate=3e-3", "beta=50"]}]
    # The axes through (3e-3, 50): rates 3e-4 and 3e-3 at beta 50, and beta 50 alone at rate 3e-3.
    assert compare.grid_edges({"overrides": ["optim.learning_rate=3e-3", "beta=50"], "grid": cross}) == [
        "optim.learning_rate=3e-3 (the highest tried)", "beta=50 (the only value tried with the other settings as chosen)"]
    assert compare.grid_edges({"overrides": ["optim.learning_rate=3e-4", "beta=50"], "grid": cross}) == [  # 1e-4 was tried at beta 500 only
        "optim.learning_rate=3e-4 (the lowest tried)", "beta=50 (the lowest tried)"]
    assert compare.grid_edges({"overrides": ["optim.learning_rate=3e-4", "beta=500"], "grid": cross}) == []  # interior along both axes


def test_the_points_past_an_edge_continue_the_grid():
    grid = [{"overrides": [f"optim.learning_rate={lr}", f"beta={beta}"]} for lr in ("1e-4", "3e-4", "1e-3") for beta in ("500", "5000")]
    assert compare.points_past_edges({"overrides": ["optim.learning_rate=3e-4", "beta=5000"], "grid": grid}) == [
        ["optim.learning_rate=3e-4", "beta=50000"]]  # the grid's ratio, 10
    assert compare.points_past_edges({"overrides": ["optim.learning_rate=1e-3", "beta=500"], "grid": grid}) == [
        ["optim.learning_rate=3e-3", "beta=500"], ["optim.learning_rate=1e-3", "beta=50"]]  # 1e-3 after 1e-4, 3e-4: 3e-3, then 1e-2
    assert compare.points_past_edges({"overrides": ["optim.learning_rate=3e-4", "beta=500"], "grid": grid}) == [["optim.learning_rate=3e-4", "beta=50"]]
    step = [{"overrides": [f"optim.learning_rate={lr}"]} for lr in ("1e-3", "3e-3")]
    assert compare.points_past_edges({"overrides": ["optim.learning_rate=3e-3"], "grid": step}) == [["optim.learning_rate=1e-2"]]
    assert compare.points_past_edges({"overrides": ["optim.learning_rate=1e-3"], "grid": step}) == [["optim.learning_rate=3e-4"]]
    plain = [{"overrides": [f"beta={beta}"]} for beta in ("0.05", "0.5")]
    assert compare.points_past_edges({"overrides": ["beta=0.05"], "grid": plain}) == [["beta=0.005"]]
    assert compare.points_past_edges({"overrides": ["beta=0"], "grid": [{"overrides": ["beta=0"]}, {"overrides": ["beta=2"]}]}) == [["beta=-2"]]
    # The only value on the axis through the choice: the nearest values the grid tried elsewhere, each side.
    cross = [{"overrides": [f"optim.learning_rate={lr}", "beta=0.5"]} for lr in ("3e-5", "1e-4", "3e-4")] + [
        {"overrides": ["optim.learning_rate=1e-4", f"beta={beta}"]} for beta in ("0.05", "5")]
    assert compare.points_past_edges({"overrides": ["optim.learning_rate=1e-4", "beta=5"], "grid": cross}) == [
        ["optim.learning_rate=3e-5", "beta=5"], ["optim.learning_rate=3e-4", "beta=5"], ["optim.learning_rate=1e-4", "beta=50"]]
    assert compare.points_past_edges({"overrides": ["optim.learning_rate=1e-4", "beta=0.5"], "grid": cross}) == []  # interior


def test_widening_moves_a_choice_off_its_grids_edge_round_by_round(tmp_path, monkeypatch):
    """Validation reward peaks at lr 1e-2: from 1e-4, 3e-4, 1e-3 each round adds the next rate up
    until the best has a worse rate on both sides; rounds run out with the best still on an edge."""
    import math

    runs = []

    def fake_run_arm(config, arm, seed, run_dir, extra, eval_cfg):
        runs.append(run_dir.name)
        return {"validation": {eval_cfg.metric_names[0]: -(math.log10(float(extra[-2].partition("=")[2])) + 2) ** 2}}

    monkeypatch.setattr(compare, "run_arm", fake_run_arm)
    grid = compare.parse_grid(["optim.learning_rate=1e-4,3e-4,1e-3"])
    eval_cfg = compare.EvalConfig(prompts="shapes-validation")
    chosen = compare.select_settings(CONFIG, ["sft"], grid, [0], tmp_path, [], eval_cfg, widen=5)["sft"]
    assert chosen["overrides"] == ["optim.learning_rate=1e-2"] and compare.grid_edges(chosen) == []
    assert [row["overrides"][0] for row in chosen["grid"]] == [f"optim.learning_rate={lr}" for lr in ("1e-4", "3e-4", "1e-3", "3e-3", "1e-2", "3e-2")]
    assert len(runs) == len(set(runs)) == 6  # each point trained once
    short = compare.select_settings(CONFIG, ["sft"], grid, [0], tmp_path / "short", [], eval_cfg, widen=1)["sft"]
    assert short["overrides"] == ["optim.learning_rate=3e-3"] and compare.grid_edges(short) == ["optim.learning_rate=3e-3 (the highest tried)"]
    with pytest.raises(ConfigError, match="--widen 2 widens a grid: give the --grid it widens"):
        compare.run_compare(CONFIG, ["sft"], [0], tmp_path / "cmp", widen=2)
    for grid in (["optim.learning_rate=1e-4,1e-3"], None):  # the value's own problem first, with or without a grid
        with pytest.raises(ConfigError, match="--widen -1: expected 0 or more rounds of widening"):
            compare.run_compare(CONFIG, ["sft"], [0], tmp_path / "cmp", grid=grid, widen=-1)


def test_a_changed_setting_trains_anew_instead_of_reusing_the_old_run(quick_base, tmp_path, monkeypatch):
    """Re-running with another grid (e.g. one widened past its edge) must not reuse a run trained
    at the setting chosen before."""
    out = tmp_path / "cmp"
    overrides = [f"model.pretrained={quick_base}", "data.max_samples=32", "optim.batch_size=4"]
    compare.run_compare(CONFIG, ["sft"], [0], out, overrides=overrides, quick=True, grid=["optim.learning_rate=1e-4"])
    trained = []
    real_train = compare.train
    monkeypatch.setattr(compare, "train", lambda cfg, **kw: trained.append(cfg.optim.learning_rate) or real_train(cfg, **kw))
    compare.run_compare(CONFIG, ["sft"], [0], out, overrides=overrides, quick=True, grid=["optim.learning_rate=1e-4"])
    assert trained == []  # same setting: reused
    compare.run_compare(CONFIG, ["sft"], [0], out, overrides=overrides, quick=True, grid=["optim.learning_rate=1e-3"])
    assert trained == [1e-3]
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["sft-optim.learning_rate=1e-3-seed0", "sft-optim.learning_rate=1e-4-seed0"]
    assert "Table 6" not in (out / "results.md").read_text()  # no ablation ran


def test_a_finished_run_of_other_settings_in_the_same_folder_is_refused_not_reported(quick_base, tmp_path):
    """Grid points name their run folders; settings outside the grid (an override, the quick scale,
    the evaluation's prompts) do not, so a re-run with another of them must not reuse those runs."""
    out = tmp_path / "cmp"
    overrides = [f"model.pretrained={quick_base}", "data.max_samples=32", "optim.batch_size=4"]
    compare.run_compare(CONFIG, ["base", "sft"], [0], out, overrides=overrides, quick=True, prompts_per_split=2)
    compare.run_compare(CONFIG, ["base", "sft"], [0], out, overrides=overrides, quick=True, prompts_per_split=2)  # the same: reused
    with pytest.raises(ConfigError, match=r"runs/base-seed0 holds a finished run of other settings \(evaluation prompts_per_split: 2 -> 3\); use another --out"):
        compare.run_compare(CONFIG, ["base"], [0], out, overrides=overrides, quick=True, prompts_per_split=3)
    with pytest.raises(ConfigError, match=r"^2 finished runs in --out are of other settings: .*runs/base-seed0 \(evaluation prompts_per_split: 2 -> 3\); "
                                          r".*runs/sft-seed0 \(evaluation prompts_per_split: 2 -> 3\); use another --out, or delete those folders"):
        compare.run_compare(CONFIG, ["base", "sft"], [0], out, overrides=overrides, quick=True, prompts_per_split=3)  # both named, before any run
    with pytest.raises(ConfigError, match=r"runs/sft-seed0 holds a finished run of other settings \(optim.learning_rate: 0.001 -> 0.002\)"):
        compare.run_compare(CONFIG, ["sft"], [0], out, overrides=[*overrides, "optim.learning_rate=2e-3"], quick=True, prompts_per_split=2)
    other_model = [*overrides, "model.pretrained=shapes-base:64px"]  # the untrained base's scores are of its model
    with pytest.raises(ConfigError, match=rf"runs/base-seed0 holds a finished run of other settings \(model.pretrained: '{quick_base}' -> 'shapes-base:64px'\)"):
        compare.run_compare(CONFIG, ["base"], [0], out, overrides=other_model, quick=True, prompts_per_split=2)


def test_selection_over_several_seeds_keeps_a_lucky_seed_from_choosing(tmp_path, monkeypatch):
    """A rate that is best on seed 0 only (0.9, then 0.1) loses to a steady one (0.6, 0.6) once
    settings are chosen on the mean over two seeds; every (point, seed) is its own run."""
    rewards = {("optim.learning_rate=1e-3", 0): 0.9, ("optim.learning_rate=1e-3", 1): 0.1,
               ("optim.learning_rate=1e-4", 0): 0.6, ("optim.learning_rate=1e-4", 1): 0.6}
    runs = []

    def fake_run_arm(config, arm, seed, run_dir, extra, eval_cfg):
        runs.append(run_dir.name)
        return {"validation": {eval_cfg.metric_names[0]: rewards[(extra[-2], seed)]}}

    monkeypatch.setattr(compare, "run_arm", fake_run_arm)
    grid = compare.parse_grid(["optim.learning_rate=1e-4,1e-3"])
    eval_cfg = compare.EvalConfig(prompts="shapes-validation")
    one = compare.select_settings(CONFIG, ["sft"], grid, [0], tmp_path, [], eval_cfg)["sft"]
    assert one["overrides"] == ["optim.learning_rate=1e-3"]
    two = compare.select_settings(CONFIG, ["sft"], grid, [0, 1], tmp_path, [], eval_cfg)["sft"]
    assert two["overrides"] == ["optim.learning_rate=1e-4"]
    assert [row["per_seed"] for row in two["grid"]] == [[0.6, 0.6], [0.9, 0.1]]
    assert two["grid"][1]["validation_reward"] == pytest.approx(0.5)
    assert len(set(runs)) == 4  # seed 0's runs are shared by both selections


def test_an_arm_named_twice_is_trained_once(tmp_path, monkeypatch):
    """``--methods sft --ablations sft`` names sft twice: one run, not two into one folder."""
    class Planned(Exception):
        pass

    def planned(tasks, jobs, what):  # settings are not searched (no grid): the first runs are the arms'
        if tasks:
            raise Planned([task.args[3].name for task in tasks])
        return []

    monkeypatch.setattr(compare, "run_all", planned)
    with pytest.raises(Planned) as raised:
        compare.run_compare(CONFIG, ["sft", "sspo", "sft"], [0], tmp_path / "cmp")
    assert raised.value.args[0] == ["sft-seed0", "sspo-seed0"]


def test_no_selection_seeds_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="--selection-seeds 0: expected 1 or more training runs per grid point"):
        compare.run_compare(CONFIG, ["sft"], [0, 1], tmp_path, selection_seeds=0)


def test_settings_from_the_comparisons_own_folder_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="is this comparison's own --out, whose record of the choice the report would replace"):
        compare.run_compare(CONFIG, ["sft"], [0], tmp_path / "cmp", chosen_in=tmp_path / "cmp" / "results.json")
    with pytest.raises(ConfigError, match="--prompts-per-split 0: expected 1 or more"):
        compare.run_compare(CONFIG, ["sft"], [0], tmp_path / "cmp", prompts_per_split=0)
    assert not (tmp_path / "cmp").exists()


def test_the_first_training_seed_shifts_every_arms_seeds(tmp_path, monkeypatch):
    from sspo.cli import main

    given = {}
    monkeypatch.setattr(compare, "run_compare", lambda config, arms, seeds, out, **kwargs: given.update(seeds=seeds))
    assert main(["compare", "compare-shapes", "--training-seeds", "3", "--first-training-seed", "10", "--out", str(tmp_path / "c")]) == 0
    assert given["seeds"] == [10, 11, 12]


def test_no_arm_is_a_clear_error(tmp_path):
    from sspo.cli import main

    assert main(["compare", "compare-shapes", "--methods", "", "--out", str(tmp_path / "c")]) == 2
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("flags, arms", [
    ([], [*compare.table1(), *compare.ABLATIONS]),
    (["--methods", "sft,sspo"], ["sft", "sspo"]),
    (["--methods", "sspo", "--ablations", "ssr_off"], ["sspo", "ssr_off"]),
    (["--ablations", "indicator"], [*compare.table1(), "indicator"]),
])
def test_named_methods_train_no_ablation_unless_named(flags, arms, tmp_path, monkeypatch):
    from sspo.cli import main

    given = {}
    monkeypatch.setattr(compare, "run_compare", lambda config, arms, seeds, out, **kwargs: given.update(arms=arms))
    assert main(["compare", "compare-shapes", *flags, "--out", str(tmp_path / "c")]) == 0
    assert given["arms"] == arms


def test_no_training_seeds_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="--training-seeds 0: expected 1 or more"):
        compare.run_compare(CONFIG, ["sft"], [], tmp_path)


@pytest.mark.parametrize("grid, added, message", [
    (["beta=50,abc"], [], "config key 'beta': expected a number, got 'abc'"),
    (["nokey=1"], [], "unknown config key 'nokey'"),
    (["beta=50"], ["sspo:beta=-1"], "beta"),
])
def test_a_bad_grid_value_fails_before_any_run(grid, added, message, tmp_path, monkeypatch):
    monkeypatch.setattr(compare, "run_all", lambda *a, **k: pytest.fail("a run started before the grid was checked"))
    with pytest.raises(ConfigError, match=message):
        compare.run_compare(CONFIG, ["sft", "sspo"], [0], tmp_path / "cmp", grid=grid, added_points=added)
    assert not (tmp_path / "cmp").exists()


def test_damaged_earlier_settings_fail_before_any_run(tmp_path, monkeypatch):
    earlier = tmp_path / "results.json"
    earlier.write_text(json.dumps({"chosen": {"sspo": {"overrides": ["optim.learning_rate=fast"]}}}))
    monkeypatch.setattr(compare, "run_all", lambda *a, **k: pytest.fail("a run started before the settings were checked"))
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        compare.run_compare(CONFIG, ["sspo"], [0], tmp_path / "cmp", chosen_in=earlier)


@pytest.mark.parametrize("override, named", [
    ("data.cache_dir=/home/someone/photos", "'data.cache_dir'"), ("output_dir=/tmp/elsewhere", "'output_dir'"),
    ("data={cache_dir: /home/someone/photos}", "'data'"), ("validation.scorer_paths.hps=/x", "'validation.scorer_paths.hps'"),
])
def test_earlier_settings_that_are_no_grid_setting_are_refused_before_any_run(override, named, tmp_path, monkeypatch):
    """A shared results.json could point a run's paths at a user's files."""
    earlier = tmp_path / "results.json"
    earlier.write_text(json.dumps({"chosen": {"sspo": {"overrides": ["optim.learning_rate=1e-3", override]}}}))
    monkeypatch.setattr(compare, "run_all", lambda *a, **k: pytest.fail("a run started before the settings were checked"))
    with pytest.raises(ConfigError, match=rf"arm 'sspo''s settings set {named}, which is not a setting a comparison chooses .*; remove it"):
        compare.run_compare(CONFIG, ["sspo"], [0], tmp_path / "cmp", chosen_in=earlier)
    assert not (tmp_path / "cmp").exists()


@pytest.mark.parametrize("value", ["../../elsewhere", "a/b", "x\0y", ".."])
def test_a_run_folder_name_that_would_leave_the_runs_folder_is_refused(value):
    with pytest.raises(ConfigError, match=r"holds '/', '..' or a NUL byte; give settings whose values hold none of them"):
        compare.run_name("sspo", [f"optim.learning_rate={value}"], 0)
    assert compare.run_name("sspo", ["optim.learning_rate=1e-3", "beta=0.5"], 0) == "sspo-optim.learning_rate=1e-3-beta=0.5-seed0"


def test_grid_must_name_values():
    with pytest.raises(ConfigError, match="KEY=V1,V2"):
        compare.parse_grid(["optim.learning_rate"])
    with pytest.raises(ConfigError, match=r"--grid sft:beta is given twice; give all its values in one --grid sft:beta=V1,V2,..."):
        compare.parse_grid(["sft:beta=1,2", "sft:beta=3"])
    assert compare.parse_grid(["beta=1,2"]) == {"beta": ["1", "2"]}
    with pytest.raises(ConfigError, match="unknown arm 'ppo'"):
        compare.parse_grid(["ppo:beta=1,2"])


def test_an_arm_s_own_grid_values_replace_the_shared_ones_for_that_arm_only():
    grid = compare.parse_grid(["optim.learning_rate=1e-3,3e-3", "beta=50,500", "sft:optim.learning_rate=1e-3,3e-3,1e-2", "dpo:beta=5,50,500"])
    assert compare.grid_points(grid, "sft") == [["optim.learning_rate=1e-3"], ["optim.learning_rate=3e-3"], ["optim.learning_rate=1e-2"]]
    assert [p[1] for p in compare.grid_points(grid, "dpo")] == ["beta=5", "beta=50", "beta=500"] * 2
    assert compare.grid_points(grid, "sspo") == [[f"optim.learning_rate={r}", f"beta={b}"] for r in ("1e-3", "3e-3") for b in ("50", "500")]


def test_unknown_arm_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown arm 'ppo'"):
        compare.run_compare(CONFIG, ["ppo"], [0], tmp_path)


@pytest.mark.slow
def test_compare_takes_the_video_world(tmp_path):
    """A config whose data.source is the moving-shapes world is compared on it, with its temporal reward."""
    config = CONFIG.parent / "demo-moving-shapes.yaml"
    overrides = ["model.pretrained=moving-shapes-base:quick", "data.max_samples=16", "optim.batch_size=2", "negatives.steps=2"]
    results = compare.run_compare(config, ["base", "sft", "sspo"], [0], tmp_path, overrides=overrides, quick=True, prompts_per_split=2)
    assert {"moving-shapes", "moving-shapes.direction"} <= set(results["sspo"][0]["heldout"])
    report = (tmp_path / "results.md").read_text()
    assert "| sft | " in report and "| direction | amplitude |" in report
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_runs_side_by_side_give_what_runs_one_after_another_give(quick_base, tmp_path, monkeypatch):
    """--jobs 2 trains each run in a one-thread worker: the numbers are those of --jobs 1 (the same runs
    one at a time, on one thread too), and a later comparison can take the chosen settings instead of a grid."""
    import torch

    overrides = [f"model.pretrained={quick_base}", "data.max_samples=32", "negatives.steps=2", "optim.batch_size=4"]
    grid = ["optim.learning_rate=1e-4,1e-3"]
    torch.set_num_threads(2)  # the machine's cores: --jobs 1 takes one thread all the same
    serial = compare.run_compare(CONFIG, ["sft", "sspo"], [0], tmp_path / "serial", overrides=overrides, quick=True, grid=grid, selection_seeds=1)
    assert torch.get_num_threads() == 2
    side_by_side = compare.run_compare(CONFIG, ["sft", "sspo"], [0], tmp_path / "jobs", overrides=overrides, quick=True, grid=grid, jobs=2,
                                       selection_seeds=1)
    assert side_by_side == serial
    chosen = json.loads((tmp_path / "jobs" / "results.json").read_text())["chosen"]

    def no_selection(*args, **kwargs):
        raise AssertionError("settings were chosen again")

    monkeypatch.setattr(compare, "select_settings", no_selection)
    compare.run_compare(CONFIG, ["base", "sft"], [0], tmp_path / "later", overrides=[*overrides, "data.max_samples=16"], quick=True,
                        chosen_in=tmp_path / "jobs" / "results.json")
    later = json.loads((tmp_path / "later" / "results.json").read_text())
    assert later["chosen"]["sft"]["overrides"] == chosen["sft"]["overrides"]
    assert (tmp_path / "later" / "runs" / compare.run_name("sft", chosen["sft"]["overrides"], 0)).is_dir()
    assert "## Settings as chosen by the comparison in" in (tmp_path / "later" / "results.md").read_text()
    with pytest.raises(ConfigError, match="--settings-from .*: arm 'dpo' was not in that comparison"):
        compare.run_compare(CONFIG, ["dpo"], [0], tmp_path / "x", quick=True, chosen_in=tmp_path / "jobs" / "results.json")
    assert compare.settings_from(tmp_path / "jobs", ["sft"])["sft"]["overrides"] == chosen["sft"]["overrides"]  # the comparison's folder
    with pytest.raises(ConfigError, match="--jobs 0: expected 1 or more"):
        compare.run_compare(CONFIG, ["sft"], [0], tmp_path / "x", jobs=0)


def test_a_reward_matrix_averages_each_prompts_sampler_seeds():
    runs = [{"heldout": {"per_image": [1.0, 3.0, 5.0, 7.0]}}]  # 2 prompts x 2 sampler seeds
    assert compare.reward_matrix(runs, "heldout", sampler_seeds=2) == [[2.0, 6.0]]
    assert compare.reward_matrix(runs, "heldout", sampler_seeds=2, n_seeds=3) == [[2.0, 6.0]] * 3


def three_seeds(*per_image: float, arm: str = "sft") -> dict:
    """SSPO with these rewards (shifted a little per seed) against ``arm`` at 0, over 3 training seeds."""
    return {"sspo": [{"heldout": {"per_image": [r + seed / 100 for r in per_image]}} for seed in range(3)],
            arm: [{"heldout": {"per_image": [0.0] * len(per_image)}} for _ in range(3)]}


def test_a_claim_is_decided_by_its_interval_not_its_mean():
    [claim] = compare.claims(three_seeds(1.0, 0.0, 1.0), sampler_seeds=1, n_seeds=3)
    assert claim["difference"]["mean"] > 0 and claim["difference"]["ci95_low"] < 0
    assert claim["verdict"] == "undecided (CI includes 0)"
    [claim] = compare.claims(three_seeds(1.0, 0.9, 1.1), sampler_seeds=1, n_seeds=3)
    assert claim["verdict"] == "SSPO higher"


def test_an_about_equal_claim_is_not_called_a_tie_by_an_interval_holding_zero():
    [claim] = compare.claims(three_seeds(1.0, 0.0, 1.0, arm="indicator"), sampler_seeds=1, n_seeds=3)
    assert claim["paper"] == "about equal"
    assert claim["verdict"] == f"undecided (CI includes 0; a difference up to {claim['difference']['ci95_high']:.3f} is not ruled out)"


@pytest.mark.parametrize("seeds, verdict", [(1, "undecided (1 training seed is too few to decide: train 3 or more)"),
                                            (2, "undecided (2 training seeds are too few to decide: train 3 or more)"), (3, "SSPO higher")])
def test_a_claim_needs_three_training_seeds_to_be_decided(seeds, verdict):
    """One seed's interval is over prompts alone, and over 2 seeds a crossed interval covers well
    under 95% when seeds differ (scripts/ci-coverage)."""
    sspo = [{"heldout": {"per_image": [1.0 + seed / 10, 0.9, 1.1]}} for seed in range(seeds)]
    sft = [{"heldout": {"per_image": [0.0, 0.0, 0.0]}} for _ in range(seeds)]
    [claim] = compare.claims({"sspo": sspo, "sft": sft}, sampler_seeds=1, n_seeds=seeds)
    assert claim["difference"]["ci95_low"] > 0 and claim["verdict"] == verdict
