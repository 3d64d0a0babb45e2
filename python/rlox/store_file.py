"""The on-disk preference store: ``tokens.bin`` plus its ``rlox_store.json`` header.

Version 1, a single store: ``tokens.bin`` holds the six arrays of a ``PairStore`` (int32 values,
int64 offsets), each section 64-byte aligned with a CRC-32; the header lists the sections and
carries a CRC-32 of its own.

Version 2, a store of parts: the header lists sub-directories (each a store of either version,
offsets from 0 in each) and their pair counts; the parts read in order are one store. Streamed
ingestion and sharded preparation write this form (:mod:`rlox.store_writer`). A directory of
``shard-IIIII-of-NNNNN`` stores without a header opens as its shards in order once all are
complete.

:func:`write_store` and :func:`read_store` back ``PreferenceDataset.save`` and ``.load``.
"""

from __future__ import annotations

import json
import mmap as mmap_module
import os
import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rlox import __version__, _rlox
from rlox.columns import ARRAY_NAMES

__all__ = [
    "DATA_FILE",
    "JOURNAL_FILE",
    "META_FILE",
    "PARTS_VERSION",
    "STORE_FORMAT",
    "STORE_VERSION",
    "read_store",
    "write_parts_header",
    "write_store",
]

STORE_FORMAT = "rlox-preference-store"
STORE_VERSION = 1
PARTS_VERSION = 2
META_FILE = "rlox_store.json"
DATA_FILE = "tokens.bin"
JOURNAL_FILE = "rlox_ingest.json"
SHARD_PATTERN = re.compile(r"shard-(\d{5})-of-(\d{5})")


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


def write_parts_header(path: Path, parts: list[tuple[str, int]], **extra: Any) -> None:
    """Write the version-2 header of directory ``path``: its ``(sub-directory, pairs)`` parts in
    order (and ``extra`` keys), under a temporary name, then renamed into place."""
    meta: dict[str, Any] = {
        "format": STORE_FORMAT,
        "version": PARTS_VERSION,
        "rlox_version": __version__,
        "num_pairs": sum(n for _, n in parts),
        "parts": [{"path": name, "num_pairs": n} for name, n in parts],
    } | extra
    meta["header_crc32"] = _header_crc(meta)
    tmp = path / f".{META_FILE}.{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, path / META_FILE)
    finally:
        tmp.unlink(missing_ok=True)


def read_store(
    path: Path, *, mmap: bool, verify: bool | None
) -> tuple[_rlox.PairStore, list[np.ndarray]]:
    """The store in directory ``path`` and the ``(bytes,)`` uint8 buffers its arrays view (one per
    part).

    With ``mmap`` each buffer is a read-only ``np.memmap`` whose token sections are advised for
    random access (no read-around beyond the pages a span covers). ``verify`` checks every
    section's CRC-32 (None: only when not ``mmap``). Raises ``ValueError`` naming ``path`` on any
    damage, and on an unfinished ingestion or an incomplete set of shards.
    """
    meta = _read_header(path)
    if meta is None:
        shards = _complete_shards(path)
        stores, raws = _read_parts(path, [(name, None) for name in shards], mmap, verify)
        return _rlox.PairStore.concat(stores), raws
    if meta.get("version") == PARTS_VERSION:
        parts = [(p["path"], p["num_pairs"]) for p in meta["parts"]]
        stores, raws = _read_parts(path, parts, mmap, verify)
        store = _rlox.PairStore.concat(stores)
        if len(store) != meta["num_pairs"]:
            raise ValueError(f"path: {path / META_FILE} is corrupted (pair count mismatch)")
        return store, raws
    store, raw = _read_single(path, meta, mmap, verify)
    return store, [raw]


def _read_header(path: Path) -> dict[str, Any] | None:
    """The checked header of ``path``, or None for a directory of shards without one."""
    meta_file = path / META_FILE
    if not meta_file.is_file():
        if (path / JOURNAL_FILE).is_file():
            raise ValueError(
                f"path: {path} is an unfinished ingestion ({JOURNAL_FILE} present, no "
                f"{META_FILE}); rerun it with resume=True to complete it"
            )
        if path.is_dir() and any(SHARD_PATTERN.fullmatch(p.name) for p in path.iterdir()):
            return None
        raise ValueError(f"path: {path} is not an rlox store ({META_FILE} missing)")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"path: {meta_file} is corrupted ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != STORE_FORMAT:
        raise ValueError(f"path: {meta_file} is not an rlox store header")
    if meta.get("version") not in (STORE_VERSION, PARTS_VERSION):
        raise ValueError(
            f"path: store format version {meta.get('version')} is not supported "
            f"(this rlox reads versions {STORE_VERSION} and {PARTS_VERSION})"
        )
    if meta.get("header_crc32") != _header_crc(meta):
        raise ValueError(f"path: {meta_file} is corrupted (header checksum mismatch)")
    return meta


def _complete_shards(path: Path) -> list[str]:
    """The ``shard-IIIII-of-NNNNN`` sub-directories of ``path`` in order, all N complete."""
    found = {m.group(0): m for p in path.iterdir() if (m := SHARD_PATTERN.fullmatch(p.name))}
    counts = {int(m.group(2)) for m in found.values()}
    if len(counts) != 1:
        raise ValueError(f"path: {path} mixes shard counts {sorted(counts)}")
    n = counts.pop()
    names = [f"shard-{i:05d}-of-{n:05d}" for i in range(n)]
    missing = [i for i, name in enumerate(names) if not (path / name / META_FILE).is_file()]
    if missing:
        raise ValueError(
            f"path: {path} is a store of {n} shards; shard(s) {missing[:8]} are missing or unfinished"
        )
    return names


def _read_parts(
    path: Path, parts: list[tuple[str, int | None]], mmap: bool, verify: bool | None
) -> tuple[list[_rlox.PairStore], list[np.ndarray]]:
    stores, raws = [], []
    for name, count in parts:
        sub = (path / name).resolve()
        if not sub.is_relative_to(path.resolve()) or sub == path.resolve():
            raise ValueError(f"path: {path / META_FILE} lists part {name!r} outside the store")
        store, part_raws = read_store(sub, mmap=mmap, verify=verify)
        if count is not None and len(store) != count:
            raise ValueError(f"path: part {name} of {path} holds {len(store)} pairs, not {count}")
        stores.append(store)
        raws.extend(part_raws)
    return stores, raws


def _read_single(
    path: Path, meta: dict[str, Any], mmap: bool, verify: bool | None
) -> tuple[_rlox.PairStore, np.ndarray]:
    meta_file = path / META_FILE
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
    if mmap and size:
        _advise_random(raw)
    store = _rlox.PairStore(*arrays)
    if len(store) != meta["num_pairs"]:
        raise ValueError(f"path: {meta_file} is corrupted (pair count mismatch)")
    return store, raw


def _advise_random(raw: np.ndarray) -> None:
    """Turn off the kernel's read-around for a mapped store file: a random token span then reads
    only its own pages. Scans of all offsets ask for exactly their pages first (Rust)."""
    mapping = getattr(raw, "_mmap", None)
    if mapping is not None and hasattr(mmap_module, "MADV_RANDOM"):
        mapping.madvise(mmap_module.MADV_RANDOM)


def _header_crc(meta: Mapping[str, Any]) -> int:
    body = {k: v for k, v in meta.items() if k != "header_crc32"}
    blob = np.frombuffer(json.dumps(body, sort_keys=True).encode(), dtype=np.uint8)
    return int(_rlox.crc32(blob)) if blob.size else 0
