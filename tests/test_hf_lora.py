"""rlox.hf with LoRA adapters (peft): training only the adapters, merged and adapter-only saves."""

from __future__ import annotations

import copy
import json
import sys

import peft
import pytest
import torch
from tiny_hf import (  # noqa: E402
    PROBE,
    logits,
    make_model,
    pair_batch,
    save_tiny,
    state,
)

from rlox import DPO  # noqa: E402
from rlox.hf import is_peft_model, load_pretrained, save_pretrained  # noqa: E402

LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}


def lora_targets(path) -> list[str]:
    return ["c_attn"] if "gpt2" in path.name else ["q_proj", "v_proj"]


def train_lora(model, tok, steps: int = 6) -> list[float]:
    """DPO steps on ``model`` (a peft model) against its adapters-disabled self."""
    trainer = DPO(
        model, peft_reference(model), beta=0.5, learning_rate=1e-2, pad_token_id=tok.pad_token_id
    )
    prompt, chosen, rejected = pair_batch(tok)
    return [trainer.train_step(prompt, chosen, rejected)["loss"] for _ in range(steps)]


def peft_reference(model):
    """None where DPO runs a peft policy's reference itself (adapters disabled), else a copy."""
    try:
        DPO(model, None)
    except ValueError:
        return frozen_base_reference(model)
    return None


def frozen_base_reference(model):
    """The untrained base network: LoRA starts as the identity, so it equals the initial policy."""
    with torch.no_grad():
        ref = copy.deepcopy(model).merge_and_unload()
    return ref.eval().requires_grad_(False)


def test_lora_trains_only_adapters(model_dir):
    model, tok = load_pretrained(model_dir, lora=LORA)
    assert is_peft_model(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = state(model)
    losses = train_lora(model, tok)
    assert losses[-1] < losses[0] - 0.02, losses
    after = state(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_B" in k or "lora_A" in k for k in changed), changed
    assert any("lora_B" in k for k in changed)


def test_lora_config_object_and_targets(model_dir):
    config = peft.LoraConfig(r=2, target_modules=lora_targets(model_dir), task_type="CAUSAL_LM")
    model, _ = load_pretrained(model_dir, lora=config)
    names = [n for n, _ in model.named_parameters() if "lora_A" in n]
    assert names and all(any(t in n for t in lora_targets(model_dir)) for n in names)


def test_lora_errors(gpt2_dir, monkeypatch):
    with pytest.raises(ValueError, match="^lora: "):
        load_pretrained(gpt2_dir, lora={"rank_typo": 4})
    with pytest.raises(TypeError, match="^lora: "):
        load_pretrained(gpt2_dir, lora=4)
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match="^lora: .*peft"):
        load_pretrained(gpt2_dir, lora=LORA)
    model, _ = load_pretrained(gpt2_dir)
    assert not is_peft_model(model)


MERGE_CASES = {
    "lora": {},
    "dora": {"use_dora": True},  # merged by peft on a copy
    "embedding": {"target_modules": ["q_proj", "v_proj", "embed_tokens"]},
    "modules_to_save": {"modules_to_save": ["lm_head"]},  # merged by peft on a copy
}


# GPT-2 ties its embedding to the LM head, so its embedding cases are tested apart
# (test_merge_tied_embedding).
MERGE_RUNS = [
    (arch, case)
    for arch in ("gpt2", "llama")
    for case in MERGE_CASES
    if not (arch == "gpt2" and case in ("embedding", "modules_to_save"))
]


@pytest.mark.parametrize(("arch", "case"), MERGE_RUNS)
def test_merged_save_reloads_as_plain_model(tokenizer, tmp_path, arch, case):
    model_dir = save_tiny(arch, tokenizer, tmp_path / arch)
    model, tok = load_pretrained(model_dir, lora=LORA | MERGE_CASES[case])
    train_lora(model, tok, steps=3)
    trained = state(model)
    expected_logits = logits(model, PROBE)
    with torch.no_grad():
        expected = copy.deepcopy(model).merge_and_unload().state_dict()

    out = save_pretrained(model, tmp_path / "merged", tok, merge_lora=True)
    assert not (out / "adapter_config.json").exists()
    assert (out / "model.safetensors").is_file()
    # the policy itself is untouched and still a peft model
    assert is_peft_model(model)
    assert all(torch.equal(trained[k], v) for k, v in state(model).items())

    plain, tok2 = load_pretrained(out)
    assert not is_peft_model(plain)
    assert tok2 is not None
    got = plain.state_dict()
    assert not any("lora" in k for k in got)
    for key, value in got.items():
        torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-6, msg=key)
    torch.testing.assert_close(logits(plain, PROBE), expected_logits, rtol=1e-5, atol=1e-5)
    base = load_pretrained(model_dir)[0].state_dict()
    assert any(not torch.equal(base[k], got[k]) for k in got)


def test_merge_tied_embedding(gpt2_dir, tmp_path):
    """LoRA on GPT-2's embedding, tied to its LM head: merged as peft merges it, with a warning."""
    model, tok = load_pretrained(gpt2_dir, lora=LORA | {"target_modules": ["c_attn", "wte"]})
    train_lora(model, tok, steps=2)
    with torch.no_grad():
        expected = copy.deepcopy(model).merge_and_unload().state_dict()
    with pytest.warns(UserWarning, match="tied"):
        out = save_pretrained(model, tmp_path / "merged", merge_lora=True)
    got = load_pretrained(out)[0].state_dict()
    for key, value in got.items():
        torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-6, msg=key)


def test_adapter_save_reloads_onto_base(model_dir, tmp_path):
    model, tok = load_pretrained(model_dir, lora=LORA)
    train_lora(model, tok, steps=3)
    expected = logits(model, PROBE)
    out = save_pretrained(model, tmp_path / "adapters", tok)
    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]

    again, tok2 = load_pretrained(out)
    assert is_peft_model(again)
    assert tok2.eos_token_id == tok.eos_token_id
    torch.testing.assert_close(logits(again, PROBE), expected, rtol=0, atol=0)
    trainable = {n for n, p in again.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with pytest.raises(ValueError, match="^lora: "):
        load_pretrained(out, lora=LORA)


def test_adapters_with_missing_base(tmp_path, tokenizer):
    base_dir = tmp_path / "base"
    make_model("gpt2", len(tokenizer), tokenizer).save_pretrained(str(base_dir))
    model, _ = load_pretrained(base_dir, lora=LORA)
    out = save_pretrained(model, tmp_path / "adapters")
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (out / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="^path: .*gone"):
        load_pretrained(out)
