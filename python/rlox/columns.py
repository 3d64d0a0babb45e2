"""Constructor inputs as ragged token columns: the six arrays a ``PairStore`` takes.

Each of the prompt, chosen and rejected columns is flat token ids ``(T,)`` plus ``(n + 1,)``
offsets, in the order of :data:`ARRAY_NAMES`. One function per input kind (numpy/torch arrays,
Python lists, Arrow / ``datasets`` columns) backs the matching ``PreferenceDataset.from_*``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from torch import Tensor

__all__ = ["ARRAY_NAMES", "COLUMNS", "array_columns", "arrow_columns", "list_columns"]

COLUMNS = ("prompt", "chosen", "rejected")
ARRAY_NAMES = tuple(f"{c}_{k}" for c in COLUMNS for k in ("values", "offsets"))


def array_columns(given: Sequence[Any]) -> list[np.ndarray]:
    """The six arrays (ordered as :data:`ARRAY_NAMES`) as numpy, without copying numpy input."""
    arrays = []
    for name, a in zip(ARRAY_NAMES, given, strict=True):
        if isinstance(a, Tensor):
            a = a.detach().cpu().numpy()
        elif not isinstance(a, np.ndarray):
            try:
                a = np.asarray(a)
            except (ValueError, TypeError) as e:
                raise TypeError(f"{name}: expected a 1-D integer array ({e})") from None
        arrays.append(a)
    return arrays


def list_columns(
    prompt_ids: Iterable[Sequence[int]],
    chosen_ids: Iterable[Sequence[int]],
    rejected_ids: Iterable[Sequence[int]],
) -> list[np.ndarray]:
    """The six arrays of three sequences of token-id sequences (copied; ids int32 when they fit)."""
    cols = [
        _flatten(n, r) for n, r in zip(COLUMNS, (prompt_ids, chosen_ids, rejected_ids), strict=True)
    ]
    return [a for v, o in cols for a in (_narrow(v), o)]


def arrow_columns(data: Any, columns: Sequence[str]) -> tuple[list[np.ndarray], np.ndarray | None]:
    """The six arrays of the ``list<int>`` columns named ``columns`` (prompt, chosen, rejected).

    ``data`` is a ``pyarrow.Table``/``RecordBatch``, a ``datasets.Dataset`` or a mapping of Arrow
    arrays; single-chunk columns are read in place. Also returns the ``(n,)`` index mapping of a
    ``datasets.Dataset`` (after ``select``/``shuffle``), else None.
    """
    if isinstance(columns, str) or len(columns) != 3:
        raise ValueError("columns: expected the names of the prompt, chosen, rejected columns")
    table, mapping = data, None
    if hasattr(data, "_indices") and hasattr(data, "data"):  # datasets.Dataset
        table = data.data.table if hasattr(data.data, "table") else data.data
        if data._indices is not None:
            mapping = data._indices.column(0).to_numpy()
    if not hasattr(table, "__getitem__"):
        raise TypeError(f"data: expected an Arrow table or dataset, got {type(data).__name__}")
    arrays = []
    for name in columns:
        values, offsets = _arrow_column(table, name)
        arrays += [values, offsets]
    return arrays, mapping


def _flatten(name: str, rows: Any) -> tuple[np.ndarray, np.ndarray]:
    """Flat int64 values and (n + 1,) offsets of a sequence of id sequences."""
    if isinstance(rows, (str, bytes, Mapping)) or not isinstance(rows, Iterable):
        raise TypeError(f"{name}: expected a sequence of token-id sequences")
    parts = []
    for i, row in enumerate(rows):
        if isinstance(row, Tensor):
            row = row.detach().cpu().numpy()
        if isinstance(row, (str, bytes, Mapping)) or not isinstance(row, Iterable):
            raise TypeError(f"{name}[{i}]: expected a sequence of ints, got {type(row).__name__}")
        try:
            arr = row if isinstance(row, np.ndarray) else np.asarray(list(row))
        except (ValueError, TypeError):
            raise TypeError(f"{name}[{i}]: expected a flat sequence of ints") from None
        if arr.ndim != 1:
            raise TypeError(f"{name}[{i}]: expected a flat sequence of ints, got shape {arr.shape}")
        if arr.size == 0:
            arr = np.zeros(0, dtype=np.int64)
        elif arr.dtype.kind == "O" and all(
            isinstance(x, int) and not isinstance(x, bool) for x in arr
        ):
            raise ValueError(f"{name}[{i}]: token id does not fit in 64 bits")
        elif arr.dtype.kind not in "iu":
            raise TypeError(f"{name}[{i}]: token ids must be ints, got dtype {arr.dtype}")
        elif arr.dtype == np.uint64 and arr.max() > np.iinfo(np.int64).max:
            raise ValueError(f"{name}[{i}]: token id does not fit in 64 bits")
        parts.append(arr.astype(np.int64, copy=False))
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, parts), np.int64, len(parts)), out=offsets[1:])
    values = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return values, offsets


def _narrow(values: np.ndarray) -> np.ndarray:
    """int64 token ids as int32 when they fit (half the memory)."""
    if values.size == 0 or (values.min() >= 0 and values.max() <= np.iinfo(np.int32).max):
        return values.astype(np.int32)
    return values


def _arrow_column(table: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Values and offsets of a list<int> Arrow column, zero-copy when it is a single chunk."""
    import pyarrow as pa

    try:
        col = table[name]
    except (KeyError, ValueError):
        raise ValueError(f"{name}: missing column") from None
    if isinstance(col, pa.ChunkedArray):
        col = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    if not isinstance(col, pa.Array):
        raise TypeError(f"{name}: expected an Arrow list<int> column, got {type(col).__name__}")
    typ = col.type
    if not (pa.types.is_list(typ) or pa.types.is_large_list(typ)) or not pa.types.is_integer(
        typ.value_type
    ):
        raise TypeError(f"{name}: expected an Arrow list<int> column, got {typ}")
    if col.null_count:
        first = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise ValueError(f"{name}[{first}]: null row")
    offsets = col.offsets.to_numpy(zero_copy_only=True)
    values = col.values
    used = values.slice(int(offsets[0]), int(offsets[-1] - offsets[0])) if len(offsets) else values
    if used.null_count:
        first = int(np.flatnonzero(used.is_null().to_numpy(zero_copy_only=False))[0])
        row = int(np.searchsorted(offsets, offsets[0] + first, side="right")) - 1
        raise ValueError(f"{name}[{row}]: null token id")
    if values.null_count:  # nulls outside the rows in use: keep only the used run of values
        return used.to_numpy(zero_copy_only=True), offsets - offsets[0]
    return values.to_numpy(zero_copy_only=True), offsets
