"""Tiny Hugging Face models and a locally trained BPE tokenizer for the rlox.hf and CLI tests."""

from __future__ import annotations

import random
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

WORDS = (
    "the a of and to in is it for on with model token world data train prompt answer "
    "question reward policy better worse because language value preference"
).split()


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(3, 9))) + "." for _ in range(n)]


def make_tokenizer() -> PreTrainedTokenizerFast:
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(sentences(200), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def make_model(arch: str, vocab: int, tok: PreTrainedTokenizerFast) -> torch.nn.Module:
    torch.manual_seed(0)
    ids = dict(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    if arch == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=vocab,
            n_layer=1,
            n_embd=32,
            n_head=2,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **ids,
        )
        return transformers.GPT2LMHeadModel(cfg)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        **ids,
    )
    return transformers.LlamaForCausalLM(cfg)


def gqa_llama(vocab: int, attn_implementation: str) -> torch.nn.Module:
    """A 2-layer Llama with grouped-query attention (4 heads, 2 kv heads), seed 0, eval mode."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    cfg._attn_implementation = attn_implementation
    return transformers.LlamaForCausalLM(cfg).eval()


def save_tiny(arch: str, tokenizer: PreTrainedTokenizerFast, path: Path) -> Path:
    """Write a tiny ``arch`` model ("gpt2" or "llama") and ``tokenizer`` to directory ``path``."""
    make_model(arch, len(tokenizer), tokenizer).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def pair_batch(tokenizer, n: int = 4):
    """Padded (prompt, chosen, rejected) id matrices, pad = tokenizer.pad_token_id."""
    texts = sentences(3 * n, seed=1)
    prompts, chosen, rejected = texts[:n], texts[n : 2 * n], texts[2 * n :]

    def ids(batch):
        enc = tokenizer(batch, padding=True, return_tensors="pt")
        return enc["input_ids"]

    return ids(prompts), ids(chosen), ids(rejected)


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(ids).logits


PROBE = torch.tensor([[0, 5, 9, 17, 40, 2, 81], [3, 3, 100, 200, 1, 7, 11]])


def make_moe(arch: str, vocab: int = 64, **overrides) -> torch.nn.Module:
    """A tiny float64 mixture-of-experts causal LM in eval mode: "mixtral" or "qwen2_moe".

    Two layers of 4 experts, 2 per token; the experts run eagerly (the grouped-mm kernels take
    no float64). ``overrides`` go to the config (e.g. ``router_aux_loss_coef``).
    """
    torch.manual_seed(0)
    common = dict(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        experts_implementation="eager",
        num_experts_per_tok=2,
    )
    if arch == "mixtral":
        cfg = transformers.MixtralConfig(num_local_experts=4, **common, **overrides)
        return transformers.MixtralForCausalLM(cfg).double().eval()
    cfg = transformers.Qwen2MoeConfig(
        num_experts=4,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        **common,
        **overrides,
    )
    return transformers.Qwen2MoeForCausalLM(cfg).double().eval()
