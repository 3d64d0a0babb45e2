"""Sequence log-probs of preference batches: forward keywords, LM-head placement, the gather plan.

:func:`sequence_logps` runs a model on a :class:`~rlox.data.PairBatch` in any layout and sums
log p(token | prefix) over each completion. Where the model allows it (``logits_at=`` of
``rlox.models.TinyCausalLM``, Hugging Face causal LMs whose logits are ``lm_head(hidden)``) the
LM head runs only at the plan's points, never over the whole sequence, in chunks of rows
(:mod:`rlox.train.head`). :func:`sequence_stats`
returns, from the same forward, the WPO weights and a mixture-of-experts router loss too.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from rlox.attention import ForwardKeywords, forward_keywords, route_context
from rlox.attention_varlen import PlanUse
from rlox.batch import PairBatch, collate_pairs
from rlox.train import head, moe, positions, probe
from rlox.train.distributed import is_fsdp_root, unwrap

__all__ = [
    "SequenceStats",
    "accepted_kwargs",
    "is_peft",
    "model_vocab_size",
    "resolve_route",
    "sequence_logps",
    "sequence_stats",
    "split_head",
    "stand_in_batch",
]


class SequenceStats(NamedTuple):
    """What :func:`sequence_stats` computes from one forward of a batch of B pairs."""

    logps: Tensor  # (2B,) float32 (float64 for a float64 model), chosen then rejected
    wpo_log_weights: Tensor | None  # (2B,) float32 without gradient: log of the WPO weight
    aux_loss: Tensor | None  # () with gradient: the MoE router load-balancing loss


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


def accepted_kwargs(model: nn.Module, attention: str = "auto") -> ForwardKeywords:
    """The forward keywords rlox may pass to ``model``, with the ``attention`` route asked for."""
    params = inspect.signature(model.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return ForwardKeywords({"attention_mask", "position_ids"}, attention, model)
    names = {"attention_mask", "position_ids", "use_cache", "logits_at", "hidden_at"}
    names.add("attn_segments")
    return ForwardKeywords(frozenset(params) & names, attention, model)


def _forward_kwargs(
    batch: PairBatch, accepted: frozenset[str], model: nn.Module, route: str
) -> dict[str, Any]:
    """Keywords for ``model``'s forward; the mask or segments of its route (:mod:`rlox.attention`)."""
    if batch.layout != "padded" and not {"attention_mask", "position_ids"} <= accepted:
        raise TypeError(
            f"model: the {batch.layout} layout needs a forward that accepts attention_mask "
            "(an (R, 1, L, L) mask, see rlox.attention) and position_ids"
        )
    kwargs: dict[str, Any] = forward_keywords(model, batch, accepted, route)
    if "position_ids" in accepted:
        kwargs["position_ids"] = batch.position_ids
    if "use_cache" in accepted:
        kwargs["use_cache"] = False
    return kwargs


def is_peft(model: nn.Module) -> bool:
    """Whether ``model`` is a peft ``PeftModel`` (it can run with its adapters disabled)."""
    return callable(getattr(model, "get_base_model", None)) and callable(
        getattr(model, "disable_adapter", None)
    )


def split_head(model: nn.Module) -> tuple[nn.Module, nn.Module, head.LogitTransform] | None:
    """(decoder, lm_head, transform) of a Hugging Face causal LM whose logits are
    ``transform(lm_head(last hidden))``, with the known transforms of :func:`head.logit_transform`
    (whether the model's logits really are that is checked by :mod:`rlox.train.probe`)."""
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
        return split_head(model.get_base_model())
    base = getattr(model, "base_model", None)
    get_head = getattr(model, "get_output_embeddings", None)
    config = getattr(model, "config", None)
    if not isinstance(base, nn.Module) or base is model or not callable(get_head):
        return None
    lm_head = get_head()
    if not isinstance(lm_head, nn.Linear) or config is None:
        return None
    if getattr(config, "is_encoder_decoder", False):
        return None
    return base, lm_head, head.logit_transform(config)


def _router_logits(out: Any) -> tuple[Tensor, ...] | None:
    logits = getattr(out, "router_logits", None)
    if isinstance(logits, tuple | list) and logits and all(isinstance(t, Tensor) for t in logits):
        return tuple(logits)
    return None


def _router_loss(
    model: nn.Module, batch: PairBatch, router: tuple[Tensor, ...] | None, own: Any
) -> Tensor:
    """() load-balancing loss from the router logits of a forward (``router``).

    The statistics cover the batch's real tokens, its (R, L) ``attention_mask`` in every layout.
    The model's own ``aux_loss`` (``own``) stands in only for the padded layout, where it reads
    the same 2-D mask.
    """
    if router:
        loss = moe.load_balancing_loss(model, router, batch.attention_mask)
        if loss is not None:
            return loss
    if batch.layout == "padded" and isinstance(own, Tensor):
        return own
    name = type(moe.hf_model(model)).__name__
    raise TypeError(
        f"model: cannot compute the router load-balancing loss of {name} in the {batch.layout} layout"
    )


def _model_ids(batch: PairBatch) -> Tensor:
    """(R, L) ids the model runs on: padding repeats its row's first token. No real token sees a
    padding position (the masks keep it out), so its id changes nothing real; a real id keeps it
    off a zeroed padding embedding, whose norm some models take (NaN gradients)."""
    ids = batch.input_ids
    return torch.where(batch.attention_mask.bool(), ids, ids[:, :1])


def _full_forward(
    model: nn.Module,
    batch: PairBatch,
    kwargs: dict[str, Any],
    router_aux: bool,
    finite: list[bool] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """:func:`_plan_outputs` through the model's whole forward (its LM head over every position)."""
    dense = router_aux and batch.layout != "padded"
    if dense:
        # The model's own aux loss would read the 4-D attention mask as a token mask: record
        # the router logits with hooks instead.
        kwargs["output_router_logits"] = False
        with moe.record_router_logits(model) as recorded:
            out = model(_model_ids(batch), **kwargs)
        router = tuple(recorded)
    else:
        out = model(_model_ids(batch), **kwargs)
        router = _router_logits(out)
    logits = head.model_logits(out)
    rows, length = batch.input_ids.shape
    if logits.dim() != 3 or logits.shape[:2] != (rows, length):
        raise ValueError(
            f"model: expected logits of shape ({rows}, {length}, V), got {tuple(logits.shape)}"
        )
    points = (batch.plan_row, batch.plan_position)
    if finite is not None:
        finite.append(bool(torch.isfinite(logits).all()))
    if not router_aux:
        return logits[points], None
    own = None if dense else getattr(out, "aux_loss", None)
    return logits[points], _router_loss(model, batch, router, own)


def _plan_outputs(
    model: nn.Module,
    batch: PairBatch,
    accepted: frozenset[str],
    route: probe.Route,
    router_aux: bool = False,
    finite: list[bool] | None = None,
) -> tuple[Tensor, nn.Module | None, head.LogitTransform | None, Tensor | None]:
    """What predicts the gather plan's (row, position) points, and with ``router_aux`` the ()
    router load-balancing loss (see :func:`_router_loss`). ``finite``, when given, gets whether
    the forward's whole (R, L, .) output is finite (padding included: a non-finite value there
    turns gradients into NaN).

    ``(hidden (N, H), lm_head, transform, aux)`` where the head splits off (``route.split``:
    Hugging Face causal LMs, ``hidden_at=`` of :class:`rlox.models.TinyCausalLM`), else
    ``(logits (N, V), None, None, aux)``.
    """
    kwargs = _forward_kwargs(batch, accepted, model, route.attention)
    points = (batch.plan_row, batch.plan_position)
    get_head = getattr(model, "get_output_embeddings", None)
    if "hidden_at" in accepted and callable(get_head) and not router_aux and route.split:
        return model(_model_ids(batch), hidden_at=points, **kwargs), get_head(), None, None
    if "logits_at" in accepted and not router_aux:
        return model(_model_ids(batch), logits_at=points, **kwargs), None, None, None
    if moe.is_moe(model):
        # Explicit either way: a config default of True would otherwise have the full forward
        # compute an aux loss (wasted work, and an error under a 4-D attention mask).
        kwargs["output_router_logits"] = router_aux
    split = _split(model, router_aux) if route.split else None
    if split is None:
        logits, aux = _full_forward(model, batch, kwargs, router_aux, finite)
        return logits, None, None, aux
    base, lm_head, transform = split
    out = base(_model_ids(batch), **kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    if finite is not None:
        finite.append(bool(torch.isfinite(hidden).all()))
    aux = _router_loss(model, batch, _router_logits(out), None) if router_aux else None
    return hidden[points], lm_head, transform, aux


def _split(model: nn.Module, router_aux: bool):  # noqa: ANN202
    """:func:`split_head`, where the router loss (if asked) is computable from the decoder."""
    return split_head(model) if not router_aux or moe.can_compute_loss(model) else None


def _can_split(model: nn.Module, accepted: frozenset[str]) -> bool:
    if "hidden_at" in accepted:
        return callable(getattr(model, "get_output_embeddings", None))
    return split_head(model) is not None


def _route_log_softmax(
    model: nn.Module, accepted: frozenset[str], batch: PairBatch, attention: str, split: bool
) -> tuple[Tensor, PlanUse | None]:
    """(N, V) float64 log-softmax at the plan's points by one route (the probe's runner), and
    its varlen plan use. A split head applies its logit transform as the chunked head does."""
    route = probe.Route(attention, split)
    finite: list[bool] = []
    with route_context(model, batch, accepted, attention) as run:
        x, lm_head, transform, _ = _plan_outputs(model, batch, accepted, route, finite=finite)
        if lm_head is not None:
            x = lm_head(x).double()
            x = x if transform is None else transform.apply(x)
    if not all(finite):
        raise ValueError("the forward's outputs are not finite at padding or masked positions")
    return torch.log_softmax(x.double(), -1), run.plan_use


def resolve_route(
    model: nn.Module, layout: str, accepted: frozenset[str], segments: bool = True
) -> probe.Route:
    """The verified route of ``model`` for ``layout`` (:func:`rlox.train.probe.resolve`);
    ``segments``: whether the batches carry ``attn_segments``."""
    model = unwrap(model)
    return probe.resolve(
        model,
        layout,
        accepted,
        lambda b, attention, split: _route_log_softmax(model, accepted, b, attention, split),
        _can_split(model, accepted),
        segments,
    )


def _head_vocab(lm_head: nn.Module) -> int:
    weight = getattr(lm_head, "weight", None)
    if isinstance(weight, Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    return int(lm_head.out_features)


def _ld_weights(batch: PairBatch, ld_alpha: float) -> Tensor:
    """(N,) weight of each plan point: 1 within the shorter completion of its pair, else alpha.

    A token's place in its completion is its rank among the plan points of its sequence, so
    this holds in every layout.
    """
    b = batch.num_pairs
    rank = batch.plan_ranks()
    counts = torch.bincount(batch.plan_side * b + batch.plan_pair, minlength=2 * b)
    shorter = torch.minimum(counts[:b], counts[b:])
    inside = rank < shorter[batch.plan_pair]
    return torch.where(inside, 1.0, ld_alpha).to(torch.float32)


def _sequence_means(per_token: Tensor, index: Tensor, n: int) -> Tensor:
    """(n,) mean of the (N,) ``per_token`` values of each sequence (``index``), no gradient."""
    with torch.no_grad():
        sums = torch.zeros(n, dtype=per_token.dtype, device=per_token.device)
        sums.index_add_(0, index, per_token)
        return (sums / torch.bincount(index, minlength=n).clamp_min(1)).float()


def sequence_stats(
    model: nn.Module,
    batch: PairBatch,
    accepted: frozenset[str] | None = None,
    *,
    ld_alpha: float | None = None,
    autocast: torch.dtype | None = None,
    wpo: bool = False,
    router_aux: bool = False,
    logits_chunk_size: int | None = None,
) -> SequenceStats:
    """Completion log-probs, and optionally WPO weights and the MoE router loss, in one forward.

    ``logps``: (2B,) float32 (float64 for a float64 model), :func:`sequence_logps`. ``wpo_log_weights`` (``wpo=True``, else
    None): (2B,) float32 without gradient, each completion's mean over its tokens of
    log p(y_t) - log sum_v p(v)^2 (TRL's ``use_weighting``); unweighted by ``ld_alpha``, read
    from the plan logits only. ``aux_loss`` (``router_aux=True``, else None): () tensor with
    gradient, the load-balancing loss of a Hugging Face mixture-of-experts model (config with
    ``output_router_logits``; else ``ValueError``) over the batch's real tokens: for the padded
    layout the model's own ``aux_loss``; for packed rows the same value (each token counted
    once); for prefix_shared rows each shared prompt token counts once, not once per completion.
    Where the LM head splits off, it runs in chunks of ``logits_chunk_size`` rows
    (:mod:`rlox.train.head`; None: chosen by the vocabulary size, 0: all rows at once).
    """
    if router_aux and not moe.is_moe(model):
        raise ValueError(
            f"model: router_aux needs a mixture-of-experts model whose config has "
            f"output_router_logits; {type(moe.hf_model(model)).__name__} has none"
        )
    if accepted is None:
        accepted = accepted_kwargs(model)
    positions.check_batch(model, batch)
    device = next(model.parameters()).device
    targets = batch.plan_target
    # The largest target id, read where the batch lives now (no device sync for a CPU batch).
    top = int(targets.max()) if targets.numel() and targets.device.type == "cpu" else None
    batch = batch.to(device)
    b = batch.num_pairs
    amp = nullcontext() if autocast is None else torch.autocast(device.type, dtype=autocast)
    segments = batch.layout == "padded" or batch.attn_segments is not None
    route = resolve_route(model, batch.layout, accepted, segments)
    with route_context(model, batch, accepted, route.attention), amp:
        x, lm_head, transform, aux = _plan_outputs(model, batch, accepted, route, router_aux)
        n = batch.plan_target.shape[0]
        vocab = x.shape[-1] if lm_head is None else _head_vocab(lm_head)
        if x.dim() != 2 or x.shape[0] != n:
            raise ValueError(f"model: expected ({n}, V) plan logits")
        if top is None and n:
            top = int(batch.plan_target.max())
        if top is not None and top >= vocab:
            i = int((batch.plan_target >= vocab).nonzero()[0, 0])
            side = "chosen" if int(batch.plan_side[i]) == 0 else "rejected"
            raise ValueError(
                f"{side}[{int(batch.plan_pair[i])}]: token id is outside the model's vocabulary "
                f"(V={vocab})"
            )
        if lm_head is None:
            token_logps, wpo_stat = head.logits_token_logps(x, batch.plan_target, wpo)
        else:
            rows = head.chunk_rows(logits_chunk_size, vocab)
            token_logps, wpo_stat = head.head_token_logps(
                x, lm_head, batch.plan_target, rows, wpo, transform
            )
    index = batch.plan_side * b + batch.plan_pair
    weights = None if wpo_stat is None else _sequence_means(wpo_stat, index, 2 * b)
    if ld_alpha is not None and ld_alpha != 1.0:
        token_logps = token_logps * _ld_weights(batch, ld_alpha)
    sums = torch.zeros(2 * b, dtype=token_logps.dtype, device=device)
    logps = sums.index_add_(0, index, token_logps)
    return SequenceStats(logps, weights, aux)


def sequence_logps(
    model: nn.Module,
    batch: PairBatch,
    accepted: frozenset[str] | None = None,
    *,
    ld_alpha: float | None = None,
    autocast: torch.dtype | None = None,
    logits_chunk_size: int | None = None,
) -> Tensor:
    """(2B,) float32 sums of log p(token | prefix) over each sequence's completion tokens
    (float64 for a float64 model: the head then computes in float64 too).

    Entries ``0..B-1`` are the chosen sequences, ``B..2B-1`` the rejected ones, in any layout.
    Only the logits that predict completion tokens are normalised (the gather plan); with
    ``rlox.models.TinyCausalLM`` and Hugging Face causal LMs the LM head itself runs only there.
    With ``ld_alpha`` (LD-DPO, Liu et al. 2024) tokens beyond the shorter completion of each pair
    count with weight ``ld_alpha``. ``autocast`` (e.g. ``torch.bfloat16``) runs the model's
    forward under ``torch.autocast``; the log-softmax and sums stay in float32.
    ``logits_chunk_size``: rows of logits at a time (:func:`sequence_stats`).
    """
    return sequence_stats(
        model,
        batch,
        accepted,
        ld_alpha=ld_alpha,
        autocast=autocast,
        logits_chunk_size=logits_chunk_size,
    ).logps


def stand_in_batch() -> PairBatch:
    """One pair of one-token prompt and completions (id 0) in the padded layout.

    A rank whose micro-batch truncation emptied runs it, weighted 0, in step with the others.
    """
    ids = np.zeros((1, 1), dtype=np.int64)
    return collate_pairs(ids, ids, ids)
