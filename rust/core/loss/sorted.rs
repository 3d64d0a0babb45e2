//! `aot` / `aot_unpaired`: losses between sorted policy and reference quantities.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::arrays::{assume_init, length_of, LossInputs, LossOutputs};
use super::config::LossType;
use super::sum::{lane_sum, Partial, Sum, CHUNK};
use crate::core::fastmath::Real;
use crate::core::terms::{self, Params};

/// Positions of `x` in ascending order; ties keep their original order (a stable argsort).
fn argsort<T: Real>(x: &[T]) -> Vec<usize> {
    let mut keys: Vec<(u64, usize)> = x
        .par_iter()
        .enumerate()
        // `+ 0` turns -0.0 into +0.0 so that the two zeros tie, as they compare equal.
        .map(|(i, &v)| ((v + T::ZERO).order_key(), i))
        .collect();
    keys.par_sort_unstable();
    keys.into_par_iter().map(|(_, i)| i).collect()
}

/// `a - b` elementwise; a copy of `a` without `b`.
fn diff<T: Real>(a: &[T], b: Option<&[T]>) -> Vec<T> {
    match b {
        Some(b) => a.par_iter().zip(b).map(|(x, y)| *x - *y).collect(),
        None => a.to_vec(),
    }
}

/// `aot` / `aot_unpaired`: the smoothed logistic loss between sorted policy and reference
/// quantities. Per-pair losses come out in sorted order.
pub(super) fn sorted_loss<T: Real>(
    t: LossType,
    p: &Params<T>,
    inp: &LossInputs<'_, T>,
    out: LossOutputs<'_, T>,
    inv_n: T,
) -> Partial {
    let n = inp.policy_chosen.len();
    let (x, y) = if t == LossType::Aot {
        let y = match (inp.ref_chosen, inp.ref_rejected) {
            (Some(c), Some(r)) => diff(c, Some(r)),
            _ => vec![T::ZERO; n],
        };
        (diff(inp.policy_chosen, Some(inp.policy_rejected)), y)
    } else {
        (
            diff(inp.policy_chosen, inp.ref_chosen),
            diff(inp.policy_rejected, inp.ref_rejected),
        )
    };
    let (px, py) = rayon::join(|| argsort(&x), || argsort(&y));
    let mut g = vec![T::ZERO; n];
    out.losses
        .par_chunks_mut(CHUNK)
        .zip(g.par_chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(c, (l, gk))| {
            for j in 0..l.len() {
                let k = c * CHUNK + j;
                let z = p.beta * (x[px[k]] - y[py[k]]);
                let (loss, dz) = if p.smooth {
                    terms::smoothed::<T, true>(z, p.eps)
                } else {
                    terms::smoothed::<T, false>(z, p.eps)
                };
                l[j].write(loss);
                gk[j] = p.beta * dz * inv_n;
            }
        });
    let rejected_order = if t == LossType::Aot { &px } else { &py };
    for k in 0..n {
        out.grad_chosen[px[k]].write(g[k]);
        out.grad_rejected[rejected_order[k]].write(-g[k]);
    }
    // SAFETY: every element was written above (px and py are permutations of 0..n).
    let (losses, gc, gr) = unsafe {
        (
            assume_init(out.losses),
            assume_init(out.grad_chosen),
            assume_init(out.grad_rejected),
        )
    };
    for (avg, grad, len) in [
        (out.grad_chosen_avg, gc, inp.chosen_lengths),
        (out.grad_rejected_avg, gr, inp.rejected_lengths),
    ] {
        if let (Some(avg), Some(len)) = (avg, len) {
            for i in 0..n {
                avg[i].write(grad[i] * length_of::<T>(len[i]));
            }
        }
    }
    rewards_and_sums(
        p.beta,
        inp,
        losses,
        out.chosen_rewards,
        out.rejected_rewards,
    )
}

/// Write the rewards `beta * u` and sum the batch metrics of the (written) per-pair `losses`.
fn rewards_and_sums<T: Real>(
    beta: T,
    inp: &LossInputs<'_, T>,
    losses: &[T],
    chosen_rewards: &mut [MaybeUninit<T>],
    rejected_rewards: &mut [MaybeUninit<T>],
) -> Partial {
    let n = inp.policy_chosen.len();
    let mut acc = Partial::new(1);
    let (uc, ur) = (
        diff(inp.policy_chosen, inp.ref_chosen),
        diff(inp.policy_rejected, inp.ref_rejected),
    );
    for i in 0..n {
        chosen_rewards[i].write(beta * uc[i]);
        rejected_rewards[i].write(beta * ur[i]);
    }
    // SAFETY: written just above.
    let (rc, rr) = unsafe { (assume_init(chosen_rewards), assume_init(rejected_rewards)) };
    acc.loss = losses
        .par_chunks(CHUNK)
        .map(lane_sum)
        .reduce(Sum::default, Sum::merge);
    acc.components[0] = acc.loss;
    acc.chosen_reward = rc
        .par_chunks(CHUNK)
        .map(lane_sum)
        .reduce(Sum::default, Sum::merge);
    acc.rejected_reward = rr
        .par_chunks(CHUNK)
        .map(lane_sum)
        .reduce(Sum::default, Sum::merge);
    acc.correct = rc.iter().zip(rr).map(|(a, b)| (a > b) as u64).sum();
    acc
}
