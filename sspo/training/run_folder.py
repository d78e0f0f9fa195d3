"""Which folder a run may write, and how a new run replaces an earlier one there without losing it.

``sspo train`` writes only into a folder it can tell is a run folder: a new or empty one, or one
holding ``sspo-run.json`` (MANIFEST), which a run writes when it starts. Folders of runs from
before the manifest are known by their layout: a ``config.yaml`` that reads as a TrainConfig, a
run's output beside it, and nothing but entries a run writes. Any other folder that holds files
is refused, so a mistyped ``output_dir`` (or an empty one: the current folder) cannot clear a
user's files. In a run folder only the run's own entries (RUN_ENTRIES) are ever moved or deleted,
and a folder where one of them is a symbolic link is refused, so nothing is written through one.

A fresh start (no ``--resume``, or nothing to resume) deletes nothing up front: it moves the
earlier run's entries into ``.sspo-previous`` (PREVIOUS_RUN) and deletes them only once the new run's
first resumable state is complete. A run that fails before then (a bad setting, a diverging first
step, Ctrl-C) leaves the folder as it found it: the earlier run back in place, none of its own
files (manifest, lock, config, logs), and no folder it created. A start killed before its first
state (SIGKILL) leaves the earlier run in PREVIOUS_RUN; the next run into the folder puts it back
before anything else, as if that start had failed (so ``--resume`` then resumes the earlier run).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

from sspo.config import load_config
from sspo.errors import ConfigError, SSPOError
from sspo.io import atomic_write_json, check_write_target, entry_list, is_temporary, missing_folders, remove_empty_folders
from sspo.paths import PREVIOUS_RUN
from sspo.training.config import TrainConfig
from sspo.training.run_lock import HOLDER_FILE, LOCK_FILE, RunLock
from sspo.training.run_state import saved_states

MANIFEST = "sspo-run.json"
_KIND, _VERSION = "sspo-run", 1
# Everything a run writes into its folder; eval.json and showcase.png are sspo compare's scores of it.
RUN_ENTRIES = frozenset({
    MANIFEST, "config.yaml", "checkpoints", "pool", "final", "final.partial", "metrics.jsonl", "validation.jsonl",
    "validation", "ssr_truth.jsonl", "logs", "eval.json", "showcase.png",
})
_LOCKS = frozenset({LOCK_FILE, HOLDER_FILE})
_OUTPUTS = ("checkpoints", "pool", "final", "metrics.jsonl")  # a pre-manifest run holds at least one


def _is_own(name: str) -> bool:
    return name in RUN_ENTRIES or name in _LOCKS or name == PREVIOUS_RUN or is_temporary(name)


def _is_run_folder(run_dir: Path, names: set[str]) -> bool:
    if names <= _LOCKS:  # empty, or holding only the lock files a run that wrote nothing leaves behind
        return True
    if MANIFEST in names:
        try:
            return json.loads((run_dir / MANIFEST).read_text()).get("kind") == _KIND
        except (OSError, ValueError, AttributeError):
            return False
    if "config.yaml" not in names or not names & set(_OUTPUTS) or not all(map(_is_own, names)):
        return False
    try:
        load_config(TrainConfig, run_dir / "config.yaml")
    except SSPOError:
        return False
    return True


def is_run_folder(run_dir: Path) -> bool:
    """The folder ``run_dir`` holds only what ``sspo train`` wrote there (or nothing)."""
    return _is_run_folder(run_dir, {p.name for p in run_dir.iterdir()})


def check_output_dir(run_dir: str | Path, beside_main: bool = False) -> None:
    """Refuse an ``output_dir`` that exists and holds files but is not a run folder. ``beside_main``:
    in a process beside the main one, which may be setting the folder up (:func:`claimed`) meanwhile,
    a folder of a run's own entries only passes; the main process checks it whole."""
    run_dir = Path(run_dir)
    check_write_target(run_dir, "output_dir")
    if not run_dir.exists():
        return
    names = {p.name for p in run_dir.iterdir()}
    if not (beside_main and all(map(_is_own, names)) or _is_run_folder(run_dir, names)):
        foreign = [n for n in names if not _is_own(n)] or names - _LOCKS
        raise ConfigError(f"output_dir {run_dir.resolve()} holds files that are not an sspo run ({entry_list(foreign)}); choose an empty or new folder")
    if links := _links(run_dir):
        raise ConfigError(f"output_dir {run_dir.resolve()} holds symbolic links where a run writes its own files "
                          f"({entry_list(str(link.relative_to(run_dir)) for link in links)}); remove them, or choose another output_dir")


def _links(folder: Path) -> list[Path]:
    """The run's own entries in ``folder`` that are symbolic links, with those in its checkpoints/ and
    in the earlier run set aside there (which goes back in its place): a run folder from elsewhere
    may carry any, and a run would write, move or delete through them into the files they name."""
    links = [p for p in folder.iterdir() if _is_own(p.name) and p.is_symlink()]
    if _is_folder(folder / "checkpoints"):
        links += [p for p in (folder / "checkpoints").iterdir() if p.is_symlink()]
    if _is_folder(folder / PREVIOUS_RUN):
        links += _links(folder / PREVIOUS_RUN)
    return links


def _is_folder(path: Path) -> bool:
    """A folder, not a link to one: is_dir() follows links."""
    return path.is_dir() and not path.is_symlink()


def _entries(run_dir: Path) -> list[Path]:
    """The run's own entries in ``run_dir``, neither the lock nor PREVIOUS_RUN."""
    return [p for p in run_dir.iterdir() if _is_own(p.name) and p.name not in _LOCKS and p.name != PREVIOUS_RUN] if run_dir.is_dir() else []


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)


def _mark(run_dir: Path) -> None:
    atomic_write_json(run_dir / MANIFEST, {"kind": _KIND, "version": _VERSION})


def start_fresh(run_dir: Path) -> bool:
    """Set the earlier run in ``run_dir`` aside into PREVIOUS_RUN and mark the folder as a run's (main
    process); whether there was an earlier run's output to set aside."""
    previous, entries = run_dir / PREVIOUS_RUN, _entries(run_dir)
    replaced = previous.exists() or any(entry.name in _OUTPUTS for entry in entries)
    if previous.exists():  # a start killed before its first state: the earlier run stays in PREVIOUS_RUN
        for entry in entries:
            _remove(entry)
    elif any(entry.name != MANIFEST for entry in entries):  # more than the mark claimed() gives a new folder
        previous.mkdir()
        for entry in entries:
            entry.rename(previous / entry.name)
    _mark(run_dir)
    return replaced


def discard_previous(run_dir: Path) -> None:
    """The new run has a complete resumable state: the earlier run it replaces can go (main process)."""
    shutil.rmtree(run_dir / PREVIOUS_RUN, ignore_errors=True)


def _put_back(run_dir: Path) -> None:
    """The earlier run set aside in PREVIOUS_RUN in place of what a start without a saved state wrote."""
    previous = run_dir / PREVIOUS_RUN
    if _is_folder(previous):  # a link's target is not the earlier run: its files are not moved here
        for entry in _entries(run_dir):
            _remove(entry)
        for entry in previous.iterdir():
            entry.rename(run_dir / entry.name)
        previous.rmdir()


def resumed_folder(run_dir: Path) -> Path:
    """The folder a ``--resume`` into ``run_dir`` continues: ``run_dir``, or PREVIOUS_RUN where a start
    killed before its first state set the earlier run aside (:func:`claimed` puts it back first)."""
    previous = run_dir / PREVIOUS_RUN
    return previous if previous.is_dir() and not saved_states(run_dir) else run_dir


@contextlib.contextmanager
def claimed(run_dir: str | Path) -> Iterator[None]:
    """Check ``run_dir``, then hold its lock while a run writes it; a run that fails before its first
    resumable state leaves the folder as it was (module docstring). Main process only."""
    run_dir = Path(run_dir)
    check_output_dir(run_dir)
    created = missing_folders(run_dir)
    lock = RunLock(run_dir).acquire()
    try:
        if saved_states(run_dir):
            discard_previous(run_dir)
        else:
            _put_back(run_dir)  # a start killed before its first state is undone, as a failed one is
        before = {p.name for p in run_dir.iterdir()}
        if MANIFEST not in before:  # at once: a run killed while it sets up leaves a folder the next run knows as its own
            _mark(run_dir)
        try:
            yield
        except BaseException:
            if not saved_states(run_dir):
                _put_back(run_dir)
                for entry in _entries(run_dir):
                    if entry.name not in before:
                        _remove(entry)
            raise
    finally:
        lock.release()
        remove_empty_folders(created)
