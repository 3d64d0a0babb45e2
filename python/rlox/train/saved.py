"""The directory of :meth:`rlox.DPO.save` / :meth:`~rlox.DPO.load`.

It holds ``model.safetensors`` (policy weights), ``optimizer.pt`` (the optimizer's state,
read with ``weights_only=True``), ``reference.safetensors`` (only when TR-DPO has moved the
reference), ``trainer.json`` (config, counters, the optimizer's class and
groups by parameter name) and, written last, ``manifest.json`` (sizes and CRC-32 checksums,
verified before loading).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from rlox import __version__
from rlox.checkpoint import (
    REFERENCE_FILE,
    full_state,
    is_sharded,
    load_optimizer_state,
    load_weights,
    optimizer_keys,
    reading,
    save_weights,
    verify_checkpoint,
)
from rlox.manifest import MANIFEST, ManifestWriter
from rlox.optimizers import build_optimizer, check_optimizer, optimizer_groups
from rlox.train.distributed import all_reduce, process_group, rank_world, unwrap
from rlox.train.protocol import Trainer

__all__ = ["load_trainer", "save_trainer"]

_T = TypeVar("_T", bound=Trainer)


def save_trainer(trainer: Trainer, path: str | Path) -> Path:
    """Write ``trainer``'s weights, optimizer state and config to directory ``path``.

    Under ``torch.distributed`` only rank 0 writes. With a sharded (FSDP2) policy every rank
    must call it: the full weights and optimizer state (keyed by parameter name) are gathered
    and rank 0 writes them.
    """
    path = Path(path)
    model = unwrap(trainer.model)
    ref = trainer.ref_model if trainer.reference_drifted else None
    ref_weights = full_state(ref, None)[0] if ref is not None and is_sharded(ref) else None
    moved = None if ref is None else (ref, ref_weights)
    if not is_sharded(model):
        if process_group() is None or process_group().get_rank() == 0:
            _write(trainer, path, model, None, trainer.optimizer.state_dict(), moved)
        return path
    weights, optim = full_state(model, trainer.optimizer)
    failed = False
    try:
        if rank_world()[0] == 0:
            _write(trainer, path, model, weights, optim, moved)
    except Exception:
        failed = True
        raise
    finally:
        (failures,) = all_reduce([float(failed)], next(model.parameters()).device)
    if failures:
        raise RuntimeError("path: rank 0 failed to write the trainer (see its error)")
    return path


def _write(
    trainer: Trainer,
    path: Path,
    model: nn.Module,
    weights: dict[str, Tensor] | None,
    optim: dict[str, Any],
    reference: tuple[nn.Module, dict[str, Tensor] | None] | None,
) -> None:
    path.mkdir(parents=True, exist_ok=True)
    # An interrupted save must not leave an older manifest, trainer.json or reference behind.
    for name in (MANIFEST, "trainer.json", REFERENCE_FILE):
        (path / name).unlink(missing_ok=True)
    manifest = ManifestWriter(path)  # each checksum taken right after the file is written
    save_weights(model, path / "model.safetensors", weights)
    manifest.add("model.safetensors")
    torch.save(optim, path / "optimizer.pt")
    manifest.add("optimizer.pt")
    if reference is not None:
        save_weights(reference[0], path / REFERENCE_FILE, reference[1])
        manifest.add(REFERENCE_FILE)
    meta = {
        "rlox_version": __version__,
        "manifest": MANIFEST,
        "config": asdict(trainer.config),
        "optimizer": type(trainer.optimizer).__name__,
        "optimizer_groups": optimizer_groups(model, trainer.optimizer),
        "optimizer_keys": optimizer_keys(optim),
        "weight_decay": trainer._weight_decay,
        "global_step": trainer.global_step,
        "skipped_steps": trainer.skipped_steps,
        "bco_reward_sum": trainer.bco_reward_sum,
        "bco_reward_count": trainer.bco_reward_count,
    }
    (path / "trainer.json").write_text(json.dumps(meta, indent=2))
    manifest.add("trainer.json")
    manifest.write()


def load_trainer(
    cls: Callable[..., _T],
    path: str | Path,
    model: nn.Module,
    ref_model: nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
    kwargs: dict[str, Any],
) -> _T:
    """Restore a trainer written by :func:`save_trainer` into ``model`` (no pickled code is run).

    ``kwargs`` go to the constructor (e.g. ``precomputed_reference=True``). With a sharded
    (FSDP2) ``model`` every rank must call it; each reads the files and keeps its shards.
    The optimizer state may be keyed by parameter index or name (a sharded model's save).

    The files are first verified against ``manifest.json`` (a save from before manifests
    loads unverified, with a ``UserWarning``). Without ``optimizer``, the saved optimizer is
    rebuilt: the same class (Adam or AdamW) with the same parameter groups, by parameter
    name, and options. A given ``optimizer`` must have the saved class and groups. A damaged
    or unreadable file, or a mismatched ``optimizer``, raises ``ValueError`` naming it.
    """
    path = Path(path)
    inner = unwrap(model)
    meta_file = path / "trainer.json"
    if not meta_file.is_file():
        raise ValueError(f"path: {path} holds no rlox checkpoint (trainer.json missing)")
    verified = (path / MANIFEST).is_file()
    if verified:
        files = ("trainer.json", "model.safetensors", "optimizer.pt")
        verify_checkpoint(path, files=files, module=inner)
    with reading(path, "trainer.json"):
        meta = dict(json.loads(meta_file.read_bytes()))
        missing = {"config", "optimizer", "global_step", "skipped_steps"} - meta.keys()
        if missing:
            raise KeyError(f"no {', '.join(sorted(missing))}")
    if not verified:
        if "manifest" in meta:
            raise ValueError(f"path: {path}: {MANIFEST} missing (the save was interrupted)")
        warnings.warn(
            f"path: {path} has no {MANIFEST} (saved by an older rlox); loading it unverified",
            UserWarning,
            stacklevel=3,
        )
    kind, groups = meta["optimizer"], meta.get("optimizer_groups")
    if optimizer is None and kind not in ("Adam", "AdamW"):
        raise ValueError(f"optimizer: the checkpoint used {kind}; pass an optimizer of that type")
    if optimizer is not None and groups is not None:
        check_optimizer(inner, optimizer, kind, groups)
    with reading(path, "model.safetensors"):
        load_weights(inner, path / "model.safetensors")
    trainer = cls(model, ref_model, optimizer=optimizer, **meta["config"], **kwargs)
    if optimizer is None:
        weight_decay = float(meta.get("weight_decay", 0.0))
        if groups is None:  # saved before the groups were recorded
            trainer._configure_optimizer(weight_decay)
        else:
            lr = trainer.config.learning_rate
            trainer.optimizer = build_optimizer(inner, kind, groups, lr=lr)
            trainer._weight_decay = weight_decay
    with reading(path, "optimizer.pt"):
        optim = torch.load(path / "optimizer.pt", weights_only=True)
    load_optimizer_state(inner, trainer.optimizer, optim)
    if trainer.config.sync_ref_model and (path / REFERENCE_FILE).is_file():
        assert trainer.ref_model is not None  # the constructor refuses TR-DPO without one
        with reading(path, REFERENCE_FILE):
            load_weights(trainer.ref_model, path / REFERENCE_FILE)
    trainer.global_step = int(meta["global_step"])
    trainer.skipped_steps = int(meta["skipped_steps"])
    trainer.bco_reward_sum = float(meta.get("bco_reward_sum", 0.0))
    trainer.bco_reward_count = int(meta.get("bco_reward_count", 0))
    return trainer
