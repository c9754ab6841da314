//! The `org.devos.Agent1` D-Bus service: requests in, plans, decisions and results
//! out. Callers are identified by the uid the bus daemon reports for their
//! connection, never by a pid or an argument. The typed proxies clients use live in
//! [`crate::client`].

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

use crate::approval::{self, Subject};
use crate::audit::AuditLog;
use crate::config::{AgentConfig, UserPolicy};
use crate::executor::{self, Caller};
use crate::planner;
use crate::request::{ActionRecord, ActionState, Decision, Remember, Request, Rule, State};
use crate::risk;
use crate::store::Store;

/// What the running request task is told.
enum Control {
    /// A decision was recorded for the action it waits on.
    Decided,
    Cancel,
}

struct Live {
    control: mpsc::UnboundedSender<Control>,
    /// The submitting connection: signals about the request go only there.
    owner: Option<UniqueName<'static>>,
}

/// State shared by the D-Bus objects and the request tasks.
pub struct Shared {
    config_path: PathBuf,
    config: RwLock<Arc<AgentConfig>>,
    store: Mutex<Store>,
    audit: Mutex<AuditLog>,
    live: Mutex<HashMap<String, Live>>,
    conn: OnceLock<zbus::Connection>,
    started: Instant,
    counter: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves data that is still consistent (every
    // change is a single statement or append), so keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn failed(e: impl std::fmt::Display) -> fdo::Error {
    fdo::Error::Failed(e.to_string())
}

fn now() -> String {
    humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string()
}

impl Shared {
    pub fn open(config_path: &Path, config: AgentConfig) -> anyhow::Result<Arc<Self>> {
        use anyhow::Context;
        std::fs::create_dir_all(&config.state_dir).with_context(|| {
            format!(
                "creating the state directory {}",
                config.state_dir.display()
            )
        })?;
        let mut store = Store::open(&config.state_dir.join("state.db"))?;
        let cancelled = store.recover(&now())?;
        let mut audit = AuditLog::open(&config.state_dir.join("audit"), &config.audit)?;
        audit.append(
            "agent.started",
            None,
            None,
            None,
            serde_json::json!({ "version": env!("CARGO_PKG_VERSION"), "cancelled-requests": cancelled }),
        )?;
        Ok(Arc::new(Shared {
            config_path: config_path.to_path_buf(),
            config: RwLock::new(Arc::new(config)),
            store: Mutex::new(store),
            audit: Mutex::new(audit),
            live: Mutex::new(HashMap::new()),
            conn: OnceLock::new(),
            started: Instant::now(),
            counter: AtomicU64::new(0),
        }))
    }

    fn config(&self) -> Arc<AgentConfig> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn audit(
        &self,
        event: &str,
        uid: Option<u32>,
        request: Option<&str>,
        action: Option<u32>,
        detail: serde_json::Value,
    ) {
        if let Err(e) = lock(&self.audit).append(event, uid, request, action, detail) {
            // Losing the audit trail is serious but must not take the agent down;
            // the journal keeps this line.
            tracing::error!("audit log write failed: {e}");
        }
    }

    fn save(&self, r: &Request) -> fdo::Result<()> {
        lock(&self.store).save_request(r).map_err(failed)
    }

    fn load(&self, id: &str) -> fdo::Result<Option<Request>> {
        lock(&self.store).request(id).map_err(failed)
    }

    fn new_id(&self) -> String {
        use sha2::Digest;
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let h = sha2::Sha256::digest(format!("{}:{}:{}", t.as_nanos(), n, std::process::id()));
        hex::encode(&h[..5])
    }

    fn emitter(&self, id: &str) -> Option<SignalEmitter<'static>> {
        let conn = self.conn.get()?;
        let owner = lock(&self.live).get(id)?.owner.clone()?;
        SignalEmitter::new(conn, crate::OBJECT_PATH)
            .ok()
            .map(|e| e.set_destination(BusName::Unique(owner)))
    }

    async fn state_changed(&self, r: &Request) {
        if let Some(e) = self.emitter(&r.id) {
            let _ = Agent::request_changed(&e, &r.id, r.state.as_str()).await;
        }
    }
}

/// The caller of the current method: the uid the bus daemon vouches for.
async fn caller(
    shared: &Shared,
    header: &Header<'_>,
    conn: &zbus::Connection,
) -> fdo::Result<Caller> {
    let sender = header
        .sender()
        .ok_or_else(|| fdo::Error::AccessDenied("message without a sender".into()))?;
    let uid = fdo::DBusProxy::new(conn)
        .await?
        .get_connection_unix_user(BusName::Unique(sender.to_owned()))
        .await?;
    Caller::from_uid(uid, &shared.config().policy.admin_groups).map_err(fdo::Error::AccessDenied)
}

/// A user's own policy file, read without following symlinks and only if they own it.
fn user_policy(caller: &Caller) -> Result<UserPolicy, String> {
    use std::io::Read;
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
    let policy: UserPolicy =
        toml::from_str(&text).map_err(|e| format!("{}: {}", path.display(), e.message()))?;
    for (i, rule) in policy.deny.iter().enumerate() {
        rule.validate()
            .map_err(|e| format!("{}: deny[{i}]: {e}", path.display()))?;
    }
    Ok(policy)
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".into())
}

/// A user's decision on one action, as `Approve`/`Deny` receive it.
struct Verdict<'a> {
    id: &'a str,
    index: u32,
    approve: bool,
    remember: &'a str,
    command_prefix: Vec<String>,
    path_prefix: &'a str,
}

/// The object served at [`crate::OBJECT_PATH`], interface `org.devos.Agent1`.
pub struct Agent {
    shared: Arc<Shared>,
}

impl Agent {
    /// A request of this caller (or any, for root when `root_sees_all`), or the same
    /// "not found" either way so ids of others are not confirmed.
    fn own_request(&self, id: &str, caller: &Caller, root_sees_all: bool) -> fdo::Result<Request> {
        match self.shared.load(id)? {
            Some(r) if r.uid == caller.uid || (root_sees_all && caller.uid == 0) => Ok(r),
            _ => Err(fdo::Error::InvalidArgs(format!(
                "no request {id} of yours; `devos history` lists them"
            ))),
        }
    }

    fn decide_action(&self, caller: &Caller, verdict: Verdict<'_>) -> fdo::Result<()> {
        let Verdict {
            id,
            index,
            approve,
            remember,
            command_prefix,
            path_prefix,
        } = verdict;
        let remember: Remember = remember.parse().map_err(fdo::Error::InvalidArgs)?;
        let mut r = self.own_request(id, caller, false)?;
        if r.state.is_final() {
            return Err(fdo::Error::Failed(format!(
                "request {id} is already {}",
                r.state.as_str()
            )));
        }
        let cwd = r.cwd.clone();
        let record = r.actions.get_mut(index as usize).ok_or_else(|| {
            fdo::Error::InvalidArgs(format!("request {id} has no action {index}"))
        })?;
        if record.decision != Decision::Ask {
            return Err(fdo::Error::Failed(format!(
                "action {index} of request {id} is not waiting for a decision"
            )));
        }
        let rule = if remember == Remember::Once {
            None
        } else {
            Some(self.remembered_rule(
                caller,
                record,
                &cwd,
                approve,
                remember,
                command_prefix,
                path_prefix,
            )?)
        };
        let by = format!("{} (uid {})", caller.user, caller.uid);
        record.decision = if approve {
            Decision::Approved { by: by.clone() }
        } else {
            Decision::Denied {
                by: by.clone(),
                reason: "denied by the user".into(),
            }
        };
        let detail = serde_json::json!({
            "action": record.description,
            "risk": record.risk.class,
            "decision": if approve { "approved" } else { "denied" },
            "by": by,
            "remember": remember,
        });
        r.updated = now();
        self.shared.save(&r)?;
        if let Some(rule) = rule {
            let rule = lock(&self.shared.store).add_rule(&rule).map_err(failed)?;
            self.shared.audit(
                "rule.added",
                Some(caller.uid),
                Some(id),
                Some(index),
                to_value(&rule),
            );
        }
        self.shared.audit(
            "action.decided",
            Some(caller.uid),
            Some(id),
            Some(index),
            detail,
        );
        if let Some(live) = lock(&self.shared.live).get(id) {
            let _ = live.control.send(Control::Decided);
        }
        Ok(())
    }

    /// The rule a "remember" creates: scoped to what the user gave, which must cover
    /// this action, or by default to its exact command (or its paths' directory).
    #[allow(clippy::too_many_arguments)]
    fn remembered_rule(
        &self,
        caller: &Caller,
        record: &ActionRecord,
        cwd: &Path,
        allow: bool,
        lifetime: Remember,
        command_prefix: Vec<String>,
        path_prefix: &str,
    ) -> fdo::Result<Rule> {
        if allow {
            approval::may_remember(&record.action, &record.risk)
                .map_err(fdo::Error::InvalidArgs)?;
        }
        let mut rule = Rule {
            id: 0,
            uid: caller.uid,
            allow,
            lifetime,
            command_prefix,
            path_prefix: (!path_prefix.is_empty()).then(|| PathBuf::from(path_prefix)),
            created: now(),
        };
        if rule.command_prefix.is_empty() && rule.path_prefix.is_none() {
            match record.action.argv() {
                Some(argv) => rule.command_prefix = argv,
                None => rule.path_prefix = Some(cwd.to_path_buf()),
            }
        }
        if rule.path_prefix.as_ref().is_some_and(|p| !p.is_absolute()) {
            return Err(fdo::Error::InvalidArgs(
                "a path prefix must be absolute".into(),
            ));
        }
        if !approval::rule_matches(&rule, &record.action, cwd) {
            return Err(fdo::Error::InvalidArgs(format!(
                "the scope ({}) does not cover this action ({}); give a prefix of its command or a directory holding its paths",
                approval::describe_rule(&rule),
                record.description
            )));
        }
        Ok(rule)
    }
}

fn to_value<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

#[zbus::interface(name = "org.devos.Agent1")]
impl Agent {
    /// Liveness check: always answers `pong`.
    async fn ping(&self) -> String {
        "pong".to_owned()
    }

    /// The image version (`IMAGE_VERSION` in os-release) this agent runs in.
    async fn version(&self) -> fdo::Result<String> {
        crate::os_release::image_version(&self.shared.config().os_release)
            .map_err(fdo::Error::Failed)
    }

    /// Submit a request in natural language, to be carried out in `cwd` (absolute).
    /// Returns the request id; planning and classification are done when it returns.
    async fn submit(
        &self,
        text: &str,
        cwd: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> fdo::Result<String> {
        let caller = caller(&self.shared, &header, conn).await?;
        let owner = header.sender().map(|s| s.to_owned());
        let started = Instant::now();
        let cwd = PathBuf::from(cwd);
        if text.trim().is_empty() || text.len() > 16 * 1024 {
            return Err(fdo::Error::InvalidArgs(
                "the request text must be 1 to 16384 bytes".into(),
            ));
        }
        if !cwd.is_absolute() {
            return Err(fdo::Error::InvalidArgs(format!(
                "the working directory {} must be absolute",
                cwd.display()
            )));
        }
        if !caller.may_enter(&cwd) {
            return Err(fdo::Error::AccessDenied(format!(
                "{} is not a directory you ({}) can enter",
                cwd.display(),
                caller.user
            )));
        }
        let cwd = std::fs::canonicalize(&cwd).map_err(failed)?;
        let config = self.shared.config();
        let user_policy = user_policy(&caller);
        let mut request = Request {
            id: self.shared.new_id(),
            uid: caller.uid,
            user: caller.user.clone(),
            text: text.to_owned(),
            cwd: cwd.clone(),
            state: State::Planned,
            summary: String::new(),
            planner: "local-rules".into(),
            error: None,
            created: now(),
            updated: now(),
            actions: Vec::new(),
            plan_micros: 0,
        };
        let ctx = planner::Context {
            cwd: &cwd,
            home: &caller.home,
            now: std::time::SystemTime::now(),
        };
        match (planner::plan(text, &ctx), &user_policy) {
            (Err(e), _) => {
                request.state = State::Unplanned;
                request.error = Some(e.to_string());
            }
            (Ok(_), Err(e)) => {
                request.state = State::Unplanned;
                request.error = Some(format!(
                    "your policy file is invalid, so nothing was planned: {e}"
                ));
            }
            (Ok(plan), Ok(user_policy)) => {
                request.summary = plan.summary;
                request.planner = plan.planner;
                let rules = lock(&self.shared.store)
                    .rules(Some(caller.uid))
                    .map_err(failed)?;
                let subject = Subject {
                    uid: caller.uid,
                    is_admin: caller.is_admin,
                    user_policy,
                };
                for (i, action) in plan.actions.into_iter().enumerate() {
                    let risk = risk::classify(&action, &cwd);
                    let decision =
                        approval::decide(&action, &risk, &cwd, &config.policy, &subject, &rules);
                    request.actions.push(ActionRecord {
                        index: i as u32,
                        description: action.describe(),
                        action,
                        risk,
                        decision,
                        state: ActionState::Pending,
                        exit_code: None,
                        output: String::new(),
                        output_truncated: false,
                        error: None,
                        sandbox: None,
                    });
                }
            }
        }
        request.plan_micros = started.elapsed().as_micros() as u64;
        self.shared.save(&request)?;
        self.shared.audit(
            "request.submitted",
            Some(caller.uid),
            Some(&request.id),
            None,
            serde_json::json!({
                "text": request.text,
                "cwd": request.cwd,
                "summary": request.summary,
                "state": request.state,
                "error": request.error,
            }),
        );
        for a in &request.actions {
            if a.decision != Decision::Ask {
                self.shared.audit(
                    "action.decided",
                    Some(caller.uid),
                    Some(&request.id),
                    Some(a.index),
                    serde_json::json!({
                        "action": a.description,
                        "risk": a.risk.class,
                        "reasons": a.risk.reasons,
                        "decision": a.decision,
                    }),
                );
            }
        }
        if request.state == State::Planned {
            let (tx, rx) = mpsc::unbounded_channel();
            lock(&self.shared.live).insert(request.id.clone(), Live { control: tx, owner });
            tokio::spawn(run_request(
                self.shared.clone(),
                request.id.clone(),
                caller,
                rx,
            ));
        }
        Ok(request.id)
    }

    /// One request (JSON): plan, actions with risk and decision, results.
    async fn get(
        &self,
        id: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> fdo::Result<String> {
        let caller = caller(&self.shared, &header, conn).await?;
        Ok(to_json(&self.own_request(id, &caller, true)?))
    }

    /// Requests still in flight (JSON array): the caller's own; root sees everyone's.
    async fn list(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> fdo::Result<String> {
        let caller = caller(&self.shared, &header, conn).await?;
        let uid = (caller.uid != 0).then_some(caller.uid);
        let list = lock(&self.shared.store)
            .requests(uid, true, 1000)
            .map_err(failed)?;
        Ok(to_json(&list))
    }

    /// The newest `limit` requests, finished or not (JSON array).
    async fn history(
        &self,
        limit: u32,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> fdo::Result<String> {
        let caller = caller(&self.shared, &header, conn).await?;
        let uid = (caller.uid != 0).then_some(caller.uid);
        let list = lock(&self.shared.store)
            .requests(uid, false, limit.clamp(1, 10_000))
            .map_err(failed)?;
        Ok(to_json(&list))
    }

    /// Approve action `action` of request `id`. `remember`: once, session or always;
    /// a remembered approval is scoped to `command_prefix` (argv words) and/or
    /// `path_prefix`, which must cover this action (empty: its exact command, or the
    /// working directory for file actions).
    // The D-Bus signature is the API; the header and connection are zbus's.
    #[allow(clippy::too_many_arguments)]
    async fn approve(
        &self,
        id: &str,
        action: u32,
        remember: &str,
        command_prefix: Vec<String>,
        path_prefix: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> fdo::Result<()> {
        let caller = caller(&self.shared, &header, conn).await?;
        self.decide_action(
            &caller,
            Verdict {
                id,
                index: action,
                approve: true,
                remember,
                command_prefix,
                path_prefix,
            },
        )
    }

    /// Deny action `action` of request `id` (the request stops). `remember` as for
    /// `Approve` creates a deny rule.
    #[allow(clippy::too_many_arguments)]
    async fn deny(
        &self,
        id: &str,
        action: u32,
        remember: &str,
        command_prefix: Vec<String>,
        path_prefix: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> fdo::Result<()> {
        let caller = caller(&self.shared, &header, conn).await?;
        self.decide_action(
            &caller,
            Verdict {
                id,
                index: action,
                approve: false,
                remember,
                command_prefix,
                path_prefix,
            },
        )
    }

    /// Cancel a request: nothing more runs, a running action is killed.
    async fn cancel(
        &self,
        id: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> fdo::Result<()> {
        let caller = caller(&self.shared, &header, conn).await?;
        let r = self.own_request(id, &caller, true)?;
        if r.state.is_final() {
            return Err(fdo::Error::Failed(format!(
                "request {id} is already {}",
                r.state.as_str()
            )));
        }
        self.shared.audit(
            "request.cancel",
            Some(caller.uid),
            Some(id),
            None,
            serde_json::json!({ "by": caller.user }),
        );
        if let Some(live) = lock(&self.shared.live).get(id) {
            let _ = live.control.send(Control::Cancel);
        }
        Ok(())
    }

    /// Remembered rules (JSON array): the caller's; root sees everyone's.
    async fn rules(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> fdo::Result<String> {
        let caller = caller(&self.shared, &header, conn).await?;
        let uid = (caller.uid != 0).then_some(caller.uid);
        Ok(to_json(
            &lock(&self.shared.store).rules(uid).map_err(failed)?,
        ))
    }

    /// Add a remembered rule for the caller: `decision` allow|deny, `lifetime`
    /// session|always, scoped by command and/or path prefix. Returns its id.
    async fn add_rule(
        &self,
        decision: &str,
        lifetime: &str,
        command_prefix: Vec<String>,
        path_prefix: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> fdo::Result<i64> {
        let caller = caller(&self.shared, &header, conn).await?;
        let allow = match decision {
            "allow" => true,
            "deny" => false,
            other => {
                return Err(fdo::Error::InvalidArgs(format!(
                    "decision must be allow or deny, not `{other}`"
                )));
            }
        };
        let lifetime: Remember = lifetime.parse().map_err(fdo::Error::InvalidArgs)?;
        if lifetime == Remember::Once {
            return Err(fdo::Error::InvalidArgs(
                "a rule lives for the session or always".into(),
            ));
        }
        let path_prefix = (!path_prefix.is_empty()).then(|| PathBuf::from(path_prefix));
        if command_prefix.is_empty() && path_prefix.is_none()
            || path_prefix.as_ref().is_some_and(|p| !p.is_absolute())
        {
            return Err(fdo::Error::InvalidArgs(
                "a rule needs a command prefix and/or an absolute path prefix".into(),
            ));
        }
        let rule = Rule {
            id: 0,
            uid: caller.uid,
            allow,
            lifetime,
            command_prefix,
            path_prefix,
            created: now(),
        };
        let rule = lock(&self.shared.store).add_rule(&rule).map_err(failed)?;
        self.shared
            .audit("rule.added", Some(caller.uid), None, None, to_value(&rule));
        Ok(rule.id)
    }

    /// Remove one of the caller's rules (root may remove anyone's).
    async fn remove_rule(
        &self,
        id: i64,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> fdo::Result<()> {
        let caller = caller(&self.shared, &header, conn).await?;
        let store = lock(&self.shared.store);
        match store.rule(id).map_err(failed)? {
            Some(rule) if rule.uid == caller.uid || caller.uid == 0 => {
                store.remove_rule(id).map_err(failed)?;
                drop(store);
                self.shared.audit(
                    "rule.removed",
                    Some(caller.uid),
                    None,
                    None,
                    to_value(&rule),
                );
                Ok(())
            }
            _ => Err(fdo::Error::InvalidArgs(format!(
                "no rule {id} of yours; `devos rules` lists them"
            ))),
        }
    }

    /// Verify the audit log's hash chain, checkpoints and head (JSON report; the
    /// first bad entry if any).
    async fn verify_audit(&self) -> fdo::Result<String> {
        let dir = self.shared.config().state_dir.join("audit");
        let _appends_wait = lock(&self.shared.audit);
        Ok(to_json(&crate::audit::verify(&dir).map_err(failed)?))
    }

    /// The agent's status (JSON): version, uptime, requests in flight, audit entries.
    async fn status(&self) -> fdo::Result<String> {
        let config = self.shared.config();
        let active = lock(&self.shared.live).len();
        let requests = lock(&self.shared.store).count_requests().map_err(failed)?;
        Ok(serde_json::json!({
            "agent-version": env!("CARGO_PKG_VERSION"),
            "image-version": crate::os_release::image_version(&config.os_release).ok(),
            "uptime-secs": self.shared.started.elapsed().as_secs(),
            "requests-in-flight": active,
            "requests-total": requests,
            "audit-entries": lock(&self.shared.audit).entries(),
            "auto-approve": config.policy.auto_approve,
            "sandbox-required": config.sandbox.required,
        })
        .to_string())
    }

    /// A request changed state (sent to the submitting connection only).
    #[zbus(signal)]
    pub async fn request_changed(
        emitter: &SignalEmitter<'_>,
        id: &str,
        state: &str,
    ) -> zbus::Result<()>;

    /// An action waits for `Approve` or `Deny`; `risk` is its class, `description`
    /// the exact command or file operation.
    #[zbus(signal)]
    pub async fn approval_needed(
        emitter: &SignalEmitter<'_>,
        id: &str,
        action: u32,
        risk: &str,
        description: &str,
    ) -> zbus::Result<()>;

    /// Output of a running action, as it is produced.
    #[zbus(signal)]
    pub async fn action_output(
        emitter: &SignalEmitter<'_>,
        id: &str,
        action: u32,
        data: &str,
    ) -> zbus::Result<()>;
}

/// `org.devos.Agent1.Admin`: methods only root may call (the bus policy enforces it;
/// the method checks again).
pub struct Admin {
    shared: Arc<Shared>,
}

#[zbus::interface(name = "org.devos.Agent1.Admin")]
impl Admin {
    /// Re-read the configuration file; a broken file is refused and the old one kept.
    async fn reload_config(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> fdo::Result<()> {
        let caller = caller(&self.shared, &header, conn).await?;
        if caller.uid != 0 {
            return Err(fdo::Error::AccessDenied(
                "only root may reload the configuration".into(),
            ));
        }
        let new = AgentConfig::load(&self.shared.config_path).map_err(failed)?;
        self.shared.audit(
            "config.reloaded",
            Some(0),
            None,
            None,
            to_value(&new.policy),
        );
        *self
            .shared
            .config
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
        Ok(())
    }
}

/// Carry out a request: wait for each pending decision, re-check each action's risk
/// just before it runs, run it sandboxed, stop at the first denial or failure.
async fn run_request(
    shared: Arc<Shared>,
    id: String,
    caller: Caller,
    mut control: mpsc::UnboundedReceiver<Control>,
) {
    let outcome = drive(&shared, &id, &caller, &mut control).await;
    if let Err(e) = outcome {
        tracing::error!(request = %id, "request failed inside the agent: {e}");
        if let Ok(Some(mut r)) = shared.load(&id) {
            r.state = State::Failed;
            r.error = Some(format!("internal error: {e}"));
            r.updated = now();
            let _ = shared.save(&r);
            shared.state_changed(&r).await;
        }
    }
    lock(&shared.live).remove(&id);
}

async fn set_state(shared: &Shared, r: &mut Request, state: State) -> fdo::Result<()> {
    r.state = state;
    r.updated = now();
    shared.save(r)?;
    shared.state_changed(r).await;
    if state.is_final() {
        shared.audit(
            "request.finished",
            Some(r.uid),
            Some(&r.id),
            None,
            serde_json::json!({ "state": state, "error": r.error }),
        );
    }
    Ok(())
}

fn skip_rest(r: &mut Request, from: usize) {
    for a in r.actions.iter_mut().skip(from) {
        if a.state == ActionState::Pending {
            a.state = ActionState::Skipped;
        }
    }
}

async fn drive(
    shared: &Arc<Shared>,
    id: &str,
    caller: &Caller,
    control: &mut mpsc::UnboundedReceiver<Control>,
) -> fdo::Result<()> {
    let mut r = shared.load(id)?.ok_or_else(|| failed("request vanished"))?;
    if let Some(denied) = r
        .actions
        .iter()
        .find(|a| matches!(a.decision, Decision::Denied { .. }))
    {
        r.error = Some(format!(
            "action {} was denied, so nothing ran: {}",
            denied.index,
            match &denied.decision {
                Decision::Denied { by, reason } => format!("{reason} ({by})"),
                _ => String::new(),
            }
        ));
        skip_rest(&mut r, 0);
        return set_state(shared, &mut r, State::Denied).await;
    }
    for i in 0..r.actions.len() {
        // Wait for a decision if this action needs one.
        while r.actions[i].decision == Decision::Ask {
            if r.state != State::AwaitingApproval {
                set_state(shared, &mut r, State::AwaitingApproval).await?;
            }
            if let Some(e) = shared.emitter(id) {
                let a = &r.actions[i];
                let _ =
                    Agent::approval_needed(&e, id, a.index, a.risk.class.as_str(), &a.description)
                        .await;
            }
            match control.recv().await {
                Some(Control::Decided) => {
                    r = shared.load(id)?.ok_or_else(|| failed("request vanished"))?
                }
                Some(Control::Cancel) | None => {
                    skip_rest(&mut r, i);
                    return set_state(shared, &mut r, State::Cancelled).await;
                }
            }
        }
        if let Decision::Denied { by, reason } = &r.actions[i].decision {
            r.error = Some(format!("action {i} denied by {by}: {reason}"));
            skip_rest(&mut r, i);
            return set_state(shared, &mut r, State::Denied).await;
        }
        // Things may have changed since approval (a symlink swapped in, a file
        // created): an action whose risk grew does not run.
        let now_risk = risk::classify(&r.actions[i].action, &r.cwd);
        let approved = r.actions[i].risk.clone();
        if now_risk.class > approved.class
            || !now_risk
                .writes_outside
                .iter()
                .all(|p| approved.writes_outside.contains(p))
        {
            let a = &mut r.actions[i];
            a.state = ActionState::Failed;
            a.error = Some(format!(
                "its risk changed since it was approved ({} → {}: {}); nothing ran",
                approved.class,
                now_risk.class,
                now_risk.reasons.join("; ")
            ));
            r.error = a.error.clone();
            skip_rest(&mut r, i + 1);
            shared.audit(
                "action.refused",
                Some(r.uid),
                Some(id),
                Some(i as u32),
                serde_json::json!({ "reason": r.error }),
            );
            return set_state(shared, &mut r, State::Failed).await;
        }
        r.actions[i].state = ActionState::Running;
        set_state(shared, &mut r, State::Running).await?;
        let config = shared.config();
        let tmp = executor::private_tmp(caller, &format!("{id}-{i}")).ok();
        let spec = executor::spec_for(&r.actions[i], caller, &r.cwd, tmp.clone(), &config.sandbox);
        let emitter = shared.emitter(id);
        let (out_tx, mut out_rx) = mpsc::unbounded_channel::<String>();
        let forward = {
            let id = id.to_owned();
            async move {
                while let Some(chunk) = out_rx.recv().await {
                    if let Some(e) = &emitter {
                        let _ = Agent::action_output(e, &id, i as u32, &chunk).await;
                    }
                }
            }
        };
        let cancel = async {
            loop {
                match control.recv().await {
                    Some(Control::Cancel) | None => break,
                    Some(Control::Decided) => {}
                }
            }
        };
        let (outcome, ()) = tokio::join!(
            async {
                let o = executor::execute(
                    &spec,
                    &config.sandbox,
                    |chunk| {
                        let _ = out_tx.send(chunk.to_owned());
                    },
                    cancel,
                )
                .await;
                drop(out_tx);
                o
            },
            forward
        );
        if let Some(tmp) = tmp {
            let _ = std::fs::remove_dir_all(tmp);
        }
        let ok = outcome.succeeded();
        let a = &mut r.actions[i];
        a.state = if ok {
            ActionState::Succeeded
        } else {
            ActionState::Failed
        };
        a.exit_code = outcome.exit_code;
        a.output = outcome.output;
        a.output_truncated = outcome.truncated;
        a.error = outcome.error.clone();
        a.sandbox = outcome.sandbox;
        shared.audit(
            "action.finished",
            Some(r.uid),
            Some(id),
            Some(i as u32),
            serde_json::json!({
                "action": a.description,
                "exit-code": a.exit_code,
                "error": a.error,
                "sandbox": a.sandbox,
                "output-sha256": hex::encode(<sha2::Sha256 as sha2::Digest>::digest(a.output.as_bytes())),
            }),
        );
        if !ok {
            let cancelled = outcome.error.as_deref() == Some("cancelled");
            r.error = Some(match (&outcome.error, outcome.exit_code) {
                (Some(e), _) => format!("action {i} failed: {e}"),
                (None, Some(code)) => format!("action {i} exited with status {code}"),
                (None, None) => format!("action {i} failed"),
            });
            skip_rest(&mut r, i + 1);
            return set_state(
                shared,
                &mut r,
                if cancelled {
                    State::Cancelled
                } else {
                    State::Failed
                },
            )
            .await;
        }
    }
    set_state(shared, &mut r, State::Done).await
}

/// Check the agent and send the CloudFormation health signal the instance's user data
/// asks for (see [`crate::health`]); logged and audited, never fatal.
async fn health_signal(shared: Arc<Shared>, conn: zbus::Connection) {
    let config = shared.config();
    let marker = config.state_dir.join("health-signalled");
    let checks = async |request: &crate::health::Request| {
        let owner = async {
            let dbus = zbus::fdo::DBusProxy::new(&conn).await?;
            let name = zbus::names::BusName::try_from(crate::BUS_NAME)?;
            Ok::<_, zbus::Error>(dbus.get_name_owner(name).await?.to_string())
        };
        let bus = match (owner.await, conn.unique_name()) {
            (Ok(owner), Some(me)) if owner == me.as_str() => Ok(()),
            (Ok(owner), _) => Err(format!(
                "{} is owned by {owner}, not by the agent",
                crate::BUS_NAME
            )),
            (Err(e), _) => Err(format!(
                "cannot ask the bus who owns {}: {e}",
                crate::BUS_NAME
            )),
        };
        let audit = {
            let _appends_wait = lock(&shared.audit);
            crate::audit::verify(&config.state_dir.join("audit"))
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        vec![
            crate::health::Check {
                name: "bus-name",
                result: bus,
            },
            crate::health::version_check(request.version.as_deref(), &config.os_release),
            crate::health::Check {
                name: "audit-chain",
                result: audit,
            },
        ]
    };
    match crate::health::signal(&marker, checks).await {
        Ok(crate::health::Outcome::Sent {
            request,
            instance,
            status,
            reason,
        }) => {
            tracing::info!(stack = %request.stack, resource = %request.resource, %instance, status = %status.as_str(), "health signal sent");
            let mut audit = lock(&shared.audit);
            let _ = audit.append(
                "health.signalled",
                None,
                None,
                None,
                serde_json::json!({
                    "stack": request.stack, "resource": request.resource, "region": request.region,
                    "instance": instance, "status": status.as_str(), "reason": reason,
                }),
            );
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("health signal: {e:#}"),
    }
}

/// Connect to the system bus, own [`crate::BUS_NAME`] and serve the agent until
/// `shutdown` resolves. `DBUS_SYSTEM_BUS_ADDRESS` selects another bus (tests do).
pub async fn serve(
    config_path: &Path,
    config: AgentConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let shared = Shared::open(config_path, config)?;
    let conn = zbus::connection::Builder::system()?
        .serve_at(
            crate::OBJECT_PATH,
            Agent {
                shared: shared.clone(),
            },
        )?
        .serve_at(
            crate::OBJECT_PATH,
            Admin {
                shared: shared.clone(),
            },
        )?
        .name(crate::BUS_NAME)?
        .build()
        .await?;
    let _ = shared.conn.set(conn.clone());
    tracing::info!(name = crate::BUS_NAME, "serving on the system bus");
    tokio::spawn(health_signal(shared.clone(), conn.clone()));
    shutdown.await;
    tracing::info!("shutting down");
    conn.release_name(crate::BUS_NAME).await.ok();
    let mut audit = lock(&shared.audit);
    let _ = audit.append("agent.stopped", None, None, None, serde_json::json!({}));
    let _ = audit.checkpoint();
    Ok(())
}
