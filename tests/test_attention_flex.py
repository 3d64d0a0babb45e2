"""rlox.attention_flex: the Rust-built FlexAttention BlockMask against the dense mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_hf import gqa_llama

from rlox import PreferenceDataset, _rlox
from rlox.attention_flex import block_mask

ids = st.lists(st.integers(1, 30), min_size=1, max_size=12)


def batch_of(pairs, layout, max_length=24, pack=None, multiple=None):
    prompts, chosen, rejected = (list(x) for x in zip(*pairs, strict=True))
    ds = PreferenceDataset.from_lists(prompts, chosen, rejected, vocab_size=32)
    return ds.collate(
        np.arange(len(pairs)),
        layout=layout,
        max_length=max_length,
        pack_length=pack,
        pad_to_multiple_of=multiple,
    )


def dense_from_blocks(mask, rows: int, length: int) -> torch.Tensor:
    """Independent expansion: full blocks all True, partial blocks through the mask_mod."""
    size = mask.BLOCK_SIZE[0]
    out = torch.zeros(rows, length, length, dtype=torch.bool)
    q = torch.arange(length)[:, None]
    kv = torch.arange(length)[None, :]
    for b in range(rows):
        full = mask.mask_mod(torch.tensor(b), torch.tensor(0), q, kv)
        for qb in range(mask.kv_num_blocks.shape[2]):
            rows_q = slice(qb * size, (qb + 1) * size)
            for k in mask.full_kv_indices[b, 0, qb, : int(mask.full_kv_num_blocks[b, 0, qb])]:
                out[b, rows_q, int(k) * size : (int(k) + 1) * size] = True
            for k in mask.kv_indices[b, 0, qb, : int(mask.kv_num_blocks[b, 0, qb])]:
                cols = slice(int(k) * size, (int(k) + 1) * size)
                out[b, rows_q, cols] = full[rows_q, cols]
    return out


@settings(max_examples=40, deadline=None)
@given(
    pairs=st.lists(st.tuples(ids, ids, ids), min_size=1, max_size=5),
    layout=st.sampled_from(["packed", "prefix_shared"]),
    block=st.sampled_from([1, 2, 3, 8, 16, 128]),
    pack=st.one_of(st.none(), st.integers(24, 60)),
)
def test_block_mask_equals_the_dense_mask(pairs, layout, block, pack):
    batch = batch_of(pairs, layout, pack=pack if layout == "packed" or pack is None else 2 * pack)
    rows, length = batch.input_ids.shape
    mask = block_mask(batch, block_size=block)
    got = dense_from_blocks(mask, rows, length)
    assert torch.equal(got, batch.dense_attention_mask()[:, 0])
    # A full block really is full and a partial one really partial.
    for b in range(rows):
        dense = batch.dense_attention_mask()[b, 0]
        for qb in range(mask.kv_num_blocks.shape[2]):
            sl = slice(qb * block, (qb + 1) * block)
            for k in mask.kv_indices[b, 0, qb, : int(mask.kv_num_blocks[b, 0, qb])]:
                tile = dense[sl, int(k) * block : (int(k) + 1) * block]
                assert tile.any() and not tile.all()


def test_bad_segments_name_the_index():
    seg = np.array([[0, 0, 4, 0, 0], [0, 3, 6, 0, 0]], dtype=np.int32)
    with pytest.raises(ValueError, match=r"attn_segments.*1"):
        _rlox.flex_blocks(seg, 1, 8)
    with pytest.raises(TypeError, match="attn_segments"):
        _rlox.flex_blocks(seg.astype(np.int64), 1, 8)
    with pytest.raises(ValueError, match="block_size"):
        _rlox.flex_blocks(seg[:1], 1, 8, 0, 0)


def test_flex_forward_matches_the_dense_mask():
    """TinyCausalLM with the BlockMask (CPU, no grad; the first call compiles)."""
    from rlox.models import TinyCausalLM, TinyLMConfig

    torch.manual_seed(0)
    model = TinyCausalLM(
        TinyLMConfig(vocab_size=32, d_model=16, n_heads=2, n_layers=2, max_seq_len=64)
    ).eval()
    pairs = [([1, 2, 3], [4, 5], [6, 7, 8, 9]), ([3, 3], [2, 2, 2], [5])]
    batch = batch_of(pairs, "prefix_shared")
    rows_pos = (batch.plan_row, batch.plan_position)
    with torch.no_grad():
        logits = model(
            batch.input_ids,
            attention_mask=block_mask(batch, 16),
            position_ids=batch.position_ids,
            logits_at=rows_pos,
        )
        want = model(
            batch.input_ids,
            attention_mask=batch.dense_attention_mask(),
            position_ids=batch.position_ids,
            logits_at=rows_pos,
        )
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)


LLAMA_VOCAB = 32


@pytest.fixture(scope="module")
def llamas():
    """One tiny Llama twice: with FlexAttention and (same weights) with sdpa."""
    import copy

    flex = gqa_llama(LLAMA_VOCAB, "flex_attention")
    sdpa = copy.deepcopy(flex)
    sdpa.set_attn_implementation("sdpa")
    return flex, sdpa


def alone(model, prompt: list[int], completion: list[int]) -> float:
    """Sum of log p(completion | prompt) with the sequence run on its own."""
    with torch.no_grad():
        logp = model(torch.tensor([prompt + completion])).logits[0].log_softmax(-1)
    n = len(prompt)
    return sum(float(logp[n - 1 + k, t]) for k, t in enumerate(completion))


def test_hf_llama_flex_matches_each_sequence_alone(llamas):
    """Packed and several-pairs-per-row prefix_shared batches, one flex forward each (CPU)."""
    flex, sdpa = llamas
    rng = np.random.default_rng(5)
    pairs = [
        tuple(rng.integers(1, LLAMA_VOCAB, size=n).tolist() for n in sizes)
        for sizes in [(5, 3, 6), (2, 7, 1), (9, 2, 2), (1, 1, 4), (4, 6, 3)]
    ]
    b = len(pairs)
    want = [alone(sdpa, p, c) for p, c, _ in pairs] + [alone(sdpa, p, r) for p, _, r in pairs]
    # Both batches are (2, 48), so the second flex call reuses the first one's compiled kernel.
    for layout in ["packed", "prefix_shared"]:
        batch = batch_of(pairs, layout, max_length=20, pack=40, multiple=16)
        assert batch.input_ids.shape == (2, 48)
        with torch.no_grad():
            logits = flex(
                batch.input_ids,
                attention_mask=block_mask(batch, block_size=16),
                position_ids=batch.position_ids,
            ).logits
        token = logits[batch.plan_row, batch.plan_position].log_softmax(-1)
        token = token.gather(1, batch.plan_target[:, None])[:, 0]
        got = torch.zeros(2 * b).index_add_(0, batch.plan_side * b + batch.plan_pair, token)
        torch.testing.assert_close(got, torch.tensor(want), rtol=0, atol=1e-5)
