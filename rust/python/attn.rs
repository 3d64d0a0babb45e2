//! `flex_blocks`: the FlexAttention block structure of a batch's attention segments.

use numpy::ndarray::{Array2, Array3, Array4};
use numpy::{IntoPyArray, PyArray2, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::convert::ndarray;
use super::errors::to_py;
use crate::core::attn::{flex_blocks as core_blocks, token_spans};
use crate::core::errors::RloxError;

fn shape_err(e: impl ToString) -> PyErr {
    to_py(RloxError::value("attn_segments", e.to_string()))
}

fn count(name: &str, v: i64) -> PyResult<usize> {
    usize::try_from(v).map_err(|_| to_py(RloxError::value(name, format!("must be >= 0, got {v}"))))
}

/// Arrays for `BlockMask.from_kv_blocks` and the per-token spans its `mask_mod` reads.
#[pyfunction]
#[pyo3(signature = (attn_segments, rows, length, q_block = 128, kv_block = 128))]
fn flex_blocks<'py>(
    py: Python<'py>,
    attn_segments: &Bound<'py, PyAny>,
    rows: i64,
    length: i64,
    q_block: i64,
    kv_block: i64,
) -> PyResult<Bound<'py, PyDict>> {
    let arr = ndarray("attn_segments", attn_segments, 2)?;
    let Ok(typed) = arr.cast::<PyArray2<i32>>() else {
        return Err(to_py(RloxError::type_error(
            "attn_segments",
            "expected int32",
        )));
    };
    if arr.shape()[1] != 5 {
        return Err(to_py(RloxError::value(
            "attn_segments",
            "expected shape (S, 5)",
        )));
    }
    let readonly = typed.readonly();
    let segments = readonly
        .as_slice()
        .map_err(|_| to_py(RloxError::value("attn_segments", "must be C-contiguous")))?;
    let (rows, length) = (count("rows", rows)?, count("length", length)?);
    let (qb, kb) = (
        count("block_size", q_block)?,
        count("block_size", kv_block)?,
    );
    let (spans, blocks) = py
        .detach(|| {
            let spans = token_spans(segments, rows, length)?;
            let blocks = core_blocks(&spans, rows, length, qb, kb)?;
            Ok::<_, RloxError>((spans, blocks))
        })
        .map_err(to_py)?;
    let (nq, nk) = (blocks.q_blocks, blocks.kv_blocks);
    let out = PyDict::new(py);
    let counts = |v: Vec<i32>| Array3::from_shape_vec((rows, 1, nq), v).map_err(shape_err);
    let indices = |v: Vec<i32>| Array4::from_shape_vec((rows, 1, nq, nk), v).map_err(shape_err);
    out.set_item(
        "kv_num_blocks",
        counts(blocks.kv_num_blocks)?.into_pyarray(py),
    )?;
    out.set_item("kv_indices", indices(blocks.kv_indices)?.into_pyarray(py))?;
    out.set_item(
        "full_kv_num_blocks",
        counts(blocks.full_kv_num_blocks)?.into_pyarray(py),
    )?;
    out.set_item(
        "full_kv_indices",
        indices(blocks.full_kv_indices)?.into_pyarray(py),
    )?;
    let tokens = |v: Vec<i32>| Array2::from_shape_vec((rows, length), v).map_err(shape_err);
    out.set_item("seg_start", tokens(spans.seg_start)?.into_pyarray(py))?;
    out.set_item("prefix_start", tokens(spans.prefix_start)?.into_pyarray(py))?;
    out.set_item("prefix_end", tokens(spans.prefix_end)?.into_pyarray(py))?;
    Ok(out)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(flex_blocks, m)?)?;
    Ok(())
}
