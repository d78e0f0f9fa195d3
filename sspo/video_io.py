"""Clips as arrays: ``uint8`` RGB frames ``[F, H, W, 3]``, read from and written to clip files.

sspo's own clip data is multi-page TIFF (deflate): lossless, and every frame is kept. GIF's
256-colour palette would change the defects the shapes world renders, and GIF, WebP and APNG
encoders merge identical consecutive frames into one longer frame (lossless WebP even drops the
duration of a clip that is one frame throughout), so they are for viewing; reading them expands
each frame by its duration in frame periods.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence

from .errors import DataError
from .io import atomic_path

FRAME_MS = 100  # 10 frames per second: GIF stores durations in 10 ms units


def _frames_as_images(frames: np.ndarray) -> list[Image.Image]:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"a clip is uint8 RGB frames [F, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    return [Image.fromarray(frame) for frame in frames]


_OPTIONS = {"tiff": {"compression": "tiff_deflate"}, "gif": {"loop": 0, "duration": FRAME_MS}, "webp": {"lossless": True, "duration": FRAME_MS}}


def encode_clip(frames: np.ndarray, fmt: str = "tiff") -> bytes:
    """A clip as the bytes of a multi-page ``tiff`` (lossless), or an animated ``gif`` / ``webp``."""
    if fmt not in _OPTIONS:
        raise ValueError(f"clip format {fmt!r}: expected one of {', '.join(_OPTIONS)}")
    images = _frames_as_images(frames)
    buffer = io.BytesIO()
    images[0].save(buffer, format=fmt.upper(), save_all=True, append_images=images[1:], **_OPTIONS[fmt])
    return buffer.getvalue()


def decode_clip(source: bytes | str | Path, where: str = "") -> np.ndarray:
    """Every frame of a multi-frame image file (TIFF, GIF, WebP, APNG) as ``uint8 [F, H, W, 3]``.

    A frame shown for k frame periods counts k times; the period is :data:`FRAME_MS` when every
    duration is a multiple of it (sspo's own files), else the shortest frame's duration.
    """
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as clip:
            frames = [(np.asarray(frame.convert("RGB")), frame.info.get("duration") or 0) for frame in ImageSequence.Iterator(clip)]
    except Exception as exc:  # PIL raises many types for corrupt data
        raise DataError(f"cannot read clip {where or source}: {exc}") from None
    durations = [round(d) for _, d in frames]
    period = FRAME_MS if all(d and d % FRAME_MS == 0 for d in durations) else min(durations) or 1
    return np.stack([frame for frame, d in frames for _ in range(max(1, round(d / period)))])


def write_clip(path: str | Path, frames: np.ndarray) -> Path:
    """Write a clip to ``path``; the suffix (``.tiff``, ``.gif``, ``.webp``) names the format."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(encode_clip(frames, {"tif": "tiff"}.get(fmt := path.suffix.lstrip(".").lower(), fmt)))
    return path
