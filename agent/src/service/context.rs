//! The `org.devos.Agent1.Context` interface and what serves it: one index per user
//! ([`Index`]) and one watcher per user with projects (`devos-agent context-watch`,
//! running as that user), whose updates a thread of the daemon writes to the index.
//! Every method answers from the caller's own index only.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use zbus::fdo;
use zbus::message::Header;

use super::shared::{
    Entered, MAX_PATH, MAX_WORD, Shared, bounded, caller, failed, fits, invalid_args, lock,
};
use crate::caller::Caller;
use crate::config::ContextConfig;
use crate::context::index::{Index, IndexError};
use crate::context::{Command, Question, Update, WatchJob, procs};

/// How long adding a project waits for the watcher to say whether it can.
const ADD_TIMEOUT: Duration = Duration::from_secs(20);
/// Results one query returns at most.
const MAX_RESULTS: u32 = 1000;
/// The longest update line the daemon reads from a watcher (they batch entries to stay
/// well below: 2,000 entries or 1 MiB of text).
const MAX_UPDATE_BYTES: u64 = 16 << 20;
/// Watcher restarts in a row (less than a minute apart) before giving up.
const MAX_RESTARTS: u32 = 5;

/// Adds waiting for the watcher's answer, by token: auto, text, where the answer goes.
type Waiting = HashMap<
    u64,
    (
        bool,
        bool,
        tokio::sync::oneshot::Sender<Result<PathBuf, String>>,
    ),
>;

/// One user's index and watcher.
pub(super) struct UserContext {
    caller: Caller,
    dir: PathBuf,
    index: Mutex<Index>,
    /// The running watcher: its pid and the queue of commands to it.
    watcher: Mutex<Option<(u32, SyncSender<Vec<u8>>)>>,
    /// Adds waiting for the watcher's answer, by token: (auto, answer).
    waiting: Mutex<Waiting>,
    /// Why the watcher is not running, when it is not.
    stopped: Mutex<Option<String>>,
    restarts: Mutex<(u32, Option<Instant>)>,
    /// `max-files` and `max-index-mib` when the index was opened.
    limits: (u64, u64),
    /// `max-projects` when the index was opened.
    max_projects: u32,
}

/// Every user's context, opened on first use.
#[derive(Default)]
pub struct Engine {
    users: Mutex<HashMap<u32, Arc<UserContext>>>,
    tokens: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub(super) enum ContextError {
    #[error("the context engine is off on this machine ([context] enabled = false in agent.toml)")]
    Off,
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error(
        "you have {n} projects ([context] max-projects = {limit}); remove one first (`devos context remove DIR`)"
    )]
    TooManyProjects { n: usize, limit: u32 },
    #[error("{0}")]
    Refused(String),
    #[error("{0} is not one of your projects; `devos context list` shows them")]
    NotAProject(PathBuf),
    #[error("the watcher did not answer within {}s", ADD_TIMEOUT.as_secs())]
    NoAnswer,
    #[error("cannot start the watcher: {0}")]
    Start(std::io::Error),
}

impl From<ContextError> for fdo::Error {
    fn from(e: ContextError) -> fdo::Error {
        match e {
            ContextError::TooManyProjects { .. } => fdo::Error::LimitsExceeded(e.to_string()),
            ContextError::Refused(_) | ContextError::NotAProject(_) => invalid_args(e),
            _ => failed(e),
        }
    }
}

impl Engine {
    fn dir(config: &crate::config::AgentConfig, uid: u32) -> PathBuf {
        config.state_dir.join("context").join(uid.to_string())
    }

    /// `caller`'s context (opening their index on first use).
    fn user(&self, shared: &Shared, caller: &Caller) -> Result<Arc<UserContext>, ContextError> {
        let config = shared.config();
        if !config.context.enabled {
            return Err(ContextError::Off);
        }
        let mut users = lock(&self.users);
        if let Some(u) = users.get(&caller.uid) {
            return Ok(u.clone());
        }
        let dir = Self::dir(&config, caller.uid);
        let index = Index::open(
            &dir.join("index.db"),
            config.context.max_files,
            config.context.max_index_mib,
        )?;
        if index.rebuilt.is_some() {
            // The projects survive in their list beside the database.
            for p in read_project_list(&dir) {
                index.add_project(&p.root, p.auto, p.text)?;
            }
        }
        let user = Arc::new(UserContext {
            caller: caller.clone(),
            dir,
            index: Mutex::new(index),
            watcher: Mutex::new(None),
            waiting: Mutex::new(HashMap::new()),
            stopped: Mutex::new(None),
            restarts: Mutex::new((0, None)),
            limits: (config.context.max_files, config.context.max_index_mib),
            max_projects: config.context.max_projects,
        });
        users.insert(caller.uid, user.clone());
        Ok(user)
    }

    /// Start the watchers of every user with projects (at the agent's start).
    pub(super) fn resume(shared: &Arc<Shared>) {
        let config = shared.config();
        if !config.context.enabled {
            return;
        }
        let Ok(list) = std::fs::read_dir(config.state_dir.join("context")) else {
            return;
        };
        for entry in list.flatten() {
            let Some(uid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            let caller = match Caller::from_uid(uid, &config.policy.admin_groups) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(uid, "not resuming the context of uid {uid}: {e}");
                    continue;
                }
            };
            match shared.context.user(shared, &caller) {
                Ok(user) => {
                    if !lock(&user.index).roots().unwrap_or_default().is_empty()
                        && let Err(e) = ensure_watcher(shared, &user)
                    {
                        tracing::warn!(uid, "cannot resume the context watcher: {e}");
                    }
                }
                Err(e) => tracing::warn!(uid, "cannot open the context index: {e}"),
            }
        }
    }

    /// Register `path` for `caller` (`auto`: because a request ran in it; `text`:
    /// index the text of its small text files too).
    pub(super) async fn add(
        shared: &Arc<Shared>,
        caller: &Caller,
        path: &Path,
        auto: bool,
        text: bool,
    ) -> Result<PathBuf, ContextError> {
        let user = shared.context.user(shared, caller)?;
        let limit = shared.config().context.max_projects;
        let roots = lock(&user.index).roots()?;
        let n = roots.len();
        // (Adding one of them again, to index its text too, takes no new place.)
        if n >= limit as usize && !roots.iter().any(|r| r == path) {
            return Err(ContextError::TooManyProjects { n, limit });
        }
        let token = shared.context.tokens.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        lock(&user.waiting).insert(token, (auto, text, tx));
        let sent = send(
            shared,
            &user,
            &Command::Add {
                token,
                path: path.to_path_buf(),
                text,
            },
        );
        if let Err(e) = sent {
            lock(&user.waiting).remove(&token);
            return Err(e);
        }
        let root = match tokio::time::timeout(ADD_TIMEOUT, rx).await {
            Ok(Ok(answer)) => answer.map_err(ContextError::Refused)?,
            _ => {
                lock(&user.waiting).remove(&token);
                return Err(ContextError::NoAnswer);
            }
        };
        write_project_list(&user)?;
        Ok(root)
    }

    pub(super) fn remove(
        shared: &Arc<Shared>,
        caller: &Caller,
        path: &Path,
    ) -> Result<PathBuf, ContextError> {
        let user = shared.context.user(shared, caller)?;
        let root = PathBuf::from(path.to_string_lossy().trim_end_matches('/'));
        if !lock(&user.index).remove_project(&root)? {
            return Err(ContextError::NotAProject(root));
        }
        write_project_list(&user)?;
        // (A watcher that is not running resumes without it.)
        let _ = tell(&user, &Command::Remove { root: root.clone() });
        Ok(root)
    }
}

/// Register the repository a request runs in (`[context] auto-add-repos`), in the
/// background, unless it is a project (or in one) already or the user has as many
/// projects as they may.
pub(super) fn auto_add(
    shared: &Arc<Shared>,
    caller: &Caller,
    root: &Path,
    config: &crate::config::AgentConfig,
) {
    if !config.context.enabled || !config.context.auto_add_repos {
        return;
    }
    let Ok(user) = shared.context.user(shared, caller) else {
        return;
    };
    let roots = lock(&user.index).roots().unwrap_or_default();
    // (A repository at the home directory — dotfiles — or at / would index everything.)
    if roots.iter().any(|r| root.starts_with(r))
        || roots.len() >= config.context.max_projects as usize
        || root == caller.home
        || root == Path::new("/")
    {
        return;
    }
    let (shared, caller, root) = (shared.clone(), caller.clone(), root.to_path_buf());
    tokio::spawn(async move {
        match Engine::add(&shared, &caller, &root, true, false).await {
            Ok(root) => {
                let _ = shared.audit(
                    "context.project-added",
                    Some(caller.uid),
                    None,
                    None,
                    json!({ "root": root, "auto": true }),
                );
            }
            Err(e) => tracing::info!(uid = caller.uid, "not indexing {}: {e}", root.display()),
        }
    });
}

/// Send a command to `user`'s watcher, starting it first when it is not running.
fn send(
    shared: &Arc<Shared>,
    user: &Arc<UserContext>,
    command: &Command,
) -> Result<(), ContextError> {
    ensure_watcher(shared, user)?;
    tell(user, command).map_err(ContextError::Start)
}

/// Write a command to `user`'s running watcher (none: nothing to tell).
fn tell(user: &UserContext, command: &Command) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(command).unwrap_or_default();
    line.push(b'\n');
    match lock(&user.watcher).as_mut() {
        Some((pid, commands)) => queue(*pid, commands, line),
        None => Err(std::io::Error::other("the watcher is not running")),
    }
}

/// Kill the watcher `pid`. Only for a pid still in the user's slot: a watcher is
/// reaped only once out of it, so the pid is still its own.
fn kill_watcher(pid: u32) {
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
}

/// Commands a watcher may leave unread before it counts as not reading them.
const COMMANDS_WAITING: usize = 64;

/// Queue `line` for the watcher `pid` (a thread of its own writes them to its stdin).
/// A watcher that leaves [`COMMANDS_WAITING`] unread (its user stopped it, or it is
/// stuck) is killed, and started again as after any other stop: no caller ever waits
/// on a watcher's pipe, holding the user's watcher lock on one of the bus's threads.
fn queue(pid: u32, commands: &SyncSender<Vec<u8>>, line: Vec<u8>) -> std::io::Result<()> {
    match commands.try_send(line) {
        Ok(()) => Ok(()),
        Err(TrySendError::Full(_)) => {
            kill_watcher(pid);
            Err(std::io::Error::other(
                "the watcher did not read its commands (was it stopped?); it is started again",
            ))
        }
        Err(TrySendError::Disconnected(_)) => Err(std::io::Error::other("the watcher stopped")),
    }
}

/// Start `user`'s watcher unless it runs (checked and started under one lock, so two
/// callers never start two).
///
/// Locks: the index's is never taken while the watcher's is held (nor the other way
/// round anywhere), so the projects are read before the watcher's lock is taken.
fn ensure_watcher(shared: &Arc<Shared>, user: &Arc<UserContext>) -> Result<(), ContextError> {
    if lock(&user.watcher).is_some() {
        return Ok(());
    }
    let projects = lock(&user.index).project_jobs()?;
    let mut watcher = lock(&user.watcher);
    if watcher.is_none() {
        *watcher = Some(start_watcher(shared, user, projects)?);
        *lock(&user.stopped) = None;
    }
    Ok(())
}

/// Start a watcher for `user` and the thread that writes its updates to the index;
/// returns its pid and the queue of commands to it.
fn start_watcher(
    shared: &Arc<Shared>,
    user: &Arc<UserContext>,
    projects: Vec<crate::context::ProjectJob>,
) -> Result<(u32, SyncSender<Vec<u8>>), ContextError> {
    let config = shared.config();
    let job = WatchJob {
        caller: user.caller.clone(),
        projects,
        max_files: config.context.max_files,
        max_watches: config.context.max_watches,
        rescan_secs: config.context.rescan_secs,
        secrets: user.caller.secrets(&config.sandbox.secrets),
    };
    let mut child = std::process::Command::new(&shared.exe)
        .arg("context-watch")
        .env_clear()
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(ContextError::Start)?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| ContextError::Start(std::io::Error::other("no pipe to the watcher")))?;
    let pid = child.id();
    let (commands, waiting) = std::sync::mpsc::sync_channel::<Vec<u8>>(COMMANDS_WAITING);
    std::thread::spawn(move || {
        // Ends when the watcher stops (its pipe breaks) or is retired (the queue goes).
        for line in waiting {
            if stdin.write_all(&line).is_err() {
                break;
            }
        }
    });
    let mut line = serde_json::to_vec(&job).unwrap_or_default();
    line.push(b'\n');
    queue(pid, &commands, line).map_err(ContextError::Start)?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let last_error = Arc::new(Mutex::new(String::new()));
    if let Some(stderr) = stderr {
        let last = last_error.clone();
        let uid = user.caller.uid;
        std::thread::spawn(move || {
            let mut lines = std::io::BufReader::new(stderr);
            let mut line = Vec::new();
            // (Read 4 KiB at most at a time: a longer line comes in pieces.)
            while std::io::Read::take(&mut lines, 4096)
                .read_until(b'\n', &mut line)
                .is_ok_and(|n| n > 0)
            {
                let text = String::from_utf8_lossy(&line).trim_end().to_owned();
                line.clear();
                tracing::warn!(uid, "context watcher: {text}");
                *lock(&last) = text;
            }
        });
    }
    let (shared, user) = (shared.clone(), user.clone());
    std::thread::spawn(move || {
        if let Some(out) = stdout {
            let mut reader = std::io::BufReader::new(out);
            let mut line = Vec::new();
            loop {
                line.clear();
                // (A line is a few MiB at most; a longer one is a broken watcher, which
                // is stopped and started again rather than read into memory whole.)
                match std::io::Read::take(&mut reader, MAX_UPDATE_BYTES)
                    .read_until(b'\n', &mut line)
                {
                    Ok(0) | Err(_) => break,
                    Ok(_) if !line.ends_with(b"\n") => {
                        tracing::error!(
                            uid = user.caller.uid,
                            "context watcher: an update longer than {MAX_UPDATE_BYTES} bytes; restarting it"
                        );
                        let _ = child.kill();
                        break;
                    }
                    Ok(_) => {}
                }
                match serde_json::from_slice::<Update>(&line) {
                    Ok(update) => take(&user, &update),
                    Err(e) => tracing::warn!("context watcher: a bad update: {e}"),
                }
            }
        }
        // Out of the slot before it is reaped: no one signals its pid once it could
        // be another process's.
        let retired = {
            let mut watcher = lock(&user.watcher);
            match watcher.as_ref() {
                // (A newer watcher took over; this one was retired.)
                Some((running, _)) if *running != pid => true,
                _ => {
                    *watcher = None;
                    false
                }
            }
        };
        let status = child.wait();
        if retired {
            return;
        }
        let why = format!(
            "the watcher stopped ({}){}",
            status.map_or_else(|e| e.to_string(), |s| s.to_string()),
            match lock(&last_error).as_str() {
                "" => String::new(),
                e => format!(": {e}"),
            }
        );
        for (_, (_, _, tx)) in lock(&user.waiting).drain() {
            let _ = tx.send(Err(why.clone()));
        }
        restart_later(&shared, &user, why);
    });
    Ok((pid, commands))
}

/// After a watcher stopped: start it again (unless it keeps stopping, or the user has
/// no projects left), and say so in the status meanwhile.
fn restart_later(shared: &Arc<Shared>, user: &Arc<UserContext>, why: String) {
    tracing::warn!(uid = user.caller.uid, "{why}");
    let again = {
        let mut r = lock(&user.restarts);
        let recent = r.1.is_some_and(|t| t.elapsed() < Duration::from_secs(60));
        r.0 = if recent { r.0 + 1 } else { 1 };
        r.1 = Some(Instant::now());
        r.0 <= MAX_RESTARTS
    };
    let has_projects = !lock(&user.index).roots().unwrap_or_default().is_empty();
    *lock(&user.stopped) = Some(if again && has_projects {
        format!("{why}; restarting")
    } else if has_projects {
        format!(
            "{why}; it stopped {MAX_RESTARTS} times in a row, so it is not restarted until a project is added"
        )
    } else {
        why
    });
    if again && has_projects {
        std::thread::sleep(Duration::from_secs(2));
        if let Err(e) = ensure_watcher(shared, user) {
            *lock(&user.stopped) = Some(e.to_string());
        }
    }
}

/// Write one update to the index; a corrupt index is rebuilt.
fn take(user: &UserContext, update: &Update) {
    let mut index = lock(&user.index);
    match update {
        Update::Added { token, root } => {
            let answer = lock(&user.waiting).remove(token);
            let (auto, text) = answer.as_ref().map_or((false, false), |(a, t, _)| (*a, *t));
            // Counted again here, where adds are taken one at a time: adds sent
            // together all passed the first count.
            let roots = index.roots().unwrap_or_default();
            let over = !roots.contains(root) && roots.len() >= user.max_projects as usize;
            let result = if over {
                Err(ContextError::TooManyProjects {
                    n: roots.len(),
                    limit: user.max_projects,
                }
                .to_string())
            } else {
                index
                    .add_project(root, auto, text)
                    .map_err(|e| e.to_string())
            };
            // (The watcher's lock is never taken under the index's: starting a
            // watcher takes them the other way round.)
            drop(index);
            if over {
                let _ = tell(user, &Command::Remove { root: root.clone() });
            }
            if let Some((_, _, tx)) = answer {
                let _ = tx.send(result.map(|()| root.clone()));
            }
        }
        Update::Refused { token, why } => {
            if let Some((_, _, tx)) = lock(&user.waiting).remove(token) {
                let _ = tx.send(Err(why.clone()));
            }
        }
        _ => {
            if let Err(e) = index.apply(update) {
                tracing::error!(uid = user.caller.uid, "context index: {e}");
                if let IndexError::Sqlite { source, .. } = &e
                    && crate::context::index::is_corrupt(source)
                {
                    // Rebuilt on next use; this watcher's updates go nowhere meanwhile.
                    // (Dropping the watcher's stdin ends it; it restarts with a scan.)
                    drop(index);
                    rebuild(user);
                }
            }
        }
    }
}

fn rebuild(user: &UserContext) {
    let path = user.dir.join("index.db");
    // Moving the file aside makes the next open see it missing; the projects come back
    // from their list.
    let aside = path.with_extension(format!("db.corrupt-{}", crate::caller::now_secs()));
    let _ = std::fs::rename(&path, &aside);
    let (max_files, max_mib) = user.limits;
    if let Ok(fresh) = Index::open(&path, max_files, max_mib) {
        for p in read_project_list(&user.dir) {
            let _ = fresh.add_project(&p.root, p.auto, p.text);
        }
        let mut index = lock(&user.index);
        *index = fresh;
        index.rebuilt = Some(json!({
            "at": crate::caller::now_secs(),
            "error": "found corrupt while writing",
            "moved-to": aside,
        }));
    }
    // Killed, not only let go: a watcher its user stopped would never read the end of
    // its commands. (Its pid is still its own: it is reaped only once out of the slot.)
    if let Some((pid, _)) = lock(&user.watcher).take() {
        kill_watcher(pid);
    }
}

/// One project in the list beside the index.
#[derive(serde::Serialize, serde::Deserialize)]
struct Listed {
    root: PathBuf,
    auto: bool,
    #[serde(default)]
    text: bool,
}

/// The project list beside the index (`projects.json`).
fn read_project_list(dir: &Path) -> Vec<Listed> {
    std::fs::read(dir.join("projects.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn write_project_list(user: &UserContext) -> Result<(), ContextError> {
    let list: Vec<Listed> = lock(&user.index)
        .projects()?
        .into_iter()
        .map(|p| Listed {
            root: p.root,
            auto: p.auto,
            text: p.text,
        })
        .collect();
    let path = user.dir.join("projects.json");
    let tmp = user.dir.join("projects.json.tmp");
    let io = |source| {
        ContextError::Index(IndexError::Io {
            path: path.clone(),
            source,
        })
    };
    std::fs::write(&tmp, serde_json::to_vec(&list).unwrap_or_default()).map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)
}

/// `since` as seconds since the epoch: empty (the last 24 hours), `today` (since
/// midnight UTC), a duration back (`2h`, `3d`, `90m`), an RFC 3339 time, or seconds
/// since the epoch.
pub fn parse_since(since: &str, now: i64) -> Result<i64, String> {
    let s = since.trim();
    if s.is_empty() {
        return Ok(now - 86_400);
    }
    if s == "today" {
        return Ok(now - now.rem_euclid(86_400));
    }
    if let Ok(secs) = s.parse::<i64>() {
        return Ok(secs);
    }
    if let Ok(d) = humantime::parse_duration(s) {
        let back = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
        return Ok(now.saturating_sub(back).max(0));
    }
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(t
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64));
    }
    Err(format!(
        "since {s:?}: use `today`, a duration back such as `2h` or `3d`, an RFC 3339 time or seconds since the epoch"
    ))
}

/// Words a query may have, and bytes.
const MAX_QUERY_WORDS: usize = 16;
const MAX_QUERY_BYTES: usize = 1024;

/// A query is at most 16 words and 1 KiB: each word is matched against every
/// candidate, and the answer should come in milliseconds for everyone.
fn check_query(query: &str) -> Result<(), String> {
    if query.len() > MAX_QUERY_BYTES || query.split_whitespace().count() > MAX_QUERY_WORDS {
        return Err(format!(
            "a query is at most {MAX_QUERY_WORDS} words and {MAX_QUERY_BYTES} bytes; ask with fewer words"
        ));
    }
    Ok(())
}

/// Run `f` on a blocking thread: index work never holds up the bus (the runtime has
/// two workers, and one user's slow query must not stall the others).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> fdo::Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(failed)
}

fn clamp(limit: u32) -> usize {
    match limit {
        0 => 20,
        n => n.min(MAX_RESULTS) as usize,
    }
}

/// The `org.devos.Agent1.Context` interface, at [`crate::OBJECT_PATH`].
pub struct Context {
    pub(super) shared: Arc<Shared>,
}

impl Context {
    async fn user(
        &self,
        header: &Header<'_>,
        conn: &zbus::Connection,
    ) -> fdo::Result<(Caller, Arc<UserContext>, Entered<'_>)> {
        let caller = caller(&self.shared, header, conn).await?;
        // (Queries wait for the user's index: a few at a time each, so that no one
        // fills the threads they wait on.)
        let query = self.shared.querying.enter(caller.uid)?;
        let user = self.shared.context.user(&self.shared, &caller)?;
        Ok((caller, user, query))
    }

    /// `Find` (names and paths) or `FindText` (`text`) for the caller (JSON).
    async fn search(
        &self,
        header: &Header<'_>,
        conn: &zbus::Connection,
        query: &str,
        limit: u32,
        text: bool,
    ) -> fdo::Result<String> {
        let (_, user, _query) = self.user(header, conn).await?;
        check_query(query).map_err(invalid_args)?;
        let q = query.to_owned();
        let hits = blocking(move || {
            let index = lock(&user.index);
            if text {
                index.find_text(&q, clamp(limit))
            } else {
                index.find(&q, clamp(limit))
            }
        })
        .await?
        .map_err(failed)?;
        fits(
            json!({ "query": query, "results": hits }).to_string(),
            "ask for fewer results",
        )
    }
}

#[zbus::interface(name = "org.devos.Agent1.Context")]
impl Context {
    /// Register a directory as a project: it is scanned (as the caller) and kept
    /// current; with `text`, the text of its small text files is indexed too. Returns
    /// the project's canonical root.
    async fn add_project(
        &self,
        path: &str,
        text: bool,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> fdo::Result<String> {
        bounded("the project directory", path, MAX_PATH)?;
        let caller = caller(&self.shared, &header, conn).await?;
        // (Each one is on record: a user adding and removing projects without end
        // would fill the log.)
        self.shared.may_record(caller.uid)?;
        let path = PathBuf::from(path);
        if !path.is_absolute() {
            return Err(invalid_args(format!(
                "the project directory {} must be absolute",
                path.display()
            )));
        }
        let root = Engine::add(&self.shared, &caller, &path, false, text).await?;
        // (`audit` logs a failed append; registering a project changes nothing.)
        let _ = self.shared.audit(
            "context.project-added",
            Some(caller.uid),
            None,
            None,
            json!({ "root": root, "text": text }),
        );
        Ok(root.to_string_lossy().into_owned())
    }

    /// Forget a project and what was indexed in it.
    async fn remove_project(
        &self,
        path: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> fdo::Result<()> {
        bounded("the project directory", path, MAX_PATH)?;
        let caller = caller(&self.shared, &header, conn).await?;
        let root = Engine::remove(&self.shared, &caller, Path::new(path))?;
        let _ = self.shared.audit(
            "context.project-removed",
            Some(caller.uid),
            None,
            None,
            json!({ "root": root }),
        );
        Ok(())
    }

    /// The caller's projects (JSON).
    async fn projects(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> fdo::Result<String> {
        let (_, user, _query) = self.user(&header, conn).await?;
        let list = blocking(move || lock(&user.index).projects())
            .await?
            .map_err(failed)?;
        fits(
            serde_json::to_string(&list).unwrap_or_default(),
            "remove projects you no longer need",
        )
    }

    /// Entries whose path holds every word of `query` (JSON), best first.
    async fn find(
        &self,
        query: &str,
        limit: u32,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> fdo::Result<String> {
        self.search(&header, conn, query, limit, false).await
    }

    /// Text-indexed files holding every word of `query` (JSON), best match first,
    /// each with a snippet.
    async fn find_text(
        &self,
        query: &str,
        limit: u32,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> fdo::Result<String> {
        self.search(&header, conn, query, limit, true).await
    }

    /// Files changed since `since` (JSON), newest first.
    async fn recent(
        &self,
        since: &str,
        limit: u32,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> fdo::Result<String> {
        bounded("since", since, MAX_WORD)?;
        let (_, user, _query) = self.user(&header, conn).await?;
        let since = parse_since(since, crate::caller::now_secs() as i64).map_err(invalid_args)?;
        let hits = blocking(move || lock(&user.index).recent(since, clamp(limit)))
            .await?
            .map_err(failed)?;
        fits(
            json!({ "since": since, "results": hits }).to_string(),
            "ask for fewer results",
        )
    }

    /// The git state of the project at or around `project` (a path; empty: every
    /// project's), as last read (JSON).
    async fn git_state(
        &self,
        project: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> fdo::Result<String> {
        bounded("the project", project, MAX_PATH)?;
        let (_, user, _query) = self.user(&header, conn).await?;
        let project = PathBuf::from(project);
        let state = blocking(move || git_states(&user, &project))
            .await?
            .map_err(fdo::Error::from)?;
        fits(state.to_string(), "ask for one project's")
    }

    /// The caller's processes (root: everyone's), CPU measured over a quarter of a
    /// second, busiest first (JSON).
    async fn processes(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> fdo::Result<String> {
        let caller = caller(&self.shared, &header, conn).await?;
        // Sampling takes a helper process for a quarter of a second: one of the
        // caller's slots, so that no one can start them without bound.
        let _slot = self.shared.reserve(caller.uid)?;
        let roots = match self.shared.context.user(&self.shared, &caller) {
            Ok(user) => lock(&user.index).roots().unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        fits(
            processes(&self.shared, &caller, roots, false)
                .await?
                .to_string(),
            "some processes' command lines are too long to list",
        )
    }

    /// The engine's state for the caller: projects and how each is kept current,
    /// entries, index size and limits, the watcher (JSON).
    async fn status(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> fdo::Result<String> {
        let (_, user, _query) = self.user(&header, conn).await?;
        let config = self.shared.config().context.clone();
        let status = blocking(move || status(&user, &config)).await??;
        fits(status.to_string(), "remove projects you no longer need")
    }
}

fn git_states(user: &UserContext, project: &Path) -> Result<Value, ContextError> {
    let index = lock(&user.index);
    let roots = index.roots()?;
    if project.as_os_str().is_empty() {
        let mut all = Vec::new();
        for root in &roots {
            if let Some(state) = index.git_state(root)? {
                all.push(state);
            }
        }
        return Ok(json!({ "repositories": all }));
    }
    let root = procs::project_of(project, &roots)
        .ok_or_else(|| ContextError::NotAProject(project.to_path_buf()))?;
    match index.git_state(&root)? {
        Some(state) => Ok(serde_json::to_value(state).unwrap_or_default()),
        None => Err(ContextError::Refused(format!(
            "{} is not in a git repository (or its state was not read yet)",
            root.display()
        ))),
    }
}

/// The caller's processes, sampled as the caller (the planning helper) over 250 ms.
async fn processes(
    shared: &Shared,
    caller: &Caller,
    projects: Vec<PathBuf>,
    by_memory: bool,
) -> fdo::Result<Value> {
    let job = crate::caller::PlanJob {
        processes: Some(crate::caller::Sample {
            millis: 250,
            projects,
            by_memory,
        }),
        ..crate::caller::PlanJob::new(caller, None, PathBuf::from("/"), &[])
    };
    let reply = crate::caller::plan(&shared.exe, &job)
        .await
        .map_err(failed)?;
    let (list, total) = reply.processes.unwrap_or_default();
    Ok(json!({ "processes": list, "total": total }))
}

fn status(user: &UserContext, config: &ContextConfig) -> Result<Value, ContextError> {
    // (Never the watcher's lock under the index's: see `ensure_watcher`.)
    let watcher = match (lock(&user.watcher).is_some(), lock(&user.stopped).clone()) {
        (true, _) => "running".to_owned(),
        (false, Some(why)) => why,
        (false, None) => "not started (no projects)".to_owned(),
    };
    let index = lock(&user.index);
    let projects = index.projects()?;
    let entries: u64 = projects.iter().map(|p| p.entries).sum();
    Ok(json!({
        "projects": projects,
        "entries": entries,
        "max-files": config.max_files,
        "index-bytes": index.bytes(),
        "max-index-mib": config.max_index_mib,
        "watcher": watcher,
        "dropped-entries": index.dropped,
        "full": index.full,
        "rebuilt": index.rebuilt,
    }))
}

/// Answer a question the local planner recognised, in words, from the caller's
/// index (on a blocking thread, one of the caller's queries) or from /proc.
pub(super) async fn answer(
    shared: &Arc<Shared>,
    caller: &Caller,
    question: &Question,
) -> Result<String, ContextError> {
    let user = shared.context.user(shared, caller)?;
    let _query = shared
        .querying
        .enter(caller.uid)
        .map_err(|e| ContextError::Refused(e.to_string()))?;
    let roots = {
        let user = user.clone();
        blocking(move || lock(&user.index).roots())
            .await
            .map_err(|e| ContextError::Refused(e.to_string()))??
    };
    if let Question::Processes { by_memory } = question {
        let v = processes(shared, caller, roots, *by_memory)
            .await
            .map_err(|e| ContextError::Refused(e.to_string()))?;
        let list: Vec<procs::Process> =
            serde_json::from_value(v["processes"].clone()).unwrap_or_default();
        let lines: Vec<String> = list
            .iter()
            .take(10)
            .map(|p| {
                format!(
                    "{:>7}  {:>5.1}% CPU  {:>8} MiB  {}",
                    p.pid,
                    p.cpu_percent,
                    p.rss_kib / 1024,
                    crate::executor::printable(&p.command)
                )
            })
            .collect();
        return Ok(format!(
            "Your processes by {}:\n    PID       CPU        MEMORY  COMMAND\n{}",
            if *by_memory { "memory" } else { "CPU" },
            lines.join("\n")
        ));
    }
    if roots.is_empty() {
        return Ok(
            "You have no projects in the context index yet; add one with `devos context add DIR` \
             (a request run inside a git repository adds that repository)."
                .to_owned(),
        );
    }
    let question = question.clone();
    blocking(move || from_index(&user, &question))
        .await
        .map_err(|e| ContextError::Refused(e.to_string()))?
}

/// [`answer`] for the questions the index answers.
fn from_index(user: &UserContext, question: &Question) -> Result<String, ContextError> {
    let now = crate::caller::now_secs() as i64;
    Ok(match question {
        Question::FindText { words } => {
            check_query(words).map_err(ContextError::Refused)?;
            let hits = lock(&user.index).find_text(words, 20)?;
            if hits.is_empty() {
                format!(
                    "No indexed text holds {words:?} (only projects added with `devos context add --text` have their text indexed)."
                )
            } else {
                let lines: Vec<String> = hits
                    .iter()
                    .map(|h| format!("{}: {}", h.path, h.snippet.as_deref().unwrap_or("")))
                    .collect();
                format!("In your projects' text, {words:?}:\n{}", lines.join("\n"))
            }
        }
        Question::Find { words } => {
            check_query(words).map_err(ContextError::Refused)?;
            let hits = lock(&user.index).find(words, 20)?;
            if hits.is_empty() {
                format!("Nothing in your projects matches {words:?}.")
            } else {
                let lines: Vec<String> = hits
                    .iter()
                    .map(|h| {
                        format!(
                            "{}  ({}, changed {})",
                            h.path,
                            h.kind.as_str(),
                            ago(now, h.mtime)
                        )
                    })
                    .collect();
                format!(
                    "In your projects, matching {words:?}:\n{}",
                    lines.join("\n")
                )
            }
        }
        Question::Recent { since } => {
            let since = parse_since(since, now).map_err(ContextError::Refused)?;
            let hits = lock(&user.index).recent(since, 30)?;
            if hits.is_empty() {
                "No file in your projects changed in that time.".to_owned()
            } else {
                let lines: Vec<String> = hits
                    .iter()
                    .map(|h| format!("{}  (changed {})", h.path, ago(now, h.mtime)))
                    .collect();
                format!("Changed in your projects:\n{}", lines.join("\n"))
            }
        }
        Question::Git => {
            let v = git_states(user, Path::new(""))?;
            let repos = v["repositories"].as_array().cloned().unwrap_or_default();
            if repos.is_empty() {
                return Ok("None of your projects is in a git repository.".to_owned());
            }
            repos
                .iter()
                .map(describe_git)
                .collect::<Vec<_>>()
                .join("\n")
        }
        Question::Processes { .. } => unreachable!("answered from /proc"),
    })
}

/// One repository's line in the answer to "what changed" questions.
fn describe_git(r: &Value) -> String {
    let tree = r["work-tree"].as_str().unwrap_or("?");
    // (A state that could not be read has no counts to give: zeros would say "clean".)
    if let Some(error) = r["error"].as_str() {
        return format!("{tree}: its git state could not be read: {error}");
    }
    format!(
        "{tree}: {} — {} staged, {} unstaged, {} untracked, {} ahead / {} behind",
        r["branch"].as_str().unwrap_or("(detached)"),
        r["counts"]["staged"],
        r["counts"]["unstaged"],
        r["counts"]["untracked"],
        r["ahead"],
        r["behind"],
    )
}

fn ago(now: i64, then: i64) -> String {
    let secs = (now - then).max(0) as u64;
    format!(
        "{} ago",
        humantime::format_duration(Duration::from_secs(if secs > 3600 {
            secs - secs % 60
        } else {
            secs
        }))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_git_state_that_could_not_be_read_is_not_called_clean() {
        let state = crate::context::git::GitState {
            work_tree: "/home/dev/proj".into(),
            error: Some("cannot run git: No such file or directory (os error 2)".into()),
            ..Default::default()
        };
        let line = describe_git(&serde_json::to_value(&state).unwrap());
        assert_eq!(
            line,
            "/home/dev/proj: its git state could not be read: cannot run git: No such file or directory (os error 2)"
        );
        let clean = crate::context::git::GitState {
            work_tree: "/home/dev/proj".into(),
            branch: Some("main".into()),
            ..Default::default()
        };
        let line = describe_git(&serde_json::to_value(&clean).unwrap());
        assert_eq!(
            line,
            "/home/dev/proj: main — 0 staged, 0 unstaged, 0 untracked, 0 ahead / 0 behind"
        );
    }

    #[test]
    fn since_takes_words_durations_and_times() {
        let now = 1_700_000_000;
        assert_eq!(parse_since("", now), Ok(now - 86_400));
        assert_eq!(parse_since("2h", now), Ok(now - 7200));
        assert_eq!(parse_since("today", now), Ok(now - now % 86_400));
        assert_eq!(parse_since("1699999999", now), Ok(1_699_999_999));
        assert_eq!(parse_since("2023-11-14T22:13:20Z", now), Ok(now));
        assert!(
            parse_since("yesterdayish", now)
                .unwrap_err()
                .contains("`today`")
        );
        assert_eq!(parse_since("9223372036854775808s", now), Ok(0));
    }
}
