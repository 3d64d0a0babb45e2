"""The DPO trainer: construction, steps, losses and save / load; training runs delegate.

Direct Preference Optimization (Rafailov et al., 2023) for PyTorch causal language models.
:meth:`DPO.fit` runs :func:`rlox.train.loop.fit`; the reference cache lives in
:mod:`rlox.train.reference`, log-probs in :mod:`rlox.train.logps`, the options in
:mod:`rlox.train.config`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from rlox.batch import PairBatch, collate_pairs
from rlox.data import PreferenceDataset
from rlox.losses import SORTED_TYPES, check_loss_options
from rlox.optimizers import default_optimizer
from rlox.tracking import RECORD_METRICS
from rlox.train import dropout, execution, loop, objective, positions, reference, saved
from rlox.train.config import DPOConfig, EvalConfig, FitConfig, ReferenceConfig
from rlox.train.distributed import process_group, unwrap
from rlox.train.logps import (
    accepted_kwargs,
    is_peft,
    model_vocab_size,
    resolve_route,
    sequence_logps,
)
from rlox.train.loop import FitResult, fit_step, schedule_factor
from rlox.train.moe import router_aux_coef
from rlox.train.probe import Route
from rlox.train.reference import CachedReference, ReferenceLogps, weights_digest
from rlox.train.sync import ReferenceSync

__all__ = [
    "DPO",
    "DPOConfig",
    "FitResult",
    "ReferenceLogps",
    "collate_pairs",
    "schedule_factor",
    "sequence_logps",
    "weights_digest",
]

_C = TypeVar("_C")


class DPO:
    """Direct Preference Optimization of ``model`` against a frozen ``ref_model``.

    Each step puts chosen and rejected completions through the policy in ONE forward over a
    (2B, L) batch, runs the reference under ``torch.no_grad()``, and minimises the preference
    loss on the summed completion log-probs (computed by the Rust kernel on CPU).

    Args:
        model: the policy; ``model(input_ids) -> logits (B, T, V)`` or an object with ``.logits``
            (Hugging Face causal LMs). ``attention_mask`` / ``position_ids`` are passed when its
            forward accepts them. May be wrapped in ``DistributedDataParallel`` by the caller.
        ref_model: a frozen copy of the initial policy; set to eval mode and ``requires_grad=False``.
            May be None when the loss needs no reference (``simpo``, ``cpo``, ``orpo``, ``sft``
            or ``reference_free=True``), when ``model`` is a peft ``PeftModel`` (the reference is
            then ``model`` with its adapters disabled, in eval mode, under ``torch.no_grad()``),
            or with ``precomputed_reference=True``.
        beta: KL-penalty strength; implicit reward is ``beta * (policy - ref)``.
        learning_rate: Adam learning rate (ignored when ``optimizer`` is given).
        max_grad_norm: clip the global gradient norm to this value (``None``: no clipping).
        loss_type: one of :data:`rlox.losses.LOSS_TYPES`, or a list of them weighted by
            ``loss_weights``; see :mod:`rlox.losses` for every formula.
        label_smoothing, f_divergence, f_alpha_divergence_coef, reference_free, simpo_gamma,
            cpo_alpha, orpo_alpha, rpo_alpha, discopop_tau: loss options of
            :func:`rlox.losses.dpo_loss`.
        ld_alpha: LD-DPO weight of the tokens beyond the shorter completion of each pair
            (``None``: 1), applied where log-probs are summed, so in every layout.
        pad_token_id: id of padding in the input matrices (``None``: no padding).
        optimizer: a ready optimizer over ``model``'s parameters; Adam by default.
        precomputed_reference: without ``ref_model``, read the reference log-probs that
            :meth:`precompute_reference` stored with each dataset given to :meth:`fit` /
            :meth:`evaluate`.
        disable_dropout: set every dropout probability of the policy and the reference to 0
            (:func:`rlox.train.dropout.disable_dropout`), so that a policy equal to its
            reference gives loss log 2.
        use_weighting: WPO (Zhou et al. 2024): each pair's loss is multiplied by ``w_c * w_r``,
            ``w = exp(mean over the completion of log p(y_t) - log sum_v p(v)^2)`` under the
            policy, without gradient. Not with ``aot`` / ``aot_unpaired``.
        sync_ref_model, ref_model_mixup_alpha, ref_model_sync_steps: TR-DPO: every
            ``ref_model_sync_steps`` optimizer steps the reference becomes
            ``alpha * policy + (1 - alpha) * reference`` (:mod:`rlox.train.sync`). Needs a
            separate ``ref_model``; not with a peft reference or precomputed reference log-probs.
        router_aux_loss_coef: weight of a mixture-of-experts model's router load-balancing loss
            added to the loss (``None``: the model config's ``router_aux_loss_coef``; 0: off).
            Set and non-zero on a model without router logits: ``ValueError``.
        bco_running_mean: ``bco_pair`` shifts rewards by their running mean over all training
            batches so far (the BCO paper; kept in checkpoints). Off: no shift, as in TRL 1.16.
        attention: how packed and prefix-shared rows attend (:mod:`rlox.attention`):
            ``"dense"`` (an (R, 1, L, L) mask), ``"varlen"`` (sdpa per sequence), ``"flex"``
            (FlexAttention, CUDA only) or ``"auto"`` (flex on CUDA where supported, else varlen
            where the model allows, else dense). The padded layout always uses its 2-D mask.
        logits_chunk_size: the LM head runs on this many completion tokens at a time and its
            backward recomputes their logits (:mod:`rlox.train.head`), so head memory is
            O(chunk x V). None: ``2**24 // V`` rows (64 MiB of float32 logits); 0: all at once.
        gradient_checkpointing: recompute the policy's activations in the backward
            (non-reentrant; Hugging Face models and ``TinyCausalLM``): less memory, one more
            forward per step.
        activation_offloading: keep the policy's saved activations in pinned CPU memory
            (``torch.autograd.graph.save_on_cpu``); CUDA models only.
        compile: ``torch.compile`` the forward of the policy and the reference (the decoder where
            the LM head splits off), in place, so checkpoints keep their parameter names.
    """

    def __init__(
        self,
        model: nn.Module,
        ref_model: nn.Module | None,
        *,
        beta: float = 0.1,
        learning_rate: float = 1e-4,
        max_grad_norm: float | None = 1.0,
        loss_type: str | list[str] | tuple[str, ...] = "sigmoid",
        loss_weights: list[float] | tuple[float, ...] | None = None,
        label_smoothing: float = 0.0,
        f_divergence: str = "reverse_kl",
        f_alpha_divergence_coef: float = 0.5,
        reference_free: bool = False,
        simpo_gamma: float = 0.5,
        cpo_alpha: float = 1.0,
        orpo_alpha: float = 0.1,
        rpo_alpha: float | None = None,
        discopop_tau: float = 0.05,
        ld_alpha: float | None = None,
        pad_token_id: int | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        precomputed_reference: bool = False,
        disable_dropout: bool = True,
        use_weighting: bool = False,
        sync_ref_model: bool = False,
        ref_model_mixup_alpha: float = 0.6,
        ref_model_sync_steps: int = 512,
        router_aux_loss_coef: float | None = None,
        bco_running_mean: bool = False,
        attention: str = "auto",
        logits_chunk_size: int | None = None,
        gradient_checkpointing: bool = False,
        activation_offloading: bool = False,
        compile: bool = False,
    ) -> None:
        config = DPOConfig.from_arguments(_fields_of(DPOConfig, locals()))
        self._loss_options = config.loss_options()
        info = check_loss_options(**self._loss_options)
        needs_reference = bool(info["needs_reference"])
        peft_reference = _check_models(
            model, ref_model, config.loss_type, needs_reference, precomputed_reference
        )
        self.config = config = config.checked()
        _check_options(config, ref_model, peft_reference, precomputed_reference)
        self.model = model
        # The reference is not needed (and not run) when every term is reference-free.
        self.ref_model = (
            ref_model.eval().requires_grad_(False)
            if ref_model is not None and needs_reference
            else None
        )
        self.precomputed_reference = bool(precomputed_reference)
        self._needs_reference = needs_reference
        self._peft_reference = peft_reference
        self._owns_optimizer = optimizer is None
        self._weight_decay = 0.0
        self.optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=learning_rate)
        self.global_step = 0
        self.skipped_steps = 0
        # Look through a DistributedDataParallel wrapper: it passes keywords to the module as given.
        self.vocab_size = model_vocab_size(unwrap(model))
        self._policy_kwargs = accepted_kwargs(unwrap(model), config.attention)
        self._reference_weights = reference.ReferenceWeights(self._reference_module)
        self._warned_zero_lr = False
        if self.ref_model is not None:
            self._ref_kwargs: frozenset[str] | None = accepted_kwargs(
                self.ref_model, config.attention
            )
        else:
            self._ref_kwargs = self._policy_kwargs if peft_reference else None
        self._components = tuple(info["components"])
        self._uses_bco = config.bco_running_mean and any(t == "bco_pair" for t, _ in info["terms"])
        # Running mean of the rewards (BCO's shift): sum and count of all rewards seen in training.
        self.bco_reward_sum = 0.0
        self.bco_reward_count = 0
        self._autocast: torch.dtype | None = None
        self._aux_coef = router_aux_coef(model, config.router_aux_loss_coef)
        if config.disable_dropout:
            dropout.disable_dropout(unwrap(model))
            if self.ref_model is not None:
                dropout.disable_dropout(self.ref_model)
        if config.activation_offloading:
            execution.check_offloading(model)
        execution.prepare_models(
            model,
            self.ref_model,
            gradient_checkpointing=config.gradient_checkpointing,
            compile=config.compile,
        )
        self._sync = (
            ReferenceSync(
                model, self.ref_model, config.ref_model_mixup_alpha, config.ref_model_sync_steps
            )
            if config.sync_ref_model and self.ref_model is not None
            else None
        )
        if config.sync_ref_model and self._sync is None:
            raise ValueError(
                f"sync_ref_model: loss_type {config.loss_type!r} runs no reference model to move"
            )

    def collate(self, prompt: Any, chosen: Any, rejected: Any) -> PairBatch:
        """Re-pack id matrices with this trainer's ``pad_token_id`` (see :func:`collate_pairs`)."""
        return collate_pairs(
            prompt,
            chosen,
            rejected,
            pad_token_id=self.config.pad_token_id,
            vocab_size=self.vocab_size,
        )

    # ------------------------------------------------------------------ losses
    def _has_live_reference(self) -> bool:
        return self.ref_model is not None or self._peft_reference

    def _reference_logps(self, batch: PairBatch) -> Tensor:
        """(2B,) float32 reference log-probs (see :func:`rlox.train.objective.reference_logps`)."""
        return objective.reference_logps(self, batch)

    def _loss(
        self,
        batch: PairBatch,
        *,
        training: bool = False,
        ref: Tensor | None = None,
        nan_loss: bool = False,
        sft_mean_length: float | None = None,
    ) -> tuple[Tensor | None, dict[str, float]]:
        """The differentiable loss and the metrics (:func:`rlox.train.objective.batch_loss`)."""
        return objective.batch_loss(
            self,
            batch,
            training=training,
            ref=ref,
            nan_loss=nan_loss,
            sft_mean_length=sft_mean_length,
        )

    def _metric_keys(self) -> tuple[str, ...]:
        extra = tuple(f"loss_{c}" for c in self._components) if len(self._components) > 1 else ()
        aux = ("aux_loss",) if self._aux_coef else ()
        return RECORD_METRICS + extra + aux

    def _after_update(self) -> None:
        """After each optimizer step: TR-DPO's reference mix when it is due."""
        if self._sync is not None:
            self._sync.after_step(self.global_step)

    @property
    def reference_drifted(self) -> bool:
        """Whether TR-DPO has moved the reference away from the initial policy."""
        return self._sync is not None and self._sync.drifted(self.global_step)

    def _batch(self, prompt: Any, chosen: Any, rejected: Any) -> PairBatch:
        if isinstance(prompt, PairBatch):
            if chosen is not None or rejected is not None:
                raise ValueError(
                    "chosen: pass either a PairBatch or prompt/chosen/rejected, not both"
                )
            return prompt
        if chosen is None or rejected is None:
            raise ValueError("chosen: prompt, chosen and rejected are all required")
        return self.collate(prompt, chosen, rejected)

    def compute_loss(
        self, prompt: Any, chosen: Any = None, rejected: Any = None
    ) -> dict[str, float]:
        """Metrics of one batch without updating anything (policy temporarily in eval mode).

        Accepts (B, P), (B, C), (B, R) id matrices or a :class:`PairBatch`.
        """
        batch = self._batch(prompt, chosen, rejected)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                _, metrics = self._loss(batch)
        finally:
            self.model.train(was_training)
        return metrics

    def train_step(self, prompt: Any, chosen: Any = None, rejected: Any = None) -> dict[str, float]:
        """One optimisation step on B pairs; returns the batch metrics as Python floats.

        Keys: loss, chosen_reward, rejected_reward, reward_margin, reward_accuracy, chosen_logps,
        rejected_logps, grad_norm (before clipping), skipped (1.0 when a non-finite loss or
        gradient made the step be skipped; the weights are then left untouched). Warns once
        when the learning rate is 0.

        Under ``torch.distributed`` every rank calls it with its own batch: the update and the
        metrics are those of one batch of the ranks' union, and a rank whose batch is empty
        joins with a zero-weight stand-in.
        """
        batch = self._batch(prompt, chosen, rejected)
        self._warn_zero_lr()
        if process_group() is not None:
            # Weighted like one batch of the ranks' union; an emptied rank runs a stand-in.
            out = fit_step(self, [batch], None, self.global_step)
            return {k: v for k, v in out.items() if k not in ("lr", "num_pairs")}
        if batch.num_pairs == 0:
            self.skipped_steps += 1
            warnings.warn(
                f"step {self.global_step}: every pair of the batch was skipped by truncation",
                RuntimeWarning,
                stacklevel=2,
            )
            return dict.fromkeys(RECORD_METRICS, math.nan) | {"grad_norm": math.nan, "skipped": 1.0}
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss, metrics = self._loss(batch, training=True)
        grad_norm = math.nan
        if loss is not None:
            loss.backward()
            grad_norm = self._clip_gradients()
        skipped = not (math.isfinite(grad_norm) and math.isfinite(metrics["loss"]))
        if skipped:
            self.skipped_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
            warnings.warn(
                f"step {self.global_step}: non-finite loss or gradient; update skipped",
                RuntimeWarning,
                stacklevel=2,
            )
        else:
            self.optimizer.step()
            self.global_step += 1
            self._after_update()
        metrics["grad_norm"] = grad_norm
        metrics["skipped"] = float(skipped)
        return metrics

    def _warn_zero_lr(self) -> None:
        """Warn once when a parameter group's learning rate is 0 (the step would move nothing)."""
        if self._warned_zero_lr:
            return
        zero = [i for i, g in enumerate(self.optimizer.param_groups) if g.get("lr", 1.0) == 0]
        if zero:
            self._warned_zero_lr = True
            warnings.warn(
                f"optimizer: the learning rate of parameter group {zero[0]} is 0, so train_step "
                "leaves those weights unchanged (set param_groups[i]['lr'] or use fit's schedule)",
                RuntimeWarning,
                stacklevel=3,
            )

    def _clip_gradients(self) -> float:
        """Clip the global gradient norm to ``max_grad_norm``; return the norm before clipping."""
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return math.nan
        max_norm = self.config.max_grad_norm or math.inf
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def _configure_optimizer(self, weight_decay: float) -> None:
        """Switch to ``default_optimizer`` for ``weight_decay``, keeping the state."""
        if not self._owns_optimizer:
            if weight_decay:
                raise ValueError(
                    "weight_decay: this trainer was given its optimizer; set weight decay there"
                )
            return
        if weight_decay == self._weight_decay:
            return
        new = default_optimizer(self.model, self.config.learning_rate, weight_decay)
        for p, state in self.optimizer.state.items():
            new.state[p] = state
        self.optimizer = new
        self._weight_decay = float(weight_decay)

    # ------------------------------------------------------------------ training runs
    def fit(
        self,
        train_dataset: PreferenceDataset,
        eval_dataset: PreferenceDataset | None = None,
        *,
        epochs: int = 1,
        batch_size: int | None = None,
        max_tokens: int | None = None,
        layout: str = "padded",
        max_length: int | None = None,
        max_prompt_length: int | None = None,
        truncation: str = "keep_end",
        pack_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        gradient_accumulation_steps: int = 1,
        lr_scheduler: str = "constant",
        warmup_steps: int = 0,
        weight_decay: float = 0.0,
        mixed_precision: str | None = None,
        seed: int = 0,
        log_every: int | None = 10,
        eval_every: int | None = None,
        save_every: int | None = None,
        save_total_limit: int | None = 3,
        output_dir: str | os.PathLike[str] | None = None,
        resume_from: str | os.PathLike[str] | None = None,
        max_consecutive_skips: int | None = 10,
        progress: bool = True,
        max_steps: int | None = None,
        report_to: str | list[str] | tuple[str, ...] | None = None,
        callback: Callable[[int, dict[str, float]], None] | None = None,
    ) -> FitResult:
        """Train on ``train_dataset`` for ``epochs`` epochs (or ``max_steps`` optimizer steps).

        Each epoch follows ``train_dataset.batches(batch_size=..., max_tokens=..., shuffle=True,
        seed=seed, epoch=epoch, rank=, world_size=)``; each planned batch is collated in Rust with
        ``layout``, ``max_length``, ``max_prompt_length``, ``truncation`` (``pack_length``
        defaults to ``max_length`` for ``packed``). One optimizer step takes
        ``gradient_accumulation_steps`` batches (fewer at the end of an epoch) and gives the
        same update as one batch of their union: each batch's mean loss is weighted by
        ``n_i / N``, ``N`` the pairs of the step (``sft``, a token mean: by its share of the
        step's chosen tokens). What looks across pairs differs from one big batch:
        ``aot``/``aot_unpaired`` sort within each batch, ``bco_running_mean`` updates its mean
        batch by batch (a batch's shift includes the earlier batches of the step, not the later
        ones), WPO's ``mean(w)`` on ``sft`` and the MoE router loss are per batch.

        A step whose loss or gradient is not finite (or whose pairs truncation all drops) is
        skipped with a ``RuntimeWarning``; it still counts toward the schedule, ``max_steps``
        and checkpoints.

        Under ``torch.distributed`` (initialised by the caller, who also wraps ``model`` in
        ``DistributedDataParallel`` or shards it with FSDP2 ``fully_shard``), each rank takes its
        share of every planned round, ``N`` and the metrics are summed over ranks, and only rank 0
        logs, shows progress and writes checkpoints (the full state of a sharded model is
        gathered from every rank first; resuming gives every rank its shards). A rank whose
        micro-batch truncation empties runs a one-pair stand-in with weight 0, so the step still
        equals one process on the union batch. On resume only rank 0's generator states are
        restored.

        The learning rate is put back to its configured value when ``fit`` returns (the last
        factor of a ``linear`` or ``cosine`` schedule is 0), so later :meth:`train_step` calls
        move the weights.

        Args:
            lr_scheduler, warmup_steps: see :func:`schedule_factor`; the total is the number of
                optimizer steps the planner gives (capped by ``max_steps``).
            weight_decay: > 0 switches the default optimizer to AdamW (no decay on biases and
                norms); with a custom optimizer, set it there.
            mixed_precision: ``"bf16"`` runs model forwards under ``torch.autocast``.
            log_every: every this many steps, one metrics line on stdout and a record in
                ``output_dir/metrics.jsonl`` (when ``output_dir`` is set) and to each tracker
                of ``report_to``.
            eval_every: evaluate ``eval_dataset`` every this many steps (and at the end).
            save_every: checkpoint to ``output_dir/checkpoints/step-<N>`` every this many steps
                (and at the end whenever ``output_dir`` is set); keep ``save_total_limit``.
            resume_from: ``"latest"`` (the newest checkpoint in ``output_dir`` that verifies
                against its manifest, newer ones skipped with a ``UserWarning``; a fresh start
                when there is none) or a checkpoint directory (``ValueError`` if it fails to
                verify). Resuming restores weights, optimizer, scheduler, generator states,
                counters and the data position.
            max_consecutive_skips: raise ``RuntimeError`` after this many consecutive steps
                skipped for non-finite loss or gradients.
            report_to: experiment trackers that get every train and eval record (keys
                ``train/loss``, ``eval/reward_accuracy``, ...; at its step) on rank 0:
                ``"tensorboard"`` (``output_dir/tensorboard``), ``"wandb"``, ``"mlflow"``, a
                list of them (or a comma-separated string), or ``"none"``. ``None`` (default):
                TensorBoard when installed. W&B and MLflow also log the trainer's config and
                these options once as parameters; their own environment variables
                (``WANDB_PROJECT``, ``WANDB_MODE``, ``MLFLOW_TRACKING_URI``, ...) say where
                records go. Each call (a resumed one too) starts a new tracker run, finished
                when ``fit`` returns or raises; a run already active in the process is used
                and left open. A client that does not import raises ``ImportError`` before
                training. See :mod:`rlox.trackers`.
            callback: called as ``callback(step, metrics)`` after every optimizer step.

        Returns:
            A :class:`FitResult`.
        """
        _check_dataset("train_dataset", train_dataset)
        if eval_dataset is not None:
            _check_dataset("eval_dataset", eval_dataset)
        cfg = _options(FitConfig, locals())
        cfg = _with_max_length(self, cfg, train_dataset, eval_dataset)
        self.check_layout(cfg.layout)
        return loop.fit(self, train_dataset, eval_dataset, cfg, callback)

    # ------------------------------------------------------------------ evaluation
    def evaluate(
        self,
        dataset: PreferenceDataset,
        *,
        batch_size: int | None = None,
        max_tokens: int | None = None,
        layout: str = "padded",
        max_length: int | None = None,
        max_prompt_length: int | None = None,
        truncation: str = "keep_end",
        pack_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        mixed_precision: str | None = None,
    ) -> dict[str, float]:
        """Metrics over the WHOLE ``dataset``, each the mean over its pairs (not over batches).

        Keys: loss, reward_accuracy, reward_margin, chosen_reward, rejected_reward,
        chosen_logps, rejected_logps, ``loss_<name>`` for multi-term losses, ``num_pairs``
        (pairs scored) and ``num_dropped`` (pairs that truncation drops). No gradients; the
        policy runs in eval mode and is put back in its mode. ``batch_size`` defaults to 16
        when ``max_tokens`` is not given either. Under ``torch.distributed`` each rank scores its
        share and the sums are all-reduced.
        """
        _check_dataset("dataset", dataset)
        cfg = _with_max_length(self, _options(EvalConfig, locals()), dataset)
        self.check_layout(cfg.layout)
        data_kw = cfg.data_kwargs()
        previous = self._autocast
        self._autocast = cfg.autocast
        try:
            source = self._reference_source(dataset, data_kw)
            return loop.evaluate(
                self, dataset, cfg.plan_kwargs(), self._collate_kwargs(data_kw), source
            )
        finally:
            self._autocast = previous

    def precompute_reference(
        self,
        dataset: PreferenceDataset,
        *,
        batch_size: int | None = None,
        max_tokens: int | None = None,
        layout: str = "padded",
        max_length: int | None = None,
        max_prompt_length: int | None = None,
        truncation: str = "keep_end",
        pack_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        mixed_precision: str | None = None,
        progress: bool = True,
    ) -> ReferenceLogps:
        """Run the reference once over ``dataset`` and keep its per-pair log-prob sums.

        The (n,) float64 chosen and rejected sums are stored on ``dataset`` and, when it was
        saved to or loaded from a directory, in ``<dir>/reference_logps/<key>.npy`` + ``.json``.
        The key hashes the reference weights, the data (:meth:`PreferenceDataset.fingerprint`),
        ``max_length``, ``max_prompt_length``, ``truncation`` and ``ld_alpha``; :meth:`fit` and
        :meth:`evaluate` with the same settings then read these values instead of running the
        reference, and ignore (with a warning) values whose data or weights no longer match.
        ``layout`` and batch sizes only change rounding.
        """
        _check_dataset("dataset", dataset)
        if not self._has_live_reference():
            raise ValueError(
                "ref_model: precompute_reference needs a reference model (or a peft model)"
            )
        if self._sync is not None:
            raise ValueError(
                "sync_ref_model: TR-DPO moves the reference during training, so precomputed "
                "reference log-probs would go stale"
            )
        cfg = _with_max_length(self, _options(ReferenceConfig, locals()), dataset)
        self.check_layout(cfg.layout)
        return reference.precompute(self, dataset, cfg)

    def check_layout(self, layout: str) -> dict[str, Route]:
        """How the policy (and the reference) run ``layout``: the verified route of each.

        Runs the route probe (:mod:`rlox.train.probe`) for ``layout`` and for the padded layout
        of the one-pair stand-in batch, once per model; ``fit``, ``evaluate`` and
        ``precompute_reference`` call it first, so every rank probes at the same point.
        ``ValueError`` (``TypeError`` for an interface mismatch) where no route is exact.
        """
        routes = {}
        for name in dict.fromkeys(("padded", layout)):
            routes["policy"] = resolve_route(self.model, name, self._policy_kwargs)
            if self.ref_model is not None and self._ref_kwargs is not None:
                routes["reference"] = resolve_route(self.ref_model, name, self._ref_kwargs)
        return routes

    # ------------------------------------------------------------------ reference cache
    def _collate_kwargs(self, data_kw: dict[str, Any]) -> dict[str, Any]:
        """Keywords of ``PreferenceDataset.collate``: ``data_kw`` plus this trainer's ids."""
        return dict(data_kw, pad_token_id=self.config.pad_token_id or 0, vocab_size=self.vocab_size)

    def _reference_source(
        self, dataset: PreferenceDataset, data_kw: dict[str, Any]
    ) -> CachedReference | None:
        """Cached reference log-probs of ``dataset`` that match this trainer, else None (live).

        Raises when the trainer has no reference to run and no cache matches.
        """
        if not self._needs_reference or self._sync is not None:
            return None  # TR-DPO moves the reference: cached values would go stale
        settings = reference.reference_settings(data_kw, self.config.ld_alpha)
        weights = self._reference_weights if self._has_live_reference() else None
        return reference.find_cached(dataset, settings, weights)

    def _reference_module(self) -> tuple[nn.Module, bool]:
        """(module, frozen_only) whose weights are the reference's (see ``ReferenceWeights``)."""
        if self.ref_model is not None:
            return self.ref_model, False
        return unwrap(self.model), True

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write policy weights (safetensors), optimizer state and config to directory ``path``.

        Under ``torch.distributed`` only rank 0 writes. With a sharded (FSDP2) policy every rank
        must call it: the full weights and optimizer state (keyed by parameter name) are gathered
        and rank 0 writes them. The format is described in :mod:`rlox.train.saved`.
        """
        return saved.save_trainer(self, path)

    @classmethod
    def load(
        cls,
        path: str | Path,
        model: nn.Module,
        ref_model: nn.Module | None,
        optimizer: torch.optim.Optimizer | None = None,
        **kwargs: Any,
    ) -> DPO:
        """Restore a trainer written by :meth:`save` into ``model`` (no pickled code is run).

        ``kwargs`` go to the constructor (e.g. ``precomputed_reference=True``). With a sharded
        (FSDP2) ``model`` every rank must call it; each reads the files and keeps its shards.
        The files are verified against their manifest first. Without ``optimizer`` the saved
        one is rebuilt (same class, groups by parameter name and options); a given one must
        match it. A damaged file or a mismatched ``optimizer`` raises ``ValueError`` naming it.
        """
        return saved.load_trainer(cls, path, model, ref_model, optimizer, kwargs)


def _check_dataset(name: str, dataset: Any) -> None:
    if not isinstance(dataset, PreferenceDataset):
        raise TypeError(f"{name}: expected a PreferenceDataset, got {type(dataset).__name__}")


def _fields_of(config: type[Any], given: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``given`` named like the fields of dataclass ``config``."""
    return {f.name: given[f.name] for f in fields(config)}


def _with_max_length(trainer: DPO, cfg: _C, *datasets: Any) -> _C:
    """``cfg`` with ``max_length`` checked against the policy's positions, or defaulted to the
    smaller of them and the longest sequence of ``datasets`` (:mod:`rlox.train.positions`)."""
    value = positions.resolve_max_length(trainer.model, cfg.max_length, datasets)  # type: ignore[attr-defined]
    return dataclasses.replace(cfg, max_length=value)  # type: ignore[type-var]


def _options(config: type[_C], given: dict[str, Any]) -> _C:
    """``config`` built (and so validated) from the same-named entries of ``given``."""
    return config(**_fields_of(config, given))


def _check_options(
    config: DPOConfig, ref_model: Any, peft_reference: bool, precomputed_reference: bool
) -> None:
    """Refuse option combinations that cannot work together."""
    types = [config.loss_type] if isinstance(config.loss_type, str) else list(config.loss_type)
    if config.use_weighting and any(t in SORTED_TYPES for t in types):
        raise ValueError(
            "use_weighting: WPO weights are per pair, and aot / aot_unpaired sort pairs, so "
            "the weights would not match their pairs"
        )
    if not config.sync_ref_model:
        return
    if peft_reference:
        raise ValueError(
            "sync_ref_model: a peft policy's reference is the policy with its adapters disabled, "
            "so there is no separate reference to move; pass a ref_model or disable it"
        )
    if precomputed_reference:
        raise ValueError(
            "sync_ref_model: precomputed reference log-probs assume a fixed reference, and "
            "TR-DPO moves it during training; use a live ref_model"
        )
    if ref_model is None:
        raise ValueError("sync_ref_model: needs a ref_model to move toward the policy")


def _check_models(
    model: Any,
    ref_model: Any,
    loss_type: Any,
    needs_reference: bool,
    precomputed_reference: bool,
) -> bool:
    """Check the policy and reference; return whether a peft policy is its own reference."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    peft_reference = ref_model is None and needs_reference and is_peft(unwrap(model))
    if ref_model is None:
        if needs_reference and not (peft_reference or precomputed_reference):
            raise ValueError(
                f"ref_model: loss_type {loss_type!r} compares the policy with a reference; "
                "pass a frozen copy of the model (or reference_free=True, a peft model, "
                "or precomputed_reference=True with DPO.precompute_reference)"
            )
    elif not isinstance(ref_model, nn.Module):
        raise TypeError(f"ref_model: expected a torch.nn.Module, got {type(ref_model).__name__}")
    if ref_model is model:
        raise ValueError("ref_model: must be a separate frozen copy (copy.deepcopy(model))")
    return peft_reference
