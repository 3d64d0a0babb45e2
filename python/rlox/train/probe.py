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
from rlox.attention import candidate_routes, checkpointing, inner_model, plain_implementation
from rlox.attention_varlen import PlanUse
from rlox.batch import PairBatch, batch_from_arrays
from rlox.train.distributed import process_group, reshard
from rlox.train.head import model_logits
from rlox.train.positions import position_limit

__all__ = ["TOLERANCE", "Route", "probe_batch", "resolve"]

_LOG = logging.getLogger("rlox")
_CACHE = "_rlox_routes"

# Tolerance on every log-probability at the plan's points, by the dtype of the model's logits,
# times max(1, |log p|). Exact routes differ by rounding only (float64: 1e-8 to 3e-7 where parts
# of the model compute in float32, as eager attention's softmax does).
TOLERANCE = {
    torch.float64: 1e-6,
    torch.float32: 5e-5,
    torch.bfloat16: 5e-2,
    torch.float16: 1e-2,
}

# Three pairs of (prompt, chosen, rejected) lengths as (base, factor): each part has base +
# factor * span tokens. Short prompts put completion tokens next to sequence boundaries, long
# ones give the completions long contexts; unequal lengths give padding runs longer than any
# attention span in the padded layout.
_LENGTHS = (((2, 0), (5, 1), (2, 0)), ((1, 0), (3, 0), (6, 2)), ((4, 1), (2, 1), (3, 0)))
# Attention spans named in configs (sliding windows, chunks, sparse-attention budgets): the probe
# crosses spans up to this many tokens.
_MAX_SPAN = 256
_SPAN_WORDS = (
    "window",
    "topk",
    "top_k_tokens",
    "chunk_size",
    "budget",
    "local_attention",
    "pool_size",
)


@dataclass(frozen=True)
class Route:
    """How a model runs one layout: the attention route, and whether the LM head splits off."""

    attention: str
    split: bool


# runner(batch, attention, split) -> ((N, V) float64 log-softmax at the plan's points, plan use)
Runner = Callable[[PairBatch, str, bool], tuple[Tensor, PlanUse | None]]


def _span(config: object, depth: int = 0) -> int:
    """The largest attention span a config names (windows, chunks, sparse budgets) up to
    ``_MAX_SPAN``, sub-configs included; 0 when none."""
    found = 0
    for key, value in vars(config).items() if hasattr(config, "__dict__") else ():
        if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= _MAX_SPAN:
            if any(word in key for word in _SPAN_WORDS) and "num_" not in key:
                found = max(found, value)
        elif depth < 2 and hasattr(value, "to_dict") and hasattr(value, "__dict__"):
            found = max(found, _span(value, depth + 1))
    return found


def probe_batch(model: nn.Module, layout: str, vocab: int) -> tuple[PairBatch, list[list[int]]]:
    """The probe's batch in ``layout`` and its 2B sequences (chosen then rejected, as ids).

    Completions grow past the largest attention span the model's config names (up to 256
    tokens), so sliding windows, attention chunks and sparse budgets are crossed; packed and
    prefix-shared rows hold several sequences and padding.
    """
    span = _span(getattr(inner_model(model), "config", None)) + 1
    limit = position_limit(model)
    if limit is not None:
        span = max(0, min(span, (limit - 11) // 4))
    rng = np.random.default_rng(20241)
    parts: tuple[list[np.ndarray], ...] = ([], [], [])
    for lengths in _LENGTHS:
        for part, (base, factor) in zip(parts, lengths, strict=True):
            part.append(rng.integers(0, vocab, base + factor * span))
    prompts, chosen, rejected = parts
    columns = []
    for part in (prompts, chosen, rejected):
        offsets = np.cumsum([0] + [len(x) for x in part]).astype(np.int64)
        columns += [np.concatenate(part).astype(np.int32), offsets]
    store = _rlox.PairStore(*columns)
    pack = {"packed": 12 + 3 * span, "prefix_shared": 20 + 5 * span}.get(layout)
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


def _alone(model: nn.Module, batch: PairBatch, sequences: list[list[int]]):  # noqa: ANN202
    """((N, V) float64 log-softmax at each plan point, each sequence run alone (plan order),
    the dtype of the model's logits)."""
    device = next(model.parameters()).device
    b = batch.num_pairs
    per_sequence, dtype = [], torch.float64
    for i, seq in enumerate(sequences):
        prompt = int(batch.prompt_lengths[i % b])
        logits = model_logits(model(torch.tensor([seq], device=device)))
        dtype = logits.dtype
        per_sequence.append(torch.log_softmax(logits.double()[0, prompt - 1 : len(seq) - 1], -1))
    seq = (batch.plan_side * b + batch.plan_pair).tolist()
    rank = batch.plan_ranks().tolist()
    rows = [per_sequence[s][k] for s, k in zip(seq, rank, strict=True)]
    return torch.stack(rows), dtype


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
    """(largest difference of a log-probability relative to max(1, |log p|), plan use, error)
    of one route over every vocabulary entry at the plan's points; inf on an error."""
    try:
        got, use = run(batch, attention, split)
    except (TypeError, ValueError, RuntimeError, IndexError, KeyError, AttributeError) as err:
        return float("inf"), None, err
    if got.shape != expected.shape:
        return float("inf"), use, ValueError(f"logits of shape {tuple(got.shape)}")
    delta = torch.where(got == expected, 0.0, (got - expected).abs())  # equal infinities agree
    diff = (delta / expected.abs().clamp_min(1.0)).max()
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
        scored = model_logits(model(torch.zeros(1, 2, dtype=torch.long, device=device))).shape[-1]
        batch, sequences = probe_batch(inner, layout, min(_vocab(inner), scored))
        batch = batch.to(device)
        expected, logits_dtype = _alone(model, batch, sequences)
    if not bool(torch.isfinite(expected).all()):
        return None
    tol = max(tol, TOLERANCE.get(logits_dtype, tol))
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


_RECURRENT = ("mamba", "rwkv", "recurrent", "lstm", "mixer", "deltanet", "linearattention", "ssm")


def _recurrent(model: nn.Module) -> str | None:
    """The class name of a recurrent or state-space layer of ``model``, if it has one."""
    for m in model.modules():
        name = type(m).__name__
        if name.endswith(("Model", "ForCausalLM", "LMHeadModel")):
            continue
        if any(word in name.lower() for word in _RECURRENT):
            return name
    return None


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
    dtype = next(inner.parameters()).dtype
    key = (layout, asked, dtype, checkpointing(model), split_ok, segments)
    cache = inner.__dict__.setdefault(_CACHE, {})
    verdict = cache.get(key)
    if verdict is None:
        routes = candidate_routes(model, layout, accepted)
        if not segments:
            if routes == ["varlen"]:
                raise ValueError("attention: 'varlen' needs a batch with attn_segments")
            routes = [r for r in routes if r != "varlen"]
        with _quiet(model):
            verdict = _search(model, layout, accepted, run, split_ok, routes)
        if verdict is None:
            return Route(routes[0], split_ok)
        cache[key] = verdict
    if verdict.route is not None:
        return verdict.route
    name = type(inner).__name__
    reasons = "; ".join(verdict.tried) or "no route can run it"
    hint = "" if asked == "auto" else " (attention='auto' tries every route)"
    recurrent = _recurrent(inner)
    if recurrent and layout != "padded":
        reasons += (
            f". {name} has recurrent layers ({recurrent}), which carry their state from one "
            "sequence of a row into the next: use layout='padded'"
        )
    error = TypeError if verdict.interface else ValueError
    raise error(
        f"attention: {name} cannot run the {layout} layout exactly with attention={asked!r}"
        f"{hint}: {reasons}"
    )
