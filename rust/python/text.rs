//! `TokenEncoder`: parallel batch encoding of texts into flat token columns.

use numpy::{IntoPyArray, PyArray1};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedStr;

use super::errors::to_py;
use crate::core::tokenize::Encoder;

/// Flat token ids (values int32 [T]) and row offsets (int64 [n + 1]).
type Columns<'py> = (Bound<'py, PyArray1<i32>>, Bound<'py, PyArray1<i64>>);

/// A Hugging Face tokenizer (from its JSON) that encodes batches of texts with the GIL released.
#[pyclass(module = "rlox._rlox", frozen)]
struct TokenEncoder {
    inner: Encoder,
}

#[pymethods]
impl TokenEncoder {
    #[new]
    fn new(py: Python<'_>, json: &str) -> PyResult<Self> {
        let inner = py.detach(|| Encoder::from_json(json)).map_err(to_py)?;
        Ok(Self { inner })
    }

    /// Ids of ``texts`` (no special tokens): values int32 [T] and offsets int64 [n + 1].
    fn encode<'py>(&self, py: Python<'py>, texts: Vec<PyBackedStr>) -> PyResult<Columns<'py>> {
        let (values, offsets) = py.detach(|| self.inner.encode(&texts)).map_err(to_py)?;
        Ok((values.into_pyarray(py), offsets.into_pyarray(py)))
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<TokenEncoder>()
}
