//! Runs an approved action through `devos-agent sandbox-exec` as the calling user,
//! with a timeout, a cap on captured output and cancellation; output is streamed to a
//! callback as it arrives.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::SandboxConfig;
use crate::request::ActionRecord;
use crate::risk::RiskClass;
use crate::sandbox::{EXIT_SANDBOX_FAILED, Spec};

/// Who asked, as the system knows them (from the uid the bus daemon reported).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub user: String,
    pub home: PathBuf,
    pub is_admin: bool,
}

impl Caller {
    pub fn from_uid(uid: u32, admin_groups: &[String]) -> Result<Self, String> {
        use nix::unistd::{Gid, Group, Uid, User, getgrouplist};
        let user = User::from_uid(Uid::from_raw(uid))
            .map_err(|e| format!("cannot look up uid {uid}: {e}"))?
            .ok_or_else(|| {
                format!("uid {uid} has no passwd entry; the agent only serves real users")
            })?;
        let name = CString::new(user.name.clone()).map_err(|e| e.to_string())?;
        let groups: Vec<u32> = getgrouplist(&name, user.gid)
            .map_err(|e| format!("cannot list the groups of {}: {e}", user.name))?
            .into_iter()
            .map(Gid::as_raw)
            .collect();
        let is_admin = uid == 0
            || admin_groups.iter().any(|g| {
                Group::from_name(g)
                    .ok()
                    .flatten()
                    .is_some_and(|g| groups.contains(&g.gid.as_raw()))
            });
        Ok(Caller {
            uid,
            gid: user.gid.as_raw(),
            groups,
            user: user.name,
            home: user.dir,
            is_admin,
        })
    }

    /// Whether the mode bits let this user enter `dir` (and every directory above it)
    /// and list it. The sandbox checks again, for real, by entering it as the user.
    pub fn may_enter(&self, dir: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        if self.uid == 0 {
            return true;
        }
        let allowed = |meta: &std::fs::Metadata, bits: u32| {
            let shift = if meta.uid() == self.uid {
                6
            } else if self.groups.contains(&meta.gid()) || meta.gid() == self.gid {
                3
            } else {
                0
            };
            (meta.mode() >> shift) & bits == bits
        };
        let Ok(meta) = std::fs::metadata(dir) else {
            return false;
        };
        if !meta.is_dir() || !allowed(&meta, 0o5) {
            return false;
        }
        dir.ancestors()
            .skip(1)
            .all(|a| std::fs::metadata(a).is_ok_and(|m| allowed(&m, 0o1)))
    }
}

/// What became of a run.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub exit_code: Option<i32>,
    pub output: String,
    pub truncated: bool,
    pub error: Option<String>,
    pub sandbox: Option<String>,
}

impl Outcome {
    pub fn succeeded(&self) -> bool {
        self.exit_code == Some(0) && self.error.is_none()
    }
}

/// The sandbox spec for an action of `caller`, from its risk and the policy.
pub fn spec_for(
    record: &ActionRecord,
    caller: &Caller,
    cwd: &Path,
    tmp: Option<PathBuf>,
    config: &SandboxConfig,
) -> Spec {
    let as_root = crate::approval::privileged_runs_as_root(&record.action) && caller.is_admin;
    let mut writable = Vec::new();
    if record.risk.class != RiskClass::ReadOnly {
        writable.push(cwd.to_path_buf());
        writable.extend(record.risk.writes_outside.iter().cloned());
    }
    Spec {
        uid: caller.uid,
        gid: caller.gid,
        groups: caller.groups.clone(),
        user: caller.user.clone(),
        home: caller.home.clone(),
        cwd: cwd.to_path_buf(),
        action: record.action.clone(),
        writable,
        tmp,
        network: record.risk.network,
        as_root,
        required: config.required,
        cpu_secs: config.timeout_secs.saturating_mul(2),
        max_file_mib: config.max_file_mib,
        max_open_files: config.max_open_files,
    }
}

/// A private temporary directory for one action, owned by the caller.
pub fn private_tmp(caller: &Caller, label: &str) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("devos-{label}"));
    std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .and_then(|()| std::os::unix::fs::chown(&dir, Some(caller.uid), Some(caller.gid)))
        .map_err(|e| format!("cannot prepare {}: {e}", dir.display()))?;
    Ok(dir)
}

/// Run `spec` in the sandbox helper. `on_output` gets each chunk of output;
/// `cancel` resolving kills the action.
pub async fn execute(
    spec: &Spec,
    config: &SandboxConfig,
    mut on_output: impl FnMut(&str),
    cancel: impl std::future::Future<Output = ()>,
) -> Outcome {
    let mut outcome = Outcome::default();
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            outcome.error = Some(format!("cannot find the agent's own binary: {e}"));
            return outcome;
        }
    };
    let mut child = match tokio::process::Command::new(exe)
        .arg("sandbox-exec")
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            outcome.error = Some(format!("cannot start the sandbox: {e}"));
            return outcome;
        }
    };
    let pgid = child.id();
    if let Some(mut stdin) = child.stdin.take() {
        let json = serde_json::to_vec(spec).unwrap_or_default();
        if let Err(e) = stdin.write_all(&json).await {
            outcome.error = Some(format!("cannot hand the action to the sandbox: {e}"));
            return outcome;
        }
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(bool, Vec<u8>)>(64);
    for (is_err, pipe) in [
        (
            false,
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        ),
        (
            true,
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        ),
    ] {
        let Some(mut pipe) = pipe else { continue };
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n) = pipe.read(&mut buf).await {
                if n == 0 || tx.send((is_err, buf[..n].to_vec())).await.is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    let limit = config.max_output_bytes as usize;
    let mut stderr_head = true;
    let mut pending_err = Vec::new();
    let collect = async {
        while let Some((is_err, mut chunk)) = rx.recv().await {
            if is_err && stderr_head {
                // The helper's first stderr line says what it applied.
                pending_err.extend_from_slice(&chunk);
                let Some(nl) = pending_err.iter().position(|b| *b == b'\n') else {
                    continue;
                };
                let line = String::from_utf8_lossy(&pending_err[..nl]).into_owned();
                stderr_head = false;
                chunk = pending_err[nl + 1..].to_vec();
                match line.strip_prefix("devos-sandbox: ") {
                    Some(applied) => outcome.sandbox = Some(applied.to_owned()),
                    None => chunk = pending_err.clone(),
                }
            }
            let text = String::from_utf8_lossy(&chunk);
            if text.is_empty() {
                continue;
            }
            let room = limit.saturating_sub(outcome.output.len());
            if room == 0 {
                outcome.truncated = true;
                continue;
            }
            let mut take = text.len().min(room);
            while !text.is_char_boundary(take) {
                take -= 1;
            }
            outcome.output.push_str(&text[..take]);
            outcome.truncated |= take < text.len();
            on_output(&text[..take]);
        }
        if stderr_head && !pending_err.is_empty() {
            outcome
                .output
                .push_str(&String::from_utf8_lossy(&pending_err));
        }
    };
    let timeout = Duration::from_secs(config.timeout_secs);
    let kill = |why: &str, outcome_error: &mut Option<String>| {
        if let Some(pid) = pgid {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        *outcome_error = Some(why.to_owned());
    };
    let mut error = None;
    tokio::select! {
        _ = collect => {}
        _ = tokio::time::sleep(timeout) => kill(&format!("timed out after {}s ([sandbox] timeout-secs) and was killed", timeout.as_secs()), &mut error),
        _ = cancel => kill("cancelled", &mut error),
    }
    let status = child.wait().await;
    outcome.error = outcome.error.or(error);
    match status {
        Ok(s) => {
            use std::os::unix::process::ExitStatusExt;
            outcome.exit_code = s.code();
            if s.code() == Some(EXIT_SANDBOX_FAILED) && outcome.sandbox.is_none() {
                outcome.error.get_or_insert_with(|| {
                    format!(
                        "the sandbox could not be applied, so the action was refused: {}",
                        outcome.output.trim()
                    )
                });
            } else if let Some(sig) = s.signal() {
                outcome
                    .error
                    .get_or_insert_with(|| format!("killed by signal {sig}"));
            }
        }
        Err(e) => outcome.error = Some(format!("lost the action's process: {e}")),
    }
    if outcome.truncated {
        outcome
            .output
            .push_str(&format!("\n[output truncated at {limit} bytes]\n"));
    }
    outcome
}
