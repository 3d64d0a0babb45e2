//! One chunk of pairs, block by block: log-ratios, f-divergence scores, each weighted loss term
//! (times the pair weights, when given) in L1/L2-resident scratch, then the outputs and the
//! block's sums.

use super::arrays::{assume_init, length_of, split_outputs, LossInputs, LossOutputs};
use super::config::{Basis, LossConfig, LossType};
use super::scores::{self, div_scores, weigh, Consts};
use super::sum::{lane_sum, Partial};
use crate::core::fastmath::Real;
use crate::core::terms::{self, Out, Params};

/// Pairs per inner block: the scratch of one block stays in L1/L2.
const BLOCK: usize = 1024;

/// Per-block working arrays (BLOCK elements each).
struct Scratch<T> {
    uc: Vec<T>,
    ur: Vec<T>,
    ilc: Vec<T>,
    ilr: Vec<T>,
    sc: Vec<T>,
    sr: Vec<T>,
    dsc: Vec<T>,
    dsr: Vec<T>,
    vc: Vec<T>,
    vr: Vec<T>,
    dvc: Vec<T>,
    dvr: Vec<T>,
    comp: Vec<T>,
    dcc: Vec<T>,
    dcr: Vec<T>,
    l: Vec<T>,
    gc: Vec<T>,
    gr: Vec<T>,
}

impl<T: Real> Scratch<T> {
    fn new() -> Self {
        let v = || vec![T::ZERO; BLOCK];
        Self {
            uc: v(),
            ur: v(),
            ilc: v(),
            ilr: v(),
            sc: v(),
            sr: v(),
            dsc: v(),
            dsr: v(),
            vc: v(),
            vr: v(),
            dvc: v(),
            dvr: v(),
            comp: v(),
            dcc: v(),
            dcr: v(),
            l: v(),
            gc: v(),
            gr: v(),
        }
    }
}

#[inline(always)]
pub(super) fn chunk_generic<T: Real>(
    cfg: &LossConfig,
    p: &Params<T>,
    c: &Consts<T>,
    inp: &LossInputs<'_, T>,
    out: LossOutputs<'_, T>,
    inv_n: T,
) -> Partial {
    let mut s = Scratch::new();
    let mut acc = Partial::new(cfg.component_names().len());
    for (b, o) in split_outputs(out, BLOCK).into_iter().enumerate() {
        let lo = b * BLOCK;
        let sub = inp.slice(lo, lo + o.losses.len());
        block(cfg, p, c, &sub, &mut s, &mut acc, o, inv_n);
    }
    acc
}

/// `u = pi - ref` (or `pi` without a reference).
#[inline(always)]
fn log_ratio<T: Real>(pi: &[T], r: Option<&[T]>, u: &mut [T]) {
    let m = u.len();
    match r {
        Some(r) => {
            let (pi, r) = (&pi[..m], &r[..m]);
            for i in 0..m {
                u[i] = pi[i] - r[i];
            }
        }
        None => u.copy_from_slice(&pi[..m]),
    }
}

#[inline(always)]
fn inverse_lengths<T: Real>(len: &[i64], il: &mut [T]) {
    let m = il.len();
    let len = &len[..m];
    for i in 0..m {
        il[i] = T::ONE / length_of::<T>(len[i]);
    }
}

/// `g += w * d * f` (f = 1 when absent).
#[inline(always)]
fn add_grad<T: Real>(w: T, d: &[T], f: Option<&[T]>, g: &mut [T]) {
    let m = g.len();
    let d = &d[..m];
    match f {
        None => {
            for i in 0..m {
                g[i] = g[i] + w * d[i];
            }
        }
        Some(f) => {
            let f = &f[..m];
            for i in 0..m {
                g[i] = g[i] + w * d[i] * f[i];
            }
        }
    }
}

#[inline(always)]
fn run_term<T: Real>(
    t: LossType,
    p: &Params<T>,
    c: &Consts<T>,
    [xc, xr]: [&[T]; 2],
    pi: [&[T]; 2],
    il: [&[T]; 2],
    o: Out<'_, T>,
) {
    match t {
        LossType::Sigmoid | LossType::SigmoidNorm => terms::sigmoid(p, xc, xr, o),
        LossType::Cdpo => terms::cdpo(p, xc, xr, o),
        LossType::Robust => terms::robust(p, xc, xr, o),
        LossType::Hinge => terms::hinge(p, xc, xr, o),
        LossType::Ipo => terms::ipo(p, xc, xr, o),
        LossType::ExoPair => terms::exo_pair(p, xc, xr, o),
        LossType::Discopop => terms::discopop(p, xc, xr, o),
        LossType::NcaPair => terms::nca_pair(p, xc, xr, o),
        LossType::BcoPair => terms::bco_pair(p, xc, xr, o),
        LossType::SppoHard => terms::sppo_hard(p, xc, xr, o),
        LossType::ApoZero => terms::apo_zero(p, xc, xr, o),
        LossType::ApoDown => terms::apo_down(p, xc, xr, o),
        LossType::Simpo => terms::simpo(p, pi, il, o),
        LossType::Cpo => terms::cpo(p, pi[0], pi[1], il[0], o),
        LossType::Orpo => terms::orpo(p, pi, il, o),
        LossType::Sft => scores::sft(pi[0], c.sft_len, o.comp, o.dcc, o.dcr),
        LossType::Aot | LossType::AotUnpaired => unreachable!("sorted losses run separately"),
    }
}

/// The inputs a term of type `$t` reads from the scratch `$s`, and the chain-rule factors from
/// them to pi (1 if None). A macro, not a function, so that it borrows only the fields it reads.
macro_rules! basis {
    ($s:ident, $identity:expr, $t:expr) => {
        match ($t.basis(), $identity) {
            (Basis::ScoreU, false) => ([&$s.sc[..], &$s.sr], [Some(&$s.dsc[..]), Some(&$s.dsr)]),
            (Basis::ScoreV, true) => ([&$s.vc[..], &$s.vr], [Some(&$s.ilc[..]), Some(&$s.ilr)]),
            (Basis::ScoreV, false) => ([&$s.vc[..], &$s.vr], [Some(&$s.dvc[..]), Some(&$s.dvr)]),
            _ => ([&$s.uc[..], &$s.ur], [None, None]),
        }
    };
}

/// Every output of one block of `m <= BLOCK` pairs, and its contribution to the batch sums.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn block<T: Real>(
    cfg: &LossConfig,
    p: &Params<T>,
    c: &Consts<T>,
    inp: &LossInputs<'_, T>,
    s: &mut Scratch<T>,
    acc: &mut Partial,
    out: LossOutputs<'_, T>,
    inv_n: T,
) {
    fill_bases(cfg, c, inp, s);
    if cfg.is_single() {
        // One term of weight 1: it writes the totals directly.
        single_term(cfg, p, c, inp, s);
    } else {
        weighted_terms(cfg, p, c, inp, s, acc);
    }
    write_outputs(p.beta, inp, s, out, inv_n, acc);
}

/// The quantities the terms read: `u` per side, inverse lengths (when needed), the
/// f-divergence scores `s(u)` and `s(u) / len` with their derivatives. With the identity score
/// (`c.identity`) the terms read `u` and `v = u / len` directly.
#[inline(always)]
fn fill_bases<T: Real>(
    cfg: &LossConfig,
    c: &Consts<T>,
    inp: &LossInputs<'_, T>,
    s: &mut Scratch<T>,
) {
    let m = inp.policy_chosen.len();
    let (pc, pr) = (inp.policy_chosen, inp.policy_rejected);
    log_ratio(pc, inp.ref_chosen, &mut s.uc[..m]);
    log_ratio(pr, inp.ref_rejected, &mut s.ur[..m]);
    if let (Some(lc), Some(lr), true) = (
        inp.chosen_lengths,
        inp.rejected_lengths,
        cfg.needs_lengths(),
    ) {
        inverse_lengths(lc, &mut s.ilc[..m]);
        inverse_lengths(lr, &mut s.ilr[..m]);
    }
    let div = cfg.opts.f_divergence;
    let per_token = cfg.needs(Basis::ScoreV);
    if !c.identity && (per_token || cfg.needs(Basis::ScoreU)) {
        div_scores(div, c.alpha_m1, &s.uc[..m], &mut s.sc[..m], &mut s.dsc[..m]);
        div_scores(div, c.alpha_m1, &s.ur[..m], &mut s.sr[..m], &mut s.dsr[..m]);
    }
    if per_token {
        // identity: v = u / len (chain factor 1 / len); else s(u) / len (factor s'(u) / len)
        let (xc, xr) = if c.identity {
            (&s.uc[..m], &s.ur[..m])
        } else {
            (&s.sc[..m], &s.sr[..m])
        };
        let (vc, vr) = (&mut s.vc[..m], &mut s.vr[..m]);
        let (ilc, ilr) = (&s.ilc[..m], &s.ilr[..m]);
        for i in 0..m {
            vc[i] = xc[i] * ilc[i];
            vr[i] = xr[i] * ilr[i];
        }
        if !c.identity {
            let (dvc, dvr) = (&mut s.dvc[..m], &mut s.dvr[..m]);
            let (dsc, dsr) = (&s.dsc[..m], &s.dsr[..m]);
            for i in 0..m {
                dvc[i] = dsc[i] * ilc[i];
                dvr[i] = dsr[i] * ilr[i];
            }
        }
    }
}

/// The pair-weight factor of term `t`: the weights themselves, or their mean for `sft` (which
/// TRL computes as one batch value); None without pair weights.
#[inline(always)]
fn weight_of<'a, T: Real>(
    t: Option<LossType>,
    c: &Consts<T>,
    inp: &LossInputs<'a, T>,
) -> Option<(&'a [T], Option<T>)> {
    let w = inp.pair_weights?;
    Some((w, (t == Some(LossType::Sft)).then_some(c.mean_weight)))
}

/// The loss of the one term of weight 1 (times the pair weights) into the totals `l`, `gc`,
/// `gr`.
#[inline(always)]
fn single_term<T: Real>(
    cfg: &LossConfig,
    p: &Params<T>,
    c: &Consts<T>,
    inp: &LossInputs<'_, T>,
    s: &mut Scratch<T>,
) {
    let m = inp.policy_chosen.len();
    let (pc, pr) = (inp.policy_chosen, inp.policy_rejected);
    let pi = [&pc[..m], &pr[..m]];
    let il = [&s.ilc[..m], &s.ilr[..m]];
    let t = cfg.terms[0].0;
    let (x, f): ([&[T]; 2], [Option<&[T]>; 2]) = basis!(s, c.identity, t);
    let o = Out {
        comp: &mut s.l[..m],
        dcc: &mut s.gc[..m],
        dcr: &mut s.gr[..m],
    };
    run_term(t, p, c, x, pi, il, o);
    for (g, f) in [(&mut s.gc, f[0]), (&mut s.gr, f[1])] {
        if let Some(f) = f {
            let (g, f) = (&mut g[..m], &f[..m]);
            for i in 0..m {
                g[i] = g[i] * f[i];
            }
        }
    }
    if let Some((w, scalar)) = weight_of(Some(t), c, inp) {
        weigh(w, scalar, [&mut s.l[..m], &mut s.gc, &mut s.gr]);
    }
}

/// The weighted sum of every term (and the rpo term) into the totals `l`, `gc`, `gr`; each
/// term's sum (times the pair weights, not the loss weight) goes to its component in `acc`.
#[inline(always)]
fn weighted_terms<T: Real>(
    cfg: &LossConfig,
    p: &Params<T>,
    c: &Consts<T>,
    inp: &LossInputs<'_, T>,
    s: &mut Scratch<T>,
    acc: &mut Partial,
) {
    let m = inp.policy_chosen.len();
    let (pc, pr) = (inp.policy_chosen, inp.policy_rejected);
    let pi = [&pc[..m], &pr[..m]];
    let il = [&s.ilc[..m], &s.ilr[..m]];
    s.l[..m].fill(T::ZERO);
    s.gc[..m].fill(T::ZERO);
    s.gr[..m].fill(T::ZERO);
    let rpo = cfg.opts.rpo_alpha.map(|a| (None, a));
    let terms = cfg.terms.iter().map(|&(t, w)| (Some(t), w));
    for (k, (t, w)) in terms.chain(rpo).enumerate() {
        let o = Out {
            comp: &mut s.comp[..m],
            dcc: &mut s.dcc[..m],
            dcr: &mut s.dcr[..m],
        };
        let f = match t {
            Some(t) => {
                let (x, f): ([&[T]; 2], [Option<&[T]>; 2]) = basis!(s, c.identity, t);
                run_term(t, p, c, x, pi, il, o);
                f
            }
            None => {
                terms::nll(pc, &s.ilc, o);
                [None, None]
            }
        };
        if let Some((w, scalar)) = weight_of(t, c, inp) {
            weigh(w, scalar, [&mut s.comp[..m], &mut s.dcc, &mut s.dcr]);
        }
        accumulate(
            T::from_f64(w),
            &s.comp[..m],
            [&s.dcc[..], &s.dcr],
            f,
            [&mut s.l[..], &mut s.gc, &mut s.gr],
            m,
        );
        acc.components[k] = acc.components[k].merge(lane_sum(&s.comp[..m]));
    }
}

#[inline(always)]
fn accumulate<T: Real>(
    w: T,
    comp: &[T],
    [dcc, dcr]: [&[T]; 2],
    [fc, fr]: [Option<&[T]>; 2],
    [l, gc, gr]: [&mut [T]; 3],
    m: usize,
) {
    let l = &mut l[..m];
    for i in 0..m {
        l[i] = l[i] + w * comp[i];
    }
    add_grad(w, dcc, fc, &mut gc[..m]);
    add_grad(w, dcr, fr, &mut gr[..m]);
}

/// Write the block's outputs from the scratch totals and add its sums to `acc`.
#[inline(always)]
fn write_outputs<T: Real>(
    beta: T,
    inp: &LossInputs<'_, T>,
    s: &Scratch<T>,
    out: LossOutputs<'_, T>,
    inv_n: T,
    acc: &mut Partial,
) {
    let m = out.losses.len();
    let (l, gc, gr, uc, ur) = (&s.l[..m], &s.gc[..m], &s.gr[..m], &s.uc[..m], &s.ur[..m]);
    let (ol, ogc, ogr) = (
        &mut *out.losses,
        &mut out.grad_chosen[..m],
        &mut out.grad_rejected[..m],
    );
    let (orc, orr) = (&mut out.chosen_rewards[..m], &mut out.rejected_rewards[..m]);
    for i in 0..m {
        ol[i].write(l[i]);
        ogc[i].write(gc[i] * inv_n);
        ogr[i].write(gr[i] * inv_n);
        orc[i].write(beta * uc[i]);
        orr[i].write(beta * ur[i]);
    }
    if let (Some(a), Some(lc)) = (out.grad_chosen_avg, inp.chosen_lengths) {
        for i in 0..m {
            a[i].write(gc[i] * inv_n * length_of::<T>(lc[i]));
        }
    }
    if let (Some(a), Some(lr)) = (out.grad_rejected_avg, inp.rejected_lengths) {
        for i in 0..m {
            a[i].write(gr[i] * inv_n * length_of::<T>(lr[i]));
        }
    }
    // SAFETY: the loop above wrote every element of these ranges.
    let (rc, rr) = unsafe { (assume_init(orc), assume_init(orr)) };
    acc.loss = acc.loss.merge(lane_sum(l));
    acc.chosen_reward = acc.chosen_reward.merge(lane_sum(rc));
    acc.rejected_reward = acc.rejected_reward.merge(lane_sum(rr));
    acc.correct += rc.iter().zip(rr).map(|(a, b)| (a > b) as u64).sum::<u64>();
    let (pc, pr) = (&inp.policy_chosen[..m], &inp.policy_rejected[..m]);
    let mut finite = true;
    match (inp.ref_chosen, inp.ref_rejected) {
        (Some(rc), Some(rr)) => {
            let (rc, rr) = (&rc[..m], &rr[..m]);
            for i in 0..m {
                finite &=
                    pc[i].is_finite() & pr[i].is_finite() & rc[i].is_finite() & rr[i].is_finite();
            }
        }
        _ => {
            for i in 0..m {
                finite &= pc[i].is_finite() & pr[i].is_finite();
            }
        }
    }
    acc.non_finite |= !finite;
}
