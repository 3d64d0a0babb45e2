"""Manifests that mark a saved directory complete and let it be verified before loading.

``manifest.json`` lists the directory's files with their sizes and CRC-32 checksums::

    {"format": "rlox-manifest", "algorithm": "crc32",
     "files": {"model.safetensors": {"size": 123, "crc32": 456}, ...},
     "checksum": 789}

``checksum`` is the CRC-32 of the canonical JSON (sorted keys, no spaces) of ``algorithm`` and
``files``, so a damaged manifest is detected too. It is written after every file it lists, and
each file's checksum is taken right after the file is written, while its pages are still cached:
saving never reads a file back from disk. Checksums are computed in Rust (``rlox._rlox.crc32``,
all cores, GIL released) over a read-only memory map of the file.

Verifying checks all sizes first (cheap, and catches truncation), then all checksums (one read of
each file, which leaves it in the page cache for the load that follows).
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from rlox import _rlox

__all__ = ["ALGORITHM", "MANIFEST", "ManifestWriter", "file_crc32", "manifest_problem"]

MANIFEST = "manifest.json"
ALGORITHM = "crc32"
_FORMAT = "rlox-manifest"


def file_crc32(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(size, crc32)`` of the file at ``path`` (CRC-32 of its bytes, 0 for an empty file)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return 0, 0
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
            data = np.frombuffer(view, dtype=np.uint8)
            try:
                return size, int(_rlox.crc32(data))
            finally:
                del data  # the map cannot close while an array still points into it


def _canonical_crc(algorithm: Any, files: Any) -> int:
    blob = json.dumps(
        {"algorithm": algorithm, "files": files}, sort_keys=True, separators=(",", ":")
    )
    return int(_rlox.crc32(np.frombuffer(blob.encode(), dtype=np.uint8)))


class ManifestWriter:
    """Collects the size and checksum of each file of ``directory`` as it is written.

    Call :meth:`add` right after writing each file, and :meth:`write` after the last one.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.files: dict[str, dict[str, int]] = {}

    def add(self, name: str) -> None:
        """Record the file ``name`` of the directory (just written, so read from the cache)."""
        size, crc = file_crc32(self.directory / name)
        self.files[name] = {"size": size, ALGORITHM: crc}

    def write(self) -> Path:
        """Write ``manifest.json`` listing the recorded files; return its path."""
        files = dict(sorted(self.files.items()))
        body = {
            "format": _FORMAT,
            "algorithm": ALGORITHM,
            "files": files,
            "checksum": _canonical_crc(ALGORITHM, files),
        }
        path = self.directory / MANIFEST
        path.write_text(json.dumps(body, indent=1))
        return path


def _read_manifest(directory: Path) -> tuple[dict[str, dict[str, int]] | None, str | None]:
    """The manifest's files, or None and why the manifest cannot be used."""
    path = directory / MANIFEST
    if not path.is_file():
        return None, (
            f"not a complete rlox checkpoint ({MANIFEST} missing: the write was interrupted, or "
            "it was written before rlox checkpoints had manifests, and cannot be verified)"
        )
    try:
        body = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        return None, f"{MANIFEST} is unreadable ({type(e).__name__}: {e})"
    if not isinstance(body, dict) or body.get("format") != _FORMAT:
        return None, f"{MANIFEST} is not an rlox manifest"
    algorithm, files = body.get("algorithm"), body.get("files")
    if algorithm != ALGORITHM:
        return None, f"{MANIFEST} uses checksum algorithm {algorithm!r}, expected {ALGORITHM!r}"
    if body.get("checksum") != _canonical_crc(algorithm, files):
        return None, f"{MANIFEST} is damaged (its own checksum does not match)"
    if not isinstance(files, dict):
        return None, f"{MANIFEST} is damaged (no file list)"
    for name, entry in files.items():
        plain = name not in ("", ".", "..") and os.path.basename(name) == name
        if not plain or not isinstance(entry, dict):
            return None, f"{MANIFEST} is damaged (bad entry {name!r})"
        if not all(isinstance(entry.get(k), int) for k in ("size", ALGORITHM)):
            return None, f"{MANIFEST} is damaged (entry {name!r} lacks a size or checksum)"
    return files, None


def manifest_problem(directory: str | os.PathLike[str], required: Iterable[str] = ()) -> str | None:
    """Why ``directory`` fails verification against its manifest, or None when it verifies.

    Fails when the manifest is missing, unreadable or damaged, lacks a file of ``required``, or a
    listed file is missing, has another size (all sizes are checked before any checksum) or
    another checksum. The reason names the file.
    """
    directory = Path(directory)
    files, problem = _read_manifest(directory)
    if files is None:
        return problem
    for name in required:
        if name not in files:
            return f"{name} is not listed in {MANIFEST}"
    for name, entry in files.items():
        try:
            size = (directory / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if size != entry["size"]:
            return f"{name} has {size} bytes, {MANIFEST} records {entry['size']} (truncated?)"
    for name, entry in files.items():
        try:
            _, crc = file_crc32(directory / name)
        except OSError as e:
            return f"{name} is unreadable ({type(e).__name__}: {e})"
        if crc != entry[ALGORITHM]:
            return f"{name} does not match its {ALGORITHM} checksum in {MANIFEST} (damaged)"
    return None
