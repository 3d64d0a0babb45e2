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
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "restore_rng",
    "save_checkpoint",
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
) -> Path:
    """Atomically write ``output_dir/checkpoints/step-<step>/``; return its path.

    ``state`` is any JSON-able mapping (stored in ``checkpoint.json`` with the generator states).
    An existing checkpoint of the same step is replaced. With ``keep``, only the ``keep`` newest
    complete checkpoints are kept afterwards.
    """
    from safetensors.torch import save_file, save_model

    root = Path(output_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f"{_TMP_PREFIX}step-{step}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_model(model, str(tmp / "model.safetensors"))
        with open(tmp / "optimizer.pt", "wb") as f:
            torch.save(optimizer.state_dict(), f)
        plain_rng, tensor_rng = capture_rng()
        save_file({k: v.contiguous() for k, v in tensor_rng.items()}, str(tmp / "rng.safetensors"))
        meta = {"format": FORMAT, "step": int(step), "rng": plain_rng, **state}
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
    if keep is not None:
        for stale in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(stale, ignore_errors=True)
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
    the global generators when ``rng``. No pickled code is run.
    """
    from safetensors.torch import load_file, load_model

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
        load_model(model, str(path / "model.safetensors"))
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    if rng:
        restore_rng(meta["rng"], load_file(str(path / "rng.safetensors")))
    return meta
