"""Dropout off in the policy and the reference (``DPO(disable_dropout=True)``).

With dropout on, the policy's log-probs are noisy while the reference's (in eval mode) are not,
so every implicit reward ``beta * (pi - ref)`` carries noise plus a bias: a policy equal to its
reference does not give loss ``log 2``. :func:`disable_dropout` sets every dropout probability
of a model to 0: ``nn.Dropout`` modules (LoRA's adapter dropout included) and the float
probabilities that attention functions read from module attributes or the model config
(``attention_dropout``, ``attn_pdrop``, ``resid_pdrop``, ...).
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["disable_dropout"]


def _is_rate_name(name: str) -> bool:
    return "dropout" in name or name.endswith("pdrop")


def _zero_rates(obj: Any) -> int:
    """Set the float attributes of ``obj`` named like a dropout rate to 0; count the changed."""
    changed = 0
    for name, value in list(vars(obj).items()):
        if not _is_rate_name(name) or isinstance(value, bool) or not isinstance(value, float):
            continue
        if value != 0.0:
            try:
                setattr(obj, name, 0.0)
            except (AttributeError, TypeError):  # a frozen config: its modules hold the rate
                continue
            changed += 1
    return changed


def _configs(model: nn.Module) -> list[Any]:
    """The model's config and its sub-configs (text / vision parts of composite models)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "__dict__"):
        return []
    found = [config]
    for value in vars(config).values():
        if hasattr(value, "to_dict") and hasattr(value, "__dict__"):
            found.append(value)
    return found


def disable_dropout(model: nn.Module) -> int:
    """Set every dropout probability in ``model`` to 0; return how many values were non-zero."""
    changed = 0
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            changed += int(module.p != 0.0)
            module.p = 0.0
        changed += _zero_rates(module)
        for config in _configs(module):
            if id(config) not in seen:
                seen.add(id(config))
                changed += _zero_rates(config)
    return changed
