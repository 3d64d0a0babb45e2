//! rlox: the Rust preference-data plane and loss kernels behind the `rlox` Python package.

pub mod core;
mod python;
