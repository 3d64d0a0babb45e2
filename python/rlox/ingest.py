"""Streaming ingestion: records in, store parts out, in bounded memory.

Inputs are read in batches of records, in a fixed order: a ``.jsonl`` / ``.parquet`` path, a glob
(sorted), a list of those, a ``pyarrow.Table``, a ``datasets.Dataset`` or a ``DatasetDict`` (with
``split``: a name or a list of names, in that order), or a list of records. The records form one
sequence; ``shard=(i, n)`` takes its i-th of n contiguous slices (record counts come from Parquet
metadata and a line count of each JSONL file), so n processes writing one shard each build the
same pairs, in the same order, as one process.

:func:`ingest_text` tokenizes each batch (:func:`rlox.text.tokenize_preferences`) and appends it
to a :class:`~rlox.store_writer.StoreWriter`; :func:`ingest_arrow` does the same for batches of
token-id columns.
"""

from __future__ import annotations

import glob
import os
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
from tqdm.auto import tqdm

from rlox.columns import arrow_columns
from rlox.store_writer import DEFAULT_PART_TOKENS, StoreWriter, finish_shards, shard_name
from rlox.text import jsonl_records, tokenize_preferences

__all__ = [
    "count_records",
    "expand_inputs",
    "ingest_arrow",
    "ingest_text",
    "record_batches",
    "tokenize_batches",
]

_SUFFIXES = (".jsonl", ".parquet")


def expand_inputs(source: Any, split: str | Sequence[str] | None = None) -> list[Any]:
    """The inputs of ``source`` in reading order: paths (globs expanded, sorted), tables,
    datasets (a ``DatasetDict`` gives its ``split`` entries), or one list of records."""
    datasets = sys.modules.get("datasets")
    if datasets is not None and isinstance(source, (datasets.DatasetDict, dict)) and split:
        names = [split] if isinstance(split, str) else list(split)
        missing = [n for n in names if n not in source]
        if missing:
            raise ValueError(f"split: {missing} not in the dataset's splits {list(source)}")
        return [source[n] for n in names]
    if datasets is not None and isinstance(source, datasets.DatasetDict):
        raise ValueError(f"split: name the split(s) to read from {list(source)}")
    if isinstance(source, (str, os.PathLike)):
        return _paths(source)
    if isinstance(source, (list, tuple)) and source and isinstance(source[0], (str, os.PathLike)):
        return [p for s in source for p in _paths(s)]
    return [source]


def _paths(source: str | os.PathLike[str]) -> list[Path]:
    text = os.fspath(source)
    if glob.has_magic(text):
        found = sorted(Path(p) for p in glob.glob(os.path.expanduser(text)))
        if not found:
            raise ValueError(f"records_or_path: no file matches {text!r}")
        paths = found
    else:
        paths = [Path(text).expanduser()]
    for p in paths:
        if p.suffix.lower() not in _SUFFIXES:
            raise ValueError(
                f"records_or_path: unsupported file suffix {p.suffix!r} ({p}); expected .jsonl or "
                ".parquet"
            )
        if not p.is_file():
            raise ValueError(f"records_or_path: {p} not found")
    return paths


def count_records(item: Any) -> int:
    """Records in one input of :func:`expand_inputs` (non-blank lines for JSONL)."""
    if isinstance(item, Path):
        if item.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            return int(pq.ParquetFile(item).metadata.num_rows)
        with open(item, "rb") as f:
            return sum(1 for line in f if line.strip())
    if isinstance(item, (pa.Table, pa.RecordBatch)):
        return int(item.num_rows)
    return len(item)


def _slices(item: Any, start: int, stop: int | None, batch: int) -> Iterator[Any]:
    """Records ``[start, stop)`` of one input (``stop=None``: to its end), ``batch`` at a time."""
    jsonl = isinstance(item, Path) and item.suffix.lower() == ".jsonl"
    if stop is None and not jsonl:
        stop = count_records(item)  # metadata or len(): no read
    if jsonl:
        rows: list[Any] = []
        for row in jsonl_records(item, start, stop):
            rows.append(row)
            if len(rows) == batch:
                yield rows
                rows = []
        if rows:
            yield rows
        return
    if isinstance(item, Path):
        yield from _parquet_slices(item, start, stop, batch)
        return
    datasets = sys.modules.get("datasets")
    for first in range(start, stop, batch):
        last = min(first + batch, stop)
        if datasets is not None and isinstance(item, datasets.Dataset):
            yield item.with_format("arrow")[first:last]
        elif isinstance(item, (pa.Table, pa.RecordBatch)):
            yield item.slice(first, last - first)
        else:
            yield item[first:last]


def _parquet_slices(path: Path, start: int, stop: int, batch: int) -> Iterator[pa.Table]:
    """Records ``[start, stop)`` of a Parquet file, decoded ``batch`` rows at a time (never a
    whole row group at once)."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    meta = pf.metadata
    row = 0
    for g in range(meta.num_row_groups):
        rows = meta.row_group(g).num_rows
        if row < stop and start < row + rows:
            for piece in pf.iter_batches(batch_size=batch, row_groups=[g]):
                lo, hi = max(start, row), min(stop, row + piece.num_rows)
                if lo < hi:
                    yield pa.Table.from_batches([piece.slice(lo - row, hi - lo)])
                row += piece.num_rows
                if row >= stop:
                    return
        else:
            row += rows


def record_batches(
    inputs: Sequence[Any],
    start: int = 0,
    stop: int | None = None,
    batch: int = 16384,
    counts: Sequence[int] | None = None,
) -> Iterator[Any]:
    """Batches of records ``[start, stop)`` of the inputs read as one sequence (``counts``: the
    inputs' :func:`count_records`, when already known)."""
    base = 0
    for k, item in enumerate(inputs):
        if counts is None and start <= base and stop is None:
            # All of this input and of every later one: no count needed (for JSONL a full read).
            yield from _slices(item, 0, None, batch)
            continue
        n = count_records(item) if counts is None else counts[k]
        end = base + n if stop is None else min(base + n, stop)
        lo = max(start, base)
        if lo < end:
            yield from _slices(item, lo - base, end - base, batch)
        base += n
        if stop is not None and base >= stop:
            return


def _shard_range(total: int, shard: tuple[int, int] | None) -> tuple[int, int]:
    if shard is None:
        return 0, total
    index, count = shard
    if not (isinstance(index, int) and isinstance(count, int) and 0 <= index < count):
        raise ValueError(f"shard: expected (index, count) with 0 <= index < count, got {shard!r}")
    return total * index // count, total * (index + 1) // count


def _target(out: str | os.PathLike[str], shard: tuple[int, int] | None) -> Path:
    out = Path(out)
    return out if shard is None else out / shard_name(*shard)


def tokenize_batches(chunks: Iterable[Any], tokenizer: Any, **kwargs: Any) -> Iterator[Any]:
    """:func:`~rlox.text.tokenize_preferences` of each batch of records; one warning at the end
    counts the prompts that were not a token prefix in all batches."""
    non_prefix = 0
    for chunk in chunks:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            t = tokenize_preferences(chunk, tokenizer, **kwargs)
        non_prefix += t.non_prefix_prompts
        yield t
    if non_prefix:
        warnings.warn(
            f"{non_prefix} prompts are not a token prefix of prompt + completion (the tokenizer "
            "merges across the boundary); their completions were tokenized on their own",
            UserWarning,
            stacklevel=3,
        )


def ingest_text(
    source: Any,
    tokenizer: Any,
    out: str | os.PathLike[str],
    *,
    split: str | Sequence[str] | None = None,
    shard: tuple[int, int] | None = None,
    resume: bool = False,
    part_tokens: int = DEFAULT_PART_TOKENS,
    records_per_batch: int = 16384,
    show_progress: bool = False,
    **tokenize_kwargs: Any,
) -> Path:
    """Tokenize ``source`` into the store at ``out`` (``out/shard-IIIII-of-NNNNN`` with
    ``shard``), ``records_per_batch`` records at a time; returns the store's directory.

    With ``shard``, the last shard to finish also writes ``out``'s header, so ``out`` opens as
    the whole store. Keywords go to :func:`~rlox.text.tokenize_preferences`.
    """
    inputs = expand_inputs(source, split)
    counts = [count_records(i) for i in inputs]
    lo, hi = _shard_range(sum(counts), shard)
    writer = StoreWriter(_target(out, shard), part_tokens=part_tokens, resume=resume)
    if not writer.complete:
        chunks = record_batches(inputs, lo + writer.records, hi, records_per_batch, counts)
        with tqdm(
            total=hi - lo, initial=writer.records, unit="pair", disable=not show_progress
        ) as bar:
            for t in tokenize_batches(chunks, tokenizer, **tokenize_kwargs):
                writer.append(*t.arrays(), records=t.num_pairs)
                bar.update(t.num_pairs)
    path = writer.close()
    if shard is not None:
        finish_shards(out)
    return path


def ingest_arrow(
    batches: Iterable[Any],
    out: str | os.PathLike[str],
    *,
    columns: Sequence[str] = ("prompt_ids", "chosen_ids", "rejected_ids"),
    resume: bool = False,
    part_tokens: int = DEFAULT_PART_TOKENS,
    vocab_size: int | None = None,
) -> Path:
    """Append batches of token-id columns (``pyarrow`` tables / record batches, ``datasets``
    slices) to the store at ``out``; on ``resume``, the rows already committed are skipped."""
    writer = StoreWriter(out, part_tokens=part_tokens, resume=resume, vocab_size=vocab_size)
    skip = writer.records
    for batch in batches if not writer.complete else ():
        rows = count_records(batch)
        if skip >= rows:
            skip -= rows
            continue
        if skip:
            batch, skip = batch.slice(skip), 0
        arrays, mapping = arrow_columns(batch, columns)
        if mapping is not None:
            raise ValueError("batches: a datasets.Dataset with an index mapping; flatten_indices()")
        writer.append(*arrays, records=len(arrays[1]) - 1)
    return writer.close()
