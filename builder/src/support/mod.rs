//! Layer 0, support: running commands, digests, work directories, time, progress.
//! Knows nothing of specs, images or AWS.

pub mod cmd;
pub mod digest;
pub mod time;
pub mod ui;
pub mod workdir;
