"""Direct Preference Optimization (Rafailov et al., 2023) for PyTorch causal language models."""

from __future__ import annotations

import inspect
import json
import math
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from rlox import __version__, _rlox
from rlox.data import PairBatch, batch_from_arrays
from rlox.losses import LOSS_DEFAULTS, check_loss_options, dpo_loss

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


def _forward_kwargs(batch: PairBatch, accepted: frozenset[str]) -> dict[str, Any]:
    if batch.layout != "padded" and not {"attention_mask", "position_ids"} <= accepted:
        raise TypeError(
            f"model: the {batch.layout} layout needs a forward that accepts attention_mask "
            "(a 4-D boolean mask) and position_ids"
        )
    kwargs: dict[str, Any] = {}
    if "attention_mask" in accepted:
        kwargs["attention_mask"] = (
            batch.attention_mask if batch.layout == "padded" else batch.dense_attention_mask()
        )
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


def _split_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder, lm_head) of a Hugging Face causal LM whose logits are lm_head(last hidden)."""
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
    kwargs = _forward_kwargs(batch, accepted)
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
) -> Tensor:
    """(2B,) float32 sums of log p(token | prefix) over each sequence's completion tokens.

    Entries ``0..B-1`` are the chosen sequences, ``B..2B-1`` the rejected ones, in any layout.
    Only the logits that predict completion tokens are normalised (the gather plan); with
    ``rlox.models.TinyCausalLM`` and Hugging Face causal LMs the LM head itself runs only there.
    With ``ld_alpha`` (LD-DPO, Liu et al. 2024) tokens beyond the shorter completion of each pair
    count with weight ``ld_alpha``.
    """
    if accepted is None:
        accepted = _accepted_kwargs(model)
    device = next(model.parameters()).device
    batch = batch.to(device)
    b = batch.num_pairs
    picked = _plan_logits(model, batch, accepted).float()
    vocab = picked.shape[-1]
    if picked.dim() != 2 or picked.shape[0] != batch.plan_target.shape[0]:
        raise ValueError(f"model: expected ({batch.plan_target.shape[0]}, V) plan logits")
    if picked.shape[0] and int(batch.plan_target.max()) >= vocab:
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


class DPO:
    """Direct Preference Optimization of ``model`` against a frozen ``ref_model``.

    Each step puts chosen and rejected completions through the policy in ONE forward over a
    (2B, L) batch, runs the reference under ``torch.no_grad()``, and minimises the preference
    loss on the summed completion log-probs (computed by the Rust kernel on CPU).

    Args:
        model: the policy; ``model(input_ids) -> logits (B, T, V)`` or an object with ``.logits``
            (Hugging Face causal LMs). ``attention_mask`` / ``position_ids`` are passed when its
            forward accepts them.
        ref_model: a frozen copy of the initial policy; set to eval mode and ``requires_grad=False``.
            May be None when the loss needs no reference (``simpo``, ``cpo``, ``orpo``, ``sft``
            or ``reference_free=True``).
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
        if ref_model is None:
            if info["needs_reference"]:
                raise ValueError(
                    f"ref_model: loss_type {loss_type!r} compares the policy with a reference; "
                    "pass a frozen copy of the model (or reference_free=True)"
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
            if ref_model is not None and info["needs_reference"]
            else None
        )
        self.optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=learning_rate)
        self.global_step = 0
        self.skipped_steps = 0
        self.vocab_size = model_vocab_size(model)
        self._policy_kwargs = _accepted_kwargs(model)
        self._ref_kwargs = _accepted_kwargs(ref_model) if self.ref_model is not None else None
        self._components = tuple(info["components"])
        self._uses_bco = any(t == "bco_pair" for t, _ in info["terms"])
        # Running mean of the rewards (BCO's shift): sum and count of all rewards seen in training.
        self.bco_reward_sum = 0.0
        self.bco_reward_count = 0

    def collate(self, prompt: Any, chosen: Any, rejected: Any) -> PairBatch:
        """Re-pack id matrices with this trainer's ``pad_token_id`` (see :func:`collate_pairs`)."""
        return collate_pairs(
            prompt,
            chosen,
            rejected,
            pad_token_id=self.config.pad_token_id,
            vocab_size=self.vocab_size,
        )

    def _loss(
        self, batch: PairBatch, *, training: bool = False
    ) -> tuple[Tensor | None, dict[str, float]]:
        """The differentiable loss and the metrics; the loss is None when log-probs are not finite.

        ``training`` folds the batch's rewards into the running BCO shift.
        """
        b = batch.num_pairs
        cfg = self.config
        policy = sequence_logps(self.model, batch, self._policy_kwargs, ld_alpha=cfg.ld_alpha)
        with torch.no_grad():
            ref = None
            finite = torch.isfinite(policy).all()
            if self.ref_model is not None:
                ref = sequence_logps(
                    self.ref_model, batch, self._ref_kwargs, ld_alpha=cfg.ld_alpha
                ).to(policy.device)
                finite &= torch.isfinite(ref).all()
            if not bool(finite):
                metrics = dict.fromkeys(_METRICS, math.nan)
                metrics["chosen_logps"] = policy[:b].double().mean().item()
                metrics["rejected_logps"] = policy[b:].double().mean().item()
                return None, metrics
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
            stats = torch.stack(values).tolist()
        metrics = dict(zip(_METRICS, stats, strict=True))
        if len(self._components) > 1:
            for name, value in res.component_losses.items():
                metrics[f"loss_{name}"] = float(value)
        return res.loss, metrics

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
        gradient made the step be skipped; the weights are then left untouched).
        """
        batch = self._batch(prompt, chosen, rejected)
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
            params = [
                p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None
            ]
            max_norm = self.config.max_grad_norm or math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
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

    def save(self, path: str | Path) -> Path:
        """Write policy weights (safetensors), optimizer state and config to directory ``path``."""
        from safetensors.torch import save_model

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_model(self.model, str(path / "model.safetensors"))
        torch.save(self.optimizer.state_dict(), path / "optimizer.pt")
        meta = {
            "rlox_version": __version__,
            "config": asdict(self.config),
            "optimizer": type(self.optimizer).__name__,
            "global_step": self.global_step,
            "skipped_steps": self.skipped_steps,
            "bco_reward_sum": self.bco_reward_sum,
            "bco_reward_count": self.bco_reward_count,
        }
        (path / "trainer.json").write_text(json.dumps(meta, indent=2))
        return path

    @classmethod
    def load(
        cls,
        path: str | Path,
        model: nn.Module,
        ref_model: nn.Module | None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> DPO:
        """Restore a trainer written by :meth:`save` into ``model`` (no pickled code is run)."""
        from safetensors.torch import load_model

        path = Path(path)
        meta_file = path / "trainer.json"
        if not meta_file.is_file():
            raise ValueError(f"path: {path} holds no rlox checkpoint (trainer.json missing)")
        meta = json.loads(meta_file.read_text())
        if optimizer is None and meta["optimizer"] != "Adam":
            raise ValueError(
                f"optimizer: the checkpoint used {meta['optimizer']}; pass an optimizer of that type"
            )
        load_model(model, str(path / "model.safetensors"))
        trainer = cls(model, ref_model, optimizer=optimizer, **meta["config"])
        trainer.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        trainer.global_step = int(meta["global_step"])
        trainer.skipped_steps = int(meta["skipped_steps"])
        trainer.bco_reward_sum = float(meta.get("bco_reward_sum", 0.0))
        trainer.bco_reward_count = int(meta.get("bco_reward_count", 0))
        return trainer
