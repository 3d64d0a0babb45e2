"""TRL-named trainer options: disable_dropout, TR-DPO (sync_ref_model), dict-style batches, sft
accumulation."""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import pytest
import torch
import transformers
from tiny_hf import gqa_llama

from rlox import DPO, PreferenceDataset, collate_pairs
from rlox.models import TinyCausalLM, TinyLMConfig
from rlox.train.dropout import disable_dropout

VOCAB = 40


def tiny_pairs(n: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Padded (B, T) id matrices (pad id 0) of unequal lengths."""
    rng = np.random.default_rng(seed)

    def mat(lo: int, hi: int) -> np.ndarray:
        out = np.zeros((n, hi), dtype=np.int64)
        for i in range(n):
            k = int(rng.integers(lo, hi + 1))
            out[i, :k] = rng.integers(1, VOCAB, size=k)
        return out

    return mat(2, 6), mat(1, 7), mat(1, 7)


def gpt2_default_dropout() -> transformers.GPT2LMHeadModel:
    """A tiny GPT-2 whose dropout settings are the config defaults (0.1 everywhere)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_layer=2,
        n_embd=32,
        n_head=2,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    assert config.resid_pdrop == config.attn_pdrop == config.embd_pdrop == 0.1
    return transformers.GPT2LMHeadModel(config)


def llama_attention_dropout() -> transformers.LlamaForCausalLM:
    """A tiny Llama with dropout only inside its attention function (a float it reads)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        attention_dropout=0.5,
        attn_implementation="eager",
    )
    return transformers.LlamaForCausalLM(config)


def tiny_with_dropout() -> TinyCausalLM:
    torch.manual_seed(0)
    cfg = TinyLMConfig(
        vocab_size=VOCAB, d_model=16, n_layers=1, n_heads=2, max_seq_len=32, dropout=0.3
    )
    return TinyCausalLM(cfg)


# --------------------------------------------------------------------------------------------
# disable_dropout


@pytest.mark.parametrize(
    "build", [gpt2_default_dropout, llama_attention_dropout, tiny_with_dropout]
)
def test_policy_equal_to_reference_gives_log2_in_train_step(build):
    """With dropout off, a policy equal to its reference gives exactly log 2 in training."""
    for seed in range(3):
        ref = build()
        trainer = DPO(copy.deepcopy(ref), ref, pad_token_id=0)
        m = trainer.train_step(*tiny_pairs(seed=seed))
        assert m["loss"] == pytest.approx(math.log(2), abs=1e-7)


@pytest.mark.parametrize(
    "build", [gpt2_default_dropout, llama_attention_dropout, tiny_with_dropout]
)
def test_dropout_left_on_makes_the_loss_noisy(build):
    """The check above can fail: with disable_dropout=False the policy's dropout moves the loss."""
    losses = []
    for seed in range(3):
        ref = build()
        trainer = DPO(copy.deepcopy(ref), ref, pad_token_id=0, disable_dropout=False)
        losses.append(trainer.train_step(*tiny_pairs(seed=seed))["loss"])
    assert max(abs(x - math.log(2)) for x in losses) > 1e-4


def test_disable_dropout_zeroes_modules_module_floats_and_config():
    gpt2 = gpt2_default_dropout()
    assert disable_dropout(gpt2) > 0
    drops = [m for m in gpt2.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(m.p == 0.0 for m in drops)
    cfg = gpt2.config
    assert cfg.resid_pdrop == cfg.attn_pdrop == cfg.embd_pdrop == 0.0
    llama = llama_attention_dropout()
    disable_dropout(llama)
    assert llama.config.attention_dropout == 0.0
    assert all(layer.self_attn.attention_dropout == 0.0 for layer in llama.model.layers)
    assert disable_dropout(llama) == 0  # nothing left to change


def test_disable_dropout_reaches_the_reference_too():
    ref = gpt2_default_dropout()
    DPO(copy.deepcopy(ref), ref)
    assert all(m.p == 0.0 for m in ref.modules() if isinstance(m, torch.nn.Dropout))


# --------------------------------------------------------------------------------------------
# dict-style batches


def test_pair_batch_is_a_read_only_mapping():
    batch = collate_pairs(*tiny_pairs(3), pad_token_id=0)
    assert batch["input_ids"] is batch.input_ids
    assert isinstance(batch["attention_mask"], torch.Tensor)
    assert set(batch.keys()) >= {"input_ids", "attention_mask", "position_ids", "loss_mask"}
    assert "cu_seqlens" not in batch and batch.get("cu_seqlens") is None  # padded: unset
    assert len(batch) == len(list(batch)) == len(dict(batch))
    with pytest.raises(KeyError):
        batch["no_such_field"]
    with pytest.raises(TypeError):
        batch["input_ids"] = batch.input_ids  # type: ignore[index]


def model_for(kind: str) -> torch.nn.Module:
    """GPT-2 with sdpa or rlox's per-segment attention, or a TinyCausalLM."""
    if kind == "tiny":
        torch.manual_seed(0)
        cfg = TinyLMConfig(vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=2, max_seq_len=64)
        return TinyCausalLM(cfg).eval()
    model = gpt2_default_dropout().eval()
    disable_dropout(model)
    if kind == "gpt2-varlen":
        from rlox.attention_varlen import register

        model.set_attn_implementation(register())
    return model


def logits_of(model: torch.nn.Module, **inputs) -> torch.Tensor:
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("kind", ["gpt2-sdpa", "gpt2-varlen", "tiny"])
@pytest.mark.parametrize("layout", ["padded", "packed", "prefix_shared"])
def test_model_inputs_give_each_sequence_its_own_logits(layout, kind):
    """``model(**batch.model_inputs(model))`` scores each sequence as if it ran alone, through
    the dense mask (sdpa) or per-segment attention (rlox_varlen, TinyCausalLM)."""
    model = model_for(kind)
    p, c, r = tiny_pairs(3)
    ds = PreferenceDataset.from_lists(
        [list(x[x > 0]) for x in p], [list(x[x > 0]) for x in c], [list(x[x > 0]) for x in r]
    )
    batch = ds.collate(list(range(3)), layout=layout, max_length=32)
    inputs = batch.model_inputs(model)
    segments = layout != "padded" and kind != "gpt2-sdpa"
    attend = {"attn_segments"} if segments else {"attention_mask"}
    assert set(inputs) == {"input_ids", "position_ids"} | attend
    with torch.no_grad():
        logits = logits_of(model, **inputs)
        for k in range(batch.plan_row.shape[0]):
            row, pos = int(batch.plan_row[k]), int(batch.plan_position[k])
            pair, side = int(batch.plan_pair[k]), int(batch.plan_side[k])
            seq = list(p[pair][p[pair] > 0]) + list((c if side == 0 else r)[pair])
            seq = [t for t in seq if t > 0]
            offset = pos - int(batch.position_ids[row, pos])  # the sequence's start in the row
            alone = logits_of(model, input_ids=torch.tensor([seq]))[0, pos - offset]
            torch.testing.assert_close(logits[row, pos], alone, atol=2e-5, rtol=0)


def test_model_inputs_give_flex_models_a_block_mask():
    from torch.nn.attention.flex_attention import BlockMask

    model = gqa_llama(VOCAB, "flex_attention")
    p, c, r = tiny_pairs(3)
    ds = PreferenceDataset.from_lists(*([list(x[x > 0]) for x in m] for m in (p, c, r)))
    batch = ds.collate([0, 1, 2], layout="packed", max_length=32)
    assert isinstance(batch.model_inputs(model)["attention_mask"], BlockMask)


# --------------------------------------------------------------------------------------------
# TR-DPO


def tiny_pair_models(seed: int = 0) -> tuple[TinyCausalLM, TinyCausalLM]:
    torch.manual_seed(seed)
    cfg = TinyLMConfig(vocab_size=VOCAB, d_model=16, n_layers=1, n_heads=2, max_seq_len=32)
    ref = TinyCausalLM(cfg)
    policy = copy.deepcopy(ref)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return policy, ref


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_reference_mixes_toward_policy_every_tau_steps():
    policy, ref = tiny_pair_models()
    alpha, tau = 0.25, 2
    trainer = DPO(
        policy,
        ref,
        learning_rate=1e-2,
        pad_token_id=0,
        sync_ref_model=True,
        ref_model_mixup_alpha=alpha,
        ref_model_sync_steps=tau,
    )
    start = weights(ref)
    trainer.train_step(*tiny_pairs(seed=0))
    assert all(torch.equal(start[k], v) for k, v in weights(ref).items())  # step 1: no mix
    assert not trainer.reference_drifted
    trainer.train_step(*tiny_pairs(seed=1))
    pol = weights(policy)
    for name, value in weights(ref).items():
        want = alpha * pol[name] + (1 - alpha) * start[name]
        torch.testing.assert_close(value, want, atol=1e-7, rtol=0)
    assert trainer.reference_drifted
    mixed = weights(ref)
    trainer.train_step(*tiny_pairs(seed=2))
    assert all(torch.equal(mixed[k], v) for k, v in weights(ref).items())  # step 3: no mix


def test_sync_ref_model_refusals():
    policy, ref = tiny_pair_models()
    with pytest.raises(ValueError, match="^sync_ref_model: precomputed"):
        DPO(policy, None, sync_ref_model=True, precomputed_reference=True)
    with pytest.raises(ValueError, match="^sync_ref_model: loss_type 'simpo'"):
        DPO(policy, ref, loss_type="simpo", sync_ref_model=True)
    trainer = DPO(policy, ref, sync_ref_model=True)
    ds = PreferenceDataset.from_lists([[1, 2]], [[3]], [[4]])
    with pytest.raises(ValueError, match="^sync_ref_model: TR-DPO moves"):
        trainer.precompute_reference(ds, progress=False)
    with pytest.raises(ValueError, match="^ref_model_mixup_alpha"):
        DPO(policy, ref, sync_ref_model=True, ref_model_mixup_alpha=0.0)
    with pytest.raises(ValueError, match="^ref_model_sync_steps"):
        DPO(policy, ref, sync_ref_model=True, ref_model_sync_steps=0)
    other = TinyCausalLM(TinyLMConfig(vocab_size=VOCAB, d_model=8, n_layers=1, n_heads=2))
    with pytest.raises(ValueError, match="^sync_ref_model: parameter"):
        DPO(policy, other, sync_ref_model=True)


def test_sync_ref_model_refuses_a_peft_reference():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    lora = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = peft.get_peft_model(transformers.LlamaForCausalLM(config), lora)
    with pytest.raises(ValueError, match="^sync_ref_model: a peft policy"):
        DPO(model, None, sync_ref_model=True)


def sync_dataset(n: int = 16) -> PreferenceDataset:
    rng = random.Random(3)

    def row(lo: int, hi: int) -> list[int]:
        return [rng.randrange(1, VOCAB) for _ in range(rng.randint(lo, hi))]

    return PreferenceDataset.from_lists(
        [row(2, 5) for _ in range(n)], [row(1, 5) for _ in range(n)], [row(1, 5) for _ in range(n)]
    )


def sync_trainer() -> DPO:
    policy, ref = tiny_pair_models(seed=5)
    return DPO(
        policy,
        ref,
        learning_rate=5e-3,
        sync_ref_model=True,
        ref_model_mixup_alpha=0.5,
        ref_model_sync_steps=2,
    )


FIT_KW = dict(batch_size=2, max_steps=6, progress=False, log_every=None)


def test_resume_with_a_moved_reference_is_bit_exact(tmp_path):
    whole = sync_trainer()
    whole.fit(sync_dataset(), **FIT_KW)
    first = sync_trainer()

    def crash(step: int, metrics: dict[str, float]) -> None:
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        first.fit(sync_dataset(), output_dir=tmp_path, save_every=3, callback=crash, **FIT_KW)
    step3 = tmp_path / "checkpoints" / "step-3"
    assert (step3 / "reference.safetensors").is_file()  # 3 >= tau: the reference has moved
    resumed = sync_trainer()
    resumed.fit(sync_dataset(), output_dir=tmp_path, resume_from="latest", **FIT_KW)
    assert resumed.global_step == whole.global_step == 6
    for a, b in ((whole.model, resumed.model), (whole.ref_model, resumed.ref_model)):
        wa, wb = weights(a), weights(b)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # Without the saved reference the resumed run would diverge: the initial one differs.
    initial = weights(sync_trainer().ref_model)
    assert any(not torch.equal(initial[k], v) for k, v in weights(whole.ref_model).items())


def test_save_and_load_keep_the_moved_reference(tmp_path):
    trainer = sync_trainer()
    for s in range(2):
        trainer.train_step(*tiny_pairs(seed=s))
    assert trainer.reference_drifted
    trainer.save(tmp_path / "saved")
    assert (tmp_path / "saved" / "reference.safetensors").is_file()
    policy, ref = tiny_pair_models(seed=5)
    loaded = DPO.load(tmp_path / "saved", policy, ref)
    want = weights(trainer.ref_model)
    assert all(torch.equal(want[k], v) for k, v in weights(loaded.ref_model).items())
    fresh = sync_trainer()
    fresh.save(tmp_path / "fresh")
    assert not (tmp_path / "fresh" / "reference.safetensors").exists()


# --------------------------------------------------------------------------------------------
# WPO weighting and the mixture-of-experts auxiliary loss, through the trainer


def _full_token_stats(model, prompt, completion):
    """(sum of log p, mean of log p - log sum p^2) over ``completion`` after ``prompt``."""
    ids = torch.tensor([list(prompt) + list(completion)])
    with torch.no_grad():
        logits = model(ids).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    pos = torch.arange(len(prompt) - 1, ids.shape[1] - 1)
    target = ids[0, pos + 1]
    tok = logp[pos, target]
    sq = torch.logsumexp(2 * logp[pos], -1)
    return float(tok.sum()), float((tok - sq).mean())


def test_use_weighting_multiplies_each_pair_by_its_wpo_weights():
    """The trainer's loss equals sigmoid DPO with each pair weighted by w_c * w_r (by hand)."""
    ref = llama_attention_dropout().double()
    policy = copy.deepcopy(ref)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.3 * torch.randn_like(p))
    p, c, r = tiny_pairs(4, seed=7)
    trainer = DPO(policy, ref, beta=0.5, use_weighting=True, pad_token_id=0)
    got = trainer.compute_loss(p, c, r)["loss"]
    losses = []
    for i in range(4):
        prompt, chosen, rejected = (list(x[i][x[i] > 0]) for x in (p, c, r))
        pc, wc = _full_token_stats(policy, prompt, chosen)
        pr, wr = _full_token_stats(policy, prompt, rejected)
        rc, _ = _full_token_stats(ref, prompt, chosen)
        rr, _ = _full_token_stats(ref, prompt, rejected)
        z = 0.5 * ((pc - rc) - (pr - rr))
        losses.append(math.exp(wc + wr) * math.log1p(math.exp(-z)))
    assert got == pytest.approx(sum(losses) / 4, rel=1e-6)
    plain = DPO(policy, ref, beta=0.5, pad_token_id=0).compute_loss(p, c, r)["loss"]
    assert abs(plain - got) > 1e-3  # the weights matter on this batch


def test_use_weighting_refuses_sorted_losses():
    policy, ref = tiny_pair_models()
    with pytest.raises(ValueError, match="^use_weighting"):
        DPO(policy, ref, loss_type="aot", use_weighting=True)


def _moe(coef=None):
    from tiny_hf import make_moe

    ref = make_moe("mixtral", vocab=VOCAB)
    policy = copy.deepcopy(ref)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return policy, ref


@pytest.mark.parametrize("coef", [None, 0.5])
def test_router_aux_loss_is_added_with_its_coefficient(coef):
    policy, ref = _moe()
    p, c, r = tiny_pairs(3, seed=2)
    with_aux = DPO(policy, ref, pad_token_id=0, router_aux_loss_coef=coef)
    without = DPO(policy, ref, pad_token_id=0, router_aux_loss_coef=0.0)
    m = with_aux.compute_loss(p, c, r)
    base = without.compute_loss(p, c, r)
    assert "aux_loss" not in base and base["loss"] > 0
    # the model's own load-balancing loss on the same padded rows
    batch = with_aux.collate(p, c, r)
    with torch.no_grad():
        out = policy(
            batch.input_ids, attention_mask=batch.attention_mask, output_router_logits=True
        )
    assert m["aux_loss"] == pytest.approx(float(out.aux_loss), rel=1e-6)
    want = 0.5 if coef == 0.5 else policy.config.router_aux_loss_coef
    assert m["loss"] == pytest.approx(base["loss"] + want * m["aux_loss"], rel=1e-6)


def test_router_aux_loss_gets_gradient_and_is_logged_by_fit():
    policy, ref = _moe()
    trainer = DPO(policy, ref, pad_token_id=0, router_aux_loss_coef=1.0, learning_rate=1e-2)
    router = [p for n, p in policy.named_parameters() if "gate" in n and "experts" not in n]
    before = [p.detach().clone() for p in router]
    m = trainer.train_step(*tiny_pairs(4, seed=3))
    assert math.isfinite(m["aux_loss"]) and m["aux_loss"] > 0
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, router, strict=True))
    assert "aux_loss" in trainer._metric_keys()


def test_router_aux_loss_coef_on_a_dense_model_is_an_error():
    policy, ref = tiny_pair_models()
    with pytest.raises(ValueError, match="^router_aux_loss_coef"):
        DPO(policy, ref, router_aux_loss_coef=0.1)
    DPO(policy, ref, router_aux_loss_coef=0.0)  # off: fine on any model
