"""How a forward attends in each batch layout: the attention route and its keywords.

Routes (``attention=`` of :class:`rlox.DPO`): ``"dense"`` passes the (R, 1, L, L) mask of
:func:`rlox.data.dense_attention_mask` in the form the model's attention reads it (boolean for
``"sdpa"``; additive float for ``"eager"``, which *adds* the mask to the scores); ``"varlen"``
runs sdpa per attention segment (:mod:`rlox.attention_varlen`); ``"flex"`` passes a FlexAttention
``BlockMask`` (``rlox.attention_flex``); ``"auto"`` picks one per model and device. The
``padded`` layout always passes its (R, L) padding mask.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from rlox.attention_varlen import IMPLEMENTATION as VARLEN_IMPLEMENTATION
from rlox.batch import PairBatch

__all__ = [
    "ATTENTION",
    "ForwardKeywords",
    "attention_mask",
    "attention_route",
    "attn_implementation",
    "check_attention",
    "forward_keywords",
    "model_keywords",
    "route_context",
]

ATTENTION = ("auto", "flex", "varlen", "dense")
_LOG = logging.getLogger("rlox")
_NOT_HF = object()


def inner_model(model: nn.Module) -> nn.Module:
    """``model`` without ``DistributedDataParallel`` (``.module``) and peft ``PeftModel``
    (``get_base_model()``) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif callable(getattr(model, "get_base_model", None)):
            inner = model.get_base_model()
            if inner is model:
                return model
            model = inner
        else:
            return model


def attn_implementation(model: nn.Module) -> str | None:
    """``model.config._attn_implementation`` of a Hugging Face model, else None.

    Looks through ``DistributedDataParallel`` (``.module``) and peft ``PeftModel``
    (``get_base_model()``). An HF config holding None means eager attention (HF's dispatch
    default). None is returned for other modules (no config, or a config without the attribute).
    """
    model = inner_model(model)
    value = getattr(getattr(model, "config", None), "_attn_implementation", _NOT_HF)
    if value is _NOT_HF:
        return None
    return "eager" if value is None else str(value)


def _float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of ``model``'s first floating parameter (float32 when it has none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def attention_mask(model: nn.Module, batch: PairBatch) -> Tensor:
    """The ``attention_mask`` keyword for running ``model`` on ``batch``.

    - ``"padded"`` layout: ``batch.attention_mask``, (R, L) 0/1; every implementation builds its
      own causal mask from it.
    - other layouts, the (R, 1, L, L) visibility of :func:`rlox.data.dense_attention_mask`:
      boolean (True = may attend) for ``"sdpa"`` (and ``"rlox_varlen"``, which is sdpa when
      given no segments) and for modules that are not Hugging Face models
      (``rlox.models.TinyCausalLM``, user modules); for ``"eager"`` additive in the model's
      floating dtype, 0 where visible and ``finfo(dtype).min`` elsewhere. Every query row sees
      at least itself, so no row is fully masked.

    Raises ``TypeError`` for any other implementation (``flex_attention``, flash attention,
    kernels-hub names, unknown names), naming the layout and the implementation.
    """
    if batch.layout == "padded":
        return batch.attention_mask
    impl = attn_implementation(model)
    if impl is None or impl in ("sdpa", VARLEN_IMPLEMENTATION):
        return batch.dense_attention_mask()
    if impl == "eager":
        dtype = _float_dtype(model)
        visible = batch.dense_attention_mask()
        return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(
            ~visible, torch.finfo(dtype).min
        )
    raise TypeError(
        f"model: the {batch.layout} layout needs attn_implementation 'sdpa' or 'eager'; this "
        f"model uses {impl!r} (load it with attn_implementation='sdpa', call "
        "model.set_attn_implementation('sdpa'), or use layout='padded')"
    )


def model_keywords(model: nn.Module, batch: PairBatch) -> dict[str, object]:
    """The attention keywords that run ``model`` on ``batch`` as the model is configured now,
    attending within each sequence wherever the model can (no implementation is switched).

    - ``"padded"``: the (R, L) padding mask.
    - a Hugging Face model with ``attn_implementation="flex_attention"``: a FlexAttention
      ``BlockMask`` (:func:`rlox.attention_flex.block_mask`) as ``attention_mask``;
    - one with ``"rlox_varlen"`` (:func:`rlox.attention_varlen.register`), or a forward that takes
      ``attn_segments`` (``rlox.models.TinyCausalLM``): ``attn_segments``, a
      :class:`~rlox.attention_varlen.VarlenPlan`, and no mask;
    - otherwise the dense mask of :func:`attention_mask`.
    """
    if batch.layout == "padded":
        return {"attention_mask": batch.attention_mask}
    inner = inner_model(model)
    impl = attn_implementation(inner)
    if impl == "flex_attention":
        from rlox.attention_flex import block_mask

        return {"attention_mask": block_mask(batch)}
    takes_segments = impl == VARLEN_IMPLEMENTATION or (
        impl is None and "attn_segments" in inspect.signature(inner.forward).parameters
    )
    if takes_segments and getattr(batch, "attn_segments", None) is not None:
        from rlox.attention_varlen import VarlenPlan

        rows, length = batch.input_ids.shape
        return {
            "attn_segments": VarlenPlan(batch.attn_segments, rows, length, batch.input_ids.device)
        }
    return {"attention_mask": attention_mask(inner, batch)}


def check_attention(value: object) -> str:
    """``value`` if it is one of :data:`ATTENTION`, else ``TypeError`` / ``ValueError``."""
    if not isinstance(value, str):
        raise TypeError(f"attention: expected a str, got {type(value).__name__}")
    if value not in ATTENTION:
        raise ValueError(f"attention: expected one of {', '.join(ATTENTION)}; got {value!r}")
    return value


class ForwardKeywords(frozenset):
    """The forward keywords a model accepts, and the attention route asked for (``attention``).

    With ``model``, ``"flex"`` on a model without a CUDA parameter is refused up front.
    """

    attention: str

    def __new__(
        cls,
        names: frozenset[str] | set[str],
        attention: str = "auto",
        model: nn.Module | None = None,
    ) -> ForwardKeywords:
        keywords = super().__new__(cls, names)
        keywords.attention = check_attention(attention)
        keywords.logged = set()
        if attention == "flex" and model is not None:
            _check_flex_device(model)
        return keywords


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _check_flex_device(model: nn.Module) -> None:
    if _device(inner_model(model)).type != "cuda":
        raise ValueError(
            "attention: 'flex' needs a CUDA model (torch has no FlexAttention backward on "
            "CPU); use 'varlen' or 'auto' there"
        )


def _hf_switchable(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face model whose attention goes through AttentionInterface."""
    can = getattr(type(model), "_can_set_attn_implementation", None)
    return callable(getattr(model, "set_attn_implementation", None)) and callable(can) and can()


def _supports_flex(model: nn.Module, hf: bool) -> bool:
    if not getattr(model, "_supports_flex_attn", False):
        return False
    try:
        import rlox.attention_flex  # noqa: F401
    except ImportError:
        return False
    return not hf or _hf_switchable(model)


def attention_route(model: nn.Module, batch: PairBatch, accepted: frozenset[str]) -> str:
    """``"padded"``, ``"dense"``, ``"varlen"`` or ``"flex"``: how ``model`` attends on ``batch``.

    The ``padded`` layout always takes its (R, L) mask. Otherwise ``accepted.attention``
    (``"auto"`` for a plain set) decides; ``"auto"`` is ``"flex"`` on CUDA where the model
    supports it (``_supports_flex_attn``), else ``"varlen"`` for Hugging Face models whose
    attention goes through ``AttentionInterface`` and for forwards taking ``attn_segments``
    (``rlox.models.TinyCausalLM``), else ``"dense"``. ``ValueError`` (naming ``attention``) when
    the asked route cannot run: ``"flex"`` on CPU (torch has no FlexAttention backward there),
    ``"varlen"`` / ``"flex"`` on a model without that path, ``"varlen"`` on a batch without
    ``attn_segments``.
    """
    if batch.layout == "padded":
        return "padded"
    asked = getattr(accepted, "attention", "auto")
    if asked == "dense":
        return "dense"
    inner = inner_model(model)
    hf = attn_implementation(inner) is not None
    varlen = _hf_switchable(inner) if hf else "attn_segments" in accepted
    segments = getattr(batch, "attn_segments", None) is not None
    if asked == "auto":
        if _device(inner).type == "cuda" and _supports_flex(inner, hf):
            return "flex"
        return "varlen" if varlen and segments else "dense"
    if asked == "flex":
        _check_flex_device(inner)
        if not _supports_flex(inner, hf):
            raise ValueError(
                f"attention: {type(inner).__name__} has no FlexAttention path (or "
                "rlox.attention_flex is missing); use 'varlen', 'dense' or 'auto'"
            )
        return "flex"
    if not varlen:
        raise ValueError(
            f"attention: 'varlen' needs a Hugging Face model using AttentionInterface or a "
            f"forward taking attn_segments; {type(inner).__name__} has neither"
        )
    if not segments:
        raise ValueError("attention: 'varlen' needs a batch with attn_segments")
    return "varlen"


def forward_keywords(
    model: nn.Module, batch: PairBatch, accepted: frozenset[str], route: str | None = None
) -> dict[str, object]:
    """The attention keywords (``attention_mask`` or ``attn_segments``) of ``route``.

    ``route`` defaults to :func:`attention_route`. ``"varlen"`` passes a
    :class:`~rlox.attention_varlen.VarlenPlan` as ``attn_segments`` and no mask; ``"flex"`` a
    ``BlockMask`` as ``attention_mask``; the others :func:`attention_mask`.
    """
    route = route or attention_route(model, batch, accepted)
    if route == "varlen":
        from rlox.attention_varlen import VarlenPlan

        rows, length = batch.input_ids.shape
        plan = VarlenPlan(batch.attn_segments, rows, length, batch.input_ids.device)
        return {"attn_segments": plan}
    if route == "flex":
        from rlox.attention_flex import block_mask

        return {"attention_mask": block_mask(batch)}
    if "attention_mask" not in accepted:
        return {}
    return {"attention_mask": attention_mask(model, batch)}


@contextlib.contextmanager
def route_context(model: nn.Module, batch: PairBatch, accepted: frozenset[str]) -> Iterator[str]:
    """Run a forward of ``model`` on ``batch`` by its route; yields the route.

    A Hugging Face model runs with ``attn_implementation`` ``"rlox_varlen"`` (``"varlen"``) or
    ``"flex_attention"`` (``"flex"``) inside the block, and gets its own back afterwards, except
    under gradient checkpointing, whose backward runs the forward again (``"rlox_varlen"``
    without segments is sdpa, so it stays harmlessly). Each route is logged once per
    :class:`ForwardKeywords` (logger ``rlox``, ``attention: varlen``).
    """
    route = attention_route(model, batch, accepted)
    logged = getattr(accepted, "logged", None)
    if logged is not None and route not in logged:
        logged.add(route)
        _LOG.info("attention: %s", route)
    inner = inner_model(model)
    switch = route in ("varlen", "flex") and attn_implementation(inner) is not None
    if not switch:
        yield route
        return
    from rlox.attention_varlen import register, segment_masks_off

    wanted = register() if route == "varlen" else "flex_attention"
    before = _implementations(inner) if inner.config._attn_implementation != wanted else None
    if before is not None:
        inner.set_attn_implementation(wanted)
    try:
        with segment_masks_off() if route == "varlen" else contextlib.nullcontext():
            yield route
    finally:
        if before is not None and not _checkpointing(inner):
            for config, value in before:
                config._attn_implementation_internal = value


def _checkpointing(model: nn.Module) -> bool:
    """Whether a Hugging Face model recomputes its forward in the backward."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def _implementations(model: nn.Module) -> list[tuple[object, object]]:
    """(config, its ``_attn_implementation_internal``) of every config in ``model``."""
    found: dict[int, object] = {}
    stack = [getattr(m, "config", None) for m in model.modules()]
    while stack:
        config = stack.pop()
        if id(config) in found or not hasattr(config, "_attn_implementation_internal"):
            continue
        found[id(config)] = config
        stack.extend(getattr(config, key, None) for key in getattr(config, "sub_configs", {}))
    return [(c, c._attn_implementation_internal) for c in found.values()]
