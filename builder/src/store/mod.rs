//! Layer 2, what persists between runs: the stage cache and the image registry.

pub mod cache;
pub mod registry;
