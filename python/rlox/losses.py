"""Differentiable preference losses over sequence log-probs.

On CPU the fused Rust kernel (:func:`rlox.dpo_loss`) computes the loss and its gradients in one
pass; on any other device the same math runs in pure PyTorch. Both paths agree to rounding.

Notation, per pair: ``pi`` and ``ref`` are the policy and reference log-probs SUMMED over the
completion tokens, ``|y|`` the completion length in tokens, ``u = pi - ref``, ``v = u / |y|``,
``a = pi / |y|``, ``s`` the f-divergence score (identity by default), ``Delta = s(u_c) - s(u_r)``,
``z = beta * Delta``, ``eps`` the label smoothing and ``sp(x) = log(1 + exp(x))``.

=================  ==========================================================================
``loss_type``      per-pair loss
=================  ==========================================================================
``sigmoid``        ``(1-eps) sp(-z) + eps sp(z)``. DPO, Rafailov et al. 2023; with eps the
                   conservative DPO of Mitchell 2023.
``robust``         ``((1-eps) sp(-z) - eps sp(z)) / (1 - 2 eps)``. Unbiased under label-flip
                   rate eps; Chowdhury et al. 2024, "Provably robust DPO".
``hinge``          ``max(0, 1 - z)``. SLiC, Zhao et al. 2023.
``ipo``            ``(s(v_c) - s(v_r) - 1/(2 beta))^2`` on per-token AVERAGE log-ratios, as the
                   IPO authors confirmed (Azar et al. 2023). Needs lengths.
``exo_pair``       ``p (log p - log(1-eps)) + q (log q - log eps)``, ``p = sigma(z)``,
                   ``q = sigma(-z)``: the reverse KL of EXO, Ji et al. 2024. Needs eps > 0.
``nca_pair``       ``sp(-r_c) + sp(r_c)/2 + sp(r_r)/2`` with ``r = beta u``. NCA, Chen et al. 2024.
``bco_pair``       ``sp(-(r_c - delta)) + sp(r_r - delta)``: BCO, Jung et al. 2024; ``delta`` is
                   ``bco_delta`` or the batch mean of the 2B rewards (no gradient through it).
``sppo_hard``      ``(u_c - 1/(2 beta))^2 + (u_r + 1/(2 beta))^2``. SPPO with hard win
                   probabilities, Wu et al. 2024.
``aot``            ``pi_c - pi_r`` and ``ref_c - ref_r`` each sorted over the batch;
                   ``d_k`` = difference of the k-th smallest; sigmoid loss on ``beta d_k``.
                   Distributional alignment via optimal transport, Melnyk et al. 2024.
                   Per-pair losses come out in sorted order.
``aot_unpaired``   as ``aot`` with ``u_c`` and ``u_r`` sorted separately (unpaired data).
``apo_zero``       ``sigma(-r_c) + sigma(r_r)``. Anchored preference optimisation, D'Oosterlinck
                   et al. 2024: chosen answers better than the model's own.
``apo_down``       ``sigma(r_c) + sigma(-beta (u_c - u_r))``: chosen answers worse than the
                   model's own.
``discopop``       ``(1-m) sp(-z) + m exp(-z)``, ``m = sigma(z / discopop_tau)``. Log-ratio
                   modulated loss discovered by Chris Lu et al. 2024 (DiscoPOP).
``sigmoid_norm``   sigmoid loss on ``beta (s(v_c) - s(v_r))``: length-normalised DPO. Needs
                   lengths.
``simpo``          ``(1-eps) sp(-x) + eps sp(x)``, ``x = beta (a_c - a_r) - simpo_gamma``.
                   Reference-free; Meng et al. 2024. Needs lengths.
``cpo``            sigmoid loss on ``beta (pi_c - pi_r)`` plus ``cpo_alpha * (-a_c)``.
                   Reference-free; Xu et al. 2024. Needs lengths.
``orpo``           ``-a_c + orpo_alpha sp(-(o(a_c) - o(a_r)))``, log-odds
                   ``o(a) = a - log(1 - exp(a))``. Reference-free; Hong et al. 2024. Needs
                   lengths and log-probs < 0.
``sft``            ``-a_c``: token-mean NLL of the chosen completion. Needs lengths.
=================  ==========================================================================

``rpo_alpha`` adds ``rpo_alpha * (-a_c)`` to every pair (RPO, Pang et al. 2024). Several types
at once: ``loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]`` (MPO).

``f_divergence`` (Wang et al. 2023, f-DPO) picks ``s``: ``reverse_kl`` ``s(u) = u``;
``forward_kl`` ``s(u) = -exp(-u)``; ``js_divergence`` ``s(u) = log sigma(u)``;
``alpha_divergence`` ``s(u) = (1 - exp(-alpha u)) / alpha`` with ``f_alpha_divergence_coef``.
It applies to the margin losses (sigmoid, robust, hinge, ipo, exo_pair, discopop,
sigmoid_norm).

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
    "f_alpha_divergence_coef": 1.0,
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
    """() unweighted mean of each loss component; ``"rpo"`` for the rpo_alpha term."""
    bco_delta: float | None
    """The reward shift ``bco_pair`` used, else None."""


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


def _score(u: Tensor, f_divergence: str, alpha: float) -> Tensor:
    if f_divergence == "reverse_kl":
        return u
    if f_divergence == "js_divergence":
        return _nsp(u)
    if f_divergence == "forward_kl":
        return -torch.exp(-u)
    # (1 - e^(-a u)) / a written with exp, not expm1: expm1's backward (result + 1) cancels
    # when e^(-a u) << 1.
    return (1.0 - torch.exp(-alpha * u)) / alpha


def _torch_terms(
    pc: Tensor,
    pr: Tensor,
    rc: Tensor | None,
    rr: Tensor | None,
    lc: Tensor | None,
    lr: Tensor | None,
    o: dict[str, Any],
    terms: list[tuple[str, float]],
) -> tuple[Tensor, dict[str, Tensor], float | None]:
    """Pure-torch (B,) per-pair losses, the (B,) components and the BCO shift."""
    beta, eps = o["beta"], o["label_smoothing"]
    uc = pc if rc is None else pc - rc
    ur = pr if rr is None else pr - rr
    div, alpha = o["f_divergence"], o["f_alpha_divergence_coef"]
    if lc is not None:
        lc, lr = lc.to(pc.dtype), lr.to(pc.dtype)
        ac, ar = pc / lc, pr / lr
        vc, vr = uc / lc, ur / lr
    delta = None
    if any(t == "bco_pair" for t, _ in terms):
        delta = o["bco_delta"]
        if delta is None:
            delta = float(beta * torch.cat([uc, ur]).detach().double().mean())

    def term(t: str) -> Tensor:
        if t in ("sigmoid", "robust", "hinge", "exo_pair", "discopop"):
            z = beta * (_score(uc, div, alpha) - _score(ur, div, alpha))
            if t == "sigmoid":
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
            d = _score(vc, div, alpha) - _score(vr, div, alpha)
            if t == "ipo":
                return (d - 1.0 / (2.0 * beta)) ** 2
            return _smoothed(beta * d, eps)
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
            return -ac
        raise AssertionError(t)  # pragma: no cover - names were validated

    components: dict[str, Tensor] = {}
    total = None
    for t, w in terms:
        c = term(t)
        components[t] = c
        total = w * c if total is None else total + w * c
    if o["rpo_alpha"] is not None:
        components["rpo"] = -ac
        total = total + o["rpo_alpha"] * components["rpo"]
    return total, components, delta


class _RustDPOLoss(torch.autograd.Function):
    """Forward through the Rust kernel; backward reuses the gradients it already computed."""

    @staticmethod
    def forward(ctx, pc, pr, rc, rr, lc, lr, options, terms, meta):  # noqa: D102
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
            **options,
        )
        grad_c = torch.from_numpy(out.grad_chosen)
        grad_r = torch.from_numpy(out.grad_rejected)
        ctx.save_for_backward(grad_c, grad_r)
        ctx.batch = pc.shape[0]
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (pc, pr, rc, rr))
        # Sorted losses mix pairs, and reference-free terms leave the reference out: their
        # per-pair and reference gradients are taken by autograd through the torch path.
        ctx.saved = (pc, pr, rc, rr, lc, lr, options, terms)
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
            return (None,) * 9
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


def _autograd_backward(saved, g_loss, g_losses, need) -> tuple[Tensor | None, ...]:
    """Gradients by autograd through the torch path, for the cases the kernel's do not cover."""
    pc, pr, rc, rr, lc, lr, options, terms = saved
    leaves = [
        None if t is None else t.detach().requires_grad_(bool(need[i]))
        for i, t in enumerate((pc, pr, rc, rr))
    ]
    with torch.enable_grad():
        losses, _, _ = _torch_terms(*leaves, lc, lr, options, terms)
        total = 0.0
        if g_loss is not None:
            total = total + losses.mean() * g_loss
        if g_losses is not None:
            total = total + (losses * g_losses).sum()
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(total, wanted, allow_unused=True))
    out = [next(grads) if t is not None and t.requires_grad else None for t in leaves]
    return (*out, None, None, None, None, None)


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
    f_alpha_divergence_coef: float = 1.0,
    reference_free: bool = False,
    simpo_gamma: float = 0.5,
    cpo_alpha: float = 1.0,
    orpo_alpha: float = 0.1,
    rpo_alpha: float | None = None,
    discopop_tau: float = 0.05,
    bco_delta: float | None = None,
    backend: str = "auto",
) -> DPOLossResult:
    """Differentiable preference loss over (B,) summed completion log-probs.

    ``loss_type`` is one name or a list (with ``loss_weights``); the formulas and papers are in
    this module's docstring. ``chosen_lengths`` / ``rejected_lengths`` are (B,) integer
    completion token counts, required by ``ipo``, ``sigmoid_norm``, ``simpo``, ``cpo``,
    ``orpo``, ``sft`` and ``rpo_alpha``. Reference log-probs may be None for reference-free
    types or with ``reference_free=True`` (which reads them as 0 for any type).

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
    present = [t for t in logps if t is not None]
    on_cpu = all(t.device.type == "cpu" for t in present)
    if backend == "rust" and not on_cpu:
        raise ValueError("backend: 'rust' needs CPU tensors")
    if backend == "rust" or (backend == "auto" and on_cpu):
        meta: dict[str, Any] = {}
        loss, losses, rc, rr = _RustDPOLoss.apply(*logps, *lengths, options, terms, meta)
        components = {k: torch.tensor(v, dtype=loss.dtype) for k, v in meta["components"].items()}
        return DPOLossResult(loss, losses, rc, rr, components, meta["bco_delta"])

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
    losses, comps, delta = _torch_terms(pc, pr, rc, rr, lc, lr, options, terms)
    with torch.no_grad():
        r_c = beta * (pc if rc is None else pc - rc)
        r_r = beta * (pr if rr is None else pr - rr)
        components = {k: v.detach().mean() for k, v in comps.items()}
    return DPOLossResult(losses.mean(), losses, r_c, r_r, components, delta)
