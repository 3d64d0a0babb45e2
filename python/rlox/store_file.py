"""The on-disk preference store: ``tokens.bin`` plus its ``rlox_store.json`` header.

``tokens.bin`` holds the six arrays of a ``PairStore`` (int32 values, int64 offsets), each section
64-byte aligned with a CRC-32; the header lists the sections and carries a CRC-32 of its own.
:func:`write_store` and :func:`read_store` back ``PreferenceDataset.save`` and ``.load``.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rlox import __version__, _rlox
from rlox.columns import ARRAY_NAMES

__all__ = ["DATA_FILE", "META_FILE", "STORE_FORMAT", "STORE_VERSION", "read_store", "write_store"]

STORE_FORMAT = "rlox-preference-store"
STORE_VERSION = 1
META_FILE = "rlox_store.json"
DATA_FILE = "tokens.bin"


def write_store(store: _rlox.PairStore, path: Path) -> None:
    """Write ``store`` to directory ``path`` under temporary names, then rename both files."""
    path.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp_data, tmp_meta = path / f".{DATA_FILE}.{tag}", path / f".{META_FILE}.{tag}"
    try:
        sections = store.save(str(tmp_data))
        meta: dict[str, Any] = {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "rlox_version": __version__,
            "num_pairs": len(store),
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


def read_store(
    path: Path, *, mmap: bool, verify: bool | None
) -> tuple[_rlox.PairStore, np.ndarray]:
    """The store in directory ``path`` and the ``(bytes,)`` uint8 buffer its arrays view.

    With ``mmap`` the buffer is a read-only ``np.memmap``. ``verify`` checks every section's
    CRC-32 (None: only when not ``mmap``). Raises ``ValueError`` naming ``path`` on any damage.
    """
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
    if set(sections) != set(ARRAY_NAMES):
        raise ValueError(f"path: {meta_file} is corrupted (sections {sorted(sections)})")
    if size == 0:
        raw = np.zeros(0, dtype=np.uint8)
    elif mmap:
        raw = np.memmap(data_file, dtype=np.uint8, mode="r")
    else:
        raw = np.fromfile(data_file, dtype=np.uint8)
    arrays = []
    for name in ARRAY_NAMES:
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
    return store, raw


def _header_crc(meta: Mapping[str, Any]) -> int:
    body = {k: v for k, v in meta.items() if k != "header_crc32"}
    blob = np.frombuffer(json.dumps(body, sort_keys=True).encode(), dtype=np.uint8)
    return int(_rlox.crc32(blob)) if blob.size else 0
