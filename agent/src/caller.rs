//! Who asked, and work done with their credentials only.
//!
//! The daemon runs as root, but nothing it tells a user may come from a file that
//! user could not read. Planning and classification (directory listings, project
//! files, symlinks, program ownership, the git repository, the user's own policy file)
//! therefore run in `devos-agent plan-exec`, a helper that drops to the caller's uid,
//! gid and groups before it touches the file system, and answers with JSON. It is not
//! dumpable and keeps no privileges, so the caller cannot tamper with it; a path the
//! caller cannot read is an error that names it.

use std::ffi::CString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::action::Action;
use crate::config::UserPolicy;
use crate::planner::{self, Plan};
use crate::risk::{self, Risk};

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
            // The home as the file system has it: secrets, start-up files and what is
            // shown in the sandbox all hang off the real directory, not a symlink to it.
            home: std::fs::canonicalize(&user.dir).unwrap_or(user.dir),
            is_admin,
        })
    }

    /// Become this user for good: groups, gid, uid (a root caller stays root), then
    /// no way back to privileges and no core dumps or tracing of this process.
    pub fn become_for_good(&self) -> Result<(), String> {
        switch_identity(self.uid, self.gid, &self.groups)?;
        nix::sys::prctl::set_dumpable(false).map_err(|e| format!("dumpable: {e}"))?;
        nix::sys::prctl::set_no_new_privs().map_err(|e| format!("no_new_privs: {e}"))?;
        Ok(())
    }

    /// The secret locations of the policy, expanded for this user.
    pub fn secrets(&self, patterns: &[String]) -> Vec<PathBuf> {
        risk::paths::expand_secrets(patterns, &self.home)
    }
}

/// Take a user's identity for good (real, effective and saved ids; groups first, uid
/// last, so each step still has the privilege it needs).
pub fn switch_identity(uid: u32, gid: u32, groups: &[u32]) -> Result<(), String> {
    use nix::unistd::{Gid, Uid, setgroups, setresgid, setresuid};
    let groups: Vec<Gid> = groups.iter().map(|g| Gid::from_raw(*g)).collect();
    setgroups(&groups).map_err(|e| format!("setgroups: {e}"))?;
    let g = Gid::from_raw(gid);
    setresgid(g, g, g).map_err(|e| format!("setgid {gid}: {e}"))?;
    let u = Uid::from_raw(uid);
    setresuid(u, u, u).map_err(|e| format!("setuid {uid}: {e}"))
}

/// A helper's job: the JSON its parent wrote on stdin.
pub fn job_from_stdin<T: serde::de::DeserializeOwned>() -> Result<T, String> {
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .map_err(|e| format!("cannot read the job: {e}"))?;
    serde_json::from_str(&input).map_err(|e| format!("invalid job: {e}"))
}

/// What the planning helper is asked.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct PlanJob {
    pub caller: Caller,
    /// The request to plan; `None` only resolves paths.
    pub text: Option<String>,
    pub cwd: PathBuf,
    pub now_secs: u64,
    /// The policy's secret locations (`~/...` or absolute).
    pub secrets: Vec<String>,
    /// Paths to canonicalize as the caller sees them (remembered-rule scopes).
    #[serde(default)]
    pub resolve: Vec<PathBuf>,
}

/// Its answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct PlanReply {
    /// The working directory, canonical — or why the caller cannot use it.
    pub cwd: Result<PathBuf, String>,
    /// The plan, or why there is none.
    pub plan: Result<Plan, String>,
    /// One risk per planned action.
    pub risks: Vec<Risk>,
    /// The caller's own policy file, or why it was refused.
    pub user_policy: Result<UserPolicy, String>,
    /// `resolve`, canonical (as far as each path exists).
    pub resolved: Vec<PathBuf>,
}

/// The helper's main: read the job, drop to the caller, answer on stdout. Returns
/// the exit status.
pub fn plan_exec_from_stdin() -> i32 {
    let job: PlanJob = match job_from_stdin() {
        Ok(j) => j,
        Err(e) => {
            eprintln!("devos plan-exec: {e}");
            return 2;
        }
    };
    if let Err(e) = job.caller.become_for_good() {
        eprintln!("devos plan-exec: cannot become {}: {e}", job.caller.user);
        return 2;
    }
    let reply = plan_as_this_user(&job);
    match serde_json::to_string(&reply) {
        Ok(json) => {
            println!("{json}");
            0
        }
        Err(e) => {
            eprintln!("devos plan-exec: {e}");
            2
        }
    }
}

/// Plan and classify with whatever credentials this process has.
pub fn plan_as_this_user(job: &PlanJob) -> PlanReply {
    let caller = &job.caller;
    let secrets = caller.secrets(&job.secrets);
    let resolved = job
        .resolve
        .iter()
        .map(|p| risk::paths::resolve_existing(&risk::normalize(p)))
        .collect();
    let user_policy = read_user_policy(caller);
    let cwd = enter(&job.cwd, &caller.user);
    let (plan, risks) = match &cwd {
        Ok(_) if job.text.is_none() => (Err("nothing to plan".to_owned()), Vec::new()),
        Err(e) => (Err(e.clone()), Vec::new()),
        Ok(cwd) => {
            let ctx = planner::Context {
                cwd,
                home: &caller.home,
                now: UNIX_EPOCH + Duration::from_secs(job.now_secs),
            };
            match planner::plan(job.text.as_deref().unwrap_or_default(), &ctx) {
                Err(e) => (Err(e.to_string()), Vec::new()),
                Ok(plan) => {
                    let scope = risk::Scope {
                        cwd,
                        home: &caller.home,
                        uid: caller.uid,
                        secrets: &secrets,
                    };
                    let risks = plan
                        .actions
                        .iter()
                        .map(|a| risk::classify(a, &scope))
                        .collect();
                    (Ok(plan), risks)
                }
            }
        }
    };
    PlanReply {
        cwd,
        plan,
        risks,
        user_policy,
        resolved,
    }
}

/// Enter `cwd` as this user and return it canonical, or an error naming it.
fn enter(cwd: &Path, user: &str) -> Result<PathBuf, String> {
    std::env::set_current_dir(cwd)
        .and_then(|()| std::env::current_dir())
        .map_err(|e| {
            format!(
                "{} is not a directory you ({user}) can enter: {e}",
                cwd.display()
            )
        })
}

/// A user's own policy file, read without following a symlink at its last
/// component and only if they own it.
fn read_user_policy(caller: &Caller) -> Result<UserPolicy, String> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let path = caller.home.join(".config/devos/agent.toml");
    let mut file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits() | nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(UserPolicy::default()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let meta = file
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() || meta.uid() != caller.uid || meta.len() > 64 * 1024 {
        return Err(format!(
            "{}: ignored: it must be a regular file you own, under 64 KiB",
            path.display()
        ));
    }
    let mut text = String::new();
    file.read_to_string(&mut text)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut policy: UserPolicy =
        toml::from_str(&text).map_err(|e| format!("{}: {}", path.display(), e.message()))?;
    for (i, rule) in policy.deny.iter_mut().enumerate() {
        rule.validate()
            .map_err(|e| format!("{}: deny[{i}]: {e}", path.display()))?;
        if let Some(p) = &rule.path_prefix {
            rule.path_prefix = Some(risk::paths::resolve_existing(&risk::normalize(p)));
        }
    }
    Ok(policy)
}

/// Run the planning helper for `job` as its caller. `exe` is the agent's own binary.
pub async fn plan(exe: &Path, job: &PlanJob) -> Result<PlanReply, String> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(exe)
        .arg("plan-exec")
        .env_clear()
        .current_dir("/")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start the planning helper: {e}"))?;
    let json = serde_json::to_vec(job).map_err(|e| e.to_string())?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(&json)
            .await
            .map_err(|e| format!("cannot hand the request to the planning helper: {e}"))?;
    }
    let out = tokio::time::timeout(PLAN_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| {
            format!(
                "planning as {} took longer than {}s (a file system that does not answer?)",
                job.caller.user,
                PLAN_TIMEOUT.as_secs()
            )
        })?
        .map_err(|e| format!("the planning helper failed: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "the planning helper failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("the planning helper answered badly: {e}"))
}

/// How long planning may take before the request fails.
const PLAN_TIMEOUT: Duration = Duration::from_secs(20);

/// Seconds since the epoch, for [`PlanJob::now_secs`].
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A typed action's risk with the caller's scope (used by tests and the sandbox's
/// re-check).
pub fn classify_as(action: &Action, cwd: &Path, caller: &Caller, secrets: &[String]) -> Risk {
    let secrets = caller.secrets(secrets);
    risk::classify(
        action,
        &risk::Scope {
            cwd,
            home: &caller.home,
            uid: caller.uid,
            secrets: &secrets,
        },
    )
}
