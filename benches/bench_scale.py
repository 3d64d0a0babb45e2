"""Preference data beyond RAM: streamed build, cold random access, sharded text ingestion.

Usage: python benches/bench_scale.py [--pairs 10000000] [--memory-pairs 1000000]
       [--text-pairs 1000000] [--batches 1000] [--dir DIR] [--keep] [--store DIR]
       [--phases build,access,text] [--modes direct,mmap,normal]

Each phase runs in a fresh process (its own peak RSS) and prints side by side:
1. build: UltraFeedback-like synthetic ids (lognormal lengths, medians 70/170/170, as
   bench_data.py) streamed through ``StoreWriter`` for --pairs pairs, against the in-memory
   path (``from_arrays`` + ``save``) at --memory-pairs: time per pair and peak RSS.
2. access: drop the big store from the page cache (posix_fadvise DONTNEED), open it, plan one
   shuffled epoch of 64-pair batches (this reads the offsets, which then stay cached as in a
   real run), collate --batches batches cold, then the same batches warm. Bytes read from
   storage (/proc/self/io read_bytes) against the token bytes served, resident growth and
   batches/s, for each access mode in --modes: direct reads, the map with random-access hints
   and the resident bound, and the map with the kernel's defaults (the behaviour before hints).
   ``load``'s default ("auto") is printed: direct reads for a store larger than half the
   available memory.
3. text: --text-pairs records over 8 files (4 JSONL, 4 Parquet) tokenized by the in-memory
   ``from_text`` and streamed with ``from_text(out=...)``; pairs/s and whether the ids agree.
Everything written under --dir is removed at the end unless --keep (the big store right after
the access phase); a --store given is reused for the access phase and never removed.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_data import NAMES, evict, make_columns, proc_status, reset_peak  # noqa: E402

from rlox.data import PreferenceDataset  # noqa: E402
from rlox.store_writer import StoreWriter  # noqa: E402

CHUNK = 100_000
MEDIANS = (70, 170)


def read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def store_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("tokens.bin"))


def child_build(out: Path, pairs: int, streamed: bool) -> dict[str, Any]:
    reset_peak()
    t0 = time.perf_counter()
    if streamed:
        writer = StoreWriter(out)
        for k, start in enumerate(range(0, pairs, CHUNK)):
            cols = make_columns(min(CHUNK, pairs - start), *MEDIANS, seed=k)
            writer.append(*(cols[n] for n in NAMES))
        writer.close()
    else:
        cols = make_columns(pairs, *MEDIANS, seed=0)
        PreferenceDataset.from_arrays(*(cols[n] for n in NAMES)).save(out)
    seconds = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in store_files(out))
    return {"seconds": seconds, "peak_kib": proc_status()["VmHWM"], "bytes": size}


def child_access(store: Path, batches: int, mode: str) -> dict[str, Any]:
    for f in store_files(store):
        evict(f)
    t0 = time.perf_counter()
    if mode == "normal":
        ds = PreferenceDataset.load(store, access="mmap", max_resident=None)
    else:
        ds = PreferenceDataset.load(store, access="direct" if mode == "direct" else "mmap")
    open_s = time.perf_counter() - t0
    default = PreferenceDataset.load(store).access
    if mode == "normal":  # the kernel's defaults: read-around, no will-need
        ds._store.prefetch = False
        for m in ds._mapped.mmaps:
            m.madvise(mmap.MADV_NORMAL)
    r0, t0 = read_bytes(), time.perf_counter()
    plan = ds.batches(64, shuffle=True, seed=0, max_length=1024)
    plan_s, plan_read = time.perf_counter() - t0, read_bytes() - r0
    chosen = [plan[k] for k in range(min(batches, len(plan)))]
    lens = ds.lengths()
    served = 4 * sum(int(sum(col[idx].sum() for col in lens)) for idx in chosen)
    del lens
    for f in store_files(store):
        evict(f)
    rss0, r0, t0 = proc_status()["VmRSS"], read_bytes(), time.perf_counter()
    for idx in chosen:
        ds.collate(idx, layout="padded", max_length=1024)
    cold_s, cold_read = time.perf_counter() - t0, read_bytes() - r0
    rss1 = proc_status()["VmRSS"]
    t0 = time.perf_counter()
    for idx in chosen:
        ds.collate(idx, layout="padded", max_length=1024)
    warm_s = time.perf_counter() - t0
    return {
        "open_ms": open_s * 1e3,
        "default": default,
        "plan_s": plan_s,
        "plan_read": plan_read,
        "served": served,
        "cold_read": cold_read,
        "rss_grew_kib": rss1 - rss0,
        "cold_bps": len(chosen) / cold_s,
        "warm_bps": len(chosen) / warm_s,
        "batches": len(chosen),
    }


def child_text(work: Path, pairs: int, streamed: bool) -> dict[str, Any]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(work / "tokenizer.json"))
    reset_peak()
    t0 = time.perf_counter()
    glob = str(work / "text" / "in-*")
    if streamed:
        ds = PreferenceDataset.from_text(glob, tok, out=work / "text_store")
    else:
        ds = PreferenceDataset.from_text(glob, tok)
    seconds = time.perf_counter() - t0
    assert len(ds) == pairs
    return {"seconds": seconds, "peak_kib": proc_status()["VmHWM"], "fingerprint": ds.fingerprint()}


def make_text(work: Path, pairs: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from bench_text import Babbler, docstrings, make_records, train_tokenizer

    corpus = docstrings()
    train_tokenizer(corpus, 16_000).save(str(work / "tokenizer.json"))
    babble = Babbler(corpus, seed=0)
    (work / "text").mkdir()
    bounds = np.linspace(0, pairs, 9).astype(int)
    for k in range(8):
        rows = make_records(babble, int(bounds[k + 1] - bounds[k]), conversational=False)
        if k % 2:
            pq.write_table(pa.Table.from_pylist(rows), work / "text" / f"in-{k}.parquet")
        else:
            with open(work / "text" / f"in-{k}.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)


def run(*args: Any) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", *map(str, args)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def gib(kib: float) -> str:
    return f"{kib / 2**20:.2f} GiB"


def build(a: argparse.Namespace, work: Path) -> None:
    mem = run("build", work / "memory", a.memory_pairs, 0)
    shutil.rmtree(work / "memory")
    small = run("build", work / "small", a.memory_pairs, 1)
    shutil.rmtree(work / "small")
    big = run("build", work / "big", a.pairs, 1)
    print(
        f"\nbuild        {'pairs':>11} {'seconds':>9} {'us/pair':>8} {'peak RSS':>10} {'bytes':>9}"
    )
    for name, n, r in (
        ("in-memory", a.memory_pairs, mem),
        ("streamed", a.memory_pairs, small),
        ("streamed", a.pairs, big),
    ):
        us = r["seconds"] / n * 1e6
        print(
            f"{name:<12} {n:>11,} {r['seconds']:>9.1f} {us:>8.2f} {gib(r['peak_kib']):>10} "
            f"{r['bytes'] / 2**30:>6.1f}GiB"
        )
    ratio = (big["seconds"] / a.pairs) / (mem["seconds"] / a.memory_pairs)
    print(f"time per pair, streamed {a.pairs:,} / in-memory {a.memory_pairs:,}: {ratio:.2f}x")


def access(a: argparse.Namespace, big_store: Path) -> None:
    print(
        f"\naccess ({a.batches} shuffled batches of 64)   open   plan  plan read  served  "
        "cold read  read/served  RSS grew  cold b/s  warm b/s"
    )
    labels = {
        "direct": "direct reads",
        "mmap": "mmap, random, bound",
        "normal": "mmap, kernel defaults, no bound",
    }
    default = None
    for mode in a.modes.split(","):
        r = run("access", big_store, a.batches, mode)
        default = r["default"]
        print(
            f"{labels[mode]:<38} {r['open_ms']:>4.0f}ms {r['plan_s']:>5.1f}s "
            f"{r['plan_read'] / 2**20:>7.0f}MiB {r['served'] / 2**20:>5.0f}MiB "
            f"{r['cold_read'] / 2**20:>7.0f}MiB {r['cold_read'] / r['served']:>10.2f}x "
            f"{r['rss_grew_kib'] / 1024:>6.0f}MiB {r['cold_bps']:>9.1f} {r['warm_bps']:>9.1f}"
        )
    print(f"load()'s default access for this store here: {default}")


def text(a: argparse.Namespace, work: Path) -> None:
    make_text(work, a.text_pairs)
    whole = run("text", work, a.text_pairs, 0)
    streamed = run("text", work, a.text_pairs, 1)
    print(f"\ntext, {a.text_pairs:,} pairs in 8 files   seconds   pairs/s   peak RSS")
    for name, r in (("from_text in memory", whole), ("from_text(out=...)", streamed)):
        rate = a.text_pairs / r["seconds"]
        print(f"{name:<32} {r['seconds']:>8.1f} {rate:>9.0f} {gib(r['peak_kib']):>10}")
    same = whole["fingerprint"] == streamed["fingerprint"]
    ratio = streamed["seconds"] / whole["seconds"]
    print(f"streamed/in-memory time {ratio:.2f}x; same ids: {same}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=10_000_000)
    p.add_argument("--memory-pairs", type=int, default=1_000_000)
    p.add_argument("--text-pairs", type=int, default=1_000_000)
    p.add_argument("--batches", type=int, default=1000)
    p.add_argument("--dir", type=Path, default=None)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--phases", default="build,access,text", help="phases to run")
    p.add_argument("--modes", default="direct,mmap,normal", help="access modes to time")
    p.add_argument("--store", type=Path, default=None, help="a big store to reuse (kept)")
    p.add_argument("--child", nargs="+")
    a = p.parse_args()
    if a.child:
        kind, *rest = a.child
        if kind == "build":
            res = child_build(Path(rest[0]), int(rest[1]), rest[2] == "1")
        elif kind == "access":
            res = child_access(Path(rest[0]), int(rest[1]), rest[2])
        else:
            res = child_text(Path(rest[0]), int(rest[1]), rest[2] == "1")
        print(json.dumps(res))
        return
    phases = set(a.phases.split(","))
    work = Path(tempfile.mkdtemp(prefix="rlox-scale-", dir=a.dir))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    try:
        big_store = a.store or work / "big"
        if a.store is None and phases & {"build", "access"}:
            build(a, work)
        if "access" in phases:
            access(a, big_store)
        if a.store is None:
            shutil.rmtree(big_store, ignore_errors=True)
        if "text" in phases and a.text_pairs:
            text(a, work)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
