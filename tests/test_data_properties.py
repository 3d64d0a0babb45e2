"""Property tests and fuzzing of the preference data plane against an independent reference.

The reference collator, batch cost and store-file checks below are written from the documented
semantics of ``PreferenceDataset`` / ``PairBatch`` alone; rlox output must match them exactly. The
fuzz tests feed every public constructor, ``collate``, ``batches`` and ``load`` with malformed
input: only ``ValueError`` or ``TypeError`` may escape (never a Rust panic), errors about one pair
name the field and the first bad pair, and valid input round-trips exactly.
"""

from __future__ import annotations

import itertools
import json
import os
import pickle
import subprocess
import sys
import tempfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st

from rlox.data import LAYOUTS, PairBatch, PreferenceDataset, dense_attention_mask

VOCAB = 50
TRUNCATIONS = ("keep_end", "keep_start")
COLUMNS = ("prompt", "chosen", "rejected")
ARRAY_NAMES = tuple(f"{c}_{k}" for c in COLUMNS for k in ("values", "offsets"))
I64_MAX = 2**63 - 1

Rows = list[tuple[list[int], list[int], list[int]]]

FAST = settings(max_examples=60, deadline=None)
FUZZ = settings(max_examples=100, deadline=None)
FILES = settings(max_examples=50, deadline=None)


def call(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, Exception | None]:
    """``(result, None)`` or ``(None, error)``; anything but ValueError/TypeError fails the test."""
    try:
        return fn(*args, **kwargs), None
    except (ValueError, TypeError) as e:
        return None, e
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise AssertionError(
            f"{type(e).__module__}.{type(e).__name__} escaped (only ValueError/TypeError may): {e}"
        ) from e


def refused(err: Exception | None, options: dict[str, Any], *also: str) -> bool:
    """Whether ``err`` is a ValueError refusing an extreme (>= 2**31) size among ``options``,
    naming that option (or one of ``also``)."""
    extreme = [k for k, v in options.items() if is_int(v) and v >= 2**31]
    names = [*extreme, *also] if extreme else []
    return isinstance(err, ValueError) and any(f"{k}:" in str(err) for k in names)


def is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def round_up(n: int, m: int | None) -> int:
    return n if m is None else -(-n // m) * m


def pad_of(o: dict[str, Any]) -> int:
    pad = o.get("pad_token_id")
    return 0 if pad is None else pad


# --------------------------------------------------------------------------------------------
# Reference collator


def ref_truncate(
    p: list[int], c: list[int], r: list[int], o: dict[str, Any]
) -> tuple[list[int], list[int], list[int], bool] | None:
    """The documented truncation; ``None`` when a completion keeps no token."""
    mp = o.get("max_prompt_length")
    keep = len(p) if mp is None else min(len(p), mp)
    prompt = p[len(p) - keep :] if o.get("truncation", "keep_end") == "keep_end" else p[:keep]
    ml = o.get("max_length")
    room = None if ml is None else max(ml - keep, 0)
    chosen, rejected = c[:room], r[:room]
    if not chosen or not rejected:
        return None
    cut = len(prompt) < len(p) or len(chosen) < len(c) or len(rejected) < len(r)
    return prompt, chosen, rejected, cut


@dataclass
class Expected:
    """What collating ``indices`` must give (matrices only for padded and prefix_shared)."""

    pairs: Rows
    pair_index: list[int]
    skipped: list[int]
    num_truncated: int
    arrays: dict[str, np.ndarray]
    plan: list[tuple[int, int, int, int, int]] | None


def ref_collate(rows: Rows, indices: list[int], o: dict[str, Any]) -> Expected:
    n = len(rows)
    pairs, index, skipped, ntrunc = [], [], [], 0
    for i in indices:
        i = i + n if i < 0 else i
        t = ref_truncate(*rows[i], o)
        if t is None:
            skipped.append(i)
            continue
        pairs.append(t[:3])
        index.append(i)
        ntrunc += t[3]
    b, layout, pad, mult = len(pairs), o["layout"], pad_of(o), o.get("pad_to_multiple_of")
    arrays: dict[str, np.ndarray] = {}
    plan: list[tuple[int, int, int, int, int]] | None = []
    if layout == "padded":
        seqs = [(p + c, len(p)) for p, c, _ in pairs] + [(p + r, len(p)) for p, _, r in pairs]
        width = round_up(max((len(s) for s, _ in seqs), default=0), mult)
        ids = np.full((2 * b, width), pad, np.int64)
        att, pos = np.zeros((2 * b, width), np.int64), np.zeros((2 * b, width), np.int64)
        loss, seq = np.zeros((2 * b, width), bool), np.full((2 * b, width), -1, np.int32)
        for row, (s, np_) in enumerate(seqs):
            ids[row, : len(s)] = s
            att[row, : len(s)] = 1
            pos[row, : len(s)] = range(len(s))
            loss[row, np_ : len(s)] = True
            seq[row, : len(s)] = row
            plan += [(row, np_ + k - 1, s[np_ + k], row % b, row // b) for k in range(len(s) - np_)]
        arrays = dict(
            input_ids=ids, attention_mask=att, position_ids=pos, loss_mask=loss, sequence_ids=seq
        )
    elif layout == "prefix_shared":
        lengths = [sum(map(len, x)) for x in pairs]
        place = ffd_place(lengths, o.get("pack_length"))
        nrows = 1 + max((row for row, _ in place), default=-1)
        fills = [0] * nrows
        for (row, start), n in zip(place, lengths, strict=True):
            fills[row] = max(fills[row], start + n)
        width = round_up(max(fills, default=0), mult)
        ids = np.full((nrows, width), pad, np.int64)
        att, pos = np.zeros((nrows, width), np.int64), np.zeros((nrows, width), np.int64)
        loss, seq = np.zeros((nrows, width), bool), np.full((nrows, width), -1, np.int32)
        ends, where = np.zeros((b, 3), np.int64), np.zeros(b, np.int64)
        for j, ((p, c, r), (row, s)) in enumerate(zip(pairs, place, strict=True)):
            np_, nc, nr = len(p), len(c), len(r)
            e = s + np_ + nc + nr
            ids[row, s:e] = p + c + r
            att[row, s:e] = 1
            pos[row, s:e] = list(range(np_ + nc)) + list(range(np_, np_ + nr))
            loss[row, s + np_ : e] = True
            seq[row, s:e] = j
            ends[j], where[j] = (s + np_, s + np_ + nc, e), row
            plan += [(row, s + np_ + k - 1, c[k], j, 0) for k in range(nc)]
            first = s + np_ - 1
            plan += [(row, first if k == 0 else first + nc + k, r[k], j, 1) for k in range(nr)]
        arrays = dict(
            input_ids=ids,
            attention_mask=att,
            position_ids=pos,
            loss_mask=loss,
            sequence_ids=seq,
            segment_ends=ends,
            pair_rows=where,
        )
    else:
        plan = None
    return Expected(pairs, index, skipped, ntrunc, arrays, plan)


def ffd_place(lengths: list[int], capacity: int | None) -> list[tuple[int, int]]:
    """(row, start) of each prefix-shared triple: one per row without ``capacity``, else
    first-fit-decreasing (ties in index order), triples in index order within a row."""
    if capacity is None:
        return [(j, 0) for j in range(len(lengths))]
    fills: list[int] = []
    rows = [0] * len(lengths)
    for j in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        row = next((k for k, f in enumerate(fills) if f + lengths[j] <= capacity), len(fills))
        if row == len(fills):
            fills.append(0)
        fills[row] += lengths[j]
        rows[j] = row
    starts, place = [0] * len(fills), []
    for j, row in enumerate(rows):
        place.append((row, starts[row]))
        starts[row] += lengths[j]
    return place


def ffd_fills(lengths: list[int], capacity: int | None) -> list[int]:
    """Row fills of first-fit-decreasing placement (one row when ``capacity`` is None)."""
    if not lengths:
        return []
    if capacity is None:
        return [sum(lengths)]
    fills: list[int] = []
    for n in sorted(lengths, reverse=True):
        for k, f in enumerate(fills):
            if f + n <= capacity:
                fills[k] += n
                break
        else:
            fills.append(n)
    return fills


def check_packed(batch: PairBatch, exp: Expected, o: dict[str, Any]) -> list[tuple[int, ...]]:
    """Structural checks of a packed batch; returns the plan entries the layout implies."""
    ids, att = batch.input_ids.numpy(), batch.attention_mask.numpy()
    pos, loss = batch.position_ids.numpy(), batch.loss_mask.numpy()
    seq = batch.sequence_ids.numpy()
    rows, width = ids.shape
    b = len(exp.pairs)
    seqs = [(p + c, len(p)) for p, c, _ in exp.pairs] + [(p + r, len(p)) for p, _, r in exp.pairs]
    real = att == 1
    assert set(np.unique(att)) <= {0, 1}
    fills = real.sum(1)
    for row in range(rows):
        assert real[row, : fills[row]].all() and not real[row, fills[row] :].any(), "padding gap"
        assert fills[row] >= 1, "empty packed row"
        if o.get("pack_length") is not None:
            assert fills[row] <= o["pack_length"], "row exceeds pack_length"
    if o.get("pack_length") is None:
        assert rows == (1 if b else 0)
    assert width == round_up(int(fills.max(initial=0)), o.get("pad_to_multiple_of"))
    want_fills = ffd_fills([len(s) for s, _ in seqs], o.get("pack_length"))
    assert sorted(fills.tolist()) == sorted(want_fills)
    assert (ids[~real] == pad_of(o)).all()
    assert (pos[~real] == 0).all() and not loss[~real].any() and (seq[~real] == -1).all()
    assert sorted(np.unique(seq[real]).tolist()) == list(range(2 * b))
    plan, bounds = [], {0}
    for s, (tokens, np_) in enumerate(seqs):
        r_idx, c_idx = np.nonzero(seq == s)
        assert len(set(r_idx.tolist())) == 1, f"sequence {s} spans rows"
        row, start = int(r_idx[0]), int(c_idx[0])
        assert c_idx.tolist() == list(range(start, start + len(tokens))), "not contiguous"
        assert ids[row, start : start + len(tokens)].tolist() == tokens
        assert pos[row, start : start + len(tokens)].tolist() == list(range(len(tokens)))
        assert loss[row, start : start + len(tokens)].tolist() == [False] * np_ + [True] * (
            len(tokens) - np_
        )
        bounds.add(row * width + start + len(tokens))
        plan += [
            (row, start + np_ + k - 1, tokens[np_ + k], s % b, s // b)
            for k in range(len(tokens) - np_)
        ]
    bounds |= {(row + 1) * width for row in range(rows) if fills[row] < width}
    assert batch.cu_seqlens is not None and batch.cu_seqlens.dtype == torch.int32
    assert batch.cu_seqlens.tolist() == sorted(bounds)
    return plan


def recover(batch: PairBatch) -> Rows:
    """Each pair's (prompt, chosen, rejected) read back from a batch via its plan and masks."""
    ids, att, loss = batch.input_ids.numpy(), batch.attention_mask.numpy(), batch.loss_mask.numpy()
    b = batch.num_pairs
    comp: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    for row, p, t, pair, side in zip(
        batch.plan_row.tolist(),
        batch.plan_position.tolist(),
        batch.plan_target.tolist(),
        batch.plan_pair.tolist(),
        batch.plan_side.tolist(),
        strict=True,
    ):
        comp.setdefault((pair, side), []).append((row, p, t))
    prompt_only = (att == 1) & ~loss
    out = []
    for j in range(b):
        if batch.layout == "packed":
            seq = batch.sequence_ids.numpy()
            prompts = [ids[(seq == s) & prompt_only].tolist() for s in (j, b + j)]
        elif batch.layout == "padded":
            prompts = [ids[r][prompt_only[r]].tolist() for r in (j, b + j)]
        else:
            row, seq = int(batch.pair_rows[j]), batch.sequence_ids.numpy()
            prompts = [ids[row][prompt_only[row] & (seq[row] == j)].tolist()] * 2
        assert prompts[0] == prompts[1], "chosen and rejected rows disagree on the prompt"
        chosen, rejected = ([t for *_, t in sorted(comp.get((j, s), []))] for s in (0, 1))
        out.append((prompts[0], chosen, rejected))
    return out


def check_batch(batch: PairBatch, rows: Rows, indices: list[int], o: dict[str, Any]) -> Expected:
    """Compare a collated batch with the reference in every respect the layout documents."""
    exp = ref_collate(rows, indices, o)
    layout = o["layout"]
    b = len(exp.pairs)
    assert batch.layout == layout and batch.num_pairs == b
    assert batch.pair_index.tolist() == exp.pair_index
    assert batch.skipped.tolist() == exp.skipped
    assert batch.num_truncated == exp.num_truncated
    for name, k in (("prompt_lengths", 0), ("chosen_lengths", 1), ("rejected_lengths", 2)):
        assert getattr(batch, name).tolist() == [len(x[k]) for x in exp.pairs], name
    dtypes = dict(
        input_ids=torch.int64,
        attention_mask=torch.int64,
        position_ids=torch.int64,
        loss_mask=torch.bool,
        sequence_ids=torch.int32,
    )
    for name, dtype in dtypes.items():
        assert getattr(batch, name).dtype == dtype, name
        assert getattr(batch, name).shape == batch.input_ids.shape, name
    n_plan = sum(len(c) + len(r) for _, c, r in exp.pairs)
    for name in ("plan_row", "plan_position", "plan_target", "plan_pair", "plan_side"):
        t = getattr(batch, name)
        assert t.dtype == torch.int64 and t.shape == (n_plan,), name
    if layout == "packed":
        assert batch.segment_ends is None
        plan = check_packed(batch, exp, o)
    else:
        assert batch.cu_seqlens is None
        if layout == "padded":
            assert batch.segment_ends is None
        for name, want in exp.arrays.items():
            got = getattr(batch, name).numpy()
            assert got.shape == want.shape, (name, got.shape, want.shape)
            np.testing.assert_array_equal(got, want, err_msg=name)
        plan = exp.plan
    got_plan = sorted(
        zip(
            batch.plan_row.tolist(),
            batch.plan_position.tolist(),
            batch.plan_target.tolist(),
            batch.plan_pair.tolist(),
            batch.plan_side.tolist(),
            strict=True,
        )
    )
    assert got_plan == sorted(plan), "gather plan differs from the reference"
    ids, seq = batch.input_ids.numpy(), batch.sequence_ids.numpy()
    for row, p, t, pair, side in got_plan:
        assert seq[row, p] >= 0, "plan reads a padding position"
        shared = layout == "prefix_shared" and side == 1
        if not (shared and p == exp.arrays["segment_ends"][pair][0] - 1):
            assert ids[row, p + 1] == t and seq[row, p + 1] == seq[row, p]
    assert recover(batch) == [tuple(x) for x in exp.pairs], "tokens out != tokens in"
    return exp


# --------------------------------------------------------------------------------------------
# Strategies


def id_lists(min_size: int = 1) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, VOCAB - 1), min_size=min_size, max_size=15)


store_rows = st.lists(st.tuples(id_lists(), id_lists(), id_lists()), min_size=1, max_size=12)


@st.composite
def collate_options(draw: Any) -> dict[str, Any]:
    o = {
        "layout": draw(st.sampled_from(LAYOUTS)),
        "max_length": draw(st.none() | st.integers(2, 40)),
        "max_prompt_length": draw(st.none() | st.integers(1, 20)),
        "truncation": draw(st.sampled_from(TRUNCATIONS)),
        "pad_token_id": draw(st.integers(-2, VOCAB + 2)),
        "pad_to_multiple_of": draw(st.none() | st.integers(1, 8)),
    }
    # Without max_length a sequence holds up to 30 tokens; see test_packed_rows_fit_pack_length.
    low = 30 if o["max_length"] is None else o["max_length"]
    if o["layout"] == "prefix_shared":
        low *= 2  # a whole p c r fits (at most 2 * max_length tokens, or 45)
    o["pack_length"] = draw(st.none() | st.integers(low, low + 60))
    return o


@st.composite
def index_lists(draw: Any, n: int) -> list[int]:
    return draw(
        st.just(list(range(n)))
        | st.permutations(range(n)).map(list)
        | st.lists(st.integers(-n, n - 1), max_size=12)
    )


def columns_of(rows: Rows) -> list[list[list[int]]]:
    return [[list(r[k]) for r in rows] for k in range(3)]


def dataset_of(rows: Rows) -> PreferenceDataset:
    """A store of ``rows``, checked to give every pair back unchanged."""
    ds = PreferenceDataset.from_lists(*columns_of(rows))
    assert len(ds) == len(rows)
    for i, row in enumerate(rows):
        assert [ds[i][c].tolist() for c in COLUMNS] == [list(x) for x in row]
    return ds


# --------------------------------------------------------------------------------------------
# Collation against the reference


@settings(max_examples=150, deadline=None)
@given(rows=store_rows, o=collate_options(), data=st.data())
def test_collate_matches_reference(rows: Rows, o: dict[str, Any], data: Any) -> None:
    ds = dataset_of(rows)
    indices = data.draw(index_lists(len(rows)))
    batch = ds.collate(indices, **o)
    check_batch(batch, rows, indices, o)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_collate_reference_examples(layout: str) -> None:
    rows = [
        ([1, 2, 3, 4], [5, 6, 7], [8]),
        ([9], [10, 11], [12, 13, 14]),
        ([1, 2, 3, 4, 5], [6], [7]),
    ]
    for o in (
        {"max_length": None},
        {"max_length": 5, "max_prompt_length": 2, "truncation": "keep_start"},
        {"max_length": 5, "pad_to_multiple_of": 4, "pad_token_id": -1, "pack_length": 7},
    ):
        o = {"layout": layout, "pack_length": None, **o}
        check_batch(dataset_of(rows).collate([2, 0, 1, -1], **o), rows, [2, 0, 1, -1], o)


@FAST
@given(rows=store_rows, o=collate_options(), pack_length=st.integers(1, 40))
def test_packed_rows_fit_pack_length(rows: Rows, o: dict[str, Any], pack_length: int) -> None:
    """Without max_length, packed rows still hold at most pack_length tokens (or collate
    refuses with a ValueError naming pack_length)."""
    o = {**o, "layout": "packed", "max_length": None, "pack_length": pack_length}
    batch, err = call(dataset_of(rows).collate, list(range(len(rows))), **o)
    if err is not None:
        assert isinstance(err, ValueError) and "pack_length" in str(err), err
        return
    assert batch.attention_mask.sum(1).max().item() <= o["pack_length"], (
        "a packed row exceeds pack_length"
    )
    check_batch(batch, rows, list(range(len(rows))), o)


# --------------------------------------------------------------------------------------------
# dense_attention_mask against its definition


def ref_dense_mask(batch: PairBatch, exp: Expected) -> np.ndarray:
    att = batch.attention_mask.numpy() == 1
    rows, width = att.shape
    if batch.layout == "packed":
        flat = np.arange(rows * width).reshape(rows, width)
        seg = np.searchsorted(batch.cu_seqlens.numpy(), flat, side="right") - 1
    elif batch.layout == "prefix_shared":
        seg = np.full((rows, width), -1)
        ends, where = exp.arrays["segment_ends"], exp.arrays["pair_rows"]
        for j, ((p, _, _), (a, _, e), row) in enumerate(zip(exp.pairs, ends, where, strict=True)):
            seg[row, a - len(p) : e] = j
    else:
        seg = np.broadcast_to(np.arange(rows)[:, None], (rows, width))
    q, k = np.arange(width)[:, None], np.arange(width)[None, :]
    mask = (seg[:, :, None] == seg[:, None, :]) & (k <= q) & att[:, :, None] & att[:, None, :]
    if batch.layout == "prefix_shared":
        for (a, b_, e), row in zip(
            exp.arrays["segment_ends"], exp.arrays["pair_rows"], strict=True
        ):
            mask[row, b_:e, a:b_] = False
    pr, pq = np.nonzero(~att)
    mask[pr, pq, :] = False
    mask[pr, pq, pq] = True
    return mask


@FAST
@given(rows=store_rows, o=collate_options(), data=st.data())
def test_dense_attention_mask_matches_definition(rows: Rows, o: dict[str, Any], data: Any) -> None:
    indices = data.draw(index_lists(len(rows)))
    batch = dataset_of(rows).collate(indices, **o)
    exp = check_batch(batch, rows, indices, o)
    got = dense_attention_mask(batch)
    rows_, width = batch.input_ids.shape
    assert got.dtype == torch.bool and got.shape == (rows_, 1, width, width)
    np.testing.assert_array_equal(got[:, 0].numpy(), ref_dense_mask(batch, exp))
    assert torch.equal(batch.dense_attention_mask(), got)
    if o["layout"] == "padded":
        assert torch.equal(dense_attention_mask(replace(batch, sequence_ids=None)), got)


# --------------------------------------------------------------------------------------------
# Batch planning


def pair_keys(lengths: list[tuple[int, int, int]], o: dict[str, Any]) -> list[int]:
    """Each pair's documented batch-cost key after truncation (0 for a skipped pair)."""
    keys = []
    for p, c, r in lengths:
        t = ref_truncate([0] * p, [0] * c, [0] * r, o)
        if t is None:
            keys.append(0)
            continue
        np_, nc, nr = (len(x) for x in t[:3])
        keys.append(
            {
                "padded": np_ + max(nc, nr),
                "prefix_shared": np_ + nc + nr,
                "packed": 2 * np_ + nc + nr,
            }[o["layout"]]
        )
    return keys


def batch_cost(keys: list[int], o: dict[str, Any]) -> int:
    """Tokens of a batch including the padding of its layout (real tokens where rows are
    packed: ``packed``, and ``prefix_shared`` with ``pack_length``)."""
    longest = round_up(max(keys, default=0), o.get("pad_to_multiple_of"))
    if o["layout"] == "prefix_shared" and o.get("pack_length") is not None:
        return sum(keys)
    return {
        "padded": 2 * len(keys) * longest,
        "prefix_shared": len(keys) * longest,
        "packed": sum(keys),
    }[o["layout"]]


def plan_feasible(keys: list[int], world_size: int, budget: int | None, o: dict[str, Any]) -> bool:
    """Whether every pair can go into a multiple of world_size non-empty batches, each batch of
    more than one pair within ``budget``. Costs grow with every key, so merging the smallest keys
    is optimal: ``n % world_size`` merges must fit among them."""
    n = len(keys)
    if n < world_size:
        return False
    merges = n % world_size
    if budget is None or merges == 0:
        return True
    small = sorted(keys)

    def parts(m: int, most: int) -> Any:
        if m == 0:
            yield []
        for k in range(min(m, most), 0, -1):
            for rest in parts(m - k, k):
                yield [k, *rest]

    for sizes in parts(merges, merges):
        need = sum(s + 1 for s in sizes)
        if need > n:
            continue
        pool = small[:need]
        for perm in itertools.permutations(range(need)):
            groups, at = [], 0
            for s in sizes:
                groups.append([pool[i] for i in perm[at : at + s + 1]])
                at += s + 1
            if all(batch_cost(g, o) <= budget for g in groups):
                return True
    return False


@st.composite
def plan_options(draw: Any) -> dict[str, Any]:
    o = draw(collate_options())
    del o["pad_token_id"]
    by_tokens = draw(st.booleans())
    o.update(
        batch_size=None if by_tokens else draw(st.integers(1, 8)),
        max_tokens=draw(st.integers(1, 300)) if by_tokens else None,
        shuffle=draw(st.booleans()),
        seed=draw(st.integers(0, 2**40)),
        epoch=draw(st.integers(0, 5)),
        group_by_length=draw(st.booleans()),
        drop_last=draw(st.booleans()),
        world_size=draw(st.integers(1, 4)),
        group_batches=draw(st.sampled_from([1, 2, 3, 64])),
    )
    return o


def check_plans(
    n: int, lengths: list[tuple[int, int, int]], o: dict[str, Any], plans: list
) -> None:
    """Every documented property of one epoch's plans for all ranks."""
    ws = o["world_size"]
    counts = {len(p) for p in plans}
    assert len(counts) == 1, f"ranks get different batch counts {counts}"
    seen = []
    for p in plans:
        assert p.indices.dtype == np.int64 and p.offsets[0] == 0
        assert (np.diff(p.offsets) > 0).all(), "empty batch"
        assert [b.tolist() for b in p] == [p[k].tolist() for k in range(len(p))]
        seen += p.indices.tolist()
    assert all(0 <= i < n for i in seen)
    assert len(seen) == len(set(seen)), "a pair appears twice"
    if not o["drop_last"]:
        assert sorted(seen) == list(range(n)), "not every pair is planned"
    elif o["batch_size"] is not None:
        full = o["batch_size"] * ws
        assert len(seen) == n // full * full
        assert all(len(b) == o["batch_size"] for p in plans for b in p)
    keys = pair_keys(lengths, o)
    if o["max_tokens"] is not None:
        for p in plans:
            for b in p:
                if len(b) > 1:
                    cost = batch_cost([keys[i] for i in b], o)
                    assert cost <= o["max_tokens"], f"batch {b.tolist()} costs {cost}"
    if o["shuffle"] and counts != {0}:
        round_costs = [
            max(batch_cost([keys[i] for i in p[k]], o) for p in plans) for k in range(len(plans[0]))
        ]
        assert round_costs[0] == max(round_costs), "the most expensive round is not first"


PLAN_DEFAULTS: dict[str, Any] = {
    "layout": "padded",
    "max_length": None,
    "max_prompt_length": None,
    "truncation": "keep_end",
    "pad_to_multiple_of": None,
    "pack_length": None,
    "batch_size": None,
    "max_tokens": None,
    "shuffle": False,
    "seed": 0,
    "epoch": 0,
    "group_by_length": True,
    "drop_last": False,
    "world_size": 1,
    "group_batches": 64,
}


def plan_all_ranks(lengths: list[tuple[int, int, int]], **options: Any) -> None:
    """Plan every rank and check the plans (and that planning again gives the same), or a
    ValueError on every rank, only when no plan exists."""
    o = {**PLAN_DEFAULTS, **options}
    ds = dataset_of([([1] * p, [2] * c, [3] * r) for p, c, r in lengths])
    opts = {k: v for k, v in o.items() if k != "world_size"}
    ws = o["world_size"]
    results = [call(ds.batches, rank=r, world_size=ws, **opts) for r in range(ws)]
    errors = [e for _, e in results if e is not None]
    if errors:
        assert len(errors) == ws and all(isinstance(e, ValueError) for e in errors), errors
        if refused(errors[0], o):
            return
        feasible = plan_feasible(pair_keys(lengths, o), ws, o["max_tokens"], o)
        assert not o["drop_last"] and not feasible, (
            f"ValueError although a plan exists: {errors[0]}"
        )
        return
    plans = [p for p, _ in results]
    check_plans(len(lengths), lengths, o, plans)
    again = ds.batches(rank=ws - 1, world_size=ws, **opts)
    np.testing.assert_array_equal(again.indices, plans[-1].indices)
    np.testing.assert_array_equal(again.offsets, plans[-1].offsets)


@settings(max_examples=120, deadline=None)
@given(
    lengths=st.lists(
        st.tuples(st.integers(1, 15), st.integers(1, 15), st.integers(1, 15)),
        min_size=1,
        max_size=40,
    ),
    o=plan_options(),
)
def test_batches_properties(lengths: list[tuple[int, int, int]], o: dict[str, Any]) -> None:
    plan_all_ranks(lengths, **o)


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(
        st.tuples(st.integers(1, 15), st.integers(1, 15), st.integers(1, 15)),
        min_size=1,
        max_size=20,
    ),
    o=plan_options(),
    multiple=st.sampled_from([2**31, 2**40, 2**61, 2**62, I64_MAX]),
    max_tokens=st.integers(1, 2**42),
)
def test_batches_budget_with_large_pad_multiple(
    lengths: list[tuple[int, int, int]], o: dict[str, Any], multiple: int, max_tokens: int
) -> None:
    """Token costs that overflow 64 bits never let an over-budget batch through (the padding
    multiple may instead be refused)."""
    layout = "prefix_shared" if o["layout"] == "packed" else o["layout"]
    o = {**o, "layout": layout, "pad_to_multiple_of": multiple, "batch_size": None}
    plan_all_ranks(lengths, **{**o, "max_tokens": max_tokens})


@pytest.mark.parametrize(
    ("batch_size", "world_size"), [(4, 2**62), (2**61, 8), (2**62, 4), (2**62, 2**62)]
)
def test_batches_huge_batch_size_times_world_size(batch_size: int, world_size: int) -> None:
    """batch_size * world_size beyond 64 bits plans, or is refused with a ValueError."""
    ds = dataset_of([([1], [2], [3])] * 15)
    plan, err = call(ds.batches, batch_size=batch_size, world_size=world_size)
    if world_size > 15 or err is not None:
        assert world_size > 15 or refused(err, {"batch_size": batch_size}), err
        assert isinstance(err, ValueError), err
        return
    plans = [plan] + [
        ds.batches(batch_size=batch_size, world_size=world_size, rank=r)
        for r in range(1, world_size)
    ]
    o = {"layout": "padded", "batch_size": batch_size, "max_tokens": None, "drop_last": False}
    check_plans(15, [(1, 1, 1)] * 15, {**o, "world_size": world_size, "shuffle": True}, plans)


def test_batches_token_budget_split_across_ranks() -> None:
    """Pairs 0 and 2 fit one 8-token batch, so two ranks can each get one batch."""
    lengths = [(1, 1, 1), (1, 1, 2), (1, 1, 1)]
    plan_all_ranks(lengths, max_tokens=8, world_size=2, group_batches=1)


def test_batches_token_budget_with_huge_pad_multiple() -> None:
    """2 pairs * 2 rows * 2**62 slots overflow 64 bits: never one batch within 1 token."""
    plan_all_ranks([(1, 1, 1), (1, 1, 1)], max_tokens=1, pad_to_multiple_of=2**62)


def test_batches_too_few_pairs_for_ranks() -> None:
    ds = dataset_of([([1], [2], [3])] * 3)
    for kw in ({"batch_size": 1}, {"max_tokens": 1000}):
        with pytest.raises(ValueError, match="world_size"):
            ds.batches(world_size=4, **kw)


# --------------------------------------------------------------------------------------------
# Fuzzing: from_lists

ROW_TYPE_ERRORS = [
    [1.5, 2.0],
    "abc",
    b"ab",
    None,
    5,
    [[1, 2], [3, 4]],
    [[1, 2], [3]],
    np.zeros(3),
    np.array([True]),
    [None],
    {"a": 1},
    torch.tensor([1.0]),
    [True, False],
]
ROW_OVERFLOWS = [[2**64], [2**63], [-(2**63) - 1], np.array([2**63], np.uint64), [10**30, 1]]


@st.composite
def fuzz_row(draw: Any) -> tuple[Any, str, list[int] | None]:
    """A row object, its class ("ints", "type" or "overflow") and its ids when "ints"."""
    kind = draw(st.sampled_from(["ints"] * 8 + ["type", "overflow"]))
    if kind == "type":
        return draw(st.sampled_from(ROW_TYPE_ERRORS)), kind, None
    if kind == "overflow":
        return draw(st.sampled_from(ROW_OVERFLOWS)), kind, None
    special = st.sampled_from([-1, -(2**63), VOCAB, 2**31, I64_MAX])
    ids = draw(
        st.lists(st.integers(0, VOCAB - 1) | special, min_size=0, max_size=6)
        if draw(st.integers(0, 4)) == 0
        else st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6)
    )
    small = all(0 <= x < 128 for x in ids)
    wrap = draw(
        st.sampled_from(
            ["list", "tuple", "gen", "int64", "strided", "tensor"]
            + (["int8", "uint8", "uint64", "int16"] if small else [])
        )
    )
    obj: Any = {
        "list": lambda: list(ids),
        "tuple": lambda: tuple(ids),
        "gen": lambda: (x for x in ids),
        "int64": lambda: np.array(ids, np.int64),
        "strided": lambda: np.repeat(np.array(ids, np.int64), 2)[::2],
        "tensor": lambda: torch.tensor(ids, dtype=torch.int64),
        "int8": lambda: np.array(ids, np.int8),
        "uint8": lambda: np.array(ids, np.uint8),
        "uint64": lambda: np.array(ids, np.uint64),
        "int16": lambda: np.array(ids, ">i2"),
    }[wrap]()
    return obj, "ints", ids


def check_built(ds: Any, err: Any, cols: list[list[list[int]]], vocab: int | None) -> None:
    """A constructor given these columns either refused them as it must or round-trips them."""
    if len({len(c) for c in cols}) > 1:
        assert isinstance(err, ValueError), err
        return
    where = pair_error(cols, vocab)
    if where is not None:
        assert isinstance(err, ValueError), err
        assert_names(err, where)
        return
    assert err is None, err
    assert len(ds) == len(cols[0])
    for i in range(len(ds)):
        got = ds[i]
        for c, name in enumerate(COLUMNS):
            assert got[name].dtype in (np.int32, np.int64)
            assert got[name].tolist() == cols[c][i]


def pair_error(cols: list[list[list[int]]], vocab: int | None) -> str | None:
    """``"field[i]"`` of the first bad pair (empty run, id < 0 or >= vocab), or None."""
    for i in range(len(cols[0])):
        for name, col in zip(COLUMNS, cols, strict=True):
            ids = col[i]
            if not ids or min(ids) < 0 or (vocab is not None and max(ids) >= vocab):
                return f"{name}[{i}]"
    return None


def assert_names(err: Exception, where: str) -> None:
    assert f"{where}:" in str(err), f"error does not name {where}: {err!r}"


@FUZZ
@given(
    data=st.data(),
    n=st.integers(0, 5),
    vocab=st.none() | st.integers(1, VOCAB + 5),
)
def test_fuzz_from_lists(data: Any, n: int, vocab: int | None) -> None:
    cols, kinds, ids = [], [], []
    for _ in COLUMNS:
        size = n if data.draw(st.integers(0, 9)) else data.draw(st.integers(0, 6))
        rows = [data.draw(fuzz_row()) for _ in range(size)]
        cols.append([r[0] for r in rows])
        kinds.append([r[1] for r in rows])
        ids.append([r[2] for r in rows])
    ds, err = call(PreferenceDataset.from_lists, *cols, vocab_size=vocab)
    bad_row = next(
        ((c, i, k) for c in range(3) for i, k in enumerate(kinds[c]) if k != "ints"), None
    )
    if bad_row is not None:
        c, i, k = bad_row
        assert err is not None, "invalid row accepted"
        assert isinstance(err, (TypeError, ValueError) if k == "type" else ValueError), err
        assert_names(err, f"{COLUMNS[c]}[{i}]")
        return
    check_built(ds, err, ids, vocab)


@pytest.mark.parametrize("row", [[[1, 2], [3]], [[], [1]], [1, [2, 3]]])
def test_from_lists_ragged_row_names_the_pair(row: Any) -> None:
    _, err = call(PreferenceDataset.from_lists, [[1], [2]], [[1], row], [[1], [2]])
    assert err is not None and "chosen[1]:" in str(err), repr(err)


@pytest.mark.parametrize("bad", [None, 5, "abc", {"a": [1]}])
def test_from_lists_column_not_a_sequence(bad: Any) -> None:
    with pytest.raises(TypeError, match="^chosen:"):
        PreferenceDataset.from_lists([[1]], bad, [[2]])


# --------------------------------------------------------------------------------------------
# Fuzzing: from_arrays


def flat(col: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    values = np.array([x for row in col for x in row], np.int64)
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in col])]).astype(np.int64)
    return values, offsets


def misaligned(a: np.ndarray) -> np.ndarray:
    buf = np.zeros(a.nbytes + 1, np.uint8)
    out = buf[1:].view(a.dtype)
    out[:] = a
    return out


ARRAY_MUTATIONS = (
    "dtype",
    "2d",
    "0d",
    "strided",
    "readonly",
    "misaligned",
    "list",
    "tensor",
    "swap",
    "set",
    "drop_last_offset",
    "append_offset",
    "empty",
    "shift",
)
DTYPES = (
    "int8 int16 int32 int64 uint8 uint16 uint32 uint64 >i4 >i8 float32 float64 bool object "
    "complex64"
).split()


def mutate(arrays: list[Any], data: Any) -> list[str]:
    """Apply 0..2 random mutations to the six arrays in place; returns their names."""
    done = []
    for _ in range(data.draw(st.integers(0, 2))):
        k = data.draw(st.integers(0, 5))
        what = data.draw(st.sampled_from(ARRAY_MUTATIONS))
        a = np.asarray(arrays[k])
        if a.ndim != 1 and what not in ("dtype", "list"):
            continue
        if what == "dtype":
            dt = data.draw(st.sampled_from(DTYPES))
            arrays[k] = a.astype(dt)
        elif what == "2d":
            arrays[k] = a.reshape(1, -1)
        elif what == "0d":
            arrays[k] = np.asarray(a[0] if a.size else 0)
        elif what == "strided":
            arrays[k] = np.repeat(a, 2)[::2]
        elif what == "readonly":
            a = a.copy()
            a.flags.writeable = False
            arrays[k] = a
        elif what == "misaligned" and a.dtype.itemsize > 1 and a.dtype.kind != "O":
            arrays[k] = misaligned(a)
        elif what == "list":
            arrays[k] = a.tolist()
        elif what == "tensor" and a.dtype in (np.int32, np.int64):
            arrays[k] = torch.from_numpy(a.copy())
        elif what == "swap" and a.size >= 3:
            i = data.draw(st.integers(0, a.size - 2))
            a = a.copy()
            a[i], a[i + 1] = a[i + 1], a[i]
            arrays[k] = a
        elif what == "set" and a.size and a.dtype.kind in "iu":
            i = data.draw(st.integers(0, a.size - 1))
            v = data.draw(st.sampled_from([-1, -(2**40), VOCAB, 10**6, 2**31, I64_MAX]))
            a = a.astype(np.int64)
            a[i] = v
            arrays[k] = a
        elif what == "drop_last_offset" and a.size:
            arrays[k] = a[:-1]
        elif what == "append_offset":
            arrays[k] = np.append(a, a[-1] if a.size else 0)
        elif what == "empty":
            arrays[k] = a[:0]
        elif what == "shift" and k % 2 == 1 and np.asarray(arrays[k - 1]).ndim == 1:
            values = np.asarray(arrays[k - 1])
            arrays[k - 1] = np.concatenate([np.full(3, 7, values.dtype), values])
            arrays[k] = a + 3
        else:
            continue
        done.append(f"{ARRAY_NAMES[k]}:{what}")
    return done


def arrays_oracle(
    arrays: list[Any], vocab: int | None, validate: bool
) -> tuple[type[Exception] | None, str | None, list[list[list[int]]] | None]:
    """Expected (error type, field named, columns) of ``from_arrays`` from its documentation."""
    conv = []
    for name, a in zip(ARRAY_NAMES, arrays, strict=True):
        if isinstance(a, torch.Tensor):
            a = a.numpy()
        a = np.asarray(a)
        if a.ndim != 1:
            return ValueError, name, None
        if a.dtype.kind not in "iu":
            return TypeError, name, None
        conv.append(a.astype(np.int64))
    for k, name in enumerate(COLUMNS):
        values, offsets = conv[2 * k], conv[2 * k + 1]
        if not offsets.size or not 0 <= offsets[0] <= offsets[-1] <= values.size:
            rows = range(max(offsets.size - 1, 0))
            bad = [i for i in rows if not 0 <= offsets[i] <= offsets[i + 1] <= values.size]
            return ValueError, f"{name}_offsets" + (f"[{bad[0]}]" if bad else ""), None
    n = conv[1].size - 1
    for k, name in ((1, "chosen"), (2, "rejected")):
        if conv[2 * k + 1].size - 1 != n:
            return ValueError, name, None
    cols: list[list[list[int]]] = [[], [], []]
    first_bad = None
    for i in range(n):
        for k, name in enumerate(COLUMNS):
            values, offsets = conv[2 * k], conv[2 * k + 1]
            s, e = offsets[i], offsets[i + 1]
            if not 0 <= s <= e <= values.size:
                first_bad = first_bad or f"{name}_offsets[{i}]"
                cols[k].append([])
                continue
            run = values[s:e].tolist()
            cols[k].append(run)
            if first_bad is None and (
                not run or min(run) < 0 or (vocab is not None and max(run) >= vocab)
            ):
                first_bad = f"{name}[{i}]"
    if first_bad is not None:
        return (ValueError if validate else None), first_bad, cols
    return None, None, cols


@FUZZ
@given(
    data=st.data(),
    cols=st.lists(
        st.tuples(
            st.lists(st.integers(-1, VOCAB), max_size=5),
            st.lists(st.integers(-1, VOCAB), max_size=5),
            st.lists(st.integers(-1, VOCAB), max_size=5),
        ),
        max_size=6,
    ),
    vocab=st.none() | st.integers(1, VOCAB + 2),
    validate=st.booleans(),
)
def test_fuzz_from_arrays(data: Any, cols: list, vocab: int | None, validate: bool) -> None:
    if data.draw(st.integers(0, 2)):  # mostly valid rows
        cols = [tuple([min(max(x, 0), VOCAB - 1) for x in r] or [1] for r in pair) for pair in cols]
    arrays: list[Any] = []
    for k in range(3):
        values, offsets = flat([list(p[k]) for p in cols])
        arrays += [values.astype(data.draw(st.sampled_from(["int32", "int64"]))), offsets]
    note(f"mutations: {mutate(arrays, data)}")
    etype, where, want = arrays_oracle(arrays, vocab, validate)
    ds, err = call(PreferenceDataset.from_arrays, *arrays, vocab_size=vocab, validate=validate)
    if etype is not None:
        assert isinstance(err, etype), (etype, err)
        assert_names(err, where)
        return
    assert err is None, err
    n = len(want[0])
    assert len(ds) == n
    if where is None:
        for i in range(n):
            got = ds[i]
            assert [got[c].tolist() for c in COLUMNS] == [want[k][i] for k in range(3)]
        rows = [tuple(want[k][i] for k in range(3)) for i in range(n)]
        check_batch(ds.collate(list(range(n))), rows, list(range(n)), {"layout": "padded"})
        return
    # validate=False kept a bad pair: later calls fail cleanly, naming the first bad pair.
    where = arrays_oracle(arrays, None, True)[1]
    for fn in (ds.verify, lambda: ds.collate(list(range(n)), max_length=None)):
        _, e = call(fn)
        if where is None:
            assert e is None, e
        else:
            assert isinstance(e, ValueError), e
            assert_names(e, where)
    call(ds.batches, batch_size=2)
    call(ds.stats, 2)
    call(ds.select, list(range(n)))


# --------------------------------------------------------------------------------------------
# Fuzzing: from_arrow

ARROW_TYPES = {
    "list<int32>": pa.list_(pa.int32()),
    "list<int64>": pa.list_(pa.int64()),
    "large_list<int64>": pa.large_list(pa.int64()),
    "list<int8>": pa.list_(pa.int8()),
    "list<uint16>": pa.list_(pa.uint16()),
    "list<uint64>": pa.list_(pa.uint64()),
    "list<float32>": pa.list_(pa.float32()),
    "int64": pa.int64(),
    "string": pa.string(),
    "list<list<int64>>": pa.list_(pa.list_(pa.int64())),
}


@st.composite
def arrow_column(draw: Any, n: int) -> tuple[Any, str, list[Any]]:
    """An Arrow column (array or chunked), its type name and its rows (None for a null row)."""
    tname = draw(st.sampled_from(list(ARROW_TYPES)))
    unsigned = tname.startswith("list<uint")
    rows: list[Any] = []
    for _ in range(n):
        if draw(st.integers(0, 11)) == 0:
            rows.append(None)
            continue
        lo = 0 if unsigned else -1
        row = draw(st.lists(st.integers(lo, VOCAB), min_size=0, max_size=5))
        if draw(st.integers(0, 11)) == 0:
            row = [*row, None]
        rows.append(row)
    if tname == "int64":
        py = [r[0] if r and r[0] is not None else None for r in rows]
    elif tname == "string":
        py = [None if r is None else str(r) for r in rows]
    elif tname == "list<list<int64>>":
        py = [None if r is None else [r] for r in rows]
    else:
        py = rows
    arr = pa.array(py, type=ARROW_TYPES[tname])
    chunks = draw(st.integers(0, 3))
    if chunks:
        cuts = sorted(draw(st.lists(st.integers(0, n), min_size=chunks - 1, max_size=chunks - 1)))
        bounds = [0, *cuts, n]
        arr = pa.chunked_array(
            [arr.slice(a, b - a) for a, b in itertools.pairwise(bounds)], type=arr.type
        )
    return arr, tname, rows


@FUZZ
@given(data=st.data(), n=st.integers(0, 6), vocab=st.none() | st.integers(1, VOCAB + 2))
def test_fuzz_from_arrow(data: Any, n: int, vocab: int | None) -> None:
    names = ("prompt_ids", "chosen_ids", "rejected_ids")
    cols = {}
    for name in names:
        size = n if data.draw(st.integers(0, 9)) else data.draw(st.integers(0, 6))
        cols[name] = data.draw(arrow_column(size))
    missing = data.draw(st.none() | st.sampled_from(names))
    container = data.draw(st.sampled_from(["table", "dict", "record_batch", "sliced"]))
    start = data.draw(st.integers(0, 2))
    rows_of = {k: v[2] for k, v in cols.items()}
    present = {k: v[0] for k, v in cols.items() if k != missing}
    if container == "dict" or len({len(v[2]) for v in cols.values()}) > 1:
        src: Any = present
        container = "dict"
    else:
        table = pa.table(present)
        if container == "record_batch":
            src = table.combine_chunks().to_batches()[0] if table.num_rows else table
        elif container == "sliced":
            src = table.slice(start)
            rows_of = {k: v[start:] for k, v in rows_of.items()}
        else:
            src = table
    ds, err = call(PreferenceDataset.from_arrow, src, vocab_size=vocab)
    note(f"container={container} types={[cols[k][1] for k in names]} missing={missing}")
    for name in names:
        tname, rows = cols[name][1], rows_of[name]
        if name == missing:
            assert isinstance(err, ValueError), err
            assert_names(err, name)
            return
        if not tname.startswith(("list<int", "list<uint", "large_list<int")):
            assert isinstance(err, TypeError), err
            assert_names(err, name)
            return
        nulls = [i for i, r in enumerate(rows) if r is None]
        if nulls:
            assert isinstance(err, ValueError), err
            assert_names(err, f"{name}[{nulls[0]}]")
            return
        if any(None in r for r in rows):
            assert isinstance(err, ValueError), err
            assert name in str(err), err
            return
    check_built(ds, err, [rows_of[k] for k in names], vocab)


def test_from_arrow_sliced_table_ignores_rows_outside_the_slice() -> None:
    """Rows cut off by ``Table.slice`` (a null id in one included) are not part of the input."""
    ids = pa.array([[1, None], [2, 3], [4]], pa.list_(pa.int32()))
    t = pa.table({"prompt_ids": ids, "chosen_ids": ids, "rejected_ids": ids}).slice(1)
    ds, err = call(PreferenceDataset.from_arrow, t)
    assert err is None, err
    assert [ds[i]["chosen"].tolist() for i in range(len(ds))] == [[2, 3], [4]]


def test_from_arrow_bad_columns_argument() -> None:
    t = pa.table({"a": [[1]], "b": [[2]], "c": [[3]]})
    for cols in ("abc", ("a", "b"), ("a", "b", "c", "d")):
        with pytest.raises(ValueError, match="^columns:"):
            PreferenceDataset.from_arrow(t, columns=cols)
    assert PreferenceDataset.from_arrow(t, columns=("a", "b", "c"))[0]["rejected"].tolist() == [3]
    with pytest.raises(TypeError, match="^data:"):
        PreferenceDataset.from_arrow(42)


# --------------------------------------------------------------------------------------------
# Fuzzing: collate and batches

HUGE = [2**61, 2**62, I64_MAX, 2**63, 2**64, -(2**70)]
OPTION_POOLS: dict[str, tuple[list[Any], list[Any]]] = {
    "layout": (list(LAYOUTS), ["PADDED", "", "pack", None, 1, b"padded"]),
    "max_length": ([None, 2, 3, 5, 8, 16, 40], [0, 1, -1, True, 2.0, "8", *HUGE]),
    "max_prompt_length": ([None, 1, 2, 4, 8], [0, -5, False, 3.5, *HUGE]),
    "truncation": (list(TRUNCATIONS), ["end", None, 0]),
    "pad_token_id": ([0, -1, 5, None], [I64_MAX, -(2**63), 2**63, True, "0", 1.0]),
    "pad_to_multiple_of": ([None, 1, 3, 8], [0, -1, True, 2.0, *HUGE]),
    "pack_length": ([None, 40, 80], [8, 16, 0, -3, False, "x", *HUGE]),
    "vocab_size": ([None, VOCAB], [3, 0, -1, I64_MAX, 2**64, True, 1.5]),
}


@st.composite
def fuzz_options(
    draw: Any, pools: dict[str, tuple[list[Any], list[Any]]], most: int = 2
) -> dict[str, Any]:
    """Common values for every option but up to ``most`` unusual or invalid ones."""
    odd = draw(st.sets(st.sampled_from(sorted(pools)), max_size=most))
    return {k: draw(st.sampled_from(pools[k][1] if k in odd else pools[k][0])) for k in pools}


def option_problem(name: str, v: Any, o: dict[str, Any]) -> type[Exception] | None:
    """The exception a single option value must raise (None: valid)."""
    if name in ("layout", "truncation"):
        if not isinstance(v, str):
            return TypeError
        return None if v in (LAYOUTS if name == "layout" else TRUNCATIONS) else ValueError
    if v is None:
        return None
    if not is_int(v):
        return TypeError
    if not -(2**63) <= v <= I64_MAX:
        return ValueError
    minimum = {
        "max_length": 2,
        "max_prompt_length": 1,
        "pad_to_multiple_of": 1,
        "pack_length": 1,
        "batch_size": 1,
        "max_tokens": 1,
        "world_size": 1,
        "group_batches": 1,
        "seed": 0,
        "epoch": 0,
        "rank": 0,
    }.get(name)
    if minimum is not None and v < minimum:
        return ValueError
    if name == "pack_length" and is_int(o.get("max_length")) and v < o["max_length"]:
        return ValueError if option_problem("max_length", o["max_length"], o) is None else None
    return None


def index_problem(idx: Any, n: int) -> tuple[type[Exception] | None, list[int]]:
    """The error a malformed index argument must raise, else the indices (negatives wrapped)."""
    if isinstance(idx, torch.Tensor):
        idx = idx.numpy()
    try:
        arr = np.asarray(idx)
    except ValueError:
        return TypeError, []
    if arr.dtype == object or (arr.size and arr.dtype.kind not in "iu"):
        return TypeError, []
    if arr.ndim != 1:
        return ValueError, []
    return None, [i + n if i < 0 else i for i in arr.astype(np.int64).tolist()]


@st.composite
def fuzz_indices(draw: Any, n: int) -> Any:
    base = draw(st.lists(st.integers(-2 * n, 2 * n), max_size=8))
    kind = draw(
        st.sampled_from(
            ["list"] * 4
            + ["int64", "int8", "uint64", "float", "bool", "tensor"]
            + ["scalar", "2d", "empty_float", "str", "none", "nested", "huge"]
        )
    )
    return {
        "list": lambda: base,
        "int64": lambda: np.array(base, np.int64),
        "int8": lambda: np.array(base, np.int8),
        "uint64": lambda: np.array([abs(x) for x in base], np.uint64),
        "float": lambda: np.array(base, np.float64),
        "bool": lambda: [bool(x % 2) for x in base],
        "tensor": lambda: torch.tensor(base, dtype=torch.int64),
        "scalar": lambda: 0,
        "2d": lambda: np.array([base, base]),
        "empty_float": lambda: np.zeros(0),
        "str": lambda: "0",
        "none": lambda: None,
        "nested": lambda: [base, [1]],
        "huge": lambda: [2**64],
    }[kind]()


FUZZ_ROWS: Rows = [
    ([1, 2, 3], [4, 5], [6]),
    ([7], [8, 9, 10, 11], [12, 13]),
    ([14, 15, 16, 17, 18, 19], [20], [21, 22, 23]),
    ([45], [46], [47, 48, 49]),
]


def expect_collate(idx: Any, o: dict[str, Any], batch: PairBatch | None, err: Any) -> None:
    """Check one ``collate`` outcome on FUZZ_ROWS against the documented argument checks."""
    n = len(FUZZ_ROWS)
    bad = [(k, option_problem(k, v, o)) for k, v in o.items()]
    bad = [(k, e) for k, e in bad if e is not None]
    itype, indices = index_problem(idx, n)
    if itype is not None:
        bad.append(("indices", itype))
    if len(bad) > 1:
        assert err is not None, "invalid options accepted"
        return
    if bad:
        name, etype = bad[0]
        assert isinstance(err, (TypeError, ValueError) if name == "indices" else etype), err
        assert_names(err, name)
        return
    if refused(err, o, "indices"):
        return
    for k, i in enumerate(indices):
        if not 0 <= i < n:
            where = f"indices[{k}]"
        else:
            where = pair_error([[list(x)] for x in FUZZ_ROWS[i]], o["vocab_size"])
            where = where and where.replace("[0]", f"[{i}]")
        if where is not None:
            assert isinstance(err, ValueError), err
            assert_names(err, where)
            return
    assert err is None, err
    check_batch(batch, FUZZ_ROWS, indices, o)


@settings(max_examples=120, deadline=None)
@given(data=st.data())
def test_fuzz_collate_indices(data: Any) -> None:
    idx = data.draw(fuzz_indices(len(FUZZ_ROWS)))
    o = data.draw(fuzz_options(OPTION_POOLS, most=0))
    note(f"indices={idx!r} options={o}")
    expect_collate(idx, o, *call(dataset_of(FUZZ_ROWS).collate, idx, **o))


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_fuzz_collate_options(data: Any) -> None:
    n = len(FUZZ_ROWS)
    idx = data.draw(st.lists(st.integers(-n, n - 1), min_size=1, max_size=8))
    o = data.draw(fuzz_options(OPTION_POOLS))
    note(f"indices={idx!r} options={o}")
    expect_collate(idx, o, *call(dataset_of(FUZZ_ROWS).collate, idx, **o))


@pytest.mark.parametrize(
    ("layout", "multiple", "indices"),
    [("padded", 2**61, [0]), ("prefix_shared", I64_MAX, [0]), ("packed", 2**62, [0, 1])],
)
def test_collate_huge_pad_to_multiple_of(layout: str, multiple: int, indices: list[int]) -> None:
    """A row length no allocation can hold is refused with a ValueError naming the argument."""
    _, err = call(
        dataset_of(FUZZ_ROWS).collate, indices, layout=layout, pad_to_multiple_of=multiple
    )
    assert isinstance(err, ValueError), repr(err)
    assert "pad_to_multiple_of:" in str(err) or "indices:" in str(err), repr(err)


def test_collate_unallocatable_rows_do_not_abort_the_process() -> None:
    """A padded length beyond any address space is an error, not an aborted interpreter."""
    code = (
        "from rlox.data import PreferenceDataset\n"
        "ds = PreferenceDataset.from_lists([[1]], [[2]], [[3]])\n"
        "try:\n"
        "    ds.collate([0], pad_to_multiple_of=2**52)\n"
        "except ValueError as e:\n"
        "    assert 'pad_to_multiple_of:' in str(e) or 'indices:' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('collated a batch of 2**52 columns')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-1500:]}"


@pytest.mark.parametrize("indices", [[[0, 1], [2]], [[], [1]]])
def test_collate_ragged_indices_name_the_argument(indices: Any) -> None:
    _, err = call(dataset_of(FUZZ_ROWS).collate, indices)
    assert err is not None and "indices" in str(err), repr(err)


PLAN_POOLS: dict[str, tuple[list[Any], list[Any]]] = {
    "batch_size": ([1, 2, 3], [None, 0, -1, True, 2.0, "2", *HUGE]),
    "max_tokens": ([10, 40, 200], [None, 1, 0, -5, False, 1.5, *HUGE]),
    "shuffle": ([True, False], [0, 1]),
    "seed": ([0, 1, 12345], [-1, I64_MAX, 2**64, None, 1.0, "1"]),
    "epoch": ([0, 1, 7], [-1, I64_MAX, 2**64, 2.5]),
    "group_by_length": ([True, False], [True]),
    "drop_last": ([False, False, True], [False]),
    "rank": ([0, 0, 1], [2, 3, 5, -1, True, 1.0, I64_MAX]),
    "world_size": ([1, 2, 3, 4], [0, -1, False, 2.0, 2**62, I64_MAX, 2**64]),
    "group_batches": ([1, 2, 64], [0, -1, True, I64_MAX]),
    **{
        k: OPTION_POOLS[k]
        for k in (
            "layout",
            "max_length",
            "max_prompt_length",
            "truncation",
            "pad_to_multiple_of",
            "pack_length",
        )
    },
}


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_fuzz_batches(data: Any) -> None:
    rows = FUZZ_ROWS * 3
    ds = dataset_of(rows)
    o = data.draw(fuzz_options(PLAN_POOLS))
    if data.draw(st.integers(0, 9)):
        o[data.draw(st.sampled_from(["batch_size", "max_tokens"]))] = None
    note(f"options={o}")
    plan, err = call(ds.batches, **o)
    flags = ("shuffle", "group_by_length", "drop_last")
    bad = [(k, option_problem(k, v, o)) for k, v in o.items() if k not in flags]
    bad = [(k, e) for k, e in bad if e is not None]
    if (o["batch_size"] is None) == (o["max_tokens"] is None):
        bad.append(("batch_size", ValueError))
    if not {k for k, _ in bad} & {"rank", "world_size"} and o["rank"] >= o["world_size"]:
        bad.append(("rank", ValueError))
    if len(bad) > 1:
        assert err is not None, "invalid options accepted"
        return
    if bad:
        name, etype = bad[0]
        assert isinstance(err, etype), (name, etype, err)
        assert_names(err, name)
        return
    ws = o["world_size"]
    lengths = [tuple(map(len, r)) for r in rows]
    keys = pair_keys(lengths, o)
    if refused(err, o):
        return
    if err is not None:
        assert isinstance(err, ValueError) and not o["drop_last"], err
        assert not plan_feasible(keys, ws, o["max_tokens"], o), (
            f"ValueError although a plan exists: {err}"
        )
        return
    if ws <= 4:
        plans = [plan if r == o["rank"] else ds.batches(**{**o, "rank": r}) for r in range(ws)]
        check_plans(len(rows), lengths, {**o, "shuffle": bool(o["shuffle"])}, plans)
    else:
        assert (np.diff(plan.offsets) > 0).all()
        assert len(set(plan.indices.tolist())) == len(plan.indices)


# --------------------------------------------------------------------------------------------
# Store save / load


def canonical(rows: Rows) -> dict[str, np.ndarray]:
    """The six arrays a saved store must hold: int32 values and int64 offsets from 0."""
    out = {}
    for k, name in enumerate(COLUMNS):
        values, offsets = flat([r[k] for r in rows])
        out[f"{name}_values"], out[f"{name}_offsets"] = values.astype(np.int32), offsets
    return out


def assert_store(ds: PreferenceDataset, rows: Rows) -> None:
    want = canonical(rows)
    got = ds.arrays
    assert set(got) == set(want)
    for name, a in want.items():
        assert got[name].dtype == a.dtype, (name, got[name].dtype)
        np.testing.assert_array_equal(got[name], a, err_msg=name)
    assert len(ds) == len(rows)
    for i, r in enumerate(rows):
        assert tuple(ds[i][c].tolist() for c in COLUMNS) == r


def header_crc(meta: dict[str, Any]) -> int:
    body = {k: v for k, v in meta.items() if k != "header_crc32"}
    blob = json.dumps(body, sort_keys=True).encode()
    return zlib.crc32(blob) if blob else 0


saved_ids = st.lists(
    st.integers(0, VOCAB) | st.sampled_from([2**31 - 1, 2**31]), min_size=1, max_size=8
)
saved_rows = st.lists(st.tuples(saved_ids, saved_ids, saved_ids), max_size=8)


@st.composite
def build_store(draw: Any, rows: Rows) -> PreferenceDataset:
    """The same pairs through different constructors (int32/int64, offset views, selections)."""
    how = draw(st.sampled_from(["lists", "arrays", "shifted", "select"]))
    if how == "lists" or not rows:
        return PreferenceDataset.from_lists(*columns_of(rows))
    arrays = []
    for k in range(3):
        values, offsets = flat([r[k] for r in rows])
        if how == "shifted":
            values, offsets = np.concatenate([[5, 2**40], values]), offsets + 2
        arrays += [values.astype(draw(st.sampled_from(["int64", "uint32"]))), offsets]
    ds = PreferenceDataset.from_arrays(*arrays)
    return ds.select(list(range(len(rows)))) if how == "select" else ds


@FILES
@given(rows=saved_rows, data=st.data())
def test_save_load_roundtrip(rows: Rows, data: Any) -> None:
    """Saved stores load back exactly (mapped or not, verified or not, pickled, and after their
    mapped pages are released); ids beyond int32 are refused without leaving files behind."""
    rows = [tuple(map(list, r)) for r in rows]
    ds = data.draw(build_store(rows))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store"
        _, err = call(ds.save, path)
        where = pair_error([[r[k] for r in rows] for k in range(3)], 2**31)
        if where is not None:
            assert isinstance(err, ValueError), err
            assert_names(err, where)
            assert not path.exists() or not any(path.iterdir()), "a failed save left files behind"
            return
        assert err is None, err
        assert sorted(os.listdir(path)) == ["rlox_store.json", "tokens.bin"]
        for mmap in (True, False):
            for verify in (True, False, None):
                loaded = PreferenceDataset.load(path, mmap=mmap, verify=verify)
                assert_store(loaded, rows)
                assert_store(pickle.loads(pickle.dumps(loaded)), rows)
                loaded.verify()
        mapped = PreferenceDataset.load(path, max_resident=0)
        every = list(range(len(rows)))
        for layout in LAYOUTS:
            for _ in range(4):  # pages are released every few calls past the budget
                o = {"layout": layout, "max_length": None}
                check_batch(mapped.collate(every, **o), rows, every, o)
        assert_store(mapped, rows)


CORRUPTIONS = (
    "truncate",
    "extend",
    "flip",
    "flip_section",
    "edit_number",
    "edit_number_fixed_crc",
    "delete_data",
    "delete_meta",
    "garbage_meta",
)


def corrupt(path: Path, kind: str, data: Any) -> bool:
    """Damage a saved store; True when its data sections can no longer be what was saved."""
    tokens, meta_file = path / "tokens.bin", path / "rlox_store.json"
    raw = bytearray(tokens.read_bytes())
    meta = json.loads(meta_file.read_text())
    if kind == "truncate":
        tokens.write_bytes(raw[: data.draw(st.integers(0, max(len(raw) - 1, 0)))])
    elif kind == "extend":
        tokens.write_bytes(raw + bytes(data.draw(st.integers(1, 70))))
    elif kind in ("flip", "flip_section"):
        spans = [
            (s["offset"], s["offset"] + s["count"] * np.dtype(s["dtype"]).itemsize)
            for s in meta["sections"]
            if s["count"]
        ]
        if kind == "flip_section":
            a, b = data.draw(st.sampled_from(spans))
            at = data.draw(st.integers(a, b - 1))
        else:
            at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] ^= data.draw(st.integers(1, 255))
        tokens.write_bytes(raw)
        return any(a <= at < b for a, b in spans)
    elif kind.startswith("edit_number"):
        targets = ["num_pairs", "data_bytes", "version"] + [
            (k, f) for k in range(6) for f in ("offset", "count", "crc32")
        ]
        t = data.draw(st.sampled_from(targets))
        old = meta[t] if isinstance(t, str) else meta["sections"][t[0]][t[1]]
        new = data.draw(
            st.sampled_from([old + 1, old - 1, old + 8, old + 64, -1, 0, 2**70, old + 0.5])
        )
        if isinstance(t, str):
            meta[t] = new
        else:
            meta["sections"][t[0]][t[1]] = new
        if kind == "edit_number_fixed_crc":
            meta["header_crc32"] = header_crc(meta)
        meta_file.write_text(json.dumps(meta))
        return False
    elif kind == "delete_data":
        tokens.unlink()
    elif kind == "delete_meta":
        meta_file.unlink()
    else:
        meta_file.write_bytes(data.draw(st.sampled_from([b"", b"{", b"[]", b"\xff\xfe", b"null"])))
    return True


def exercise(ds: PreferenceDataset) -> None:
    """Every read path of a possibly corrupted store: only ValueError/TypeError may escape."""
    n = len(ds)
    verified = call(ds.verify)[1] is None
    for layout in LAYOUTS:
        _, err = call(ds.collate, list(range(n)), layout=layout, max_length=None)
        if verified:
            assert err is None, f"verify() passed but collate failed: {err}"
    call(ds.batches, batch_size=2)
    call(ds.batches, max_tokens=64, layout="packed")
    call(ds.stats, 2)
    call(ds.select, list(range(n)))
    call(ds.lengths)
    for i in range(n):
        call(ds.__getitem__, i)


@FILES
@given(
    rows=saved_rows.map(lambda rs: [r for r in rs if max(map(max, r)) < 2**31]),
    kind=st.sampled_from(CORRUPTIONS),
    data=st.data(),
)
def test_corrupted_store(rows: Rows, kind: str, data: Any) -> None:
    """A damaged store fails ``load(verify=True)`` with a ValueError naming path (or loads
    unchanged when only padding or a no-op header field was touched); without verification it
    may load, and then every read fails cleanly."""
    rows = [tuple(map(list, r)) for r in rows]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store"
        dataset_of(rows).save(path)
        damaged = corrupt(path, kind, data)
        note(f"damaged data={damaged}")
        for mmap in (False, True):
            ds, err = call(PreferenceDataset.load, path, mmap=mmap, verify=True)
            if err is not None:
                assert isinstance(err, ValueError) and "path" in str(err), err
            else:
                assert not damaged, "corruption not detected"
                assert_store(ds, rows)
            ds, err = call(PreferenceDataset.load, path, mmap=mmap, verify=False)
            if err is None:
                exercise(ds)
