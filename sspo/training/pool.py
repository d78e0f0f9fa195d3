"""The checkpoint pool of Random Checkpoint Replay (docs/method.md, "Random Checkpoint Replay").

The pool starts as ``{theta_0}`` and grows by one checkpoint per iteration. Each entry is a
safetensors file in the run directory (a LoRA adapter, megabytes, or the trained weights of the whole denoiser),
so the pool survives a restart; only one entry is loaded at a time. ``pool.json`` lists them; it
only indexes the files (each records its step), so a damaged one is rebuilt from them. A LoRA run's
pool also holds its adapters' one ``adapter_config.json`` (peft's ``LoraConfig``), with which peft
loads any of them (docs/coming-from-diffusers.md, "Taking a LoRA elsewhere").

Under ``erd: initial`` or ``last`` most checkpoints are never drawn again; with full fine-tuning each
is a whole denoiser. :meth:`CheckpointPool.release` replaces such a file by one without tensors that
keeps its step, so the index, its rebuild and the entries' numbering stay as they were.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import torch

from sspo.errors import TrainingError
from sspo.io import DamagedFileError, atomic_write_json, atomic_write_text, open_tensors, read_json, read_tensors, save_tensors
from sspo.models.families.base import ADAPTER_CONFIG
from sspo.training.faults import fault_point

log = logging.getLogger(__name__)

ERD_STRATEGIES = ("uniform", "initial", "last")
INDEX_SHAPE = {"entries": [{"file": str, "step": int}]}


class CheckpointPool:
    def __init__(self, root: str | Path, denoiser: str | None = None):
        self.root = Path(root)  # made by the first add: a resume that is refused leaves a run without one as it was
        index = self.root / "pool.json"
        try:
            recorded = read_json(index, what="the checkpoint pool index", fix="it is rebuilt from the checkpoint files", shape=INDEX_SHAPE, default=None)
            if recorded is not None:
                _check_names(index, recorded["entries"])
        except DamagedFileError as exc:
            log.warning("%s; rebuilding it from the checkpoint files", exc.problem)
            recorded = None
        self.entries: list[dict] = recorded["entries"] if recorded is not None else self._entries_on_disk()
        # The pipeline component ("unet", "transformer") its checkpoints hold weights of, recorded in
        # pool.json; None where neither the caller nor the index says.
        self.denoiser: str | None = denoiser or (recorded or {}).get("denoiser")

    def _entries_on_disk(self) -> list[dict]:
        """The entries of the consecutive readable checkpoint files, as :meth:`add` recorded them."""
        entries = []
        while (path := self.root / _file_name(len(entries))).is_file():
            try:
                handle, metadata = open_tensors(path, what="pool checkpoint", fix="the index ends before it")
                released = {"released": True} if not handle.keys() else {}  # a checkpoint always holds weights
                entries.append({"file": path.name, "step": int(metadata["step"])} | released)
            except (DamagedFileError, KeyError, ValueError):
                break  # a resume names a damaged file its state depends on
        return entries

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, state_dict: dict[str, torch.Tensor], step: int) -> int:
        """Store a checkpoint (taken after ``step`` optimizer steps); returns its pool index."""
        index = len(self.entries)
        name = _file_name(index)
        self.root.mkdir(parents=True, exist_ok=True)
        save_tensors(state_dict, self.root / name, metadata={"step": str(step)})
        fault_point("pool_write")
        self.entries.append({"file": name, "step": step})
        self._write_index()
        return index

    def save_adapter_config(self, config: dict) -> None:
        """Store the peft ``LoraConfig`` (as JSON values) that every checkpoint of a LoRA run's pool shares."""
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.root / ADAPTER_CONFIG, json.dumps(config, indent=2, sort_keys=True))  # as peft's save_pretrained writes it

    def adapter_config(self) -> dict | None:
        """The adapters' ``LoraConfig`` as :meth:`save_adapter_config` stored it (None: the pool has none)."""
        return read_json(self.root / ADAPTER_CONFIG, what="the pool's adapter config", fix="delete it, then resume the run (sspo train CONFIG --resume) to write it again",
                         default=None)

    def drawable(self, strategy: str) -> list[int]:
        """The indices :meth:`draw` by ``strategy`` can return, now or after more checkpoints are added."""
        return {"uniform": list(range(len(self.entries))), "initial": [0], "last": [len(self.entries) - 1]}[strategy] if self.entries else []

    def release(self, keep: set[str]) -> None:
        """Replace the file of every checkpoint not named in ``keep`` by one without tensors (a resume
        or a draw that needs them is what ``keep`` names). Files first: an index cut short after them
        leaves entries a later release marks."""
        released = [entry for entry in self.entries if entry["file"] not in keep and not entry.get("released")]
        for entry in released:
            save_tensors({}, self.root / entry["file"], metadata={"step": str(entry["step"])})
            entry["released"] = True
        if released:
            fault_point("pool_release")
            self._write_index()

    def truncate(self, size: int) -> None:
        """Forget entries past ``size`` (a resumed run rewinds to the pool of its saved state)."""
        for index in range(size, len(self.entries)):
            (self.root / _file_name(index)).unlink(missing_ok=True)
        self.entries = self.entries[:size]
        self._write_index()

    def draw(self, strategy: str, rng: random.Random) -> int:
        """A pool index by the experience-replay distribution ``strategy``."""
        if not self.entries:
            raise RuntimeError("the checkpoint pool is empty: add theta_0 first")
        if strategy == "uniform":
            return rng.randrange(len(self.entries))
        if strategy == "initial":
            return 0
        if strategy == "last":
            return len(self.entries) - 1
        raise ValueError(f"erd must be one of {ERD_STRATEGIES}, got {strategy!r}")

    def load(self, index: int, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        if self.entries[index].get("released"):
            raise TrainingError(f"pool checkpoint {index} in {self.root} was released (its erd never draws it again); "
                                f"the pool keeps {', '.join(map(str, self.kept()))}")
        return read_tensors(self.root / self.entries[index]["file"], what=f"pool checkpoint {index}", device=str(device),
                            fix="resume the run (sspo train CONFIG --resume) to go back to its last intact state")

    def _write_index(self) -> None:
        atomic_write_json(self.root / "pool.json", {"entries": self.entries} | ({"denoiser": self.denoiser} if self.denoiser else {}))

    def steps(self) -> list[int]:
        return [entry["step"] for entry in self.entries]

    def kept(self) -> list[int]:
        """The indices of the checkpoints whose weights the pool still holds."""
        return [i for i, entry in enumerate(self.entries) if not entry.get("released")]


def _file_name(index: int) -> str:
    return f"checkpoint-{index:03d}.safetensors"


def _check_names(index: Path, entries: list[dict]) -> None:
    """Entry ``i`` names the file :meth:`CheckpointPool.add` wrote for it: an index from elsewhere (a
    shared run) could otherwise name any file, which a resume's truncate would delete."""
    for i, entry in enumerate(entries):
        if entry["file"] != _file_name(i):
            raise DamagedFileError(f"the checkpoint pool index {index} is damaged (entry {i} names {entry['file']!r}, not {_file_name(i)})",
                                   "it is rebuilt from the checkpoint files")
