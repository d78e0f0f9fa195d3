"""Sources: each file format opened as plain row dicts, with the column names of every file for validation.

A Pick-a-Pic-style parquet file or folder of shards (read a row group at a time, so it need not fit
in memory), an imagefolder with ``metadata.jsonl`` or ``metadata.csv``, a folder of images with a
``.txt`` caption beside each (kohya / SimpleTuner), webdataset ``.tar`` shards, or a ``datasets``
dataset (a ``save_to_disk`` folder, a local dataset folder or a hub id). Images stay encoded here;
:mod:`sspo.data.images` decodes them per item.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import hashlib
import json
import logging
import os
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sspo.config import check
from sspo.data.config import FILE_SOURCES, DataConfig
from sspo.errors import DataError
from sspo.io import file_stats, files_under
from sspo.video_io import VIDEO_SUFFIXES

log = logging.getLogger(__name__)

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def decode_text(data: bytes, where: str) -> str:
    """A text file's content: UTF-8 (a byte-order mark dropped); anything else is a DataError naming ``where``."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None


def row_number(i: int) -> str:
    """Row ``i`` of a table, counted from 0 (a function, not a lambda: DataLoader workers pickle the dataset)."""
    return f"row {i}"


@dataclasses.dataclass
class Source:
    where: str  # what error messages call it
    files: list[tuple[str, list[str]]]  # (file, its columns): a shard missing a column is named
    load: Callable[[list[str]], Any]  # load(columns): rows with len, [i] and .column(name)
    row_name: Callable[[int], str] = row_number  # row i as messages name it (a metadata file's: its line)
    written: dict[str, str] = dataclasses.field(default_factory=dict)  # a renamed column -> its name in the data, for messages


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
    # Underscore files are markers (_SUCCESS, _metadata) and hidden ones temporaries (atomic writes), not shards.
    files = files_under(path, (".parquet",), (".", "_"))
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
        for f, group in self._groups:
            values += self._read(f, group, [name]).column(name).to_pylist()
        return values

    def _group(self, g: int) -> Any:
        if g in self._cache:
            self._cache.move_to_end(g)
            return self._cache[g]
        f, group = self._groups[g]
        self._cache[g] = table = self._read(f, group, self.columns)
        while len(self._cache) > self.cache_groups:
            self._cache.popitem(last=False)
        return table

    def _read(self, f: int, group: int, columns: list[str]) -> Any:
        import pyarrow as pa

        try:
            # One thread: Arrow's pool would hold up to two groups more in flight, and the reader already
            # runs in each DataLoader worker beside training's threads.
            return self._file(f).read_row_group(group, columns=columns, use_threads=False)
        except (OSError, pa.ArrowException) as exc:  # a damaged data page: the footer read, the pages do not
            raise DataError(f"{self.files[f]}: row group {group} cannot be read ({' '.join(str(exc).split())}); the file is damaged: "
                            "restore or write it again, or leave it out of data.path") from None

    def _file(self, f: int) -> Any:
        import pyarrow.parquet as pq

        if self._pid != os.getpid():  # a DataLoader worker opens its own handles, not its parent's
            self._handles, self._cache, self._pid = {}, collections.OrderedDict(), os.getpid()
        if f not in self._handles:
            self._handles[f] = pq.ParquetFile(self.files[f])
        return self._handles[f]


def _open_parquet(cfg: DataConfig) -> Source:
    import pyarrow.parquet as pq

    files = _parquet_files(Path(cfg.path))
    try:
        schemas = [(str(f), pq.read_schema(f).names) for f in files]
    except Exception as exc:  # pyarrow raises several types for a non-parquet file
        raise DataError(f"cannot read parquet {cfg.path} (data.path): {exc}; give a Parquet file or a folder of them, "
                        "or set data.source to the data's format (docs/data.md)") from None
    # A shuffle window reads each of its row groups once only if all of them stay in the cache.
    return Source(cfg.path, schemas, lambda columns: _ParquetRows(files, columns, max(2, cfg.shuffle_row_groups)))


def _metadata_file(cfg: DataConfig) -> Path:
    root = Path(cfg.path)
    if root.is_file():
        fix = {".parquet": "for a parquet file set data.source: parquet", ".tar": "for a .tar shard set data.source: webdataset"}.get(
            root.suffix.lower(), f"set data.path to {root.parent}" if root.name in METADATA_FILES else "set data.path to the folder that holds one")
        raise DataError(f"data.path {root} is a file; an imagefolder is the folder that holds metadata.jsonl or metadata.csv: {fix}")
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


def _metadata_entries(meta: Path, cfg: DataConfig) -> tuple[list[dict], list[str]]:
    """The lines of ``metadata.jsonl`` or the rows of ``metadata.csv`` (MagicTime / ChronoMagic
    captions come as CSV), as dicts (numbers in a CSV stay numbers, captions stay strings), and
    what each is called in messages: its line, or a CSV's row counted from 1 after the header."""
    if meta.suffix == ".csv":
        import pyarrow as pa
        import pyarrow.csv

        text = pyarrow.csv.ConvertOptions(column_types={cfg.text_column: pa.string(), cfg.caption_column: pa.string()})
        try:
            # One thread: a parse error then names its row (Row #N, the header row 1, as the file's line).
            entries = pyarrow.csv.read_csv(meta, read_options=pyarrow.csv.ReadOptions(use_threads=False), convert_options=text).to_pylist()
        except pa.ArrowInvalid as exc:
            if "UTF8" in str(exc):
                raise DataError(f"{meta} is not UTF-8 text; save it as UTF-8") from None
            with open(meta, encoding="utf-8", errors="replace") as f:
                header = f.readline()
            separated = "; its header's columns are separated by ';': a CSV's are by ','" if ";" in header and "," not in header else ""
            problem, *more = str(exc).splitlines()
            open_quote = " ... (a quoted field runs on past its line: a quote left open?)" if more else ""
            raise DataError(f"cannot read {meta}: {problem}{open_quote}{separated}") from None
        return entries, [f"data row {n}" for n in range(1, len(entries) + 1)]
    entries, names = [], []
    for n, line in enumerate(decode_text(meta.read_bytes(), str(meta)).splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{meta} line {n} is not valid JSON: {exc}") from None
        if not isinstance(entry, dict):
            raise DataError(f"{meta} line {n} is a JSON {type(entry).__name__}, not an object: write one object per line, "
                            'e.g. {"file_name": "0001.png", "text": "a red circle"}')
        entries.append(entry)
        names.append(f"line {n}")
    return entries, names


def _check_inside(name: str, key: str, folder: Path, where: str) -> None:
    """A metadata file names files inside its own folder, as datasets' imagefolder requires: a
    downloaded dataset must not read ``../`` or absolute paths elsewhere on this machine."""
    if os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] == "..":
        raise DataError(f"{where}: {key} {name!r} is outside {folder}; an imagefolder's files are named relative to its metadata file's folder "
                        "and lie inside it: move the file there (a parquet or hf dataset's path column may name files anywhere)")


def _open_imagefolder(cfg: DataConfig) -> Source:
    import pyarrow as pa

    meta = _metadata_file(cfg)
    folder = meta.parent
    rows, files, missing, kept_names, written = [], [], [], [], {}
    entries, row_names = _metadata_entries(meta, cfg)
    for entry, row_name in zip(entries, row_names):
        # As datasets' imagefolder does: file_name becomes the "image" column, x_file_name becomes "x".
        row, row_files = {}, []
        for key, value in entry.items():
            if key == "file_name" or key.endswith("_file_name"):
                _check_inside(str(value), key, folder, f"{meta} {row_name}")
                column = "image" if key == "file_name" else key[: -len("_file_name")]
                row[column], written[column] = str(folder / str(value)), key  # str: a CSV's names may read as numbers
                row_files.append(folder / str(value))
            else:
                row[key] = value
        # Checked now (a stat each), so that a dry run finds names written in the wrong case or folder, and counts only rows it can read.
        files += row_files
        if row_missing := [path for path in row_files if not path.exists()]:
            missing += row_missing
            continue
        rows.append(row)
        kept_names.append(row_name)
    if missing:
        if len(missing) == len(files):
            raise DataError(f"none of the {len(files)} files {meta} names exists, e.g. {missing[0]}; file names are read relative to {folder}")
        if not rows:
            raise DataError(f"every row of {meta} names a file that does not exist ({len(missing)} of its {len(files)} files, e.g. {missing[0]}); "
                            f"file names are read relative to {folder}")
        log.warning("%d of the %d files %s names do not exist, e.g. %s; their rows are skipped", len(missing), len(files), meta, missing[0])
    if not entries:
        raise DataError(f"{meta} lists no images")
    if not files:  # no file_name (or x_file_name) column on any line
        found = list(dict.fromkeys(key for entry in entries for key in entry))
        separated = "; its columns are separated by ';': a CSV's are by ','" if len(found) == 1 and ";" in found[0] else ""
        raise DataError(f"{meta} has no file_name column (it has {', '.join(map(repr, found))}{separated}): name the column of file names "
                        "file_name (x_file_name for a column x), as datasets' imagefolder reads it; the files are found beside the metadata file")
    names = list(dict.fromkeys(k for row in rows for k in row))
    # Known at opening, so a dry run says it; training would skip every row, each with a warning.
    captions = next((column for column in (cfg.text_column, cfg.caption_column) if column in names), None)
    if captions and not any(isinstance(row.get(captions), str) and row[captions].strip() for row in rows):
        raise DataError(f"no row of {meta} has a caption: column {captions!r} is empty or null in every row; write each image's prompt there")

    def load(columns: list[str]) -> Any:
        try:
            return _ArrowRows(pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows]))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:  # e.g. a number among the text captions
            raise DataError(f"{meta}: a column mixes types ({exc}); give every line's {', '.join(columns)} one type (text: a string)") from None

    return Source(str(meta), [(str(meta), names)], load, kept_names.__getitem__, written)


def _open_caption_files(cfg: DataConfig) -> Source:
    """Every image (or clip file) under ``data.path`` with the text of the ``.txt`` file of the same
    name as its prompt; an image without one is skipped when read, like an unreadable image."""
    root = Path(cfg.path)
    if not root.is_dir():
        raise DataError(f"data.path {root} is not a folder; caption-files reads a folder of images, each with a .txt caption of the same name")
    media = files_under(root, IMAGE_SUFFIXES + VIDEO_SUFFIXES)
    if not media:
        raise DataError(f"no images in folder {root} (data.path); caption-files expects files like 0001.png with 0001.txt beside them")

    def caption_file(image: Path) -> Path | None:
        stem = image if image.is_dir() else image.with_suffix("")  # a frame folder 0003/ has its caption in 0003.txt
        return next((text for s in (".txt", ".TXT") if (text := stem.with_name(stem.name + s)).is_file()), None)

    def caption(image: Path) -> str | None:
        text = caption_file(image)
        return decode_text(text.read_bytes(), f"caption file {text}").strip() if text is not None else None

    if cfg.frames:  # clips: a folder of frames with a caption file beside it is one clip
        clips = {image.parent for image in media if image.parent != root and caption_file(image.parent) is not None}
        media = sorted([image for image in media if not clips & set(image.parents)] + list(clips))

    rows = [{cfg.image_column: str(p), cfg.text_column: caption(p)} for p in media]
    if all(row[cfg.text_column] is None for row in rows):
        raise DataError(f"no image in folder {root} (data.path) has a caption: caption-files expects 0001.txt beside 0001.png")
    # Known at opening, so a dry run says it; training skips (and names) each as it meets it.
    if without := [row[cfg.image_column] for row in rows if not row[cfg.text_column]]:
        log.warning("%d of the %d images in %s %s no caption (no .txt file of the same name, or an empty one), e.g. %s; skipped",
                    len(without), len(rows), root, "has" if len(without) == 1 else "have", without[0])
    return Source(str(root), [(str(root), [cfg.image_column, cfg.text_column])], lambda columns: _ListRows(rows))


@dataclasses.dataclass(frozen=True)
class TarMember:
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
MAX_TEXT_MEMBER = 1 << 20  # bytes of a caption or JSON member, read whole when a shard opens: captions are far shorter
# A member of a compressed tar cannot be read at its offset, and tarfile would decompress the whole shard to index it.
_COMPRESSIONS = {b"\x1f\x8b": ("gzip", "gunzip"), b"BZh": ("bzip2", "bunzip2"), b"\xfd7zXZ\x00": ("xz", "unxz"), b"\x28\xb5\x2f\xfd": ("zstd", "unzstd")}


def _check_uncompressed(shard: Path) -> None:
    with open(shard, "rb") as f:
        head = f.read(6)
    for magic, (kind, tool) in _COMPRESSIONS.items():
        if head.startswith(magic):
            raise DataError(f"tar shard {shard} (data.path) is {kind}-compressed; webdataset shards are read in place, a member at a time: "
                            f"decompress it into a plain .tar (with {tool}) and point data.path at that")


def _small_member(tar: tarfile.TarFile, member: tarfile.TarInfo, shard: Path) -> bytes:
    if member.size > MAX_TEXT_MEMBER:
        raise DataError(f"{shard} member {member.name} is {member.size} bytes, more than the {MAX_TEXT_MEMBER} a caption or JSON file may have; "
                        "shorten it or leave it out of the shard")
    return tar.extractfile(member).read()


def _tar_samples(shard: Path) -> dict[str, dict]:
    """A webdataset shard's samples by key, in tar order: the files sharing a key (the name up to its
    first dot) make one sample, each file a column named by its extension (``0001.jpg`` -> ``jpg``); a
    ``.json`` file's fields become columns too. Text and JSON are read now, images when used."""
    samples: dict[str, dict] = {}
    try:
        _check_uncompressed(shard)
        with tarfile.open(shard, mode="r:") as tar:
            for member in tar:
                folder, _, name = member.name.rpartition("/")
                stem, dot, extension = name.partition(".")
                if not member.isfile() or not dot or name.startswith("."):
                    continue
                sample = samples.setdefault(f"{folder}/{stem}" if folder else stem, {})
                extension = extension.lower()
                if extension in _TEXT_EXTENSIONS:
                    sample[extension] = decode_text(_small_member(tar, member, shard), f"{shard} member {member.name}").strip()
                elif extension == "json":
                    try:
                        sample.update(json.loads(_small_member(tar, member, shard)))
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{shard} member {member.name} is not valid JSON: {exc}") from None
                else:
                    sample[extension] = TarMember(str(shard), member.name, member.offset_data, member.size)
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"cannot read tar shard {shard} (data.path): {exc}") from None
    return samples


def _open_webdataset(cfg: DataConfig) -> Source:
    path = Path(cfg.path)
    shards = [path] if path.is_file() else files_under(path, (".tar",), (".", "_"))
    if not shards:
        raise DataError(f"no .tar shards in folder {path} (data.path)")
    rows, names, groups, files = [], [], [], []
    for shard in shards:
        samples = _tar_samples(shard)
        groups.append(range(len(rows), len(rows) + len(samples)))
        files.append((str(shard), list(dict.fromkeys(k for sample in samples.values() for k in sample))))
        rows += samples.values()
        names += [f"sample {key} of {shard.name}" for key in samples]
    if not rows:
        raise DataError(f"the tar shards in {path} (data.path) hold no samples")
    return Source(cfg.path, files, lambda columns: _ListRows(rows, groups), names.__getitem__)


def _open_hf(cfg: DataConfig) -> Source:
    import datasets

    path = Path(cfg.path).expanduser()
    saved = path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())
    if not path.exists() and cfg.path.startswith(("/", ".", "~")):
        raise DataError(f"data.path {cfg.path} does not exist")
    if not path.exists() and Path(path.parts[0]).is_dir():  # "runs/mydata" with ./runs here is a local path, not a hub id
        raise DataError(f"data.path {cfg.path} does not exist (folder {path.parts[0]} here does: a misspelt local path?); "
                        "a hub dataset id is <owner>/<name>, with no local folder of the owner's name")
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

    return Source(cfg.path, [(cfg.path, names)], load)


_OPENERS = {"parquet": _open_parquet, "imagefolder": _open_imagefolder, "caption-files": _open_caption_files, "webdataset": _open_webdataset, "hf": _open_hf}
_EXPECTED = {
    "parquet": "a parquet file or a folder of parquet shards",
    "imagefolder": "a folder with metadata.jsonl or metadata.csv (file_name, text) and the files it names",
    "caption-files": "a folder of images, each with a .txt caption of the same name",
    "webdataset": "a .tar shard or a folder of them",
}


def open_source(cfg: DataConfig) -> Source:
    """``data.path`` opened as ``data.source`` says; a missing path fails here, before any training."""
    check(bool(cfg.path), "data.path", "is empty; set it to a parquet file/folder, an imagefolder or a dataset id")
    if cfg.path.startswith("~"):
        cfg = dataclasses.replace(cfg, path=str(Path(cfg.path).expanduser()))
    if cfg.source != "hf" and not Path(cfg.path).exists():
        relative = "" if Path(cfg.path).is_absolute() else f" (a relative path is taken from the current folder, {Path.cwd()})"
        raise DataError(f"data.path {cfg.path} does not exist{relative}; expected {_EXPECTED[cfg.source]}")
    return _OPENERS[cfg.source](cfg)


def local_files_digest(cfg: DataConfig, leave_out: Sequence[str | Path] = ()) -> str | None:
    """A digest of the names, sizes and modification times of every file under a local ``data.path``
    (metadata, images, captions, shards) but those in the ``leave_out`` folders: it changes when the
    data is edited in place. None for a world, whose config says what it is, and for a hub dataset,
    whose name and revision do. Files a table names outside ``data.path`` are not covered."""
    path = Path(cfg.path).expanduser() if cfg.path and cfg.source in FILE_SOURCES else None
    if path is None or not path.exists():
        return None
    root = path.resolve()
    inside = [Path(folder).expanduser().resolve() for folder in leave_out]
    skipped = [str(folder.relative_to(root)) + os.sep for folder in inside if folder.is_relative_to(root) and folder != root]
    stats = [entry for entry in file_stats(path) if not entry[0].startswith(tuple(skipped))]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]
