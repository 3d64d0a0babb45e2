//! Loss options and their validation: the loss types, f-divergences, hyper-parameters and the
//! checked [`LossConfig`] the kernel runs.

use crate::core::errors::{Result, RloxError};

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
    Cdpo,
    Simpo,
    Cpo,
    Orpo,
    Sft,
}

/// What a loss term reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Basis {
    /// f-divergence scores of the summed log-ratios `u`.
    ScoreU,
    /// f-divergence scores of the summed log-ratios divided by the length, `s(u) / len`.
    ScoreV,
    /// `u` or `pi` directly (no f-divergence).
    Direct,
}

impl LossType {
    pub const ALL: [Self; 19] = [
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
        Self::Cdpo,
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
            Self::Cdpo => "cdpo",
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

    /// Whether `label_smoothing` changes the loss: TRL 1.16's `robust`, `exo_pair`, `aot` and
    /// `aot_unpaired` (its `sigmoid` and `sigmoid_norm` ignore it), and rlox's `cdpo`, `simpo`
    /// and `cpo`.
    pub fn uses_label_smoothing(self) -> bool {
        matches!(
            self,
            Self::Robust
                | Self::ExoPair
                | Self::Aot
                | Self::AotUnpaired
                | Self::Cdpo
                | Self::Simpo
                | Self::Cpo
        )
    }

    /// Whether the loss is defined on the f-divergence margin.
    pub fn uses_divergence(self) -> bool {
        self.basis() != Basis::Direct
    }

    /// Whether a non-default `f_divergence` may be combined with the type: the margin losses
    /// (TRL 1.16's and `cdpo`) and `sft` (which ignores it), as TRL 1.16 allows.
    pub fn takes_f_divergence(self) -> bool {
        self.uses_divergence() || self == Self::Sft
    }

    pub(super) fn basis(self) -> Basis {
        match self {
            Self::Sigmoid
            | Self::Robust
            | Self::Hinge
            | Self::ExoPair
            | Self::Discopop
            | Self::Cdpo => Basis::ScoreU,
            Self::Ipo | Self::SigmoidNorm => Basis::ScoreV,
            _ => Basis::Direct,
        }
    }

    /// Whether the loss sorts pairs within the batch (run by `sorted_loss`).
    pub(super) fn sorted(self) -> bool {
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
            f_alpha_divergence_coef: 0.5,
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

/// The weight of each of `types` (one per type, default 1), after checking the type list.
fn term_weights(types: &[LossType], weights: Option<&[f64]>) -> Result<Vec<f64>> {
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
    Ok(match weights {
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
    })
}

/// The range of each option on its own.
fn check_ranges(o: &LossOptions) -> Result<()> {
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
        a.is_finite(),
        a,
        "a finite number",
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
    Ok(())
}

/// The options that only make sense with some loss types, and the types that combine.
fn check_combination(types: &[LossType], o: &LossOptions) -> Result<()> {
    let eps = o.label_smoothing;
    if types.contains(&LossType::ExoPair) && eps == 0.0 {
        return Err(RloxError::value(
            "label_smoothing",
            "loss_type \"exo_pair\" needs label_smoothing > 0 (the assumed label-noise rate)",
        ));
    }
    if eps > 0.0 && !types.iter().any(|t| t.uses_label_smoothing()) {
        let users: Vec<_> = LossType::ALL
            .iter()
            .filter(|t| t.uses_label_smoothing())
            .map(|t| t.name())
            .collect();
        return Err(RloxError::value(
            "label_smoothing",
            format!(
                "is {eps} but none of the loss types {:?} uses it; only {users:?} do (sigmoid \
                 and sigmoid_norm ignore it, as in TRL 1.16); for conservative DPO use \
                 loss_type=\"cdpo\"",
                types.iter().map(|t| t.name()).collect::<Vec<_>>()
            ),
        ));
    }
    if o.f_divergence != FDivergence::ReverseKl {
        if let Some(t) = types.iter().find(|t| !t.takes_f_divergence()) {
            let allowed: Vec<_> = LossType::ALL
                .iter()
                .filter(|t| t.takes_f_divergence())
                .map(|t| t.name())
                .collect();
            return Err(RloxError::value(
                "f_divergence",
                format!(
                    "{:?} is supported only with the loss types {allowed:?}; loss_type {:?} \
                     needs the default \"reverse_kl\"",
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
    Ok(())
}

impl LossConfig {
    /// Validate the terms (`weights`: one per type, default 1) and options.
    pub fn new(types: &[LossType], weights: Option<&[f64]>, opts: LossOptions) -> Result<Self> {
        let weights = term_weights(types, weights)?;
        check_ranges(&opts)?;
        check_combination(types, &opts)?;
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
    pub(super) fn is_single(&self) -> bool {
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

    /// Whether any term reads `basis`.
    pub(super) fn needs(&self, basis: Basis) -> bool {
        self.terms.iter().any(|(t, _)| t.basis() == basis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f_divergence_types_are_trls() {
        let takes: Vec<_> = LossType::ALL
            .iter()
            .filter(|t| t.takes_f_divergence())
            .map(|t| t.name())
            .collect();
        // TRL 1.16's, plus rlox's cdpo (smoothed sigmoid)
        let want = [
            "sigmoid",
            "robust",
            "hinge",
            "ipo",
            "exo_pair",
            "discopop",
            "sigmoid_norm",
            "cdpo",
            "sft",
        ];
        assert_eq!(takes, want);
        let mut o = LossOptions {
            f_divergence: FDivergence::ForwardKl,
            ..LossOptions::default()
        };
        assert!(LossConfig::new(&[LossType::Sigmoid, LossType::Sft], None, o).is_ok());
        o.f_divergence = FDivergence::AlphaDivergence;
        let e = LossConfig::new(&[LossType::Ipo, LossType::Cpo], None, o).unwrap_err();
        assert_eq!(e.field, "f_divergence");
        assert!(e.message.contains("\"cpo\""), "{}", e.message);
        assert_eq!(LossOptions::default().f_alpha_divergence_coef, 0.5);
    }

    #[test]
    fn label_smoothing_users_are_trls_and_rloxs() {
        let users: Vec<_> = LossType::ALL
            .iter()
            .filter(|t| t.uses_label_smoothing())
            .map(|t| t.name())
            .collect();
        let want = [
            "robust",
            "exo_pair",
            "aot",
            "aot_unpaired",
            "cdpo",
            "simpo",
            "cpo",
        ];
        assert_eq!(users, want);
        let smooth = LossOptions {
            label_smoothing: 0.1,
            ..LossOptions::default()
        };
        for t in [LossType::Sigmoid, LossType::SigmoidNorm] {
            let e = LossConfig::new(&[t], None, smooth).unwrap_err();
            assert_eq!(e.field, "label_smoothing");
            assert!(e.message.contains("\"cdpo\""), "{}", e.message);
            for u in want {
                assert!(e.message.contains(&format!("{u:?}")), "{}", e.message);
            }
            // with a type that uses it, sigmoid / sigmoid_norm ignore it (as TRL)
            assert!(LossConfig::new(&[LossType::Robust, t], None, smooth).is_ok());
        }
        assert!(LossConfig::new(&[LossType::Cdpo], None, smooth).is_ok());
    }

    #[test]
    fn errors_name_the_option() {
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
        for t in [LossType::Sigmoid, LossType::SigmoidNorm] {
            assert_eq!(
                bad(&[t], None, &|o| o.label_smoothing = 0.1),
                "label_smoothing"
            );
        }
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
            bad(&[LossType::Sigmoid, LossType::Simpo], None, &|o| o
                .f_divergence =
                FDivergence::AlphaDivergence),
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
                f64::INFINITY),
            "f_alpha_divergence_coef"
        );
    }
}
