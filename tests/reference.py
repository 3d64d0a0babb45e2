"""Independent float64 reference implementations used by the test suite.

Written directly from the published formulas; nothing here calls into ``rlox``. With
``u = policy - ref`` (summed completion log-probs) and ``z = beta * (u_c - u_r)``:

- sigmoid (DPO / conservative DPO): ``-(1 - eps) log sigma(z) - eps log sigma(-z)``
- hinge (SLiC):                     ``max(0, 1 - z)``
- ipo:                              ``(u_c / len_c - u_r / len_r - 1 / (2 beta)) ** 2``
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

LOSS_TYPES = ("sigmoid", "hinge", "ipo")


def _softplus_np(x: np.ndarray) -> np.ndarray:
    """log(1 + exp(x)) without overflow: max(x, 0) + log1p(exp(-|x|))."""
    return np.maximum(x, 0.0) + np.log1p(np.exp(-np.abs(x)))


def reference_losses(
    pc,
    pr,
    rc,
    rr,
    *,
    beta: float,
    loss_type: str,
    label_smoothing: float = 0.0,
    chosen_lengths=None,
    rejected_lengths=None,
) -> dict[str, np.ndarray | float]:
    """Per-pair losses, rewards and batch metrics in float64 numpy."""
    pc, pr, rc, rr = (np.asarray(x, dtype=np.float64) for x in (pc, pr, rc, rr))
    uc, ur = pc - rc, pr - rr
    if loss_type == "sigmoid":
        z = beta * (uc - ur)
        eps = label_smoothing
        # -log sigma(z) = softplus(-z); -log sigma(-z) = softplus(z)
        losses = (1.0 - eps) * _softplus_np(-z) + eps * _softplus_np(z)
    elif loss_type == "hinge":
        z = beta * (uc - ur)
        losses = np.maximum(0.0, 1.0 - z)
    elif loss_type == "ipo":
        lc = np.asarray(chosen_lengths, dtype=np.float64)
        lr = np.asarray(rejected_lengths, dtype=np.float64)
        d = uc / lc - ur / lr - 1.0 / (2.0 * beta)
        losses = d * d
    else:  # pragma: no cover - test bug
        raise AssertionError(loss_type)
    chosen_rewards = beta * uc
    rejected_rewards = beta * ur
    return {
        "losses": losses,
        "loss": float(np.mean(losses)),
        "chosen_rewards": chosen_rewards,
        "rejected_rewards": rejected_rewards,
        "reward_accuracy": float(np.mean(chosen_rewards > rejected_rewards)),
        "reward_margin": float(np.mean(chosen_rewards - rejected_rewards)),
        "chosen_reward": float(np.mean(chosen_rewards)),
        "rejected_reward": float(np.mean(rejected_rewards)),
    }


def reference_losses_torch(
    pc: torch.Tensor,
    pr: torch.Tensor,
    rc: torch.Tensor,
    rr: torch.Tensor,
    *,
    beta: float,
    loss_type: str,
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same per-pair losses as differentiable torch ops (use float64 inputs for autograd)."""
    uc, ur = pc - rc, pr - rr
    if loss_type == "sigmoid":
        z = beta * (uc - ur)
        zero = torch.zeros_like(z)
        # softplus(x) = log(exp(0) + exp(x)), evaluated stably by logaddexp.
        sp_neg = torch.logaddexp(zero, -z)
        sp_pos = torch.logaddexp(zero, z)
        return (1.0 - label_smoothing) * sp_neg + label_smoothing * sp_pos
    if loss_type == "hinge":
        z = beta * (uc - ur)
        return torch.clamp(1.0 - z, min=0.0)
    if loss_type == "ipo":
        lc = chosen_lengths.to(uc.dtype)
        lr = rejected_lengths.to(uc.dtype)
        d = uc / lc - ur / lr - 1.0 / (2.0 * beta)
        return d * d
    raise AssertionError(loss_type)  # pragma: no cover - test bug


def reference_grads(
    pc,
    pr,
    rc,
    rr,
    *,
    beta: float,
    loss_type: str,
    label_smoothing: float = 0.0,
    chosen_lengths=None,
    rejected_lengths=None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """d(mean loss)/d(pc, pr, rc, rr) by float64 torch autograd of :func:`reference_losses_torch`."""
    leaves = [
        torch.tensor(np.asarray(x, dtype=np.float64), requires_grad=True) for x in (pc, pr, rc, rr)
    ]
    lens = [
        None if x is None else torch.as_tensor(np.asarray(x, dtype=np.int64))
        for x in (chosen_lengths, rejected_lengths)
    ]
    losses = reference_losses_torch(
        *leaves,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        chosen_lengths=lens[0],
        rejected_lengths=lens[1],
    )
    losses.mean().backward()
    return tuple(t.grad.numpy() for t in leaves)


def _logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    return out[0]


@torch.no_grad()
def reference_completion_logps(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
) -> torch.Tensor:
    """Summed log p(completion | prompt) per sequence, each run through ``model`` ALONE.

    Every ``prompt + completion`` is fed unpadded as a batch of one, so no padding, attention
    mask or position handling of the caller can influence the result. Log-softmax in float64.
    """
    out = []
    for prompt, completion in zip(prompts, completions, strict=True):
        prompt, completion = list(prompt), list(completion)
        ids = torch.tensor([prompt + completion], dtype=torch.long)
        logits = _logits_of(model, ids)[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        p = len(prompt)
        total = 0.0
        for k, tok in enumerate(completion):
            # logits at position p + k - 1 predict the token at position p + k
            total += float(logp[p + k - 1, tok])
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)
