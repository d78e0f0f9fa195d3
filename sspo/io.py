"""Files sspo writes and reads back.

Writes are atomic: output is written to a temporary name and renamed, never left half-written.
Every file sspo reads back from a run folder, an eval folder or a cache goes through
:func:`read_json`, :func:`read_jsonl`, :func:`read_tensors`, :func:`open_tensors` or
:func:`check_image`: a file that does not parse, is cut short or holds the wrong shape of data is a
:class:`DamagedFileError` naming the file and the way out, never a traceback from a parser. A caller
whose file is a cache catches it and computes the entry again.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import stat
import tempfile
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

from sspo.errors import ConfigError, SSPOError
from sspo.paths import build_lock, cache_root

log = logging.getLogger(__name__)


TEMPORARY_SUFFIX = ".tmp"


def is_temporary(name: str) -> bool:
    """Whether ``name`` is a temporary file a killed write leaves: :func:`atomic_path`'s
    (``.<name>.<random>.tmp``), or the one safetensors writes a file through (``.tmp<6 letters or digits>``)."""
    return (name.startswith(".") and name.endswith(TEMPORARY_SUFFIX) and len(name) > len(TEMPORARY_SUFFIX) + 1
            or re.fullmatch(r"\.tmp[A-Za-z0-9]{6}", name) is not None)


def remove_temporaries(folder: Path) -> None:
    """Delete the temporary files killed writes left anywhere under ``folder`` (by a command that
    holds the folder: no write of its own is under way there)."""
    for parent, subfolders, names in os.walk(folder):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]  # not into .git and the like
        for name in filter(is_temporary, names):
            Path(parent, name).unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno is None or exc.filename not in (None, str(tmp)):
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from exc  # the file being written (a full disk names none), not its temporary name
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_error(path: str | Path, exc: OSError) -> SSPOError:
    """A failed write of the user's ``--out`` as one line, its fix chosen by the cause."""
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return SSPOError(f"cannot write {path}: {exc.strerror or exc}; {'free disk space or ' if full else ''}choose another --out")


def permission_error(exc: PermissionError) -> SSPOError:
    """A path this user may not read or write, met anywhere, as one line; a cache path names SSPO_CACHE."""
    path = Path(exc.filename) if exc.filename else None
    if path is not None and path.absolute().is_relative_to(cache_root().absolute()):
        return SSPOError(f"{path}: permission denied; set SSPO_CACHE to a folder you can write to")
    return SSPOError(f"{path or exc}: permission denied; choose a path you can read and write, or change its permissions")


def file_digest(path: Path) -> dict:
    """The size and SHA-256 of the file at ``path``: what a record of it checks it against."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def os_error_of(exc: BaseException) -> OSError | None:
    """``exc`` as the OSError it is or reports (safetensors raises its own error for a failed write:
    "I/O error: No space left on device (os error 28)"); None for any other error."""
    if isinstance(exc, OSError):
        return exc
    if type(exc).__name__ == "SafetensorError" and (code := re.search(r"\(os error (\d+)\)", str(exc))):
        return OSError(int(code[1]), os.strerror(int(code[1])))
    return None


def os_error_message(exc: OSError) -> str:
    """A failed read or write, as one line naming the path and what to do; a cache path names SSPO_CACHE."""
    if isinstance(exc, PermissionError):
        return str(permission_error(exc))
    path = Path(exc.filename) if exc.filename else None
    in_cache = path is not None and path.absolute().is_relative_to(cache_root().absolute())
    fix = {errno.ENOSPC: "free disk space, or write elsewhere", errno.EDQUOT: "free disk space, or write elsewhere",
           errno.EROFS: "set SSPO_CACHE to a folder you can write to" if in_cache else "choose a folder on a writable file system"}.get(exc.errno)
    return f"{f'{path}: ' if path else ''}{exc.strerror or exc}" + (f"; {fix}" if fix else "")


def special_file(path: str | Path) -> str | None:
    """What ``path`` is when it exists but is neither a regular file nor a folder ("a FIFO", "a socket",
    "a device"), else None: opening a FIFO waits for a writer, forever, and a device may never end."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # missing or out of reach: opening it says why
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"


def files_under(root: Path, suffixes: Collection[str] | None = None, skip_prefixes: tuple[str, ...] = (".",), hidden_folders: bool = False) -> list[Path]:
    """The files under ``root`` whose suffix (in any case) is one of ``suffixes`` (None: any), sorted;
    folders linked in are read too, each real folder once (under the first name in sorted order, so
    a link loop ends and the same tree gives the same list anywhere). Hidden folders
    (``.ipynb_checkpoints``, ``.thumbnails``) hold copies, not more data, unless ``hidden_folders``;
    files named with one of ``skip_prefixes`` are skipped."""
    found, seen = [], set()
    for folder, subfolders, names in os.walk(root, followlinks=True, onerror=_raise):  # a folder it cannot read is not skipped silently
        real = os.path.realpath(folder)
        if real in seen:
            subfolders.clear()
            continue
        seen.add(real)
        subfolders[:] = sorted(name for name in subfolders if hidden_folders or not name.startswith("."))
        found += [Path(folder, name) for name in names
                  if (suffixes is None or Path(name).suffix.lower() in suffixes) and not name.startswith(skip_prefixes) and Path(folder, name).is_file()]
    return sorted(found)


def _raise(exc: OSError) -> None:
    raise exc


def file_stats(path: Path, suffixes: Collection[str] | None = None) -> list[list]:
    """``[name, size, mtime_ns]`` of a file, or of the matching files under a folder (:func:`files_under`,
    hidden folders' files too; hidden and ``_``-named files left out): what changes when the files are
    written again."""
    if path.is_file():
        return [[path.name, path.stat().st_size, path.stat().st_mtime_ns]]
    if not path.is_dir():
        return []
    return [[str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns] for p in files_under(path, suffixes, (".", "_"), hidden_folders=True)]


def nearest_existing(path: Path) -> Path:
    """``path`` or the nearest of its parents that exists."""
    # os.path.exists, not Path.exists: the latter raises where a parent may not be read
    return next(p for p in (path, *path.parents) if os.path.exists(p))


def may_write_in(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def check_write_target(path: str | Path, name: str, *, file: bool = False) -> None:
    """Refuse a folder to write into (with ``file``: a file to write) that lies under a file, is a
    file where a folder is meant, or that this user may not write or create (``name``: how the user
    set it)."""
    path = Path(path)
    nearest = nearest_existing(path.parent if file else path)
    if not nearest.is_dir():
        if nearest == path:
            raise ConfigError(f"{name} {path} is a file, not a folder; choose an empty or new folder")
        raise ConfigError(f"{name} {path}: {nearest} is a file, not a folder; choose another {name}")
    if not may_write_in(nearest):
        where = "write in it" if nearest == path else f"write in {nearest}" if file and nearest == path.parent else f"create folders in {nearest}"
        raise ConfigError(f"{name} {path}: permission denied, this user may not {where}; choose a folder you can write to")


def output_mark(command: str) -> str:
    """The file that marks a folder as ``sspo <command>``'s output."""
    return f"sspo-{command}.json"


def check_output_folder(folder: str | Path, name: str, command: str, outputs: Iterable[str], record: dict[str, str] | None = None) -> None:
    """Refuse ``folder`` as the output of ``sspo <command>`` unless it is new, empty, or marked as
    that command's by :func:`claimed_output_folder` with the same ``record`` (the demo's world): a
    mistyped ``--out`` never overwrites a user's files, and one command's output never mixes with
    another's. ``outputs`` are the names the command writes there, for the message about an
    unmarked folder that holds only those."""
    check_write_target(folder, name)
    folder = Path(folder)
    if not folder.is_dir():
        return
    names = {p.name for p in folder.iterdir() if not p.name.startswith(".")}  # .DS_Store, .gitkeep: no output is hidden
    mark = output_mark(command)
    if mark in names:
        recorded = read_json(folder / mark, what=f"the record of sspo {command}'s output", fix="delete that folder, or choose another " + name)
        changed = [f"{key} {recorded.get(key)!r}, not {value!r}" for key, value in (record or {}).items() if recorded.get(key) != value]
        if changed:
            raise ConfigError(f"{name} {folder} holds the output of sspo {command} for {', '.join(changed)}; choose another {name}, or delete that folder")
        return
    if not names:
        return
    if names <= set(outputs):
        record_text = json.dumps({"command": command, **(record or {})})
        raise ConfigError(f"{name} {folder} holds files named as sspo {command} names its output ({entry_list(names)}) but not its record; "
                          f"choose an empty or new folder, or, if an earlier sspo {command} wrote them, write {record_text} into {folder / mark} "
                          "to go on with them")
    raise ConfigError(f"{name} {folder} holds files that are not sspo {command}'s output ({entry_list(names - set(outputs))}); choose an empty or new folder")


@contextlib.contextmanager
def claimed_output_folder(folder: str | Path, name: str, command: str, outputs: Iterable[str], record: dict[str, str] | None = None) -> Iterator[None]:
    """Check ``folder`` (:func:`check_output_folder`) and mark it as ``sspo <command>``'s output while
    the command writes it, holding a lock on it (in the cache) so that a second command into the same
    folder is refused rather than each rewriting the other's files from what it read; a command that
    fails before writing anything leaves no mark and no folder it made."""
    from filelock import FileLock, Timeout

    folder = Path(folder)
    lock = FileLock(build_lock(folder))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise SSPOError(f"{name} {folder} is being written by another sspo {command} right now; wait for it to end, or choose another {name}") from None
    try:
        yield from _claimed(folder, name, command, outputs, record)
    finally:
        lock.release()


def _claimed(folder: Path, name: str, command: str, outputs: Iterable[str], record: dict[str, str] | None) -> Iterator[None]:
    check_output_folder(folder, name, command, outputs, record)
    mark = folder / output_mark(command)
    created = missing_folders(folder)
    marked = not mark.exists()
    if marked:
        atomic_write_json(mark, {"command": command, **(record or {})})
    try:
        yield
    except BaseException:
        if marked and [p.name for p in folder.iterdir()] == [mark.name]:
            mark.unlink()
            remove_empty_folders(created)
        raise


def missing_folders(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, innermost first: what writing into
    ``path`` creates."""
    return [folder for folder in [path, *path.parents] if not os.path.exists(folder)]


def remove_empty_folders(folders: Iterable[Path]) -> None:
    """Remove each of ``folders`` (innermost first) that is empty; a folder holding anything stays."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_parquet(path: str | Path, rows: list[dict]) -> Path:
    """``rows`` (dicts of one set of columns) as a parquet file, written atomically: a world's
    Pick-a-Pic-style pairs (``caption``, ``jpg_0``, ``jpg_1``, ``label_0``) among them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)
    return path


def save_tensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        except Exception as exc:
            if (failed := os_error_of(exc)) is None:
                raise
            raise OSError(failed.errno, failed.strerror, str(path)) from None


def sort_safetensors_metadata(path: str | Path) -> None:
    """Rewrite a safetensors file's header with its metadata keys in sorted order.

    safetensors writes the metadata from a Rust hash map, whose order is seeded per process: the same
    tensors and metadata saved by two processes give two files that differ in bytes when the metadata
    has more than one key. Sorted, they are the same file. Tensor data and offsets do not move.
    """
    path = Path(path)
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    if len(header.get("__metadata__") or {}) < 2:
        return
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    # safetensors' own layout: compact JSON, padded with spaces so the tensor data stays 8-byte aligned.
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    with atomic_path(path) as tmp:
        tmp.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + length :])


class DamagedFileError(SSPOError):
    """A file sspo wrote cannot be read back as written. ``problem`` names the file and what is wrong
    with it; ``fix`` says what to do about it."""

    def __init__(self, problem: str, fix: str):
        super().__init__(f"{problem}; {fix}")
        self.problem, self.fix = problem, fix


_NO_DEFAULT = object()
_KINDS = {dict: "a mapping", list: "a list", str: "a string", int: "an integer", float: "a number", bool: "true or false", type(None): "null"}

# A shape is what the JSON must hold: a type (int also takes no bool, float takes an int), a list
# of one shape (every item), a mapping of required keys to shapes, or {str: shape} (every value).


def _kind(value) -> str:
    return next((name for kind, name in reversed(_KINDS.items()) if isinstance(value, kind)), type(value).__name__)


def shape_problem(value, shape, where: str = "") -> str | None:
    """What in ``value`` does not have ``shape`` (see above), or None."""
    if isinstance(shape, type):
        fits = isinstance(value, (int, float) if shape is float else shape) and not (shape in (int, float) and isinstance(value, bool))
        return None if fits else f"{where or 'the top level'} is {_kind(value)}, not {_KINDS.get(shape, shape.__name__)}"
    if isinstance(shape, list):
        if not isinstance(value, list):
            return shape_problem(value, list, where)
        return next((p for i, item in enumerate(value) if (p := shape_problem(item, shape[0], f"{where}[{i}]"))), None)
    if not isinstance(value, dict):
        return shape_problem(value, dict, where)
    if list(shape) == [str]:
        return next((p for key, item in value.items() if (p := shape_problem(item, shape[str], f"{where}[{key!r}]"))), None)
    for key, sub in shape.items():
        at = f"{where}.{key}" if where else key
        if key not in value:
            return f"{at} is missing"
        if problem := shape_problem(value[key], sub, at):
            return problem
    return None


def _read_text(path: Path, what: str, fix: str) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DamagedFileError(f"{what} {path} is damaged (not UTF-8 text at byte {exc.start})", fix) from None
    except OSError as exc:
        raise DamagedFileError(f"{what} {path} cannot be read ({exc.strerror or exc})", fix) from None


def _json_problem(text: str, exc: json.JSONDecodeError) -> str:
    if not text.strip():
        return "empty"
    # A file cut inside a string fails at the string's opening quote, not at the end.
    ends_early = exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated string")
    cut = " (cut short?)" if ends_early else ""
    return f"not valid JSON{cut}: {exc.msg} at line {exc.lineno} column {exc.colno}"


def read_json(path: str | Path, *, what: str, fix: str, shape=dict, default=_NO_DEFAULT, cache: bool = False) -> Any:
    """The JSON value in ``path``, checked to have ``shape``.

    ``what`` names the file in messages ("the pool index"), ``fix`` is the way out. A missing file
    gives ``default`` (an error without one). With ``cache``, a damaged file gives ``default`` too,
    with a warning that it is computed again.
    """
    path = Path(path)
    if not path.is_file():
        if default is _NO_DEFAULT:
            raise DamagedFileError(f"{what} {path} is missing", fix)
        return default
    try:
        text = _read_text(path, what, fix)
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DamagedFileError(f"{what} {path} is damaged ({_json_problem(text, exc)})", fix) from None
        if problem := shape_problem(value, shape):
            raise DamagedFileError(f"{what} {path} is damaged ({problem})", fix)
    except DamagedFileError as exc:
        if not cache or default is _NO_DEFAULT:
            raise
        log.warning("%s; computing it again", exc.problem)
        return default
    return value


def read_jsonl(path: str | Path, *, what: str = "the log", fix: str = "delete the named line, or the file", shape=dict) -> list:
    """The rows of a JSON-lines log, each checked to have ``shape``; none if it does not exist yet.

    A last line without its newline that does not parse is a write cut short (the process was
    killed while logging): it is left out with a warning, as if it had never been written.
    """
    path = Path(path)
    if not path.is_file():
        return []
    text = _read_text(path, what, fix)
    lines = text.split("\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):  # no newline after it
                log.warning("%s %s: leaving out its last line, cut short (%s)", what, path, exc.msg)
                continue
            raise DamagedFileError(f"{what} {path} is damaged (line {number} is not valid JSON: {exc.msg})", fix) from None
        if problem := shape_problem(row, shape):
            raise DamagedFileError(f"{what} {path} is damaged (line {number}: {problem})", fix)
        rows.append(row)
    return rows


def _tensor_errors():
    from safetensors import SafetensorError

    return (SafetensorError, OSError, ValueError)


def read_tensors(path: str | Path, *, what: str, fix: str, device: str = "cpu") -> dict:
    """Every tensor of the safetensors file ``path``."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise DamagedFileError(f"{what} {path} is missing", fix)
    try:
        return load_file(str(path), device=device)
    except _tensor_errors() as exc:
        raise DamagedFileError(f"{what} {path} is damaged ({str(exc).splitlines()[0]})", fix) from None


def open_tensors(path: str | Path, *, what: str, fix: str):
    """``(safe_open handle, metadata)`` of the safetensors file ``path``: its header read, the tensors
    mapped, not yet read."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DamagedFileError(f"{what} {path} is missing", fix)
    try:
        handle = safe_open(str(path), framework="pt")
        return handle, handle.metadata() or {}
    except _tensor_errors() as exc:
        raise DamagedFileError(f"{what} {path} is damaged ({str(exc).splitlines()[0]})", fix) from None


def check_image(path: str | Path, *, what: str, fix: str) -> None:
    """That ``path`` is a whole image file (PIL's check of its structure and checksums, no decoding)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DamagedFileError(f"{what} {path} is missing", fix)
    try:
        with Image.open(path) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:  # PIL reports a bad chunk as SyntaxError
        raise DamagedFileError(f"{what} {path} is damaged ({exc})", fix) from None


def entry_list(names: Iterable[str], shown: int = 5) -> str:
    """``a, b, c`` of a folder's entries, cut short after ``shown`` of them."""
    names = sorted(names)
    return ", ".join(names[:shown]) + (f", and {len(names) - shown} more" if len(names) > shown else "")
