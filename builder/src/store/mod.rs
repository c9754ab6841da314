//! Layer 2, what persists between runs: the stage cache and the image registry.

pub(crate) mod cache;
pub mod registry;
