"""Preference data: a Rust-backed ragged store of (prompt, chosen, rejected) token pairs.

Each column is stored Arrow style as flat token ids plus ``n + 1`` offsets. The store can be built
from Python lists, numpy arrays or Arrow / Hugging Face ``datasets`` columns (without copying where
the layout allows; inputs are converted in :mod:`rlox.columns`), or tokenized from text; saved to a
directory and memory-mapped back in O(1); collated in Rust into a :class:`~rlox.batch.PairBatch`
(``padded``, ``packed`` or ``prefix_shared``, sharing one log-prob gather plan); and split into
length-grouped, deterministic, rank-sharded batches.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from rlox import _rlox
from rlox.batch import LAYOUTS, PairBatch, batch_from_arrays, dense_attention_mask
from rlox.columns import ARRAY_NAMES, COLUMNS, array_columns, arrow_columns, list_columns
from rlox.indices import BatchPlan, PairIndices, PairLengths, index_array, int_option
from rlox.mapped import ACCESS, MappedStore
from rlox.store_file import DATA_FILE as DATA_FILE
from rlox.store_file import META_FILE as META_FILE
from rlox.store_file import STORE_FORMAT as STORE_FORMAT
from rlox.store_file import STORE_VERSION as STORE_VERSION
from rlox.store_file import read_store, write_store

"""The default bound (bytes) on a mapped store's file-backed resident growth."""

if TYPE_CHECKING:
    from rlox.loader import PreferenceBatchSampler, PreferenceCollator

__all__ = [
    "LAYOUTS",
    "BatchPlan",
    "PairBatch",
    "PairLengths",
    "PreferenceDataset",
    "dense_attention_mask",
]


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
        self._mapped: MappedStore | None = None
        self._parts = [dict(zip(ARRAY_NAMES, a, strict=True)) for a in store.parts()]
        self._starts = store.starts()
        self.dropped: dict[str, int] = {}
        """Pairs removed by the :meth:`filter` / :meth:`deduplicate` that made this dataset."""
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
        out: str | os.PathLike[str] | None = None,
        resume: bool = False,
        part_tokens: int | None = None,
    ) -> PreferenceDataset:
        """Build from a ``pyarrow.Table``/``RecordBatch``, a ``datasets.Dataset`` or a mapping of
        Arrow arrays, reading the ``list<int>`` columns named by ``columns`` (prompt, chosen,
        rejected) in place when each is a single chunk. A ``datasets.Dataset`` with an index
        mapping (after ``select``/``shuffle``) is gathered through that mapping.

        With ``out``, ``data`` may also be an iterator of record batches (e.g.
        ``pyarrow.parquet.ParquetFile.iter_batches``): they are appended to an on-disk store in
        ``out`` part by part (see :mod:`rlox.store_writer`; memory bounded by ``part_tokens``),
        ``resume`` continues an interrupted run, and the store is returned memory-mapped.
        """
        if out is not None:
            from rlox.ingest import ingest_arrow

            single = isinstance(data, (pa.Table, pa.RecordBatch)) or hasattr(data, "column_names")
            path = ingest_arrow(
                [data] if single else data,
                out,
                columns=columns,
                resume=resume,
                vocab_size=vocab_size,
                **_part_tokens(part_tokens),
            )
            return cls.load(path)
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
    def from_text(
        cls,
        records_or_path: Any,
        tokenizer: Any,
        *,
        out: str | os.PathLike[str] | None = None,
        split: str | Sequence[str] | None = None,
        shard: tuple[int, int] | None = None,
        resume: bool = False,
        part_tokens: int | None = None,
        **kwargs: Any,
    ) -> PreferenceDataset:
        """Tokenize preference text (see :func:`rlox.text.tokenize_preferences`) into a store.

        ``records_or_path`` may also be a glob or a list of ``.jsonl``/``.parquet`` files, or a
        ``DatasetDict`` with ``split`` (a name or a list), read as one sequence of records.

        With ``out``, records are tokenized batch by batch and streamed to an on-disk store in
        directory ``out`` (memory bounded by ``part_tokens``, whatever the dataset's size), which
        is returned memory-mapped; ``resume=True`` continues an interrupted run from its last
        committed part. ``shard=(i, n)`` tokenizes only the i-th of n contiguous slices of the
        records into ``out/shard-IIIII-of-NNNNN`` and returns that shard; once all n shards are
        written (by any processes or machines), ``out`` loads as the whole store, the same pairs
        as one process would build.
        """
        from rlox.ingest import expand_inputs, ingest_text, record_batches, tokenize_batches

        if out is not None or shard is not None:
            if out is None:
                raise ValueError("out: shard= writes to disk; give the store's directory")
            path = ingest_text(
                records_or_path,
                tokenizer,
                out,
                split=split,
                shard=shard,
                resume=resume,
                **_part_tokens(part_tokens),
                **kwargs,
            )
            return cls.load(path)
        inputs = expand_inputs(records_or_path, split)
        if len(inputs) == 1:
            from rlox.text import tokenize_preferences

            return cls.from_arrays(*tokenize_preferences(inputs[0], tokenizer, **kwargs).arrays())
        chunks = record_batches(inputs, batch=1 << 20)
        stores = [
            _rlox.PairStore(*t.arrays()) for t in tokenize_batches(chunks, tokenizer, **kwargs)
        ]
        store = _rlox.PairStore.concat(stores)
        store.validate(None)
        return cls(store)

    @classmethod
    def concatenate(cls, datasets: Sequence[PreferenceDataset]) -> PreferenceDataset:
        """The pairs of ``datasets`` in order, as one dataset; nothing is copied (memory-mapped
        stores stay mapped)."""
        datasets = list(datasets)
        for k, d in enumerate(datasets):
            if not isinstance(d, PreferenceDataset):
                raise TypeError(
                    f"datasets[{k}]: expected a PreferenceDataset, got {type(d).__name__}"
                )
        out = cls(_rlox.PairStore.concat([d._store for d in datasets]))
        mapped = [d._mapped for d in datasets if d._mapped is not None]
        if mapped:
            out._mapped = MappedStore.joined(out._store, mapped)
        return out

    # ------------------------------------------------------------------ persistence
    # The file format (header, sections, checksums) lives in rlox.store_file.
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the store to directory ``path``: ``tokens.bin`` (int32 values, int64 offsets, each
        section 64-byte aligned with a CRC-32) and ``rlox_store.json``. Files are written under
        temporary names and renamed, so an interrupted save never leaves a readable broken store.
        """
        path = Path(path)
        with self._scan():
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
        max_resident: int | str | None = "auto",
        access: str = "auto",
    ) -> PreferenceDataset:
        """Open a store written by :meth:`save`.

        ``mmap=True`` maps the token file read-only: opening is O(1) and pages are read on use.
        ``verify`` checks every section's CRC-32 (default: only when ``mmap=False``). A missing,
        truncated or corrupted store raises ``ValueError`` naming ``path``.

        A store is *large* when its token files exceed half the memory available at load
        (``MemAvailable``): it cannot be expected to stay in the page cache next to training.

        How :meth:`collate` reads the tokens of a mapped store (``access``):

        - ``"mmap"``: through the map, without the kernel's read-around (a random span reads only
          its own 4 KiB pages). Fastest once the store is in the page cache.
        - ``"direct"``: positioned ``O_DIRECT`` reads of each batch's token runs, in parallel, at
          sector (512 B) granularity, bypassing the page cache: shuffled reads fetch little more
          than the tokens they serve, and no token page is kept resident.
        - ``"auto"`` (default): ``"direct"`` for a large store on a file system that allows direct
          I/O, else ``"mmap"``.

        Mapped pages are clean page cache: they count as resident once read, and the OS reclaims
        them under pressure. With ``max_resident`` (bytes; Linux), :meth:`collate` drops them
        whenever the process's file-backed resident memory has grown by more than that since
        loading (each drop costs refaults: an epoch of a store far above the budget through the
        map collates up to 4x slower). ``"auto"`` (default): 256 MiB for a large store, else no
        bound (the store fits). ``None``: no bound.
        """
        if access not in ACCESS:
            raise ValueError(f"access: expected one of {ACCESS}, got {access!r}")
        if access == "direct" and not mmap:
            raise ValueError("access: 'direct' reads a memory-mapped store; use mmap=True")
        path = Path(path)
        store, raws = read_store(path, mmap=mmap, verify=verify)
        dataset = cls(store, path=path.resolve() if mmap else None)
        dataset._directory = path.resolve()
        if mmap:
            maps = [r for r in raws if isinstance(r, np.memmap)]
            dataset._mapped = MappedStore(store, maps, access=access, max_resident=max_resident)
        return dataset

    @property
    def access(self) -> str:
        """How :meth:`collate` reads tokens: ``"direct"``, ``"mmap"`` or ``"memory"``."""
        return self._mapped.access if self._mapped is not None else "memory"

    def _scan(self) -> contextlib.AbstractContextManager[None]:
        """Read-ahead on for a pass over the whole mapped store."""
        return self._mapped.scan() if self._mapped is not None else contextlib.nullcontext()

    def release_pages(self) -> None:
        """Drop this process's resident pages of a memory-mapped store (they stay in the OS page
        cache, so touching them again is cheap)."""
        if self._mapped is not None:
            self._mapped.release()

    def verify(self) -> None:
        """Check every pair (offsets, non-empty runs, ids >= 0); raises ``ValueError``."""
        with self._scan():
            self._store.validate(None)

    def __reduce__(self) -> tuple[Any, ...]:
        # A memory-mapped store pickles as its path: worker processes map the same file.
        if self._path is not None:
            return (_load_mapped, (str(self._path), self.access))
        parts = [tuple(np.ascontiguousarray(a) for a in p) for p in self._store.parts()]
        return (_from_parts, (parts,))

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
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        part, local = self._parts[k], i - int(self._starts[k])
        for c in COLUMNS:
            off = part[f"{c}_offsets"]
            out[c] = part[f"{c}_values"][off[local] : off[local + 1]]
        return out

    def __getitems__(self, indices: Sequence[int]) -> PairIndices:
        """Batched access for ``torch.utils.data.DataLoader``: defers to the collator."""
        return PairIndices(index_array(indices, len(self)))

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(len(self)):
            yield self[i]

    @property
    def directory(self) -> Path | None:
        """The directory this store was last saved to or loaded from, else None."""
        return self._directory

    def fingerprint(self) -> str:
        """Hex digest of the pairs' token ids, independent of the storage dtype and offset base.

        Hashes the CRC-32 of each column's int64 row lengths and of its ids as int64, in chunks
        (computed in Rust over all parts), so a store and its parts concatenated agree.
        """
        digest = hashlib.sha256(str(len(self)).encode())
        with self._scan():
            checksums = self._store.checksums()
        for crcs in checksums:
            for crc in crcs:
                digest.update(b"%d|" % crc)
        return digest.hexdigest()

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """The six backing arrays (``prompt_values``, ``prompt_offsets``, ...), read-only views.

        ``ValueError`` for a store of several parts (:meth:`select` or :meth:`save` makes one).
        """
        if len(self._parts) != 1:
            raise ValueError(
                f"arrays: this store has {len(self._parts)} parts and no single set of arrays; "
                "select() or save() + load() gives one"
            )
        out = {}
        for k, a in self._parts[0].items():
            v = a.view()
            v.flags.writeable = False
            out[k] = v
        return out

    def lengths(self) -> PairLengths:
        """(n,) int64 token counts of the prompt, chosen and rejected columns."""
        return PairLengths(*self._store.lengths())

    def select(self, indices: Any) -> PreferenceDataset:
        """A new in-memory dataset of the pairs at ``indices`` (in that order, repeats allowed)."""
        return PreferenceDataset(
            _rlox.PairStore(*self._store.take(index_array(indices, len(self))))
        )

    def filter(
        self,
        *,
        min_prompt_length: int | None = None,
        max_prompt_length: int | None = None,
        min_completion_length: int | None = None,
        max_completion_length: int | None = None,
        max_length: int | None = None,
        drop_identical: bool = False,
        out: str | os.PathLike[str] | None = None,
    ) -> PreferenceDataset:
        """The pairs within the length bounds (inclusive, tokens; completion bounds apply to
        both completions, ``max_length`` to prompt + the longer one), and with
        ``drop_identical``, without chosen == rejected ids. Runs in Rust from offsets (tokens
        only for the identical check); the result's :attr:`dropped` counts the pairs removed per
        reason (``prompt_length``, ``completion_length``, ``length``, ``identical``; the first
        that applies). ``out`` writes the result to a store there (bounded memory)."""
        with self._scan():
            kept, counts = self._store.filter(
                min_prompt_length=min_prompt_length,
                max_prompt_length=max_prompt_length,
                min_completion_length=min_completion_length,
                max_completion_length=max_completion_length,
                max_length=max_length,
                drop_identical=bool(drop_identical),
            )
        return self._keep(kept, {k: int(v) for k, v in counts.items()}, out)

    def deduplicate(self, *, out: str | os.PathLike[str] | None = None) -> PreferenceDataset:
        """The first occurrence of every distinct (prompt, chosen, rejected) token triple, in
        order (hashed in Rust, equal hashes compared token by token); :attr:`dropped` holds
        ``{"duplicates": n}``. ``out`` writes the result to a store there."""
        with self._scan():
            kept = self._store.deduplicate()
        return self._keep(kept, None, out)

    def _keep(self, kept: np.ndarray, counts: dict[str, int] | None, out: Any) -> PreferenceDataset:
        if out is None:
            result = self.select(kept)
        else:
            from rlox.store_writer import StoreWriter

            writer = StoreWriter(out)
            with self._scan():
                for start in range(0, len(kept), 1 << 16):
                    writer.append(*self._store.take(kept[start : start + (1 << 16)]))
            result = PreferenceDataset.load(writer.close())
        result.dropped = counts if counts is not None else {"duplicates": len(self) - len(kept)}
        return result

    def shard(self, rank: int, world_size: int, *, contiguous: bool = True) -> PreferenceDataset:
        """Pairs of shard ``rank`` out of ``world_size`` (contiguous blocks or every k-th pair)."""
        world_size = int_option("world_size", world_size, minimum=1, allow_none=False)
        rank = int_option("rank", rank, allow_none=False)
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
            indices = index_array(indices)  # the store counts negative indices from the end
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
        if self._mapped is not None:
            self._mapped.collated()
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
        """A :class:`~rlox.loader.PreferenceBatchSampler` over this dataset (keywords as
        :meth:`batches`)."""
        from rlox.loader import PreferenceBatchSampler

        return PreferenceBatchSampler(self, **kwargs)

    def collator(self, **kwargs: Any) -> PreferenceCollator:
        """A :class:`~rlox.loader.PreferenceCollator` over this dataset (keywords as
        :meth:`collate`)."""
        from rlox.loader import PreferenceCollator

        return PreferenceCollator(self, **kwargs)


def _load_mapped(path: str, access: str = "auto") -> PreferenceDataset:
    return PreferenceDataset.load(path, mmap=True, access=access)


def _part_tokens(part_tokens: int | None) -> dict[str, int]:
    return {} if part_tokens is None else {"part_tokens": part_tokens}


def _from_parts(parts: list[tuple[np.ndarray, ...]]) -> PreferenceDataset:
    return PreferenceDataset(_rlox.PairStore.concat([_rlox.PairStore(*p) for p in parts]))
