"""The structure of an optimizer by parameter name: record it, rebuild it, compare with it.

:func:`optimizer_groups` describes each parameter group by the names (from
``named_parameters()``) of its parameters and its options; :func:`build_optimizer` rebuilds an
Adam or AdamW optimizer from that; :func:`check_optimizer` tells how a given optimizer differs.
Saved with a trainer or checkpoint, it lets loading rebuild the same optimizer, or refuse an
optimizer whose state would fit the wrong parameters.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "build_optimizer",
    "check_group_sizes",
    "check_optimizer",
    "default_optimizer",
    "optimizer_groups",
]

_OPTIMIZERS = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}


def _json_option(value: Any) -> tuple[bool, Any]:
    """``(True, value as JSON)`` for a group option JSON can hold (tuples as lists), else False."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, tuple):
        value = list(value)
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False, None
    return True, value


def optimizer_groups(
    module: nn.Module | None, optimizer: torch.optim.Optimizer
) -> list[dict[str, Any]]:
    """Each group of ``optimizer``: ``{"params": [names], "options": {...}}``.

    Names are those of ``module.named_parameters()`` (None for a parameter outside ``module``,
    or for all of them without ``module``); options are the group's JSON-able settings.
    """
    names: dict[int, str] = {}
    for name, p in module.named_parameters() if module is not None else ():
        names.setdefault(id(p), name)
    groups = []
    for group in optimizer.param_groups:
        options = {}
        for key, value in group.items():
            ok, value = _json_option(value)
            if key != "params" and ok:
                options[key] = value
        groups.append({"params": [names.get(id(p)) for p in group["params"]], "options": options})
    return groups


def default_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Adam over ``model``'s trainable parameters, or AdamW when ``weight_decay`` > 0.

    AdamW decays parameters of 2 or more dimensions only (never biases or norms).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not weight_decay:
        return torch.optim.Adam(params, lr=lr)
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def build_optimizer(
    module: nn.Module, kind: str, groups: Sequence[Mapping[str, Any]], **defaults: Any
) -> torch.optim.Optimizer:
    """A new ``kind`` optimizer (Adam or AdamW) with the groups of :func:`optimizer_groups`.

    ``defaults`` go to the constructor (its defaults for later groups).
    """
    if kind not in _OPTIMIZERS:
        raise ValueError(f"optimizer: the checkpoint used {kind}; pass an optimizer of that type")
    params = dict(module.named_parameters())
    built = []
    for i, group in enumerate(groups):
        for name in group["params"]:
            if name not in params:
                what = "a parameter outside the model" if name is None else repr(name)
                raise ValueError(
                    f"optimizer: the checkpoint's group {i} holds {what}, which the model lacks"
                )
        options = {k: tuple(v) if isinstance(v, list) else v for k, v in group["options"].items()}
        built.append({**options, "params": [params[n] for n in group["params"]]})
    return _OPTIMIZERS[kind](built, **defaults)


def _names(names: Sequence[str | None]) -> str:
    shown = ", ".join(repr(n) for n in names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def check_optimizer(
    module: nn.Module | None,
    optimizer: torch.optim.Optimizer,
    kind: str | None,
    groups: Sequence[Mapping[str, Any]],
) -> None:
    """Raise ``ValueError`` naming the difference unless ``optimizer`` is of class ``kind`` (when
    given) with the parameter groups ``groups`` (from :func:`optimizer_groups`; by name with
    ``module``, else by size)."""
    if kind is not None and type(optimizer).__name__ != kind:
        raise ValueError(
            f"optimizer: the checkpoint used {kind}, this optimizer is {type(optimizer).__name__}"
        )
    mine = optimizer_groups(module, optimizer)
    if len(mine) != len(groups):
        raise ValueError(
            f"optimizer: the checkpoint has {len(groups)} parameter groups, "
            f"this optimizer has {len(mine)}"
        )
    for i, (saved, own) in enumerate(zip(groups, mine, strict=True)):
        a, b = list(saved["params"]), own["params"]
        if len(a) == len(b) and (module is None or a == b):
            continue
        only_a = [n for n in a if n is not None and n not in b]
        only_b = [n for n in b if n is not None and n not in a]
        detail = ""
        if only_a or only_b:
            parts = [f"only the checkpoint's: {_names(only_a)}"] if only_a else []
            parts += [f"only this optimizer's: {_names(only_b)}"] if only_b else []
            detail = f" ({'; '.join(parts)})"
        elif len(a) == len(b):
            j = next(k for k, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
            detail = f" (in another order: parameter {j} is {a[j]!r} there, {b[j]!r} here)"
        raise ValueError(
            f"optimizer: the checkpoint's group {i} has {len(a)} parameters, "
            f"this optimizer's has {len(b)}{detail}"
        )


def check_group_sizes(state: Mapping[str, Any], optimizer: torch.optim.Optimizer) -> None:
    """Raise ``ValueError`` unless the ``state_dict`` ``state`` has ``optimizer``'s group sizes."""
    saved = state.get("param_groups", [])
    if len(saved) != len(optimizer.param_groups):
        raise ValueError(
            f"optimizer: the checkpoint has {len(saved)} parameter groups, "
            f"this optimizer has {len(optimizer.param_groups)}"
        )
    for i, (s, g) in enumerate(zip(saved, optimizer.param_groups, strict=True)):
        if len(s["params"]) != len(g["params"]):
            raise ValueError(
                f"optimizer: the checkpoint's group {i} has {len(s['params'])} parameters, "
                f"this optimizer's has {len(g['params'])}"
            )
