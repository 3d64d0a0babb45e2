"""Option dataclasses: one source of names, defaults, validation and help for every front end.

:class:`DPOConfig` holds a trainer's hyper-parameters. :class:`EvalConfig`,
:class:`ReferenceConfig` and :class:`FitConfig` hold the keyword options of
:meth:`rlox.DPO.evaluate`, :meth:`~rlox.DPO.precompute_reference` and :meth:`~rlox.DPO.fit`;
each validates itself on construction and turns into the keyword dicts of
:meth:`rlox.PreferenceDataset.batches` / :meth:`~rlox.PreferenceDataset.collate`. Every field
carries ``metadata={"help": ...}``. A new option of ``fit`` is a new field of :class:`FitConfig`.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from rlox.attention import check_attention
from rlox.losses import LOSS_DEFAULTS
from rlox.trackers import report_to_names

__all__ = [
    "AUTOCAST",
    "LR_SCHEDULERS",
    "RESUME_LOOSE",
    "RESUME_STRICT",
    "DPOConfig",
    "DataConfig",
    "EvalConfig",
    "FitConfig",
    "ReferenceConfig",
]

LR_SCHEDULERS = ("constant", "linear", "cosine")
AUTOCAST: dict[str | None, torch.dtype | None] = {None: None, "bf16": torch.bfloat16}
# fit() options that fix the data order and the optimizer's shape: resuming needs them unchanged.
RESUME_STRICT = (
    "batch_size",
    "max_tokens",
    "layout",
    "max_length",
    "max_prompt_length",
    "truncation",
    "pack_length",
    "pad_to_multiple_of",
    "seed",
    "gradient_accumulation_steps",
    "world_size",
    "weight_decay",
)
# fit() options that may change on resume (the run then differs from an uninterrupted one).
RESUME_LOOSE = ("epochs", "max_steps", "lr_scheduler", "warmup_steps", "mixed_precision")


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


def _check_count(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")


def _check_mixed_precision(value: Any) -> None:
    if value not in AUTOCAST:
        raise ValueError(f"mixed_precision: expected None or 'bf16', got {value!r}")


@dataclass(frozen=True)
class DPOConfig:
    """Hyper-parameters of a :class:`~rlox.DPO` trainer (saved with checkpoints).

    The loss options are those of :func:`rlox.losses.dpo_loss`.
    """

    beta: float = 0.1
    learning_rate: float = 1e-4
    max_grad_norm: float | None = 1.0
    loss_type: str | tuple[str, ...] = "sigmoid"
    loss_weights: tuple[float, ...] | None = None
    label_smoothing: float = 0.0
    f_divergence: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    reference_free: bool = False
    simpo_gamma: float = 0.5
    cpo_alpha: float = 1.0
    orpo_alpha: float = 0.1
    rpo_alpha: float | None = None
    discopop_tau: float = 0.05
    ld_alpha: float | None = None
    pad_token_id: int | None = None
    disable_dropout: bool = True
    use_weighting: bool = False
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512
    router_aux_loss_coef: float | None = None
    bco_running_mean: bool = False
    attention: str = "auto"
    logits_chunk_size: int | None = None
    gradient_checkpointing: bool = False
    activation_offloading: bool = False
    compile: bool = False

    @classmethod
    def from_arguments(cls, kwargs: dict[str, Any]) -> DPOConfig:
        """The config of :class:`~rlox.DPO`'s keyword arguments: lists become tuples, and
        ``ld_alpha`` is checked (the loss options are checked by ``check_loss_options``)."""
        kw = dict(kwargs)
        loss_type, weights, ld_alpha = kw["loss_type"], kw["loss_weights"], kw["ld_alpha"]
        if not isinstance(loss_type, str) and isinstance(loss_type, list | tuple):
            kw["loss_type"] = tuple(loss_type)
        if weights is not None and isinstance(weights, list | tuple):
            kw["loss_weights"] = tuple(float(w) for w in weights)
        if ld_alpha is not None:
            if isinstance(ld_alpha, bool) or not isinstance(ld_alpha, int | float):
                raise TypeError(
                    f"ld_alpha: expected a float or None, got {type(ld_alpha).__name__}"
                )
            if not 0.0 <= ld_alpha <= 1.0:
                raise ValueError(f"ld_alpha: must be in [0, 1], got {ld_alpha}")
            kw["ld_alpha"] = float(ld_alpha)
        return cls(**kw)

    def checked(self) -> DPOConfig:
        """This config after the optimizer and padding checks, with its floats as floats."""
        lr, max_norm, pad = self.learning_rate, self.max_grad_norm, self.pad_token_id
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"learning_rate: must be > 0, got {lr}")
        if max_norm is not None and not max_norm > 0:
            raise ValueError(f"max_grad_norm: must be > 0 or None, got {max_norm}")
        if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int)):
            raise TypeError(f"pad_token_id: expected an int or None, got {type(pad).__name__}")
        flags = ("disable_dropout", "use_weighting", "sync_ref_model", "bco_running_mean")
        for name in (*flags, "gradient_checkpointing", "activation_offloading", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(
                    f"{name}: expected a bool, got {type(getattr(self, name)).__name__}"
                )
        check_attention(self.attention)
        alpha, coef = self.ref_model_mixup_alpha, self.router_aux_loss_coef
        if isinstance(alpha, bool) or not isinstance(alpha, int | float):
            raise TypeError(f"ref_model_mixup_alpha: expected a float, got {type(alpha).__name__}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"ref_model_mixup_alpha: must be in (0, 1], got {alpha}")
        _check_count("ref_model_sync_steps", self.ref_model_sync_steps, 1)
        if self.logits_chunk_size is not None:
            _check_count("logits_chunk_size", self.logits_chunk_size, 0)
        if coef is not None:
            if isinstance(coef, bool) or not isinstance(coef, int | float):
                raise TypeError(
                    f"router_aux_loss_coef: expected a float or None, got {type(coef).__name__}"
                )
            if not (coef >= 0 and math.isfinite(coef)):
                raise ValueError(f"router_aux_loss_coef: must be a finite float >= 0, got {coef}")
            coef = float(coef)
        return replace(
            self,
            ref_model_mixup_alpha=float(alpha),
            router_aux_loss_coef=coef,
            beta=float(self.beta),
            learning_rate=float(lr),
            max_grad_norm=None if max_norm is None else float(max_norm),
            label_smoothing=float(self.label_smoothing),
        )

    def loss_options(self) -> dict[str, Any]:
        """The keyword options of :func:`rlox.losses.dpo_loss`."""
        keys = set(LOSS_DEFAULTS) - {"bco_delta"}
        opts = {k: v for k, v in asdict(self).items() if k in keys}
        if not isinstance(self.loss_type, str):
            opts["loss_type"] = list(self.loss_type)
        if self.loss_weights is not None:
            opts["loss_weights"] = list(self.loss_weights)
        return opts


@dataclass(frozen=True)
class DataConfig:
    """How each pair is truncated and laid out in a batch (see ``PreferenceDataset.collate``)."""

    layout: str = _opt("padded", "batch layout: padded, packed or prefix_shared")
    max_length: int | None = _opt(
        None,
        "longest prompt + completion sequence, in tokens (unset: the smaller of the model's "
        "positions and the longest sequence in the data)",
    )
    max_prompt_length: int | None = _opt(None, "cut prompts to this many tokens first")
    truncation: str = _opt("keep_end", "which prompt tokens to keep: keep_end or keep_start")
    pack_length: int | None = _opt(
        None, "tokens per row: packed (default max_length), prefix_shared (default one pair)"
    )
    pad_to_multiple_of: int | None = _opt(None, "round each batch's length up to a multiple")

    def data_kwargs(self) -> dict[str, Any]:
        """The truncation and layout keywords (``packed`` rows default to ``max_length``)."""
        pack_length = self.pack_length
        if self.layout == "packed" and pack_length is None:
            pack_length = self.max_length
        return {
            "layout": self.layout,
            "max_length": self.max_length,
            "max_prompt_length": self.max_prompt_length,
            "truncation": self.truncation,
            "pad_to_multiple_of": self.pad_to_multiple_of,
            "pack_length": pack_length,
        }


@dataclass(frozen=True)
class EvalConfig(DataConfig):
    """Options of :meth:`rlox.DPO.evaluate`: one pass over a dataset without training."""

    batch_size: int | None = _opt(None, "pairs per batch (16 when max_tokens is not set either)")
    max_tokens: int | None = _opt(None, "tokens per batch instead of a pair count")
    mixed_precision: str | None = _opt(None, "bf16 runs the model forwards under autocast")

    def __post_init__(self) -> None:
        _check_mixed_precision(self.mixed_precision)

    @property
    def autocast(self) -> torch.dtype | None:
        """The ``torch.autocast`` dtype of ``mixed_precision`` (None: full precision)."""
        return AUTOCAST[self.mixed_precision]

    def plan_kwargs(self) -> dict[str, Any]:
        """Keywords of ``PreferenceDataset.batches`` (without rank, seed and shuffling)."""
        batch_size = self.batch_size
        if batch_size is None and self.max_tokens is None:
            batch_size = 16
        return dict(self.data_kwargs(), batch_size=batch_size, max_tokens=self.max_tokens)


@dataclass(frozen=True)
class ReferenceConfig(EvalConfig):
    """Options of :meth:`rlox.DPO.precompute_reference`."""

    progress: bool = _opt(True, "show a progress bar")


@dataclass(frozen=True)
class FitConfig(EvalConfig):
    """Options of :meth:`rlox.DPO.fit` (see its docstring for what each does)."""

    epochs: int = _opt(1, "passes over the training data")
    gradient_accumulation_steps: int = _opt(1, "batches per optimizer step")
    lr_scheduler: str = _opt("constant", "learning-rate schedule: constant, linear or cosine")
    warmup_steps: int = _opt(0, "optimizer steps of linear warm-up")
    weight_decay: float = _opt(0.0, "> 0: AdamW, decaying weights of 2 or more dimensions only")
    seed: int = _opt(0, "seed of the data order")
    log_every: int | None = _opt(10, "log train metrics every this many steps")
    eval_every: int | None = _opt(None, "evaluate every this many steps (and at the end)")
    save_every: int | None = _opt(None, "checkpoint every this many steps (and at the end)")
    save_total_limit: int | None = _opt(3, "keep this many newest checkpoints")
    output_dir: str | os.PathLike[str] | None = _opt(None, "metrics and checkpoints directory")
    resume_from: str | os.PathLike[str] | None = _opt(
        None, "'latest' (newest verified checkpoint in output_dir) or a checkpoint directory"
    )
    max_consecutive_skips: int | None = _opt(10, "raise after this many skipped steps in a row")
    progress: bool = _opt(True, "show a progress bar")
    max_steps: int | None = _opt(None, "stop after this many optimizer steps")
    report_to: str | list[str] | tuple[str, ...] | None = _opt(
        None,
        "experiment trackers: tensorboard, wandb, mlflow, a list of them, or 'none' "
        "(unset: TensorBoard when installed)",
    )

    def __post_init__(self) -> None:
        _check_count("epochs", self.epochs, 1)
        _check_count("gradient_accumulation_steps", self.gradient_accumulation_steps, 1)
        _check_count("warmup_steps", self.warmup_steps, 0)
        _check_count("seed", self.seed, 0)
        for name in (
            "log_every",
            "eval_every",
            "save_every",
            "save_total_limit",
            "max_consecutive_skips",
            "max_steps",
        ):
            _check_count(name, getattr(self, name), 1, allow_none=True)
        if self.batch_size is None and self.max_tokens is None:
            raise ValueError("batch_size: give batch_size (pairs) or max_tokens (tokens per batch)")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(
                f"lr_scheduler: expected one of {LR_SCHEDULERS}, got {self.lr_scheduler!r}"
            )
        _check_mixed_precision(self.mixed_precision)
        if not (isinstance(self.weight_decay, int | float) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay: must be >= 0, got {self.weight_decay!r}")
        if self.output_dir is None and (
            self.save_every is not None or self.resume_from == "latest"
        ):
            what = "save_every" if self.save_every is not None else "resume_from='latest'"
            raise ValueError(f"output_dir: {what} needs an output directory")
        trackers = report_to_names(self.report_to)
        if self.output_dir is None and trackers is not None and "tensorboard" in trackers:
            raise ValueError("output_dir: report_to='tensorboard' needs an output directory")

    def run_args(self, world_size: int) -> dict[str, Any]:
        """The options a checkpoint records (``fit`` in ``checkpoint.json``) to check a resume."""
        data = self.data_kwargs()
        return {
            "batch_size": self.batch_size,
            "max_tokens": self.max_tokens,
            "layout": self.layout,
            "max_length": self.max_length,
            "max_prompt_length": self.max_prompt_length,
            "truncation": self.truncation,
            "pack_length": data["pack_length"],
            "pad_to_multiple_of": self.pad_to_multiple_of,
            "seed": self.seed,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "world_size": world_size,
            "weight_decay": float(self.weight_decay),
            "epochs": self.epochs,
            "max_steps": self.max_steps,
            "lr_scheduler": self.lr_scheduler,
            "warmup_steps": self.warmup_steps,
            "mixed_precision": self.mixed_precision,
        }
