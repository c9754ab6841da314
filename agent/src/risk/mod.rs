//! Risk classification of actions by allow-list: which sandbox profile an action
//! needs and whether it may run without asking.
//!
//! Classification decides whether to ask, never whether harm is possible: every
//! action runs in the sandbox profile of its approved class (see `crate::sandbox`),
//! whatever the classifier thought. The classifier errs upward: a program is what its
//! canonical path is, and only root-owned programs in system directories that the
//! caller cannot write, with options listed for them, are known; anything else —
//! an unknown program, an unknown option, a path inside an option — is `unknown` and
//! asks. A classifier that fails counts as `privileged`.
//!
//! Classification reads the file system (symlinks, program ownership, the git
//! repository), so the agent runs it as the caller (`crate::caller`), never as root.

use serde::{Deserialize, Serialize};

#[cfg(feature = "daemon")]
mod classify;
#[cfg(feature = "daemon")]
pub mod git;
#[cfg(feature = "daemon")]
pub mod paths;
#[cfg(feature = "daemon")]
pub mod programs;

#[cfg(feature = "daemon")]
pub use classify::*;
#[cfg(feature = "daemon")]
pub use paths::normalize;

/// Risk classes, least to most dangerous. A policy names the classes that run without
/// asking; `unknown` never does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RiskClass {
    /// Reads files or state, changes nothing.
    ReadOnly,
    /// Creates or changes files inside the request's working directory only.
    WritesWorkdir,
    /// Talks to the network.
    Network,
    /// Deletes or overwrites data, or writes outside the working directory.
    Destructive,
    /// Needs or changes system-wide privileges (sudo, packages, services).
    Privileged,
    /// Could do anything: shells, interpreters, unknown programs or options.
    Unknown,
}

impl RiskClass {
    pub const ALL: [RiskClass; 6] = [
        RiskClass::ReadOnly,
        RiskClass::WritesWorkdir,
        RiskClass::Network,
        RiskClass::Destructive,
        RiskClass::Privileged,
        RiskClass::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RiskClass::ReadOnly => "read-only",
            RiskClass::WritesWorkdir => "writes-workdir",
            RiskClass::Network => "network",
            RiskClass::Destructive => "destructive",
            RiskClass::Privileged => "privileged",
            RiskClass::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for RiskClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
