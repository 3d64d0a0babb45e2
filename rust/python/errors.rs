//! The one place where core errors become Python exceptions.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::PyErr;

use crate::core::errors::{ErrorKind, RloxError};

pub fn to_py(e: RloxError) -> PyErr {
    match e.kind {
        ErrorKind::Value => PyValueError::new_err(e.to_string()),
        ErrorKind::Type => PyTypeError::new_err(e.to_string()),
    }
}
