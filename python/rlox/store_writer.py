"""Write a store batch by batch in bounded memory: :class:`StoreWriter`.

Appended pairs collect in memory until they hold ``part_tokens`` token ids; then they are written
as the next part, ``part-NNNNN/`` (a version-1 store with its own checksums, offsets from 0), and
the journal ``rlox_ingest.json`` is replaced to list the part and the number of input records it
completes. :meth:`StoreWriter.close` writes the version-2 header ``rlox_store.json`` listing the
parts and removes the journal. Peak memory is one part, whatever the dataset's size.

Only the header makes the directory a store, and it is written last (under a temporary name,
then renamed), so an interrupted ingestion never looks complete: loading it raises
``ValueError``. ``resume=True`` keeps the parts the journal lists, deletes any later (partly
written) part, and :attr:`StoreWriter.records` tells how many input records are done: the caller
skips that many and appends the rest.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from rlox import _rlox
from rlox.store_file import (
    JOURNAL_FILE,
    META_FILE,
    SHARD_PATTERN,
    write_parts_header,
    write_store,
)

__all__ = ["DEFAULT_PART_TOKENS", "StoreWriter", "finish_shards", "shard_name"]

DEFAULT_PART_TOKENS = 1 << 26
"""Token ids per part (256 MiB as int32): the writer's memory bound."""

_PART = "part-{:05d}"


def shard_name(index: int, count: int) -> str:
    """The sub-directory of shard ``index`` of ``count``: ``shard-00003-of-00008``."""
    return f"shard-{index:05d}-of-{count:05d}"


class StoreWriter:
    """Append pairs to the store in directory ``path``, one part at a time.

    Args:
        path: the store's directory (created).
        part_tokens: token ids (prompt + chosen + rejected) buffered before a part is written.
        resume: continue an unfinished ingestion from its journal (see :attr:`records`); on a
            finished store, :attr:`complete` is True and nothing may be appended. Without it, the
            directory's previous store files (parts, header, journal) are removed first.
        vocab_size: when given, every id is checked to lie in ``[0, vocab_size)``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        part_tokens: int = DEFAULT_PART_TOKENS,
        resume: bool = False,
        vocab_size: int | None = None,
    ) -> None:
        if isinstance(part_tokens, bool) or not isinstance(part_tokens, int) or part_tokens < 1:
            raise ValueError(f"part_tokens: expected a positive int, got {part_tokens!r}")
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"path: {self.path} exists and is not a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        self.part_tokens = part_tokens
        self.vocab_size = vocab_size
        self.parts: list[tuple[str, int]] = []
        self.records = 0
        """Input records completed (committed in parts), across resumes."""
        self.complete = False
        self._buffer: list[_rlox.PairStore] = []
        self._tokens = 0
        self._pending = 0
        if resume:
            self._resume()
        else:
            self._clear()

    def _resume(self) -> None:
        journal = self.path / JOURNAL_FILE
        if (self.path / META_FILE).is_file():
            meta = json.loads((self.path / META_FILE).read_text())
            self.complete = True
            self.records = int(meta.get("records", meta.get("num_pairs", 0)))
            return
        if journal.is_file():
            state = json.loads(journal.read_text())
            self.parts = [(p["path"], int(p["num_pairs"])) for p in state["parts"]]
            self.records = int(state["records"])
        kept = {name for name, _ in self.parts}
        for p in self.path.glob("part-*"):
            if p.name not in kept:
                shutil.rmtree(p)

    def _clear(self) -> None:
        for name in (META_FILE, JOURNAL_FILE):
            (self.path / name).unlink(missing_ok=True)
        for p in self.path.glob("part-*"):
            shutil.rmtree(p)

    @property
    def num_pairs(self) -> int:
        """Pairs committed so far plus those buffered."""
        return sum(n for _, n in self.parts) + sum(len(s) for s in self._buffer)

    def append(self, *arrays: Any, records: int | None = None) -> None:
        """Add pairs: the six arrays of :meth:`PreferenceDataset.from_arrays` (or one
        ``PairStore``), covering ``records`` input records (default: one per pair)."""
        if self.complete:
            raise ValueError(f"path: {self.path} is a finished store; nothing can be appended")
        if len(arrays) == 1 and isinstance(arrays[0], _rlox.PairStore):
            store = arrays[0]
        else:
            store = _rlox.PairStore(*arrays)
        store.validate(self.vocab_size)
        self._buffer.append(store)
        self._pending += len(store) if records is None else int(records)
        self._tokens += int(sum(lens.sum() for lens in store.lengths()))
        if self._tokens >= self.part_tokens:
            self.commit()

    def commit(self) -> None:
        """Write the buffered pairs as the next part and record it in the journal."""
        if self._buffer:
            name = _PART.format(len(self.parts))
            store = _rlox.PairStore.concat(self._buffer)
            write_store(store, self.path / name)
            self.parts.append((name, len(store)))
        self.records += self._pending
        self._buffer, self._tokens, self._pending = [], 0, 0
        state = {
            "parts": [{"path": n, "num_pairs": c} for n, c in self.parts],
            "records": self.records,
        }
        _replace_json(self.path / JOURNAL_FILE, state)

    def close(self) -> Path:
        """Commit what is buffered, write the header that makes the store loadable, remove the
        journal; returns the store's directory."""
        if not self.complete:
            self.commit()
            write_parts_header(self.path, self.parts, records=self.records)
            (self.path / JOURNAL_FILE).unlink(missing_ok=True)
            self.complete = True
        return self.path


def finish_shards(root: str | os.PathLike[str]) -> bool:
    """Write the header of a directory of ``shard-IIIII-of-NNNNN`` stores once all N are finished
    (any shard's process may call it; the header is the same whoever writes it). True if written.
    """
    root = Path(root)
    names = sorted(p.name for p in root.iterdir() if SHARD_PATTERN.fullmatch(p.name))
    if not names:
        return False
    count = int(SHARD_PATTERN.fullmatch(names[0]).group(2))  # type: ignore[union-attr]
    wanted = [shard_name(i, count) for i in range(count)]
    if any(not (root / n / META_FILE).is_file() for n in wanted):
        return False
    parts = []
    records = 0
    for n in wanted:
        meta = json.loads((root / n / META_FILE).read_text())
        parts.append((n, int(meta["num_pairs"])))
        records += int(meta.get("records", meta["num_pairs"]))
    write_parts_header(root, parts, records=records)
    return True


def _replace_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(json.dumps(obj))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
