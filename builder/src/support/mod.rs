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

/// Wrong usage that clap cannot see (a command named in a value, a template a command
/// does not take): exits 2, as clap's own usage errors do (`cli::exit_code`).
#[derive(Debug)]
pub struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}
