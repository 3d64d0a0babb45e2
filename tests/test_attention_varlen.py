"""Per-sequence ("varlen") attention and the ``attention=`` option: log-probs and gradients equal
each sequence run alone, and the dense-mask route."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from rlox import DPO, DPOConfig, PreferenceDataset
from rlox.attention import attention_route, attn_implementation, route_context
from rlox.attention_varlen import IMPLEMENTATION, register
from rlox.models import TinyCausalLM, TinyLMConfig
from rlox.train.logps import accepted_kwargs, sequence_logps

VOCAB = 64
MODELS = ("gpt2", "llama", "qwen2", "mistral", "tiny")
PROMPTS = [[5, 9, 2], [7, 1, 1, 3, 8, 4], [11], [6, 6, 2, 9]]
CHOSEN = [[3, 4, 12, 9, 1], [2], [8, 8, 5], [10, 3]]
REJECTED = [[7], [9, 13, 4, 4], [1, 2, 3, 4, 5, 6], [2, 2, 2]]


def build(name: str, impl: str = "sdpa", **overrides) -> torch.nn.Module:
    """A 2-layer float32 causal LM (grouped-query attention where the family has it)."""
    torch.manual_seed(0)
    if name == "tiny":
        cfg = TinyLMConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, max_seq_len=64)
        return TinyCausalLM(cfg)
    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, attn_implementation=impl)
    if name == "gpt2":
        cfg = transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, **common,
        )  # fmt: skip
        return transformers.GPT2LMHeadModel(cfg)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[name]
    cfg = config_cls(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, **common, **overrides,
    )  # fmt: skip
    return model_cls(cfg)


def reference_segments(batch) -> torch.Tensor:
    """(S, 5) segments read from ``sequence_ids`` / ``segment_ends`` (independent of Rust)."""
    out = []
    if batch.layout == "prefix_shared":
        for row, (p, c, r) in enumerate(batch.segment_ends.tolist()):
            out += [[row, 0, c, 0, 0], [row, c, r, 0, p]]
    else:
        for row, ids in enumerate(batch.sequence_ids.tolist()):
            start = 0
            for t in range(1, len(ids) + 1):
                if t == len(ids) or ids[t] != ids[start]:
                    if ids[start] >= 0:
                        out.append([row, start, t, 0, 0])
                    start = t
    return torch.tensor(out, dtype=torch.int32)


def with_segments(batch):
    """``batch``, after checking the collator's ``attn_segments`` against the reference."""
    have = np.asarray(batch.attn_segments, dtype=np.int64)
    order = np.lexsort(have.T[::-1])
    assert have[order].tolist() == reference_segments(batch).tolist()
    return batch


def collate(prompts, chosen, rejected, layout: str, pack: int | None = 12):
    ds = PreferenceDataset.from_lists(prompts, chosen, rejected, vocab_size=VOCAB)
    pack = pack if layout == "packed" else None
    batch = ds.collate(np.arange(len(prompts)), layout=layout, max_length=None, pack_length=pack)
    return batch if layout == "padded" else with_segments(batch)


def alone(model, prompts, chosen, rejected) -> torch.Tensor:
    """(2B,) completion log-probs with gradient, each prompt + completion run on its own."""
    out = []
    for completions in (chosen, rejected):
        for prompt, completion in zip(prompts, completions, strict=True):
            ids = torch.tensor(prompt + completion)[None]
            logits = model(ids)
            logits = logits.logits if hasattr(logits, "logits") else logits
            logp = torch.log_softmax(logits[0].float(), -1)
            p = len(prompt)
            out.append(logp[p - 1 : -1].gather(1, ids[0, p:, None]).sum())
    return torch.stack(out)


def logps_and_grads(model, run) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``run(model)``'s (2B,) log-probs and the gradient of their weighted sum."""
    model.zero_grad()
    logps = run(model)
    weights = torch.linspace(0.5, 1.5, logps.shape[0])
    (logps * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logps.detach(), grads


def assert_same(got, want, tol: float, what: str) -> None:
    torch.testing.assert_close(got[0], want[0], rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")
    assert got[1].keys() == want[1].keys()
    for name, grad in want[1].items():
        torch.testing.assert_close(
            got[1][name], grad, rtol=tol, atol=tol, msg=lambda m, n=name: f"{what} {n}: {m}"
        )


@pytest.mark.parametrize("layout", ["packed", "prefix_shared"])
@pytest.mark.parametrize("name", MODELS)
def test_varlen_equals_sequences_alone_and_dense(name, layout):
    model = build(name)
    batch = collate(PROMPTS, CHOSEN, REJECTED, layout)
    want = logps_and_grads(model, lambda m: alone(m, PROMPTS, CHOSEN, REJECTED))
    routes = {}
    for attention in ("varlen", "dense"):
        accepted = accepted_kwargs(model, attention)
        routes[attention] = attention_route(model, batch, accepted)
        got = logps_and_grads(model, lambda m, a=accepted: sequence_logps(m, batch, a))
        assert_same(got, want, 1e-5, f"{name} {layout} {attention}")
    assert routes == {"varlen": "varlen", "dense": "dense"}
    assert attn_implementation(model) in (None, "sdpa")  # restored after the forward


@settings(max_examples=12, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 9)), min_size=1, max_size=5
    ),
    st.sampled_from(["packed", "prefix_shared"]),
    st.integers(8, 40),
)
def test_varlen_random_lengths(lengths, layout, pack):
    rng = np.random.default_rng(len(lengths) * 100 + pack)
    prompts, chosen, rejected = (
        [rng.integers(1, VOCAB, n).tolist() for n in column]
        for column in zip(*lengths, strict=True)
    )
    batch = collate(prompts, chosen, rejected, layout, pack=max(pack, 2 * 27))
    for name in ("llama", "tiny"):
        model = MODELS_CACHE.setdefault(name, build(name))
        want = logps_and_grads(model, lambda m: alone(m, prompts, chosen, rejected))
        accepted = accepted_kwargs(model, "varlen")
        got = logps_and_grads(model, lambda m, a=accepted: sequence_logps(m, batch, a))
        assert_same(got, want, 1e-5, f"{name} {layout} {lengths}")


MODELS_CACHE: dict[str, torch.nn.Module] = {}


def test_sliding_window_is_kept_per_sequence():
    """Mistral's sliding window counts positions within each sequence (and its prefix)."""
    model = build("mistral", sliding_window=3)
    want = logps_and_grads(model, lambda m: alone(m, PROMPTS, CHOSEN, REJECTED))
    for layout in ("packed", "prefix_shared"):
        batch = collate(PROMPTS, CHOSEN, REJECTED, layout)
        accepted = accepted_kwargs(model, "varlen")
        got = logps_and_grads(model, lambda m, a=accepted, b=batch: sequence_logps(m, b, a))
        assert_same(got, want, 1e-5, f"mistral window 3 {layout}")


def test_auto_picks_per_layout_and_model(caplog):
    batch = collate(PROMPTS, CHOSEN, REJECTED, "prefix_shared")
    padded = collate(PROMPTS, CHOSEN, REJECTED, "padded")
    for name in ("llama", "tiny"):
        model = build(name)
        accepted = accepted_kwargs(model)
        assert accepted.attention == "auto"
        assert attention_route(model, batch, accepted) == "varlen"
        assert attention_route(model, padded, accepted) == "padded"

    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = build("tiny")

        def forward(self, input_ids, attention_mask=None, position_ids=None):
            return self.inner(input_ids, attention_mask=attention_mask, position_ids=position_ids)

    plain = Plain()
    assert attention_route(plain, batch, accepted_kwargs(plain)) == "dense"
    with pytest.raises(ValueError, match="attention: 'varlen' needs"):
        attention_route(plain, batch, accepted_kwargs(plain, "varlen"))
    model = build("qwen2")
    accepted = accepted_kwargs(model)
    with caplog.at_level(logging.INFO, logger="rlox"):
        for _ in range(2):
            with torch.no_grad():
                sequence_logps(model, batch, accepted)
    assert [r.getMessage() for r in caplog.records] == ["attention: varlen"]


def test_bad_attention_values():
    model = build("tiny")
    with pytest.raises(ValueError, match="attention: expected one of auto, flex, varlen, dense"):
        DPO(model, build("tiny"), attention="sparse")
    with pytest.raises(TypeError, match="attention: expected a str"):
        DPOConfig(attention=None).checked()
    with pytest.raises(ValueError, match="attention: 'flex' needs a CUDA model"):
        DPO(model, build("tiny"), attention="flex")
    object.__setattr__(batch := collate(PROMPTS, CHOSEN, REJECTED, "packed"), "attn_segments", None)
    with pytest.raises(ValueError, match="attention: 'varlen' needs a batch with attn_segments"):
        sequence_logps(model, batch, accepted_kwargs(model, "varlen"))
    # auto falls back to the dense mask for a batch without segments
    assert attention_route(model, batch, accepted_kwargs(model)) == "dense"


def test_eager_and_unknown_implementations():
    """varlen replaces any implementation for the forward (and restores it); dense keeps the
    per-implementation masks of rlox.attention (an unknown one is a TypeError)."""
    batch = collate(PROMPTS, CHOSEN, REJECTED, "packed")
    eager = build("llama", impl="eager")
    want = logps_and_grads(eager, lambda m: alone(m, PROMPTS, CHOSEN, REJECTED))
    for attention in ("varlen", "dense"):
        accepted = accepted_kwargs(eager, attention)
        got = logps_and_grads(eager, lambda m, a=accepted: sequence_logps(m, batch, a))
        assert_same(got, want, 1e-5, f"eager {attention}")
        assert attn_implementation(eager) == "eager"
    unknown = build("llama")
    unknown.config._attn_implementation = "mine"
    with pytest.raises(TypeError, match="packed layout.*'mine'"):
        sequence_logps(unknown, batch, accepted_kwargs(unknown, "dense"))
    with torch.no_grad():
        got = sequence_logps(unknown, batch, accepted_kwargs(unknown, "varlen"))
    torch.testing.assert_close(got, want[0], rtol=1e-5, atol=1e-5)
    assert unknown.config._attn_implementation == "mine"


def test_registered_implementation_is_sdpa_without_segments():
    """A model left on "rlox_varlen" generates and scores padded batches as sdpa does."""
    model = build("llama")
    ids = torch.tensor([[0, 5, 9, 17, 40], [3, 3, 10, 20, 1]])
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        model.set_attn_implementation(register())
        assert attn_implementation(model) == IMPLEMENTATION
        got = model(ids, attention_mask=mask).logits
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        model.set_attn_implementation("sdpa")
        plain = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-6, atol=1e-6)
    assert torch.equal(generated, plain)


def test_gradient_checkpointing_keeps_the_route_for_its_backward():
    model = build("llama")
    enable = getattr(model, "activation_checkpointing_enable", None)
    enable = enable or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    model.train()
    batch = collate(PROMPTS, CHOSEN, REJECTED, "prefix_shared")
    want = logps_and_grads(model, lambda m: alone(m, PROMPTS, CHOSEN, REJECTED))
    accepted = accepted_kwargs(model, "varlen")
    got = logps_and_grads(model, lambda m: sequence_logps(m, batch, accepted))
    assert_same(got, want, 1e-5, "checkpointed llama")
    with route_context(model, batch, accepted):
        pass
    assert attn_implementation(model) == IMPLEMENTATION


@pytest.mark.parametrize("name", ["llama", "tiny"])
@pytest.mark.parametrize("layout", ["packed", "prefix_shared"])
def test_train_step_varlen_equals_dense(name, layout):
    batch = collate(PROMPTS, CHOSEN, REJECTED, layout)
    results = {}
    for attention in ("varlen", "dense"):
        policy = build(name)
        trainer = DPO(policy, copy.deepcopy(policy), beta=0.5, attention=attention)
        assert trainer.config.attention == attention
        trainer.train_step(batch)
        metrics = trainer.train_step(batch)
        results[attention] = (
            metrics,
            {k: v.detach().clone() for k, v in policy.state_dict().items()},
        )
    (m_varlen, w_varlen), (m_dense, w_dense) = results["varlen"], results["dense"]
    for key, value in m_dense.items():
        assert abs(m_varlen[key] - value) <= 1e-6 * max(1.0, abs(value)), key
    for key, value in w_dense.items():
        torch.testing.assert_close(w_varlen[key], value, rtol=1e-6, atol=1e-6)
