"""What the training machinery needs of a trainer (:class:`rlox.DPO` provides it).

The loop, the reference cache and the save format are written against this interface, not
against the class, so that ``rlox.algorithms.dpo`` imports them and never the other way round.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from rlox.data import PairBatch, PreferenceDataset
from rlox.train.config import DPOConfig

__all__ = ["Trainer"]


class ReferenceDigest(Protocol):
    def hashed_once(self) -> AbstractContextManager[None]: ...

    def digest(self) -> str: ...


class Trainer(Protocol):
    model: nn.Module
    ref_model: nn.Module | None
    optimizer: torch.optim.Optimizer
    config: DPOConfig
    global_step: int
    skipped_steps: int
    bco_reward_sum: float
    bco_reward_count: int
    _autocast: torch.dtype | None
    _weight_decay: float
    _reference_weights: ReferenceDigest
    _policy_kwargs: frozenset[str]
    _ref_kwargs: frozenset[str] | None
    _peft_reference: bool
    _needs_reference: bool
    _loss_options: dict[str, Any]
    _uses_bco: bool
    _components: tuple[str, ...]
    _aux_coef: float

    @property
    def reference_drifted(self) -> bool: ...

    def _after_update(self) -> None: ...

    def _loss(
        self,
        batch: PairBatch,
        *,
        training: bool = False,
        ref: Tensor | None = None,
        nan_loss: bool = False,
        sft_mean_length: float | None = None,
    ) -> tuple[Tensor | None, dict[str, float]]: ...

    def _metric_keys(self) -> tuple[str, ...]: ...

    def _clip_gradients(self) -> float: ...

    def _configure_optimizer(self, weight_decay: float) -> None: ...

    def _collate_kwargs(self, data_kw: dict[str, Any]) -> dict[str, Any]: ...

    def _reference_logps(self, batch: PairBatch) -> Tensor: ...

    def _reference_source(self, dataset: PreferenceDataset, data_kw: dict[str, Any]) -> Any: ...
