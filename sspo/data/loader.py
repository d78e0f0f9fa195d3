"""Micro-batches read ahead by DataLoader workers, in the order the training run consumes them."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from sspo.data.dataset import PreferenceDataset


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
        batch = next(self._batches)
        for item in batch:
            for row, reason in item.pop("skipped"):
                self.dataset.report_skipped(row, reason)
        return batch

    def _loader(self, first: int) -> torch.utils.data.DataLoader:
        workers = self.dataset.cfg.num_workers
        return torch.utils.data.DataLoader(
            _EpochItems(self.dataset), batch_sampler=_Placements(self.placements, first), collate_fn=list, num_workers=workers,
            prefetch_factor=self.dataset.cfg.prefetch_factor if workers else None, worker_init_fn=_one_thread,
            generator=torch.Generator())  # its workers' base seed (unused: items draw from their own streams), not from torch's global generator


class _EpochItems(torch.utils.data.Dataset):
    """Keys are ``(item, epoch)``; each item also says, from a worker, the rows it ``skipped`` (the
    dataset serves the next readable one for an unreadable row)."""

    def __init__(self, dataset: PreferenceDataset):
        self.dataset = dataset

    def __getitem__(self, key: tuple[int, int]) -> dict:
        item = self.dataset.item(*key)
        return item | {"skipped": self.dataset.take_unreported()}


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
