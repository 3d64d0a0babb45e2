"""Preference data: a Rust-backed ragged store of (prompt, chosen, rejected) token pairs.

Each column is stored Arrow style as flat token ids plus ``n + 1`` offsets. The store can be built
from Python lists, numpy arrays or Arrow / Hugging Face ``datasets`` columns (without copying where
the layout allows), or tokenized from text; saved to a directory and memory-mapped back in O(1);
collated in Rust into ``padded``, ``packed`` or ``prefix_shared`` batches that share one log-prob
gather plan; and split into length-grouped, deterministic, rank-sharded batches.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from rlox import __version__, _rlox

__all__ = [
    "LAYOUTS",
    "BatchPlan",
    "PairBatch",
    "PairLengths",
    "PreferenceBatchSampler",
    "PreferenceCollator",
    "PreferenceDataset",
    "dense_attention_mask",
]

LAYOUTS = ("padded", "packed", "prefix_shared")
STORE_FORMAT = "rlox-preference-store"
STORE_VERSION = 1
META_FILE = "rlox_store.json"
DATA_FILE = "tokens.bin"
_COLUMNS = ("prompt", "chosen", "rejected")
_ARRAYS = tuple(f"{c}_{k}" for c in _COLUMNS for k in ("values", "offsets"))


@dataclass(frozen=True)
class PairBatch:
    """A collated batch of B preference pairs in one of three layouts.

    Matrices are ``(R, L)``: ``R = 2B`` rows for ``padded`` (row ``i`` is prompt_i + chosen_i, row
    ``B + i`` prompt_i + rejected_i), the number of packed rows for ``packed``, ``B`` for
    ``prefix_shared`` (row ``i`` is prompt_i + chosen_i + rejected_i). The gather plan lists every
    completion token once: ``plan_row``/``plan_position`` locate the logits that predict it,
    ``plan_target`` is its id, ``plan_pair`` its pair (0..B-1) and ``plan_side`` 0 for chosen, 1 for
    rejected. Summing token log-probs by ``plan_side * B + plan_pair`` gives the (2B,) sequence
    log-probs in every layout.
    """

    input_ids: Tensor  # (R, L) int64
    attention_mask: Tensor  # (R, L) int64, 1 on real tokens
    position_ids: Tensor  # (R, L) int64
    loss_mask: Tensor  # (R, L) bool, True on completion tokens
    chosen_lengths: Tensor  # (B,) int64, after truncation
    rejected_lengths: Tensor  # (B,) int64
    plan_row: Tensor  # (N,) int64
    plan_position: Tensor  # (N,) int64
    plan_target: Tensor  # (N,) int64
    plan_pair: Tensor  # (N,) int64
    plan_side: Tensor  # (N,) int64
    prompt_lengths: Tensor | None = None  # (B,) int64
    sequence_ids: Tensor | None = None  # (R, L) int32, -1 on padding
    layout: str = "padded"
    cu_seqlens: Tensor | None = None  # packed: (S + 1,) int32 over the flattened (R * L) stream
    segment_ends: Tensor | None = None  # prefix_shared: (B, 3) ends of prompt, chosen, rejected
    pair_index: Tensor | None = None  # (B,) store index of each pair
    skipped: Tensor | None = None  # store indices of pairs dropped by truncation
    num_truncated: int = 0

    def __getattribute__(self, name: str) -> Any:
        # The collator's numpy arrays become tensors (without a copy) when first read, so a
        # batch pays only for the fields its consumer uses.
        value = object.__getattribute__(self, name)
        if type(value) is np.ndarray:
            value = torch.from_numpy(value)
            object.__setattr__(self, name, value)
        return value

    @property
    def num_pairs(self) -> int:
        return int(self.chosen_lengths.shape[0])

    def to(self, device: torch.device | str) -> PairBatch:
        """The same batch with every tensor on ``device`` (itself when already there)."""
        device = torch.device(device)
        held = [v for v in self.__dict__.values() if isinstance(v, Tensor)]
        if device.type == "cpu" and all(v.device == device for v in held):
            return self  # numpy fields are CPU memory too, and stay lazy
        moved = {
            f.name: v.to(device) if isinstance(v := getattr(self, f.name), Tensor) else v
            for f in fields(self)
        }
        return PairBatch(**moved)

    def dense_attention_mask(self) -> Tensor:
        """(R, 1, L, L) bool mask, True where a query may attend a key (for small inputs)."""
        return dense_attention_mask(self)


def dense_attention_mask(batch: PairBatch) -> Tensor:
    """Expand a batch's compact attention structure into a (R, 1, L, L) boolean mask.

    Causal within each sequence (``sequence_ids``); in ``prefix_shared`` rows, rejected tokens
    never see chosen tokens. Padding queries attend only themselves, so no row is empty.
    """
    rows, length = batch.input_ids.shape
    device = batch.input_ids.device
    if batch.sequence_ids is None:
        seq = torch.where(
            batch.attention_mask.bool(), torch.arange(rows, device=device)[:, None], -1
        )
    else:
        seq = batch.sequence_ids.long()
    valid = seq >= 0
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    mask = (seq[:, :, None] == seq[:, None, :]) & causal & valid[:, None, :]
    if batch.layout == "prefix_shared" and batch.segment_ends is not None:
        t = torch.arange(length, device=device)
        ends = batch.segment_ends.to(device)
        chosen = (t >= ends[:, 0:1]) & (t < ends[:, 1:2])
        rejected = (t >= ends[:, 1:2]) & (t < ends[:, 2:3])
        mask &= ~(rejected[:, :, None] & chosen[:, None, :])
    eye = torch.eye(length, dtype=torch.bool, device=device)
    mask |= eye & ~valid[:, :, None]
    return mask[:, None]


_BATCH_DEFAULTS = {
    f.name: None if f.default is MISSING else f.default
    for f in fields(PairBatch)
    if f.name != "layout"
}


def batch_from_arrays(arrays: Mapping[str, Any], layout: str) -> PairBatch:
    """Wrap the arrays returned by the Rust collator in a :class:`PairBatch` (tensors on access)."""
    kw = {name: arrays.get(name, default) for name, default in _BATCH_DEFAULTS.items()}
    kw["layout"] = layout
    if layout != "packed":
        kw["cu_seqlens"] = None
    if layout != "prefix_shared":
        kw["segment_ends"] = None
    # Every field is given, so fill the frozen instance directly (its __init__ costs about as
    # much again for ~20 fields); numpy arrays turn into tensors on first access.
    batch = object.__new__(PairBatch)
    batch.__dict__.update(kw)
    return batch


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


def _int_option(name: str, value: Any, *, minimum: int = 0, allow_none: bool = True) -> Any:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")
    return int(value)


def _indices(indices: Any, n: int | None = None) -> np.ndarray:
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


class PreferenceDataset:
    """(prompt, chosen, rejected) token pairs in a Rust ragged store.

    Build with :meth:`from_lists`, :meth:`from_arrays`, :meth:`from_arrow`, :meth:`from_text` or
    :meth:`load`. ``dataset[i]`` is a dict of the pair's three id arrays; ``len(dataset)`` the
    number of pairs.
    """

    def __init__(self, store: _rlox.PairStore, *, path: Path | None = None) -> None:
        if not isinstance(store, _rlox.PairStore):
            raise TypeError(f"store: expected rlox._rlox.PairStore, got {type(store).__name__}")
        self._store = store
        self._path = path
        self._mapping: Any = None
        self._max_resident: int | None = None
        self._base_resident = 0
        self._calls = 0
        arrays = store.arrays()
        self._arrays = dict(zip(_ARRAYS, arrays, strict=True))
        self._directory: Path | None = path
        # Per-pair reference log-probs by cache key (see DPO.precompute_reference).
        self._reference_logps: dict[str, Any] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_arrays(
        cls,
        prompt_values: Any,
        prompt_offsets: Any,
        chosen_values: Any,
        chosen_offsets: Any,
        rejected_values: Any,
        rejected_offsets: Any,
        *,
        vocab_size: int | None = None,
        validate: bool = True,
    ) -> PreferenceDataset:
        """Wrap flat values + ``(n + 1,)`` offsets per column without copying.

        int32/int64 contiguous arrays are used in place (any other integer dtype is converted).
        ``validate`` checks every pair (offsets, non-empty prompt and completions, ids in
        ``[0, vocab_size)``) in parallel; the error names the field and the first bad pair.
        """
        given = (
            prompt_values,
            prompt_offsets,
            chosen_values,
            chosen_offsets,
            rejected_values,
            rejected_offsets,
        )
        arrays = []
        for name, a in zip(_ARRAYS, given, strict=True):
            if isinstance(a, Tensor):
                a = a.detach().cpu().numpy()
            elif not isinstance(a, np.ndarray):
                try:
                    a = np.asarray(a)
                except (ValueError, TypeError) as e:
                    raise TypeError(f"{name}: expected a 1-D integer array ({e})") from None
            arrays.append(a)
        store = _rlox.PairStore(*arrays)
        if validate:
            store.validate(vocab_size)
        return cls(store)

    @classmethod
    def from_lists(
        cls,
        prompt_ids: Iterable[Sequence[int]],
        chosen_ids: Iterable[Sequence[int]],
        rejected_ids: Iterable[Sequence[int]],
        *,
        vocab_size: int | None = None,
    ) -> PreferenceDataset:
        """Build from three equal-length sequences of token-id sequences (copied into the store)."""
        cols = [
            _flatten(n, r)
            for n, r in zip(_COLUMNS, (prompt_ids, chosen_ids, rejected_ids), strict=True)
        ]
        store = _rlox.PairStore(*(a for v, o in cols for a in (_narrow(v), o)))
        store.validate(vocab_size)
        return cls(store)

    @classmethod
    def from_arrow(
        cls,
        data: Any,
        *,
        columns: Sequence[str] = ("prompt_ids", "chosen_ids", "rejected_ids"),
        vocab_size: int | None = None,
        validate: bool = True,
    ) -> PreferenceDataset:
        """Build from a ``pyarrow.Table``/``RecordBatch``, a ``datasets.Dataset`` or a mapping of
        Arrow arrays, reading the ``list<int>`` columns named by ``columns`` (prompt, chosen,
        rejected) in place when each is a single chunk. A ``datasets.Dataset`` with an index
        mapping (after ``select``/``shuffle``) is gathered through that mapping.
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
        try:
            store = _rlox.PairStore(*arrays)
        except ValueError as e:
            raise ValueError(f"{e} (columns {list(columns)})") from None
        dataset = cls(store)
        if mapping is not None:
            dataset = dataset.select(mapping)
        if validate:
            dataset._store.validate(vocab_size)
        return dataset

    @classmethod
    def from_text(cls, records_or_path: Any, tokenizer: Any, **kwargs: Any) -> PreferenceDataset:
        """Tokenize preference text (see :func:`rlox.text.tokenize_preferences`) into a store."""
        from rlox.text import tokenize_preferences

        t = tokenize_preferences(records_or_path, tokenizer, **kwargs)
        return cls.from_arrays(
            t.prompt_values,
            t.prompt_offsets,
            t.chosen_values,
            t.chosen_offsets,
            t.rejected_values,
            t.rejected_offsets,
        )

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the store to directory ``path``: ``tokens.bin`` (int32 values, int64 offsets, each
        section 64-byte aligned with a CRC-32) and ``rlox_store.json``. Files are written under
        temporary names and renamed, so an interrupted save never leaves a readable broken store.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tag = uuid.uuid4().hex[:8]
        tmp_data, tmp_meta = path / f".{DATA_FILE}.{tag}", path / f".{META_FILE}.{tag}"
        try:
            sections = self._store.save(str(tmp_data))
            meta: dict[str, Any] = {
                "format": STORE_FORMAT,
                "version": STORE_VERSION,
                "rlox_version": __version__,
                "num_pairs": len(self),
                "data_file": DATA_FILE,
                "data_bytes": tmp_data.stat().st_size,
                "sections": sections,
            }
            meta["header_crc32"] = _header_crc(meta)
            tmp_meta.write_text(json.dumps(meta, indent=1))
            os.replace(tmp_data, path / DATA_FILE)
            os.replace(tmp_meta, path / META_FILE)
        finally:
            for f in (tmp_data, tmp_meta):
                f.unlink(missing_ok=True)
        self._directory = path.resolve()
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        mmap: bool = True,
        verify: bool | None = None,
        max_resident: int | None = None,
    ) -> PreferenceDataset:
        """Open a store written by :meth:`save`.

        ``mmap=True`` maps the token file read-only: opening is O(1) and pages are read on use.
        ``verify`` checks every section's CRC-32 (default: only when ``mmap=False``). A missing,
        truncated or corrupted store raises ``ValueError`` naming ``path``.

        Mapped pages are clean page cache: they count as resident once read, and the OS reclaims
        them under pressure. With ``max_resident`` (bytes; Linux), :meth:`collate` drops them
        whenever the process's file-backed resident memory has grown by more than that since
        loading. This caps resident memory at the price of re-mapping pages (a store much larger
        than the budget collates up to about 2x slower).
        """
        path = Path(path)
        meta_file = path / META_FILE
        if not meta_file.is_file():
            raise ValueError(f"path: {path} is not an rlox store ({META_FILE} missing)")
        try:
            meta = json.loads(meta_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"path: {meta_file} is corrupted ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != STORE_FORMAT:
            raise ValueError(f"path: {meta_file} is not an rlox store header")
        if meta.get("version") != STORE_VERSION:
            raise ValueError(
                f"path: store format version {meta.get('version')} is not supported "
                f"(this rlox reads version {STORE_VERSION})"
            )
        if meta.get("header_crc32") != _header_crc(meta):
            raise ValueError(f"path: {meta_file} is corrupted (header checksum mismatch)")
        data_file = path / DATA_FILE
        if not data_file.is_file():
            raise ValueError(f"path: {data_file} is missing")
        size = data_file.stat().st_size
        if size != meta["data_bytes"]:
            raise ValueError(
                f"path: {data_file} is truncated or corrupted "
                f"({size} bytes, the header says {meta['data_bytes']})"
            )
        sections = {s["name"]: s for s in meta["sections"]}
        if set(sections) != set(_ARRAYS):
            raise ValueError(f"path: {meta_file} is corrupted (sections {sorted(sections)})")
        if size == 0:
            raw = np.zeros(0, dtype=np.uint8)
        elif mmap:
            raw = np.memmap(data_file, dtype=np.uint8, mode="r")
        else:
            raw = np.fromfile(data_file, dtype=np.uint8)
        arrays = []
        for name in _ARRAYS:
            s = sections[name]
            dtype = np.dtype(s["dtype"])
            start, count = int(s["offset"]), int(s["count"])
            end = start + count * dtype.itemsize
            if start < 0 or count < 0 or end > size or start % dtype.alignment:
                raise ValueError(f"path: section {name} lies outside {data_file}; corrupted")
            arr = raw[start:end].view(dtype)
            if verify or (verify is None and not mmap):
                if _rlox.crc32(arr) != s["crc32"]:
                    raise ValueError(
                        f"path: section {name} of {data_file} fails its checksum; corrupted"
                    )
            arrays.append(arr)
        store = _rlox.PairStore(*arrays)
        if len(store) != meta["num_pairs"]:
            raise ValueError(f"path: {meta_file} is corrupted (pair count mismatch)")
        dataset = cls(store, path=path.resolve() if mmap else None)
        dataset._directory = path.resolve()
        if mmap:
            dataset._mapping = getattr(raw, "_mmap", None)
            dataset._max_resident = max_resident
            if max_resident is not None:
                dataset.release_pages()  # pages read by verify do not count against the budget
            dataset._base_resident = _resident_file_bytes() or 0
        return dataset

    def release_pages(self) -> None:
        """Drop this process's resident pages of a memory-mapped store (they stay in the OS page
        cache, so touching them again is cheap)."""
        if self._mapping is not None and hasattr(self._mapping, "madvise"):
            import mmap as mmap_module

            self._mapping.madvise(mmap_module.MADV_DONTNEED)

    def _bound_resident(self) -> None:
        if self._max_resident is None:
            return
        now = _resident_file_bytes()
        if now is not None and now - self._base_resident > self._max_resident:
            self.release_pages()

    def verify(self) -> None:
        """Check every pair (offsets, non-empty runs, ids >= 0); raises ``ValueError``."""
        self._store.validate(None)

    def __reduce__(self) -> tuple[Any, ...]:
        # A memory-mapped store pickles as its path: worker processes map the same file.
        if self._path is not None:
            return (_load_mapped, (str(self._path),))
        return (_from_arrays, tuple(np.ascontiguousarray(a) for a in self._store.arrays()))

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self._store)

    def __repr__(self) -> str:
        where = f", path={str(self._path)!r}" if self._path else ""
        return f"PreferenceDataset({len(self)} pairs{where})"

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        """Pair ``i`` as ``{"prompt", "chosen", "rejected"}`` id arrays (views) plus ``"index"``."""
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"index: expected an int, got {type(i).__name__}")
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} pairs")
        i = int(i) % n
        out: dict[str, Any] = {"index": i}
        for c in _COLUMNS:
            off = self._arrays[f"{c}_offsets"]
            out[c] = self._arrays[f"{c}_values"][off[i] : off[i + 1]]
        return out

    def __getitems__(self, indices: Sequence[int]) -> PairIndices:
        """Batched access for ``torch.utils.data.DataLoader``: defers to the collator."""
        return PairIndices(_indices(indices, len(self)))

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(len(self)):
            yield self[i]

    @property
    def directory(self) -> Path | None:
        """The directory this store was last saved to or loaded from, else None."""
        return self._directory

    def fingerprint(self) -> str:
        """Hex digest of the pairs' token ids, independent of the storage dtype and offset base.

        Hashes the CRC-32 of each column's row lengths and of its ids as int64, in chunks.
        """
        digest = hashlib.sha256(str(len(self)).encode())
        for c in _COLUMNS:
            off = self._arrays[f"{c}_offsets"]
            values = self._arrays[f"{c}_values"][off[0] : off[-1]] if len(off) else off[:0]
            digest.update(b"%d|" % _rlox.crc32(np.diff(off)))
            for start in range(0, len(values), 1 << 22):
                chunk = np.ascontiguousarray(values[start : start + (1 << 22)], dtype=np.int64)
                digest.update(b"%d|" % _rlox.crc32(chunk))
        return digest.hexdigest()

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """The six backing arrays (``prompt_values``, ``prompt_offsets``, ...), read-only views."""
        out = {}
        for k, a in self._arrays.items():
            v = a.view()
            v.flags.writeable = False
            out[k] = v
        return out

    def lengths(self) -> PairLengths:
        """(n,) int64 token counts of the prompt, chosen and rejected columns."""
        return PairLengths(*self._store.lengths())

    def select(self, indices: Any) -> PreferenceDataset:
        """A new in-memory dataset of the pairs at ``indices`` (in that order, repeats allowed)."""
        return PreferenceDataset(_rlox.PairStore(*self._store.take(_indices(indices, len(self)))))

    def shard(self, rank: int, world_size: int, *, contiguous: bool = True) -> PreferenceDataset:
        """Pairs of shard ``rank`` out of ``world_size`` (contiguous blocks or every k-th pair)."""
        world_size = _int_option("world_size", world_size, minimum=1, allow_none=False)
        rank = _int_option("rank", rank, allow_none=False)
        if rank >= world_size:
            raise ValueError(f"rank: must be < world_size ({world_size}), got {rank}")
        n = len(self)
        if contiguous:
            bounds = np.linspace(0, n, world_size + 1).astype(np.int64)
            idx = np.arange(bounds[rank], bounds[rank + 1])
        else:
            idx = np.arange(rank, n, world_size)
        return self.select(idx)

    def train_test_split(
        self, test_size: float | int, *, seed: int = 0, shuffle: bool = True
    ) -> tuple[PreferenceDataset, PreferenceDataset]:
        """Split into (train, test); ``test_size`` is a fraction in (0, 1) or a pair count."""
        n = len(self)
        if isinstance(test_size, bool) or not isinstance(test_size, (int, float, np.number)):
            raise TypeError(f"test_size: expected a float or int, got {type(test_size).__name__}")
        if isinstance(test_size, (float, np.floating)):
            if not 0.0 < test_size < 1.0:
                raise ValueError(f"test_size: a fraction must lie in (0, 1), got {test_size}")
            n_test = int(np.ceil(test_size * n))
        else:
            n_test = int(test_size)
        if not 0 < n_test < n:
            raise ValueError(f"test_size: leaves {n_test} of {n} pairs for test; need 0 < k < n")
        order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
        return self.select(np.sort(order[n_test:])), self.select(np.sort(order[:n_test]))

    # ------------------------------------------------------------------ collation
    def collate(
        self,
        indices: Any,
        *,
        layout: str = "padded",
        max_length: int | None = 1024,
        max_prompt_length: int | None = None,
        truncation: str = "keep_end",
        pad_token_id: int = 0,
        pad_to_multiple_of: int | None = None,
        pack_length: int | None = None,
        vocab_size: int | None = None,
    ) -> PairBatch:
        """Collate the pairs at ``indices`` in Rust into a :class:`PairBatch`.

        Layouts: ``"padded"`` (2B rows, TRL-compatible), ``"packed"`` (sequences first-fit into
        rows of at most ``pack_length`` tokens, one row when ``None``; positions restart per
        sequence; ``cu_seqlens`` for varlen attention) and ``"prefix_shared"`` (one row
        ``prompt + chosen + rejected`` per pair; rejected positions continue from the prompt).

        Truncation: the prompt is first cut to ``max_prompt_length`` tokens, keeping its end
        (``"keep_end"``, the tokens next to the completion) or its start (``"keep_start"``); then
        each completion is cut at its end so that prompt + completion <= ``max_length``. A pair
        left with no completion token on either side is skipped (reported in ``skipped``), never
        scored as zero. ``max_length=None`` disables truncation.
        """
        if not (type(indices) is np.ndarray and indices.dtype == np.int64 and indices.ndim == 1):
            indices = _indices(indices)  # the store counts negative indices from the end
        out = self._store.collate(
            indices,
            layout=layout,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            truncation=truncation,
            pad_token_id=pad_token_id,
            pad_to_multiple_of=pad_to_multiple_of,
            pack_length=pack_length,
            vocab_size=vocab_size,
        )
        if self._max_resident is not None:
            self._calls += 1
            if self._calls % 8 == 0:
                self._bound_resident()
        return batch_from_arrays(out, layout)

    def batches(
        self,
        batch_size: int | None = None,
        max_tokens: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        group_by_length: bool = True,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        *,
        layout: str = "padded",
        max_length: int | None = 1024,
        max_prompt_length: int | None = None,
        truncation: str = "keep_end",
        pad_to_multiple_of: int | None = None,
        pack_length: int | None = None,
        group_batches: int = 64,
    ) -> BatchPlan:
        """Plan one epoch of index batches for ``rank`` (in Rust).

        Give ``batch_size`` (pairs) or ``max_tokens`` (tokens per batch including the padding of
        ``layout``; for ``packed`` the real tokens). Pairs are shuffled by ``seed`` and ``epoch``,
        then with ``group_by_length`` sorted by length inside mega-batches of ``group_batches``
        batches per rank (token-budget packed batches are filled first-fit-decreasing). Each round
        gives every rank one batch, so all ranks get the same number of batches and every pair
        appears exactly once per epoch across ranks (``drop_last`` drops an incomplete final
        round). With ``shuffle``, rounds are shuffled and the most expensive one comes first.
        """
        indices, offsets = self._store.plan(
            batch_size=batch_size,
            max_tokens=max_tokens,
            shuffle=bool(shuffle),
            seed=seed,
            epoch=epoch,
            group_by_length=bool(group_by_length),
            drop_last=bool(drop_last),
            rank=rank,
            world_size=world_size,
            group_batches=group_batches,
            layout=layout,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            truncation=truncation,
            pad_to_multiple_of=pad_to_multiple_of,
            pack_length=pack_length,
        )
        return BatchPlan(indices, offsets)

    def stats(
        self,
        batch_size: int = 64,
        *,
        max_length: int | None = 1024,
        max_prompt_length: int | None = None,
        pack_length: int | None = None,
        group_by_length: bool = True,
        seed: int = 0,
        percentiles: Sequence[float] = (5, 50, 95, 99, 100),
    ) -> dict[str, Any]:
        """Pairs, tokens, length percentiles and the padding fraction of each layout.

        Padding fractions are measured by planning one epoch at ``batch_size`` pairs per batch
        (shuffled with ``seed``; grouped by length when ``group_by_length``) and sizing every
        batch as :meth:`collate` would build it.
        """
        lens = self.lengths()
        out: dict[str, Any] = {"pairs": len(self), "tokens": {}, "lengths": {}, "padding": {}}
        for name, arr in zip(_COLUMNS, lens, strict=True):
            out["tokens"][name] = int(arr.sum())
            if len(arr):
                pct = np.percentile(arr, percentiles)
                out["lengths"][name] = {"mean": float(arr.mean())} | {
                    f"p{p:g}": float(v) for p, v in zip(percentiles, pct, strict=True)
                }
        if len(self) == 0:
            return out
        opts = dict(max_length=max_length, max_prompt_length=max_prompt_length)
        for layout in LAYOUTS:
            plan = self.batches(
                batch_size,
                seed=seed,
                group_by_length=group_by_length,
                layout=layout,
                pack_length=pack_length,
                **opts,
            )
            real, slots = self._store.layout_tokens(
                plan.indices,
                plan.offsets,
                layout=layout,
                truncation="keep_end",
                pad_to_multiple_of=None,
                pack_length=pack_length,
                **opts,
            )
            out["padding"][layout] = {
                "tokens": int(real),
                "slots": int(slots),
                "fraction": 1.0 - real / slots if slots else 0.0,
            }
        return out

    def sampler(self, **kwargs: Any) -> PreferenceBatchSampler:
        """A :class:`PreferenceBatchSampler` over this dataset (keywords as :meth:`batches`)."""
        return PreferenceBatchSampler(self, **kwargs)

    def collator(self, **kwargs: Any) -> PreferenceCollator:
        """A :class:`PreferenceCollator` over this dataset (keywords as :meth:`collate`)."""
        return PreferenceCollator(self, **kwargs)


def _header_crc(meta: Mapping[str, Any]) -> int:
    body = {k: v for k, v in meta.items() if k != "header_crc32"}
    blob = np.frombuffer(json.dumps(body, sort_keys=True).encode(), dtype=np.uint8)
    return int(_rlox.crc32(blob)) if blob.size else 0


def _resident_file_bytes() -> int | None:
    """File-backed resident memory of this process (Linux), else None."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"RssFile:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _load_mapped(path: str) -> PreferenceDataset:
    return PreferenceDataset.load(path, mmap=True)


def _from_arrays(*arrays: np.ndarray) -> PreferenceDataset:
    return PreferenceDataset(_rlox.PairStore(*arrays))


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
        self.epoch = _int_option("epoch", epoch, allow_none=False)

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
            indices = _indices(items, len(self.dataset))
        return self.dataset.collate(indices, **self.kwargs)
