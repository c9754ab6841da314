//! `devos-agent context-watch`: one user's projects, scanned and kept current as that
//! user. The daemon starts it with a [`WatchJob`] as the first line on stdin and
//! [`Command`]s after it; it drops to the user before it touches the file system and
//! answers with [`Update`]s on stdout, one JSON line each. It ends when stdin does.
//!
//! A scan walks a project without following symlinks, lists every entry the user can
//! read (ignored ones flagged, ignored directories not entered) and puts an inotify
//! watch on every directory it enters. A change is handled by looking again at the
//! path it names: gone (or no longer readable) is removed with everything under it,
//! a directory not seen before (created or moved in) is scanned, anything else is
//! updated. A change to an ignore file rescans its directory; a change in the git
//! directory re-reads the git state. Where a directory cannot be watched (the
//! kernel's watch limit, or `[context] max-watches`) the project is rescanned
//! periodically instead, and says so.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::{BufRead, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use ignore::gitignore::{Gitignore, GitignoreBuilder};
use notify::Watcher;

use super::{
    Command, Entry, Kind, MAX_TEXT_BYTES, Mode, ProjectJob, Update, WatchJob, git, language,
    read_regular,
};
use crate::gitrepo::{self, Repo};

/// Changes are collected this long before they are handled (a burst is one pass).
const SETTLE: Duration = Duration::from_millis(100);
/// The git state is re-read this long after the last change in the git directory.
const GIT_SETTLE: Duration = Duration::from_millis(300);
/// Entries per [`Update::Entries`] line, and the text they may carry together: the
/// daemon reads a line whole, so a line stays a few MiB at most.
const BATCH: usize = 2000;
const BATCH_TEXT: usize = 1 << 20;
/// How often each project's root is looked at (gone? no longer listable? back?):
/// losing access above the root, or the root moved away, sends no event to a watch
/// inside it.
const ROOT_CHECK: Duration = Duration::from_secs(10);
/// Kernel and runtime file systems: never entered (endless, changing, not projects).
const NEVER_ENTERED: &[&str] = &["/proc", "/sys", "/dev", "/run"];

enum Input {
    Command(Command),
    Fs(notify::Result<notify::Event>),
}

/// The helper's main: read the job, drop to its user, watch. Returns the exit status.
pub fn watch_from_stdin() -> i32 {
    let mut stdin = std::io::BufReader::new(std::io::stdin());
    let mut first = String::new();
    let job: WatchJob = match stdin
        .read_line(&mut first)
        .map_err(|e| e.to_string())
        .and_then(|_| serde_json::from_str(&first).map_err(|e| e.to_string()))
    {
        Ok(j) => j,
        Err(e) => {
            eprintln!("devos context-watch: invalid job: {e}");
            return 2;
        }
    };
    if let Err(e) = job.caller.become_for_good() {
        eprintln!(
            "devos context-watch: cannot become {}: {e}",
            job.caller.user
        );
        return 2;
    }
    let (tx, rx) = mpsc::channel();
    let commands = tx.clone();
    std::thread::spawn(move || {
        for line in stdin.lines() {
            let Ok(line) = line else { break };
            match serde_json::from_str(&line) {
                Ok(c) => {
                    if commands.send(Input::Command(c)).is_err() {
                        return;
                    }
                }
                Err(e) => eprintln!("devos context-watch: ignoring a bad command: {e}"),
            }
        }
        // The daemon is gone: end now, even in the middle of a scan.
        std::process::exit(0);
    });
    let events = tx;
    let watcher = match notify::recommended_watcher(move |ev| {
        let _ = events.send(Input::Fs(ev));
    }) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("devos context-watch: cannot start inotify: {e}");
            return 2;
        }
    };
    let mut engine = Engine::new(job, watcher, Out::stdout());
    let projects = std::mem::take(&mut engine.job.projects);
    for p in projects {
        engine.add(p);
    }
    engine.run(&rx);
    0
}

/// The ignore rules in force in one directory during a scan: those of the directories
/// from the project's root down to it that have any, deepest first (shared, so a deep
/// tree costs one link per directory with rules, not a copy per entry).
#[derive(Clone, Default)]
struct Chain(Option<std::rc::Rc<Link>>);

struct Link {
    rules: Gitignore,
    up: Chain,
}

impl Chain {
    fn with(&self, rules: Option<Gitignore>) -> Chain {
        match rules {
            Some(rules) => Chain(Some(std::rc::Rc::new(Link {
                rules,
                up: self.clone(),
            }))),
            None => self.clone(),
        }
    }

    /// The deepest rule that matches decides: ignored (`Some(true)`), kept by a `!`
    /// rule (`Some(false)`), or none matches.
    fn verdict(&self, path: &Path, is_dir: bool) -> Option<bool> {
        let mut link = self.0.as_deref();
        while let Some(l) = link {
            let m = l.rules.matched(path, is_dir);
            if m.is_ignore() {
                return Some(true);
            }
            if m.is_whitelist() {
                return Some(false);
            }
            link = l.up.0.as_deref();
        }
        None
    }
}

/// Where updates go (stdout; a buffer in tests).
pub struct Out {
    write: Box<dyn Write + Send>,
}

impl Out {
    fn stdout() -> Self {
        Out {
            write: Box::new(std::io::stdout()),
        }
    }

    fn send(&mut self, update: &Update) {
        let Ok(mut line) = serde_json::to_vec(update) else {
            return;
        };
        line.push(b'\n');
        // The daemon is gone when this fails; stdin's end stops the helper.
        let _ = self
            .write
            .write_all(&line)
            .and_then(|()| self.write.flush());
    }
}

/// One project being kept current.
struct Project {
    root: PathBuf,
    repo: Option<Repo>,
    /// Directories with a watch.
    watched: HashSet<PathBuf>,
    /// The git directories watched for state changes.
    git_watched: HashSet<PathBuf>,
    /// Ignore rules per directory (`None`: the directory has no ignore file).
    ignores: HashMap<PathBuf, Option<Gitignore>>,
    /// `.git/info/exclude` and the user's global excludes.
    outer_ignores: Vec<Gitignore>,
    /// Why not every directory is watched (then it is rescanned periodically).
    unwatched: Option<String>,
    next_rescan: Option<Instant>,
    git_due: Option<Instant>,
    entries: u64,
    /// Its root is there as registered and it is scanned and watched.
    available: bool,
    /// Index the text of small text files.
    text: bool,
    /// Of a text-indexed project: the mtime and size each file had when its text was
    /// last read.
    read: HashMap<String, (i64, u64)>,
}

struct Engine {
    job: WatchJob,
    watcher: notify::RecommendedWatcher,
    out: Out,
    projects: Vec<Project>,
    pending: BTreeSet<PathBuf>,
    pending_since: Option<Instant>,
    watches: u64,
    next_root_check: Instant,
}

impl Engine {
    fn new(job: WatchJob, watcher: notify::RecommendedWatcher, out: Out) -> Self {
        Engine {
            job,
            watcher,
            out,
            projects: Vec::new(),
            pending: BTreeSet::new(),
            pending_since: None,
            watches: 0,
            next_root_check: Instant::now() + ROOT_CHECK,
        }
    }

    fn run(&mut self, rx: &mpsc::Receiver<Input>) {
        loop {
            let wait = self.next_deadline().map_or(Duration::from_secs(3600), |d| {
                d.saturating_duration_since(Instant::now())
            });
            match rx.recv_timeout(wait) {
                Ok(Input::Command(Command::Add { token, path, text })) => {
                    match self.check_new(&path) {
                        Ok(root) => {
                            // Answered first: the daemon registers the project, then takes
                            // its scan.
                            self.out.send(&Update::Added {
                                token,
                                root: root.clone(),
                            });
                            match self.projects.iter().position(|p| p.root == root) {
                                None => self.add(ProjectJob {
                                    root,
                                    text,
                                    known: Vec::new(),
                                }),
                                // Added again, now with its text: read it.
                                Some(i) if text && !self.projects[i].text => {
                                    self.projects[i].text = true;
                                    self.bring_up(i);
                                }
                                Some(_) => {}
                            }
                        }
                        Err(why) => self.out.send(&Update::Refused { token, why }),
                    }
                }
                Ok(Input::Command(Command::Remove { root })) => self.remove(&root),
                Ok(Input::Fs(Ok(event))) => self.note(event),
                Ok(Input::Fs(Err(e))) => {
                    eprintln!("devos context-watch: inotify: {e}");
                }
                Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => {}
            }
            self.due_work();
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let settle = self.pending_since.map(|t| t + SETTLE);
        let roots = (!self.projects.is_empty()).then_some(self.next_root_check);
        self.projects
            .iter()
            .flat_map(|p| [p.git_due, p.next_rescan])
            .chain([settle, roots])
            .flatten()
            .min()
    }

    /// Handle what is due: settled changes, git states, periodic rescans.
    fn due_work(&mut self) {
        let now = Instant::now();
        if self.pending_since.is_some_and(|t| now >= t + SETTLE) {
            self.pending_since = None;
            let paths = std::mem::take(&mut self.pending);
            self.handle(paths);
        }
        if now >= self.next_root_check {
            self.next_root_check = now + ROOT_CHECK;
            self.check_roots();
        }
        for i in 0..self.projects.len() {
            if !self.projects[i].available {
                continue;
            }
            if self.projects[i].next_rescan.is_some_and(|t| now >= t) {
                let root = self.projects[i].root.clone();
                self.scan(i, &root);
                self.schedule_rescan(i);
            }
            if self.projects[i].git_due.is_some_and(|t| now >= t) {
                self.projects[i].git_due = None;
                self.send_git(i);
            }
        }
    }

    /// A project the daemon asks for: its canonical root, or why not.
    fn check_new(&self, path: &Path) -> Result<PathBuf, String> {
        let root = std::fs::canonicalize(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if let Some(why) = self.root_problem(&root) {
            return Err(why);
        }
        if let Some(p) = self
            .projects
            .iter()
            .find(|p| p.root != root && (root.starts_with(&p.root) || p.root.starts_with(&root)))
        {
            return Err(format!(
                "{} overlaps your project {}: remove that one first, or index only one of them",
                root.display(),
                p.root.display()
            ));
        }
        Ok(root)
    }

    /// Start keeping a project current: scan it, watch it, read its git state.
    fn add(&mut self, job: ProjectJob) {
        let root = job.root.as_path();
        // Only a repository nobody else can change is the project's: one another user
        // planted above it must not decide its ignore rules or git state.
        let uid = self.job.caller.uid;
        let repo = gitrepo::discover(root).filter(|r| r.changeable_by_others(uid).is_none());
        let mut outer_ignores = Vec::new();
        if let Some(exclude) = repo.as_ref().and_then(exclude_rules) {
            outer_ignores.push(exclude);
        }
        let (global, _) = Gitignore::global();
        outer_ignores.push(global);
        self.projects.push(Project {
            root: root.to_path_buf(),
            repo,
            watched: HashSet::new(),
            git_watched: HashSet::new(),
            ignores: HashMap::new(),
            outer_ignores,
            unwatched: None,
            next_rescan: None,
            git_due: None,
            entries: 0,
            available: false,
            text: job.text,
            read: job
                .known
                .iter()
                .map(|(rel, mtime, size)| {
                    (
                        root.join(rel).to_string_lossy().into_owned(),
                        (*mtime, *size),
                    )
                })
                .collect(),
        });
        let i = self.projects.len() - 1;
        self.bring_up(i);
    }

    /// Scan, watch and read the git state of project `i` when its root is there as it
    /// was registered; otherwise say why (the root check looks again).
    fn bring_up(&mut self, i: usize) {
        let root = self.projects[i].root.clone();
        if let Some(reason) = self.root_problem(&root) {
            self.projects[i].available = false;
            self.out.send(&Update::Mode {
                root,
                mode: Mode::Failed { reason },
            });
            return;
        }
        self.projects[i].available = true;
        self.out.send(&Update::Mode {
            root: root.clone(),
            mode: Mode::Scanning,
        });
        self.scan(i, &root);
        self.watch_git(i);
        self.send_git(i);
        self.send_mode(i);
    }

    /// Why a project's root cannot be indexed now: gone, not listable, leading
    /// elsewhere than where it was registered (a symlink swapped in), or a kernel file
    /// system.
    fn root_problem(&self, root: &Path) -> Option<String> {
        let real = match std::fs::canonicalize(root) {
            Ok(r) => r,
            Err(e) => return Some(format!("{}: {e}", root.display())),
        };
        if real != root {
            return Some(format!(
                "{} now leads to {} (replaced by a symlink?); remove the project and add the directory again",
                root.display(),
                real.display()
            ));
        }
        if NEVER_ENTERED.iter().any(|d| root.starts_with(d)) {
            return Some(format!(
                "{} is a kernel or runtime file system, not a project",
                root.display()
            ));
        }
        if !readable_dir(root) {
            return Some(format!(
                "{} is not a directory you ({}) can list",
                root.display(),
                self.job.caller.user
            ));
        }
        None
    }

    /// Look at every project's root: one that went away (or can no longer be listed)
    /// is emptied and said to have failed; one that came back is scanned again.
    fn check_roots(&mut self) {
        for i in 0..self.projects.len() {
            let root = self.projects[i].root.clone();
            match (self.projects[i].available, self.root_problem(&root)) {
                (true, Some(reason)) => self.take_down(i, reason),
                (false, None) => self.bring_up(i),
                _ => {}
            }
        }
    }

    /// Stop watching project `i`, empty its part of the index and say why.
    fn take_down(&mut self, i: usize, reason: String) {
        let root = self.projects[i].root.clone();
        self.forget(i, &root);
        let git: Vec<PathBuf> = self.projects[i].git_watched.drain().collect();
        for dir in git {
            if self.watcher.unwatch(&dir).is_ok() {
                self.watches = self.watches.saturating_sub(1);
            }
        }
        let p = &mut self.projects[i];
        p.available = false;
        p.entries = 0;
        p.next_rescan = None;
        p.git_due = None;
        p.read.clear();
        // An empty scan of the root: the daemon drops everything in the project.
        self.out.send(&Update::ScanStarted {
            root: root.clone(),
            under: root.clone(),
        });
        self.out.send(&Update::ScanDone {
            root: root.clone(),
            under: root.clone(),
            complete: true,
            millis: 0,
        });
        self.out.send(&Update::Mode {
            root,
            mode: Mode::Failed { reason },
        });
    }

    fn remove(&mut self, root: &Path) {
        let Some(i) = self.projects.iter().position(|p| p.root == root) else {
            return;
        };
        let p = self.projects.remove(i);
        for dir in p.watched.iter().chain(&p.git_watched) {
            if self.watcher.unwatch(dir).is_ok() {
                self.watches = self.watches.saturating_sub(1);
            }
        }
    }

    fn send_mode(&mut self, i: usize) {
        let p = &self.projects[i];
        let mode = match &p.unwatched {
            Some(reason) => Mode::Rescanning {
                every_secs: self.job.rescan_secs,
                reason: reason.clone(),
            },
            None => Mode::Watching {
                watches: (p.watched.len() + p.git_watched.len()) as u64,
            },
        };
        let root = p.root.clone();
        self.out.send(&Update::Mode { root, mode });
    }

    fn schedule_rescan(&mut self, i: usize) {
        let p = &mut self.projects[i];
        p.next_rescan = p
            .unwatched
            .is_some()
            .then(|| Instant::now() + Duration::from_secs(self.job.rescan_secs.max(1)));
    }

    /// Watch `dir` for project `i`; false when it cannot be (the project is then
    /// rescanned periodically).
    fn watch(&mut self, i: usize, dir: &Path, git: bool) -> bool {
        let p = &self.projects[i];
        if p.watched.contains(dir) || p.git_watched.contains(dir) {
            return true;
        }
        let limit = self.job.max_watches;
        let result = if limit > 0 && self.watches >= limit {
            Err(format!(
                "the configured watch limit ([context] max-watches = {limit}) was reached"
            ))
        } else {
            self.watcher
                .watch(dir, notify::RecursiveMode::NonRecursive)
                .map_err(|e| match e.kind {
                    notify::ErrorKind::MaxFilesWatch => format!(
                        "the kernel's inotify watch limit was reached after {} watches \
                         (sysctl fs.inotify.max_user_watches)",
                        self.watches
                    ),
                    _ => format!("cannot watch {}: {e}", dir.display()),
                })
        };
        let p = &mut self.projects[i];
        match result {
            Ok(()) => {
                self.watches += 1;
                if git {
                    p.git_watched.insert(dir.to_path_buf());
                } else {
                    p.watched.insert(dir.to_path_buf());
                }
                true
            }
            Err(reason) => {
                if p.unwatched.is_none() {
                    p.unwatched = Some(reason);
                    self.schedule_rescan(i);
                    self.send_mode(i);
                }
                false
            }
        }
    }

    fn watch_git(&mut self, i: usize) {
        let Some(repo) = self.projects[i].repo.clone() else {
            return;
        };
        for dir in git::state_dirs(&repo) {
            self.watch(i, &dir, true);
        }
    }

    fn send_git(&mut self, i: usize) {
        let p = &self.projects[i];
        if let Some(repo) = &p.repo {
            let state = Box::new(git::read(repo));
            let root = p.root.clone();
            self.out.send(&Update::Git { root, state });
        }
    }

    /// Scan `under` (a project's root or a directory in it) and report what is there;
    /// the daemon drops what the scan did not report.
    fn scan(&mut self, i: usize, under: &Path) {
        let started = Instant::now();
        let root = self.projects[i].root.clone();
        self.out.send(&Update::ScanStarted {
            root: root.clone(),
            under: under.to_path_buf(),
        });
        let mut batch = Vec::new();
        let mut batch_text = 0usize;
        let mut complete = true;
        let mut seen = 0u64;
        let in_repo = self.projects[i].repo.is_some();
        // The entry for `under` itself (the root has none), and the rules above it.
        let mut stack: Vec<(PathBuf, Chain)> = Vec::new();
        if under != root {
            match self.entry(i, under, None) {
                Some(e) => {
                    let enter = e.kind == Kind::Dir && !e.ignored;
                    batch.push(e);
                    if enter {
                        let depth = under
                            .components()
                            .count()
                            .saturating_sub(root.components().count());
                        let mut above: Vec<&Path> = under.ancestors().skip(1).take(depth).collect();
                        above.reverse();
                        let chain = above
                            .into_iter()
                            .fold(Chain::default(), |c, d| c.with(dir_rules(d, in_repo)));
                        stack.push((under.to_path_buf(), chain));
                    }
                }
                None => {
                    self.out.send(&Update::Removed {
                        root: root.clone(),
                        paths: vec![under.to_string_lossy().into_owned()],
                    });
                }
            }
        } else {
            stack.push((root.clone(), Chain::default()));
        }
        let other_projects: u64 = self
            .projects
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, p)| p.entries)
            .sum();
        while let Some((dir, above)) = stack.pop() {
            self.watch(i, &dir, false);
            let Ok(list) = std::fs::read_dir(&dir) else {
                continue;
            };
            let chain = above.with(dir_rules(&dir, in_repo));
            for item in list.flatten() {
                if item.file_name() == ".git" {
                    continue;
                }
                if other_projects + seen >= self.job.max_files {
                    complete = false;
                    break;
                }
                let path = item.path();
                let Some(e) = self.entry(i, &path, Some(&chain)) else {
                    continue;
                };
                seen += 1;
                if e.kind == Kind::Dir
                    && !e.ignored
                    && !NEVER_ENTERED.iter().any(|d| path == Path::new(d))
                {
                    stack.push((path, chain.clone()));
                }
                batch_text += e.text.as_ref().map_or(0, String::len);
                batch.push(e);
                if batch.len() >= BATCH || batch_text >= BATCH_TEXT {
                    batch_text = 0;
                    self.out.send(&Update::Entries {
                        root: root.clone(),
                        entries: std::mem::take(&mut batch),
                    });
                }
            }
        }
        if !batch.is_empty() {
            self.out.send(&Update::Entries {
                root: root.clone(),
                entries: batch,
            });
        }
        if under == root {
            self.projects[i].entries = seen;
        } else {
            self.projects[i].entries += seen;
        }
        self.out.send(&Update::ScanDone {
            root,
            under: under.to_path_buf(),
            complete,
            millis: started.elapsed().as_millis() as u64,
        });
    }

    /// The index entry for `path` as this user sees it, or `None` when it is gone,
    /// unreadable or not representable.
    fn entry(&mut self, i: usize, path: &Path, chain: Option<&Chain>) -> Option<Entry> {
        let meta = path.symlink_metadata().ok()?;
        let text = path.to_str()?.to_owned();
        let kind = if meta.is_dir() {
            Kind::Dir
        } else if meta.is_file() {
            Kind::File
        } else if meta.file_type().is_symlink() {
            Kind::Symlink
        } else {
            Kind::Other
        };
        let readable = match kind {
            Kind::Dir => readable_dir(path),
            Kind::File => nix::unistd::access(path, nix::unistd::AccessFlags::R_OK).is_ok(),
            _ => true,
        };
        if !readable {
            return None;
        }
        let name = path.file_name()?.to_str()?;
        let is_dir = kind == Kind::Dir;
        let ignored = match chain.map(|c| c.verdict(path, is_dir)) {
            Some(Some(v)) => v,
            Some(None) => self.outer_ignored(i, path, is_dir),
            None => self.ignored(i, path, is_dir),
        };
        let (size, mtime) = (meta.len(), meta.mtime());
        let body = if kind == Kind::File && self.projects[i].text {
            self.text_of(i, path, &text, ignored, (mtime, size))
        } else {
            None
        };
        Some(Entry {
            lang: (kind == Kind::File)
                .then(|| language(name))
                .flatten()
                .map(str::to_owned),
            ignored,
            path: text,
            kind,
            size,
            mtime,
            text: body,
        })
    }

    /// The text of a file of a text-indexed project, if it changed since it was last
    /// read: `Some("")` when it has none to index (ignored, too large, not UTF-8, or
    /// with NUL bytes).
    fn text_of(
        &mut self,
        i: usize,
        path: &Path,
        key: &str,
        ignored: bool,
        stamp: (i64, u64),
    ) -> Option<String> {
        let p = &mut self.projects[i];
        if p.read.get(key) == Some(&stamp) {
            return None;
        }
        p.read.insert(key.to_owned(), stamp);
        let secret = crate::risk::paths::secret_of(&[path], &self.job.secrets).is_some();
        if ignored || stamp.1 > MAX_TEXT_BYTES || secret {
            return Some(String::new());
        }
        let bytes = read_regular(path, MAX_TEXT_BYTES).unwrap_or_default();
        // (Control characters other than layout make it binary; they would also take
        // six bytes each on the way to the daemon.)
        let binary = |c: char| c.is_control() && !matches!(c, '\n' | '\r' | '\t' | '\x0c');
        Some(match String::from_utf8(bytes) {
            Ok(s) if !s.chars().any(binary) => s,
            _ => String::new(),
        })
    }

    /// Whether ignore rules exclude `path`: `.ignore` over `.gitignore` (in a git
    /// repository), the deepest directory first, then `.git/info/exclude`, then the
    /// user's global excludes — as ripgrep reads them.
    fn ignored(&mut self, i: usize, path: &Path, is_dir: bool) -> bool {
        let in_repo = self.projects[i].repo.is_some();
        let depth = path
            .components()
            .count()
            .saturating_sub(self.projects[i].root.components().count());
        // The directories from the parent up to the root, deepest first.
        for dir in path.ancestors().skip(1).take(depth) {
            let ignores = &mut self.projects[i].ignores;
            if !ignores.contains_key(dir) {
                ignores.insert(dir.to_path_buf(), dir_rules(dir, in_repo));
            }
            if let Some(Some(rules)) = ignores.get(dir) {
                let m = rules.matched(path, is_dir);
                if m.is_ignore() {
                    return true;
                }
                if m.is_whitelist() {
                    return false;
                }
            }
        }
        self.outer_ignored(i, path, is_dir)
    }

    /// `.git/info/exclude` and the user's global excludes.
    fn outer_ignored(&self, i: usize, path: &Path, is_dir: bool) -> bool {
        self.projects[i]
            .outer_ignores
            .iter()
            .any(|g| g.matched(path, is_dir).is_ignore())
    }

    /// Remember a change to look at once changes settle.
    fn note(&mut self, event: notify::Event) {
        if event.need_rescan() {
            // The kernel's queue overflowed: changes were lost.
            for i in 0..self.projects.len() {
                self.projects[i].next_rescan = Some(Instant::now());
            }
            return;
        }
        if matches!(event.kind, notify::EventKind::Access(_)) {
            return;
        }
        for path in event.paths {
            // (A linked worktree's git directory is outside its project.)
            let in_git: Vec<usize> = (0..self.projects.len())
                .filter(|i| {
                    self.projects[*i]
                        .repo
                        .as_ref()
                        .is_some_and(|r| git::is_state_path(r, &path))
                })
                .collect();
            if in_git.is_empty() {
                self.pending.insert(path);
                continue;
            }
            for i in in_git {
                self.projects[i].git_due = Some(Instant::now() + GIT_SETTLE);
                if path.is_dir() {
                    self.watch(i, &path, true);
                }
            }
        }
        if !self.pending.is_empty() && self.pending_since.is_none() {
            self.pending_since = Some(Instant::now());
        }
    }

    fn project_of(&self, path: &Path) -> Option<usize> {
        self.projects
            .iter()
            .enumerate()
            .filter(|(_, p)| path.starts_with(&p.root))
            .max_by_key(|(_, p)| p.root.as_os_str().len())
            .map(|(i, _)| i)
    }

    /// Look again at changed paths: what is gone first (so a directory renamed within
    /// the project loses its old watches before it gets new ones), then the rest.
    fn handle(&mut self, mut paths: BTreeSet<PathBuf>) {
        // A change to a project's root itself (moved away, deleted, chmod): look at
        // the root now.
        let roots: Vec<usize> = (0..self.projects.len())
            .filter(|i| paths.remove(&self.projects[*i].root))
            .collect();
        for i in roots {
            let root = self.projects[i].root.clone();
            if let (true, Some(reason)) = (self.projects[i].available, self.root_problem(&root)) {
                self.take_down(i, reason);
            }
        }
        // (Nothing of a project that is down is looked at.)
        paths.retain(|p| {
            self.project_of(p)
                .is_some_and(|i| self.projects[i].available)
        });
        let (gone, here): (Vec<PathBuf>, Vec<PathBuf>) = paths
            .into_iter()
            .partition(|p| p.symlink_metadata().is_err());
        let mut removed: HashMap<usize, Vec<String>> = HashMap::new();
        for path in gone {
            if let Some(i) = self.project_of(&path) {
                self.forget(i, &path);
                removed
                    .entry(i)
                    .or_default()
                    .push(path.to_string_lossy().into_owned());
            }
        }
        for (i, paths) in removed {
            let root = self.projects[i].root.clone();
            self.out.send(&Update::Removed { root, paths });
        }
        let mut changed: HashMap<usize, Vec<Entry>> = HashMap::new();
        let mut rescans: Vec<(usize, PathBuf)> = Vec::new();
        for path in here {
            let Some(i) = self.project_of(&path) else {
                continue;
            };
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name == ".gitignore" || name == ".ignore" {
                // Different rules for the whole directory: look at it again.
                let dir = path.parent().unwrap_or(&path).to_path_buf();
                self.projects[i].ignores.remove(&dir);
                rescans.push((i, dir));
            }
            let inside_ignored = path.parent().is_some_and(|d| {
                d != self.projects[i].root && !self.projects[i].watched.contains(d)
            });
            if inside_ignored {
                // (An event for something in a directory that is not watched: left
                // over from a directory moved away.)
                continue;
            }
            match self.entry(i, &path, None) {
                None => {
                    self.forget(i, &path);
                    let root = self.projects[i].root.clone();
                    self.out.send(&Update::Removed {
                        root,
                        paths: vec![path.to_string_lossy().into_owned()],
                    });
                }
                Some(e)
                    if e.kind == Kind::Dir
                        && !e.ignored
                        && !self.projects[i].watched.contains(&path) =>
                {
                    rescans.push((i, path));
                }
                Some(e) => {
                    if e.ignored && e.kind == Kind::Dir {
                        // Newly ignored: what was indexed under it goes.
                        self.forget(i, &path);
                        rescans.push((i, path));
                    } else {
                        changed.entry(i).or_default().push(e);
                    }
                }
            }
        }
        for (i, entries) in changed {
            let root = self.projects[i].root.clone();
            self.out.send(&Update::Entries { root, entries });
        }
        rescans.sort();
        rescans.dedup();
        // A directory inside another that is rescanned anyway needs no scan of its own.
        let mut done: Vec<(usize, PathBuf)> = Vec::new();
        for (i, dir) in rescans {
            if done.iter().any(|(j, d)| *j == i && dir.starts_with(d)) {
                continue;
            }
            if i < self.projects.len() {
                self.scan(i, &dir);
            }
            done.push((i, dir));
        }
    }

    /// Drop the watches of `path` and of every directory under it (and what is known
    /// of their texts).
    fn forget(&mut self, i: usize, path: &Path) {
        let p = &mut self.projects[i];
        if p.text {
            p.read.retain(|k, _| !Path::new(k).starts_with(path));
        }
        let gone: Vec<PathBuf> = p
            .watched
            .iter()
            .filter(|d| d.starts_with(path))
            .cloned()
            .collect();
        for dir in gone {
            p.watched.remove(&dir);
            p.ignores.remove(&dir);
            if self.watcher.unwatch(&dir).is_ok() {
                self.watches = self.watches.saturating_sub(1);
            }
        }
    }
}

/// The ignore rules of one directory: its `.gitignore` (in a git repository) and its
/// `.ignore`, the latter winning.
fn dir_rules(dir: &Path, in_repo: bool) -> Option<Gitignore> {
    let mut builder = GitignoreBuilder::new(dir);
    let mut any = false;
    let files: &[&str] = if in_repo {
        &[".gitignore", ".ignore"]
    } else {
        &[".ignore"]
    };
    for name in files {
        if let Some(text) = small_text(&dir.join(name)) {
            add_lines(&mut builder, &text);
            any = true;
        }
    }
    any.then(|| builder.build().ok()).flatten()
}

/// A small text file (ignore rules, git's files), read without blocking.
fn small_text(path: &Path) -> Option<String> {
    read_regular(path, 1 << 20)
        .ok()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// Ignore rules from text (a bad line is skipped, as git and ripgrep skip it).
fn add_lines(builder: &mut GitignoreBuilder, text: &str) {
    for line in text.lines() {
        let _ = builder.add_line(None, line);
    }
}

/// `.git/info/exclude` of a repository, read without blocking.
fn exclude_rules(repo: &Repo) -> Option<Gitignore> {
    let text = small_text(&repo.common_dir.join("info/exclude"))?;
    let mut builder = GitignoreBuilder::new(&repo.work_tree);
    add_lines(&mut builder, &text);
    builder.build().ok()
}

/// Whether this user can list and enter `dir`.
fn readable_dir(dir: &Path) -> bool {
    use nix::unistd::AccessFlags;
    dir.is_dir() && nix::unistd::access(dir, AccessFlags::R_OK | AccessFlags::X_OK).is_ok()
}
