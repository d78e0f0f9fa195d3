"""From a source row to an item: the winner (and loser) as tensors in [-1, 1], with the prompt.

A table with the two image columns (``data.image_0_column``) is read as preference pairs; otherwise
as single images (``data.image_column`` + ``data.text_column``), which gives winners only. With
``data.frames`` each image is a clip instead: ``[F, 3, H, W]``, every frame resized and cropped as
an image would be.

Every random choice is a pure function of the seed and the source row: SSPOr's side of that alone
(a row keeps its winner every epoch), crop offsets, flips, clip starts and dropped captions of the
epoch too, so a resumed run sees exactly the images an
uninterrupted one would have, and DataLoader workers serve exactly what the main process would.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import logging
from typing import Any

import numpy as np
import torch
from PIL import Image

from sspo.config import check
from sspo.data.config import DataConfig
from sspo.data.images import bucket_sizes, image_size, nearest_bucket, open_clip, open_image, resize_crop_flip, to_tensor
from sspo.data.sources import Source, open_source
from sspo.errors import DataError
from sspo.worlds.registry import TrainingDataRequest, find_world

log = logging.getLogger(__name__)

TIE = 0.5
LABELS = (0.0, TIE, 1.0)  # image_1 wins, a tie, image_0 wins
# Tags keep the random streams of different decisions independent even for equal (seed, row, epoch).
_SIDE_STREAM, _AUGMENT_STREAM, _CAPTION_STREAM = 1, 2, 3


class _Reader:
    """Turns a source row into an item: decoding, winner choice, crop, flip."""

    def __init__(self, cfg: DataConfig, source: Source):
        self.cfg = cfg
        self.where, self.row_name, self.written = source.where, source.row_name, source.written
        self.skipped = 0
        self._bad: set[int] = set()
        self.unreported: list[tuple[int, str]] = []  # a DataLoader worker's skipped rows, for the training process to log
        name, first = source.files[0]
        if cfg.image_0_column not in first and cfg.image_column not in first:
            raise DataError(
                f"{name} has neither the image column of pairs, {cfg.image_0_column!r} (data.image_0_column), nor that of single "
                f"images, {cfg.image_column!r} (data.image_column); available columns: {', '.join(map(self.column, first))}: set one of those keys to its image column"
            )
        self.pairs = cfg.image_0_column in first
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
            missing = [f"{self.column(column)} (set {key})" for column, key in self.keys.items() if column not in columns]
            if missing:
                raise DataError(
                    f"{name} has no column {', '.join(missing)}; available columns: {', '.join(map(self.column, columns))}"
                )
        self.columns = list(self.keys)

    def column(self, name: str) -> str:
        """Column ``name`` as messages quote it: as the data writes it (an imagefolder's file_name, not image)."""
        return repr(self.written.get(name, name))

    def check_labels(self, labels: list) -> None:
        """Every label must say who won; anything else would silently train on the wrong side."""
        for row_id, label in enumerate(labels):
            if isinstance(label, bool) or not isinstance(label, (int, float)) or float(label) not in LABELS:
                raise DataError(
                    f"{self.where} {self.row_name(row_id)}: label {label!r} in column {self.cfg.label_column!r} (data.label_column) "
                    f"must be 1 (image_0 wins), 0 (image_1 wins) or 0.5 (a tie){', a number, not text' if isinstance(label, str) else ''}; fix or drop the row"
                )

    def keep(self, label: Any) -> bool:
        return not (self.pairs and self.cfg.remove_ties and float(label) == TIE)

    def item(self, index: int, row_id: int, row: dict, epoch: int, size: tuple[int, int]) -> dict:
        """Row ``row_id`` as item ``index`` of ``epoch``, its images resized and cropped to ``size`` (width, height)."""
        cfg = self.cfg
        where = f"{self.where} {self.row_name(row_id)}"
        needed = [cfg.image_0_column, cfg.image_1_column] if self.pairs else [cfg.image_column]
        if absent := [column for column in needed if row.get(column) is None]:  # e.g. a shard's sample with a .png where the others have .jpg
            present = [column for column, value in row.items() if value is not None]
            keys = ", ".join(self.keys.get(column, "data.image_column") for column in absent)
            raise DataError(f"{where}: nothing in column {', '.join(map(self.column, absent))} (this row has {', '.join(map(self.column, present)) or 'nothing'}; "
                            f"{keys} names the column)")
        if self.pairs:
            prompt = row.get(cfg.caption_column)
            label = float(row[cfg.label_column])
            if cfg.mode == "random" or label == TIE:
                swap = bool(np.random.default_rng([_SIDE_STREAM, cfg.seed, row_id]).random() < 0.5)
            else:
                swap = label < TIE
            names = [cfg.image_1_column, cfg.image_0_column] if swap else [cfg.image_0_column, cfg.image_1_column]
        else:
            prompt, names = row.get(cfg.text_column), [cfg.image_column]
        if not isinstance(prompt, str) or not prompt.strip():  # skipped like an unreadable image
            column = cfg.caption_column if self.pairs else cfg.text_column
            image = row[cfg.image_column] if not self.pairs and isinstance(row[cfg.image_column], str) else None  # a file: the name a user finds it by
            problem = f"no caption in column {column!r}" if prompt is None else f"caption {prompt!r} in column {column!r} is not a non-empty string"
            raise DataError(f"{where}{f' ({image})' if image else ''}: {problem}")
        if cfg.caption_dropout and np.random.default_rng([_CAPTION_STREAM, cfg.seed, row_id, epoch]).random() < cfg.caption_dropout:
            prompt = ""
        # One draw per item, shared by winner and loser (and all frames), so a pair stays aligned.
        fx, fy, u, start = np.random.default_rng([_AUGMENT_STREAM, cfg.seed, row_id, epoch]).random(4)
        offset = None if cfg.center_crop else (fx, fy)
        flip = cfg.random_flip and u < 0.5

        geometry = []  # (original height, width, crop top, left) of each image, the winner's first

        def pixels(image: Image.Image) -> torch.Tensor:
            resized, corner = resize_crop_flip(image, size, offset, flip)
            geometry.append((image.height, image.width, *corner))
            return to_tensor(resized)

        if cfg.frames:
            clips = [open_clip(row[n], f"{where} column {self.column(n)}", cfg, start) for n in names]
            tensors = [torch.stack([pixels(Image.fromarray(frame)) for frame in clip]) for clip in clips]
        else:
            tensors = [pixels(open_image(row[n], f"{where} column {self.column(n)}")) for n in names]
        return {
            "prompt": prompt,
            "winner": tensors[0],
            "loser": tensors[1] if len(tensors) > 1 else None,
            "index": index,
            # SDXL's size and crop conditioning: original (height, width), crop (top, left), target (height, width)
            "size_and_crop": (*geometry[0], size[1], size[0]),
        }

    def skip(self, row_id: int, error: DataError | str) -> None:
        """Count and log an unreadable row once; a long run must not die on one bad image. A
        DataLoader worker keeps it in :attr:`unreported` instead: workers would each log the rows
        they meet, on the progress bar's line, where the training process logs each row once above it."""
        if row_id not in self._bad:
            self._bad.add(row_id)
            self.skipped += 1
            if torch.utils.data.get_worker_info() is None:
                log.warning("skipping unreadable row (%d so far): %s", self.skipped, error)
            else:
                self.unreported.append((row_id, str(error)))

    def is_bad(self, row_id: int) -> bool:
        return row_id in self._bad


class PreferenceDataset(torch.utils.data.Dataset):
    """Map-style dataset; items are ``{prompt, winner, loser, index, size_and_crop}``.

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

    @property
    def skipped_rows(self) -> set[int]:
        """The unreadable rows seen so far."""
        return set(self._reader._bad)

    def take_unreported(self) -> list[tuple[int, str]]:
        """In a DataLoader worker, the rows skipped since last asked, with why: ``(row, reason)``."""
        rows, self._reader.unreported = self._reader.unreported, []
        return rows

    def report_skipped(self, row_id: int, reason: str) -> None:
        """Log and count, once, a row a DataLoader worker skipped."""
        self._reader.skip(row_id, reason)

    def __len__(self) -> int:
        return len(self._row_ids)

    def captions(self, limit: int) -> list[str]:
        """The captions of the first ``limit`` rows as stored, without reading an image (rows without one left out)."""
        column = self.cfg.caption_column if self._reader.pairs else self.cfg.text_column
        found = [self._rows[row_id].get(column) for row_id in self._row_ids[:limit]]
        return [caption for caption in found if isinstance(caption, str) and caption.strip()]

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
                width, height = image_size(self._rows[row_id][column], f"{reader.where} {reader.row_name(row_id)} column {reader.column(column)}")
            except DataError:
                width = height = 1
            buckets.append(nearest_bucket(sizes, width, height))
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
        check(world.clips or not cfg.frames, "data.frames", f"source {world.name} is images: set data.frames=0")
        request = TrainingDataRequest(cfg.world_split_seed, cfg.world_pairs_per_prompt, cfg.resolution, cfg.frames, cfg.world_without_validation)
        first, second = world.pair_columns
        cfg = dataclasses.replace(cfg, source="parquet", path=str(world.training_data(request)), image_0_column=first, image_1_column=second)
    source = open_source(cfg)
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
