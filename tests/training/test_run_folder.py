"""A run writes only into its own folder, and a run that fails before its first saved state leaves the
folder as it found it (sspo/training/run_folder.py): the user's files, and an earlier run's, byte for byte."""

import json
import os
import shutil
from pathlib import Path

import pytest

from sspo.cli import main
from sspo.errors import ConfigError, TrainingError
from sspo.training.run_folder import MANIFEST, PREVIOUS_RUN, check_output_dir, claimed, start_fresh
from sspo.training.run_lock import HOLDER_FILE, LOCK_FILE
from sspo.training.trainer import Trainer, train

from test_trainer import DEMO, tiny_config, tiny_overrides


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under ``folder``: a file's bytes, None for a folder."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def user_folder(folder: Path) -> Path:
    """A folder of a user's files, one of them named as a run's log."""
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "images.bin").write_bytes(bytes(range(256)))
    (folder / "notes.txt").write_text("my notes\n")
    (folder / "metrics.jsonl").write_text('{"step": 1, "accuracy": 0.9}\n')
    return folder


def one_error(err: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("sspo: error:")]
    assert "Traceback" not in err and len(errors) == 1, err[-2000:]
    return errors[0]


@pytest.fixture
def earlier_run(finished_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    return run


def test_a_finished_run_folder_is_marked_and_holds_no_lock_or_earlier_run(finished_run):
    assert json.loads((finished_run / MANIFEST).read_text())["kind"] == "sspo-run"
    assert not {LOCK_FILE, HOLDER_FILE, PREVIOUS_RUN} & {p.name for p in finished_run.iterdir()}
    assert (finished_run / "final").is_dir() and (finished_run / "pool" / "pool.json").is_file()


def test_train_into_a_folder_of_user_files_is_refused_and_touches_nothing(quick_base, tmp_path, capsys):
    folder = user_folder(tmp_path / "mine")
    before = snapshot(folder)
    assert main(["train", str(DEMO), *tiny_overrides(folder, quick_base)]) == 2
    error = one_error(capsys.readouterr().err)
    assert "holds files that are not an sspo run (data, notes.txt); choose an empty or new folder" in error
    assert snapshot(folder) == before


def test_an_empty_output_dir_never_writes_into_the_current_folder(quick_base, tmp_path, monkeypatch, capsys):
    folder = user_folder(tmp_path / "cwd")
    before = snapshot(folder)
    monkeypatch.chdir(folder)
    assert main(["train", str(DEMO), *tiny_overrides(tmp_path / "unused", quick_base), "output_dir="]) == 2
    one_error(capsys.readouterr().err)
    assert snapshot(folder) == before
    assert not (tmp_path / "unused").exists()


def test_dry_run_reports_a_folder_that_is_not_a_run(quick_base, tmp_path, capsys):
    folder = user_folder(tmp_path / "mine")
    assert main(["train", str(DEMO), *tiny_overrides(folder, quick_base), "--dry-run"]) == 2
    assert "not an sspo run" in one_error(capsys.readouterr().err)


def missing_images(tmp_path: Path) -> Path:
    """An imagefolder whose metadata lists images that are all gone."""
    from sspo.worlds.shapes.world import make_split, write_imagefolder

    folder = write_imagefolder(tmp_path / "images", make_split().train[:4])
    for image in folder.glob("*.png"):
        image.unlink()
    return folder


def test_a_fresh_start_over_a_finished_run_is_refused_unless_asked(earlier_run, quick_base, capsys):
    """Two experiments given one output_dir (a config's default) kept only the last one's results."""
    before = snapshot(earlier_run)
    for command in (["train", str(DEMO), *tiny_overrides(earlier_run, quick_base), "method=dpo"], ["train", str(earlier_run), "--dry-run"]):
        assert main(command) == 2
        assert capsys.readouterr().err.strip() == (
            f"sspo: error: output_dir {earlier_run} holds a finished run ({earlier_run / 'final'}), which a fresh start would replace; "
            "choose another output_dir, pass --resume to continue it (raise iterations to train on), or --overwrite to replace it")
    assert snapshot(earlier_run) == before
    assert main(["train", str(earlier_run), "--dry-run", "--overwrite"]) == 0


def test_a_rerun_with_data_that_cannot_be_read_keeps_the_earlier_run(earlier_run, quick_base, tmp_path, capsys):
    before = snapshot(earlier_run)
    data = missing_images(tmp_path)
    assert main(["train", str(DEMO), *tiny_overrides(earlier_run, quick_base), "method=sft", "data.source=imagefolder", f"data.path={data}",
                 "--overwrite"]) == 2
    assert "none of the 4 files" in one_error(capsys.readouterr().err)
    assert snapshot(earlier_run) == before


def test_a_rerun_with_a_zero_logging_interval_keeps_the_earlier_run(earlier_run, quick_base):
    before = snapshot(earlier_run)
    with pytest.raises(ConfigError, match="log_every"):
        train(tiny_config(earlier_run, quick_base, "log_every=0"))
    assert snapshot(earlier_run) == before


def test_a_rerun_that_fails_at_its_first_step_puts_the_earlier_run_back(earlier_run, quick_base, monkeypatch):
    before = snapshot(earlier_run)

    def fail(self, batches):
        assert (earlier_run / PREVIOUS_RUN).is_dir()  # set aside, not deleted, while the new run has no state
        raise TrainingError("the first step failed")

    monkeypatch.setattr(Trainer, "optimizer_step", fail)
    with pytest.raises(TrainingError, match="the first step failed"):
        train(tiny_config(earlier_run, quick_base), overwrite=True)
    assert snapshot(earlier_run) == before


@pytest.mark.parametrize("folder", ["earlier run", "new folder"])
def test_a_fresh_start_over_an_earlier_run_warns_and_names_resume(folder, earlier_run, quick_base, tmp_path, monkeypatch, caplog):
    def stop(self, batches):
        raise TrainingError("stopped at the first step")

    monkeypatch.setattr(Trainer, "optimizer_step", stop)
    run = earlier_run if folder == "earlier run" else tmp_path / "new"
    with pytest.raises(TrainingError):
        train(tiny_config(run, quick_base), overwrite=True)
    warned = [r.getMessage() for r in caplog.records if "holds an earlier run" in r.getMessage()]
    if folder == "new folder":
        assert warned == []
    else:
        assert warned == [f"{run} holds an earlier run: this one replaces it (the earlier one is deleted at this run's first save; "
                          "to continue it instead, stop now and pass --resume)"]


@pytest.mark.parametrize("left", [False, True], ids=["nothing-left", "a-log-left"])
def test_a_resume_with_nothing_saved_says_once_that_it_starts_over(left, quick_base, tmp_path, monkeypatch, caplog):
    def stop(self, batches):
        raise TrainingError("stopped at the first step")

    run = tmp_path / "run"
    with monkeypatch.context() as patched:
        patched.setattr(Trainer, "optimizer_step", stop)
        with pytest.raises(TrainingError):
            train(tiny_config(run, quick_base, "method=sft"))  # failed before its first save: its folder is gone with it
    if left:  # an earlier run's log without a saved state, which this start deletes
        run.mkdir()
        (run / MANIFEST).write_text('{"kind": "sspo-run", "version": 1}')
        (run / "metrics.jsonl").write_text("")
    caplog.clear()
    train(tiny_config(run, quick_base, "method=sft"), resume=True)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name.startswith("sspo")]
    deleted = " (what a run there wrote is deleted at this run's first save)" if left else ""
    assert warned == [f"--resume: no saved state in {run}; starting from scratch{deleted}"]


def test_a_run_that_fails_in_a_new_folder_leaves_no_folder(quick_base, tmp_path, capsys):
    run = tmp_path / "new" / "run"
    data = missing_images(tmp_path)
    assert main(["train", str(DEMO), *tiny_overrides(run, quick_base), "method=sft", "data.source=imagefolder", f"data.path={data}"]) == 2
    one_error(capsys.readouterr().err)
    assert not (tmp_path / "new").exists()


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        check_output_dir(tmp_path / "run")


def legacy_run(folder: Path, quick_base: str) -> Path:
    """The layout of a run from before the manifest: its config, its outputs and its lock file."""
    from sspo.config import save_yaml

    (folder / "checkpoints" / "step-00000002").mkdir(parents=True)
    save_yaml(tiny_config(folder, quick_base), folder / "config.yaml")
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    (folder / LOCK_FILE).write_text("4242\n")
    return folder


def test_a_run_folder_from_before_the_manifest_is_recognised(quick_base, tmp_path):
    check_output_dir(legacy_run(tmp_path / "run", quick_base))  # accepted


@pytest.mark.parametrize("change", ["a user's file beside it", "a config that is not a run's", "no output beside the config"])
def test_a_folder_that_only_looks_like_an_old_run_is_refused(change, quick_base, tmp_path):
    folder = legacy_run(tmp_path / "run", quick_base)
    if change == "a user's file beside it":
        (folder / "notes.txt").write_text("mine")
    elif change == "a config that is not a run's":
        (folder / "config.yaml").write_text("name: my project\n")
    else:
        shutil.rmtree(folder / "checkpoints")
        (folder / "metrics.jsonl").unlink()
    with pytest.raises(ConfigError, match="not an sspo run"):
        check_output_dir(folder)


def test_a_start_killed_before_its_first_state_is_undone_by_the_next_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / MANIFEST).write_text('{"kind": "sspo-run", "version": 1}')
    (run / "metrics.jsonl").write_text("earlier\n")
    (run / "notes.txt").write_text("a user's file in a run folder stays where it is\n")
    before = snapshot(run)
    start_fresh(run)  # the earlier run goes aside...
    (run / "metrics.jsonl").write_text("killed start\n")  # ...and the start is killed before its first state
    with claimed(run):
        assert snapshot(run) == {**before, LOCK_FILE: b"", HOLDER_FILE: f"{os.getpid()}\n".encode()}
    assert snapshot(run) == before


def test_a_fresh_start_in_a_new_folder_sets_nothing_aside(tmp_path):
    with claimed(tmp_path):  # marks the folder as a run's
        assert not start_fresh(tmp_path)
        assert {p.name for p in tmp_path.iterdir()} == {MANIFEST, LOCK_FILE, HOLDER_FILE}


def test_a_failed_start_in_an_empty_folder_leaves_it_empty(tmp_path):
    with pytest.raises(KeyboardInterrupt), claimed(tmp_path):
        start_fresh(tmp_path)
        (tmp_path / "pool").mkdir()
        (tmp_path / "metrics.jsonl").write_text("failed start\n")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_after_a_start_killed_before_its_first_save_sample_and_export_name_where_the_earlier_run_waits(earlier_run, quick_base, tmp_path, capsys):
    start_fresh(earlier_run)  # the earlier run goes aside; the start is killed before its first save
    waits = (f"the earlier run waits in {earlier_run / PREVIOUS_RUN}: once that start has stopped, `sspo train` into {earlier_run} again "
             "(with --resume to continue it) puts it back")
    assert main(["sample", "--model", quick_base, "--lora", str(earlier_run / "final"), "--prompt", "a red circle", "--out", str(tmp_path / "g.png")]) == 2
    assert one_error(capsys.readouterr().err).endswith(waits)
    assert main(["export", str(earlier_run), "--format", "kohya", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert one_error(capsys.readouterr().err).endswith(waits)


def test_resume_refuses_to_replace_a_finished_run_it_cannot_continue(quick_base, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(run, quick_base, "method=sft", "iterations=1"))
    shutil.rmtree(run / "checkpoints")  # a user saving space once the run finished
    before = snapshot(run)
    with pytest.raises(TrainingError, match=r"holds a finished run \(final/\) but no saved state to continue from"):
        train(tiny_config(run, quick_base, "method=sft", "iterations=2"), resume=True)
    assert snapshot(run) == before


def test_the_dry_run_resumes_what_the_real_resume_puts_back(quick_base, tmp_path):
    from sspo.training.trainer import dry_run

    run = tmp_path / "run"
    train(tiny_config(run, quick_base, "method=sft", "iterations=1"))
    state = sorted((run / "checkpoints").iterdir())[-1].name
    start_fresh(run)  # as a fresh start killed before its first save leaves the folder
    summary = dry_run(tiny_config(run, quick_base, "method=sft", "iterations=2"), resume=True)
    assert f"from {run / 'checkpoints' / state} (the earlier run, which a start stopped before its first save set aside, is put back first)" in summary


def test_the_dry_run_refuses_a_fresh_start_over_a_finished_run_a_killed_start_set_aside(quick_base, tmp_path):
    from sspo.training.trainer import dry_run

    run = tmp_path / "run"
    train(tiny_config(run, quick_base, "method=sft", "iterations=1"))
    start_fresh(run)  # as an --overwrite start killed before its first save leaves the folder
    with pytest.raises(ConfigError, match=rf"output_dir {run} holds a finished run \({run / 'final'}\), which a fresh start would replace"):
        dry_run(tiny_config(run, quick_base, "method=sft", "iterations=1"))
    assert "resume" in dry_run(tiny_config(run, quick_base, "method=sft", "iterations=2"), resume=True)


@pytest.mark.parametrize("link", [PREVIOUS_RUN, HOLDER_FILE, LOCK_FILE, "final.partial", "metrics.jsonl", "checkpoints/step-00000002.partial",
                                  f"{PREVIOUS_RUN}/metrics.jsonl"])
def test_a_run_folder_whose_own_entry_is_a_link_is_refused_and_nothing_goes_through_it(link, tmp_path):
    """A run folder shared as a tarball may carry links where a run writes, moves or deletes its files."""
    user = user_folder(tmp_path / "mine")
    before = snapshot(user)
    run = tmp_path / "run"
    (run / link).parent.mkdir(parents=True)
    (run / MANIFEST).write_text('{"kind": "sspo-run", "version": 1}')
    (run / link).symlink_to(user if link in (PREVIOUS_RUN, "final.partial", "checkpoints/step-00000002.partial") else user / "notes.txt")
    refused = rf"holds symbolic links where a run writes its own files \({link}\); remove them, or choose another output_dir"
    with pytest.raises(ConfigError, match=refused), claimed(run):
        pytest.fail("the folder was taken")
    assert snapshot(user) == before
    assert (run / link).is_symlink()


def test_a_resume_into_a_run_with_a_linked_staging_folder_is_one_error_and_writes_nothing(earlier_run, quick_base, tmp_path, capsys):
    project = user_folder(tmp_path / "project")
    before = snapshot(project)
    (earlier_run / "final.partial").symlink_to(project)
    assert main(["train", str(DEMO), *tiny_overrides(earlier_run, quick_base), "--resume"]) == 2
    assert "holds symbolic links where a run writes its own files (final.partial)" in one_error(capsys.readouterr().err)
    assert snapshot(project) == before
