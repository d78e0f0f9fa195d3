"""Latents and text embeddings of every dataset row, encoded once and stored as safetensors shards.

With ``data.cache_latents: true`` the trainer reads a micro-batch's winners, losers and text
condition from here instead of decoding images and running the VAE and text encoder(s) for every
micro-batch. Only valid without augmentation (``data.center_crop: true``, ``data.random_flip:
false``, checked by :class:`~sspo.data.config.DataConfig`): an item's pixels are then the same every epoch.

A cache folder holds ``key.json`` (what was encoded: the model, its dtype, the data config and the
sizes and times of the data files), ``shard-00000.safetensors``, ... of ``SHARD_ROWS`` rows each
(``winners``, ``losers`` when the data has pairs, the :class:`TextCondition` fields; the prompts
in the metadata), and ``index.json``, written once every shard is there. By default the folder is
``$SSPO_CACHE/latents/<hash of key.json>``, so runs that encode the same rows the same way share
it whatever their method or output folder. Shards are written atomically: an interrupted build
keeps its finished shards and resumes; a damaged shard or index is encoded or written again. A
folder that holds files but no ``key.json``, or another key's, is refused before anything there
is deleted. Several processes build their shares of the shards, then all read the whole cache, so
the folder must be on a file system they all see.

Row ``i`` of the cache is what ``dataset[i]`` serves (an unreadable row's replacement included),
stored in the dtype the encoders produced it in, so training reads exactly what it would have
encoded (up to the float rounding of different encoding batches).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sspo.data.dataset import collate
from sspo.data.sources import local_files_digest
from sspo.errors import ConfigError
from sspo.io import DamagedFileError, atomic_write_json, entry_list, file_stats, open_tensors, read_json, save_tensors
from sspo.models.condition import TextCondition
from sspo.models.families import ModelFamily
from sspo.models.pipeline import encode_images
from sspo.training.faults import fault_point
from sspo.training.run_state import HARMLESS_KEYS

log = logging.getLogger(__name__)

FORMAT_VERSION = 4  # the data files' stats as one digest of every file (images and captions too)
SHARD_ROWS = 1024
KEY_FILE, INDEX_FILE = "key.json", "index.json"
_COND_FIELDS = tuple(f.name for f in dataclasses.fields(TextCondition))
INDEX_SHAPE = {"rows": int, "shard_rows": int, "has_losers": bool, "key": dict}


@torch.no_grad()
def encode_rows(family: ModelFamily, items: list[dict], device, resolution: int, losers: bool = True):
    """Dataset items to ``(prompts, TextCondition, winner latents, loser latents or None)`` on the CPU."""
    batch = collate(items)
    cond = family.encode_prompts(batch["prompts"], device, resolution, batch["sizes_and_crops"]).to("cpu")
    # Contiguous: the VAE's posterior mean is a strided view, and the denoiser rounds differently for
    # another memory layout; this way live and cached latents are the same tensors, bit for bit.
    winners = encode_images(family.vae, batch["winner"]).float().cpu().contiguous()
    encoded_losers = encode_images(family.vae, batch["loser"]).float().cpu().contiguous() if losers and batch["loser"] is not None else None
    return batch["prompts"], cond, winners, encoded_losers


def _encoder_folders(model_path: Path) -> list[str]:
    """The pipeline folder's components the cached tensors come from: the VAE, every text encoder
    and every tokenizer (SD3 has three of each pair)."""
    if not model_path.is_dir():
        return []
    return sorted(p.name for p in model_path.iterdir() if p.is_dir() and (p.name == "vae" or p.name.startswith(("text_encoder", "tokenizer"))))


def cache_key(cfg, model: str, family: ModelFamily, rows: int, data_files: str | None) -> dict:
    """What the cached tensors depend on: ``cfg`` is the TrainConfig, ``model`` the resolved model
    path, ``data_files`` the data's :func:`data_digest` (taken once per start: it stats every file).

    A hub id (model or data) is keyed by its name and revision only; a local folder also by the
    sizes and times of its VAE, text encoder and tokenizer files, or of every data file (metadata,
    images, captions), so editing them in place starts a new cache.
    """
    model_path = Path(model).expanduser()
    data = dataclasses.asdict(cfg.data)
    # How rows are read and where the cache lies do not change what is encoded.
    for setting in ("cache_latents", *(key.removeprefix("data.") for key in HARMLESS_KEYS if key.startswith("data."))):
        data.pop(setting)
    return {
        "version": FORMAT_VERSION,
        "model": str(model_path.resolve()) if model_path.exists() else model,
        "model_files": {name: file_stats(model_path / name) for name in _encoder_folders(model_path)},
        "revision": cfg.model.revision,
        "variant": cfg.model.variant,
        "dtype": str(family.vae.dtype),
        "data": data,
        "data_files": data_files,
        "rows": rows,
    }


def data_digest(cfg) -> str | None:
    """:func:`local_files_digest` of the run's data (``cfg``: the TrainConfig) without the folders
    sspo writes into, which a save, a cache build or a world base built under ``data.path`` would
    otherwise change."""
    from sspo.paths import cache_root

    return local_files_digest(cfg.data, [cfg.output_dir, cache_root(), *([cfg.data.cache_dir] if cfg.data.cache_dir else [])])


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def default_dir(key: dict) -> Path:
    from sspo.paths import cache_root

    return cache_root() / "latents" / key_digest(key)


def _check_key(root: Path, found: dict, key: dict) -> None:
    if found.get("version") != key.get("version"):
        raise ConfigError(f"config key 'data.cache_dir': {root} holds latents another version of sspo encoded (format {found.get('version')!r}, "
                          f"this one writes {key.get('version')}); delete it to encode them again, or choose another folder")
    if found != key:
        differ = sorted(k for k in key.keys() | found.keys() if found.get(k) != key.get(k))
        if "data" in differ and isinstance(found.get("data"), dict):
            differ = [k for k in differ if k != "data"] + [f"data.{k}" for k in sorted(key["data"].keys() | found["data"].keys())
                                                           if found["data"].get(k) != key["data"].get(k)]
        raise ConfigError(
            f"config key 'data.cache_dir': {root} holds latents of another model or data (differs in {', '.join(differ)}); "
            "delete it, choose another folder, or leave data.cache_dir unset for a folder per model and data"
        )


class LatentCache:
    """Read access to a complete cache folder (see the module docstring)."""

    def __init__(self, root: str | Path, key: dict | None = None):
        self.root = Path(root)
        index_file = self.root / INDEX_FILE
        if not index_file.is_file():
            raise ConfigError(f"config key 'data.cache_dir': {self.root} has no complete latent cache (no {INDEX_FILE})")
        index = read_json(index_file, what="the latent cache index", shape=INDEX_SHAPE, fix=_REBUILD)
        if key is not None:
            _check_key(self.root, index["key"], key)
        self.rows_total, self.shard_rows = index["rows"], index["shard_rows"]
        self.has_losers = index["has_losers"]
        self._shards: dict[int, tuple] = {}  # shard number -> (safe_open handle, prompts, tensor names)

    def __len__(self) -> int:
        return self.rows_total

    def _shard(self, number: int):
        if number not in self._shards:
            self._shards[number] = _open_shard(self.root / _shard_name(number))
        return self._shards[number]

    def rows(self, indices: Sequence[int]) -> tuple[list[str], TextCondition, torch.Tensor, torch.Tensor | None]:
        """``(prompts, TextCondition, winner latents, loser latents or None)`` of dataset rows ``indices``."""
        prompts, parts = [], {name: [] for name in ("winners", "losers", *_COND_FIELDS)}
        for i in indices:
            if not 0 <= i < self.rows_total:
                raise IndexError(f"row {i} out of range for a latent cache of {self.rows_total} rows")
            shard, offset = divmod(i, self.shard_rows)
            handle, shard_prompts, names = self._shard(shard)
            prompts.append(shard_prompts[offset])
            for name in names:
                parts[name].append(handle.get_slice(name)[offset : offset + 1])
        tensors = {name: torch.cat(values) if values else None for name, values in parts.items()}
        cond = TextCondition(**{name: tensors[name] for name in _COND_FIELDS})
        losers = tensors["losers"].float() if tensors["losers"] is not None else None
        return prompts, cond, tensors["winners"].float(), losers

    @classmethod
    def build(cls, family: ModelFamily, dataset, key: dict, root: str | Path, device, batch_size: int, resolution: int, state=None, shard_rows: int = SHARD_ROWS) -> LatentCache:
        """Encode the missing shards of ``dataset`` into ``root`` (each process its share), then open it.

        ``state`` is the Accelerator (or accelerate ``PartialState``) of a run; every process must call this.
        """
        if state is None:
            from accelerate import PartialState

            state = PartialState()
        root = Path(root)
        _check_folder(root, key)  # every process, before the main one deletes anything there
        if state.is_main_process:
            _drop_damaged(root)
        state.wait_for_everyone()
        if not (root / INDEX_FILE).is_file():
            if state.is_main_process and not (root / KEY_FILE).is_file():
                atomic_write_json(root / KEY_FILE, key)
            shards = math.ceil(len(dataset) / shard_rows)
            mine = [s for s in range(state.process_index, shards, state.num_processes) if not (root / _shard_name(s)).is_file()]
            if mine:
                log.info("encoding %d of %d latent cache shards into %s", len(mine), shards, root)
            for number in tqdm(mine, desc="latent cache", disable=not state.is_local_main_process):
                rows = range(number * shard_rows, min(len(dataset), (number + 1) * shard_rows))
                _write_shard(family, dataset, rows, root / _shard_name(number), device, batch_size, resolution)
                fault_point("latent_cache")
        state.wait_for_everyone()
        if state.is_main_process and not (root / INDEX_FILE).is_file():
            index = {"rows": len(dataset), "shard_rows": shard_rows, "has_losers": dataset.has_losers, "key": key}
            atomic_write_json(root / INDEX_FILE, index)
        state.wait_for_everyone()
        return cls(root, key)


_REBUILD = "delete it: the next run writes it again"


def _shard_name(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


def _open_shard(path: Path) -> tuple:
    """``(safe_open handle, prompts, tensor names)`` of a shard."""
    handle, metadata = open_tensors(path, what="latent cache shard", fix=_REBUILD)
    try:
        prompts = json.loads(metadata["prompts"])
    except (KeyError, ValueError):
        raise DamagedFileError(f"latent cache shard {path} is damaged (no list of prompts in its metadata)", _REBUILD) from None
    if not isinstance(prompts, list) or "winners" not in handle.keys():  # noqa: SIM118  (safetensors' handle has keys(), no __contains__)
        raise DamagedFileError(f"latent cache shard {path} is damaged (not a shard this version wrote)", _REBUILD)
    return handle, prompts, handle.keys()


def _check_folder(root: Path, key: dict) -> None:
    """Refuse a folder that is not this key's cache: one holding files but no KEY_FILE (which a build
    writes before anything else) is a user's, whose ``index.json`` or ``shard-*.safetensors`` the
    build would delete as damaged. Hidden names (a killed write's temporary file, .DS_Store) are no cache's."""
    names = [p.name for p in root.iterdir() if not p.name.startswith(".")] if root.is_dir() else []
    if not names:
        return
    if KEY_FILE not in names:
        raise ConfigError(f"config key 'data.cache_dir': {root} holds files that are not a latent cache ({entry_list(names)}; no {KEY_FILE}); "
                          "choose an empty or new folder")
    _check_key(root, read_json(root / KEY_FILE, what="the latent cache key", fix=f"delete {root} to encode the latents again"), key)


def _drop_damaged(root: Path) -> None:
    """Delete the cache's damaged shards and index (with a warning naming each): the build writes them again."""
    damaged = []
    for path in sorted(root.glob("shard-*.safetensors")):
        try:
            _open_shard(path)
        except DamagedFileError as exc:
            damaged += [(path, exc.problem)]
    try:
        read_json(root / INDEX_FILE, what="the latent cache index", shape=INDEX_SHAPE, fix=_REBUILD, default=None)
    except DamagedFileError as exc:
        damaged += [(root / INDEX_FILE, exc.problem)]
    if any(path.name != INDEX_FILE for path, _ in damaged):  # the index says every shard is there
        damaged.append((root / INDEX_FILE, None))
    for path, problem in damaged:
        if problem:
            log.warning("%s; %s it again", problem, "writing" if path.name == INDEX_FILE else "encoding")
        path.unlink(missing_ok=True)


def _write_shard(family: ModelFamily, dataset, rows: range, path: Path, device, batch_size: int, resolution: int) -> None:
    prompts, conds, winners, losers = [], [], [], []
    for start in range(rows.start, rows.stop, batch_size):
        items = [dataset[i] for i in range(start, min(rows.stop, start + batch_size))]
        p, c, w, l = encode_rows(family, items, device, resolution)
        prompts += p
        conds.append(c)
        winners.append(w)
        losers.append(l)
    cond = TextCondition.cat(conds)
    # Stored in the VAE's dtype: float() on reading restores exactly what encode_rows returned.
    tensors = {"winners": torch.cat(winners).to(family.vae.dtype)}
    if losers[0] is not None:
        tensors["losers"] = torch.cat(losers).to(family.vae.dtype)
    tensors.update({name: getattr(cond, name) for name in _COND_FIELDS if getattr(cond, name) is not None})
    save_tensors(tensors, path, metadata={"prompts": json.dumps(prompts)})
