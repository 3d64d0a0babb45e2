"""Per-sequence ("varlen") attention: ``scaled_dot_product_attention`` over each attention segment.

A packed or prefix-shared row holds several sequences. Instead of one (L, L) mask per row, a
batch lists its attention segments, (S, 5) int rows ``[row, q_start, q_end, prefix_start,
prefix_end]``: the queries ``q_start..q_end-1`` of ``row`` attend causally to the keys
``q_start..q`` and to every key of ``prefix_start..prefix_end-1``. A packed sequence is one
segment with an empty prefix; a prefix-shared row ``p c r`` is ``(0, P+C)`` and
``(P+C, P+C+R)`` with the prefix ``0..P``. Padding lies in no segment; it attends to itself alone.

:class:`VarlenPlan` groups the segments of equal shape once per forward, so that each group is
one batched sdpa call. :func:`varlen_attention` has the signature of transformers'
``AttentionInterface``; :func:`register` adds it (and a mask function that builds no mask
while a plan is passed) as ``"rlox_varlen"``. Called without a plan (generation) it is plain
sdpa attention, so leaving a model on ``"rlox_varlen"`` is harmless.

The plan reaches the attention function as the ``attn_segments`` keyword where the model passes
its forward keywords down to its layers (Llama-like code), else from the :func:`segment_masks_off`
block it runs in (Falcon, StableLM and others drop unknown keywords). :class:`PlanUse` counts
which of the two happened, so a route probe can tell whether a recomputed forward (gradient
checkpointing, outside the block) would still see the plan.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "IMPLEMENTATION",
    "PlanUse",
    "VarlenPlan",
    "register",
    "segment_masks_off",
    "varlen_attention",
]

IMPLEMENTATION = "rlox_varlen"


@dataclass
class PlanUse:
    """Attention calls of one forward that took their plan from keywords or from the block."""

    keywords: int = 0
    block: int = 0


# Set while a forward runs with a plan: the registered mask function then builds no mask, and
# attention calls without ``attn_segments`` take this plan.
_ACTIVE: contextvars.ContextVar[tuple[Any, PlanUse] | None] = contextvars.ContextVar(
    "rlox_varlen_plan", default=None
)


# A group of segments is padded to its longest segment and prefix; a segment joins a group while
# the padded work stays within this factor of the segments' own work (fewer, larger sdpa calls).
_PAD_WORK = 1.3


@dataclass(frozen=True)
class _Group:
    """``count`` segments padded to ``n`` queries and ``p`` prefix keys: one sdpa call."""

    n: int
    p: int
    count: int
    queries: Tensor  # (count * n,) int64 flat (row * L + position) index of each query slot
    keys: Tensor  # (count * (p + n),) int64 flat index of each key slot: prefix, then own
    lengths: Tensor  # (count, 2) int64 real (queries, prefix keys) of each segment
    keep: Tensor | None  # (M,) int64 real query slots of the group's (count * n) outputs


def _group(members: list[tuple[int, int, int, int, int]], device: torch.device) -> _Group:
    """One padded group of (row * L, q_start, n, prefix_start, p) segments."""
    base = torch.tensor(members, dtype=torch.int64)
    lengths = base[:, [2, 4]]
    n, p = int(lengths[:, 0].max()), int(lengths[:, 1].max())
    own = torch.arange(n)
    real_q = own < lengths[:, :1]
    queries = torch.where(real_q, base[:, :1] + base[:, 1:2] + own, 0)
    pre = torch.arange(p)
    prefix = torch.where(pre < lengths[:, 1:], base[:, :1] + base[:, 3:4] + pre, 0)
    keys = torch.cat([prefix, queries], dim=1)
    keep = None if bool(real_q.all()) else real_q.reshape(-1).nonzero().squeeze(1).to(device)
    return _Group(
        n, p, len(members), queries.reshape(-1).to(device), keys.reshape(-1).to(device),
        lengths.to(device), keep,
    )  # fmt: skip


def _plan_groups(segments: list[tuple[int, int, int, int, int]], device) -> list[_Group]:
    """Greedy groups of the segments, longest first (see ``_PAD_WORK``)."""
    ordered = sorted(segments, key=lambda s: (s[2] + s[4], s[2]), reverse=True)
    groups, members, n, p, work = [], [], 0, 0, 0
    for seg in ordered:
        n2, p2, work2 = max(n, seg[2]), max(p, seg[4]), work + seg[2] * (seg[2] + seg[4])
        if members and (len(members) + 1) * n2 * (n2 + p2) > _PAD_WORK * work2:
            groups.append(_group(members, device))
            members, n2, p2, work2 = [], seg[2], seg[4], seg[2] * (seg[2] + seg[4])
        members.append(seg)
        n, p, work = n2, p2, work2
    if members:
        groups.append(_group(members, device))
    return groups


class VarlenPlan:
    """The segments of a (R, L) batch in padded groups, with their gather indices.

    ``segments``: (S, 5) integer tensor ``[row, q_start, q_end, prefix_start, prefix_end]``.
    Raises ``ValueError`` naming ``attn_segments`` when a segment leaves its row or two
    segments share a query.
    """

    def __init__(self, segments: Tensor, rows: int, length: int, device: torch.device) -> None:
        if segments.dim() != 2 or segments.shape[1] != 5:
            raise ValueError(
                f"attn_segments: expected an (S, 5) tensor, got shape {tuple(segments.shape)}"
            )
        self.rows, self.length = rows, length
        members = []
        for row, q0, q1, p0, p1 in segments.tolist():
            if not (0 <= row < rows and 0 <= q0 < q1 <= length and 0 <= p0 <= p1 <= length):
                raise ValueError(
                    f"attn_segments: segment {[row, q0, q1, p0, p1]} lies outside the "
                    f"({rows}, {length}) batch"
                )
            members.append((row * length, q0, q1 - q0, p0, p1 - p0))
        self.groups = tuple(_plan_groups(members, device))
        self.masks: dict[tuple[int, int | None], Tensor | None] = {}  # per group and window
        real = []
        for g in self.groups:
            slots = g.queries if g.keep is None else g.queries[g.keep]
            real.append(slots)
        self.queries = torch.cat(real) if real else None
        covered = sum(m[2] for m in members)
        if self.queries is not None and covered != torch.unique(self.queries).numel():
            raise ValueError("attn_segments: two segments share a query position")

    @classmethod
    def of(cls, segments: Tensor | VarlenPlan, rows: int, length: int, device) -> VarlenPlan:
        """``segments`` as a plan (itself when it already is one)."""
        if isinstance(segments, VarlenPlan):
            return segments
        return cls(segments, rows, length, device)


def _mask(g: _Group, window: int | None) -> Tensor | None:
    """(count, 1, n, p + n) bool visibility of a group, or None for plain causal attention.

    Query ``i`` of a segment with ``n_s`` queries and ``p_s`` prefix keys sits at logical position
    ``p_s + i``; it sees the real prefix keys and its own keys up to itself (within ``window``).
    A padding query sees only the first own key, so that no row is empty.
    """
    exact = g.p == 0 and g.keep is None
    if exact and (window is None or window >= g.n):
        return None
    device = g.lengths.device
    n_s, p_s = (g.lengths[:, k, None, None] for k in (0, 1))
    i = torch.arange(g.n, device=device)[None, :, None]
    pre = torch.arange(g.p, device=device)[None, None, :]
    own = torch.arange(g.n, device=device)[None, None, :]
    see_prefix = (pre < p_s) & (i < n_s)
    see_own = (own <= i) & (i < n_s)
    if window is not None:
        see_prefix &= p_s + i - pre < window
        see_own &= i - own < window
    see_own |= (i >= n_s) & (own == 0)
    see_prefix = see_prefix.expand(g.count, g.n, g.p)
    return torch.cat([see_prefix, see_own], dim=2)[:, None]


def segment_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    plan: VarlenPlan,
    *,
    scale: float | None = None,
    dropout: float = 0.0,
    window: int | None = None,
) -> Tensor:
    """Attention of each segment's queries over its prefix and its causal own keys.

    ``query``: (R, H, L, D); ``key``/``value``: (R, Hk, L, D) with Hk dividing H (grouped
    query attention repeats key heads). Returns (R, L, H, D); a position outside every segment
    (padding) gets its own value, as if it attended to itself alone.
    ``window``: a sliding window (keys at most ``window - 1`` positions back), or None.
    """
    rows, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    if heads % kv_heads != 0:
        raise ValueError(f"key: {kv_heads} key heads do not divide {heads} query heads")
    q = query.transpose(1, 2).reshape(rows * length, heads, dim)
    k = key.transpose(1, 2).reshape(rows * length, kv_heads, key.shape[-1])
    v = value.transpose(1, 2).reshape(rows * length, kv_heads, value.shape[-1])
    outs = []
    for g in plan.groups:
        qg = q.index_select(0, g.queries).view(g.count, g.n, heads, dim).transpose(1, 2)
        kg = k.index_select(0, g.keys).view(g.count, g.p + g.n, kv_heads, -1).transpose(1, 2)
        vg = v.index_select(0, g.keys).view(g.count, g.p + g.n, kv_heads, -1).transpose(1, 2)
        if kv_heads != heads:
            kg = kg.repeat_interleave(heads // kv_heads, dim=1)
            vg = vg.repeat_interleave(heads // kv_heads, dim=1)
        cached = (id(g), window)
        if cached not in plan.masks:
            plan.masks[cached] = _mask(g, window)
        mask = plan.masks[cached]
        og = F.scaled_dot_product_attention(
            qg, kg, vg, attn_mask=mask, dropout_p=dropout, is_causal=mask is None, scale=scale
        )
        og = og.transpose(1, 2).reshape(g.count * g.n, heads, -1)
        outs.append(og if g.keep is None else og.index_select(0, g.keep))
    # A position in no segment (padding) attends to itself alone, as under the dense mask: its
    # output is its own value (no gradient: nothing real depends on it), so no layer after
    # attention sees a degenerate all-zero vector.
    own = v.detach()
    out = own.repeat_interleave(heads // kv_heads, dim=1) if kv_heads != heads else own
    if outs:
        out = out.index_copy(0, plan.queries, torch.cat(outs))
    return out.reshape(rows, length, heads, -1)


def varlen_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers ``AttentionInterface`` function: per-segment sdpa with ``attn_segments``.

    ``query``: (B, H, L, D), ``key``/``value``: (B, Hk, L, D). With ``attn_segments`` (an
    (S, 5) tensor or a :class:`VarlenPlan`) the mask is ignored and each segment attends on its
    own; returns ((B, L, H, D), None). Without it this is transformers' sdpa attention.
    """
    segments = kwargs.pop("attn_segments", None)
    active = _ACTIVE.get()
    if active is not None:
        if segments is None:
            segments = active[0]
            active[1].block += segments is not None
        else:
            active[1].keywords += 1
    if segments is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    for name in ("softcap", "s_aux", "position_bias"):
        if kwargs.get(name) is not None:
            raise ValueError(f"attn_segments: per-segment attention does not support {name}")
    plan = VarlenPlan.of(segments, query.shape[0], query.shape[2], query.device)
    window = kwargs.get("sliding_window")
    out = segment_attention(
        query, key, value, plan, scale=scaling, dropout=dropout, window=window or None
    )
    return out, None


def _varlen_mask(*args: Any, **kwargs: Any) -> Tensor | None:
    """The registered mask function: none while a plan is passed, else sdpa's mask."""
    if _ACTIVE.get() is not None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


@contextlib.contextmanager
def segment_masks_off(plan: Any = None) -> Iterator[PlanUse]:
    """Within this block the ``"rlox_varlen"`` mask function builds no mask, and attention calls
    that get no ``attn_segments`` keyword use ``plan`` (a :class:`VarlenPlan` or (S, 5) tensor).
    Yields the :class:`PlanUse` counts of the block."""
    use = PlanUse()
    token = _ACTIVE.set((plan, use))
    try:
        yield use
    finally:
        _ACTIVE.reset(token)


def register() -> str:
    """Register ``"rlox_varlen"`` with transformers' attention and mask interfaces; its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, varlen_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, _varlen_mask)
    return IMPLEMENTATION
