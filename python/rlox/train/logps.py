"""Sequence log-probs of preference batches: forward keywords, LM-head placement, the gather plan.

:func:`sequence_logps` runs a model on a :class:`~rlox.data.PairBatch` in any layout and sums
log p(token | prefix) over each completion. Where the model allows it (``logits_at=`` of
``rlox.models.TinyCausalLM``, Hugging Face causal LMs whose logits are ``lm_head(hidden)``) the
LM head runs only at the plan's points, never over the whole sequence.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from rlox.attention import attention_mask
from rlox.batch import PairBatch, collate_pairs
from rlox.train.distributed import is_fsdp_root

__all__ = [
    "accepted_kwargs",
    "is_peft",
    "model_vocab_size",
    "sequence_logps",
    "stand_in_batch",
]


def model_vocab_size(model: nn.Module) -> int | None:
    """An upper bound on the token ids ``model`` accepts, or None if it cannot be told.

    ``model.config.vocab_size`` or the input embedding where the model names them, else the
    largest ``nn.Embedding`` in the model (no valid id is ever at or above it).
    """
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(size, int):
        return size
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        emb = get()
        if isinstance(emb, nn.Embedding):
            return emb.num_embeddings
    sizes = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
    return max(sizes) if sizes else None


def accepted_kwargs(model: nn.Module) -> frozenset[str]:
    params = inspect.signature(model.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return frozenset({"attention_mask", "position_ids"})
    return frozenset(params) & {"attention_mask", "position_ids", "use_cache", "logits_at"}


def _forward_kwargs(batch: PairBatch, accepted: frozenset[str], model: nn.Module) -> dict[str, Any]:
    """Keywords for ``model``'s forward; the mask suits its attention (:mod:`rlox.attention`)."""
    if batch.layout != "padded" and not {"attention_mask", "position_ids"} <= accepted:
        raise TypeError(
            f"model: the {batch.layout} layout needs a forward that accepts attention_mask "
            "(an (R, 1, L, L) mask, see rlox.attention) and position_ids"
        )
    kwargs: dict[str, Any] = {}
    if "attention_mask" in accepted:
        kwargs["attention_mask"] = attention_mask(model, batch)
    if "position_ids" in accepted:
        kwargs["position_ids"] = batch.position_ids
    if "use_cache" in accepted:
        kwargs["use_cache"] = False
    return kwargs


def _as_logits(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(
        f"model: forward must return logits (B, T, V) or an object with .logits, got {type(out).__name__}"
    )


def is_peft(model: nn.Module) -> bool:
    """Whether ``model`` is a peft ``PeftModel`` (it can run with its adapters disabled)."""
    return callable(getattr(model, "get_base_model", None)) and callable(
        getattr(model, "disable_adapter", None)
    )


def _split_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder, lm_head) of a Hugging Face causal LM whose logits are lm_head(last hidden)."""
    if is_fsdp_root(model):
        # Calling the parts directly would skip the root's hook that gathers its own shards
        # (embeddings, final norm, head): run the whole forward instead.
        return None
    if is_peft(model):
        # LoRA-style adapters live inside the wrapped model; prompt learning adds virtual tokens
        # in PeftModel.forward, which must then run in full.
        configs = getattr(model, "peft_config", {}) or {}
        if any(getattr(c, "is_prompt_learning", False) for c in configs.values()):
            return None
        return _split_head(model.get_base_model())
    base = getattr(model, "base_model", None)
    get_head = getattr(model, "get_output_embeddings", None)
    config = getattr(model, "config", None)
    if not isinstance(base, nn.Module) or base is model or not callable(get_head):
        return None
    head = get_head()
    if not isinstance(head, nn.Linear) or config is None:
        return None
    if getattr(config, "is_encoder_decoder", False):
        return None
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(config, attr, None) not in (None, 1, 1.0):
            return None
    return base, head


def _plan_logits(model: nn.Module, batch: PairBatch, accepted: frozenset[str]) -> Tensor:
    """(N, V) logits at the gather plan's (row, position) points only, where the model allows."""
    kwargs = _forward_kwargs(batch, accepted, model)
    points = (batch.plan_row, batch.plan_position)
    if "logits_at" in accepted:
        return model(batch.input_ids, logits_at=points, **kwargs)
    split = _split_head(model)
    if split is not None:
        base, head = split
        out = base(batch.input_ids, **kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return head(hidden[points])
    logits = _as_logits(model(batch.input_ids, **kwargs))
    rows, length = batch.input_ids.shape
    if logits.dim() != 3 or logits.shape[:2] != (rows, length):
        raise ValueError(
            f"model: expected logits of shape ({rows}, {length}, V), got {tuple(logits.shape)}"
        )
    return logits[points]


def _ld_weights(batch: PairBatch, ld_alpha: float) -> Tensor:
    """(N,) weight of each plan point: 1 within the shorter completion of its pair, else alpha.

    A token's place in its completion is its rank among the plan points of its sequence, so
    this holds in every layout.
    """
    b = batch.num_pairs
    seq = batch.plan_side * b + batch.plan_pair
    n = seq.shape[0]
    stride = int(batch.plan_position.max()) + 1 if n else 1
    order = torch.argsort(seq * stride + batch.plan_position)
    counts = torch.bincount(seq, minlength=2 * b)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(seq)
    rank[order] = torch.arange(n, device=seq.device) - starts[seq[order]]
    shorter = torch.minimum(counts[:b], counts[b:])
    inside = rank < shorter[batch.plan_pair]
    return torch.where(inside, 1.0, ld_alpha).to(torch.float32)


def sequence_logps(
    model: nn.Module,
    batch: PairBatch,
    accepted: frozenset[str] | None = None,
    *,
    ld_alpha: float | None = None,
    autocast: torch.dtype | None = None,
) -> Tensor:
    """(2B,) float32 sums of log p(token | prefix) over each sequence's completion tokens.

    Entries ``0..B-1`` are the chosen sequences, ``B..2B-1`` the rejected ones, in any layout.
    Only the logits that predict completion tokens are normalised (the gather plan); with
    ``rlox.models.TinyCausalLM`` and Hugging Face causal LMs the LM head itself runs only there.
    With ``ld_alpha`` (LD-DPO, Liu et al. 2024) tokens beyond the shorter completion of each pair
    count with weight ``ld_alpha``. ``autocast`` (e.g. ``torch.bfloat16``) runs the model's
    forward under ``torch.autocast``; the log-softmax and sums stay in float32.
    """
    if accepted is None:
        accepted = accepted_kwargs(model)
    device = next(model.parameters()).device
    targets = batch.plan_target
    # The largest target id, read where the batch lives now (no device sync for a CPU batch).
    top = int(targets.max()) if targets.numel() and targets.device.type == "cpu" else None
    batch = batch.to(device)
    b = batch.num_pairs
    if autocast is None:
        picked = _plan_logits(model, batch, accepted).float()
    else:
        with torch.autocast(device_type=device.type, dtype=autocast):
            picked = _plan_logits(model, batch, accepted)
        picked = picked.float()
    vocab = picked.shape[-1]
    if picked.dim() != 2 or picked.shape[0] != batch.plan_target.shape[0]:
        raise ValueError(f"model: expected ({batch.plan_target.shape[0]}, V) plan logits")
    if top is None and picked.shape[0]:
        top = int(batch.plan_target.max())
    if top is not None and top >= vocab:
        i = int((batch.plan_target >= vocab).nonzero()[0, 0])
        side = "chosen" if int(batch.plan_side[i]) == 0 else "rejected"
        raise ValueError(
            f"{side}[{int(batch.plan_pair[i])}]: token id is outside the model's vocabulary (V={vocab})"
        )
    token_logps = picked.gather(1, batch.plan_target[:, None]).squeeze(1) - picked.logsumexp(-1)
    if ld_alpha is not None and ld_alpha != 1.0:
        token_logps = token_logps * _ld_weights(batch, ld_alpha)
    index = batch.plan_side * b + batch.plan_pair
    return torch.zeros(2 * b, dtype=torch.float32, device=device).index_add_(0, index, token_logps)


def stand_in_batch() -> PairBatch:
    """One pair of one-token prompt and completions (id 0) in the padded layout.

    A rank whose micro-batch truncation emptied runs it, weighted 0, in step with the others.
    """
    ids = np.zeros((1, 1), dtype=np.int64)
    return collate_pairs(ids, ids, ids)
