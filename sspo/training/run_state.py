"""What a resume may trust: file manifests of saved states and the config keys a resume may change.

A resumable state records the size and SHA-256 of every file it depends on (its own files and
the pool checkpoints up to its pool size). A resume checks them before loading, so a truncated
or corrupted file is named instead of crashing deep inside torch or, worse, training on garbage,
and the trainer falls back to the previous complete state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sspo.io import file_digest

STATE_FILE = "trainer_state.json"  # in each resumable state's folder: its step, pool size and file manifests


def saved_states(run_dir: Path) -> list[Path]:
    """The folders of the complete resumable states in ``run_dir``, oldest first."""
    return sorted(state.parent for state in (run_dir / "checkpoints").glob("step-*/" + STATE_FILE))


def disk_to_come(state_bytes: int, pool_bytes: int, kept: int, limit: int, saves_left: int, pool_adds_left: int) -> int:
    """Bytes a run will hold at its fullest beyond what it holds now: the pool checkpoints it adds
    and keeps (``pool_adds_left``, ``pool_bytes`` each), and resumable states (``state_bytes`` each) up to ``limit`` kept
    plus the one being written before the oldest goes; ``kept`` states are there now."""
    peak_states = min(limit + 1, kept + saves_left)
    return pool_adds_left * pool_bytes + max(0, peak_states - kept) * state_bytes


def saves_after(step: int, total: int, steps_per_iteration: int, save_every_steps: int) -> tuple[int, int]:
    """``(states saved, iterations ended)`` after ``step`` until ``total`` steps: a state at each
    iteration's end and every ``save_every_steps`` steps between (0: none between)."""
    ends = total // steps_per_iteration - step // steps_per_iteration
    between = 0
    if save_every_steps:
        multiples = total // save_every_steps - step // save_every_steps
        common = math.lcm(save_every_steps, steps_per_iteration)  # a step of both is saved once, as an iteration's end
        between = multiples - (total // common - step // common)
    return ends + between, ends


# Keys a resumed run may change without changing what it computes. `iterations` only extends
# (or shortens) the run: no draw depends on the total, nor does a constant learning rate (a
# schedule that decays over the run's length is checked apart: checkpoints.py). `nonfinite` only matters in a run that
# would otherwise stop: resuming a stopped run with `nonfinite: skip` is what it is for. Gradient
# checkpointing recomputes the same activations (bitwise on the CPU, a test checks it), so a resume
# that runs out of memory can turn it on.
HARMLESS_KEYS = ("iterations", "output_dir", "report_to", "tracker_project", "tracker_run_name", "log_every", "save_every_steps",
                 "checkpoints_total_limit", "validation", "diagnostics", "data.cache_dir", "data.num_workers", "data.prefetch_factor", "nonfinite",
                 "model.gradient_checkpointing", "process_timeout_s")


def manifest(root: Path, files: Iterable[Path]) -> dict[str, dict]:
    """``{path relative to root: {size, sha256}}`` of ``files``."""
    return {str(path.relative_to(root)): file_digest(path) for path in sorted(files)}


def manifest_problems(root: Path, recorded: dict[str, dict]) -> list[str]:
    """Human-readable problems of the files ``recorded`` under ``root`` (empty: all intact)."""
    problems = []
    for name, expected in recorded.items():
        path = root / name
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        size = path.stat().st_size
        if size != expected["size"]:
            problems.append(f"{path} has {size} bytes, {expected['size']} were saved (truncated?)")
        elif file_digest(path)["sha256"] != expected["sha256"]:
            problems.append(f"{path} differs from what was saved (corrupted)")
    return problems


STATE_SHAPE = {"global_step": int, "pool_size": int, "files": {str: {"size": int, "sha256": str}}, "pool_files": {str: {"size": int, "sha256": str}}}
# Recorded by every state since they were added; a state saved before then is read without them.
LATER_KEYS = {"processes": int, "replicas": [[float]], "nonfinite_skips": int}


def read_state(path: Path) -> dict:
    """A resumable state's state file, checked to hold what a resume reads (a DamagedFileError if not)."""
    from sspo.io import DamagedFileError, read_json, shape_problem

    fix = "restore it, or train without --resume to start again"
    state = read_json(path, what="the resumable state", shape=STATE_SHAPE, fix=fix)
    if problem := shape_problem({k: state[k] for k in LATER_KEYS if k in state}, {k: v for k, v in LATER_KEYS.items() if k in state}):
        raise DamagedFileError(f"the resumable state {path} is damaged ({problem})", fix)
    return state


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{'a.b': value}`` of a nested dict; tuples become lists, as a YAML round trip makes them."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def _harmless(key: str) -> bool:
    return any(key == h or key.startswith(h + ".") for h in HARMLESS_KEYS)


PATH_KEYS = ("model.pretrained", "model.motion_adapter", "data.path")  # the same file or folder however it is spelled


def _same(key: str, old: Any, new: Any) -> bool:
    if old == new:
        return True
    if key not in PATH_KEYS or not isinstance(old, str) or not isinstance(new, str):
        return False
    old_path, new_path = Path(old).expanduser(), Path(new).expanduser()
    return old_path.exists() and new_path.exists() and old_path.resolve() == new_path.resolve()


def config_differences(saved: dict, current: dict, defaults: dict | None = None) -> list[str]:
    """``key: saved -> current`` for every result-changing key on which two configs differ.

    A key the saved config lacks (it was saved before the key existed) counts as its value in
    ``defaults``: a new option's default is the behaviour from before it existed. A local path
    (PATH_KEYS) spelled another way (``./data/``, an absolute path) is the same if it names the
    same file or folder from the current folder.
    """
    old, new = {**flatten(defaults or {}), **flatten(saved)}, flatten(current)
    return [
        f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(old.keys() | new.keys())
        if not _harmless(key) and not _same(key, old.get(key), new.get(key))
    ]
