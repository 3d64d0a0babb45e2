"""gradient_checkpointing, activation_offloading and compile (rlox.train.execution)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tiny_hf import make_model

import rlox
from rlox import PreferenceDataset
from rlox.models import TinyCausalLM, TinyLMConfig

VOCAB = 64
PROMPTS = [[5, 9, 2], [7, 1, 1, 3, 8, 4], [11], [6, 6, 2, 9]]
CHOSEN = [[3, 4, 12, 9, 1], [2], [8, 8, 5], [10, 3]]
REJECTED = [[7], [9, 13, 4, 4], [1, 2, 3, 4, 5, 6], [2, 2, 2]]
IDS = SimpleNamespace(bos_token_id=0, eos_token_id=0, pad_token_id=0)


@pytest.fixture(scope="module")
def dataset() -> PreferenceDataset:
    return PreferenceDataset.from_lists(PROMPTS, CHOSEN, REJECTED, vocab_size=VOCAB)


def tiny(seed: int = 0) -> TinyCausalLM:
    torch.manual_seed(seed)
    return TinyCausalLM(
        TinyLMConfig(vocab_size=VOCAB, d_model=16, n_heads=2, n_layers=2, max_seq_len=64)
    )


def build(arch: str) -> torch.nn.Module:
    torch.manual_seed(1)
    return tiny() if arch == "tiny" else make_model(arch, VOCAB, IDS)


def run_steps(policy, dataset, layout, steps=2, **options):
    """Losses and final weights of ``steps`` train_step calls on one batch."""
    model = copy.deepcopy(policy)
    trainer = rlox.DPO(model, copy.deepcopy(policy), learning_rate=1e-3, **options)
    batch = dataset.collate(np.arange(len(PROMPTS)), layout=layout, max_length=12)
    losses = [trainer.train_step(batch)["loss"] for _ in range(steps)]
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}, model


def count_block_calls(model: torch.nn.Module) -> list[int]:
    """Forward calls of the MLP of the model's first decoder block (a recomputation calls it
    again)."""
    calls = [0]
    if isinstance(model, TinyCausalLM):
        block = model.blocks[0]
    else:
        base = model.base_model
        block = base.layers[0] if hasattr(base, "layers") else base.h[0]
    forward = block.mlp.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    # A patched forward, not a hook: module hooks do not run while checkpointing recomputes.
    block.mlp.forward = counted
    return calls


@pytest.mark.parametrize("layout", ["padded", "prefix_shared"])
@pytest.mark.parametrize("arch", ["tiny", "llama", "gpt2"])
def test_gradient_checkpointing_is_exact_and_recomputes(dataset, arch, layout):
    policy = build(arch)
    base_losses, base_state, plain = run_steps(policy, dataset, layout)
    ck_losses, ck_state, ckpt = run_steps(policy, dataset, layout, gradient_checkpointing=True)
    np.testing.assert_allclose(ck_losses, base_losses, rtol=1e-6)
    for k in base_state:
        torch.testing.assert_close(ck_state[k], base_state[k], rtol=1e-6, atol=1e-6, msg=k)
    # Checkpointing is active: the block runs once more per training step (its recomputation).
    batch = dataset.collate(np.arange(len(PROMPTS)), layout=layout, max_length=12)
    calls = []
    for model in (plain, ckpt):
        counter = count_block_calls(model)
        trainer = rlox.DPO(model, copy.deepcopy(policy), learning_rate=1e-3)
        trainer.train_step(batch)
        calls.append(counter[0])
    assert calls == [1, 2]


# peft itself calls the deprecated is_gradient_checkpointing of transformers 5.
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_gradient_checkpointing_under_lora_is_exact(dataset):
    """A peft LoRA policy (its reference: itself with adapters disabled); the frozen embeddings
    need no grad under non-reentrant checkpointing."""
    import peft

    base = build("llama")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    batch = dataset.collate(np.arange(len(PROMPTS)), layout="padded", max_length=12)
    runs = []
    for checkpointing in (False, True):
        torch.manual_seed(3)  # the adapters' initial weights
        model = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(lora))
        counter = count_block_calls(model.get_base_model())
        trainer = rlox.DPO(model, None, learning_rate=1e-2, gradient_checkpointing=checkpointing)
        trainer.check_layout("padded")  # the route probe's forwards, not counted
        counter[0] = 0
        losses = [trainer.train_step(batch)["loss"] for _ in range(2)]
        adapters = {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}
        runs.append((losses, adapters, counter[0]))
    (base_losses, base_state, base_calls), (losses, state, calls) = runs
    assert base_losses[1] != base_losses[0]
    np.testing.assert_allclose(losses, base_losses, rtol=1e-6)
    assert state and state.keys() == base_state.keys()
    for k in base_state:
        torch.testing.assert_close(state[k], base_state[k], rtol=1e-6, atol=1e-6, msg=k)
    # Two steps, each a policy and a reference forward; checkpointing recomputes the policy's.
    assert (base_calls, calls) == (4, 6)


def test_gradient_checkpointing_needs_an_enable_method():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(VOCAB, 8)

        def forward(self, input_ids):
            return self.emb(input_ids) @ self.emb.weight.T

    with pytest.raises(ValueError, match="^gradient_checkpointing: Plain has no"):
        rlox.DPO(Plain(), Plain(), gradient_checkpointing=True)


def test_activation_offloading_needs_cuda():
    with pytest.raises(ValueError, match="^activation_offloading: .*CUDA model.*on cpu"):
        rlox.DPO(tiny(), tiny(), activation_offloading=True)


@pytest.mark.parametrize("name", ["gradient_checkpointing", "activation_offloading", "compile"])
def test_flags_must_be_bools(name):
    with pytest.raises(TypeError, match=f"^{name}: expected a bool"):
        rlox.DPO(tiny(), tiny(), **{name: 1})


@pytest.fixture(scope="module")
def compiled_run(dataset):
    """One compiled TinyCausalLM trained for two steps (compiling takes a while: once per session)."""
    policy = tiny(seed=4)
    return policy, run_steps(policy, dataset, "padded", compile=True)


def test_compile_is_exact(dataset, compiled_run):
    policy, (losses, state, model) = compiled_run
    base_losses, base_state, _ = run_steps(policy, dataset, "padded")
    np.testing.assert_allclose(losses, base_losses, rtol=1e-5)
    for k in base_state:
        torch.testing.assert_close(state[k], base_state[k], rtol=1e-5, atol=1e-5, msg=k)
    # Compiled in place: the module is compiled, its state_dict keys are unchanged.
    assert model._compiled_call_impl is not None
    assert state.keys() == base_state.keys()
    assert not any("_orig_mod" in k for k in state)
