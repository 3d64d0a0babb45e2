"""A tiny causal transformer language model for tests, demos and benchmarks.

``TinyCausalLM`` is a small pre-LayerNorm decoder-only transformer with learned
absolute position embeddings. It is deliberately simple, but its ``forward``
supports everything the DPO trainer needs:

* a 2-D ``(B, T)`` padding mask (1 = real token, 0 = padding), combined with
  causal masking;
* a 4-D boolean ``(B, 1, T, T)`` mask (``True`` = query may attend key) that
  is used as given, for packed or prefix-shared layouts;
* explicit ``position_ids`` so that left-padded or packed rows can restart
  their positions at 0;
* ``attn_segments``: per-sequence attention without any (T, T) mask
  (:mod:`rlox.attention_varlen`), and a FlexAttention ``BlockMask`` as
  ``attention_mask``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from rlox.attention_varlen import VarlenPlan, segment_attention

__all__ = ["TinyLMConfig", "TinyCausalLM", "build_attention_mask", "generate_greedy"]


@dataclass
class TinyLMConfig:
    """Hyper-parameters of :class:`TinyCausalLM`.

    Attributes:
        vocab_size: number of token ids.
        d_model: width of the residual stream.
        n_layers: number of transformer blocks.
        n_heads: attention heads per block; must divide ``d_model``.
        d_ff: hidden width of the MLP; ``None`` means ``4 * d_model``.
        max_seq_len: number of learned positions (largest position id + 1).
        dropout: dropout on attention weights and residual branches.
        tie_embeddings: share the token embedding with the LM head.
    """

    vocab_size: int
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int | None = None
    max_seq_len: int = 128
    dropout: float = 0.0
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        if self.vocab_size <= 0 or self.d_model <= 0 or self.n_layers <= 0:
            raise ValueError("vocab_size, d_model and n_layers must be positive")
        if self.n_heads <= 0 or self.d_model % self.n_heads != 0:
            raise ValueError(f"n_heads ({self.n_heads}) must divide d_model ({self.d_model})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def build_attention_mask(
    attention_mask: Tensor | None, batch_size: int, seq_len: int, device: torch.device
) -> Tensor:
    """Turn any supported ``attention_mask`` into a boolean ``(B|1, 1, T, T)`` mask.

    Args:
        attention_mask: ``None`` (pure causal), a ``(B, T)`` 0/1 padding mask
            (combined with causality), or a boolean ``(B, 1|H, T, T)`` mask
            with ``True`` where the query may attend the key (used as given).
        batch_size: ``B``.
        seq_len: ``T``.
        device: device of the result.

    Returns:
        Boolean mask broadcastable to ``(B, H, T, T)``. A query row that would
        attend nothing is allowed to attend only itself, so attention never
        produces NaN; such rows belong to padding and their outputs are
        meaningless but finite.
    """
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    if attention_mask is None:
        return causal.view(1, 1, seq_len, seq_len)
    if attention_mask.dim() == 2:
        if attention_mask.shape != (batch_size, seq_len):
            raise ValueError(
                f"2-D attention_mask must have shape {(batch_size, seq_len)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        keys = attention_mask.to(device) != 0
        mask = causal.view(1, 1, seq_len, seq_len) & keys.view(batch_size, 1, 1, seq_len)
    elif attention_mask.dim() == 4:
        if attention_mask.dtype != torch.bool:
            raise TypeError("a 4-D attention_mask must be boolean (True = may attend)")
        if attention_mask.shape[-2:] != (seq_len, seq_len):
            raise ValueError(
                f"4-D attention_mask must end with {(seq_len, seq_len)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        mask = attention_mask.to(device)
    else:
        raise ValueError(
            f"attention_mask must be 2-D (B, T) or 4-D (B, 1, T, T), got {attention_mask.dim()}-D"
        )
    eye = torch.eye(seq_len, dtype=torch.bool, device=device)
    empty_rows = ~mask.any(dim=-1, keepdim=True)
    return mask | (empty_rows & eye)


_COMPILED_FLEX: list[Any] = []


def _flex_attention(cuda: bool) -> Any:
    """FlexAttention, compiled once into fused kernels on CUDA (eager elsewhere)."""
    from torch.nn.attention.flex_attention import flex_attention

    if not cuda:
        return flex_attention
    if not _COMPILED_FLEX:
        _COMPILED_FLEX.append(torch.compile(flex_attention))
    return _COMPILED_FLEX[0]


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention over a boolean mask via ``scaled_dot_product_attention``."""

    def __init__(self, config: TinyLMConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.d_model // config.n_heads
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.out = nn.Linear(config.d_model, config.d_model)

    def forward(self, x: Tensor, mask: Any) -> Tensor:
        """``x``: ``(B, T, D)``; ``mask``: boolean, broadcastable to ``(B, H, T, T)``, a
        :class:`~rlox.attention_varlen.VarlenPlan`, or a FlexAttention ``BlockMask``."""
        batch, seq_len, d_model = x.shape
        q, k, v = (
            self.qkv(x)
            .view(batch, seq_len, 3, self.n_heads, self.head_dim)
            .permute(2, 0, 3, 1, 4)
            .unbind(0)
        )
        dropout = self.dropout if self.training else 0.0
        if isinstance(mask, VarlenPlan):
            y = segment_attention(q, k, v, mask, dropout=dropout)
            return self.out(y.reshape(batch, seq_len, d_model))
        if isinstance(mask, Tensor):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        else:
            if dropout:
                raise ValueError("attention_mask: a BlockMask (flex attention) takes no dropout")
            y = _flex_attention(q.is_cuda)(q, k, v, block_mask=mask)
        return self.out(y.transpose(1, 2).reshape(batch, seq_len, d_model))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, config: TinyLMConfig) -> None:
        super().__init__()
        assert config.d_ff is not None
        self.ln_attn = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln_mlp = nn.LayerNorm(config.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(config.d_model, config.d_ff),
            nn.GELU(),
            nn.Linear(config.d_ff, config.d_model),
        )
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, mask: Any) -> Tensor:
        """``x``: ``(B, T, D)`` -> ``(B, T, D)``; ``mask`` as in :class:`CausalSelfAttention`."""
        x = x + self.drop(self.attn(self.ln_attn(x), mask))
        return x + self.drop(self.mlp(self.ln_mlp(x)))


class TinyCausalLM(nn.Module):
    """Decoder-only transformer LM: embeddings, pre-LN blocks, final LN, LM head.

    Example:
        >>> model = TinyCausalLM(TinyLMConfig(vocab_size=16))
        >>> model(torch.zeros(2, 5, dtype=torch.long)).shape
        torch.Size([2, 5, 16])
    """

    _supports_flex_attn = True

    def __init__(self, config: TinyLMConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.max_seq_len, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * config.n_layers)
        for block in self.blocks:
            nn.init.normal_(block.attn.out.weight, std=residual_std)
            nn.init.normal_(block.mlp[2].weight, std=residual_std)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.gradient_checkpointing = False

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Any = None) -> None:
        """Recompute each block's activations in the backward while training (non-reentrant
        ``torch.utils.checkpoint``); ``gradient_checkpointing_kwargs`` is accepted and ignored."""
        self.gradient_checkpointing = True

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        logits_at: tuple[Tensor, Tensor] | None = None,
        hidden_at: tuple[Tensor, Tensor] | None = None,
        attn_segments: Tensor | VarlenPlan | None = None,
    ) -> Tensor:
        """Compute next-token logits.

        Args:
            input_ids: ``(B, T)`` int64 token ids.
            attention_mask: ``None`` (causal), ``(B, T)`` 0/1 padding mask, or
                boolean ``(B, 1, T, T)`` mask (``True`` = may attend), see
                :func:`build_attention_mask`.
            position_ids: ``(B, T)`` int64 positions; default ``0..T-1`` per row.
            logits_at: ``(rows, positions)``, two ``(N,)`` int64 tensors; when given, the
                LM head runs only at those points.
            hidden_at: ``(rows, positions)`` like ``logits_at``; returns the ``(N, d_model)``
                final hidden states there instead (the LM head's input, see
                :meth:`get_output_embeddings`).
            attn_segments: ``(S, 5)`` attention segments or a
                :class:`~rlox.attention_varlen.VarlenPlan`: each sequence attends on its own
                (``attention_mask`` is then ignored); outputs at padding are meaningless.

        Returns:
            ``(B, T, vocab_size)`` float32 logits, or ``(N, vocab_size)`` with ``logits_at``;
            logits at padding positions are finite but meaningless.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        batch, seq_len = input_ids.shape
        device = input_ids.device
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=device).expand(batch, seq_len)
        elif position_ids.shape != input_ids.shape:
            raise ValueError(
                f"position_ids shape {tuple(position_ids.shape)} != input_ids shape "
                f"{tuple(input_ids.shape)}"
            )
        if position_ids.numel() > 0:
            lowest, highest = int(position_ids.min()), int(position_ids.max())
            if lowest < 0 or highest >= self.config.max_seq_len:
                raise ValueError(
                    f"position ids must lie in [0, {self.config.max_seq_len}), "
                    f"got [{lowest}, {highest}]"
                )
        if attn_segments is not None:
            mask: Any = VarlenPlan.of(attn_segments, batch, seq_len, device)
        elif attention_mask is not None and not isinstance(attention_mask, Tensor):
            mask = attention_mask  # a FlexAttention BlockMask
        else:
            mask = build_attention_mask(attention_mask, batch, seq_len, device)
        x = self.drop(self.tok_emb(input_ids) + self.pos_emb(position_ids))
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        if hidden_at is not None:
            return self.ln_f(x[hidden_at])
        if logits_at is not None:
            x = x[logits_at]
        return self.lm_head(self.ln_f(x)).float()

    def get_output_embeddings(self) -> nn.Linear:
        """The LM head, ``(vocab_size, d_model)`` weight."""
        return self.lm_head


@torch.no_grad()
def generate_greedy(
    model: nn.Module,
    prompt_ids: Tensor,
    max_new_tokens: int,
    eos_token_id: int | None = None,
) -> Tensor:
    """Greedy (argmax) decoding without a KV cache.

    Args:
        model: called as ``model(input_ids)``; must return ``(B, T, V)`` logits
            or an object with a ``.logits`` attribute holding them.
        prompt_ids: ``(B, P)`` int64 prompts, all of the same length (no padding).
        max_new_tokens: number of tokens to generate.
        eos_token_id: once a row emits this id, the rest of the row is filled
            with it; decoding stops early when every row has finished.

    Returns:
        ``(B, max_new_tokens)`` int64 generated ids (the prompt excluded).
    """
    if prompt_ids.dim() != 2:
        raise ValueError(f"prompt_ids must be (B, P), got shape {tuple(prompt_ids.shape)}")
    batch = prompt_ids.shape[0]
    fill = 0 if eos_token_id is None else eos_token_id
    out = torch.full((batch, max_new_tokens), fill, dtype=torch.long, device=prompt_ids.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=prompt_ids.device)
    seq = prompt_ids.long()
    for step in range(max_new_tokens):
        result = model(seq)
        logits = result.logits if hasattr(result, "logits") else result
        next_token = logits[:, -1, :].argmax(dim=-1)
        if eos_token_id is not None:
            next_token = next_token.masked_fill(finished, eos_token_id)
            finished |= next_token == eos_token_id
        out[:, step] = next_token
        if eos_token_id is not None and bool(finished.all()):
            break
        seq = torch.cat([seq, next_token.unsqueeze(1)], dim=1)
    return out
