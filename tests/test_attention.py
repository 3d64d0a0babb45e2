"""rlox.attention: each layout's mask in the form each HF attention implementation reads."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import transformers

from rlox import DPO, PreferenceDataset
from rlox.algorithms.dpo import sequence_logps
from rlox.attention import attention_mask, attn_implementation
from rlox.data import LAYOUTS
from rlox.models import TinyCausalLM, TinyLMConfig
from rlox.train.logps import accepted_kwargs

VOCAB = 64
ARCHS = ("gpt2", "llama", "qwen2", "mistral")
IMPLS = ("eager", "sdpa")
PROMPTS = [[5, 9, 2], [7, 1, 1, 3, 8, 4], [11], [6, 6, 2, 9]]
CHOSEN = [[3, 4, 12, 9, 1], [2], [8, 8, 5], [10, 3]]
REJECTED = [[7], [9, 13, 4, 4], [1, 2, 3, 4, 5, 6], [2, 2, 2]]


def tiny(arch: str, impl: str) -> torch.nn.Module:
    """A 1-layer float64 ``arch`` causal LM with ``attn_implementation=impl``, in eval mode."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, attn_implementation=impl)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(
            n_embd=32,
            n_layer=1,
            n_head=2,
            n_positions=64,
            **common,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        return transformers.GPT2LMHeadModel(cfg).double().eval()
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[arch]
    cfg = config_cls(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        attention_dropout=0.0,
        **common,
    )
    return model_cls(cfg).double().eval()


@pytest.fixture(scope="module")
def dataset() -> PreferenceDataset:
    return PreferenceDataset.from_lists(PROMPTS, CHOSEN, REJECTED, vocab_size=VOCAB)


def alone(model: torch.nn.Module) -> torch.Tensor:
    """(2B,) float64 completion log-probs, each prompt+completion run on its own by the model."""
    out = []
    for completions in (CHOSEN, REJECTED):
        for prompt, completion in zip(PROMPTS, completions, strict=True):
            ids = torch.tensor(prompt + completion)
            with torch.no_grad():
                logp = torch.log_softmax(model(ids[None]).logits[0], -1)
            p = len(prompt)
            out.append(logp[p - 1 : -1].gather(1, ids[p:, None]).sum())
    return torch.stack(out)


def collate(dataset: PreferenceDataset, layout: str):
    """All pairs; packed into several rows of 12 tokens, so some rows end in padding."""
    pack = 12 if layout == "packed" else None
    return dataset.collate(np.arange(len(PROMPTS)), layout=layout, max_length=12, pack_length=pack)


def logps(model: torch.nn.Module, batch) -> torch.Tensor:
    with torch.no_grad():
        return sequence_logps(model, batch).double()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_layout_matches_sequences_run_alone(dataset, arch, impl):
    model = tiny(arch, impl)
    assert attn_implementation(model) == impl
    want = alone(model)
    for layout in LAYOUTS:
        torch.testing.assert_close(
            logps(model, collate(dataset, layout)),
            want,
            rtol=1e-5,
            atol=1e-5,
            msg=lambda m, layout=layout: f"{arch} {impl} {layout}: {m}",
        )


@pytest.mark.parametrize("arch", ARCHS)
def test_boolean_mask_is_wrong_under_eager(dataset, arch):
    """The old behaviour (a boolean 4-D mask for every model) is caught by the test above."""
    model = tiny(arch, "eager")
    want = alone(model)
    for layout in ("packed", "prefix_shared"):
        batch = collate(dataset, layout)
        mask = attention_mask(model, batch)
        assert mask.dtype == torch.float64 and mask.shape == batch.dense_attention_mask().shape
        assert set(mask.unique().tolist()) == {0.0, torch.finfo(torch.float64).min}
        kwargs = dict(attention_mask=batch.dense_attention_mask(), position_ids=batch.position_ids)
        with torch.no_grad():
            logits = model(batch.input_ids, **kwargs).logits
        token = torch.log_softmax(logits[batch.plan_row, batch.plan_position], -1)
        token = token.gather(1, batch.plan_target[:, None]).squeeze(1)
        index = batch.plan_side * batch.num_pairs + batch.plan_pair
        old = torch.zeros(2 * batch.num_pairs, dtype=torch.float64).index_add_(0, index, token)
        assert ((old - want).abs() / want.abs()).max() > 1e-4, f"{arch} {layout}"


def test_hf_implementation_is_read_through_wrappers():
    model = tiny("llama", "eager")
    # The decoder half (split_head calls model.base_model) shares the config object.
    assert model.base_model.config is model.config
    assert attn_implementation(model.base_model) == "eager"
    model.config._attn_implementation = None  # HF dispatches None to eager attention
    assert attn_implementation(model) == "eager"
    assert attn_implementation(TinyCausalLM(TinyLMConfig(vocab_size=VOCAB))) is None


# peft reads a transformers attribute that is deprecated
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_peft_and_ddp_wrappers_use_the_inner_implementation(dataset, tmp_path):
    import peft
    import torch.distributed as dist

    lora = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = peft.get_peft_model(tiny("qwen2", "eager"), lora).eval()  # B = 0: same outputs
    assert attn_implementation(model) == "eager"
    want = alone(model.get_base_model())
    torch.testing.assert_close(logps(model, collate(dataset, "packed")), want, rtol=1e-5, atol=1e-5)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(tiny("gpt2", "eager"))
        assert attn_implementation(ddp) == "eager"
        assert attention_mask(ddp, collate(dataset, "prefix_shared")).dtype == torch.float64
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "impl", ["flex_attention", "flash_attention_2", "kernels-community/x", "mine"]
)
def test_unsupported_implementation_raises_for_dense_layouts(dataset, impl):
    model = tiny("llama", "sdpa")
    want = alone(model)
    model.config._attn_implementation = impl
    dense = accepted_kwargs(model, "dense")
    for layout in ("packed", "prefix_shared"):
        with pytest.raises(TypeError, match=f"{layout} layout.*'{impl}'"):
            sequence_logps(model, collate(dataset, layout), dense)
        # attention="auto" runs sdpa per sequence on CPU, whatever the implementation.
        torch.testing.assert_close(
            logps(model, collate(dataset, layout)), want, rtol=1e-5, atol=1e-5
        )
        assert model.config._attn_implementation == impl
    # The padded layout passes the 2-D mask: HF builds the mask for its implementation.
    assert attention_mask(model, collate(dataset, "padded")).dim() == 2


def test_non_hf_module_keeps_boolean_mask(dataset):
    torch.manual_seed(0)
    model = TinyCausalLM(TinyLMConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=2))
    model = model.double().eval()
    want = logps(model, collate(dataset, "padded"))
    for layout in ("packed", "prefix_shared"):
        batch = collate(dataset, layout)
        assert attention_mask(model, batch).dtype == torch.bool
        torch.testing.assert_close(logps(model, batch), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["packed", "prefix_shared"])
def test_eager_policy_equal_to_reference_gives_log_2(dataset, layout):
    trainer = DPO(tiny("mistral", "eager"), tiny("mistral", "eager"), beta=1.0)
    metrics = trainer.compute_loss(collate(dataset, layout))
    assert abs(metrics["loss"] - math.log(2)) < 1e-6
    want = alone(tiny("mistral", "eager"))[: len(PROMPTS)].mean()
    assert abs(metrics["chosen_logps"] - float(want)) < 1e-5 * abs(float(want))


@pytest.mark.parametrize("policy, ref", [("eager", "sdpa"), ("sdpa", "eager")])
def test_policy_and_reference_each_use_their_own_implementation(dataset, policy, ref):
    # Same weights: the loss is log 2 only if the eager model gets the float mask and the
    # sdpa one the boolean mask.
    trainer = DPO(tiny("gpt2", policy), tiny("gpt2", ref), beta=1.0)
    metrics = trainer.compute_loss(collate(dataset, "packed"))
    assert abs(metrics["loss"] - math.log(2)) < 1e-6


def test_eager_mask_under_bf16(dataset):
    """bf16 autocast over float32 weights, and bf16 weights (mask in bf16, its finfo.min)."""
    batch = collate(dataset, "prefix_shared")
    model = tiny("llama", "eager").bfloat16().double()  # weights exact in bf16
    want = alone(model).float()
    model = model.float()
    with torch.no_grad():
        got = sequence_logps(model, batch, autocast=torch.bfloat16)
    # bf16 rounding is ~1e-4 relative here; the boolean mask's error was ~1e-2.
    torch.testing.assert_close(got, want, rtol=2e-3, atol=1e-3)
    model = model.bfloat16()
    assert attention_mask(model, batch).dtype == torch.bfloat16
    with torch.no_grad():
        got = sequence_logps(model, batch)
    torch.testing.assert_close(got, want, rtol=2e-3, atol=1e-3)
