//! Layer 0, support: running commands, digests, work directories, removals, time,
//! progress, stdout.
//! Knows nothing of specs, images or AWS.

pub(crate) mod cmd;
pub mod digest;
pub(crate) mod dry_run;
pub(crate) mod paths;
pub(crate) mod remove;
pub use devos_agent::stdout;
pub mod time;
pub(crate) mod ui;
pub(crate) mod workdir;
