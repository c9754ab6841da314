//! Layer 0, support: running commands, digests, work directories, removals, time,
//! progress.
//! Knows nothing of specs, images or AWS.

pub mod cmd;
pub mod digest;
pub mod remove;
pub mod time;
pub mod ui;
pub mod workdir;
