"""DPO.fit / evaluate / precompute_reference on tiny models and small synthetic stores."""

from __future__ import annotations

import copy
import json
import math
import random
import warnings

import numpy as np
import pytest
import torch

from rlox import DPO, PreferenceDataset, sequence_logps
from rlox.algorithms.dpo import FitResult, schedule_factor
from rlox.losses import dpo_loss
from rlox.models import TinyCausalLM, TinyLMConfig
from rlox.tracking import RECORD_METRICS

VOCAB = 32


@pytest.fixture(autouse=True, scope="module")
def _single_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_dataset(n: int = 12, seed: int = 0, long_prompt: bool = False) -> PreferenceDataset:
    """``n`` random pairs (ids 1..VOCAB-1); with ``long_prompt`` pair 0 has a 20-token prompt."""
    rng = random.Random(seed)

    def row(lo: int, hi: int) -> list[int]:
        return [rng.randrange(1, VOCAB) for _ in range(rng.randint(lo, hi))]

    prompts = [row(2, 6) for _ in range(n)]
    if long_prompt:
        prompts[0] = row(20, 20)
    return PreferenceDataset.from_lists(
        prompts, [row(1, 5) for _ in range(n)], [row(1, 5) for _ in range(n)]
    )


def make_model(seed: int = 0, dropout: float = 0.0, cls=TinyCausalLM) -> TinyCausalLM:
    torch.manual_seed(seed)
    config = TinyLMConfig(
        vocab_size=VOCAB, d_model=16, n_layers=1, n_heads=2, max_seq_len=32, dropout=dropout
    )
    return cls(config)


def perturbed(model: torch.nn.Module, seed: int = 1, scale: float = 0.3) -> torch.nn.Module:
    """A copy of ``model`` with noise on every weight (a policy that differs from its reference)."""
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return other


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_params_close(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


# --------------------------------------------------------------------------------------------
# gradient accumulation


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("micro", [(4, 2), (3, 3)])
@pytest.mark.parametrize(
    "loss", [{}, {"loss_type": "sft"}, {"loss_type": ["sigmoid", "sft"], "loss_weights": [1, 0.5]}]
)
def test_accumulation_equals_one_union_batch(layout, micro, loss):
    """k micro-batches of unequal pair counts give the update of one batch of their union
    (``sft``, a token mean, included: each micro-batch counts by its share of chosen tokens)."""
    ds = make_dataset(7)
    micro_size, k = micro
    sizes = [len(b) for b in ds.batches(batch_size=micro_size, seed=0, epoch=0, layout=layout)]
    assert len(sizes) == k and len(set(sizes)) > 1 and sum(sizes) == 7
    policy = perturbed(make_model())
    ref = make_model()
    results = []
    for batch_size, gas in ((7, 1), (micro_size, k)):
        model = copy.deepcopy(policy)
        trainer = DPO(
            model,
            copy.deepcopy(ref),
            beta=0.5,
            max_grad_norm=None,
            optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
            **loss,
        )
        seen = []
        result = trainer.fit(
            ds,
            batch_size=batch_size,
            gradient_accumulation_steps=gas,
            layout=layout,
            progress=False,
            log_every=None,
            callback=lambda step, m, seen=seen: seen.append(m),
        )
        assert result.steps == 1 and trainer.global_step == 1
        results.append((params(model), seen[0]))
    (union, m_union), (accumulated, m_acc) = results
    assert any(not torch.equal(union[k], policy.state_dict()[k]) for k in union)
    assert_params_close(union, accumulated)
    assert m_union["num_pairs"] == m_acc["num_pairs"] == 7
    for key in ("loss", "reward_accuracy", "reward_margin", "chosen_logps", "grad_norm"):
        assert m_acc[key] == pytest.approx(m_union[key], rel=1e-6, abs=1e-7), key


def test_accumulation_across_epoch_end_and_max_steps():
    ds = make_dataset(10)  # batch_size 3 -> 4 batches per epoch -> ceil(4 / 3) = 2 steps
    trainer = DPO(make_model(), make_model(), learning_rate=1e-3)
    result = trainer.fit(
        ds, epochs=3, batch_size=3, gradient_accumulation_steps=3, progress=False, log_every=None
    )
    assert isinstance(result, FitResult)
    assert result.steps == 6 and result.epochs == 3.0 and result.skipped == 0
    result = trainer.fit(ds, epochs=3, batch_size=3, max_steps=4, progress=False, log_every=None)
    assert result.steps == 4 and result.epochs == 1.0


# --------------------------------------------------------------------------------------------
# learning-rate schedules and optimizer


def test_schedule_factors_by_hand():
    const = schedule_factor("constant", 2, 6)
    assert [const(s) for s in range(6)] == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]
    linear = schedule_factor("linear", 2, 6)
    assert [linear(s) for s in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    cosine = schedule_factor("cosine", 0, 4)
    want = [1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2]
    assert [cosine(s) for s in range(4)] == pytest.approx(want, abs=1e-15)
    with pytest.raises(ValueError, match="^lr_scheduler"):
        schedule_factor("step", 0, 4)


@pytest.mark.parametrize(
    "kind, warmup, want",
    [
        ("linear", 1, [1.0, 1.0, 0.8, 0.6, 0.4, 0.2]),
        ("cosine", 2, [0.5, 1.0, 1.0, 0.8535533905932737, 0.5, 0.14644660940672627]),
        ("constant", 3, [1 / 3, 2 / 3, 1.0, 1.0, 1.0, 1.0]),
    ],
)
def test_fit_uses_the_schedule(kind, warmup, want):
    """The lr of each optimizer step over a 6-step run (12 pairs, batches of 2)."""
    trainer = DPO(make_model(), make_model(), learning_rate=0.1)
    lrs = []
    trainer.fit(
        make_dataset(12),
        batch_size=2,
        lr_scheduler=kind,
        warmup_steps=warmup,
        progress=False,
        log_every=None,
        callback=lambda step, m: lrs.append(m["lr"]),
    )
    assert lrs == pytest.approx([0.1 * w for w in want], rel=1e-12)


def test_weight_decay_switches_to_adamw_without_decay_on_vectors():
    model = make_model()
    trainer = DPO(model, make_model(), learning_rate=1e-3)
    assert type(trainer.optimizer) is torch.optim.Adam
    trainer.fit(make_dataset(4), batch_size=4, weight_decay=0.1, progress=False, log_every=None)
    opt = trainer.optimizer
    assert type(opt) is torch.optim.AdamW
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert decay | no_decay == {id(p) for p in model.parameters()}
    assert all(p.ndim >= 2 for p in model.parameters() if id(p) in decay)
    assert id(model.ln_f.weight) in no_decay and id(model.blocks[0].attn.qkv.bias) in no_decay
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    custom = DPO(model, make_model(), optimizer=sgd)
    with pytest.raises(ValueError, match="^weight_decay"):
        custom.fit(make_dataset(4), batch_size=4, weight_decay=0.1, progress=False)


def test_save_load_keeps_adamw(tmp_path):
    trainer = DPO(make_model(), make_model(), learning_rate=1e-3)
    trainer.fit(make_dataset(4), batch_size=2, weight_decay=0.1, progress=False, log_every=None)
    trainer.save(tmp_path)
    loaded = DPO.load(tmp_path, make_model(seed=5), make_model())
    assert type(loaded.optimizer) is torch.optim.AdamW
    assert [g["weight_decay"] for g in loaded.optimizer.param_groups] == [0.1, 0.0]


def test_bf16_autocast_runs_the_forward_in_bfloat16():
    model = make_model()
    seen = []
    model.blocks[0].mlp[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    trainer = DPO(model, make_model(), learning_rate=1e-2)
    trainer.check_layout("padded")  # the route probe runs in the model's own dtype
    seen.clear()
    result = trainer.fit(
        make_dataset(8), batch_size=4, mixed_precision="bf16", progress=False, log_every=None
    )
    assert seen and all(d == torch.bfloat16 for d in seen)
    assert math.isfinite(result.metrics["loss"]) and result.skipped == 0
    assert all(p.dtype == torch.float32 and p.isfinite().all() for p in model.parameters())
    assert trainer._autocast is None  # restored after the run


def test_fit_rejects_bad_arguments(tmp_path):
    trainer = DPO(make_model(), make_model())
    ds = make_dataset(4)
    cases = [
        (dict(), ValueError, "^batch_size"),
        (dict(batch_size=2, lr_scheduler="step"), ValueError, "^lr_scheduler"),
        (dict(batch_size=2, mixed_precision="fp16"), ValueError, "^mixed_precision"),
        (dict(batch_size=2, save_every=2), ValueError, "^output_dir"),
        (dict(batch_size=2, resume_from="latest"), ValueError, "^output_dir"),
        (dict(batch_size=2, gradient_accumulation_steps=0), ValueError, "^gradient_accumulation"),
        (dict(batch_size=2, epochs=1.5), TypeError, "^epochs"),
        (dict(batch_size=2, weight_decay=-1.0), ValueError, "^weight_decay"),
    ]
    for kwargs, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            trainer.fit(ds, progress=False, **kwargs)
    with pytest.raises(TypeError, match="^train_dataset"):
        trainer.fit([1, 2], batch_size=2)
    with pytest.raises(TypeError, match="^eval_dataset"):
        trainer.fit(ds, "x", batch_size=2)


# --------------------------------------------------------------------------------------------
# non-finite steps


class FlakyLM(TinyCausalLM):
    """NaN logits on the training-mode forward calls picked by ``bad(call_number)``."""

    bad = staticmethod(lambda call: False)

    def __init__(self, config):
        super().__init__(config)
        self.calls = 0

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_at=None):
        out = super().forward(input_ids, attention_mask, position_ids, logits_at)
        if self.training:
            self.calls += 1
            if self.bad(self.calls):
                out = out * math.nan
        return out


def test_consecutive_non_finite_steps_raise_and_weights_stay_finite():
    model = make_model(cls=FlakyLM)
    model.bad = lambda call: True
    before = params(model)
    trainer = DPO(model, make_model(), learning_rate=1e-2)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        with pytest.raises(RuntimeError, match=r"last 3 optimizer steps were all skipped"):
            trainer.fit(make_dataset(12), batch_size=2, max_consecutive_skips=3, progress=False)
    assert trainer.skipped_steps == 3 and trainer.global_step == 0
    for k, v in params(model).items():
        assert torch.equal(v, before[k]) and v.isfinite().all(), k


def test_isolated_non_finite_steps_are_skipped_and_counted(tmp_path):
    model = make_model(cls=FlakyLM)
    model.bad = lambda call: call % 3 == 0
    before = params(model)
    trainer = DPO(model, make_model(), learning_rate=1e-2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = trainer.fit(
            make_dataset(12),
            batch_size=2,
            max_consecutive_skips=2,
            progress=False,
            log_every=3,
            output_dir=tmp_path,
        )
    assert sum("update skipped" in str(w.message) for w in caught) == 2
    assert result.steps == 6 and result.skipped == 2 and trainer.global_step == 4
    after = params(model)
    assert all(v.isfinite().all() for v in after.values())
    assert any(not torch.equal(after[k], before[k]) for k in after)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records if r["split"] == "train"] == [1, 1]
    assert all(math.isfinite(r["loss"]) for r in records)


# --------------------------------------------------------------------------------------------
# logging


def test_metrics_jsonl_schema_and_stdout_lines(tmp_path, capsys):
    ds, ev = make_dataset(12), make_dataset(5, seed=3)
    trainer = DPO(make_model(), make_model(), loss_type=["sigmoid", "sft"], learning_rate=1e-2)
    result = trainer.fit(
        ds,
        ev,
        epochs=2,
        batch_size=4,
        log_every=2,
        eval_every=3,
        output_dir=tmp_path,
        progress=False,
    )
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    base = {"step", "epoch", "split", "time", *RECORD_METRICS, "loss_sigmoid", "loss_sft"}
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in train] == [2, 4, 6]
    assert [r["step"] for r in evals] == [3, 6]
    for r in train:
        assert set(r) == base | {"lr", "grad_norm", "skipped"}
        assert isinstance(r["step"], int) and isinstance(r["skipped"], int)
        assert isinstance(r["epoch"], float) and isinstance(r["time"], float)
        assert all(isinstance(r[k], float) for k in RECORD_METRICS)
    for r in evals:
        assert set(r) == base
    assert [r["epoch"] for r in train] == pytest.approx([2 / 3, 4 / 3, 2.0])
    times = [r["time"] for r in records]
    assert times == sorted(times) and times[0] >= 0
    assert result.eval is not None and result.eval["loss"] == pytest.approx(evals[-1]["loss"])
    out = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("[train] step") for line in out) == 3
    assert sum(line.startswith("[eval] step") for line in out) == 2
    assert any((tmp_path / "tensorboard").iterdir())


# --------------------------------------------------------------------------------------------
# evaluation


def manual_metrics(policy, ref, ds, beta, max_length):
    """Per-pair metrics computed one pair at a time, averaged over the kept pairs."""
    rows = []
    for i in range(len(ds)):
        batch = ds.collate([i], max_length=max_length)
        if batch.num_pairs == 0:
            continue
        with torch.no_grad():
            pi = sequence_logps(policy.eval(), batch)
            rf = sequence_logps(ref, batch)
        out = dpo_loss(pi[:1], pi[1:], rf[:1], rf[1:], beta=beta)
        rc, rr = float(out.chosen_rewards), float(out.rejected_rewards)
        rows.append(
            dict(
                loss=float(out.loss),
                chosen_reward=rc,
                rejected_reward=rr,
                reward_margin=rc - rr,
                reward_accuracy=float(rc > rr),
                chosen_logps=float(pi[0]),
                rejected_logps=float(pi[1]),
            )
        )
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}, len(rows)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_evaluate_is_the_mean_over_all_pairs(layout):
    ds = make_dataset(11, long_prompt=True)
    ref = make_model()
    policy = perturbed(ref)
    trainer = DPO(policy, copy.deepcopy(ref), beta=0.5)
    policy.train()
    got = trainer.evaluate(ds, batch_size=4, layout=layout, max_length=12)
    assert policy.training  # put back in its mode
    want, kept = manual_metrics(copy.deepcopy(policy), ref, ds, 0.5, 12)
    assert got["num_pairs"] == kept == 10 and got["num_dropped"] == 1
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    policy.eval()
    trainer.evaluate(ds, batch_size=4, max_length=12)
    assert not policy.training


# --------------------------------------------------------------------------------------------
# reference log-prob cache


def test_precomputed_reference_matches_the_live_reference(tmp_path):
    ds = make_dataset(10, long_prompt=True)
    ds.save(tmp_path / "store")
    ref = make_model()
    policy = perturbed(ref)
    opts = dict(batch_size=4, epochs=2, max_length=12, progress=False, log_every=None)

    def trainer_for(model, ref_model, **kw):
        return DPO(
            model,
            ref_model,
            beta=0.5,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
            **kw,
        )

    live_model = copy.deepcopy(policy)
    live = trainer_for(live_model, copy.deepcopy(ref))
    live_eval = live.evaluate(ds, batch_size=4, max_length=12)
    live.fit(ds, **opts)

    cached = live.precompute_reference(ds, batch_size=4, max_length=12, progress=False)
    assert cached.chosen.dtype == np.float64 and cached.chosen.shape == (10,)
    assert np.isnan(cached.chosen[0]) and np.isnan(cached.rejected[0])  # dropped by truncation
    assert np.isfinite(cached.chosen[1:]).all()
    assert cached.path == (tmp_path / "store").resolve() / "reference_logps" / cached.path.name
    meta = json.loads(cached.path.with_suffix(".json").read_text())
    assert meta["key"]["data"] == ds.fingerprint()
    assert meta["key"]["settings"] == {
        "max_length": 12,
        "max_prompt_length": None,
        "truncation": "keep_end",
        "ld_alpha": None,
    }
    stored = np.load(cached.path, allow_pickle=False)
    np.testing.assert_array_equal(stored, np.stack([cached.chosen, cached.rejected]))

    # A trainer without any reference reads the cache: from memory, and from disk after a load.
    for dataset in (ds, PreferenceDataset.load(tmp_path / "store")):
        model = copy.deepcopy(policy)
        trainer = trainer_for(model, None, precomputed_reference=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got_eval = trainer.evaluate(dataset, batch_size=4, max_length=12)
            trainer.fit(dataset, **opts)
        for k in ("loss", "chosen_reward", "rejected_reward", "reward_accuracy"):
            assert got_eval[k] == pytest.approx(live_eval[k], rel=1e-6, abs=1e-7), k
        assert_params_close(params(model), params(live_model))


def cached_trainer(tmp_path):
    """(dataset saved at ``tmp_path``, reference, trainer) with the reference log-probs cached."""
    ds = make_dataset(8)
    ds.save(tmp_path)
    ref = make_model()
    trainer = DPO(perturbed(ref), ref, beta=0.5)
    trainer.precompute_reference(ds, max_length=16, progress=False)
    return ds, ref, trainer


def test_reference_cache_is_invalidated_by_weights_data_and_settings(tmp_path):
    ds, ref, trainer = cached_trainer(tmp_path)
    before = trainer.evaluate(ds, max_length=16)

    # new reference weights: the cache no longer applies and the live reference runs
    with torch.no_grad():
        ref.blocks[0].mlp[0].weight.mul_(1.5)
    with pytest.warns(UserWarning, match="other reference weights; ignored"):
        stale = trainer.evaluate(ds, max_length=16)
    assert stale["chosen_reward"] != pytest.approx(before["chosen_reward"], rel=1e-6)
    with pytest.warns(UserWarning, match="ignored"):
        live = DPO(copy.deepcopy(trainer.model), copy.deepcopy(ref), beta=0.5).evaluate(
            ds, max_length=16
        )
    assert stale["loss"] == pytest.approx(live["loss"], rel=1e-12)
    # recomputed for the new weights: used without a warning
    trainer.precompute_reference(ds, max_length=16, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh = trainer.evaluate(ds, max_length=16)
    assert fresh["loss"] == pytest.approx(live["loss"], rel=1e-6)
    assert len(list((tmp_path / "reference_logps").glob("*.npy"))) == 2
    # without weights to check, the newest of the two caches is used
    blind = DPO(copy.deepcopy(trainer.model), None, beta=0.5, precomputed_reference=True)
    with pytest.warns(UserWarning, match="newest"):
        assert blind.evaluate(ds, max_length=16)["loss"] == pytest.approx(fresh["loss"])

    # new data saved over the store: the files no longer apply
    make_dataset(8, seed=9).save(tmp_path)
    changed = PreferenceDataset.load(tmp_path)
    blind = DPO(copy.deepcopy(trainer.model), None, precomputed_reference=True)
    with pytest.warns(UserWarning, match="other data; ignored"):
        with pytest.raises(ValueError, match="no precomputed reference log-probs match"):
            blind.evaluate(changed, max_length=16)

    # other truncation settings have no cache
    with pytest.raises(ValueError, match="no precomputed reference log-probs match"):
        DPO(copy.deepcopy(trainer.model), None, precomputed_reference=True).evaluate(
            ds, max_length=10
        )
    # a trainer without any reference cannot take steps outside fit/evaluate
    with pytest.raises(ValueError, match="^ref_model: this trainer has no reference"):
        blind.train_step(ds.collate([0, 1]))


def test_missing_eval_cache_fails_before_any_step(tmp_path):
    train, test = make_dataset(12), make_dataset(6, seed=4)
    ref = make_model()
    DPO(perturbed(ref), ref).precompute_reference(train, max_length=16, progress=False)
    policy = perturbed(ref)
    before = params(policy)
    blind = DPO(policy, None, precomputed_reference=True)
    with pytest.raises(ValueError, match="no precomputed reference log-probs match"):
        blind.fit(train, test, batch_size=4, max_length=16, output_dir=tmp_path, progress=False)
    assert blind.global_step == 0
    assert all(torch.equal(before[k], v) for k, v in params(policy).items())
    assert not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").read_text()


def test_dataset_fingerprint_ignores_storage_dtype(tmp_path):
    a = make_dataset(5)
    arrays = {k: v.astype(np.int64) for k, v in a.arrays.items()}
    b = PreferenceDataset.from_arrays(*(arrays[k] for k in a.arrays))
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != make_dataset(5, seed=1).fingerprint()
    assert a.directory is None
    a.save(tmp_path)
    assert a.directory == tmp_path.resolve()
    assert PreferenceDataset.load(tmp_path).fingerprint() == a.fingerprint()


# --------------------------------------------------------------------------------------------
# peft


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_peft_reference_is_the_model_with_adapters_disabled():
    import peft
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=1,
        n_embd=32,
        n_head=2,
        vocab_size=64,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    base = GPT2LMHeadModel(config)
    base_copy = copy.deepcopy(base).eval()
    lora = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["c_attn"],
        lora_dropout=0.0,
        fan_in_fan_out=True,
        init_lora_weights=False,
    )
    model = peft.get_peft_model(base, lora)
    trainer = DPO(model, None, beta=0.5, learning_rate=1e-2)
    assert trainer.ref_model is None
    ds = make_dataset(6)
    batch = ds.collate(np.arange(6))
    with torch.no_grad():
        base_logps = sequence_logps(base_copy, batch)
        policy_logps = sequence_logps(model, batch)
    assert not torch.allclose(policy_logps, base_logps, atol=1e-3)  # the adapters matter
    model.train()
    ref = trainer._reference_logps(batch)
    torch.testing.assert_close(ref, base_logps, atol=1e-5, rtol=0)
    assert model.training and all(m.training for m in model.modules())

    seen = []
    trainer.fit(
        ds,
        batch_size=6,
        max_steps=1,
        progress=False,
        log_every=None,
        callback=lambda step, m: seen.append(m),
    )
    want = 0.5 * (policy_logps[:6] - base_logps[:6]).double().mean()
    assert seen[0]["chosen_reward"] == pytest.approx(float(want), abs=1e-5)
    with torch.no_grad():  # adapters are back on and were trained; the base is untouched
        after = sequence_logps(model, batch)
        with model.disable_adapter():
            torch.testing.assert_close(sequence_logps(model, batch), base_logps, atol=1e-5, rtol=0)
    assert not torch.allclose(after, policy_logps, atol=1e-6)


def _edit_weight(ref: torch.nn.Module, how: str) -> None:
    """Change the reference in a way that leaves tensor identity and version counter alone."""
    w = ref.blocks[0].mlp[0].weight
    if how == "data.copy_":
        w.data.copy_(w.data * 1.5)
    elif how == "data[...] +=":
        w.data[0] += 0.5
    elif how == "data =":
        w.data = w.data * 1.5
    else:  # a dtype round trip rounds every weight to float16
        ref.to(torch.float16).to(torch.float32)


@pytest.mark.parametrize("how", ["data.copy_", "data[...] +=", "data =", "float16 round trip"])
def test_reference_cache_notices_edits_that_bypass_the_version_counter(tmp_path, how):
    ds, ref, trainer = cached_trainer(tmp_path)
    before = trainer.evaluate(ds, max_length=16)
    _edit_weight(ref, how)
    with pytest.warns(UserWarning, match="other reference weights; ignored"):
        got = trainer.evaluate(ds, max_length=16)
    # A fresh trainer has never seen the old weights: it runs the edited reference live.
    with pytest.warns(UserWarning, match="other reference weights; ignored"):
        live = DPO(copy.deepcopy(trainer.model), copy.deepcopy(ref), beta=0.5).evaluate(
            ds, max_length=16
        )
    assert got["loss"] == live["loss"]
    assert got["chosen_reward"] != pytest.approx(before["chosen_reward"], rel=1e-9)


def test_reference_weights_are_hashed_once_per_call(monkeypatch, tmp_path):
    import rlox.train.reference as reference_module

    calls = []
    real = reference_module.weights_digest
    monkeypatch.setattr(
        reference_module, "weights_digest", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    train, test = make_dataset(8), make_dataset(6, seed=3)
    train.save(tmp_path / "train")
    test.save(tmp_path / "test")
    ref = make_model()
    trainer = DPO(perturbed(ref), ref)
    for ds in (train, test):
        trainer.precompute_reference(ds, max_length=16, progress=False)
    assert len(calls) == 2
    calls.clear()
    opts = dict(batch_size=4, max_length=16, eval_every=1, progress=False, log_every=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.fit(train, test, max_steps=2, **opts)
    assert len(calls) == 1  # both caches checked, eval run twice: one hash
    trainer.evaluate(test, max_length=16)
    trainer.evaluate(test, max_length=16)
    assert len(calls) == 3  # each call hashes afresh: no digest outlives its call
    assert trainer._reference_weights._cached is None


# --------------------------------------------------------------------------------------------
# learning rate after fit


@pytest.mark.parametrize("scheduler", ["linear", "cosine"])
def test_fit_puts_back_the_configured_learning_rate(scheduler):
    ds = make_dataset(8)
    ref = make_model()
    policy = perturbed(ref)
    trainer = DPO(policy, ref, learning_rate=1e-3)
    seen = []
    trainer.fit(
        ds,
        batch_size=4,
        lr_scheduler=scheduler,
        progress=False,
        log_every=None,
        callback=lambda step, m: seen.append(trainer.optimizer.param_groups[0]["lr"]),
    )
    assert seen[-1] == 0.0  # the schedule did reach 0 inside fit
    assert trainer.optimizer.param_groups[0]["lr"] == 1e-3
    before = params(policy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.train_step(ds.collate(np.arange(4)))
    assert any(not torch.equal(before[k], v) for k, v in params(policy).items())


def test_train_step_warns_once_when_the_learning_rate_is_zero():
    ds = make_dataset(8)
    ref = make_model()
    trainer = DPO(perturbed(ref), ref)
    trainer.optimizer.param_groups[0]["lr"] = 0.0
    with pytest.warns(RuntimeWarning, match="learning rate of parameter group 0 is 0"):
        trainer.train_step(ds.collate(np.arange(4)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.train_step(ds.collate(np.arange(4)))
