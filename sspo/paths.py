"""Where sspo keeps what it builds once and reuses: base models, data, latents, bench models."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent / "configs"  # the shipped configs (configs/ in a checkout links here)


PREVIOUS_RUN = ".sspo-previous"  # in a run folder: the earlier run a fresh start set aside until its first save


def set_aside_note(run: Path) -> str:
    """Where an earlier run waits while a fresh start into ``run`` has not saved yet (it is training,
    or it stopped), and how to get it back; empty when none waits."""
    if not (run / PREVIOUS_RUN).is_dir():
        return ""
    return (f"; a run started in {run} has not saved yet (it is training, or it stopped before its first save), and the earlier run waits in "
            f"{run / PREVIOUS_RUN}: once that start has stopped, `sspo train` into {run} again (with --resume to continue it) puts it back")


def cache_root() -> Path:
    return Path(os.environ.get("SSPO_CACHE", Path.home() / ".cache" / "sspo"))


def build_lock(target: str | Path) -> Path:
    """The lock file that serialises building ``target`` (parallel runs and test workers share one build).

    It lives in the cache, named after ``target``'s absolute path, never beside ``target``: a build
    into a folder of the installed package (``sspo base --force --out sspo/weights/...``) or a
    user's folder leaves nothing there but what it built.
    """
    target = Path(target).resolve()
    digest = hashlib.sha256(str(target).encode()).hexdigest()[:16]
    folder = cache_root() / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{target.name}-{digest}.lock"
