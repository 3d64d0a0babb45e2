"""Crash-safe training checkpoints: ``<output_dir>/checkpoints/step-<N>/``.

A checkpoint directory holds

* ``model.safetensors``: the policy weights (shared tensors stored once);
* ``optimizer.pt``: the optimizer's ``state_dict`` (read back with ``weights_only=True``);
* ``rng.safetensors``: the torch CPU (and CUDA) generator states;
* ``checkpoint.json``: everything else (position in the data order, trainer config, counters,
  scheduler state, Python and numpy generator states, rlox version). It is written last and
  marks the checkpoint complete.

Checkpoints are written into a hidden temporary directory next to their final place, every file
is fsynced, and the directory is renamed into place, so a crash mid-write leaves the previous
checkpoints intact and never a directory that :func:`latest_checkpoint` would pick. Loading runs
no pickled code.

Sharded models (FSDP2 ``fully_shard``, whose parameters are DTensors) are saved as full tensors:
every rank takes part in gathering the weights and optimizer state
(``torch.distributed.checkpoint.state_dict`` with ``full_state_dict=True, cpu_offload=True``),
rank 0 writes the same files as for an unsharded model, and loading gives every rank its shards.
The optimizer state of an unsharded model is its ``state_dict()``, keyed by parameter index; that
of a sharded model is keyed by parameter name (fully qualified, as in ``named_parameters()``).
``checkpoint.json`` names the one used (``"optimizer_keys"``: ``"index"`` or ``"name"``) and
loading reads either into either kind of model.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "CHECKPOINTS",
    "MARKER",
    "capture_rng",
    "full_state",
    "full_tensor",
    "is_sharded",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_optimizer_state",
    "load_weights",
    "optimizer_keys",
    "restore_rng",
    "save_checkpoint",
    "save_weights",
]

CHECKPOINTS = "checkpoints"
MARKER = "checkpoint.json"
FORMAT = "rlox-checkpoint"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".tmp-"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _dist() -> Any:
    dist = torch.distributed
    return dist if dist.is_available() and dist.is_initialized() else None


def _dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is a DTensor (FSDP2 ``fully_shard``, tensor parallel)."""
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(p, dtensor) for p in module.parameters())


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or the whole tensor of a DTensor (a collective: every rank must call it)."""
    dtensor = _dtensor_type()
    return t.full_tensor() if dtensor is not None and isinstance(t, dtensor) else t


def _tied_names(module: nn.Module) -> list[list[str]]:
    """Groups (sorted) of state-dict names that share one tensor, e.g. tied embeddings."""
    names = set(module.state_dict(keep_vars=True))
    groups: dict[int, list[str]] = {}
    named = [*module.named_parameters(remove_duplicate=False)]
    named += module.named_buffers(remove_duplicate=False)
    for name, t in named:
        if name in names:
            groups.setdefault(id(t), []).append(name)
    return [sorted(g) for g in groups.values() if len(g) > 1]


def _param_names(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter of ``optimizer``, in the order of its ``state_dict`` indices."""
    names: dict[int, str] = {}
    for name, p in module.named_parameters():
        names.setdefault(id(p), name)
    order = [p for g in optimizer.param_groups for p in g["params"]]
    missing = [i for i, p in enumerate(order) if id(p) not in names]
    if missing:
        raise ValueError(
            f"optimizer: parameter {missing[0]} of the optimizer is not a parameter of the model"
        )
    return [names[id(p)] for p in order]


def optimizer_keys(state: Mapping[str, Any]) -> str:
    """``"name"`` when an optimizer ``state_dict`` is keyed by parameter name, else ``"index"``."""
    keys = list(state.get("state", {})) or [
        p for g in state.get("param_groups", []) for p in g["params"]
    ]
    return "name" if keys and isinstance(keys[0], str) else "index"


def _rekey(state: Mapping[str, Any], mapping: Mapping[Any, Any]) -> dict[str, Any]:
    try:
        return {
            "state": {mapping[k]: v for k, v in state["state"].items()},
            "param_groups": [
                dict(g, params=[mapping[p] for p in g["params"]]) for g in state["param_groups"]
            ],
        }
    except KeyError as e:
        raise ValueError(
            f"optimizer: the saved state names parameter {e} the model lacks"
        ) from None


def full_state(
    module: nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The full weights and optimizer state (keyed by name) of a sharded ``module``, on the CPU.

    A collective: every rank must call it; rank 0 gets the state, the other ranks empty dicts.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(module, options=options)
    optim: dict[str, Any] = {}
    if optimizer is not None:
        if optimizer.state:
            optim = get_optimizer_state_dict(module, optimizer, options=options)
        elif _dist() is None or torch.distributed.get_rank() == 0:
            # Nothing to gather; get_optimizer_state_dict would initialise the state by a step.
            optim = _rekey(optimizer.state_dict(), dict(enumerate(_param_names(module, optimizer))))
    return weights, optim


def save_weights(
    module: nn.Module,
    filename: str | os.PathLike[str],
    weights: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Write ``module``'s weights as safetensors, tensors shared under several names stored once.

    ``weights``: the full state dict of a sharded ``module`` (from :func:`full_state`); the file
    is then the one ``safetensors.torch.save_model`` writes for the unsharded model.
    """
    from safetensors.torch import save_file, save_model

    if weights is None:
        save_model(module, str(filename))
        return
    tensors = dict(weights)
    metadata: dict[str, str] = {}
    for group in _tied_names(module):
        for name in group[1:]:
            metadata[name] = group[0]
            tensors.pop(name, None)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(filename), metadata=metadata or None)


def load_weights(module: nn.Module, filename: str | os.PathLike[str]) -> None:
    """Load a file of :func:`save_weights` into ``module`` (strict).

    A sharded ``module`` is a collective: every rank reads the file and keeps its shards.
    """
    from safetensors.torch import load_file, load_model

    if not is_sharded(module):
        load_model(module, str(filename))
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    weights = load_file(str(filename))
    for group in _tied_names(module):
        present = [n for n in group if n in weights]
        for name in group:
            if present and name not in weights:
                weights[name] = weights[present[0]]
    set_model_state_dict(module, weights, options=StateDictOptions(full_state_dict=True))


def load_optimizer_state(
    module: nn.Module | None, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]
) -> None:
    """Load an optimizer ``state_dict`` keyed by index or by name (see :func:`optimizer_keys`).

    ``module`` is needed to map names to parameters; a sharded ``module`` is a collective: the
    full state is given on every rank and each keeps its shards.
    """
    by_name = optimizer_keys(state) == "name"
    if module is None:
        if by_name:
            raise ValueError("model: an optimizer state keyed by name needs the model")
        optimizer.load_state_dict(state)
        return
    if not is_sharded(module) or not state["state"]:
        if by_name:
            names = _param_names(module, optimizer)
            state = _rekey(state, {n: i for i, n in enumerate(names)})
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    if not by_name:
        state = _rekey(state, dict(enumerate(_param_names(module, optimizer))))
    if len(state["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(
            f"optimizer: the saved state has {len(state['param_groups'])} parameter groups, "
            f"the optimizer {len(optimizer.param_groups)}"
        )
    options = [{k: v for k, v in g.items() if k != "params"} for g in state["param_groups"]]
    # set_optimizer_state_dict fails on group options the optimizer lacks (a scheduler's
    # initial_lr), and turns tuples (Adam's betas) into lists: set the saved ones before and after.
    for group, saved in zip(optimizer.param_groups, options, strict=True):
        group.update(saved)
    set_optimizer_state_dict(
        module,
        optimizer,
        dict(state),
        options=StateDictOptions(full_state_dict=True, strict=False),
    )
    for group, saved in zip(optimizer.param_groups, options, strict=True):
        group.update(saved)


def _all_agree(failed: bool, module: nn.Module) -> bool:
    """Whether no rank ``failed`` (a collective)."""
    dist = _dist()
    if dist is None:
        return not failed
    p = next(iter(module.parameters()), None)
    device = torch.device("cpu") if p is None else p.device
    flag = torch.tensor([float(failed)], device=device)
    dist.all_reduce(flag)
    return float(flag.item()) == 0.0


def capture_rng() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The global generator states: (JSON-able Python/numpy states, torch CPU/CUDA state tensors)."""
    version, keys, gauss = random.getstate()
    name, np_keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    plain = {
        "python": [version, list(keys), gauss],
        "numpy": [name, np_keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    return plain, tensors


def restore_rng(plain: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """Set the global generators to states captured by :func:`capture_rng`."""
    version, keys, gauss = plain["python"]
    random.setstate((version, tuple(keys), gauss))
    name, np_keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.asarray(np_keys, dtype=np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def list_checkpoints(output_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints under ``output_dir/checkpoints``, oldest step first.

    A directory counts only when it is named ``step-<N>`` and holds its ``checkpoint.json``
    marker; temporary directories of an interrupted write are never listed.
    """
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir() and (child / MARKER).is_file():
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    """The complete checkpoint with the highest step under ``output_dir``, or None."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def save_checkpoint(
    output_dir: str | os.PathLike[str],
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: Mapping[str, Any],
    keep: int | None = None,
    collective: bool | None = None,
) -> Path | None:
    """Atomically write ``output_dir/checkpoints/step-<step>/``; return its path.

    ``state`` is any JSON-able mapping (stored in ``checkpoint.json`` with the generator states).
    An existing checkpoint of the same step is replaced, and checkpoints of later steps (left by
    the run that a resumed run branched off from) are removed, so the highest step is always the
    newest state. With ``keep``, only the ``keep`` newest complete checkpoints are kept afterwards.

    ``collective`` (always so for a sharded ``model``): every rank of the initialised process
    group calls this; the full state is gathered, rank 0 alone writes and the ranks wait for it.
    A failed write then raises on every rank, and the other ranks return None.
    """
    sharded = is_sharded(model)
    dist = _dist()
    collective = dist is not None and (sharded or bool(collective))
    writer = not collective or dist.get_rank() == 0
    weights: dict[str, torch.Tensor] | None = None
    optim: Mapping[str, Any] = {}
    if sharded:
        weights, optim = full_state(model, optimizer)
    elif writer:
        optim = optimizer.state_dict()
    final: Path | None = None
    error: Exception | None = None
    if writer:
        try:
            final = _write_checkpoint(output_dir, step, model, weights, optim, state)
            found = list_checkpoints(output_dir)
            later = [p for p in found if int(_STEP_DIR.match(p.name).group(1)) > step]
            found = found[: len(found) - len(later)]
            stale = found[:-keep] if keep is not None and keep > 0 else []
            for path in [*later, *stale]:
                shutil.rmtree(path, ignore_errors=True)
        except Exception as e:
            if not collective:
                raise
            error = e
    if collective and not _all_agree(error is not None, model):
        if error is not None:
            raise error
        raise RuntimeError(f"checkpoint: rank 0 failed to write step-{step} (see its error)")
    return final


def _write_checkpoint(
    output_dir: str | os.PathLike[str],
    step: int,
    model: nn.Module,
    weights: Mapping[str, torch.Tensor] | None,
    optim: Mapping[str, Any],
    state: Mapping[str, Any],
) -> Path:
    from safetensors.torch import save_file

    root = Path(output_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f"{_TMP_PREFIX}step-{step}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_weights(model, tmp / "model.safetensors", weights)
        with open(tmp / "optimizer.pt", "wb") as f:
            torch.save(optim, f)
        plain_rng, tensor_rng = capture_rng()
        save_file({k: v.contiguous() for k, v in tensor_rng.items()}, str(tmp / "rng.safetensors"))
        meta = {
            "format": FORMAT,
            "step": int(step),
            "rng": plain_rng,
            "optimizer_keys": optimizer_keys(optim),
            **state,
        }
        (tmp / MARKER).write_text(json.dumps(meta, indent=1, allow_nan=True))
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        old = None
        if final.exists():
            old = root / f"{_TMP_PREFIX}old-{step}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def remove_partial(output_dir: str | os.PathLike[str]) -> None:
    """Delete temporary directories left by interrupted checkpoint writes."""
    root = Path(output_dir) / CHECKPOINTS
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(_TMP_PREFIX) and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    rng: bool = True,
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; return its ``checkpoint.json``.

    Loads the weights into ``model`` and the state into ``optimizer`` when given, and restores
    the global generators when ``rng``. No pickled code is run. With a sharded ``model`` every
    rank must call it: each reads the full state and keeps its shards.
    """
    from safetensors.torch import load_file

    path = Path(path)
    marker = path / MARKER
    if not marker.is_file():
        raise ValueError(
            f"resume_from: {path} is not a complete rlox checkpoint ({MARKER} missing)"
        )
    meta = json.loads(marker.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"resume_from: {marker} is not an rlox checkpoint")
    if model is not None:
        load_weights(model, path / "model.safetensors")
    if optimizer is not None:
        optim = torch.load(path / "optimizer.pt", weights_only=True)
        load_optimizer_state(model, optimizer, optim)
    if rng:
        restore_rng(meta["rng"], load_file(str(path / "rng.safetensors")))
    return meta
