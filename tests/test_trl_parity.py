"""Parity with TRL 1.16's ``DPOTrainer`` (the outside oracle), on a tiny local GPT-2 on the CPU.

rlox uses TRL's option names (``f_divergence_type`` is rlox's ``f_divergence``). With the same
models, the same token ids and the same options, rlox's batch loss must equal TRL's to 1e-5
relative, and six training steps (AdamW, constant lr, clipping at 1.0, data in order) must give
the same per-step losses to 1e-4 relative. TRL tokenizes the text itself (it appends EOS to the
completions); rlox is fed exactly the ids TRL built (see :mod:`trl_oracle`).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import trl
import trl_oracle as oracle
from tiny_hf import make_tokenizer

B = 6  # pairs in the single-batch cases
STEPS, STEP_B = 6, 4  # training trajectory: 6 steps of 4 pairs
LR = 5e-3
BETA = 0.2  # not the default 0.1 of either side, so that the option is really passed
LOSS_RTOL = 1e-5
TRAJECTORY_RTOL = 1e-4


@pytest.fixture(scope="module")
def setup():
    assert trl.__version__ == "1.16.0", trl.__version__
    tok = make_tokenizer()
    # Noise 0.05 keeps the log-ratios within a few nats: exp-based f-divergence scores then do
    # not amplify float32 rounding of the log-probs (~1e-5 nats on either side) beyond 1e-5.
    policy, ref = oracle.make_models(tok, noise=0.05)
    return {
        "tok": tok,
        "pad": tok.pad_token_id,
        "policy": policy,
        "ref": ref,
        "texts": oracle.pair_texts(B, seed=0),
        "train_texts": oracle.pair_texts(STEPS * STEP_B, seed=1),
    }


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("trl_out"))


def _close(a: float, b: float, rtol: float) -> bool:
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= rtol * max(abs(a), abs(b))


# ---------------------------------------------------------------------- the token ids
def test_trl_token_ids_and_collation(setup, out_dir):
    """TRL 1.16 appends the EOS token to each completion's TEXT (no BOS: this tokenizer adds
    none) and keeps the prompt's ids; rlox, fed those ids, builds the same (2B, L) rows."""
    tok, pad, texts = setup["tok"], setup["pad"], setup["texts"]
    with oracle.trl_trainer(setup["policy"], setup["ref"], tok, texts, out_dir, B) as tr:
        examples = oracle.trl_examples(tr)
        inputs = next(iter(tr.get_train_dataloader()))
    eos = tok.eos_token_id
    for i, ex in enumerate(examples):
        assert ex["prompt_ids"] == tok(texts["prompt"][i])["input_ids"]
        assert ex["chosen_ids"] == tok(texts["chosen"][i])["input_ids"] + [eos]
        assert ex["rejected_ids"] == tok(texts["rejected"][i])["input_ids"] + [eos]
        assert ex["prompt_ids"][0] != tok.bos_token_id
    lengths = {(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in examples}
    assert len(lengths) > 1 and any(c != r for c, r in lengths)  # unequal lengths

    from rlox import collate_pairs

    batch = collate_pairs(*oracle.id_matrices(examples, pad), pad_token_id=pad)
    assert batch.input_ids.shape[0] == inputs["input_ids"].shape[0] == 2 * B
    for row in range(2 * B):
        trl_real = inputs["attention_mask"][row].bool()
        rlox_real = batch.attention_mask[row].bool()
        assert inputs["input_ids"][row][trl_real].tolist() == (
            batch.input_ids[row][rlox_real].tolist()
        )
        trl_completion = inputs["completion_mask"][row][trl_real].bool()
        rlox_completion = batch.loss_mask[row][rlox_real].bool()
        assert trl_completion.tolist() == rlox_completion.tolist()


# ---------------------------------------------------------------------- one batch
LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
MPO = {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}


def _loss_cases() -> list:
    cases = []
    for lt in LOSS_TYPES:
        opts: dict = {"loss_type": lt}
        if lt == "exo_pair":
            opts["label_smoothing"] = 1e-3  # TRL requires > 0
        cases.append(pytest.param(opts, id=lt))
    for lt in ("robust", "aot", "aot_unpaired", "exo_pair"):
        cases.append(pytest.param({"loss_type": lt, "label_smoothing": 0.1}, id=f"{lt}-ls0.1"))
    # sigmoid and sigmoid_norm ignore label_smoothing in TRL 1.16 (rlox refuses it there alone)
    for lt in ("sigmoid", "sigmoid_norm"):
        cases.append(
            pytest.param(
                {"loss_type": ["robust", lt], "loss_weights": [0.5, 1.0], "label_smoothing": 0.1},
                id=f"robust+{lt}-ls0.1",
            )
        )
    cases.append(pytest.param({"loss_type": "discopop", "discopop_tau": 0.2}, id="discopop-tau0.2"))
    for lt in ("sigmoid", "ipo", "sigmoid_norm"):
        for div in ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"):
            cases.append(
                pytest.param({"loss_type": lt, "f_divergence_type": div}, id=f"{lt}-{div}")
            )
            cases.append(
                pytest.param(
                    {"loss_type": lt, "f_divergence_type": div, "f_alpha_divergence_coef": 0.3},
                    id=f"{lt}-{div}-coef0.3",
                )
            )
    cases.append(pytest.param({"loss_type": "sigmoid", "ld_alpha": 0.5}, id="sigmoid-ld0.5"))
    cases.append(pytest.param(dict(MPO), id="mpo"))
    cases.append(
        pytest.param({"loss_type": "sigmoid", "use_weighting": True}, id="sigmoid-weighting")
    )
    # TRL 1.16 cannot weight a mix that holds "sft": it multiplies the expanded scalar sft loss
    # in place (RuntimeError), so the weighted mix here is MPO without its sft term.
    cases.append(
        pytest.param(
            {
                "loss_type": ["sigmoid", "bco_pair"],
                "loss_weights": [0.8, 0.2],
                "use_weighting": True,
            },
            id="sigmoid+bco_pair-weighting",
        )
    )
    return cases


@pytest.mark.parametrize("options", _loss_cases())
def test_batch_loss_matches_trl(setup, out_dir, options):
    options = dict(options, beta=BETA)
    policy, ref = setup["policy"], setup["ref"]
    with oracle.trl_trainer(policy, ref, setup["tok"], setup["texts"], out_dir, B, **options) as tr:
        examples = oracle.trl_examples(tr)
        expected = oracle.trl_batch_loss(tr)
    got = oracle.rlox_batch_loss(policy, ref, examples, setup["pad"], **options)
    assert _close(got, expected, LOSS_RTOL), (
        f"rlox {got!r} vs TRL {expected!r} (rel {abs(got - expected) / abs(expected):.3g})"
    )


@pytest.mark.parametrize("loss_type", ["sigmoid", "sigmoid_norm"])
def test_label_smoothing_that_trl_ignores_is_refused(setup, loss_type):
    """TRL 1.16 silently ignores label_smoothing for these types; rlox says so instead."""
    from rlox import DPO

    with pytest.raises(ValueError, match="^label_smoothing: .*cdpo"):
        DPO(setup["policy"], setup["ref"], loss_type=loss_type, label_smoothing=0.1)


def test_models_differ(setup, out_dir):
    """The policy is not the reference: the sigmoid loss is away from log 2."""
    with oracle.trl_trainer(
        setup["policy"], setup["ref"], setup["tok"], setup["texts"], out_dir, B, beta=BETA
    ) as tr:
        assert abs(oracle.trl_batch_loss(tr) - math.log(2)) > 1e-2


# ---------------------------------------------------------------------- training
def _assert_trajectory(got: list[float], expected: list[float]) -> None:
    assert len(expected) == STEPS, expected
    assert len(got) == len(expected), (got, expected)
    bad = [
        i
        for i, (a, b) in enumerate(zip(got, expected, strict=True))
        if not _close(a, b, TRAJECTORY_RTOL)
    ]
    assert not bad, f"steps {bad} differ: rlox {got} vs TRL {expected}"
    assert len({round(x, 4) for x in expected}) > 1  # the steps moved the loss


def _trl_run(setup, out_dir, texts, epochs, policy=None, ref=None, **options):
    losses, examples, hyper = oracle.trl_trajectory(
        setup["policy"] if policy is None else policy,
        setup["ref"] if ref is None else ref,
        setup["tok"],
        texts,
        out_dir,
        STEP_B,
        learning_rate=LR,
        epochs=epochs,
        beta=BETA,
        **options,
    )
    return losses, examples, hyper


@pytest.mark.parametrize(
    "options",
    [pytest.param({"loss_type": "sigmoid"}, id="sigmoid"), pytest.param(dict(MPO), id="mpo")],
)
def test_train_step_trajectory_matches_trl(setup, out_dir, options):
    """Six ``train_step`` calls on TRL's six batches, in TRL's order, with AdamW."""
    expected, examples, trl_hyper = _trl_run(setup, out_dir, setup["train_texts"], 1, **options)
    got, hyper = oracle.rlox_step_trajectory(
        setup["policy"],
        setup["ref"],
        examples,
        setup["pad"],
        STEP_B,
        learning_rate=LR,
        beta=BETA,
        **options,
    )
    assert hyper == trl_hyper  # same AdamW: lr, betas, eps, weight decay
    _assert_trajectory(got, expected)


def test_fit_trajectory_matches_trl(setup, out_dir):
    """``fit`` (default optimizer, constant schedule): one batch of 4 pairs for 6 epochs, so
    rlox's shuffling cannot change what a step sees; TRL runs the same 6 epochs."""
    texts = {k: v[:STEP_B] for k, v in setup["train_texts"].items()}
    expected, examples, _ = _trl_run(setup, out_dir, texts, STEPS)
    got = oracle.rlox_fit_trajectory(
        setup["policy"],
        setup["ref"],
        examples,
        setup["pad"],
        STEP_B,
        learning_rate=LR,
        epochs=STEPS,
        beta=BETA,
    )
    _assert_trajectory(got, expected)


def test_disable_dropout_default_matches_trl(setup, out_dir):
    """Models WITH dropout 0.1: TRL's ``disable_dropout=True`` (its default) and rlox's default
    must both turn it off, so the six ``train_step`` losses agree."""
    policy = oracle.set_dropout(copy.deepcopy(setup["policy"]), 0.1)
    ref = oracle.set_dropout(copy.deepcopy(setup["ref"]), 0.1)
    expected, examples, _ = _trl_run(setup, out_dir, setup["train_texts"], 1, policy, ref)
    torch.manual_seed(0)
    got, _ = oracle.rlox_step_trajectory(
        policy, ref, examples, setup["pad"], STEP_B, learning_rate=LR, beta=BETA
    )
    _assert_trajectory(got, expected)
