//! Fused preference-loss kernels over precomputed sequence log-probs.
//!
//! Per pair `i`, with `u = pi - ref` per side (summed completion log-probs), `a = pi / len`, an
//! f-divergence score `s` (TRL 1.16's) and `z = beta * (s(u_c) - s(u_r))`, the loss types are
//! those of [`LossType`]; their formulas are documented in `rlox.losses.dpo_loss`. Optional pair
//! weights multiply each pair's loss (the `sft` term: their batch mean). One pass computes the
//! per-pair losses, the gradients of the MEAN loss w.r.t. `pi_c` and `pi_r`, the rewards
//! `beta * u` and the batch metrics. Work is split over rayon chunks; inside a chunk, blocks of
//! pairs go through each weighted loss term in L1/L2-resident scratch.
//!
//! This module drives the kernel ([`dpo_loss`]). Its parts: `config` (loss types, options and
//! their validation), `arrays` (the input and output arrays, their splitting and checks), `sum`
//! (compensated batch sums), `scores` (f-divergence scores, the `sft` term, pair weights and
//! the batch constants), `block` (one chunk, block by block, through the weighted terms whose
//! per-pair loops are in `core::terms`) and `sorted` (`aot` / `aot_unpaired`).

mod arrays;
mod block;
mod config;
mod scores;
mod sorted;
mod sum;

use rayon::prelude::*;

use arrays::{first_non_finite, split_outputs, validate};
pub use arrays::{LossInputs, LossOutputs};
use block::chunk_generic;
pub use config::{FDivergence, LossConfig, LossOptions, LossType};
use scores::Consts;
pub use scores::{ALPHA_EXP_MAX, ALPHA_IDENTITY_TOL};
use sorted::sorted_loss;
use sum::{Partial, CHUNK};

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
    /// Mean of each component over pairs, in [`LossConfig::component_names`] order: times the
    /// pair weights (as it enters the loss), not times its loss weight.
    pub components: Vec<f64>,
    /// The BCO reward shift used (`bco_pair` only): `bco_delta`, else 0 (TRL 1.16's).
    pub bco_delta: Option<f64>,
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
        .then(|| o.bco_delta.unwrap_or(0.0));
    let p = Params {
        beta: T::from_f64(o.beta),
        eps: T::from_f64(o.label_smoothing),
        smooth: o.label_smoothing > 0.0,
        gamma: T::from_f64(o.simpo_gamma),
        cpo_alpha: T::from_f64(o.cpo_alpha),
        orpo_alpha: T::from_f64(o.orpo_alpha),
        tau: T::from_f64(o.discopop_tau),
        tau_le_one: o.discopop_tau <= 1.0,
        delta: T::from_f64(bco_delta.unwrap_or(0.0)),
    };
    let inv_n = T::from_f64(1.0 / n as f64);
    let total = if cfg.terms[0].0.sorted() {
        if let Some(e) = first_non_finite(&inp) {
            return Err(e);
        }
        sorted_loss(cfg.terms[0].0, &p, &inp, out, inv_n)
    } else {
        let c = Consts::new(cfg, &inp);
        chunked_loss(cfg, &p, &c, &inp, out, inv_n)
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
    c: &Consts<T>,
    inp: &LossInputs<'_, T>,
    out: LossOutputs<'_, T>,
    inv_n: T,
) -> Partial {
    let k = cfg.component_names().len();
    split_outputs(out, CHUNK)
        .into_par_iter()
        .enumerate()
        .map(|(j, o)| {
            let lo = j * CHUNK;
            let sub = inp.slice(lo, lo + o.losses.len());
            chunk_dispatch(cfg, p, c, &sub, o, inv_n)
        })
        .reduce(|| Partial::new(k), Partial::merge)
}

fn chunk_dispatch<T: Real>(
    cfg: &LossConfig,
    p: &Params<T>,
    c: &Consts<T>,
    inp: &LossInputs<'_, T>,
    out: LossOutputs<'_, T>,
    inv_n: T,
) -> Partial {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { chunk_avx2(cfg, p, c, inp, out, inv_n) };
        }
    }
    chunk_generic(cfg, p, c, inp, out, inv_n)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn chunk_avx2<T: Real>(
    cfg: &LossConfig,
    p: &Params<T>,
    c: &Consts<T>,
    inp: &LossInputs<'_, T>,
    out: LossOutputs<'_, T>,
    inv_n: T,
) -> Partial {
    chunk_generic(cfg, p, c, inp, out, inv_n)
}

#[cfg(test)]
mod tests;
