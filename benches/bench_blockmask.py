"""FlexAttention BlockMask construction: rlox's Rust-built block lists against torch's
``create_block_mask`` on the same batch (CPU).

Usage: python benches/bench_blockmask.py [--pairs 8] [--repeats 5]

Batches of HH-like pairs (prompt median 100, responses 45 tokens, lognormal sigma 0.7), in the
``packed`` layout with rows of 2,048 and 8,192 tokens and in ``prefix_shared`` (one pair per row,
and several pairs per 2,048-token row). ``create_block_mask``
evaluates the same mask function (segment-causal plus prefix, from per-token arrays) over every
(query, key) pair of the batch; rlox lists the full and partial blocks in Rust from the batch's
``attn_segments`` and evaluates nothing. Prints the best of ``--repeats`` for each and the ratio.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.nn.attention.flex_attention import create_block_mask

from rlox import PreferenceDataset, _rlox
from rlox.attention_flex import block_mask


def pairs(n: int, seed: int) -> PreferenceDataset:
    rng = np.random.default_rng(seed)

    def lengths(median: float) -> np.ndarray:
        return np.clip(rng.lognormal(np.log(median), 0.7, n), 1, 1024).astype(int)

    cols = [[rng.integers(1, 8000, k).tolist() for k in lengths(m)] for m in (100, 45, 45)]
    return PreferenceDataset.from_lists(*cols, vocab_size=8000)


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def torch_mask(batch, block: int):
    rows, length = batch.input_ids.shape
    seg = np.ascontiguousarray(batch.attn_segments.numpy(), dtype=np.int32)
    spans = _rlox.flex_blocks(seg, rows, length, block, block)  # per-token arrays only
    start, p0, p1 = (
        torch.from_numpy(spans[k]) for k in ("seg_start", "prefix_start", "prefix_end")
    )

    def mask_mod(b, h, q, kv):
        return ((kv >= start[b, q]) & (kv <= q)) | ((kv >= p0[b, q]) & (kv < p1[b, q]))

    return lambda: create_block_mask(mask_mod, rows, None, length, length, device="cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, block 128")
    print(f"{'batch':<34} {'rows x L':>10} {'rlox ms':>9} {'torch ms':>9} {'ratio':>7}")
    cases = [
        ("packed, rows of 2048", args.pairs, "packed", 2048),
        ("packed, rows of 8192", 8 * args.pairs, "packed", 8192),
        ("prefix_shared", args.pairs, "prefix_shared", None),
        ("prefix_shared, rows of 2048", 8 * args.pairs, "prefix_shared", 2048),
    ]
    for name, n, layout, pack in cases:
        ds = pairs(n, seed=n)
        batch = ds.collate(np.arange(n), layout=layout, max_length=1024, pack_length=pack)
        rows, length = batch.input_ids.shape
        ours = best(lambda b=batch: block_mask(b, 128), args.repeats)
        theirs = best(torch_mask(batch, 128), args.repeats)
        label = f"{rows} x {length}"
        print(f"{name:<34} {label:>10} {ours * 1e3:9.2f} {theirs * 1e3:9.2f} {theirs / ours:6.1f}x")


if __name__ == "__main__":
    main()
