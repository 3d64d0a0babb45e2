"""Feeding a ``torch.utils.data.DataLoader`` from a :class:`~rlox.data.PreferenceDataset`: a batch
sampler planned in Rust and a collator that collates in Rust."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from rlox.batch import PairBatch
from rlox.data import PreferenceDataset
from rlox.indices import BatchPlan, PairIndices, index_array, int_option

__all__ = ["PreferenceBatchSampler", "PreferenceCollator"]


def _distributed() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class PreferenceBatchSampler(torch.utils.data.Sampler):
    """Batches of pair indices for a ``DataLoader`` (``batch_sampler=``), planned in Rust.

    Keywords are those of :meth:`PreferenceDataset.batches`; ``rank``/``world_size`` default to
    the initialised ``torch.distributed`` group. Call :meth:`set_epoch` before each epoch.
    Pickles without the store's data when the dataset is memory-mapped.
    """

    def __init__(
        self,
        dataset: PreferenceDataset,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        epoch: int = 0,
        **kwargs: Any,
    ) -> None:
        if not isinstance(dataset, PreferenceDataset):
            raise TypeError(f"dataset: expected a PreferenceDataset, got {type(dataset).__name__}")
        if "epoch" in kwargs:
            raise TypeError("epoch: pass it to set_epoch()")
        default_rank, default_world = _distributed()
        self.dataset = dataset
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        self.kwargs = kwargs
        self.epoch = epoch
        self._plan: BatchPlan | None = None
        self._plan_epoch = -1
        self._current()  # validate the options now

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int_option("epoch", epoch, allow_none=False)

    def _current(self) -> BatchPlan:
        if self._plan is None or self._plan_epoch != self.epoch:
            self._plan = self.dataset.batches(
                epoch=self.epoch, rank=self.rank, world_size=self.world_size, **self.kwargs
            )
            self._plan_epoch = self.epoch
        return self._plan

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._current():
            yield batch.tolist()

    def __len__(self) -> int:
        return len(self._current())

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_plan"], state["_plan_epoch"] = None, -1
        return state


class PreferenceCollator:
    """``collate_fn`` for a ``DataLoader`` over a :class:`PreferenceDataset`.

    Accepts what the loader fetched (the dataset's batched ``__getitems__`` result, a list of
    indices, or a list of ``dataset[i]`` dicts) and returns a :class:`PairBatch` collated in
    Rust with the keywords of :meth:`PreferenceDataset.collate`.
    """

    def __init__(self, dataset: PreferenceDataset, **kwargs: Any) -> None:
        if not isinstance(dataset, PreferenceDataset):
            raise TypeError(f"dataset: expected a PreferenceDataset, got {type(dataset).__name__}")
        self.dataset = dataset
        self.kwargs = kwargs

    def __call__(self, items: Any) -> PairBatch:
        if isinstance(items, PairIndices):
            indices = items.indices
        elif len(items) and isinstance(items[0], Mapping):
            indices = np.array([int(x["index"]) for x in items], dtype=np.int64)
        else:
            indices = index_array(items, len(self.dataset))
        return self.dataset.collate(indices, **self.kwargs)
