"""Tests of the tiny causal LM (``rlox.models``) and the DPO demo (``rlox.demo``)."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from rlox.demo import (
    BOS,
    EOS,
    PAD,
    SEP,
    correct_answer,
    corrupt_answer,
    is_held_out,
    main,
    make_sft_batch,
    make_task_batch,
    run_demo,
    sample_digits,
    task_success,
)
from rlox.models import TinyCausalLM, TinyLMConfig, build_attention_mask, generate_greedy

VOCAB = 23
ATOL = 1e-5


@pytest.fixture
def model() -> TinyCausalLM:
    torch.manual_seed(0)
    return TinyCausalLM(TinyLMConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4)).eval()


def _ids(*rows: list[int]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long)


def test_config_defaults_and_validation() -> None:
    config = TinyLMConfig(vocab_size=10, d_model=48)
    assert config.d_ff == 192
    with pytest.raises(ValueError):
        TinyLMConfig(vocab_size=10, d_model=30, n_heads=4)


def test_forward_shape_dtype_and_tied_head(model: TinyCausalLM) -> None:
    logits = model(torch.randint(0, VOCAB, (3, 7)))
    assert logits.shape == (3, 7, VOCAB)
    assert logits.dtype == torch.float32
    assert model.lm_head.weight is model.tok_emb.weight
    untied = TinyCausalLM(TinyLMConfig(vocab_size=VOCAB, tie_embeddings=False))
    assert untied.lm_head.weight is not untied.tok_emb.weight


def test_right_padding_with_2d_mask_leaves_logits_unchanged(model: TinyCausalLM) -> None:
    seqs = [[3, 7, 1, 9, 4, 4], [5, 2, 8]]
    width = 9
    padded = _ids(*(s + [0] * (width - len(s)) for s in seqs))
    mask = _ids(*([1] * len(s) + [0] * (width - len(s)) for s in seqs))
    batched = model(padded, attention_mask=mask)
    assert torch.isfinite(batched).all()
    for i, s in enumerate(seqs):
        alone = model(_ids(s))
        torch.testing.assert_close(batched[i, : len(s)], alone[0], atol=ATOL, rtol=0)


def test_left_padding_with_position_ids_leaves_logits_unchanged(model: TinyCausalLM) -> None:
    seq = [4, 8, 15, 16, 2]
    padded = _ids([0, 0, 0, *seq])
    mask = _ids([0, 0, 0, 1, 1, 1, 1, 1])
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    out = model(padded, attention_mask=mask, position_ids=position_ids)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 3:], model(_ids(seq))[0], atol=ATOL, rtol=0)


def test_packed_block_diagonal_4d_mask_matches_separate_runs(model: TinyCausalLM) -> None:
    first, second = [3, 7, 1, 9, 4], [5, 2, 8, 11]
    n1, n = len(first), len(first) + len(second)
    segment = torch.tensor([0] * n1 + [1] * len(second))
    same_segment = segment[:, None] == segment[None, :]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    mask = (same_segment & causal).view(1, 1, n, n)
    position_ids = _ids([*range(n1), *range(len(second))])
    packed = model(_ids(first + second), attention_mask=mask, position_ids=position_ids)
    torch.testing.assert_close(packed[0, :n1], model(_ids(first))[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(packed[0, n1:], model(_ids(second))[0], atol=ATOL, rtol=0)


def test_fully_masked_queries_stay_finite(model: TinyCausalLM) -> None:
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[..., 2:, 2:] = torch.ones(2, 2, dtype=torch.bool).tril()
    assert torch.isfinite(model(_ids([1, 2, 3, 4]), attention_mask=mask)).all()
    assert torch.isfinite(model(_ids([1, 2, 3, 4]), attention_mask=_ids([0, 0, 0, 0]))).all()


def test_out_of_range_positions_are_rejected(model: TinyCausalLM) -> None:
    with pytest.raises(ValueError, match="position ids"):
        model(torch.zeros(1, model.config.max_seq_len + 1, dtype=torch.long))


def test_build_attention_mask_rejects_bad_masks() -> None:
    with pytest.raises(TypeError):
        build_attention_mask(torch.ones(1, 1, 3, 3), 1, 3, torch.device("cpu"))
    with pytest.raises(ValueError):
        build_attention_mask(torch.ones(2, 4), 2, 3, torch.device("cpu"))
    with pytest.raises(ValueError):
        build_attention_mask(torch.ones(2, 3, 3), 2, 3, torch.device("cpu"))


def _stepwise_argmax(model: nn.Module, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    seq = prompt.clone()
    for _ in range(steps):
        next_token = model(seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, next_token], dim=1)
    return seq[:, prompt.shape[1] :]


def test_generate_greedy_matches_stepwise_argmax(model: TinyCausalLM) -> None:
    torch.manual_seed(1)
    prompt = torch.randint(0, VOCAB, (4, 5))
    expected = _stepwise_argmax(model, prompt, 6)
    out = generate_greedy(model, prompt, 6)
    assert out.dtype == torch.long and out.shape == (4, 6)
    assert torch.equal(out, expected)


def test_generate_greedy_fills_after_eos_and_accepts_logits_objects(model: TinyCausalLM) -> None:
    torch.manual_seed(2)
    prompt = torch.randint(0, VOCAB, (4, 3))
    expected = _stepwise_argmax(model, prompt, 5)
    eos = int(expected[0, 1])

    class Wrapped(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
            return SimpleNamespace(logits=self.inner(input_ids))

    out = generate_greedy(Wrapped(model), prompt, 5, eos_token_id=eos)
    for row, ref in zip(out.tolist(), expected.tolist(), strict=True):
        stop = ref.index(eos) if eos in ref else len(ref)
        assert row[: stop + 1] == ref[: stop + 1]
        assert all(t == eos for t in row[stop:])


def test_task_data_is_well_formed() -> None:
    rng = random.Random(0)
    for _ in range(200):
        digits = sample_digits(rng)
        assert 4 <= len(digits) <= 7 and len(set(digits)) == len(digits)
        assert not is_held_out(digits)
        assert corrupt_answer(rng, digits) != correct_answer(digits)
    assert is_held_out(sample_digits(rng, held_out=True))

    prompt, chosen, rejected = make_task_batch(rng, 16, held_out=True)
    assert prompt.dtype == chosen.dtype == rejected.dtype == torch.long
    assert prompt.shape[0] == chosen.shape[0] == rejected.shape[0] == 16
    for p, c in zip(prompt.tolist(), chosen.tolist(), strict=True):
        real = [t for t in p if t != PAD]
        assert p == [PAD] * (len(p) - len(real)) + real
        assert real[0] == BOS and real[-1] == SEP
        digits = real[1:-1]
        assert c[: len(digits) + 1] == correct_answer(digits)
        assert all(t == PAD for t in c[len(digits) + 1 :])
    input_ids, labels = make_sft_batch(rng, 8, correct_fraction=0.5)
    assert input_ids.shape == labels.shape
    assert ((labels == -100) | (labels < PAD)).all() and (labels == EOS).sum() == 8


def test_task_success_of_an_oracle_is_one() -> None:
    prompt, _, _ = make_task_batch(random.Random(3), 32, held_out=True)

    class Oracle(nn.Module):
        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            logits = torch.zeros(*input_ids.shape, PAD + 1)
            for i, row in enumerate(input_ids.tolist()):
                sep = row.index(SEP)
                answer = correct_answer(row[1:sep])
                done = len(row) - sep - 1
                logits[i, -1, answer[min(done, len(answer) - 1)]] = 1.0
            return logits

    assert task_success(Oracle(), prompt) == 1.0


def test_quick_demo_runs_and_does_not_hurt() -> None:
    result = run_demo(quick=True, progress=False)
    before, after = result["before"], result["after"]
    for numbers in (before, after):
        assert all(math.isfinite(v) for v in numbers.values())
    assert after["policy_success"] >= before["policy_success"]
    assert after["reference_success"] == before["reference_success"]
    assert after["reward_accuracy"] > 0.5
    assert after["reward_margin"] > 0.0


def test_main_quick_prints_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--quick", "--no-progress", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "greedy task success, policy" in out and "Task success:" in out
