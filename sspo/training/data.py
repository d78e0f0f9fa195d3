"""Training data: preference pairs or captioned images, as image tensors in [-1, 1] with their prompt.

With ``data.frames`` each image is a clip instead (a video file, a multi-frame image or a folder of
frames, see docs/data.md): ``[F, 3, H, W]``, every frame resized and cropped as an image would be.

Sources: a Pick-a-Pic-style parquet file or folder of shards (read a row group at a time, so it
need not fit in memory), an imagefolder with ``metadata.jsonl`` or ``metadata.csv``, a folder of
images with a ``.txt`` caption beside each (kohya / SimpleTuner), webdataset ``.tar`` shards, or a
``datasets`` dataset (a ``save_to_disk`` folder, a local dataset folder or a hub id). A table with
the two image columns (``data.image_0_column``) is read as preference pairs; otherwise as single
images (``data.image_column`` + ``data.text_column``), which gives winners only.

Every random choice (SSPOr's side, crop offsets, flips, clip starts, dropped captions) is a pure
function of ``(seed, source row, epoch)``, so a resumed run sees exactly the images an
uninterrupted one would have, and DataLoader workers serve exactly what the main process would.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import json
import logging
import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sspo.config import Registered, check, setting, validate
from sspo.errors import DataError
from sspo.video_io import VIDEO_SUFFIXES, read_clip, sample_frames
from sspo.worlds.registry import WORLDS, TrainingDataRequest, find_world

log = logging.getLogger(__name__)

FILE_SOURCES = ("parquet", "imagefolder", "caption-files", "webdataset", "hf")  # data.source: these, or a world's name (sspo.worlds)
MODES = ("winners", "random")
FRAME_STARTS = ("first", "random")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
TIE = 0.5
LABELS = (0.0, TIE, 1.0)  # image_1 wins, a tie, image_0 wins
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Tags keep the random streams of different decisions independent even for equal (seed, row, epoch).
_SIDE_STREAM, _AUGMENT_STREAM, _CAPTION_STREAM = 1, 2, 3


@dataclasses.dataclass
class DataConfig:
    # "parquet" | "imagefolder" | "caption-files" (images, each with a .txt caption of the same name) | "webdataset" (.tar shards) |
    # "hf" (datasets: save_to_disk folder or hub id) | a world (sspo.worlds): "shapes" | "moving-shapes" (clips) | a registered one
    source: str = setting("parquet", choices=Registered(WORLDS, *FILE_SOURCES))
    path: str = ""  # parquet file or folder of shards | imagefolder with metadata.jsonl or .csv | caption-files folder | .tar or folder of them | hf folder or id
    split: str = "train"  # hf split; for an imagefolder, a subfolder used when it exists
    caption_column: str = setting("caption", nonempty=True)  # pairs: prompt text
    image_0_column: str = setting("jpg_0", nonempty=True)  # pairs: first image (encoded bytes or {'bytes': ...})
    image_1_column: str = setting("jpg_1", nonempty=True)  # pairs: second image
    label_column: str = setting("label_0", nonempty=True)  # pairs: 1 = image_0 wins, 0 = image_1 wins, 0.5 = tie
    image_column: str = setting("image", nonempty=True)  # single images (imagefolder / hf)
    text_column: str = setting("text", nonempty=True)  # single images: prompt text
    remove_ties: bool = True  # drop pairs with label 0.5 (kept ties get a random winner, as in "random")
    mode: str = setting("winners", choices=MODES)  # "winners": winner from the label | "random": SSPOr, random side per row
    # Shorter side resized to this, then cropped square. A multiple of 8, the VAE's downsampling
    # factor in SD-1.5, SDXL and AnimateDiff (the tiny worlds' VAEs downsample by 4).
    resolution: int = setting(512, at_least=8, multiple_of=8)
    center_crop: bool = True  # False: random crop (deterministic per seed, row and epoch)
    random_flip: bool = False  # horizontal flip with probability 0.5
    max_samples: int | None = setting(None, at_least=1)  # keep only the first N rows (after tie removal); None = all
    # Probability that a row trains with the empty prompt instead of its caption (drawn per row and
    # epoch), so that the model keeps an unconditional prediction for classifier-free guidance.
    caption_dropout: float = setting(0.0, at_least=0, at_most=1)
    # 0: one random order over all rows. N: row groups (parquet) or shards (webdataset) in random
    # order, rows shuffled within windows of N of them, so each is read about once per epoch: for
    # data far larger than memory, where a random row would cost a row group's read.
    shuffle_row_groups: int = setting(0, at_least=0)
    num_workers: int = setting(0, at_least=0)  # DataLoader processes that read and decode ahead of training; 0: the training process reads
    prefetch_factor: int = setting(2, at_least=1)  # with num_workers: micro-batches each worker reads ahead
    # Video: with frames > 0 every image column holds clips (video files, multi-frame images or
    # frame folders) and an item is [frames, 3, H, W], all frames of a pair cropped and flipped alike.
    # Aspect-ratio buckets: each image is resized and cropped to the bucket (width x height of about
    # resolution^2 pixels, sides multiples of bucket_step) nearest its aspect ratio, and every
    # micro-batch holds one bucket (a bucket's last batch is filled with its first rows again).
    # False: the shorter side resized to resolution, then cropped square.
    buckets: bool = False
    bucket_step: int = setting(64, at_least=8, multiple_of=8)  # bucket sides are multiples of this: 64 keeps SD's latent sides divisible by 8
    bucket_max_aspect: float = setting(2.0, at_least=1)  # the widest bucket's width / height, and the tallest's height / width
    frames: int = setting(0, at_least=0)  # 0: images | N: N frames per clip; a shorter clip is skipped like an unreadable image
    frame_stride: int = setting(1, at_least=1)  # take every k-th source frame (2: every other frame)
    frame_start: str = setting("first", choices=FRAME_STARTS)  # "first": from frame 0 | "random": a random start (per seed, row and epoch)
    seed: int = setting(0, at_least=0)  # seeds SSPOr sides, random crops and flips
    world_pairs_per_prompt: int = setting(4, at_least=1)  # a world source: pairs rendered per alignment-train combination
    world_split_seed: int = setting(0, at_least=0)  # a world source: the world's train / held-out split
    world_without_validation: bool = False  # a world source: leave out the validation combinations (choosing settings)
    # Encode every row once (VAE latents, text embeddings) and train from safetensors shards
    # (sspo/training/latent_cache.py). Needs center_crop true, random_flip false and frame_start first:
    # augmentation would change an item's latents from epoch to epoch.
    cache_latents: bool = False
    cache_dir: str | None = None  # None: $SSPO_CACHE/latents/<hash of model, dtype, data config, data files>

    def __post_init__(self) -> None:
        validate(self, "data.")
        check(self.source in FILE_SOURCES or not self.path, "data.path", f"is set, but data.source {self.source!r} is a world, which builds its own pairs; "
              f"drop data.path, or set data.source to the path's format ({', '.join(FILE_SOURCES)})")
        if self.buckets:
            check(self.bucket_step <= self.resolution, "data.bucket_step", f"{self.bucket_step} is above data.resolution {self.resolution}; lower it")
            clashing = [key for key, on in (("data.frames", self.frames), ("data.cache_latents", self.cache_latents),
                                             ("data.shuffle_row_groups", self.shuffle_row_groups)) if on]
            check(not clashing, "data.buckets", f"works with images read live in one random order; unset {' and '.join(clashing)} or set data.buckets: false")
        if self.cache_latents:
            changing = (("data.center_crop: false", not self.center_crop), ("data.random_flip: true", self.random_flip),
                        ("data.frame_start: random", self.frames and self.frame_start == "random"))
            augmented = [key for key, on in changing if on]
            check(not augmented, "data.cache_latents", f"cached latents need unaugmented images, but {' and '.join(augmented)} change them every epoch; "
                  "set data.center_crop: true, data.random_flip: false and data.frame_start: first, or data.cache_latents: false")
            check(not self.caption_dropout, "data.cache_latents", "cached text conditions cannot drop captions epoch by epoch; "
                  "set data.caption_dropout: 0, or data.cache_latents: false")


# --------------------------------------------------------------------------------------------------
# Sources: each yields plain row dicts, plus the column names of every file for validation.


@dataclasses.dataclass
class _Source:
    where: str  # what error messages call it
    files: list[tuple[str, list[str]]]  # (file, its columns): a shard missing a column is named
    load: Callable[[list[str]], Any]  # load(columns): rows with len, [i] and .column(name)


class _ArrowRows:
    """Row access to a pyarrow table; images stay encoded until an item is requested."""

    def __init__(self, table):
        self.table = table

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i: int) -> dict:
        return self.table.slice(i, 1).to_pylist()[0]

    def column(self, name: str) -> list:
        return self.table.column(name).to_pylist()


class _ListRows:
    """Rows listed in memory (captions, labels and file references; images stay on disk)."""

    def __init__(self, rows: list[dict], groups: list[range] | None = None):
        self.rows, self.groups = rows, groups

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]

    def column(self, name: str) -> list:
        return [row.get(name) for row in self.rows]

    def group_ranges(self) -> list[range]:
        return self.groups or [range(len(self.rows))]


class _HFRows:
    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        return self.ds[i]

    def column(self, name: str) -> list:
        return list(self.ds[name])


def _parquet_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    # Hidden and underscore files are temporaries and markers (atomic writes, _SUCCESS), not shards.
    files = sorted(p for p in path.rglob("*.parquet") if not p.name.startswith((".", "_")))
    if not files:
        raise DataError(f"no .parquet files in folder {path} (data.path)")
    return files


class _ParquetRows:
    """Rows of parquet shards read a row group at a time: at most ``cache_groups`` row groups of the
    needed columns are held, so a dataset far larger than memory trains."""

    def __init__(self, files: list[Path], columns: list[str], cache_groups: int):
        import pyarrow.parquet as pq

        self.files, self.columns, self.cache_groups = files, columns, cache_groups
        self._groups: list[tuple[int, int]] = []  # (file, row group in it), in row order
        self._starts: list[int] = []  # first row of each
        rows = 0
        for f, path in enumerate(files):
            meta = pq.read_metadata(path)
            for g in range(meta.num_row_groups):
                self._groups.append((f, g))
                self._starts.append(rows)
                rows += meta.row_group(g).num_rows
        self._rows = rows
        self._cache: collections.OrderedDict[int, Any] = collections.OrderedDict()
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self._rows

    def group_ranges(self) -> list[range]:
        """The rows of each row group: :meth:`PreferenceDataset.epoch_order` shuffles in windows of them."""
        return [range(start, end) for start, end in zip(self._starts, [*self._starts[1:], self._rows])]

    def __getitem__(self, i: int) -> dict:
        g = bisect.bisect_right(self._starts, i) - 1
        return self._group(g).slice(i - self._starts[g], 1).to_pylist()[0]

    def column(self, name: str) -> list:
        """One column of every row (the labels, read before training), a row group at a time."""
        values = []
        for g in range(len(self._groups)):
            f, group = self._groups[g]
            values += self._file(f).read_row_group(group, columns=[name], use_threads=False).column(name).to_pylist()
        return values

    def _group(self, g: int) -> Any:
        if g in self._cache:
            self._cache.move_to_end(g)
            return self._cache[g]
        f, group = self._groups[g]
        # One thread: Arrow's pool would hold up to two groups more in flight, and the reader already
        # runs in each DataLoader worker beside training's threads.
        self._cache[g] = table = self._file(f).read_row_group(group, columns=self.columns, use_threads=False)
        while len(self._cache) > self.cache_groups:
            self._cache.popitem(last=False)
        return table

    def _file(self, f: int) -> Any:
        import pyarrow.parquet as pq

        if self._pid != os.getpid():  # a DataLoader worker opens its own handles, not its parent's
            self._handles, self._cache, self._pid = {}, collections.OrderedDict(), os.getpid()
        if f not in self._handles:
            self._handles[f] = pq.ParquetFile(self.files[f])
        return self._handles[f]


def _open_parquet(cfg: DataConfig) -> _Source:
    import pyarrow.parquet as pq

    files = _parquet_files(Path(cfg.path))
    try:
        schemas = [(str(f), pq.read_schema(f).names) for f in files]
    except Exception as exc:  # pyarrow raises several types for a non-parquet file
        raise DataError(f"cannot read parquet {cfg.path} (data.path): {exc}") from None
    # A shuffle window reads each of its row groups once only if all of them stay in the cache.
    return _Source(cfg.path, schemas, lambda columns: _ParquetRows(files, columns, max(2, cfg.shuffle_row_groups)))


def _metadata_file(cfg: DataConfig) -> Path:
    root = Path(cfg.path)
    for folder in (root / cfg.split, root):
        found = [folder / name for name in METADATA_FILES if (folder / name).is_file()]
        if len(found) > 1:
            raise DataError(f"imagefolder {folder} has both {found[0].name} and {found[1].name}; keep one")
        if found:
            return found[0]
    raise DataError(
        f"imagefolder {root} (data.path) has no metadata.jsonl or metadata.csv; expected one with a file_name column "
        "(an image, clip or frame folder, relative to it) and a text column (the prompt)"
    )


def _metadata_entries(meta: Path, cfg: DataConfig) -> list[dict]:
    """The lines of ``metadata.jsonl`` or the rows of ``metadata.csv`` (MagicTime / ChronoMagic
    captions come as CSV), as dicts; numbers in a CSV stay numbers, captions stay strings."""
    if meta.suffix == ".csv":
        import pyarrow as pa
        import pyarrow.csv

        text = pyarrow.csv.ConvertOptions(column_types={cfg.text_column: pa.string(), cfg.caption_column: pa.string()})
        try:
            return pyarrow.csv.read_csv(meta, convert_options=text).to_pylist()
        except pa.ArrowInvalid as exc:
            raise DataError(f"cannot read {meta}: {exc}") from None
    entries = []
    for n, line in enumerate(meta.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{meta} line {n} is not valid JSON: {exc}") from None
    return entries


def _open_imagefolder(cfg: DataConfig) -> _Source:
    import pyarrow as pa

    meta = _metadata_file(cfg)
    folder = meta.parent
    rows = []
    for entry in _metadata_entries(meta, cfg):
        # As datasets' imagefolder does: file_name becomes the "image" column, x_file_name becomes "x".
        row = {}
        for key, value in entry.items():
            if key == "file_name":
                row["image"] = str(folder / str(value))  # str: a CSV's file names may read as numbers
            elif key.endswith("_file_name"):
                row[key[: -len("_file_name")]] = str(folder / str(value))
            else:
                row[key] = value
        rows.append(row)
    if not rows:
        raise DataError(f"{meta} lists no images")
    names = list(dict.fromkeys(k for row in rows for k in row))

    def load(columns: list[str]) -> Any:
        try:
            return _ArrowRows(pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows]))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:  # e.g. a number among the text captions
            raise DataError(f"{meta}: a column mixes types ({exc}); give every line's {', '.join(columns)} one type (text: a string)") from None

    return _Source(str(meta), [(str(meta), names)], load)


def _open_caption_files(cfg: DataConfig) -> _Source:
    """Every image (or clip file) under ``data.path`` with the text of the ``.txt`` file of the same
    name as its prompt; an image without one is skipped when read, like an unreadable image."""
    root = Path(cfg.path)
    if not root.is_dir():
        raise DataError(f"data.path {root} is not a folder; caption-files reads a folder of images, each with a .txt caption of the same name")
    media = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES and not p.name.startswith("."))
    if not media:
        raise DataError(f"no images in folder {root} (data.path); caption-files expects files like 0001.png with 0001.txt beside them")

    def caption(image: Path) -> str | None:
        text = image.with_suffix(".txt")
        return text.read_text(encoding="utf-8", errors="replace").strip() if text.is_file() else None

    rows = [{cfg.image_column: str(p), cfg.text_column: caption(p)} for p in media]
    return _Source(str(root), [(str(root), [cfg.image_column, cfg.text_column])], lambda columns: _ListRows(rows))


@dataclasses.dataclass(frozen=True)
class _TarMember:
    """A file inside a tar shard, read only when its item is."""

    shard: str
    name: str
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


_TEXT_EXTENSIONS = ("txt", "text", "caption")


def _tar_samples(shard: Path) -> list[dict]:
    """A webdataset shard's samples in tar order: the files sharing a key (the name up to its first
    dot) make one sample, each file a column named by its extension (``0001.jpg`` -> ``jpg``); a
    ``.json`` file's fields become columns too. Text and JSON are read now, images when used."""
    samples: dict[str, dict] = {}
    try:
        with tarfile.open(shard) as tar:
            for member in tar:
                folder, _, name = member.name.rpartition("/")
                stem, dot, extension = name.partition(".")
                if not member.isfile() or not dot or name.startswith("."):
                    continue
                sample = samples.setdefault(f"{folder}/{stem}", {})
                extension = extension.lower()
                if extension in _TEXT_EXTENSIONS:
                    sample[extension] = tar.extractfile(member).read().decode("utf-8", errors="replace").strip()
                elif extension == "json":
                    try:
                        sample.update(json.loads(tar.extractfile(member).read()))
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{shard} member {member.name} is not valid JSON: {exc}") from None
                else:
                    sample[extension] = _TarMember(str(shard), member.name, member.offset_data, member.size)
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"cannot read tar shard {shard} (data.path): {exc}") from None
    return list(samples.values())


def _open_webdataset(cfg: DataConfig) -> _Source:
    path = Path(cfg.path)
    shards = [path] if path.is_file() else sorted(p for p in path.rglob("*.tar") if not p.name.startswith((".", "_")))
    if not shards:
        raise DataError(f"no .tar shards in folder {path} (data.path)")
    rows, groups, files = [], [], []
    for shard in shards:
        samples = _tar_samples(shard)
        groups.append(range(len(rows), len(rows) + len(samples)))
        files.append((str(shard), list(dict.fromkeys(k for sample in samples for k in sample))))
        rows += samples
    if not rows:
        raise DataError(f"the tar shards in {path} (data.path) hold no samples")
    return _Source(cfg.path, files, lambda columns: _ListRows(rows, groups))


def _open_hf(cfg: DataConfig) -> _Source:
    import datasets

    path = Path(cfg.path).expanduser()
    saved = path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())
    if not path.exists() and cfg.path.startswith(("/", ".", "~")):
        raise DataError(f"data.path {cfg.path} does not exist")
    try:
        if saved:
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if cfg.split not in ds:
                    raise DataError(f"{cfg.path} has no split {cfg.split!r} (data.split); splits: {', '.join(ds)}")
                ds = ds[cfg.split]
        else:
            ds = datasets.load_dataset(cfg.path, split=cfg.split)
    except DataError:
        raise
    except Exception as exc:  # hub, network and format errors all mean "cannot load this"
        raise DataError(f"cannot load dataset {cfg.path!r} (data.path, split {cfg.split!r}): {exc}") from None
    names = list(ds.column_names or next(iter(ds)).keys())

    def load(columns: list[str]) -> Any:
        selected = ds.select_columns(columns)
        # Keep images and videos encoded: decoding happens per item, where a corrupt one can be skipped.
        encoded = tuple(getattr(datasets, kind) for kind in ("Image", "Video") if hasattr(datasets, kind))  # Video: datasets >= 3.1
        for name, feature in (selected.features or {}).items():
            if isinstance(feature, encoded):
                selected = selected.cast_column(name, type(feature)(decode=False))
        return _HFRows(selected)

    return _Source(cfg.path, [(cfg.path, names)], load)


_OPENERS = {"parquet": _open_parquet, "imagefolder": _open_imagefolder, "caption-files": _open_caption_files, "webdataset": _open_webdataset, "hf": _open_hf}
_EXPECTED = {
    "parquet": "a parquet file or a folder of parquet shards",
    "imagefolder": "a folder with metadata.jsonl or metadata.csv (file_name, text) and the files it names",
    "caption-files": "a folder of images, each with a .txt caption of the same name",
    "webdataset": "a .tar shard or a folder of them",
}


# --------------------------------------------------------------------------------------------------
# From a row dict to an item



def load_image(path_or_bytes: str | Path | bytes, where: str = "") -> Image.Image:
    """Open an image as RGB, turning a corrupt file into a DataError that names it."""
    import io

    try:
        source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
        with Image.open(source) as image:
            return _rgb(image)
    except Exception as exc:  # PIL raises many types for corrupt data (and DecompressionBombError for huge images)
        raise DataError(f"cannot read image {where or path_or_bytes}: {exc}") from None


def _rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB of any mode: 16-bit values scaled down (PIL's own conversion clips them, turning
    most of an image white) and transparent pixels over white (not the colour hidden under them)."""
    if image.mode.startswith("I"):  # 16-bit grayscale PNGs open as I;16 or I
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    return image.convert("RGB")

def _file(value: Any, what: str, where: str) -> tuple[bytes | str, str]:
    """Encoded bytes or a path, however a table stores a file, and ``where`` with the path in
    front: the log line of a skipped row then names the file to fix."""
    if isinstance(value, dict):  # how datasets stores an Image feature
        value = value.get("bytes") or value.get("path")
    if isinstance(value, _TarMember):
        return value.read(), f"{value.shard} member {value.name} ({where})"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), where
    if isinstance(value, (str, Path)):
        return str(value), f"{value} ({where})"
    raise DataError(f"cannot read {what} {where}: expected encoded bytes or a path, got {type(value).__name__}")


def _image_size(value: Any, where: str) -> tuple[int, int]:
    """(width, height) from an image's header, without decoding it."""
    import io

    data, where = _file(value, "image", where)
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            return image.size
    except Exception as exc:  # PIL raises many types for corrupt data
        raise DataError(f"cannot read image {where}: {exc}") from None


def _open_image(value: Any, where: str) -> Image.Image:
    if isinstance(value, Image.Image):
        return _rgb(value)
    data, where = _file(value, "image", where)
    if isinstance(data, str) and (Path(data).is_dir() or Path(data).suffix.lower() in VIDEO_SUFFIXES):
        raise DataError(f"cannot read image {where}: it is a clip; set data.frames to the frames per clip")
    return load_image(data, where)


def _open_clip(value: Any, where: str, cfg: DataConfig, start: float) -> np.ndarray:
    """The ``data.frames`` frames of a clip; ``start`` in [0, 1) picks a random start among the possible ones."""
    data, where = _file(value, "clip", where)
    span = (cfg.frames - 1) * cfg.frame_stride + 1
    random_start = cfg.frame_start == "random"
    clip = read_clip(data, where, max_frames=None if random_start else span)  # "first" needs no more
    first = int(start * max(0, len(clip) - span + 1)) if random_start else 0
    return sample_frames(clip, cfg.frames, cfg.frame_stride, first, where)


def bucket_sizes(resolution: int, step: int, max_aspect: float) -> list[tuple[int, int]]:
    """``data.buckets``' (width, height) sizes: for each width a multiple of ``step``, the largest
    height that is one too and keeps the area within ``resolution``^2, aspect ratios within ``max_aspect``."""
    sizes = set()
    for width in range(step, int(resolution * max_aspect) + 1, step):
        height = resolution * resolution // width // step * step
        if height >= step and max(width / height, height / width) <= max_aspect:
            sizes.add((width, height))
    return sorted(sizes)


def _nearest_bucket(sizes: list[tuple[int, int]], width: int, height: int) -> tuple[int, int]:
    aspect = np.log(width / height)
    return min(sizes, key=lambda size: abs(np.log(size[0] / size[1]) - aspect))


def _resize_crop_flip(image: Image.Image, size: tuple[int, int], offset: tuple[float, float] | None, flip: bool) -> tuple[Image.Image, tuple[int, int]]:
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


def _to_tensor(image: Image.Image) -> torch.Tensor:
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
    return (pixels / 127.5 - 1.0).permute(2, 0, 1).contiguous()


class _Reader:
    """Turns a source row into an item: decoding, winner choice, crop, flip."""

    def __init__(self, cfg: DataConfig, source: _Source):
        self.cfg = cfg
        self.where = source.where
        self.skipped = 0
        self._bad: set[int] = set()
        first = source.files[0][1]
        # Without the pair columns a table of single images is meant; if it has neither, the
        # missing pair columns are reported, since pairs are what preference training needs.
        self.pairs = cfg.image_0_column in first or cfg.image_column not in first
        if self.pairs:
            keys = ("caption_column", "image_0_column", "image_1_column", "label_column")
        else:
            keys = ("text_column", "image_column")
            if cfg.mode == "random":
                raise DataError(
                    f"data.mode='random' (SSPOr) draws the winner from a pair, but {source.where} has "
                    f"single images (no column {cfg.image_0_column!r}, data.image_0_column)"
                )
        self.keys = {getattr(cfg, k): f"data.{k}" for k in keys}
        for name, columns in source.files:
            missing = [f"{column!r} (set {key})" for column, key in self.keys.items() if column not in columns]
            if missing:
                raise DataError(
                    f"{name} has no column {', '.join(missing)}; available columns: {', '.join(columns)}"
                )
        self.columns = list(self.keys)

    def check_labels(self, labels: list) -> None:
        """Every label must say who won; anything else would silently train on the wrong side."""
        for row_id, label in enumerate(labels):
            if isinstance(label, bool) or not isinstance(label, (int, float)) or float(label) not in LABELS:
                raise DataError(
                    f"{self.where} row {row_id}: label {label!r} in column {self.cfg.label_column!r} (data.label_column) "
                    "must be 1 (image_0 wins), 0 (image_1 wins) or 0.5 (a tie); fix or drop the row"
                )

    def keep(self, label: Any) -> bool:
        return not (self.pairs and self.cfg.remove_ties and float(label) == TIE)

    def item(self, index: int, row_id: int, row: dict, epoch: int, size: tuple[int, int]) -> dict:
        """Row ``row_id`` as item ``index`` of ``epoch``, its images resized and cropped to ``size`` (width, height)."""
        cfg = self.cfg
        where = f"{self.where} row {row_id}"
        if self.pairs:
            prompt = row[cfg.caption_column]
            label = float(row[cfg.label_column])
            if cfg.mode == "random" or label == TIE:
                swap = bool(np.random.default_rng([_SIDE_STREAM, cfg.seed, row_id]).random() < 0.5)
            else:
                swap = label < TIE
            names = [cfg.image_1_column, cfg.image_0_column] if swap else [cfg.image_0_column, cfg.image_1_column]
        else:
            prompt, names = row[cfg.text_column], [cfg.image_column]
        if not isinstance(prompt, str) or not prompt.strip():  # skipped like an unreadable image
            column = cfg.caption_column if self.pairs else cfg.text_column
            raise DataError(f"{where}: caption {prompt!r} in column {column!r} is not a non-empty string")
        if cfg.caption_dropout and np.random.default_rng([_CAPTION_STREAM, cfg.seed, row_id, epoch]).random() < cfg.caption_dropout:
            prompt = ""
        # One draw per item, shared by winner and loser (and all frames), so a pair stays aligned.
        fx, fy, u, start = np.random.default_rng([_AUGMENT_STREAM, cfg.seed, row_id, epoch]).random(4)
        offset = None if cfg.center_crop else (fx, fy)
        flip = cfg.random_flip and u < 0.5

        geometry = []  # (original height, width, crop top, left) of each image, the winner's first

        def pixels(image: Image.Image) -> torch.Tensor:
            resized, corner = _resize_crop_flip(image, size, offset, flip)
            geometry.append((image.height, image.width, *corner))
            return _to_tensor(resized)

        if cfg.frames:
            clips = [_open_clip(row[n], f"{where} column {n!r}", cfg, start) for n in names]
            tensors = [torch.stack([pixels(Image.fromarray(frame)) for frame in clip]) for clip in clips]
        else:
            tensors = [pixels(_open_image(row[n], f"{where} column {n!r}")) for n in names]
        return {
            "prompt": prompt,
            "winner": tensors[0],
            "loser": tensors[1] if len(tensors) > 1 else None,
            "index": index,
            # SDXL's size and crop conditioning: original (height, width), crop (top, left), target (height, width)
            "size_and_crop": (*geometry[0], size[1], size[0]),
        }

    def skip(self, row_id: int, error: DataError) -> None:
        """Count and log an unreadable row once; a long run must not die on one bad image."""
        if row_id not in self._bad:
            self._bad.add(row_id)
            self.skipped += 1
            log.warning("skipping unreadable row (%d so far): %s", self.skipped, error)

    def is_bad(self, row_id: int) -> bool:
        return row_id in self._bad


class PreferenceDataset(torch.utils.data.Dataset):
    """Map-style dataset; items are ``{prompt, winner, loser, index}``.

    An unreadable row is replaced by the next readable one (``index`` is the row served), so a
    batch always has its full size and the replacement is the same on every run.
    """

    def __init__(self, cfg: DataConfig, rows: Any, reader: _Reader):
        self.cfg = cfg
        self._reader = reader
        self._rows = rows
        row_ids = range(len(rows))
        if reader.pairs:
            labels = rows.column(cfg.label_column)
            reader.check_labels(labels)
            row_ids = [i for i in row_ids if reader.keep(labels[i])]
        self._row_ids = list(row_ids)[: cfg.max_samples]
        if not self._row_ids:
            ties = " after removing ties (data.remove_ties)" if reader.pairs and cfg.remove_ties else ""
            raise DataError(f"{reader.where} has no rows{ties}")
        self._buckets = self._assign_buckets() if cfg.buckets else None  # (width, height) per item

    @property
    def has_losers(self) -> bool:
        return self._reader.pairs

    @property
    def skipped(self) -> int:
        """Unreadable rows seen so far."""
        return self._reader.skipped

    def __len__(self) -> int:
        return len(self._row_ids)

    def __getitem__(self, index: int) -> dict:
        return self.item(index)

    def item(self, index: int, epoch: int = 0) -> dict:
        """Item ``index`` with the random crop, flip and caption dropout of ``epoch`` (an unreadable
        row's replacement takes its size: a micro-batch of one bucket stays one)."""
        size = self._buckets[index] if self._buckets is not None else (self.cfg.resolution, self.cfg.resolution)
        n = len(self)
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} items")
        for step in range(n):
            i = (index + step) % n
            row_id = self._row_ids[i]
            if self._reader.is_bad(row_id):
                continue
            try:
                return self._reader.item(i, row_id, self._rows[row_id], epoch, size)
            except DataError as exc:
                self._reader.skip(row_id, exc)
        raise DataError(f"no readable row (image and caption) in {self._reader.where}")

    def epoch_length(self, batch_size: int) -> int:
        """Items per epoch: every row once, and with buckets each bucket's last batch filled up."""
        if self._buckets is None:
            return len(self)
        return sum(-(-count // batch_size) * batch_size for count in collections.Counter(self._buckets).values())

    def epoch_order(self, epoch: int, seed: int, batch_size: int = 1) -> torch.Tensor:
        """The items in the order epoch ``epoch`` serves them: a seeded permutation; with
        ``data.shuffle_row_groups`` row groups in seeded order and items shuffled within windows of
        them; with ``data.buckets`` batches of ``batch_size`` items of one bucket, in seeded order."""
        generator = torch.Generator().manual_seed(seed + epoch)
        window = self.cfg.shuffle_row_groups
        if self._buckets is not None:
            return self._bucket_batches(torch.randperm(len(self), generator=generator).tolist(), batch_size, generator)
        if not window:
            return torch.randperm(len(self), generator=generator)
        groups = self._groups()
        shuffled = torch.randperm(len(groups), generator=generator).tolist()
        order = []
        for first in range(0, len(groups), window):
            members = sorted(i for g in shuffled[first : first + window] for i in groups[g])
            order += [members[j] for j in torch.randperm(len(members), generator=generator).tolist()]
        return torch.tensor(order, dtype=torch.long)

    def _bucket_batches(self, order: list[int], batch_size: int, generator: torch.Generator) -> torch.Tensor:
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for i in order:
            by_bucket.setdefault(self._buckets[i], []).append(i)
        batches = []
        for bucket in sorted(by_bucket):
            items = by_bucket[bucket]
            items += [items[k % len(items)] for k in range(-len(items) % batch_size)]
            batches += [items[k : k + batch_size] for k in range(0, len(items), batch_size)]
        return torch.tensor([i for b in torch.randperm(len(batches), generator=generator).tolist() for i in batches[b]], dtype=torch.long)

    def _assign_buckets(self) -> list[tuple[int, int]]:
        """Each item's bucket, from the size of its first image (read from the image's header; an
        unreadable one is skipped when read, so its bucket is the square one)."""
        from tqdm.auto import tqdm

        cfg, reader = self.cfg, self._reader
        sizes = bucket_sizes(cfg.resolution, cfg.bucket_step, cfg.bucket_max_aspect)
        column = cfg.image_0_column if reader.pairs else cfg.image_column
        buckets = []
        for row_id in tqdm(self._row_ids, desc="image sizes (data.buckets)", leave=False, disable=len(self._row_ids) < 1000):
            try:
                width, height = _image_size(self._rows[row_id][column], f"{reader.where} row {row_id} column {column!r}")
            except DataError:
                width = height = 1
            buckets.append(_nearest_bucket(sizes, width, height))
        return buckets

    def _groups(self) -> list[list[int]]:
        """The items of each of the source's row groups (shards), non-empty ones only."""
        ranges = self._rows.group_ranges() if hasattr(self._rows, "group_ranges") else [range(len(self._rows))]
        starts = [r.start for r in ranges]
        groups: list[list[int]] = [[] for _ in ranges]
        for i, row_id in enumerate(self._row_ids):
            groups[bisect.bisect_right(starts, row_id) - 1].append(i)
        return [g for g in groups if g]


def load_dataset_from_config(cfg: DataConfig) -> PreferenceDataset:
    """Open ``cfg.path``; validates columns now so a wrong config fails before any training."""
    world = find_world(cfg.source)
    if world is not None:  # a world writes itself as a Pick-a-Pic-style parquet, read like any other
        check(not world.clips or cfg.frames > 0, "data.frames", f"source {world.name} is clips: set the frames per clip, e.g. 8")
        request = TrainingDataRequest(cfg.world_split_seed, cfg.world_pairs_per_prompt, cfg.resolution, cfg.frames, cfg.world_without_validation)
        first, second = world.pair_columns
        cfg = dataclasses.replace(cfg, source="parquet", path=str(world.training_data(request)), image_0_column=first, image_1_column=second)
    check(bool(cfg.path), "data.path", "is empty; set it to a parquet file/folder, an imagefolder or a dataset id")
    if cfg.source != "hf" and not Path(cfg.path).exists():
        raise DataError(f"data.path {cfg.path} does not exist; expected {_EXPECTED[cfg.source]}")
    source = _OPENERS[cfg.source](cfg)
    reader = _Reader(cfg, source)
    return PreferenceDataset(cfg, source.load(reader.columns), reader)


def collate(items: list[dict]) -> dict:
    losers = [item["loser"] for item in items]
    return {
        "prompts": [item["prompt"] for item in items],
        "winner": torch.stack([item["winner"] for item in items]),
        "loser": None if losers[0] is None else torch.stack(losers),
        "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
        "sizes_and_crops": [item["size_and_crop"] for item in items],
    }


class MicroBatchReader:
    """The items of micro-batches ``m``, ``m + 1``, ... as a DataLoader serves them: read ahead by
    ``data.num_workers`` processes, or in this one with 0, in the same order either way.

    ``placements(m)`` is micro-batch ``m``'s ``(item, epoch)`` list. Reading micro-batch ``m`` after
    ``m - 1`` takes the next batch of the running loader; any other ``m`` (a resumed run's first)
    starts a new one there.
    """

    def __init__(self, dataset: PreferenceDataset, placements: Callable[[int], list[tuple[int, int]]]):
        self.dataset, self.placements = dataset, placements
        self._batches: Iterator[list[dict]] | None = None
        self._next = None

    def __call__(self, m: int) -> list[dict]:
        if self._batches is None or m != self._next:
            self._batches = iter(self._loader(m))
        self._next = m + 1
        return next(self._batches)

    def _loader(self, first: int) -> torch.utils.data.DataLoader:
        workers = self.dataset.cfg.num_workers
        return torch.utils.data.DataLoader(
            _EpochItems(self.dataset), batch_sampler=_Placements(self.placements, first), collate_fn=list, num_workers=workers,
            prefetch_factor=self.dataset.cfg.prefetch_factor if workers else None, worker_init_fn=_one_thread,
            generator=torch.Generator())  # its workers' base seed (unused: items draw from their own streams), not from torch's global generator


class _EpochItems(torch.utils.data.Dataset):
    """Keys are ``(item, epoch)``."""

    def __init__(self, dataset: PreferenceDataset):
        self.dataset = dataset

    def __getitem__(self, key: tuple[int, int]) -> dict:
        return self.dataset.item(*key)


class _Placements:
    """The batch sampler of micro-batches ``first``, ``first + 1``, ...; the loader stops reading ahead when dropped."""

    def __init__(self, placements: Callable[[int], list[tuple[int, int]]], first: int):
        self.placements, self.first = placements, first

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        m = self.first
        while True:
            yield self.placements(m)
            m += 1


def _one_thread(worker: int) -> None:
    torch.set_num_threads(1)  # the workers decode images; torch's thread pool would compete with training's
