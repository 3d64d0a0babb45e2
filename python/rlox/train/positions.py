"""Positions a model can take: its limit, the default ``max_length``, the check of a batch.

Learned position embeddings index out of range past their limit and rotary ones extrapolate to
positions the model never saw, so rlox refuses sequences beyond ``max_position_embeddings``
(``n_positions``, ``max_seq_len``) everywhere: :func:`resolve_max_length` for ``fit``,
``evaluate``, ``precompute_reference`` and ``rlox train``/``eval``, :func:`check_batch` for every
forward (``train_step`` and ``compute_loss`` included).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from torch import nn

from rlox.attention import inner_model
from rlox.batch import PairBatch

__all__ = ["check_batch", "position_limit", "resolve_max_length"]

_NAMES = ("max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length")


def position_limit(model: nn.Module) -> int | None:
    """The number of positions ``model`` was built for (largest position id + 1), or None.

    Read from its config (``max_position_embeddings``, ``n_positions``, ``max_seq_len``,
    ``max_sequence_length``), through ``DistributedDataParallel`` and peft wrappers.
    """
    config = getattr(inner_model(model), "config", None)
    for name in _NAMES:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _longest(datasets: Iterable[Any]) -> int | None:
    longest = None
    for ds in datasets:
        if ds is None or len(ds) == 0:
            continue
        lens = ds.lengths()
        top = int(np.max(lens.prompt + np.maximum(lens.chosen, lens.rejected)))
        longest = top if longest is None else max(longest, top)
    return longest


def resolve_max_length(
    model: nn.Module, max_length: int | None, datasets: Iterable[Any] = ()
) -> int | None:
    """``max_length`` checked against the model's positions, or its default.

    ``None`` becomes the smaller of the model's position limit and the longest prompt +
    completion in ``datasets`` (None when neither is known: no truncation). A ``max_length``
    beyond the limit is a ``ValueError`` ("max_length: 1024 exceeds the model's 256 positions").
    """
    limit = position_limit(model)
    if max_length is None:
        longest = _longest(datasets)
        found = [v for v in (limit, longest) if v is not None]
        return min(found) if found else None
    if limit is not None and max_length > limit:
        raise ValueError(f"max_length: {max_length} exceeds the model's {limit} positions")
    return max_length


def check_batch(model: nn.Module, batch: PairBatch) -> None:
    """``ValueError`` when a sequence of ``batch`` needs more positions than ``model`` has.

    Reads the batch's ``position_ids`` where they live on the CPU (no device sync otherwise).
    """
    limit = position_limit(model)
    ids = batch.position_ids
    if limit is None or ids.numel() == 0 or ids.device.type != "cpu":
        return
    top = int(ids.max())
    if top < limit:
        return
    row = int((ids >= limit).any(1).nonzero()[0, 0])
    raise ValueError(
        f"input_ids: row {row} holds a sequence of {top + 1} tokens, beyond the model's {limit} "
        "positions; truncate the pairs (fit's max_length) or use a model with more positions"
    )
