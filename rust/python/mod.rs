//! PyO3 bindings: type conversion, GIL release and error mapping only.

mod attn;
mod convert;
mod data;
mod errors;
mod kernels;
mod text;

use pyo3::prelude::*;

#[pymodule]
fn _rlox(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    kernels::register(m)?;
    data::register(m)?;
    text::register(m)?;
    attn::register(m)?;
    Ok(())
}

/// Output arrays are Rust vectors handed to numpy. mimalloc keeps freed pages for reuse, so a
/// steady stream of same-sized batches or loss outputs does not page-fault fresh memory in on
/// every call (the system allocator returns large blocks to the kernel on free).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
