"""The LM head at completion positions, in chunks of rows: token log-probs without (N, V) logits.

:func:`head_token_logps` turns the (N, H) hidden states that predict the N completion tokens of a
batch into their (N,) log-probs. With ``chunk_size`` rows per chunk, the forward keeps only the
hidden states and, per token, the target logit and the logsumexp; the backward recomputes each
chunk's logits. Peak head memory is O(chunk_size * V) instead of O(N * V), and the values and
gradients are those of the plain ``log_softmax(head(hidden))[target]``.

A :class:`LogitTransform` applies what a model does to ``head(hidden)`` before returning its
logits (Granite's ``logits_scaling``, Cohere's ``logit_scale``, Gemma's
``final_logit_softcapping``) inside each chunk, forward and backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LOGITS_BUDGET",
    "LogitTransform",
    "chunk_rows",
    "head_token_logps",
    "logit_transform",
    "logits_token_logps",
    "model_logits",
]

# Elements of one chunk's float32 logits (64 MiB): 128 rows at V = 128k, 2,048 at V = 32k.
LOGITS_BUDGET = 1 << 24


@dataclass(frozen=True)
class LogitTransform:
    """``cap * tanh(scale * z / cap)`` of the head's output ``z`` (no cap: ``scale * z``)."""

    scale: float = 1.0
    cap: float | None = None

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.cap is None

    def apply(self, z: Tensor) -> Tensor:
        """The model's logits from the head's (n, V) output ``z``."""
        if self.scale != 1.0:
            z = z * self.scale
        if self.cap is not None:
            z = torch.tanh(z / self.cap) * self.cap
        return z

    def grad(self, logits: Tensor, grad_logits: Tensor) -> Tensor:
        """d loss / d z from d loss / d logits, given the transformed ``logits`` (in place)."""
        if self.cap is not None:
            t = logits / self.cap
            grad_logits.mul_(1.0 - t * t)
        if self.scale != 1.0:
            grad_logits.mul_(self.scale)
        return grad_logits


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def logit_transform(config: object) -> LogitTransform:
    """The known transforms a Hugging Face ``config`` names after the LM head.

    ``logits_scaling`` divides (Granite), ``logit_scale`` multiplies (Cohere),
    ``final_logit_softcapping`` caps (Gemma 2 / 3). A transform that is not listed here is found
    by the route probe (:mod:`rlox.train.probe`), which then runs the model's own forward.
    """
    scale = 1.0
    divide = _number(getattr(config, "logits_scaling", None))
    if divide:
        scale /= divide
    multiply = _number(getattr(config, "logit_scale", None))
    if multiply is not None:
        scale *= multiply
    cap = _number(getattr(config, "final_logit_softcapping", None))
    return LogitTransform(scale, cap or None)


def model_logits(out: Any) -> Tensor:
    """The logits of a model's output: itself, its ``.logits``, or its first item."""
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(
        f"model: forward must return logits (B, T, V) or an object with .logits, got {type(out).__name__}"
    )


def _precise(x: Tensor) -> Tensor:
    """``x`` in the head's working precision: float64 stays, anything else becomes float32."""
    return x if x.dtype == torch.float64 else x.float()


def chunk_rows(logits_chunk_size: int | None, vocab: int) -> int:
    """Rows per chunk: ``logits_chunk_size`` when given (0 = unchunked), else
    ``LOGITS_BUDGET // vocab`` (at least 1)."""
    if logits_chunk_size is not None:
        return logits_chunk_size
    return max(1, LOGITS_BUDGET // max(1, vocab))


def logits_token_logps(logits: Tensor, targets: Tensor, wpo: bool) -> tuple[Tensor, Tensor | None]:
    """(N,) float32 (float64 for float64 logits) log p(target) from (N, V) logits, and with
    ``wpo`` the (N,) no-grad ``log p(target) - log sum_v p(v)^2`` (WPO, Zhou et al. 2024)."""
    logits = _precise(logits)
    lse = logits.logsumexp(-1)
    token = logits.gather(1, targets[:, None]).squeeze(1) - lse
    if not wpo:
        return token, None
    with torch.no_grad():
        return token, token - ((2 * logits).logsumexp(-1) - 2 * lse)


def _chunkable(head: nn.Module) -> bool:
    """A plain ``nn.Linear`` whose call adds nothing (no hooks, no sharded weight)."""
    if type(head) is not nn.Linear or head._forward_hooks or head._forward_pre_hooks:
        return False
    return all(type(p) in (nn.Parameter, Tensor) for p in head.parameters())


class _ChunkedLogps(torch.autograd.Function):
    """(N,) log p(target) of ``hidden @ weight.T + bias``, chunk by chunk (see module doc)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, wpo, transform):  # noqa: ANN001, ANN205
        n = hidden.shape[0]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        token = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        stat = torch.empty(n, dtype=acc, device=hidden.device) if wpo else None
        ctx.compute_dtype = weight.dtype
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            logits = F.linear(hidden[start:end], weight, bias)
            ctx.compute_dtype = logits.dtype  # the autocast dtype, when autocast is on
            logits = transform.apply(_precise(logits))
            lse[start:end] = logits.logsumexp(-1)
            token[start:end] = (
                logits.gather(1, targets[start:end, None]).squeeze(1) - lse[start:end]
            )
            if stat is not None:
                sum_sq = (2 * logits).logsumexp(-1) - 2 * lse[start:end]
                stat[start:end] = token[start:end] - sum_sq
        ctx.chunk = chunk
        ctx.transform = transform
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        if stat is None:
            return token, torch.empty(0, device=hidden.device)
        ctx.mark_non_differentiable(stat)
        return token, stat

    @staticmethod
    def backward(ctx, grad_token, _grad_stat):  # noqa: ANN001, ANN205
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        dtype = ctx.compute_dtype
        w = weight.to(dtype)
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        acc = lse.dtype
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        grad_b = None
        if bias is not None and ctx.needs_input_grad[2]:
            grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device)
        b = None if bias is None else bias.to(dtype)
        for start in range(0, hidden.shape[0], ctx.chunk):
            end = min(start + ctx.chunk, hidden.shape[0])
            h = hidden[start:end].to(dtype)
            logits = ctx.transform.apply(F.linear(h, w, b).to(acc))
            # d log p(t) / d logits = onehot(t) - softmax; times the incoming gradient.
            probs = torch.exp(logits - lse[start:end, None])
            rows = torch.arange(end - start, device=probs.device)
            probs[rows, targets[start:end]] -= 1.0
            probs.mul_(-grad_token[start:end, None])
            g = ctx.transform.grad(logits, probs).to(dtype)
            del logits, probs
            if grad_h is not None:
                grad_h[start:end] = (g @ w).to(hidden.dtype)
            if ctx.needs_input_grad[1]:
                grad_w.addmm_(g.t().to(acc), h.to(acc))
            if grad_b is not None:
                grad_b += g.to(acc).sum(0)
        grad_w_out = grad_w.to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_b_out = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w_out, grad_b_out, None, None, None, None


def head_token_logps(
    hidden: Tensor,
    head: nn.Module,
    targets: Tensor,
    chunk_size: int,
    wpo: bool = False,
    transform: LogitTransform | None = None,
) -> tuple[Tensor, Tensor | None]:
    """(N,) float32 log p(target) of the LM head ``head`` on (N, H) ``hidden``, and with ``wpo``
    the (N,) no-grad WPO statistic of :func:`logits_token_logps`. ``transform``: what the model
    does to the head's output before its logits (:func:`logit_transform`).

    ``chunk_size`` rows of logits exist at a time (0 = all N at once, the plain path). Heads
    that are not a plain ``nn.Linear`` (adapters, hooks, sharded weights) run unchunked.
    """
    transform = transform or LogitTransform()
    if chunk_size == 0 or not _chunkable(head) or hidden.shape[0] == 0:
        logits = head(hidden)
        if not transform.identity:
            logits = transform.apply(_precise(logits))
        return logits_token_logps(logits, targets, wpo)
    token, stat = _ChunkedLogps.apply(
        hidden, head.weight, head.bias, targets, chunk_size, wpo, transform
    )
    return token, stat if wpo else None
