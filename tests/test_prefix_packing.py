"""prefix_shared with pack_length: several p c r triples per row, same log-probs as alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_hf import gqa_llama

from rlox import PreferenceDataset

VOCAB = 40
ids = st.lists(st.integers(1, VOCAB - 1), min_size=1, max_size=8)


def dataset(pairs) -> PreferenceDataset:
    prompts, chosen, rejected = (list(x) for x in zip(*pairs, strict=True))
    return PreferenceDataset.from_lists(prompts, chosen, rejected, vocab_size=VOCAB)


@settings(max_examples=60, deadline=None)
@given(
    pairs=st.lists(st.tuples(ids, ids, ids), min_size=1, max_size=7),
    pack=st.integers(24, 50),
)
def test_rows_hold_whole_triples(pairs, pack):
    batch = dataset(pairs).collate(
        np.arange(len(pairs)), layout="prefix_shared", max_length=None, pack_length=pack
    )
    rows, length = batch.input_ids.shape
    assert length <= pack and rows <= len(pairs)
    ends, where = batch.segment_ends.tolist(), batch.pair_rows.tolist()
    for j, (p, c, r) in enumerate(pairs):
        row, (pe, ce, re) = where[j], ends[j]
        start = pe - len(p)
        assert ce == pe + len(c)
        tokens = batch.input_ids[row, start:re].tolist()
        assert tokens == p + c + r
        want = list(range(len(p) + len(c))) + list(range(len(p), len(p) + len(r)))
        assert batch.position_ids[row, start:re].tolist() == want
        assert (batch.sequence_ids[row, start:re] == j).all()
    assert int(batch.attention_mask.sum()) == sum(len(p) + len(c) + len(r) for p, c, r in pairs)


def test_without_pack_length_one_pair_per_row():
    pairs = [([1, 2], [3], [4, 5]), ([6], [7, 8], [9])]
    batch = dataset(pairs).collate([0, 1], layout="prefix_shared")
    assert batch.input_ids.shape[0] == 2
    assert batch.pair_rows.tolist() == [0, 1]
    assert batch.segment_ends.tolist() == [[2, 3, 5], [1, 3, 4]]


def test_pair_longer_than_pack_length_names_it():
    pairs = [([1, 2, 3], [4, 5], [6, 7])]
    with pytest.raises(ValueError, match=r"pack_length.*pair 0"):
        dataset(pairs).collate([0], layout="prefix_shared", max_length=None, pack_length=6)


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return gqa_llama(VOCAB, "sdpa")


def alone(model, prompt: list[int], completion: list[int]) -> float:
    """Sum of log p(completion | prompt) with the sequence run on its own."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = model(ids).logits[0].float().log_softmax(-1)
    n = len(prompt)
    return sum(float(logp[n - 1 + k, t]) for k, t in enumerate(completion))


def test_packed_triples_match_each_sequence_alone(llama):
    rng = np.random.default_rng(3)
    pairs = [
        tuple(rng.integers(1, VOCAB, size=n).tolist() for n in sizes)
        for sizes in [(5, 3, 6), (2, 7, 1), (9, 2, 2), (1, 1, 4), (4, 6, 3), (3, 2, 8)]
    ]
    batch = dataset(pairs).collate(
        np.arange(len(pairs)), layout="prefix_shared", max_length=16, pack_length=32
    )
    assert batch.input_ids.shape[0] < len(pairs)  # several pairs share a row
    with torch.no_grad():
        logits = llama(
            batch.input_ids,
            attention_mask=batch.dense_attention_mask(),
            position_ids=batch.position_ids,
        ).logits
    token = logits[batch.plan_row, batch.plan_position].log_softmax(-1)
    token = token.gather(1, batch.plan_target[:, None])[:, 0]
    b = len(pairs)
    got = torch.zeros(2 * b).index_add_(0, batch.plan_side * b + batch.plan_pair, token)
    want = [alone(llama, p, c) for p, c, _ in pairs] + [alone(llama, p, r) for p, _, r in pairs]
    torch.testing.assert_close(got, torch.tensor(want), rtol=0, atol=1e-5)


@pytest.mark.parametrize("route", ["dense", "varlen"])
def test_sequence_logps_through_each_attention_route(llama, route):
    from rlox.train.logps import accepted_kwargs, sequence_logps

    rng = np.random.default_rng(1)
    pairs = [
        tuple(rng.integers(1, VOCAB, size=int(rng.integers(1, 9))).tolist() for _ in range(3))
        for _ in range(7)
    ]
    batch = dataset(pairs).collate(
        np.arange(len(pairs)), layout="prefix_shared", max_length=16, pack_length=32
    )
    assert batch.input_ids.shape[0] < len(pairs)
    with torch.no_grad():
        got = sequence_logps(llama, batch, accepted_kwargs(llama, route))
    want = [alone(llama, p, c) for p, c, _ in pairs] + [alone(llama, p, r) for p, _, r in pairs]
    torch.testing.assert_close(got, torch.tensor(want), rtol=0, atol=1e-5)
