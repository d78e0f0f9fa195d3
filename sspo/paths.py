"""Where sspo keeps what it builds once and reuses: base models, data, latents, bench models."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("SSPO_CACHE", Path.home() / ".cache" / "sspo"))
