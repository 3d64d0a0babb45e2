"""rlox.train.logps.sequence_stats (WPO weights, MoE router loss) and rlox.train.moe."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tiny_hf import make_model, make_moe
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import rlox.train.logps as logps_module
from rlox import PreferenceDataset
from rlox.data import LAYOUTS
from rlox.train.logps import sequence_logps, sequence_stats
from rlox.train.moe import check_router_aux_coef, router_aux_coef

VOCAB = 64
PROMPTS = [[5, 9, 2], [7, 1, 1, 3, 8, 4], [11], [6, 6, 2, 9]]
CHOSEN = [[3, 4, 12, 9, 1], [2], [8, 8, 5], [10, 3]]
REJECTED = [[7], [9, 13, 4, 4], [1, 2, 3, 4, 5, 6], [2, 2, 2]]
B = len(PROMPTS)
IDS = SimpleNamespace(bos_token_id=0, eos_token_id=0, pad_token_id=0)


@pytest.fixture(scope="module")
def dataset() -> PreferenceDataset:
    return PreferenceDataset.from_lists(PROMPTS, CHOSEN, REJECTED, vocab_size=VOCAB)


def collate(dataset: PreferenceDataset, layout: str):
    """All pairs; packed into rows of 12 tokens, so some rows hold two sequences and padding."""
    pack = 12 if layout == "packed" else None
    return dataset.collate(np.arange(B), layout=layout, max_length=12, pack_length=pack)


def dense(arch: str) -> torch.nn.Module:
    """A tiny float64 GPT-2 or Llama (tests/tiny_hf.py), in eval mode."""
    return make_model(arch, VOCAB, IDS).double().eval()


def wpo_reference(model: torch.nn.Module) -> torch.Tensor:
    """(2B,) float64 mean of log p(y_t) - log sum_v p(v)^2, each sequence run alone in full."""
    out = []
    for completions in (CHOSEN, REJECTED):
        for prompt, completion in zip(PROMPTS, completions, strict=True):
            ids = torch.tensor(prompt + completion)
            with torch.no_grad():
                logp = torch.log_softmax(model(ids[None]).logits[0], -1)
            p = len(prompt)
            steps = logp[p - 1 : -1]
            token = steps.gather(1, ids[p:, None]).squeeze(1)
            out.append((token - torch.logsumexp(2 * steps, -1)).mean())
    return torch.stack(out)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_wpo_log_weights_match_full_softmax_reference(dataset, arch):
    model = dense(arch)
    want = wpo_reference(model)
    for layout in LAYOUTS:
        batch = collate(dataset, layout)
        stats = sequence_stats(model, batch, wpo=True)
        w = stats.wpo_log_weights
        assert w.dtype == torch.float32 and w.shape == (2 * B,) and not w.requires_grad
        torch.testing.assert_close(w.double(), want, rtol=1e-6, atol=1e-6, msg=layout)
        assert stats.aux_loss is None and stats.logps.requires_grad
        # The LD-DPO weights scale log-probs only.
        ld = sequence_stats(model, batch, wpo=True, ld_alpha=0.3)
        torch.testing.assert_close(ld.wpo_log_weights, w, rtol=0, atol=0)
        for alpha in (None, 0.3):
            old = sequence_logps(model, batch, ld_alpha=alpha)
            new = sequence_stats(model, batch, wpo=True, ld_alpha=alpha).logps
            torch.testing.assert_close(new, old, rtol=0, atol=0)
    assert sequence_stats(model, collate(dataset, "padded")).wpo_log_weights is None


def own_aux(model: torch.nn.Module, batch) -> torch.Tensor:
    """The model's own aux_loss on a padded batch with its 2-D attention mask."""
    out = model(batch.input_ids, attention_mask=batch.attention_mask, output_router_logits=True)
    return out.aux_loss


def router_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [layer.mlp.gate.weight for layer in model.model.layers]


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_aux_loss_equals_the_models_own_and_reaches_the_router(dataset, arch):
    model = make_moe(arch, VOCAB)
    batch = collate(dataset, "padded")
    want = own_aux(model, batch)
    aux = sequence_stats(model, batch, router_aux=True).aux_loss
    assert aux.shape == () and aux.requires_grad
    torch.testing.assert_close(aux.double(), want.double(), rtol=1e-6, atol=1e-6)
    got = torch.autograd.grad(aux, router_weights(model))
    expected = torch.autograd.grad(want, router_weights(model))
    for g, e in zip(got, expected, strict=True):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_aux_loss_in_packed_and_prefix_shared_layouts(dataset, arch):
    """Statistics over real tokens: packed rows hold the padded batch's tokens once each, so
    the loss is the padded one; prefix-shared rows hold each prompt once, so it is the padded
    loss with the rejected rows' prompt tokens masked out."""
    model = make_moe(arch, VOCAB)
    padded = collate(dataset, "padded")
    want = own_aux(model, padded)
    packed = sequence_stats(model, collate(dataset, "packed"), router_aux=True).aux_loss
    torch.testing.assert_close(packed.double(), want.double(), rtol=1e-6, atol=1e-6)

    out = model(padded.input_ids, attention_mask=padded.attention_mask, output_router_logits=True)
    mask = padded.attention_mask.clone()
    for i, p in enumerate(padded.prompt_lengths.tolist()):
        mask[B + i, :p] = 0
    experts, top_k = model.num_experts, model.num_experts_per_tok
    shared_want = load_balancing_loss_func(out.router_logits, experts, top_k, mask)
    shared = sequence_stats(model, collate(dataset, "prefix_shared"), router_aux=True).aux_loss
    assert math.isfinite(float(shared.detach())) and shared.requires_grad
    torch.testing.assert_close(shared.double(), shared_want.double(), rtol=1e-6, atol=1e-6)


def test_aux_loss_through_the_full_forward(dataset, monkeypatch):
    """Without the head split (DDP, FSDP root): the packed layout's 4-D mask never reaches the
    model's own aux loss; router logits are recorded and the loss computed over real tokens."""
    model = make_moe("mixtral", VOCAB)
    want = own_aux(model, collate(dataset, "padded"))
    split = {
        layout: sequence_stats(model, collate(dataset, layout), router_aux=True)
        for layout in LAYOUTS
    }
    hooks = sum(len(m._forward_hooks) for m in model.modules())  # HF's own capturing hooks
    monkeypatch.setattr(logps_module, "split_head", lambda m: None)
    for layout in LAYOUTS:
        stats = sequence_stats(model, collate(dataset, layout), router_aux=True)
        torch.testing.assert_close(stats.aux_loss, split[layout].aux_loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(stats.logps, split[layout].logps, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(split["packed"].aux_loss, want, rtol=1e-6, atol=1e-6)
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks  # ours are removed


def test_aux_loss_through_ddp(dataset, tmp_path):
    import torch.distributed as dist

    model = make_moe("qwen2_moe", VOCAB)
    want = own_aux(model, collate(dataset, "padded"))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        aux = sequence_stats(ddp, collate(dataset, "packed"), router_aux=True).aux_loss
        torch.testing.assert_close(aux, want, rtol=1e-6, atol=1e-6)
        assert router_aux_coef(ddp, None) == pytest.approx(0.001)
    finally:
        dist.destroy_process_group()


def test_router_aux_needs_a_moe_model(dataset):
    batch = collate(dataset, "padded")
    with pytest.raises(ValueError, match="output_router_logits.*LlamaForCausalLM"):
        sequence_stats(dense("llama"), batch, router_aux=True)
    # A MoE model without router_aux: no aux loss, the same log-probs.
    model = make_moe("mixtral", VOCAB, output_router_logits=True)  # config default on
    for layout in LAYOUTS:
        stats = sequence_stats(model, collate(dataset, layout))
        assert stats.aux_loss is None and stats.wpo_log_weights is None


class _Wrapper(torch.nn.Module):
    """A stand-in for a peft PeftModel: the model comes back from get_base_model()."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.inner = model

    def get_base_model(self) -> torch.nn.Module:
        return self.inner


def test_router_aux_coef_rules():
    mixtral = make_moe("mixtral", VOCAB)
    assert router_aux_coef(mixtral, None) == pytest.approx(0.001)  # Mixtral's config default
    assert router_aux_coef(mixtral, 0.25) == 0.25
    assert router_aux_coef(mixtral, 0) == 0.0
    assert router_aux_coef(_Wrapper(mixtral), None) == pytest.approx(0.001)
    qwen = make_moe("qwen2_moe", VOCAB, router_aux_loss_coef=0.0)
    assert router_aux_coef(qwen, None) == 0.0
    llama = dense("llama")
    assert router_aux_coef(llama, None) == 0.0
    assert router_aux_coef(llama, 0.0) == 0.0
    with pytest.raises(ValueError, match="router_aux_loss_coef.*LlamaForCausalLM"):
        router_aux_coef(llama, 0.1)
    with pytest.raises(ValueError, match="router_aux_loss_coef.*GPT2LMHeadModel"):
        router_aux_coef(_Wrapper(dense("gpt2")), 1.0)


@pytest.mark.parametrize(
    "value, error",
    [(True, TypeError), ("0.1", TypeError), (-0.5, ValueError), (math.nan, ValueError)],
)
def test_check_router_aux_coef(value, error):
    assert check_router_aux_coef(None) is None
    assert check_router_aux_coef(1) == 1.0 and isinstance(check_router_aux_coef(1), float)
    with pytest.raises(error, match="router_aux_loss_coef"):
        check_router_aux_coef(value)
