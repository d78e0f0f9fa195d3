"""Bad models, prompt files and config files: one `sspo: error:` line naming the problem, no traceback
(docs/reliability.md lists every bad-input case and its test)."""

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from sspo.cli import main
from sspo.errors import DataError, ModelError
from sspo.evaluation.scorers.prompts import load_prompt_set
from sspo.models.pipeline import load_pipeline

PROMPT = "a small red circle on the left, white background"


def one_error_line(capture) -> str:
    """The error line, which must be all of stderr: no library's log of the same failure before it."""
    err = capture.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("sspo: error:"), err
    return err.strip()


def write_lora(folder, quick_base, change=None):
    """A diffusers-format LoRA of the quick base's UNet, its tensors passed through ``change(key, tensor)``."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(quick_base, subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q"]))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    if change is not None:
        layers = dict(change(key, value) for key, value in layers.items())
    StableDiffusionPipeline.save_lora_weights(save_directory=str(folder), unet_lora_layers=layers, safe_serialization=True)
    return folder


def wider(key, value):  # a base with twice the channels
    return key, torch.zeros(value.shape[0] * 2, value.shape[1]) if "lora.up" in key else value


def renamed(key, value):  # a base whose blocks have other names (another architecture)
    return key.replace("down_blocks", "input_blocks"), value


def test_a_lora_of_this_base_loads(quick_base, tmp_path):
    pipe = load_pipeline(quick_base, lora=write_lora(tmp_path / "lora", quick_base))
    assert pipe.get_list_adapters()["unet"]


@pytest.fixture
def diffusers_log(caplog):
    """The records diffusers logs during the test: it prints them through its own handler, which no
    capture fixture sees, and a log of a failure would come before sspo's one line."""
    logger = logging.getLogger("diffusers")
    logger.addHandler(caplog.handler)
    yield lambda: [record for record in caplog.records if record.name.startswith("diffusers")]
    logger.removeHandler(caplog.handler)


@pytest.mark.parametrize("change, named", [(wider, "size mismatch"), (renamed, "have no place in its UNet")], ids=["wider", "renamed"])
def test_a_lora_of_another_base_is_refused(change, named, quick_base, tmp_path, capsys, diffusers_log):
    lora = write_lora(tmp_path / "lora", quick_base, change)
    capsys.readouterr()  # what building the LoRA here printed (transformers' notices), not sspo's output
    assert main(["sample", "--model", quick_base, "--lora", str(lora), "--prompt", PROMPT, "--out", str(tmp_path / "grid.png")]) == 2
    assert not diffusers_log()
    line = one_error_line(capsys)
    assert f"LoRA {lora} does not fit model" in line and named in line and "pass the base model the LoRA was trained on" in line
    assert not (tmp_path / "grid.png").exists()


def test_an_eval_whose_lora_does_not_fit_leaves_no_folder(quick_base, tmp_path, capsys, diffusers_log):
    lora = write_lora(tmp_path / "lora", quick_base, wider)
    capsys.readouterr()  # what building the LoRA here printed (transformers' notices), not sspo's output
    out = tmp_path / "eval"
    assert main(["eval", "--model", quick_base, "--lora", str(lora), "--limit", "1", "--metrics", "shapes", "--out", str(out)]) == 2
    assert f"LoRA {lora} does not fit model" in one_error_line(capsys)
    assert not out.exists()
    # Beside the bare base: refused before the base's images are generated.
    argv = ["eval", "--model", quick_base, "--model", quick_base, "--lora", "none", "--lora", str(lora), "--limit", "1", "--metrics", "shapes"]
    assert main([*argv, "--out", str(out)]) == 2
    assert f"LoRA {lora} does not fit model" in one_error_line(capsys)
    assert not out.exists()


def test_an_eval_metric_of_clips_for_an_image_model_is_refused_before_generating(quick_base, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sspo.models.pipeline.load_pipeline", lambda *a, **kw: pytest.fail("loaded the model before checking the metrics"))
    out = tmp_path / "eval"
    assert main(["eval", "--model", quick_base, "--prompts", "moving-shapes", "--limit", "1", "--out", str(out)]) == 2
    assert one_error_line(capsys).startswith("sspo: error: metric 'moving-shapes' scores clips, but model")
    assert not out.exists()


@pytest.mark.parametrize("removed, named", [("unet/diffusion_pytorch_model.safetensors", "no weights file (diffusion_pytorch_model.safetensors or .bin) in {model}/unet"),
                                             ("tokenizer", "model folder {model} lacks tokenizer/, listed in its model_index.json")], ids=["unet-weights", "tokenizer"])
def test_an_incomplete_model_folder_is_one_line(removed, named, quick_base, tmp_path, capsys, diffusers_log):
    model = tmp_path / "model"
    shutil.copytree(quick_base, model)
    path = model / removed
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert main(["sample", "--model", str(model), "--prompt", PROMPT, "--out", str(tmp_path / "grid.png")]) == 2
    assert not diffusers_log()
    line = one_error_line(capsys)
    assert named.format(model=model) in line and "the folder is incomplete; copy or download the model again" in line
    assert not (tmp_path / "grid.png").exists()


def test_a_model_of_another_family_is_named_before_loading(tmp_path, capsys):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "SanaPipeline", "transformer": ["diffusers", "SanaTransformer2DModel"]}))
    with pytest.raises(ModelError, match=r"\(SanaPipeline\) is of no model family sspo trains"):
        load_pipeline(tmp_path)
    capsys.readouterr()  # what loading printed (transformers' notices in a fresh process)
    assert main(["train", "configs/demo-shapes.yaml", f"model.pretrained={tmp_path}", f"output_dir={tmp_path / 'run'}", "report_to=none"]) == 2
    assert "is of no model family sspo trains; it trains AnimateDiff, FLUX.1, PixArt, SD-1.5, SD3, SDXL pipelines" in one_error_line(capsys)


def test_a_prompt_file_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "prompts.txt").write_bytes("a red circle\n".encode("utf-16"))
    with pytest.raises(DataError, match=r"cannot read prompts from .*prompts.txt: 'utf-8' codec can't decode"):
        load_prompt_set(str(tmp_path / "prompts.txt"))


def test_a_config_file_that_is_not_yaml_is_named(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("optim: [learning_rate: 1\n")
    assert main(["train", str(tmp_path / "bad.yaml")]) == 2
    assert f"config file {tmp_path / 'bad.yaml'} is not valid YAML" in one_error_line(capsys)


def test_a_key_given_twice_in_a_config_file_is_named(tmp_path, capsys):
    # PyYAML keeps the last: the second optim section would drop the first one's learning rate.
    (tmp_path / "twice.yaml").write_text("optim:\n  learning_rate: 5.0e-2\noptim:\n  batch_size: 8\n")
    assert main(["train", str(tmp_path / "twice.yaml"), "--dry-run"]) == 2
    assert "is not valid YAML: line 3, column 1: 'optim' is given twice (first on line 1); keep one" in one_error_line(capsys)
    (tmp_path / "merged.yaml").write_text("base: &base {learning_rate: 1.0e-3, batch_size: 2}\noptim:\n  <<: *base\n  batch_size: 8\n")
    from sspo.config import load_yaml

    assert load_yaml(tmp_path / "merged.yaml")["optim"] == {"learning_rate": 1e-3, "batch_size": 8}  # a merge's keys may be set again
    (tmp_path / "flow.yaml").write_text("optim: {learning_rate: 1.0e-3, learning_rate: 5.0e-2}\n")
    assert main(["train", str(tmp_path / "flow.yaml"), "--dry-run"]) == 2
    assert "line 1, column 32: 'learning_rate' is given twice (first on line 1)" in one_error_line(capsys)


def test_a_failed_read_or_write_anywhere_is_one_line(quick_base, tmp_path, capsys, monkeypatch):
    from PIL import Image

    def full(self, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(Image.Image, "save", full)  # eval's first sample written to a full disk
    assert main(["eval", "--model", quick_base, "--limit", "1", "--steps", "1", "--out", str(tmp_path / "e")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sspo: error:")]  # under the progress bar
    assert len(errors) == 1 and errors[0].endswith("/0-0.png: No space left on device; free disk space, or write elsewhere")
    monkeypatch.undo()
    cache = tmp_path / "cache"
    monkeypatch.setenv("SSPO_CACHE", str(cache))

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(cache / "locks"))

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert main(["sample", "--model", "shapes-base:quick", "--prompt", "a red circle", "--out", str(tmp_path / "g.png")]) == 2
    assert one_error_line(capsys) == f"sspo: error: {cache / 'locks'}: Read-only file system; set SSPO_CACHE to a folder you can write to"


OUT_COMMANDS = {
    "eval": ["eval", "--model", "{model}", "--limit", "1", "--out", "{out}"],
    "eval --videos": ["eval", "--videos", "{tmp}", "--metrics", "mtscore", "--out", "{out}"],
    "compare": ["compare", "compare-shapes", "--methods", "sft", "--ablations", "", "--training-seeds", "1", "--out", "{out}"],
    "demo": ["demo", "--quick", "--out", "{out}"],
    "pairs": ["pairs", "--level", "low", "--out", "{out}"],
    "train": ["train", "sd15-lora", "model.pretrained={model}", "output_dir={out}", "--dry-run"],
}


@pytest.mark.parametrize("command", OUT_COMMANDS)
@pytest.mark.parametrize("under", [False, True], ids=["a file", "under a file"])
def test_an_output_folder_that_is_a_file_is_refused_before_any_work(command, under, quick_base, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    out = notes / "run" if under else notes
    argv = [a.format(model=quick_base, tmp=tmp_path, out=out) for a in OUT_COMMANDS[command]]
    assert main(argv) == 2
    line = one_error_line(capsys)
    name = "output_dir" if command == "train" else "--out"
    assert line == (f"sspo: error: {name} {out}: {notes} is a file, not a folder; choose another {name}" if under
                    else f"sspo: error: {name} {out} is a file, not a folder; choose an empty or new folder")
    assert notes.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("command", ["eval", "eval --videos", "compare", "demo"])
def test_a_folder_of_the_users_files_is_refused_as_out_before_any_work(command, quick_base, tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    for name in ("grid.png", "results.md", "notes.txt"):  # names these commands write, and one they do not
        (out / name).write_text("mine")
    argv = [a.format(model=quick_base, tmp=tmp_path, out=out) for a in OUT_COMMANDS[command]]
    assert main(argv) == 2
    foreign = "notes.txt" if command in ("compare", "demo") else "notes.txt, results.md"
    assert one_error_line(capsys) == (f"sspo: error: --out {out} holds files that are not sspo {command.split()[0]}'s output ({foreign}); "
                                      "choose an empty or new folder")
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "notes.txt", "results.md"]
    assert all((out / name).read_text() == "mine" for name in ("grid.png", "results.md", "notes.txt"))


@pytest.mark.parametrize("command", OUT_COMMANDS)
@pytest.mark.parametrize("inside", [False, True], ids=["the folder", "a folder in it"])
def test_an_output_folder_this_user_may_not_write_is_refused_before_any_work(command, inside, quick_base, tmp_path, capsys, monkeypatch):
    import os

    # root may write anywhere, so the test makes one folder read-only by answering os.access for it
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if os.fspath(path) == str(locked) else real_access(path, mode, **kw))
    out = locked / "run" if inside else locked
    argv = [a.format(model=quick_base, tmp=tmp_path, out=out) for a in OUT_COMMANDS[command]]
    assert main(argv) == 2
    name = "output_dir" if command == "train" else "--out"
    where = f"this user may not create folders in {locked}" if inside else "this user may not write in it"
    assert one_error_line(capsys) == f"sspo: error: {name} {out}: permission denied, {where}; choose a folder you can write to"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["locked"]


def test_a_grid_in_a_folder_this_user_may_not_write_is_refused_before_sampling(quick_base, tmp_path, capsys, monkeypatch):
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if os.fspath(path) == str(locked) else real_access(path, mode, **kw))
    monkeypatch.setattr("sspo.models.pipeline.load_pipeline", lambda *a, **kw: pytest.fail("loaded the model before checking --out"))
    out = locked / "grid.png"
    assert main(["sample", "--model", quick_base, "--prompt", PROMPT, "--out", str(out)]) == 2
    assert one_error_line(capsys) == f"sspo: error: --out {out}: permission denied, this user may not write in {locked}; choose a folder you can write to"


@pytest.mark.parametrize("in_cache", [False, True], ids=["a user's path", "the cache"])
def test_a_path_this_user_may_not_read_or_write_is_one_line(in_cache, tmp_path, capsys, monkeypatch):
    import errno

    import sspo.cli

    path = tmp_path / "cache" / "locks" if in_cache else tmp_path / "model" / "model_index.json"
    monkeypatch.setenv("SSPO_CACHE", str(tmp_path / "cache"))

    def denied(args):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(sspo.cli, "_eval", denied)
    assert main(["eval", "--model", str(tmp_path / "model")]) == 2
    fix = "set SSPO_CACHE to a folder you can write to" if in_cache else "choose a path you can read and write, or change its permissions"
    assert one_error_line(capsys) == f"sspo: error: {path}: permission denied; {fix}"


@pytest.mark.parametrize("argv, keeps", [(["train", "sd15-lora"], "with --resume continues"), (["eval", "--model", "shapes-base"], "the images and scores on disk are kept"),
                                          (["train", "sd15-lora", "--dry-run"], "nothing half-written was left")])
def test_ctrl_c_is_one_line_saying_how_to_go_on(argv, keeps, capsys, monkeypatch):
    import sspo.cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(sspo.cli, f"_{argv[0]}", interrupted)
    assert main(argv) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("sspo: interrupted; ") and keeps in err and len(err.splitlines()) == 1


def test_ctrl_c_while_the_command_line_is_being_set_up_is_one_line(capsys, monkeypatch):
    import sspo.cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(sspo.cli, "build_parser", interrupted)  # it imports torch: the first seconds of every command
    assert main(["train", "sd15-lora"]) == 130
    assert capsys.readouterr().err.strip() == "sspo: interrupted; nothing was done"


@pytest.mark.parametrize("earlier, saves, resume, going_on", [
    (False, None, False, "no state was saved; the same command starts the run again"),
    (True, None, False, "this start saved no state, and the earlier run in {run} is as it was; the same command starts again"),
    (True, 1, False, "the same command with --resume continues from the last saved state"),
    (True, 4, False, "the same command with --resume continues from the last saved state"),
    (True, None, True, "the same command with --resume continues from the last saved state"),
], ids=["new folder", "earlier run put back", "saved a state", "saved a state of the earlier one's name", "resumed"])
def test_a_stopped_run_says_what_goes_on_from_what_is_saved(earlier, saves, resume, going_on, tmp_path, capsys, monkeypatch):
    import os

    import sspo.training.trainer
    from sspo.training.run_state import STATE_FILE

    run = tmp_path / "run"

    def save_state(step, when):
        (run / "checkpoints" / f"step-{step}").mkdir(parents=True, exist_ok=True)
        (run / "checkpoints" / f"step-{step}" / STATE_FILE).write_text("{}")
        os.utime(run / "checkpoints" / f"step-{step}" / STATE_FILE, (when, when))

    if earlier:
        save_state(4, when=1_000_000)

    def stopped(cfg, resume=False, overwrite=False):
        if saves:
            save_state(saves, when=2_000_000)
        raise KeyboardInterrupt

    monkeypatch.setattr(sspo.training.trainer, "train", stopped)
    assert main(["train", "demo-shapes", f"output_dir={run}", *(["--resume"] if resume else [])]) == 130
    assert capsys.readouterr().err.strip() == "sspo: interrupted; " + going_on.format(run=run)


def test_sigterm_unwinds_like_ctrl_c_with_its_own_line_and_exit_code(capsys, monkeypatch):
    import os
    import signal

    import sspo.cli

    monkeypatch.setattr(sspo.cli, "_train", lambda args: os.kill(os.getpid(), signal.SIGTERM))
    before = signal.getsignal(signal.SIGTERM)
    assert main(["train", "sd15-lora"]) == 143
    err = capsys.readouterr().err.strip()
    assert err == "sspo: stopped by SIGTERM; the same command with --resume continues from the last saved state"
    assert signal.getsignal(signal.SIGTERM) == before  # the caller's handler is back


@pytest.mark.parametrize("argv, line", [
    (["compare", "compare-shapes", "--training-seeds", "-1"], "--training-seeds -1: expected 1 or more training runs per arm"),
    (["eval", "--videos", "{tmp}", "--name", "x", "--name", "y"], "1 --videos but 2 --name: give one --name per --videos, in the same order"),
    (["eval", "--model", "shapes-base", "--seeds", "0,1,0"], "--seeds 0,1,0: 0 given twice, which would repeat the same work; give each once"),
    (["compare", "compare-shapes", "--first-training-seed", "-2"], "--first-training-seed -2: expected 0 to 4294967293 (its 3 seeds end at 4294967295, "
                                                                   "the largest seed)"),
    (["compare", "compare-shapes", "--first-training-seed", "4294967294"], "--first-training-seed 4294967294: expected 0 to 4294967293 (its 3 seeds end "
                                                                           "at 4294967295, the largest seed)"),
    (["compare", "compare-shapes", "--first-training-seed", "998", "--training-seeds", "5", "--grid", "optim.learning_rate=1e-3,3e-3", "--out", "{tmp}/c"],
     "training seed 1000 also chooses the settings (selection seeds start at 1000), so its runs would report the luck that chose them: "
     "pick --first-training-seed so the seeds end below it"),
], ids=["negative seeds", "names per clip folder", "a seed twice", "a negative first seed", "seeds past the largest", "final seeds among the selection seeds"])
def test_counts_are_named_by_the_flag_the_user_gave(argv, line, tmp_path, capsys):
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    assert one_error_line(capsys) == f"sspo: error: {line}"


def test_a_reward_model_that_cannot_load_is_found_before_any_image_is_generated(quick_base, tmp_path, capsys, monkeypatch):
    import sspo.commands.eval

    monkeypatch.setattr(sspo.commands.eval, "generate", lambda *a, **kw: pytest.fail("generated before the scorer was found unloadable"))
    (tmp_path / "empty").mkdir()
    out = tmp_path / "eval"
    argv = ["eval", "--model", quick_base, "--limit", "1", "--metrics", "shapes,pickscore", "--scorer-path", f"pickscore={tmp_path / 'empty'}", "--out", str(out)]
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"sspo: error: metric 'pickscore': cannot load the CLIP model from '{tmp_path / 'empty'}'")
    assert line.endswith("(pass local weights with --scorer-path pickscore=PATH; docs/scorers.md lists the files)")
    assert not out.exists()
