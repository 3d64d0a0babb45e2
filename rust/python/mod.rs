//! PyO3 bindings: type conversion, GIL release and error mapping only.

mod data;
mod errors;
mod kernels;

use pyo3::prelude::*;

#[pymodule]
fn _rlox(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    kernels::register(m)?;
    data::register(m)?;
    Ok(())
}
