"""The loss family inside the trainer: every type trains, LD-DPO weighting, BCO's running shift."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from test_data import VOCAB, random_pairs
from test_trainer import CHOSEN, PAD, PROMPT, REJECTED, make_model, make_pair

import rlox
from rlox import DPO, PreferenceDataset, sequence_logps
from rlox.data import LAYOUTS
from rlox.losses import LOSS_TYPES, REFERENCE_FREE, dpo_loss
from rlox.models import TinyCausalLM, TinyLMConfig


@pytest.fixture(autouse=True, scope="module")
def _single_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def options_for(loss_type: str) -> dict:
    """Options that make ``loss_type`` valid (exo_pair needs label smoothing) or exercise it
    (cdpo's smoothing)."""
    return {"label_smoothing": 0.1} if loss_type in ("exo_pair", "cdpo") else {}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_trains_the_preference(loss_type):
    policy, ref = make_pair(seed=8)
    if loss_type in REFERENCE_FREE:
        ref = None  # no reference is needed, so none is kept or run
    trainer = DPO(
        policy,
        ref,
        beta=0.5,
        learning_rate=2e-2,
        loss_type=loss_type,
        pad_token_id=PAD,
        **options_for(loss_type),
    )
    assert (trainer.ref_model is None) == (loss_type in REFERENCE_FREE)
    start = trainer.compute_loss(PROMPT, CHOSEN, REJECTED)
    history = [trainer.train_step(PROMPT, CHOSEN, REJECTED) for _ in range(25)]
    end = trainer.compute_loss(PROMPT, CHOSEN, REJECTED)
    assert all(h["skipped"] == 0.0 and math.isfinite(h["loss"]) for h in history)
    assert end["loss"] < start["loss"], (start["loss"], end["loss"])
    if loss_type in ("sft", "apo_down"):
        # sft only raises the chosen completions; apo_down lowers both, the rejected more
        return
    assert end["reward_margin"] > start["reward_margin"] + 0.1


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_rust_and_torch_backends_give_the_same_parameter_gradients(loss_type):
    policy = make_model(seed=11)
    ref = make_model(seed=12)
    batch = rlox.collate_pairs(PROMPT, CHOSEN, REJECTED, pad_token_id=PAD)
    with torch.no_grad():
        ref_logps = sequence_logps(ref, batch)
    grads = {}
    for backend in ("rust", "torch"):
        policy.zero_grad(set_to_none=True)
        logps = sequence_logps(policy, batch)
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
            **options_for(loss_type),
        )
        weights = torch.tensor([0.5, 1.0, 2.0])  # uneven, so per-pair gradients must be exact
        (res.loss + (weights * res.losses).sum()).backward()
        grads[backend] = {k: p.grad.clone() for k, p in policy.named_parameters()}
    for k in grads["rust"]:
        torch.testing.assert_close(grads["rust"][k], grads["torch"][k], rtol=1e-4, atol=1e-6)


def test_multi_loss_reports_each_component():
    policy, ref = make_pair(seed=3)
    trainer = DPO(
        policy,
        ref,
        loss_type=["sigmoid", "bco_pair", "sft"],
        loss_weights=[0.8, 0.2, 1.0],
        rpo_alpha=0.5,
        pad_token_id=PAD,
    )
    m = trainer.compute_loss(PROMPT, CHOSEN, REJECTED)
    parts = {k: m[f"loss_{k}"] for k in ("sigmoid", "bco_pair", "sft", "rpo")}
    assert parts["sigmoid"] == pytest.approx(math.log(2.0), abs=1e-6)  # policy == reference
    want = 0.8 * parts["sigmoid"] + 0.2 * parts["bco_pair"] + parts["sft"] + 0.5 * parts["rpo"]
    assert m["loss"] == pytest.approx(want, rel=1e-6)
    # sft is the NLL over all chosen tokens of the batch (TRL); rpo the mean of each pair's
    # token-mean NLL (RPO): they differ when the chosen lengths differ
    batch = rlox.collate_pairs(PROMPT, CHOSEN, REJECTED, pad_token_id=PAD)
    n = len(batch.chosen_lengths)
    was_training = policy.training
    policy.eval()
    with torch.no_grad():
        pc = sequence_logps(policy, batch)[:n].double()
    policy.train(was_training)
    lc = batch.chosen_lengths.double()
    assert parts["sft"] == pytest.approx(float(-pc.sum() / lc.sum()), rel=1e-5)
    assert parts["rpo"] == pytest.approx(float((-pc / lc).mean()), rel=1e-5)


def test_reference_free_runs_without_a_reference():
    policy, ref = make_pair(seed=4)
    free = DPO(copy.deepcopy(policy), None, reference_free=True, pad_token_id=PAD)
    zeros_ref = DPO(copy.deepcopy(policy), ref, pad_token_id=PAD)
    m_free = free.compute_loss(PROMPT, CHOSEN, REJECTED)
    batch = rlox.collate_pairs(PROMPT, CHOSEN, REJECTED, pad_token_id=PAD)
    with torch.no_grad():
        logps = sequence_logps(policy, batch)
    z = 0.1 * (logps[:3] - logps[3:]).double()
    assert m_free["loss"] == pytest.approx(float(torch.nn.functional.softplus(-z).mean()), rel=1e-5)
    assert zeros_ref.compute_loss(PROMPT, CHOSEN, REJECTED)["loss"] == pytest.approx(math.log(2))


def test_bco_shift_is_the_running_mean_of_training_rewards():
    policy, ref = make_pair(seed=5)
    trainer = DPO(
        policy,
        ref,
        beta=0.5,
        loss_type="bco_pair",
        learning_rate=1e-2,
        pad_token_id=PAD,
        bco_running_mean=True,
    )
    batch = rlox.collate_pairs(PROMPT, CHOSEN, REJECTED, pad_token_id=PAD)
    seen = []
    for _ in range(3):
        with torch.no_grad():
            u = sequence_logps(policy, batch).double() - sequence_logps(ref, batch).double()
        seen.append(0.5 * u)
        delta = float(torch.cat(seen).mean())
        rc, rr = seen[-1][:3], seen[-1][3:]
        want = (
            torch.nn.functional.softplus(-(rc - delta)) + torch.nn.functional.softplus(rr - delta)
        ).mean()
        metrics = trainer.train_step(batch)
        assert metrics["loss"] == pytest.approx(float(want), rel=1e-5)
    assert trainer.bco_reward_count == 18
    assert trainer.bco_reward_sum / 18 == pytest.approx(float(torch.cat(seen).mean()), rel=1e-6)


def test_loss_options_survive_save_and_load(tmp_path):
    policy, ref = make_pair(seed=6)
    trainer = DPO(
        policy,
        ref,
        loss_type=["robust", "bco_pair"],
        loss_weights=[1.0, 0.5],
        ld_alpha=0.5,
        label_smoothing=0.1,
        pad_token_id=PAD,
        bco_running_mean=True,
    )
    trainer.train_step(PROMPT, CHOSEN, REJECTED)
    trainer.save(tmp_path / "ckpt")
    loaded = DPO.load(tmp_path / "ckpt", copy.deepcopy(policy), ref)
    assert loaded.config == trainer.config
    assert loaded.config.loss_type == ("robust", "bco_pair")
    assert loaded.bco_reward_count == trainer.bco_reward_count == 6
    assert loaded.bco_reward_sum == trainer.bco_reward_sum


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"ld_alpha": 1.5}, ValueError, r"^ld_alpha: must be in \[0, 1\]"),
        ({"ld_alpha": "x"}, TypeError, r"^ld_alpha: expected a float"),
        ({"loss_type": "exo_pair"}, ValueError, r"^label_smoothing: .*exo_pair"),
        ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, ValueError, "^loss_weights"),
        ({"f_divergence": "kl"}, ValueError, r"^f_divergence: unknown"),
        ({"loss_type": "hinge", "label_smoothing": 0.2}, ValueError, "^label_smoothing"),
        ({"label_smoothing": 0.1}, ValueError, r'^label_smoothing: .*loss_type="cdpo"'),
    ],
)
def test_trainer_rejects_bad_loss_options(kwargs, exc, pattern):
    policy, ref = make_pair(seed=7)
    with pytest.raises(exc, match=pattern):
        DPO(policy, ref, **kwargs)


# --------------------------------------------------------------------------------------------
# LD-DPO weighting where log-probs are summed


def ld_reference(model, ds: PreferenceDataset, indices, alpha: float) -> torch.Tensor:
    """(2B,) LD-weighted sums, each sequence run alone: tokens past the pair's shorter
    completion count with weight alpha."""
    out = []
    for side in ("chosen", "rejected"):
        for i in indices:
            pair = ds[int(i)]
            shorter = min(len(pair["chosen"]), len(pair["rejected"]))
            ids = torch.tensor(np.concatenate([pair["prompt"], pair[side]]))[None].long()
            with torch.no_grad():
                logits = model(ids)
            logp = torch.log_softmax(logits[0].double(), -1)
            p = len(pair["prompt"])
            tok = logp[p - 1 : -1].gather(1, ids[0, p:, None])[:, 0]
            w = torch.where(torch.arange(tok.shape[0]) < shorter, 1.0, alpha).double()
            out.append((tok * w).sum())
    return torch.stack(out)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_ld_alpha_weights_tokens_beyond_the_shorter_completion_in_every_layout(alpha):
    ds = PreferenceDataset.from_lists(*random_pairs(12, seed=3), vocab_size=VOCAB)
    torch.manual_seed(0)
    model = TinyCausalLM(TinyLMConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=2)).eval()
    idx = np.arange(12)
    want = ld_reference(model, ds, idx, alpha)
    plain = ld_reference(model, ds, idx, 1.0)
    if alpha != 1.0:
        assert not torch.allclose(want, plain, atol=1e-3)  # the weighting matters on this data
    for layout in LAYOUTS:
        batch = ds.collate(idx, layout=layout)
        with torch.no_grad():
            got = sequence_logps(model, batch, ld_alpha=alpha)
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5, msg=layout)
