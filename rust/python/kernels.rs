//! `dpo_loss` and `collate_pairs`: numpy in (zero-copy), numpy out (no copy), GIL released.
use numpy::{
    Element, PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2,
    PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::convert::{
    collated_dict, dtype_name, float_arg, int64_array, int_arg, ndarray, str_arg,
};
use super::errors::to_py;
use crate::core::collate::{collate_pairs as core_collate, IdMatrix};
use crate::core::errors::RloxError;
use crate::core::fastmath::Real;
use crate::core::loss::{
    dpo_loss as core_loss, FDivergence, LossConfig, LossInputs, LossOptions, LossOutputs, LossType,
};

enum Floats<'py> {
    F32(PyReadonlyArray1<'py, f32>),
    F64(PyReadonlyArray1<'py, f64>),
}

fn float_array<'py>(name: &str, obj: &Bound<'py, PyAny>) -> PyResult<Floats<'py>> {
    let arr = ndarray(name, obj, 1)?;
    if let Ok(a) = arr.cast::<PyArray1<f32>>() {
        return Ok(Floats::F32(a.readonly()));
    }
    if let Ok(a) = arr.cast::<PyArray1<f64>>() {
        return Ok(Floats::F64(a.readonly()));
    }
    Err(to_py(RloxError::type_error(
        name,
        format!("must be float32 or float64, got dtype {}", dtype_name(&arr)),
    )))
}

/// Results of `dpo_loss`. Arrays have shape `(B,)` and the dtype of the inputs.
#[pyclass(module = "rlox._rlox", frozen)]
pub struct DPOLossOutput {
    /// Mean loss over pairs.
    #[pyo3(get)]
    loss: f64,
    /// `(B,)` per-pair losses (in sorted order for `aot` / `aot_unpaired`).
    #[pyo3(get)]
    losses: Py<PyAny>,
    /// `(B,)` d(mean loss)/d(policy_chosen_logps).
    #[pyo3(get)]
    grad_chosen: Py<PyAny>,
    /// `(B,)` d(mean loss)/d(policy_rejected_logps).
    #[pyo3(get)]
    grad_rejected: Py<PyAny>,
    /// The int64 completion lengths, when given (for the per-token gradients).
    lengths: Option<(Py<PyAny>, Py<PyAny>)>,
    /// `(B,)` beta * (policy_chosen_logps - ref_chosen_logps).
    #[pyo3(get)]
    chosen_rewards: Py<PyAny>,
    /// `(B,)` beta * (policy_rejected_logps - ref_rejected_logps).
    #[pyo3(get)]
    rejected_rewards: Py<PyAny>,
    /// Fraction of pairs whose chosen reward exceeds the rejected reward.
    #[pyo3(get)]
    reward_accuracy: f64,
    /// Mean of chosen minus rejected reward.
    #[pyo3(get)]
    reward_margin: f64,
    /// Mean chosen reward.
    #[pyo3(get)]
    chosen_reward: f64,
    /// Mean rejected reward.
    #[pyo3(get)]
    rejected_reward: f64,
    /// Mean of each loss component over pairs by name (`"rpo"` for the rpo_alpha term): times
    /// the pair weights, not times its loss weight.
    #[pyo3(get)]
    component_losses: Py<PyDict>,
    /// The reward shift `bco_pair` used (`bco_delta`, else 0.0 as in TRL 1.16); None without
    /// `bco_pair`.
    #[pyo3(get)]
    bco_delta: Option<f64>,
}

/// `len * grad` elementwise: the gradient w.r.t. a per-token average `pi / len`.
fn per_token<'py, T: Real + Element>(
    py: Python<'py>,
    grad: &Bound<'py, PyArray1<T>>,
    len: &[i64],
) -> Bound<'py, PyAny> {
    let g = grad.readonly();
    let g = g.as_slice().expect("contiguous");
    let v: Vec<T> = g
        .iter()
        .zip(len)
        .map(|(&g, &l)| g * T::from_i64(l))
        .collect();
    PyArray1::from_vec(py, v).into_any()
}

impl DPOLossOutput {
    fn per_token_grad<'py>(
        &self,
        py: Python<'py>,
        grad: &Py<PyAny>,
        side: usize,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        let Some(lengths) = &self.lengths else {
            return Ok(None);
        };
        let len = if side == 0 { &lengths.0 } else { &lengths.1 };
        let len = len.bind(py).cast::<PyArray1<i64>>()?.readonly();
        let len = len.as_slice().expect("contiguous");
        let grad = grad.bind(py);
        Ok(Some(match grad.cast::<PyArray1<f32>>() {
            Ok(g) => per_token(py, g, len),
            Err(_) => per_token(py, grad.cast::<PyArray1<f64>>()?, len),
        }))
    }
}

#[pymethods]
impl DPOLossOutput {
    /// `(B,)` d(mean loss)/d(policy_chosen_logps / chosen_lengths) (computed when read); None
    /// without lengths.
    #[getter]
    fn grad_chosen_avg<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        self.per_token_grad(py, &self.grad_chosen, 0)
    }

    /// `(B,)` d(mean loss)/d(policy_rejected_logps / rejected_lengths) (computed when read);
    /// None without lengths.
    #[getter]
    fn grad_rejected_avg<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        self.per_token_grad(py, &self.grad_rejected, 1)
    }

    fn __repr__(&self) -> String {
        format!(
            "DPOLossOutput(loss={:.6}, reward_accuracy={:.4}, reward_margin={:.6})",
            self.loss, self.reward_accuracy, self.reward_margin
        )
    }
}

fn as_slice<'a, T: Element>(a: Option<&'a PyReadonlyArray1<'_, T>>) -> Option<&'a [T]> {
    a.map(|a| a.as_slice().expect("contiguous"))
}

/// The kernel over `arrays` (the four log-prob arrays, then the pair weights) and `lengths`.
fn run_loss<'py, T: Real + Element>(
    py: Python<'py>,
    cfg: &LossConfig,
    arrays: [Option<&PyReadonlyArray1<'py, T>>; 5],
    lengths: [Option<&PyReadonlyArray1<'py, i64>>; 2],
    sft_mean_length: Option<f64>,
) -> PyResult<DPOLossOutput> {
    let lens = lengths.map(|l| l.map(|a| a.as_slice().expect("contiguous")));
    let n = arrays[0].expect("policy").len();
    let count = 5;
    // Outputs are Rust vectors handed to numpy without a copy. (numpy's own allocator asks
    // for transparent huge pages on large arrays, whose synchronous compaction made fresh
    // outputs several times slower to fault in than plain pages.)
    let mut vecs: Vec<Vec<T>> = (0..count).map(|_| Vec::with_capacity(n)).collect();
    let mut it = vecs.iter_mut().map(|v| &mut v.spare_capacity_mut()[..n]);
    let mut next = || it.next();
    let outputs = LossOutputs {
        losses: next().expect("five outputs"),
        grad_chosen: next().expect("five outputs"),
        grad_rejected: next().expect("five outputs"),
        chosen_rewards: next().expect("five outputs"),
        rejected_rewards: next().expect("five outputs"),
        grad_chosen_avg: None,
        grad_rejected_avg: None,
    };
    let inputs = LossInputs {
        policy_chosen: as_slice(arrays[0]).expect("policy"),
        policy_rejected: as_slice(arrays[1]).expect("policy"),
        ref_chosen: as_slice(arrays[2]),
        ref_rejected: as_slice(arrays[3]),
        chosen_lengths: lens[0],
        rejected_lengths: lens[1],
        pair_weights: as_slice(arrays[4]),
        sft_mean_length,
    };
    let summary = py
        .detach(|| core_loss(cfg, &inputs, outputs))
        .map_err(to_py)?;
    for v in &mut vecs {
        // SAFETY: the kernel succeeded, so it wrote all n elements of every output.
        unsafe { v.set_len(n) };
    }
    let components = PyDict::new(py);
    for (name, v) in cfg.component_names().into_iter().zip(&summary.components) {
        components.set_item(name, v)?;
    }
    let mut it = vecs
        .into_iter()
        .map(|v| PyArray1::from_vec(py, v).into_any().unbind());
    let mut next = || it.next();
    Ok(DPOLossOutput {
        loss: summary.loss,
        losses: next().expect("five outputs"),
        grad_chosen: next().expect("five outputs"),
        grad_rejected: next().expect("five outputs"),
        chosen_rewards: next().expect("five outputs"),
        rejected_rewards: next().expect("five outputs"),
        lengths: match lengths {
            [Some(c), Some(r)] => {
                let (c, r): (&Bound<'py, PyArray1<i64>>, &Bound<'py, PyArray1<i64>>) = (c, r);
                Some((c.clone().into_any().unbind(), r.clone().into_any().unbind()))
            }
            _ => None,
        },
        reward_accuracy: summary.reward_accuracy,
        reward_margin: summary.reward_margin,
        chosen_reward: summary.chosen_reward,
        rejected_reward: summary.rejected_reward,
        component_losses: components.unbind(),
        bco_delta: summary.bco_delta,
    })
}

fn optional<'a, 'py>(obj: Option<&'a Bound<'py, PyAny>>) -> Option<&'a Bound<'py, PyAny>> {
    obj.filter(|o| !o.is_none())
}

/// Names of the loss options, in the order [`LossArgs`] holds them.
const LOSS_KEYS: [&str; 13] = [
    "loss_type",
    "loss_weights",
    "beta",
    "label_smoothing",
    "f_divergence",
    "f_alpha_divergence_coef",
    "reference_free",
    "simpo_gamma",
    "cpo_alpha",
    "orpo_alpha",
    "rpo_alpha",
    "discopop_tau",
    "bco_delta",
];

/// Loss options as passed from Python, by keyword, in [`LOSS_KEYS`] order.
struct LossArgs<'a, 'py>([Option<&'a Bound<'py, PyAny>>; 13]);

impl<'py> LossArgs<'_, 'py> {
    fn get(&self, key: &str) -> Option<&Bound<'py, PyAny>> {
        let i = LOSS_KEYS
            .iter()
            .position(|k| *k == key)
            .expect("a loss option");
        optional(self.0[i])
    }

    /// Parse and validate into a [`LossConfig`]; every error names its option.
    fn config(&self) -> PyResult<LossConfig> {
        let d = LossOptions::default();
        let types = match self.get("loss_type") {
            None => vec![LossType::Sigmoid],
            Some(o) if o.is_instance_of::<pyo3::types::PyString>() => {
                vec![LossType::parse(&str_arg("loss_type", o)?).map_err(to_py)?]
            }
            Some(o) => {
                let items = o.try_iter().map_err(|_| {
                    to_py(RloxError::type_error(
                        "loss_type",
                        "expected a str or a list of str",
                    ))
                })?;
                let mut types = Vec::new();
                for item in items {
                    types.push(LossType::parse(&str_arg("loss_type", &item?)?).map_err(to_py)?);
                }
                types
            }
        };
        let weights = match self.get("loss_weights") {
            None => None,
            Some(o) => {
                let items = o.try_iter().map_err(|_| {
                    to_py(RloxError::type_error(
                        "loss_weights",
                        "expected a list of numbers",
                    ))
                })?;
                let mut w = Vec::new();
                for item in items {
                    w.push(float_arg("loss_weights", Some(&item?), 0.0)?);
                }
                Some(w)
            }
        };
        let reference_free = match self.get("reference_free") {
            None => false,
            Some(o) => o
                .cast::<pyo3::types::PyBool>()
                .map_err(|_| to_py(RloxError::type_error("reference_free", "expected a bool")))?
                .is_true(),
        };
        let f_divergence = match self.get("f_divergence") {
            None => d.f_divergence,
            Some(o) => FDivergence::parse(&str_arg("f_divergence", o)?).map_err(to_py)?,
        };
        let opt_float = |name: &str, o: Option<&Bound<'_, PyAny>>| -> PyResult<Option<f64>> {
            optional(o)
                .map(|o| float_arg(name, Some(o), 0.0))
                .transpose()
        };
        let float = |name: &str, o: Option<&Bound<'_, PyAny>>, default: f64| -> PyResult<f64> {
            float_arg(name, optional(o), default)
        };
        let opts = LossOptions {
            beta: float("beta", self.get("beta"), d.beta)?,
            label_smoothing: float(
                "label_smoothing",
                self.get("label_smoothing"),
                d.label_smoothing,
            )?,
            f_divergence,
            f_alpha_divergence_coef: float(
                "f_alpha_divergence_coef",
                self.get("f_alpha_divergence_coef"),
                d.f_alpha_divergence_coef,
            )?,
            reference_free,
            simpo_gamma: float("simpo_gamma", self.get("simpo_gamma"), d.simpo_gamma)?,
            cpo_alpha: float("cpo_alpha", self.get("cpo_alpha"), d.cpo_alpha)?,
            orpo_alpha: float("orpo_alpha", self.get("orpo_alpha"), d.orpo_alpha)?,
            rpo_alpha: opt_float("rpo_alpha", self.get("rpo_alpha"))?,
            discopop_tau: float("discopop_tau", self.get("discopop_tau"), d.discopop_tau)?,
            bco_delta: opt_float("bco_delta", self.get("bco_delta"))?,
        };
        LossConfig::new(&types, weights.as_deref(), opts).map_err(to_py)
    }
}

/// Fused preference loss, gradients, rewards and metrics over `(B,)` log-prob arrays.
#[pyfunction]
#[pyo3(
    signature = (
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None,
        ref_rejected_logps=None, *, beta=None, loss_type=None, loss_weights=None,
        label_smoothing=None, chosen_lengths=None, rejected_lengths=None, f_divergence=None,
        f_alpha_divergence_coef=None, reference_free=None, simpo_gamma=None, cpo_alpha=None,
        orpo_alpha=None, rpo_alpha=None, discopop_tau=None, bco_delta=None, pair_weights=None,
        sft_mean_length=None
    ),
    text_signature = "(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None, \
        ref_rejected_logps=None, *, beta=0.1, loss_type='sigmoid', loss_weights=None, \
        label_smoothing=0.0, chosen_lengths=None, rejected_lengths=None, \
        f_divergence='reverse_kl', f_alpha_divergence_coef=0.5, reference_free=False, \
        simpo_gamma=0.5, cpo_alpha=1.0, orpo_alpha=0.1, rpo_alpha=None, discopop_tau=0.05, \
        bco_delta=None, pair_weights=None, sft_mean_length=None)"
)]
#[allow(clippy::too_many_arguments)]
fn dpo_loss<'py>(
    py: Python<'py>,
    policy_chosen_logps: &Bound<'py, PyAny>,
    policy_rejected_logps: &Bound<'py, PyAny>,
    ref_chosen_logps: Option<&Bound<'py, PyAny>>,
    ref_rejected_logps: Option<&Bound<'py, PyAny>>,
    beta: Option<&Bound<'py, PyAny>>,
    loss_type: Option<&Bound<'py, PyAny>>,
    loss_weights: Option<&Bound<'py, PyAny>>,
    label_smoothing: Option<&Bound<'py, PyAny>>,
    chosen_lengths: Option<&Bound<'py, PyAny>>,
    rejected_lengths: Option<&Bound<'py, PyAny>>,
    f_divergence: Option<&Bound<'py, PyAny>>,
    f_alpha_divergence_coef: Option<&Bound<'py, PyAny>>,
    reference_free: Option<&Bound<'py, PyAny>>,
    simpo_gamma: Option<&Bound<'py, PyAny>>,
    cpo_alpha: Option<&Bound<'py, PyAny>>,
    orpo_alpha: Option<&Bound<'py, PyAny>>,
    rpo_alpha: Option<&Bound<'py, PyAny>>,
    discopop_tau: Option<&Bound<'py, PyAny>>,
    bco_delta: Option<&Bound<'py, PyAny>>,
    pair_weights: Option<&Bound<'py, PyAny>>,
    sft_mean_length: Option<&Bound<'py, PyAny>>,
) -> PyResult<DPOLossOutput> {
    let cfg = LossArgs([
        loss_type,
        loss_weights,
        beta,
        label_smoothing,
        f_divergence,
        f_alpha_divergence_coef,
        reference_free,
        simpo_gamma,
        cpo_alpha,
        orpo_alpha,
        rpo_alpha,
        discopop_tau,
        bco_delta,
    ])
    .config()?;
    let sft_mean_length = optional(sft_mean_length)
        .map(|o| float_arg("sft_mean_length", Some(o), 0.0))
        .transpose()?;
    let objs = [
        Some(policy_chosen_logps),
        Some(policy_rejected_logps),
        optional(ref_chosen_logps),
        optional(ref_rejected_logps),
        optional(pair_weights),
    ];
    let mut arrays = Vec::with_capacity(LOSS_INPUTS.len());
    for (name, obj) in LOSS_INPUTS.iter().zip(objs) {
        arrays.push(obj.map(|o| float_array(name, o)).transpose()?);
    }
    let mut lens = Vec::with_capacity(2);
    for (name, obj) in [
        ("chosen_lengths", chosen_lengths),
        ("rejected_lengths", rejected_lengths),
    ] {
        lens.push(match optional(obj) {
            None => None,
            Some(o) => Some(
                int64_array(name, o, 1)?
                    .cast_into::<PyArray1<i64>>()?
                    .readonly(),
            ),
        });
    }
    let lens_ref = [lens[0].as_ref(), lens[1].as_ref()];
    let first_is_32 = matches!(arrays[0], Some(Floats::F32(_)));
    if let Some(k) = arrays.iter().position(|a| {
        a.as_ref()
            .is_some_and(|a| matches!(a, Floats::F32(_)) != first_is_32)
    }) {
        return Err(to_py(RloxError::type_error(
            LOSS_INPUTS[k],
            format!(
                "dtype differs from policy_chosen_logps ({}); pass all log-probs (and \
                 pair_weights) as float32 or all as float64",
                if first_is_32 { "float32" } else { "float64" }
            ),
        )));
    }
    if first_is_32 {
        let a = arrays.iter().map(|a| match a {
            Some(Floats::F32(x)) => Some(x),
            _ => None,
        });
        run_loss(py, &cfg, collect(a), lens_ref, sft_mean_length)
    } else {
        let a = arrays.iter().map(|a| match a {
            Some(Floats::F64(x)) => Some(x),
            _ => None,
        });
        run_loss(py, &cfg, collect(a), lens_ref, sft_mean_length)
    }
}

/// The float array inputs of `dpo_loss`, in the order `run_loss` takes them.
const LOSS_INPUTS: [&str; 5] = [
    "policy_chosen_logps",
    "policy_rejected_logps",
    "ref_chosen_logps",
    "ref_rejected_logps",
    "pair_weights",
];

fn collect<X>(mut it: impl Iterator<Item = X>) -> [X; 5] {
    std::array::from_fn(|_| it.next().expect("five inputs"))
}

/// Validate loss options (the keywords of `dpo_loss`) without computing anything; returns
/// what the loss needs.
#[pyfunction]
#[pyo3(signature = (**options))]
fn check_loss_options<'py>(
    py: Python<'py>,
    options: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyDict>> {
    let mut values: [Option<Bound<'py, PyAny>>; 13] = Default::default();
    for (key, value) in options.into_iter().flatten() {
        let key: String = key.extract()?;
        let Some(i) = LOSS_KEYS.iter().position(|k| *k == key) else {
            return Err(to_py(RloxError::type_error(&key, "unexpected loss option")));
        };
        values[i] = Some(value);
    }
    let cfg = LossArgs(values.each_ref().map(Option::as_ref)).config()?;
    let out = PyDict::new(py);
    let terms: Vec<(&str, f64)> = cfg.terms.iter().map(|(t, w)| (t.name(), *w)).collect();
    out.set_item("terms", terms)?;
    out.set_item("components", cfg.component_names())?;
    out.set_item("needs_lengths", cfg.needs_lengths())?;
    out.set_item("needs_reference", cfg.needs_reference())?;
    Ok(out)
}

fn id_matrix<'py>(name: &str, obj: &Bound<'py, PyAny>) -> PyResult<PyReadonlyArray2<'py, i64>> {
    Ok(int64_array(name, obj, 2)?
        .cast_into::<PyArray2<i64>>()?
        .readonly())
}

/// Re-pack `(B, P)`, `(B, C)`, `(B, R)` id matrices into a `(2B, L)` batch with masks and plan.
#[pyfunction]
#[pyo3(signature = (prompt, chosen, rejected, *, pad_token_id=None, vocab_size=None))]
fn collate_pairs<'py>(
    py: Python<'py>,
    prompt: &Bound<'py, PyAny>,
    chosen: &Bound<'py, PyAny>,
    rejected: &Bound<'py, PyAny>,
    pad_token_id: Option<&Bound<'py, PyAny>>,
    vocab_size: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let pad_token_id = int_arg("pad_token_id", pad_token_id)?;
    let vocab_size = int_arg("vocab_size", vocab_size)?;
    let arrays = [
        ("prompt", id_matrix("prompt", prompt)?),
        ("chosen", id_matrix("chosen", chosen)?),
        ("rejected", id_matrix("rejected", rejected)?),
    ];
    let mats = arrays
        .iter()
        .map(|(name, a)| {
            let shape = a.shape();
            IdMatrix::new(name, a.as_slice().expect("contiguous"), shape[0], shape[1])
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(to_py)?;
    let batch = py
        .detach(|| core_collate(mats[0], mats[1], mats[2], pad_token_id, vocab_size))
        .map_err(to_py)?;
    collated_dict(py, batch)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<DPOLossOutput>()?;
    m.add_function(wrap_pyfunction!(dpo_loss, m)?)?;
    m.add_function(wrap_pyfunction!(check_loss_options, m)?)?;
    m.add_function(wrap_pyfunction!(collate_pairs, m)?)?;
    Ok(())
}
