"""Index batches and plans shared by :mod:`rlox.data` and :mod:`rlox.loader`: pair lengths, one
epoch's batch plan, and the checks that turn user input into an index array or an int option."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
from torch import Tensor

__all__ = ["BatchPlan", "PairIndices", "PairLengths", "index_array", "int_option"]


class PairLengths(NamedTuple):
    """(n,) int64 token counts of each column."""

    prompt: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray


class BatchPlan(Sequence[np.ndarray]):
    """One rank's batches for one epoch: batch ``k`` is ``indices[offsets[k]:offsets[k + 1]]``."""

    def __init__(self, indices: np.ndarray, offsets: np.ndarray) -> None:
        self.indices = indices
        self.offsets = offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, k: int) -> np.ndarray:  # type: ignore[override]
        if not -len(self) <= k < len(self):
            raise IndexError(f"batch {k} out of range for {len(self)} batches")
        k %= len(self)
        return self.indices[self.offsets[k] : self.offsets[k + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        for k in range(len(self)):
            yield self.indices[self.offsets[k] : self.offsets[k + 1]]

    def __repr__(self) -> str:
        return f"BatchPlan({len(self)} batches, {len(self.indices)} pairs)"


class PairIndices(NamedTuple):
    """The pair indices of one batch, as handed from a ``DataLoader`` to :class:`PreferenceCollator`."""

    indices: np.ndarray


def int_option(name: str, value: Any, *, minimum: int = 0, allow_none: bool = True) -> Any:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")
    return int(value)


def index_array(indices: Any, n: int | None = None) -> np.ndarray:
    """A 1-D int64 index array (negative indices count from the end when ``n`` is given)."""
    if isinstance(indices, Tensor):
        indices = indices.detach().cpu().numpy()
    try:
        arr = np.asarray(indices)
    except (ValueError, TypeError):
        raise TypeError("indices: expected a 1-D sequence of ints") from None
    if arr.dtype == object or (arr.size and arr.dtype.kind not in "iu"):
        raise TypeError(f"indices: expected integers, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"indices: must be 1-D, got shape {arr.shape}")
    arr = arr.astype(np.int64, copy=False)
    if n is not None and arr.size and arr.min() < 0:
        arr = np.where(arr < 0, arr + n, arr)
    return arr
