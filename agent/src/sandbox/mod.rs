//! The sandbox every approved action runs in. It is the boundary: whatever the
//! classifier thought of an action, the action can do no more than the profile of the
//! class it was approved in allows.
//!
//! Three processes, each doing one thing:
//!
//! 1. `devos-agent sandbox-exec` ([`outer`]), started by the daemon as root. With
//!    the caller's credentials (seteuid) it checks the action again, prepares what it
//!    needs (the git configuration without programs, which secret locations exist),
//!    then, as root, joins the action's cgroup and execs bubblewrap.
//! 2. bubblewrap, as root, builds fresh namespaces: a mount view with the system
//!    read-only and only the profile's paths writable, other users' homes, `/root`,
//!    the agent's state, `/run` (the system bus, `/run/user`, every daemon socket) and
//!    the caller's secret locations absent; a private `/tmp`; a PID namespace; an
//!    empty network namespace unless the profile has the network; IPC and UTS
//!    namespaces.
//! 3. `devos-agent sandbox-exec --inside` ([`inner`]), inside: becomes the caller
//!    (uid, gid, groups; the capabilities bubblewrap kept for this are lost), sets
//!    rlimits, enters the working directory as the caller, applies Landlock (file
//!    system, TCP and abstract UNIX sockets where the kernel can) and seccomp, and
//!    execs the program or performs the file operation itself.
//!
//! The end of the action — exit, timeout or Cancel — ends the PID namespace and so
//! every process in it, `setsid()` or not.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::action::Action;
use crate::caller::Caller;
use crate::risk::{Risk, RiskClass};

pub mod cgroup;
pub mod inner;
pub mod outer;

/// Exit status when the sandbox could not be set up; the action never started.
pub const EXIT_SANDBOX_FAILED: i32 = 125;
/// Exit status when the inner stage could not confine the action; the action never
/// started. Like bubblewrap's own failures, the daemon shows it without details (a
/// place swapped while bubblewrap, as root, set it up must not tell the caller what
/// lies where they cannot look) and logs the details.
pub const EXIT_INSIDE_FAILED: i32 = 124;
/// Exit status when the action was refused because its risk grew since approval.
pub const EXIT_RISK_CHANGED: i32 = 122;
/// Exit status when a file operation itself failed.
pub const EXIT_ACTION_FAILED: i32 = 1;
/// Where the sandbox's own files appear inside it (on its private `/run`).
pub const INSIDE_DIR: &str = "/run/devos-sandbox";
/// The action's own directories, made for it in its private directory, and where
/// they appear in its sandbox.
pub const PRIVATE_DIRS: &[(&str, &str)] = &[
    ("tmp", "/tmp"),
    ("var-tmp", "/var/tmp"),
    ("shm", "/dev/shm"),
];

/// The descriptor on which the daemon hands `sandbox-exec` the pipe its stages say on
/// what the sandbox applied (or that the action's risk grew): never the action's own
/// output, which the action writes itself.
pub const STATUS_FD: i32 = 3;

/// The status pipe at `fd`, opened again for writing through `/proc/self/fd` (which
/// needs no unsafe descriptor handling; close-on-exec).
pub fn status_pipe(fd: i32) -> Option<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/self/fd/{fd}"))
        .ok()
}

/// The first line the inner stage writes on the status pipe: what was applied.
pub const APPLIED_PREFIX: &str = "devos-sandbox: ";
/// The line the outer stage prints when it refuses an action whose risk grew.
pub const REFUSED_PREFIX: &str = "devos-sandbox-refused: ";

/// What the daemon hands the outer stage (JSON on stdin).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Spec {
    pub caller: Caller,
    /// The working directory, canonical, as approved.
    pub cwd: PathBuf,
    pub action: Action,
    /// The risk the action was approved with: its profile.
    pub approved: Risk,
    /// Run as root (administrator-approved package installs).
    pub as_root: bool,
    /// The policy's secret locations.
    pub secrets: Vec<String>,
    /// The policy's paths kept read-only even inside a writable working directory.
    pub read_only: Vec<String>,
    /// The agent's own files (state, audit anchors): absent in the sandbox.
    pub hide: Vec<PathBuf>,
    /// A directory only root can reach, for this action alone; its
    /// [`PRIVATE_DIRS`], owned by the caller, become `/tmp`, `/var/tmp` and `/dev/shm`.
    pub private_dir: PathBuf,
    /// The cgroup the action runs in, when the agent has one to give.
    pub cgroup: Option<PathBuf>,
    pub bwrap: PathBuf,
    /// Refuse the action when Landlock cannot be enforced.
    pub required: bool,
    pub limits: Limits,
}

/// rlimits of an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Limits {
    pub cpu_secs: u64,
    pub max_file_mib: u64,
    pub max_open_files: u64,
}

/// What the outer stage hands the inner one (JSON on stdin, through bubblewrap).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Inner {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub user: String,
    pub as_root: bool,
    pub cwd: PathBuf,
    pub action: Action,
    /// The program to execute (canonical), for argv actions.
    pub program: Option<PathBuf>,
    pub env: Vec<(String, String)>,
    /// What Landlock lets the action write (besides its private directories and a
    /// few devices).
    pub writable: Vec<PathBuf>,
    /// The device and inode the outer stage found, as the caller, at each path the
    /// sandbox binds (working directory, home, writable paths): checked inside, so a
    /// path swapped for a symlink in between is refused.
    #[serde(default)]
    pub identities: Vec<Identity>,
    /// What the inner stage covers before it becomes the caller: the caller's secret
    /// locations the approval did not grant, and the places deny rules name. Mounted
    /// as root on handles opened without following any link (a user who swaps a part
    /// of the way for a link in between gets a refusal, never a mount or a new file
    /// elsewhere), then checked as the caller to be hidden where the caller sees them.
    #[serde(default)]
    pub covers: Vec<Cover>,
    /// Where bubblewrap put an empty file system of its own in place of what is there
    /// outside (`/home`, `/run`, the private temporary directories, ...): a covered
    /// place found only there inside has nothing to hide.
    #[serde(default)]
    pub stand_ins: Vec<PathBuf>,
    pub network: bool,
    pub required: bool,
    pub limits: Limits,
    /// What the outer stage applied, for the record.
    pub outer: String,
    /// The descriptor the inner stage says what it applied on (a pipe to the daemon
    /// that no stage past it holds: the action cannot read the line away or write one).
    pub status_fd: i32,
}

/// A place the inner stage makes absent: an empty tmpfs over a directory, /dev/null
/// over anything else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Cover {
    pub path: PathBuf,
    /// Whether it was a directory when the outer stage looked; found otherwise inside,
    /// it has changed and nothing runs.
    pub dir: bool,
    /// An empty directory nothing can be written in, or /dev/null whose owner and
    /// mode cannot change (secret locations); otherwise root's actions may write in
    /// the directory and lose what they wrote.
    pub read_only: bool,
    /// The device and inode of the place as the outer stage found it (none where it
    /// could not look, or on `/proc` and `/dev`, which the sandbox has fresh
    /// instances of): inside, the place must be that very one.
    #[serde(default)]
    pub id: Option<(u64, u64)>,
}

impl Cover {
    /// A cover of `path` as it is now (the place itself, not followed if a link);
    /// `None` when there is nothing there.
    pub fn of(path: PathBuf, dir: bool, read_only: bool) -> Option<Cover> {
        use std::os::unix::fs::MetadataExt;
        let id = match std::fs::symlink_metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            _ if path.starts_with("/proc") || path.starts_with("/dev") => None,
            Ok(m) => Some((m.dev(), m.ino())),
            Err(_) => None,
        };
        Some(Cover {
            path,
            dir,
            read_only,
            id,
        })
    }
}

/// Mark every descriptor from 3 on close-on-exec: whatever the agent inherited or
/// opened reaches neither bubblewrap nor the action.
fn close_on_exec_from_3() -> std::io::Result<()> {
    // SAFETY: close_range(2) with CLOSE_RANGE_CLOEXEC only sets a flag on open
    // descriptors; it closes none, so no owned descriptor becomes invalid.
    #[allow(unsafe_code)]
    let r = unsafe { libc::close_range(3, u32::MAX, libc::CLOSE_RANGE_CLOEXEC as libc::c_int) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A path and the file it was when checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Identity {
    pub path: PathBuf,
    pub dev: u64,
    pub ino: u64,
}

impl Identity {
    /// What `path` is now (following symlinks, as a bind mount does); `None` when it
    /// cannot be looked at, which matches no identity that was checked.
    pub fn of(path: &Path) -> Option<Identity> {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).ok().map(|m| Identity {
            path: path.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// What an approved action may reach: the sandbox profile of its class.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Profile {
    /// Paths it may write (everything else is read-only or absent).
    pub writable: Vec<PathBuf>,
    pub network: bool,
    /// Secret locations visible to it.
    pub secrets: Vec<PathBuf>,
    /// Root, with the whole system writable (package installs approved by an
    /// administrator).
    pub root: bool,
}

impl Profile {
    /// The profile of an action approved with `risk`, run in `cwd`.
    pub fn of(risk: &Risk, cwd: &Path, as_root: bool) -> Profile {
        if as_root {
            return Profile {
                writable: vec![PathBuf::from("/")],
                network: true,
                secrets: Vec::new(),
                root: true,
            };
        }
        let mut writable = Vec::new();
        if risk.class != RiskClass::ReadOnly {
            writable.push(cwd.to_path_buf());
            for p in &risk.writes_outside {
                if !writable.iter().any(|w| p.starts_with(w)) {
                    writable.push(p.clone());
                }
            }
        }
        // The system is never writable, whatever was approved.
        writable.retain(|w| !crate::risk::belongs_to_system(w));
        Profile {
            writable,
            network: risk.network,
            secrets: risk.secrets.clone(),
            root: false,
        }
    }

    /// One line for prompts and the record: what the action will be able to do.
    pub fn describe(&self) -> String {
        if self.root {
            return "as root: the whole system, the network".into();
        }
        let writes = if self.writable.is_empty() {
            "writes nothing".to_owned()
        } else {
            format!(
                "writes {}",
                self.writable
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let mut parts = vec![
            writes,
            if self.network {
                "network".into()
            } else {
                "no network".into()
            },
        ];
        if !self.secrets.is_empty() {
            parts.push(format!(
                "can read {}",
                self.secrets
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        parts.join("; ")
    }
}

/// The environment every action starts with: nothing of the daemon's, nothing of the
/// caller's session; only what programs expect.
pub fn base_environment(user: &str, home: &Path) -> Vec<(String, String)> {
    vec![
        ("PATH".into(), crate::risk::programs::SYSTEM_PATH.join(":")),
        ("HOME".into(), home.to_string_lossy().into_owned()),
        ("USER".into(), user.to_owned()),
        ("LOGNAME".into(), user.to_owned()),
        ("LANG".into(), "C.UTF-8".into()),
        ("TERM".into(), "dumb".into()),
        ("NO_COLOR".into(), "1".into()),
        ("TMPDIR".into(), "/tmp".into()),
        ("GIT_TERMINAL_PROMPT".into(), "0".into()),
        ("DEBIAN_FRONTEND".into(), "noninteractive".into()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn risk(class: RiskClass, writes_outside: &[&str]) -> Risk {
        Risk {
            class,
            reasons: Vec::new(),
            program: None,
            paths: Vec::new(),
            normalized: None,
            writes_outside: writes_outside.iter().map(PathBuf::from).collect(),
            network: false,
            secrets: Vec::new(),
            repo_programs: false,
            classifier_failed: false,
            not_installed: None,
        }
    }

    #[test]
    fn read_only_actions_write_nothing_and_system_places_are_never_writable() {
        let project = Path::new("/home/dev/proj");
        // Read-only writes nothing, whatever else the risk lists.
        let p = Profile::of(
            &risk(RiskClass::ReadOnly, &["/home/dev/other"]),
            project,
            false,
        );
        assert!(p.writable.is_empty(), "{p:?}");
        assert_eq!(p.describe(), "writes nothing; no network");
        // Other classes write the working directory and what was approved outside
        // it, never a system place.
        for class in [
            RiskClass::WritesWorkdir,
            RiskClass::Network,
            RiskClass::Destructive,
            RiskClass::Privileged,
            RiskClass::Unknown,
        ] {
            let p = Profile::of(
                &risk(class, &["/etc/passwd", "/usr/bin", "/home/dev/other", "/"]),
                project,
                false,
            );
            assert_eq!(
                p.writable,
                [project, Path::new("/home/dev/other")],
                "{class}"
            );
            assert!(!p.root);
        }
        // A working directory that belongs to the system is not writable either.
        for cwd in ["/var/lib/devos-x", "/etc", "/usr/local/src", "/"] {
            let p = Profile::of(&risk(RiskClass::Destructive, &[]), Path::new(cwd), false);
            assert!(p.writable.is_empty(), "{cwd}: {p:?}");
        }
        // Only root's package installs get the system, as root.
        let p = Profile::of(&risk(RiskClass::Privileged, &[]), project, true);
        assert!(p.root && p.network && p.writable == [Path::new("/")]);
    }
}
