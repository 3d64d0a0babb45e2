//! Fused DPO loss kernels over precomputed sequence log-probs.
//!
//! Per pair `i`, with `u_c = pi_c - ref_c` and `u_r = pi_r - ref_r` (summed completion log-probs):
//! - `sigmoid`: `z = beta * (u_c - u_r)`, loss `-(1-eps) log sigma(z) - eps log sigma(-z)`.
//! - `hinge`:   loss `relu(1 - beta * (u_c - u_r))`.
//! - `ipo`:     `d = u_c/|y_c| - u_r/|y_r|`, loss `(d - 1/(2 beta))^2`.
//!
//! One pass computes the per-pair losses, the gradients of the MEAN loss w.r.t. `pi_c` and
//! `pi_r`, the rewards `beta * u` and the batch metrics. Work is split over rayon chunks.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::errors::{Result, RloxError};
use super::fastmath::Real;

/// Pairs per rayon task: large enough to amortise scheduling, small enough to balance 2+ cores.
const CHUNK: usize = 1 << 15;

/// The preference loss to optimise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossType {
    Sigmoid,
    Hinge,
    Ipo,
}

impl LossType {
    pub const NAMES: [&'static str; 3] = ["sigmoid", "hinge", "ipo"];

    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "sigmoid" => Ok(Self::Sigmoid),
            "hinge" => Ok(Self::Hinge),
            "ipo" => Ok(Self::Ipo),
            other => Err(RloxError::value(
                "loss_type",
                format!(
                    "unknown loss type {other:?}; expected one of {:?}",
                    Self::NAMES
                ),
            )),
        }
    }

    /// Whether the loss needs completion lengths.
    pub fn needs_lengths(self) -> bool {
        matches!(self, Self::Ipo)
    }
}

/// Hyper-parameters of a loss evaluation.
#[derive(Debug, Clone, Copy)]
pub struct LossConfig {
    pub loss_type: LossType,
    pub beta: f64,
    pub label_smoothing: f64,
}

impl LossConfig {
    pub fn new(loss_type: LossType, beta: f64, label_smoothing: f64) -> Result<Self> {
        if !(beta.is_finite() && beta > 0.0) {
            return Err(RloxError::value(
                "beta",
                format!("must be a finite number > 0, got {beta}"),
            ));
        }
        if !(0.0..0.5).contains(&label_smoothing) {
            return Err(RloxError::value(
                "label_smoothing",
                format!("must be in [0, 0.5), got {label_smoothing}"),
            ));
        }
        Ok(Self {
            loss_type,
            beta,
            label_smoothing,
        })
    }
}

/// Read-only inputs, all of length B.
#[derive(Debug, Clone, Copy)]
pub struct LossInputs<'a, T> {
    pub policy_chosen: &'a [T],
    pub policy_rejected: &'a [T],
    pub ref_chosen: &'a [T],
    pub ref_rejected: &'a [T],
    /// Completion lengths in tokens; required by length-normalised losses.
    pub chosen_lengths: Option<&'a [i64]>,
    pub rejected_lengths: Option<&'a [i64]>,
}

/// Output buffers, all of length B. They may start uninitialised; on success every element
/// has been written.
pub struct LossOutputs<'a, T> {
    pub losses: &'a mut [MaybeUninit<T>],
    pub grad_chosen: &'a mut [MaybeUninit<T>],
    pub grad_rejected: &'a mut [MaybeUninit<T>],
    pub chosen_rewards: &'a mut [MaybeUninit<T>],
    pub rejected_rewards: &'a mut [MaybeUninit<T>],
}

/// Batch-level results (means over pairs), accumulated in f64.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LossSummary {
    pub loss: f64,
    pub reward_accuracy: f64,
    pub reward_margin: f64,
    pub chosen_reward: f64,
    pub rejected_reward: f64,
}

/// A compensated (Neumaier) f64 sum: `hi + lo` carries the rounding error of each addition, so
/// batch means stay within about one ulp however many pairs are summed.
#[derive(Default, Clone, Copy, Debug)]
struct Sum {
    hi: f64,
    lo: f64,
}

impl Sum {
    #[inline(always)]
    fn add(&mut self, x: f64) {
        let t = self.hi + x;
        self.lo += if self.hi.abs() >= x.abs() {
            (self.hi - t) + x
        } else {
            (x - t) + self.hi
        };
        self.hi = t;
    }

    fn merge(mut self, o: Self) -> Self {
        self.add(o.hi);
        self.lo += o.lo;
        self
    }

    fn minus(mut self, o: Self) -> Self {
        self.add(-o.hi);
        self.lo -= o.lo;
        self
    }

    fn value(self) -> f64 {
        self.hi + self.lo
    }
}

#[derive(Default, Clone, Copy)]
struct Partial {
    loss: Sum,
    correct: u64,
    chosen_reward: Sum,
    rejected_reward: Sum,
    non_finite: bool,
}

impl Partial {
    fn merge(self, o: Self) -> Self {
        Self {
            loss: self.loss.merge(o.loss),
            correct: self.correct + o.correct,
            chosen_reward: self.chosen_reward.merge(o.chosen_reward),
            rejected_reward: self.rejected_reward.merge(o.rejected_reward),
            non_finite: self.non_finite | o.non_finite,
        }
    }
}

fn validate<T: Real>(inp: &LossInputs<'_, T>, cfg: &LossConfig, n: usize) -> Result<()> {
    let named = [
        ("policy_rejected_logps", inp.policy_rejected.len()),
        ("ref_chosen_logps", inp.ref_chosen.len()),
        ("ref_rejected_logps", inp.ref_rejected.len()),
    ];
    for (name, len) in named {
        if len != n {
            return Err(RloxError::value(
                name,
                format!("has length {len} but policy_chosen_logps has length {n}"),
            ));
        }
    }
    if n == 0 {
        return Err(RloxError::value(
            "policy_chosen_logps",
            "is empty; need at least one pair",
        ));
    }
    let lengths = [
        ("chosen_lengths", inp.chosen_lengths),
        ("rejected_lengths", inp.rejected_lengths),
    ];
    for (name, lens) in lengths {
        match lens {
            None if cfg.loss_type.needs_lengths() => {
                return Err(RloxError::value(
                    name,
                    format!(
                        "loss_type {:?} averages log-probs per token and needs completion lengths",
                        cfg.loss_type
                    ),
                ))
            }
            None => {}
            Some(l) => {
                if l.len() != n {
                    return Err(RloxError::value(
                        name,
                        format!("has length {} but there are {n} pairs", l.len()),
                    ));
                }
                if let Some(i) = l.iter().position(|&x| x <= 0) {
                    return Err(RloxError::at(
                        name,
                        i,
                        format!("completion length must be >= 1, got {}", l[i]),
                    ));
                }
            }
        }
    }
    Ok(())
}

fn first_non_finite<T: Real>(inp: &LossInputs<'_, T>) -> RloxError {
    let arrays = [
        ("policy_chosen_logps", inp.policy_chosen),
        ("policy_rejected_logps", inp.policy_rejected),
        ("ref_chosen_logps", inp.ref_chosen),
        ("ref_rejected_logps", inp.ref_rejected),
    ];
    let mut best: Option<(usize, &str)> = None;
    for (name, a) in arrays {
        if let Some(i) = a.iter().position(|x| !x.is_finite()) {
            if best.is_none_or(|(b, _)| i < b) {
                best = Some((i, name));
            }
        }
    }
    let (i, name) = best.expect("a non-finite value was flagged");
    RloxError::at(name, i, "log-prob is NaN or infinite")
}

/// Evaluate the loss, its gradients, rewards and metrics for B pairs.
///
/// `grad_*` are d(mean loss)/d(policy log-prob); the gradients w.r.t. the reference log-probs
/// are their negatives.
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

    let jobs: Vec<_> = out
        .losses
        .chunks_mut(CHUNK)
        .zip(out.grad_chosen.chunks_mut(CHUNK))
        .zip(out.grad_rejected.chunks_mut(CHUNK))
        .zip(out.chosen_rewards.chunks_mut(CHUNK))
        .zip(out.rejected_rewards.chunks_mut(CHUNK))
        .enumerate()
        .collect();
    let total = jobs
        .into_par_iter()
        .map(|(k, ((((l, gc), gr), rc), rr))| {
            let lo = k * CHUNK;
            let hi = lo + l.len();
            let sub = LossInputs {
                policy_chosen: &inp.policy_chosen[lo..hi],
                policy_rejected: &inp.policy_rejected[lo..hi],
                ref_chosen: &inp.ref_chosen[lo..hi],
                ref_rejected: &inp.ref_rejected[lo..hi],
                chosen_lengths: inp.chosen_lengths.map(|x| &x[lo..hi]),
                rejected_lengths: inp.rejected_lengths.map(|x| &x[lo..hi]),
            };
            let o = LossOutputs {
                losses: l,
                grad_chosen: gc,
                grad_rejected: gr,
                chosen_rewards: rc,
                rejected_rewards: rr,
            };
            chunk_dispatch(cfg, n, &sub, o)
        })
        .reduce(Partial::default, Partial::merge);

    if total.non_finite {
        return Err(first_non_finite(inp));
    }
    let nf = n as f64;
    Ok(LossSummary {
        loss: total.loss.value() / nf,
        reward_accuracy: total.correct as f64 / nf,
        reward_margin: total.chosen_reward.minus(total.rejected_reward).value() / nf,
        chosen_reward: total.chosen_reward.value() / nf,
        rejected_reward: total.rejected_reward.value() / nf,
    })
}

fn chunk_dispatch<T: Real>(
    cfg: &LossConfig,
    n: usize,
    inp: &LossInputs<'_, T>,
    out: LossOutputs<'_, T>,
) -> Partial {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { chunk_avx2(cfg, n, inp, out) };
        }
    }
    chunk_generic(cfg, n, inp, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn chunk_avx2<T: Real>(
    cfg: &LossConfig,
    n: usize,
    inp: &LossInputs<'_, T>,
    out: LossOutputs<'_, T>,
) -> Partial {
    chunk_generic(cfg, n, inp, out)
}

/// Per-pair loss and d(loss_i)/d(delta_i) for one loss type; `delta` is the log-ratio margin.
#[inline(always)]
fn sigmoid_terms<T: Real, const SMOOTH: bool>(beta: T, eps: T, delta: T) -> (T, T) {
    let z = beta * delta;
    let e = T::exp_nonpos(-z.abs());
    let l = T::log1p_unit(e);
    let pos = z >= T::ZERO;
    // softplus(z) = max(z, 0) + log1p(exp(-|z|)); -log sigma(z) = softplus(-z).
    let relu_z = if pos { z } else { T::ZERO };
    let relu_neg = if pos { T::ZERO } else { -z };
    let inv = T::ONE / (T::ONE + e);
    let sig_z = if pos { inv } else { e * inv };
    let sig_neg = if pos { e * inv } else { inv };
    if SMOOTH {
        let loss = (T::ONE - eps) * (relu_neg + l) + eps * (relu_z + l);
        let dz = eps * sig_z - (T::ONE - eps) * sig_neg;
        (loss, dz * beta)
    } else {
        // Without smoothing the eps terms are dropped, not multiplied by 0 (0 * inf = NaN).
        (relu_neg + l, -sig_neg * beta)
    }
}

/// Kahan-compensated sum of `x` in f64 over independent lanes, so the loop vectorises.
#[inline(always)]
fn lane_sum<T: Real>(x: &[T]) -> Sum {
    let mut sum = [0.0f64; 8];
    let mut comp = [0.0f64; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for k in 0..8 {
            let y = c[k].to_f64() - comp[k];
            let t = sum[k] + y;
            comp[k] = (t - sum[k]) - y;
            sum[k] = t;
        }
    }
    let mut total = Sum::default();
    for k in 0..8 {
        total.add(sum[k]);
        total.add(-comp[k]);
    }
    for v in it.remainder() {
        total.add(v.to_f64());
    }
    total
}

/// # Safety
/// Every element of `x` must be initialised.
#[inline(always)]
unsafe fn assume_init<T>(x: &[MaybeUninit<T>]) -> &[T] {
    // SAFETY: MaybeUninit<T> has the layout of T and the caller guarantees initialisation.
    unsafe { &*(x as *const [MaybeUninit<T>] as *const [T]) }
}

/// Elements per inner block: outputs are written, then reduced while still in L1/L2.
const BLOCK: usize = 2048;

#[inline(always)]
fn chunk_generic<T: Real>(
    cfg: &LossConfig,
    n: usize,
    inp: &LossInputs<'_, T>,
    out: LossOutputs<'_, T>,
) -> Partial {
    let mut acc = Partial::default();
    let m = out.losses.len();
    let mut lo = 0;
    while lo < m {
        let hi = (lo + BLOCK).min(m);
        let losses = &mut out.losses[lo..hi];
        let gc = &mut out.grad_chosen[lo..hi];
        let gr = &mut out.grad_rejected[lo..hi];
        let rc = &mut out.chosen_rewards[lo..hi];
        let rr = &mut out.rejected_rewards[lo..hi];
        let finite = block_kernel(
            cfg,
            n,
            &inp.policy_chosen[lo..hi],
            &inp.policy_rejected[lo..hi],
            &inp.ref_chosen[lo..hi],
            &inp.ref_rejected[lo..hi],
            inp.chosen_lengths.map(|x| &x[lo..hi]),
            inp.rejected_lengths.map(|x| &x[lo..hi]),
            [losses, gc, gr, rc, rr],
        );
        // SAFETY: `block_kernel` wrote every element of these ranges.
        let (losses, rc, rr) = unsafe {
            (
                assume_init(&out.losses[lo..hi]),
                assume_init(&out.chosen_rewards[lo..hi]),
                assume_init(&out.rejected_rewards[lo..hi]),
            )
        };
        acc.loss = acc.loss.merge(lane_sum(losses));
        acc.chosen_reward = acc.chosen_reward.merge(lane_sum(rc));
        acc.rejected_reward = acc.rejected_reward.merge(lane_sum(rr));
        acc.correct += rc.iter().zip(rr).map(|(a, b)| (a > b) as u64).sum::<u64>();
        acc.non_finite |= !finite;
        lo = hi;
    }
    acc
}

/// Fill the five outputs of one block; returns whether all inputs were finite.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn block_kernel<T: Real>(
    cfg: &LossConfig,
    n: usize,
    pc: &[T],
    pr: &[T],
    rfc: &[T],
    rfr: &[T],
    lc: Option<&[i64]>,
    lr: Option<&[i64]>,
    out: [&mut [MaybeUninit<T>]; 5],
) -> bool {
    let [losses, gc, gr, rc, rr] = out;
    let m = losses.len();
    let (pc, pr, rfc, rfr) = (&pc[..m], &pr[..m], &rfc[..m], &rfr[..m]);
    let (gc, gr, rc, rr) = (&mut gc[..m], &mut gr[..m], &mut rc[..m], &mut rr[..m]);
    let beta = T::from_f64(cfg.beta);
    let eps = T::from_f64(cfg.label_smoothing);
    let inv_n = T::from_f64(1.0 / n as f64);
    let mut finite = true;
    match cfg.loss_type {
        LossType::Sigmoid => {
            let smooth = cfg.label_smoothing > 0.0;
            for i in 0..m {
                let uc = pc[i] - rfc[i];
                let ur = pr[i] - rfr[i];
                let (loss, dd) = if smooth {
                    sigmoid_terms::<T, true>(beta, eps, uc - ur)
                } else {
                    sigmoid_terms::<T, false>(beta, eps, uc - ur)
                };
                let g = dd * inv_n;
                losses[i].write(loss);
                gc[i].write(g);
                gr[i].write(-g);
                rc[i].write(beta * uc);
                rr[i].write(beta * ur);
            }
        }
        LossType::Hinge => {
            for i in 0..m {
                let uc = pc[i] - rfc[i];
                let ur = pr[i] - rfr[i];
                let h = T::ONE - beta * (uc - ur);
                let active = h > T::ZERO;
                let g = if active { -beta * inv_n } else { T::ZERO };
                losses[i].write(if active { h } else { T::ZERO });
                gc[i].write(g);
                gr[i].write(-g);
                rc[i].write(beta * uc);
                rr[i].write(beta * ur);
            }
        }
        LossType::Ipo => {
            let (lc, lr) = (&lc.expect("validated")[..m], &lr.expect("validated")[..m]);
            let target = T::from_f64(0.5 / cfg.beta);
            let two = T::from_f64(2.0);
            for i in 0..m {
                let uc = pc[i] - rfc[i];
                let ur = pr[i] - rfr[i];
                let ilc = T::ONE / T::from_i64(lc[i]);
                let ilr = T::ONE / T::from_i64(lr[i]);
                let d = uc * ilc - ur * ilr - target;
                let g = two * d * inv_n;
                losses[i].write(d * d);
                gc[i].write(g * ilc);
                gr[i].write(-(g * ilr));
                rc[i].write(beta * uc);
                rr[i].write(beta * ur);
            }
        }
    }
    for i in 0..m {
        finite &= pc[i].is_finite() & pr[i].is_finite() & rfc[i].is_finite() & rfr[i].is_finite();
    }
    finite
}

#[cfg(test)]
mod tests {
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
            ref_chosen: rc,
            ref_rejected: rr,
            chosen_lengths: None,
            rejected_lengths: None,
        }
    }

    #[test]
    fn sigmoid_at_init_is_ln2() {
        let v = [-3.0, -7.5];
        let cfg = LossConfig::new(LossType::Sigmoid, 0.1, 0.0).unwrap();
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
            LossConfig::new(LossType::Sigmoid, 0.5, 0.0).unwrap(),
            inputs(&pc, &pr, &rc, &rr),
        );
        let want = (1.0f64 + (-1.5f64).exp()).ln(); // 0.201413
        assert!((sig.losses[0] - want).abs() < 1e-12);
        assert!((sig.rc[0] - 1.0).abs() < 1e-15 && (sig.rr[0] + 0.5).abs() < 1e-15);
        assert_eq!(sig.summary.unwrap().reward_accuracy, 1.0);
        let smooth = run(
            LossConfig::new(LossType::Sigmoid, 0.5, 0.2).unwrap(),
            inputs(&pc, &pr, &rc, &rr),
        );
        let want_s = 0.8 * want + 0.2 * (1.0f64 + 1.5f64.exp()).ln();
        assert!((smooth.losses[0] - want_s).abs() < 1e-12);
        let hinge = run(
            LossConfig::new(LossType::Hinge, 0.5, 0.0).unwrap(),
            inputs(&pc, &pr, &rc, &rr),
        );
        assert_eq!(hinge.losses[0], 0.0);
        assert_eq!(hinge.gc[0], 0.0);
        let hinge2 = run(
            LossConfig::new(LossType::Hinge, 0.1, 0.0).unwrap(),
            inputs(&pc, &pr, &rc, &rr),
        );
        assert!((hinge2.losses[0] - 0.7).abs() < 1e-12);
        assert!((hinge2.gc[0] + 0.1).abs() < 1e-15);
        // ipo: lengths 4 and 2 -> d = 2/4 - (-1)/2 = 1.0; target 1/(2*0.5) = 1 -> loss 0.
        let (lc, lr) = ([4i64], [2i64]);
        let mut inp = inputs(&pc, &pr, &rc, &rr);
        inp.chosen_lengths = Some(&lc);
        inp.rejected_lengths = Some(&lr);
        let ipo = run(LossConfig::new(LossType::Ipo, 0.5, 0.0).unwrap(), inp);
        assert!(ipo.losses[0].abs() < 1e-15);
        let ipo2 = run(LossConfig::new(LossType::Ipo, 0.25, 0.0).unwrap(), inp);
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
            LossConfig::new(LossType::Sigmoid, 1.0, 0.1).unwrap(),
            inputs(&pc, &z, &z, &z),
        );
        assert!(r.losses.iter().all(|x| x.is_finite()));
        assert!((r.losses[0] - 0.1 * 1e4).abs() < 1e-9);
        assert!((r.losses[1] - 0.9 * 1e4).abs() < 1e-9);
        let pc32 = [1e4f32, -1e4];
        let z32 = [0.0f32; 2];
        let r32 = run(
            LossConfig::new(LossType::Sigmoid, 1.0, 0.0).unwrap(),
            LossInputs {
                policy_chosen: &pc32,
                policy_rejected: &z32,
                ref_chosen: &z32,
                ref_rejected: &z32,
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
        let cfg = LossConfig::new(LossType::Sigmoid, 0.1, 0.0).unwrap();
        let e = run(cfg, inputs(&a, &b, &a, &a)).summary.unwrap_err();
        assert_eq!(e.field, "policy_rejected_logps");
        let e = run(cfg, inputs(&a, &a, &a, &bad)).summary.unwrap_err();
        assert_eq!((e.field.as_str(), e.index), ("ref_rejected_logps", Some(1)));
        let ipo = LossConfig::new(LossType::Ipo, 0.1, 0.0).unwrap();
        let e = run(ipo, inputs(&a, &a, &a, &a)).summary.unwrap_err();
        assert_eq!(e.field, "chosen_lengths");
        assert_eq!(
            LossConfig::new(LossType::Ipo, 0.0, 0.0).unwrap_err().field,
            "beta"
        );
        assert_eq!(
            LossConfig::new(LossType::Ipo, 0.1, 0.5).unwrap_err().field,
            "label_smoothing"
        );
        assert_eq!(LossType::parse("dpo").unwrap_err().field, "loss_type");
    }

    #[test]
    fn chunked_sum_matches_serial() {
        let n = 3 * CHUNK + 17;
        let pc: Vec<f64> = (0..n).map(|i| -((i % 97) as f64) * 0.37).collect();
        let pr: Vec<f64> = (0..n).map(|i| -((i % 89) as f64) * 0.41).collect();
        let rc: Vec<f64> = (0..n).map(|i| -((i % 83) as f64) * 0.39).collect();
        let rr: Vec<f64> = (0..n).map(|i| -((i % 79) as f64) * 0.4).collect();
        let cfg = LossConfig::new(LossType::Sigmoid, 0.3, 0.0).unwrap();
        let r = run(cfg, inputs(&pc, &pr, &rc, &rr));
        let s = r.summary.unwrap();
        let mean = r.losses.iter().sum::<f64>() / n as f64;
        assert!((s.loss - mean).abs() < 1e-12);
        let acc = (0..n).filter(|&i| r.rc[i] > r.rr[i]).count() as f64 / n as f64;
        assert_eq!(s.reward_accuracy, acc);
    }
}
