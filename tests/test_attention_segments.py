"""batch.attn_segments from the Rust collator against the dense attention mask."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlox import PreferenceDataset


def expand(segments: np.ndarray, rows: int, length: int) -> torch.Tensor:
    """(R, L, L) visibility of the segments: causal in each, plus its prefix; padding sees itself."""
    mask = torch.zeros(rows, length, length, dtype=torch.bool)
    covered = torch.zeros(rows, length, dtype=torch.bool)
    for row, q0, q1, p0, p1 in segments.tolist():
        for q in range(q0, q1):
            assert not covered[row, q], "a query position in two segments"
            covered[row, q] = True
            mask[row, q, q0 : q + 1] = True
            mask[row, q, p0:p1] = True
    idx = torch.arange(length)
    mask[:, idx, idx] |= ~covered
    return mask


ids = st.lists(st.integers(1, 30), min_size=1, max_size=9)


@settings(max_examples=60, deadline=None)
@given(
    pairs=st.lists(st.tuples(ids, ids, ids), min_size=1, max_size=6),
    layout=st.sampled_from(["packed", "prefix_shared"]),
    max_length=st.integers(4, 20),
    pack=st.one_of(st.none(), st.integers(20, 40)),
)
def test_segments_expand_to_the_dense_mask(pairs, layout, max_length, pack):
    prompts, chosen, rejected = (list(x) for x in zip(*pairs, strict=True))
    ds = PreferenceDataset.from_lists(prompts, chosen, rejected, vocab_size=32)
    # prefix_shared rows hold one pair, or with pack_length several (p c r <= 2 * max_length).
    pack_length = pack if layout == "packed" or pack is None else pack + max_length
    batch = ds.collate(
        np.arange(len(pairs)), layout=layout, max_length=max_length, pack_length=pack_length
    )
    segments = batch.attn_segments
    assert segments.dtype == torch.int32 and segments.shape[1] == 5
    rows, length = batch.input_ids.shape
    dense = batch.dense_attention_mask()[:, 0]
    assert torch.equal(expand(segments.numpy(), rows, length), dense)
    # Every real token is in exactly one segment; padding in none.
    covered = torch.zeros(rows, length, dtype=torch.int64)
    for row, q0, q1, _, _ in segments.tolist():
        covered[row, q0:q1] += 1
    assert torch.equal(covered, batch.attention_mask.long())


def test_padded_batches_have_no_segments():
    ds = PreferenceDataset.from_lists([[1, 2]], [[3]], [[4, 5]], vocab_size=8)
    assert ds.collate([0], layout="padded").attn_segments is None
    assert "attn_segments" not in ds.collate([0], layout="padded").keys()


def test_prefix_shared_segments_by_hand():
    ds = PreferenceDataset.from_lists([[1, 2]], [[3, 4, 5]], [[6, 7]], vocab_size=8)
    got = ds.collate([0], layout="prefix_shared").attn_segments.tolist()
    assert got == [[0, 0, 5, 0, 0], [0, 5, 7, 0, 2]]
