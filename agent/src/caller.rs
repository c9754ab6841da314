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
use crate::config::{InvalidDenyRule, UserPolicy};
use crate::model::tools::ContextQuery;
use crate::planner::{self, Plan};
use crate::risk::{self, Risk};

/// Why a caller's identity could not be looked up or taken.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot look up uid {uid}: {source}")]
    LookUp { uid: u32, source: nix::Error },
    #[error("uid {uid} has no passwd entry; the agent only serves real users")]
    NoPasswdEntry { uid: u32 },
    #[error(transparent)]
    NulInName(#[from] std::ffi::NulError),
    #[error("cannot list the groups of {user}: {source}")]
    Groups { user: String, source: nix::Error },
    #[error("setgroups: {0}")]
    SetGroups(nix::Error),
    #[error("setgid {gid}: {source}")]
    SetGid { gid: u32, source: nix::Error },
    #[error("setuid {uid}: {source}")]
    SetUid { uid: u32, source: nix::Error },
    #[error("dumpable: {0}")]
    Dumpable(nix::Error),
    #[error("no_new_privs: {0}")]
    NoNewPrivs(nix::Error),
}

/// Why a helper (planning or sandbox) could not read its job, or the planning
/// helper gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    #[error("cannot read the job: {0}")]
    ReadJob(std::io::Error),
    #[error("invalid job: {0}")]
    InvalidJob(serde_json::Error),
    #[error("cannot start the planning helper: {0}")]
    Start(std::io::Error),
    #[error(transparent)]
    Encode(serde_json::Error),
    #[error("cannot hand the request to the planning helper: {0}")]
    HandOver(std::io::Error),
    #[error(
        "planning as {user} took longer than {}s (a file system that does not answer?)",
        PLAN_TIMEOUT.as_secs()
    )]
    TimedOut { user: String },
    #[error("the planning helper failed: {0}")]
    Lost(std::io::Error),
    #[error("the planning helper failed ({status}): {stderr}")]
    Failed {
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("the planning helper answered badly: {0}")]
    BadAnswer(serde_json::Error),
    #[error("the planning helper's answer is larger than the {} MiB an answer may be", MAX_ANSWER >> 20)]
    TooLarge,
}

/// The most the planning helper may answer (a plan of a thousand actions with their
/// paths is a small part of it).
const MAX_ANSWER: u64 = 16 << 20;
/// The most of its error output kept.
const MAX_STDERR: u64 = 64 << 10;

/// What the planning helper, as the caller, could not use: the working directory or
/// the caller's own policy file. (It reaches the daemon as text in [`PlanReply`].)
#[derive(Debug, thiserror::Error)]
pub enum CallerFileError {
    #[error("{cwd} is not a directory you ({user}) can enter: {source}")]
    CannotEnter {
        cwd: PathBuf,
        user: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: ignored: it must be a regular file you own, under 64 KiB")]
    NotYourFile { path: PathBuf },
    #[error("{path}: {}", source.message())]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("{path}: deny[{index}]: {source}")]
    DenyRule {
        path: PathBuf,
        index: usize,
        source: InvalidDenyRule,
    },
}

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
    /// Whether `action`, approved, runs as root: an administrator's package install
    /// (the executor's profile, and what the planning checks go by).
    pub fn runs_as_root(&self, action: &crate::action::Action) -> bool {
        self.is_admin && crate::approval::privileged_runs_as_root(action)
    }

    pub fn from_uid(uid: u32, admin_groups: &[String]) -> Result<Self, IdentityError> {
        use nix::unistd::{Gid, Group, Uid, User, getgrouplist};
        let user = User::from_uid(Uid::from_raw(uid))
            .map_err(|source| IdentityError::LookUp { uid, source })?
            .ok_or(IdentityError::NoPasswdEntry { uid })?;
        let name = CString::new(user.name.clone())?;
        let groups: Vec<u32> = getgrouplist(&name, user.gid)
            .map_err(|source| IdentityError::Groups {
                user: user.name.clone(),
                source,
            })?
            .into_iter()
            .map(Gid::as_raw)
            .collect();
        let is_admin = uid == 0
            || admin_groups.iter().any(|g| {
                // A group that cannot be looked up makes nobody an administrator.
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
    pub fn become_for_good(&self) -> Result<(), IdentityError> {
        switch_identity(self.uid, self.gid, &self.groups)?;
        nix::sys::prctl::set_dumpable(false).map_err(IdentityError::Dumpable)?;
        nix::sys::prctl::set_no_new_privs().map_err(IdentityError::NoNewPrivs)?;
        Ok(())
    }

    /// The secret locations of the policy, expanded for this user.
    pub fn secrets(&self, patterns: &[String]) -> Vec<PathBuf> {
        risk::paths::expand_secrets(patterns, &self.home)
    }
}

/// Take a user's identity for good (real, effective and saved ids; groups first, uid
/// last, so each step still has the privilege it needs).
pub fn switch_identity(uid: u32, gid: u32, groups: &[u32]) -> Result<(), IdentityError> {
    use nix::unistd::{Gid, Uid, setgroups, setresgid, setresuid};
    let groups: Vec<Gid> = groups.iter().map(|g| Gid::from_raw(*g)).collect();
    setgroups(&groups).map_err(IdentityError::SetGroups)?;
    let g = Gid::from_raw(gid);
    setresgid(g, g, g).map_err(|source| IdentityError::SetGid { gid, source })?;
    let u = Uid::from_raw(uid);
    setresuid(u, u, u).map_err(|source| IdentityError::SetUid { uid, source })
}

/// A helper's job: the JSON its parent wrote on stdin.
pub fn job_from_stdin<T: serde::de::DeserializeOwned>() -> Result<T, HelperError> {
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .map_err(HelperError::ReadJob)?;
    serde_json::from_str(&input).map_err(HelperError::InvalidJob)
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
    /// Actions to classify (the model's tool calls) instead of planning `text`.
    #[serde(default)]
    pub classify: Vec<Action>,
    /// A question about the caller's context to answer (the model's context tools).
    #[serde(default)]
    pub context: Option<ContextQuery>,
    /// Sample the caller's processes (the context engine's `Processes`). As the
    /// caller, because the agent's own /proc view may hide other users' processes
    /// (`ProtectProc=`).
    #[serde(default)]
    pub processes: Option<Sample>,
}

/// How to sample the caller's processes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    /// Over this many milliseconds.
    pub millis: u64,
    /// The projects they may work in.
    pub projects: Vec<PathBuf>,
    /// The largest first, rather than the busiest.
    pub by_memory: bool,
}

impl PlanJob {
    /// A job for `caller` in `cwd` that plans `text` (if any) and nothing else.
    pub fn new(caller: &Caller, text: Option<String>, cwd: PathBuf, secrets: &[String]) -> Self {
        PlanJob {
            caller: caller.clone(),
            text,
            cwd,
            now_secs: now_secs(),
            secrets: secrets.to_vec(),
            resolve: Vec::new(),
            classify: Vec::new(),
            context: None,
            processes: None,
        }
    }
}

/// Its answer. Errors are text here: they cross from the helper to the daemon as JSON,
/// and the daemon only shows them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct PlanReply {
    /// The working directory, canonical — or why the caller cannot use it.
    pub cwd: Result<PathBuf, String>,
    /// The plan, or why there is none.
    pub plan: Result<Plan, String>,
    /// One risk per planned action (or per action of `classify`).
    pub risks: Vec<Risk>,
    /// No local rule matched `text`: the request is for the model.
    #[serde(default)]
    pub needs_model: bool,
    /// The answer to `context` — or, for a request that needs the model, the project
    /// facts of its working directory.
    #[serde(default)]
    pub context: Option<serde_json::Value>,
    /// The caller's own policy file, or why it was refused.
    pub user_policy: Result<UserPolicy, String>,
    /// `resolve`, canonical (as far as each path exists).
    pub resolved: Vec<PathBuf>,
    /// The work tree of the git repository the working directory is in.
    #[serde(default)]
    pub repo_root: Option<PathBuf>,
    /// The answer to `processes`: the busiest [`crate::context::procs::MAX_LISTED`]
    /// (what a reply shows, however many processes the caller has), and how many
    /// there are.
    #[serde(default)]
    pub processes: Option<(Vec<crate::context::procs::Process>, usize)>,
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
    let user_policy = read_user_policy(caller).map_err(|e| e.to_string());
    let cwd = enter(&job.cwd, &caller.user).map_err(|e| e.to_string());
    let mut needs_model = false;
    // (Only a repository nobody else can change becomes the caller's project.)
    let repo_root = cwd
        .as_ref()
        .ok()
        .and_then(|c| crate::gitrepo::discover(c))
        .filter(|r| r.changeable_by_others(caller.uid).is_none())
        .map(|r| r.work_tree);
    let (plan, risks, context) = match &cwd {
        Err(e) => (Err(e.clone()), Vec::new(), None),
        Ok(cwd) => {
            let scope = risk::Scope {
                cwd,
                home: &caller.home,
                uid: caller.uid,
                secrets: &secrets,
            };
            let classify = |actions: &[Action]| -> Vec<Risk> {
                actions.iter().map(|a| risk::classify(a, &scope)).collect()
            };
            let ctx = planner::Context {
                cwd,
                home: &caller.home,
                now: UNIX_EPOCH + Duration::from_secs(job.now_secs),
            };
            let (plan, risks) = match &job.text {
                None => (Err("nothing to plan".to_owned()), classify(&job.classify)),
                Some(text) => match planner::plan(text, &ctx) {
                    Err(e) => {
                        needs_model = matches!(e, planner::PlanError::NeedsModel(_));
                        (Err(e.to_string()), Vec::new())
                    }
                    Ok(plan) => {
                        let risks = classify(&plan.actions);
                        (Ok(plan), risks)
                    }
                },
            };
            let query = job.context.or(needs_model.then_some(ContextQuery::Project));
            let context = query.map(|q| crate::model::context::answer(q, cwd, caller.uid));
            (plan, risks, context)
        }
    };
    let processes = job.processes.as_ref().map(|sample| {
        use crate::context::procs;
        let interval = Some(Duration::from_millis(sample.millis));
        let mut list = procs::list(caller.uid, &sample.projects, interval);
        if sample.by_memory {
            list.sort_by_key(|p| std::cmp::Reverse(p.rss_kib));
        }
        let total = list.len();
        list.truncate(procs::MAX_LISTED);
        (list, total)
    });
    PlanReply {
        cwd,
        plan,
        risks,
        user_policy,
        resolved,
        needs_model,
        context,
        repo_root,
        processes,
    }
}

/// Enter `cwd` as this user and return it canonical, or an error naming it.
fn enter(cwd: &Path, user: &str) -> Result<PathBuf, CallerFileError> {
    std::env::set_current_dir(cwd)
        .and_then(|()| std::env::current_dir())
        .map_err(|source| CallerFileError::CannotEnter {
            cwd: cwd.to_path_buf(),
            user: user.to_owned(),
            source,
        })
}

/// A user's own policy file, read without following a symlink at its last
/// component and only if they own it.
fn read_user_policy(caller: &Caller) -> Result<UserPolicy, CallerFileError> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let path = caller.home.join(".config/devos/agent.toml");
    let io = |source| CallerFileError::Io {
        path: path.clone(),
        source,
    };
    let mut file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits() | nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(UserPolicy::default()),
        Err(e) => return Err(io(e)),
    };
    const MAX_POLICY: u64 = 64 * 1024;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() || meta.uid() != caller.uid || meta.len() > MAX_POLICY {
        return Err(CallerFileError::NotYourFile { path });
    }
    // (Read no more than the size allowed: the file may grow after the check.)
    let mut text = String::new();
    (&mut file)
        .take(MAX_POLICY + 1)
        .read_to_string(&mut text)
        .map_err(io)?;
    if text.len() as u64 > MAX_POLICY {
        return Err(CallerFileError::NotYourFile { path });
    }
    let mut policy: UserPolicy =
        toml::from_str(&text).map_err(|source| CallerFileError::Parse {
            path: path.clone(),
            source,
        })?;
    for (index, rule) in policy.deny.iter_mut().enumerate() {
        rule.validate()
            .map_err(|source| CallerFileError::DenyRule {
                path: path.clone(),
                index,
                source,
            })?;
        if let Some(p) = &rule.path_prefix {
            rule.path_prefix = Some(risk::paths::resolve_existing(&risk::normalize(p)));
        }
    }
    Ok(policy)
}

/// Run the planning helper for `job` as its caller. `exe` is the agent's own binary.
pub async fn plan(exe: &Path, job: &PlanJob) -> Result<PlanReply, HelperError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut child = tokio::process::Command::new(exe)
        .arg("plan-exec")
        .env_clear()
        .current_dir("/")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(HelperError::Start)?;
    let json = serde_json::to_vec(job).map_err(HelperError::Encode)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(&json)
            .await
            .map_err(HelperError::HandOver)?;
    }
    // Read no more than an answer may be: what the helper says comes from files and
    // repositories the caller controls.
    let (mut stdout, mut stderr) = (child.stdout.take(), child.stderr.take());
    let finished = async {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let read_out = async {
            match stdout.as_mut() {
                Some(s) => s.take(MAX_ANSWER + 1).read_to_end(&mut out).await,
                None => Ok(0),
            }
        };
        let read_err = async {
            match stderr.as_mut() {
                Some(s) => s.take(MAX_STDERR).read_to_end(&mut err).await,
                None => Ok(0),
            }
        };
        let (o, e) = tokio::join!(read_out, read_err);
        o.and(e)?;
        if out.len() as u64 > MAX_ANSWER {
            return Ok(None);
        }
        Ok::<_, std::io::Error>(Some((child.wait().await?, out, err)))
    };
    let Some((status, out, err)) = tokio::time::timeout(PLAN_TIMEOUT, finished)
        .await
        .map_err(|_| HelperError::TimedOut {
            user: job.caller.user.clone(),
        })?
        .map_err(HelperError::Lost)?
    else {
        // (Killed when `child` is dropped.)
        return Err(HelperError::TooLarge);
    };
    if !status.success() {
        return Err(HelperError::Failed {
            status,
            stderr: String::from_utf8_lossy(&err).trim().to_owned(),
        });
    }
    serde_json::from_slice(&out).map_err(HelperError::BadAnswer)
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
