//! Unit tests of the loss kernel: hand-computed values, finite differences, validation.

use std::mem::MaybeUninit;

use super::*;
use crate::core::loss::sum::CHUNK;

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

fn inputs<'a>(pc: &'a [f64], pr: &'a [f64], rc: &'a [f64], rr: &'a [f64]) -> LossInputs<'a, f64> {
    LossInputs {
        policy_chosen: pc,
        policy_rejected: pr,
        ref_chosen: Some(rc),
        ref_rejected: Some(rr),
        chosen_lengths: None,
        rejected_lengths: None,
        pair_weights: None,
        sft_mean_length: None,
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
        LossConfig::single(LossType::Cdpo, 0.5, 0.2).unwrap(),
        inputs(&pc, &pr, &rc, &rr),
    );
    let want_s = 0.8 * want + 0.2 * (1.0f64 + 1.5f64.exp()).ln();
    assert!((smooth.losses[0] - want_s).abs() < 1e-12);
    // sigmoid ignores label_smoothing when another term uses it (TRL 1.16)
    let mix = run(
        cfg_of(&[LossType::Sigmoid, LossType::Cdpo], None, |o| {
            o.beta = 0.5;
            o.label_smoothing = 0.2;
        }),
        inputs(&pc, &pr, &rc, &rr),
    );
    let parts = mix.summary.unwrap().components;
    assert!((parts[0] - want).abs() < 1e-12 && (parts[1] - want_s).abs() < 1e-12);
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
        LossConfig::single(LossType::Cdpo, 1.0, 0.1).unwrap(),
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
            pair_weights: None,
            sft_mean_length: None,
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

fn with_lengths<'a>(inp: LossInputs<'a, f64>, lc: &'a [i64], lr: &'a [i64]) -> LossInputs<'a, f64> {
    LossInputs {
        chosen_lengths: Some(lc),
        rejected_lengths: Some(lr),
        ..inp
    }
}

fn cfg_of(types: &[LossType], weights: Option<&[f64]>, f: impl Fn(&mut LossOptions)) -> LossConfig {
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
    check_weighted_gradients(cfg, [pc, pr, rc, rr], lc, lr, None);
}

/// As [`check_gradients`], with pair weights `w`.
fn check_weighted_gradients(
    cfg: &LossConfig,
    [pc, pr, rc, rr]: [&[f64]; 4],
    lc: &[i64],
    lr: &[i64],
    w: Option<&[f64]>,
) {
    let run_at = |pc: &[f64], pr: &[f64]| {
        let inp = LossInputs {
            pair_weights: w,
            ..with_lengths(inputs(pc, pr, rc, rr), lc, lr)
        };
        run(cfg.clone(), inp)
    };
    let base = run_at(pc, pr);
    let mean = |pc: &[f64], pr: &[f64]| run_at(pc, pr).summary.unwrap().loss;
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
    let w = [0.5, 1.5, 0.0, 2.0];
    check_weighted_gradients(&mpo, [&pc, &pr, &rc, &rr], &lc, &lr, Some(&w));
}

#[test]
fn bco_shift_is_bco_delta_else_zero() {
    // u = (2, -1) and (0, -2), beta = 0.5: rewards x_c = (1, 0), x_r = (-0.5, -1)
    let (pc, pr) = ([-1.0, -2.0], [-4.0, -3.0]);
    let (rc, rr) = ([-3.0, -2.0], [-3.0, -1.0]);
    let sp = |x: f64| x.exp().ln_1p();
    let (xc, xr) = ([1.0, 0.0], [-0.5, -1.0]);
    for delta in [None, Some(0.25)] {
        let cfg = cfg_of(&[LossType::BcoPair], None, |o| {
            o.beta = 0.5;
            o.bco_delta = delta;
        });
        let r = run(cfg, inputs(&pc, &pr, &rc, &rr));
        let d = delta.unwrap_or(0.0);
        assert_eq!(r.summary.unwrap().bco_delta, Some(d));
        for i in 0..2 {
            let want = sp(-(xc[i] - d)) + sp(xr[i] - d);
            assert!((r.losses[i] - want).abs() < 1e-15, "{delta:?} pair {i}");
        }
    }
    let sig = run(
        cfg_of(&[LossType::Sigmoid], None, |_| {}),
        inputs(&pc, &pr, &rc, &rr),
    );
    assert_eq!(sig.summary.unwrap().bco_delta, None);
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
    let mut rpo_mean = 0.0;
    for i in 0..3 {
        let nll = -pc[i] / lc[i] as f64;
        rpo_mean += nll / 3.0;
        let want = 0.8 * a.losses[i] + 1.5 * b.losses[i] + 0.25 * nll;
        assert!((both.losses[i] - want).abs() < 1e-12);
    }
    let s = both.summary.unwrap();
    assert_eq!(s.components.len(), 3);
    assert!((s.components[0] - a.summary.unwrap().loss).abs() < 1e-12);
    // sft: the batch token mean -sum(pc) / sum(lc); rpo: the mean of the per-pair token means
    let sft_mean = b.summary.unwrap().loss;
    assert!((sft_mean - 11.75 / 12.0).abs() < 1e-15);
    assert!((s.components[1] - sft_mean).abs() < 1e-12);
    assert!((s.components[2] - rpo_mean).abs() < 1e-12);
}

#[test]
fn sft_is_the_batch_token_mean() {
    // lengths 1 and 3: token mean (2 + 9) / 4 = 2.75, m = 2 -> per pair 1 and 4.5
    let (pc, z) = ([-2.0, -9.0], [0.0, 0.0]);
    let (lc, lr) = ([1i64, 3], [5i64, 5]);
    let sft = cfg_of(&[LossType::Sft], None, |_| {});
    let r = run(sft.clone(), with_lengths(inputs(&pc, &z, &z, &z), &lc, &lr));
    assert_eq!(r.losses, [1.0, 4.5]);
    assert_eq!(r.summary.unwrap().loss, 2.75);
    assert_eq!((r.gc, r.gr), (vec![-0.25, -0.25], vec![0.0, 0.0]));
    let given = LossInputs {
        sft_mean_length: Some(4.0),
        ..with_lengths(inputs(&pc, &z, &z, &z), &lc, &lr)
    };
    let r = run(sft, given);
    assert_eq!(r.losses, [0.5, 2.25]);
    assert_eq!(r.gc, [-0.125, -0.125]);
}

#[test]
fn pair_weights_scale_each_pair_and_sft_by_their_mean() {
    let pc = [-3.0, -7.5, -1.25];
    let pr = [-4.0, -6.0, -1.5];
    let rc = [-3.5, -7.0, -1.0];
    let rr = [-3.8, -6.5, -1.75];
    let (lc, lr) = ([3i64, 7, 2], [4i64, 5, 1]);
    let w = [2.0, 0.0, 0.5];
    let mean_w = 2.5 / 3.0;
    let cfg = cfg_of(
        &[LossType::Sigmoid, LossType::Sft],
        Some(&[0.8, 1.5]),
        |o| o.rpo_alpha = Some(0.25),
    );
    let plain = run(
        cfg.clone(),
        with_lengths(inputs(&pc, &pr, &rc, &rr), &lc, &lr),
    );
    let weighted = LossInputs {
        pair_weights: Some(&w),
        ..with_lengths(inputs(&pc, &pr, &rc, &rr), &lc, &lr)
    };
    let r = run(cfg.clone(), weighted);
    let (p, s) = (plain.summary.unwrap(), r.summary.unwrap());
    let sft = |i: usize| -pc[i] / 4.0; // mean chosen length 12 / 3
    let (mut comps, mut loss) = ([0.0; 3], 0.0);
    for i in 0..3 {
        let sig = (plain.losses[i] - 1.5 * sft(i) - 0.25 * (-pc[i] / lc[i] as f64)) / 0.8;
        let parts = [w[i] * sig, mean_w * sft(i), w[i] * (-pc[i] / lc[i] as f64)];
        let want = 0.8 * parts[0] + 1.5 * parts[1] + 0.25 * parts[2];
        assert!((r.losses[i] - want).abs() < 1e-12, "pair {i}");
        for (c, part) in comps.iter_mut().zip(parts) {
            *c += part / 3.0;
        }
        loss += want / 3.0;
    }
    assert!((s.loss - loss).abs() < 1e-12);
    for (k, (got, want)) in s.components.iter().zip(comps).enumerate() {
        assert!((got - want).abs() < 1e-12, "component {k}");
    }
    assert!((s.components[1] - mean_w * p.components[1]).abs() < 1e-12);
    // a zero weight leaves only the sft term's gradient
    assert!((r.gc[1] - 1.5 * mean_w * (-1.0 / 4.0) / 3.0).abs() < 1e-15);
    assert_eq!(r.gr[1], 0.0);
    check_weighted_gradients(&cfg, [&pc, &pr, &rc, &rr], &lc, &lr, Some(&w));
    let single = cfg_of(&[LossType::Ipo], None, |o| {
        o.f_divergence = FDivergence::AlphaDivergence;
        o.f_alpha_divergence_coef = 0.3;
    });
    check_weighted_gradients(&single, [&pc, &pr, &rc, &rr], &lc, &lr, Some(&w));
}

#[test]
fn per_token_losses_divide_the_score_by_the_length() {
    // u_c = 2 over 4 tokens, u_r = -1 over 2: ipo reads s(2) / 4 - s(-1) / 2.
    let (pc, pr, rc, rr) = ([-1.0], [-4.0], [-3.0], [-3.0]);
    let (lc, lr) = ([4i64], [2i64]);
    let inp = with_lengths(inputs(&pc, &pr, &rc, &rr), &lc, &lr);
    let fkl = |u: f64| 1.0 - (-u).exp();
    let d = fkl(2.0) / 4.0 - fkl(-1.0) / 2.0;
    let cfg = cfg_of(&[LossType::Ipo], None, |o| {
        o.beta = 0.5;
        o.f_divergence = FDivergence::ForwardKl;
    });
    let r = run(cfg, inp);
    assert!((r.losses[0] - (d - 1.0).powi(2)).abs() < 1e-15);
    // d loss / d pi_c = 2 (d - 1) s'(u_c) / 4, s'(u) = e^(-u)
    assert!((r.gc[0] - 2.0 * (d - 1.0) * (-2.0f64).exp() / 4.0).abs() < 1e-15);
    assert!((r.gr[0] + 2.0 * (d - 1.0) * 1.0f64.exp() / 2.0).abs() < 1e-15);
}

#[test]
fn alpha_near_one_is_reverse_kl_and_the_clamp_stays_finite() {
    let pc = [-3.0, -7.5, -1.25];
    let pr = [-4.0, -6.0, -1.5];
    let rc = [-3.5, -7.0, -1.0];
    let rr = [-3.8, -6.5, -1.75];
    let (lc, lr) = ([3i64, 7, 2], [4i64, 5, 1]);
    let inp = with_lengths(inputs(&pc, &pr, &rc, &rr), &lc, &lr);
    let types = [LossType::Sigmoid, LossType::SigmoidNorm];
    let rkl = run(cfg_of(&types, None, |_| {}), inp);
    let near = run(
        cfg_of(&types, None, |o| {
            o.f_divergence = FDivergence::AlphaDivergence;
            o.f_alpha_divergence_coef = 1.0 + 9e-7;
        }),
        inp,
    );
    assert_eq!((rkl.losses, rkl.gc), (near.losses, near.gc));
    // alpha = 2: s(u) = e^u - 1, clamped at u = 80; both sides beyond the clamp.
    let (pc, pr, z) = ([100.0, 100.0], [90.0, 0.0], [0.0, 0.0]);
    let cfg = cfg_of(&[LossType::Sigmoid], None, |o| {
        o.f_divergence = FDivergence::AlphaDivergence;
        o.f_alpha_divergence_coef = 2.0;
    });
    let r = run(cfg, inputs(&pc, &pr, &z, &z));
    assert!((r.losses[0] - std::f64::consts::LN_2).abs() < 1e-15);
    assert_eq!((r.gc[0], r.gr[0]), (0.0, 0.0));
    // only the chosen side beyond it: z = 0.1 (e^80 - e^0), a loss of ~0
    assert!(r.losses[1].is_finite() && r.losses[1] >= 0.0);
    assert_eq!(r.gc[1], 0.0);
    assert!(r.gr[1].is_finite());
}

#[test]
fn new_inputs_are_validated() {
    let (a, l) = ([-1.0, -2.0], [1i64, 2]);
    let base = with_lengths(inputs(&a, &a, &a, &a), &l, &l);
    let sig = cfg_of(&[LossType::Sigmoid], None, |_| {});
    let err = |cfg: &LossConfig, inp| run(cfg.clone(), inp).summary.unwrap_err();
    for (w, index) in [
        (&[1.0, f64::NAN][..], Some(1)),
        (&[-0.5, 1.0][..], Some(0)),
        (&[1.0][..], None),
    ] {
        let e = err(
            &sig,
            LossInputs {
                pair_weights: Some(w),
                ..base
            },
        );
        assert_eq!((e.field.as_str(), e.index), ("pair_weights", index));
    }
    let aot = cfg_of(&[LossType::Aot], None, |_| {});
    let w = [1.0, 1.0];
    let e = err(
        &aot,
        LossInputs {
            pair_weights: Some(&w),
            ..base
        },
    );
    assert_eq!(e.field, "pair_weights");
    assert!(e.message.contains("aot"));
    let sft = cfg_of(&[LossType::Sft], None, |_| {});
    for m in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let e = err(
            &sft,
            LossInputs {
                sft_mean_length: Some(m),
                ..base
            },
        );
        assert_eq!(e.field, "sft_mean_length");
    }
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
