"""torch.distributed helpers: the process group, ranks, reductions, DDP and FSDP2 (DTensor) models.

Every function works without an initialised process group (one process, rank 0 of 1).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = [
    "gradient_sync",
    "all_agree",
    "all_reduce",
    "full_tensor",
    "is_fsdp_root",
    "is_sharded",
    "process_group",
    "rank_world",
    "unwrap",
]


def process_group() -> Any:
    """The ``torch.distributed`` module when a process group is initialised, else None."""
    dist = torch.distributed
    return dist if dist.is_available() and dist.is_initialized() else None


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    dist = process_group()
    return (dist.get_rank(), dist.get_world_size()) if dist is not None else (0, 1)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper, else ``model``."""
    ddp = torch.nn.parallel.DistributedDataParallel
    return model.module if isinstance(model, ddp) else model


def all_reduce(values: list[float], device: torch.device) -> list[float]:
    """Sum a list of floats over all ranks; unchanged without a process group."""
    dist = process_group()
    if dist is None:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_agree(failed: bool, module: nn.Module) -> bool:
    """Whether no rank ``failed`` (a collective; ``module`` gives the device)."""
    dist = process_group()
    if dist is None:
        return not failed
    p = next(iter(module.parameters()), None)
    device = torch.device("cpu") if p is None else p.device
    flag = torch.tensor([float(failed)], device=device)
    dist.all_reduce(flag)
    return float(flag.item()) == 0.0


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


@contextlib.contextmanager
def gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Backward passes inside reduce gradients across ranks only when ``sync``.

    For all but the last micro-batch of an accumulated step: ``DistributedDataParallel``'s
    ``no_sync``, or FSDP2's ``set_requires_gradient_sync(False)`` (gradients then accumulate
    unsharded on each rank until the last micro-batch reduce-scatters their sum). Outside
    ``torch.distributed`` it does nothing.
    """
    if sync:
        yield
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif is_fsdp_root(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def reshard(module: nn.Module) -> None:
    """Put FSDP2 modules back into their sharded state (a root keeps its gathered weights after
    a forward without backward; writing to those would be lost at the next reshard, and the
    optimizer holds the sharded ones)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def is_fsdp_root(model: nn.Module) -> bool:
    """Whether ``model`` itself was sharded with FSDP2 ``fully_shard``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)
