"""The collated batch: :class:`PairBatch`, its layouts, its dense attention mask, and
:func:`collate_pairs` for id matrices.

A batch of B preference pairs comes out of the Rust collator as numpy arrays in one of
:data:`LAYOUTS`; :func:`batch_from_arrays` wraps them (tensors on first access) and
:func:`dense_attention_mask` expands the compact attention structure into a (R, 1, L, L) mask.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rlox import _rlox

__all__ = [
    "LAYOUTS",
    "PairBatch",
    "batch_from_arrays",
    "collate_pairs",
    "dense_attention_mask",
]

LAYOUTS = ("padded", "packed", "prefix_shared")


@dataclass(frozen=True)
class PairBatch(Mapping):
    """A collated batch of B preference pairs in one of three layouts.

    Matrices are ``(R, L)``: ``R = 2B`` rows for ``padded`` (row ``i`` is prompt_i + chosen_i, row
    ``B + i`` prompt_i + rejected_i), the number of packed rows for ``packed``, ``B`` for
    ``prefix_shared`` (row ``i`` is prompt_i + chosen_i + rejected_i). The gather plan lists every
    completion token once: ``plan_row``/``plan_position`` locate the logits that predict it,
    ``plan_target`` is its id, ``plan_pair`` its pair (0..B-1) and ``plan_side`` 0 for chosen, 1 for
    rejected. Summing token log-probs by ``plan_side * B + plan_pair`` gives the (2B,) sequence
    log-probs in every layout.

    A batch is also a read-only mapping of its fields that are set (``batch["input_ids"]``,
    ``batch.keys()``, ``dict(batch)``), as Hugging Face batches are. Those include rlox-only
    fields, so a model takes :meth:`model_inputs` rather than ``**batch``.
    """

    input_ids: Tensor  # (R, L) int64
    attention_mask: Tensor  # (R, L) int64, 1 on real tokens
    position_ids: Tensor  # (R, L) int64
    loss_mask: Tensor  # (R, L) bool, True on completion tokens
    chosen_lengths: Tensor  # (B,) int64, after truncation
    rejected_lengths: Tensor  # (B,) int64
    plan_row: Tensor  # (N,) int64
    plan_position: Tensor  # (N,) int64
    plan_target: Tensor  # (N,) int64
    plan_pair: Tensor  # (N,) int64
    plan_side: Tensor  # (N,) int64
    prompt_lengths: Tensor | None = None  # (B,) int64
    sequence_ids: Tensor | None = None  # (R, L) int32, -1 on padding
    layout: str = "padded"
    cu_seqlens: Tensor | None = None  # packed: (S + 1,) int32 over the flattened (R * L) stream
    segment_ends: Tensor | None = None  # prefix_shared: (B, 3) ends of prompt, chosen, rejected
    pair_rows: Tensor | None = None  # prefix_shared: (B,) int64 row holding each pair
    # packed / prefix_shared: (S, 5) int32 [row, q_start, q_end, prefix_start, prefix_end]; the
    # queries [q_start, q_end) see keys [q_start, q] causally and [prefix_start, prefix_end).
    attn_segments: Tensor | None = None
    pair_index: Tensor | None = None  # (B,) store index of each pair
    skipped: Tensor | None = None  # store indices of pairs dropped by truncation
    num_truncated: int = 0

    def __getattribute__(self, name: str) -> Any:
        # The collator's numpy arrays become tensors (without a copy) when first read, so a
        # batch pays only for the fields its consumer uses.
        value = object.__getattribute__(self, name)
        if type(value) is np.ndarray:
            value = torch.from_numpy(value)
            object.__setattr__(self, name, value)
        return value

    def __getitem__(self, key: str) -> Any:
        if key not in _FIELD_NAMES:
            raise KeyError(key)
        value = getattr(self, key)
        if value is None:
            raise KeyError(key)
        return value

    def __iter__(self) -> Iterator[str]:
        return (k for k in _FIELD_NAMES if self.__dict__.get(k) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def model_inputs(self, model: torch.nn.Module | None = None) -> dict[str, Any]:
        """The keywords a causal LM's forward takes: ``input_ids`` and ``position_ids`` (R, L),
        and how to attend.

        The ``padded`` layout gives its (R, L) ``attention_mask``. Packed and prefix-shared rows
        hold several sequences; with ``model`` they get what attends within each sequence as the
        model is configured (:func:`rlox.attention.model_keywords`: a FlexAttention
        ``BlockMask`` for ``attn_implementation="flex_attention"``, ``attn_segments`` for
        ``"rlox_varlen"`` and ``rlox.models.TinyCausalLM``, else the dense mask its attention
        reads); without ``model``, the boolean (R, 1, L, L) :meth:`dense_attention_mask`.
        """
        if model is not None:
            from rlox.attention import model_keywords

            attend = model_keywords(model, self)
        elif self.layout == "padded":
            attend = {"attention_mask": self.attention_mask}
        else:
            attend = {"attention_mask": self.dense_attention_mask()}
        return {"input_ids": self.input_ids, **attend, "position_ids": self.position_ids}

    @property
    def num_pairs(self) -> int:
        return int(self.chosen_lengths.shape[0])

    def to(self, device: torch.device | str) -> PairBatch:
        """The same batch with every tensor on ``device`` (itself when already there)."""
        device = torch.device(device)
        held = [v for v in self.__dict__.values() if isinstance(v, Tensor)]
        if device.type == "cpu" and all(v.device == device for v in held):
            return self  # numpy fields are CPU memory too, and stay lazy
        moved = {
            f.name: v.to(device) if isinstance(v := getattr(self, f.name), Tensor) else v
            for f in fields(self)
        }
        return PairBatch(**moved)

    def dense_attention_mask(self) -> Tensor:
        """(R, 1, L, L) bool mask, True where a query may attend a key (for small inputs)."""
        return dense_attention_mask(self)

    def plan_ranks(self) -> Tensor:
        """(N,) each plan point's place in its completion (0 for the first token), in any layout:
        its rank by position among the points of its sequence (``plan_side * B + plan_pair``)."""
        seq = self.plan_side * self.num_pairs + self.plan_pair
        n = seq.shape[0]
        stride = int(self.plan_position.max()) + 1 if n else 1
        order = torch.argsort(seq * stride + self.plan_position)
        counts = torch.bincount(seq, minlength=2 * self.num_pairs)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(seq)
        rank[order] = torch.arange(n, device=seq.device) - starts[seq[order]]
        return rank


def dense_attention_mask(batch: PairBatch) -> Tensor:
    """Expand a batch's compact attention structure into a (R, 1, L, L) boolean mask.

    Causal within each sequence (``sequence_ids``); in ``prefix_shared`` rows (one or several
    pairs each), rejected tokens never see their pair's chosen tokens. Padding queries attend
    only themselves, so no row is empty.
    """
    rows, length = batch.input_ids.shape
    device = batch.input_ids.device
    if batch.sequence_ids is None:
        seq = torch.where(
            batch.attention_mask.bool(), torch.arange(rows, device=device)[:, None], -1
        )
    else:
        seq = batch.sequence_ids.long()
    valid = seq >= 0
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    mask = (seq[:, :, None] == seq[:, None, :]) & causal & valid[:, None, :]
    if batch.layout == "prefix_shared" and batch.segment_ends is not None:
        # Each token's pair (sequence_ids) gives its prompt / chosen / rejected ends in the row.
        t = torch.arange(length, device=device)
        ends = batch.segment_ends.to(device)[seq.clamp(min=0)]  # (R, L, 3)
        chosen = valid & (t >= ends[..., 0]) & (t < ends[..., 1])
        rejected = valid & (t >= ends[..., 1]) & (t < ends[..., 2])
        mask &= ~(rejected[:, :, None] & chosen[:, None, :])
    eye = torch.eye(length, dtype=torch.bool, device=device)
    mask |= eye & ~valid[:, :, None]
    return mask[:, None]


_FIELD_NAMES = tuple(f.name for f in fields(PairBatch))
_BATCH_DEFAULTS = {
    f.name: None if f.default is MISSING else f.default
    for f in fields(PairBatch)
    if f.name != "layout"
}


def batch_from_arrays(arrays: Mapping[str, Any], layout: str) -> PairBatch:
    """Wrap the arrays returned by the Rust collator in a :class:`PairBatch` (tensors on access)."""
    kw = {name: arrays.get(name, default) for name, default in _BATCH_DEFAULTS.items()}
    kw["layout"] = layout
    if layout != "packed":
        kw["cu_seqlens"] = None
    if layout != "prefix_shared":
        kw["segment_ends"] = None
        kw["pair_rows"] = None
    if layout == "padded":
        kw["attn_segments"] = None
    # Every field is given, so fill the frozen instance directly (its __init__ costs about as
    # much again for ~20 fields); numpy arrays turn into tensors on first access.
    batch = object.__new__(PairBatch)
    batch.__dict__.update(kw)
    return batch


def _as_ids(name: str, x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{name}: token ids must be an integer tensor, got {x.dtype}")
        x = x.detach().cpu().numpy()
    elif not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except ValueError as e:
            raise ValueError(f"{name}: rows must all have the same length ({e})") from None
    if x.dtype.kind not in "iu":
        raise TypeError(f"{name}: token ids must be integers, got dtype {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"{name}: must be 2-D (B, T), got shape {x.shape}")
    return x


def collate_pairs(
    prompt: Any,
    chosen: Any,
    rejected: Any,
    *,
    pad_token_id: int | None = None,
    vocab_size: int | None = None,
) -> PairBatch:
    """Re-pack (B, P) prompts and (B, C)/(B, R) completions into one (2B, L) batch (in Rust).

    With ``pad_token_id`` set, pads may sit on either side of a prompt row and at the right end of
    completion rows; they are removed, so a pad is never context and never a target. Ids equal to
    the pad id inside a row are kept as real tokens.
    """
    out = _rlox.collate_pairs(
        _as_ids("prompt", prompt),
        _as_ids("chosen", chosen),
        _as_ids("rejected", rejected),
        pad_token_id=pad_token_id,
        vocab_size=vocab_size,
    )
    return batch_from_arrays(out, "padded")
