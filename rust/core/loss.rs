//! Fused preference-loss kernels over precomputed sequence log-probs.
//!
//! Per pair `i`, with `u = pi - ref` per side (summed completion log-probs), `v = u / len`,
//! `a = pi / len`, an f-divergence score `s` and `z = beta * (s(u_c) - s(u_r))`, the loss types
//! are those of [`LossType`]; their formulas are documented in `rlox.losses.dpo_loss`. One pass
//! computes the per-pair losses, the gradients of the MEAN loss w.r.t. `pi_c` and `pi_r`, the
//! rewards `beta * u` and the batch metrics. Work is split over rayon chunks; inside a chunk,
//! blocks of pairs go through each weighted loss term in L1/L2-resident scratch.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::errors::{Result, RloxError};
use super::fastmath::Real;
use super::terms::{self, Out, Params};

/// Pairs per rayon task: large enough to amortise scheduling, small enough to balance 2+ cores.
const CHUNK: usize = 1 << 15;

/// Pairs per inner block: the scratch of one block stays in L1/L2.
const BLOCK: usize = 1024;

/// The member of `all` called `name`, else an error on `field` listing the names.
fn parse_name<T: Copy>(
    all: &[T],
    name_of: fn(T) -> &'static str,
    name: &str,
    field: &str,
    what: &str,
) -> Result<T> {
    all.iter()
        .copied()
        .find(|t| name_of(*t) == name)
        .ok_or_else(|| {
            let names: Vec<_> = all.iter().map(|t| name_of(*t)).collect();
            RloxError::value(
                field,
                format!("unknown {what} {name:?}; expected one of {names:?}"),
            )
        })
}

/// A preference loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossType {
    Sigmoid,
    Robust,
    Hinge,
    Ipo,
    ExoPair,
    NcaPair,
    BcoPair,
    SppoHard,
    Aot,
    AotUnpaired,
    ApoZero,
    ApoDown,
    Discopop,
    SigmoidNorm,
    Simpo,
    Cpo,
    Orpo,
    Sft,
}

/// What a loss term reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Basis {
    /// f-divergence scores of the summed log-ratios `u`.
    ScoreU,
    /// f-divergence scores of the per-token log-ratios `v = u / len`.
    ScoreV,
    /// `u` or `pi` directly (no f-divergence).
    Direct,
}

impl LossType {
    pub const ALL: [Self; 18] = [
        Self::Sigmoid,
        Self::Robust,
        Self::Hinge,
        Self::Ipo,
        Self::ExoPair,
        Self::NcaPair,
        Self::BcoPair,
        Self::SppoHard,
        Self::Aot,
        Self::AotUnpaired,
        Self::ApoZero,
        Self::ApoDown,
        Self::Discopop,
        Self::SigmoidNorm,
        Self::Simpo,
        Self::Cpo,
        Self::Orpo,
        Self::Sft,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Sigmoid => "sigmoid",
            Self::Robust => "robust",
            Self::Hinge => "hinge",
            Self::Ipo => "ipo",
            Self::ExoPair => "exo_pair",
            Self::NcaPair => "nca_pair",
            Self::BcoPair => "bco_pair",
            Self::SppoHard => "sppo_hard",
            Self::Aot => "aot",
            Self::AotUnpaired => "aot_unpaired",
            Self::ApoZero => "apo_zero",
            Self::ApoDown => "apo_down",
            Self::Discopop => "discopop",
            Self::SigmoidNorm => "sigmoid_norm",
            Self::Simpo => "simpo",
            Self::Cpo => "cpo",
            Self::Orpo => "orpo",
            Self::Sft => "sft",
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        parse_name(&Self::ALL, Self::name, name, "loss_type", "loss type")
    }

    /// Whether the loss needs completion lengths.
    pub fn needs_lengths(self) -> bool {
        matches!(
            self,
            Self::Ipo | Self::SigmoidNorm | Self::Simpo | Self::Cpo | Self::Orpo | Self::Sft
        )
    }

    /// Whether the loss ignores reference log-probs by definition.
    pub fn reference_free(self) -> bool {
        matches!(self, Self::Simpo | Self::Cpo | Self::Orpo | Self::Sft)
    }

    /// Whether `label_smoothing` changes the loss.
    pub fn uses_label_smoothing(self) -> bool {
        matches!(
            self,
            Self::Sigmoid
                | Self::Robust
                | Self::ExoPair
                | Self::Aot
                | Self::AotUnpaired
                | Self::SigmoidNorm
                | Self::Simpo
                | Self::Cpo
        )
    }

    /// Whether the loss is defined on the f-divergence margin.
    pub fn uses_divergence(self) -> bool {
        self.basis() != Basis::Direct
    }

    fn basis(self) -> Basis {
        match self {
            Self::Sigmoid | Self::Robust | Self::Hinge | Self::ExoPair | Self::Discopop => {
                Basis::ScoreU
            }
            Self::Ipo | Self::SigmoidNorm => Basis::ScoreV,
            _ => Basis::Direct,
        }
    }

    fn sorted(self) -> bool {
        matches!(self, Self::Aot | Self::AotUnpaired)
    }
}

/// The f-divergence whose derivative scores each side (Wang et al. 2023, f-DPO).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FDivergence {
    ReverseKl,
    ForwardKl,
    JsDivergence,
    AlphaDivergence,
}

impl FDivergence {
    pub const ALL: [Self; 4] = [
        Self::ReverseKl,
        Self::ForwardKl,
        Self::JsDivergence,
        Self::AlphaDivergence,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::ReverseKl => "reverse_kl",
            Self::ForwardKl => "forward_kl",
            Self::JsDivergence => "js_divergence",
            Self::AlphaDivergence => "alpha_divergence",
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        parse_name(&Self::ALL, Self::name, name, "f_divergence", "f-divergence")
    }
}

/// Hyper-parameters shared by the loss types (defaults match `rlox.losses.dpo_loss`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossOptions {
    pub beta: f64,
    pub label_smoothing: f64,
    pub f_divergence: FDivergence,
    pub f_alpha_divergence_coef: f64,
    pub reference_free: bool,
    pub simpo_gamma: f64,
    pub cpo_alpha: f64,
    pub orpo_alpha: f64,
    pub rpo_alpha: Option<f64>,
    pub discopop_tau: f64,
    pub bco_delta: Option<f64>,
}

impl Default for LossOptions {
    fn default() -> Self {
        Self {
            beta: 0.1,
            label_smoothing: 0.0,
            f_divergence: FDivergence::ReverseKl,
            f_alpha_divergence_coef: 1.0,
            reference_free: false,
            simpo_gamma: 0.5,
            cpo_alpha: 1.0,
            orpo_alpha: 0.1,
            rpo_alpha: None,
            discopop_tau: 0.05,
            bco_delta: None,
        }
    }
}

/// A validated loss: weighted terms plus options.
#[derive(Debug, Clone, PartialEq)]
pub struct LossConfig {
    pub terms: Vec<(LossType, f64)>,
    pub opts: LossOptions,
}

fn check(field: &str, ok: bool, value: f64, rule: &str) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(RloxError::value(
            field,
            format!("must be {rule}, got {value}"),
        ))
    }
}

impl LossConfig {
    /// Validate the terms (`weights`: one per type, default 1) and options.
    pub fn new(types: &[LossType], weights: Option<&[f64]>, opts: LossOptions) -> Result<Self> {
        if types.is_empty() {
            return Err(RloxError::value(
                "loss_type",
                "needs at least one loss type",
            ));
        }
        for (i, t) in types.iter().enumerate() {
            if types[..i].contains(t) {
                return Err(RloxError::value(
                    "loss_type",
                    format!("{:?} is listed twice", t.name()),
                ));
            }
        }
        let weights = match weights {
            None => vec![1.0; types.len()],
            Some(w) if w.len() != types.len() => {
                return Err(RloxError::value(
                    "loss_weights",
                    format!("has {} weights for {} loss types", w.len(), types.len()),
                ))
            }
            Some(w) => {
                if let Some(i) = w.iter().position(|x| !(x.is_finite() && *x >= 0.0)) {
                    return Err(RloxError::at(
                        "loss_weights",
                        i,
                        format!("must be a finite number >= 0, got {}", w[i]),
                    ));
                }
                w.to_vec()
            }
        };
        let o = &opts;
        check(
            "beta",
            o.beta.is_finite() && o.beta > 0.0,
            o.beta,
            "a finite number > 0",
        )?;
        let eps = o.label_smoothing;
        check(
            "label_smoothing",
            (0.0..0.5).contains(&eps),
            eps,
            "in [0, 0.5)",
        )?;
        let a = o.f_alpha_divergence_coef;
        check(
            "f_alpha_divergence_coef",
            a.is_finite() && a > 0.0,
            a,
            "a finite number > 0",
        )?;
        let g = o.simpo_gamma;
        check("simpo_gamma", g.is_finite(), g, "a finite number")?;
        for (name, v) in [
            ("cpo_alpha", o.cpo_alpha),
            ("orpo_alpha", o.orpo_alpha),
            ("rpo_alpha", o.rpo_alpha.unwrap_or(0.0)),
        ] {
            check(name, v.is_finite() && v >= 0.0, v, "a finite number >= 0")?;
        }
        let tau = o.discopop_tau;
        check(
            "discopop_tau",
            tau.is_finite() && tau > 0.0,
            tau,
            "a finite number > 0",
        )?;
        if let Some(d) = o.bco_delta {
            check("bco_delta", d.is_finite(), d, "a finite number")?;
        }
        if types.contains(&LossType::ExoPair) && eps == 0.0 {
            return Err(RloxError::value(
                "label_smoothing",
                "loss_type \"exo_pair\" needs label_smoothing > 0 (the assumed label-noise rate)",
            ));
        }
        if eps > 0.0 && !types.iter().any(|t| t.uses_label_smoothing()) {
            return Err(RloxError::value(
                "label_smoothing",
                format!(
                    "is {eps} but none of the loss types {:?} uses it",
                    types.iter().map(|t| t.name()).collect::<Vec<_>>()
                ),
            ));
        }
        if o.f_divergence != FDivergence::ReverseKl {
            if let Some(t) = types.iter().find(|t| !t.uses_divergence()) {
                return Err(RloxError::value(
                    "f_divergence",
                    format!(
                        "{:?} applies to margin losses only; loss_type {:?} does not use it",
                        o.f_divergence.name(),
                        t.name()
                    ),
                ));
            }
        }
        if types.iter().any(|t| t.sorted()) && (types.len() > 1 || o.rpo_alpha.is_some()) {
            return Err(RloxError::value(
                "loss_type",
                "\"aot\" and \"aot_unpaired\" sort pairs within the batch and cannot be combined \
                 with other loss types or rpo_alpha",
            ));
        }
        Ok(Self {
            terms: types.iter().copied().zip(weights).collect(),
            opts,
        })
    }

    /// One loss type with `beta` and `label_smoothing`, other options at their defaults.
    pub fn single(loss_type: LossType, beta: f64, label_smoothing: f64) -> Result<Self> {
        Self::new(
            &[loss_type],
            None,
            LossOptions {
                beta,
                label_smoothing,
                ..LossOptions::default()
            },
        )
    }

    /// One term of weight 1 and no rpo term: the term's loss is the loss.
    fn is_single(&self) -> bool {
        self.terms.len() == 1 && self.terms[0].1 == 1.0 && self.opts.rpo_alpha.is_none()
    }

    /// Whether completion lengths are required.
    pub fn needs_lengths(&self) -> bool {
        self.opts.rpo_alpha.is_some() || self.terms.iter().any(|(t, _)| t.needs_lengths())
    }

    /// Whether reference log-probs are required.
    pub fn needs_reference(&self) -> bool {
        !self.opts.reference_free && self.terms.iter().any(|(t, _)| !t.reference_free())
    }

    /// Names of the reported components: each type, then `"rpo"` when `rpo_alpha` is set.
    pub fn component_names(&self) -> Vec<&'static str> {
        let mut names: Vec<_> = self.terms.iter().map(|(t, _)| t.name()).collect();
        if self.opts.rpo_alpha.is_some() {
            names.push("rpo");
        }
        names
    }

    fn needs(&self, basis: Basis) -> bool {
        self.terms.iter().any(|(t, _)| t.basis() == basis)
    }
}

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
}

impl<'a, T> LossInputs<'a, T> {
    fn slice(&self, lo: usize, hi: usize) -> Self {
        Self {
            policy_chosen: &self.policy_chosen[lo..hi],
            policy_rejected: &self.policy_rejected[lo..hi],
            ref_chosen: self.ref_chosen.map(|x| &x[lo..hi]),
            ref_rejected: self.ref_rejected.map(|x| &x[lo..hi]),
            chosen_lengths: self.chosen_lengths.map(|x| &x[lo..hi]),
            rejected_lengths: self.rejected_lengths.map(|x| &x[lo..hi]),
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

#[derive(Default, Clone)]
struct Partial {
    loss: Sum,
    correct: u64,
    chosen_reward: Sum,
    rejected_reward: Sum,
    components: Vec<Sum>,
    non_finite: bool,
}

impl Partial {
    fn new(components: usize) -> Self {
        Self {
            components: vec![Sum::default(); components],
            ..Self::default()
        }
    }

    fn merge(self, o: Self) -> Self {
        Self {
            loss: self.loss.merge(o.loss),
            correct: self.correct + o.correct,
            chosen_reward: self.chosen_reward.merge(o.chosen_reward),
            rejected_reward: self.rejected_reward.merge(o.rejected_reward),
            components: self
                .components
                .iter()
                .zip(&o.components)
                .map(|(a, b)| a.merge(*b))
                .collect(),
            non_finite: self.non_finite | o.non_finite,
        }
    }
}

const NAMES: [&str; 4] = [
    "policy_chosen_logps",
    "policy_rejected_logps",
    "ref_chosen_logps",
    "ref_rejected_logps",
];

fn validate<T: Real>(inp: &LossInputs<'_, T>, cfg: &LossConfig, n: usize) -> Result<()> {
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

fn first_non_finite<T: Real>(inp: &LossInputs<'_, T>) -> Option<RloxError> {
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

/// Split the outputs into chunks of `size` pairs.
fn split_outputs<'a, T>(out: LossOutputs<'a, T>, size: usize) -> Vec<LossOutputs<'a, T>> {
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

/// Kahan-compensated sum of `x` in f64 over independent lanes, so the loop vectorises.
#[inline(always)]
fn lane_sum<T: Real>(x: &[T]) -> Sum {
    if std::mem::size_of::<T>() == 4 {
        // float32 values summed in f64 over one block lose nothing float32 could show; the
        // blocks are then combined with compensation.
        let mut sum = [0.0f64; 8];
        let mut it = x.chunks_exact(8);
        for c in &mut it {
            for k in 0..8 {
                sum[k] += c[k].to_f64();
            }
        }
        let mut total = Sum::default();
        for v in sum {
            total.add(v);
        }
        for v in it.remainder() {
            total.add(v.to_f64());
        }
        return total;
    }
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
    svc: Vec<T>,
    svr: Vec<T>,
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
            svc: v(),
            svr: v(),
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
fn chunk_generic<T: Real>(
    cfg: &LossConfig,
    p: &Params<T>,
    inp: &LossInputs<'_, T>,
    out: LossOutputs<'_, T>,
    inv_n: T,
) -> Partial {
    let mut s = Scratch::new();
    let mut acc = Partial::new(cfg.component_names().len());
    for (b, o) in split_outputs(out, BLOCK).into_iter().enumerate() {
        let lo = b * BLOCK;
        let sub = inp.slice(lo, lo + o.losses.len());
        block(cfg, p, &sub, &mut s, &mut acc, o, inv_n);
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

/// A validated completion length (in `[1, 2^31)`) as a float, through i32 so that the
/// conversion vectorises (AVX2 has no packed i64 -> float conversion).
#[inline(always)]
fn length_of<T: Real>(len: i64) -> T {
    T::from_i32(len as i32)
}

#[inline(always)]
fn inverse_lengths<T: Real>(len: &[i64], il: &mut [T]) {
    let m = il.len();
    let len = &len[..m];
    for i in 0..m {
        il[i] = T::ONE / length_of::<T>(len[i]);
    }
}

#[inline(always)]
fn div_scores<T: Real>(div: FDivergence, alpha: T, u: &[T], s: &mut [T], ds: &mut [T]) {
    match div {
        FDivergence::ReverseKl => unreachable!("the identity score is not materialised"),
        FDivergence::ForwardKl => terms::alpha_scores(T::ONE, u, s, ds),
        FDivergence::AlphaDivergence => terms::alpha_scores(alpha, u, s, ds),
        FDivergence::JsDivergence => terms::js_scores(u, s, ds),
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
    [xc, xr]: [&[T]; 2],
    pi: [&[T]; 2],
    il: [&[T]; 2],
    o: Out<'_, T>,
) {
    match t {
        LossType::Sigmoid | LossType::SigmoidNorm => terms::sigmoid(p, xc, xr, o),
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
        LossType::Sft => terms::nll(pi[0], il[0], o),
        LossType::Aot | LossType::AotUnpaired => unreachable!("sorted losses run separately"),
    }
}

/// Every output of one block of `m <= BLOCK` pairs, and its contribution to the batch sums.
#[inline(always)]
fn block<T: Real>(
    cfg: &LossConfig,
    p: &Params<T>,
    inp: &LossInputs<'_, T>,
    s: &mut Scratch<T>,
    acc: &mut Partial,
    out: LossOutputs<'_, T>,
    inv_n: T,
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
    let identity = div == FDivergence::ReverseKl;
    if !identity && cfg.needs(Basis::ScoreU) {
        div_scores(div, p.alpha, &s.uc[..m], &mut s.sc[..m], &mut s.dsc[..m]);
        div_scores(div, p.alpha, &s.ur[..m], &mut s.sr[..m], &mut s.dsr[..m]);
    }
    if cfg.needs(Basis::ScoreV) {
        let (vc, vr) = (&mut s.vc[..m], &mut s.vr[..m]);
        let (uc, ur, ilc, ilr) = (&s.uc[..m], &s.ur[..m], &s.ilc[..m], &s.ilr[..m]);
        for i in 0..m {
            vc[i] = uc[i] * ilc[i];
            vr[i] = ur[i] * ilr[i];
        }
        if !identity {
            div_scores(div, p.alpha, &s.vc[..m], &mut s.svc[..m], &mut s.dvc[..m]);
            div_scores(div, p.alpha, &s.vr[..m], &mut s.svr[..m], &mut s.dvr[..m]);
            let (dvc, dvr) = (&mut s.dvc[..m], &mut s.dvr[..m]);
            let (ilc, ilr) = (&s.ilc[..m], &s.ilr[..m]);
            for i in 0..m {
                dvc[i] = dvc[i] * ilc[i];
                dvr[i] = dvr[i] * ilr[i];
            }
        }
    }
    let pi = [&pc[..m], &pr[..m]];
    let il = [&s.ilc[..m], &s.ilr[..m]];
    // The inputs a term reads, and the chain-rule factors from its inputs to pi (1 if None).
    macro_rules! basis {
        ($t:expr) => {
            match ($t.basis(), identity) {
                (Basis::ScoreU, false) => ([&s.sc[..], &s.sr], [Some(&s.dsc[..]), Some(&s.dsr)]),
                (Basis::ScoreV, true) => ([&s.vc[..], &s.vr], [Some(&s.ilc[..]), Some(&s.ilr)]),
                (Basis::ScoreV, false) => ([&s.svc[..], &s.svr], [Some(&s.dvc[..]), Some(&s.dvr)]),
                _ => ([&s.uc[..], &s.ur], [None, None]),
            }
        };
    }
    if cfg.is_single() {
        // One term of weight 1: it writes the totals directly.
        let t = cfg.terms[0].0;
        let (x, f): ([&[T]; 2], [Option<&[T]>; 2]) = basis!(t);
        let o = Out {
            comp: &mut s.l[..m],
            dcc: &mut s.gc[..m],
            dcr: &mut s.gr[..m],
        };
        run_term(t, p, x, pi, il, o);
        for (g, f) in [(&mut s.gc, f[0]), (&mut s.gr, f[1])] {
            if let Some(f) = f {
                let (g, f) = (&mut g[..m], &f[..m]);
                for i in 0..m {
                    g[i] = g[i] * f[i];
                }
            }
        }
        write_outputs(p.beta, inp, s, out, inv_n, acc);
        return;
    }
    s.l[..m].fill(T::ZERO);
    s.gc[..m].fill(T::ZERO);
    s.gr[..m].fill(T::ZERO);
    for (k, &(t, w)) in cfg.terms.iter().enumerate() {
        let o = Out {
            comp: &mut s.comp[..m],
            dcc: &mut s.dcc[..m],
            dcr: &mut s.dcr[..m],
        };
        let (x, f): ([&[T]; 2], [Option<&[T]>; 2]) = basis!(t);
        run_term(t, p, x, pi, il, o);
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
    if let Some(a) = cfg.opts.rpo_alpha {
        let o = Out {
            comp: &mut s.comp[..m],
            dcc: &mut s.dcc[..m],
            dcr: &mut s.dcr[..m],
        };
        terms::nll(pc, &s.ilc, o);
        accumulate(
            T::from_f64(a),
            &s.comp[..m],
            [&s.dcc[..], &s.dcr],
            [None, None],
            [&mut s.l[..], &mut s.gc, &mut s.gr],
            m,
        );
        let last = acc.components.len() - 1;
        acc.components[last] = acc.components[last].merge(lane_sum(&s.comp[..m]));
    }
    write_outputs(p.beta, inp, s, out, inv_n, acc);
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

/// `aot` / `aot_unpaired`: the smoothed logistic loss between sorted policy and reference
/// quantities. Per-pair losses come out in sorted order.
fn sorted_loss<T: Real>(
    t: LossType,
    p: &Params<T>,
    inp: &LossInputs<'_, T>,
    out: LossOutputs<'_, T>,
    inv_n: T,
) -> Partial {
    let n = inp.policy_chosen.len();
    let diff = |a: &[T], b: Option<&[T]>| -> Vec<T> {
        match b {
            Some(b) => a.par_iter().zip(b).map(|(x, y)| *x - *y).collect(),
            None => a.to_vec(),
        }
    };
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
    let mut acc = Partial::new(1);
    let (uc, ur) = (
        diff(inp.policy_chosen, inp.ref_chosen),
        diff(inp.policy_rejected, inp.ref_rejected),
    );
    for i in 0..n {
        out.chosen_rewards[i].write(p.beta * uc[i]);
        out.rejected_rewards[i].write(p.beta * ur[i]);
    }
    // SAFETY: written just above.
    let (rc, rr) = unsafe {
        (
            assume_init(out.chosen_rewards),
            assume_init(out.rejected_rewards),
        )
    };
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
        assert_eq!(
            LossConfig::single(LossType::Ipo, 0.0, 0.0)
                .unwrap_err()
                .field,
            "beta"
        );
        assert_eq!(
            LossConfig::single(LossType::Ipo, 0.1, 0.5)
                .unwrap_err()
                .field,
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
    fn options_are_validated() {
        let bad = |types: &[LossType], w: Option<&[f64]>, f: &dyn Fn(&mut LossOptions)| {
            let mut o = LossOptions::default();
            f(&mut o);
            LossConfig::new(types, w, o).unwrap_err().field
        };
        assert_eq!(bad(&[LossType::ExoPair], None, &|_| {}), "label_smoothing");
        assert_eq!(
            bad(&[LossType::Hinge], None, &|o| o.label_smoothing = 0.1),
            "label_smoothing"
        );
        assert_eq!(
            bad(&[LossType::Robust], None, &|o| o.label_smoothing = 0.5),
            "label_smoothing"
        );
        assert_eq!(
            bad(&[LossType::NcaPair], None, &|o| o.f_divergence =
                FDivergence::JsDivergence),
            "f_divergence"
        );
        assert_eq!(
            bad(&[LossType::Aot, LossType::Sigmoid], None, &|_| {}),
            "loss_type"
        );
        assert_eq!(
            bad(&[LossType::Sigmoid, LossType::Sigmoid], None, &|_| {}),
            "loss_type"
        );
        assert_eq!(bad(&[], None, &|_| {}), "loss_type");
        assert_eq!(
            bad(&[LossType::Sigmoid], Some(&[1.0, 2.0]), &|_| {}),
            "loss_weights"
        );
        assert_eq!(
            bad(&[LossType::Sigmoid], Some(&[-1.0]), &|_| {}),
            "loss_weights"
        );
        assert_eq!(
            bad(&[LossType::Discopop], None, &|o| o.discopop_tau = 0.0),
            "discopop_tau"
        );
        assert_eq!(
            bad(&[LossType::Orpo], None, &|o| o.orpo_alpha = f64::NAN),
            "orpo_alpha"
        );
        assert_eq!(
            bad(&[LossType::Sigmoid], None, &|o| o.f_alpha_divergence_coef =
                0.0),
            "f_alpha_divergence_coef"
        );
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
