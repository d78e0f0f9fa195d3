import json
import re

import pytest
from PIL import Image

from sspo.cli import main


@pytest.mark.parametrize("name, written, image_format", [("grid.png", "grid.png", "PNG"), ("grid.txt", "grid.png", "PNG"), ("grid", "grid.png", "PNG"),
                                                        ("grid.jpg", "grid.jpg", "JPEG"), ("grid.JPEG", "grid.JPEG", "JPEG"), ("grid.webp", "grid.webp", "WEBP")])
def test_sample_writes_a_grid_in_its_files_format_and_prints_its_path(name, written, image_format, quick_base, tmp_path, capsys):
    code = main(["sample", "--model", quick_base, "--prompt", "a large red circle on the left, white background",
                 "--prompt", "a small blue square at the top, black background", "--rows", "2", "--steps", "2", "--device", "cpu",
                 "--out", str(tmp_path / name)])
    assert code == 0
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1] == str(tmp_path / written)
    assert "sampling: 100%" in captured.err and "2/2" in captured.err  # a bar while the rows are sampled
    assert sorted(path.name for path in tmp_path.iterdir()) == [written]
    grid = Image.open(tmp_path / written)
    assert grid.format == image_format and grid.width > 2 * 96 and grid.height > 2 * 96


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


def test_sample_takes_a_resolution_and_refuses_one_the_model_cannot_take(quick_base, tiny_sd3, tmp_path, monkeypatch, capsys):
    from sspo.evaluation import sampling

    sizes, generate = [], sampling.generate

    def recorded(pipe, prompts, seeds, **kwargs):
        sizes.append(kwargs["size"])
        return generate(pipe, prompts, seeds, **kwargs)

    monkeypatch.setattr(sampling, "generate", recorded)
    sample = ["sample", "--prompt", "a red circle", "--rows", "1", "--steps", "1", "--device", "cpu"]
    assert main([*sample, "--model", quick_base, "--resolution", "16", "--out", str(tmp_path / "small.png")]) == 0
    assert sizes == [16]
    assert main([*sample, "--model", quick_base, "--resolution", "36", "--out", str(tmp_path / "odd.png")]) == 2
    assert "sspo: error: --resolution: got 36, expected an integer in [8, 4096] that is a multiple of 8" in capsys.readouterr().err
    assert main([*sample, "--model", tiny_sd3, "--resolution", "72", "--out", str(tmp_path / "large.png")]) == 2
    assert "sspo: error: --resolution: sd3's position embedding covers image sides up to 64 px, not 72x72" in capsys.readouterr().err
    assert not (tmp_path / "large.png").exists()


def test_sample_puts_the_pipeline_on_the_accelerator_there_is(monkeypatch):
    import torch

    from sspo.evaluation.sampling import sampling_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert sampling_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert sampling_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert sampling_device("auto") == torch.device("cuda") and sampling_device("cuda:1") == torch.device("cuda:1")
    assert sampling_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("device, message", [
    ("gpu0", "--device: got 'gpu0', expected auto, cpu, cuda, cuda:N or mps"),
    ("cuda", "--device cuda: torch sees no such device here; use --device auto (or cpu)"),
])
def test_sample_refuses_a_device_before_loading_a_model(device, message, monkeypatch, tmp_path, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["sample", "--model", str(tmp_path / "no-model"), "--prompt", "a red circle", "--device", device, "--out", str(tmp_path / "grid.png")]) == 2
    assert capsys.readouterr().err.strip() == f"sspo: error: {message}"


@pytest.mark.parametrize("suffix", [".gif", ".mp4", ".png"])
def test_sample_writes_an_animated_grid_for_a_video_model(suffix, tmp_path):
    from sspo.video_io import read_clip
    from sspo.worlds.moving_shapes.base_model import vocabulary

    from tiny_pipelines import build_video_pipeline

    model = build_video_pipeline(tmp_path / "video", vocabulary(), max_frames=16)
    out = tmp_path / f"grid{suffix}"
    if suffix == ".png":  # a still grid's name, for a video model: a GIF beside it, the user's file kept
        out.write_bytes(b"the user's own image")
    assert main(["sample", "--model", str(model), "--prompt", "a red circle growing, white background", "--rows", "2", "--steps", "2", "--frames", "6", "--out", str(out)]) == 0
    if suffix == ".png":
        assert out.read_bytes() == b"the user's own image"
        out = out.with_suffix(".gif")
    grid = read_clip(str(out))
    assert len(grid) == 6 and grid.shape[1] > 2 * 96  # one grid per frame: captions, two seed rows


def test_sample_replaces_an_existing_file_only_with_force(quick_base, tmp_path, capsys):
    clip = tmp_path / "red.png"
    clip.write_bytes(b"the user's own image")
    argv = ["sample", "--model", quick_base, "--prompt", "a red circle", "--rows", "1", "--steps", "1", "--device", "cpu", "--out", str(clip)]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"sspo: error: --out {clip} exists; pass --force to replace it, or name another file"
    assert clip.read_bytes() == b"the user's own image"
    assert main([*argv, "--force"]) == 0
    assert Image.open(clip).format == "PNG"


@pytest.mark.parametrize("home", [False, True])
def test_sample_refuses_an_existing_file_before_the_model_loads(home, quick_base, tmp_path, capsys, monkeypatch):
    from sspo.models import pipeline

    monkeypatch.setattr(pipeline, "load_pipeline", lambda *a, **k: pytest.fail("the weights loaded"))
    monkeypatch.setenv("HOME", str(tmp_path))  # a quoted ~/grid.png is the home folder's, as the shell's is
    grid = tmp_path / "grid.png"
    grid.write_bytes(b"the user's own image")
    out = "~/grid.png" if home else str(grid)
    assert main(["sample", "--model", quick_base, "--prompt", "a red circle", "--device", "cpu", "--out", out]) == 2
    assert capsys.readouterr().err.strip() == f"sspo: error: --out {grid} exists; pass --force to replace it, or name another file"


def test_sample_refuses_an_existing_file_before_a_worlds_base_is_built(tmp_path, capsys, monkeypatch):
    from sspo.worlds import names

    monkeypatch.setattr(names, "resolve_model", lambda *a, **k: pytest.fail("the base was built"))
    grid = tmp_path / "grid.gif"  # grid.png named: a video world's base writes a GIF
    grid.write_bytes(b"the user's own clip")
    argv = ["sample", "--model", "moving-shapes-base:quick", "--prompt", "a red circle growing, white background", "--out", str(grid.with_suffix(".png"))]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"sspo: error: --out {grid} exists; pass --force to replace it, or name another file"


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


def test_a_grid_past_its_formats_longest_side_is_refused_before_sampling(tmp_path, capsys, monkeypatch):
    import sspo.models.pipeline

    monkeypatch.setattr(sspo.models.pipeline, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model for a grid it cannot write"))
    out = tmp_path / "big.webp"
    assert main(["sample", "--model", "shapes-base", "--prompt", "a red circle", "--rows", "171", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (f"sspo: error: --out {out}: a grid of 171 rows x 1 prompts is 186 x 16460 pixels, past the 16383 a side "
                                               "WEBP takes; name a .png, or give fewer --rows or --prompt")
    assert not out.exists()
