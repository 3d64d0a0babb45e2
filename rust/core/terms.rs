//! Per-pair loss terms of every preference loss, written as loops over one block of pairs.
//!
//! Each term fills `comp[i]` (its per-pair loss) and `dcc[i]`, `dcr[i]`: the derivatives of
//! that loss w.r.t. the term's chosen / rejected inputs (scores for margin losses, the policy
//! log-probs otherwise). The caller applies the chain rule and the weights. Loops are
//! branch-free where possible so LLVM vectorises them.

use super::fastmath::Real;

/// Shared loop of the margin losses: `|z| (loss, d loss / dz)` with `z = beta (xc - xr)`.
/// A macro, not a closure-taking function: the body must be inlined into the caller (which is
/// compiled for AVX2) for the loop to vectorise.
macro_rules! margin {
    ($p:expr, $xc:expr, $xr:expr, $o:expr, |$z:ident| $body:expr) => {{
        let o = $o;
        let m = o.comp.len();
        let (xc, xr) = (&$xc[..m], &$xr[..m]);
        let (dcc, dcr) = (&mut o.dcc[..m], &mut o.dcr[..m]);
        for i in 0..m {
            let $z = $p.beta * (xc[i] - xr[i]);
            let (l, dz) = $body;
            o.comp[i] = l;
            dcc[i] = $p.beta * dz;
            dcr[i] = -($p.beta * dz);
        }
    }};
}

/// Shared loop of the losses with one term per side: `|c, r| (loss, d/dc, d/dr)`.
macro_rules! per_side {
    ($c:expr, $r:expr, $o:expr, |$ci:ident, $ri:ident| $body:expr) => {{
        let o = $o;
        let m = o.comp.len();
        let (c, r) = (&$c[..m], &$r[..m]);
        let (dcc, dcr) = (&mut o.dcc[..m], &mut o.dcr[..m]);
        for i in 0..m {
            let ($ci, $ri) = (c[i], r[i]);
            let (l, a, b) = $body;
            o.comp[i] = l;
            dcc[i] = a;
            dcr[i] = b;
        }
    }};
}

/// `sigma(x)`, `sigma(-x)`, `softplus(x)` and `softplus(-x)` from one exponential.
#[derive(Clone, Copy)]
pub struct Logistic<T> {
    pub sig: T,
    pub sig_neg: T,
    pub sp_pos: T,
    pub sp_neg: T,
}

#[inline(always)]
pub fn logistic<T: Real>(x: T) -> Logistic<T> {
    let e = T::exp_nonpos(-x.abs());
    let l = T::log1p_unit(e);
    let pos = x >= T::ZERO;
    let inv = T::ONE / (T::ONE + e);
    let ei = e * inv;
    Logistic {
        sig: if pos { inv } else { ei },
        sig_neg: if pos { ei } else { inv },
        sp_pos: if pos { x + l } else { l },
        sp_neg: if pos { l } else { l - x },
    }
}

/// `(1-eps) softplus(-z) + eps softplus(z)` and its derivative in `z`. Without smoothing the
/// eps terms are dropped, not multiplied by 0 (0 * inf would be NaN).
#[inline(always)]
pub fn smoothed<T: Real, const SMOOTH: bool>(z: T, eps: T) -> (T, T) {
    let g = logistic(z);
    if SMOOTH {
        let a = T::ONE - eps;
        (a * g.sp_neg + eps * g.sp_pos, eps * g.sig - a * g.sig_neg)
    } else {
        (g.sp_neg, -g.sig_neg)
    }
}

/// Hyper-parameters of one evaluation in the kernel's float type.
#[derive(Clone, Copy)]
pub struct Params<T> {
    pub beta: T,
    pub eps: T,
    pub smooth: bool,
    pub gamma: T,
    pub cpo_alpha: T,
    pub orpo_alpha: T,
    pub tau: T,
    pub tau_le_one: bool,
    pub delta: T,
}

/// Output scratch of one term.
pub struct Out<'a, T> {
    pub comp: &'a mut [T],
    pub dcc: &'a mut [T],
    pub dcr: &'a mut [T],
}

/// DPO on the margin `z = beta * (xc - xr)`: `softplus(-z)` (sigmoid / sigmoid_norm, which
/// ignore label smoothing as TRL 1.16 does).
#[inline(always)]
pub fn sigmoid<T: Real>(p: &Params<T>, xc: &[T], xr: &[T], o: Out<'_, T>) {
    margin!(p, xc, xr, o, |z| smoothed::<T, false>(z, p.eps));
}

/// Conservative DPO: `(1-eps) softplus(-z) + eps softplus(z)`, `z = beta * (xc - xr)`.
#[inline(always)]
pub fn cdpo<T: Real>(p: &Params<T>, xc: &[T], xr: &[T], o: Out<'_, T>) {
    if p.smooth {
        margin!(p, xc, xr, o, |z| smoothed::<T, true>(z, p.eps));
    } else {
        margin!(p, xc, xr, o, |z| smoothed::<T, false>(z, p.eps));
    }
}

/// Robust DPO: `((1-eps) softplus(-z) - eps softplus(z)) / (1 - 2 eps)`.
#[inline(always)]
pub fn robust<T: Real>(p: &Params<T>, xc: &[T], xr: &[T], o: Out<'_, T>) {
    let a = T::ONE - p.eps;
    let k = T::ONE / (T::ONE - p.eps - p.eps);
    margin!(p, xc, xr, o, |z| {
        let g = logistic(z);
        (
            (a * g.sp_neg - p.eps * g.sp_pos) * k,
            -(a * g.sig_neg + p.eps * g.sig) * k,
        )
    });
}

/// SLiC hinge: `max(0, 1 - z)`.
#[inline(always)]
pub fn hinge<T: Real>(p: &Params<T>, xc: &[T], xr: &[T], o: Out<'_, T>) {
    margin!(p, xc, xr, o, |z| {
        let h = T::ONE - z;
        let active = h > T::ZERO;
        (
            if active { h } else { T::ZERO },
            if active { -T::ONE } else { T::ZERO },
        )
    });
}

/// IPO: `(xc - xr - 1/(2 beta))^2` on per-token averages.
#[inline(always)]
pub fn ipo<T: Real>(p: &Params<T>, xc: &[T], xr: &[T], o: Out<'_, T>) {
    let target = T::ONE / (p.beta + p.beta);
    let two = T::ONE + T::ONE;
    let m = o.comp.len();
    let (xc, xr, dcc, dcr) = (&xc[..m], &xr[..m], &mut o.dcc[..m], &mut o.dcr[..m]);
    for i in 0..m {
        let d = xc[i] - xr[i] - target;
        o.comp[i] = d * d;
        dcc[i] = two * d;
        dcr[i] = -(two * d);
    }
}

/// EXO (pair form): `KL(Bernoulli(sigma(z)) || Bernoulli(1 - eps))`.
#[inline(always)]
pub fn exo_pair<T: Real>(p: &Params<T>, xc: &[T], xr: &[T], o: Out<'_, T>) {
    let eps = p.eps.to_f64();
    let ln_keep = T::from_f64((1.0 - eps).ln());
    let ln_flip = T::from_f64(eps.ln());
    let logit = ln_keep - ln_flip;
    margin!(p, xc, xr, o, |z| {
        let g = logistic(z);
        let l = g.sig * (-g.sp_neg - ln_keep) + g.sig_neg * (-g.sp_pos - ln_flip);
        (l, g.sig * g.sig_neg * (z - logit))
    });
}

/// DiscoPOP: `(1-m) softplus(-z) + m exp(-z)` with `m = sigma(z / tau)`; `m exp(-z)` is
/// evaluated as `exp(-z - softplus(-z/tau))`, finite whenever the loss is.
#[inline(always)]
pub fn discopop<T: Real>(p: &Params<T>, xc: &[T], xr: &[T], o: Out<'_, T>) {
    if p.tau_le_one {
        discopop_with(p, xc, xr, o, T::exp_nonpos);
    } else {
        discopop_with(p, xc, xr, o, T::exp_any);
    }
}

#[inline(always)]
fn discopop_with<T: Real>(p: &Params<T>, xc: &[T], xr: &[T], o: Out<'_, T>, exp: impl Fn(T) -> T) {
    let inv_tau = T::ONE / p.tau;
    margin!(p, xc, xr, o, |x| {
        let g = logistic(x);
        let gm = logistic(x * inv_tau);
        let me = exp(-x - gm.sp_neg);
        let l = gm.sig_neg * g.sp_neg + me;
        let d = gm.sig_neg * ((me - gm.sig * g.sp_neg) * inv_tau - g.sig_neg) - me;
        (l, d)
    });
}

/// NCA (pair form): `softplus(-r_c) + softplus(r_c)/2 + softplus(r_r)/2`, `r = beta u`.
#[inline(always)]
pub fn nca_pair<T: Real>(p: &Params<T>, uc: &[T], ur: &[T], o: Out<'_, T>) {
    let half = T::from_f64(0.5);
    per_side!(uc, ur, o, |c, r| {
        let gc = logistic(p.beta * c);
        let gr = logistic(p.beta * r);
        (
            gc.sp_neg + half * gc.sp_pos + half * gr.sp_pos,
            p.beta * (half * gc.sig - gc.sig_neg),
            p.beta * half * gr.sig,
        )
    });
}

/// BCO (pair form): `softplus(-(beta u_c - delta)) + softplus(beta u_r - delta)`.
#[inline(always)]
pub fn bco_pair<T: Real>(p: &Params<T>, uc: &[T], ur: &[T], o: Out<'_, T>) {
    per_side!(uc, ur, o, |c, r| {
        let gc = logistic(p.beta * c - p.delta);
        let gr = logistic(p.beta * r - p.delta);
        (
            gc.sp_neg + gr.sp_pos,
            -(p.beta * gc.sig_neg),
            p.beta * gr.sig,
        )
    });
}

/// SPPO with hard labels: `(u_c - 1/(2 beta))^2 + (u_r + 1/(2 beta))^2`.
#[inline(always)]
pub fn sppo_hard<T: Real>(p: &Params<T>, uc: &[T], ur: &[T], o: Out<'_, T>) {
    let t = T::ONE / (p.beta + p.beta);
    let two = T::ONE + T::ONE;
    per_side!(uc, ur, o, |c, r| {
        let a = c - t;
        let b = r + t;
        (a * a + b * b, two * a, two * b)
    });
}

/// APO-zero: `sigma(-beta u_c) + sigma(beta u_r)`.
#[inline(always)]
pub fn apo_zero<T: Real>(p: &Params<T>, uc: &[T], ur: &[T], o: Out<'_, T>) {
    per_side!(uc, ur, o, |c, r| {
        let gc = logistic(p.beta * c);
        let gr = logistic(p.beta * r);
        (
            gc.sig_neg + gr.sig,
            -(p.beta * gc.sig * gc.sig_neg),
            p.beta * gr.sig * gr.sig_neg,
        )
    });
}

/// APO-down: `sigma(beta u_c) + sigma(-beta (u_c - u_r))`.
#[inline(always)]
pub fn apo_down<T: Real>(p: &Params<T>, uc: &[T], ur: &[T], o: Out<'_, T>) {
    per_side!(uc, ur, o, |c, r| {
        let gc = logistic(p.beta * c);
        let gd = logistic(p.beta * (c - r));
        let dd = p.beta * gd.sig * gd.sig_neg;
        (gc.sig + gd.sig_neg, p.beta * gc.sig * gc.sig_neg - dd, dd)
    });
}

/// SimPO: smoothed logistic of `beta (a_c - a_r) - gamma`, `a = pi / len`.
#[inline(always)]
pub fn simpo<T: Real>(p: &Params<T>, [pc, pr]: [&[T]; 2], [ilc, ilr]: [&[T]; 2], o: Out<'_, T>) {
    let m = o.comp.len();
    let (pc, pr, ilc, ilr) = (&pc[..m], &pr[..m], &ilc[..m], &ilr[..m]);
    let (dcc, dcr) = (&mut o.dcc[..m], &mut o.dcr[..m]);
    macro_rules! run {
        ($smooth:literal) => {
            for i in 0..m {
                let z = p.beta * (pc[i] * ilc[i] - pr[i] * ilr[i]) - p.gamma;
                let (l, dz) = smoothed::<T, $smooth>(z, p.eps);
                o.comp[i] = l;
                dcc[i] = p.beta * dz * ilc[i];
                dcr[i] = -(p.beta * dz * ilr[i]);
            }
        };
    }
    if p.smooth {
        run!(true);
    } else {
        run!(false);
    }
}

/// CPO: smoothed logistic of `beta (pi_c - pi_r)` plus `cpo_alpha` times the chosen NLL.
#[inline(always)]
pub fn cpo<T: Real>(p: &Params<T>, pc: &[T], pr: &[T], ilc: &[T], o: Out<'_, T>) {
    let m = o.comp.len();
    cdpo(
        p,
        pc,
        pr,
        Out {
            comp: &mut *o.comp,
            dcc: &mut *o.dcc,
            dcr: &mut *o.dcr,
        },
    );
    let (pc, ilc) = (&pc[..m], &ilc[..m]);
    for i in 0..m {
        o.comp[i] = o.comp[i] - p.cpo_alpha * pc[i] * ilc[i];
        o.dcc[i] = o.dcc[i] - p.cpo_alpha * ilc[i];
    }
}

/// Log-odds `a - log(1 - exp(a))` of a per-token probability `exp(a)` (`a < 0`) and its
/// derivative `1 / (1 - exp(a))`.
#[inline(always)]
fn log_odds<T: Real>(a: T) -> (T, T) {
    // q = 1 - exp(a), from expm1 near 0 where the subtraction would cancel.
    let near = -a.expm1_small();
    let far = T::ONE - T::exp_nonpos(a);
    let q = if a > T::from_f64(-std::f64::consts::LN_2) {
        near
    } else {
        far
    };
    (a - q.ln_pos(), T::ONE / q)
}

/// ORPO: chosen NLL plus `orpo_alpha * softplus(-(odds_c - odds_r))` on per-token averages.
#[inline(always)]
pub fn orpo<T: Real>(p: &Params<T>, [pc, pr]: [&[T]; 2], [ilc, ilr]: [&[T]; 2], o: Out<'_, T>) {
    let m = o.comp.len();
    let (pc, pr, ilc, ilr) = (&pc[..m], &pr[..m], &ilc[..m], &ilr[..m]);
    let (dcc, dcr) = (&mut o.dcc[..m], &mut o.dcr[..m]);
    // A plain loop, not a closure: the body is large and must be inlined to vectorise.
    for i in 0..m {
        let ac = pc[i] * ilc[i];
        let (oc, doc) = log_odds(ac);
        let (or, dor) = log_odds(pr[i] * ilr[i]);
        let g = logistic(oc - or);
        let k = p.orpo_alpha * g.sig_neg;
        o.comp[i] = -ac + p.orpo_alpha * g.sp_neg;
        dcc[i] = -ilc[i] - k * doc * ilc[i];
        dcr[i] = k * dor * ilr[i];
    }
}

/// Negative log-likelihood of the chosen completion, token mean: `-pi_c / len_c`.
#[inline(always)]
pub fn nll<T: Real>(pc: &[T], ilc: &[T], o: Out<'_, T>) {
    let m = o.comp.len();
    let (pc, ilc, dcc, dcr) = (&pc[..m], &ilc[..m], &mut o.dcc[..m], &mut o.dcr[..m]);
    for i in 0..m {
        o.comp[i] = -(pc[i] * ilc[i]);
        dcc[i] = -ilc[i];
        dcr[i] = T::ZERO;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logistic_matches_definitions() {
        for &x in &[-800.0, -30.0, -1.5, -1e-9, 0.0, 1e-9, 0.7, 25.0, 800.0f64] {
            let g = logistic(x);
            let sig = 1.0 / (1.0 + (-x).exp());
            assert!((g.sig - sig).abs() <= 1e-15 * sig + 1e-300, "x={x}");
            assert!((g.sig + g.sig_neg - 1.0).abs() < 1e-15);
            let sp = if x > 30.0 { x } else { x.exp().ln_1p() };
            // Below exp's range the kernel's exp clamps at e^-708 instead of underflowing.
            assert!((g.sp_pos - sp).abs() <= 1e-14 * sp.abs() + 1e-300, "x={x}");
            assert!((g.sp_pos - g.sp_neg - x).abs() <= 1e-12 * x.abs().max(1.0));
        }
    }

    #[test]
    fn log_odds_is_logit_of_probability() {
        for &a in &[-1e-6, -0.1, -0.69, -0.7, -3.0, -40.0f64] {
            let p = a.exp();
            let (o, d) = log_odds(a);
            assert!(
                (o - (p / (1.0 - p)).ln()).abs() < 1e-9 * o.abs().max(1.0),
                "a={a}"
            );
            assert!((d - 1.0 / (1.0 - p)).abs() < 1e-9 * d, "a={a}");
        }
    }
}
