"""The ``attention_mask`` a batch layout needs, in the form the model's attention reads it.

The ``packed`` and ``prefix_shared`` layouts need a 4-D mask
(:func:`rlox.data.dense_attention_mask`). Hugging Face models pass a 4-D mask to their attention
implementation unchanged, and each reads it differently: ``"sdpa"`` takes a boolean mask;
``"eager"`` *adds* the mask to the scores, so it needs an additive float mask (a boolean one is
added as +1/+0 and masks nothing).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rlox.batch import PairBatch

__all__ = ["attention_mask", "attn_implementation"]

_NOT_HF = object()


def attn_implementation(model: nn.Module) -> str | None:
    """``model.config._attn_implementation`` of a Hugging Face model, else None.

    Looks through ``DistributedDataParallel`` (``.module``) and peft ``PeftModel``
    (``get_base_model()``). An HF config holding None means eager attention (HF's dispatch
    default). None is returned for other modules (no config, or a config without the attribute).
    """
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif callable(getattr(model, "get_base_model", None)):
            inner = model.get_base_model()
            if inner is model:
                break
            model = inner
        else:
            break
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
      boolean (True = may attend) for ``"sdpa"`` and for modules that are not Hugging Face models
      (``rlox.models.TinyCausalLM``, user modules); for ``"eager"`` additive in the model's
      floating dtype, 0 where visible and ``finfo(dtype).min`` elsewhere. Every query row sees
      at least itself, so no row is fully masked.

    Raises ``TypeError`` for any other implementation (``flex_attention``, flash attention,
    kernels-hub names, unknown names), naming the layout and the implementation.
    """
    if batch.layout == "padded":
        return batch.attention_mask
    impl = attn_implementation(model)
    if impl is None or impl == "sdpa":
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
