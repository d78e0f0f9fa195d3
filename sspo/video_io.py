"""Clips as arrays: ``uint8`` RGB frames ``[F, H, W, 3]``, read from and written to clip files.

sspo's own clip data is multi-page TIFF (deflate): lossless, and every frame is kept. GIF's
256-colour palette would change the defects the shapes world renders, and GIF, WebP and APNG
encoders merge identical consecutive frames into one longer frame (lossless WebP even drops the
duration of a clip that is one frame throughout), so they are for viewing; reading them expands
each frame by its duration in frame periods, never past the frames asked for: a few bytes of GIF
can say "shown for 655 seconds".

Users' clips come as video files (MP4, WebM, MOV, MKV, AVI), read and written through PyAV
(FFmpeg's own decoders, no second torch), or as folders of frame images; :func:`read_clip` takes
all of these, and :func:`sample_frames` picks the frames a model trains on.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence, UnidentifiedImageError

from sspo.config import MAX_CLIP_FRAMES
from sspo.errors import DataError
from sspo.io import atomic_path, special_file

FRAME_MS = 100  # 10 frames per second: GIF stores durations in 10 ms units
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg")
MULTI_FRAME_SUFFIXES = (".tif", ".tiff", ".gif", ".webp", ".png", ".apng")
# Writing: the first encoder this PyAV build has. yuv420p (what players expect) needs even sizes.
_VIDEO_ENCODERS = {"mp4": ("libx264", "mpeg4"), "mov": ("libx264", "mpeg4"), "mkv": ("libx264", "mpeg4"), "webm": ("libvpx-vp9", "libvpx")}
_MUXERS = {"mkv": "matroska"}


def _checked(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"a clip is uint8 RGB frames [F, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    return frames


def _frames_as_images(frames: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(frame) for frame in _checked(frames)]


_OPTIONS = {"tiff": {"compression": "tiff_deflate"}, "gif": {"loop": 0, "duration": FRAME_MS}, "webp": {"lossless": True, "duration": FRAME_MS}}


def encode_clip(frames: np.ndarray, fmt: str = "tiff") -> bytes:
    """A clip as the bytes of a multi-page ``tiff`` (lossless), an animated ``gif`` / ``webp``, or a
    ``mp4`` / ``mov`` / ``mkv`` (H.264) or ``webm`` (VP9) video at 1000 / :data:`FRAME_MS` fps."""
    if fmt in _VIDEO_ENCODERS:
        return _encode_video(frames, fmt)
    if fmt not in _OPTIONS:
        raise ValueError(f"clip format {fmt!r}: expected one of {', '.join([*_OPTIONS, *_VIDEO_ENCODERS])}")
    images = _frames_as_images(frames)
    buffer = io.BytesIO()
    images[0].save(buffer, format=fmt.upper(), save_all=True, append_images=images[1:], **_OPTIONS[fmt])
    return buffer.getvalue()


def decode_clip(source: bytes | str | Path, where: str = "", max_frames: int | None = None, first: int = 0) -> np.ndarray:
    """The frames of a multi-frame image file (TIFF, GIF, WebP, APNG) as ``uint8 [F, H, W, 3]``,
    ``max_frames`` of them from frame ``first`` (None: all, at most :data:`MAX_CLIP_FRAMES`).

    A frame shown for k frame periods counts k times; the period is :data:`FRAME_MS` when every
    duration is a multiple of it (sspo's own files), else the shortest frame's duration. Only the
    frames asked for are decoded into arrays.
    """
    where = _name(source, where)
    with _image_errors(source, where), Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as clip:
        repeats = _repeats(clip)
        if max_frames is None:
            _check_length(sum(repeats), where)
        stop = sum(repeats) if max_frames is None else first + max_frames
        frames, shown = [], 0
        for frame, k in zip(ImageSequence.Iterator(clip), repeats):
            if shown + k > first:
                frames += [np.asarray(frame.convert("RGB"))] * (min(shown + k, stop) - max(shown, first))
            shown += k
            if shown >= stop:
                break
    return np.stack(frames)


def _repeats(clip: Image.Image) -> list[int]:
    """How many frame periods each frame of an open multi-frame image is shown for (seeking through
    the frames keeps none of them)."""
    durations = [round(frame.info.get("duration") or 0) for frame in ImageSequence.Iterator(clip)]
    period = FRAME_MS if all(d and d % FRAME_MS == 0 for d in durations) else min(durations) or 1
    return [max(1, round(d / period)) for d in durations]


@contextlib.contextmanager
def _image_errors(source: bytes | str | Path, where: str):
    """Whatever PIL raises while a clip file is read, as a DataError naming ``where`` and why."""
    try:
        with warnings.catch_warnings():  # PIL warns of damaged data before it raises: the error below says it once
            warnings.simplefilter("ignore")
            yield
    except DataError:
        raise
    except Exception as exc:  # PIL raises many types for corrupt data
        suffix = "" if isinstance(source, bytes) else Path(source).suffix.lower()
        if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, Image.DecompressionBombError)):
            reason = _reason(exc)
        elif not isinstance(exc, UnidentifiedImageError):  # recognised, then unreadable
            reason = f"damaged or cut short ({_reason(exc)})"
        elif suffix in MULTI_FRAME_SUFFIXES:
            reason = f"damaged or cut short: not a readable {suffix.lstrip('.').upper()} file"
        else:
            reason = _reason(exc)
        raise DataError(f"cannot read clip {where}: {reason}") from None


def _check_length(frames: int, where: str) -> None:
    if frames > MAX_CLIP_FRAMES:
        raise DataError(f"cannot read clip {where}: it has more than {MAX_CLIP_FRAMES} frames, the most a clip read whole may have "
                        "(a GIF, WebP or APNG frame counts once for each frame period it is shown); cut it shorter")


def write_clip(path: str | Path, frames: np.ndarray) -> Path:
    """Write a clip to ``path``; the suffix (``.tiff``, ``.gif``, ``.webp``, ``.mp4``, ...) names the format."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(encode_clip(frames, {"tif": "tiff"}.get(fmt := path.suffix.lstrip(".").lower(), fmt)))
    return path


def _encode_video(frames: np.ndarray, fmt: str) -> bytes:
    """A lossy video for viewing; an odd width or height gets its last column or row repeated."""
    import av

    frames = _checked(frames)
    encoder = next((name for name in _VIDEO_ENCODERS[fmt] if name in av.codecs_available), None)
    if encoder is None:
        raise ValueError(f"this PyAV build has no {fmt} encoder ({' or '.join(_VIDEO_ENCODERS[fmt])}); write tiff or gif instead")
    frames = np.pad(frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)), mode="edge")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=_MUXERS.get(fmt, fmt)) as container:
        stream = container.add_stream(encoder, rate=1000 // FRAME_MS)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush the frames the encoder still holds
    return buffer.getvalue()


def read_clip(source: bytes | str | Path, where: str = "", max_frames: int | None = None, first: int = 0) -> np.ndarray:
    """Frames ``uint8 [F, H, W, 3]`` of a clip in any form users keep one: a video file
    (:data:`VIDEO_SUFFIXES`; bytes are recognised by their header), a multi-frame image
    (:func:`decode_clip`), or a folder of frame images in name order (``frame_2`` before ``frame_10``).

    ``max_frames`` from frame ``first`` (:func:`clip_length` tells how many there are): 16 frames of a
    long 1080p video need not decode all of it. Without ``max_frames`` the whole clip, refused past
    :data:`MAX_CLIP_FRAMES` frames. Anything unreadable is a DataError naming ``where`` (default: the path).
    """
    where = _name(source, where)
    if not isinstance(source, bytes) and Path(source).is_dir():
        return _read_frame_folder(Path(source), where, max_frames, first)
    if _is_video(source):
        return _read_video(source, where, max_frames, first)
    return decode_clip(source, where, max_frames, first)


def clip_length(source: bytes | str | Path, where: str = "") -> int:
    """How many frames :func:`read_clip` finds in a clip, counted without keeping any (a video is
    decoded through once)."""
    where = _name(source, where)
    if not isinstance(source, bytes) and Path(source).is_dir():
        return len(_frame_paths(Path(source), where))
    if _is_video(source):
        with _decoded_video(source, where) as frames:
            return sum(1 for _ in frames)
    with _image_errors(source, where), Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as clip:
        return sum(_repeats(clip))


def _name(source: bytes | str | Path, where: str) -> str:
    return where or ("(bytes)" if isinstance(source, bytes) else str(source))


def _reason(exc: Exception) -> str:
    """Why a file is unreadable, without the errno and file object FFmpeg's and PIL's messages carry."""
    if isinstance(exc, UnidentifiedImageError):
        return f"not a video ({', '.join(VIDEO_SUFFIXES)}) or a multi-frame image (TIFF, GIF, WebP, APNG)"
    return getattr(exc, "strerror", None) or str(exc)


def _is_video(source: bytes | str | Path) -> bool:
    if not isinstance(source, bytes):
        return Path(source).suffix.lower() in VIDEO_SUFFIXES
    # ISO media (MP4, MOV) has an 'ftyp' box first; Matroska (MKV, WebM) an EBML header; AVI is RIFF.
    return source[4:8] == b"ftyp" or source[:4] == b"\x1a\x45\xdf\xa3" or (source[:4] == b"RIFF" and source[8:12] == b"AVI ")


def _read_video(source: bytes | str | Path, where: str, max_frames: int | None, first: int) -> np.ndarray:
    # A whole video is read up to one frame past the limit: its length is known only once decoded.
    count = MAX_CLIP_FRAMES + 1 if max_frames is None else max_frames
    with _decoded_video(source, where) as decoded:
        frames = [frame.to_ndarray(format="rgb24") for frame in itertools.islice(decoded, first, first + count)]  # skipped frames stay unconverted
    if max_frames is None:
        _check_length(len(frames), where)
    if not frames:
        raise DataError(f"cannot read clip {where}: it has no frames")
    return np.stack(frames)


@contextlib.contextmanager
def _decoded_video(source: bytes | str | Path, where: str):
    """The decoded frames of a video's first video stream, as PyAV frames; any failure a DataError naming ``where``."""
    import av

    try:
        with av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source)) as container:
            if not container.streams.video:
                raise ValueError("it has no video stream")
            yield container.decode(container.streams.video[0])
    except Exception as exc:  # FFmpeg raises many types for damaged or truncated files
        raise DataError(f"cannot read clip {where}: {_reason(exc)}") from None


def _natural(path: Path) -> list:
    """Sort key: digit runs compare as numbers, so unpadded frame numbers keep their order."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _frame_paths(folder: Path, where: str) -> list[Path]:
    suffixes = Image.registered_extensions()
    paths = sorted((p for p in folder.iterdir() if p.suffix.lower() in suffixes and not p.name.startswith(".")), key=_natural)
    if not paths:
        raise DataError(f"cannot read clip {where}: frame folder {folder} has no image files")
    return paths


def _read_frame_folder(folder: Path, where: str, max_frames: int | None, first: int) -> np.ndarray:
    paths = _frame_paths(folder, where)
    if max_frames is None:
        _check_length(len(paths), where)
    paths = paths[first : None if max_frames is None else first + max_frames]
    frames = []
    for path in paths:
        if kind := special_file(path):
            raise DataError(f"cannot read clip {where}: frame {path.name} is {kind}, not a file")
        try:
            with Image.open(path) as image:
                frames.append(np.asarray(image.convert("RGB")))
        except Exception as exc:  # PIL raises many types for corrupt data
            raise DataError(f"cannot read clip {where}: frame {path.name}: {_reason(exc)}") from None
        if frames[-1].shape != frames[0].shape:
            (h0, w0), (h, w) = frames[0].shape[:2], frames[-1].shape[:2]
            raise DataError(f"cannot read clip {where}: frame {path.name} is {w}x{h} but frame {paths[0].name} is {w0}x{h0}; every frame needs one size")
    return np.stack(frames)


def sample_frames(clip: np.ndarray, frames: int, stride: int = 1, start: int = 0, where: str = "") -> np.ndarray:
    """``frames`` frames of ``clip``, one every ``stride`` source frames from frame ``start``;
    a clip too short for them is a DataError naming ``where``, its length and the length needed."""
    needed = start + (frames - 1) * stride + 1
    if len(clip) < needed:
        raise DataError(
            f"clip {where or '(unnamed)'} is too short: {'it is a still image (1 frame)' if len(clip) == 1 else f'it has {len(clip)} frames'}, {needed} are needed for "
            f"{frames} frames one every {stride} from frame {start}"
        )
    return clip[start:needed:stride]
