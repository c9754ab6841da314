//! Layer 1, the model: the image spec, the builder's settings and the manifest a
//! build writes about itself.

pub mod manifest;
pub(crate) mod settings;
pub(crate) mod spec;
pub(crate) mod states;
