"""Independent float64 reference implementations used by the test suite.

Written directly from the published formulas; nothing here calls into ``rlox``. With
``u = policy - ref`` (summed completion log-probs) and ``z = beta * (u_c - u_r)``:

- sigmoid (DPO):              ``-log sigma(z)`` (no label smoothing, as TRL 1.16)
- cdpo (conservative DPO):     ``-(1 - eps) log sigma(z) - eps log sigma(-z)``
- hinge (SLiC):                ``max(0, 1 - z)``
- ipo:                         ``(u_c / len_c - u_r / len_r - 1 / (2 beta)) ** 2``
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

LOSS_TYPES = ("sigmoid", "cdpo", "hinge", "ipo")


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
        # -log sigma(z) = softplus(-z)
        losses = _softplus_np(-z)
    elif loss_type == "cdpo":
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
    if loss_type in ("sigmoid", "cdpo"):
        z = beta * (uc - ur)
        zero = torch.zeros_like(z)
        # softplus(x) = log(exp(0) + exp(x)), evaluated stably by logaddexp.
        sp_neg = torch.logaddexp(zero, -z)
        if loss_type == "sigmoid":
            return sp_neg
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


# ============================================================================================
# The whole DPO loss family (see the loss specification): independent float64 references.
#
# Notation per pair: u = policy - ref (ref = 0 when reference-free), a = policy / len (per-token
# policy log-prob), s = f-divergence score, Delta = s(u_c) - s(u_r), z = beta * Delta,
# Dv = s(u_c) / len_c - s(u_r) / len_r, eps = label_smoothing (read only by the
# LABEL_SMOOTHING_USERS: TRL 1.16's sigmoid and sigmoid_norm ignore it),
# H(x) = (1 - eps) softplus(-x) + eps softplus(x)  (= -(1-eps) log sigma(x) - eps log sigma(-x)).
# bco_pair's shift delta is bco_delta, default 0 (TRL 1.16).
# The scores are Hugging Face TRL 1.16's (DPOTrainer._compute_loss):
#   reverse_kl u;  forward_kl 1 - exp(-u);  js_divergence log 2 + log sigma(u);
#   alpha_divergence (exp(t) - 1) / (alpha - 1), t = min((alpha - 1) u, 80), and u when
#   |alpha - 1| < 1e-6.
# sft is TRL's batch token mean, per pair -policy_c / m with m = sft_mean_length, default the
# mean chosen length. pair_weights w (WPO) multiply every per-pair term (and the rpo term); sft
# is multiplied by mean(w).

FAMILY_TYPES = (
    "sigmoid",
    "robust",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
    "cdpo",
    "simpo",
    "cpo",
    "orpo",
    "sft",
)
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# components whose loss is a function of Delta / Dv, and so of the f-divergence
F_DIVERGENCE_USERS = frozenset(
    {"sigmoid", "robust", "hinge", "ipo", "exo_pair", "discopop", "sigmoid_norm", "cdpo"}
)
# the types a non-default f-divergence may be combined with (TRL 1.16: sft too, which ignores it;
# rlox's cdpo like sigmoid)
F_DIVERGENCE_TYPES = F_DIVERGENCE_USERS | {"sft"}
ALPHA_EXP_MAX = 80.0
ALPHA_IDENTITY_TOL = 1e-6
# TRL 1.16's robust, exo_pair, aot, aot_unpaired; rlox's cdpo; simpo and cpo (TRL's CPOTrainer)
LABEL_SMOOTHING_USERS = frozenset(
    {"robust", "exo_pair", "aot", "aot_unpaired", "cdpo", "simpo", "cpo"}
)
REFERENCE_FREE_TYPES = frozenset({"simpo", "cpo", "orpo", "sft"})
LENGTH_TYPES = frozenset({"ipo", "sigmoid_norm", "simpo", "cpo", "orpo", "sft"})
SORTING_TYPES = frozenset({"aot", "aot_unpaired"})


def _types_and_weights(loss_type, loss_weights) -> tuple[list[str], list[float]]:
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(types) if loss_weights is None else [float(w) for w in loss_weights]
    assert len(weights) == len(types), "test bug: weights/types"
    return types, weights


# ---- numpy (float64) ------------------------------------------------------------------------


def _sp(x):
    """softplus(x) = log(exp(0) + exp(x)), stable."""
    return np.logaddexp(0.0, x)


def _sig(x):
    """sigma(x) = exp(-softplus(-x)), stable for any x."""
    return np.exp(-np.logaddexp(0.0, -x))


def _score_np(u, f_divergence, alpha):
    if f_divergence == "reverse_kl":
        return u
    if f_divergence == "forward_kl":
        return -np.expm1(-u)  # 1 - exp(-u)
    if f_divergence == "js_divergence":
        return math.log(2.0) - _sp(-u)  # log 2 + log sigma(u)
    if f_divergence == "alpha_divergence":
        k = alpha - 1.0
        if abs(k) < ALPHA_IDENTITY_TOL:
            return u
        return np.expm1(np.minimum(k * u, ALPHA_EXP_MAX)) / k
    raise AssertionError(f_divergence)  # pragma: no cover - test bug


def _weights_np(pair_weights, n):
    """(per-pair weights, the sft factor mean(w)); ones and 1 without weights."""
    if pair_weights is None:
        return np.ones(n), 1.0
    w = np.asarray(pair_weights, dtype=np.float64)
    return w, float(np.mean(w))


def reference_family(
    pc,
    pr,
    rc,
    rr,
    *,
    beta: float,
    loss_type,
    loss_weights=None,
    label_smoothing: float = 0.0,
    chosen_lengths=None,
    rejected_lengths=None,
    f_divergence: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    reference_free: bool = False,
    simpo_gamma: float = 0.5,
    cpo_alpha: float = 1.0,
    orpo_alpha: float = 0.1,
    rpo_alpha: float | None = None,
    discopop_tau: float = 0.05,
    bco_delta: float | None = None,
    pair_weights=None,
    sft_mean_length: float | None = None,
) -> dict:
    """Per-pair losses, per-component losses, rewards and metrics of the loss family (numpy f64).

    ``components[name]`` is the (B,) loss of one component times the pair weights, without its
    loss weight (``"rpo"``: ``-a_c``, the term that ``rpo_alpha`` multiplies);
    ``losses = sum_k w_k components[k] + rpo_alpha * rpo``. For ``aot``/``aot_unpaired`` entry k
    is the k-th pair in sorted order.
    """
    types, weights = _types_and_weights(loss_type, loss_weights)
    pc, pr = (np.asarray(x, dtype=np.float64) for x in (pc, pr))
    if reference_free or rc is None:
        rc = rr = np.zeros_like(pc)
    else:
        rc, rr = (np.asarray(x, dtype=np.float64) for x in (rc, rr))
    lc = None if chosen_lengths is None else np.asarray(chosen_lengths, dtype=np.float64)
    lr = None if rejected_lengths is None else np.asarray(rejected_lengths, dtype=np.float64)
    eps = float(label_smoothing)

    def score(x):
        return _score_np(x, f_divergence, f_alpha_divergence_coef)

    def smoothed(x):  # H(x)
        return (1.0 - eps) * _sp(-x) + eps * _sp(x)

    uc, ur = pc - rc, pr - rr
    xc, xr = beta * uc, beta * ur
    pw, mean_w = _weights_np(pair_weights, pc.shape[0])
    delta_used = None
    components: dict[str, np.ndarray] = {}
    for t in types:
        if t in ("sigmoid", "cdpo", "robust", "hinge", "exo_pair", "discopop"):
            z = beta * (score(uc) - score(ur))
        if t in ("ipo", "sigmoid_norm"):
            dv = score(uc) / lc - score(ur) / lr
        if t == "sigmoid":
            loss = _sp(-z)
        elif t == "cdpo":
            loss = smoothed(z)
        elif t == "robust":
            loss = ((1.0 - eps) * _sp(-z) - eps * _sp(z)) / (1.0 - 2.0 * eps)
        elif t == "hinge":
            loss = np.maximum(0.0, 1.0 - z)
        elif t == "ipo":
            loss = (dv - 1.0 / (2.0 * beta)) ** 2
        elif t == "exo_pair":
            # p log p - p log(1-eps) + q log q - q log eps, log p = -softplus(-z), log q = -softplus(z)
            log_p, log_q = -_sp(-z), -_sp(z)
            p, q = np.exp(log_p), np.exp(log_q)
            loss = p * (log_p - np.log1p(-eps)) + q * (log_q - np.log(eps))
        elif t == "nca_pair":
            loss = _sp(-xc) + 0.5 * _sp(xc) + 0.5 * _sp(xr)
        elif t == "bco_pair":
            delta_used = 0.0 if bco_delta is None else float(bco_delta)
            loss = _sp(-(xc - delta_used)) + _sp(xr - delta_used)
        elif t == "sppo_hard":
            loss = (uc - 1.0 / (2.0 * beta)) ** 2 + (ur + 1.0 / (2.0 * beta)) ** 2
        elif t == "aot":
            d = np.sort(pc - pr) - np.sort(rc - rr)
            loss = smoothed(beta * d)
        elif t == "aot_unpaired":
            d = np.sort(uc) - np.sort(ur)
            loss = smoothed(beta * d)
        elif t == "apo_zero":
            loss = _sig(-xc) + _sig(xr)
        elif t == "apo_down":
            loss = _sig(xc) + _sig(-beta * (uc - ur))
        elif t == "discopop":
            tau = discopop_tau
            m_c = _sig(-z / tau)  # 1 - m
            loss = m_c * _sp(-z) + np.exp(-z - _sp(-z / tau))
        elif t == "sigmoid_norm":
            loss = _sp(-beta * dv)
        elif t == "simpo":
            loss = smoothed(beta * (pc / lc - pr / lr) - simpo_gamma)
        elif t == "cpo":
            loss = smoothed(beta * (pc - pr)) + cpo_alpha * (-pc / lc)
        elif t == "orpo":

            def log_odds(a):
                return a - np.log(-np.expm1(a))

            ac, ar = pc / lc, pr / lr
            loss = -ac + orpo_alpha * _sp(-(log_odds(ac) - log_odds(ar)))
        elif t == "sft":
            m = np.mean(lc) if sft_mean_length is None else sft_mean_length
            loss = -pc / m
        else:  # pragma: no cover - test bug
            raise AssertionError(t)
        components[t] = loss * (mean_w if t == "sft" else pw)
    losses = sum(w * components[t] for t, w in zip(types, weights, strict=True))
    if rpo_alpha is not None:
        components["rpo"] = -pc / lc * pw
        losses = losses + rpo_alpha * components["rpo"]
    cr, rj = xc, xr
    return {
        "losses": losses,
        "loss": float(np.mean(losses)),
        "components": components,
        "component_losses": {k: float(np.mean(v)) for k, v in components.items()},
        "bco_delta": delta_used,
        "chosen_rewards": cr,
        "rejected_rewards": rj,
        "reward_accuracy": float(np.mean(cr > rj)),
        "reward_margin": float(np.mean(cr - rj)),
        "chosen_reward": float(np.mean(cr)),
        "rejected_reward": float(np.mean(rj)),
    }


# ---- torch (float64 autograd) ---------------------------------------------------------------


def _sp_t(x: torch.Tensor) -> torch.Tensor:
    return torch.logaddexp(torch.zeros_like(x), x)


def _em1_t(x: torch.Tensor) -> torch.Tensor:
    """exp(x) - 1 with accurate value and gradient: expm1 near 0 (where exp(x) - 1 cancels),
    exp(x) - 1 elsewhere (where expm1's backward, result + 1, would cancel)."""
    near = x.abs() < 0.5
    return torch.where(near, torch.expm1(torch.where(near, x, 0.0)), torch.exp(x) - 1.0)


def _score_t(u: torch.Tensor, f_divergence: str, alpha: float) -> torch.Tensor:
    if f_divergence == "reverse_kl":
        return u
    if f_divergence == "forward_kl":
        return -_em1_t(-u)
    if f_divergence == "js_divergence":
        return math.log(2.0) + torch.nn.functional.logsigmoid(u)
    if f_divergence == "alpha_divergence":
        k = alpha - 1.0
        if abs(k) < ALPHA_IDENTITY_TOL:
            return u
        return _em1_t(torch.clamp(k * u, max=ALPHA_EXP_MAX)) / k
    raise AssertionError(f_divergence)  # pragma: no cover - test bug


def reference_family_torch(
    pc: torch.Tensor,
    pr: torch.Tensor,
    rc: torch.Tensor | None,
    rr: torch.Tensor | None,
    *,
    beta: float,
    loss_type,
    loss_weights=None,
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    f_divergence: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    reference_free: bool = False,
    simpo_gamma: float = 0.5,
    cpo_alpha: float = 1.0,
    orpo_alpha: float = 0.1,
    rpo_alpha: float | None = None,
    discopop_tau: float = 0.05,
    bco_delta: float | None = None,
    pair_weights: torch.Tensor | None = None,
    sft_mean_length: float | None = None,
) -> torch.Tensor:
    """The family's (B,) per-pair losses as differentiable torch ops (use float64 leaves).

    Written separately from :func:`reference_family`, with torch's own primitives
    (logsigmoid, sigmoid, sort(stable=True)); the bco delta is a constant.
    """
    types, weights = _types_and_weights(loss_type, loss_weights)
    if reference_free or rc is None:
        rc = torch.zeros_like(pc)
        rr = torch.zeros_like(pr)
    lc = None if chosen_lengths is None else chosen_lengths.to(pc.dtype)
    lr = None if rejected_lengths is None else rejected_lengths.to(pc.dtype)
    eps = float(label_smoothing)
    nls = torch.nn.functional.logsigmoid

    def sig(x):
        # sigma(x) = exp(log sigma(x)): accurate value AND gradient for large |x| (autograd of
        # torch.sigmoid forms y * (1 - y), which loses sigma'(x) once y rounds to 1)
        return torch.exp(nls(x))

    def score(x):
        return _score_t(x, f_divergence, f_alpha_divergence_coef)

    def smoothed(x):
        if eps == 0.0:
            return -nls(x)
        return -(1.0 - eps) * nls(x) - eps * nls(-x)

    uc, ur = pc - rc, pr - rr
    pw = torch.ones_like(pc) if pair_weights is None else pair_weights.to(pc.dtype).detach()
    total = torch.zeros_like(pc)
    for t, w in zip(types, weights, strict=True):
        if t in ("sigmoid", "cdpo", "robust", "hinge", "exo_pair", "discopop"):
            z = beta * (score(uc) - score(ur))
        if t in ("ipo", "sigmoid_norm"):
            dv = score(uc) / lc - score(ur) / lr
        if t == "sigmoid":
            loss = -nls(z)
        elif t == "cdpo":
            loss = smoothed(z)
        elif t == "robust":
            loss = (-(1.0 - eps) * nls(z) + eps * nls(-z)) / (1.0 - 2.0 * eps)
        elif t == "hinge":
            loss = torch.relu(1.0 - z)
        elif t == "ipo":
            loss = (dv - 1.0 / (2.0 * beta)) ** 2
        elif t == "exo_pair":
            log_p, log_q = nls(z), nls(-z)
            loss = sig(z) * (log_p - math.log1p(-eps)) + sig(-z) * (log_q - math.log(eps))
        elif t == "nca_pair":
            xc, xr = beta * uc, beta * ur
            loss = -nls(xc) - 0.5 * nls(-xc) - 0.5 * nls(-xr)
        elif t == "bco_pair":
            xc, xr = beta * uc, beta * ur
            delta = 0.0 if bco_delta is None else bco_delta
            loss = -nls(xc - delta) - nls(-(xr - delta))
        elif t == "sppo_hard":
            loss = (uc - 0.5 / beta) ** 2 + (ur + 0.5 / beta) ** 2
        elif t in ("aot", "aot_unpaired"):
            if t == "aot":
                first, second = pc - pr, rc - rr
            else:
                first, second = uc, ur
            d = torch.sort(first, stable=True).values - torch.sort(second, stable=True).values
            loss = smoothed(beta * d)
        elif t == "apo_zero":
            loss = 1.0 - sig(beta * uc) + sig(beta * ur)
        elif t == "apo_down":
            loss = sig(beta * uc) + 1.0 - sig(beta * (uc - ur))
        elif t == "discopop":
            tau = discopop_tau
            m = sig(z / tau)
            # m * exp(-z) = exp(-z + log m)
            loss = (1.0 - m) * (-nls(z)) + torch.exp(-z + nls(z / tau))
        elif t == "sigmoid_norm":
            loss = -nls(beta * dv)
        elif t == "simpo":
            loss = smoothed(beta * (pc / lc - pr / lr) - simpo_gamma)
        elif t == "cpo":
            loss = smoothed(beta * (pc - pr)) - cpo_alpha * pc / lc
        elif t == "orpo":

            def log_odds(a):
                return a - torch.log1p(-torch.exp(a))

            loss = -pc / lc - orpo_alpha * nls(log_odds(pc / lc) - log_odds(pr / lr))
        elif t == "sft":
            # per pair -pc / m: with m the mean chosen length, the mean over pairs is the NLL
            # averaged over all chosen tokens of the batch
            loss = -pc / (lc.mean() if sft_mean_length is None else sft_mean_length)
        else:  # pragma: no cover - test bug
            raise AssertionError(t)
        total = total + w * loss * (pw.mean() if t == "sft" else pw)
    if rpo_alpha is not None:
        total = total - rpo_alpha * pw * pc / lc
    return total


def reference_family_grads(pc, pr, rc, rr, **kw) -> list[np.ndarray | None]:
    """d(mean loss)/d(pc, pr, rc, rr) by float64 autograd of :func:`reference_family_torch`.

    Lengths in ``kw`` may be numpy arrays; the ref grads are None when ``rc`` is None.
    """
    kw = dict(kw)
    for key in ("chosen_lengths", "rejected_lengths"):
        if kw.get(key) is not None:
            kw[key] = torch.as_tensor(np.asarray(kw[key], dtype=np.int64))
    if kw.get("pair_weights") is not None:
        kw["pair_weights"] = torch.as_tensor(np.asarray(kw["pair_weights"], dtype=np.float64))
    leaves = [
        None if x is None else torch.tensor(np.asarray(x, dtype=np.float64), requires_grad=True)
        for x in (pc, pr, rc, rr)
    ]
    reference_family_torch(*leaves, **kw).mean().backward()
    return [
        None if t is None else (t.grad.numpy() if t.grad is not None else np.zeros(t.shape))
        for t in leaves
    ]
