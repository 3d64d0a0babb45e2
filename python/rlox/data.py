"""Preference data: a Rust-backed ragged store of (prompt, chosen, rejected) token pairs.

Each column is stored Arrow style as flat token ids plus ``n + 1`` offsets. The store can be built
from Python lists, numpy arrays or Arrow / Hugging Face ``datasets`` columns (without copying where
the layout allows; inputs are converted in :mod:`rlox.columns`), or tokenized from text; saved to a
directory and memory-mapped back in O(1); collated in Rust into a :class:`~rlox.batch.PairBatch`
(``padded``, ``packed`` or ``prefix_shared``, sharing one log-prob gather plan); and split into
length-grouped, deterministic, rank-sharded batches.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from rlox import _rlox
from rlox.batch import LAYOUTS, PairBatch, batch_from_arrays, dense_attention_mask
from rlox.columns import ARRAY_NAMES, COLUMNS, array_columns, arrow_columns, list_columns
from rlox.store_file import DATA_FILE as DATA_FILE
from rlox.store_file import META_FILE as META_FILE
from rlox.store_file import STORE_FORMAT as STORE_FORMAT
from rlox.store_file import STORE_VERSION as STORE_VERSION
from rlox.store_file import read_store, write_store

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
        self._arrays = dict(zip(ARRAY_NAMES, arrays, strict=True))
        self._directory: Path | None = path
        # Per-pair reference log-probs by cache key (see DPO.precompute_reference).
        self._reference_logps: dict[str, Any] = {}

    # ------------------------------------------------------------------ construction
    # Input conversion lives in rlox.columns; each from_* wraps its arrays in a PairStore.
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
        store = _rlox.PairStore(*array_columns(given))
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
        store = _rlox.PairStore(*list_columns(prompt_ids, chosen_ids, rejected_ids))
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
        arrays, mapping = arrow_columns(data, columns)
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
    # The file format (header, sections, checksums) lives in rlox.store_file.
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the store to directory ``path``: ``tokens.bin`` (int32 values, int64 offsets, each
        section 64-byte aligned with a CRC-32) and ``rlox_store.json``. Files are written under
        temporary names and renamed, so an interrupted save never leaves a readable broken store.
        """
        path = Path(path)
        write_store(self._store, path)
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
        store, raw = read_store(path, mmap=mmap, verify=verify)
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
        for c in COLUMNS:
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
        for c in COLUMNS:
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
        ``prompt + chosen + rejected`` per pair, or with ``pack_length`` several such triples
        first-fit into rows of at most ``pack_length`` tokens; rejected positions continue from
        the prompt).

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
        for name, arr in zip(COLUMNS, lens, strict=True):
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
