"""The DPO loss family: the Rust kernel (`rlox.dpo_loss`) and the torch entry point
(`rlox.losses.dpo_loss`) against the independent float64 references in ``tests/reference.py``.

Tolerances come from a first-order running rounding-error model of each loss formula in the
input dtype (``ErrorModel`` below): every quantity carries a bound on its absolute error. Inputs
are exact; a difference of two inputs carries ``u * (|a| + |b|)`` (so any association of the four
log-probs is covered), every arithmetic result adds ``u * |result|``, hyper-parameters (beta,
eps, gamma, tau, alpha, ...) are rounded to the dtype, and a function's error is the incoming error
times the largest slope over the error interval (plus ``u`` absolute for sigmoids, which appear in
``1 - sigma`` forms). Gradients use the analytic derivative written with the same tracked ops.
``u`` is the unit roundoff of the dtype times ``SLACK``.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import (
    ALPHA_EXP_MAX,
    ALPHA_IDENTITY_TOL,
    F_DIVERGENCE_TYPES,
    F_DIVERGENCE_USERS,
    F_DIVERGENCES,
    FAMILY_TYPES,
    LABEL_SMOOTHING_USERS,
    LENGTH_TYPES,
    REFERENCE_FREE_TYPES,
    SORTING_TYPES,
    reference_family,
    reference_family_grads,
    reference_family_torch,
)

import rlox
from rlox.losses import dpo_loss as torch_dpo_loss

UNIT_ROUNDOFF = {np.float32: 2.0**-24, np.float64: 2.0**-53}
SLACK = 16.0
TORCH_DTYPES = {np.float32: torch.float32, np.float64: torch.float64}
NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
# |u| and |(alpha - 1) u| bound for the exp-based f-divergences: exp stays far from overflow, and
# so does the square in ipo ((e^40 / 0.05)^2 ~ 2e37 < 3.4e38 in float32). In float64 the alpha
# exponent goes past TRL's clamp at 80.
EXP_RANGE = {np.float32: 40.0, np.float64: 300.0}
OPTION_DEFAULTS = dict(
    loss_weights=None,
    label_smoothing=0.0,
    f_divergence="reverse_kl",
    f_alpha_divergence_coef=0.5,
    reference_free=False,
    simpo_gamma=0.5,
    cpo_alpha=1.0,
    orpo_alpha=0.1,
    rpo_alpha=None,
    discopop_tau=0.05,
    bco_delta=None,
    pair_weights=None,
    sft_mean_length=None,
)


def _types(loss_type) -> list[str]:
    return [loss_type] if isinstance(loss_type, str) else list(loss_type)


# --------------------------------------------------------------------------------------------
# rounding-error model


class EV:
    """(B,) (or scalar) float64 values with a bound on the kernel's absolute error in them."""

    __slots__ = ("v", "e", "u")

    def __init__(self, v, e, u):
        self.v = np.asarray(v, dtype=np.float64)
        e = np.nan_to_num(np.asarray(e, dtype=np.float64), nan=np.inf)
        self.e = np.broadcast_to(e, np.broadcast_shapes(e.shape, self.v.shape))
        self.u = u

    def _lift(self, o):
        return o if isinstance(o, EV) else EV(o, 0.0, self.u)  # an exact constant

    def _new(self, v, e):
        """A rounded result: the propagated error plus u |v|."""
        return EV(v, e + self.u * np.abs(v), self.u)

    def __add__(self, o):
        o = self._lift(o)
        return self._new(self.v + o.v, self.e + o.e)

    __radd__ = __add__

    def __sub__(self, o):
        o = self._lift(o)
        return self._new(self.v - o.v, self.e + o.e)

    def __rsub__(self, o):
        return self._lift(o) - self

    def __neg__(self):
        return EV(-self.v, self.e, self.u)

    def __mul__(self, o):
        o = self._lift(o)
        e = np.abs(self.v) * o.e + np.abs(o.v) * self.e + self.e * o.e
        return self._new(self.v * o.v, e)

    __rmul__ = __mul__

    def __truediv__(self, o):
        o = self._lift(o)
        q = self.v / o.v
        den = np.abs(o.v) - o.e
        e = np.where(den > 0, (self.e + np.abs(q) * o.e) / np.where(den > 0, den, 1.0), np.inf)
        return self._new(q, e)

    def __rtruediv__(self, o):
        return self._lift(o) / self

    def __getitem__(self, idx):
        return EV(self.v[idx], self.e[idx], self.u)


def ev_param(c, u) -> EV:
    """A Python float hyper-parameter rounded to the dtype."""
    return EV(c, u * abs(c), u)


# Absolute error allowed in any exp-based result (exp, softplus, sigmoid): an exp that
# underflows may return anything up to about the smallest normal number instead of a subnormal
# or 0 (the kernel's exp clamps its argument at -87 / -708). Set per dtype by ``model_for``.
EXP_FLOOR = [0.0]


def ev_exp(a: EV) -> EV:
    v = np.exp(a.v)
    return a._new(v, np.exp(a.v + a.e) * a.e + EXP_FLOOR[0])  # slope bound exp(x + e)


def ev_expm1(a: EV) -> EV:
    """``exp(x) - 1`` computed as expm1 (accurate near 0)."""
    v = np.expm1(a.v)
    return a._new(v, np.exp(a.v + a.e) * a.e + EXP_FLOOR[0])


def ev_log(a: EV) -> EV:
    lo = a.v - a.e
    e = np.where(lo > 0, a.e / np.where(lo > 0, lo, 1.0), np.inf)
    return a._new(np.log(a.v), e)


def ev_softplus(a: EV) -> EV:
    # slope sigma(x) <= sigma(x + e)
    slope = np.exp(-np.logaddexp(0.0, -(a.v + a.e)))
    return a._new(np.logaddexp(0.0, a.v), slope * a.e + EXP_FLOOR[0])


def ev_sigmoid(a: EV) -> EV:
    c = np.clip(0.0, a.v - a.e, a.v + a.e)  # the point of the interval closest to 0
    slope = np.exp(-np.logaddexp(0.0, c) - np.logaddexp(0.0, -c))
    v = np.exp(-np.logaddexp(0.0, -a.v))
    # + u absolute: 1 - sigma(-x) forms are allowed
    return a._new(v, slope * a.e + a.u + EXP_FLOOR[0])


def ev_relu(a: EV) -> EV:
    return EV(np.maximum(a.v, 0.0), a.e, a.u)


def near_tie_mask(x: EV) -> np.ndarray:
    """Pairs in a run of values that are within rounding of each other but not all equal.

    Rounding is monotone, so the dtype's sort can only turn such near-ties into exact ties,
    which the stable sort then orders by index: the gradients of those pairs may be attributed
    to a different pair than in the float64 reference.
    """
    n = x.v.shape[0]
    order = np.argsort(x.v, kind="stable")
    xs, es = x.v[order], x.e[order]
    close = np.diff(xs) <= es[1:] + es[:-1]
    label = np.concatenate([[0], np.cumsum(~close)])
    first = np.full(label[-1] + 1, np.inf)
    last = np.full(label[-1] + 1, -np.inf)
    np.minimum.at(first, label, xs)
    np.maximum.at(last, label, xs)
    mask_sorted = last[label] > first[label]
    mask = np.zeros(n, dtype=bool)
    mask[order] = mask_sorted
    return mask


def error_model(pc, pr, rc, rr, *, u, beta, loss_type, **options) -> dict:
    """Values, analytic per-pair derivatives and their error bounds (see the module docstring).

    Returns ``losses`` (EV), ``dpc``/``dpr``/``drc``/``drr`` (EV of d loss_i / d input_j for the
    pair the input belongs to; for aot the k-th sorted loss is attributed to its pairs),
    ``components`` (name -> EV), rewards, ``bco_delta`` (EV or None) and the ``ambiguous``
    masks of each input's gradient (hinge kinks, aot near-ties).
    """
    o = {**OPTION_DEFAULTS, **options}
    types = _types(loss_type)
    weights = [1.0] * len(types) if o["loss_weights"] is None else list(o["loss_weights"])
    pc, pr = (np.asarray(x, np.float64) for x in (pc, pr))
    n = pc.shape[0]
    ref_free = o["reference_free"] or rc is None
    if ref_free:
        rc = rr = np.zeros(n)
    rc, rr = (np.asarray(x, np.float64) for x in (rc, rr))
    lc = None if o.get("chosen_lengths") is None else np.asarray(o["chosen_lengths"], np.float64)
    lr = (
        None if o.get("rejected_lengths") is None else np.asarray(o["rejected_lengths"], np.float64)
    )

    def diff(a, b):
        return EV(a - b, u * (np.abs(a) + np.abs(b)), u)

    def exact(x):
        return EV(x, 0.0, u)

    zero = exact(np.zeros(n))
    B = ev_param(beta, u)
    E = ev_param(o["label_smoothing"], u)
    uc, ur = diff(pc, rc), diff(pr, rr)
    ac = EV(pc / lc, u * np.abs(pc / lc), u) if lc is not None else None
    ar = EV(pr / lr, u * np.abs(pr / lr), u) if lr is not None else None
    xc, xr = B * uc, B * ur

    fdiv = o["f_divergence"]
    amb = {k: np.zeros(n, dtype=bool) for k in ("pc", "pr", "rc", "rr")}

    def score(x: EV) -> tuple[EV, EV]:
        """(s(x), s'(x)) as TRL 1.16 defines them"""
        k = o["f_alpha_divergence_coef"] - 1.0
        if fdiv == "reverse_kl" or (fdiv == "alpha_divergence" and abs(k) < ALPHA_IDENTITY_TOL):
            return x, exact(np.ones_like(x.v))
        if fdiv == "forward_kl":
            return -ev_expm1(-x), ev_exp(-x)
        if fdiv == "js_divergence":
            return ev_param(math.log(2.0), u) - ev_softplus(-x), ev_sigmoid(-x)
        if fdiv == "alpha_divergence":
            K = ev_param(k, u)
            t = K * x
            inside = t.v <= ALPHA_EXP_MAX
            # the clamp: constant beyond 80, so the gradient jumps from e^80 to 0 there
            near = np.abs(t.v - ALPHA_EXP_MAX) <= t.e + u * ALPHA_EXP_MAX
            for key in amb:
                amb[key] |= near
            tc = EV(np.minimum(t.v, ALPHA_EXP_MAX), t.e, u)
            ds = ev_exp(tc)
            return ev_expm1(tc) / K, EV(np.where(inside, ds.v, 0.0), ds.e, u)
        raise AssertionError(fdiv)

    def H(x):
        return (1.0 - E) * ev_softplus(-x) + E * ev_softplus(x)

    def dH(x):
        return E * ev_sigmoid(x) - (1.0 - E) * ev_sigmoid(-x)

    # sigmoid and sigmoid_norm ignore label_smoothing (TRL 1.16): H and dH with eps = 0
    def H0(x):
        return ev_softplus(-x)

    def dH0(x):
        return -ev_sigmoid(-x)

    comps, dcs, drs, drcs, drrs = {}, {}, {}, {}, {}
    d_refs = {}  # only aot's ref derivatives are not the negatives of the policy ones
    delta = None
    W = MW = None  # the pair weights (exact inputs) and their mean (rounded once)
    if o["pair_weights"] is not None:
        w = np.asarray(o["pair_weights"], np.float64)
        W, MW = exact(w), ev_param(float(w.mean()), u)
    for t in types:
        if t in F_DIVERGENCE_USERS and t not in ("ipo", "sigmoid_norm"):
            (sc, dsc), (sr, dsr) = score(uc), score(ur)
            z = B * (sc - sr)
            dzc, dzr = B * dsc, -(B * dsr)
        if t in ("ipo", "sigmoid_norm"):
            # the scores of u divided by the lengths; the chain factors s'(u) / len
            (svc, dsvc), (svr, dsvr) = score(uc), score(ur)
            svc, svr = svc / lc, svr / lr
            dv = svc - svr
        if t == "sigmoid":
            loss, g = H0(z), dH0(z)
            dc, dr = g * dzc, g * dzr
        elif t == "cdpo":
            loss, g = H(z), dH(z)
            dc, dr = g * dzc, g * dzr
        elif t == "robust":
            den = 1.0 - 2.0 * E
            loss = ((1.0 - E) * ev_softplus(-z) - E * ev_softplus(z)) / den
            g = (-((1.0 - E) * ev_sigmoid(-z)) - E * ev_sigmoid(z)) / den
            dc, dr = g * dzc, g * dzr
        elif t == "hinge":
            loss = ev_relu(1.0 - z)
            g = exact(-(z.v < 1.0).astype(np.float64))
            dc, dr = g * dzc, g * dzr
            kink = np.abs(1.0 - z.v) <= z.e + u
            for k in amb:
                amb[k] |= kink
        elif t == "ipo":
            d = dv - 0.5 / B
            loss = d * d
            dc = 2.0 * d * dsvc / lc
            dr = -(2.0 * d * dsvr / lr)
        elif t == "exo_pair":
            log_p, log_q = -ev_softplus(-z), -ev_softplus(z)
            p, q = ev_exp(log_p), ev_exp(log_q)
            c1, c2 = ev_log(1.0 - E), ev_log(E)
            loss = p * (log_p - c1) + q * (log_q - c2)
            g = p * q * ((log_p - log_q) - c1 + c2)
            dc, dr = g * dzc, g * dzr
        elif t == "nca_pair":
            loss = ev_softplus(-xc) + 0.5 * ev_softplus(xc) + 0.5 * ev_softplus(xr)
            dc = B * (0.5 * ev_sigmoid(xc) - ev_sigmoid(-xc))
            dr = B * (0.5 * ev_sigmoid(xr))
        elif t == "bco_pair":
            # no shift by default (TRL 1.16)
            delta = ev_param(0.0 if o["bco_delta"] is None else o["bco_delta"], u)
            loss = ev_softplus(-(xc - delta)) + ev_softplus(xr - delta)
            dc = -(B * ev_sigmoid(-(xc - delta)))
            dr = B * ev_sigmoid(xr - delta)
        elif t == "sppo_hard":
            h = 0.5 / B
            loss = (uc - h) * (uc - h) + (ur + h) * (ur + h)
            dc, dr = 2.0 * (uc - h), 2.0 * (ur + h)
        elif t in SORTING_TYPES:
            if t == "aot":
                first, second = diff(pc, pr), (zero if ref_free else diff(rc, rr))
            else:
                first, second = uc, ur
            pf = np.argsort(first.v, kind="stable")
            ps = np.argsort(second.v, kind="stable")
            d = first[pf] - second[ps]
            loss, g = H(B * d), B * dH(B * d)
            gv, ge = np.empty(n), np.empty(n)
            gv[pf], ge[pf] = g.v, g.e
            gs_v, gs_e = np.empty(n), np.empty(n)
            gs_v[ps], gs_e[ps] = g.v, g.e
            tf, ts = near_tie_mask(first), near_tie_mask(second)
            if t == "aot":
                # d_k = (pc - pr)_sorted - (rc - rr)_sorted
                dc, dr = EV(gv, ge, u), EV(-gv, ge, u)
                d_refs[t] = (EV(-gs_v, gs_e, u), EV(gs_v, gs_e, u))
                amb["pc"] |= tf
                amb["pr"] |= tf
                amb["rc"] |= ts
                amb["rr"] |= ts
            else:
                # d_k = u_c sorted - u_r sorted: pc/rc follow the first sort, pr/rr the second
                dc, dr = EV(gv, ge, u), EV(-gs_v, gs_e, u)
                amb["pc"] |= tf
                amb["rc"] |= tf
                amb["pr"] |= ts
                amb["rr"] |= ts
        elif t == "apo_zero":
            loss = ev_sigmoid(-xc) + ev_sigmoid(xr)
            dc = -(B * ev_sigmoid(xc) * ev_sigmoid(-xc))
            dr = B * ev_sigmoid(xr) * ev_sigmoid(-xr)
        elif t == "apo_down":
            y = B * (uc - ur)
            sy = B * ev_sigmoid(y) * ev_sigmoid(-y)
            loss = ev_sigmoid(xc) + ev_sigmoid(-y)
            dc = B * ev_sigmoid(xc) * ev_sigmoid(-xc) - sy
            dr = sy
        elif t == "discopop":
            T = ev_param(o["discopop_tau"], u)
            one_m = ev_sigmoid(-z / T)  # 1 - m
            m_exp = ev_exp(-z - ev_softplus(-z / T))  # m e^{-z}
            mm_exp = ev_exp(-z - ev_softplus(-z / T) - ev_softplus(z / T))  # m (1 - m) e^{-z}
            sp = ev_softplus(-z)
            loss = one_m * sp + m_exp
            # d/dz: m(1-m)/tau (e^{-z} - softplus(-z)) - (1-m) sigma(-z) - m e^{-z}
            g = (mm_exp - ev_sigmoid(z / T) * one_m * sp) / T - one_m * ev_sigmoid(-z) - m_exp
            dc, dr = g * dzc, g * dzr
        elif t == "sigmoid_norm":
            zn = B * dv
            loss = H0(zn)
            g = B * dH0(zn)
            dc, dr = g * dsvc / lc, -(g * dsvr / lr)
        elif t == "simpo":
            zs = B * (ac - ar) - ev_param(o["simpo_gamma"], u)
            loss = H(zs)
            g = B * dH(zs)
            dc, dr = g / lc, -(g / lr)
        elif t == "cpo":
            CA = ev_param(o["cpo_alpha"], u)
            zc = B * diff(pc, pr)
            loss = H(zc) + CA * (-ac)
            g = B * dH(zc)
            dc, dr = g - CA / lc, -g
        elif t == "orpo":
            OA = ev_param(o["orpo_alpha"], u)
            # the literal l(a) = a - log(1 - exp(a)), l'(a) = 1 / (1 - exp(a))
            om_c, om_r = 1.0 - ev_exp(ac), 1.0 - ev_exp(ar)
            ld = (ac - ev_log(om_c)) - (ar - ev_log(om_r))
            loss = -ac + OA * ev_softplus(-ld)
            s = OA * ev_sigmoid(-ld)
            dc = -(1.0 / exact(lc)) - s / om_c / lc
            dr = s / om_r / lr
        elif t == "sft":
            m = lc.mean() if o["sft_mean_length"] is None else o["sft_mean_length"]
            M = ev_param(m, u)
            loss = -(exact(pc) / M)
            dc, dr = -(1.0 / M), zero
        else:  # pragma: no cover - test bug
            raise AssertionError(t)
        if W is not None:
            f = MW if t == "sft" else W
            loss, dc, dr = loss * f, dc * f, dr * f
        comps[t], dcs[t], drs[t] = loss, dc, dr
        if t in d_refs:
            drcs[t], drrs[t] = d_refs[t]
        elif t in REFERENCE_FREE_TYPES or ref_free:
            drcs[t], drrs[t] = zero, zero
        else:
            drcs[t], drrs[t] = -dc, -dr

    def combine(parts):
        total = None
        for t, w in zip(types, weights, strict=True):
            term = ev_param(w, u) * parts[t]
            total = term if total is None else total + term
        return total

    losses, dpc, dpr = combine(comps), combine(dcs), combine(drs)
    drc, drr = combine(drcs), combine(drrs)  # the rpo term below does not involve the refs
    if o["rpo_alpha"] is not None:
        RA = ev_param(o["rpo_alpha"], u)
        rpo, drpo = -ac, -(1.0 / exact(lc))
        if W is not None:
            rpo, drpo = rpo * W, drpo * W
        comps["rpo"] = rpo
        losses = losses + RA * rpo
        dpc = dpc + RA * drpo
    return dict(
        losses=losses,
        dpc=dpc,
        dpr=dpr,
        drc=drc,
        drr=drr,
        components=comps,
        chosen_rewards=xc,
        rejected_rewards=xr,
        bco_delta=delta,
        ambiguous=amb,
    )


def model_for(case, u=None) -> dict:
    dtype = case["dtype"]
    if u is None:
        u = SLACK * UNIT_ROUNDOFF[dtype]
    EXP_FLOOR[0] = 2.0 * float(np.finfo(dtype).tiny) if u > 0 else 0.0
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return error_model(*case["arrays"], u=u, **case["kw"])


# --------------------------------------------------------------------------------------------
# input generation


def _valid_fdivs(types) -> tuple[str, ...]:
    return F_DIVERGENCES if all(t in F_DIVERGENCE_TYPES for t in types) else ("reverse_kl",)


@st.composite
def family_cases(
    draw, loss_type, f_divergence="reverse_kl", dtypes=(np.float32, np.float64), ref_modes=None
):
    """One call's inputs and options (``case["kw"]`` are the keyword options, lengths included)."""
    types = _types(loss_type)
    dtype = draw(st.sampled_from(dtypes))
    batch = draw(
        st.one_of(
            st.integers(1, 20),
            st.sampled_from([1, 2, 2047, 2048, 2049]),
            st.integers(4900, 5100),
            st.integers(1, 3000),
        )
    )
    beta = 10.0 ** draw(st.floats(-3.0, 1.0))
    if "exo_pair" in types:
        eps = 10.0 ** draw(st.floats(-4.0, math.log10(0.49)))
    elif any(t in LABEL_SMOOTHING_USERS for t in types):
        eps = draw(st.one_of(st.just(0.0), st.floats(0.0, 0.49)))
    else:
        eps = 0.0
    alpha = 0.5
    if f_divergence == "alpha_divergence":
        # log-uniform over [0.05, 10], the default 0.5, values near the reverse-KL limit 1, and
        # alpha <= 0 (0: the forward-KL score)
        near_one = st.sampled_from([1.0, 1.0 + 5e-7, 1.0 - 9e-7, 1.0 + 3e-3, 0.5, 0.0, -0.5])
        alpha = draw(st.one_of(st.floats(-1.3, 1.0).map(lambda x: 10.0**x), near_one))
    sorting = any(t in SORTING_TYPES for t in types)
    rpo_alpha = None if sorting else draw(st.one_of(st.none(), st.floats(0.0, 2.0)))
    needs_lengths = rpo_alpha is not None or any(t in LENGTH_TYPES for t in types)
    give_lengths = needs_lengths or draw(st.booleans())
    modes = ["refs", "reference_free"]
    if all(t in REFERENCE_FREE_TYPES for t in types):
        modes.append("none")
    ref_mode = draw(st.sampled_from([m for m in modes if ref_modes is None or m in ref_modes]))
    kw = dict(
        beta=beta,
        loss_type=loss_type,
        label_smoothing=eps,
        f_divergence=f_divergence,
        f_alpha_divergence_coef=alpha,
        reference_free=ref_mode == "reference_free",
        simpo_gamma=draw(st.floats(-3.0, 3.0)),
        cpo_alpha=draw(st.floats(0.0, 3.0)),
        orpo_alpha=draw(st.floats(0.0, 3.0)),
        rpo_alpha=rpo_alpha,
        discopop_tau=10.0 ** draw(st.floats(-2.0, 0.0)),
        bco_delta=draw(st.one_of(st.none(), st.floats(-5.0, 5.0))),
    )
    if not sorting and draw(st.booleans()):
        kw["pair_weights"] = draw(st.sampled_from(["uniform", "zeros", "ones"]))
    if "sft" in types and draw(st.booleans()):
        kw["sft_mean_length"] = draw(st.floats(0.5, 600.0))
    if not isinstance(loss_type, str):
        kw["loss_weights"] = draw(
            st.one_of(
                st.none(),
                st.lists(st.floats(0.0, 3.0), min_size=len(types), max_size=len(types)),
            )
        )
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    max_len = draw(st.sampled_from([1, 8, 512]))
    lc = rng.integers(1, max_len + 1, batch)
    lr = rng.integers(1, max_len + 1, batch)

    if "pair_weights" in kw:
        # (B,) weights in the dtype: uniform in [0, 3] with some exact zeros and ones, or all 0
        # or all 1
        w = rng.uniform(0.0, 3.0, batch)
        w[rng.random(batch) < 0.1] = 0.0
        w[rng.random(batch) < 0.1] = 1.0
        w = {"uniform": w, "zeros": np.zeros(batch), "ones": np.ones(batch)}[kw["pair_weights"]]
        kw["pair_weights"] = np.asarray(w, dtype)

    # the log-ratios u_c, u_r
    ref_free = ref_mode != "refs"
    k = 1.0 if f_divergence == "forward_kl" else abs(alpha - 1.0)
    if f_divergence in ("forward_kl", "alpha_divergence"):
        lim = EXP_RANGE[dtype] / max(k, 1.0)
        if "discopop" in types and k > 0:
            # keep |z| <= 1e4 (|s(u)| <= expm1(|alpha - 1| |u|) / |alpha - 1|): beyond that the
            # error model's bound on m e^{-z} = exp(-z - softplus(-z / tau)) is no longer useful
            lim = min(lim, math.log1p(1e4 * k / (2.0 * beta)) / k)
        mag = 10.0 ** rng.uniform(-3.0, math.log10(lim), (2, batch))
        uc, ur = np.where(rng.random((2, batch)) < 0.5, -mag, mag)
        close = rng.random(batch) < 0.3
        ur = np.where(close, np.clip(uc + rng.normal(0, 0.1, batch), -lim, lim), ur)
    else:
        # |beta * (u_c - u_r)| log-uniform up to z_max (<= 1e4), random sign, some exact zeros
        z_max = 10.0 ** draw(st.floats(-3.0, 4.0))
        z = np.sign(rng.uniform(-1, 1, batch)) * 10.0 ** rng.uniform(-6, math.log10(z_max), batch)
        z[rng.random(batch) < 0.05] = 0.0
        w = rng.uniform(0.0, 1.0, batch)
        shift = rng.normal(0.0, 1.0, batch)
        uc = w * z / beta + shift
        ur = (w - 1.0) * z / beta + shift
    ref_scale = 10.0 ** draw(st.floats(0.0, 3.0))
    if ref_free:
        rc = rr = np.zeros(batch)
    else:
        rc = -rng.uniform(0.0, ref_scale, batch)
        rr = -rng.uniform(0.0, ref_scale, batch)
    pc, pr = rc + uc, rr + ur
    if "orpo" in types:
        # shift each pair (u unchanged) so that both per-token log-probs are <= -m < 0
        m = 10.0 ** rng.uniform(-3.0, 1.0, batch)
        c = np.maximum(pc + m * lc, pr + m * lr)
        pc, pr = pc - c, pr - c
        if not ref_free:
            rc, rr = rc - c, rr - c
    # duplicate some rows exactly: exact ties for the sorting types
    if batch > 1 and draw(st.booleans()):
        src = rng.integers(0, batch, batch)
        dup = rng.random(batch) < 0.1
        for a in (pc, pr, rc, rr, lc, lr):
            a[dup] = a[src[dup]]
    arrays = [np.ascontiguousarray(x, dtype=dtype) for x in (pc, pr, rc, rr)]
    if ref_mode == "reference_free":
        # refs given but ignored
        arrays[2] = np.asarray(-rng.uniform(0, 100, batch), dtype)
        arrays[3] = np.asarray(-rng.uniform(0, 100, batch), dtype)
    elif ref_mode == "none":
        arrays[2] = arrays[3] = None
    if give_lengths:
        kw["chosen_lengths"] = lc
        kw["rejected_lengths"] = lr
    return dict(dtype=dtype, arrays=arrays, kw=kw, types=types)


def run_reference(case) -> tuple[dict, list]:
    return (
        reference_family(*case["arrays"], **case["kw"]),
        reference_family_grads(*case["arrays"], **case["kw"]),
    )


# --------------------------------------------------------------------------------------------
# the references and the error model checked against each other (no rlox involved)

TYPE_FDIV = [(t, f) for t in FAMILY_TYPES for f in _valid_fdivs([t])]
SELF_SETTINGS = settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))


def _small_case(loss_type, f_divergence, seed, batch=7):
    """A float64 case with moderate values: no ties, kinks or extreme magnitudes."""
    rng = np.random.default_rng(seed)
    pc, pr = -rng.uniform(0.5, 6.0, (2, batch))
    rc, rr = -rng.uniform(0.5, 6.0, (2, batch))
    kw = dict(
        beta=float(rng.uniform(0.1, 2.0)),
        loss_type=loss_type,
        f_divergence=f_divergence,
        f_alpha_divergence_coef=float(rng.uniform(0.2, 3.0)),
        chosen_lengths=rng.integers(1, 6, batch),
        rejected_lengths=rng.integers(1, 6, batch),
        simpo_gamma=float(rng.uniform(-1.0, 1.0)),
        cpo_alpha=float(rng.uniform(0.0, 2.0)),
        orpo_alpha=float(rng.uniform(0.0, 2.0)),
        discopop_tau=float(rng.uniform(0.05, 1.0)),
    )
    types = _types(loss_type)
    if any(t in LABEL_SMOOTHING_USERS for t in types):
        kw["label_smoothing"] = float(rng.uniform(0.01, 0.45))
    if not any(t in SORTING_TYPES for t in types):
        kw["rpo_alpha"] = float(rng.uniform(0.0, 1.0))
        if seed % 2:
            kw["pair_weights"] = rng.uniform(0.0, 2.0, batch)
    if "sft" in types and seed % 3 == 2:
        kw["sft_mean_length"] = float(rng.uniform(1.0, 5.0))
    return dict(dtype=np.float64, arrays=[pc, pr, rc, rr], kw=kw, types=types)


@pytest.mark.parametrize(("loss_type", "f_divergence"), TYPE_FDIV)
def test_reference_numpy_torch_and_model_agree(loss_type, f_divergence):
    for seed in range(3):
        case = _small_case(loss_type, f_divergence, seed)
        ref, grads = run_reference(case)
        leaves = [torch.tensor(a) for a in case["arrays"]]
        kw = _torch_kw(case["kw"])
        t_losses = reference_family_torch(*leaves, **kw).numpy()
        np.testing.assert_allclose(t_losses, ref["losses"], rtol=1e-12, atol=1e-13)
        model = model_for(case, u=0.0)
        np.testing.assert_allclose(model["losses"].v, ref["losses"], rtol=1e-12, atol=1e-13)
        assert model["losses"].e.max() == 0.0
        b = case["arrays"][0].shape[0]
        for key, g in zip(("dpc", "dpr", "drc", "drr"), grads, strict=True):
            np.testing.assert_allclose(model[key].v / b, g, rtol=1e-10, atol=1e-13, err_msg=key)
        assert set(ref["components"]) == set(model["components"])
        for k, v in ref["components"].items():
            np.testing.assert_allclose(model["components"][k].v, v, rtol=1e-12, atol=1e-13)
        recombined = sum(ref["components"][t] for t in case["types"])
        if "rpo_alpha" in case["kw"]:
            recombined = recombined + case["kw"]["rpo_alpha"] * ref["components"]["rpo"]
        np.testing.assert_allclose(recombined, ref["losses"], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize(("loss_type", "f_divergence"), TYPE_FDIV)
def test_reference_grads_match_finite_differences(loss_type, f_divergence):
    case = _small_case(loss_type, f_divergence, seed=11, batch=5)
    kw = dict(case["kw"])
    if loss_type == "bco_pair":
        kw["bco_delta"] = 0.3  # a shift, so that it is exercised (the default is 0)
    grads = reference_family_grads(*case["arrays"], **kw)
    for j in range(4):
        for i in range(5):
            h = 1e-6 * max(1.0, abs(case["arrays"][j][i]))
            plus = [a.copy() for a in case["arrays"]]
            minus = [a.copy() for a in case["arrays"]]
            plus[j][i] += h
            minus[j][i] -= h
            fd = (
                reference_family(*plus, **kw)["loss"] - reference_family(*minus, **kw)["loss"]
            ) / (2 * h)
            assert fd == pytest.approx(grads[j][i], rel=1e-5, abs=1e-8), (j, i)


@SELF_SETTINGS
@given(st.data())
def test_reference_model_values_on_generated_cases(data):
    """The error model's values and derivatives are the reference's on the generated inputs."""
    loss_type, fdiv = data.draw(st.sampled_from(TYPE_FDIV))
    case = data.draw(family_cases(loss_type, fdiv, dtypes=(np.float64,)))
    ref, grads = run_reference(case)
    model = model_for(case)
    n = case["arrays"][0].shape[0]
    assert np.all(np.isfinite(ref["losses"]))
    tol = model["losses"].e
    assert np.all(np.abs(model["losses"].v - ref["losses"]) <= tol)
    for key, g in zip(("dpc", "dpr"), grads[:2], strict=True):
        err = np.abs(model[key].v / n - g)
        assert np.all((err <= model[key].e / n + 1e-300) | model["ambiguous"]["pc"]), key


# --------------------------------------------------------------------------------------------
# checks shared by the kernel and the torch path


def assert_within(name, got, want, tol, mask=None):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    err = np.abs(got - want)
    bad = ~(err <= tol)  # NaN counts as bad
    if mask is not None:
        bad &= ~mask
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise AssertionError(
            f"{name}[{i}]: got {got.reshape(-1)[i]!r}, want {want.reshape(-1)[i]!r}, "
            f"|err|={err.reshape(-1)[i]:.3e} > tol "
            f"{np.broadcast_to(tol, err.shape).reshape(-1)[i]:.3e} "
            f"({int(bad.sum())} bad of {bad.size})"
        )


def _floor(dtype) -> float:
    """Absolute floor: results below the smallest normal number lose relative precision."""
    return 16.0 * float(np.finfo(dtype).tiny)


def mean_tol(ev: EV, u: float, floor: float) -> float:
    """Tolerance of the mean of the per-pair values ``ev`` (error bound + the reduction's)."""
    return float(ev.e.mean() + u * np.abs(ev.v).mean() + floor)


def check_scalars(got: dict, ref: dict, model: dict, case, u: float, floor: float, prefix=""):
    """loss, component losses and bco_delta (``got``: name -> float)."""
    types = case["types"]
    assert abs(got["loss"] - ref["loss"]) <= mean_tol(model["losses"], u, floor), (
        f"{prefix}loss: got {got['loss']!r}, want {ref['loss']!r}"
    )
    want_keys = set(types) | ({"rpo"} if case["kw"].get("rpo_alpha") is not None else set())
    comps = got["component_losses"]
    assert set(comps) == want_keys, f"{prefix}component_losses keys {set(comps)}"
    for name, value in comps.items():
        tol = mean_tol(model["components"][name], u, floor)
        want = ref["component_losses"][name]
        assert abs(float(value) - want) <= tol, (
            f"{prefix}component_losses[{name!r}]: got {float(value)!r}, want {want!r}, tol {tol:.3e}"
        )
    if "bco_pair" in types:
        delta = got["bco_delta"]
        assert delta is not None, f"{prefix}bco_delta is None"
        assert abs(float(delta) - ref["bco_delta"]) <= float(model["bco_delta"].e) + floor, (
            f"{prefix}bco_delta: got {float(delta)!r}, want {ref['bco_delta']!r}"
        )
    else:
        assert got["bco_delta"] is None, f"{prefix}bco_delta should be None"


def check_kernel_output(case, out, ref, grads, model):
    dtype = case["dtype"]
    u = SLACK * UNIT_ROUNDOFF[dtype]
    floor = _floor(dtype)
    n = case["arrays"][0].shape[0]
    kw = case["kw"]
    amb = model["ambiguous"]

    for name in ("losses", "grad_chosen", "grad_rejected", "chosen_rewards", "rejected_rewards"):
        a = getattr(out, name)
        assert isinstance(a, np.ndarray), name
        assert a.dtype == dtype, (name, a.dtype)
        assert a.shape == (n,), (name, a.shape)
        assert np.isfinite(a).all(), f"{name} has NaN/inf where the reference is finite"
    for name in ("loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward"):
        v = getattr(out, name)
        assert isinstance(v, float), name
        assert math.isfinite(v), name

    assert_within("losses", out.losses, ref["losses"], model["losses"].e + floor)
    g_pc, g_pr = grads[0], grads[1]
    tol_gc = model["dpc"].e / n + u * np.abs(g_pc) + floor
    tol_gr = model["dpr"].e / n + u * np.abs(g_pr) + floor
    assert_within("grad_chosen", out.grad_chosen, g_pc, tol_gc, amb["pc"])
    assert_within("grad_rejected", out.grad_rejected, g_pr, tol_gr, amb["pr"])
    if kw.get("chosen_lengths") is not None:
        lc = np.asarray(kw["chosen_lengths"], np.float64)
        lr = np.asarray(kw["rejected_lengths"], np.float64)
        for name, got, g, tol, lens, mask in (
            ("grad_chosen_avg", out.grad_chosen_avg, g_pc, tol_gc, lc, amb["pc"]),
            ("grad_rejected_avg", out.grad_rejected_avg, g_pr, tol_gr, lr, amb["pr"]),
        ):
            assert isinstance(got, np.ndarray) and got.dtype == dtype and got.shape == (n,), name
            assert np.isfinite(got).all(), name
            assert_within(name, got, lens * g, lens * tol + u * np.abs(lens * g), mask)
    else:
        assert out.grad_chosen_avg is None and out.grad_rejected_avg is None

    xc, xr = model["chosen_rewards"], model["rejected_rewards"]
    assert_within("chosen_rewards", out.chosen_rewards, ref["chosen_rewards"], xc.e + floor)
    assert_within("rejected_rewards", out.rejected_rewards, ref["rejected_rewards"], xr.e + floor)
    assert abs(out.chosen_reward - ref["chosen_reward"]) <= mean_tol(xc, u, floor)
    assert abs(out.rejected_reward - ref["rejected_reward"]) <= mean_tol(xr, u, floor)
    margin_tol = mean_tol(xc, u, floor) + mean_tol(xr, u, floor)
    assert abs(out.reward_margin - ref["reward_margin"]) <= margin_tol
    near_tie = np.abs(xc.v - xr.v) <= xc.e + xr.e
    assert abs(out.reward_accuracy - ref["reward_accuracy"]) <= near_tie.sum() / n + 1e-12

    got = dict(loss=out.loss, component_losses=out.component_losses, bco_delta=out.bco_delta)
    check_scalars(got, ref, model, case, u, floor)
    # the kernel's own outputs are consistent: loss = mean(losses) = sum_k w_k component_k
    assert abs(out.loss - float(np.mean(out.losses.astype(np.float64)))) <= mean_tol(
        model["losses"], u, floor
    )


def call_kernel(case):
    return rlox.dpo_loss(*case["arrays"], **case["kw"])


# --------------------------------------------------------------------------------------------
# Rust kernel vs reference: every type, every allowed f-divergence

KERNEL_SETTINGS = settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.mark.parametrize(("loss_type", "f_divergence"), TYPE_FDIV)
@KERNEL_SETTINGS
@given(data=st.data())
def test_kernel_parity(loss_type, f_divergence, data):
    case = data.draw(family_cases(loss_type, f_divergence))
    out = call_kernel(case)
    ref, grads = run_reference(case)
    check_kernel_output(case, out, ref, grads, model_for(case))


MULTI_POOL = [t for t in FAMILY_TYPES if t not in SORTING_TYPES]


@st.composite
def multi_types(draw):
    types = draw(st.lists(st.sampled_from(MULTI_POOL), min_size=2, max_size=4, unique=True))
    return types, draw(st.sampled_from(_valid_fdivs(types)))


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_kernel_parity_multi_type(data):
    types, fdiv = data.draw(multi_types())
    case = data.draw(family_cases(types, fdiv))
    out = call_kernel(case)
    ref, grads = run_reference(case)
    check_kernel_output(case, out, ref, grads, model_for(case))


# --------------------------------------------------------------------------------------------
# rlox.losses.dpo_loss: backend="rust" vs backend="torch" (CPU), autograd gradients


def _torch_kw(kw: dict) -> dict:
    kw = dict(kw)
    for key in ("chosen_lengths", "rejected_lengths"):
        if kw.get(key) is not None:
            kw[key] = torch.as_tensor(np.asarray(kw[key], dtype=np.int64))
    if isinstance(kw.get("pair_weights"), np.ndarray):
        kw["pair_weights"] = torch.from_numpy(kw["pair_weights"].copy())
    return kw


def run_torch_path(case, backend: str, target: str):
    """(result, grads of the four inputs) after ``target.backward()`` (``"loss"`` or ``"sum"``)."""
    leaves = [
        None if a is None else torch.from_numpy(a.copy()).requires_grad_(True)
        for a in case["arrays"]
    ]
    res = torch_dpo_loss(*leaves, backend=backend, **_torch_kw(case["kw"]))
    (res.loss if target == "loss" else res.losses.sum()).backward()
    return res, [None if x is None else x.grad for x in leaves]


INPUT_KEYS = ("pc", "pr", "rc", "rr")


@pytest.mark.parametrize("target", ["loss", "sum"])
@pytest.mark.parametrize("loss_type", FAMILY_TYPES)
@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_torch_path_parity_rust_and_torch_backends(loss_type, target, data):
    fdiv = data.draw(st.sampled_from(_valid_fdivs([loss_type])))
    case = data.draw(family_cases(loss_type, fdiv))
    dtype = case["dtype"]
    u = SLACK * UNIT_ROUNDOFF[dtype]
    floor = _floor(dtype)
    n = case["arrays"][0].shape[0]
    ref, ref_grads = run_reference(case)
    model = model_for(case)
    scale = 1.0 if target == "loss" else float(n)  # d sum / d x = n d mean / d x
    results = {}
    for backend in ("rust", "torch"):
        res, grads = run_torch_path(case, backend, target)
        results[backend] = (res, grads)
        tdt = TORCH_DTYPES[dtype]
        assert res.loss.shape == () and res.losses.shape == (n,), backend
        for name in ("loss", "losses", "chosen_rewards", "rejected_rewards"):
            t = getattr(res, name)
            assert t.dtype == tdt, (backend, name, t.dtype)
            assert torch.isfinite(t).all(), (backend, name)
        assert not res.chosen_rewards.requires_grad and not res.rejected_rewards.requires_grad
        assert_within(
            f"{backend} losses",
            res.losses.detach().numpy(),
            ref["losses"],
            model["losses"].e + floor,
        )
        for name, ev in (
            ("chosen_rewards", "chosen_rewards"),
            ("rejected_rewards", "rejected_rewards"),
        ):
            assert_within(
                f"{backend} {name}", getattr(res, name).numpy(), ref[name], model[ev].e + floor
            )
        got = dict(
            loss=float(res.loss.detach()),
            component_losses={k: float(v) for k, v in res.component_losses.items()},
            bco_delta=res.bco_delta,
        )
        check_scalars(got, ref, model, case, u, floor, prefix=f"{backend} ")
        for key, g, want in zip(INPUT_KEYS, grads, ref_grads, strict=True):
            if want is None:  # refs not passed
                assert g is None
                continue
            want = scale * want
            if g is None:  # input not used at all (e.g. refs of reference-free types)
                assert not want.any(), f"{backend} grad {key} is None"
                continue
            assert g.dtype == TORCH_DTYPES[dtype], (backend, key)
            g = g.numpy()
            assert np.isfinite(g).all(), f"{backend} grad {key} not finite"
            tol = scale * model[f"d{key}"].e / n + u * np.abs(want) + floor
            assert_within(f"{backend} grad {key}", g, want, tol, model["ambiguous"][key])
    # and the two backends to each other
    (res_r, g_r), (res_t, g_t) = results["rust"], results["torch"]
    assert_within(
        "rust vs torch losses",
        res_r.losses.detach().numpy(),
        res_t.losses.detach().numpy(),
        2 * model["losses"].e + 2 * floor,
    )
    for key, a, b in zip(INPUT_KEYS, g_r, g_t, strict=True):
        if a is None or b is None:
            continue
        tol = 2 * (scale * model[f"d{key}"].e / n + u * np.abs(a.numpy()) + floor)
        assert_within(
            f"rust vs torch grad {key}", a.numpy(), b.numpy(), tol, model["ambiguous"][key]
        )


# --------------------------------------------------------------------------------------------
# several types at once; rpo


MULTI = ["sigmoid", "bco_pair", "sft"]
MULTI_WEIGHTS = [0.8, 0.2, 1.0]


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_multi_loss_is_the_weighted_sum_of_single_runs(data):
    case = data.draw(family_cases(MULTI))
    kw = {**case["kw"], "loss_weights": MULTI_WEIGHTS, "rpo_alpha": None}
    case = {**case, "kw": kw}
    dtype = case["dtype"]
    u = SLACK * UNIT_ROUNDOFF[dtype]
    floor = _floor(dtype)
    n = case["arrays"][0].shape[0]
    out = call_kernel(case)
    model = model_for(case)
    want = {k: 0.0 for k in ("losses", "grad_chosen", "grad_rejected")}
    tol = {
        "losses": model["losses"].e + floor,
        "grad_chosen": model["dpc"].e / n + floor,
        "grad_rejected": model["dpr"].e / n + floor,
    }
    for t, w in zip(MULTI, MULTI_WEIGHTS, strict=True):
        single_kw = {**kw, "loss_type": t, "loss_weights": None}
        if t not in LABEL_SMOOTHING_USERS:
            single_kw["label_smoothing"] = 0.0
        single_case = {**case, "kw": single_kw, "types": [t]}
        single = call_kernel(single_case)
        m = model_for(single_case)
        for key, ev in (("losses", "losses"), ("grad_chosen", "dpc"), ("grad_rejected", "dpr")):
            want[key] = want[key] + w * getattr(single, key).astype(np.float64)
            tol[key] = tol[key] + w * (m[ev].e / (1 if key == "losses" else n) + floor)
        assert abs(out.component_losses[t] - single.loss) <= 2 * mean_tol(m["losses"], u, floor)
        if t == "bco_pair":
            assert abs(out.bco_delta - single.bco_delta) <= 2 * float(m["bco_delta"].e) + floor
    for key in want:
        assert_within(key, getattr(out, key), want[key], tol[key])
    assert set(out.component_losses) == set(MULTI)
    total = sum(w * out.component_losses[t] for t, w in zip(MULTI, MULTI_WEIGHTS, strict=True))
    assert abs(out.loss - total) <= 2 * mean_tol(model["losses"], u, floor)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data(), rpo_alpha=st.floats(0.0, 3.0))
def test_rpo_adds_rpo_alpha_times_the_chosen_nll(data, rpo_alpha):
    loss_type = data.draw(st.sampled_from([t for t in FAMILY_TYPES if t not in SORTING_TYPES]))
    case = data.draw(family_cases(loss_type))
    with_kw = {**case["kw"], "rpo_alpha": rpo_alpha}
    without_kw = {**case["kw"], "rpo_alpha": None}
    lens = np.random.default_rng(0).integers(1, 9, case["arrays"][0].shape[0])
    for kw in (with_kw, without_kw):
        kw.setdefault("chosen_lengths", lens)
        kw.setdefault("rejected_lengths", lens)
        if kw["chosen_lengths"] is None:
            kw["chosen_lengths"] = kw["rejected_lengths"] = lens
    case_with = {**case, "kw": with_kw}
    case_without = {**case, "kw": without_kw}
    dtype = case["dtype"]
    u = SLACK * UNIT_ROUNDOFF[dtype]
    floor = _floor(dtype)
    n = case["arrays"][0].shape[0]
    a, b = call_kernel(case_with), call_kernel(case_without)
    ma, mb = model_for(case_with), model_for(case_without)
    pc = case["arrays"][0].astype(np.float64)
    lc = np.asarray(with_kw["chosen_lengths"], np.float64)
    w = with_kw.get("pair_weights")
    w = np.ones(n) if w is None else np.asarray(w, np.float64)
    nll = -pc / lc * w  # the rpo term is weighted per pair like every other term
    assert_within(
        "losses",
        a.losses.astype(np.float64) - b.losses,
        rpo_alpha * nll,
        ma["losses"].e + mb["losses"].e + floor,
    )
    assert_within(
        "grad_chosen",
        a.grad_chosen.astype(np.float64) - b.grad_chosen,
        -rpo_alpha * w / lc / n,
        (ma["dpc"].e + mb["dpc"].e) / n + floor,
        ma["ambiguous"]["pc"],
    )
    assert_within(
        "grad_rejected",
        a.grad_rejected,
        b.grad_rejected,
        (ma["dpr"].e + mb["dpr"].e) / n + floor,
        ma["ambiguous"]["pr"],
    )
    assert set(a.component_losses) == {loss_type, "rpo"}
    assert "rpo" not in b.component_losses
    assert abs(a.component_losses["rpo"] - nll.mean()) <= mean_tol(
        ma["components"]["rpo"], u, floor
    )
    assert abs(a.component_losses[loss_type] - b.component_losses[loss_type]) <= 2 * mean_tol(
        ma["components"][loss_type], u, floor
    )


# --------------------------------------------------------------------------------------------
# reference-free use


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_ref_free_flag_equals_zero_refs(data):
    loss_type = data.draw(st.sampled_from(FAMILY_TYPES))
    fdiv = data.draw(st.sampled_from(_valid_fdivs([loss_type])))
    # generated reference-free, so that the policy log-probs themselves are the log-ratios
    case = data.draw(family_cases(loss_type, fdiv, ref_modes=("reference_free",)))
    dtype = case["dtype"]
    n = case["arrays"][0].shape[0]
    pc, pr = case["arrays"][:2]
    rng = np.random.default_rng(n)
    junk = [np.asarray(-rng.uniform(0, 50, n), dtype) for _ in range(2)]
    zeros = np.zeros(n, dtype)
    kw = {**case["kw"], "reference_free": False}
    free = rlox.dpo_loss(pc, pr, *junk, **{**kw, "reference_free": True})
    zero = rlox.dpo_loss(pc, pr, zeros, zeros.copy(), **kw)
    zcase = {**case, "arrays": [pc, pr, zeros, zeros], "kw": kw}
    model = model_for(zcase)
    floor = _floor(dtype)
    for name, ev in (
        ("losses", model["losses"]),
        ("grad_chosen", model["dpc"] / n),
        ("grad_rejected", model["dpr"] / n),
        ("chosen_rewards", model["chosen_rewards"]),
        ("rejected_rewards", model["rejected_rewards"]),
    ):
        assert_within(name, getattr(free, name), getattr(zero, name), 2 * ev.e + floor)
    assert set(free.component_losses) == set(zero.component_losses)
    if loss_type in REFERENCE_FREE_TYPES:
        # refs None: the same as any refs; the rewards are beta * policy
        none = rlox.dpo_loss(pc, pr, None, None, **kw)
        given_refs = rlox.dpo_loss(pc, pr, *junk, **kw)
        np.testing.assert_array_equal(none.losses, given_refs.losses)
        np.testing.assert_array_equal(none.grad_chosen, given_refs.grad_chosen)
        np.testing.assert_array_equal(none.grad_rejected, given_refs.grad_rejected)
        assert_within(
            "chosen_rewards",
            none.chosen_rewards,
            free.chosen_rewards,
            2 * model["chosen_rewards"].e,
        )
        tkw = _torch_kw(kw)
        for backend in ("rust", "torch"):
            leaves = [torch.from_numpy(x.copy()).requires_grad_(True) for x in (pc, pr)]
            res = torch_dpo_loss(*leaves, None, None, backend=backend, **tkw)
            res.loss.backward()
            assert_within(
                f"{backend} losses", res.losses.detach().numpy(), none.losses, 2 * model["losses"].e
            )
            assert_within(
                f"{backend} grad_chosen",
                leaves[0].grad.numpy(),
                none.grad_chosen,
                2 * model["dpc"].e / n + floor,
            )


# --------------------------------------------------------------------------------------------
# golden values, computed by hand
#
# The standard pair: pi_c = -1, pi_r = -4, ref_c = -3, ref_r = -3, beta = 0.5, so u_c = 2,
# u_r = -1, Delta = 3, z = 1.5, x_c = beta u_c = 1, x_r = -0.5; lengths |y_c| = 2, |y_r| = 4, so
# a_c = -0.5, a_r = -1, v_c = 1, v_r = -0.25. With B = 1 the gradient of the mean is per pair.
# Shorthands: sp = softplus, s = sigma;  sp(-1.5) = log(1 + e^-1.5) = 0.2014132779827524,
# s(-1.5) = 0.18242552380635635.

STD = ([-1.0], [-4.0], [-3.0], [-3.0])
STD_LENGTHS = dict(chosen_lengths=[2], rejected_lengths=[4])
# two pairs for the batch-dependent types: u = (2, -1) and (0, -2)
BCO2 = ([-1.0, -2.0], [-4.0, -3.0], [-3.0, -2.0], [-3.0, -1.0])
# two pairs for aot: p = pi_c - pi_r = (3, 1), q = ref_c - ref_r = (0, 0.5),
# u_c = (2, -0.5), u_r = (-1, -1) (a tie: the stable sort keeps pair 0 first)
AOT2 = ([-1.0, -2.0], [-4.0, -3.0], [-3.0, -1.5], [-3.0, -2.0])
# two pairs for sft: pi_c = (-2, -9) over (1, 3) chosen tokens (the references are ignored)
SFT2 = ([-2.0, -9.0], [-1.0, -1.0], [-3.0, -3.0], [-3.0, -3.0])
SFT2_LENGTHS = dict(chosen_lengths=[1, 3], rejected_lengths=[5, 5])

GOLDEN = {
    # sp(-z) = sp(-1.5); d/dpi_c = -beta s(-z) = -0.5 * 0.18242552380635635
    "sigmoid": (STD, {}, [0.2014132779827524], [-0.09121276190317817], [0.09121276190317817]),
    # s(u) = 1 - e^-u: Delta = -e^-2 + e^1 = 2.5829465452224323, z = 1.2914732726112161;
    # loss sp(-z); d/dpi_c = -beta s(-z) e^-2, d/dpi_r = +beta s(-z) e^1
    "sigmoid-forward_kl": (
        STD,
        dict(loss_type="sigmoid", f_divergence="forward_kl"),
        [0.24284070856214898],
        [-0.014589383654298134],
        [0.29303560407495577],
    ),
    # s(u) = log 2 + log s(u): Delta = -sp(-2) + sp(1) = 1.1863336764752503 (log 2 cancels),
    # z = 0.5931668382376252; d/dpi_c = -beta s(-z) s(-2), d/dpi_r = +beta s(-z) s(1)
    "sigmoid-js_divergence": (
        STD,
        dict(loss_type="sigmoid", f_divergence="js_divergence"),
        [0.4399145830094864],
        [-0.02121267045525087],
        [0.13009500479430378],
    ),
    # alpha = 0.5: s(u) = (e^{(alpha-1) u} - 1) / (alpha - 1) = 2 (1 - e^{-u/2}):
    # s(2) = 1.2642411176571153, s(-1) = -1.2974425414002564, z = 0.5 * 2.5616836590573717
    # = 1.2808418295286859; d/dpi_c = -beta s(-z) e^-1, d/dpi_r = +beta s(-z) e^0.5
    "sigmoid-alpha_divergence": (
        STD,
        dict(loss_type="sigmoid", f_divergence="alpha_divergence", f_alpha_divergence_coef=0.5),
        [0.24514246221702482],
        [-0.039989775409502666],
        [0.179221739378042],
    ),
    # the same with the coefficient left at its default, 0.5
    "sigmoid-alpha_divergence-default": (
        STD,
        dict(loss_type="sigmoid", f_divergence="alpha_divergence"),
        [0.24514246221702482],
        [-0.039989775409502666],
        [0.179221739378042],
    ),
    # alpha = 0.3: s(u) = (e^{-0.7 u} - 1) / -0.7: s(2) = 1.0762900515119907,
    # s(-1) = -1.4482181535292522, z = 0.5 * 2.524508205041243 = 1.2622541025206215;
    # loss sp(-z); d/dpi_c = -beta s(-z) e^{-1.4}, d/dpi_r = +beta s(-z) e^{0.7}
    "sigmoid-alpha_divergence-0.3": (
        STD,
        dict(loss_type="sigmoid", f_divergence="alpha_divergence", f_alpha_divergence_coef=0.3),
        [0.24921305853334856],
        [-0.027197931901228453],
        [0.22210293317587566],
    ),
    # |alpha - 1| < 1e-6: the reverse-KL score, so exactly the sigmoid values
    "sigmoid-alpha_divergence-near-1": (
        STD,
        dict(
            loss_type="sigmoid",
            f_divergence="alpha_divergence",
            f_alpha_divergence_coef=1.0 + 5e-8,
        ),
        [0.2014132779827524],
        [-0.09121276190317817],
        [0.09121276190317817],
    ),
    # alpha = 2 (s(u) = e^u - 1), u_c = 0.5, u_r = 85 beyond the clamp at 80: s(u_r) = e^80 - 1,
    # z = 0.5 (e^0.5 - e^80) = -2.770311192196755e34, loss sp(-z) = -z (finite);
    # d/dpi_c = -beta s(-z) e^0.5 = -0.5 e^0.5, d/dpi_r = 0 (no gradient beyond the clamp)
    "sigmoid-alpha_divergence-clamp": (
        ([-1.0], [-15.0], [-1.5], [-100.0]),
        dict(loss_type="sigmoid", f_divergence="alpha_divergence", f_alpha_divergence_coef=2.0),
        [2.770311192196755e34],
        [-0.8243606353500641],
        [0.0],
    ),
    # forward KL divides the SCORE by the length: Dn = (1 - e^-2) / 2 - (1 - e) / 4
    # = 0.861902815496455, target 1/(2 beta) = 1: (Dn - 1)^2;
    # d/dpi_c = 2 (Dn - 1) e^-2 / 2, d/dpi_r = -2 (Dn - 1) e^1 / 4
    "ipo-forward_kl": (
        STD,
        dict(loss_type="ipo", f_divergence="forward_kl", **STD_LENGTHS),
        [0.01907083236780616],
        [-0.018689421578966029],
        [0.18769353359867127],
    ),
    # Jensen-Shannon, divided by the lengths: Dn = (log 2 - sp(-2)) / 2 - (log 2 - sp(1)) / 4
    # = 0.43813821149805579 (log 2 does NOT cancel), zn = beta Dn: sp(-zn);
    # d/dpi_c = -beta s(-zn) s(-2) / 2, d/dpi_r = beta s(-zn) s(1) / 4
    "sigmoid_norm-js_divergence": (
        STD,
        dict(loss_type="sigmoid_norm", f_divergence="js_divergence", **STD_LENGTHS),
        [0.5895995794250144],
        [-0.01327475646595009],
        [0.04070632006762509],
    ),
    # eps = 0.1: (0.9 sp(-1.5) - 0.1 sp(1.5)) / 0.8, sp(1.5) = 1.5 + sp(-1.5)
    #   = (0.18127195018447716 - 0.17014132779827524) / 0.8 = 0.013913277982752388;
    # d/dz = -(0.9 s(-z) + 0.1 s(z)) / 0.8 = -(0.125 + s(-z)); d/dpi_c = 0.5 * that
    "robust": (
        STD,
        dict(label_smoothing=0.1),
        [0.013913277982752388],
        [-0.15371276190317817],
        [0.15371276190317817],
    ),
    # beta = 0.25: z = 0.75 < 1: loss 1 - 0.75; d/dpi_c = -beta
    "hinge": (STD, dict(beta=0.25), [0.25], [-0.25], [0.25]),
    # Dv = 1 - (-0.25) = 1.25, 1/(2 beta) = 1: (0.25)^2; d/dpi_c = 2 * 0.25 / 2, d/dpi_r = -2 * 0.25 / 4
    "ipo": (STD, STD_LENGTHS, [0.0625], [0.25], [-0.125]),
    # eps = 0.1, p = s(1.5) = 0.8175744761936437, q = 0.18242552380635635:
    # p (log p - log 0.9) + q (log q - log 0.1) = 0.031138796406299074;
    # d/dz = p q (z - log(0.9 / 0.1)) = -0.10398857200593456; d/dpi_c = 0.5 * that
    "exo_pair": (
        STD,
        dict(label_smoothing=0.1),
        [0.031138796406299074],
        [-0.05199428600296728],
        [0.05199428600296728],
    ),
    # sp(-1) + sp(1) / 2 + sp(-0.5) / 2 = 1.2069310233673876;
    # d/dpi_c = beta (-s(-1) + s(1) / 2), d/dpi_r = beta s(-0.5) / 2
    "nca_pair": (STD, {}, [1.2069310233673876], [0.04829393397250367], [0.09438516719953635]),
    # rewards (1, 0) chosen, (-0.5, -1) rejected, no shift (TRL 1.16): pair 0: sp(-1) + sp(-0.5)
    # = 0.7873386716983295, pair 1: sp(0) + sp(-1) = 1.0064088680781681;
    # d mean/dpi_c = -beta s(-x_c) / 2, d mean/dpi_r = beta s(x_r) / 2
    "bco_pair": (
        BCO2,
        {},
        [0.7873386716983295, 1.0064088680781681],
        [-0.06723535534249878, -0.125],
        [0.09438516719953636, 0.06723535534249878],
    ),
    # bco_delta = -0.125 (here the batch mean of the rewards, as the BCO paper's running mean
    # would be): pair 0: sp(-1.125) + sp(-0.375) = 0.8042734003881548, pair 1: sp(-0.125)
    # + sp(-0.875) = 0.9810436163222248; d mean/dpi_c = -beta s(-(x_c - delta)) / 2,
    # d mean/dpi_r = beta s(x_r - delta) / 2
    "bco_pair-delta": (
        BCO2,
        dict(loss_type="bco_pair", bco_delta=-0.125),
        [0.8042734003881548, 0.9810436163222248],
        [-0.06127125328309293, -0.11719765665656094],
        [0.10183335001148257, 0.07355374304074719],
    ),
    # (u_c - 1)^2 + (u_r + 1)^2 = 1 + 0; d/dpi_c = 2 (u_c - 1) = 2, d/dpi_r = 2 (u_r + 1) = 0
    "sppo_hard": (STD, {}, [1.0], [2.0], [0.0]),
    # sorted p = (1, 3) (pairs 1, 0), sorted q = (0, 0.5) (pairs 0, 1): d = (1, 2.5);
    # losses sp(-0.5) = 0.4740769841801067, sp(-1.25) = 0.2519290813453729 (sorted order);
    # d mean/dpi_c[1] = -beta s(-0.5) / 2, d mean/dpi_c[0] = -beta s(-1.25) / 2;
    # d mean/dref_c[0] = +beta s(-0.5) / 2, d mean/dref_c[1] = +beta s(-1.25) / 2
    "aot": (
        AOT2,
        {},
        [0.4740769841801067, 0.2519290813453729],
        [-0.05567503470632721, -0.09438516719953635],
        [0.05567503470632721, 0.09438516719953635],
        [0.09438516719953635, 0.05567503470632721],
        [-0.09438516719953635, -0.05567503470632721],
    ),
    # sorted u_c = (-0.5, 2) (pairs 1, 0), sorted u_r = (-1, -1) (pairs 0, 1): d = (0.5, 3);
    # losses sp(-0.25) = 0.5759394198788436, sp(-1.5); d mean/dpi_c[1] = -beta s(-0.25) / 2,
    # d mean/dpi_c[0] = -beta s(-1.5) / 2, d mean/dpi_r[0] = +beta s(-0.25) / 2, [1] = +beta s(-1.5) / 2
    "aot_unpaired": (
        AOT2,
        {},
        [0.5759394198788436, 0.2014132779827524],
        [-0.04560638095158909, -0.10945587477855048],
        [0.10945587477855048, 0.04560638095158909],
        [0.04560638095158909, 0.10945587477855048],
        [-0.10945587477855048, -0.04560638095158909],
    ),
    # s(-1) + s(-0.5); d/dpi_c = -beta s(1) s(-1), d/dpi_r = beta s(-0.5) s(0.5)
    "apo_zero": (STD, {}, [0.6464820901681405], [-0.09830596662074093], [0.11750185610079725]),
    # s(1) + s(-1.5); d/dpi_c = beta s(1) s(-1) - beta s(1.5) s(-1.5), d/dpi_r = beta s(1.5) s(-1.5)
    "apo_down": (STD, {}, [0.9134841024363612], [0.023732740585574494], [0.07457322603516643]),
    # tau = 0.5: m = s(z / tau) = s(3) = 0.9525741268224334; (1 - m) sp(-1.5) + m e^-1.5
    # = 0.22210021804902824; d/dz = m (1 - m) / tau (e^-z - sp(-z)) - (1 - m) s(-z) - m e^-z
    # = -0.2192375148355014; d/dpi_c = beta * that
    "discopop": (
        STD,
        dict(discopop_tau=0.5),
        [0.22210021804902824],
        [-0.1096187574177507],
        [0.1096187574177507],
    ),
    # default tau = 0.05, pi_c = -4, pi_r = -1 (u_c = -1, u_r = 2, z = -1.5): m = s(-30)
    # = 9.357622968839299e-14; (1 - m) sp(1.5) + m e^1.5 = 1.7014132779830127; d/dz as above
    # = -0.8175744761887831; d/dpi_c = beta * that
    "discopop-negative": (
        ([-4.0], [-1.0], [-3.0], [-3.0]),
        dict(loss_type="discopop"),
        [1.7014132779830127],
        [-0.40878723809439155],
        [0.40878723809439155],
    ),
    # eps = 0.1: 0.9 sp(-1.5) + 0.1 sp(1.5), sp(1.5) = 1.5 + sp(-1.5): sp(-1.5) + 0.15
    # = 0.3514132779827524; d/dz = 0.1 s(z) - 0.9 s(-z) = 0.1 - s(-z); d/dpi_c = beta * that
    "cdpo": (
        STD,
        dict(label_smoothing=0.1),
        [0.3514132779827524],
        [-0.04121276190317817],
        [0.04121276190317817],
    ),
    # eps = 0 is plain DPO
    "cdpo-eps0": (
        STD,
        dict(loss_type="cdpo"),
        [0.2014132779827524],
        [-0.09121276190317817],
        [0.09121276190317817],
    ),
    # zn = beta Dv = 0.625: sp(-0.625); d/dpi_c = -beta s(-0.625) / 2, d/dpi_r = beta s(-0.625) / 4
    "sigmoid_norm": (
        STD,
        STD_LENGTHS,
        [0.42870067827651864],
        [-0.08716128383348644],
        [0.04358064191674322],
    ),
    # gamma = 0.5: zs = 0.5 (-0.5 - (-1)) - 0.5 = -0.25: sp(0.25);
    # d/dpi_c = -beta s(0.25) / 2, d/dpi_r = beta s(0.25) / 4
    "simpo": (
        STD,
        STD_LENGTHS,
        [0.8259394198788436],
        [-0.14054412522144952],
        [0.07027206261072476],
    ),
    # zc = 0.5 * 3 = 1.5: sp(-1.5) + 1.0 * 0.5; d/dpi_c = -beta s(-1.5) - 1/2, d/dpi_r = beta s(-1.5)
    "cpo": (STD, STD_LENGTHS, [0.7014132779827524], [-0.5912127619031782], [0.09121276190317817]),
    # l(-0.5) = -0.5 - log(1 - e^-0.5) = 0.43275212956718856, l(-1) = -1 - log(1 - e^-1)
    # = -0.5413248546129181, difference 0.9740769841801067; 0.5 + 0.1 sp(-0.9740769841801067);
    # d/dpi_c = -1/2 - 0.1 s(-diff) / (1 - e^-0.5) / 2, d/dpi_r = 0.1 s(-diff) / (1 - e^-1) / 4
    "orpo": (STD, STD_LENGTHS, [0.5320299785237537], [-0.5348271886776532], [0.010839254285966408]),
    # -a_c = 0.5; d/dpi_c = -1/2
    "sft": (STD, STD_LENGTHS, [0.5], [-0.5], [0.0]),
    # the batch token mean: pi_c = (-2, -9) over 1 and 3 tokens: (2 + 9) / 4 = 2.75; per pair
    # -pi_c / m with m = (1 + 3) / 2: (1, 4.5); d mean/dpi_c = -1 / m / B = -0.25
    "sft-batch-mean": (
        SFT2,
        dict(loss_type="sft", **SFT2_LENGTHS),
        [1.0, 4.5],
        [-0.25, -0.25],
        [0.0, 0.0],
    ),
    # sft_mean_length = 4 (a gradient-accumulation step's mean chosen length): -pi_c / 4
    "sft-mean-length": (
        SFT2,
        dict(loss_type="sft", sft_mean_length=4.0, **SFT2_LENGTHS),
        [0.5, 2.25],
        [-0.125, -0.125],
        [0.0, 0.0],
    ),
    # pair weights (2, 0.5): sft is one batch value, so it is multiplied by mean(w) = 1.25:
    # (1.25, 5.625); d mean/dpi_c = -1.25 / 2 / 2
    "sft-pair_weights": (
        SFT2,
        dict(loss_type="sft", pair_weights=[2.0, 0.5], **SFT2_LENGTHS),
        [1.25, 5.625],
        [-0.3125, -0.3125],
        [0.0, 0.0],
    ),
    # pair weights (2, 0.5) on sigmoid, z = (1.5, 1): (2 sp(-1.5), 0.5 sp(-1));
    # d mean/dpi_c = -w beta s(-z) / 2
    "sigmoid-pair_weights": (
        BCO2,
        dict(loss_type="sigmoid", pair_weights=[2.0, 0.5]),
        [0.4028265559655048, 0.15663084375911142],
        [-0.09121276190317817, -0.03361767767124939],
        [0.09121276190317817, 0.03361767767124939],
    ),
    # sigmoid + rpo_alpha 0.5: sp(-1.5) + 0.5 * 0.5; d/dpi_c = -beta s(-1.5) - 0.5 / 2
    "sigmoid-rpo": (
        STD,
        dict(loss_type="sigmoid", rpo_alpha=0.5, **STD_LENGTHS),
        [0.45141327798275244],
        [-0.3412127619031782],
        [0.09121276190317817],
    ),
    # 0.8 sp(-1.5) + 0.2 bco + 1.0 * 0.5 with B = 1, no bco shift: bco = sp(-1) + sp(-0.5);
    # d/dpi_c = 0.8 (-beta s(-1.5)) + 0.2 (-beta s(-1)) - 0.5,
    # d/dpi_r = 0.8 beta s(-1.5) + 0.2 beta s(-0.5)
    "multi": (
        STD,
        dict(loss_type=MULTI, loss_weights=MULTI_WEIGHTS, **STD_LENGTHS),
        [0.8185983567258678],
        [-0.5998643516595421],
        [0.11072427640235708],
    ),
    # MPO with pair weights w = (2, 0.5) on BCO2, chosen lengths (2, 3): no bco shift, m = 2.5,
    # mean(w) = 1.25; per pair 0.8 w sp(-z) + 0.2 w bco + 1.25 (-pi_c / 2.5), z = (1.5, 1)
    "multi-pair_weights": (
        BCO2,
        dict(
            loss_type=MULTI,
            loss_weights=MULTI_WEIGHTS,
            pair_weights=[2.0, 0.5],
            chosen_lengths=[2, 3],
            rejected_lengths=[4, 4],
        ),
        [1.1371967134517357, 1.2259455618151059],
        [-0.34986435165954205, -0.2893941421369995],
        [0.11072427640235708, 0.03361767767124939],
    ),
}


def _golden_call(name):
    arrays, kw, losses, gc, gr, *ref_grads = GOLDEN[name]
    kw = {"beta": 0.5, "loss_type": name, **kw}
    kw = {k: (np.asarray(v) if k.endswith("_lengths") else v) for k, v in kw.items()}
    if "pair_weights" in kw:
        kw["pair_weights"] = np.asarray(kw["pair_weights"], np.float64)
    return [np.asarray(a, np.float64) for a in arrays], kw, losses, gc, gr, ref_grads


@pytest.mark.parametrize("name", list(GOLDEN))
def test_golden_kernel(name):
    arrays, kw, losses, gc, gr, _ = _golden_call(name)
    out = rlox.dpo_loss(*arrays, **kw)
    np.testing.assert_allclose(out.losses, losses, rtol=1e-13, atol=1e-15)
    assert out.loss == pytest.approx(np.mean(losses), rel=1e-13, abs=1e-15)
    np.testing.assert_allclose(out.grad_chosen, gc, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(out.grad_rejected, gr, rtol=1e-13, atol=1e-15)
    if "chosen_lengths" in kw:
        np.testing.assert_allclose(
            out.grad_chosen_avg, kw["chosen_lengths"] * np.asarray(gc), rtol=1e-13
        )
    pc, pr, rc, rr = arrays
    np.testing.assert_array_equal(out.chosen_rewards, kw["beta"] * (pc - rc))
    np.testing.assert_array_equal(out.rejected_rewards, kw["beta"] * (pr - rr))
    if isinstance(kw["loss_type"], str) and kw.get("rpo_alpha") is None:
        assert out.component_losses == {kw["loss_type"]: pytest.approx(out.loss, rel=1e-13)}
    if name == "bco_pair-delta":
        assert out.bco_delta == -0.125
    elif "bco_pair" in _types(kw["loss_type"]):
        assert out.bco_delta == 0.0  # no shift unless one is given (TRL 1.16)
    else:
        assert out.bco_delta is None


@pytest.mark.parametrize("backend", ["rust", "torch"])
@pytest.mark.parametrize("name", list(GOLDEN))
def test_golden_torch_path(name, backend):
    arrays, kw, losses, gc, gr, ref_grads = _golden_call(name)
    leaves = [torch.tensor(a, requires_grad=True) for a in arrays]
    res = torch_dpo_loss(*leaves, backend=backend, **_torch_kw(kw))
    res.loss.backward()
    np.testing.assert_allclose(res.losses.detach().numpy(), losses, rtol=1e-13, atol=1e-15)
    for leaf, want in ((leaves[0], gc), (leaves[1], gr)):
        got = np.zeros(len(want)) if leaf.grad is None else leaf.grad.numpy()
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    types = _types(kw["loss_type"])
    if ref_grads:  # aot: the refs follow their own sort
        want_rc, want_rr = ref_grads
    elif all(t in REFERENCE_FREE_TYPES for t in types):
        want_rc = want_rr = [0.0] * len(gc)
    elif kw.get("rpo_alpha") is not None or "sft" in types:
        return  # mixed: covered by the hypothesis test
    else:
        want_rc, want_rr = -np.asarray(gc), -np.asarray(gr)
    for leaf, want in ((leaves[2], want_rc), (leaves[3], want_rr)):
        got = np.zeros(len(want)) if leaf.grad is None else leaf.grad.numpy()
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------------------------
# TRL 1.16 semantics: sft's batch token mean, pair weights, the alpha-divergence score


def _ragged_batch(seed, b=5):
    """(B, T) per-token chosen log-probs with a mask of unequal lengths, and their sums."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, 12, b)
    tok = -rng.uniform(0.01, 4.0, (b, int(lens.max())))
    mask = np.arange(tok.shape[1])[None, :] < lens[:, None]
    return tok, mask, (tok * mask).sum(axis=1), lens


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_sft_is_trls_batch_token_mean_and_accumulates(backend):
    tok, mask, pc, lc = _ragged_batch(3, b=6)
    trl_value = -tok[mask].mean()  # TRL: -mean of the chosen per-token log-probs of the batch
    pr = -np.ones(6)
    full = torch.tensor(pc, requires_grad=True)
    lens = dict(chosen_lengths=torch.tensor(lc), rejected_lengths=torch.tensor(lc))
    res = torch_dpo_loss(full, torch.tensor(pr), loss_type="sft", backend=backend, **lens)
    res.loss.backward()
    assert float(res.loss.detach()) == pytest.approx(trl_value, rel=1e-14)
    np.testing.assert_allclose(full.grad.numpy(), -1.0 / lc.sum(), rtol=1e-14)
    # micro-batches of unequal token counts, each with the step's mean chosen length: their
    # losses weighted by their share of pairs add up to the step's token mean
    step_m = float(lc.mean())
    total = 0.0
    for part in (slice(0, 2), slice(2, 6)):
        sub = torch_dpo_loss(
            torch.tensor(pc[part]),
            torch.tensor(pr[part]),
            loss_type="sft",
            sft_mean_length=step_m,
            chosen_lengths=torch.tensor(lc[part]),
            rejected_lengths=torch.tensor(lc[part]),
            backend=backend,
        )
        total += float(sub.loss) * len(pc[part]) / len(pc)
    assert total == pytest.approx(trl_value, rel=1e-14)


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_sft_in_a_weighted_mix_with_pair_weights(backend):
    """MPO with WPO weights: TRL's loss is sum_k w_k mean(weights * per_sequence_loss_k), where
    sft's per-sequence loss is its batch value expanded; the rpo term is weighted per pair."""
    tok, mask, pc, lc = _ragged_batch(5)
    rng = np.random.default_rng(5)
    pr, rc, rr = -rng.uniform(5.0, 30.0, (3, 5))
    lr = rng.integers(1, 12, 5)
    w = rng.uniform(0.0, 2.0, 5)
    beta = 0.3
    uc, ur = pc - rc, pr - rr
    sig = np.logaddexp(0.0, -beta * (uc - ur))
    xc, xr = beta * uc, beta * ur
    bco = np.logaddexp(0.0, -xc) + np.logaddexp(0.0, xr)  # TRL 1.16: no reward shift
    sft_batch = -tok[mask].mean()
    rpo = -pc / lc
    want = (
        0.8 * np.mean(w * sig) + 0.2 * np.mean(w * bco) + 1.0 * np.mean(w * sft_batch)
    ) + 0.5 * np.mean(w * rpo)
    res = torch_dpo_loss(
        *[torch.tensor(x) for x in (pc, pr, rc, rr)],
        beta=beta,
        loss_type=MULTI,
        loss_weights=MULTI_WEIGHTS,
        rpo_alpha=0.5,
        pair_weights=torch.tensor(w),
        chosen_lengths=torch.tensor(lc),
        rejected_lengths=torch.tensor(lr),
        backend=backend,
    )
    assert float(res.loss) == pytest.approx(want, rel=1e-13)
    comps = {k: float(v) for k, v in res.component_losses.items()}
    assert comps["sft"] == pytest.approx(w.mean() * sft_batch, rel=1e-13)
    assert comps["sigmoid"] == pytest.approx(np.mean(w * sig), rel=1e-13)
    assert comps["rpo"] == pytest.approx(np.mean(w * rpo), rel=1e-13)


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_pair_weights_are_constants(backend):
    rng = np.random.default_rng(2)
    arrays = [torch.tensor(-rng.uniform(1.0, 9.0, 4)) for _ in range(4)]
    pc = arrays[0].clone().requires_grad_(True)
    w = torch.tensor([0.0, 1.0, 2.5, 0.25], requires_grad=True)
    res = torch_dpo_loss(pc, *arrays[1:], beta=0.4, pair_weights=w, backend=backend)
    plain = torch_dpo_loss(*arrays, beta=0.4, backend=backend)
    res.loss.backward()
    assert w.grad is None
    torch.testing.assert_close(res.losses.detach(), w.detach() * plain.losses, rtol=1e-14, atol=0)
    assert float(res.component_losses["sigmoid"]) == pytest.approx(
        float(res.loss.detach()), rel=1e-14
    )
    pc2 = arrays[0].clone().requires_grad_(True)
    torch_dpo_loss(pc2, *arrays[1:], beta=0.4, backend=backend).losses.backward(w.detach())
    torch.testing.assert_close(pc.grad * 4, pc2.grad, rtol=1e-13, atol=0)


def test_kernel_pair_weights_dtype_must_match():
    a = _val_arrays()
    with pytest.raises(TypeError, match="^pair_weights"):
        rlox.dpo_loss(*a, pair_weights=np.ones(3, np.float32))
    out = rlox.dpo_loss(*[x.astype(np.float32) for x in a], pair_weights=np.ones(3, np.float32))
    assert out.losses.dtype == np.float32


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("backend", [None, "rust", "torch"])
def test_alpha_clamp_gives_a_finite_loss_and_no_gradient_beyond_it(dtype, backend):
    # alpha = 0.5: t = -u / 2 > 80 for u_r = -200 (beyond) and u_c = -150 (inside, t = 75)
    a = [np.array([x], dtype) for x in (-151.0, -201.0, -1.0, -1.0)]
    kw = dict(beta=0.1, f_divergence="alpha_divergence", f_alpha_divergence_coef=0.5)
    if backend is None:
        out = rlox.dpo_loss(*a, **kw)
        loss, gc, gr = out.losses[0], out.grad_chosen[0], out.grad_rejected[0]
    else:
        leaves = [torch.from_numpy(x.copy()).requires_grad_(True) for x in a]
        res = torch_dpo_loss(*leaves, backend=backend, **kw)
        res.loss.backward()
        loss, gc, gr = float(res.loss.detach()), float(leaves[0].grad[0]), float(leaves[1].grad[0])
    # s = -2 expm1(t): z = 0.1 * 2 (e^80 - e^75) > 0, so the loss is ~0 and finite
    assert math.isfinite(loss) and loss >= 0.0
    assert gr == 0.0  # the rejected side is beyond the clamp
    assert math.isfinite(gc)


@pytest.mark.parametrize("old", [0.3, 1.0, 2.5])
def test_old_alpha_is_the_new_one_minus_alpha(old):
    """The README's upgrade note: the old score (1 - e^(-a u)) / a is the new one at 1 - a."""
    a = _val_arrays()
    uc, ur = a[0] - a[2], a[1] - a[3]
    z = 0.5 * (-np.expm1(-old * uc) / old + np.expm1(-old * ur) / old)
    out = rlox.dpo_loss(
        *a, beta=0.5, f_divergence="alpha_divergence", f_alpha_divergence_coef=1.0 - old
    )
    np.testing.assert_allclose(out.losses, np.logaddexp(0.0, -z), rtol=1e-14)
    if old == 1.0:
        fkl = rlox.dpo_loss(*a, beta=0.5, f_divergence="forward_kl")
        np.testing.assert_allclose(out.losses, fkl.losses, rtol=1e-14)


def test_sft_ignores_the_f_divergence_and_alpha_default_is_half():
    a = _val_arrays()
    base = rlox.dpo_loss(*a, loss_type="sft", **LENS)
    for div in F_DIVERGENCES:
        out = rlox.dpo_loss(*a, loss_type="sft", f_divergence=div, **LENS)
        np.testing.assert_array_equal(out.losses, base.losses)
    assert rlox.losses.LOSS_DEFAULTS["f_alpha_divergence_coef"] == 0.5
    for fn in (torch_dpo_loss, rlox.dpo_loss):
        assert inspect.signature(fn).parameters["f_alpha_divergence_coef"].default == 0.5
    default = rlox.dpo_loss(*a, f_divergence="alpha_divergence")
    half = rlox.dpo_loss(*a, f_divergence="alpha_divergence", f_alpha_divergence_coef=0.5)
    np.testing.assert_array_equal(default.losses, half.losses)


def test_every_loss_type_is_covered_by_the_references():
    assert rlox.losses.LOSS_TYPES == FAMILY_TYPES


@pytest.mark.parametrize("backend", [None, "rust", "torch"])
@pytest.mark.parametrize("other", ["sigmoid", "sigmoid_norm"])
def test_sigmoid_ignores_label_smoothing_and_cdpo_applies_it(other, backend):
    """TRL 1.16: sigmoid and sigmoid_norm ignore label_smoothing, also when a type beside them
    uses it; cdpo is the conservative DPO loss (1 - eps) sp(-z) + eps sp(z)."""
    a = _val_arrays()
    eps, beta = 0.2, 0.5

    def run(**kw):
        kw = dict(beta=beta, **LENS, **kw)
        if backend is None:
            out = rlox.dpo_loss(*a, **kw)
            return {k: float(v) for k, v in out.component_losses.items()}
        res = torch_dpo_loss(*[torch.tensor(x) for x in a], backend=backend, **_torch_kw(kw))
        return {k: float(v) for k, v in res.component_losses.items()}

    plain = run(loss_type=other)[other]
    mix = run(loss_type=["robust", other, "cdpo"], label_smoothing=eps)
    assert mix[other] == pytest.approx(plain, rel=1e-14)
    z = beta * ((a[0] - a[2]) - (a[1] - a[3]))
    want = np.mean((1 - eps) * np.logaddexp(0.0, -z) + eps * np.logaddexp(0.0, z))
    assert mix["cdpo"] == pytest.approx(want, rel=1e-14)
    assert run(loss_type="cdpo", label_smoothing=eps)["cdpo"] == pytest.approx(want, rel=1e-14)
    sig = run(loss_type="sigmoid")["sigmoid"]
    assert run(loss_type="cdpo")["cdpo"] == pytest.approx(sig, rel=1e-14)


# --------------------------------------------------------------------------------------------
# validation: ValueError naming the option, from the kernel and from both torch backends

NAN, INF = float("nan"), float("inf")
N_VAL = 3


def _val_arrays():
    return [
        np.array([-1.0, -2.0, -3.0]),
        np.array([-4.0, -2.5, -1.5]),
        np.array([-3.0, -2.0, -2.0]),
        np.array([-3.0, -1.0, -2.5]),
    ]


LENS = dict(chosen_lengths=np.array([1, 2, 3]), rejected_lengths=np.array([3, 2, 1]))

INVALID = []


def _bad(id_, match, arrays=None, **kw):
    INVALID.append(pytest.param(arrays, kw, match, id=id_))


for _v in (0.0, -1.0, NAN, INF):
    _bad(f"beta={_v}", "beta", beta=_v)
for _v in (-0.1, 0.5, 0.7, NAN):
    _bad(f"label_smoothing={_v}", "label_smoothing", label_smoothing=_v)
_bad("unknown type", "loss_type", loss_type="nope")
_bad("unknown type in list", "loss_type", loss_type=["sigmoid", "nope"])
_bad("empty type list", "loss_type", loss_type=[])
_bad("duplicate type", "loss_type", loss_type=["sigmoid", "sigmoid"])
_bad("unknown f_divergence", "f_divergence", f_divergence="nope")
_bad("exo_pair eps=0", "label_smoothing", loss_type="exo_pair")
for _t in sorted(set(FAMILY_TYPES) - LABEL_SMOOTHING_USERS):
    _bad(f"eps unused by {_t}", "label_smoothing", loss_type=_t, label_smoothing=0.1, **LENS)
for _t in ("sigmoid", "sigmoid_norm"):
    # the message names the types that use it and points to cdpo for conservative DPO
    _bad(
        f"eps with {_t} points to cdpo",
        r'^label_smoothing: .*"robust", "exo_pair", "aot", "aot_unpaired", "cdpo", "simpo", "cpo"'
        r'.*loss_type="cdpo"',
        loss_type=_t,
        label_smoothing=0.1,
        **LENS,
    )
_bad(
    "eps unused by hinge+sft",
    "label_smoothing",
    loss_type=["hinge", "sft"],
    label_smoothing=0.1,
    **LENS,
)
for _t in sorted(set(FAMILY_TYPES) - F_DIVERGENCE_TYPES):
    _bad(
        f"f_divergence unused by {_t}",
        f"^f_divergence: .*{_t}",
        loss_type=_t,
        f_divergence="forward_kl",
        **LENS,
    )
_bad(
    "f_divergence with bco_pair",
    "^f_divergence: .*bco_pair",
    loss_type=["sigmoid", "bco_pair"],
    f_divergence="js_divergence",
)
_bad(
    "alpha near 1 is still a non-default f_divergence",
    "^f_divergence: .*simpo",
    loss_type=["sft", "simpo"],
    f_divergence="alpha_divergence",
    f_alpha_divergence_coef=1.0,
    **LENS,
)
for _i, _v in ((1, NAN), (0, -0.5), (2, INF)):
    _w = np.ones(N_VAL)
    _w[_i] = _v
    _bad(f"pair_weights[{_i}]={_v}", rf"^pair_weights\[{_i}\]", pair_weights=_w)
_bad("pair_weights length", "^pair_weights", pair_weights=np.ones(N_VAL + 1))
for _t in sorted(SORTING_TYPES):
    _bad(f"pair_weights with {_t}", f"^pair_weights: .*{_t}", loss_type=_t, pair_weights=np.ones(3))
for _v in (0.0, -2.0, NAN, INF):
    _bad(f"sft_mean_length={_v}", "^sft_mean_length", loss_type="sft", sft_mean_length=_v, **LENS)
_bad("two weights for a string type", "loss_weights", loss_type="sigmoid", loss_weights=[1.0, 1.0])
_bad("weights count", "loss_weights", loss_type=["sigmoid", "hinge"], loss_weights=[1.0])
for _v in (-0.5, NAN, INF):
    _bad(f"weight={_v}", "loss_weights", loss_type=["sigmoid", "hinge"], loss_weights=[1.0, _v])
for _v in (NAN, INF, -INF):
    _bad(f"simpo_gamma={_v}", "simpo_gamma", loss_type="simpo", simpo_gamma=_v, **LENS)
for _v in (-1.0, NAN, INF):
    _bad(f"cpo_alpha={_v}", "cpo_alpha", loss_type="cpo", cpo_alpha=_v, **LENS)
    _bad(f"orpo_alpha={_v}", "orpo_alpha", loss_type="orpo", orpo_alpha=_v, **LENS)
    _bad(f"rpo_alpha={_v}", "rpo_alpha", loss_type="sigmoid", rpo_alpha=_v, **LENS)
for _v in (0.0, -1.0, NAN, INF):
    _bad(f"discopop_tau={_v}", "discopop_tau", loss_type="discopop", discopop_tau=_v)
for _v in (NAN, INF, -INF):  # any finite alpha is valid, as in TRL
    _bad(
        f"f_alpha_divergence_coef={_v}",
        "f_alpha_divergence_coef",
        f_divergence="alpha_divergence",
        f_alpha_divergence_coef=_v,
    )
for _v in (NAN, INF):
    _bad(f"bco_delta={_v}", "bco_delta", loss_type="bco_pair", bco_delta=_v)
_bad("aot combined", "loss_type", loss_type=["aot", "sigmoid"])
_bad("aot_unpaired combined", "loss_type", loss_type=["hinge", "aot_unpaired"])
# the spec does not say which option the message names here
_bad("aot with rpo_alpha", "rpo_alpha|loss_type", loss_type="aot", rpo_alpha=0.5, **LENS)
for _t in sorted(LENGTH_TYPES):
    _bad(
        f"{_t} without lengths",
        rf"(chosen_lengths|rejected_lengths).*{_t}|{_t}.*(chosen_lengths|rejected_lengths)",
        loss_type=_t,
    )
    _bad(
        f"{_t} without chosen_lengths",
        "chosen_lengths",
        loss_type=_t,
        rejected_lengths=LENS["rejected_lengths"],
    )
    _bad(
        f"{_t} without rejected_lengths",
        "rejected_lengths",
        loss_type=_t,
        chosen_lengths=LENS["chosen_lengths"],
    )
_bad("rpo without lengths", "chosen_lengths|rejected_lengths", loss_type="sigmoid", rpo_alpha=0.5)
_bad(
    "chosen length 0",
    r"chosen_lengths\[1\]",
    loss_type="ipo",
    chosen_lengths=np.array([2, 0, 1]),
    rejected_lengths=LENS["rejected_lengths"],
)
_bad(
    "rejected length -1",
    r"rejected_lengths\[0\]",
    loss_type="simpo",
    chosen_lengths=LENS["chosen_lengths"],
    rejected_lengths=np.array([-1, 2, 1]),
)
_bad(
    "chosen length 0, sigmoid",
    r"chosen_lengths\[2\]",
    loss_type="sigmoid",
    chosen_lengths=np.array([2, 1, 0]),
    rejected_lengths=LENS["rejected_lengths"],
)
_NO_REFS = _val_arrays()[:2] + [None, None]
for _t in sorted(set(FAMILY_TYPES) - REFERENCE_FREE_TYPES):
    _eps = {"label_smoothing": 0.1} if _t == "exo_pair" else {}
    _bad(f"{_t} without refs", "ref_chosen_logps", arrays=_NO_REFS, loss_type=_t, **LENS, **_eps)
_bad(
    "simpo+sigmoid without refs",
    "ref_chosen_logps",
    arrays=_NO_REFS,
    loss_type=["simpo", "sigmoid"],
    **LENS,
)
_a = _val_arrays()
_a[0][1] = 0.0
_bad("orpo pi_c = 0", r"policy_chosen_logps\[1\]", arrays=_a, loss_type="orpo", **LENS)
_a = _val_arrays()
_a[1][2] = 0.25
_bad("orpo pi_r > 0", r"policy_rejected_logps\[2\]", arrays=_a, loss_type="orpo", **LENS)
for _k, _name in enumerate(
    ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
):
    for _v in (NAN, INF, -INF):
        _a = _val_arrays()
        _a[_k][(_k + 1) % N_VAL] = _v
        _t = ["sigmoid", "aot", "bco_pair", "discopop"][_k]
        _bad(f"{_name}={_v} ({_t})", rf"{_name}\[{(_k + 1) % N_VAL}\]", arrays=_a, loss_type=_t)
_a = _val_arrays()[:2] + [None, None]
_a[0][2] = NAN
_bad("nan pi_c, sft without refs", r"policy_chosen_logps\[2\]", arrays=_a, loss_type="sft", **LENS)


@pytest.mark.parametrize(("arrays", "kw", "match"), INVALID)
def test_invalid_options_kernel(arrays, kw, match):
    arrays = _val_arrays() if arrays is None else arrays
    with pytest.raises(ValueError, match=match):
        rlox.dpo_loss(*[None if a is None else a.copy() for a in arrays], **kw)


@pytest.mark.parametrize("backend", ["rust", "torch"])
@pytest.mark.parametrize(("arrays", "kw", "match"), INVALID)
def test_invalid_options_torch(arrays, kw, match, backend):
    arrays = _val_arrays() if arrays is None else arrays
    tensors = [None if a is None else torch.tensor(a) for a in arrays]
    with pytest.raises(ValueError, match=match):
        torch_dpo_loss(*tensors, backend=backend, **_torch_kw(kw))


@pytest.mark.parametrize(("loss_type", "f_divergence"), TYPE_FDIV)
def test_valid_baseline_of_the_invalid_cases(loss_type, f_divergence):
    """The arrays the invalid cases start from are accepted with valid options."""
    kw = dict(loss_type=loss_type, f_divergence=f_divergence, **LENS)
    if loss_type == "exo_pair":
        kw["label_smoothing"] = 0.1
    out = rlox.dpo_loss(*_val_arrays(), **kw)
    assert math.isfinite(out.loss)


WRONG_TYPES = [
    pytest.param(dict(loss_type=3), "loss_type", id="loss_type=3"),
    pytest.param(dict(loss_type=["sigmoid", 3]), "loss_type", id="loss_type list with int"),
    pytest.param(dict(beta="0.1"), "beta", id="beta str"),
    pytest.param(dict(f_divergence=1), "f_divergence", id="f_divergence int"),
    pytest.param(dict(loss_type="simpo", simpo_gamma="a", **LENS), "simpo_gamma", id="gamma str"),
    pytest.param(dict(pair_weights=np.ones(3, np.int64)), "pair_weights", id="int pair_weights"),
    pytest.param(dict(sft_mean_length="4"), "sft_mean_length", id="sft_mean_length str"),
]


@pytest.mark.parametrize("backend", [None, "rust", "torch"])
@pytest.mark.parametrize(("kw", "match"), WRONG_TYPES)
def test_wrong_option_types_raise_type_error(kw, match, backend):
    arrays = _val_arrays()
    with pytest.raises(TypeError, match=match):
        if backend is None:
            rlox.dpo_loss(*arrays, **kw)
        else:
            torch_dpo_loss(*[torch.tensor(a) for a in arrays], backend=backend, **_torch_kw(kw))
