"""Verify each fast path on the model at hand: the route probe.

rlox re-implements parts of a model's forward: the LM head at the gather plan's points (with the
model's known logit transform), per-sequence attention in packed and prefix-shared rows, the
positions of packed sequences. Before a model first runs a layout, :func:`resolve` checks the
candidate routes (:func:`rlox.attention.candidate_routes`) on a tiny probe: two pairs of short
sequences drawn from the model's own vocabulary, collated in that layout and run through the
route, against each sequence run alone through the model's plain forward
(``model(input_ids).logits``). A route is exact when every completion token's log-prob agrees
within the tolerance of the model's dtype (:data:`TOLERANCE`, times ``max(1, |log p|)``).

- ``attention="auto"``: the first exact route is kept; one that disagrees is logged (logger
  ``rlox``) with its difference, and the next is tried.
- an explicit route that disagrees is a ``ValueError`` naming the model class, the layout, the
  route and the difference.
- a head split that disagrees (a logit transform rlox does not know) falls back to the model's
  full forward with a one-time warning.

The verdict is cached on the model (per layout, route asked, dtype and checkpointing), so the
probe costs a few small forwards once per model and layout. It runs without gradients, in eval
mode, with ``torch.compile`` set to run eagerly; under FSDP2 every rank runs it (its forwards are
collective) and the ranks agree on the largest difference.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from rlox import _rlox
from rlox.attention import candidate_routes, inner_model, plain_implementation
from rlox.attention_varlen import PlanUse
from rlox.batch import PairBatch, batch_from_arrays
from rlox.train.distributed import process_group, reshard

__all__ = ["TOLERANCE", "Route", "checkpointing", "probe_batch", "resolve"]

_LOG = logging.getLogger("rlox")
_CACHE = "_rlox_routes"

# Per-token tolerance by parameter dtype, times max(1, |log p|) of the plain forward. rlox's head
# computes in float32 at least, so float64 models are held to float32 rounding.
TOLERANCE = {
    torch.float64: 1e-5,
    torch.float32: 1e-4,
    torch.bfloat16: 5e-2,
    torch.float16: 1e-2,
}

# Two pairs: prompts of 3 and 5 tokens, completions of 4 / 2 (chosen) and 2 / 6 (rejected).
_LENGTHS = ((3, 4, 2), (5, 2, 6))


@dataclass(frozen=True)
class Route:
    """How a model runs one layout: the attention route, and whether the LM head splits off."""

    attention: str
    split: bool


# runner(batch, attention, split) -> ((N,) token log-probs in plan order, varlen plan use)
Runner = Callable[[PairBatch, str, bool], tuple[Tensor, PlanUse | None]]


def checkpointing(model: nn.Module) -> bool:
    """Whether ``model`` recomputes its forward in the backward (gradient checkpointing)."""
    inner = inner_model(model)
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(inner), name):
            return bool(getattr(inner, name))
    return bool(getattr(inner, "checkpointing", False))


def _window(model: nn.Module) -> int:
    window = getattr(getattr(inner_model(model), "config", None), "sliding_window", None)
    return window if isinstance(window, int) and 0 < window <= 64 else 0


def _position_limit(model: nn.Module) -> int | None:
    config = getattr(inner_model(model), "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def probe_batch(model: nn.Module, layout: str, vocab: int) -> tuple[PairBatch, list[list[int]]]:
    """The probe's batch in ``layout`` and its 2B sequences (chosen then rejected, as ids).

    Sequences are long enough to cross a sliding window of up to 64 tokens, so windowed layers
    are checked too; packed rows are cut at 16 tokens so that they hold padding.
    """
    extra = _window(model)
    limit = _position_limit(model)
    if limit is not None:
        extra = min(extra, max(0, limit - 11))
    rng = np.random.default_rng(20241)
    prompts, chosen, rejected = [], [], []
    for p, c, r in _LENGTHS:
        prompts.append(rng.integers(0, vocab, p))
        chosen.append(rng.integers(0, vocab, c + extra))
        rejected.append(rng.integers(0, vocab, r + extra))
    columns = []
    for part in (prompts, chosen, rejected):
        offsets = np.cumsum([0] + [len(x) for x in part]).astype(np.int64)
        columns += [np.concatenate(part).astype(np.int32), offsets]
    store = _rlox.PairStore(*columns)
    pack = {"packed": 16 + 2 * extra, "prefix_shared": 64 + 4 * extra}.get(layout)
    out = store.collate(
        np.arange(len(_LENGTHS), dtype=np.int64),
        layout=layout,
        max_length=None,
        pad_token_id=0,
        pack_length=pack,
    )
    batch = batch_from_arrays(out, layout)
    sequences = [
        [*map(int, prompts[i]), *map(int, side[i])]
        for side in (chosen, rejected)
        for i in range(len(_LENGTHS))
    ]
    return batch, sequences


def _logits(out: object) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    return out[0]  # type: ignore[index]


def _alone(model: nn.Module, batch: PairBatch, sequences: list[list[int]]) -> Tensor:
    """(N,) log p of each plan point's target, each sequence run alone (plan order)."""
    device = next(model.parameters()).device
    b = batch.num_pairs
    per_sequence = []
    for i, seq in enumerate(sequences):
        prompt = _LENGTHS[i % b][0]
        ids = torch.tensor([seq], device=device)
        logps = torch.log_softmax(_logits(model(ids)).double()[0], -1)
        positions = torch.arange(prompt - 1, len(seq) - 1, device=device)
        per_sequence.append(logps[positions, ids[0, prompt:]])
    seq = (batch.plan_side * b + batch.plan_pair).to(device)
    rank = _ranks(seq, batch.plan_position.to(device), 2 * b)
    return torch.stack([per_sequence[int(s)][int(k)] for s, k in zip(seq, rank, strict=True)])


def _ranks(seq: Tensor, position: Tensor, n: int) -> Tensor:
    """(N,) each plan point's place among the points of its sequence, by position."""
    stride = int(position.max()) + 1 if position.numel() else 1
    order = torch.argsort(seq * stride + position)
    counts = torch.bincount(seq, minlength=n)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(seq)
    rank[order] = torch.arange(seq.numel(), device=seq.device) - starts[seq[order]]
    return rank


@contextlib.contextmanager
def _quiet(model: nn.Module) -> Iterator[None]:
    """Eval mode, no gradients, compiled forwards run eagerly; training modes restored and FSDP2
    modules resharded (a root keeps its gathered weights after a forward without backward)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    stance = getattr(torch.compiler, "set_stance", None)
    eager = stance("force_eager") if stance is not None else contextlib.nullcontext()
    try:
        with torch.no_grad(), eager:
            yield
    finally:
        for m, mode in modes:
            m.training = mode
        reshard(model)


def _agree(value: float, device: torch.device) -> float:
    """The largest ``value`` over the ranks of a process group (NaN counts as largest)."""
    dist = process_group()
    if dist is None or dist.get_world_size() == 1:
        return value
    t = torch.tensor([np.inf if value != value else value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


@dataclass
class _Verdict:
    route: Route | None
    tried: list[str]
    interface: bool = False  # every route failed with a TypeError (the model's interface)


def _measure(run: Runner, batch: PairBatch, expected: Tensor, attention: str, split: bool):
    """(difference relative to max(1, |log p|), plan use, error) of one route; inf on an error."""
    try:
        got, use = run(batch, attention, split)
    except (TypeError, ValueError, RuntimeError, IndexError, KeyError, AttributeError) as err:
        return float("inf"), None, err
    diff = (got.double() - expected).abs().max() / expected.abs().max().clamp_min(1.0)
    return float(diff), use, None


def _check(model, run, batch, expected, attention, split, tol) -> tuple[bool, str, bool]:
    """(exact, why not, whether the failure was a TypeError) of one route."""
    diff, use, raised = _measure(run, batch, expected, attention, split)
    error = None if raised is None else f"{type(raised).__name__}: {raised}"
    diff = _agree(diff, expected.device)
    if error is None and use is not None and use.keywords + use.block == 0:
        error = "the model never called the per-segment attention"
    if error is None and use is not None and use.block and checkpointing(model):
        error = (
            "the model does not pass attention keywords to its layers, so the forward that "
            "gradient checkpointing recomputes would not see the segments"
        )
    if error is None and not diff <= tol:
        error = f"log-probs differ from the model's own forward by {diff:.3g} (tolerance {tol:.0e})"
    return error is None, error or "", isinstance(raised, TypeError)


def _warn_head(model: nn.Module, name: str) -> None:
    """Warn once per model that its head does not split off."""
    if model.__dict__.get("_rlox_head_warned"):
        return
    model.__dict__["_rlox_head_warned"] = True
    warnings.warn(
        f"{name}: the LM head at completion positions differs from the model's logits (a "
        "transform after the head that rlox does not know); running the model's full forward "
        "instead",
        stacklevel=5,
    )


def _search(model, layout, accepted, run, split_ok, routes) -> _Verdict | None:
    """The first exact route, or None when the model's own forward is not finite (no verdict)."""
    inner = inner_model(model)
    dtype = next(inner.parameters()).dtype
    tol = TOLERANCE.get(dtype, 1e-4)
    name = type(inner).__name__
    device = next(inner.parameters()).device
    with plain_implementation(inner):
        # The ids every part of the model takes, its head's output included.
        scored = _logits(model(torch.zeros(1, 2, dtype=torch.long, device=device))).shape[-1]
        batch, sequences = probe_batch(inner, layout, min(_vocab(inner), scored))
        batch = batch.to(device)
        expected = _alone(model, batch, sequences)
    if not bool(torch.isfinite(expected).all()):
        return None
    tried, interface = [], True
    for attention in routes:
        for split in (True, False) if split_ok else (False,):
            ok, why, type_error = _check(model, run, batch, expected, attention, split, tol)
            interface &= type_error
            if ok:
                if split_ok and not split:
                    _warn_head(inner, name)
                return _Verdict(Route(attention, split), tried)
            head = "split head" if split else "full forward"
            tried.append(f"{attention} ({head}): {why}")
            _LOG.info("attention: %s %s on %s is not exact: %s", layout, attention, name, why)
    return _Verdict(None, tried, interface and bool(tried))


def _vocab(model: nn.Module) -> int:
    """The ids every part of the model takes: the smallest of its config's vocabulary, its
    input embedding and its output head."""
    sizes = []
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(size, int) and size > 0:
        sizes.append(size)
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        part = getattr(model, getter, lambda: None)()
        weight = getattr(part, "weight", None)
        if isinstance(weight, Tensor) and weight.dim() == 2:
            sizes.append(int(weight.shape[0]))
    if not sizes:
        sizes = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
    return max(2, min(sizes)) if sizes else 2


def resolve(
    model: nn.Module,
    layout: str,
    accepted: frozenset[str],
    run: Runner,
    split_ok: bool,
    segments: bool = True,
) -> Route:
    """The verified :class:`Route` of ``model`` for ``layout`` (probed once, then cached).

    ``run(batch, attention, split)`` runs rlox's path; ``split_ok``: whether the LM head can
    split off at all; ``segments``: whether the batches carry ``attn_segments`` (``"varlen"``
    needs them). ``ValueError`` when no candidate route is exact, naming the model class, the
    layout, each route tried and why it was refused (``TypeError`` when every route failed on
    the model's interface). A model whose own forward gives non-finite log-probs cannot be
    checked: the first candidate runs, and the probe runs again next time.
    """
    inner = inner_model(model)
    asked = getattr(accepted, "attention", "auto")
    routes = candidate_routes(model, layout, accepted)
    if not segments:
        if routes == ["varlen"]:
            raise ValueError("attention: 'varlen' needs a batch with attn_segments")
        routes = [r for r in routes if r != "varlen"]
    dtype = next(inner.parameters()).dtype
    key = (layout, asked, dtype, checkpointing(model), split_ok, segments)
    cache = inner.__dict__.setdefault(_CACHE, {})
    if key not in cache:
        with _quiet(model):
            verdict = _search(model, layout, accepted, run, split_ok, routes)
        if verdict is None:
            return Route(routes[0], split_ok)
        cache[key] = verdict
    verdict = cache[key]
    if verdict.route is not None:
        return verdict.route
    name = type(inner).__name__
    reasons = "; ".join(verdict.tried) or "no route can run it"
    hint = "" if asked == "auto" else " (attention='auto' tries every route)"
    error = TypeError if verdict.interface else ValueError
    raise error(
        f"attention: {name} cannot run the {layout} layout exactly with attention={asked!r}"
        f"{hint}: {reasons}"
    )
