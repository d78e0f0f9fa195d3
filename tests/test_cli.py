import json
import re

import pytest

from sspo.cli import main


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_a_missing_lora_is_refused_before_any_model_is_resolved(command, monkeypatch, tmp_path, capsys):
    import sspo.worlds.names

    def resolve_model(name, key="model"):
        raise AssertionError(f"resolved {name} before checking the LoRA")

    monkeypatch.setattr(sspo.worlds.names, "resolve_model", resolve_model)
    lora, out = tmp_path / "no-lora", tmp_path / "out"
    extra = ["--prompt", "a red circle", "--out", str(out / "grid.png")] if command == "sample" else ["--out", str(out)]
    assert main([command, "--model", "shapes-base:quick", "--lora", str(lora), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"sspo: error: LoRA path {lora} does not exist; pass a LoRA folder (a run's final/) or its .safetensors file"
    assert not out.exists()


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_is_taken_before_or_after_the_command(where, quick_base, monkeypatch):
    from sspo import cli

    seen = []
    monkeypatch.setattr(cli, "set_up_logging", lambda verbose: seen.append(verbose))
    argv = ["-v", "base", "--quick"] if where == "before" else ["base", "--quick", "--verbose"]
    assert main(argv) == 0 and seen == [True]
    assert main(["base", "--quick"]) == 0 and seen == [True, False]


def test_version_is_printed(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and re.fullmatch(r"sspo \d+\.\d+\.\d+\S*\n", capsys.readouterr().out)


@pytest.mark.parametrize("verbose", [False, True])
def test_library_progress_bars_only_when_verbose(verbose, quick_base, capsys):
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    assert main([*(["--verbose"] if verbose else []), "base", "--quick"]) == 0  # cached: prints its folder
    assert capsys.readouterr().out.strip() == quick_base
    assert diffusers_logging.is_progress_bar_enabled() is verbose
    assert transformers_logging.is_progress_bar_enabled() is verbose


def test_eval_defaults_to_the_shapes_world_and_its_components(quick_base, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["eval", "--model", quick_base, "--name", "quick", "--out", str(out), "--prompts-per-split", "2", "--seeds", "0", "--steps", "2"])
    assert code == 0
    table = capsys.readouterr().out
    assert "## seen (2 prompts)" in table and "## heldout (2 prompts)" in table and "| quick |" in table
    results = json.loads((out / "summary.json").read_text())["results"]["quick"]
    assert results["seen"]["shapes"]["n"] == 2 and 0 <= results["heldout"]["shapes"]["mean"] <= 1
    assert 0 <= results["heldout"]["shapes.color"]["mean"] <= 1


def test_eval_help_names_every_metric_and_prompt_set(capsys):
    from sspo.evaluation.evaluate import PROMPT_SETS
    from sspo.evaluation.scorers import scorer_names

    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in (*scorer_names(), *PROMPT_SETS))
    assert "EvalConfig overrides" not in text and "without --prompts" not in text
    assert "TorchScript runs the code it holds: pass only files you trust" in text  # --scorer-path's video backbones are programs


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sample", "--model", "{base}", "--shapes-check", "--prompt", "a large red hexagon on the left, white background"], "unknown word 'hexagon'"),
        (["eval", "--model", "{tmp}/missing-model"], "missing-model"),
        (["train", "{tmp}/missing.yaml"], "missing.yaml does not exist"),
        (["train", "configs/demo-shapes.yaml", "optim.lr=0.1"], "unknown config key 'optim.lr'"),
        (["train", "configs/demo-shapes.yaml", "method=ppo"], "config key 'method'"),
        (["base", "--size", "12px"], "--size 12px: world shapes has sizes default, quick, 64px, flow, flow-quick"),
        (["base", "--world", "moving-shapes", "--size", "64px"], "--size 64px: world moving-shapes has sizes default, quick"),
    ],
)
def test_bad_input_is_one_clear_error(argv, message, quick_base, tmp_path, capsys):
    argv = [a.format(base=quick_base, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if line.startswith("sspo: error:")]
    assert len(error_lines) == 1 and message in error_lines[0]
    assert "Traceback" not in err


def test_an_unknown_option_is_one_line_naming_the_nearest(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["train", "demo-shapes", "--dryrun"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "sspo train: error: unrecognized arguments: --dryrun; did you mean --dry-run? (sspo train --help lists the options)"]
    with pytest.raises(SystemExit):
        main(["compare", "compare-shapes", "--seeds", "5"])
    assert capsys.readouterr().err.splitlines() == [
        "sspo compare: error: unrecognized arguments: --seeds; did you mean --training-seeds? (sspo compare --help lists the options)"]


@pytest.mark.parametrize("argv, message", [
    (["sample", "--rows", "x"], "sspo sample: error: argument --rows: invalid int value: 'x'"),
    (["export"], "sspo export: error: the following arguments are required: run, --format"),
    (["nosuch"], "sspo: error: argument command: invalid choice: 'nosuch'"),
])
def test_an_argument_error_is_one_line_pointing_to_help(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err.splitlines()
    assert exited.value.code == 2 and len(err) == 1 and err[0].startswith(message) and err[0].endswith("--help lists the options)")


@pytest.mark.parametrize("argv, named", [
    (["eval", "--limit", "0"], "--limit: got 0, expected an integer >= 1"),
    (["eval", "--limit=0"], "--limit: got 0, expected an integer >= 1"),
    (["bench", "limit=0"], "config key 'limit': got 0, expected an integer >= 1, or null"),  # an override, not the flag
])
def test_a_config_error_is_named_by_its_flag_only_where_the_user_gave_that_flag(argv, named):
    from sspo.cli import _named_by_flag

    assert _named_by_flag("config key 'limit': got 0, expected an integer >= 1, or null", argv) == named


def test_a_tilde_output_dir_from_a_config_file_is_the_home_folders(tmp_path):
    import os

    from sspo.config import load_config
    from sspo.training.config import TrainConfig

    (tmp_path / "run.yaml").write_text("output_dir: ~/runs/x\n")
    assert load_config(TrainConfig, tmp_path / "run.yaml").output_dir == os.path.expanduser("~/runs/x")


def test_resume_and_overwrite_are_one_or_the_other(capsys):
    with pytest.raises(SystemExit) as done:
        main(["train", "demo-shapes", "--resume", "--overwrite"])
    assert done.value.code == 2 and capsys.readouterr().err.strip() == (
        "sspo train: error: argument --overwrite: not allowed with argument --resume (sspo train --help lists the options)")


@pytest.mark.parametrize("argv, line", [
    (["base", "--quick", "--size", "flow"], "--quick is --size quick, and --size flow is another size: give one of them"),
    (["bench", "--model", "tiny", "foo"], "override 'foo' must look like key=value; write e.g. optim.learning_rate=1e-5"),
    (["train", "demo-shapes", "--dry-run", "model.lora_targets[0]=to_k"],
     "override 'model.lora_targets[0]=to_k': list items cannot be set one at a time; give the whole list, e.g. model.lora_targets=[a,b]"),
])
def test_conflicting_or_malformed_arguments_are_one_line(argv, line, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"sspo: error: {line}"


def test_print_config_prints_yaml_that_trains_as_the_same_config(tmp_path, capsys):
    from sspo.config import load_config
    from sspo.training.config import TrainConfig, resolved

    overrides = ["method=sft", "optim.learning_rate=3e-4", f"output_dir={tmp_path / 'run'}"]
    assert main(["train", "demo-shapes", *overrides, "--print-config"]) == 0
    printed = capsys.readouterr().out
    (tmp_path / "printed.yaml").write_text(printed)
    assert load_config(TrainConfig, tmp_path / "printed.yaml") == resolved(load_config(TrainConfig, "demo-shapes", overrides))
    assert "method: sft\n" in printed and "  learning_rate: 0.0003\n" in printed and "negatives:\n" in printed  # every section, defaults too
    assert "  scheduler: ddim\n" in printed and "mixed_precision: 'no'\n" in printed  # the model's and the launch's, as the run saves them
    assert not (tmp_path / "run").exists()
