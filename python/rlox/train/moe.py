"""Mixture-of-experts models: the router load-balancing loss and its coefficient.

A Hugging Face MoE causal LM (Mixtral, Qwen2-MoE, ...) declares ``output_router_logits`` in its
(text) config; run with ``output_router_logits=True`` its decoder returns one (R * L, E) tensor of
router logits per MoE layer, and the architecture's ``load_balancing_loss_func`` (Switch
Transformer eqs. 4-6) turns them into the auxiliary loss that the trainer adds, weighted by
``router_aux_loss_coef``.
"""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from rlox.train.distributed import unwrap

__all__ = [
    "can_compute_loss",
    "check_router_aux_coef",
    "hf_model",
    "is_moe",
    "load_balancing_loss",
    "record_router_logits",
    "router_aux_coef",
    "text_config",
]

_LOSS_PARAMS = ["gate_logits", "num_experts", "top_k", "attention_mask"]


def hf_model(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` and peft ``PeftModel`` wrappers."""
    while True:
        inner = unwrap(model)
        get_base = getattr(inner, "get_base_model", None)
        if callable(get_base):
            base = get_base()
            if isinstance(base, nn.Module) and base is not inner:
                inner = base
        if inner is model:
            return model
        model = inner


def text_config(model: nn.Module) -> Any:
    """The (text) config of ``model`` through wrappers (``get_text_config()``), or None."""
    config = getattr(hf_model(model), "config", None)
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


def is_moe(model: nn.Module) -> bool:
    """Whether ``model``'s config declares ``output_router_logits`` (it returns router logits)."""
    config = text_config(model)
    return config is not None and hasattr(config, "output_router_logits")


def check_router_aux_coef(coef: Any, name: str = "router_aux_loss_coef") -> float | None:
    """``coef`` as a float, or None; ``TypeError``/``ValueError`` naming ``name`` otherwise."""
    if coef is None:
        return None
    if isinstance(coef, bool) or not isinstance(coef, int | float):
        raise TypeError(f"{name}: expected a float or None, got {type(coef).__name__}")
    if not (math.isfinite(coef) and coef >= 0):
        raise ValueError(f"{name}: must be a finite float >= 0, got {coef}")
    return float(coef)


def router_aux_coef(model: nn.Module, coef: float | None) -> float:
    """The weight of the router load-balancing loss, TRL 1.16's rule; 0.0 means off.

    ``coef`` None takes the config's ``router_aux_loss_coef`` (0.0 when it declares none). A set,
    non-zero ``coef`` for a model whose config has no ``output_router_logits`` is a
    ``ValueError``. The loss is on iff the config has ``output_router_logits`` and the
    coefficient is not 0. Looks through DDP and peft wrappers.
    """
    coef = check_router_aux_coef(coef)
    moe = is_moe(model)
    if coef is None:
        coef = float(getattr(text_config(model), "router_aux_loss_coef", 0.0) or 0.0)
    elif coef and not moe:
        name = type(hf_model(model)).__name__
        raise ValueError(
            f"router_aux_loss_coef: is {coef} but {name} is not a mixture-of-experts model that "
            "returns router logits (no output_router_logits in its config), so there is no "
            "auxiliary loss to weight"
        )
    return coef if moe and coef != 0.0 else 0.0


def _loss_func(model: nn.Module) -> Callable[..., Any] | None:
    """The ``load_balancing_loss_func`` of ``model``'s architecture, when it has the usual form.

    Looked up in the modeling module of each class of the model's MRO (FSDP2 subclasses it).
    """
    for cls in type(model).__mro__:
        fn = getattr(sys.modules.get(cls.__module__), "load_balancing_loss_func", None)
        if callable(fn):
            params = list(inspect.signature(fn).parameters)
            return fn if params == _LOSS_PARAMS else None
    return None


def _expert_counts(model: nn.Module) -> tuple[int, int] | None:
    """(num_experts, top_k) as the model's forward passes them to its loss function."""
    config = text_config(model)
    experts = getattr(model, "num_experts", None)
    top_k = getattr(model, "num_experts_per_tok", None)
    if not isinstance(experts, int):
        experts = getattr(config, "num_experts", getattr(config, "num_local_experts", None))
    if not isinstance(top_k, int):
        top_k = getattr(config, "num_experts_per_tok", None)
    if isinstance(experts, int) and isinstance(top_k, int):
        return experts, top_k
    return None


def load_balancing_loss(
    model: nn.Module, router_logits: Sequence[Tensor], mask: Tensor
) -> Tensor | None:
    """() load-balancing loss of ``model``'s architecture, or None where rlox cannot compute it.

    ``router_logits``: one (R * L, E) tensor per MoE layer, as the decoder returns them with
    ``output_router_logits=True``; ``mask``: (R, L), 1 on the tokens that count. Equal to the
    model's own ``aux_loss`` for a padded batch with ``mask`` its 2-D attention mask.
    """
    inner = hf_model(model)
    fn = _loss_func(inner)
    counts = _expert_counts(inner)
    if fn is None or counts is None or not router_logits:
        return None
    loss = fn(tuple(router_logits), counts[0], counts[1], mask)
    return loss if isinstance(loss, Tensor) else torch.as_tensor(float(loss))


def can_compute_loss(model: nn.Module) -> bool:
    """Whether :func:`load_balancing_loss` can compute ``model``'s loss from router logits."""
    inner = hf_model(model)
    return _loss_func(inner) is not None and _expert_counts(inner) is not None


def _router_targets(model: nn.Module) -> list[tuple[nn.Module, int]] | None:
    """(router module, output index) pairs, from the model's ``_can_record_outputs`` spec.

    Only plain specs (a class, or an ``OutputRecorder`` with a target class and no layer name)
    are followed; None otherwise or when no router module is found.
    """
    for module in model.modules():
        spec = (getattr(type(module), "_can_record_outputs", None) or {}).get("router_logits")
        if spec is not None:
            break
    else:
        return None
    classes = []
    for item in spec if isinstance(spec, list) else [spec]:
        if isinstance(item, type):
            classes.append((item, 1))  # Hugging Face's default index for a bare class
        elif isinstance(getattr(item, "target_class", None), type) and not getattr(
            item, "layer_name", None
        ):
            classes.append((item.target_class, int(item.index)))
        else:
            return None
    found = [(m, i) for m in model.modules() for cls, i in classes if isinstance(m, cls)]
    return found or None


@contextmanager
def record_router_logits(model: nn.Module) -> Iterator[list[Tensor]]:
    """Collect the (R * L, E) router logits of ``model``'s MoE layers in call order.

    For a forward that cannot return them itself: the full forward of a causal LM given a 4-D
    attention mask (packed and prefix-shared rows), whose own ``aux_loss`` would read that mask.
    Forward hooks on the router modules Hugging Face records (``_can_record_outputs``), removed
    on exit. ``TypeError`` when the model names none.
    """
    targets = _router_targets(hf_model(model))
    if targets is None:
        raise TypeError(
            f"model: cannot find the router modules of {type(hf_model(model)).__name__}"
        )
    seen: list[Tensor] = []

    def hook(index: int) -> Callable[..., None]:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            out = output[index] if isinstance(output, tuple | list) else output
            if isinstance(out, Tensor):
                seen.append(out)

        return record

    handles = [m.register_forward_hook(hook(i)) for m, i in targets]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()
