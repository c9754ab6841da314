//! Classification itself (see the module above).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{RiskClass, normalize, paths, programs};
use crate::action::Action;

/// The verdict on one action: its class, every reason that raised it, and what the
/// sandbox must allow for it to work.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Risk {
    pub class: RiskClass,
    pub reasons: Vec<String>,
    /// The program an argv action runs: its canonical path, found in the system
    /// directories (or as given, resolved). The sandbox executes exactly this file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub program: Option<PathBuf>,
    /// Every path the action names, canonical (symlinks resolved as far as the path
    /// exists). Deny rules and remembered path scopes compare these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<PathBuf>,
    /// The argv as deny rules see it: program name, options, operands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub normalized: Option<programs::Normalized>,
    /// Files or directories outside the working directory the action must be able
    /// to write.
    pub writes_outside: Vec<PathBuf>,
    /// Whether the action needs the network.
    pub network: bool,
    /// Secret locations (from `[sandbox] secrets`) the action names; they are visible
    /// in its sandbox only when it was approved with them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<PathBuf>,
    /// Whether git runs with the repository's own hooks, drivers and configured
    /// programs (otherwise they are switched off).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub repo_programs: bool,
    /// Whether the classifier itself failed (then `class` is `privileged`).
    #[serde(default)]
    pub classifier_failed: bool,
    /// The program the action names by name alone, when no system directory holds
    /// it: the action cannot run, so it is refused rather than asked about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_installed: Option<String>,
}

impl Risk {
    fn new() -> Self {
        Risk {
            class: RiskClass::ReadOnly,
            reasons: Vec::new(),
            program: None,
            paths: Vec::new(),
            normalized: None,
            writes_outside: Vec::new(),
            network: false,
            secrets: Vec::new(),
            repo_programs: false,
            classifier_failed: false,
            not_installed: None,
        }
    }

    pub(crate) fn raise(&mut self, class: RiskClass, reason: impl Into<String>) {
        self.class = self.class.max(class);
        let reason = reason.into();
        if !self.reasons.contains(&reason) {
            self.reasons.push(reason);
        }
    }

    pub(crate) fn net(&mut self, reason: impl Into<String>) {
        self.network = true;
        self.raise(RiskClass::Network, reason);
    }

    fn failed() -> Self {
        Risk {
            class: RiskClass::Privileged,
            reasons: vec!["the risk classifier failed on this action; treated as high risk".into()],
            network: true,
            classifier_failed: true,
            ..Risk::new()
        }
    }

    /// Whether `self` needs nothing `approved` did not: same or lower class, no new
    /// place to write, no network or secret it was not approved with, the same
    /// program.
    pub fn within(&self, approved: &Risk) -> Result<(), RiskGrew> {
        let mut grew = Vec::new();
        if self.class > approved.class {
            grew.push(format!("{} → {}", approved.class, self.class));
        }
        if let Some(p) = self
            .writes_outside
            .iter()
            .find(|p| !approved.writes_outside.contains(p))
        {
            grew.push(format!("now writes {}", p.display()));
        }
        if self.network && !approved.network {
            grew.push("now needs the network".into());
        }
        if let Some(s) = self.secrets.iter().find(|s| !approved.secrets.contains(s)) {
            grew.push(format!("now reaches {}", s.display()));
        }
        if self.repo_programs && !approved.repo_programs {
            grew.push("now runs the repository's own programs".into());
        }
        if self.program != approved.program {
            grew.push(format!(
                "the program is now {}",
                self.program
                    .as_deref()
                    .map_or("none".into(), |p| p.display().to_string())
            ));
        }
        if grew.is_empty() {
            Ok(())
        } else {
            Err(RiskGrew {
                grew,
                reasons: self.reasons.clone(),
            })
        }
    }
}

/// How an action's risk grew beyond what it was approved with, and the reasons for
/// its risk now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {}", grew.join(", "), reasons.join("; "))]
pub struct RiskGrew {
    pub grew: Vec<String>,
    pub reasons: Vec<String>,
}

/// What classification may look at besides the action: where it runs and whose
/// secrets must not be reached.
pub struct Scope<'a> {
    /// The working directory, canonical.
    pub cwd: &'a Path,
    /// The caller's home directory.
    pub home: &'a Path,
    /// The caller's uid: whether others can change what the action relies on.
    pub uid: u32,
    /// Secret locations (absolute; `~` already expanded).
    pub secrets: &'a [PathBuf],
}

/// Classify an action. Never panics: a failure inside the classifier is reported as
/// a `privileged` risk with the reason.
pub fn classify(action: &Action, scope: &Scope) -> Risk {
    std::panic::catch_unwind(|| classify_inner(action, scope)).unwrap_or_else(|_| Risk::failed())
}

fn classify_inner(action: &Action, scope: &Scope) -> Risk {
    let mut c = Classifier {
        risk: Risk::new(),
        scope,
    };
    match action {
        Action::Read { path } => c.path(path, Access::Read),
        Action::Write { path, .. } => {
            let access = if scope.cwd.join(path).symlink_metadata().is_ok() {
                Access::Replace
            } else {
                Access::Write
            };
            c.path(path, access)
        }
        Action::Mkdir { path } => c.path(path, Access::Write),
        Action::Delete { path } => {
            c.path(path, Access::Replace);
            let what = if scope.cwd.join(path).is_dir() {
                "a directory tree"
            } else {
                "a file"
            };
            c.risk
                .raise(RiskClass::Destructive, format!("deletes {what}"));
        }
        Action::Move { from, to } => {
            c.path(from, Access::Write);
            c.path(to, Access::Write);
        }
        Action::Copy { from, to } => {
            c.path(from, Access::Read);
            c.path(to, Access::Write);
        }
        Action::Shell { script } => {
            // (None when missing: the sandbox then runs nothing.)
            c.risk.program = programs::resolve("/bin/sh", scope.cwd).ok();
            shell_risk(&mut c, script)
        }
        Action::Git { args } => {
            let argv: Vec<String> = std::iter::once("git".to_owned())
                .chain(args.iter().cloned())
                .collect();
            c.argv(&argv);
        }
        Action::Run { argv } => c.argv(argv),
        Action::PackageInstall { packages } => {
            // (None when missing: the sandbox then runs nothing.)
            c.risk.program = programs::resolve("apt-get", scope.cwd).ok();
            c.risk.net("downloads packages");
            c.risk.raise(
                RiskClass::Privileged,
                format!("installs system packages as root: {}", packages.join(" ")),
            );
            for p in packages {
                if !valid_package_name(p) {
                    c.risk
                        .raise(RiskClass::Unknown, format!("`{p}` is not a package name"));
                }
            }
        }
    }
    if !matches!(action, Action::Run { .. } | Action::Git { .. }) {
        // (A word of a shell script may be a function or builtin of its own: only an
        // argv names the program exactly.)
        c.risk.not_installed = None;
    }
    if c.risk.class >= RiskClass::WritesWorkdir
        && c.risk.class < RiskClass::Privileged
        && belongs_to_system(scope.cwd)
    {
        c.risk.raise(
            RiskClass::Privileged,
            format!(
                "the working directory {} belongs to the system: no sandbox makes it writable",
                scope.cwd.display()
            ),
        );
    }
    if c.risk.class >= RiskClass::WritesWorkdir
        && c.risk.class < RiskClass::Destructive
        && scope.home.starts_with(scope.cwd)
    {
        c.risk.raise(
            RiskClass::Destructive,
            "the working directory holds your home: everything in it would be writable to this action",
        );
    }
    c.risk
}

/// A shell script is never understood: it asks, and runs in the working-directory
/// profile. The network is given only when a network program appears in it, and the
/// prompt says so.
fn shell_risk(c: &mut Classifier, script: &str) {
    c.risk.raise(
        RiskClass::Unknown,
        "runs a shell script; anything is possible within its sandbox",
    );
    for (needle, what) in [
        (";", "command separator `;`"),
        ("&&", "command chaining `&&`"),
        ("||", "command chaining `||`"),
        ("|", "a pipe"),
        ("$(", "command substitution `$(...)`"),
        ("`", "command substitution with backticks"),
        (">", "output redirection"),
        ("<", "input redirection"),
        ("\n", "several lines"),
    ] {
        if script.contains(needle) {
            c.risk
                .raise(RiskClass::Unknown, format!("script uses {what}"));
        }
    }
    let words = script.split(|ch: char| ch.is_whitespace() || ";|&()`$<>".contains(ch));
    if let Some(w) = words
        .map(|w| w.rsplit('/').next().unwrap_or(w))
        .find(|w| programs::NETWORK_PROGRAMS.contains(w))
    {
        c.risk.net(format!(
            "script runs `{w}`, which talks to the network: it gets the network"
        ));
    }
}

/// Whether `name` is a valid Debian package name (and so cannot be an option).
pub fn valid_package_name(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() >= 2
        && b[0].is_ascii_lowercase() | b[0].is_ascii_digit()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"+-.".contains(c))
}

/// Places that belong to the system (or the image): an action is never given them to
/// write, whoever approves it. Packages go through `PackageInstall` or the image spec.
const SYSTEM_PLACES: &[&str] = &[
    "/usr",
    "/etc",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/boot",
    "/proc",
    "/sys",
    "/dev",
    "/run",
    "/var/lib",
    "/var/cache",
    "/var/log",
    "/var/spool",
    "/var/mail",
    "/efi",
];

/// Whether writing `path` would change the system: it is `/`, a system place, inside
/// one, or holds one (`/var` holds `/var/lib`).
pub fn belongs_to_system(path: &Path) -> bool {
    path == Path::new("/")
        || SYSTEM_PLACES
            .iter()
            .any(|s| path.starts_with(s) || Path::new(s).starts_with(path))
}

/// How an action uses a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    Read,
    /// Creates something new (or adds to a directory).
    Write,
    /// Overwrites or removes what exists.
    Replace,
}

/// One classification in progress.
pub(crate) struct Classifier<'a> {
    pub risk: Risk,
    pub scope: &'a Scope<'a>,
}

impl Classifier<'_> {
    /// Classify a path the action uses.
    pub(crate) fn path(&mut self, path: &Path, access: Access) {
        let scope = self.scope;
        let shown = path.display();
        let mut lexical = normalize(&scope.cwd.join(path));
        if let Some(leads_to) = paths::through_proc(&lexical, scope.cwd) {
            self.risk.raise(
                RiskClass::Unknown,
                format!(
                    "`{shown}` reaches the file system through /proc (in the sandbox: {})",
                    leads_to.display()
                ),
            );
            lexical = leads_to;
        }
        let real = paths::resolve_existing(&lexical);
        if !self.risk.paths.contains(&real) {
            self.risk.paths.push(real.clone());
        }
        if real != lexical && lexical.starts_with(scope.cwd) && !real.starts_with(scope.cwd) {
            self.risk.raise(
                match access {
                    Access::Read => RiskClass::ReadOnly,
                    _ => RiskClass::Destructive,
                },
                format!(
                    "`{shown}` is a symlink that leads outside the working directory, to {}",
                    real.display()
                ),
            );
        }
        if let Some(secret) = paths::secret_of(&[&lexical, &real], scope.secrets) {
            if !self.risk.secrets.contains(&secret) {
                self.risk.secrets.push(secret.clone());
            }
            self.risk.raise(
                RiskClass::Unknown,
                format!(
                    "`{shown}` is in {}, a secret location: approving gives this action access to it",
                    secret.display()
                ),
            );
        }
        let inside = real.starts_with(scope.cwd);
        match (access, inside) {
            (Access::Read, _) => {}
            (Access::Write, true) => self
                .risk
                .raise(RiskClass::WritesWorkdir, format!("writes {shown}")),
            (Access::Replace, true) => self.risk.raise(
                RiskClass::Destructive,
                format!("overwrites or removes existing {shown}"),
            ),
            (_, false) => {
                // What must be writable: the path itself when it exists, else the
                // directory it is created in.
                let target = if real.symlink_metadata().is_ok() {
                    real.clone()
                } else {
                    real.parent().unwrap_or(Path::new("/")).to_path_buf()
                };
                if belongs_to_system(&target) {
                    self.risk.raise(
                        RiskClass::Privileged,
                        format!(
                            "changes {}, which belongs to the system: no action's sandbox makes it writable",
                            target.display()
                        ),
                    );
                } else {
                    self.risk.raise(
                        RiskClass::Destructive,
                        format!("writes {shown}, outside the working directory"),
                    );
                    if !self.risk.writes_outside.contains(&target) {
                        self.risk.writes_outside.push(target);
                    }
                }
            }
        }
        if real == scope.cwd && access != Access::Read {
            self.risk.raise(
                RiskClass::Destructive,
                "changes the working directory itself",
            );
        }
    }

    /// Classify an argv: resolve the program, then apply what is known about it.
    pub(crate) fn argv(&mut self, argv: &[String]) {
        programs::classify_argv(self, argv);
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
