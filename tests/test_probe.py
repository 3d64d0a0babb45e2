"""The route probe: fall back where a fast path disagrees with the model, refuse where asked.

Each test builds a model whose fast path is wrong in a known way and checks that rlox notices:
an unknown logit transform, per-segment attention that gives wrong numbers, a model whose
layers drop forward keywords under gradient checkpointing. Positions beyond a model's limit are
refused in every entry point.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import transformers
from tiny_hf import gqa_llama

import rlox.attention_varlen as varlen
from rlox import DPO, PreferenceDataset
from rlox.train import probe
from rlox.train.logps import accepted_kwargs, resolve_route, sequence_logps

VOCAB = 64


Pairs = tuple[list[list[int]], list[list[int]], list[list[int]]]


def _pairs(n: int = 3, long: int = 0) -> Pairs:
    g = torch.Generator().manual_seed(3)

    def ids(k: int) -> list[int]:
        return torch.randint(0, VOCAB, (k,), generator=g).tolist()

    return (
        [ids(3 + i) for i in range(n)],
        [ids(4 + long) for _ in range(n)],
        [ids(2 + i) for i in range(n)],
    )


def _dataset(n: int = 3, long: int = 0) -> PreferenceDataset:
    return PreferenceDataset.from_lists(*_pairs(n, long))


def _alone(model, pairs: Pairs) -> torch.Tensor:
    """(2B,) completion log-prob sums, each sequence alone through the model's own forward."""
    prompts, chosen, rejected = pairs
    sums = []
    for side in (chosen, rejected):
        for p, c in zip(prompts, side, strict=True):
            ids = torch.tensor([p + c])
            logps = torch.log_softmax(model(ids).logits[0].double(), -1)
            sums.append(logps[torch.arange(len(p) - 1, len(ids[0]) - 1), ids[0, len(p) :]].sum())
    return torch.stack(sums)


class _ScaledLlama(transformers.LlamaForCausalLM):
    """Llama whose forward doubles its logits: a transform rlox does not know."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out


def test_unknown_logit_transform_runs_the_full_forward_with_a_warning():
    base = gqa_llama(VOCAB, "sdpa").double()
    model = _ScaledLlama(base.config).double()
    model.load_state_dict(base.state_dict())
    dataset = _dataset()
    with torch.no_grad():
        want = _alone(model, _pairs())
    with pytest.warns(UserWarning, match="_ScaledLlama: the LM head .* full forward"):
        route = resolve_route(model, "packed", accepted_kwargs(model))
    assert route == probe.Route("varlen", split=False)
    for layout in ("padded", "packed", "prefix_shared"):
        got = sequence_logps(model, dataset.collate(range(3), layout=layout))
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_known_transform_stays_in_the_chunked_head():
    config = transformers.GraniteConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, logits_scaling=4.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GraniteForCausalLM(config).double()
    dataset = _dataset()
    with torch.no_grad():
        want = _alone(model, _pairs())
    assert resolve_route(model, "prefix_shared", accepted_kwargs(model)).split
    got = sequence_logps(model, dataset.collate(range(3), layout="prefix_shared"))
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def _broken_segments(monkeypatch):
    real = varlen.segment_attention

    def wrong(query, key, value, plan, **kwargs):
        return real(query, key, value, plan, **kwargs) * 1.5

    monkeypatch.setattr(varlen, "segment_attention", wrong)


def test_auto_falls_back_and_logs_why(monkeypatch, caplog):
    _broken_segments(monkeypatch)
    model = gqa_llama(VOCAB, "sdpa").double()
    dataset = _dataset()
    with caplog.at_level(logging.INFO, logger="rlox"):
        got = sequence_logps(model, dataset.collate(range(3), layout="packed"))
    assert resolve_route(model, "packed", accepted_kwargs(model)).attention == "dense"
    assert "packed varlen on LlamaForCausalLM is not exact: log-probs differ" in caplog.text
    with torch.no_grad():
        want = _alone(model, _pairs())
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_an_explicit_route_that_disagrees_is_refused(monkeypatch):
    _broken_segments(monkeypatch)
    model = gqa_llama(VOCAB, "sdpa").double()
    trainer = DPO(model, copy.deepcopy(model), attention="varlen")
    batch = _dataset().collate(range(3), layout="prefix_shared")
    with pytest.raises(
        ValueError,
        match=r"LlamaForCausalLM cannot run the prefix_shared layout exactly with "
        r"attention='varlen'.*varlen \(split head\): log-probs differ from the model's own "
        r"forward by [0-9.e-]+",
    ):
        trainer.train_step(batch)
    with pytest.raises(ValueError, match="prefix_shared layout"):
        trainer.fit(_dataset(), layout="prefix_shared", batch_size=2, progress=False)


def _falcon(checkpointing: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.FalconConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_kv_heads=2, new_decoder_architecture=True, max_position_embeddings=128,
    )  # fmt: skip
    model = transformers.FalconForCausalLM(config).double()
    if checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    return model


@pytest.mark.parametrize("checkpointing", [False, True])
def test_layers_that_drop_keywords_get_the_plan_from_the_block(checkpointing):
    model = _falcon(checkpointing)
    dataset = _dataset()
    with torch.no_grad():
        want = _alone(model, _pairs())
    route = resolve_route(model, "packed", accepted_kwargs(model))
    # Falcon's layers do not pass attn_segments on: the block hands them the plan, which the
    # forward recomputed by gradient checkpointing would not see, so it takes the dense mask.
    assert route.attention == ("dense" if checkpointing else "varlen")
    model.train()
    got = sequence_logps(model, dataset.collate(range(3), layout="packed"))
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    got.sum().backward()
    alone = _falcon(False)
    alone.load_state_dict(model.state_dict())
    _alone(alone, _pairs()).sum().backward()
    for (n, p), q in zip(model.named_parameters(), alone.parameters(), strict=True):
        err = float((p.grad - q.grad).abs().max() / q.grad.abs().max())
        assert err <= 1e-6, f"{n}: off by {err:.2e} of its largest gradient"


def _short_llama() -> torch.nn.Module:
    model = gqa_llama(VOCAB, "sdpa")
    model.config.max_position_embeddings = 16
    return model


def test_max_length_beyond_the_models_positions_is_refused_everywhere():
    model = _short_llama()
    trainer = DPO(model, copy.deepcopy(model))
    data = _dataset(long=20)
    message = "max_length: 1024 exceeds the model's 16 positions"
    with pytest.raises(ValueError, match=message):
        trainer.fit(data, max_length=1024, batch_size=2, progress=False)
    with pytest.raises(ValueError, match=message):
        trainer.evaluate(data, max_length=1024)
    with pytest.raises(ValueError, match=message):
        trainer.precompute_reference(data, max_length=1024, progress=False)
    with pytest.raises(ValueError, match="29 tokens, beyond the model's 16 positions"):
        trainer.train_step(data.collate(range(3), max_length=None))


def test_default_max_length_is_the_smaller_of_limit_and_data():
    model = _short_llama()
    trainer = DPO(model, copy.deepcopy(model))
    result = trainer.fit(_dataset(long=20), batch_size=3, progress=False)
    assert result.steps == 1
    # Short data keeps its own length: nothing truncated.
    short = _dataset()
    metrics = trainer.evaluate(short)
    assert metrics["num_dropped"] == 0 and metrics["num_pairs"] == 3
