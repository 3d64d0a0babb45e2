"""Differentiable DPO losses over sequence log-probs.

On CPU the fused Rust kernel (:func:`rlox.dpo_loss`) computes the loss and its gradients in one
pass; on any other device the same math runs in pure PyTorch. Both paths agree to rounding.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
from torch import Tensor

from rlox import _rlox

LOSS_TYPES: tuple[str, ...] = ("sigmoid", "hinge", "ipo")
LENGTH_NORMALISED: frozenset[str] = frozenset({"ipo"})
BACKENDS: tuple[str, ...] = ("auto", "rust", "torch")


class DPOLossResult(NamedTuple):
    """Output of :func:`dpo_loss`. ``loss`` and ``losses`` carry gradients; the rest do not."""

    loss: Tensor
    """() mean loss over pairs."""
    losses: Tensor
    """(B,) per-pair losses."""
    chosen_rewards: Tensor
    """(B,) beta * (policy_chosen_logps - ref_chosen_logps)."""
    rejected_rewards: Tensor
    """(B,) beta * (policy_rejected_logps - ref_rejected_logps)."""


def check_loss_options(beta: float, loss_type: str, label_smoothing: float) -> None:
    """Raise ``ValueError`` naming the option when a loss hyper-parameter is invalid."""
    if not isinstance(loss_type, str) or loss_type not in LOSS_TYPES:
        raise ValueError(
            f"loss_type: unknown loss type {loss_type!r}; expected one of {LOSS_TYPES}"
        )
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
        raise TypeError(f"beta: expected a float, got {type(beta).__name__}")
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta: must be a finite number > 0, got {beta}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real):
        raise TypeError(f"label_smoothing: expected a float, got {type(label_smoothing).__name__}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing: must be in [0, 0.5), got {label_smoothing}")


_NAMES = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")


def _check_tensors(logps: tuple[Tensor, ...], lengths: tuple[Tensor | None, ...]) -> None:
    for name, t in zip(_NAMES, logps, strict=True):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: must be a floating-point tensor, got {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"{name}: must be 1-D (B,), got shape {tuple(t.shape)}")
        if t.dtype != logps[0].dtype:
            raise TypeError(
                f"{name}: dtype {t.dtype} differs from policy_chosen_logps ({logps[0].dtype}); "
                "pass all four log-prob tensors in one dtype"
            )
        if t.shape != logps[0].shape:
            raise ValueError(
                f"{name}: has length {t.shape[0]} but policy_chosen_logps has {logps[0].shape[0]}"
            )
    if logps[0].shape[0] == 0:
        raise ValueError("policy_chosen_logps: is empty; need at least one pair")
    for name, t in zip(("chosen_lengths", "rejected_lengths"), lengths, strict=True):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name}: completion lengths must be an integer tensor, got {t.dtype}")
        if t.shape != logps[0].shape:
            raise ValueError(
                f"{name}: must have shape {tuple(logps[0].shape)} like the log-probs, "
                f"got {tuple(t.shape)}"
            )


def _torch_loss(
    pc: Tensor,
    pr: Tensor,
    rc: Tensor,
    rr: Tensor,
    lc: Tensor | None,
    lr: Tensor | None,
    beta: float,
    loss_type: str,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Pure-torch (B,) per-pair losses."""
    uc, ur = pc - rc, pr - rr
    if loss_type == "ipo":
        d = uc / lc.to(uc.dtype) - ur / lr.to(ur.dtype)
        return (d - 1.0 / (2.0 * beta)) ** 2
    z = beta * (uc - ur)
    if loss_type == "sigmoid":
        nls = torch.nn.functional.logsigmoid
        if eps == 0.0:  # dropped, not multiplied by 0: 0 * inf would be NaN
            return -nls(z)
        return -(1.0 - eps) * nls(z) - eps * nls(-z)
    return torch.relu(1.0 - z)


class _RustDPOLoss(torch.autograd.Function):
    """Forward through the Rust kernel; backward reuses the gradients it already computed."""

    @staticmethod
    def forward(ctx, pc, pr, rc, rr, lc, lr, beta, loss_type, eps):  # noqa: D102
        def arr(t: Tensor | None):
            if t is None:
                return None
            t = t.detach()
            if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64):
                t = t.float()
            return t.contiguous().numpy()

        out = _rlox.dpo_loss(
            arr(pc),
            arr(pr),
            arr(rc),
            arr(rr),
            beta=beta,
            loss_type=loss_type,
            label_smoothing=eps,
            chosen_lengths=arr(lc),
            rejected_lengths=arr(lr),
        )
        grad_c = torch.from_numpy(out.grad_chosen)
        grad_r = torch.from_numpy(out.grad_rejected)
        ctx.save_for_backward(grad_c, grad_r)
        ctx.batch = pc.shape[0]
        ctx.dtypes = (pc.dtype, pr.dtype, rc.dtype, rr.dtype)
        losses = torch.from_numpy(out.losses).to(pc.dtype)
        rewards_c = torch.from_numpy(out.chosen_rewards).to(pc.dtype)
        rewards_r = torch.from_numpy(out.rejected_rewards).to(pc.dtype)
        ctx.mark_non_differentiable(rewards_c, rewards_r)
        ctx.set_materialize_grads(False)
        return torch.tensor(out.loss, dtype=pc.dtype), losses, rewards_c, rewards_r

    @staticmethod
    def backward(ctx, g_loss, g_losses, _g_rc, _g_rr):  # noqa: D102
        grad_c, grad_r = ctx.saved_tensors
        gc = gr = None
        if g_loss is not None:
            if float(g_loss) == 1.0:  # the usual loss.backward(): hand the kernel's arrays over
                gc, gr = grad_c, grad_r
            else:
                gc, gr = grad_c * g_loss, grad_r * g_loss
        if g_losses is not None:
            # grad_* are d(mean)/d(logp); d(loss_i)/d(logp_i) is B times that.
            scale = g_losses * ctx.batch
            gc = scale * grad_c if gc is None else gc + scale * grad_c
            gr = scale * grad_r if gr is None else gr + scale * grad_r
        if gc is None:
            return (None,) * 9
        need = ctx.needs_input_grad
        d_pc, d_pr, d_rc, d_rr = ctx.dtypes
        return (
            gc.to(d_pc) if need[0] else None,
            gr.to(d_pr) if need[1] else None,
            (-gc).to(d_rc) if need[2] else None,
            (-gr).to(d_rr) if need[3] else None,
            None,
            None,
            None,
            None,
            None,
        )


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    backend: str = "auto",
) -> DPOLossResult:
    """Differentiable DPO loss over (B,) summed completion log-probs.

    With ``u = policy - ref`` per side and ``z = beta * (u_c - u_r)``:

    - ``"sigmoid"`` (Rafailov et al. 2023; with ``label_smoothing`` eps the conservative DPO of
      Mitchell 2023): ``-(1 - eps) log sigma(z) - eps log sigma(-z)``.
    - ``"hinge"`` (SLiC, Zhao et al. 2023): ``relu(1 - z)``.
    - ``"ipo"`` (Azar et al. 2023): ``(u_c/|y_c| - u_r/|y_r| - 1/(2 beta))^2`` on per-token
      average log-ratios, the form the IPO authors confirmed; needs ``chosen_lengths`` and
      ``rejected_lengths`` (completion token counts, (B,)).

    ``backend="auto"`` uses the Rust kernel for CPU tensors and PyTorch elsewhere; ``"rust"`` or
    ``"torch"`` force one (``"rust"`` needs CPU tensors). Rewards are ``beta * u`` on the
    log-probs as given, for every loss type.
    """
    check_loss_options(beta, loss_type, label_smoothing)
    if backend not in BACKENDS:
        raise ValueError(f"backend: unknown backend {backend!r}; expected one of {BACKENDS}")
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    lengths = (chosen_lengths, rejected_lengths)
    _check_tensors(logps, lengths)
    if loss_type in LENGTH_NORMALISED:
        for name, t in zip(("chosen_lengths", "rejected_lengths"), lengths, strict=True):
            if t is None:
                raise ValueError(
                    f"{name}: loss_type {loss_type!r} averages log-probs per token and needs "
                    "completion lengths"
                )
    on_cpu = all(t.device.type == "cpu" for t in logps)
    if backend == "rust" and not on_cpu:
        raise ValueError("backend: 'rust' needs CPU tensors")
    if backend == "rust" or (backend == "auto" and on_cpu):
        loss, losses, rc, rr = _RustDPOLoss.apply(
            *logps, *lengths, beta, loss_type, label_smoothing
        )
        return DPOLossResult(loss, losses, rc, rr)

    for name, t in zip(_NAMES, logps, strict=True):
        bad = ~torch.isfinite(t.detach())
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"{name}[{i}]: log-prob is NaN or infinite")
    for name, t in zip(("chosen_lengths", "rejected_lengths"), lengths, strict=True):
        if t is not None and bool((t <= 0).any()):
            i = int((t <= 0).nonzero()[0, 0])
            raise ValueError(f"{name}[{i}]: completion length must be >= 1")
    losses = _torch_loss(*logps, *lengths, beta, loss_type, label_smoothing)
    with torch.no_grad():
        rc = beta * (policy_chosen_logps - ref_chosen_logps)
        rr = beta * (policy_rejected_logps - ref_rejected_logps)
    return DPOLossResult(losses.mean(), losses, rc, rr)
