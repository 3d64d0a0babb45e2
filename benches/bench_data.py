"""Preference data plane: store build/save/load, collation throughput and padding, side by side.

Usage: python benches/bench_data.py [--pairs 1000000] [--quick] [--repeats 3] [--python-pairs N]

Two synthetic length profiles (UltraFeedback-like and HH-like; lognormal lengths, sigma 0.7,
capped at 2048, ids uniform in [1, 32000) as int32) are built as flat values + int64 offsets.
For each profile it measures (1) building, saving, memory-mapping and verifying the store, each
step in a fresh subprocess for its wall time and peak RSS, plus an epoch of padded batches read
from the memory-mapped store with and without its resident-page budget; (2) one epoch of planning + collation in each layout against a
TRL-style per-example Python collator and a vectorised numpy collator; (3) the padding fraction
of each layout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import rlox
from rlox.data import LAYOUTS, PreferenceDataset

PROFILES = {"ultrafeedback": (70, 170), "hh": (100, 45)}  # median prompt, median response
VOCAB = 32000
SIGMA = 0.7
CAP = 2048
BATCH = 64
MAX_LENGTH = 1024
PACK_LENGTH = 4096
NAMES = tuple(f"{c}_{k}" for c in ("prompt", "chosen", "rejected") for k in ("values", "offsets"))
STEPS = {
    "build": "from_arrays(validate=True)",
    "save": "save(dir) incl. fsync",
    "load": "load(dir) mmap",
    "verify": "load(dir, verify=True)",
    "verify_cold": "load(dir, verify=True) cold",
    "iterate": "padded epoch, max_resident 1 GiB",
    "unbounded": "padded epoch, max_resident None",
}
Columns = dict[str, np.ndarray]


# ---------------------------------------------------------------------------- data
def make_columns(n: int, prompt_median: int, response_median: int, seed: int) -> Columns:
    """Flat int32 ids and (n + 1,) int64 offsets for prompt, chosen and rejected."""
    rng = np.random.default_rng(seed)
    cols: Columns = {}
    for name, median in (("prompt", prompt_median), ("chosen", response_median)) + (
        ("rejected", response_median),
    ):
        lens = np.clip(np.rint(rng.lognormal(np.log(median), SIGMA, n)), 1, CAP).astype(np.int64)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        cols[f"{name}_values"] = rng.integers(1, VOCAB, int(offsets[-1]), dtype=np.int32)
        cols[f"{name}_offsets"] = offsets
    return cols


def from_columns(cols: Columns, validate: bool = True) -> PreferenceDataset:
    return PreferenceDataset.from_arrays(*(cols[k] for k in NAMES), validate=validate)


# ---------------------------------------------------------------------------- memory probes
def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process in KiB."""
    text = Path("/proc/self/status").read_text()
    keys = ("VmRSS", "VmHWM", "RssAnon", "RssFile")
    return {k: int(m.group(1)) for k in keys if (m := re.search(rf"^{k}:\s+(\d+)", text, re.M))}


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def evict(path: Path) -> None:
    """Drop one file's clean pages from the page cache (nothing else is touched)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def child(step: str, workdir: str) -> None:
    """Run one step in this fresh process and print its time and memory as JSON."""
    start = proc_status()
    work = Path(workdir)
    store_dir = work / "store"
    extra: dict[str, Any] = {}
    args: Any = None
    if step in ("build", "save"):
        args = [np.load(work / f"{k}.npy") for k in NAMES]
        if step == "save":
            args = PreferenceDataset.from_arrays(*args, validate=False)
    elif step == "verify_cold":
        evict(store_dir / "tokens.bin")
    elif step == "iterate":
        args = PreferenceDataset.load(store_dir, max_resident=1 << 30)
    elif step == "unbounded":
        args = PreferenceDataset.load(store_dir, max_resident=None)
    drops = [0]
    if step in ("iterate", "unbounded"):
        release = args.release_pages

        def counted() -> None:  # count how often the store drops its resident pages
            drops[0] += 1
            release()

        args.release_pages = counted
    before = proc_status()["VmRSS"]
    reset_peak()
    t0 = time.perf_counter()
    kept: Any = None  # held until memory is read, so its mapped pages still count
    if step == "build":
        kept = PreferenceDataset.from_arrays(*args, validate=True)
    elif step == "save":
        args.save(store_dir)
    elif step == "load":
        kept = PreferenceDataset.load(store_dir)
    elif step in ("verify", "verify_cold"):
        kept = PreferenceDataset.load(store_dir, mmap=True, verify=True)
    elif step in ("iterate", "unbounded"):
        plan = args.batches(batch_size=BATCH, shuffle=True, seed=0, max_length=MAX_LENGTH)
        anon_max = 0
        for k, idx in enumerate(plan):
            args.collate(idx, layout="padded", max_length=MAX_LENGTH)
            if k % 256 == 0:
                anon_max = max(anon_max, proc_status()["RssAnon"])
        extra = {"batches": len(plan), "anon_max": max(anon_max, proc_status()["RssAnon"])}
        extra["drops"] = drops[0]
    elapsed = time.perf_counter() - t0
    end = proc_status()
    result = {"time": elapsed, "base": start["VmHWM"], "base_anon": start["RssAnon"]}
    result |= {"before": before, "peak": end["VmHWM"], "file_end": end["RssFile"]} | extra
    del kept
    print(json.dumps(result))


def run_child(step: str, workdir: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", step, str(workdir)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def store_steps(cols: Columns, workdir: Path, repeats: int, steps: list[str]) -> dict[str, Any]:
    """Median time and peak RSS of each store step, each run `repeats` times in a fresh process."""
    for k in NAMES:
        np.save(workdir / f"{k}.npy", cols[k])
    out: dict[str, Any] = {}
    for step in steps:
        runs = [run_child(step, workdir) for _ in range(repeats)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        out[step] = med
        if step == "save":
            for k in NAMES:
                (workdir / f"{k}.npy").unlink()
    out["file_bytes"] = (workdir / "store" / "tokens.bin").stat().st_size
    return out


# ---------------------------------------------------------------------------- contenders
def python_collate(cols: Columns, idx: np.ndarray, max_length: int) -> dict[str, torch.Tensor]:
    """Per example, the way TRL's DPO collator works: Python lists, one tensor per sequence,
    ``pad_sequence``. Rows are prompt+chosen for every pair, then prompt+rejected."""
    pv, po = cols["prompt_values"], cols["prompt_offsets"]
    cv, co = cols["chosen_values"], cols["chosen_offsets"]
    rv, ro = cols["rejected_values"], cols["rejected_offsets"]
    features = []
    for i in idx.tolist():  # a datasets row hands the collator Python lists
        prompt = pv[po[i] : po[i + 1]].tolist()
        chosen = cv[co[i] : co[i + 1]].tolist()
        rejected = rv[ro[i] : ro[i + 1]].tolist()
        room = max_length - len(prompt)
        if room <= 0:  # no completion token left: the pair cannot be scored
            continue
        features.append((prompt, chosen[:room], rejected[:room]))
    ids, attention, loss = [], [], []
    for side in (1, 2):
        for f in features:
            prompt, completion = f[0], f[side]
            seq = prompt + completion
            ids.append(torch.tensor(seq, dtype=torch.long))
            attention.append(torch.tensor([1] * len(seq), dtype=torch.long))
            loss.append(torch.tensor([0] * len(prompt) + [1] * len(completion), dtype=torch.bool))
    pad = torch.nn.utils.rnn.pad_sequence
    return {
        "input_ids": pad(ids, batch_first=True, padding_value=0),
        "attention_mask": pad(attention, batch_first=True, padding_value=0),
        "loss_mask": pad(loss, batch_first=True, padding_value=False),
    }


def segment_arange(lengths: np.ndarray) -> np.ndarray:
    """[0..l0), [0..l1), ... concatenated."""
    starts = np.cumsum(lengths) - lengths
    return np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(starts, lengths)


def numpy_collate(
    cols: Columns, idx: np.ndarray, max_length: int, full: bool = False
) -> dict[str, np.ndarray]:
    """The padded layout with whole-array numpy ops only (gather indices from repeat/cumsum).

    With ``full``, also every other field rlox's padded batch carries: the gather plan, the
    sequence ids, the lengths and the store index of each pair.
    """
    po = cols["prompt_offsets"]
    ps = po[idx]
    pl = po[idx + 1] - ps
    keep = pl < max_length
    if not keep.all():
        idx, ps, pl = idx[keep], ps[keep], pl[keep]
    room = max_length - pl
    b = len(idx)
    parts = []
    for side in ("chosen", "rejected"):
        off = cols[f"{side}_offsets"]
        start = off[idx]
        parts.append((cols[f"{side}_values"], start, np.minimum(off[idx + 1] - start, room)))
    total = np.concatenate([pl + parts[0][2], pl + parts[1][2]])
    width = int(total.max()) if b else 0
    ids = np.zeros((2 * b, width), dtype=np.int64)
    flat = ids.reshape(-1)
    row_start = np.arange(2 * b, dtype=np.int64) * width
    pl2, ps2 = np.concatenate([pl, pl]), np.concatenate([ps, ps])
    within = segment_arange(pl2)
    flat[np.repeat(row_start, pl2) + within] = cols["prompt_values"][np.repeat(ps2, pl2) + within]
    for h, (values, start, length) in enumerate(parts):
        rows = row_start[h * b : (h + 1) * b] + pl
        within = segment_arange(length)
        flat[np.repeat(rows, length) + within] = values[np.repeat(start, length) + within]
    t = np.arange(width, dtype=np.int64)
    attention = t < total[:, None]
    out = {
        "input_ids": ids,
        "attention_mask": attention.astype(np.int64),
        "position_ids": np.where(attention, t, 0),
        "loss_mask": attention & (t >= pl2[:, None]),
    }
    if full:
        rows = np.arange(2 * b, dtype=np.int64)
        cl2 = total - pl2
        row = np.repeat(rows, cl2)
        position = np.repeat(pl2 - 1, cl2) + segment_arange(cl2)
        out["sequence_ids"] = np.where(attention, rows[:, None].astype(np.int32), np.int32(-1))
        out |= {"plan_row": row, "plan_position": position, "plan_pair": row % b}
        out |= {"plan_target": flat[row * width + position + 1], "plan_side": row // b}
        out |= {"prompt_lengths": pl, "chosen_lengths": parts[0][2], "pair_index": idx}
        out["rejected_lengths"] = parts[1][2]
    return out


def check_same(ds: PreferenceDataset, cols: Columns, idx: np.ndarray) -> None:
    """Rust padded output == both contenders' output on the pairs ``idx``."""
    rust = ds.collate(idx, layout="padded", max_length=MAX_LENGTH)
    ref_np = numpy_collate(cols, idx, MAX_LENGTH, full=True)
    ref_py = python_collate(cols, idx, MAX_LENGTH)
    for key in ("input_ids", "attention_mask", "loss_mask"):
        got = getattr(rust, key)
        assert torch.equal(got, torch.from_numpy(ref_np[key])), f"numpy {key} differs"
        assert torch.equal(got, ref_py[key].to(got.dtype)), f"python {key} differs"
    for key, value in ref_np.items():  # every other field the full numpy variant builds
        assert torch.equal(getattr(rust, key), torch.from_numpy(value)), f"numpy {key} differs"


def timed(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rust_epoch(ds: PreferenceDataset, layout: str, pack_length: int | None = None) -> None:
    """Plan one shuffled epoch and collate every batch."""
    plan = ds.batches(
        batch_size=BATCH, shuffle=True, seed=0, layout=layout, max_length=MAX_LENGTH,
        pack_length=pack_length,
    )  # fmt: skip
    for idx in plan:
        ds.collate(idx, layout=layout, max_length=MAX_LENGTH, pack_length=pack_length)


def collation(
    ds: PreferenceDataset, cols: Columns, subset_pairs: int, repeats: int
) -> dict[str, Any]:
    n = len(ds)
    plan = ds.batches(batch_size=BATCH, shuffle=True, seed=0, max_length=MAX_LENGTH)
    out: dict[str, Any] = {"batches": len(plan)}
    assert np.array_equal(np.sort(plan.indices), np.arange(n)), "the plan must cover every pair"
    # Same output as both contenders on the first (longest) batch and on one with a skipped pair.
    check_same(ds, cols, plan[0])
    too_long = np.flatnonzero(np.diff(cols["prompt_offsets"]) >= MAX_LENGTH)
    out["skipped"] = len(too_long)
    if len(too_long):
        batch_of = np.searchsorted(
            plan.offsets, np.flatnonzero(plan.indices == too_long[0]), "right"
        )
        check_same(ds, cols, plan[int(batch_of[0]) - 1])
    out["plan"] = timed(
        lambda: ds.batches(batch_size=BATCH, shuffle=True, seed=0, max_length=MAX_LENGTH), repeats
    )
    for layout in LAYOUTS:
        out[layout] = timed(lambda layout=layout: rust_epoch(ds, layout), repeats) / n
    kw = {"layout": "padded", "max_length": MAX_LENGTH, "max_prompt_length": None}
    kw |= {"truncation": "keep_end", "pad_token_id": 0, "pad_to_multiple_of": None}
    kw |= {"pack_length": None, "vocab_size": None}

    def kernel_only() -> None:  # the Rust call alone, without wrapping its arrays as tensors
        for idx in plan:
            ds._store.collate(idx, **kw)

    out["kernel"] = timed(kernel_only, repeats) / n
    out["packed4096"] = timed(lambda: rust_epoch(ds, "packed", PACK_LENGTH), repeats) / n

    def numpy_epoch(full: bool) -> None:
        for idx in plan:
            numpy_collate(cols, idx, MAX_LENGTH, full=full)

    out["numpy"] = timed(lambda: numpy_epoch(False), repeats) / n
    out["numpy_full"] = timed(lambda: numpy_epoch(True), repeats) / n
    rng = np.random.default_rng(1)
    order = rng.permutation(len(plan))
    sizes = np.diff(plan.offsets)[order]
    chosen = order[: int(np.searchsorted(np.cumsum(sizes), subset_pairs)) + 1]
    subset = [plan[int(k)] for k in chosen]
    m = sum(len(idx) for idx in subset)
    out["subset_batches"], out["subset_pairs"] = len(subset), m
    t0 = time.perf_counter()  # once, before python reads the same pairs
    for idx in subset:
        ds.collate(idx, layout="padded", max_length=MAX_LENGTH)
    out["rust_subset"] = (time.perf_counter() - t0) / m
    t0 = time.perf_counter()
    for idx in subset:
        python_collate(cols, idx, MAX_LENGTH)
    out["python"] = (time.perf_counter() - t0) / m
    return out


def padding(ds: PreferenceDataset) -> dict[str, float]:
    stats = ds.stats(batch_size=BATCH, max_length=MAX_LENGTH)["padding"]
    out = {layout: stats[layout]["fraction"] for layout in LAYOUTS}
    rows = ds.stats(batch_size=BATCH, max_length=MAX_LENGTH, pack_length=PACK_LENGTH)
    out["packed4096"] = rows["padding"]["packed"]["fraction"]
    return out


def bench_from_text() -> None:
    # PLACEHOLDER: to be completed with rlox.text.tokenize_preferences on generated text.
    print("from_text: see benches/bench_text.py")


# ---------------------------------------------------------------------------- report
def mib(kib: float) -> str:
    return f"{kib / 1024:,.0f} MiB"


def secs(t: float) -> str:
    return f"{t:,.2f} s" if t >= 1 else f"{t * 1e3:,.1f} ms"


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def side_by_side(title: str, cols: list[str], rows: list[tuple[str, list[str]]]) -> None:
    """One table: a label column, then the same columns for each profile."""
    names = list(PROFILES)
    width = max(12, *(len(c) + 2 for c in cols), *(len(x) + 2 for _, r in rows for x in r))
    group = len(cols) * width
    label = max(len(r[0]) for r in rows)
    print(f"\n{title}")
    print(" " * label + "".join(f" | {p:^{group}}" for p in names))
    print(" " * label + "".join(" | " + "".join(f"{c:>{width}}" for c in cols) for _ in names))
    print("-" * (label + len(names) * (group + 3)))
    for name, cells in rows:
        groups = [cells[i * len(cols) : (i + 1) * len(cols)] for i in range(len(names))]
        print(
            f"{name:{label}}" + "".join(" | " + "".join(f"{c:>{width}}" for c in g) for g in groups)
        )


def report(res: dict[str, dict[str, Any]], n: int) -> None:
    rows = []
    for step, label in STEPS.items():
        if step not in res[next(iter(PROFILES))]["store"]:
            continue
        cells = []
        for name in PROFILES:
            s = res[name]["store"][step]
            peak = s["peak"]
            cells += [secs(s["time"]), mib(peak), mib(peak - s["base"]), mib(peak - s["before"])]
            cells.append(mib(s["file_end"]))
        rows.append((label, cells))
    cols = ["time", "peak RSS", "peak - base", "peak - start", "RssFile end"]
    side_by_side("Store steps, each in a fresh process (medians)", cols, rows)
    bases = ", ".join(f"{p} {mib(res[p]['store']['load']['base'])}" for p in PROFILES)
    print(f"base = RSS after python + imports ({bases}); start = RSS when the step began.")

    rows = []
    for step in ("iterate", "unbounded"):
        if step not in res[next(iter(PROFILES))]["store"]:
            continue
        cells = []
        for name in PROFILES:
            st = res[name]["store"]
            it = st[step]
            cells += [secs(it["time"]), f"{n / it['time']:,.0f}", f"{it['drops']:,}"]
            cells += [mib(it["anon_max"] - it["base_anon"]), mib(it["peak"] - it["before"])]
            cells.append(mib(it["file_end"] - st["load"]["file_end"]))
        rows.append((STEPS[step], cells))
    cols = ["time", "pairs/s", "drops", "anon grew", "peak-start", "file grew"]
    files = ", ".join(f"{p} {res[p]['store']['file_bytes'] / 2**20:,.0f} MiB" for p in PROFILES)
    side_by_side(
        f"Padded epoch read from the memory-mapped store ({res[name]['collate']['batches']:,} "
        f"batches; file: {files})",
        cols,
        rows,
    )
    print(
        "Mapped pages count as resident once read (clean page cache). Dropping them past the "
        "budget keeps RSS bounded; drops: how often the store dropped them; growth is measured "
        "from the RSS right after load."
    )

    entries = [
        ("rust plan (batches) only", "plan", False),
        ("rust plan + collate padded", "padded", False),
        ("  of which the Rust call (_store.collate)", "kernel", False),
        ("rust plan + collate packed", "packed", False),
        ("rust plan + collate prefix_shared", "prefix_shared", False),
        (f"rust plan + collate packed, rows {PACK_LENGTH}", "packed4096", False),
        ("numpy vectorised padded", "numpy", False),
        ("  + plan, sequence ids, lengths", "numpy_full", False),
        ("python TRL-style padded (1 run)", "python", True),
        ("rust collate padded, same batches (1 run)", "rust_subset", True),
    ]
    rows = []
    for label, key, subset in entries:
        cells = []
        for name in PROFILES:
            c = res[name]["collate"]
            pairs = c["subset_pairs"] if subset else n
            batches = c["subset_batches"] if subset else c["batches"]
            per_pair = c[key] / n if key == "plan" else c[key]
            cells += [f"{batches:,}", f"{pairs:,}", secs(per_pair * pairs), f"{1 / per_pair:,.0f}"]
        rows.append((label, cells))
    side_by_side(
        f"Collate every pair once, {BATCH} pairs/batch, max_length {MAX_LENGTH}",
        ["batches", "pairs", "time", "pairs/s"],
        rows,
    )
    print(
        "python: per example Python lists, one torch.tensor per sequence, pad_sequence, reading "
        "each row as Python lists as a datasets row would; timed on a random subset of the same "
        "batches and extrapolated per pair. rust collates with rayon on 2 threads, numpy is "
        "single-threaded. rust times include planning the epoch, except the Rust call alone; rust and "
        "numpy epochs are the median of the repeats."
    )
    for name in PROFILES:
        c = res[name]["collate"]
        vs_np, vs_py = c["numpy_full"] / c["padded"], c["python"] / c["padded"]
        print(
            f"{name}: padded rust/numpy with the same outputs {vs_np:.2f}x "
            f"(target >= 3x: {verdict(vs_np >= 3)}), rust/numpy building only the four padded "
            f"arrays {c['numpy'] / c['padded']:.2f}x; "
            f"rust/python {vs_py:.0f}x (target >= 20x: {verdict(vs_py >= 20)}), "
            f"{c['python'] / c['rust_subset']:.0f}x on the same subset; python extrapolated to "
            f"the epoch: {secs(c['python'] * n)}; {c['skipped']} pairs skipped by every "
            f"collator (prompt >= {MAX_LENGTH} tokens)"
        )

    rows = []
    for layout in (*LAYOUTS, "packed4096"):
        label = f"packed, rows of {PACK_LENGTH}" if layout == "packed4096" else layout
        rows.append((label, [f"{res[p]['pad'][layout]:.2%}" for p in PROFILES]))
    side_by_side(f"Padding fraction, stats(batch_size={BATCH})", ["padding"], rows)
    for name in PROFILES:
        packed = res[name]["pad"]["packed"]
        print(f"{name}: packed padding {packed:.2%} (target <= 2%: {verdict(packed <= 0.02)})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=1_000_000)
    ap.add_argument("--quick", action="store_true", help="50,000 pairs, one run per timing")
    ap.add_argument("--repeats", type=int, default=3, help="runs per timing (median)")
    ap.add_argument("--python-pairs", type=int, default=20_000, help="pairs timed in Python")
    ap.add_argument("--child", nargs=2, metavar=("STEP", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.child:
        child(*args.child)
        return
    n, repeats, py_pairs = args.pairs, args.repeats, args.python_pairs
    if args.quick:
        n, repeats, py_pairs = 50_000, 1, 2_000
    steps = [s for s in STEPS if not (args.quick and s in ("verify_cold", "unbounded"))]
    load = os.getloadavg()
    print(
        f"rlox {rlox.__version__} | torch {torch.__version__} (2 threads) | numpy {np.__version__}"
        f" | {platform.processor() or platform.machine()}, {os.cpu_count()} cores | "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print(
        f"{n:,} pairs per profile; {BATCH} pairs/batch, max_length {MAX_LENGTH}; "
        f"medians of {repeats} run(s); store written under {tempfile.gettempdir()}"
    )
    if args.quick:
        print("--quick: skips the cold verify and the unbounded epoch")
    res: dict[str, dict[str, Any]] = {}
    for seed, (name, (pm, rm)) in enumerate(PROFILES.items()):
        t0 = time.perf_counter()
        cols = make_columns(n, pm, rm, seed)
        gen = time.perf_counter() - t0
        tokens = sum(int(cols[f"{c}_offsets"][-1]) for c in ("prompt", "chosen", "rejected"))
        print(
            f"{name}: prompt median {pm}, responses median {rm}: {tokens / 1e6:,.1f} M tokens "
            f"({tokens / n:.0f}/pair), generated with numpy in {secs(gen)}"
        )
        with tempfile.TemporaryDirectory(prefix="rlox-bench-") as tmp:
            store = store_steps(cols, Path(tmp), repeats, steps)
        ds = from_columns(cols)
        res[name] = {"store": store, "pad": padding(ds)}
        res[name]["collate"] = collation(ds, cols, py_pairs, repeats)
        del ds, cols
    report(res, n)
    print()
    bench_from_text()
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
