"""The checkpoint pool of Random Checkpoint Replay (docs/method.md, "Random Checkpoint Replay").

The pool starts as ``{theta_0}`` and grows by one checkpoint per iteration. Each entry is a
safetensors file in the run directory (a LoRA adapter, megabytes, or a full UNet state dict),
so the pool survives a restart; only one entry is loaded at a time.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from .faults import fault_point
from .io import atomic_write_json, load_tensors, save_tensors

ERD_STRATEGIES = ("uniform", "initial", "last")


class CheckpointPool:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        index = self.root / "pool.json"
        self.entries: list[dict] = json.loads(index.read_text())["entries"] if index.is_file() else []

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, state_dict: dict[str, torch.Tensor], step: int) -> int:
        """Store a checkpoint (taken after ``step`` optimizer steps); returns its pool index."""
        index = len(self.entries)
        name = f"checkpoint-{index:03d}.safetensors"
        save_tensors(state_dict, self.root / name, metadata={"step": str(step)})
        fault_point("pool_write")
        self.entries.append({"file": name, "step": step})
        atomic_write_json(self.root / "pool.json", {"entries": self.entries})
        return index

    def truncate(self, size: int) -> None:
        """Forget entries past ``size`` (a resumed run rewinds to the pool of its saved state)."""
        for entry in self.entries[size:]:
            (self.root / entry["file"]).unlink(missing_ok=True)
        self.entries = self.entries[:size]
        atomic_write_json(self.root / "pool.json", {"entries": self.entries})

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
        return load_tensors(self.root / self.entries[index]["file"], device=str(device))

    def steps(self) -> list[int]:
        return [entry["step"] for entry in self.entries]
