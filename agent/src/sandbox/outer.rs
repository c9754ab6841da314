//! The sandbox's outer stage: check again as the caller, prepare, become bubblewrap.
//!
//! It runs as root and single-threaded, so it can take the caller's identity for a
//! while (effective uid and groups only; the caller cannot signal or trace it, since
//! its real and saved uid stay root) to read what the caller may read — and nothing
//! else — before it builds the namespaces as root.

use std::convert::Infallible;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use super::{
    Cover, EXIT_RISK_CHANGED, EXIT_SANDBOX_FAILED, INSIDE_DIR, Inner, Profile, REFUSED_PREFIX,
    Spec, base_environment,
};
use crate::action::Action;
use crate::caller::{Caller, classify_as};
use crate::gitrepo::{self, Level, Repo};
use crate::risk::RiskClass;
use crate::risk::paths::MountTable;

/// Why the outer stage stopped before anything ran.
enum Stop {
    /// The action now needs more than it was approved with.
    RiskChanged(String),
    /// The sandbox could not be built.
    Failed(String),
}

fn failed(e: impl std::fmt::Display) -> Stop {
    Stop::Failed(e.to_string())
}

/// The outer stage's main. Returns only when it could not exec bubblewrap.
pub fn exec_from_stdin() -> i32 {
    let spec: Spec = match crate::caller::job_from_stdin() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("devos sandbox: {e}");
            return EXIT_SANDBOX_FAILED;
        }
    };
    match run(&spec) {
        Err(Stop::RiskChanged(why)) => {
            let line = format!("{REFUSED_PREFIX}{why}");
            match super::status_pipe(super::STATUS_FD) {
                Some(mut status) => {
                    use std::io::Write;
                    let _ = writeln!(status, "{line}");
                }
                // Run by hand, without the daemon's pipe.
                None => eprintln!("{line}"),
            }
            EXIT_RISK_CHANGED
        }
        Err(Stop::Failed(why)) => {
            eprintln!("devos sandbox: refused: {why}");
            EXIT_SANDBOX_FAILED
        }
    }
}

fn run(spec: &Spec) -> Result<Infallible, Stop> {
    let prepared = as_caller(&spec.caller, || prepare(spec))??;
    all_opened(&prepared, &spec.caller.home)?;
    let exe =
        std::env::current_exe().map_err(|e| failed(format!("the agent's own binary: {e}")))?;
    let git_dir = spec.private_dir.join("git");
    let mounts = MountTable::read();
    let aliases = system_aliases(spec, &mounts);
    let mut args = bwrap_args(spec, &prepared, &mounts, &aliases);
    // The sandbox's own directory: readable by the action (bubblewrap would make the
    // parents of its binds 0700).
    args.extend(["--perms", "0755", "--dir", INSIDE_DIR].map(String::from));
    let mut pinned = Vec::new();
    if let Some(git) = &prepared.git {
        std::fs::create_dir_all(&git_dir).map_err(failed)?;
        let files = git.configs.iter().map(|(t, c)| (t, c.as_bytes()));
        let pins = git.pins.iter().map(|(t, c)| (t, c.as_slice()));
        for (i, (target, content)) in files.chain(pins).enumerate() {
            let file = git_dir.join(format!("file-{i}"));
            write_readable(&file, content)?;
            args.extend(bind("--ro-bind", &file, target));
            // Inside, `target` must be this very file.
            let mut id = super::Identity::of(&file)
                .ok_or_else(|| failed(format!("{} vanished", file.display())))?;
            id.path = target.clone();
            pinned.push(id);
        }
        let global = git_dir.join("global");
        write_readable(&global, git.global.as_bytes())?;
        args.extend(bind(
            "--ro-bind",
            &global,
            &Path::new(INSIDE_DIR).join("gitconfig"),
        ));
        args.extend(["--dir".into(), format!("{INSIDE_DIR}/no-hooks")]);
    }
    args.extend(bind(
        "--ro-bind",
        &exe,
        &Path::new(INSIDE_DIR).join("devos-agent"),
    ));
    args.extend([
        "--".into(),
        format!("{INSIDE_DIR}/devos-agent"),
        "sandbox-exec".into(),
        "--inside".into(),
    ]);
    let mut inner = inner_spec(spec, &prepared);
    // The daemon's status pipe goes on to the inner stage, as one of the descriptors
    // handed to bubblewrap; a sandbox-exec started without one is refused.
    let status = super::status_pipe(super::STATUS_FD)
        .ok_or_else(|| failed("no status pipe from the daemon on descriptor 3"))?;
    let status = std::os::fd::OwnedFd::from(status);
    inner.status_fd = std::os::fd::AsRawFd::as_raw_fd(&status);
    prepared.handed.borrow_mut().push(status);
    inner.identities.extend(pinned);
    inner.covers = covers(spec, &prepared, &mounts, &aliases);
    inner.stand_ins = stand_ins(spec, &prepared, &aliases);
    let inner_path = spec.private_dir.join("inner.json");
    std::fs::write(&inner_path, serde_json::to_vec(&inner).map_err(failed)?)
        .map_err(|e| failed(format!("{}: {e}", inner_path.display())))?;
    let stdin = std::fs::File::open(&inner_path).map_err(failed)?;
    // bubblewrap reads the open file; a copy left behind goes with the private
    // directory when the action ends.
    let _ = std::fs::remove_file(&inner_path);
    if let Some(cgroup) = &spec.cgroup {
        super::cgroup::join(cgroup).map_err(failed)?;
    }
    // bubblewrap gets the descriptors opened as the caller (and closes them), and no
    // other.
    super::close_on_exec_from_3().map_err(|e| failed(format!("close_range: {e}")))?;
    for fd in prepared.handed.borrow().iter() {
        nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )
        .map_err(failed)?;
    }
    // If the daemon dies, so does the action (bubblewrap's --die-with-parent then
    // takes the namespace down).
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(failed)?;
    let err = std::process::Command::new(&spec.bwrap)
        .args(&args)
        .env_clear()
        .stdin(stdin)
        .exec();
    Err(failed(format!(
        "cannot run {}: {err} (install bubblewrap)",
        spec.bwrap.display()
    )))
}

fn write_readable(path: &Path, content: &[u8]) -> Result<(), Stop> {
    std::fs::write(path, content)
        .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)))
        .map_err(|e| failed(format!("{}: {e}", path.display())))
}

fn bind(kind: &str, from: &Path, to: &Path) -> [String; 3] {
    [
        kind.to_owned(),
        from.to_string_lossy().into_owned(),
        to.to_string_lossy().into_owned(),
    ]
}

/// Run `f` with the caller's effective uid, gid and groups, then become root again.
fn as_caller<T>(caller: &Caller, f: impl FnOnce() -> T) -> Result<T, Stop> {
    use nix::unistd::{Gid, Uid, setegid, seteuid, setgroups};
    if caller.uid == 0 {
        return Ok(f());
    }
    let groups: Vec<Gid> = caller.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    setgroups(&groups).map_err(|e| failed(format!("setgroups: {e}")))?;
    setegid(Gid::from_raw(caller.gid)).map_err(|e| failed(format!("setegid: {e}")))?;
    seteuid(Uid::from_raw(caller.uid)).map_err(|e| failed(format!("seteuid: {e}")))?;
    let result = f();
    let back = seteuid(Uid::from_raw(0))
        .and_then(|()| setegid(Gid::from_raw(0)))
        .and_then(|()| setgroups(&[]));
    if let Err(e) = back {
        // Never go on half-privileged.
        eprintln!("devos sandbox: cannot become root again: {e}");
        std::process::exit(EXIT_SANDBOX_FAILED);
    }
    Ok(result)
}

/// Paths opened as the caller, each with its descriptor.
type OpenedPaths = Vec<(PathBuf, std::os::fd::OwnedFd)>;

/// What the outer stage found out as the caller.
struct Prepared {
    cwd: PathBuf,
    profile: Profile,
    /// Secret locations to hide, and whether each is a directory.
    hidden_secrets: Vec<(PathBuf, bool)>,
    /// Paths inside writable places that stay read-only.
    read_only: Vec<PathBuf>,
    git: Option<GitPrepared>,
    /// `/etc/resolv.conf`'s target when it lives under `/run` (systemd-resolved).
    resolv: Option<PathBuf>,
    home_visible: bool,
    /// What the bound paths were when checked as the caller.
    identities: Vec<super::Identity>,
    /// The bound paths, opened as the caller.
    fds: OpenedPaths,
    /// Copies of those descriptors handed to bubblewrap, one per bind (it closes
    /// each after use).
    handed: std::cell::RefCell<Vec<std::os::fd::OwnedFd>>,
}

impl Prepared {
    /// A bind of a path the caller reached: by the descriptor opened as the caller.
    fn bind(&self, writable: bool, path: &Path) -> [String; 3] {
        use std::os::fd::AsRawFd;
        match self.fds.iter().find(|(p, _)| p == path) {
            Some((_, fd)) => {
                // Without a copy the original goes (close-on-exec: bubblewrap then
                // fails, and nothing runs).
                let raw = match fd.try_clone() {
                    Ok(copy) => {
                        let raw = copy.as_raw_fd();
                        self.handed.borrow_mut().push(copy);
                        raw
                    }
                    Err(_) => fd.as_raw_fd(),
                };
                let kind = if writable {
                    "--bind-fd"
                } else {
                    "--ro-bind-fd"
                };
                [
                    kind.to_owned(),
                    raw.to_string(),
                    path.to_string_lossy().into_owned(),
                ]
            }
            // (Every path bound is opened in `prepare`; only hand-built test values
            // lack descriptors.)
            None => bind(if writable { "--bind" } else { "--ro-bind" }, path, path),
        }
    }
}

struct GitPrepared {
    repo: Option<Repo>,
    /// Reduced copies of the repository's configuration files and where they go.
    configs: Vec<(PathBuf, String)>,
    /// The reduced global configuration.
    global: String,
    /// Submodules `.gitmodules` names: git must not step into them (their own
    /// configuration is not reduced).
    submodules: Vec<String>,
    /// Files that say where the repository is (a `.git` file, `commondir`), replaced
    /// by devos's own reading with absolute paths, so git finds what devos checked.
    pins: Vec<(PathBuf, Vec<u8>)>,
}

fn prepare(spec: &Spec) -> Result<Prepared, Stop> {
    let caller = &spec.caller;
    let cwd = enter_working_directory(spec)?;
    let now = classify_as(&spec.action, &cwd, caller, &spec.secrets);
    now.within(&spec.approved)
        .map_err(|grew| Stop::RiskChanged(grew.to_string()))?;
    let mut profile = Profile::of(&spec.approved, &cwd, spec.as_root);
    let mut listed = Vec::new();
    if !profile.root {
        (profile.writable, listed) = writable_in_home(profile.writable, &caller.home);
    }
    check_reachable(&cwd, &mut profile, &listed, caller)?;
    check_not_forbidden(spec, &cwd, &profile, &MountTable::read())?;
    let hidden_secrets = hidden_secrets(spec, &profile);
    let is_git = is_git(&spec.action, spec.approved.program.as_deref());
    let unrestricted_git = spec.approved.repo_programs || spec.approved.class == RiskClass::Unknown;
    let repo = find_repo(&cwd, is_git && !unrestricted_git)?;
    let mut read_only = read_only_in_writable(spec, &profile);
    if let Some(repo) = &repo
        && !profile.root
    {
        protect_repo(repo, &profile, is_git, unrestricted_git, &mut read_only);
    }
    let git = if is_git && !unrestricted_git {
        Some(git_prepare(repo, caller, profile.writable.is_empty())?)
    } else {
        None
    };
    // A resolv.conf that is missing or leads nowhere has nothing to bind.
    let resolv = profile
        .network
        .then(|| std::fs::canonicalize("/etc/resolv.conf").ok())
        .flatten()
        .filter(|p| p.starts_with("/run"));
    let (identities, fds) = open_binds(&cwd, &mut profile, &mut read_only, &listed, caller)?;
    Ok(Prepared {
        cwd,
        identities,
        fds,
        handed: Default::default(),
        home_visible: caller.home.is_dir(),
        profile,
        hidden_secrets,
        read_only,
        git,
        resolv,
    })
}

/// Enter the working directory as the caller; it must still be the one approved.
fn enter_working_directory(spec: &Spec) -> Result<PathBuf, Stop> {
    let cwd = std::env::set_current_dir(&spec.cwd)
        .and_then(|()| std::env::current_dir())
        .map_err(|e| {
            failed(format!(
                "cannot enter the working directory {} as {}: {e}",
                spec.cwd.display(),
                spec.caller.user
            ))
        })?;
    if cwd != spec.cwd {
        return Err(Stop::RiskChanged(format!(
            "the working directory {} now leads to {}",
            spec.cwd.display(),
            cwd.display()
        )));
    }
    Ok(cwd)
}

/// Every place the sandbox will show the action must be one the caller can reach
/// (checked here, as the caller): bubblewrap, as root, could mount anything.
/// An entry of the home listed for writing that is gone since is left out ([`gone`]).
fn check_reachable(
    cwd: &PathBuf,
    profile: &mut Profile,
    listed: &[PathBuf],
    caller: &Caller,
) -> Result<(), Stop> {
    let mut vanished = Vec::new();
    for p in std::iter::once(cwd).chain(&profile.writable) {
        match std::fs::metadata(p) {
            Ok(_) => {}
            Err(e) if gone(p, cwd, listed, &e) => vanished.push(p.clone()),
            Err(e) => {
                return Err(failed(format!(
                    "{} is not a place you ({}) can reach: {e}",
                    p.display(),
                    caller.user
                )));
            }
        }
    }
    profile.writable.retain(|w| !vanished.contains(w));
    Ok(())
}

/// Whether `p`, which could not be reached (`e`), is an entry of the home listed for
/// writing that the caller's own work removed since: it is then left out of what is
/// writable (a new one by that name stays out of reach, as anything new in the home).
fn gone(p: &Path, cwd: &Path, listed: &[PathBuf], e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::NotFound && p != cwd && listed.iter().any(|l| l == p)
}

/// Unless it runs as root, an action neither works in nor writes any of the
/// [`forbidden_places`].
fn check_not_forbidden(
    spec: &Spec,
    cwd: &PathBuf,
    profile: &Profile,
    mounts: &MountTable,
) -> Result<(), Stop> {
    if profile.root {
        return Ok(());
    }
    // Another name of a hidden place below a directory users may change is covered
    // whole once everything is bound (by the inner stage): nothing inside it can be
    // worked in.
    // Nor can one bubblewrap hides itself (nothing is bound back on it).
    let Aliases { fixed, rerouted } = system_aliases(spec, mounts);
    if let Some((path, alias)) = std::iter::once(cwd).chain(&profile.writable).find_map(|p| {
        (rerouted.iter().find(|(a, _)| p.starts_with(a)))
            .or_else(|| fixed.iter().find(|(a, _)| p == a))
            .map(|(a, _)| (p, a))
    }) {
        return Err(failed(format!(
            "{} is inside {}, another name (a bind mount) of a place no action sees, which the sandbox hides whole: work in the same directory through its own name",
            path.display(),
            alias.display()
        )));
    }
    let forbidden = forbidden_places(spec, mounts);
    let Some((path, place)) = std::iter::once(cwd).chain(&profile.writable).find_map(|p| {
        // (The place nearest to it, for the most telling reason.)
        forbidden
            .iter()
            .filter(|f| p.starts_with(f))
            .max_by_key(|f| f.components().count())
            .map(|f| (p, f))
    }) else {
        return Ok(());
    };
    Err(failed(inside_forbidden(path, place)))
}

/// The places no action sees on any machine: where an action works in one, it is
/// refused when planned, before anyone is asked (the sandbox checks again, with the
/// places only it knows: other names of these, the agent's files, deny rules).
const SHARED_PLACES: [&str; 5] = ["/run", "/tmp", "/var/tmp", "/dev/shm", "/proc"];

/// Why an action that works in `cwd` (canonical) could never run, if it is inside one
/// of the places no action sees.
pub fn shared_place(cwd: &Path) -> Option<String> {
    let place = SHARED_PLACES
        .iter()
        .map(Path::new)
        .find(|p| cwd.starts_with(p))?;
    Some(inside_forbidden(cwd, place))
}

/// `path` is inside forbidden `place`: what the refusal says.
fn inside_forbidden(path: &Path, place: &Path) -> String {
    let why = if place.starts_with("/run") {
        "it holds the sockets of the system and its users"
    } else if ["/tmp", "/var/tmp", "/dev/shm"]
        .iter()
        .any(|t| place == Path::new(t))
    {
        "it is shared with every user and their programs' sockets (each action has its own); work in a directory of your home"
    } else if place.starts_with("/proc") {
        "it is the processes' view of the system"
    } else {
        "it holds the agent's own files, or the policy's deny rules name it"
    };
    if path == place {
        return format!("{} is a place no action may see: {why}", path.display());
    }
    format!(
        "{} is inside {}, which no action may see: {why}",
        path.display(),
        place.display()
    )
}

/// The caller's secret locations the approval did not grant, resolved, and whether
/// each is a directory.
fn hidden_secrets(spec: &Spec, profile: &Profile) -> Vec<(PathBuf, bool)> {
    let granted: Vec<PathBuf> = profile
        .secrets
        .iter()
        .flat_map(|s| {
            [
                s.clone(),
                std::fs::canonicalize(s).unwrap_or_else(|_| s.clone()),
            ]
        })
        .collect();
    let mut hidden_secrets = Vec::new();
    for secret in spec.caller.secrets(&spec.secrets) {
        if granted.iter().any(|g| secret.starts_with(g)) {
            continue;
        }
        if let Ok(real) = std::fs::canonicalize(&secret)
            && !granted.iter().any(|g| real.starts_with(g))
            && !hidden_secrets.iter().any(|(p, _)| *p == real)
        {
            hidden_secrets.push((real.clone(), real.is_dir()));
        }
    }
    hidden_secrets
}

/// The repository around the working directory. When git runs with devos's reduced
/// configuration, a layout devos cannot follow stops it.
fn find_repo(cwd: &Path, must_follow: bool) -> Result<Option<Repo>, Stop> {
    match gitrepo::find(cwd) {
        Ok(repo) => Ok(repo),
        Err(e) if must_follow => Err(failed(format!(
            "this repository's layout is one devos cannot follow ({e}); git was not run"
        ))),
        Err(_) => Ok(None),
    }
}

fn inside_writable(profile: &Profile, p: &Path) -> bool {
    profile.writable.iter().any(|w| p.starts_with(w))
}

/// The configured read-only paths that lie inside a writable place and were not
/// approved by name.
fn read_only_in_writable(spec: &Spec, profile: &Profile) -> Vec<PathBuf> {
    let mut read_only = Vec::new();
    for p in spec.caller.secrets(&spec.read_only) {
        if let Ok(real) = std::fs::canonicalize(&p)
            && inside_writable(profile, &real)
            && !spec.approved.paths.contains(&real)
            && !read_only.contains(&real)
        {
            read_only.push(real);
        }
    }
    read_only
}

/// A project's code must not leave hooks or settings behind that run the next time
/// the user runs git outside the sandbox.
fn protect_repo(
    repo: &Repo,
    profile: &Profile,
    is_git: bool,
    unrestricted_git: bool,
    read_only: &mut Vec<PathBuf>,
) {
    // git itself writes objects, refs, the index and logs; nothing that says what
    // runs or where the repository is.
    let dot_git = repo.work_tree.join(".git");
    let protect = if !is_git {
        vec![dot_git, repo.common_dir.clone(), repo.git_dir.clone()]
    } else if !unrestricted_git {
        // (The configuration files, `commondir` and a `.git` file are replaced by
        // devos's own read-only copies.)
        ["hooks", "modules", "info", "worktrees"]
            .iter()
            .map(|p| repo.common_dir.join(p))
            .chain(std::iter::once(repo.git_dir.join("gitdir")))
            .collect()
    } else {
        Vec::new()
    };
    for p in protect {
        if p.exists() && inside_writable(profile, &p) && !read_only.contains(&p) {
            read_only.push(p);
        }
    }
}

/// What the sandbox binds is opened here, as the caller, and handed to bubblewrap
/// open: bubblewrap, as root, never looks a path of the caller's up. An entry of the
/// home listed for writing that is gone since is left out ([`gone`]), with the
/// read-only places inside it.
fn open_binds(
    cwd: &PathBuf,
    profile: &mut Profile,
    read_only: &mut Vec<PathBuf>,
    listed: &[PathBuf],
    caller: &Caller,
) -> Result<(Vec<super::Identity>, OpenedPaths), Stop> {
    let mut identities = Vec::new();
    let mut fds: OpenedPaths = Vec::new();
    let mut vanished: Vec<PathBuf> = Vec::new();
    for p in std::iter::once(cwd)
        .chain(&profile.writable)
        .chain(read_only.iter())
        .chain(caller.home.is_dir().then_some(&caller.home))
    {
        if fds.iter().any(|(q, _)| q == p) || vanished.iter().any(|v| p.starts_with(v)) {
            continue;
        }
        let fd = match nix::fcntl::open(
            p.as_path(),
            nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(e) if gone(p, cwd, listed, &std::io::Error::from(e)) => {
                vanished.push(p.clone());
                continue;
            }
            Err(e) => return Err(failed(format!("{}: {e}", p.display()))),
        };
        let st = nix::sys::stat::fstat(&fd).map_err(failed)?;
        identities.push(super::Identity {
            path: p.clone(),
            dev: st.st_dev,
            ino: st.st_ino,
        });
        fds.push((p.clone(), fd));
    }
    profile.writable.retain(|w| !vanished.contains(w));
    read_only.retain(|r| !vanished.iter().any(|v| r.starts_with(v)));
    Ok((identities, fds))
}

/// Every place bound from the caller's side was opened as the caller: none is handed
/// to bubblewrap by name (see [`Prepared::bind`]).
fn all_opened(p: &Prepared, home: &PathBuf) -> Result<(), Stop> {
    let bound = std::iter::once(&p.cwd)
        .chain(&p.profile.writable)
        .chain(&p.read_only)
        .chain(p.home_visible.then_some(home));
    for path in bound {
        if !p.fds.iter().any(|(q, _)| q == path) {
            return Err(failed(format!(
                "{} was not opened as you before the sandbox was built; nothing ran",
                path.display()
            )));
        }
    }
    Ok(())
}

fn is_git(action: &Action, program: Option<&Path>) -> bool {
    matches!(action, Action::Git { .. })
        || program.is_some_and(|p| p.file_name().is_some_and(|n| n == "git"))
}

/// The repository's and the user's git configuration without anything that could
/// run a program, as the caller reads them.
fn git_prepare(repo: Option<Repo>, caller: &Caller, read_only: bool) -> Result<GitPrepared, Stop> {
    let read = |path: &Path, level: Level| -> Result<Option<String>, Stop> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let settings = gitrepo::parse_config(&text).map_err(|e| {
                    failed(format!(
                        "git could not use {} either ({e}); nothing ran",
                        path.display()
                    ))
                })?;
                Ok(Some(gitrepo::sanitize(&settings, level)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(failed(format!("cannot read {}: {e}", path.display()))),
        }
    };
    let mut configs = Vec::new();
    if let Some(repo) = &repo {
        for file in repo
            .config_files()
            .into_iter()
            .chain(repo.submodule_configs())
        {
            if file.symlink_metadata().is_ok_and(|m| !m.is_file()) {
                return Err(failed(format!(
                    "{} is not a plain file; devos runs git only with a plain repository configuration",
                    file.display()
                )));
            }
            if let Some(reduced) = read(&file, Level::Repository)? {
                configs.push((file, reduced));
            }
        }
    }
    let level = if read_only {
        Level::GlobalRead
    } else {
        Level::GlobalWrite
    };
    let mut global = String::new();
    for file in [".gitconfig", ".config/git/config"] {
        if let Some(reduced) = read(&caller.home.join(file), level)? {
            global.push_str(&reduced);
        }
    }
    let mut submodules = Vec::new();
    if let Some(repo) = &repo {
        let file = repo.work_tree.join(".gitmodules");
        if let Ok(text) = std::fs::read_to_string(&file) {
            let settings = gitrepo::parse_config(&text).map_err(|e| {
                failed(format!(
                    "git could not use {} either ({e}); nothing ran",
                    file.display()
                ))
            })?;
            for s in settings.into_iter().filter(|s| s.section == "submodule") {
                if let Some(name) = s.subsection
                    && !submodules.contains(&name)
                {
                    submodules.push(name);
                }
            }
        }
    }
    let mut pins = Vec::new();
    if let Some(repo) = &repo {
        let dot_git = repo.work_tree.join(".git");
        let line =
            |prefix: &[u8], path: &Path| [prefix, path.as_os_str().as_bytes(), b"\n"].concat();
        if dot_git.is_file() {
            pins.push((dot_git, line(b"gitdir: ", &repo.git_dir)));
        }
        let commondir = repo.git_dir.join("commondir");
        if commondir.exists() {
            pins.push((commondir, line(b"", &repo.common_dir)));
        }
    }
    Ok(GitPrepared {
        repo,
        configs,
        global,
        submodules,
        pins,
    })
}

/// What bubblewrap mounts, with the mount table `mounts` (for the other names of what
/// is hidden). Only places root alone can change are named here; what is covered in
/// places users can change is the inner stage's ([`covers`]).
fn bwrap_args(spec: &Spec, p: &Prepared, mounts: &MountTable, aliases: &Aliases) -> Vec<String> {
    let mut a: Vec<String> = [
        "--die-with-parent",
        "--new-session",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
    ]
    .map(String::from)
    .to_vec();
    if !p.profile.network {
        a.push("--unshare-net".into());
    }
    let private = |name: &str| spec.private_dir.join(name);
    if p.profile.root {
        a.extend(["--cap-add".into(), "ALL".into()]);
        a.extend(bind("--bind", Path::new("/"), Path::new("/")));
        a.extend(bind("--dev-bind", Path::new("/dev"), Path::new("/dev")));
        a.extend(["--proc".into(), "/proc".into()]);
        a.extend(bind("--bind", &private("tmp"), Path::new("/tmp")));
        a.extend(tmpfs(Path::new("/home")));
        return a;
    }
    // Just enough for the inner stage to cover places and become the caller; all are
    // gone before anything of the action runs.
    a.extend(
        [
            "--cap-add",
            "CAP_SYS_ADMIN",
            "--cap-add",
            "CAP_DAC_READ_SEARCH",
            "--cap-add",
            "CAP_SETPCAP",
        ]
        .map(String::from),
    );
    if spec.caller.uid != 0 {
        a.extend(["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"].map(String::from));
    }
    // Order matters: later mounts cover earlier ones. Writable places outside the
    // hidden ones first, then everything hidden (so a writable ancestor cannot
    // uncover it), then what the action works in below a hidden place. The agent's
    // files, the places deny rules name and secrets are covered after all of it, by
    // the inner stage (nothing below them is put back: the home or working directory
    // above one cannot uncover it).
    let hidden = hidden_places(spec, mounts);
    let below_hidden = |p: &Path| hidden.iter().any(|h| p.starts_with(h));
    let strictly_below_hidden = |p: &Path| hidden.iter().any(|h| p != h && p.starts_with(h));
    a.extend(bind("--ro-bind", Path::new("/"), Path::new("/")));
    a.extend(["--dev", "/dev", "--proc", "/proc"].map(String::from));
    for w in p.profile.writable.iter().filter(|w| !below_hidden(w)) {
        a.extend(p.bind(true, w));
    }
    // The other names of the system's hidden places first: one may be another of
    // them (`/var/tmp` bound on `/tmp`), which gets its own below.
    for (alias, dir) in &aliases.fixed {
        if *dir {
            a.extend(tmpfs(alias));
        } else {
            a.extend(bind("--ro-bind", Path::new("/dev/null"), alias));
        }
    }
    a.extend(tmpfs(Path::new("/run")));
    // On NixOS the system's programs are found through its profile, a link in /run to
    // the Nix store (risk::programs::SYSTEM_PATH): the link comes back, nothing else.
    if let Ok(profile) = std::fs::read_link("/run/current-system") {
        a.push("--symlink".into());
        a.push(profile.to_string_lossy().into_owned());
        a.push("/run/current-system".into());
    }
    a.extend(tmpfs(Path::new("/home")));
    for (name, inside) in super::PRIVATE_DIRS {
        a.extend(bind("--bind", &private(name), Path::new(inside)));
    }
    if spec.caller.uid != 0 {
        a.extend(tmpfs(Path::new("/root")));
    }
    if p.home_visible && strictly_below_hidden(&spec.caller.home) {
        a.extend(p.bind(false, &spec.caller.home));
    }
    if strictly_below_hidden(&p.cwd) {
        a.extend(p.bind(false, &p.cwd));
    }
    for w in p
        .profile
        .writable
        .iter()
        .filter(|w| strictly_below_hidden(w))
    {
        a.extend(p.bind(true, w));
    }
    for r in &p.read_only {
        a.extend(p.bind(false, r));
    }
    if let Some(r) = &p.resolv {
        a.extend(bind("--ro-bind", r, r));
    }
    a
}

/// When the caller's home itself would be writable, only what already is in it and
/// not hidden (names without a leading dot, not symlinks) is: nothing can be added to
/// the home, so no start-up file, `~/.local`, `~/.config` or `~/.ssh` that does not
/// exist yet can be created.
/// Also returns the entries listed.
fn writable_in_home(writable: Vec<PathBuf>, home: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let mut out = Vec::new();
    let mut listed = Vec::new();
    for w in writable {
        if w != home {
            out.push(w);
            continue;
        }
        for entry in std::fs::read_dir(home).into_iter().flatten().flatten() {
            let visible = !entry.file_name().to_string_lossy().starts_with('.');
            if visible && entry.file_type().is_ok_and(|t| !t.is_symlink()) {
                out.push(entry.path());
                listed.push(entry.path());
            }
        }
    }
    (out, listed)
}

/// What no action sees (before what it works in is put back): `/run` with every
/// daemon and bus socket, shared temporary directories, the homes, `/root` unless the
/// caller is root, and the agent's own files.
fn hidden_places(spec: &Spec, mounts: &MountTable) -> Vec<PathBuf> {
    let mut hidden = system_hidden_places(spec);
    hidden.extend(spec.hide.iter().cloned());
    // Where a hidden place is a symlink (`/home` -> `var/home` in DevOS images), what
    // is below its target is below it too, and below its other names (bind mounts).
    let targets: Vec<PathBuf> = hidden
        .iter()
        .map(|h| real(h))
        .flat_map(|r| {
            let aliases = mounts.aliases(&r);
            std::iter::once(r).chain(aliases)
        })
        .collect();
    for t in targets {
        if !hidden.contains(&t) {
            hidden.push(t);
        }
    }
    hidden
}

/// The system's places no action sees, whatever the policy says.
fn system_hidden_places(spec: &Spec) -> Vec<PathBuf> {
    let mut hidden: Vec<PathBuf> = ["/run", "/tmp", "/var/tmp", "/dev/shm", "/home"]
        .iter()
        .map(PathBuf::from)
        .collect();
    if spec.caller.uid != 0 {
        hidden.push(PathBuf::from("/root"));
    }
    hidden
}

/// Places, each with whether it is a directory.
type Places = Vec<(PathBuf, bool)>;

/// [`system_aliases`]: those bubblewrap hides by name, and those the inner stage covers.
struct Aliases {
    fixed: Places,
    rerouted: Places,
}

/// The other names bind mounts give the system's hidden places (NixOS images mount
/// `/var/home` on `/home`), to be hidden too: what is hidden at one name is hidden at
/// all. One that is itself among those places is left to be hidden as that place.
/// Split by whether the way to it is root's alone: bubblewrap hides those by name
/// before anything is bound back; the others (a user could swap a part of the way for
/// a link) are the inner stage's to cover on handles ([`covers`]). Files too (a
/// socket of `/run` bound elsewhere).
fn system_aliases(spec: &Spec, mounts: &MountTable) -> Aliases {
    let own: Vec<PathBuf> = system_hidden_places(spec).iter().map(|p| real(p)).collect();
    let (fixed, rerouted) = own
        .iter()
        .flat_map(|place| mounts.aliases(place))
        .filter(|a| !own.contains(a))
        .map(|a| real(&a))
        .filter_map(|a| {
            let meta = std::fs::symlink_metadata(&a).ok()?;
            (!meta.file_type().is_symlink()).then(|| (a, meta.is_dir()))
        })
        .partition(|(a, _)| crate::risk::paths::changeable_by_users(a, mounts).is_none());
    Aliases { fixed, rerouted }
}

/// `path` with the symlinks root alone could have made resolved (`/home` ->
/// `/var/home`); bubblewrap mounts as root, so no link a user planted is followed.
fn real(path: &Path) -> PathBuf {
    crate::risk::paths::resolve_trusted(path).0
}

/// An empty tmpfs over `path`, mounted on its real place: bubblewrap 0.11 and later
/// mount on no symlink, and `/home` is one in DevOS images (to `/var/home`).
fn tmpfs(path: &Path) -> [String; 2] {
    [
        "--tmpfs".to_owned(),
        real(path).to_string_lossy().into_owned(),
    ]
}

/// What the inner stage makes absent, after everything bubblewrap mounted: the agent's
/// own files and the places the administrator's deny rules name, then the other names
/// of the system's hidden places users could change the way to, and the caller's
/// secret locations the approval did not grant (read-only).
///
/// A deny place only where it is, through no link but root's: a place a user moved
/// away, or replaced with a link (to `/`, say), is not where the rule says any more,
/// and root must not be sent elsewhere. The inner stage opens each without following
/// any link, so a part swapped for one after this look refuses the action.
fn covers(spec: &Spec, p: &Prepared, mounts: &MountTable, aliases: &Aliases) -> Vec<Cover> {
    let mut covers: Vec<Cover> = Vec::new();
    let mut add = |cover: Option<Cover>| {
        if let Some(cover) = cover.filter(|n| !covers.iter().any(|c| c.path == n.path)) {
            covers.push(cover);
        }
    };
    for h in &spec.hide {
        let place = real(h);
        let names = mounts.aliases(&place);
        for name in std::iter::once(place).chain(names) {
            let (place, exists) = crate::risk::paths::resolve_trusted(&name);
            // (Never `/`, the whole system, whatever a rule's path leads to.)
            let Some(meta) = (exists && place.parent().is_some())
                .then(|| std::fs::symlink_metadata(&place).ok())
                .flatten()
            else {
                continue;
            };
            add(Cover::of(place, meta.is_dir(), false));
        }
    }
    if !p.profile.root {
        for (alias, dir) in &aliases.rerouted {
            add(Cover::of(alias.clone(), *dir, true));
        }
        for (secret, dir) in &p.hidden_secrets {
            add(Cover::of(secret.clone(), *dir, true));
        }
    }
    covers
}

/// Where bubblewrap puts an empty file system of its own, or the action's private
/// directory, in place of what is there outside (see `Inner::stand_ins`).
fn stand_ins(spec: &Spec, p: &Prepared, aliases: &Aliases) -> Vec<PathBuf> {
    // (`/proc` is a fresh instance; so is `/dev`, but for root's package installs.)
    if p.profile.root {
        return ["/home", "/tmp", "/proc"]
            .map(|s| real(Path::new(s)))
            .to_vec();
    }
    let hidden = system_hidden_places(spec).into_iter().map(|h| real(&h));
    let fixed = aliases.fixed.iter().filter(|(_, dir)| *dir);
    hidden
        .chain(fixed.map(|(a, _)| a.clone()))
        .chain(["/dev", "/proc"].map(PathBuf::from))
        .collect()
}

/// Places an action may never work in or write, even when its user can: sockets live
/// there (`/run`, and the temporary directories every user and program shares — each
/// action has its own), and the agent's own files and what deny rules name, as written
/// and where their links lead (`/home` is `/var/home` in DevOS images).
fn forbidden_places(spec: &Spec, mounts: &MountTable) -> Vec<PathBuf> {
    SHARED_PLACES
        .iter()
        .map(PathBuf::from)
        .chain(spec.hide.iter().flat_map(|h| [h.clone(), real(h)]))
        .flat_map(|f| {
            let aliases = mounts.aliases(&f);
            std::iter::once(f).chain(aliases)
        })
        .filter(|f| f.parent().is_some())
        .collect()
}

fn inner_spec(spec: &Spec, p: &Prepared) -> Inner {
    let caller = &spec.caller;
    let mut env = if p.profile.root {
        base_environment("root", Path::new("/root"))
    } else {
        base_environment(&caller.user, &caller.home)
    };
    if is_git(&spec.action, spec.approved.program.as_deref()) {
        env.extend(
            [
                ("GIT_PAGER", "cat"),
                ("PAGER", "cat"),
                ("GIT_EDITOR", "true"),
                ("GIT_SEQUENCE_EDITOR", "true"),
                ("GIT_ALLOW_PROTOCOL", "file:git:http:https:ssh"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
        );
    }
    if let Some(git) = &p.git {
        env.extend(reduced_git_environment(git, p.profile.writable.is_empty()));
    }
    Inner {
        uid: caller.uid,
        gid: caller.gid,
        groups: caller.groups.clone(),
        user: caller.user.clone(),
        as_root: p.profile.root,
        cwd: p.cwd.clone(),
        action: spec.action.clone(),
        program: spec.approved.program.clone(),
        env,
        writable: p.profile.writable.clone(),
        identities: p.identities.clone(),
        covers: Vec::new(),
        stand_ins: Vec::new(),
        network: p.profile.network,
        required: spec.required,
        limits: spec.limits,
        outer: describe_outer(spec, p),
        // (Set once the status pipe is opened for bubblewrap.)
        status_fd: -1,
    }
}

/// The environment that makes git use devos's reduced configuration and the
/// repository devos checked.
fn reduced_git_environment(git: &GitPrepared, read_only: bool) -> Vec<(String, String)> {
    let overrides = git_overrides(git);
    let mut env: Vec<(String, String)> = Vec::new();
    env.push(("GIT_CONFIG_NOSYSTEM".into(), "1".into()));
    env.push((
        "GIT_CONFIG_GLOBAL".into(),
        format!("{INSIDE_DIR}/gitconfig"),
    ));
    env.push(("GIT_CONFIG_COUNT".into(), overrides.len().to_string()));
    for (i, (k, v)) in overrides.into_iter().enumerate() {
        env.push((format!("GIT_CONFIG_KEY_{i}"), k));
        env.push((format!("GIT_CONFIG_VALUE_{i}"), v));
    }
    if let Some(repo) = &git.repo {
        env.push((
            "GIT_DIR".into(),
            repo.git_dir.to_string_lossy().into_owned(),
        ));
        env.push((
            "GIT_COMMON_DIR".into(),
            repo.common_dir.to_string_lossy().into_owned(),
        ));
        env.push((
            "GIT_WORK_TREE".into(),
            repo.work_tree.to_string_lossy().into_owned(),
        ));
    }
    if read_only {
        env.push(("GIT_OPTIONAL_LOCKS".into(), "0".into()));
    }
    env
}

/// Command-line configuration: above every file, and inherited by the git processes
/// git starts.
fn git_overrides(git: &GitPrepared) -> Vec<(String, String)> {
    let mut overrides: Vec<(String, String)> = [
        ("core.hooksPath", format!("{INSIDE_DIR}/no-hooks")),
        ("core.fsmonitor", "false".into()),
        ("safe.bareRepository", "explicit".into()),
        ("core.pager", "cat".into()),
        ("protocol.ext.allow", "never".into()),
        ("diff.ignoreSubmodules", "all".into()),
        ("status.submoduleSummary", "false".into()),
        ("submodule.recurse", "false".into()),
        ("fetch.recurseSubmodules", "false".into()),
        ("push.recurseSubmodules", "no".into()),
    ]
    .map(|(k, v)| (k.to_owned(), v))
    .to_vec();
    overrides.extend(
        git.submodules
            .iter()
            .map(|name| (format!("submodule.{name}.ignore"), "all".to_owned())),
    );
    overrides
}

/// What the outer stage set up, as the action's record shows it.
fn describe_outer(spec: &Spec, p: &Prepared) -> String {
    let mut outer = vec![
        if p.profile.network {
            "namespaces: mount, pid, ipc, uts (network shared)".to_owned()
        } else {
            "namespaces: mount, pid, ipc, uts, network (empty)".to_owned()
        },
        p.profile.describe(),
    ];
    if !p.hidden_secrets.is_empty() {
        outer.push(format!(
            "{} secret locations hidden",
            p.hidden_secrets.len()
        ));
    }
    if p.git.is_some() {
        outer.push("git without the repository's programs".into());
    }
    outer.push(match &spec.cgroup {
        Some(c) => format!("cgroup {}", super::cgroup::describe(c)),
        None => "no cgroup limits (no delegated cgroup v2)".into(),
    });
    outer.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::risk::RiskClass;

    fn spec(uid: u32, cwd: &str, class: RiskClass, action: Action) -> Spec {
        let mut approved = crate::caller::classify_as(
            &Action::Run {
                argv: vec!["true".into()],
            },
            Path::new("/"),
            &caller(uid),
            &[],
        );
        approved.class = class;
        Spec {
            caller: caller(uid),
            cwd: PathBuf::from(cwd),
            action,
            approved,
            as_root: false,
            secrets: Vec::new(),
            read_only: Vec::new(),
            // Stands for the agent's state: a directory that exists on every host.
            hide: vec![PathBuf::from("/var/cache")],
            private_dir: PathBuf::from("/run/devos-agent/x"),
            cgroup: None,
            bwrap: PathBuf::from("/usr/bin/bwrap"),
            required: true,
            limits: super::super::Limits {
                cpu_secs: 1,
                max_file_mib: 1,
                max_open_files: 64,
            },
        }
    }

    /// `ls` in `cwd`, read-only, for uid 1000.
    fn ls_in(cwd: &str) -> Spec {
        spec(
            1000,
            cwd,
            RiskClass::ReadOnly,
            Action::Run {
                argv: vec!["ls".into()],
            },
        )
    }

    fn caller(uid: u32) -> Caller {
        Caller {
            uid,
            gid: uid,
            groups: vec![uid],
            user: if uid == 0 {
                "root".into()
            } else {
                "dev".into()
            },
            home: if uid == 0 {
                "/root".into()
            } else {
                "/home/dev".into()
            },
            is_admin: uid == 0,
        }
    }

    fn prepared(cwd: &str, writable: &[&str]) -> Prepared {
        Prepared {
            cwd: PathBuf::from(cwd),
            profile: Profile {
                writable: writable.iter().map(PathBuf::from).collect(),
                network: false,
                secrets: Vec::new(),
                root: false,
            },
            hidden_secrets: Vec::new(),
            read_only: Vec::new(),
            git: None,
            resolv: None,
            home_visible: false,
            identities: Vec::new(),
            fds: Vec::new(),
            handed: Default::default(),
        }
    }

    #[test]
    fn nothing_is_bound_that_was_not_opened_as_the_caller() {
        let dir = tempfile::tempdir().unwrap();
        let opened = |p: &Path| {
            let fd = nix::fcntl::open(
                p,
                nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )
            .unwrap();
            (p.to_path_buf(), fd)
        };
        let cwd = dir.path().to_str().unwrap();
        let mut p = prepared(cwd, &[cwd]);
        p.fds.push(opened(dir.path()));
        let home = PathBuf::from("/nonexistent-home");
        assert!(all_opened(&p, &home).is_ok());
        // A read-only place inside (one whose writable entry went, say) that was
        // never opened stops the action rather than go to bubblewrap by name.
        p.read_only.push(dir.path().join("bin"));
        let Err(Stop::Failed(why)) = all_opened(&p, &home) else {
            panic!("bound by name");
        };
        assert!(why.contains("was not opened as you"), "{why}");
    }

    /// What is mounted in order, as `kind target` lines: bubblewrap's mounts, then the
    /// inner stage's covers (as the bubblewrap mounts they stand for).
    fn mounts(s: &Spec, p: &Prepared) -> Vec<String> {
        mounts_in(s, p, &MountTable::read())
    }

    fn mounts_in(s: &Spec, p: &Prepared, table: &MountTable) -> Vec<String> {
        let aliases = system_aliases(s, table);
        let mut out = bwrap_mounts(&bwrap_args(s, p, table, &aliases));
        out.extend(covers(s, p, table, &aliases).iter().map(|c| match c.dir {
            true => format!("--tmpfs {}", c.path.display()),
            false => format!("--ro-bind /dev/null {}", c.path.display()),
        }));
        out
    }

    fn bwrap_mounts(args: &[String]) -> Vec<String> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < args.len() {
            match args[i].as_str() {
                "--bind" | "--ro-bind" | "--dev-bind" => {
                    out.push(format!("{} {} {}", args[i], args[i + 1], args[i + 2]));
                    i += 3;
                }
                "--tmpfs" | "--dev" | "--proc" | "--remount-ro" | "--dir" => {
                    out.push(format!("{} {}", args[i], args[i + 1]));
                    i += 2;
                }
                "--cap-add" | "--perms" => i += 2,
                _ => i += 1,
            }
        }
        out
    }

    #[test]
    fn a_working_directory_above_a_hidden_place_uncovers_nothing() {
        for (cwd, writable) in [
            ("/", &[][..]),
            ("/home", &["/home"][..]),
            ("/srv/p", &["/srv/p", "/"][..]),
        ] {
            let s = spec(
                1000,
                cwd,
                RiskClass::WritesWorkdir,
                Action::Run {
                    argv: vec!["ls".into()],
                },
            );
            let m = mounts(&s, &prepared(cwd, writable));
            // Every hidden place is hidden (an empty tmpfs, or the action's own
            // directory) after the last bind that could uncover it (the same path, or one
            // above it, bound onto itself).
            for hidden in ["/run", "/home", "/root", "/var/tmp", "/tmp", "/var/cache"] {
                let hide = m
                    .iter()
                    .rposition(|l| {
                        let parts: Vec<&str> = l.split(' ').collect();
                        parts.last() == Some(&hidden)
                            && (parts[0] == "--tmpfs" || parts.len() == 3 && parts[1] != parts[2])
                    })
                    .unwrap_or_else(|| panic!("{hidden} is not hidden: {m:?}"));
                let uncover = m.iter().rposition(|l| {
                    let parts: Vec<&str> = l.split(' ').collect();
                    parts.len() == 3
                        && parts[1] == parts[2]
                        && Path::new(hidden).starts_with(parts[2])
                });
                assert!(
                    uncover.is_none_or(|u| u < hide),
                    "{cwd}: {hidden} uncovered: {m:?}"
                );
            }
        }
        // Below a hidden place, what the action works in is put back after hiding.
        let dir = tempfile::tempdir_in("/tmp").unwrap();
        let p = dir.path().to_string_lossy().into_owned();
        let s = spec(
            1000,
            &p,
            RiskClass::WritesWorkdir,
            Action::Run {
                argv: vec!["ls".into()],
            },
        );
        let m = mounts(&s, &prepared(&p, &[&p]));
        let hide = m.iter().position(|l| l.ends_with(" /tmp")).unwrap();
        let back = m
            .iter()
            .position(|l| *l == format!("--bind {p} {p}"))
            .unwrap();
        assert!(back > hide, "{m:?}");
    }

    #[test]
    fn a_denied_place_below_the_home_or_working_directory_stays_hidden() {
        // The home and working directory are put back after the homes are hidden; a
        // place a deny rule names below them (a directory, a file, and one reached
        // through a link, as `/home` is in DevOS images) is hidden after that.
        let dir = tempfile::tempdir_in("/tmp").unwrap();
        let home = dir.path().join("var-home/dev");
        let proj = home.join("proj");
        std::fs::create_dir_all(proj.join("denied")).unwrap();
        std::fs::write(proj.join("denied-file"), "x").unwrap();
        std::os::unix::fs::symlink("var-home", dir.path().join("home")).unwrap();
        let linked = dir.path().join("home/dev/proj/denied");
        let cwd = proj.to_string_lossy().into_owned();
        let mut s = spec(
            1000,
            &cwd,
            RiskClass::WritesWorkdir,
            Action::Run {
                argv: vec!["make".into()],
            },
        );
        s.caller.home = home.clone();
        s.hide = vec![linked.clone(), proj.join("denied-file")];
        let mut p = prepared(&cwd, &[&cwd]);
        p.home_visible = true;
        let m = mounts(&s, &p);
        let last_bind = m
            .iter()
            .rposition(|l| {
                (l.starts_with("--bind") || l.starts_with("--ro-bind "))
                    && !l.starts_with("--ro-bind /dev/null")
            })
            .unwrap();
        let denied = proj.join("denied").to_string_lossy().into_owned();
        let hidden_dir = m
            .iter()
            .rposition(|l| *l == format!("--tmpfs {denied}"))
            .unwrap_or_else(|| panic!("{denied} is not hidden: {m:?}"));
        let file = proj.join("denied-file").to_string_lossy().into_owned();
        let hidden_file = m
            .iter()
            .rposition(|l| *l == format!("--ro-bind /dev/null {file}"))
            .unwrap_or_else(|| panic!("{file} is not hidden: {m:?}"));
        assert!(
            m[..hidden_dir]
                .iter()
                .any(|l| l.ends_with(&format!(" {cwd}"))),
            "{m:?}"
        );
        assert!(hidden_dir > last_bind && hidden_file > last_bind, "{m:?}");
        // Nor may an action work in one, however it is spelled.
        for cwd in [linked.clone(), proj.join("denied/sub")] {
            let Err(Stop::Failed(why)) =
                check_not_forbidden(&s, &cwd, &p.profile, &MountTable::read())
            else {
                panic!("{} allowed", cwd.display());
            };
            assert!(why.contains("deny rules name it"), "{why}");
        }
    }

    #[test]
    fn a_link_a_user_plants_on_a_denied_path_sends_root_nowhere() {
        // The denied place's parent replaced with a link to `/` in a directory others
        // may write: nothing is mounted over `/usr` for everyone, and working there is
        // not refused on the rule's account.
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir_in("/tmp").unwrap();
        let open = dir.path().join("proj");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::os::unix::fs::symlink("/", open.join("a")).unwrap();
        let mut s = ls_in("/usr/share");
        s.hide = vec![open.join("a/usr"), open.join("a/etc/passwd")];
        let p = prepared("/usr/share", &[]);
        let m = mounts(&s, &p);
        assert!(
            !m.iter()
                .any(|l| l.ends_with(" /usr") || l.ends_with(" /etc/passwd")),
            "{m:?}"
        );
        let allowed = |s: &Spec| {
            check_not_forbidden(
                s,
                &PathBuf::from("/usr/share"),
                &p.profile,
                &MountTable::read(),
            )
            .is_ok()
        };
        assert!(allowed(&s));
        // Nor does a rule whose path leads to `/` through a link that looks like root's
        // (a file system a user mounted can show any owner) hide or forbid everything.
        let base = dir.path().join("looks-roots");
        std::fs::create_dir(&base).unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("/", base.join("l")).unwrap();
        s.hide = vec![base.join("l")];
        let m = mounts(&s, &p);
        assert!(!m.contains(&"--tmpfs /".to_owned()), "{m:?}");
        assert!(allowed(&s));
    }

    #[test]
    fn other_names_of_hidden_places_are_hidden_and_private_places_stay_private() {
        // `/var/tmp` bound on `/tmp` (as hardening guides do), and `/home` bound on a
        // second place as well.
        let dir = tempfile::tempdir_in("/tmp").unwrap();
        let other = dir.path().join("homes");
        std::fs::create_dir(&other).unwrap();
        let table = MountTable::of(&format!(
            "1 0 254:0 / / rw - ext4 /dev/vda rw\n\
             2 1 0:30 / /tmp rw - tmpfs tmpfs rw\n\
             3 1 0:30 / /var/tmp rw - tmpfs tmpfs rw\n\
             4 1 254:0 /home {} rw - ext4 /dev/vda rw\n",
            other.display()
        ));
        let s = ls_in("/srv");
        let m = mounts_in(&s, &prepared("/srv", &[]), &table);
        for place in ["/tmp", "/var/tmp"] {
            let last = m
                .iter()
                .rfind(|l| l.ends_with(&format!(" {place}")))
                .unwrap();
            assert!(
                last.starts_with("--bind /run/devos-agent/x/"),
                "{place}: {m:?}"
            );
        }
        let hidden = format!("--tmpfs {}", other.display());
        assert!(m.contains(&hidden), "{m:?}");
    }

    #[test]
    fn other_names_users_could_reroute_are_covered_on_handles() {
        // `/home` also mounted below a directory others may write: a user could swap
        // the way to it for a link, so bubblewrap does not hide it by name; the inner
        // stage covers it (on a handle). One below root's directories stays
        // bubblewrap's.
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir_in("/tmp").unwrap();
        let open = dir.path().join("open");
        let closed = dir.path().join("closed");
        for d in [&open, &closed] {
            std::fs::create_dir_all(d.join("homes")).unwrap();
        }
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let table = MountTable::of(&format!(
            "1 0 254:0 / / rw - ext4 /dev/vda rw\n\
             4 1 254:0 /home {} rw - ext4 /dev/vda rw\n\
             5 1 254:0 /home {} rw - ext4 /dev/vda rw\n",
            open.join("homes").display(),
            closed.join("homes").display(),
        ));
        let s = ls_in("/srv");
        let p = prepared("/srv", &[]);
        let aliases = system_aliases(&s, &table);
        let args = bwrap_mounts(&bwrap_args(&s, &p, &table, &aliases));
        let rerouted = open.join("homes");
        let fixed = closed.join("homes");
        assert!(
            !args
                .iter()
                .any(|l| l.ends_with(&*rerouted.to_string_lossy())),
            "{args:?}"
        );
        assert!(
            args.contains(&format!("--tmpfs {}", fixed.display())),
            "{args:?}"
        );
        let covers = covers(&s, &p, &table, &aliases);
        assert!(
            covers.iter().any(|c| c.path == rerouted && c.dir),
            "{covers:?}"
        );
        assert!(!covers.iter().any(|c| c.path == fixed), "{covers:?}");
        // Covered whole after everything is bound, nothing in it can be worked in: the
        // action is refused before, saying why.
        let cwd = rerouted.join("dev/proj");
        let Err(Stop::Failed(why)) = check_not_forbidden(&s, &cwd, &p.profile, &table) else {
            panic!("working in {} allowed", cwd.display());
        };
        assert!(why.contains("through its own name"), "{why}");
        // One bubblewrap hides itself cannot be worked in either (nothing is bound back
        // on it); below it, it is bound back as usual (not refused for that).
        let Err(Stop::Failed(why)) = check_not_forbidden(&s, &fixed, &p.profile, &table) else {
            panic!("working in {} allowed", fixed.display());
        };
        assert!(why.contains("through its own name"), "{why}");
        let cwd = fixed.join("dev/proj");
        if let Err(Stop::Failed(why)) = check_not_forbidden(&s, &cwd, &p.profile, &table) {
            assert!(!why.contains("through its own name"), "{why}");
        }
    }

    #[test]
    fn what_bubblewrap_replaces_is_named_to_the_inner_stage() {
        // A deny rule on `/dev/sda` or `/root` finds only bubblewrap's own instance
        // there inside: nothing to cover, not a place that changed.
        let s = ls_in("/srv");
        let aliases = system_aliases(&s, &MountTable::of(""));
        let got = stand_ins(&s, &prepared("/srv", &[]), &aliases);
        for place in [
            "/dev", "/proc", "/run", "/tmp", "/var/tmp", "/dev/shm", "/root",
        ] {
            assert!(got.contains(&PathBuf::from(place)), "{place}: {got:?}");
        }
    }

    #[test]
    fn package_installs_run_with_roots_own_environment() {
        let mut s = spec(
            1000,
            "/home/dev/p",
            RiskClass::Privileged,
            Action::PackageInstall {
                packages: vec!["jq".into()],
            },
        );
        s.as_root = true;
        let mut p = prepared("/home/dev/p", &["/"]);
        p.profile.root = true;
        let inner = inner_spec(&s, &p);
        let env = |k: &str| {
            inner
                .env
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(env("HOME"), Some("/root"));
        assert_eq!(env("USER"), Some("root"));
        assert!(
            inner.env.iter().all(|(_, v)| !v.contains("/home/dev")),
            "{:?}",
            inner.env
        );
        assert!(inner.as_root);
    }
}
