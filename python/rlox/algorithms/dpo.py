"""Direct Preference Optimization (Rafailov et al., 2023) for PyTorch causal language models."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import os
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from rlox import __version__, _rlox
from rlox.attention import attention_mask
from rlox.checkpoint import (
    full_state,
    full_tensor,
    is_sharded,
    load_checkpoint,
    load_optimizer_state,
    load_weights,
    optimizer_keys,
    reading,
    remove_partial,
    resume_checkpoint,
    save_checkpoint,
    save_weights,
    verify_checkpoint,
)
from rlox.data import PairBatch, PreferenceDataset, batch_from_arrays
from rlox.losses import LOSS_DEFAULTS, check_loss_options, dpo_loss
from rlox.manifest import MANIFEST, ManifestWriter
from rlox.optimizers import build_optimizer, check_optimizer, optimizer_groups
from rlox.tracking import MetricsWriter, format_record, make_record

_METRICS = (
    "loss",
    "chosen_reward",
    "rejected_reward",
    "reward_margin",
    "reward_accuracy",
    "chosen_logps",
    "rejected_logps",
)


def _as_ids(name: str, x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{name}: token ids must be an integer tensor, got {x.dtype}")
        x = x.detach().cpu().numpy()
    elif not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except ValueError as e:
            raise ValueError(f"{name}: rows must all have the same length ({e})") from None
    if x.dtype.kind not in "iu":
        raise TypeError(f"{name}: token ids must be integers, got dtype {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"{name}: must be 2-D (B, T), got shape {x.shape}")
    return x


def collate_pairs(
    prompt: Any,
    chosen: Any,
    rejected: Any,
    *,
    pad_token_id: int | None = None,
    vocab_size: int | None = None,
) -> PairBatch:
    """Re-pack (B, P) prompts and (B, C)/(B, R) completions into one (2B, L) batch (in Rust).

    With ``pad_token_id`` set, pads may sit on either side of a prompt row and at the right end of
    completion rows; they are removed, so a pad is never context and never a target. Ids equal to
    the pad id inside a row are kept as real tokens.
    """
    out = _rlox.collate_pairs(
        _as_ids("prompt", prompt),
        _as_ids("chosen", chosen),
        _as_ids("rejected", rejected),
        pad_token_id=pad_token_id,
        vocab_size=vocab_size,
    )
    return batch_from_arrays(out, "padded")


def model_vocab_size(model: nn.Module) -> int | None:
    """An upper bound on the token ids ``model`` accepts, or None if it cannot be told.

    ``model.config.vocab_size`` or the input embedding where the model names them, else the
    largest ``nn.Embedding`` in the model (no valid id is ever at or above it).
    """
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(size, int):
        return size
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        emb = get()
        if isinstance(emb, nn.Embedding):
            return emb.num_embeddings
    sizes = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
    return max(sizes) if sizes else None


def _accepted_kwargs(model: nn.Module) -> frozenset[str]:
    params = inspect.signature(model.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return frozenset({"attention_mask", "position_ids"})
    return frozenset(params) & {"attention_mask", "position_ids", "use_cache", "logits_at"}


def _forward_kwargs(batch: PairBatch, accepted: frozenset[str], model: nn.Module) -> dict[str, Any]:
    """Keywords for ``model``'s forward; the mask suits its attention (:mod:`rlox.attention`)."""
    if batch.layout != "padded" and not {"attention_mask", "position_ids"} <= accepted:
        raise TypeError(
            f"model: the {batch.layout} layout needs a forward that accepts attention_mask "
            "(an (R, 1, L, L) mask, see rlox.attention) and position_ids"
        )
    kwargs: dict[str, Any] = {}
    if "attention_mask" in accepted:
        kwargs["attention_mask"] = attention_mask(model, batch)
    if "position_ids" in accepted:
        kwargs["position_ids"] = batch.position_ids
    if "use_cache" in accepted:
        kwargs["use_cache"] = False
    return kwargs


def _as_logits(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(
        f"model: forward must return logits (B, T, V) or an object with .logits, got {type(out).__name__}"
    )


def _is_peft(model: nn.Module) -> bool:
    """Whether ``model`` is a peft ``PeftModel`` (it can run with its adapters disabled)."""
    return callable(getattr(model, "get_base_model", None)) and callable(
        getattr(model, "disable_adapter", None)
    )


def _is_fsdp_root(model: nn.Module) -> bool:
    """Whether ``model`` itself was sharded with FSDP2 ``fully_shard``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def _split_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder, lm_head) of a Hugging Face causal LM whose logits are lm_head(last hidden)."""
    if _is_fsdp_root(model):
        # Calling the parts directly would skip the root's hook that gathers its own shards
        # (embeddings, final norm, head): run the whole forward instead.
        return None
    if _is_peft(model):
        # LoRA-style adapters live inside the wrapped model; prompt learning adds virtual tokens
        # in PeftModel.forward, which must then run in full.
        configs = getattr(model, "peft_config", {}) or {}
        if any(getattr(c, "is_prompt_learning", False) for c in configs.values()):
            return None
        return _split_head(model.get_base_model())
    base = getattr(model, "base_model", None)
    get_head = getattr(model, "get_output_embeddings", None)
    config = getattr(model, "config", None)
    if not isinstance(base, nn.Module) or base is model or not callable(get_head):
        return None
    head = get_head()
    if not isinstance(head, nn.Linear) or config is None:
        return None
    if getattr(config, "is_encoder_decoder", False):
        return None
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(config, attr, None) not in (None, 1, 1.0):
            return None
    return base, head


def _plan_logits(model: nn.Module, batch: PairBatch, accepted: frozenset[str]) -> Tensor:
    """(N, V) logits at the gather plan's (row, position) points only, where the model allows."""
    kwargs = _forward_kwargs(batch, accepted, model)
    points = (batch.plan_row, batch.plan_position)
    if "logits_at" in accepted:
        return model(batch.input_ids, logits_at=points, **kwargs)
    split = _split_head(model)
    if split is not None:
        base, head = split
        out = base(batch.input_ids, **kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return head(hidden[points])
    logits = _as_logits(model(batch.input_ids, **kwargs))
    rows, length = batch.input_ids.shape
    if logits.dim() != 3 or logits.shape[:2] != (rows, length):
        raise ValueError(
            f"model: expected logits of shape ({rows}, {length}, V), got {tuple(logits.shape)}"
        )
    return logits[points]


def _ld_weights(batch: PairBatch, ld_alpha: float) -> Tensor:
    """(N,) weight of each plan point: 1 within the shorter completion of its pair, else alpha.

    A token's place in its completion is its rank among the plan points of its sequence, so
    this holds in every layout.
    """
    b = batch.num_pairs
    seq = batch.plan_side * b + batch.plan_pair
    n = seq.shape[0]
    stride = int(batch.plan_position.max()) + 1 if n else 1
    order = torch.argsort(seq * stride + batch.plan_position)
    counts = torch.bincount(seq, minlength=2 * b)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(seq)
    rank[order] = torch.arange(n, device=seq.device) - starts[seq[order]]
    shorter = torch.minimum(counts[:b], counts[b:])
    inside = rank < shorter[batch.plan_pair]
    return torch.where(inside, 1.0, ld_alpha).to(torch.float32)


def sequence_logps(
    model: nn.Module,
    batch: PairBatch,
    accepted: frozenset[str] | None = None,
    *,
    ld_alpha: float | None = None,
    autocast: torch.dtype | None = None,
) -> Tensor:
    """(2B,) float32 sums of log p(token | prefix) over each sequence's completion tokens.

    Entries ``0..B-1`` are the chosen sequences, ``B..2B-1`` the rejected ones, in any layout.
    Only the logits that predict completion tokens are normalised (the gather plan); with
    ``rlox.models.TinyCausalLM`` and Hugging Face causal LMs the LM head itself runs only there.
    With ``ld_alpha`` (LD-DPO, Liu et al. 2024) tokens beyond the shorter completion of each pair
    count with weight ``ld_alpha``. ``autocast`` (e.g. ``torch.bfloat16``) runs the model's
    forward under ``torch.autocast``; the log-softmax and sums stay in float32.
    """
    if accepted is None:
        accepted = _accepted_kwargs(model)
    device = next(model.parameters()).device
    targets = batch.plan_target
    # The largest target id, read where the batch lives now (no device sync for a CPU batch).
    top = int(targets.max()) if targets.numel() and targets.device.type == "cpu" else None
    batch = batch.to(device)
    b = batch.num_pairs
    if autocast is None:
        picked = _plan_logits(model, batch, accepted).float()
    else:
        with torch.autocast(device_type=device.type, dtype=autocast):
            picked = _plan_logits(model, batch, accepted)
        picked = picked.float()
    vocab = picked.shape[-1]
    if picked.dim() != 2 or picked.shape[0] != batch.plan_target.shape[0]:
        raise ValueError(f"model: expected ({batch.plan_target.shape[0]}, V) plan logits")
    if top is None and picked.shape[0]:
        top = int(batch.plan_target.max())
    if top is not None and top >= vocab:
        i = int((batch.plan_target >= vocab).nonzero()[0, 0])
        side = "chosen" if int(batch.plan_side[i]) == 0 else "rejected"
        raise ValueError(
            f"{side}[{int(batch.plan_pair[i])}]: token id is outside the model's vocabulary (V={vocab})"
        )
    token_logps = picked.gather(1, batch.plan_target[:, None]).squeeze(1) - picked.logsumexp(-1)
    if ld_alpha is not None and ld_alpha != 1.0:
        token_logps = token_logps * _ld_weights(batch, ld_alpha)
    index = batch.plan_side * b + batch.plan_pair
    return torch.zeros(2 * b, dtype=torch.float32, device=device).index_add_(0, index, token_logps)


@dataclass(frozen=True)
class DPOConfig:
    """Hyper-parameters of a :class:`DPO` trainer (saved with checkpoints).

    The loss options are those of :func:`rlox.losses.dpo_loss`.
    """

    beta: float = 0.1
    learning_rate: float = 1e-4
    max_grad_norm: float | None = 1.0
    loss_type: str | tuple[str, ...] = "sigmoid"
    loss_weights: tuple[float, ...] | None = None
    label_smoothing: float = 0.0
    f_divergence: str = "reverse_kl"
    f_alpha_divergence_coef: float = 1.0
    reference_free: bool = False
    simpo_gamma: float = 0.5
    cpo_alpha: float = 1.0
    orpo_alpha: float = 0.1
    rpo_alpha: float | None = None
    discopop_tau: float = 0.05
    ld_alpha: float | None = None
    pad_token_id: int | None = None

    def loss_options(self) -> dict[str, Any]:
        """The keyword options of :func:`rlox.losses.dpo_loss`."""
        keys = set(LOSS_DEFAULTS) - {"bco_delta"}
        opts = {k: v for k, v in asdict(self).items() if k in keys}
        if not isinstance(self.loss_type, str):
            opts["loss_type"] = list(self.loss_type)
        if self.loss_weights is not None:
            opts["loss_weights"] = list(self.loss_weights)
        return opts


LR_SCHEDULERS = ("constant", "linear", "cosine")
_AUTOCAST = {None: None, "bf16": torch.bfloat16}
# fit() arguments that fix the data order and the optimizer's shape: resuming needs them unchanged.
_RESUME_STRICT = (
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
# fit() arguments that may change on resume (the run then differs from an uninterrupted one).
_RESUME_LOOSE = ("epochs", "max_steps", "lr_scheduler", "warmup_steps", "mixed_precision")
_REFERENCE_DIR = "reference_logps"
_REFERENCE_FORMAT = "rlox-reference-logps"


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


class ReferenceLogps(NamedTuple):
    """Reference log-prob sums of every pair of a dataset (see :meth:`DPO.precompute_reference`)."""

    chosen: np.ndarray
    """(n,) float64; NaN for pairs that truncation drops."""
    rejected: np.ndarray
    """(n,) float64."""
    key: dict[str, Any]
    """What the values depend on: reference weights, data, truncation settings, ld_alpha."""
    path: Path | None
    """The ``.npy`` file next to the store, or None for an in-memory dataset."""


class _CachedReference:
    """Reads a batch's (2B,) reference log-probs from per-pair cached values."""

    def __init__(self, logps: np.ndarray) -> None:
        self.logps = torch.from_numpy(np.ascontiguousarray(logps, dtype=np.float64))

    def __call__(self, batch: PairBatch) -> Tensor:
        if batch.pair_index is None:
            raise ValueError("batch: cached reference log-probs need batches from dataset.collate")
        idx = batch.pair_index.cpu()
        return torch.cat([self.logps[0, idx], self.logps[1, idx]]).float()


def _stand_in_batch() -> PairBatch:
    """One pair of one-token prompt and completions (id 0) in the padded layout.

    A rank whose micro-batch truncation emptied runs it, weighted 0, in step with the others.
    """
    ids = np.zeros((1, 1), dtype=np.int64)
    return collate_pairs(ids, ids, ids)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper, else ``model``."""
    ddp = torch.nn.parallel.DistributedDataParallel
    return model.module if isinstance(model, ddp) else model


def _dist() -> Any:
    dist = torch.distributed
    return dist if dist.is_available() and dist.is_initialized() else None


def _rank_world() -> tuple[int, int]:
    dist = _dist()
    return (dist.get_rank(), dist.get_world_size()) if dist is not None else (0, 1)


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    """Sum a list of floats over all ranks; unchanged without torch.distributed."""
    dist = _dist()
    if dist is None:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def weights_digest(module: nn.Module, *, frozen_only: bool = False) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``module``'s parameters and buffers.

    ``frozen_only`` skips parameters with ``requires_grad`` (a peft model's adapters). Sharded
    (DTensor) tensors are hashed whole, so every rank of a sharded module gets the digest of the
    unsharded one (a collective: every rank must call it).
    """
    digest = hashlib.sha256()
    named = [*module.named_parameters(remove_duplicate=False)]
    named += module.named_buffers(remove_duplicate=False)
    for name, t in named:
        if frozen_only and isinstance(t, nn.Parameter) and t.requires_grad:
            continue
        data = full_tensor(t.detach()).cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{data.dtype}|{tuple(t.shape)}|".encode())
        digest.update(data.view(torch.uint8).numpy())
    return digest.hexdigest()


def _check_count(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")


def _check_dataset(name: str, dataset: Any) -> None:
    if not isinstance(dataset, PreferenceDataset):
        raise TypeError(f"{name}: expected a PreferenceDataset, got {type(dataset).__name__}")


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
            if k in _METRICS or k.startswith("loss_"):
                self.sums[k] = self.sums.get(k, 0.0) + v * n

    def metrics(self) -> dict[str, float]:
        out = {k: v / self.pairs for k, v in self.sums.items()} if self.pairs else {}
        out["grad_norm"] = self.grad / self.steps if self.steps else math.nan
        out["lr"] = self.lr
        out["skipped"] = self.skipped
        return out

    def __bool__(self) -> bool:
        return bool(self.steps or self.skipped)


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
            :func:`rlox.losses.dpo_loss`. ``bco_pair`` shifts rewards by their running mean over
            all steps so far.
        ld_alpha: LD-DPO weight of the tokens beyond the shorter completion of each pair
            (``None``: 1), applied where log-probs are summed, so in every layout.
        pad_token_id: id of padding in the input matrices (``None``: no padding).
        optimizer: a ready optimizer over ``model``'s parameters; Adam by default.
        precomputed_reference: without ``ref_model``, read the reference log-probs that
            :meth:`precompute_reference` stored with each dataset given to :meth:`fit` /
            :meth:`evaluate`.
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
        f_alpha_divergence_coef: float = 1.0,
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
    ) -> None:
        if not isinstance(loss_type, str) and isinstance(loss_type, list | tuple):
            loss_type = tuple(loss_type)
        if loss_weights is not None and isinstance(loss_weights, list | tuple):
            loss_weights = tuple(float(w) for w in loss_weights)
        if ld_alpha is not None:
            if isinstance(ld_alpha, bool) or not isinstance(ld_alpha, int | float):
                raise TypeError(
                    f"ld_alpha: expected a float or None, got {type(ld_alpha).__name__}"
                )
            if not 0.0 <= ld_alpha <= 1.0:
                raise ValueError(f"ld_alpha: must be in [0, 1], got {ld_alpha}")
        config = DPOConfig(
            beta=beta,
            learning_rate=learning_rate,
            max_grad_norm=max_grad_norm,
            loss_type=loss_type,
            loss_weights=loss_weights,
            label_smoothing=label_smoothing,
            f_divergence=f_divergence,
            f_alpha_divergence_coef=f_alpha_divergence_coef,
            reference_free=reference_free,
            simpo_gamma=simpo_gamma,
            cpo_alpha=cpo_alpha,
            orpo_alpha=orpo_alpha,
            rpo_alpha=rpo_alpha,
            discopop_tau=discopop_tau,
            ld_alpha=None if ld_alpha is None else float(ld_alpha),
            pad_token_id=pad_token_id,
        )
        self._loss_options = config.loss_options()
        info = check_loss_options(**self._loss_options)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        needs_reference = bool(info["needs_reference"])
        peft_reference = ref_model is None and needs_reference and _is_peft(_unwrap(model))
        if ref_model is None:
            if needs_reference and not (peft_reference or precomputed_reference):
                raise ValueError(
                    f"ref_model: loss_type {loss_type!r} compares the policy with a reference; "
                    "pass a frozen copy of the model (or reference_free=True, a peft model, "
                    "or precomputed_reference=True with DPO.precompute_reference)"
                )
        elif not isinstance(ref_model, nn.Module):
            raise TypeError(
                f"ref_model: expected a torch.nn.Module, got {type(ref_model).__name__}"
            )
        if ref_model is model:
            raise ValueError("ref_model: must be a separate frozen copy (copy.deepcopy(model))")
        if not (learning_rate > 0 and math.isfinite(learning_rate)):
            raise ValueError(f"learning_rate: must be > 0, got {learning_rate}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm: must be > 0 or None, got {max_grad_norm}")
        if pad_token_id is not None and (
            isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int)
        ):
            raise TypeError(
                f"pad_token_id: expected an int or None, got {type(pad_token_id).__name__}"
            )
        self.config = replace(
            config,
            beta=float(beta),
            learning_rate=float(learning_rate),
            max_grad_norm=None if max_grad_norm is None else float(max_grad_norm),
            label_smoothing=float(label_smoothing),
        )
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
        self.vocab_size = model_vocab_size(_unwrap(model))
        self._policy_kwargs = _accepted_kwargs(_unwrap(model))
        self._digest_cache: str | None = None
        self._warned_zero_lr = False
        self._digest_depth = 0
        if self.ref_model is not None:
            self._ref_kwargs: frozenset[str] | None = _accepted_kwargs(self.ref_model)
        else:
            self._ref_kwargs = self._policy_kwargs if peft_reference else None
        self._components = tuple(info["components"])
        self._uses_bco = any(t == "bco_pair" for t, _ in info["terms"])
        # Running mean of the rewards (BCO's shift): sum and count of all rewards seen in training.
        self.bco_reward_sum = 0.0
        self.bco_reward_count = 0
        self._autocast: torch.dtype | None = None

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
        """(2B,) float32 reference log-probs from the reference model or the adapter-free policy."""
        ld_alpha, autocast = self.config.ld_alpha, self._autocast
        if self.ref_model is not None:
            with torch.no_grad():
                return sequence_logps(
                    self.ref_model, batch, self._ref_kwargs, ld_alpha=ld_alpha, autocast=autocast
                )
        if self._peft_reference:
            model = _unwrap(self.model)
            modes = [(m, m.training) for m in model.modules()]
            model.eval()
            try:
                with model.disable_adapter(), torch.no_grad():
                    return sequence_logps(
                        model, batch, self._ref_kwargs, ld_alpha=ld_alpha, autocast=autocast
                    )
            finally:
                for m, mode in modes:
                    m.training = mode
        raise ValueError(
            "ref_model: this trainer has no reference model; its reference log-probs are read "
            "from DPO.precompute_reference caches, which only fit() and evaluate() use"
        )

    def _loss(
        self,
        batch: PairBatch,
        *,
        training: bool = False,
        ref: Tensor | None = None,
        nan_loss: bool = False,
    ) -> tuple[Tensor | None, dict[str, float]]:
        """The differentiable loss and the metrics.

        ``training`` folds the batch's rewards into the running BCO shift and runs the policy as
        given (a ``DistributedDataParallel`` wrapper included); otherwise the wrapped module
        runs. ``ref``: precomputed (2B,) reference log-probs. When log-probs are not finite the
        loss is None, or with ``nan_loss`` a NaN loss that still back-propagates (so that all
        ranks of a distributed run take part in the gradient reduction).
        """
        b = batch.num_pairs
        cfg = self.config
        # Training goes through a DDP wrapper (its gradient hooks); evaluation needs none.
        model = self.model if training else _unwrap(self.model)
        batch = batch.to(next(model.parameters()).device)  # once, for policy and reference
        policy = sequence_logps(
            model, batch, self._policy_kwargs, ld_alpha=cfg.ld_alpha, autocast=self._autocast
        )
        with torch.no_grad():
            if ref is None and self._needs_reference:
                ref = self._reference_logps(batch)
            if ref is not None:
                ref = ref.to(device=policy.device, dtype=policy.dtype)
            finite = torch.isfinite(policy).all()
            if ref is not None:
                finite &= torch.isfinite(ref).all()
        if not bool(finite):
            metrics = dict.fromkeys(_METRICS, math.nan)
            metrics["chosen_logps"] = policy[:b].detach().double().mean().item()
            metrics["rejected_logps"] = policy[b:].detach().double().mean().item()
            return (policy.sum() * math.nan if nan_loss else None), metrics
        options = dict(self._loss_options)
        if self._uses_bco:
            options["bco_delta"] = self._bco_delta(policy, ref, b, training)
        if "orpo" in self._components:
            # A log-prob that rounds to 0 has infinite odds; keep it just below.
            policy = policy.clamp(max=-1e-6)
        res = dpo_loss(
            policy[:b],
            policy[b:],
            None if ref is None else ref[:b],
            None if ref is None else ref[b:],
            chosen_lengths=batch.chosen_lengths.to(policy.device),
            rejected_lengths=batch.rejected_lengths.to(policy.device),
            **options,
        )
        with torch.no_grad():
            rc, rr = res.chosen_rewards.double(), res.rejected_rewards.double()
            values = [
                res.loss.detach().double(),
                rc.mean(),
                rr.mean(),
                (rc - rr).mean(),
                (rc > rr).double().mean(),
                policy[:b].detach().double().mean(),
                policy[b:].detach().double().mean(),
            ]
            names = list(_METRICS)
            if len(self._components) > 1:
                for name, value in res.component_losses.items():
                    names.append(f"loss_{name}")
                    values.append(torch.as_tensor(value, dtype=torch.float64, device=rc.device))
            stats = torch.stack(values).tolist()  # one device-to-host read for all metrics
        return res.loss, dict(zip(names, stats, strict=True))

    def _metric_keys(self) -> tuple[str, ...]:
        extra = tuple(f"loss_{c}" for c in self._components) if len(self._components) > 1 else ()
        return _METRICS + extra

    def _bco_delta(self, policy: Tensor, ref: Tensor | None, b: int, training: bool) -> float:
        """BCO's reward shift: the running mean of all rewards, including this batch's when training."""
        with torch.no_grad():
            u = policy.detach().double() - (0.0 if ref is None else ref.double())
            total, count = self.config.beta * float(u.sum()), 2 * b
        if training:
            self.bco_reward_sum += total
            self.bco_reward_count += count
            return self.bco_reward_sum / self.bco_reward_count
        if self.bco_reward_count == 0:
            return total / count
        return self.bco_reward_sum / self.bco_reward_count

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
        if _dist() is not None:
            # Weighted like one batch of the ranks' union; an emptied rank runs a stand-in.
            out = self._fit_step([batch], None, self.global_step)
            return {k: v for k, v in out.items() if k not in ("lr", "num_pairs")}
        if batch.num_pairs == 0:
            self.skipped_steps += 1
            warnings.warn(
                f"step {self.global_step}: every pair of the batch was skipped by truncation",
                RuntimeWarning,
                stacklevel=2,
            )
            return dict.fromkeys(_METRICS, math.nan) | {"grad_norm": math.nan, "skipped": 1.0}
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

    # ------------------------------------------------------------------ training runs
    def _configure_optimizer(self, weight_decay: float) -> None:
        """Use AdamW (decay on >= 2-D parameters only) when ``weight_decay`` > 0, else Adam."""
        if not self._owns_optimizer:
            if weight_decay:
                raise ValueError(
                    "weight_decay: this trainer was given its optimizer; set weight decay there"
                )
            return
        if weight_decay == self._weight_decay:
            return
        params = [p for p in self.model.parameters() if p.requires_grad]
        lr = self.config.learning_rate
        if weight_decay:
            groups = [
                {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
                {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
            ]
            new: torch.optim.Optimizer = torch.optim.AdamW(
                [g for g in groups if g["params"]], lr=lr
            )
        else:
            new = torch.optim.Adam(params, lr=lr)
        for p, state in self.optimizer.state.items():
            new.state[p] = state
        self.optimizer = new
        self._weight_decay = float(weight_decay)

    def _fit_step(
        self, batches: list[PairBatch], reference: _CachedReference | None, step: int
    ) -> dict[str, float]:
        """One optimizer step over the micro-batches ``batches`` (gradient accumulation).

        Each micro-batch's mean loss is weighted by ``n_i / N`` (``N``: the pairs of the whole
        step over all ranks), so the update equals that of one batch of their union. Returns
        the step's pair-weighted metrics plus ``grad_norm``, ``skipped``, ``lr``, ``num_pairs``.
        """
        device = next(self.model.parameters()).device
        _, world = _rank_world()
        (total,) = _all_reduce([float(sum(b.num_pairs for b in batches))], device)
        # Alone, batches that truncation emptied are left out. Under torch.distributed every rank
        # runs each micro-batch, an emptied one as a zero-weight stand-in, so that all ranks join
        # the same gradient reductions (and FSDP gathers) even when one rank lost its pairs.
        if total == 0:
            work: list[PairBatch] = []
        elif _dist() is None:
            work = [b for b in batches if b.num_pairs]
        else:
            work = batches
        keys = self._metric_keys()
        sums = dict.fromkeys(keys, 0.0)
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        ddp = isinstance(self.model, torch.nn.parallel.DistributedDataParallel)
        for i, batch in enumerate(work):
            last = i == len(work) - 1
            n = batch.num_pairs
            with contextlib.nullcontext() if last or not ddp else self.model.no_sync():
                if n:
                    ref = reference(batch) if reference is not None else None
                    loss, metrics = self._loss(batch, training=True, ref=ref, nan_loss=True)
                else:
                    loss = self._stand_in_loss(reference is not None)
                assert loss is not None
                (loss * (n * world / total)).backward()
            if n:
                for k in keys:
                    sums[k] += metrics.get(k, math.nan) * n
        grad_norm = self._clip_gradients() if work else math.nan
        bad_here = not (math.isfinite(grad_norm) and math.isfinite(sums["loss"]))
        *sums_all, bad_ranks = _all_reduce([*(sums[k] for k in keys), float(bad_here)], device)
        bad = total == 0 or bad_ranks > 0
        if bad:
            self.skipped_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
            reason = (
                "every pair was dropped by truncation"
                if total == 0
                else "non-finite loss or gradient"
            )
            warnings.warn(
                f"step {step + 1}: {reason}; update skipped", RuntimeWarning, stacklevel=3
            )
        else:
            self.optimizer.step()
            self.global_step += 1
        out = {k: (v / total if total else math.nan) for k, v in zip(keys, sums_all, strict=True)}
        out.update(grad_norm=grad_norm, skipped=float(bad), lr=lr, num_pairs=total)
        return out

    def _stand_in_loss(self, cached_reference: bool) -> Tensor:
        """The loss of :func:`_stand_in_batch` (for a rank whose micro-batch was emptied).

        Runs the policy (and a live reference, which may be sharded) like any batch; the running
        BCO shift is left as it was.
        """
        bco = self.bco_reward_sum, self.bco_reward_count
        ref = torch.zeros(2) if cached_reference else None
        loss, _ = self._loss(_stand_in_batch(), training=True, ref=ref, nan_loss=True)
        self.bco_reward_sum, self.bco_reward_count = bco
        assert loss is not None
        return loss

    def fit(
        self,
        train_dataset: PreferenceDataset,
        eval_dataset: PreferenceDataset | None = None,
        *,
        epochs: int = 1,
        batch_size: int | None = None,
        max_tokens: int | None = None,
        layout: str = "padded",
        max_length: int | None = 1024,
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
        callback: Callable[[int, dict[str, float]], None] | None = None,
    ) -> FitResult:
        """Train on ``train_dataset`` for ``epochs`` epochs (or ``max_steps`` optimizer steps).

        Each epoch follows ``train_dataset.batches(batch_size=..., max_tokens=..., shuffle=True,
        seed=seed, epoch=epoch, rank=, world_size=)``; each planned batch is collated in Rust with
        ``layout``, ``max_length``, ``max_prompt_length``, ``truncation`` (``pack_length``
        defaults to ``max_length`` for ``packed``). One optimizer step takes
        ``gradient_accumulation_steps`` batches (fewer at the end of an epoch) and gives the
        same update as one batch of their union: each batch's mean loss is weighted by
        ``n_i / N``, ``N`` the pairs of the step. Two loss types look across pairs and so differ
        from one big batch: ``aot``/``aot_unpaired`` sort within each batch, and ``bco_pair``
        updates its running reward mean batch by batch (a batch's shift includes the earlier
        batches of the step, not the later ones).

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
                ``output_dir/metrics.jsonl`` (and TensorBoard when installed).
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
            callback: called as ``callback(step, metrics)`` after every optimizer step.

        Returns:
            A :class:`FitResult`.
        """
        _check_dataset("train_dataset", train_dataset)
        if eval_dataset is not None:
            _check_dataset("eval_dataset", eval_dataset)
        _check_count("epochs", epochs, 1)
        _check_count("gradient_accumulation_steps", gradient_accumulation_steps, 1)
        _check_count("warmup_steps", warmup_steps, 0)
        _check_count("seed", seed, 0)
        for name, value in (
            ("log_every", log_every),
            ("eval_every", eval_every),
            ("save_every", save_every),
            ("save_total_limit", save_total_limit),
            ("max_consecutive_skips", max_consecutive_skips),
            ("max_steps", max_steps),
        ):
            _check_count(name, value, 1, allow_none=True)
        if batch_size is None and max_tokens is None:
            raise ValueError("batch_size: give batch_size (pairs) or max_tokens (tokens per batch)")
        if lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"lr_scheduler: expected one of {LR_SCHEDULERS}, got {lr_scheduler!r}")
        if mixed_precision not in _AUTOCAST:
            raise ValueError(f"mixed_precision: expected None or 'bf16', got {mixed_precision!r}")
        if not (isinstance(weight_decay, int | float) and weight_decay >= 0):
            raise ValueError(f"weight_decay: must be >= 0, got {weight_decay!r}")
        out_dir = Path(output_dir) if output_dir is not None else None
        if out_dir is None and (save_every is not None or resume_from == "latest"):
            what = "save_every" if save_every is not None else "resume_from='latest'"
            raise ValueError(f"output_dir: {what} needs an output directory")

        rank, world = _rank_world()
        main = rank == 0
        if layout == "packed" and pack_length is None:
            pack_length = max_length
        data_kw = dict(
            layout=layout,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            truncation=truncation,
            pad_to_multiple_of=pad_to_multiple_of,
            pack_length=pack_length,
        )
        plan_kw = dict(data_kw, batch_size=batch_size, max_tokens=max_tokens, seed=seed)
        plan_kw.update(rank=rank, world_size=world)
        collate_kw = dict(
            data_kw, pad_token_id=self.config.pad_token_id or 0, vocab_size=self.vocab_size
        )
        eval_plan_kw = dict(data_kw, batch_size=batch_size, max_tokens=max_tokens)
        gas = gradient_accumulation_steps
        per_epoch = [
            math.ceil(len(train_dataset.batches(epoch=e, **plan_kw)) / gas) for e in range(epochs)
        ]
        total = sum(per_epoch) if max_steps is None else min(sum(per_epoch), max_steps)
        run_args = {
            "batch_size": batch_size,
            "max_tokens": max_tokens,
            "layout": layout,
            "max_length": max_length,
            "max_prompt_length": max_prompt_length,
            "truncation": truncation,
            "pack_length": pack_length,
            "pad_to_multiple_of": pad_to_multiple_of,
            "seed": seed,
            "gradient_accumulation_steps": gas,
            "world_size": world,
            "weight_decay": float(weight_decay),
            "epochs": epochs,
            "max_steps": max_steps,
            "lr_scheduler": lr_scheduler,
            "warmup_steps": warmup_steps,
            "mixed_precision": mixed_precision,
        }

        # Verified once here (rank 0 decides for all ranks); the loads below skip verifying.
        resume_path = resume_checkpoint(resume_from, out_dir, _unwrap(self.model))
        if resume_path is not None:
            self._check_resume(load_checkpoint(resume_path, rng=False, verify=False), run_args)
        self._configure_optimizer(float(weight_decay))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, schedule_factor(lr_scheduler, warmup_steps, total)
        )
        step = epoch = batch_idx = 0
        elapsed = 0.0
        run_skipped = consecutive = 0
        if resume_path is not None:
            meta = load_checkpoint(
                resume_path,
                model=_unwrap(self.model),
                optimizer=self.optimizer,
                rng=main,
                verify=False,
            )
            scheduler.load_state_dict(meta["scheduler"])
            pos, counters = meta["position"], meta["counters"]
            step, epoch, batch_idx = int(pos["step"]), int(pos["epoch"]), int(pos["batch"])
            self.global_step = int(counters["global_step"])
            self.skipped_steps = int(counters["skipped_steps"])
            run_skipped = int(counters["run_skipped"])
            consecutive = int(counters["consecutive_skips"])
            elapsed = float(counters["elapsed"])
            self.bco_reward_sum = float(meta["bco"]["sum"])
            self.bco_reward_count = int(meta["bco"]["count"])

        writer = None
        if main and out_dir is not None:
            remove_partial(out_dir)
            writer = MetricsWriter(out_dir, resume_step=step if resume_path is not None else None)
        bar = tqdm(
            total=total,
            initial=step,
            desc="DPO",
            unit="step",
            disable=not (progress and main),
            dynamic_ncols=True,
        )
        window = _Window()
        last_eval: dict[str, float] | None = None
        last_eval_step = last_save_step = -1
        last_record: dict[str, float] = {}
        checkpoint: Path | None = None
        epoch_pos = float(epoch)
        previous_autocast = self._autocast
        self._autocast = _AUTOCAST[mixed_precision]
        start = time.perf_counter() - elapsed
        eval_reference: _CachedReference | None = None

        def emit(split: str, metrics: dict[str, float]) -> None:
            if not main:
                return
            record = make_record(split, step, epoch_pos, time.perf_counter() - start, metrics)
            tqdm.write(format_record(record), file=sys.stdout)
            if writer is not None:
                writer.write(record)

        def run_eval() -> dict[str, float]:
            assert eval_dataset is not None
            result = self._evaluate(eval_dataset, eval_plan_kw, collate_kw, eval_reference)
            emit("eval", result)
            return result

        def save() -> Path | None:
            if out_dir is None:
                return None
            state = {
                "rlox_version": __version__,
                "config": asdict(self.config),
                "optimizer": type(self.optimizer).__name__,
                "fit": run_args,
                "position": {"step": step, "epoch": epoch, "batch": batch_idx},
                "counters": {
                    "global_step": self.global_step,
                    "skipped_steps": self.skipped_steps,
                    "run_skipped": run_skipped,
                    "consecutive_skips": consecutive,
                    "elapsed": time.perf_counter() - start,
                },
                "bco": {"sum": self.bco_reward_sum, "count": self.bco_reward_count},
                "scheduler": scheduler.state_dict(),
            }
            return save_checkpoint(
                out_dir,
                step,
                model=_unwrap(self.model),
                optimizer=self.optimizer,
                state=state,
                keep=save_total_limit,
                collective=True,
            )

        try:
            # Both reference sources are resolved before any step, so a missing cache fails fast.
            with self._one_reference_digest():
                train_reference = self._reference_source(train_dataset, data_kw)
                if eval_dataset is not None:
                    eval_reference = self._reference_source(eval_dataset, data_kw)
            while step < total and epoch < epochs:
                plan = train_dataset.batches(epoch=epoch, **plan_kw)
                while batch_idx < len(plan) and step < total:
                    group = [plan[j] for j in range(batch_idx, min(batch_idx + gas, len(plan)))]
                    batch_idx += len(group)
                    batches = [train_dataset.collate(idx, **collate_kw) for idx in group]
                    metrics = self._fit_step(batches, train_reference, step)
                    with warnings.catch_warnings():
                        warnings.filterwarnings("ignore", message=r".*lr_scheduler\.step\(\)")
                        scheduler.step()
                    step += 1
                    epoch_pos = epoch + batch_idx / len(plan)
                    if metrics["skipped"]:
                        run_skipped += 1
                        consecutive += 1
                    else:
                        consecutive = 0
                    window.add(metrics)
                    bar.update(1)
                    if not metrics["skipped"]:
                        bar.set_postfix(
                            loss=f"{metrics['loss']:.4f}",
                            acc=f"{metrics['reward_accuracy']:.2f}",
                            refresh=False,
                        )
                    if max_consecutive_skips is not None and consecutive >= max_consecutive_skips:
                        raise RuntimeError(
                            f"step {step}: the last {consecutive} optimizer steps were all skipped "
                            "(non-finite loss or gradient, or every pair dropped by truncation); "
                            "the weights are those of the last good step. Lower the learning "
                            "rate, check the data, model and max_length, or raise "
                            "max_consecutive_skips"
                        )
                    if log_every is not None and step % log_every == 0:
                        last_record = window.metrics()
                        emit("train", last_record)
                        window = _Window()
                    if eval_dataset is not None and eval_every is not None:
                        if step % eval_every == 0:
                            last_eval, last_eval_step = run_eval(), step
                    if save_every is not None and step % save_every == 0:
                        checkpoint, last_save_step = save(), step
                    if callback is not None:
                        callback(step, metrics)
                if batch_idx >= len(plan):
                    epoch, batch_idx = epoch + 1, 0
                    epoch_pos = float(epoch)
            if window:
                last_record = window.metrics()
                if log_every is not None:
                    emit("train", last_record)
            if eval_dataset is not None and last_eval_step != step:
                last_eval = run_eval()
            if out_dir is not None and last_save_step != step:
                checkpoint = save()
        finally:
            self._autocast = previous_autocast
            for group, base in zip(self.optimizer.param_groups, scheduler.base_lrs, strict=True):
                group["lr"] = base
            bar.close()
            if writer is not None:
                writer.close()
        return FitResult(
            steps=step,
            epochs=epoch_pos,
            skipped=run_skipped,
            metrics=last_record,
            eval=last_eval,
            checkpoint=checkpoint,
            seconds=time.perf_counter() - start,
        )

    def _check_resume(self, meta: dict[str, Any], run_args: dict[str, Any]) -> None:
        saved = meta.get("fit", {})
        for key in _RESUME_STRICT:
            if saved.get(key) != run_args[key]:
                raise ValueError(
                    f"resume_from: the checkpoint was written with {key}={saved.get(key)!r}, "
                    f"this call has {key}={run_args[key]!r}; resuming needs the same value"
                )
        changed = [k for k in _RESUME_LOOSE if saved.get(k) != run_args[k]]
        if meta.get("config") != json.loads(json.dumps(asdict(self.config))):
            changed.append("the trainer config")
        if changed:
            warnings.warn(
                f"resume_from: {', '.join(changed)} differ from the checkpoint; the run will not "
                "match an uninterrupted one",
                UserWarning,
                stacklevel=3,
            )

    # ------------------------------------------------------------------ evaluation
    def evaluate(
        self,
        dataset: PreferenceDataset,
        *,
        batch_size: int | None = None,
        max_tokens: int | None = None,
        layout: str = "padded",
        max_length: int | None = 1024,
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
        data_kw, plan_kw, collate_kw = self._scoring_options(
            batch_size=batch_size,
            max_tokens=max_tokens,
            layout=layout,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            truncation=truncation,
            pack_length=pack_length,
            pad_to_multiple_of=pad_to_multiple_of,
            mixed_precision=mixed_precision,
        )
        previous = self._autocast
        self._autocast = _AUTOCAST[mixed_precision]
        try:
            reference = self._reference_source(dataset, data_kw)
            return self._evaluate(dataset, plan_kw, collate_kw, reference)
        finally:
            self._autocast = previous

    def _scoring_options(
        self,
        *,
        batch_size: int | None,
        max_tokens: int | None,
        layout: str,
        max_length: int | None,
        max_prompt_length: int | None,
        truncation: str,
        pack_length: int | None,
        pad_to_multiple_of: int | None,
        mixed_precision: str | None,
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """(data, plan, collate) keyword dicts of one pass over a dataset without training.

        ``batch_size`` defaults to 16 when ``max_tokens`` is not given either; ``packed`` rows
        default to ``max_length`` tokens.
        """
        if mixed_precision not in _AUTOCAST:
            raise ValueError(f"mixed_precision: expected None or 'bf16', got {mixed_precision!r}")
        if batch_size is None and max_tokens is None:
            batch_size = 16
        if layout == "packed" and pack_length is None:
            pack_length = max_length
        data_kw = dict(
            layout=layout,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            truncation=truncation,
            pad_to_multiple_of=pad_to_multiple_of,
            pack_length=pack_length,
        )
        plan_kw = dict(data_kw, batch_size=batch_size, max_tokens=max_tokens)
        collate_kw = dict(
            data_kw, pad_token_id=self.config.pad_token_id or 0, vocab_size=self.vocab_size
        )
        return data_kw, plan_kw, collate_kw

    def _evaluate(
        self,
        dataset: PreferenceDataset,
        plan_kw: dict[str, Any],
        collate_kw: dict[str, Any],
        reference: _CachedReference | None,
    ) -> dict[str, float]:
        rank, world = _rank_world()
        plan = dataset.batches(shuffle=False, rank=rank, world_size=world, **plan_kw)
        keys = self._metric_keys()
        sums = dict.fromkeys(keys, 0.0)
        pairs = dropped = 0
        model = _unwrap(self.model)
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with torch.no_grad():
                for idx in plan:
                    batch = dataset.collate(idx, **collate_kw)
                    b = batch.num_pairs
                    dropped += len(idx) - b
                    if b == 0:
                        if _dist() is not None:  # keep step with the other ranks' forwards
                            ref = torch.zeros(2) if reference is not None else None
                            self._loss(_stand_in_batch(), ref=ref)
                        continue
                    ref = reference(batch) if reference is not None else None
                    _, metrics = self._loss(batch, ref=ref)
                    for k in keys:
                        sums[k] += metrics.get(k, math.nan) * b
                    pairs += b
        finally:
            for m, mode in modes:
                m.training = mode
        device = next(model.parameters()).device
        totals = _all_reduce([float(pairs), float(dropped), *(sums[k] for k in keys)], device)
        n = totals[0]
        out = {k: (v / n if n else math.nan) for k, v in zip(keys, totals[2:], strict=True)}
        out["num_pairs"] = int(n)
        out["num_dropped"] = int(totals[1])
        return out

    # ------------------------------------------------------------------ reference cache
    @contextlib.contextmanager
    def _one_reference_digest(self) -> Iterator[None]:
        """Within this block (nestable) the reference weights are hashed at most once.

        Outside such blocks nothing is remembered: every ``fit``, ``evaluate`` and
        ``precompute_reference`` call hashes the weights afresh, so edits through ``.data``,
        dtype round trips or swapped tensors cannot leave a stale digest behind. ``fit`` checks
        its train and eval caches in one block. Code of rlox that writes the reference inside a
        block must reset ``_digest_cache`` to None.
        """
        self._digest_depth += 1
        try:
            yield
        finally:
            self._digest_depth -= 1
            if self._digest_depth == 0:
                self._digest_cache = None

    def _reference_digest(self) -> str:
        """:func:`weights_digest` of the reference (of the policy's frozen weights for peft)."""
        if self._digest_depth and self._digest_cache is not None:
            return self._digest_cache
        module, frozen = (
            (self.ref_model, False) if self.ref_model is not None else (_unwrap(self.model), True)
        )
        digest = weights_digest(module, frozen_only=frozen)
        if self._digest_depth:
            self._digest_cache = digest
        return digest

    def _reference_settings(self, data_kw: dict[str, Any]) -> dict[str, Any]:
        return {
            "max_length": data_kw["max_length"],
            "max_prompt_length": data_kw["max_prompt_length"],
            "truncation": data_kw["truncation"],
            "ld_alpha": self.config.ld_alpha,
        }

    def precompute_reference(
        self,
        dataset: PreferenceDataset,
        *,
        batch_size: int | None = None,
        max_tokens: int | None = None,
        layout: str = "padded",
        max_length: int | None = 1024,
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
        data_kw, plan_kw, collate_kw = self._scoring_options(
            batch_size=batch_size,
            max_tokens=max_tokens,
            layout=layout,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            truncation=truncation,
            pack_length=pack_length,
            pad_to_multiple_of=pad_to_multiple_of,
            mixed_precision=mixed_precision,
        )
        rank, world = _rank_world()
        plan = dataset.batches(shuffle=False, rank=rank, world_size=world, **plan_kw)
        n = len(dataset)
        logps = torch.zeros(2, n, dtype=torch.float64)
        seen = torch.zeros(n, dtype=torch.float64)
        previous = self._autocast
        self._autocast = _AUTOCAST[mixed_precision]
        try:
            for idx in tqdm(plan, desc="reference", disable=not (progress and rank == 0)):
                batch = dataset.collate(idx, **collate_kw)
                b = batch.num_pairs
                if b == 0:
                    if _dist() is not None:  # a sharded reference gathers in every forward
                        self._reference_logps(_stand_in_batch())
                    continue
                ref = self._reference_logps(batch).detach().double().cpu()
                where = batch.pair_index.cpu()
                logps[0, where] = ref[:b]
                logps[1, where] = ref[b:]
                seen[where] = 1.0
        finally:
            self._autocast = previous
        if _dist() is not None:
            device = next(self.model.parameters()).device
            both = torch.cat([logps.reshape(-1), seen]).to(device)
            _dist().all_reduce(both)
            both = both.cpu()
            logps, seen = both[: 2 * n].reshape(2, n), both[2 * n :]
        logps[:, seen == 0] = math.nan
        key = {
            "format": _REFERENCE_FORMAT,
            "weights": self._reference_digest(),
            "data": dataset.fingerprint(),
            "settings": self._reference_settings(data_kw),
        }
        values = logps.numpy()
        path = _store_reference(dataset, key, values, write=rank == 0)
        return ReferenceLogps(values[0], values[1], key, path)

    def _reference_source(
        self, dataset: PreferenceDataset, data_kw: dict[str, Any]
    ) -> _CachedReference | None:
        """Cached reference log-probs of ``dataset`` that match this trainer, else None (live).

        Raises when the trainer has no reference to run and no cache matches.
        """
        if not self._needs_reference:
            return None
        live = self._has_live_reference()
        entries = _reference_entries(dataset)
        settings = self._reference_settings(data_kw)
        if not entries and live:
            return None
        fingerprint = dataset.fingerprint() if entries else None
        weights = self._reference_digest() if live and entries else None
        same = [e for e in entries if e["key"]["settings"] == settings]
        match = [
            e
            for e in same
            if e["key"]["data"] == fingerprint and weights in (None, e["key"]["weights"])
        ]
        if match:
            if len({e["key"]["weights"] for e in match}) > 1:
                warnings.warn(
                    f"dataset: reference log-probs of several reference models are cached for "
                    f"{dataset!r}; using the newest",
                    UserWarning,
                    stacklevel=3,
                )
            entry = max(match, key=lambda e: e["created"])
            values = _load_reference(dataset, entry)
            if values is not None:
                return _CachedReference(values)
        elif same:
            stale = {
                "data" if e["key"]["data"] != fingerprint else "reference weights" for e in same
            }
            warnings.warn(
                f"dataset: cached reference log-probs of {dataset!r} were computed for other "
                f"{' and '.join(sorted(stale))}; ignored",
                UserWarning,
                stacklevel=3,
            )
        if live:
            return None
        raise ValueError(
            f"ref_model: no precomputed reference log-probs match {dataset!r} with {settings}; "
            "run DPO.precompute_reference on it with a reference model and these settings"
        )

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write policy weights (safetensors), optimizer state and config to directory ``path``.

        Under ``torch.distributed`` only rank 0 writes. With a sharded (FSDP2) policy every rank
        must call it: the full weights and optimizer state (keyed by parameter name) are gathered
        and rank 0 writes them.
        """
        path = Path(path)
        model = _unwrap(self.model)
        if not is_sharded(model):
            if _dist() is None or _dist().get_rank() == 0:
                self._write(path, model, None, self.optimizer.state_dict())
            return path
        weights, optim = full_state(model, self.optimizer)
        failed = False
        try:
            if _rank_world()[0] == 0:
                self._write(path, model, weights, optim)
        except Exception:
            failed = True
            raise
        finally:
            (failures,) = _all_reduce([float(failed)], next(model.parameters()).device)
        if failures:
            raise RuntimeError("path: rank 0 failed to write the trainer (see its error)")
        return path

    def _write(
        self,
        path: Path,
        model: nn.Module,
        weights: dict[str, Tensor] | None,
        optim: dict[str, Any],
    ) -> None:
        path.mkdir(parents=True, exist_ok=True)
        # An interrupted save must not leave an older manifest or trainer.json behind.
        for name in (MANIFEST, "trainer.json"):
            (path / name).unlink(missing_ok=True)
        manifest = ManifestWriter(path)  # each checksum taken right after the file is written
        save_weights(model, path / "model.safetensors", weights)
        manifest.add("model.safetensors")
        torch.save(optim, path / "optimizer.pt")
        manifest.add("optimizer.pt")
        meta = {
            "rlox_version": __version__,
            "manifest": MANIFEST,
            "config": asdict(self.config),
            "optimizer": type(self.optimizer).__name__,
            "optimizer_groups": optimizer_groups(model, self.optimizer),
            "optimizer_keys": optimizer_keys(optim),
            "weight_decay": self._weight_decay,
            "global_step": self.global_step,
            "skipped_steps": self.skipped_steps,
            "bco_reward_sum": self.bco_reward_sum,
            "bco_reward_count": self.bco_reward_count,
        }
        (path / "trainer.json").write_text(json.dumps(meta, indent=2))
        manifest.add("trainer.json")
        manifest.write()

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
        The optimizer state may be keyed by parameter index or name (a sharded model's save).

        The files are first verified against ``manifest.json`` (a save from before manifests
        loads unverified, with a ``UserWarning``). Without ``optimizer``, the saved optimizer is
        rebuilt: the same class (Adam or AdamW) with the same parameter groups, by parameter
        name, and options. A given ``optimizer`` must have the saved class and groups. A damaged
        or unreadable file, or a mismatched ``optimizer``, raises ``ValueError`` naming it.
        """
        path = Path(path)
        inner = _unwrap(model)
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
                stacklevel=2,
            )
        kind, groups = meta["optimizer"], meta.get("optimizer_groups")
        if optimizer is None and kind not in ("Adam", "AdamW"):
            raise ValueError(
                f"optimizer: the checkpoint used {kind}; pass an optimizer of that type"
            )
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
        trainer.global_step = int(meta["global_step"])
        trainer.skipped_steps = int(meta["skipped_steps"])
        trainer.bco_reward_sum = float(meta.get("bco_reward_sum", 0.0))
        trainer.bco_reward_count = int(meta.get("bco_reward_count", 0))
        return trainer


def _reference_dir(dataset: PreferenceDataset) -> Path | None:
    return None if dataset.directory is None else dataset.directory / _REFERENCE_DIR


def _entry_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def _store_reference(
    dataset: PreferenceDataset, key: dict[str, Any], values: np.ndarray, *, write: bool
) -> Path | None:
    """Keep (2, n) reference log-probs on ``dataset`` and, when it has a directory, on disk."""
    digest = _entry_digest(key)
    values = np.ascontiguousarray(values, dtype=np.float64)
    entry = {
        "key": key,
        "digest": digest,
        "created": time.time(),
        "num_pairs": int(values.shape[1]),
        "crc32": int(_rlox.crc32(values.reshape(-1).view(np.uint8))),
        "rlox_version": __version__,
    }
    dataset._reference_logps[digest] = dict(entry, values=values)
    folder = _reference_dir(dataset)
    if folder is None:
        return None
    path = folder / f"{digest}.npy"
    if write:
        folder.mkdir(parents=True, exist_ok=True)
        tag = uuid.uuid4().hex[:8]
        tmp_npy, tmp_json = folder / f".{digest}.{tag}.npy", folder / f".{digest}.{tag}.json"
        try:
            with open(tmp_npy, "wb") as f:
                np.save(f, values, allow_pickle=False)
            tmp_json.write_text(json.dumps(entry, indent=1))
            os.replace(tmp_npy, path)
            os.replace(tmp_json, folder / f"{digest}.json")
        finally:
            tmp_npy.unlink(missing_ok=True)
            tmp_json.unlink(missing_ok=True)
    return path


def _reference_entries(dataset: PreferenceDataset) -> list[dict[str, Any]]:
    """Cache entries of ``dataset``: in memory, then those on disk next to its store."""
    entries = {d: e for d, e in dataset._reference_logps.items()}
    folder = _reference_dir(dataset)
    if folder is not None and folder.is_dir():
        for meta_file in folder.glob("*.json"):
            if meta_file.stem in entries:
                continue
            try:
                entry = json.loads(meta_file.read_text())
                if (
                    entry["key"]["format"] == _REFERENCE_FORMAT
                    and entry["digest"] == meta_file.stem
                ):
                    entries[meta_file.stem] = entry
            except (OSError, ValueError, KeyError, TypeError):
                continue
    return [e for e in entries.values() if e.get("num_pairs") == len(dataset)]


def _load_reference(dataset: PreferenceDataset, entry: dict[str, Any]) -> np.ndarray | None:
    if "values" in entry:
        return entry["values"]
    folder = _reference_dir(dataset)
    assert folder is not None
    try:
        values = np.load(folder / f"{entry['digest']}.npy", allow_pickle=False)
    except (OSError, ValueError) as e:
        warnings.warn(f"dataset: unreadable reference log-prob cache ({e}); ignored", stacklevel=4)
        return None
    ok = values.dtype == np.float64 and values.shape == (2, entry["num_pairs"])
    if (
        not ok
        or int(_rlox.crc32(np.ascontiguousarray(values).reshape(-1).view(np.uint8)))
        != entry["crc32"]
    ):
        warnings.warn(
            f"dataset: reference log-prob cache {entry['digest']} is corrupted; ignored",
            stacklevel=4,
        )
        return None
    dataset._reference_logps[entry["digest"]] = dict(entry, values=values)
    return values
