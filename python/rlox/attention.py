"""How a forward attends in each batch layout: the attention route and its keywords.

Routes (``attention=`` of :class:`rlox.DPO`): ``"dense"`` passes the (R, 1, L, L) mask of
:func:`rlox.data.dense_attention_mask` in the form the model's attention reads it (boolean for
``"sdpa"``; additive float for ``"eager"``, which *adds* the mask to the scores), windowed per
layer type where the model has sliding-window layers; ``"eager"`` is that dense route on the
model's own eager attention (which applies score softcapping and attention sinks with the mask);
``"varlen"`` runs sdpa per attention segment (:mod:`rlox.attention_varlen`); ``"flex"`` passes a
FlexAttention ``BlockMask`` (``rlox.attention_flex``). ``"auto"`` tries :func:`candidate_routes`
in order and keeps the first that the route probe (:mod:`rlox.train.probe`) finds exact on the
model at hand. The ``padded`` layout passes its (R, L) padding mask (route ``"padded"``), or the
dense mask where the model's own padding handling is not exact.

ALiBi models that build their biases from a 2-D mask (``build_alibi_tensor``, BLOOM) get biases
from the batch's ``position_ids`` in packed and prefix-shared rows.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rlox.attention_varlen import IMPLEMENTATION as VARLEN_IMPLEMENTATION
from rlox.attention_varlen import PlanUse, VarlenPlan, register, segment_masks_off
from rlox.batch import PairBatch

__all__ = [
    "ATTENTION",
    "ForwardKeywords",
    "RouteRun",
    "attention_mask",
    "attention_route",
    "attn_implementation",
    "candidate_routes",
    "check_attention",
    "checkpointing",
    "forward_keywords",
    "inner_model",
    "model_keywords",
    "plain_implementation",
    "route_context",
]

ATTENTION = ("auto", "flex", "varlen", "dense", "eager")
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


def _config(model: nn.Module) -> object:
    return getattr(inner_model(model), "config", None)


def _windows(model: nn.Module) -> dict[str, int | None] | None:
    """Sliding window of each attention layer type of ``model`` (None: full attention), or None
    where every layer attends in full (no window to apply)."""
    config = _config(model)
    window = getattr(config, "sliding_window", None)
    window = window if isinstance(window, int) and window > 0 else None
    types = getattr(config, "layer_types", None)
    if isinstance(types, list | tuple) and types:
        found = {t: (window if "sliding" in str(t) else None) for t in types}
        return found if any(w is not None for w in found.values()) else None
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return None
    return {"sliding_attention": window}


def _windowed(batch: PairBatch, visible: Tensor, window: int) -> Tensor:
    """``visible`` (R, 1, L, L) within ``window`` tokens by position (keys at most window - 1
    positions before the query, as each sequence alone sees them)."""
    pos = batch.position_ids.to(visible.device)
    return visible & ((pos[:, :, None] - pos[:, None, :]) < window)[:, None]


def _mask_form(impl: str | None, model: nn.Module, visible: Tensor) -> Tensor:
    if impl == "eager":
        dtype = _float_dtype(model)
        return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(
            ~visible, torch.finfo(dtype).min
        )
    return visible


def attention_mask(
    model: nn.Module, batch: PairBatch, dense: bool = False
) -> Tensor | dict[str, Tensor]:
    """The ``attention_mask`` keyword for running ``model`` on ``batch``.

    - ``"padded"`` layout (unless ``dense``): ``batch.attention_mask``, (R, L) 0/1; every
      implementation builds its own causal mask from it.
    - otherwise the (R, 1, L, L) visibility of :func:`rlox.data.dense_attention_mask`:
      boolean (True = may attend) for ``"sdpa"`` (and ``"rlox_varlen"``, which is sdpa when
      given no segments) and for modules that are not Hugging Face models
      (``rlox.models.TinyCausalLM``, user modules); for ``"eager"`` additive in the model's
      floating dtype, 0 where visible and ``finfo(dtype).min`` elsewhere. Every query row sees
      at least itself, so no row is fully masked. A model with sliding-window layers gets each
      layer type's mask in a dict (``{"full_attention": ..., "sliding_attention": ...}``, the
      form Hugging Face models with ``layer_types`` take), or one windowed mask where every
      layer slides.

    Raises ``TypeError`` for any other implementation (``flex_attention``, flash attention,
    kernels-hub names, unknown names), naming the layout and the implementation.
    """
    if batch.layout == "padded" and not dense:
        return batch.attention_mask
    impl = attn_implementation(model)
    if impl not in (None, "sdpa", "eager", VARLEN_IMPLEMENTATION):
        raise TypeError(
            f"model: the {batch.layout} layout needs attn_implementation 'sdpa' or 'eager'; this "
            f"model uses {impl!r} (load it with attn_implementation='sdpa', call "
            "model.set_attn_implementation('sdpa'), or use layout='padded')"
        )
    visible = batch.dense_attention_mask()
    windows = _windows(model) if impl is not None else None
    if windows is None:
        return _mask_form(impl, model, visible)
    if len(set(windows.values())) == 1:
        (window,) = set(windows.values())
        return _mask_form(impl, model, _windowed(batch, visible, window))
    return {
        name: _mask_form(impl, model, visible if w is None else _windowed(batch, visible, w))
        for name, w in windows.items()
    }


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


def _can_varlen(inner: nn.Module, accepted: frozenset[str]) -> bool:
    if attn_implementation(inner) is not None:
        return _hf_switchable(inner)
    return "attn_segments" in accepted


def candidate_routes(model: nn.Module, layout: str, accepted: frozenset[str]) -> list[str]:
    """The routes to try for ``layout``, in order of preference (see the module doc).

    ``"padded"``: ``["padded", "dense"]``. Other layouts with ``accepted.attention`` ``"auto"``:
    ``"flex"`` (CUDA and ``_supports_flex_attn``), ``"varlen"`` (Hugging Face models using
    ``AttentionInterface``, forwards taking ``attn_segments``), ``"dense"`` (the model's own
    sdpa or eager attention), ``"eager"`` (a Hugging Face model switched to eager attention).
    An explicit route is the only candidate; ``ValueError`` (naming ``attention``) when it
    cannot run on ``model`` at all.
    """
    if layout == "padded":
        return ["padded", "dense"]
    asked = getattr(accepted, "attention", "auto")
    inner = inner_model(model)
    impl = attn_implementation(inner)
    hf = impl is not None
    if asked == "auto":
        routes = []
        if _device(inner).type == "cuda" and _supports_flex(inner, hf):
            routes.append("flex")
        if _can_varlen(inner, accepted):
            routes.append("varlen")
        if impl in (None, "sdpa", "eager", VARLEN_IMPLEMENTATION):
            routes.append("dense")
        if hf and impl != "eager" and _hf_switchable(inner):
            routes.append("eager")
        return routes
    if asked == "flex":
        _check_flex_device(inner)
        if not _supports_flex(inner, hf):
            raise ValueError(
                f"attention: {type(inner).__name__} has no FlexAttention path (or "
                "rlox.attention_flex is missing); use 'varlen', 'dense' or 'auto'"
            )
    elif asked == "varlen" and not _can_varlen(inner, accepted):
        raise ValueError(
            f"attention: 'varlen' needs a Hugging Face model using AttentionInterface or a "
            f"forward taking attn_segments; {type(inner).__name__} has neither"
        )
    elif asked == "eager" and not (hf and (impl == "eager" or _hf_switchable(inner))):
        raise ValueError(
            f"attention: 'eager' needs a Hugging Face model that can switch to eager attention; "
            f"{type(inner).__name__} cannot"
        )
    return [asked]


def attention_route(model: nn.Module, batch: PairBatch, accepted: frozenset[str]) -> str:
    """The first of :func:`candidate_routes` for ``batch`` that can run on it (no probe).

    ``"varlen"`` needs a batch with ``attn_segments`` (``ValueError`` when asked for one
    without; ``"auto"`` then moves on).
    """
    routes = candidate_routes(model, batch.layout, accepted)
    segments = getattr(batch, "attn_segments", None) is not None
    if routes == ["varlen"] and not segments:
        raise ValueError("attention: 'varlen' needs a batch with attn_segments")
    usable = [r for r in routes if r != "varlen" or segments]
    if not usable:
        raise ValueError(
            f"attention: no route can run {type(inner_model(model)).__name__} in the "
            f"{batch.layout} layout"
        )
    return usable[0]


def forward_keywords(
    model: nn.Module, batch: PairBatch, accepted: frozenset[str], route: str | None = None
) -> dict[str, object]:
    """The attention keywords (``attention_mask`` or ``attn_segments``) of ``route``.

    ``route`` defaults to :func:`attention_route`. ``"varlen"`` passes a
    :class:`~rlox.attention_varlen.VarlenPlan` as ``attn_segments`` and no mask; ``"flex"`` a
    ``BlockMask`` as ``attention_mask``; the others :func:`attention_mask` (``"dense"`` and
    ``"eager"`` the 4-D form in every layout).
    """
    route = route or attention_route(model, batch, accepted)
    if route == "varlen":
        rows, length = batch.input_ids.shape
        plan = VarlenPlan(batch.attn_segments, rows, length, batch.input_ids.device)
        return {"attn_segments": plan}
    if route == "flex":
        from rlox.attention_flex import block_mask

        return {"attention_mask": block_mask(batch)}
    if "attention_mask" not in accepted:
        return {}
    return {"attention_mask": attention_mask(model, batch, dense=route in ("dense", "eager"))}


@dataclass
class RouteRun:
    """The route a forward runs by; ``plan_use`` counts its varlen attention calls."""

    route: str
    plan_use: PlanUse | None = None


_SWITCH = {"varlen": VARLEN_IMPLEMENTATION, "flex": "flex_attention", "eager": "eager"}


@contextlib.contextmanager
def route_context(
    model: nn.Module, batch: PairBatch, accepted: frozenset[str], route: str | None = None
) -> Iterator[RouteRun]:
    """Run a forward of ``model`` on ``batch`` by ``route`` (default :func:`attention_route`).

    A Hugging Face model runs with ``attn_implementation`` ``"rlox_varlen"`` (``"varlen"``),
    ``"flex_attention"`` (``"flex"``) or ``"eager"`` (``"eager"``) inside the block, and gets its
    own back afterwards, except under gradient checkpointing, whose backward runs the forward
    again (``"rlox_varlen"`` without segments is sdpa, eager is exact, so they stay
    harmlessly). ALiBi biases come
    from ``position_ids`` in packed and prefix-shared rows. Each route is logged once per
    :class:`ForwardKeywords` (logger ``rlox``, ``attention: varlen``).
    """
    route = route or attention_route(model, batch, accepted)
    logged = getattr(accepted, "logged", None)
    if logged is not None and route not in logged:
        logged.add(route)
        _LOG.info("attention: %s", route)
    inner = inner_model(model)
    run = RouteRun(route)
    wanted = _SWITCH.get(route) if attn_implementation(inner) is not None else None
    before = None
    if wanted is not None:
        if route == "varlen":
            register()
        if inner.config._attn_implementation != wanted:
            before = _implementations(inner)
            inner.set_attn_implementation(wanted)
    try:
        with contextlib.ExitStack() as stack:
            if batch.layout != "padded":
                stack.enter_context(alibi_positions(inner, batch.position_ids))
            if route == "varlen" and wanted is not None:
                rows, length = batch.input_ids.shape
                plan = VarlenPlan(batch.attn_segments, rows, length, batch.input_ids.device)
                run.plan_use = stack.enter_context(segment_masks_off(plan))
            yield run
    finally:
        if before is not None and not checkpointing(inner):
            _restore(before)


@contextlib.contextmanager
def alibi_positions(model: nn.Module, position_ids: Tensor) -> Iterator[None]:
    """ALiBi biases from ``position_ids`` for modules with ``build_alibi_tensor(mask, heads,
    dtype)`` (BLOOM), which would read positions from a 2-D mask.

    The model's own method, given an all-ones mask, yields each head's slope (its bias at
    position 1); the bias of a key is then slope * its position in its sequence. Softmax
    ignores a per-query constant, so these biases equal each sequence's own.
    """
    patched = []
    for module in _alibi_modules(model):
        own = type(module).build_alibi_tensor
        if "build_alibi_tensor" not in vars(module):

            def build(mask, num_heads, dtype, _module=module, _own=own):  # noqa: ANN001, ANN202
                rows, length = position_ids.shape
                ones = torch.ones(
                    rows, max(length, 2), dtype=torch.long, device=position_ids.device
                )
                slopes = _own(_module, ones, num_heads, torch.float32).view(rows, num_heads, -1)
                bias = slopes[:, :, 1:2] * position_ids[:, None, :].float()
                return bias.reshape(rows * num_heads, 1, length).to(dtype)

            module.build_alibi_tensor = build
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.build_alibi_tensor


def _alibi_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` with a ``build_alibi_tensor`` method, found once per model."""
    found = model.__dict__.get("_rlox_alibi_modules")
    if found is None:
        found = [
            m for m in model.modules() if callable(getattr(type(m), "build_alibi_tensor", None))
        ]
        model.__dict__["_rlox_alibi_modules"] = found
    return found


@contextlib.contextmanager
def plain_implementation(model: nn.Module) -> Iterator[None]:
    """Run a Hugging Face model whose implementation is not ``"eager"``, ``"sdpa"`` or
    ``"rlox_varlen"`` (flash, flex, kernels-hub, unknown names) on eager attention inside the
    block: the plain computation those implementations are meant to equal, on any device."""
    inner = inner_model(model)
    impl = attn_implementation(inner)
    if impl is None or impl in ("eager", "sdpa", VARLEN_IMPLEMENTATION):
        yield
        return
    before = _implementations(inner)
    for config, _ in before:
        config._attn_implementation_internal = "eager"
    try:
        yield
    finally:
        _restore(before)


def _restore(before: list[tuple[object, object]]) -> None:
    """Put back the implementations :func:`_implementations` recorded."""
    for config, value in before:
        config._attn_implementation_internal = value  # type: ignore[attr-defined]


def checkpointing(model: nn.Module) -> bool:
    """Whether ``model`` (through DDP and peft wrappers) recomputes its forward in the backward:
    a Hugging Face model's activation checkpointing, ``TinyCausalLM.gradient_checkpointing``."""
    inner = inner_model(model)
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(inner), name):
            return bool(getattr(inner, name))
    return bool(getattr(inner, "gradient_checkpointing", False))


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
