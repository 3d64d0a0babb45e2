"""rlox.hf: local Hugging Face model directories in and out of DPO training (LoRA: test_hf_lora)."""

from __future__ import annotations

import json
import random

import pytest
import torch
import transformers
from tiny_hf import (  # noqa: E402
    PROBE,
    WORDS,
    logits,
    make_model,
    pair_batch,
    state,
)

from rlox import DPO, PreferenceDataset  # noqa: E402
from rlox.hf import frozen_copy, load_pretrained, save_pretrained  # noqa: E402


# ------------------------------------------------------------------------------------ loading
def test_load_returns_model_and_tokenizer(model_dir, tokenizer):
    model, tok = load_pretrained(model_dir)
    assert isinstance(model, transformers.PreTrainedModel)
    assert next(model.parameters()).dtype == torch.float32
    assert tok.eos_token_id == tokenizer.eos_token_id
    assert tok.pad_token_id == tokenizer.pad_token_id
    assert tok("the model answer").input_ids == tokenizer("the model answer").input_ids
    reference = make_model(
        "gpt2" if "gpt2" in model_dir.name else "llama", len(tokenizer), tokenizer
    )
    torch.testing.assert_close(logits(model, PROBE), logits(reference, PROBE), rtol=0, atol=0)


def test_load_dtype_and_device(gpt2_dir):
    model, _ = load_pretrained(gpt2_dir, dtype="bfloat16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model, _ = load_pretrained(gpt2_dir, dtype=torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    model, _ = load_pretrained(gpt2_dir, dtype="auto")  # the checkpoint's own dtype
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with pytest.raises(ValueError, match="^dtype: "):
        load_pretrained(gpt2_dir, dtype="float8")


def test_load_errors_name_path(tmp_path, gpt2_dir):
    with pytest.raises(ValueError, match="^path: .*not found"):
        load_pretrained(tmp_path / "missing")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="^path: .*a file"):
        load_pretrained(tmp_path / "file.txt")
    with pytest.raises(ValueError, match="^path: .*config.json missing"):
        load_pretrained(tmp_path)


def test_directory_without_tokenizer(tmp_path, tokenizer):
    make_model("gpt2", len(tokenizer), tokenizer).save_pretrained(str(tmp_path))
    model, tok = load_pretrained(tmp_path)
    assert tok is None
    assert isinstance(model, transformers.GPT2LMHeadModel)


def test_frozen_copy(gpt2_dir):
    model, _ = load_pretrained(gpt2_dir)
    ref = frozen_copy(model)
    assert not ref.training
    assert all(not p.requires_grad for p in ref.parameters())
    assert all(p.requires_grad for p in model.parameters())
    for (name, a), b in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert a.data_ptr() != b.data_ptr(), name
        assert torch.equal(a, b), name
    with pytest.raises(TypeError, match="^model: "):
        frozen_copy("not a model")


# ------------------------------------------------------------------------- training and saving
def test_train_save_reload(model_dir, tokenizer, tmp_path):
    model, tok = load_pretrained(model_dir)
    ref = frozen_copy(model)
    before, ref_before = state(model), state(ref)
    trainer = DPO(model, ref, beta=0.5, learning_rate=3e-3, pad_token_id=tok.pad_token_id)
    prompt, chosen, rejected = pair_batch(tok)
    losses = [trainer.train_step(prompt, chosen, rejected)["loss"] for _ in range(6)]
    assert losses[-1] < losses[0] - 0.05, losses
    after = state(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(ref_before[k], v) for k, v in state(ref).items())

    out = save_pretrained(model, tmp_path / "trained", tok)
    assert (out / "model.safetensors").is_file()
    assert (out / "config.json").is_file()
    assert (out / "tokenizer.json").is_file()
    reloaded, tok2 = load_pretrained(out)
    assert type(reloaded) is type(model)
    assert tok2.pad_token_id == tok.pad_token_id
    again = state(reloaded)
    assert set(again) >= {k for k in after if not k.endswith("attn.bias")}
    for key, value in again.items():
        torch.testing.assert_close(value, after[key], rtol=0, atol=0, msg=key)
    torch.testing.assert_close(logits(reloaded, PROBE), logits(model, PROBE), rtol=0, atol=0)


def test_save_errors(tmp_path, gpt2_dir):
    model, _ = load_pretrained(gpt2_dir)
    with pytest.raises(ValueError, match="^merge_lora: "):
        save_pretrained(model, tmp_path / "x", merge_lora=True)
    with pytest.raises(TypeError, match="^model: "):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path / "y")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="^path: "):
        save_pretrained(model, tmp_path / "file")


def test_save_bare_tokenizer(tmp_path, gpt2_dir, tokenizer):
    model, _ = load_pretrained(gpt2_dir)
    save_pretrained(model, tmp_path, tokenizer.backend_tokenizer)
    _, tok = load_pretrained(tmp_path)
    assert tok("a reward").input_ids == tokenizer("a reward").input_ids


# ----------------------------------------------------------------------------- DPO.fit on a dir
def test_fit_from_saved_model_dir(gpt2_dir, tmp_path):
    model, tok = load_pretrained(gpt2_dir)
    rng = random.Random(3)
    records = []
    for _ in range(24):
        prompt = " ".join(rng.choices(WORDS, k=4))
        records.append(
            {
                "prompt": prompt,
                "chosen": " better answer.",
                "rejected": " worse " + rng.choice(WORDS),
            }
        )
    data = PreferenceDataset.from_text(records, tok)
    assert len(data) == 24
    before = state(model)
    trainer = DPO(model, frozen_copy(model), beta=0.5, learning_rate=3e-3)
    trainer.fit(
        data,
        data,
        epochs=2,
        batch_size=8,
        max_length=48,
        output_dir=tmp_path / "run",
        progress=False,
        log_every=1,
        seed=0,
    )
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert len(train_rows) == 6
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    after = state(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    metrics = trainer.evaluate(data, batch_size=8, max_length=48)
    assert metrics["reward_accuracy"] > 0.5
    assert metrics["reward_margin"] > 0
    save_pretrained(model, tmp_path / "final", tok)
    reloaded, _ = load_pretrained(tmp_path / "final")
    torch.testing.assert_close(logits(reloaded, PROBE), logits(model, PROBE), rtol=0, atol=0)
