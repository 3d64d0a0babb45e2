"""rlox.train.head: the LM head in chunks of rows, against the plain log_softmax of full logits."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_hf import make_model
from torch import nn

import rlox
from rlox import PreferenceDataset
from rlox.data import LAYOUTS
from rlox.models import TinyCausalLM, TinyLMConfig
from rlox.train.head import LOGITS_BUDGET, chunk_rows, head_token_logps
from rlox.train.logps import sequence_stats

VOCAB = 64
PROMPTS = [[5, 9, 2], [7, 1, 1, 3, 8, 4], [11], [6, 6, 2, 9]]
CHOSEN = [[3, 4, 12, 9, 1], [2], [8, 8, 5], [10, 3]]
REJECTED = [[7], [9, 13, 4, 4], [1, 2, 3, 4, 5, 6], [2, 2, 2]]
B = len(PROMPTS)
IDS = SimpleNamespace(bos_token_id=0, eos_token_id=0, pad_token_id=0)


def plain(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor):
    """Independent reference: full (N, V) logits, log_softmax, and log sum_v p(v)^2."""
    logp = torch.log_softmax(head(hidden).float(), -1)
    token = logp.gather(1, targets[:, None]).squeeze(1)
    return token, (token - torch.logsumexp(2 * logp, -1)).detach()


def grads(out: torch.Tensor, weights: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad((out * weights).sum(), tensors))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40),
    vocab=st.integers(2, 90),
    width=st.integers(1, 12),
    chunk=st.integers(1, 50),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_chunked_equals_full_logits(n, vocab, width, chunk, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, width, generator=gen, requires_grad=True)
    head = nn.Linear(width, vocab, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, width, generator=gen))
        if bias:
            head.bias.copy_(torch.randn(vocab, generator=gen))
    targets = torch.randint(0, vocab, (n,), generator=gen)
    upstream = torch.randn(n, generator=gen)
    params = [hidden, head.weight] + ([head.bias] if bias else [])

    want, want_stat = plain(hidden, head, targets)
    got, got_stat = head_token_logps(hidden, head, targets, chunk, wpo=True)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got_stat, want_stat, rtol=1e-6, atol=1e-5)
    assert not got_stat.requires_grad
    for g, w in zip(grads(got, upstream, *params), grads(want, upstream, *params), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_no_grad_inputs_keep_no_graph():
    head = nn.Linear(4, 10).requires_grad_(False)
    out, stat = head_token_logps(torch.randn(6, 4), head, torch.arange(6), 4)
    assert stat is None and not out.requires_grad and out.grad_fn is None


def test_chunk_rows_rule():
    assert chunk_rows(None, 128_000) == LOGITS_BUDGET // 128_000 == 131
    assert chunk_rows(None, 8) == LOGITS_BUDGET // 8
    assert chunk_rows(None, LOGITS_BUDGET * 4) == 1
    assert chunk_rows(7, 128_000) == 7
    assert chunk_rows(0, 128_000) == 0


def test_bf16_autocast_matches_plain_head():
    """Under autocast the chunked head computes its logits in bf16, as ``head(hidden)`` does."""
    torch.manual_seed(0)
    hidden = torch.randn(12, 16, requires_grad=True)
    head = nn.Linear(16, 50)
    targets = torch.randint(0, 50, (12,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, _ = plain(hidden, head, targets)
        got, _ = head_token_logps(hidden, head, targets, 5)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)  # bf16 logits differ ~1e-2
    gw = grads(want, torch.ones(12), hidden, head.weight)
    gg = grads(got, torch.ones(12), hidden, head.weight)
    for g, w in zip(gg, gw, strict=True):
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2)


def _models():
    tiny = TinyCausalLM(
        TinyLMConfig(vocab_size=VOCAB, d_model=16, n_heads=2, n_layers=2, max_seq_len=64)
    )
    return {
        "tiny": tiny.eval(),
        "gpt2": make_model("gpt2", VOCAB, IDS).eval(),  # head tied to the embeddings
        "llama": make_model("llama", VOCAB, IDS).eval(),
    }


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(3)
    return _models()


@pytest.fixture(scope="module")
def dataset() -> PreferenceDataset:
    return PreferenceDataset.from_lists(PROMPTS, CHOSEN, REJECTED, vocab_size=VOCAB)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("arch", ["tiny", "gpt2", "llama"])
def test_sequence_logps_and_grads_chunked_vs_unchunked(models, dataset, arch, layout):
    model = models[arch]
    pack = 12 if layout == "packed" else None
    batch = dataset.collate(np.arange(B), layout=layout, max_length=12, pack_length=pack)
    results = []
    for chunk in (0, 3):
        model.zero_grad()
        stats = sequence_stats(model, batch, wpo=True, logits_chunk_size=chunk)
        (stats.logps * torch.linspace(-1, 1, 2 * B)).sum().backward()
        g = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        results.append((stats.logps.detach(), stats.wpo_log_weights, g))
    (lp0, w0, g0), (lp1, w1, g1) = results
    torch.testing.assert_close(lp1, lp0, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(w1, w0, rtol=1e-6, atol=1e-5)
    assert g0.keys() == g1.keys() and g0
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-6, msg=k)


def test_chunk_is_used_where_the_head_splits(models, dataset, monkeypatch):
    """The chunked function really runs (and the unchunked head call does not) for chunk > 0."""
    import rlox.train.head as head_module

    calls = []
    original = head_module._ChunkedLogps.apply
    monkeypatch.setattr(
        head_module._ChunkedLogps, "apply", lambda *a: calls.append(a[4]) or original(*a)
    )
    batch = dataset.collate(np.arange(B), layout="padded", max_length=12)
    for arch in ("tiny", "gpt2", "llama"):
        sequence_stats(models[arch], batch, logits_chunk_size=5)
    assert calls == [5, 5, 5]
    sequence_stats(models["tiny"], batch, logits_chunk_size=0)
    assert calls == [5, 5, 5]


def test_train_step_chunked_equals_unchunked(dataset):
    torch.manual_seed(5)
    policy = make_model("llama", VOCAB, IDS)
    ref = copy.deepcopy(policy).eval()
    batch = dataset.collate(np.arange(B), layout="prefix_shared", max_length=12)
    runs = []
    for chunk in (0, 7):
        model = copy.deepcopy(policy)
        trainer = rlox.DPO(model, ref, learning_rate=1e-2, logits_chunk_size=chunk)
        losses = [trainer.train_step(batch)["loss"] for _ in range(3)]
        runs.append((losses, {k: v.clone() for k, v in model.state_dict().items()}))
    (l0, s0), (l1, s1) = runs
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for k in s0:
        # Adam turns float32 rounding of near-zero gradients into ~1e-6 weight differences;
        # each step moves weights by ~lr = 1e-2.
        torch.testing.assert_close(s1[k], s0[k], rtol=0, atol=1e-5, msg=k)


@pytest.mark.parametrize(
    ("value", "exc", "pattern"),
    [(-1, ValueError, "^logits_chunk_size: must be >= 0"), (2.5, TypeError, "^logits_chunk_size")],
)
def test_bad_logits_chunk_size(value, exc, pattern):
    model = TinyCausalLM(TinyLMConfig(vocab_size=VOCAB, d_model=8, n_heads=2, n_layers=1))
    with pytest.raises(exc, match=pattern):
        rlox.DPO(model, copy.deepcopy(model), logits_chunk_size=value)
