"""Collation, sequence log-probs and the DPO trainer, on tiny models built in the tests."""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import reference_completion_logps
from torch import nn

import rlox
from rlox.losses import dpo_loss

METRIC_KEYS = {
    "loss",
    "chosen_reward",
    "rejected_reward",
    "reward_margin",
    "reward_accuracy",
    "chosen_logps",
    "rejected_logps",
    "grad_norm",
    "skipped",
}
VOCAB = 13
LN2 = math.log(2.0)


@pytest.fixture(autouse=True, scope="module")
def _single_torch_thread():
    """These models are tiny: one intra-op thread is much faster than two fighting for 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# tiny models


class TinyCausalLM(nn.Module):
    """Embedding + one causal self-attention block + MLP + head; ``forward(input_ids) -> logits``.

    Positions are ``arange(T)`` (learned embeddings), so right padding never shifts a real token.
    """

    def __init__(self, vocab: int = VOCAB, dim: int = 16, max_len: int = 64) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.Tanh(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, vocab)

    def _logits(self, input_ids, positions, key_mask):
        h = self.tok(input_ids) + self.pos(positions)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        t = input_ids.shape[1]
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        allowed = torch.ones(t, t, dtype=torch.bool, device=h.device).tril()[None]
        if key_mask is not None:
            allowed = allowed & key_mask[:, None, :].bool()
        scores = scores.masked_fill(~allowed, float("-inf"))
        h = h + torch.softmax(scores, dim=-1) @ v
        h = h + self.mlp(h)
        return self.head(h)

    def forward(self, input_ids):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        return self._logits(input_ids, positions, None)


class KwargsCausalLM(TinyCausalLM):
    """Takes ``attention_mask``/``position_ids``/``use_cache``, records them, returns ``.logits``.

    Positions come ONLY from ``position_ids`` and keys are masked ONLY by ``attention_mask``, so
    wrong values change the log-probs.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[dict] = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=True):
        self.calls.append(
            dict(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=use_cache,
            )
        )
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        return SimpleNamespace(logits=self._logits(input_ids, position_ids, attention_mask))


class VarKwargsCausalLM(TinyCausalLM):
    """``forward(input_ids, **kwargs)`` returning a tuple ``(logits,)``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[set[str]] = []

    def forward(self, input_ids, **kwargs):
        self.seen.append(set(kwargs))
        return (
            self._logits(
                input_ids,
                kwargs.get("position_ids", torch.arange(input_ids.shape[1])[None]),
                kwargs.get("attention_mask"),
            ),
            "extra",
        )


def make_model(cls=TinyCausalLM, seed: int = 0, dtype=torch.float32, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return cls(**kw).to(dtype)


def make_pair(cls=TinyCausalLM, seed: int = 0, dtype=torch.float32, **kw):
    model = make_model(cls, seed, dtype, **kw)
    return model, copy.deepcopy(model)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=50,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg)


# A fixed batch: B = 3 pairs, pad id 0; prompts left-, right- and un-padded.
PAD = 0
PROMPT = torch.tensor([[0, 0, 3, 4, 5], [6, 7, 0, 0, 0], [8, 9, 10, 11, 12]])
CHOSEN = torch.tensor([[1, 2, 0], [3, 0, 0], [4, 5, 6]])
REJECTED = torch.tensor([[7, 0, 0], [8, 9, 10], [11, 0, 0]])
PROMPTS_UNPADDED = [[3, 4, 5], [6, 7], [8, 9, 10, 11, 12]]
CHOSEN_UNPADDED = [[1, 2], [3], [4, 5, 6]]
REJECTED_UNPADDED = [[7], [8, 9, 10], [11]]


def unpadded_reference(model):
    return reference_completion_logps(
        model, PROMPTS_UNPADDED * 2, CHOSEN_UNPADDED + REJECTED_UNPADDED
    )


# --------------------------------------------------------------------------------------------
# collation + sequence log-probs vs running each sequence alone


@st.composite
def padded_batches(draw, vocab=VOCAB):
    """Random pairs and a padded (prompt, chosen, rejected) encoding of them.

    Prompt rows get a random split of their padding between left and right (left-padded,
    right-padded and mixed rows); completions are right-padded. Ids equal to the pad id may occur
    inside a row (there they are real tokens); a prompt's first and last token and a completion's
    last token are never the pad id, so the true sequences are unambiguous.
    """
    b = draw(st.integers(1, 4))
    use_pad = draw(st.booleans())
    pad = draw(st.sampled_from([0, vocab - 1])) if use_pad else None
    tok = st.integers(0, vocab - 1)
    non_pad = tok.filter(lambda t: t != pad) if use_pad else tok

    def seq(lo, hi, first_non_pad):
        n = draw(st.integers(lo, hi))
        body = draw(st.lists(tok, min_size=n, max_size=n))
        if use_pad:
            body[-1] = draw(non_pad)
            if first_non_pad:
                body[0] = draw(non_pad)
        return body

    if use_pad:
        prompts = [seq(1, 6, True) for _ in range(b)]
        chosen = [seq(1, 5, False) for _ in range(b)]
        rejected = [seq(1, 5, False) for _ in range(b)]
    else:  # without a pad id every row must be full
        lp, lc, lr = (draw(st.integers(1, k)) for k in (6, 5, 5))
        prompts = [seq(lp, lp, False) for _ in range(b)]
        chosen = [seq(lc, lc, False) for _ in range(b)]
        rejected = [seq(lr, lr, False) for _ in range(b)]

    def encode(rows, left_pad: bool):
        width = max(len(r) for r in rows) + (draw(st.integers(0, 2)) if use_pad else 0)
        out = []
        for r in rows:
            extra = width - len(r)
            left = draw(st.integers(0, extra)) if left_pad else 0
            out.append([pad] * left + r + [pad] * (extra - left))
        return np.array(out, dtype=np.int64)

    return dict(
        pad=pad,
        prompts=prompts,
        chosen=chosen,
        rejected=rejected,
        prompt_ids=encode(prompts, True),
        chosen_ids=encode(chosen, False),
        rejected_ids=encode(rejected, False),
    )


def check_pair_batch_layout(batch: rlox.PairBatch, case) -> None:
    """The (2B, L) layout documented for PairBatch, checked against the true sequences."""
    b = len(case["prompts"])
    fill = case["pad"] if case["pad"] is not None else 0
    seqs = [
        (p, c) for p, c in zip(case["prompts"] * 2, case["chosen"] + case["rejected"], strict=True)
    ]
    length = max(len(p) + len(c) for p, c in seqs)
    assert batch.input_ids.shape == (2 * b, length)
    for t in (batch.input_ids, batch.attention_mask, batch.position_ids):
        assert t.dtype == torch.int64
    assert batch.loss_mask.dtype == torch.bool
    plan = []
    for row, (p, c) in enumerate(seqs):
        n = len(p) + len(c)
        assert batch.input_ids[row].tolist() == p + c + [fill] * (length - n)
        assert batch.attention_mask[row].tolist() == [1] * n + [0] * (length - n)
        assert batch.position_ids[row].tolist() == list(range(n)) + [0] * (length - n)
        assert batch.loss_mask[row].tolist() == (
            [False] * len(p) + [True] * len(c) + [False] * (length - n)
        )
        plan += [(row, len(p) + k - 1, tok) for k, tok in enumerate(c)]
    assert batch.chosen_lengths.tolist() == [len(c) for c in case["chosen"]]
    assert batch.rejected_lengths.tolist() == [len(c) for c in case["rejected"]]
    got_plan = list(
        zip(
            batch.plan_row.tolist(),
            batch.plan_position.tolist(),
            batch.plan_target.tolist(),
            strict=True,
        )
    )
    assert got_plan == plan
    assert batch.num_pairs == b


PLAIN_MODEL = make_model(TinyCausalLM, seed=1)
KWARGS_MODEL = make_model(KwargsCausalLM, seed=2)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=padded_batches(), kind=st.sampled_from(["plain", "kwargs"]))
def test_padded_logps_equal_each_sequence_alone(case, kind):
    model = PLAIN_MODEL if kind == "plain" else KWARGS_MODEL
    batch = rlox.collate_pairs(
        case["prompt_ids"], case["chosen_ids"], case["rejected_ids"], pad_token_id=case["pad"]
    )
    check_pair_batch_layout(batch, case)
    with torch.no_grad():
        got = rlox.sequence_logps(model, batch)
    assert got.dtype == torch.float32
    assert got.shape == (2 * len(case["prompts"]),)
    want = reference_completion_logps(model, case["prompts"] * 2, case["chosen"] + case["rejected"])
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(case=padded_batches())
def test_raw_collate_matches_python_wrapper(case):
    raw = rlox._rlox.collate_pairs(
        case["prompt_ids"], case["chosen_ids"], case["rejected_ids"], pad_token_id=case["pad"]
    )
    batch = rlox.collate_pairs(
        torch.from_numpy(case["prompt_ids"]),
        case["chosen_ids"].tolist(),
        case["rejected_ids"].astype(np.int32),
        pad_token_id=case["pad"],
    )
    assert batch.layout == "padded"
    assert batch.cu_seqlens is None and batch.segment_ends is None
    for key in rlox.PairBatch.__dataclass_fields__:
        value = getattr(batch, key)
        if isinstance(value, torch.Tensor):
            np.testing.assert_array_equal(raw[key], value.numpy(), err_msg=key)
    assert raw["prompt_lengths"].tolist() == [len(p) for p in case["prompts"]]


def test_forward_kwargs_are_passed():
    model = make_model(KwargsCausalLM, seed=3)
    batch = rlox.collate_pairs(PROMPT, CHOSEN, REJECTED, pad_token_id=PAD)
    rlox.sequence_logps(model, batch)  # the first call also probes the route
    model.calls.clear()
    rlox.sequence_logps(model, batch)
    (call,) = model.calls
    # Padding runs on its row's first token (a real id, never a zeroed padding embedding).
    real = batch.attention_mask.bool()
    assert torch.equal(call["input_ids"][real], batch.input_ids[real])
    assert torch.equal(call["input_ids"][~real], batch.input_ids[:, :1].expand_as(real)[~real])
    assert torch.equal(call["attention_mask"], batch.attention_mask)
    assert torch.equal(call["position_ids"], batch.position_ids)
    assert call["use_cache"] is False

    var = make_model(VarKwargsCausalLM, seed=3)
    rlox.sequence_logps(var, batch)
    var.seen.clear()
    got = rlox.sequence_logps(var, batch)
    assert var.seen == [{"attention_mask", "position_ids"}]
    torch.testing.assert_close(got.double(), unpadded_reference(var), rtol=0, atol=1e-5)


def test_trainer_passes_kwargs_to_policy_and_reference():
    policy, ref = make_pair(KwargsCausalLM, seed=4)
    trainer = rlox.DPO(policy, ref, pad_token_id=PAD)
    batch = rlox.collate_pairs(PROMPT, CHOSEN, REJECTED, pad_token_id=PAD)
    trainer.check_layout("padded")
    policy.calls.clear()
    ref.calls.clear()
    trainer.train_step(prompt=PROMPT, chosen=CHOSEN, rejected=REJECTED)
    for calls in (policy.calls, ref.calls):
        (call,) = calls
        assert torch.equal(call["attention_mask"], batch.attention_mask)
        assert torch.equal(call["position_ids"], batch.position_ids)
        assert call["use_cache"] is False


# --------------------------------------------------------------------------------------------
# Hugging Face models


@pytest.mark.parametrize("factory", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_hf_model_padded_logps_and_train_step(factory):
    policy = factory()
    ref = copy.deepcopy(policy)
    policy.eval()
    batch = rlox.collate_pairs(PROMPT, CHOSEN, REJECTED, pad_token_id=PAD, vocab_size=50)
    with torch.no_grad():
        got = rlox.sequence_logps(policy, batch)
    torch.testing.assert_close(got.double(), unpadded_reference(policy), rtol=0, atol=1e-5)

    trainer = rlox.DPO(policy, ref, pad_token_id=PAD, learning_rate=1e-3)
    before = copy.deepcopy(policy.state_dict())
    metrics = trainer.train_step(prompt=PROMPT, chosen=CHOSEN, rejected=REJECTED)
    assert set(metrics) == METRIC_KEYS
    for k, v in metrics.items():
        assert type(v) is float, k
        assert math.isfinite(v), k
    # policy == reference at the first step, so the loss is ln 2 and the rewards vanish
    assert metrics["loss"] == pytest.approx(LN2, abs=1e-6)
    assert metrics["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["skipped"] == 0.0 and metrics["grad_norm"] > 0
    assert trainer.global_step == 1
    changed = [k for k, v in policy.state_dict().items() if not torch.equal(v, before[k])]
    assert changed
    metrics2 = trainer.train_step(prompt=PROMPT, chosen=CHOSEN, rejected=REJECTED)
    assert metrics2["loss"] < metrics["loss"]


# --------------------------------------------------------------------------------------------
# trainer behaviour


def test_compute_loss_at_init_is_ln2():
    policy, ref = make_pair(seed=5)
    trainer = rlox.DPO(policy, ref, beta=0.3, pad_token_id=PAD)
    before = copy.deepcopy(policy.state_dict())
    policy.train()
    metrics = trainer.compute_loss(PROMPT, CHOSEN, REJECTED)
    assert set(metrics) == METRIC_KEYS - {"grad_norm", "skipped"}
    for k, v in metrics.items():
        assert type(v) is float, k
    assert abs(metrics["loss"] - LN2) <= 1e-7
    assert metrics["chosen_reward"] == 0.0
    assert metrics["rejected_reward"] == 0.0
    assert metrics["reward_margin"] == 0.0
    assert metrics["reward_accuracy"] == 0.0
    want = unpadded_reference(policy)
    assert metrics["chosen_logps"] == pytest.approx(float(want[:3].mean()), abs=1e-5)
    assert metrics["rejected_logps"] == pytest.approx(float(want[3:].mean()), abs=1e-5)
    # nothing was updated and the training mode is restored
    assert policy.training
    for k, v in policy.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert trainer.global_step == 0
    assert not trainer.optimizer.state
    # a PairBatch is accepted as well
    batch = rlox.collate_pairs(PROMPT, CHOSEN, REJECTED, pad_token_id=PAD)
    assert trainer.compute_loss(batch) == metrics


def test_train_step_updates_policy_only():
    policy, ref = make_pair(seed=6)
    ref.train()  # the trainer must switch it to eval
    ref_before = {k: v.clone() for k, v in ref.state_dict().items()}
    pol_before = {k: v.clone() for k, v in policy.state_dict().items()}
    trainer = rlox.DPO(policy, ref, pad_token_id=PAD, learning_rate=1e-2)
    assert not ref.training and not any(m.training for m in ref.modules())
    assert all(not p.requires_grad for p in ref.parameters())
    metrics = trainer.train_step(prompt=PROMPT, chosen=CHOSEN, rejected=REJECTED)
    assert set(metrics) == METRIC_KEYS
    assert all(type(v) is float for v in metrics.values())
    assert metrics["skipped"] == 0.0
    # every policy parameter received a gradient and moved (Adam moves all by ~lr)
    for name, p in policy.named_parameters():
        if name.startswith("pos."):  # positions beyond the batch length get no gradient
            continue
        assert not torch.equal(p.detach(), pol_before[name]), name
    for k, v in ref.state_dict().items():
        assert torch.equal(v, ref_before[k]), k
    assert all(p.grad is None for p in ref.parameters())
    assert not ref.training
    assert all(not p.requires_grad for p in ref.parameters())
    assert trainer.global_step == 1


def test_non_finite_step_is_skipped_and_weights_untouched():
    """A policy whose logits are NaN: the step is skipped with a warning, nothing is updated."""
    policy, ref = make_pair(seed=7)
    trainer = rlox.DPO(policy, ref, pad_token_id=PAD, learning_rate=1e-2)
    with torch.no_grad():
        policy.head.bias.fill_(math.nan)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    with pytest.warns(RuntimeWarning, match="non-finite"):
        metrics = trainer.train_step(prompt=PROMPT, chosen=CHOSEN, rejected=REJECTED)
    assert metrics["skipped"] == 1.0
    assert math.isnan(metrics["loss"]) and math.isnan(metrics["grad_norm"])
    assert trainer.global_step == 0 and trainer.skipped_steps == 1
    for k, v in policy.state_dict().items():
        assert torch.equal(v, before[k]) or (v.isnan() == before[k].isnan()).all(), k
    assert all(p.grad is None for p in policy.parameters())


def test_one_forward_per_model_per_step():
    policy, ref = make_pair(seed=7)
    calls = {"policy": [], "ref": []}
    policy.register_forward_hook(lambda m, args, out: calls["policy"].append(args[0].shape))
    ref.register_forward_hook(lambda m, args, out: calls["ref"].append(args[0].shape))
    trainer = rlox.DPO(policy, ref, pad_token_id=PAD)
    batch = rlox.collate_pairs(PROMPT, CHOSEN, REJECTED, pad_token_id=PAD)
    trainer.check_layout("padded")  # the route probe's forwards, once per model
    calls["policy"].clear()
    calls["ref"].clear()
    for step in range(1, 4):
        trainer.train_step(prompt=PROMPT, chosen=CHOSEN, rejected=REJECTED)
        # chosen and rejected go through each model together as ONE (2B, L) batch
        assert calls["policy"] == [batch.input_ids.shape] * step
        assert calls["ref"] == [batch.input_ids.shape] * step
    assert batch.input_ids.shape[0] == 2 * PROMPT.shape[0]


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_training_learns_the_preference(loss_type):
    policy, ref = make_pair(seed=8)
    trainer = rlox.DPO(
        policy, ref, beta=0.5, learning_rate=2e-2, loss_type=loss_type, pad_token_id=PAD
    )
    start = trainer.compute_loss(PROMPT, CHOSEN, REJECTED)
    history = [trainer.train_step(PROMPT, CHOSEN, REJECTED) for _ in range(30)]
    end = trainer.compute_loss(PROMPT, CHOSEN, REJECTED)
    assert start["reward_accuracy"] == 0.0 and start["reward_margin"] == 0.0
    assert end["loss"] < 0.5 * start["loss"]
    if loss_type == "ipo":
        # IPO fits the per-token margin to 1 / (2 beta) = 1, which does not force every
        # (unnormalised) reward margin positive; the mean one must still have grown.
        assert end["reward_margin"] > 0.5
        assert end["reward_accuracy"] >= 2 / 3
    else:
        assert end["reward_accuracy"] == 1.0
        assert end["reward_margin"] > 1.0
    assert end["chosen_reward"] > end["rejected_reward"]
    # the chosen completions became relatively likelier
    assert (
        end["chosen_logps"] - end["rejected_logps"]
        > start["chosen_logps"] - start["rejected_logps"]
    )
    assert all(h["skipped"] == 0.0 for h in history)
    assert trainer.global_step == 30


# --------------------------------------------------------------------------------------------
# gradients vs finite differences


def _loss_of(policy, ref_logps, batch, loss_type, beta):
    logps = rlox.sequence_logps(policy, batch)
    b = batch.num_pairs
    return dpo_loss(
        logps[:b],
        logps[b:],
        ref_logps[:b],
        ref_logps[b:],
        beta=beta,
        loss_type=loss_type,
        chosen_lengths=batch.chosen_lengths,
        rejected_lengths=batch.rejected_lengths,
        backend="rust",
    ).loss


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_loss_gradient_matches_finite_differences(loss_type):
    """Autograd through sequence_logps + the rust-backed loss vs central differences.

    The model is float64; sequence_logps returns float32 sums, which bounds the attainable
    accuracy of the differences (step 1e-2, error O(h^2) + O(1e-6 / h)).
    """
    policy = make_model(seed=9, dtype=torch.float64)
    ref = make_model(seed=10, dtype=torch.float64)  # a different reference: z != 0
    batch = rlox.collate_pairs(PROMPT, CHOSEN, REJECTED, pad_token_id=PAD)
    with torch.no_grad():
        ref_logps = rlox.sequence_logps(ref, batch)
    beta = 0.05 if loss_type == "hinge" else 0.5
    loss = _loss_of(policy, ref_logps, batch, loss_type, beta)
    if loss_type == "hinge":  # every pair must be on the linear part, away from the kink
        logps = rlox.sequence_logps(policy, batch).detach()
        z = beta * ((logps[:3] - ref_logps[:3]) - (logps[3:] - ref_logps[3:]))
        assert (z < 0.9).all()
    params = dict(policy.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))

    h = 1e-2

    def f_at(name, index, delta):
        with torch.no_grad():
            p = params[name]
            old = p[index].clone()
            p[index] += delta
            val = float(_loss_of(policy, ref_logps, batch, loss_type, beta))
            p[index] = old
        return val

    # single coordinates with a large gradient
    checked = 0
    for name in ("head.weight", "qkv.weight", "tok.weight"):
        g = grads[name]
        index = np.unravel_index(int(g.abs().argmax()), g.shape)
        fd = (f_at(name, index, h) - f_at(name, index, -h)) / (2 * h)
        assert float(g[index]) == pytest.approx(fd, rel=5e-3, abs=1e-4), name
        checked += abs(fd) > 1e-3
    assert checked >= 2

    # a random direction over all parameters
    gen = torch.Generator().manual_seed(0)
    direction = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()}
    norm = math.sqrt(sum(float((d * d).sum()) for d in direction.values()))
    direction = {k: d / norm for k, d in direction.items()}
    analytic = sum(float((grads[k] * direction[k]).sum()) for k in params)

    def f_dir(t):
        with torch.no_grad():
            for k, p in params.items():
                p += t * direction[k]
            val = float(_loss_of(policy, ref_logps, batch, loss_type, beta))
            for k, p in params.items():
                p -= t * direction[k]
        return val

    fd = (f_dir(h) - f_dir(-h)) / (2 * h)
    assert abs(analytic) > 1e-3
    assert analytic == pytest.approx(fd, rel=5e-3, abs=1e-4)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_rust_backend_parameter_gradients_equal_torch_backend(loss_type):
    policy = make_model(seed=11)
    ref = make_model(seed=12)
    batch = rlox.collate_pairs(PROMPT, CHOSEN, REJECTED, pad_token_id=PAD)
    with torch.no_grad():
        ref_logps = rlox.sequence_logps(ref, batch)
    grads = {}
    for backend in ("rust", "torch"):
        policy.zero_grad(set_to_none=True)
        logps = rlox.sequence_logps(policy, batch)
        res = dpo_loss(
            logps[:3],
            logps[3:],
            ref_logps[:3],
            ref_logps[3:],
            beta=0.2,
            loss_type=loss_type,
            chosen_lengths=batch.chosen_lengths,
            rejected_lengths=batch.rejected_lengths,
            backend=backend,
        )
        (res.loss + 0.5 * res.losses.sum()).backward()
        grads[backend] = {k: p.grad.clone() for k, p in policy.named_parameters()}
    for k in grads["rust"]:
        torch.testing.assert_close(grads["rust"][k], grads["torch"][k], rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# gradient clipping


def _flat(model):
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


def _grad_norm(policy, ref, beta=0.1):
    policy = copy.deepcopy(policy)
    batch = rlox.collate_pairs(PROMPT, CHOSEN, REJECTED, pad_token_id=PAD)
    with torch.no_grad():
        ref_logps = rlox.sequence_logps(ref, batch)
    loss = _loss_of(policy, ref_logps, batch, "sigmoid", beta)
    loss.backward()
    return math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in policy.parameters()))


@pytest.mark.parametrize("max_grad_norm", [1e-3, 0.02])
def test_max_grad_norm_clips_the_update(max_grad_norm):
    policy = make_model(seed=13, dtype=torch.float64)
    ref = make_model(seed=14, dtype=torch.float64)
    want_norm = _grad_norm(policy, ref)
    assert want_norm > 5 * max_grad_norm  # the clip is active
    sgd = torch.optim.SGD(policy.parameters(), lr=1.0)
    trainer = rlox.DPO(policy, ref, max_grad_norm=max_grad_norm, pad_token_id=PAD, optimizer=sgd)
    before = _flat(policy)
    metrics = trainer.train_step(PROMPT, CHOSEN, REJECTED)
    # grad_norm is reported BEFORE clipping
    assert metrics["grad_norm"] == pytest.approx(want_norm, rel=1e-6)
    update = float((_flat(policy) - before).norm())
    assert update == pytest.approx(max_grad_norm, rel=1e-4)


def test_no_clipping_when_max_grad_norm_is_none():
    policy = make_model(seed=13, dtype=torch.float64)
    ref = make_model(seed=14, dtype=torch.float64)
    want_norm = _grad_norm(policy, ref)
    sgd = torch.optim.SGD(policy.parameters(), lr=0.5)
    trainer = rlox.DPO(policy, ref, max_grad_norm=None, pad_token_id=PAD, optimizer=sgd)
    before = _flat(policy)
    metrics = trainer.train_step(PROMPT, CHOSEN, REJECTED)
    assert metrics["grad_norm"] == pytest.approx(want_norm, rel=1e-6)
    assert float((_flat(policy) - before).norm()) == pytest.approx(0.5 * want_norm, rel=1e-6)


# --------------------------------------------------------------------------------------------
# save / load


BATCHES = [
    (PROMPT, CHOSEN, REJECTED),
    (PROMPT[:2], REJECTED[:2], CHOSEN[:2]),
    (PROMPT[1:], CHOSEN[1:], REJECTED[1:]),
]


def test_save_load_round_trip(tmp_path):
    policy, ref = make_pair(seed=15)
    trainer = rlox.DPO(
        policy,
        ref,
        beta=0.25,
        learning_rate=3e-3,
        max_grad_norm=0.5,
        loss_type="cdpo",
        label_smoothing=0.1,
        pad_token_id=PAD,
    )
    for batch in BATCHES:
        trainer.train_step(*batch)
    path = trainer.save(tmp_path / "ckpt")
    assert (path / "trainer.json").is_file()
    meta = json.loads((path / "trainer.json").read_text())
    assert meta["global_step"] == 3

    other = make_model(seed=99)  # different weights, overwritten by load
    assert not torch.equal(other.head.weight, policy.head.weight)
    loaded = rlox.DPO.load(path, other, copy.deepcopy(ref))
    assert loaded.config == trainer.config
    assert loaded.global_step == trainer.global_step == 3
    assert loaded.skipped_steps == trainer.skipped_steps
    for k, v in policy.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k
    sd_a, sd_b = trainer.optimizer.state_dict(), loaded.optimizer.state_dict()
    assert sd_a["param_groups"] == sd_b["param_groups"]
    assert sd_a["state"].keys() == sd_b["state"].keys()
    for i, state in sd_a["state"].items():
        for k, v in state.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(sd_b["state"][i][k])), (i, k)

    # continuing from the loaded trainer is the same as continuing from the original
    for batch in BATCHES[:2]:
        m_a = trainer.train_step(*batch)
        m_b = loaded.train_step(*batch)
        assert m_a.keys() == m_b.keys()
        for k in m_a:
            assert m_b[k] == pytest.approx(m_a[k], rel=1e-6, abs=1e-9), k
    for k, v in policy.state_dict().items():
        torch.testing.assert_close(other.state_dict()[k], v, rtol=1e-6, atol=1e-7)
    assert loaded.global_step == trainer.global_step == 5


def test_save_load_with_custom_optimizer(tmp_path):
    policy, ref = make_pair(seed=16)
    sgd = torch.optim.SGD(policy.parameters(), lr=0.1, momentum=0.9)
    trainer = rlox.DPO(policy, ref, pad_token_id=PAD, loss_type="hinge", optimizer=sgd)
    trainer.train_step(*BATCHES[0])
    path = trainer.save(tmp_path)
    other = make_model(seed=98)
    with pytest.raises(ValueError, match="optimizer.*SGD"):
        rlox.DPO.load(path, other, copy.deepcopy(ref))
    sgd2 = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    loaded = rlox.DPO.load(path, other, copy.deepcopy(ref), optimizer=sgd2)
    assert loaded.optimizer is sgd2
    assert loaded.config.loss_type == "hinge"
    m_a = trainer.train_step(*BATCHES[1])
    m_b = loaded.train_step(*BATCHES[1])
    for k in m_a:
        assert m_b[k] == pytest.approx(m_a[k], rel=1e-6, abs=1e-9), k


def test_load_without_checkpoint_names_path(tmp_path):
    policy, ref = make_pair(seed=17)
    with pytest.raises(ValueError, match="path: .*trainer.json"):
        rlox.DPO.load(tmp_path, policy, ref)
