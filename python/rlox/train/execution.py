"""How the model forward runs: gradient checkpointing, activation offloading, ``torch.compile``.

:func:`prepare_models` applies a trainer's ``gradient_checkpointing`` and ``compile`` options to
its policy (and ``compile`` to its reference) once, at construction; :func:`policy_forward` is
the context the policy's training forward runs in (``activation_offloading``).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch
from torch import nn

__all__ = ["check_offloading", "enable_checkpointing", "policy_forward", "prepare_models"]


def _inner(model: nn.Module) -> nn.Module:
    """``model`` without a ``DistributedDataParallel`` wrapper."""
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def enable_checkpointing(model: nn.Module) -> None:
    """Recompute activations in the backward (non-reentrant ``torch.utils.checkpoint``).

    Hugging Face models (peft wrappers forward the call) use ``activation_checkpointing_enable``
    (transformers 5; ``gradient_checkpointing_enable`` before it) with ``use_reentrant=False``,
    which needs no inputs that require grad, so frozen embeddings under LoRA are fine;
    ``TinyCausalLM`` checkpoints each block. A module with neither method is a ``ValueError``.
    """
    model = _inner(model)
    methods = (
        (getattr(model, name, None), f"{name.removesuffix('_enable')}_kwargs")
        for name in ("activation_checkpointing_enable", "gradient_checkpointing_enable")
    )
    enable, keyword = next(((m, k) for m, k in methods if callable(m)), (None, ""))
    if enable is None:
        raise ValueError(
            f"gradient_checkpointing: {type(model).__name__} has no gradient_checkpointing_enable"
            "(); checkpoint its blocks yourself (torch.utils.checkpoint) and leave this off"
        )
    if keyword in inspect.signature(enable).parameters:
        enable(**{keyword: {"use_reentrant": False}})
    else:
        enable()


def check_offloading(model: nn.Module) -> None:
    """``ValueError`` unless ``model``'s parameters live on a CUDA device."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ValueError(
            "activation_offloading: moves saved activations from GPU memory to pinned CPU "
            f"memory, so it needs a CUDA model; this model is on {device.type}"
        )


def policy_forward(offload: bool) -> contextlib.AbstractContextManager[Any]:
    """The context of the policy's forward: with ``offload``, tensors saved for the backward go
    to pinned CPU memory (``torch.autograd.graph.save_on_cpu``)."""
    if not offload:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=True)


def _compile_target(model: nn.Module) -> nn.Module:
    """The module whose call rlox makes: the decoder where the LM head splits off."""
    from rlox.train.logps import split_head

    inner = _inner(model)
    split = split_head(inner)
    return inner if split is None else split[0]


def compile_forward(model: nn.Module) -> None:
    """``torch.compile`` the forward rlox runs, in place (``nn.Module.compile``): parameter
    names, ``state_dict`` keys and checkpoints stay those of the uncompiled module."""
    _compile_target(model).compile()


def prepare_models(
    model: nn.Module, ref_model: nn.Module | None, *, gradient_checkpointing: bool, compile: bool
) -> None:
    """Apply ``gradient_checkpointing`` (policy) and ``compile`` (policy and reference)."""
    if gradient_checkpointing:
        enable_checkpointing(model)
    if compile:
        compile_forward(model)
        if ref_model is not None:
            compile_forward(ref_model)
