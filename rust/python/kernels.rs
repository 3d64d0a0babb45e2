//! `dpo_loss` and `collate_pairs`: numpy in (zero-copy), numpy out (no copy), GIL released.

use std::mem::MaybeUninit;

use numpy::npyffi::NPY_ARRAY_ALIGNED;
use numpy::{
    Element, PyArray1, PyArray2, PyArrayDescrMethods, PyArrayMethods, PyReadonlyArray1,
    PyReadonlyArray2, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::errors::to_py;
use crate::core::collate::{collate_pairs as core_collate, IdMatrix};
use crate::core::errors::RloxError;
use crate::core::fastmath::Real;
use crate::core::loss::{dpo_loss as core_loss, LossConfig, LossInputs, LossOutputs, LossType};

/// `obj` as a C-contiguous numpy array with `ndim` dimensions (copied only if not contiguous).
pub(super) fn ndarray<'py>(
    name: &str,
    obj: &Bound<'py, PyAny>,
    ndim: usize,
) -> PyResult<Bound<'py, PyUntypedArray>> {
    let Ok(arr) = obj.cast::<PyUntypedArray>() else {
        let ty = obj.get_type().name()?;
        return Err(to_py(RloxError::type_error(
            name,
            format!("expected a numpy.ndarray, got {ty}"),
        )));
    };
    if arr.ndim() != ndim {
        return Err(to_py(RloxError::value(
            name,
            format!("must be {ndim}-D, got shape {:?}", arr.shape()),
        )));
    }
    // SAFETY: `arr` is a live numpy array; reading its flags field is always valid.
    let flags = unsafe { (*arr.as_array_ptr()).fields.flags };
    if arr.is_c_contiguous() && flags & NPY_ARRAY_ALIGNED != 0 {
        return Ok(arr.clone());
    }
    // Strided or misaligned views are copied once into an aligned C-contiguous array.
    let np = obj.py().import("numpy")?;
    Ok(np
        .call_method1("require", (arr, obj.py().None(), "CA"))?
        .cast_into::<PyUntypedArray>()?)
}

/// A float option; overflow or a non-number becomes an error naming the option.
pub(super) fn float_arg(name: &str, obj: Option<&Bound<'_, PyAny>>, default: f64) -> PyResult<f64> {
    let Some(obj) = obj else {
        return Ok(default);
    };
    if obj.is_instance_of::<pyo3::types::PyBool>() {
        return Err(to_py(RloxError::type_error(
            name,
            "expected a number, got bool",
        )));
    }
    obj.extract::<f64>().map_err(|e| {
        if e.is_instance_of::<pyo3::exceptions::PyOverflowError>(obj.py()) {
            to_py(RloxError::value(name, "number is too large"))
        } else {
            to_py(RloxError::type_error(
                name,
                format!(
                    "expected a number, got {}",
                    obj.get_type()
                        .name()
                        .map_or_else(|_| "?".into(), |n| n.to_string())
                ),
            ))
        }
    })
}

/// An optional integer option; overflow or a non-integer becomes an error naming the option.
pub(super) fn int_arg(name: &str, obj: Option<&Bound<'_, PyAny>>) -> PyResult<Option<i64>> {
    match obj {
        None => Ok(None),
        Some(o) if o.is_none() => Ok(None),
        Some(o) if o.is_instance_of::<pyo3::types::PyBool>() => Err(to_py(RloxError::type_error(
            name,
            "expected an int, got bool",
        ))),
        Some(o) => o.extract::<i64>().map(Some).map_err(|e| {
            if e.is_instance_of::<pyo3::exceptions::PyOverflowError>(o.py()) {
                to_py(RloxError::value(name, "integer does not fit in 64 bits"))
            } else {
                to_py(RloxError::type_error(name, "expected an int or None"))
            }
        }),
    }
}

pub(super) fn dtype_name(arr: &Bound<'_, PyUntypedArray>) -> String {
    arr.dtype().to_string()
}

/// Integer arrays of any integer dtype, converted to int64 (copied only if not already int64).
pub(super) fn int64_array<'py>(
    name: &str,
    obj: &Bound<'py, PyAny>,
    ndim: usize,
) -> PyResult<Bound<'py, PyAny>> {
    let arr = ndarray(name, obj, ndim)?;
    if arr.dtype().is_equiv_to(&numpy::dtype::<i64>(obj.py())) {
        return Ok(arr.into_any());
    }
    let kind = arr.dtype().kind();
    if kind == b'i' || kind == b'u' {
        return arr.call_method1("astype", ("int64",));
    }
    Err(to_py(RloxError::type_error(
        name,
        format!("must hold integers, got dtype {}", dtype_name(&arr)),
    )))
}

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
#[pyclass(module = "rlox._rlox", frozen, get_all)]
pub struct DPOLossOutput {
    /// Mean loss over pairs.
    loss: f64,
    /// `(B,)` per-pair losses.
    losses: Py<PyAny>,
    /// `(B,)` d(mean loss)/d(policy_chosen_logps).
    grad_chosen: Py<PyAny>,
    /// `(B,)` d(mean loss)/d(policy_rejected_logps).
    grad_rejected: Py<PyAny>,
    /// `(B,)` beta * (policy_chosen_logps - ref_chosen_logps).
    chosen_rewards: Py<PyAny>,
    /// `(B,)` beta * (policy_rejected_logps - ref_rejected_logps).
    rejected_rewards: Py<PyAny>,
    /// Fraction of pairs whose chosen reward exceeds the rejected reward.
    reward_accuracy: f64,
    /// Mean of chosen minus rejected reward.
    reward_margin: f64,
    /// Mean chosen reward.
    chosen_reward: f64,
    /// Mean rejected reward.
    rejected_reward: f64,
}

#[pymethods]
impl DPOLossOutput {
    fn __repr__(&self) -> String {
        format!(
            "DPOLossOutput(loss={:.6}, reward_accuracy={:.4}, reward_margin={:.6})",
            self.loss, self.reward_accuracy, self.reward_margin
        )
    }
}

fn run_loss<'py, T: Real + Element>(
    py: Python<'py>,
    cfg: LossConfig,
    arrays: [&PyReadonlyArray1<'py, T>; 4],
    lengths: [Option<&PyReadonlyArray1<'py, i64>>; 2],
) -> PyResult<DPOLossOutput> {
    let n = arrays[0].len();
    let slices: Vec<&[T]> = arrays
        .iter()
        .map(|a| a.as_slice().expect("contiguous"))
        .collect();
    let lens: Vec<Option<&[i64]>> = lengths
        .iter()
        .map(|l| l.map(|a| a.as_slice().expect("contiguous")))
        .collect();
    // numpy allocates large arrays with transparent huge pages, which makes first touch cheap.
    // Uninitialised numpy arrays (np.empty): numpy's allocator uses huge pages for large
    // arrays and nothing is zeroed; the kernel writes every element before Python sees them.
    let outs: Vec<Bound<'py, PyArray1<T>>> = (0..5)
        .map(|_| unsafe { PyArray1::<T>::new(py, n, false) })
        .collect();
    let mut bufs: Vec<&mut [MaybeUninit<T>]> = outs
        .iter()
        // SAFETY: fresh, contiguous, unaliased arrays of n elements that outlive the slices.
        .map(|a| unsafe { std::slice::from_raw_parts_mut(a.data() as *mut MaybeUninit<T>, n) })
        .collect();
    let [l, gc, gr, rc, rr] = &mut bufs[..] else {
        unreachable!("five outputs")
    };
    let inputs = LossInputs {
        policy_chosen: slices[0],
        policy_rejected: slices[1],
        ref_chosen: slices[2],
        ref_rejected: slices[3],
        chosen_lengths: lens[0],
        rejected_lengths: lens[1],
    };
    let summary = py
        .detach(|| {
            core_loss(
                &cfg,
                &inputs,
                LossOutputs {
                    losses: l,
                    grad_chosen: gc,
                    grad_rejected: gr,
                    chosen_rewards: rc,
                    rejected_rewards: rr,
                },
            )
        })
        .map_err(to_py)?;
    drop(bufs);
    let mut it = outs.into_iter().map(|a| a.into_any().unbind());
    let mut next = || it.next().expect("five outputs");
    Ok(DPOLossOutput {
        loss: summary.loss,
        losses: next(),
        grad_chosen: next(),
        grad_rejected: next(),
        chosen_rewards: next(),
        rejected_rewards: next(),
        reward_accuracy: summary.reward_accuracy,
        reward_margin: summary.reward_margin,
        chosen_reward: summary.chosen_reward,
        rejected_reward: summary.rejected_reward,
    })
}

/// Fused DPO loss, gradients, rewards and metrics over four `(B,)` log-prob arrays.
#[pyfunction]
#[pyo3(
    signature = (
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
        beta=None, loss_type="sigmoid", label_smoothing=None, chosen_lengths=None,
        rejected_lengths=None
    ),
    text_signature = "(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, \
        ref_rejected_logps, *, beta=0.1, loss_type='sigmoid', label_smoothing=0.0, \
        chosen_lengths=None, rejected_lengths=None)"
)]
#[allow(clippy::too_many_arguments)]
fn dpo_loss<'py>(
    py: Python<'py>,
    policy_chosen_logps: &Bound<'py, PyAny>,
    policy_rejected_logps: &Bound<'py, PyAny>,
    ref_chosen_logps: &Bound<'py, PyAny>,
    ref_rejected_logps: &Bound<'py, PyAny>,
    beta: Option<&Bound<'py, PyAny>>,
    loss_type: &str,
    label_smoothing: Option<&Bound<'py, PyAny>>,
    chosen_lengths: Option<&Bound<'py, PyAny>>,
    rejected_lengths: Option<&Bound<'py, PyAny>>,
) -> PyResult<DPOLossOutput> {
    let lt = LossType::parse(loss_type).map_err(to_py)?;
    let beta = float_arg("beta", beta, 0.1)?;
    let label_smoothing = float_arg("label_smoothing", label_smoothing, 0.0)?;
    let cfg = LossConfig::new(lt, beta, label_smoothing).map_err(to_py)?;
    let names = [
        "policy_chosen_logps",
        "policy_rejected_logps",
        "ref_chosen_logps",
        "ref_rejected_logps",
    ];
    let objs = [
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
    ];
    let arrays = names
        .iter()
        .zip(objs)
        .map(|(n, o)| float_array(n, o))
        .collect::<PyResult<Vec<_>>>()?;
    let mut lens = Vec::with_capacity(2);
    for (name, obj) in [
        ("chosen_lengths", chosen_lengths),
        ("rejected_lengths", rejected_lengths),
    ] {
        lens.push(match obj {
            None => None,
            Some(o) => Some(
                int64_array(name, o, 1)?
                    .cast_into::<PyArray1<i64>>()?
                    .readonly(),
            ),
        });
    }
    let lens_ref = [lens[0].as_ref(), lens[1].as_ref()];
    match &arrays[..] {
        [Floats::F32(a), Floats::F32(b), Floats::F32(c), Floats::F32(d)] => {
            run_loss(py, cfg, [a, b, c, d], lens_ref)
        }
        [Floats::F64(a), Floats::F64(b), Floats::F64(c), Floats::F64(d)] => {
            run_loss(py, cfg, [a, b, c, d], lens_ref)
        }
        _ => {
            let first_is_32 = matches!(arrays[0], Floats::F32(_));
            let k = arrays
                .iter()
                .position(|a| matches!(a, Floats::F32(_)) != first_is_32)
                .expect("mixed dtypes");
            Err(to_py(RloxError::type_error(
                names[k],
                format!(
                    "dtype differs from policy_chosen_logps ({}); pass all four as float32 or all as float64",
                    if first_is_32 { "float32" } else { "float64" }
                ),
            )))
        }
    }
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
    super::data::collated_dict(py, batch)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<DPOLossOutput>()?;
    m.add_function(wrap_pyfunction!(dpo_loss, m)?)?;
    m.add_function(wrap_pyfunction!(collate_pairs, m)?)?;
    Ok(())
}
