"""Where sspo keeps what it builds once and reuses: base models, data, latents, bench models."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent / "configs"  # the shipped configs (configs/ in a checkout links here)


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
