"""Hugging Face causal LMs for rlox: load a local model directory, train it, save it back.

``load_pretrained`` reads a model directory written by ``save_pretrained`` (of transformers or of
this module) from the local disk only, optionally wrapping the model with LoRA adapters (peft).
``save_pretrained`` writes the trained policy back in the same format (safetensors), merging LoRA
adapters into the base weights when asked. ``frozen_copy`` makes the frozen reference of a model
trained without adapters.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["frozen_copy", "is_peft_model", "load_pretrained", "save_pretrained"]

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
)
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ImportError(
            "rlox.hf needs the transformers package (pip install 'rlox[hf]' or pip install transformers)"
        ) from None
    return transformers


def _peft(option: str) -> Any:
    try:
        import peft
    except ImportError:
        raise ImportError(
            f"{option}: LoRA needs the peft package (pip install 'rlox[peft]' or pip install peft)"
        ) from None
    return peft


def _resolve_dtype(dtype: Any) -> torch.dtype | str:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        name = dtype.lower().removeprefix("torch.")
        if name == "auto":
            return "auto"
        if name in _DTYPES:
            return _DTYPES[name]
    raise ValueError(
        f"dtype: expected a torch floating dtype, one of {sorted(_DTYPES)} or 'auto', got {dtype!r}"
    )


def _dtype_kwarg(dtype: torch.dtype | str) -> dict[str, Any]:
    """``dtype=`` for transformers >= 4.56, ``torch_dtype=`` before."""
    version = _transformers().__version__.split(".")
    try:
        new = (int(version[0]), int(version[1])) >= (4, 56)
    except (ValueError, IndexError):
        new = True
    return {"dtype" if new else "torch_dtype": dtype}


def _model_dir(path: str | os.PathLike[str], option: str = "path") -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        kind = "a file" if p.exists() else "not found"
        raise ValueError(f"{option}: {p} is {kind}; expected a local model directory")
    return p.resolve()


def _has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in _TOKENIZER_FILES)


def _lora_config(lora: Any) -> Any:
    peft = _peft("lora")
    if isinstance(lora, peft.LoraConfig):
        return lora
    if not isinstance(lora, Mapping):
        raise TypeError(
            f"lora: expected a dict of peft.LoraConfig options or a LoraConfig, got {type(lora).__name__}"
        )
    options = {"task_type": "CAUSAL_LM", **lora}
    try:
        return peft.LoraConfig(**options)
    except (TypeError, ValueError) as e:
        raise ValueError(f"lora: {e}") from None


def is_peft_model(model: Any) -> bool:
    """Whether ``model`` is a peft ``PeftModel`` (LoRA or another adapter method)."""
    try:
        import peft
    except ImportError:
        return False
    return isinstance(model, peft.PeftModel)


def load_pretrained(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    lora: Mapping[str, Any] | Any | None = None,
) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer from a local directory (nothing is downloaded).

    Args:
        path: a directory written by ``save_pretrained`` (``config.json`` and safetensors weights,
            plus the tokenizer files). A directory of LoRA adapters written by
            :func:`save_pretrained` without ``merge_lora`` (``adapter_config.json``) is loaded onto
            its base model, whose directory is named in that file, with the adapters trainable.
        dtype: weight dtype: a ``torch.dtype`` or its name (``"bfloat16"``, ``"bf16"``, ...), or
            ``"auto"`` for the dtype stored in the checkpoint. ``None``: float32, the usual
            dtype of trained weights (mixed precision then runs under autocast).
        device: where to put the model (``None``: stays on the CPU).
        lora: wrap the model with new LoRA adapters: a dict of ``peft.LoraConfig`` options
            (``task_type`` defaults to ``"CAUSAL_LM"``; ``target_modules`` to peft's choice for
            the architecture) or a ready ``LoraConfig``. Only the adapters are then trainable.

    Returns:
        ``(model, tokenizer)``; ``tokenizer`` is None when the directory holds no tokenizer files.

    Raises:
        ValueError naming ``path`` (not a directory, no model in it), ``dtype`` or ``lora``;
        ImportError naming ``lora`` when peft is not installed.
    """
    transformers = _transformers()
    root = _model_dir(path)
    torch_dtype = _resolve_dtype(dtype)
    adapter_file = root / "adapter_config.json"
    if adapter_file.is_file():
        if lora is not None:
            raise ValueError(
                f"lora: {root} already holds LoRA adapters; load it without lora= to train them"
            )
        peft = _peft("path")
        try:
            base_name = json.loads(adapter_file.read_text())["base_model_name_or_path"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(
                f"path: {adapter_file} does not name its base model (base_model_name_or_path)"
            ) from None
        base_dir = Path(str(base_name)).expanduser()
        if not base_dir.is_absolute():
            base_dir = root / base_dir
        if not base_dir.is_dir():
            raise ValueError(
                f"path: the adapters in {root} need their base model directory {base_dir}, "
                "which does not exist"
            )
        base = _load_model(transformers, base_dir.resolve(), torch_dtype)
        model = peft.PeftModel.from_pretrained(base, str(root), is_trainable=True)
        tok_dir = root if _has_tokenizer(root) else base_dir
    else:
        if not (root / "config.json").is_file():
            raise ValueError(f"path: {root} holds no model (config.json missing)")
        model = _load_model(transformers, root, torch_dtype)
        if lora is not None:
            config = _lora_config(lora)
            peft = _peft("lora")
            try:
                model = peft.get_peft_model(model, config)
            except ValueError as e:
                raise ValueError(f"lora: {e}") from None
        tok_dir = root
    tokenizer = None
    if _has_tokenizer(tok_dir):
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    if device is not None:
        model = model.to(device)
    return model, tokenizer


def _load_model(transformers: Any, root: Path, dtype: torch.dtype | str) -> nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(root), local_files_only=True, **_dtype_kwarg(dtype)
    )


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen deep copy of ``model`` (eval mode, ``requires_grad=False``): the DPO reference.

    A peft model needs no copy: its reference is the same network with the adapters disabled,
    which ``DPO`` runs when given ``ref_model=None``; a ``ValueError`` says so.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if is_peft_model(model):
        raise ValueError(
            "model: a peft model needs no frozen copy; its reference is the base model with the "
            "adapters disabled (pass ref_model=None)"
        )
    ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    return ref


def save_pretrained(
    model: nn.Module,
    path: str | os.PathLike[str],
    tokenizer: Any = None,
    *,
    merge_lora: bool = False,
) -> Path:
    """Save ``model`` (and ``tokenizer``) to directory ``path`` in the Hugging Face format.

    The weights are written as safetensors with ``config.json``, so :func:`load_pretrained` or
    ``AutoModelForCausalLM.from_pretrained`` reads them back. For a peft model:

    - ``merge_lora=False`` writes the adapters only (``adapter_config.json`` and
      ``adapter_model.safetensors``); loading them needs the base model directory they name.
    - ``merge_lora=True`` writes a plain model whose weights are the base weights with the LoRA
      updates added. ``model`` itself is left unchanged and keeps training as before. An update
      to a weight tied to another one (an embedding shared with the LM head) changes both, as
      peft's own merge does; a ``UserWarning`` says so.

    Returns the directory.
    """
    if not isinstance(model, nn.Module) or not callable(getattr(model, "save_pretrained", None)):
        raise TypeError(
            f"model: expected a transformers or peft model with save_pretrained, got {type(model).__name__}"
        )
    if not isinstance(merge_lora, bool):
        raise TypeError(f"merge_lora: expected a bool, got {type(merge_lora).__name__}")
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"path: {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    if is_peft_model(model):
        if merge_lora:
            _save_merged(model, out)
        else:
            model.save_pretrained(str(out))
    else:
        if merge_lora:
            raise ValueError("merge_lora: the model has no LoRA adapters to merge")
        model.save_pretrained(str(out))
    if tokenizer is not None:
        _save_tokenizer(tokenizer, out)
    return out


def _save_tokenizer(tokenizer: Any, out: Path) -> None:
    import tokenizers

    if isinstance(tokenizer, tokenizers.Tokenizer):
        tokenizer = _transformers().PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    if not callable(getattr(tokenizer, "save_pretrained", None)):
        raise TypeError(
            f"tokenizer: expected a transformers tokenizer or a tokenizers.Tokenizer, got {type(tokenizer).__name__}"
        )
    tokenizer.save_pretrained(str(out))


def _save_merged(model: Any, out: Path) -> None:
    """Write the base model with the active LoRA updates added, leaving ``model`` untouched."""
    base = model.get_base_model()
    state = _merged_state_dict(model)
    if state is None:
        # Adapters this module does not merge by itself (DoRA and other variants, quantized
        # layers, other tuners): let peft merge a copy.
        if not callable(getattr(model, "merge_and_unload", None)):
            raise ValueError(
                f"merge_lora: {type(model.peft_config[model.active_adapter]).__name__} adapters "
                "cannot be merged into the base weights"
            )
        merged = copy.deepcopy(model).merge_and_unload()
        merged.save_pretrained(str(out))
        return
    base.save_pretrained(str(out), state_dict=state)


def _merged_state_dict(model: Any) -> dict[str, torch.Tensor] | None:
    """Plain state dict of the merged model, or None where only peft can merge."""
    from peft.tuners.lora import layer as lora_layer
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = model.get_base_model()
    active = list(getattr(model, "active_adapters", None) or [model.active_adapter])
    if any(getattr(model.peft_config[a], "peft_type", None) != "LORA" for a in active):
        return None
    deltas: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        if type(module) not in (lora_layer.Linear, lora_layer.Embedding):
            return None
        if any(getattr(module, "lora_variant", {}).get(a) is not None for a in active):
            return None
        if any(getattr(module, "use_dora", {}).get(a, False) for a in active):
            return None
        weight = module.get_base_layer().weight
        if not isinstance(weight, nn.Parameter) or not weight.dtype.is_floating_point:
            return None
        names = [a for a in active if a in module.lora_A or a in module.lora_embedding_A]
        if names:
            with torch.no_grad():
                delta = sum(module.get_delta_weight(a) for a in names)
            deltas[f"{name}.base_layer.weight" if name else "base_layer.weight"] = delta
    if any(_is_aux_wrapper(m) for m in base.modules()):
        return None
    full = base.state_dict()
    # A weight shared with another entry (tied embeddings) is merged by peft, in place.
    pointers = {full[key].data_ptr(): key for key in deltas}
    for key, value in full.items():
        if key not in deltas and value.data_ptr() in pointers:
            warnings.warn(
                f"merge_lora: {pointers[value.data_ptr()].replace('.base_layer', '')} is tied to "
                f"{key}; merging its LoRA update changes both, so the merged model's outputs "
                "differ from the adapted model's",
                UserWarning,
                stacklevel=4,
            )
            return None
    state: dict[str, torch.Tensor] = {}
    for key, value in full.items():
        if "lora_" in key:
            continue
        if key in deltas:
            value = (value + deltas[key].to(value.device, value.dtype)).contiguous()
        state[key.replace(".base_layer.", ".").removeprefix("base_layer.")] = value
    return state


def _is_aux_wrapper(module: nn.Module) -> bool:
    """peft's modules_to_save / trainable-token wrappers (merged by peft only)."""
    try:
        from peft.utils.other import AuxiliaryTrainingWrapper
    except ImportError:  # older peft
        from peft.utils.other import ModulesToSaveWrapper as AuxiliaryTrainingWrapper
    return isinstance(module, AuxiliaryTrainingWrapper)
