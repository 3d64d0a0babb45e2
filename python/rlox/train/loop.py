"""The training loop of :meth:`rlox.DPO.fit` and the whole-dataset pass of ``evaluate``.

One optimizer step (:func:`fit_step`) takes ``gradient_accumulation_steps`` micro-batches and
weights each mean loss by its share of the step's pairs over all ranks, so the update equals one
batch of their union. :class:`_Run` holds one ``fit`` call's position, counters, schedule,
logging and checkpoints; each of its methods is one part of the loop.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rlox import __version__
from rlox.checkpoint import load_checkpoint, remove_partial, resume_checkpoint, save_checkpoint
from rlox.data import PairBatch, PreferenceDataset
from rlox.trackers import Trackers, report_to_names, require_trackers, run_config
from rlox.tracking import RECORD_METRICS, MetricsWriter, format_record, make_record
from rlox.train.config import LR_SCHEDULERS, RESUME_LOOSE, RESUME_STRICT, FitConfig
from rlox.train.distributed import (
    all_reduce,
    gradient_sync,
    process_group,
    rank_world,
    unwrap,
)
from rlox.train.logps import stand_in_batch
from rlox.train.protocol import Trainer
from rlox.train.reference import CachedReference

__all__ = ["FitResult", "evaluate", "fit", "fit_step", "schedule_factor"]


@dataclass
class FitResult:
    """Summary of :meth:`DPO.fit`.

    ``steps`` counts optimizer steps of the run (skipped ones included, and those before a
    resume); ``epochs`` the epochs done (fractional); ``metrics`` the pair-weighted train
    metrics of the last logging window; ``eval`` the last evaluation (or None); ``checkpoint``
    the last checkpoint written (or None).
    """

    steps: int
    epochs: float
    skipped: int
    metrics: dict[str, float]
    eval: dict[str, float] | None
    checkpoint: Path | None
    seconds: float


def schedule_factor(kind: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The learning-rate multiplier of update ``s`` (0-based), for ``torch.optim.lr_scheduler.LambdaLR``.

    Warm-up: update ``s < warmup_steps`` uses ``(s + 1) / warmup_steps``. Then, with
    ``p = (s - warmup_steps) / (total_steps - warmup_steps)``: ``"constant"`` 1, ``"linear"``
    ``1 - p``, ``"cosine"`` ``(1 + cos(pi p)) / 2``.
    """
    if kind not in LR_SCHEDULERS:
        raise ValueError(f"lr_scheduler: expected one of {LR_SCHEDULERS}, got {kind!r}")
    span = max(1, total_steps - warmup_steps)

    def factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        p = min(1.0, (s - warmup_steps) / span)
        if kind == "linear":
            return 1.0 - p
        return 0.5 * (1.0 + math.cos(math.pi * p))

    return factor


class _Window:
    """Pair-weighted train metrics over the optimizer steps since the last log line."""

    def __init__(self) -> None:
        self.pairs = 0.0
        self.sums: dict[str, float] = {}
        self.grad = 0.0
        self.steps = 0
        self.skipped = 0
        self.lr = math.nan

    def add(self, m: dict[str, float]) -> None:
        self.lr = m["lr"]
        if m["skipped"]:
            self.skipped += 1
            return
        n = m["num_pairs"]
        self.pairs += n
        self.steps += 1
        self.grad += m["grad_norm"]
        for k, v in m.items():
            if k in RECORD_METRICS or k.startswith("loss_"):
                self.sums[k] = self.sums.get(k, 0.0) + v * n

    def metrics(self) -> dict[str, float]:
        out = {k: v / self.pairs for k, v in self.sums.items()} if self.pairs else {}
        out["grad_norm"] = self.grad / self.steps if self.steps else math.nan
        out["lr"] = self.lr
        out["skipped"] = self.skipped
        return out

    def __bool__(self) -> bool:
        return bool(self.steps or self.skipped)


def _stand_in_loss(trainer: Trainer, cached_reference: bool) -> torch.Tensor:
    """The loss of :func:`stand_in_batch` (for a rank whose micro-batch was emptied).

    Runs the policy (and a live reference, which may be sharded) like any batch; the running
    BCO shift is left as it was.
    """
    bco = trainer.bco_reward_sum, trainer.bco_reward_count
    ref = torch.zeros(2) if cached_reference else None
    loss, _ = trainer._loss(stand_in_batch(), training=True, ref=ref, nan_loss=True)
    trainer.bco_reward_sum, trainer.bco_reward_count = bco
    assert loss is not None
    return loss


def fit_step(
    trainer: Trainer, batches: list[PairBatch], reference: CachedReference | None, step: int
) -> dict[str, float]:
    """One optimizer step over the micro-batches ``batches`` (gradient accumulation).

    Each micro-batch's mean loss is weighted by ``n_i / N`` (``N``: the pairs of the whole
    step over all ranks), and its ``sft`` token mean divides by the step's mean chosen length,
    so the update equals that of one batch of their union. Returns
    the step's pair-weighted metrics plus ``grad_norm``, ``skipped``, ``lr``, ``num_pairs``.
    """
    model = trainer.model
    device = next(model.parameters()).device
    _, world = rank_world()
    pairs = float(sum(b.num_pairs for b in batches))
    tokens = float(sum(int(b.chosen_lengths.sum()) for b in batches))
    total, chosen_tokens = all_reduce([pairs, tokens], device)
    # sft is a token mean over the whole step: every micro-batch divides by the step's mean
    # chosen length, so each one counts by its share of the chosen tokens.
    sft_mean_length = chosen_tokens / total if total else None
    # Alone, batches that truncation emptied are left out. Under torch.distributed every rank
    # runs each micro-batch, an emptied one as a zero-weight stand-in, so that all ranks join
    # the same gradient reductions (and FSDP gathers) even when one rank lost its pairs.
    if total == 0:
        work: list[PairBatch] = []
    elif process_group() is None:
        work = [b for b in batches if b.num_pairs]
    else:
        work = batches
    keys = trainer._metric_keys()
    sums = dict.fromkeys(keys, 0.0)
    lr = float(trainer.optimizer.param_groups[0]["lr"])
    model.train()
    trainer.optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(work):
        n = batch.num_pairs
        with gradient_sync(model, sync=i == len(work) - 1):
            if n:
                ref = reference(batch) if reference is not None else None
                loss, metrics = trainer._loss(
                    batch, training=True, ref=ref, nan_loss=True, sft_mean_length=sft_mean_length
                )
            else:
                loss = _stand_in_loss(trainer, reference is not None)
            assert loss is not None
            (loss * (n * world / total)).backward()
        if n:
            for k in keys:
                sums[k] += metrics.get(k, math.nan) * n
    grad_norm = trainer._clip_gradients() if work else math.nan
    bad_here = not (math.isfinite(grad_norm) and math.isfinite(sums["loss"]))
    *sums_all, bad_ranks = all_reduce([*(sums[k] for k in keys), float(bad_here)], device)
    bad = total == 0 or bad_ranks > 0
    if bad:
        trainer.skipped_steps += 1
        trainer.optimizer.zero_grad(set_to_none=True)
        reason = (
            "every pair was dropped by truncation" if total == 0 else "non-finite loss or gradient"
        )
        warnings.warn(f"step {step + 1}: {reason}; update skipped", RuntimeWarning, stacklevel=3)
    else:
        trainer.optimizer.step()
        trainer.global_step += 1
        trainer._after_update()
    out = {k: (v / total if total else math.nan) for k, v in zip(keys, sums_all, strict=True)}
    out.update(grad_norm=grad_norm, skipped=float(bad), lr=lr, num_pairs=total)
    return out


def evaluate(
    trainer: Trainer,
    dataset: PreferenceDataset,
    plan_kw: dict[str, Any],
    collate_kw: dict[str, Any],
    reference: CachedReference | None,
) -> dict[str, float]:
    """Pair-weighted metrics over the whole ``dataset`` (all ranks), policy in eval mode."""
    rank, world = rank_world()
    plan = dataset.batches(shuffle=False, rank=rank, world_size=world, **plan_kw)
    keys = trainer._metric_keys()
    sums = dict.fromkeys(keys, 0.0)
    pairs = dropped = 0
    model = unwrap(trainer.model)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            for idx in plan:
                batch = dataset.collate(idx, **collate_kw)
                b = batch.num_pairs
                dropped += len(idx) - b
                if b == 0:
                    if process_group() is not None:  # keep step with the other ranks' forwards
                        ref = torch.zeros(2) if reference is not None else None
                        trainer._loss(stand_in_batch(), ref=ref)
                    continue
                ref = reference(batch) if reference is not None else None
                _, metrics = trainer._loss(batch, ref=ref)
                for k in keys:
                    sums[k] += metrics.get(k, math.nan) * b
                pairs += b
    finally:
        for m, mode in modes:
            m.training = mode
    device = next(model.parameters()).device
    totals = all_reduce([float(pairs), float(dropped), *(sums[k] for k in keys)], device)
    n = totals[0]
    out = {k: (v / n if n else math.nan) for k, v in zip(keys, totals[2:], strict=True)}
    out["num_pairs"] = int(n)
    out["num_dropped"] = int(totals[1])
    return out


def _check_resume(trainer: Trainer, meta: dict[str, Any], run_args: dict[str, Any]) -> None:
    saved = meta.get("fit", {})
    for key in RESUME_STRICT:
        if saved.get(key) != run_args[key]:
            raise ValueError(
                f"resume_from: the checkpoint was written with {key}={saved.get(key)!r}, "
                f"this call has {key}={run_args[key]!r}; resuming needs the same value"
            )
    changed = [k for k in RESUME_LOOSE if saved.get(k) != run_args[k]]
    if meta.get("config") != json.loads(json.dumps(asdict(trainer.config))):
        changed.append("the trainer config")
    if changed:
        warnings.warn(
            f"resume_from: {', '.join(changed)} differ from the checkpoint; the run will not "
            "match an uninterrupted one",
            UserWarning,
            stacklevel=5,
        )


class _Run:
    """One :func:`fit` call: the plan, the position in it, counters, schedule, logs, checkpoints."""

    def __init__(
        self,
        trainer: Trainer,
        train: PreferenceDataset,
        eval_dataset: PreferenceDataset | None,
        cfg: FitConfig,
        callback: Callable[[int, dict[str, float]], None] | None,
    ) -> None:
        self.trainer, self.train, self.eval_dataset = trainer, train, eval_dataset
        self.cfg, self.callback = cfg, callback
        self.report_to = report_to_names(cfg.report_to)
        require_trackers(self.report_to)  # every rank: a missing client fails before any work
        self.scheduler: Any = None
        self.bar: Any = None
        self.writer: MetricsWriter | None = None
        self.trackers: Trackers | None = None
        rank, world = rank_world()
        self.main = rank == 0
        self.out_dir = Path(cfg.output_dir) if cfg.output_dir is not None else None
        self.data_kw = cfg.data_kwargs()
        self.collate_kw = trainer._collate_kwargs(self.data_kw)
        self.eval_plan_kw = cfg.plan_kwargs()  # fit requires batch_size or max_tokens
        plan_kw = dict(self.eval_plan_kw, seed=cfg.seed, rank=rank, world_size=world)
        # Each epoch is planned once: its length sets the schedule, its batches feed the loop.
        self.plans = [train.batches(epoch=e, **plan_kw) for e in range(cfg.epochs)]
        gas = cfg.gradient_accumulation_steps
        steps = sum(math.ceil(len(p) / gas) for p in self.plans)
        self.total = steps if cfg.max_steps is None else min(steps, cfg.max_steps)
        self.run_args = cfg.run_args(world)
        self.step = self.epoch = self.batch_idx = 0
        self.run_skipped = self.consecutive = 0
        self.elapsed = 0.0
        self.resumed = False

    def setup(self) -> None:
        """Resume (when asked), then build the optimizer's schedule, the writer and the bar."""
        trainer, cfg = self.trainer, self.cfg
        # Verified once here (rank 0 decides for all ranks); the loads below skip verifying.
        path = resume_checkpoint(cfg.resume_from, self.out_dir, unwrap(trainer.model))
        if path is not None:
            meta = load_checkpoint(path, rng=False, verify=False)
            _check_resume(trainer, meta, self.run_args)
        trainer._configure_optimizer(float(cfg.weight_decay))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            trainer.optimizer, schedule_factor(cfg.lr_scheduler, cfg.warmup_steps, self.total)
        )
        if path is not None:
            self._restore(path)
        if self.main and self.out_dir is not None:
            remove_partial(self.out_dir)
            resume_step = self.step if self.resumed else None
            tensorboard = self.report_to is None or "tensorboard" in self.report_to
            self.writer = MetricsWriter(
                self.out_dir, resume_step=resume_step, tensorboard=tensorboard
            )
        if self.main and self.report_to:
            config = run_config(trainer.config, cfg, world_size=self.run_args["world_size"])
            self.trackers = Trackers(self.report_to, config)
        self.bar = tqdm(
            total=self.total,
            initial=self.step,
            desc="DPO",
            unit="step",
            disable=not (cfg.progress and self.main),
            dynamic_ncols=True,
        )
        self.window = _Window()
        self.last_eval: dict[str, float] | None = None
        self.last_eval_step = self.last_save_step = -1
        self.last_record: dict[str, float] = {}
        self.checkpoint: Path | None = None
        self.epoch_pos = float(self.epoch)
        self.start = time.perf_counter() - self.elapsed

    def _restore(self, path: Path) -> None:
        trainer = self.trainer
        meta = load_checkpoint(
            path,
            model=unwrap(trainer.model),
            optimizer=trainer.optimizer,
            rng=self.main,
            verify=False,
            reference=trainer.ref_model if trainer.config.sync_ref_model else None,
        )
        self.scheduler.load_state_dict(meta["scheduler"])
        pos, counters = meta["position"], meta["counters"]
        self.step, self.epoch, self.batch_idx = (
            int(pos["step"]),
            int(pos["epoch"]),
            int(pos["batch"]),
        )
        trainer.global_step = int(counters["global_step"])
        trainer.skipped_steps = int(counters["skipped_steps"])
        self.run_skipped = int(counters["run_skipped"])
        self.consecutive = int(counters["consecutive_skips"])
        self.elapsed = float(counters["elapsed"])
        trainer.bco_reward_sum = float(meta["bco"]["sum"])
        trainer.bco_reward_count = int(meta["bco"]["count"])
        self.resumed = True

    def emit(self, split: str, metrics: dict[str, float]) -> None:
        if not self.main:
            return
        elapsed = time.perf_counter() - self.start
        record = make_record(split, self.step, self.epoch_pos, elapsed, metrics)
        tqdm.write(format_record(record), file=sys.stdout)
        if self.writer is not None:
            self.writer.write(record)
        if self.trackers is not None:
            self.trackers.log(record)

    def run_eval(self) -> None:
        assert self.eval_dataset is not None
        result = evaluate(
            self.trainer, self.eval_dataset, self.eval_plan_kw, self.collate_kw, self.eval_reference
        )
        self.emit("eval", result)
        self.last_eval, self.last_eval_step = result, self.step

    def save(self) -> None:
        if self.out_dir is None:
            return
        trainer = self.trainer
        state = {
            "rlox_version": __version__,
            "config": asdict(trainer.config),
            "optimizer": type(trainer.optimizer).__name__,
            "fit": self.run_args,
            "position": {"step": self.step, "epoch": self.epoch, "batch": self.batch_idx},
            "counters": {
                "global_step": trainer.global_step,
                "skipped_steps": trainer.skipped_steps,
                "run_skipped": self.run_skipped,
                "consecutive_skips": self.consecutive,
                "elapsed": time.perf_counter() - self.start,
            },
            "bco": {"sum": trainer.bco_reward_sum, "count": trainer.bco_reward_count},
            "scheduler": self.scheduler.state_dict(),
        }
        self.checkpoint = save_checkpoint(
            self.out_dir,
            self.step,
            model=unwrap(trainer.model),
            optimizer=trainer.optimizer,
            state=state,
            keep=self.cfg.save_total_limit,
            collective=True,
            reference=trainer.ref_model if trainer.reference_drifted else None,
        )
        self.last_save_step = self.step

    def one_step(self, plan: Any) -> None:
        """Take the next optimizer step of ``plan`` (an epoch's batches) and its bookkeeping."""
        gas = self.cfg.gradient_accumulation_steps
        end = min(self.batch_idx + gas, len(plan))
        group = [plan[j] for j in range(self.batch_idx, end)]
        self.batch_idx += len(group)
        batches = [self.train.collate(idx, **self.collate_kw) for idx in group]
        metrics = fit_step(self.trainer, batches, self.train_reference, self.step)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*lr_scheduler\.step\(\)")
            self.scheduler.step()
        self.step += 1
        self.epoch_pos = self.epoch + self.batch_idx / len(plan)
        if metrics["skipped"]:
            self.run_skipped += 1
            self.consecutive += 1
        else:
            self.consecutive = 0
        self.window.add(metrics)
        self.bar.update(1)
        if not metrics["skipped"]:
            self.bar.set_postfix(
                loss=f"{metrics['loss']:.4f}",
                acc=f"{metrics['reward_accuracy']:.2f}",
                refresh=False,
            )
        self._check_skips()
        self._after_step(metrics)

    def _check_skips(self) -> None:
        limit = self.cfg.max_consecutive_skips
        if limit is not None and self.consecutive >= limit:
            raise RuntimeError(
                f"step {self.step}: the last {self.consecutive} optimizer steps were all skipped "
                "(non-finite loss or gradient, or every pair dropped by truncation); "
                "the weights are those of the last good step. Lower the learning "
                "rate, check the data, model and max_length, or raise "
                "max_consecutive_skips"
            )

    def _after_step(self, metrics: dict[str, float]) -> None:
        """Log, evaluate, checkpoint and call back, each at its cadence."""
        cfg, step = self.cfg, self.step
        if cfg.log_every is not None and step % cfg.log_every == 0:
            self.last_record = self.window.metrics()
            self.emit("train", self.last_record)
            self.window = _Window()
        if self.eval_dataset is not None and cfg.eval_every is not None:
            if step % cfg.eval_every == 0:
                self.run_eval()
        if cfg.save_every is not None and step % cfg.save_every == 0:
            self.save()
        if self.callback is not None:
            self.callback(step, metrics)

    def loop(self) -> None:
        """Resolve the reference caches, run every remaining step, then log, evaluate and save."""
        trainer = self.trainer
        # Both reference sources are resolved before any step, so a missing cache fails fast.
        with trainer._reference_weights.hashed_once():
            self.train_reference = trainer._reference_source(self.train, self.data_kw)
            self.eval_reference = None
            if self.eval_dataset is not None:
                self.eval_reference = trainer._reference_source(self.eval_dataset, self.data_kw)
        while self.step < self.total and self.epoch < self.cfg.epochs:
            plan = self.plans[self.epoch]
            while self.batch_idx < len(plan) and self.step < self.total:
                self.one_step(plan)
            if self.batch_idx >= len(plan):
                self.epoch, self.batch_idx = self.epoch + 1, 0
                self.epoch_pos = float(self.epoch)
        if self.window:
            self.last_record = self.window.metrics()
            if self.cfg.log_every is not None:
                self.emit("train", self.last_record)
        if self.eval_dataset is not None and self.last_eval_step != self.step:
            self.run_eval()
        if self.out_dir is not None and self.last_save_step != self.step:
            self.save()

    def close(self, failed: bool = False) -> None:
        """Put back the learning rate (the schedule may end at 0); close the bar, the writer and
        the trackers (``failed``: the run raised). Works after a ``setup`` cut short too."""
        if self.scheduler is not None:
            for group, base in zip(
                self.trainer.optimizer.param_groups, self.scheduler.base_lrs, strict=True
            ):
                group["lr"] = base
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.trackers is not None:
            self.trackers.close(failed)

    def result(self) -> FitResult:
        return FitResult(
            steps=self.step,
            epochs=self.epoch_pos,
            skipped=self.run_skipped,
            metrics=self.last_record,
            eval=self.last_eval,
            checkpoint=self.checkpoint,
            seconds=time.perf_counter() - self.start,
        )


def fit(
    trainer: Trainer,
    train_dataset: PreferenceDataset,
    eval_dataset: PreferenceDataset | None,
    cfg: FitConfig,
    callback: Callable[[int, dict[str, float]], None] | None,
) -> FitResult:
    """Run :meth:`DPO.fit` with validated options ``cfg`` (see its docstring)."""
    run = _Run(trainer, train_dataset, eval_dataset, cfg, callback)
    previous_autocast = trainer._autocast
    failed = True
    try:
        run.setup()
        trainer._autocast = cfg.autocast
        run.loop()
        failed = False
    finally:
        trainer._autocast = previous_autocast
        run.close(failed)
    return run.result()
