//! Pure-Rust core: no Python types. Every function takes slices and returns `RloxError` on bad input.

pub mod attn;
pub mod collate;
#[cfg(unix)]
pub mod direct;
pub mod disk;
pub mod errors;
pub mod fastmath;
pub mod loss;
pub mod parts;
pub mod plan;
pub mod prefetch;
pub mod prune;
pub mod store;
pub mod terms;
pub mod tokenize;
