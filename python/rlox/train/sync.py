"""TR-DPO: the reference moves toward the policy during training (``sync_ref_model=True``).

Every ``ref_model_sync_steps`` optimizer steps the reference becomes
``alpha * policy + (1 - alpha) * reference`` (Gorbatovski et al. 2024, "Learn your reference
model for real good alignment"), with ``alpha = ref_model_mixup_alpha``. The mix runs over
parameters matched by name, so a ``DistributedDataParallel`` policy (every rank holds the same
weights) and an FSDP2-sharded one (each shard mixed from the gathered or co-sharded policy
tensor) update every rank's reference identically.
"""

from __future__ import annotations

import torch
from torch import nn

from rlox.train.distributed import full_tensor, reshard, unwrap

__all__ = ["ReferenceSync", "check_sync_pair"]


def _dtensor() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def check_sync_pair(policy: nn.Module, reference: nn.Module) -> None:
    """Raise ``ValueError`` unless ``reference`` has ``policy``'s parameter names and shapes."""
    pol = dict(unwrap(policy).named_parameters())
    ref = dict(reference.named_parameters())
    if pol.keys() != ref.keys():
        name = sorted(pol.keys() ^ ref.keys())[0]
        raise ValueError(
            f"sync_ref_model: the reference and the policy differ in parameter {name!r}; "
            "the reference must be a copy of the policy's architecture"
        )
    for name, p in pol.items():
        if p.shape != ref[name].shape:
            raise ValueError(
                f"sync_ref_model: parameter {name!r} has shape {tuple(p.shape)} in the policy "
                f"but {tuple(ref[name].shape)} in the reference"
            )


@torch.no_grad()
def mix_reference(policy: nn.Module, reference: nn.Module, alpha: float) -> None:
    """``reference <- alpha * policy + (1 - alpha) * reference``, parameter by parameter.

    A collective when the policy is sharded and the reference is not (or is sharded
    differently): every rank must call it.
    """
    dtensor = _dtensor()
    reshard(unwrap(policy))
    reshard(reference)
    pol = dict(unwrap(policy).named_parameters())
    for name, r in reference.named_parameters():
        p = pol[name].detach()
        same_shards = (
            dtensor is not None
            and isinstance(p, dtensor)
            and isinstance(r, dtensor)
            and p.device_mesh == r.device_mesh
            and p.placements == r.placements
        )
        if same_shards:
            src, dst = p.to_local(), r.to_local()
        else:
            src = full_tensor(p)
            dst = r
            if dtensor is not None and isinstance(r, dtensor):
                from torch.distributed.tensor import distribute_tensor

                src = distribute_tensor(src, r.device_mesh, r.placements).to_local()
                dst = r.to_local()
        dst.mul_(1.0 - alpha).add_(src.to(device=dst.device, dtype=dst.dtype), alpha=alpha)


class ReferenceSync:
    """When and how the reference is mixed toward the policy (after each optimizer step)."""

    def __init__(self, policy: nn.Module, reference: nn.Module, alpha: float, every: int) -> None:
        check_sync_pair(policy, reference)
        self.policy, self.reference = policy, reference
        self.alpha, self.every = float(alpha), int(every)

    def after_step(self, global_step: int) -> bool:
        """Mix when ``global_step`` (updates done) is a multiple of ``every``; return whether."""
        if global_step <= 0 or global_step % self.every:
            return False
        mix_reference(self.policy, self.reference, self.alpha)
        return True

    def drifted(self, global_step: int) -> bool:
        """Whether the reference has moved away from the initial policy after ``global_step``."""
        return global_step >= self.every
