"""Stores of parts: concatenation, streamed ingestion, sharded preparation, interrupted runs,
filtering and deduplication, each against the in-memory store built from the same pairs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlox import PreferenceDataset
from rlox.store_file import JOURNAL_FILE, META_FILE
from rlox.store_writer import StoreWriter

FIELDS = ("prompt", "chosen", "rejected")
WORDS = "the a of and to in is that it for on with as was by at model data reward".split()
SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def random_lists(n: int, seed: int, vocab: int = 50) -> list[list[list[int]]]:
    rng = np.random.default_rng(seed)
    return [[rng.integers(0, vocab, rng.integers(1, 9)).tolist() for _ in range(n)] for _ in FIELDS]


def pairs_of(ds: PreferenceDataset) -> list[tuple[tuple[int, ...], ...]]:
    return [tuple(tuple(ds[i][c].tolist()) for c in FIELDS) for i in range(len(ds))]


def assert_same(a: PreferenceDataset, b: PreferenceDataset) -> None:
    assert len(a) == len(b)
    assert pairs_of(a) == pairs_of(b)
    assert a.fingerprint() == b.fingerprint()
    for x, y in zip(a.lengths(), b.lengths(), strict=True):
        np.testing.assert_array_equal(x, y)


def split_points(draw: st.DrawFn, n: int) -> list[int]:
    cuts = draw(st.lists(st.integers(0, n), max_size=5))
    return [0, *sorted(cuts), n]


@SETTINGS
@given(data=st.data(), n=st.integers(0, 40), seed=st.integers(0, 2**16))
def test_concatenated_slices_are_the_store(data, n, seed, tmp_path_factory) -> None:
    whole = PreferenceDataset.from_lists(*random_lists(n, seed))
    bounds = split_points(data.draw, n)
    pieces = [whole.select(np.arange(a, b)) for a, b in zip(bounds, bounds[1:], strict=False)]
    joined = PreferenceDataset.concatenate(pieces)
    assert_same(joined, whole)
    if n:
        idx = np.array(data.draw(st.lists(st.integers(-n, n - 1), min_size=1, max_size=12)))
        for layout in ("padded", "packed", "prefix_shared"):
            x, y = whole.collate(idx, layout=layout), joined.collate(idx, layout=layout)
            for key in ("input_ids", "position_ids", "loss_mask", "pair_index"):
                np.testing.assert_array_equal(np.asarray(x[key]), np.asarray(y[key]))
        plan_x, plan_y = whole.batches(3, seed=seed), joined.batches(3, seed=seed)
        np.testing.assert_array_equal(plan_x.indices, plan_y.indices)
    path = tmp_path_factory.mktemp("joined")
    joined.save(path)
    assert_same(PreferenceDataset.load(path), whole)


@SETTINGS
@given(data=st.data(), n=st.integers(0, 60), seed=st.integers(0, 2**16))
def test_streamed_writer_gives_the_same_pairs(data, n, seed, tmp_path_factory) -> None:
    whole = PreferenceDataset.from_lists(*random_lists(n, seed))
    bounds = split_points(data.draw, n)
    path = tmp_path_factory.mktemp("streamed")
    writer = StoreWriter(path, part_tokens=data.draw(st.integers(1, 200)))
    for a, b in zip(bounds, bounds[1:], strict=False):
        writer.append(*whole.select(np.arange(a, b)).arrays.values())
    writer.close()
    loaded = PreferenceDataset.load(path)
    assert_same(loaded, whole)
    assert not (path / JOURNAL_FILE).exists()
    assert json.loads((path / META_FILE).read_text())["version"] == 2


def write_inputs(tmp: Path, records: list[dict], files: int) -> list[Path]:
    """The records split over ``files`` inputs, alternating .jsonl and .parquet."""
    bounds = np.linspace(0, len(records), files + 1).astype(int)
    paths = []
    for k in range(files):
        rows = records[bounds[k] : bounds[k + 1]]
        if k % 2:
            path = tmp / f"in-{k:02d}.parquet"
            table = pa.table({f: [r[f] for r in rows] for f in FIELDS})
            pq.write_table(table, path, row_group_size=7)
        else:
            path = tmp / f"in-{k:02d}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n\n" for r in rows))
        paths.append(path)
    return paths


def text_records(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(WORDS, k))

    return [
        {
            "prompt": text(rng.integers(1, 9)),
            "chosen": text(rng.integers(1, 6)),
            "rejected": text(6),
        }
        for _ in range(n)
    ]


@pytest.mark.filterwarnings("ignore:.*not a token prefix")
def test_text_shards_stream_and_whole_build_agree(tmp_path, tokenizer) -> None:
    records = text_records(230)
    inputs = write_inputs(tmp_path, records, 5)
    whole = PreferenceDataset.from_text(records, tokenizer)
    glob = str(tmp_path / "in-*")
    assert_same(PreferenceDataset.from_text(sorted(map(str, inputs)), tokenizer), whole)
    streamed = PreferenceDataset.from_text(
        glob, tokenizer, out=tmp_path / "streamed", part_tokens=300, records_per_batch=17
    )
    assert len(streamed._store.parts()) > 3
    assert_same(streamed, whole)
    root = tmp_path / "sharded"
    for i in (2, 0, 3):
        shard = PreferenceDataset.from_text(glob, tokenizer, out=root, shard=(i, 4))
        lo, hi = 230 * i // 4, 230 * (i + 1) // 4
        assert_same(shard, whole.select(np.arange(lo, hi)))
    with pytest.raises(ValueError, match=r"shard\(s\) \[1\]"):
        PreferenceDataset.load(root)
    PreferenceDataset.from_text(glob, tokenizer, out=root, shard=(1, 4), part_tokens=100)
    assert (root / META_FILE).is_file()
    assert_same(PreferenceDataset.load(root), whole)
    (root / META_FILE).unlink()  # the shards alone open as the store too
    assert_same(PreferenceDataset.load(root), whole)


@pytest.mark.filterwarnings("ignore:.*not a token prefix")
def test_datasets_splits_and_arrow_batches_stream(tmp_path, tokenizer) -> None:
    import datasets

    records = text_records(60, seed=1)
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(records[:40]),
            "test": datasets.Dataset.from_list(records[40:]),
        }
    )
    whole = PreferenceDataset.from_text(records, tokenizer)
    got = PreferenceDataset.from_text(dd, tokenizer, split=["train", "test"], out=tmp_path / "t")
    assert_same(got, whole)
    with pytest.raises(ValueError, match="split"):
        PreferenceDataset.from_text(dd, tokenizer)
    lists = dict(zip(FIELDS, random_lists(50, 3), strict=True))
    table = pa.table({f"{c}_ids": lists[c] for c in FIELDS})
    ids = PreferenceDataset.from_lists(*lists.values())
    streamed = PreferenceDataset.from_arrow(
        iter(table.to_batches(max_chunksize=6)), out=tmp_path / "ids", part_tokens=40
    )
    assert_same(streamed, ids)


def test_filter_and_deduplicate_match_a_python_reference(tmp_path) -> None:
    prompt, chosen, rejected = random_lists(400, 7, vocab=3)
    for i in range(0, 400, 9):
        rejected[i] = list(chosen[i])  # identical completions
    for i in range(5, 400, 11):
        prompt[i], chosen[i], rejected[i] = prompt[i - 5], chosen[i - 5], rejected[i - 5]
    ds = PreferenceDataset.concatenate(
        [
            PreferenceDataset.from_lists(prompt[:150], chosen[:150], rejected[:150]),
            PreferenceDataset.from_lists(prompt[150:], chosen[150:], rejected[150:]),
        ]
    )
    opts = dict(min_prompt_length=2, max_completion_length=6, max_length=12)
    got = ds.filter(**opts, drop_identical=True)
    keep, reasons = [], {"prompt_length": 0, "completion_length": 0, "length": 0, "identical": 0}
    for p, c, r in zip(prompt, chosen, rejected, strict=True):
        if len(p) < 2:
            reasons["prompt_length"] += 1
        elif len(c) > 6 or len(r) > 6:
            reasons["completion_length"] += 1
        elif len(p) + max(len(c), len(r)) > 12:
            reasons["length"] += 1
        elif c == r:
            reasons["identical"] += 1
        else:
            keep.append((tuple(p), tuple(c), tuple(r)))
    assert pairs_of(got) == keep
    assert got.dropped == reasons and all(reasons.values())
    on_disk = ds.filter(**opts, drop_identical=True, out=tmp_path / "kept")
    assert_same(on_disk, got)
    seen, first = set(), []
    for t in zip(map(tuple, prompt), map(tuple, chosen), map(tuple, rejected), strict=True):
        if t not in seen:
            seen.add(t)
            first.append(t)
    dedup = ds.deduplicate()
    assert pairs_of(dedup) == first
    assert dedup.dropped == {"duplicates": 400 - len(first)} and len(first) < 400
    with pytest.raises(ValueError, match="min_prompt_length"):
        ds.filter(min_prompt_length=5, max_prompt_length=2)
    with pytest.raises(ValueError, match="max_length"):
        ds.filter(max_length=-1)


def test_parts_errors_name_global_pairs_and_refuse_single_arrays() -> None:
    a = PreferenceDataset.from_lists([[1]], [[2]], [[3]])
    b = PreferenceDataset.from_lists([[1], [4]], [[2], [5]], [[3], [9]])
    joined = PreferenceDataset.concatenate([a, b])
    with pytest.raises(ValueError, match=r"rejected\[2\].*vocab_size=9"):
        joined.collate([0, 2], vocab_size=9)
    with pytest.raises(ValueError, match=r"indices\[1\].*out of range for 3"):
        joined.collate([0, 3])
    with pytest.raises(ValueError, match="2 parts"):
        _ = joined.arrays
    assert joined[2]["rejected"].tolist() == [9]
    assert joined[-3]["prompt"].tolist() == [1]
    with pytest.raises(TypeError, match=r"datasets\[1\]"):
        PreferenceDataset.concatenate([a, "b"])  # type: ignore[list-item]


_KILLED = textwrap.dedent(
    """
    import sys, time, numpy as np
    from rlox.store_writer import StoreWriter
    out, resume, pace = sys.argv[1], sys.argv[2] == "1", float(sys.argv[3])
    w = StoreWriter(out, part_tokens=3000, resume=resume)
    for k in range(w.records // 100, 200):
        lens = np.random.default_rng(k).integers(1, 20, (3, 100))
        arrays = []
        for c in range(3):
            offsets = np.concatenate([[0], np.cumsum(lens[c])])
            arrays += [np.arange(offsets[-1], dtype=np.int32) % 97, offsets]
        w.append(*arrays, records=100)
        time.sleep(pace)
    w.close()
    """
)


def reference_store(tmp: Path) -> PreferenceDataset:
    subprocess.run([sys.executable, "-c", _KILLED, str(tmp), "0", "0"], check=True)
    return PreferenceDataset.load(tmp)


def test_killed_ingestion_never_loads_wrong_and_resumes(tmp_path) -> None:
    expected = reference_store(tmp_path / "reference")
    rng = np.random.default_rng(1)
    interrupted = 0
    for trial in range(4):
        out = tmp_path / f"run{trial}"
        # Paced to take at least 0.8 s, so a kill within 0.5 s always interrupts it.
        proc = subprocess.Popen([sys.executable, "-c", _KILLED, str(out), "0", "0.004"])
        deadline = time.monotonic() + 60
        while not (out / JOURNAL_FILE).exists() and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        time.sleep(float(rng.uniform(0, 0.5)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        try:
            got = PreferenceDataset.load(out)
        except ValueError as e:
            assert "resume=True" in str(e) or "not an rlox store" in str(e)
            interrupted += 1
        else:
            assert_same(got, expected)  # it finished before the kill
        subprocess.run([sys.executable, "-c", _KILLED, str(out), "1", "0"], check=True)
        assert_same(PreferenceDataset.load(out), expected)
    assert interrupted == 4


@SETTINGS
@given(
    n=st.integers(0, 60),
    group=st.integers(1, 25),
    batch=st.integers(1, 30),
    data=st.data(),
)
def test_parquet_slices_read_exactly_the_range(n, group, batch, data, tmp_path_factory) -> None:
    from rlox.ingest import record_batches

    path = tmp_path_factory.mktemp("pq") / "in.parquet"
    pq.write_table(pa.table({"k": list(range(n))}), path, row_group_size=group)
    start = data.draw(st.integers(0, n))
    stop = data.draw(st.none() | st.integers(start, n))
    pieces = list(record_batches([path], start, stop, batch))
    assert all(0 < p.num_rows <= batch for p in pieces)
    got = [k for p in pieces for k in p.column("k").to_pylist()]
    assert got == list(range(start, n if stop is None else stop))


@SETTINGS
@given(sizes=st.lists(st.integers(0, 12), min_size=1, max_size=4), data=st.data())
def test_record_batches_read_inputs_as_one_sequence(sizes, data, tmp_path_factory) -> None:
    from rlox.ingest import count_records, record_batches

    tmp = tmp_path_factory.mktemp("inputs")
    inputs, k = [], 0
    for j, size in enumerate(sizes):
        rows = [{"k": k + i} for i in range(size)]
        k += size
        if j % 3 == 0:
            inputs.append(tmp / f"{j}.jsonl")
            inputs[-1].write_text("".join(json.dumps(r) + "\n" for r in rows))
        elif j % 3 == 1:
            inputs.append(tmp / f"{j}.parquet")
            pq.write_table(
                pa.Table.from_pylist(rows, schema=pa.schema([("k", pa.int64())])), inputs[-1]
            )
        else:
            inputs.append(rows)
    start = data.draw(st.integers(0, k))
    stop = data.draw(st.none() | st.integers(start, k))
    counts = data.draw(st.sampled_from([None, [count_records(i) for i in inputs]]))
    got = []
    for piece in record_batches(inputs, start, stop, 5, counts):
        got += (
            piece.column("k").to_pylist()
            if isinstance(piece, pa.Table)
            else [r["k"] for r in piece]
        )
    assert got == list(range(start, k if stop is None else stop))
