"""From a stored file to pixels: decoding an image or a clip, aspect-ratio buckets, resize, crop and flip."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

from sspo.data.config import DataConfig
from sspo.data.sources import TarMember
from sspo.errors import DataError
from sspo.io import special_file
from sspo.video_io import VIDEO_SUFFIXES, clip_length, read_clip, sample_frames


def load_image(path_or_bytes: str | Path | bytes, where: str = "") -> Image.Image:
    """Open an image as RGB, upright as viewers show it (a camera's EXIF orientation applied),
    turning a corrupt file into a DataError that names it."""
    try:
        source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
        with Image.open(source) as image:
            return _rgb(ImageOps.exif_transpose(image))
    except Exception as exc:  # PIL raises many types for corrupt data (and DecompressionBombError for huge images)
        reason = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc))  # PIL names the in-memory file by its address
        raise DataError(f"cannot read image {where or path_or_bytes}: {reason}") from None


def _rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB of any mode: 16-bit and float values scaled (PIL's own conversion clips them, turning
    most of an image white or black) and transparent pixels over white (not the colour hidden under them)."""
    if image.mode.startswith("I"):  # 16-bit grayscale PNGs open as I;16 or I
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))
    if image.mode == "F":  # float TIFFs: 0 to 1 (or, past 1, 0 to 255), which PIL's conversion would round to black
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        image = Image.fromarray((values * (255 if values.max() <= 1 else 1)).round().clip(0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    return image.convert("RGB")


def _file(value: Any, what: str, where: str) -> tuple[bytes | str, str]:
    """Encoded bytes or a path, however a table stores a file, and ``where`` with the path in
    front: the log line of a skipped row then names the file to fix."""
    if isinstance(value, dict):  # how datasets stores an Image feature
        value = value.get("bytes") or value.get("path")
    if isinstance(value, TarMember):
        return value.read(), f"{value.shard} member {value.name} ({where})"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), where
    if isinstance(value, (str, Path)):
        if kind := special_file(value):
            raise DataError(f"cannot read {what} {value} ({where}): it is {kind}, not a file")
        return str(value), f"{value} ({where})"
    raise DataError(f"cannot read {what} {where}: expected encoded bytes or a path, got {type(value).__name__}")


_PNG_ORIENTATION_KEYS = {"exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp"}


def image_size(value: Any, where: str) -> tuple[int, int]:
    """(width, height) from an image's header, without decoding it, upright as :func:`load_image` turns it."""
    data, where = _file(value, "image", where)
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            width, height = image.size
            # A PNG's getexif() decodes the whole image to look for an EXIF chunk after the pixels; one
            # whose header holds none (nor XMP, nor EXIF as text, which getexif also reads) has no orientation.
            exif = image.getexif() if image.format != "PNG" or _PNG_ORIENTATION_KEYS & image.info.keys() else {}
            turned = exif.get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)  # a quarter turn (and a mirror, 5 and 7)
            return (height, width) if turned else (width, height)
    except Exception as exc:  # PIL raises many types for corrupt data
        raise DataError(f"cannot read image {where}: {exc}") from None


def open_image(value: Any, where: str) -> Image.Image:
    if isinstance(value, Image.Image):
        return _rgb(value)
    data, where = _file(value, "image", where)
    if isinstance(data, str) and (Path(data).is_dir() or Path(data).suffix.lower() in VIDEO_SUFFIXES):
        raise DataError(f"cannot read image {where}: it is a clip, and data.frames is 0 (images); clips train a video model, with data.frames set")
    return load_image(data, where)


def open_clip(value: Any, where: str, cfg: DataConfig, start: float) -> np.ndarray:
    """The ``data.frames`` frames of a clip; ``start`` in [0, 1) picks a random start among the possible ones."""
    data, where = _file(value, "clip", where)
    span = (cfg.frames - 1) * cfg.frame_stride + 1
    # A random start counts the frames first, so that only its window is kept: a long clip need not fit in
    # memory (a video file is decoded through twice, once to count).
    first = int(start * max(0, clip_length(data, where) - span + 1)) if cfg.frame_start == "random" else 0
    return sample_frames(read_clip(data, where, max_frames=span, first=first), cfg.frames, cfg.frame_stride, 0, where)


def bucket_sizes(resolution: int, step: int, max_aspect: float) -> list[tuple[int, int]]:
    """``data.buckets``' (width, height) sizes: for each width a multiple of ``step``, the largest
    height that is one too and keeps the area within ``resolution``^2, aspect ratios within ``max_aspect``."""
    sizes = set()
    for width in range(step, int(resolution * max_aspect) + 1, step):
        height = resolution * resolution // width // step * step
        if height >= step and max(width / height, height / width) <= max_aspect:
            sizes.add((width, height))
    return sorted(sizes)


def nearest_bucket(sizes: list[tuple[int, int]], width: int, height: int) -> tuple[int, int]:
    aspect = np.log(width / height)
    return min(sizes, key=lambda size: abs(np.log(size[0] / size[1]) - aspect))


def resize_crop_flip(image: Image.Image, size: tuple[int, int], offset: tuple[float, float] | None, flip: bool) -> tuple[Image.Image, tuple[int, int]]:
    """``image`` resized to cover ``size`` (width, height), cropped to it (``offset``: where, in [0, 1)^2;
    None: centred) and flipped, with the crop's top-left corner (top, left) in the resized, flipped image."""
    (w, h), (width, height) = image.size, size
    scale = max(width / w, height / h)
    new = (max(width, round(w * scale)), max(height, round(h * scale)))
    if new != image.size:
        image = image.resize(new, Image.Resampling.BICUBIC)  # PIL widens the kernel when shrinking: antialiased
    fx, fy = offset or (0.5, 0.5)
    left, top = round(fx * (new[0] - width)), round(fy * (new[1] - height))
    image = image.crop((left, top, left + width, top + height))
    if flip:
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), (top, new[0] - width - left)
    return image, (top, left)


def to_tensor(image: Image.Image) -> torch.Tensor:
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
    return (pixels / 127.5 - 1.0).permute(2, 0, 1).contiguous()
