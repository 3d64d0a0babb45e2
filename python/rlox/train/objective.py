"""The loss of one batch: policy and reference log-probs, WPO weights, the MoE auxiliary loss,
the preference loss and the batch metrics.

:func:`batch_loss` is what :class:`rlox.DPO` runs for ``train_step``, ``compute_loss``, ``fit``
and ``evaluate``. The loss formulas live in :mod:`rlox.losses`; the forward passes in
:mod:`rlox.train.logps`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rlox.batch import PairBatch
from rlox.losses import dpo_loss
from rlox.tracking import RECORD_METRICS
from rlox.train import execution, positions
from rlox.train.distributed import unwrap
from rlox.train.logps import sequence_logps, sequence_stats
from rlox.train.protocol import Trainer

__all__ = ["batch_loss", "bco_delta", "reference_logps"]


def reference_logps(trainer: Trainer, batch: PairBatch) -> Tensor:
    """(2B,) float32 reference log-probs from the reference model or the adapter-free policy."""
    ld_alpha, autocast = trainer.config.ld_alpha, trainer._autocast
    chunk = trainer.config.logits_chunk_size
    if trainer.ref_model is not None:
        with torch.no_grad():
            return sequence_logps(
                trainer.ref_model,
                batch,
                trainer._ref_kwargs,
                ld_alpha=ld_alpha,
                autocast=autocast,
                logits_chunk_size=chunk,
            )
    if trainer._peft_reference:
        model = unwrap(trainer.model)
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with model.disable_adapter(), torch.no_grad():
                return sequence_logps(
                    model,
                    batch,
                    trainer._ref_kwargs,
                    ld_alpha=ld_alpha,
                    autocast=autocast,
                    logits_chunk_size=chunk,
                )
        finally:
            for m, mode in modes:
                m.training = mode
    raise ValueError(
        "ref_model: this trainer has no reference model; its reference log-probs are read "
        "from DPO.precompute_reference caches, which only fit() and evaluate() use"
    )


def bco_delta(trainer: Trainer, policy: Tensor, ref: Tensor | None, training: bool) -> float:
    """BCO's reward shift: the running mean of all rewards, including this batch's when training."""
    with torch.no_grad():
        u = policy.detach().double() - (0.0 if ref is None else ref.double())
        total, count = trainer.config.beta * float(u.sum()), int(policy.shape[0])
    if training:
        trainer.bco_reward_sum += total
        trainer.bco_reward_count += count
        return trainer.bco_reward_sum / trainer.bco_reward_count
    if trainer.bco_reward_count == 0:
        return total / count
    return trainer.bco_reward_sum / trainer.bco_reward_count


def _metrics(trainer: Trainer, res, policy: Tensor, b: int, aux: Tensor | None) -> dict[str, float]:
    """The batch metrics as floats, read from the device once."""
    with torch.no_grad():
        rc, rr = res.chosen_rewards.double(), res.rejected_rewards.double()
        values = {
            "loss": res.loss.detach().double(),
            "reward_accuracy": (rc > rr).double().mean(),
            "reward_margin": (rc - rr).mean(),
            "chosen_reward": rc.mean(),
            "rejected_reward": rr.mean(),
            "chosen_logps": policy[:b].detach().double().mean(),
            "rejected_logps": policy[b:].detach().double().mean(),
        }
        if len(trainer._components) > 1:
            for name, value in res.component_losses.items():
                values[f"loss_{name}"] = torch.as_tensor(
                    value, dtype=torch.float64, device=rc.device
                )
        if aux is not None:
            values["aux_loss"] = aux.detach().double()
        stats = torch.stack(list(values.values())).tolist()
    return dict(zip(values, stats, strict=True))


def batch_loss(
    trainer: Trainer,
    batch: PairBatch,
    *,
    training: bool = False,
    ref: Tensor | None = None,
    nan_loss: bool = False,
    sft_mean_length: float | None = None,
) -> tuple[Tensor | None, dict[str, float]]:
    """The differentiable loss of ``batch`` and its metrics.

    ``training`` folds the batch's rewards into the running BCO shift and runs the policy as
    given (a ``DistributedDataParallel`` wrapper included); otherwise the wrapped module runs.
    ``ref``: precomputed (2B,) reference log-probs. ``sft_mean_length``: the chosen tokens per
    pair that the ``sft`` token mean divides by (a step's mean over its micro-batches; default
    this batch's). The loss is the preference loss (each pair weighted by its WPO weight with
    ``use_weighting``) plus ``router_aux_loss_coef`` times the MoE load-balancing loss. When
    log-probs are not finite the loss is None, or with ``nan_loss`` a NaN loss that still
    back-propagates (so that all ranks of a distributed run join the gradient reduction).
    """
    b = batch.num_pairs
    cfg = trainer.config
    # Training goes through a DDP wrapper (its gradient hooks); evaluation needs none.
    model = trainer.model if training else unwrap(trainer.model)
    positions.check_batch(model, batch)  # while the batch is on the CPU: no device sync
    batch = batch.to(next(model.parameters()).device)  # once, for policy and reference
    with execution.policy_forward(cfg.activation_offloading and training):
        stats = sequence_stats(
            model,
            batch,
            trainer._policy_kwargs,
            ld_alpha=cfg.ld_alpha,
            autocast=trainer._autocast,
            wpo=cfg.use_weighting,
            router_aux=trainer._aux_coef != 0.0,
            logits_chunk_size=cfg.logits_chunk_size,
        )
    policy = stats.logps
    with torch.no_grad():
        if ref is None and trainer._needs_reference:
            ref = reference_logps(trainer, batch)
        if ref is not None:
            ref = ref.to(device=policy.device, dtype=policy.dtype)
        finite = torch.isfinite(policy).all()
        if ref is not None:
            finite &= torch.isfinite(ref).all()
    if not bool(finite):
        metrics = dict.fromkeys(RECORD_METRICS, math.nan)
        metrics["chosen_logps"] = policy[:b].detach().double().mean().item()
        metrics["rejected_logps"] = policy[b:].detach().double().mean().item()
        return (policy.sum() * math.nan if nan_loss else None), metrics
    options = dict(trainer._loss_options)
    if trainer._uses_bco:
        options["bco_delta"] = bco_delta(trainer, policy, ref, training)
    if "orpo" in trainer._components:
        # A log-prob that rounds to 0 has infinite odds; keep it just below.
        policy = policy.clamp(max=-1e-6)
    weights = None
    if stats.wpo_log_weights is not None:
        w = stats.wpo_log_weights
        weights = torch.exp(w[:b] + w[b:]).to(policy.dtype)
    res = dpo_loss(
        policy[:b],
        policy[b:],
        None if ref is None else ref[:b],
        None if ref is None else ref[b:],
        chosen_lengths=batch.chosen_lengths.to(policy.device),
        rejected_lengths=batch.rejected_lengths.to(policy.device),
        pair_weights=weights,
        sft_mean_length=sft_mean_length,
        **options,
    )
    loss = res.loss
    if stats.aux_loss is not None:
        loss = loss + trainer._aux_coef * stats.aux_loss.to(loss.dtype)
    metrics = _metrics(trainer, res, policy, b, stats.aux_loss)
    if stats.aux_loss is not None:
        metrics["loss"] = float(loss.detach())
    return loss, metrics
