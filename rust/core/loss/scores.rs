//! f-divergence scores `s(u)` and their derivatives, as TRL 1.16's `DPOTrainer` defines them,
//! and the batch constants the kernel derives before its parallel pass.

use rayon::prelude::*;

use super::arrays::LossInputs;
use super::config::{FDivergence, LossConfig, LossType};
use super::sum::{lane_sum, Sum, CHUNK};
use crate::core::fastmath::Real;
use crate::core::terms::logistic;

/// Largest exponent `(alpha - 1) u` of the alpha-divergence score: TRL's float32 clamp, used for
/// every dtype. Beyond it the score is constant and its derivative 0.
pub const ALPHA_EXP_MAX: f64 = 80.0;

/// `|alpha - 1|` below which the alpha-divergence score is the reverse-KL one, `s(u) = u`.
pub const ALPHA_IDENTITY_TOL: f64 = 1e-6;

/// Constants of one evaluation that the per-pair loops read besides the hyper-parameters.
#[derive(Debug, Clone, Copy)]
pub(super) struct Consts<T> {
    /// The score is the identity: terms read `u` (or `u / len`) directly.
    pub identity: bool,
    /// `alpha - 1` of the alpha-divergence score.
    pub alpha_m1: T,
    /// The length the `sft` term divides each pair's chosen log-prob by.
    pub sft_len: T,
    /// Mean of the pair weights (1 without them or without `sft`): the factor of the `sft`
    /// term.
    pub mean_weight: T,
}

impl<T: Real> Consts<T> {
    pub(super) fn new(cfg: &LossConfig, inp: &LossInputs<'_, T>) -> Self {
        let o = &cfg.opts;
        let alpha_m1 = o.f_alpha_divergence_coef - 1.0;
        let identity = match o.f_divergence {
            FDivergence::ReverseKl => true,
            FDivergence::AlphaDivergence => alpha_m1.abs() < ALPHA_IDENTITY_TOL,
            _ => false,
        };
        let n = inp.policy_chosen.len() as f64;
        let has_sft = cfg.terms.iter().any(|(t, _)| *t == LossType::Sft);
        let sft_len = match (has_sft, inp.sft_mean_length, inp.chosen_lengths) {
            (true, Some(m), _) => m,
            (true, None, Some(lc)) => {
                let total: u64 = lc.par_iter().map(|&l| l as u64).sum();
                total as f64 / n
            }
            _ => 1.0,
        };
        let sft_weights = inp.pair_weights.filter(|_| has_sft);
        let mean_weight = sft_weights.map_or(1.0, |w| {
            let s = w
                .par_chunks(CHUNK)
                .map(lane_sum)
                .reduce(Sum::default, Sum::merge);
            s.value() / n
        });
        Self {
            identity,
            alpha_m1: T::from_f64(alpha_m1),
            sft_len: T::from_f64(sft_len),
            mean_weight: T::from_f64(mean_weight),
        }
    }
}

/// Scores `s(u)` into `s` and `s'(u)` into `ds` for a non-identity divergence:
/// `forward_kl` `1 - e^(-u)`; `js_divergence` `log 2 + log sigma(u)`; `alpha_divergence`
/// `(e^t - 1) / (alpha - 1)` with `t = min((alpha - 1) u, 80)`.
#[inline(always)]
pub(super) fn div_scores<T: Real>(div: FDivergence, k: T, u: &[T], s: &mut [T], ds: &mut [T]) {
    let m = s.len();
    let (u, ds) = (&u[..m], &mut ds[..m]);
    match div {
        FDivergence::ReverseKl => unreachable!("the identity score is not materialised"),
        FDivergence::ForwardKl => {
            for i in 0..m {
                let x = -u[i];
                s[i] = -x.expm1_fast();
                ds[i] = x.exp_any();
            }
        }
        FDivergence::JsDivergence => {
            let ln2 = T::from_f64(std::f64::consts::LN_2);
            for i in 0..m {
                let g = logistic(u[i]);
                s[i] = ln2 - g.sp_neg;
                ds[i] = g.sig_neg;
            }
        }
        FDivergence::AlphaDivergence => {
            let max = T::from_f64(ALPHA_EXP_MAX);
            for i in 0..m {
                let t = k * u[i];
                let inside = t <= max;
                let tc = if inside { t } else { max };
                s[i] = tc.expm1_fast() / k;
                ds[i] = if inside { tc.exp_any() } else { T::ZERO };
            }
        }
    }
}

/// The `sft` term per pair: `-pi_c / m` (the batch token mean when `m` is the mean chosen
/// length), with its derivatives.
#[inline(always)]
pub(super) fn sft<T: Real>(pc: &[T], len: T, comp: &mut [T], dcc: &mut [T], dcr: &mut [T]) {
    let m = comp.len();
    let (pc, dcc, dcr) = (&pc[..m], &mut dcc[..m], &mut dcr[..m]);
    let d = -(T::ONE / len);
    for i in 0..m {
        comp[i] = -(pc[i] / len);
        dcc[i] = d;
        dcr[i] = T::ZERO;
    }
}

/// Multiply a term's per-pair loss and derivatives by the pair weights `w`, or by `scalar`
/// when given (the `sft` term: one batch value times the mean weight).
#[inline(always)]
pub(super) fn weigh<T: Real>(w: &[T], scalar: Option<T>, [l, dc, dr]: [&mut [T]; 3]) {
    let m = l.len();
    let (dc, dr) = (&mut dc[..m], &mut dr[..m]);
    match scalar {
        Some(c) => {
            for i in 0..m {
                l[i] = l[i] * c;
                dc[i] = dc[i] * c;
                dr[i] = dr[i] * c;
            }
        }
        None => {
            let w = &w[..m];
            for i in 0..m {
                l[i] = l[i] * w[i];
                dc[i] = dc[i] * w[i];
                dr[i] = dr[i] * w[i];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scores(div: FDivergence, alpha: f64, u: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let (mut s, mut ds) = (vec![0.0; u.len()], vec![0.0; u.len()]);
        div_scores(div, alpha - 1.0, u, &mut s, &mut ds);
        (s, ds)
    }

    #[test]
    fn scores_match_their_definitions() {
        let u = [-3.0, -0.5, -1e-9, 0.0, 2e-8, 0.75, 4.0];
        let (s, ds) = scores(FDivergence::ForwardKl, 0.0, &u);
        for i in 0..u.len() {
            assert!((s[i] - (1.0 - (-u[i]).exp())).abs() < 1e-15 * (1.0 + s[i].abs()));
            assert!((ds[i] - (-u[i]).exp()).abs() < 1e-15 * ds[i]);
        }
        let (s, ds) = scores(FDivergence::JsDivergence, 0.0, &u);
        for i in 0..u.len() {
            let sig = 1.0 / (1.0 + (-u[i]).exp());
            assert!((s[i] - (2.0f64.ln() + sig.ln())).abs() < 1e-15);
            assert!((ds[i] - (1.0 - sig)).abs() < 1e-15);
        }
        for alpha in [0.3, 0.5, 2.5] {
            let (s, ds) = scores(FDivergence::AlphaDivergence, alpha, &u);
            for i in 0..u.len() {
                let t = (alpha - 1.0) * u[i];
                let want = t.exp_m1() / (alpha - 1.0);
                assert!(
                    (s[i] - want).abs() <= 1e-15 * want.abs(),
                    "{alpha} {}",
                    u[i]
                );
                assert!((ds[i] - t.exp()).abs() <= 1e-15 * t.exp());
            }
        }
    }

    #[test]
    fn alpha_exponent_is_clamped_at_80() {
        // alpha = 2: t = u; alpha = 0.5: t = -u / 2.
        let (s, ds) = scores(FDivergence::AlphaDivergence, 2.0, &[79.5, 80.0, 81.0, 1e6]);
        assert!((s[0] - 79.5f64.exp_m1()).abs() <= 1e-15 * s[0]);
        assert!(ds[0] > 0.0 && ds[1] > 0.0);
        assert_eq!((s[2], ds[2]), (80.0f64.exp_m1(), 0.0));
        assert_eq!((s[3], ds[3]), (80.0f64.exp_m1(), 0.0));
        let (s, ds) = scores(FDivergence::AlphaDivergence, 0.5, &[-200.0]);
        assert_eq!((s[0], ds[0]), (-2.0 * 80.0f64.exp_m1(), 0.0));
        let (s32, ds32) = {
            let (mut s, mut ds) = ([0.0f32], [0.0f32]);
            div_scores(
                FDivergence::AlphaDivergence,
                -0.5f32,
                &[-1e4],
                &mut s,
                &mut ds,
            );
            (s[0], ds[0])
        };
        assert!(s32.is_finite() && ds32 == 0.0);
    }

    #[test]
    fn sft_and_weights() {
        let pc = [-2.0, -6.0];
        let (mut l, mut dc, mut dr) = ([0.0; 2], [0.0; 2], [1.0; 2]);
        sft(&pc, 4.0, &mut l, &mut dc, &mut dr);
        assert_eq!((l, dc, dr), ([0.5, 1.5], [-0.25, -0.25], [0.0, 0.0]));
        weigh(&[2.0, 0.0], None, [&mut l, &mut dc, &mut dr]);
        assert_eq!((l, dc), ([1.0, 0.0], [-0.5, 0.0]));
        weigh(&[], Some(3.0), [&mut l, &mut dc, &mut dr]);
        assert_eq!((l, dc), ([3.0, 0.0], [-1.5, 0.0]));
    }
}
