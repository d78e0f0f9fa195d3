"""Killed at every named phase (sspo/training/faults.py), a run resumes to the uninterrupted run's weights and
pool, bitwise; damaged states, changed configs, a second run, non-finite losses and full disks give
one clear error and lose nothing (docs/reliability.md)."""

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sspo.cli import main
from sspo.errors import ConfigError, TrainingError
from sspo.training.faults import ENV
from sspo.training.run_state import STATE_FILE, manifest_problems, saved_states
from sspo.training.trainer import train

from test_trainer import DEMO, metrics, tiny_config, tiny_overrides

ARMS = {
    "sft": ["method=sft"],
    "dpo": ["method=dpo"],
    "spin": ["method=spin"],
    "spin_one_state": ["method=spin", "checkpoints_total_limit=1"],  # its pool keeps only what one state can draw
    "sspo": [],
    "sspo_full": ["model.lora=false"],
    "sspo_ema": ["model.lora=false", "optim.ema=true"],  # the final model is the average: a resume must restore it
    "sspo_cached": ["data.cache_latents=true"],  # its own reference: cached latents round differently
    "sspo_fused": ["negatives.fuse_lora=true"],  # its own reference: merged LoRA samples round differently
    # A flow-matching model (the tiny SD3 of `model_of`): sigma draws, velocity errors, the flow Euler sampler
    "sspo_sd3": ["negatives.scheduler=pipeline", "model.lora_targets=[to_q, to_k, to_v, to_out.0]"],
}
_references: dict[str, Path] = {}


@pytest.fixture
def model_of(quick_base, request):
    """``model_of(arm)``: the base model an arm trains (the tiny SD3 pipeline, built only when an SD3 arm runs)."""
    return lambda arm: request.getfixturevalue("tiny_sd3") if arm.endswith("_sd3") else quick_base


@pytest.fixture
def reference(model_of, tmp_path_factory):
    """``reference(arm)``: the folder of an uninterrupted run of ``arm``, one per arm and test process."""

    def run(arm: str) -> Path:
        if arm not in _references:
            out = tmp_path_factory.mktemp(f"reference-{arm}")
            train(tiny_config(out, model_of(arm), *ARMS[arm], f"data.cache_dir={out / 'latents'}"))
            _references[arm] = out
        return _references[arm]

    return run


def results(run: Path) -> dict[str, bytes]:
    """What a run is for, byte for byte: its final weights and its checkpoint pool."""
    files = [*(run / "final").rglob("*.safetensors"), *(run / "pool").glob("*")]
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(files) if p.is_file() and not p.name.startswith(".")}


def stray_files(run: Path) -> list[Path]:
    return [p for p in run.rglob("*") if p.name.endswith(".partial") or (p.name.startswith(".") and p.name.endswith(".tmp"))]


def assert_saved_states_intact(run: Path) -> None:
    for state_dir in saved_states(run):
        state = json.loads((state_dir / STATE_FILE).read_text())
        assert manifest_problems(state_dir, state["files"]) == []
        assert manifest_problems(run / "pool", state["pool_files"]) == []


def kill_cli_run(run: Path, model: str, overrides: list[str], fault: str, resume: bool) -> None:
    cmd = [sys.executable, "-m", "sspo", "train", str(DEMO), *tiny_overrides(run, model), *overrides, *(["--resume"] if resume else [])]
    # One thread, as in this process (conftest.py): another thread count sums in another order.
    proc = subprocess.run(cmd, env={**os.environ, ENV: fault, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, f"{fault} was never reached:\n{proc.stderr[-2000:]}"


# (arm, the faults of the first run and of the resumes killed again, overrides of the killed run)
KILLS = [
    ("sspo", ["pool_write:2", "step:1"], []),  # theta_1's file written, not listed; the resume killed at its first step
    ("sspo", ["checkpoint_save:2"], ["checkpoints_total_limit=1"]),  # the one kept state must outlive its successor's save
    ("sspo", ["final_save:1"], []),
    ("sspo", ["validation:1"], ["validation.every_iterations=1", "validation.prompts=a small red circle on the left"]),
    ("sspo", ["negatives:2", "negatives:1"], []),
    ("sspo", ["step:3"], ["save_every_steps=1"]),
    ("sspo", ["step:2"], ["save_every_steps=1"]),  # resumed within an iteration whose negatives were pregenerated
    ("sspo_cached", ["latent_cache:1"], []),
    ("sft", ["step:3"], []),
    ("sspo", ["negatives:2"], ["data.num_workers=2"]),  # read by DataLoader workers: the batches of the training process, resumed exactly
    ("sft", ["final_save:1"], []),
    ("dpo", ["pool_write:1", "checkpoint_save:1"], []),
    ("spin", ["negatives:2"], []),  # erd last: one checkpoint, one generation chunk per iteration
    ("spin", ["pool_release:1", "pool_release:1"], []),  # theta_0 emptied, not marked; the resume killed releasing it again
    ("spin_one_state", ["checkpoint_save:2"], []),  # the one kept state's checkpoint outlives its successor's save
    ("sspo_full", ["pool_write:2"], []),
    ("sspo_full", ["checkpoint_save:2", "final_save:1"], []),
    ("sspo_fused", ["negatives:2", "step:2"], ["save_every_steps=1"]),  # killed with a checkpoint merged, then within an iteration
    ("sspo_sd3", ["step:2", "negatives:1"], ["save_every_steps=1"]),  # resumed within an iteration, then killed sampling the next one
    ("sspo_ema", ["step:3", "validation:1"], ["save_every_steps=1", "validation.every_iterations=1", "validation.prompts=a small red circle on the left"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("arm,faults,overrides", KILLS, ids=[f"{arm}-{'-'.join(f)}" for arm, f, _ in KILLS])
def test_killed_at_a_named_phase_resumes_to_the_same_weights_and_pool(arm, faults, overrides, reference, model_of, tmp_path):
    expected = results(reference(arm))
    run, model = tmp_path / "run", model_of(arm)
    overrides = [*ARMS[arm], f"data.cache_dir={tmp_path / 'latents'}", *overrides]
    for i, fault in enumerate(faults):
        kill_cli_run(run, model, overrides, fault, resume=i > 0)
        assert_saved_states_intact(run)
        if "checkpoints_total_limit=1" in overrides:  # killed saving step 4: step 2 is still there
            assert [p.name for p in saved_states(run)] == ["step-00000002"]
        if fault.startswith("validation"):  # the validated iteration's training is saved before its validation
            assert saved_states(run) and int(saved_states(run)[-1].name.removeprefix("step-")) % 2 == 0
    train(tiny_config(run, model, *overrides), resume=True)
    assert results(run) == expected
    assert stray_files(run) == []
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]  # no step logged twice
    if "validation.every_iterations=1" in overrides:  # an iteration's validation stopped by the kill is done on resuming
        assert sorted(p.name for p in (run / "validation").glob("step-*.png")) == ["step-00000002.png", "step-00000004.png"]


def copy_run(source: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(source, run, ignore=shutil.ignore_patterns("latents"))
    return run


def flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("arm,damage,file", [
    ("sspo", truncate, "checkpoints/step-00000004/model.safetensors"), ("sspo", flip_byte, "pool/checkpoint-002.safetensors"),
    ("spin", flip_byte, "pool/checkpoint-002.safetensors"),  # the older state's own checkpoint, 1, was kept for it
])
def test_a_damaged_newest_state_is_named_and_the_previous_one_resumes(arm, damage, file, reference, quick_base, tmp_path, caplog):
    expected = results(reference(arm))
    run = copy_run(reference(arm), tmp_path)
    shutil.rmtree(run / "final")
    damage(run / file)
    train(tiny_config(run, quick_base, *ARMS[arm]), resume=True)
    assert file in caplog.text and "resuming from the older state" in caplog.text
    assert results(run) == expected


def test_damage_to_a_file_every_state_needs_is_one_clear_error(reference, quick_base, tmp_path):
    run = copy_run(reference("sspo"), tmp_path)
    flip_byte(run / "pool" / "checkpoint-000.safetensors")
    with pytest.raises(TrainingError, match=r"no intact saved state .*checkpoint-000.safetensors differs from what was saved \(corrupted\)"):
        train(tiny_config(run, quick_base), resume=True)


def test_resume_with_a_result_changing_key_names_it_and_keeps_the_saved_config(reference, quick_base, tmp_path, capsys):
    run = copy_run(reference("sspo"), tmp_path)
    saved = (run / "config.yaml").read_text()
    args = ["train", str(DEMO), *tiny_overrides(run, quick_base), "optim.learning_rate=0.002", "beta=100", "negatives.scheduler=unipc", "--resume"]
    capsys.readouterr()  # only what main prints counts (a fixture built in this test may have printed before)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sspo: error: --resume: the config differs") and "\n" not in err
    assert "optim.learning_rate: 0.001 -> 0.002" in err and "beta: 500.0 -> 100.0" in err
    assert "negatives.scheduler: 'ddim' -> 'unipc'" in err  # the sampler of negatives is recorded and changes the result
    assert (run / "config.yaml").read_text() == saved
    with pytest.raises(ConfigError, match="model.lora"):  # and a full fine-tune cannot continue a LoRA run
        train(tiny_config(run, quick_base, "model.lora=false"), resume=True)


@pytest.mark.parametrize("arm, unread, read", [
    ("sft", ["beta=100", "negatives.steps=50", "erd=last", "erd_per=sample", "ssr=off", "ssr_draws=3"], "optim.learning_rate=0.5"),
    ("spin", ["erd=initial", "ssr=indicator", "ssr_draws=3"], "negatives.steps=50"),
])
def test_resume_lets_keys_the_method_never_reads_change(arm, unread, read, reference, quick_base):
    from sspo.training.checkpoints import check_resumed_config
    from sspo.training.config import resolved

    run = reference(arm)
    check_resumed_config(resolved(tiny_config(run, quick_base, *ARMS[arm], *unread)), run, processes=1)  # SFT has no reference, SPIN fixes erd and ssr
    key = read.split("=")[0]
    with pytest.raises(ConfigError, match=rf"--resume: the config differs .*\({key}: "):
        check_resumed_config(resolved(tiny_config(run, quick_base, *ARMS[arm], *unread, read)), run, processes=1)


def test_resume_under_another_launch_precision_is_refused(reference, quick_base, tmp_path, monkeypatch):
    run = copy_run(reference("sspo"), tmp_path)
    assert "mixed_precision: 'no'" in (run / "config.yaml").read_text()  # resolved when it trained, not left unset
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    AcceleratorState._reset_state(reset_partial_state=True)  # a new launch is a new process, with a fresh accelerate state
    try:
        with pytest.raises(ConfigError, match=r"mixed_precision: 'no' -> 'bf16'"):
            train(tiny_config(run, quick_base), resume=True)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_resume_may_change_harmless_keys(reference, quick_base, tmp_path):
    run = copy_run(reference("sspo"), tmp_path)
    train(tiny_config(run, quick_base, "log_every=2", "checkpoints_total_limit=3", "nonfinite=skip"), resume=True)
    assert results(run) == results(reference("sspo"))


HOLD = "import sys, time\nfrom sspo.training.run_lock import RunLock\nlock = RunLock(sys.argv[1]).acquire()\nprint('held', flush=True)\ntime.sleep(120)\n"


def test_a_second_train_into_a_live_runs_folder_is_refused_with_its_pid(reference, quick_base, tmp_path, capsys):
    run = copy_run(reference("sspo"), tmp_path)
    before = results(run)
    live = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout.readline().strip() == "held"
        assert main(["train", str(DEMO), *tiny_overrides(run, quick_base)]) == 2
    finally:
        live.kill()
        live.wait()
    assert f"in use by a running sspo train (pid {live.pid})" in capsys.readouterr().err
    assert results(run) == before  # the refused run deleted and wrote nothing


def test_a_diverging_run_stops_with_one_line_and_saves_no_nan_weights(quick_base, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(DEMO), *tiny_overrides(run, quick_base), "optim.learning_rate=1e9"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("sspo: error:")]  # the rest is the progress bar
    assert "Traceback" not in err and len(errors) == 1
    assert errors[0].startswith("sspo: error: method sspo, step 2: non-finite loss")
    assert "last good state is none (no state saved yet)" in errors[0]
    assert not (run / "final").exists()
    for weights in run.rglob("*.safetensors"):  # theta_0 in the pool and any saved state stay finite
        assert all(torch.isfinite(t).all() for t in load_file(weights).values())


def test_nonfinite_skip_counts_skipped_steps_and_keeps_weights_finite(quick_base, tmp_path, caplog):
    with caplog.at_level("INFO", logger="sspo"):
        final = train(tiny_config(tmp_path / "run", quick_base, "optim.learning_rate=1e9", "nonfinite=skip"))
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    skips = [r["nonfinite_skips"] for r in rows]
    assert skips == sorted(skips) and skips[-1] > 0
    assert f"; {skips[-1]} of 4 skipped for a non-finite loss or gradient; the final model is {final}" in caplog.text  # the summary counts them
    assert all(math.isfinite(r["loss"]) for r, before in zip(rows, [0] + skips) if r["nonfinite_skips"] == before)
    assert all(torch.isfinite(t).all() for t in load_file(final / "pytorch_lora_weights.safetensors").values())


def safetensors_no_space():
    """What safetensors raises for a write to a full disk: its own error, not an OSError."""
    from safetensors import SafetensorError

    return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def fail_third_pool_write(monkeypatch):
    import safetensors.torch

    real, calls = safetensors.torch.save_file, []

    def save_file(tensors, path, metadata=None):
        if Path(path).parent.name == "pool":
            calls.append(path)
        if len(calls) == 3 and calls[-1] == path:  # theta_2, at the end of the last iteration
            Path(path).write_bytes(b"half")
            raise safetensors_no_space()
        real(tensors, path, metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def fail_second_checkpoint_save(monkeypatch):
    from accelerate import Accelerator

    real, calls = Accelerator.save_state, []

    def save_state(self, output_dir, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:
            (Path(output_dir) / "model.safetensors").write_bytes(b"half")
            raise safetensors_no_space()
        return real(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_state)


def forbid_final_config(monkeypatch):
    import sspo.training.checkpoints

    real = sspo.training.checkpoints.save_yaml

    def save_yaml(obj, path):
        if Path(path).name == "sspo_config.yaml":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        real(obj, path)

    monkeypatch.setattr(sspo.training.checkpoints, "save_yaml", save_yaml)


@pytest.mark.parametrize("fail,message", [
    (fail_third_pool_write, "could not write pool checkpoint 2 .*No space left on device"),
    (fail_second_checkpoint_save, "could not write the resumable state .*step-00000004: No space left on device"),
    (forbid_final_config, "could not write the final model .*: Permission denied"),
])
def test_a_failed_save_is_one_error_and_keeps_the_previous_state(fail, message, reference, quick_base, tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path / "run", quick_base)
    with monkeypatch.context() as patch:
        fail(patch)
        with pytest.raises(TrainingError, match=message):
            train(cfg)
    run = tmp_path / "run"
    assert stray_files(run) == [] and not (run / "final").exists()
    assert saved_states(run)[0].name == "step-00000002"
    assert_saved_states_intact(run)
    train(cfg, resume=True)
    assert results(run) == results(reference("sspo"))


@pytest.mark.parametrize("phase", ["checkpoint_save", "final_save"])
def test_ctrl_c_during_a_save_leaves_no_half_written_folder(phase, quick_base, tmp_path, monkeypatch):
    import sspo.training.checkpoints

    calls = []

    def interrupt(name):  # the second save: the first state stays, so nothing clears the run's folder for it
        calls.append(name)
        if calls.count(phase) == (2 if phase == "checkpoint_save" else 1):
            raise KeyboardInterrupt

    monkeypatch.setattr(sspo.training.checkpoints, "fault_point", interrupt)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(run, quick_base, "method=sft", "iterations=2"))
    assert (run / "checkpoints").is_dir() and stray_files(run) == []


def test_gradient_checkpointing_turned_on_at_resume_ends_with_the_same_weights(reference, quick_base, tmp_path):
    uninterrupted = reference("sspo")
    run = tmp_path / "run"
    train(tiny_config(run, quick_base, *ARMS["sspo"], "iterations=1"))
    train(tiny_config(run, quick_base, *ARMS["sspo"], "model.gradient_checkpointing=true"), resume=True)
    assert results(run) == results(uninterrupted)


def test_a_resumed_runs_tensorboard_log_holds_each_step_once(quick_base, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    kill_cli_run(run, quick_base, ["report_to=tensorboard"], "step:4", resume=False)  # step 3 logged after the state of step 2
    train(tiny_config(run, quick_base, "report_to=tensorboard"), resume=True)
    (folder,) = (run / "logs").glob("*/*")
    logged = EventAccumulator(str(folder))
    logged.Reload()
    assert [event.step for event in logged.Scalars("train/loss")] == [1, 2, 3, 4]
    states = [json.loads((state / STATE_FILE).read_text()) for state in saved_states(run)]
    assert len({state["tracker_run_id"] for state in states}) == 1  # wandb's run, continued


# What accelerate's wandb tracker calls, each call written as a line of the file FAKE_WANDB_LOG names.
FAKE_WANDB = """
import json, os

class _Config(dict):
    def update(self, values, allow_val_change=False):
        dict.update(self, values)

config = _Config()

class Image:
    def __init__(self, data, caption=None):
        pass

def _record(row):
    with open(os.environ["FAKE_WANDB_LOG"], "a") as f:
        f.write(json.dumps(row) + "\\n")

class _Run:
    def log(self, values, step=None, **kwargs):
        _record({"step": step, "keys": sorted(values)})

    def finish(self):
        _record({"finish": True})

def init(**kwargs):
    _record({"init": {key: kwargs.get(key) for key in ("project", "name", "id", "resume")}})
    return _Run()
"""


def test_a_resumed_run_logs_into_the_wandb_run_it_continues(quick_base, tmp_path, monkeypatch):
    import importlib.util

    import accelerate.tracking
    from accelerate.utils import LoggerType

    (tmp_path / "wandb.py").write_text(FAKE_WANDB)
    spec = importlib.util.spec_from_file_location("wandb", tmp_path / "wandb.py")
    spec.loader.exec_module(fake := importlib.util.module_from_spec(spec))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    # accelerate lists the trackers it can use when it is first imported, which may be before this test.
    monkeypatch.setattr(accelerate.tracking, "_available_trackers", [*accelerate.tracking._available_trackers, LoggerType.WANDB])
    log = tmp_path / "wandb.jsonl"
    monkeypatch.setenv("FAKE_WANDB_LOG", str(log))

    run = tmp_path / "run"
    train(tiny_config(run, quick_base, "report_to=wandb", "iterations=1"))
    train(tiny_config(run, quick_base, "report_to=wandb", "iterations=2"), resume=True)
    train(tiny_config(tmp_path / "other", quick_base, "report_to=wandb", "iterations=1"))
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    first, resumed, other = [row["init"] for row in rows if "init" in row]
    assert first == resumed == {"project": "sspo", "name": "run", "id": first["id"], "resume": "allow"}
    assert other["id"] != first["id"] and other["name"] == "other"
    ends = [i for i, row in enumerate(rows) if "init" in row] + [len(rows)]
    steps = [[row["step"] for row in rows[a:b] if "train/loss" in row.get("keys", [])] for a, b in zip(ends, ends[1:])]
    per_iteration = len(steps[0])
    assert per_iteration and steps[0] + steps[1] == list(range(1, 2 * per_iteration + 1))  # the resumed run goes on from its step


def test_a_resume_removes_the_temporary_files_of_killed_writes(quick_base, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(run, quick_base, "iterations=1"))
    left = [run / "pool" / ".checkpoint-002.safetensors.k1ll3d00.tmp", run / "pool" / ".tmpK1ll3d", run / ".metrics.jsonl.k1ll3d00.tmp"]
    # (.tmpK1ll3d: the file safetensors writes a checkpoint through before renaming it onto sspo's temporary name)
    for path in left:  # as a write killed by SIGKILL leaves them (the pool's can be a whole denoiser's size)
        path.write_bytes(b"half")
    train(tiny_config(run, quick_base, "iterations=2"), resume=True)
    assert not any(path.exists() for path in left) and stray_files(run) == []
