"""How a memory-mapped store is read: :class:`MappedStore`.

- The access mode (``"mmap"``: through the map, advised for random access; ``"direct"``:
  positioned ``O_DIRECT`` reads of each batch's runs, in Rust) and the ``"auto"`` rule (direct
  for a *large* store: token files over half the available memory).
- The resident bound: mapped pages are dropped whenever the process's file-backed resident
  memory has grown by more than ``max_resident`` bytes since loading.
- Read-ahead for whole-store passes (:meth:`MappedStore.scan`).
"""

from __future__ import annotations

import contextlib
import mmap as mmap_module
from collections.abc import Iterator, Sequence

import numpy as np

from rlox import _rlox

__all__ = ["ACCESS", "AUTO_RESIDENT", "MappedStore"]

AUTO_RESIDENT = 256 << 20
"""The resident bound ``max_resident="auto"`` gives a large store (bytes)."""

ACCESS = ("auto", "mmap", "direct")

_CHECK_EVERY = 8
"""Collations between two reads of the resident size."""


class MappedStore:
    """The maps of a store's files and how collation reads them.

    Args:
        store: the ``PairStore`` whose parts view ``maps``.
        maps: one read-only ``np.memmap`` per store file.
        access: ``"auto"``, ``"mmap"`` or ``"direct"``.
        max_resident: bytes, ``"auto"`` or None (see ``PreferenceDataset.load``).
    """

    def __init__(
        self,
        store: _rlox.PairStore,
        maps: Sequence[np.memmap],
        *,
        access: str = "auto",
        max_resident: int | str | None = "auto",
    ) -> None:
        if access not in ACCESS:
            raise ValueError(f"access: expected one of {ACCESS}, got {access!r}")
        self.store = store
        self.mmaps = [m for r in maps if (m := getattr(r, "_mmap", None)) is not None]
        self.files: list[tuple[str, int, int]] = []
        large = is_large(maps)
        store.prefetch = True
        if access == "direct" or (access == "auto" and large):
            files = [(str(m.filename), int(m.ctypes.data), int(m.nbytes)) for m in maps]
            self.use_direct(files, required=access == "direct")
        if max_resident == "auto":
            max_resident = AUTO_RESIDENT if large else None
        self.max_resident = max_resident
        if max_resident is not None:
            self.release()  # pages read by verify do not count against the budget
        self.base_resident = resident_file_bytes() or 0
        self._calls = 0

    @classmethod
    def joined(cls, store: _rlox.PairStore, parts: Sequence[MappedStore]) -> MappedStore:
        """The maps of ``parts`` serving ``store``, their concatenation (direct if any was)."""
        out = cls.__new__(cls)
        out.store, out.files = store, []
        out.mmaps = [m for p in parts for m in p.mmaps]
        bounds = [p.max_resident for p in parts if p.max_resident is not None]
        out.max_resident = min(bounds) if bounds else None
        out.base_resident = resident_file_bytes() or 0
        out._calls = 0
        store.prefetch = True
        if any(p.files for p in parts):
            out.use_direct([f for p in parts for f in p.files], required=True)
        return out

    @property
    def access(self) -> str:
        return "direct" if self.store.direct else "mmap"

    def use_direct(self, files: list[tuple[str, int, int]], *, required: bool) -> None:
        """Read batches with direct reads of ``files``; where the file system refuses, raise
        (``required``) or keep the map."""
        if not files:
            return
        try:
            self.store.read_direct(files)
        except ValueError:
            if required:
                raise
        else:
            self.files = files

    @contextlib.contextmanager
    def scan(self) -> Iterator[None]:
        """Read-ahead on for a pass over the whole store, then back to random access."""
        for m in self.mmaps:
            m.madvise(mmap_module.MADV_SEQUENTIAL)
        try:
            yield
        finally:
            for m in self.mmaps:
                m.madvise(mmap_module.MADV_RANDOM)

    def release(self) -> None:
        """Drop this process's mapped pages (they stay in the OS page cache)."""
        for m in self.mmaps:
            m.madvise(mmap_module.MADV_DONTNEED)

    def collated(self) -> None:
        """Count one collation; every few, drop the pages if over the resident bound."""
        if self.max_resident is None:
            return
        self._calls += 1
        if self._calls % _CHECK_EVERY:
            return
        now = resident_file_bytes()
        if now is not None and now - self.base_resident > self.max_resident:
            self.release()


def resident_file_bytes() -> int | None:
    """File-backed resident memory of this process (Linux), else None."""
    return _proc_field("/proc/self/status", b"RssFile:")


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (Linux), else None."""
    return _proc_field("/proc/meminfo", b"MemAvailable:")


def is_large(maps: Sequence[np.memmap]) -> bool:
    """Whether mapped files exceed half the available memory (never where that is unknown)."""
    available = available_memory()
    return available is not None and 2 * sum(int(m.nbytes) for m in maps) > available


def _proc_field(path: str, key: bytes) -> int | None:
    try:
        with open(path, "rb") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
