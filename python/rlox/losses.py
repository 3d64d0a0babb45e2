"""Differentiable preference losses over sequence log-probs.

On CPU the fused Rust kernel (:func:`rlox.dpo_loss`) computes the loss and its gradients in one
pass; on any other device the same math runs in pure PyTorch. Both paths agree to rounding.

Notation, per pair: ``pi`` and ``ref`` are the policy and reference log-probs SUMMED over the
completion tokens, ``|y|`` the completion length in tokens, ``u = pi - ref``, ``a = pi / |y|``,
``s`` the f-divergence score (identity by default), ``Delta = s(u_c) - s(u_r)``,
``Dn = s(u_c) / |y_c| - s(u_r) / |y_r|``, ``z = beta * Delta``, ``eps`` the label smoothing and
``sp(x) = log(1 + exp(x))``. Scores and the types TRL 1.16's ``DPOTrainer`` has (all but
``cdpo``, ``simpo``, ``cpo`` and ``orpo``) give its numbers.

=================  ==========================================================================
``loss_type``      per-pair loss
=================  ==========================================================================
``sigmoid``        ``sp(-z)``. DPO, Rafailov et al. 2023. Ignores eps, as TRL 1.16 does.
``robust``         ``((1-eps) sp(-z) - eps sp(z)) / (1 - 2 eps)``. Unbiased under label-flip
                   rate eps; Chowdhury et al. 2024, "Provably robust DPO".
``hinge``          ``max(0, 1 - z)``. SLiC, Zhao et al. 2023.
``ipo``            ``(Dn - 1/(2 beta))^2``: the scores divided by the lengths (per-token AVERAGE
                   log-ratios with the default score), as the IPO authors confirmed (Azar et
                   al. 2023). Needs lengths.
``exo_pair``       ``p (log p - log(1-eps)) + q (log q - log eps)``, ``p = sigma(z)``,
                   ``q = sigma(-z)``: the reverse KL of EXO, Ji et al. 2024. Needs eps > 0.
``nca_pair``       ``sp(-r_c) + sp(r_c)/2 + sp(r_r)/2`` with ``r = beta u``. NCA, Chen et al. 2024.
``bco_pair``       ``sp(-(r_c - delta)) + sp(r_r - delta)``: BCO, Jung et al. 2024. ``delta`` is
                   ``bco_delta``, default 0 (TRL 1.16); the paper's running mean of the rewards
                   is kept by a trainer and passed in (no gradient through it).
``sppo_hard``      ``(u_c - 1/(2 beta))^2 + (u_r + 1/(2 beta))^2``. SPPO with hard win
                   probabilities, Wu et al. 2024.
``aot``            ``pi_c - pi_r`` and ``ref_c - ref_r`` each sorted over the batch;
                   ``d_k`` = difference of the k-th smallest; the cdpo loss on ``beta d_k``.
                   Distributional alignment via optimal transport, Melnyk et al. 2024.
                   Per-pair losses come out in sorted order.
``aot_unpaired``   as ``aot`` with ``u_c`` and ``u_r`` sorted separately (unpaired data).
``apo_zero``       ``sigma(-r_c) + sigma(r_r)``. Anchored preference optimisation, D'Oosterlinck
                   et al. 2024: chosen answers better than the model's own.
``apo_down``       ``sigma(r_c) + sigma(-beta (u_c - u_r))``: chosen answers worse than the
                   model's own.
``discopop``       ``(1-m) sp(-z) + m exp(-z)``, ``m = sigma(z / discopop_tau)``. Log-ratio
                   modulated loss discovered by Chris Lu et al. 2024 (DiscoPOP).
``sigmoid_norm``   ``sp(-beta Dn)``: length-normalised DPO. Needs lengths. Ignores eps (TRL).
``cdpo``           ``(1-eps) sp(-z) + eps sp(z)``: conservative DPO, Mitchell 2023 (labels
                   flipped with probability eps). rlox's name; TRL 1.16 has no such type.
``simpo``          ``(1-eps) sp(-x) + eps sp(x)``, ``x = beta (a_c - a_r) - simpo_gamma``.
                   Reference-free; Meng et al. 2024. Needs lengths.
``cpo``            ``(1-eps) sp(-x) + eps sp(x)``, ``x = beta (pi_c - pi_r)``, plus
                   ``cpo_alpha * (-a_c)`` (token mean per pair). Reference-free; Xu et al. 2024.
                   Needs lengths.
``orpo``           ``-a_c + orpo_alpha sp(-(o(a_c) - o(a_r)))``, log-odds
                   ``o(a) = a - log(1 - exp(a))``. Reference-free; Hong et al. 2024. Needs
                   lengths and log-probs < 0.
``sft``            ``-pi_c / m``, ``m = sft_mean_length`` or by default the batch's mean chosen
                   length ``sum(|y_c|) / B``: the mean over pairs is then the NLL averaged over
                   ALL chosen tokens of the batch, ``-sum(pi_c) / sum(|y_c|)``. Needs lengths.
=================  ==========================================================================

``label_smoothing`` (eps) is read by ``robust``, ``exo_pair``, ``aot`` and ``aot_unpaired`` (as in
TRL 1.16), ``cdpo``, and ``simpo`` and ``cpo`` (as in TRL's ``CPOTrainer``); the other types
ignore it. eps > 0 with none of these in ``loss_type`` is an error (for conservative DPO, use
``loss_type="cdpo"``).

``rpo_alpha`` adds ``rpo_alpha * (-a_c)`` to every pair (RPO, Pang et al. 2024). Several types
at once: ``loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]`` (MPO).

Averages of the chosen NLL: ``sft`` averages over all chosen tokens of the batch (TRL); the
``rpo_alpha`` term, ``cpo`` and ``orpo`` take each pair's token mean ``-a_c``, then the mean over
pairs (as their papers do). With gradient accumulation, pass ``sft_mean_length`` = the step's mean
chosen length so that micro-batches count by their share of chosen tokens.

``f_divergence`` (Wang et al. 2023, f-DPO) picks ``s``: ``reverse_kl`` ``s(u) = u``;
``forward_kl`` ``s(u) = 1 - exp(-u)``; ``js_divergence`` ``s(u) = log 2 + log sigma(u)``;
``alpha_divergence`` ``s(u) = (exp(t) - 1) / (alpha - 1)``, ``t = min((alpha - 1) u, 80)``,
``alpha = f_alpha_divergence_coef`` (default 0.5; no gradient beyond the clamp; ``s(u) = u`` when
``|alpha - 1| < 1e-6``). A non-default divergence is allowed with sigmoid, robust, hinge, ipo,
exo_pair, discopop, sigmoid_norm and sft (which ignores it), as in TRL, and with cdpo.

``pair_weights`` (WPO, Zhou et al. 2024), (B,) constants ``w >= 0``: every term of pair i (the
rpo term too) is multiplied by ``w_i``, except ``sft``, which TRL computes as one batch value and
so is multiplied by ``mean(w)``. Not with ``aot`` / ``aot_unpaired`` (they sort pairs).

Rewards are ``beta * (pi - ref)`` on the summed log-probs for every type, with ``ref = 0`` for
reference-free use.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from rlox import _rlox

LOSS_TYPES: tuple[str, ...] = (
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
F_DIVERGENCES: tuple[str, ...] = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
BACKENDS: tuple[str, ...] = ("auto", "rust", "torch")
SORTED_TYPES = frozenset({"aot", "aot_unpaired"})
REFERENCE_FREE = frozenset({"simpo", "cpo", "orpo", "sft"})

LOSS_DEFAULTS: dict[str, Any] = {
    "beta": 0.1,
    "loss_type": "sigmoid",
    "loss_weights": None,
    "label_smoothing": 0.0,
    "f_divergence": "reverse_kl",
    "f_alpha_divergence_coef": 0.5,
    "reference_free": False,
    "simpo_gamma": 0.5,
    "cpo_alpha": 1.0,
    "orpo_alpha": 0.1,
    "rpo_alpha": None,
    "discopop_tau": 0.05,
    "bco_delta": None,
}
"""Every loss option and its default."""
_OPTIONAL_FLOATS = frozenset({"rpo_alpha", "bco_delta"})
_FLOAT_OPTIONS = frozenset(
    k for k, v in LOSS_DEFAULTS.items() if isinstance(v, float) and k not in _OPTIONAL_FLOATS
)


class DPOLossResult(NamedTuple):
    """Output of :func:`dpo_loss`. ``loss`` and ``losses`` carry gradients; the rest do not."""

    loss: Tensor
    """() mean loss over pairs."""
    losses: Tensor
    """(B,) per-pair losses (sorted order for ``aot`` / ``aot_unpaired``)."""
    chosen_rewards: Tensor
    """(B,) beta * (policy_chosen_logps - ref_chosen_logps)."""
    rejected_rewards: Tensor
    """(B,) beta * (policy_rejected_logps - ref_rejected_logps)."""
    component_losses: dict[str, Tensor]
    """() mean of each loss component over pairs, times the pair weights but not its loss
    weight; ``"rpo"`` for the rpo_alpha term."""
    bco_delta: float | None
    """The reward shift ``bco_pair`` used (``bco_delta``, else 0.0); None without ``bco_pair``."""


def check_loss_options(**options: Any) -> dict[str, Any]:
    """Validate loss options (the keys of :data:`LOSS_DEFAULTS`); raise naming the bad one.

    Returns ``terms`` (list of (name, weight)), ``components`` (reported names),
    ``needs_lengths`` and ``needs_reference``.
    """
    unknown = sorted(set(options) - set(LOSS_DEFAULTS))
    if unknown:
        raise TypeError(f"{unknown[0]}: unknown loss option; expected one of {list(LOSS_DEFAULTS)}")
    for name, value in options.items():
        if name in _FLOAT_OPTIONS or (name in _OPTIONAL_FLOATS and value is not None):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    if not isinstance(options.get("reference_free", False), bool):
        raise TypeError(
            f"reference_free: expected a bool, got {type(options['reference_free']).__name__}"
        )
    lt = options.get("loss_type", "sigmoid")
    names = [lt] if isinstance(lt, str) else lt
    if not isinstance(names, list | tuple) or not all(isinstance(t, str) for t in names):
        raise TypeError(f"loss_type: expected a str or a list of str, got {type(lt).__name__}")
    for t in names:
        if t not in LOSS_TYPES:
            raise ValueError(f"loss_type: unknown loss type {t!r}; expected one of {LOSS_TYPES}")
    div = options.get("f_divergence", "reverse_kl")
    if not isinstance(div, str):
        raise TypeError(f"f_divergence: expected a str, got {type(div).__name__}")
    if div not in F_DIVERGENCES:
        raise ValueError(
            f"f_divergence: unknown f-divergence {div!r}; expected one of {F_DIVERGENCES}"
        )
    return _rlox.check_loss_options(**options)


_NAMES = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")


def _check_tensors(logps: tuple[Tensor | None, ...], lengths: tuple[Tensor | None, ...]) -> None:
    first = logps[0]
    for name, t in zip(_NAMES, logps, strict=True):
        if t is None and name.startswith("ref"):
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: must be a floating-point tensor, got {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"{name}: must be 1-D (B,), got shape {tuple(t.shape)}")
        if t.dtype != first.dtype:
            raise TypeError(
                f"{name}: dtype {t.dtype} differs from policy_chosen_logps ({first.dtype}); "
                "pass all log-prob tensors in one dtype"
            )
        if t.shape != first.shape:
            raise ValueError(
                f"{name}: has length {t.shape[0]} but policy_chosen_logps has {first.shape[0]}"
            )
    if first.shape[0] == 0:
        raise ValueError("policy_chosen_logps: is empty; need at least one pair")
    for name, t in zip(("chosen_lengths", "rejected_lengths"), lengths, strict=True):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name}: completion lengths must be an integer tensor, got {t.dtype}")
        if t.shape != first.shape:
            raise ValueError(
                f"{name}: must have shape {tuple(first.shape)} like the log-probs, "
                f"got {tuple(t.shape)}"
            )


def _first_bad(name: str, bad: Tensor, message: str) -> None:
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name}[{i}]: {message}")


def _nsp(x: Tensor) -> Tensor:
    """``-softplus(-x) = log sigma(x)``, accurate for every x (torch's softplus is thresholded)."""
    return F.logsigmoid(x)


def _smoothed(z: Tensor, eps: float) -> Tensor:
    if eps == 0.0:  # dropped, not multiplied by 0: 0 * inf would be NaN
        return -_nsp(z)
    return -(1.0 - eps) * _nsp(z) - eps * _nsp(-z)


ALPHA_EXP_MAX = 80.0
"""Largest exponent ``(alpha - 1) u`` of the alpha-divergence score (TRL's float32 clamp)."""
ALPHA_IDENTITY_TOL = 1e-6
"""``|alpha - 1|`` below which the alpha-divergence score is ``u`` (the reverse-KL limit)."""


def _expm1(x: Tensor) -> Tensor:
    """``exp(x) - 1`` with expm1's value and ``exp(x)`` as its derivative (expm1's own backward
    forms ``result + 1``, which cancels when ``exp(x) << 1``)."""
    e1 = torch.exp(x) - 1.0
    return e1 + (torch.expm1(x) - e1).detach()


def _score(u: Tensor, f_divergence: str, alpha: float) -> Tensor:
    """(B,) f-divergence score ``s(u)`` of TRL 1.16 (see the module docstring)."""
    if f_divergence == "reverse_kl":
        return u
    if f_divergence == "js_divergence":
        return math.log(2.0) + _nsp(u)
    if f_divergence == "forward_kl":
        return -_expm1(-u)
    k = alpha - 1.0
    if abs(k) < ALPHA_IDENTITY_TOL:
        return u
    return _expm1(torch.clamp(k * u, max=ALPHA_EXP_MAX)) / k


def _torch_terms(
    pc: Tensor,
    pr: Tensor,
    rc: Tensor | None,
    rr: Tensor | None,
    lc: Tensor | None,
    lr: Tensor | None,
    o: dict[str, Any],
    terms: list[tuple[str, float]],
    weights: Tensor | None = None,
    sft_len: float | None = None,
) -> tuple[Tensor, dict[str, Tensor], float | None]:
    """Pure-torch (B,) per-pair losses, the (B,) components (times the (B,) pair ``weights``)
    and the BCO shift."""
    beta, eps = o["beta"], o["label_smoothing"]
    uc = pc if rc is None else pc - rc
    ur = pr if rr is None else pr - rr
    div, alpha = o["f_divergence"], o["f_alpha_divergence_coef"]
    if lc is not None:
        if sft_len is None:
            sft_len = float(lc.sum()) / lc.shape[0]
        lc, lr = lc.to(pc.dtype), lr.to(pc.dtype)
        ac, ar = pc / lc, pr / lr
    delta = None
    if any(t == "bco_pair" for t, _ in terms):
        delta = 0.0 if o["bco_delta"] is None else float(o["bco_delta"])

    def term(t: str) -> Tensor:
        if t in ("sigmoid", "cdpo", "robust", "hinge", "exo_pair", "discopop"):
            z = beta * (_score(uc, div, alpha) - _score(ur, div, alpha))
            if t == "sigmoid":
                return -_nsp(z)
            if t == "cdpo":
                return _smoothed(z, eps)
            if t == "robust":
                return (-(1.0 - eps) * _nsp(z) + eps * _nsp(-z)) / (1.0 - 2.0 * eps)
            if t == "hinge":
                return torch.relu(1.0 - z)
            if t == "exo_pair":
                # exp(log sigma) keeps both derivatives accurate where sigma rounds to 1
                p, q = torch.exp(_nsp(z)), torch.exp(_nsp(-z))
                return p * (_nsp(z) - math.log(1.0 - eps)) + q * (_nsp(-z) - math.log(eps))
            tau = o["discopop_tau"]
            m = torch.sigmoid(z / tau)
            return (1.0 - m) * -_nsp(z) + torch.exp(-z + _nsp(z / tau))
        if t in ("ipo", "sigmoid_norm"):
            d = _score(uc, div, alpha) / lc - _score(ur, div, alpha) / lr
            if t == "ipo":
                return (d - 1.0 / (2.0 * beta)) ** 2
            return -_nsp(beta * d)
        if t == "nca_pair":
            return -_nsp(beta * uc) - 0.5 * _nsp(-beta * uc) - 0.5 * _nsp(-beta * ur)
        if t == "bco_pair":
            return -_nsp(beta * uc - delta) - _nsp(-(beta * ur - delta))
        if t == "sppo_hard":
            return (uc - 0.5 / beta) ** 2 + (ur + 0.5 / beta) ** 2
        if t == "apo_zero":
            return torch.sigmoid(-beta * uc) + torch.sigmoid(beta * ur)
        if t == "apo_down":
            return torch.sigmoid(beta * uc) + torch.sigmoid(-beta * (uc - ur))
        if t in SORTED_TYPES:
            if t == "aot":
                x = pc - pr
                y = torch.zeros_like(x) if rc is None else rc - rr
            else:
                x, y = uc, ur
            xs = torch.sort(x, stable=True).values
            ys = torch.sort(y, stable=True).values
            return _smoothed(beta * (xs - ys), eps)
        if t == "simpo":
            return _smoothed(beta * (ac - ar) - o["simpo_gamma"], eps)
        if t == "cpo":
            return _smoothed(beta * (pc - pr), eps) - o["cpo_alpha"] * ac
        if t == "orpo":
            # log-odds a - log(1 - exp(a)); the inputs were checked to be < 0
            odds_c = ac - torch.log(-torch.expm1(ac))
            odds_r = ar - torch.log(-torch.expm1(ar))
            return -ac - o["orpo_alpha"] * _nsp(odds_c - odds_r)
        if t == "sft":
            return -pc / sft_len
        raise AssertionError(t)  # pragma: no cover - names were validated

    def weigh(t: str, c: Tensor) -> Tensor:
        if weights is None:
            return c
        # sft is one batch value in TRL, multiplied per pair: its mean counts mean(w) times
        return c * float(weights.double().mean()) if t == "sft" else c * weights

    components: dict[str, Tensor] = {}
    total = None
    for t, w in terms:
        c = weigh(t, term(t))
        components[t] = c
        total = w * c if total is None else total + w * c
    if o["rpo_alpha"] is not None:
        components["rpo"] = weigh("rpo", -ac)
        total = total + o["rpo_alpha"] * components["rpo"]
    return total, components, delta


class _RustDPOLoss(torch.autograd.Function):
    """Forward through the Rust kernel; backward reuses the gradients it already computed."""

    @staticmethod
    def forward(ctx, pc, pr, rc, rr, lc, lr, w, sft_len, options, terms, meta):  # noqa: D102
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
            chosen_lengths=arr(lc),
            rejected_lengths=arr(lr),
            pair_weights=arr(w),
            sft_mean_length=sft_len,
            **options,
        )
        grad_c = torch.from_numpy(out.grad_chosen)
        grad_r = torch.from_numpy(out.grad_rejected)
        ctx.save_for_backward(grad_c, grad_r)
        ctx.batch = pc.shape[0]
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (pc, pr, rc, rr))
        # Sorted losses mix pairs, and reference-free terms leave the reference out: their
        # per-pair and reference gradients are taken by autograd through the torch path.
        ctx.saved = (pc, pr, rc, rr, lc, lr, options, terms, w, sft_len)
        ctx.sorted = terms[0][0] in SORTED_TYPES
        ctx.partly_free = options["rpo_alpha"] is not None or any(
            t in REFERENCE_FREE for t, _ in terms
        )
        losses = torch.from_numpy(out.losses).to(pc.dtype)
        rewards_c = torch.from_numpy(out.chosen_rewards).to(pc.dtype)
        rewards_r = torch.from_numpy(out.rejected_rewards).to(pc.dtype)
        ctx.mark_non_differentiable(rewards_c, rewards_r)
        ctx.set_materialize_grads(False)
        meta["components"] = out.component_losses
        meta["bco_delta"] = out.bco_delta
        return torch.tensor(out.loss, dtype=pc.dtype), losses, rewards_c, rewards_r

    @staticmethod
    def backward(ctx, g_loss, g_losses, _g_rc, _g_rr):  # noqa: D102
        need = ctx.needs_input_grad
        ref_grad = need[2] or need[3]
        if (ctx.sorted and (g_losses is not None or ref_grad)) or (ctx.partly_free and ref_grad):
            return _autograd_backward(ctx.saved, g_loss, g_losses, need)
        grad_c, grad_r = ctx.saved_tensors
        gc = gr = None
        if g_loss is not None:
            if float(g_loss) == 1.0:  # the usual loss.backward(): hand the kernel's arrays over
                gc, gr = grad_c, grad_r
            else:
                gc, gr = grad_c * g_loss, grad_r * g_loss
        if g_losses is not None:
            # Pair i's loss depends on pair i alone, so d(loss_i)/d(logp_i) is B times the
            # gradient of the mean.
            scale = g_losses * ctx.batch
            gc = scale * grad_c if gc is None else gc + scale * grad_c
            gr = scale * grad_r if gr is None else gr + scale * grad_r
        if gc is None:
            return (None,) * 11
        d_pc, d_pr, d_rc, d_rr = ctx.dtypes
        return (
            gc.to(d_pc) if need[0] else None,
            gr.to(d_pr) if need[1] else None,
            (-gc).to(d_rc) if need[2] else None,
            (-gr).to(d_rr) if need[3] else None,
            *(None,) * 7,
        )


def _autograd_backward(saved, g_loss, g_losses, need) -> tuple[Tensor | None, ...]:
    """Gradients by autograd through the torch path, for the cases the kernel's do not cover."""
    pc, pr, rc, rr, lc, lr, options, terms, w, sft_len = saved
    leaves = [
        None if t is None else t.detach().requires_grad_(bool(need[i]))
        for i, t in enumerate((pc, pr, rc, rr))
    ]
    with torch.enable_grad():
        losses, _, _ = _torch_terms(*leaves, lc, lr, options, terms, w, sft_len)
        total = 0.0
        if g_loss is not None:
            total = total + losses.mean() * g_loss
        if g_losses is not None:
            total = total + (losses * g_losses).sum()
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(total, wanted, allow_unused=True))
    out = [next(grads) if t is not None and t.requires_grad else None for t in leaves]
    return (*out, *(None,) * 7)


def _check_presence(info: dict[str, Any], terms, logps, lengths) -> None:
    """References and lengths: both or neither, and present where the loss needs them."""
    for name in ("ref_chosen_logps", "ref_rejected_logps"):
        given = logps[_NAMES.index(name)] is not None
        if not given and (info["needs_reference"] or any(x is not None for x in logps[2:])):
            raise ValueError(
                f"{name}: is missing; loss_type {terms[0][0]!r} compares the policy with a "
                "reference (pass both reference log-probs, or reference_free=True)"
            )
    for name, t in zip(("chosen_lengths", "rejected_lengths"), lengths, strict=True):
        if t is None and (info["needs_lengths"] or any(x is not None for x in lengths)):
            raise ValueError(
                f"{name}: loss {[t for t, _ in terms]} averages log-probs per token and needs "
                "completion lengths"
            )


def _check_weights(
    pair_weights: Tensor | None, sft_mean_length: float | None, pc: Tensor, terms
) -> Tensor | None:
    """Validate ``pair_weights`` and ``sft_mean_length``; the (B,) weights as constants in the
    dtype and on the device of ``pc``."""
    if sft_mean_length is not None:
        if isinstance(sft_mean_length, bool) or not isinstance(sft_mean_length, numbers.Real):
            raise TypeError(
                f"sft_mean_length: expected a float, got {type(sft_mean_length).__name__}"
            )
        if not (math.isfinite(sft_mean_length) and sft_mean_length > 0):
            raise ValueError(f"sft_mean_length: must be a finite number > 0, got {sft_mean_length}")
    if pair_weights is None:
        return None
    if not isinstance(pair_weights, Tensor):
        raise TypeError(f"pair_weights: expected a torch.Tensor, got {type(pair_weights).__name__}")
    if not pair_weights.is_floating_point():
        raise TypeError(f"pair_weights: must be a floating tensor, got {pair_weights.dtype}")
    sorting = [t for t, _ in terms if t in SORTED_TYPES]
    if sorting:
        raise ValueError(
            f"pair_weights: loss_type {sorting[0]!r} sorts pairs within the batch, so per-pair "
            "weights would be misaligned; pass pair_weights=None"
        )
    if pair_weights.shape != pc.shape:
        raise ValueError(
            f"pair_weights: must have shape {tuple(pc.shape)} like the log-probs, "
            f"got {tuple(pair_weights.shape)}"
        )
    w = pair_weights.detach()
    _first_bad("pair_weights", ~(torch.isfinite(w) & (w >= 0)), "must be a finite number >= 0")
    return w.to(device=pc.device, dtype=pc.dtype)


def _torch_path(logps, lengths, options, terms, w, sft_len) -> DPOLossResult:
    """:func:`dpo_loss` in pure PyTorch, after the checks the kernel would make."""
    for name, t in zip(_NAMES, logps, strict=True):
        if t is not None:
            _first_bad(name, ~torch.isfinite(t.detach()), "log-prob is NaN or infinite")
    for name, t in zip(("chosen_lengths", "rejected_lengths"), lengths, strict=True):
        if t is not None:
            _first_bad(name, (t <= 0) | (t >= 2**31), "completion length must be in [1, 2^31)")
    if any(t == "orpo" for t, _ in terms):
        for name, t in zip(_NAMES[:2], logps[:2], strict=True):
            _first_bad(
                name,
                t.detach() >= 0,
                'loss_type "orpo" needs log-probs < 0 (the odds of probability 1 are infinite)',
            )
    pc, pr, rc, rr = logps
    lc, lr = lengths
    losses, comps, delta = _torch_terms(pc, pr, rc, rr, lc, lr, options, terms, w, sft_len)
    beta = options["beta"]
    with torch.no_grad():
        r_c = beta * (pc if rc is None else pc - rc)
        r_r = beta * (pr if rr is None else pr - rr)
        components = {k: v.detach().mean() for k, v in comps.items()}
    return DPOLossResult(losses.mean(), losses, r_c, r_r, components, delta)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    beta: float = 0.1,
    loss_type: str | list[str] = "sigmoid",
    loss_weights: list[float] | None = None,
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    f_divergence: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    reference_free: bool = False,
    simpo_gamma: float = 0.5,
    cpo_alpha: float = 1.0,
    orpo_alpha: float = 0.1,
    rpo_alpha: float | None = None,
    discopop_tau: float = 0.05,
    bco_delta: float | None = None,
    pair_weights: Tensor | None = None,
    sft_mean_length: float | None = None,
    backend: str = "auto",
) -> DPOLossResult:
    """Differentiable preference loss over (B,) summed completion log-probs.

    ``loss_type`` is one name or a list (with ``loss_weights``); the formulas and papers are in
    this module's docstring. ``chosen_lengths`` / ``rejected_lengths`` are (B,) integer
    completion token counts, required by ``ipo``, ``sigmoid_norm``, ``simpo``, ``cpo``,
    ``orpo``, ``sft`` and ``rpo_alpha``. Reference log-probs may be None for reference-free
    types or with ``reference_free=True`` (which reads them as 0 for any type).

    ``bco_delta``: the ``bco_pair`` reward shift (None: no shift, TRL 1.16's loss); the result's
    ``bco_delta`` is the shift used.

    ``pair_weights``: (B,) floating weights >= 0 (WPO), constants cast to the log-probs' dtype;
    each pair's loss is multiplied by its weight, the ``sft`` term by their mean.
    ``sft_mean_length``: the length ``m`` of the ``sft`` term ``-pi_c / m`` (> 0; default the
    batch's mean chosen length); ignored by the other types.

    ``backend="auto"`` uses the Rust kernel for CPU tensors and PyTorch elsewhere; ``"rust"`` or
    ``"torch"`` force one (``"rust"`` needs CPU tensors).
    """
    options = {
        "beta": beta,
        "loss_type": loss_type,
        "loss_weights": loss_weights,
        "label_smoothing": label_smoothing,
        "f_divergence": f_divergence,
        "f_alpha_divergence_coef": f_alpha_divergence_coef,
        "reference_free": reference_free,
        "simpo_gamma": simpo_gamma,
        "cpo_alpha": cpo_alpha,
        "orpo_alpha": orpo_alpha,
        "rpo_alpha": rpo_alpha,
        "discopop_tau": discopop_tau,
        "bco_delta": bco_delta,
    }
    info = check_loss_options(**options)
    if backend not in BACKENDS:
        raise ValueError(f"backend: unknown backend {backend!r}; expected one of {BACKENDS}")
    if reference_free:
        ref_chosen_logps = ref_rejected_logps = None
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    lengths = (chosen_lengths, rejected_lengths)
    _check_tensors(logps, lengths)
    terms = [(t, float(w)) for t, w in info["terms"]]
    _check_presence(info, terms, logps, lengths)
    w = _check_weights(pair_weights, sft_mean_length, policy_chosen_logps, terms)
    sft_len = None if sft_mean_length is None else float(sft_mean_length)
    on_cpu = all(t.device.type == "cpu" for t in logps if t is not None)
    if backend == "rust" and not on_cpu:
        raise ValueError("backend: 'rust' needs CPU tensors")
    if backend == "torch" or (backend == "auto" and not on_cpu):
        return _torch_path(logps, lengths, options, terms, w, sft_len)
    meta: dict[str, Any] = {}
    loss, losses, rc, rr = _RustDPOLoss.apply(*logps, *lengths, w, sft_len, options, terms, meta)
    components = {k: torch.tensor(v, dtype=loss.dtype) for k, v in meta["components"].items()}
    return DPOLossResult(loss, losses, rc, rr, components, meta["bco_delta"])
