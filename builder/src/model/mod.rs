//! Layer 1, the model: the image spec, the builder's settings and the manifest a
//! build writes about itself.

pub mod manifest;
pub mod settings;
pub mod spec;
pub mod states;
