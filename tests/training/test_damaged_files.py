"""Damaged files in a finished run folder: `sspo train --resume` names the file and the way out in
one line and changes nothing else, or (for what can be rebuilt) rebuilds it and ends as the intact
run did; `--lora` at a run folder or a pool file says what to pass instead."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from sspo.cli import main
from sspo.training.run_state import STATE_FILE

from test_trainer import DEMO, metrics, tiny_overrides


@pytest.fixture
def run(finished_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garbage(path: Path) -> None:
    path.write_bytes(b"\x00\xffnot json at all\x01")


def a_list(path: Path) -> None:
    path.write_text("[1, 2, 3]\n")


def without(key: str):
    def damage(path: Path) -> None:
        record = json.loads(path.read_text())
        del record[key]
        path.write_text(json.dumps(record))

    damage.__name__ = f"without_{key}"
    return damage


def wrong(key: str, value):
    """The state file with ``key`` of another type: once a TypeError inside the resume check."""
    def damage(path: Path) -> None:
        path.write_text(json.dumps(json.loads(path.read_text()) | {key: value}))

    damage.__name__ = f"{key}_{type(value).__name__}"
    return damage


def delete(path: Path) -> None:
    path.unlink()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".sspo.lock"}


def resume(run: Path, model: str) -> int:
    return main(["train", str(DEMO), *tiny_overrides(run, model), "--resume"])


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("sspo: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def final_weights(run: Path) -> dict:
    return load_file(run / "final" / "pytorch_lora_weights.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.mark.parametrize("damage", [truncate, garbage, a_list, without("global_step"), without("files"), wrong("processes", "1"),
                                    wrong("replicas", 2), wrong("nonfinite_skips", None)], ids=lambda d: d.__name__)
def test_damaged_state_files_are_named_and_nothing_else_changes(damage, run, quick_base, capsys):
    states = sorted((run / "checkpoints").glob("step-*"))
    for state in states:
        damage(state / STATE_FILE)
    before = snapshot(run)
    assert resume(run, quick_base) == 2
    line = error_line(capsys)
    assert line.startswith(f"sspo: error: --resume: no intact saved state in {run}")
    assert all(f"the resumable state {state / STATE_FILE} is damaged (" in line for state in states)
    assert line.endswith("train without --resume to start again")
    assert snapshot(run) == before


def test_a_state_saved_before_processes_and_skips_were_recorded_resumes(run, finished_run, quick_base):
    shutil.rmtree(run / "final")
    for state in (run / "checkpoints").glob("step-*"):
        for key in ("processes", "replicas", "nonfinite_skips"):
            without(key)(state / STATE_FILE)
    assert resume(run, quick_base) == 0
    assert_same_weights(final_weights(run), final_weights(finished_run))


@pytest.mark.parametrize("damage", [truncate, a_list], ids=lambda d: d.__name__)
def test_a_damaged_newest_state_file_resumes_from_the_one_before(damage, run, finished_run, quick_base, caplog):
    shutil.rmtree(run / "final")
    damage(run / "checkpoints" / "step-00000004" / STATE_FILE)
    assert resume(run, quick_base) == 0
    assert f"{run / 'checkpoints' / 'step-00000004' / STATE_FILE} is damaged" in caplog.text
    assert_same_weights(final_weights(run), final_weights(finished_run))


@pytest.mark.parametrize("damage", [truncate, garbage, a_list, delete], ids=lambda d: d.__name__)
def test_a_damaged_pool_index_is_rebuilt_from_its_checkpoints(damage, run, finished_run, quick_base, caplog):
    """Resumed from the first state, the run draws from the rebuilt pool and ends as the intact run did."""
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    damage(run / "pool" / "pool.json")
    assert resume(run, quick_base) == 0
    if damage is not delete:
        assert f"the checkpoint pool index {run / 'pool' / 'pool.json'} is damaged" in caplog.text and "rebuilding it from the checkpoint files" in caplog.text
    assert json.loads((run / "pool" / "pool.json").read_text()) == json.loads((finished_run / "pool" / "pool.json").read_text())
    assert_same_weights(final_weights(run), final_weights(finished_run))
    assert metrics(run) == metrics(finished_run)


def test_resume_after_a_metrics_line_cut_short_by_a_kill(run, finished_run, quick_base, caplog):
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    log = run / "metrics.jsonl"
    log.write_text(log.read_text() + '{"step": 5, "loss": 0.12')  # SIGKILL in the middle of a write
    assert resume(run, quick_base) == 0
    assert "leaving out its last line, cut short" in caplog.text
    assert metrics(run) == metrics(finished_run)


def test_a_log_cut_inside_a_row_the_state_was_saved_after_is_refused_and_nothing_changes(run, quick_base, capsys):
    # Not a kill while logging (that cuts a row after the newest state): the resume could not log
    # those steps again, so dropping the cut row would leave the log neither whole nor as it was.
    log = run / "metrics.jsonl"
    log.write_bytes(log.read_bytes()[:40])
    before = snapshot(run)
    assert resume(run, quick_base) == 2
    line = error_line(capsys)
    assert f"the training log {log} holds 0 of the 4 rows up to step 4 that step-00000004 was saved after" in line
    assert line.endswith("restore the file, or delete it to resume without its earlier rows")
    assert snapshot(run) == before


LOGS = ["metrics.jsonl", "validation.jsonl", "ssr_truth.jsonl"]


@pytest.mark.parametrize("name", LOGS)
@pytest.mark.parametrize("bad_line, problem", [("garbage", "line 2 is not valid JSON: Expecting value"), ("[1, 2]", "line 2: the top level is a list, not a mapping"),
                                               ('{"loss": 1.0}', "line 2: step is missing")])
def test_a_damaged_line_inside_a_log_is_named_and_nothing_changes(name, bad_line, problem, run, quick_base, capsys):
    shutil.rmtree(run / "final")
    for log in LOGS:  # every log a run may keep: the others intact
        if not (run / log).is_file():
            (run / log).write_text('{"step": 2}\n{"step": 4}\n')
    (run / name).write_text('{"step": 1}\n' + bad_line + '\n{"step": 3}\n')
    before = snapshot(run)
    assert resume(run, quick_base) == 2
    line = error_line(capsys)
    assert line == f"sspo: error: the training log {run / name} is damaged ({problem}); delete that line (or the log) and resume again"
    assert snapshot(run) == before


@pytest.mark.parametrize("command", ["sample", "eval"])
@pytest.mark.parametrize("lora, instead", [
    ("pool/checkpoint-001.safetensors", "is in a training run's checkpoint pool (sspo's own format, not a LoRA diffusers loads); pass its final LoRA: {run}/final, "
                                        "or write pool checkpoint N as one: sspo export {run} --format diffusers --checkpoint N"),
    ("pool", "is in a training run's checkpoint pool"),
    ("checkpoints/step-00000004", "is in a training run's resumable states, not a LoRA; pass its final LoRA: {run}/final"),
])
def test_lora_at_a_run_folder_or_pool_file_says_what_to_pass(command, lora, instead, finished_run, quick_base, tmp_path, capsys):
    path = (finished_run / lora).resolve()
    out = tmp_path / "out"
    if command == "sample":
        argv = ["sample", "--model", quick_base, "--lora", str(path), "--prompt", "a small red circle on the left", "--steps", "2", "--out", str(out / "g.png")]
    else:
        argv = ["eval", "--model", quick_base, "--lora", str(path), "--prompts-per-split", "1", "--seeds", "0", "--steps", "2", "--out", str(out)]
    assert main(argv) == 2
    line = error_line(capsys)
    assert line.startswith(f"sspo: error: LoRA path {path} ") and instead.format(run=finished_run) in line
    assert not out.exists()


def test_a_finished_runs_folder_as_the_lora_samples_its_final_lora(finished_run, quick_base, tmp_path):
    grids = []
    for lora in (finished_run, finished_run / "final"):
        out = tmp_path / f"{lora.name}.png"
        assert main(["sample", "--model", quick_base, "--lora", str(lora), "--prompt", "a small red circle on the left", "--steps", "2", "--rows", "1",
                     "--out", str(out)]) == 0
        grids.append(np.asarray(Image.open(out)))
    assert np.array_equal(*grids)


def test_an_unfinished_runs_folder_as_the_lora_says_how_to_finish_it(run, quick_base, tmp_path, capsys):
    shutil.rmtree(run / "final")
    assert main(["sample", "--model", quick_base, "--lora", str(run), "--prompt", "a small red circle on the left", "--out", str(tmp_path / "g.png")]) == 2
    assert error_line(capsys) == (f"sspo: error: LoRA path {run} is a training run's folder; pass its final LoRA, {run / 'final'}, once the run "
                                  "has finished (sspo train CONFIG --resume finishes it)")


def test_a_damaged_final_lora_is_named(run, quick_base, capsys):
    truncate(run / "final" / "pytorch_lora_weights.safetensors")
    assert main(["sample", "--model", quick_base, "--lora", str(run / "final"), "--prompt", "a small red circle on the left", "--steps", "2",
                 "--out", str(run / "g.png")]) == 2
    line = error_line(capsys)
    assert f"LoRA weights {run / 'final' / 'pytorch_lora_weights.safetensors'} is damaged (" in line and not (run / "g.png").exists()


def test_a_lora_folder_given_as_the_model_says_to_pass_it_as_the_lora(finished_run, tmp_path, capsys):
    final = finished_run / "final"
    assert main(["sample", "--model", str(final), "--prompt", "a small red circle on the left", "--out", str(tmp_path / "g.png")]) == 2
    assert error_line(capsys) == (f"sspo: error: model path {final} holds a LoRA, not a pipeline; pass it as the LoRA (--lora of sspo sample and eval) "
                                  "and the model it was trained on as the model")
    full_run = tmp_path / "full"  # a full fine-tuning run's folder given for its model
    (full_run / "final").mkdir(parents=True)
    (full_run / "final" / "model_index.json").write_text("{}")
    assert main(["sample", "--model", str(full_run), "--prompt", "a small red circle on the left", "--out", str(tmp_path / "g.png")]) == 2
    assert error_line(capsys) == f"sspo: error: model path {full_run} is a training run's folder; its model is {full_run / 'final'}: pass that"
