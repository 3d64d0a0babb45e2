//! Conversions shared by the bindings: Python arguments and numpy arrays in, core results out.
//!
//! Only type conversion and argument checks live here; `data`, `kernels` and `text` depend on
//! this module, on `errors` and on `core`, never on each other.

use numpy::npyffi::NPY_ARRAY_ALIGNED;
use numpy::{
    Element, IntoPyArray, PyArray1, PyArray2, PyArrayDescrMethods, PyUntypedArray,
    PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::errors::to_py;
use crate::core::collate::Collated;
use crate::core::errors::RloxError;

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

/// The dtype of `arr` as numpy prints it (for error messages).
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

/// A str option; anything else becomes a `TypeError` naming the option.
pub(super) fn str_arg(name: &str, obj: &Bound<'_, PyAny>) -> PyResult<String> {
    obj.extract::<String>().map_err(|_| {
        to_py(RloxError::type_error(
            name,
            format!(
                "expected a str, got {}",
                obj.get_type()
                    .name()
                    .map_or_else(|_| "?".into(), |n| n.to_string())
            ),
        ))
    })
}

/// An int64 numpy vector that takes over `v` (no copy).
pub(super) fn vec_i64<'py>(py: Python<'py>, v: Vec<i64>) -> Bound<'py, PyArray1<i64>> {
    PyArray1::from_vec(py, v)
}

/// A `rows x cols` numpy matrix that takes over `v` (no copy).
fn matrix<'py, T: Element>(
    py: Python<'py>,
    v: Vec<T>,
    rows: usize,
    cols: usize,
) -> PyResult<Bound<'py, PyArray2<T>>> {
    let a = numpy::ndarray::Array2::from_shape_vec((rows, cols), v)
        .map_err(|e| pyo3::exceptions::PyRuntimeError::new_err(e.to_string()))?;
    Ok(a.into_pyarray(py))
}

/// A collated batch as a dict of numpy arrays (handed over without copying).
pub(super) fn collated_dict<'py>(py: Python<'py>, b: Collated) -> PyResult<Bound<'py, PyDict>> {
    let (rows, len) = (b.rows, b.length);
    let out = PyDict::new(py);
    out.set_item("input_ids", matrix(py, b.input_ids, rows, len)?)?;
    out.set_item("attention_mask", matrix(py, b.attention_mask, rows, len)?)?;
    out.set_item("position_ids", matrix(py, b.position_ids, rows, len)?)?;
    out.set_item("loss_mask", matrix(py, b.loss_mask, rows, len)?)?;
    out.set_item("sequence_ids", matrix(py, b.sequence_ids, rows, len)?)?;
    out.set_item("cu_seqlens", PyArray1::from_vec(py, b.cu_seqlens))?;
    let segment_rows = b.segment_ends.len() / 3;
    out.set_item("segment_ends", matrix(py, b.segment_ends, segment_rows, 3)?)?;
    let attn_rows = b.attn_segments.len() / 5;
    out.set_item("attn_segments", matrix(py, b.attn_segments, attn_rows, 5)?)?;
    out.set_item("num_truncated", b.truncated)?;
    for (key, v) in [
        ("pair_index", b.pair_index),
        ("pair_rows", b.pair_rows),
        ("skipped", b.skipped),
        ("prompt_lengths", b.prompt_lengths),
        ("chosen_lengths", b.chosen_lengths),
        ("rejected_lengths", b.rejected_lengths),
        ("plan_row", b.plan_row),
        ("plan_position", b.plan_position),
        ("plan_target", b.plan_target),
        ("plan_pair", b.plan_pair),
        ("plan_side", b.plan_side),
    ] {
        out.set_item(key, vec_i64(py, v))?;
    }
    Ok(out)
}
