//! The kernel's input and output arrays: their types, splitting, and validation.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::config::{LossConfig, LossType};
use super::sum::CHUNK;
use crate::core::errors::{Result, RloxError};
use crate::core::fastmath::Real;

/// Read-only inputs, all of length B.
#[derive(Debug, Clone, Copy)]
pub struct LossInputs<'a, T> {
    pub policy_chosen: &'a [T],
    pub policy_rejected: &'a [T],
    /// Reference log-probs; `None` reads as 0 (reference-free losses).
    pub ref_chosen: Option<&'a [T]>,
    pub ref_rejected: Option<&'a [T]>,
    /// Completion lengths in tokens; required by length-normalised losses.
    pub chosen_lengths: Option<&'a [i64]>,
    pub rejected_lengths: Option<&'a [i64]>,
    /// Per-pair loss weights (WPO), finite and >= 0, constants for the gradient.
    pub pair_weights: Option<&'a [T]>,
    /// The length the `sft` term divides the chosen log-probs by (default: the batch's mean
    /// chosen length, so that the mean over pairs is the batch token mean).
    pub sft_mean_length: Option<f64>,
}

impl<'a, T> LossInputs<'a, T> {
    /// Pairs `lo..hi`.
    pub(super) fn slice(&self, lo: usize, hi: usize) -> Self {
        Self {
            policy_chosen: &self.policy_chosen[lo..hi],
            policy_rejected: &self.policy_rejected[lo..hi],
            ref_chosen: self.ref_chosen.map(|x| &x[lo..hi]),
            ref_rejected: self.ref_rejected.map(|x| &x[lo..hi]),
            chosen_lengths: self.chosen_lengths.map(|x| &x[lo..hi]),
            rejected_lengths: self.rejected_lengths.map(|x| &x[lo..hi]),
            pair_weights: self.pair_weights.map(|x| &x[lo..hi]),
            sft_mean_length: self.sft_mean_length,
        }
    }
}

/// Output buffers, all of length B. They may start uninitialised; on success every element
/// has been written. `grad_*_avg` (d mean loss / d (pi / len)) are filled when given; they need
/// completion lengths.
pub struct LossOutputs<'a, T> {
    pub losses: &'a mut [MaybeUninit<T>],
    pub grad_chosen: &'a mut [MaybeUninit<T>],
    pub grad_rejected: &'a mut [MaybeUninit<T>],
    pub chosen_rewards: &'a mut [MaybeUninit<T>],
    pub rejected_rewards: &'a mut [MaybeUninit<T>],
    pub grad_chosen_avg: Option<&'a mut [MaybeUninit<T>]>,
    pub grad_rejected_avg: Option<&'a mut [MaybeUninit<T>]>,
}

/// Split the outputs into chunks of `size` pairs.
pub(super) fn split_outputs<'a, T>(
    out: LossOutputs<'a, T>,
    size: usize,
) -> Vec<LossOutputs<'a, T>> {
    let mut gc = out.grad_chosen.chunks_mut(size);
    let mut gr = out.grad_rejected.chunks_mut(size);
    let mut rc = out.chosen_rewards.chunks_mut(size);
    let mut rr = out.rejected_rewards.chunks_mut(size);
    let mut gca = out.grad_chosen_avg.map(|s| s.chunks_mut(size));
    let mut gra = out.grad_rejected_avg.map(|s| s.chunks_mut(size));
    out.losses
        .chunks_mut(size)
        .map(|losses| LossOutputs {
            losses,
            grad_chosen: gc.next().expect("same length"),
            grad_rejected: gr.next().expect("same length"),
            chosen_rewards: rc.next().expect("same length"),
            rejected_rewards: rr.next().expect("same length"),
            grad_chosen_avg: gca.as_mut().map(|it| it.next().expect("same length")),
            grad_rejected_avg: gra.as_mut().map(|it| it.next().expect("same length")),
        })
        .collect()
}

/// # Safety
/// Every element of `x` must be initialised.
#[inline(always)]
pub(super) unsafe fn assume_init<T>(x: &[MaybeUninit<T>]) -> &[T] {
    // SAFETY: MaybeUninit<T> has the layout of T and the caller guarantees initialisation.
    unsafe { &*(x as *const [MaybeUninit<T>] as *const [T]) }
}

/// A validated completion length (in `[1, 2^31)`) as a float, through i32 so that the
/// conversion vectorises (AVX2 has no packed i64 -> float conversion).
#[inline(always)]
pub(super) fn length_of<T: Real>(len: i64) -> T {
    T::from_i32(len as i32)
}

const NAMES: [&str; 4] = [
    "policy_chosen_logps",
    "policy_rejected_logps",
    "ref_chosen_logps",
    "ref_rejected_logps",
];

/// Check the inputs against each other and against `cfg`; every error names its argument.
pub(super) fn validate<T: Real>(inp: &LossInputs<'_, T>, cfg: &LossConfig, n: usize) -> Result<()> {
    let named = [
        (NAMES[1], Some(inp.policy_rejected.len())),
        (NAMES[2], inp.ref_chosen.map(<[T]>::len)),
        (NAMES[3], inp.ref_rejected.map(<[T]>::len)),
    ];
    for (name, len) in named {
        if let Some(len) = len.filter(|&l| l != n) {
            return Err(RloxError::value(
                name,
                format!("has length {len} but policy_chosen_logps has length {n}"),
            ));
        }
    }
    if n == 0 {
        return Err(RloxError::value(
            NAMES[0],
            "is empty; need at least one pair",
        ));
    }
    let first_ref_free = || {
        cfg.terms
            .iter()
            .find(|(t, _)| !t.reference_free())
            .map_or("", |(t, _)| t.name())
    };
    for (name, r) in [(NAMES[2], inp.ref_chosen), (NAMES[3], inp.ref_rejected)] {
        if r.is_none()
            && (cfg.needs_reference() || inp.ref_chosen.is_some() || inp.ref_rejected.is_some())
        {
            return Err(RloxError::value(
                name,
                format!(
                    "is missing; loss_type {:?} compares the policy with a reference (pass both \
                     reference log-probs, or reference_free=True)",
                    first_ref_free()
                ),
            ));
        }
    }
    check_lengths(inp, cfg, n)?;
    check_weights(inp, cfg, n)?;
    if cfg.terms.iter().any(|(t, _)| *t == LossType::Orpo) {
        for (name, x) in [
            (NAMES[0], inp.policy_chosen),
            (NAMES[1], inp.policy_rejected),
        ] {
            if let Some(i) = first_where(x, |v: &T| v.is_finite() && *v >= T::ZERO) {
                return Err(RloxError::at(
                    name,
                    i,
                    format!(
                        "loss_type \"orpo\" needs log-probs < 0 (the odds of probability 1 are \
                         infinite), got {}",
                        x[i].to_f64()
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Both completion-length arrays or neither (required when a term averages per token), each of
/// `n` lengths in `[1, 2^31)`.
fn check_lengths<T>(inp: &LossInputs<'_, T>, cfg: &LossConfig, n: usize) -> Result<()> {
    let needs = cfg.needs_lengths();
    for (name, lens) in [
        ("chosen_lengths", inp.chosen_lengths),
        ("rejected_lengths", inp.rejected_lengths),
    ] {
        match lens {
            None if needs => {
                let why = cfg
                    .terms
                    .iter()
                    .find(|(t, _)| t.needs_lengths())
                    .map_or("rpo_alpha".to_owned(), |(t, _)| {
                        format!("loss_type {:?}", t.name())
                    });
                return Err(RloxError::value(
                    name,
                    format!("{why} averages log-probs per token and needs completion lengths"),
                ));
            }
            None => {}
            Some(l) => {
                if l.len() != n {
                    return Err(RloxError::value(
                        name,
                        format!("has length {} but there are {n} pairs", l.len()),
                    ));
                }
                let bad = |&x: &i64| x <= 0 || x > i64::from(i32::MAX);
                if let Some(i) = first_where(l, bad) {
                    return Err(RloxError::at(
                        name,
                        i,
                        format!("completion length must be in [1, 2^31), got {}", l[i]),
                    ));
                }
            }
        }
    }
    if inp.chosen_lengths.is_some() != inp.rejected_lengths.is_some() {
        let missing = if inp.chosen_lengths.is_none() {
            "chosen_lengths"
        } else {
            "rejected_lengths"
        };
        return Err(RloxError::value(
            missing,
            "is missing; pass both completion-length arrays or neither",
        ));
    }
    Ok(())
}

/// `pair_weights`: `n` finite weights >= 0, not with the sorting types; `sft_mean_length`:
/// finite and > 0.
fn check_weights<T: Real>(inp: &LossInputs<'_, T>, cfg: &LossConfig, n: usize) -> Result<()> {
    if let Some(m) = inp.sft_mean_length {
        if !(m.is_finite() && m > 0.0) {
            return Err(RloxError::value(
                "sft_mean_length",
                format!("must be a finite number > 0, got {m}"),
            ));
        }
    }
    let Some(w) = inp.pair_weights else {
        return Ok(());
    };
    if let Some((t, _)) = cfg.terms.iter().find(|(t, _)| t.sorted()) {
        return Err(RloxError::value(
            "pair_weights",
            format!(
                "loss_type {:?} sorts pairs within the batch, so per-pair weights would be \
                 misaligned; pass pair_weights=None",
                t.name()
            ),
        ));
    }
    if w.len() != n {
        return Err(RloxError::value(
            "pair_weights",
            format!("has length {} but there are {n} pairs", w.len()),
        ));
    }
    if let Some(i) = first_where(w, |x: &T| !(x.is_finite() && *x >= T::ZERO)) {
        return Err(RloxError::at(
            "pair_weights",
            i,
            format!("must be a finite number >= 0, got {}", w[i].to_f64()),
        ));
    }
    Ok(())
}

/// Index of the first element where `bad` holds: a branch-free parallel scan, then a
/// sequential search only when something was found.
fn first_where<X: Sync>(x: &[X], bad: impl Fn(&X) -> bool + Sync) -> Option<usize> {
    let any = x
        .par_chunks(CHUNK)
        .any(|c| c.iter().fold(false, |acc, v| acc | bad(v)));
    if any {
        x.iter().position(bad)
    } else {
        None
    }
}

fn inputs_named<'a, T>(inp: &LossInputs<'a, T>) -> [(&'static str, Option<&'a [T]>); 4] {
    [
        (NAMES[0], Some(inp.policy_chosen)),
        (NAMES[1], Some(inp.policy_rejected)),
        (NAMES[2], inp.ref_chosen),
        (NAMES[3], inp.ref_rejected),
    ]
}

pub(super) fn first_non_finite<T: Real>(inp: &LossInputs<'_, T>) -> Option<RloxError> {
    let mut best: Option<(usize, &str)> = None;
    for (name, a) in inputs_named(inp) {
        let Some(a) = a else { continue };
        if let Some(i) = a.par_iter().position_first(|x| !x.is_finite()) {
            if best.is_none_or(|(b, _)| i < b) {
                best = Some((i, name));
            }
        }
    }
    best.map(|(i, name)| RloxError::at(name, i, "log-prob is NaN or infinite"))
}
