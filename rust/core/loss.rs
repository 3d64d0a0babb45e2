//! Fused preference-loss kernels over precomputed sequence log-probs.
//!
//! Per pair `i`, with `u = pi - ref` per side (summed completion log-probs), `v = u / len`,
//! `a = pi / len`, an f-divergence score `s` and `z = beta * (s(u_c) - s(u_r))`, the loss types
//! are those of [`LossType`]; their formulas are documented in `rlox.losses.dpo_loss`. One pass
//! computes the per-pair losses, the gradients of the MEAN loss w.r.t. `pi_c` and `pi_r`, the
//! rewards `beta * u` and the batch metrics. Work is split over rayon chunks; inside a chunk,
//! blocks of pairs go through each weighted loss term in L1/L2-resident scratch.
//!
//! This module drives the kernel ([`dpo_loss`]). Its parts: `config` (loss types, options and
//! their validation), `arrays` (the input and output arrays, their splitting and checks), `sum`
//! (compensated batch sums), `block` (one chunk, block by block, through the weighted terms
//! whose per-pair loops are in `core::terms`) and `sorted` (`aot` / `aot_unpaired`).

mod arrays;
mod block;
mod config;
mod sorted;
mod sum;

use rayon::prelude::*;

use arrays::{first_non_finite, split_outputs, validate};
pub use arrays::{LossInputs, LossOutputs};
use block::chunk_generic;
pub use config::{FDivergence, LossConfig, LossOptions, LossType};
use sorted::sorted_loss;
use sum::{lane_sum, Partial, Sum, CHUNK};

use super::errors::Result;
use super::fastmath::Real;
use super::terms::Params;

/// Batch-level results (means over pairs), accumulated in f64.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LossSummary {
    pub loss: f64,
    pub reward_accuracy: f64,
    pub reward_margin: f64,
    pub chosen_reward: f64,
    pub rejected_reward: f64,
    /// Unweighted mean of each component, in [`LossConfig::component_names`] order.
    pub components: Vec<f64>,
    /// The BCO reward shift used (`bco_pair` only).
    pub bco_delta: Option<f64>,
}

/// Mean of the 2B rewards `beta * u` (the BCO shift when none is given).
fn mean_reward<T: Real>(beta: f64, inp: &LossInputs<'_, T>) -> f64 {
    let sum = |x: &[T]| {
        x.par_chunks(CHUNK)
            .map(lane_sum)
            .reduce(Sum::default, Sum::merge)
    };
    let mut total = sum(inp.policy_chosen).merge(sum(inp.policy_rejected));
    for r in [inp.ref_chosen, inp.ref_rejected].into_iter().flatten() {
        total = total.minus(sum(r));
    }
    beta * total.value() / (2 * inp.policy_chosen.len()) as f64
}

/// Evaluate the loss, its gradients, rewards and metrics for B pairs.
///
/// `grad_*` are d(mean loss)/d(policy log-prob); the gradients w.r.t. the reference log-probs
/// are their negatives, except for `aot` (whose reference differences are sorted separately).
pub fn dpo_loss<T: Real>(
    cfg: &LossConfig,
    inp: &LossInputs<'_, T>,
    out: LossOutputs<'_, T>,
) -> Result<LossSummary> {
    let n = inp.policy_chosen.len();
    validate(inp, cfg, n)?;
    let outs = [
        out.losses.len(),
        out.grad_chosen.len(),
        out.grad_rejected.len(),
        out.chosen_rewards.len(),
        out.rejected_rewards.len(),
    ];
    assert!(
        outs.iter().all(|&l| l == n),
        "output buffers must have B elements"
    );
    assert!(
        out.grad_chosen_avg.is_none() && out.grad_rejected_avg.is_none()
            || inp.chosen_lengths.is_some(),
        "per-token gradients need lengths"
    );
    let mut inp = *inp;
    if cfg.opts.reference_free {
        inp.ref_chosen = None;
        inp.ref_rejected = None;
    }
    let o = &cfg.opts;
    let bco_delta = cfg
        .terms
        .iter()
        .any(|(t, _)| *t == LossType::BcoPair)
        .then(|| o.bco_delta.unwrap_or_else(|| mean_reward(o.beta, &inp)));
    let p = Params {
        beta: T::from_f64(o.beta),
        eps: T::from_f64(o.label_smoothing),
        smooth: o.label_smoothing > 0.0,
        gamma: T::from_f64(o.simpo_gamma),
        cpo_alpha: T::from_f64(o.cpo_alpha),
        orpo_alpha: T::from_f64(o.orpo_alpha),
        tau: T::from_f64(o.discopop_tau),
        tau_le_one: o.discopop_tau <= 1.0,
        alpha: T::from_f64(o.f_alpha_divergence_coef),
        delta: T::from_f64(bco_delta.unwrap_or(0.0)),
    };
    let inv_n = T::from_f64(1.0 / n as f64);
    let total = if cfg.terms[0].0.sorted() {
        if let Some(e) = first_non_finite(&inp) {
            return Err(e);
        }
        sorted_loss(cfg.terms[0].0, &p, &inp, out, inv_n)
    } else {
        chunked_loss(cfg, &p, &inp, out, inv_n)
    };
    if total.non_finite {
        return Err(first_non_finite(&inp).expect("a non-finite value was flagged"));
    }
    let mut total = total;
    if cfg.is_single() && !cfg.terms[0].0.sorted() {
        total.components[0] = total.loss;
    }
    let nf = n as f64;
    Ok(LossSummary {
        loss: total.loss.value() / nf,
        reward_accuracy: total.correct as f64 / nf,
        reward_margin: total.chosen_reward.minus(total.rejected_reward).value() / nf,
        chosen_reward: total.chosen_reward.value() / nf,
        rejected_reward: total.rejected_reward.value() / nf,
        components: total.components.iter().map(|s| s.value() / nf).collect(),
        bco_delta,
    })
}

fn chunked_loss<T: Real>(
    cfg: &LossConfig,
    p: &Params<T>,
    inp: &LossInputs<'_, T>,
    out: LossOutputs<'_, T>,
    inv_n: T,
) -> Partial {
    let k = cfg.component_names().len();
    split_outputs(out, CHUNK)
        .into_par_iter()
        .enumerate()
        .map(|(c, o)| {
            let lo = c * CHUNK;
            let sub = inp.slice(lo, lo + o.losses.len());
            chunk_dispatch(cfg, p, &sub, o, inv_n)
        })
        .reduce(|| Partial::new(k), Partial::merge)
}

fn chunk_dispatch<T: Real>(
    cfg: &LossConfig,
    p: &Params<T>,
    inp: &LossInputs<'_, T>,
    out: LossOutputs<'_, T>,
    inv_n: T,
) -> Partial {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { chunk_avx2(cfg, p, inp, out, inv_n) };
        }
    }
    chunk_generic(cfg, p, inp, out, inv_n)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn chunk_avx2<T: Real>(
    cfg: &LossConfig,
    p: &Params<T>,
    inp: &LossInputs<'_, T>,
    out: LossOutputs<'_, T>,
    inv_n: T,
) -> Partial {
    chunk_generic(cfg, p, inp, out, inv_n)
}

#[cfg(test)]
mod tests {
    use std::mem::MaybeUninit;

    use super::*;

    struct Run<T> {
        losses: Vec<T>,
        gc: Vec<T>,
        gr: Vec<T>,
        rc: Vec<T>,
        rr: Vec<T>,
        summary: Result<LossSummary>,
    }

    fn buf<T: Real>(n: usize) -> Vec<MaybeUninit<T>> {
        vec![MaybeUninit::uninit(); n]
    }

    fn init<T: Real>(v: Vec<MaybeUninit<T>>) -> Vec<T> {
        // SAFETY: the kernel succeeded, so it wrote every element.
        v.into_iter().map(|x| unsafe { x.assume_init() }).collect()
    }

    fn run<T: Real>(cfg: LossConfig, inp: LossInputs<'_, T>) -> Run<T> {
        let n = inp.policy_chosen.len();
        let mut o: Vec<Vec<MaybeUninit<T>>> = (0..5).map(|_| buf(n)).collect();
        let [l, gc, gr, rc, rr] = &mut o[..] else {
            unreachable!()
        };
        let summary = dpo_loss(
            &cfg,
            &inp,
            LossOutputs {
                losses: l,
                grad_chosen: gc,
                grad_rejected: gr,
                chosen_rewards: rc,
                rejected_rewards: rr,
                grad_chosen_avg: None,
                grad_rejected_avg: None,
            },
        );
        if summary.is_err() {
            return Run {
                losses: vec![],
                gc: vec![],
                gr: vec![],
                rc: vec![],
                rr: vec![],
                summary,
            };
        }
        let mut it = o.into_iter().map(init);
        Run {
            losses: it.next().unwrap(),
            gc: it.next().unwrap(),
            gr: it.next().unwrap(),
            rc: it.next().unwrap(),
            rr: it.next().unwrap(),
            summary,
        }
    }

    fn inputs<'a>(
        pc: &'a [f64],
        pr: &'a [f64],
        rc: &'a [f64],
        rr: &'a [f64],
    ) -> LossInputs<'a, f64> {
        LossInputs {
            policy_chosen: pc,
            policy_rejected: pr,
            ref_chosen: Some(rc),
            ref_rejected: Some(rr),
            chosen_lengths: None,
            rejected_lengths: None,
        }
    }

    #[test]
    fn sigmoid_at_init_is_ln2() {
        let v = [-3.0, -7.5];
        let cfg = LossConfig::single(LossType::Sigmoid, 0.1, 0.0).unwrap();
        let r = run(cfg, inputs(&v, &v, &v, &v));
        let s = r.summary.unwrap();
        assert!((s.loss - std::f64::consts::LN_2).abs() < 1e-15);
        assert_eq!(s.reward_margin, 0.0);
        assert_eq!(s.reward_accuracy, 0.0);
        // d/dz -log sigma(z) at 0 is -1/2; times beta / B.
        assert!((r.gc[0] - (-0.5 * 0.1 / 2.0)).abs() < 1e-15);
        assert_eq!(r.gr[0], -r.gc[0]);
    }

    #[test]
    fn hand_computed_values() {
        // u_c = 2 - 0 = 2, u_r = 0 - 1 = -1, delta = 3, beta = 0.5 -> z = 1.5.
        let (pc, pr, rc, rr) = ([-1.0], [-4.0], [-3.0], [-3.0]);
        let sig = run(
            LossConfig::single(LossType::Sigmoid, 0.5, 0.0).unwrap(),
            inputs(&pc, &pr, &rc, &rr),
        );
        let want = (1.0f64 + (-1.5f64).exp()).ln(); // 0.201413
        assert!((sig.losses[0] - want).abs() < 1e-12);
        assert!((sig.rc[0] - 1.0).abs() < 1e-15 && (sig.rr[0] + 0.5).abs() < 1e-15);
        assert_eq!(sig.summary.unwrap().reward_accuracy, 1.0);
        let smooth = run(
            LossConfig::single(LossType::Sigmoid, 0.5, 0.2).unwrap(),
            inputs(&pc, &pr, &rc, &rr),
        );
        let want_s = 0.8 * want + 0.2 * (1.0f64 + 1.5f64.exp()).ln();
        assert!((smooth.losses[0] - want_s).abs() < 1e-12);
        let hinge = run(
            LossConfig::single(LossType::Hinge, 0.5, 0.0).unwrap(),
            inputs(&pc, &pr, &rc, &rr),
        );
        assert_eq!(hinge.losses[0], 0.0);
        assert_eq!(hinge.gc[0], 0.0);
        let hinge2 = run(
            LossConfig::single(LossType::Hinge, 0.1, 0.0).unwrap(),
            inputs(&pc, &pr, &rc, &rr),
        );
        assert!((hinge2.losses[0] - 0.7).abs() < 1e-12);
        assert!((hinge2.gc[0] + 0.1).abs() < 1e-15);
        // ipo: lengths 4 and 2 -> d = 2/4 - (-1)/2 = 1.0; target 1/(2*0.5) = 1 -> loss 0.
        let (lc, lr) = ([4i64], [2i64]);
        let mut inp = inputs(&pc, &pr, &rc, &rr);
        inp.chosen_lengths = Some(&lc);
        inp.rejected_lengths = Some(&lr);
        let ipo = run(LossConfig::single(LossType::Ipo, 0.5, 0.0).unwrap(), inp);
        assert!(ipo.losses[0].abs() < 1e-15);
        let ipo2 = run(LossConfig::single(LossType::Ipo, 0.25, 0.0).unwrap(), inp);
        // target 2 -> d - 2 = -1 -> loss 1, dL/dd = -2, grad_c = -2/4, grad_r = 2/2.
        assert!((ipo2.losses[0] - 1.0).abs() < 1e-12);
        assert!((ipo2.gc[0] + 0.5).abs() < 1e-12);
        assert!((ipo2.gr[0] - 1.0).abs() < 1e-12);
    }

    #[test]
    fn extreme_margins_stay_finite() {
        let pc = [1e4, -1e4, 0.0];
        let z = [0.0, 0.0, 0.0];
        let r = run(
            LossConfig::single(LossType::Sigmoid, 1.0, 0.1).unwrap(),
            inputs(&pc, &z, &z, &z),
        );
        assert!(r.losses.iter().all(|x| x.is_finite()));
        assert!((r.losses[0] - 0.1 * 1e4).abs() < 1e-9);
        assert!((r.losses[1] - 0.9 * 1e4).abs() < 1e-9);
        let pc32 = [1e4f32, -1e4];
        let z32 = [0.0f32; 2];
        let r32 = run(
            LossConfig::single(LossType::Sigmoid, 1.0, 0.0).unwrap(),
            LossInputs {
                policy_chosen: &pc32,
                policy_rejected: &z32,
                ref_chosen: Some(&z32),
                ref_rejected: Some(&z32),
                chosen_lengths: None,
                rejected_lengths: None,
            },
        );
        assert!(r32.losses[0] >= 0.0 && r32.losses[0] < 1e-30);
        assert_eq!(r32.losses[1], 1e4);
        assert!(r32.gc.iter().all(|g| g.is_finite()));
    }

    #[test]
    fn errors_name_the_argument() {
        let a = [0.0, 1.0];
        let b = [0.0];
        let bad = [0.0, f64::NAN];
        let cfg = LossConfig::single(LossType::Sigmoid, 0.1, 0.0).unwrap();
        let e = run(cfg.clone(), inputs(&a, &b, &a, &a))
            .summary
            .unwrap_err();
        assert_eq!(e.field, "policy_rejected_logps");
        let e = run(cfg, inputs(&a, &a, &a, &bad)).summary.unwrap_err();
        assert_eq!((e.field.as_str(), e.index), ("ref_rejected_logps", Some(1)));
        let ipo = LossConfig::single(LossType::Ipo, 0.1, 0.0).unwrap();
        let e = run(ipo, inputs(&a, &a, &a, &a)).summary.unwrap_err();
        assert_eq!(e.field, "chosen_lengths");
    }

    #[test]
    fn chunked_sum_matches_serial() {
        let n = 3 * CHUNK + 17;
        let pc: Vec<f64> = (0..n).map(|i| -((i % 97) as f64) * 0.37).collect();
        let pr: Vec<f64> = (0..n).map(|i| -((i % 89) as f64) * 0.41).collect();
        let rc: Vec<f64> = (0..n).map(|i| -((i % 83) as f64) * 0.39).collect();
        let rr: Vec<f64> = (0..n).map(|i| -((i % 79) as f64) * 0.4).collect();
        let cfg = LossConfig::single(LossType::Sigmoid, 0.3, 0.0).unwrap();
        let r = run(cfg, inputs(&pc, &pr, &rc, &rr));
        let s = r.summary.unwrap();
        let mean = r.losses.iter().sum::<f64>() / n as f64;
        assert!((s.loss - mean).abs() < 1e-12);
        let acc = (0..n).filter(|&i| r.rc[i] > r.rr[i]).count() as f64 / n as f64;
        assert_eq!(s.reward_accuracy, acc);
    }

    fn with_lengths<'a>(
        inp: LossInputs<'a, f64>,
        lc: &'a [i64],
        lr: &'a [i64],
    ) -> LossInputs<'a, f64> {
        LossInputs {
            chosen_lengths: Some(lc),
            rejected_lengths: Some(lr),
            ..inp
        }
    }

    fn cfg_of(
        types: &[LossType],
        weights: Option<&[f64]>,
        f: impl Fn(&mut LossOptions),
    ) -> LossConfig {
        let mut o = LossOptions::default();
        f(&mut o);
        LossConfig::new(types, weights, o).unwrap()
    }

    /// Central finite differences of the mean loss w.r.t. pi_c and pi_r for every pair.
    fn check_gradients(
        cfg: &LossConfig,
        pc: &[f64],
        pr: &[f64],
        rc: &[f64],
        rr: &[f64],
        lc: &[i64],
        lr: &[i64],
    ) {
        let base = run(cfg.clone(), with_lengths(inputs(pc, pr, rc, rr), lc, lr));
        let mean = |pc: &[f64], pr: &[f64]| {
            run(cfg.clone(), with_lengths(inputs(pc, pr, rc, rr), lc, lr))
                .summary
                .unwrap()
                .loss
        };
        let h = 1e-6;
        for i in 0..pc.len() {
            for side in 0..2 {
                let (mut a, mut b) = (pc.to_vec(), pr.to_vec());
                let x = if side == 0 { &mut a } else { &mut b };
                x[i] += h;
                let up = mean(&a, &b);
                let x = if side == 0 { &mut a } else { &mut b };
                x[i] -= 2.0 * h;
                let down = mean(&a, &b);
                let fd = (up - down) / (2.0 * h);
                let g = if side == 0 { base.gc[i] } else { base.gr[i] };
                assert!(
                    (fd - g).abs() < 1e-6 * (1.0 + g.abs()),
                    "{:?} pair {i} side {side}: fd {fd} vs kernel {g}",
                    cfg.terms
                );
            }
        }
    }

    #[test]
    fn every_type_matches_finite_differences() {
        let pc = [-3.0, -7.5, -1.25, -20.0];
        let pr = [-4.0, -6.0, -1.5, -18.0];
        let rc = [-3.5, -7.0, -1.0, -21.0];
        let rr = [-3.8, -6.5, -1.75, -17.0];
        let (lc, lr) = ([3i64, 7, 2, 11], [4i64, 5, 1, 9]);
        for t in LossType::ALL {
            let eps = if t.uses_label_smoothing() { 0.2 } else { 0.0 };
            let cfg = cfg_of(&[t], None, |o| {
                o.beta = 0.7;
                o.label_smoothing = eps;
                o.bco_delta = Some(0.1);
            });
            check_gradients(&cfg, &pc, &pr, &rc, &rr, &lc, &lr);
        }
        let margin = [
            LossType::Sigmoid,
            LossType::Robust,
            LossType::Ipo,
            LossType::Discopop,
            LossType::SigmoidNorm,
        ];
        for div in [
            FDivergence::ForwardKl,
            FDivergence::JsDivergence,
            FDivergence::AlphaDivergence,
        ] {
            let cfg = cfg_of(&margin, Some(&[1.0, 0.5, 0.25, 2.0, 0.3]), |o| {
                o.f_divergence = div;
                o.f_alpha_divergence_coef = 0.6;
            });
            check_gradients(&cfg, &pc, &pr, &rc, &rr, &lc, &lr);
        }
        let mpo = cfg_of(
            &[LossType::Sigmoid, LossType::BcoPair, LossType::Sft],
            Some(&[0.8, 0.2, 1.0]),
            |o| {
                o.rpo_alpha = Some(0.5);
                o.bco_delta = Some(-0.05);
            },
        );
        check_gradients(&mpo, &pc, &pr, &rc, &rr, &lc, &lr);
    }

    #[test]
    fn weighted_terms_add_up() {
        let pc = [-3.0, -7.5, -1.25];
        let pr = [-4.0, -6.0, -1.5];
        let rc = [-3.5, -7.0, -1.0];
        let rr = [-3.8, -6.5, -1.75];
        let (lc, lr) = ([3i64, 7, 2], [4i64, 5, 1]);
        let one = |t| {
            run(
                cfg_of(&[t], None, |_| {}),
                with_lengths(inputs(&pc, &pr, &rc, &rr), &lc, &lr),
            )
        };
        let (a, b) = (one(LossType::Sigmoid), one(LossType::Sft));
        let both = run(
            cfg_of(
                &[LossType::Sigmoid, LossType::Sft],
                Some(&[0.8, 1.5]),
                |o| o.rpo_alpha = Some(0.25),
            ),
            with_lengths(inputs(&pc, &pr, &rc, &rr), &lc, &lr),
        );
        for i in 0..3 {
            let nll = -pc[i] / lc[i] as f64;
            let want = 0.8 * a.losses[i] + 1.5 * b.losses[i] + 0.25 * nll;
            assert!((both.losses[i] - want).abs() < 1e-12);
        }
        let s = both.summary.unwrap();
        assert_eq!(s.components.len(), 3);
        assert!((s.components[0] - a.summary.unwrap().loss).abs() < 1e-12);
        let sft_mean = b.summary.unwrap().loss;
        assert!(
            (s.components[1] - sft_mean).abs() < 1e-12
                && (s.components[2] - sft_mean).abs() < 1e-12
        );
    }

    #[test]
    fn aot_sorts_within_the_batch() {
        // policy differences p = [1, -2, 0.5], reference differences q = [0, 0.25, -1].
        let (pc, pr) = ([0.0, -2.0, -0.5], [-1.0, 0.0, -1.0]);
        let (rc, rr) = ([-1.0, -0.75, -2.0], [-1.0, -1.0, -1.0]);
        let cfg = cfg_of(&[LossType::Aot], None, |o| o.beta = 1.0);
        let r = run(cfg, inputs(&pc, &pr, &rc, &rr));
        // sorted p = [-2, 0.5, 1], sorted q = [-1, 0, 0.25] -> d = [-1, 0.5, 0.75]
        for (k, d) in [-1.0f64, 0.5, 0.75].iter().enumerate() {
            assert!((r.losses[k] - (1.0 + (-d).exp()).ln()).abs() < 1e-12);
        }
        // pair 1 holds the smallest p, so it gets the gradient of d = -1.
        let g = -1.0 / (1.0 + (-1.0f64).exp()) / 3.0;
        assert!((r.gc[1] - g).abs() < 1e-12 && (r.gr[1] + g).abs() < 1e-12);
    }

    #[test]
    fn inputs_are_validated() {
        let pc = [0.5];
        let z = [-1.0];
        let l = [2i64];
        let orpo = cfg_of(&[LossType::Orpo], None, |_| {});
        let e = run(orpo, with_lengths(inputs(&pc, &z, &z, &z), &l, &l))
            .summary
            .unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.index),
            ("policy_chosen_logps", Some(0))
        );
        let sig = cfg_of(&[LossType::Sigmoid], None, |_| {});
        let e = run(
            sig,
            LossInputs {
                ref_chosen: None,
                ..inputs(&z, &z, &z, &z)
            },
        )
        .summary
        .unwrap_err();
        assert_eq!(e.field, "ref_chosen_logps");
    }
}
