//! State shared by the D-Bus objects and the request tasks: configuration, the
//! SQLite store, the audit log, requests in flight and the per-user limit on them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Instant;

use tokio::sync::mpsc;
use zbus::fdo;
use zbus::message::Header;
use zbus::names::{BusName, UniqueName};
use zbus::object_server::SignalEmitter;

use crate::audit::{AuditError, AuditLog};
use crate::caller::Caller;
use crate::config::AgentConfig;
use crate::request::Request;
use crate::sandbox::cgroup::Cgroups;
use crate::store::Store;

/// What the running request task is told.
pub(super) enum Control {
    /// A decision was recorded for the action it waits on.
    Decided,
    Cancel,
}

pub(super) struct Live {
    pub control: mpsc::UnboundedSender<Control>,
    /// The submitting connection: signals about the request go only there.
    pub owner: Option<UniqueName<'static>>,
    /// Whose request it is.
    pub uid: u32,
    /// Whether a cancel is on record already (one per request).
    pub cancel_recorded: bool,
}

pub struct Shared {
    /// This agent's hold on its state directory, for as long as it runs.
    _state_lock: StateLock,
    pub(super) config_path: PathBuf,
    config: RwLock<Arc<AgentConfig>>,
    pub(super) store: Mutex<Store>,
    pub(super) audit: Mutex<AuditLog>,
    pub(super) live: Mutex<HashMap<String, Live>>,
    /// Requests in flight per uid (planning, waiting or running).
    in_flight: Mutex<HashMap<u32, u32>>,
    pub(super) conn: OnceLock<zbus::Connection>,
    pub(super) started: Instant,
    counter: AtomicU64,
    /// The agent's own binary: the planning and sandbox helpers are re-executions of it.
    pub(super) exe: PathBuf,
    /// Per-action cgroups, where the agent has a delegated cgroup v2.
    pub(super) cgroups: Option<Cgroups>,
    /// One audit verification at a time; others wait.
    verify_gate: tokio::sync::Semaphore,
    /// The last verification that was ok, and how many had ended by then.
    verified: Mutex<(u64, Option<Verified>)>,
    /// Users' verifications waiting or running (one each).
    verifying: PerUser,
    /// Users' queries of their history and context index waiting or running.
    pub(super) querying: PerUser,
    /// One change of the boot slots at a time: an admin's `Update` and the fleet
    /// follower's moves, each from its audit entry to its last boot-loader change.
    pub(super) updating: tokio::sync::Mutex<()>,
    /// The Bedrock client of the model route, made on first use.
    pub(super) bedrock: tokio::sync::Mutex<Option<super::converse::Bedrock>>,
    /// Conversations with a request in flight (one at a time each).
    busy_conversations: Mutex<std::collections::HashSet<String>>,
    /// Model calls in flight, held against the budgets at their worst-case cost.
    pub(super) held: Mutex<super::budget::Held>,
    /// Every user's context index and watcher.
    pub(super) context: super::context::Engine,
    /// Whether the model route could call Bedrock, when that was last looked up, and
    /// for which region and endpoint setting (see [`Shared::model_ready`]).
    model_ready: tokio::sync::Mutex<Option<ModelReady>>,
}

struct ModelReady {
    at: Instant,
    asked: (String, String),
    answer: Result<String, String>,
}

/// How long `Status` looks for the model route's region and credentials (instance
/// metadata that is not there takes about a second to give up on).
const MODEL_READY_WITHIN: std::time::Duration = std::time::Duration::from_secs(3);
/// How long an answer to that stands.
const MODEL_READY_FOR: std::time::Duration = std::time::Duration::from_secs(60);

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves data that is still consistent (every
    // change is a single statement or append), so keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(super) fn failed(e: impl std::fmt::Display) -> fdo::Error {
    fdo::Error::Failed(e.to_string())
}

pub(super) fn invalid_args(e: impl std::fmt::Display) -> fdo::Error {
    fdo::Error::InvalidArgs(e.to_string())
}

/// The most bytes a word-sized argument (an id, a choice, a model, a time) may have.
pub(super) const MAX_WORD: usize = 256;
/// The most bytes a path argument may have (Linux's `PATH_MAX`).
pub(super) const MAX_PATH: usize = 4096;

/// Refuse argument `name` when it is longer than `max` bytes, before anything is done
/// with it: what a call makes the agent echo in an error, record or pass to a helper
/// stays small whatever the caller sends.
pub(super) fn bounded(name: &str, value: &str, max: usize) -> fdo::Result<()> {
    if value.len() > max {
        return Err(invalid_args(format!(
            "{name} is at most {max} bytes; this one has {}",
            value.len()
        )));
    }
    Ok(())
}

/// The largest reply devos sends: well below what a bus daemon accepts (it drops the
/// sender of a larger message, which would take the agent off the bus).
pub(super) const MAX_REPLY: usize = 16 << 20;

/// `json` as a reply, or an error saying how to ask for less (`fewer`).
pub(super) fn fits(json: String, fewer: &str) -> fdo::Result<String> {
    if json.len() > MAX_REPLY {
        return Err(too_large(json.len(), fewer));
    }
    Ok(json)
}

/// The error for an answer of `bytes`, with how to ask for less.
pub(super) fn too_large(bytes: usize, fewer: &str) -> fdo::Error {
    fdo::Error::LimitsExceeded(format!(
        "the answer would be more than {} MiB, more than the bus carries; {fewer}",
        bytes.max(MAX_REPLY) >> 20
    ))
}

/// What the service could not do for a caller: record, take another request, verify.
#[derive(Debug, thiserror::Error)]
pub(super) enum ServiceError {
    /// The event is not on record: what it records must not happen.
    #[error("cannot write the audit log: {0}")]
    NotRecorded(#[source] AuditError),
    #[error(
        "you have {n} requests in flight ([limits] requests-per-user = {limit}); wait for one to finish or cancel one (`devos history`, `devos cancel ID`)"
    )]
    TooManyRequests { n: u32, limit: u32 },
    #[error(
        "the agent's disk is nearly full ({free_mib} MiB free for {dir}, which keeps {reserve_mib} MiB for the audit log): nothing new is taken from users until an administrator frees space"
    )]
    DiskNearlyFull {
        dir: String,
        free_mib: u64,
        reserve_mib: u64,
    },
    #[error(
        "your requests and rules took {limit} MiB of the audit log today ([limits] audit-mib-per-user-per-day); new ones are refused until tomorrow (UTC)"
    )]
    AuditBudget { limit: u64 },
    /// The room left for the audit log is not known: nothing new is taken from users.
    #[error("cannot tell how much room the audit log has left: {0}")]
    Room(#[source] AuditError),
    #[error(transparent)]
    Verify(AuditError),
    #[error(
        "you already have as many {what} waiting or running as a user may ({limit}): wait for one to end"
    )]
    Busy { what: &'static str, limit: u32 },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    VerifyGate(#[from] tokio::sync::AcquireError),
    #[error(transparent)]
    VerifyTask(#[from] tokio::task::JoinError),
}

/// On the bus: a limit is `LimitsExceeded`, anything else `Failed`; the words stay.
impl From<ServiceError> for fdo::Error {
    fn from(e: ServiceError) -> fdo::Error {
        match e {
            ServiceError::TooManyRequests { .. }
            | ServiceError::DiskNearlyFull { .. }
            | ServiceError::AuditBudget { .. }
            | ServiceError::Busy { .. } => fdo::Error::LimitsExceeded(e.to_string()),
            _ => failed(e),
        }
    }
}

pub(super) fn now() -> String {
    humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string()
}

pub(super) fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".into())
}

pub(super) fn to_value<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

/// One of a user's requests in flight; the count drops when it is dropped, and so
/// does its hold on a conversation.
pub(super) struct Slot {
    shared: Arc<Shared>,
    uid: u32,
    conversation: Option<String>,
}

impl Slot {
    /// Make this request the one request of conversation `id` in flight, or say
    /// that another one is (checked and taken at once, so two follow-ups sent
    /// together cannot both go on).
    pub(super) fn hold_conversation(&mut self, id: &str) -> bool {
        let taken = lock(&self.shared.busy_conversations).insert(id.to_owned());
        if taken {
            self.conversation = Some(id.to_owned());
        }
        taken
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(id) = &self.conversation {
            lock(&self.shared.busy_conversations).remove(id);
        }
        let mut map = lock(&self.shared.in_flight);
        if let Some(n) = map.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.uid);
            }
        }
    }
}

/// The name of the lock file in the state directory.
pub const STATE_LOCK: &str = "agent.lock";

/// An exclusive `flock` on [`STATE_LOCK`] in the state directory, released when the
/// agent exits (the kernel drops it with the process; the file is close-on-exec, so
/// no helper or action keeps it).
pub struct StateLock {
    _held: nix::fcntl::Flock<std::fs::File>,
}

/// Why the state directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum StateLockError {
    #[error(
        "another devos-agent holds {}: only one agent may run on a state directory (a second would cancel the first one's requests and fork its audit log); stop the other agent first",
        path.display()
    )]
    Held { path: PathBuf },
    #[error("cannot lock {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl StateLock {
    /// Take the lock of `state_dir` without waiting: an agent already running on it
    /// is an error, before anything of the directory is opened.
    pub fn take(state_dir: &Path) -> Result<StateLock, StateLockError> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = state_dir.join(STATE_LOCK);
        let io = |source| StateLockError::Io {
            path: path.clone(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(held) => Ok(StateLock { _held: held }),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(StateLockError::Held { path }),
            Err((_, e)) => Err(io(e.into())),
        }
    }
}

/// An append's result as the service reports it (a failure is logged).
fn recorded(appended: Result<u64, AuditError>) -> Result<(), ServiceError> {
    appended.map(|_| ()).map_err(|e| {
        tracing::error!("audit log write failed: {e}");
        ServiceError::NotRecorded(e)
    })
}

impl Shared {
    /// Open the agent's state: lock the state directory first (a second agent on it
    /// stops here, having changed nothing), then the store and the audit log.
    pub fn open(config_path: &Path, config: AgentConfig) -> anyhow::Result<Arc<Self>> {
        use anyhow::Context;
        std::fs::create_dir_all(&config.state_dir).with_context(|| {
            format!(
                "creating the state directory {}",
                config.state_dir.display()
            )
        })?;
        let state_lock = StateLock::take(&config.state_dir)?;
        let mut store = Store::open(&config.state_dir.join("state.db"))?;
        let cancelled = store.recover(&now())?;
        let mut audit = AuditLog::open(&config.state_dir.join("audit"), &config.audit)?;
        let cgroups = match Cgroups::setup() {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::info!("actions get no cgroup limits: {e}");
                None
            }
        };
        if !config.sandbox.bwrap.exists() {
            tracing::error!(
                "{} is missing: every action will be refused until bubblewrap is installed",
                config.sandbox.bwrap.display()
            );
        }
        audit.append(
            "agent.started",
            None,
            None,
            None,
            serde_json::json!({
                "version": env!("CARGO_PKG_VERSION"),
                "cancelled-requests": cancelled,
                "cgroup-limits": cgroups.is_some(),
            }),
        )?;
        Ok(Arc::new(Shared {
            _state_lock: state_lock,
            config_path: config_path.to_path_buf(),
            config: RwLock::new(Arc::new(config)),
            store: Mutex::new(store),
            audit: Mutex::new(audit),
            live: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
            conn: OnceLock::new(),
            started: Instant::now(),
            counter: AtomicU64::new(0),
            exe: std::env::current_exe().context("finding the agent's own binary")?,
            cgroups,
            verify_gate: tokio::sync::Semaphore::new(1),
            verified: Mutex::new((0, None)),
            verifying: PerUser::new("audit verifications", 1),
            querying: PerUser::new("queries", 4),
            updating: tokio::sync::Mutex::new(()),
            bedrock: tokio::sync::Mutex::new(None),
            busy_conversations: Mutex::new(Default::default()),
            held: Mutex::new(Default::default()),
            context: Default::default(),
            model_ready: tokio::sync::Mutex::new(None),
        }))
    }

    /// Whether the model route could call Bedrock now (see
    /// [`crate::model::bedrock::ready`]): the region, or what is missing. Looked up at
    /// most once a minute for a setting, and by one caller at a time, the others
    /// waiting for its answer: no user's `Status` calls can make the agent ask instance
    /// metadata over and over.
    pub(super) async fn model_ready(
        &self,
        model: &crate::config::ModelConfig,
    ) -> Result<String, String> {
        let asked = (model.region.clone(), model.endpoint_url.clone());
        let mut last = self.model_ready.lock().await;
        if let Some(last) = &*last
            && last.asked == asked
            && last.at.elapsed() < MODEL_READY_FOR
        {
            return last.answer.clone();
        }
        let answer = crate::model::bedrock::ready(model, MODEL_READY_WITHIN).await;
        *last = Some(ModelReady {
            at: Instant::now(),
            asked,
            answer: answer.clone(),
        });
        answer
    }

    pub(super) fn config(&self) -> Arc<AgentConfig> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(super) fn set_config(&self, config: AgentConfig) {
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
    }

    /// Append an audit entry. An error means the event is not on record: the caller
    /// must not go on with what it was about to do.
    pub(super) fn audit(
        &self,
        event: &str,
        uid: Option<u32>,
        request: Option<&str>,
        action: Option<u32>,
        detail: serde_json::Value,
    ) -> Result<(), ServiceError> {
        let appended = lock(&self.audit).append(event, uid, request, action, detail);
        recorded(appended)
    }

    /// Append an audit entry and make it durable (synced to disk, with its anchor)
    /// before returning: for what must still be on record after a power loss once it
    /// counts — an action starting, a decision, a remembered rule. It costs fsyncs;
    /// other entries use [`Shared::audit`] (see [`AuditLog::append_durable`]).
    pub(super) fn audit_durable(
        &self,
        event: &str,
        uid: Option<u32>,
        request: Option<&str>,
        action: Option<u32>,
        detail: serde_json::Value,
    ) -> Result<(), ServiceError> {
        let appended = lock(&self.audit).append_durable(event, uid, request, action, detail);
        recorded(appended)
    }

    /// Whether what `uid` asks for may add to the audit log: not when the log's disk
    /// is down to its reserve (the lesser of 5% and 256 MiB, kept for what root and
    /// the agent itself record), nor past the user's daily share. Root may always.
    pub(super) fn may_record(&self, uid: u32) -> Result<(), ServiceError> {
        if uid == 0 {
            return Ok(());
        }
        let mut audit = lock(&self.audit);
        let (free, size) = audit.space().map_err(ServiceError::Room)?;
        let reserve = (size / 20).min(256 << 20);
        if free < reserve {
            return Err(ServiceError::DiskNearlyFull {
                dir: audit.dir().display().to_string(),
                free_mib: free >> 20,
                reserve_mib: reserve.div_ceil(1 << 20),
            });
        }
        let limit = self.config().limits.audit_mib_per_user_per_day;
        if audit.written_today(uid) >= limit.saturating_mul(1 << 20) {
            return Err(ServiceError::AuditBudget { limit });
        }
        Ok(())
    }

    /// Take one of `uid`'s in-flight slots, or say why not.
    pub(super) fn reserve(self: &Arc<Self>, uid: u32) -> Result<Slot, ServiceError> {
        let limit = self.config().limits.requests_per_user;
        let mut map = lock(&self.in_flight);
        let n = map.entry(uid).or_insert(0);
        if *n >= limit {
            return Err(ServiceError::TooManyRequests { n: *n, limit });
        }
        *n += 1;
        Ok(Slot {
            shared: self.clone(),
            uid,
            conversation: None,
        })
    }

    pub(super) fn save(&self, r: &Request) -> fdo::Result<()> {
        lock(&self.store).save_request(r).map_err(failed)
    }

    /// Save a request the request's task holds, keeping the decisions users made
    /// meanwhile (they are stored by `Approve`/`Deny` directly): they come into `r`.
    pub(super) fn save_merging(&self, r: &mut Request) -> fdo::Result<()> {
        let store = lock(&self.store);
        if let Some(stored) = store.request(&r.id).map_err(failed)? {
            for (mine, theirs) in r.actions.iter_mut().zip(stored.actions) {
                if mine.decision == crate::request::Decision::Ask
                    && theirs.decision != crate::request::Decision::Ask
                {
                    mine.decision = theirs.decision;
                }
            }
        }
        store.save_request(r).map_err(failed)
    }

    pub(super) fn load(&self, id: &str) -> fdo::Result<Option<Request>> {
        lock(&self.store).request(id).map_err(failed)
    }

    pub(super) fn new_id(&self) -> String {
        use sha2::Digest;
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let h = sha2::Sha256::digest(format!("{}:{}:{}", t.as_nanos(), n, std::process::id()));
        hex::encode(&h[..5])
    }

    pub(super) fn emitter(&self, id: &str) -> Option<SignalEmitter<'static>> {
        let conn = self.conn.get()?;
        let owner = lock(&self.live).get(id)?.owner.clone()?;
        // (Fails only for an invalid object path; this one is a valid constant.)
        SignalEmitter::new(conn, crate::OBJECT_PATH)
            .ok()
            .map(|e| e.set_destination(BusName::Unique(owner)))
    }

    /// Verify the audit log against its anchors without holding up appends: the
    /// head is taken under the lock, the files are read on a blocking thread. Each
    /// verification that is ok moves the mark the next `SinceLast` resumes from (kept
    /// beside the anchor file). Verifications run one at a time; a caller that waited
    /// while one ended that was ok, with nothing appended since, gets its result. A
    /// user (`uid`, not root or the agent itself) has one verification waiting or
    /// running at most, so no one can queue the boot check behind theirs.
    pub(super) async fn verify_audit(
        &self,
        how: Verify,
        uid: Option<u32>,
    ) -> Result<crate::audit::Verification, ServiceError> {
        let _mine = match uid {
            Some(uid) => Some(self.verifying.enter(uid)?),
            None => None,
        };
        let arrived = lock(&self.verified).0;
        let _one_at_a_time = self.verify_gate.acquire().await?;
        let head = lock(&self.audit).snapshot();
        {
            let verified = lock(&self.verified);
            if let (ended, Some(last)) = &*verified
                && *ended > arrived
                && last.head == head
                && (last.how == how || last.how == Verify::Whole)
            {
                return Ok(last.result.clone());
            }
        }
        let config = self.config();
        let dir = config.state_dir.join("audit");
        let mut options = crate::audit::VerifyOptions::of(&config.audit);
        options.snapshot = Some(head.clone());
        let anchor_file = config.audit.anchor_file.clone();
        let mark_path = crate::audit::Mark::path(&anchor_file);
        let v = tokio::task::spawn_blocking(move || {
            if how == Verify::SinceLast {
                options.resume = crate::audit::Mark::load(&mark_path);
            }
            let v = crate::audit::verify(&dir, &options)?;
            if let Some(mark) = &v.mark
                && let Err(e) = mark.save(&mark_path, &dir, &anchor_file)
            {
                // (The next verification reads more; nothing is lost.)
                tracing::warn!("cannot keep the audit verification mark: {e}");
            }
            Ok::<_, crate::audit::AuditError>(v)
        })
        .await?
        .map_err(ServiceError::Verify)?;
        let mut verified = lock(&self.verified);
        verified.0 += 1;
        verified.1 = v.ok.then(|| Verified {
            head,
            how,
            result: v.clone(),
        });
        Ok(v)
    }
}

/// A verification that was ok: the head it read up to, how, and what it found.
struct Verified {
    head: crate::audit::Snapshot,
    how: Verify,
    result: crate::audit::Verification,
}

/// Calls of one kind that users have waiting or running: at most `limit` each, so
/// that no one user's calls queue everyone else's (root is not limited).
pub(super) struct PerUser {
    what: &'static str,
    limit: u32,
    calls: Mutex<HashMap<u32, u32>>,
}

impl PerUser {
    fn new(what: &'static str, limit: u32) -> Self {
        Self {
            what,
            limit,
            calls: Mutex::new(HashMap::new()),
        }
    }

    /// One more call of `uid`, until the value returned is dropped.
    pub(super) fn enter(&self, uid: u32) -> Result<Entered<'_>, ServiceError> {
        let mut calls = lock(&self.calls);
        let n = calls.entry(uid).or_default();
        if uid != 0 && *n >= self.limit {
            return Err(ServiceError::Busy {
                what: self.what,
                limit: self.limit,
            });
        }
        *n += 1;
        Ok(Entered { of: self, uid })
    }
}

/// A call counted by [`PerUser::enter`].
pub(super) struct Entered<'a> {
    of: &'a PerUser,
    uid: u32,
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        let mut calls = lock(&self.of.calls);
        if let Some(n) = calls.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                calls.remove(&self.uid);
            }
        }
    }
}

/// How much of the audit log a verification reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verify {
    /// All of it (seconds on a large log: root's alone).
    Whole,
    /// What came after the last verification that was ok.
    SinceLast,
}

/// The uid of the message's sender, as the bus knows it.
pub(super) async fn caller_uid(header: &Header<'_>, conn: &zbus::Connection) -> fdo::Result<u32> {
    let sender = header
        .sender()
        .ok_or_else(|| fdo::Error::AccessDenied("message without a sender".into()))?;
    fdo::DBusProxy::new(conn)
        .await?
        .get_connection_unix_user(BusName::Unique(sender.to_owned()))
        .await
}

/// The caller of the current method: the uid the bus daemon vouches for.
pub(super) async fn caller(
    shared: &Shared,
    header: &Header<'_>,
    conn: &zbus::Connection,
) -> fdo::Result<Caller> {
    let uid = caller_uid(header, conn).await?;
    let admin_groups = shared.config().policy.admin_groups.clone();
    tokio::task::spawn_blocking(move || Caller::from_uid(uid, &admin_groups))
        .await
        .map_err(failed)?
        .map_err(|e| fdo::Error::AccessDenied(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_agent_at_a_time_holds_a_state_directory() {
        let dir = tempfile::tempdir().unwrap();
        let first = StateLock::take(dir.path()).unwrap();
        // (A second open of the file is a second holder, as another process would be.)
        let second = StateLock::take(dir.path()).err().unwrap();
        assert!(
            matches!(&second, StateLockError::Held { path } if *path == dir.path().join(STATE_LOCK)),
            "{second:?}"
        );
        let message = second.to_string();
        assert!(
            message.contains(&dir.path().join("agent.lock").display().to_string())
                && message.contains("another devos-agent"),
            "{message}"
        );
        // It is free again once the first lets go.
        drop(first);
        StateLock::take(dir.path()).unwrap();
    }

    #[test]
    fn a_user_has_so_many_calls_at_once_and_root_any_number() {
        let calls = PerUser::new("queries", 2);
        let first = calls.enter(1000).unwrap();
        let _second = calls.enter(1000).unwrap();
        let third = calls.enter(1000);
        assert!(
            matches!(third, Err(ServiceError::Busy { limit: 2, .. })),
            "{:?}",
            third.err()
        );
        // Others are not held up by it, nor is root.
        let _other = calls.enter(1001).unwrap();
        let _root: Vec<_> = (0..10).map(|_| calls.enter(0).unwrap()).collect();
        // A call that ends makes room.
        drop(first);
        calls.enter(1000).unwrap();
    }
}
