//! A repository's state — branch, upstream, ahead/behind, staged, unstaged and
//! untracked files, stashes, the last commits — read with git, but never with anything
//! the repository (or anyone else) configured that could start a program.
//!
//! git reads `$GIT_DIR/config` whatever the environment says, so git is pointed at a
//! private stand-in git directory: the repository's configuration reduced to the
//! keys that cannot start a program ([`gitrepo::sanitize`]), its `HEAD`, and links to
//! its objects, refs, logs, index and excludes. No system or global configuration,
//! no optional locks (the index is never written), fsmonitor off, submodules not
//! entered. Runs as the user, in the watcher.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::executor::head;
use crate::gitrepo::{self, Level, Repo};

/// Files listed per kind at most (the counts are always complete).
const MAX_LISTED: usize = 200;
/// Commits shown.
const COMMITS: usize = 5;
/// How long one git command may take.
const TIMEOUT: Duration = Duration::from_secs(15);

/// One commit as `GitState` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Commit {
    pub id: String,
    pub author: String,
    /// Seconds since the epoch.
    pub time: i64,
    pub subject: String,
}

/// A repository's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GitState {
    pub work_tree: PathBuf,
    /// The branch checked out (`None` when detached).
    pub branch: Option<String>,
    /// The commit checked out (`None` before the first commit).
    pub head: Option<String>,
    pub upstream: Option<String>,
    pub ahead: u32,
    pub behind: u32,
    pub staged: Vec<String>,
    pub unstaged: Vec<String>,
    pub untracked: Vec<String>,
    pub conflicted: Vec<String>,
    /// How many of each there are (the lists stop at 200).
    pub counts: Counts,
    pub stashes: u32,
    pub commits: Vec<Commit>,
    /// Why the state could not be read (the rest is then empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When it was read, seconds since the epoch.
    pub read_at: i64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Counts {
    pub staged: u32,
    pub unstaged: u32,
    pub untracked: u32,
    pub conflicted: u32,
}

/// The most bytes of an author, a commit's subject or an error kept: what whoever
/// writes to a repository puts there is not read into the index (and every answer
/// about it) whole.
const MAX_FIELD: usize = 1024;

/// Read `repo`'s state with this process's credentials.
pub fn read(repo: &Repo) -> GitState {
    let mut state = GitState {
        work_tree: repo.work_tree.clone(),
        read_at: crate::caller::now_secs() as i64,
        ..GitState::default()
    };
    if let Err(e) = read_into(repo, &mut state) {
        state.error = Some(head(&e, MAX_FIELD).to_owned());
    }
    state
}

fn read_into(repo: &Repo, state: &mut GitState) -> Result<(), String> {
    let shadow = Shadow::new(repo)?;
    let status = shadow.git(&[
        "status",
        "--porcelain=v2",
        "--branch",
        "-z",
        "--untracked-files=normal",
        "--ignore-submodules=all",
    ])?;
    parse_status(&status, state);
    if state.head.is_some() {
        let log = shadow.git(&[
            "log",
            &format!("-n{COMMITS}"),
            "-z",
            "--no-show-signature",
            "--format=%H%x1f%an%x1f%at%x1f%s",
            "HEAD",
            "--",
        ])?;
        state.commits = parse_log(&log);
    }
    // (No stash is no reflog: an error here is "none".)
    if let Ok(stashes) = shadow.git(&["log", "-g", "--format=%H", "refs/stash", "--"]) {
        state.stashes = stashes.lines().filter(|l| !l.is_empty()).count() as u32;
    }
    Ok(())
}

/// The stand-in git directory; removed on drop.
struct Shadow {
    dir: tempfile::TempDir,
    work_tree: PathBuf,
}

impl Shadow {
    fn new(repo: &Repo) -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix("devos-git-")
            .tempdir()
            .map_err(|e| format!("cannot make a temporary directory: {e}"))?;
        let mut settings = Vec::new();
        // (Without blocking: a FIFO where a file should be is an error, not a wait.)
        let read = |path: &Path| {
            super::read_regular(path, 1 << 20)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .map_err(|e| format!("{}: {e}", path.display()))
        };
        for file in repo.config_files() {
            let text = read(&file)?;
            settings.extend(
                gitrepo::parse_config(&text).map_err(|e| format!("{}: {e}", file.display()))?,
            );
        }
        let put = |name: &str, text: &str| {
            std::fs::write(dir.path().join(name), text)
                .map_err(|e| format!("cannot write the stand-in git directory: {e}"))
        };
        put("config", &gitrepo::sanitize(&settings, Level::Repository))?;
        let head = read(&repo.git_dir.join("HEAD"))?;
        put("HEAD", &head)?;
        let links = [
            (&repo.git_dir, "index"),
            (&repo.common_dir, "objects"),
            (&repo.common_dir, "refs"),
            (&repo.common_dir, "packed-refs"),
            (&repo.common_dir, "logs"),
            (&repo.common_dir, "info"),
            (&repo.common_dir, "shallow"),
        ];
        for (from, name) in links {
            let target = from.join(name);
            if target.symlink_metadata().is_ok() {
                std::os::unix::fs::symlink(&target, dir.path().join(name))
                    .map_err(|e| format!("cannot write the stand-in git directory: {e}"))?;
            }
        }
        Ok(Shadow {
            dir,
            work_tree: repo.work_tree.clone(),
        })
    }

    /// Run git read-only in the repository with the reduced configuration.
    fn git(&self, args: &[&str]) -> Result<String, String> {
        let overrides = [
            ("core.fsmonitor", "false"),
            ("core.hooksPath", "/dev/null"),
            ("core.pager", "cat"),
            ("diff.ignoreSubmodules", "all"),
            ("status.submoduleSummary", "false"),
            ("submodule.recurse", "false"),
            ("log.showSignature", "false"),
        ];
        let mut cmd = Command::new("git");
        cmd.arg("--git-dir")
            .arg(self.dir.path())
            .arg("--work-tree")
            .arg(&self.work_tree)
            .arg("--no-optional-locks")
            .args(args)
            .current_dir(&self.work_tree)
            .env_clear()
            // The system's own git: Debian's, or a NixOS system profile's.
            .env("PATH", "/usr/bin:/bin:/run/current-system/sw/bin")
            .env("LC_ALL", "C")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_OPTIONAL_LOCKS", "0")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_COUNT", overrides.len().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (i, (k, v)) in overrides.iter().enumerate() {
            cmd.env(format!("GIT_CONFIG_KEY_{i}"), k)
                .env(format!("GIT_CONFIG_VALUE_{i}"), v);
        }
        let out = run_with_deadline(cmd, TIMEOUT)?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            return Err(format!(
                "git {} failed: {}",
                args[0],
                err.lines().next().unwrap_or("no message").trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Run `cmd`, killing it after `deadline`.
fn run_with_deadline(mut cmd: Command, deadline: Duration) -> Result<std::process::Output, String> {
    let child = cmd.spawn().map_err(|e| format!("cannot run git: {e}"))?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(deadline) {
        Ok(out) => out.map_err(|e| format!("git failed: {e}")),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            Err(format!("git took longer than {}s", deadline.as_secs()))
        }
    }
}

/// Fill `state` from `git status --porcelain=v2 --branch -z`.
fn parse_status(out: &str, state: &mut GitState) {
    let mut fields = out.split('\0');
    let add = |list: &mut Vec<String>, count: &mut u32, path: &str| {
        *count += 1;
        if list.len() < MAX_LISTED {
            list.push(path.to_owned());
        }
    };
    while let Some(record) = fields.next() {
        if let Some(header) = record.strip_prefix("# ") {
            let (key, value) = header.split_once(' ').unwrap_or((header, ""));
            match key {
                "branch.oid" if value != "(initial)" => state.head = Some(value.to_owned()),
                "branch.head" if value != "(detached)" => state.branch = Some(value.to_owned()),
                "branch.upstream" => state.upstream = Some(value.to_owned()),
                "branch.ab" => {
                    for n in value.split_whitespace() {
                        if let Some(a) = n.strip_prefix('+') {
                            state.ahead = a.parse().unwrap_or(0);
                        } else if let Some(b) = n.strip_prefix('-') {
                            state.behind = b.parse().unwrap_or(0);
                        }
                    }
                }
                _ => {}
            }
            continue;
        }
        let kind = record.chars().next();
        match kind {
            Some('1') | Some('2') => {
                // `1 XY sub mH mI mW hH hI path`; `2 ... Xscore path` then the original
                // path as its own field.
                let n = if kind == Some('1') { 9 } else { 10 };
                let parts: Vec<&str> = record.splitn(n, ' ').collect();
                let (Some(xy), Some(path)) = (parts.get(1), parts.get(n - 1)) else {
                    continue;
                };
                if kind == Some('2') {
                    fields.next();
                }
                let mut xy = xy.chars();
                if xy.next().is_some_and(|x| x != '.') {
                    add(&mut state.staged, &mut state.counts.staged, path);
                }
                if xy.next().is_some_and(|y| y != '.') {
                    add(&mut state.unstaged, &mut state.counts.unstaged, path);
                }
            }
            Some('u') => {
                if let Some(path) = record.splitn(11, ' ').nth(10) {
                    add(&mut state.conflicted, &mut state.counts.conflicted, path);
                }
            }
            Some('?') => {
                if let Some(path) = record.get(2..) {
                    add(&mut state.untracked, &mut state.counts.untracked, path);
                }
            }
            _ => {}
        }
    }
}

fn parse_log(out: &str) -> Vec<Commit> {
    out.split('\0')
        .filter_map(|record| {
            let mut f = record.trim_start_matches('\n').split('\x1f');
            Some(Commit {
                id: f.next()?.to_owned(),
                author: head(f.next()?, MAX_FIELD).to_owned(),
                time: f.next()?.parse().ok()?,
                subject: head(f.next()?, MAX_FIELD).to_owned(),
            })
        })
        .collect()
}

/// The directories whose changes change a repository's state: its git directory, the
/// shared one, and every directory under `refs`.
pub fn state_dirs(repo: &Repo) -> Vec<PathBuf> {
    let mut dirs = vec![repo.git_dir.clone()];
    if repo.common_dir != repo.git_dir {
        dirs.push(repo.common_dir.clone());
    }
    let mut stack = vec![repo.common_dir.join("refs")];
    while let Some(dir) = stack.pop() {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
            dirs.push(dir);
        }
    }
    dirs
}

/// Whether `path` is in one of `repo`'s git directories.
pub fn is_state_path(repo: &Repo, path: &Path) -> bool {
    path.starts_with(&repo.git_dir) || path.starts_with(&repo.common_dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn porcelain_v2_is_read() {
        let out = "# branch.oid 1234abcd\0# branch.head main\0# branch.upstream origin/main\0\
                   # branch.ab +2 -1\0\
                   1 M. N... 100644 100644 100644 aaa bbb staged.rs\0\
                   1 .M N... 100644 100644 100644 aaa bbb edited file.rs\0\
                   1 MM N... 100644 100644 100644 aaa bbb both.rs\0\
                   2 R. N... 100644 100644 100644 aaa bbb R100 new.rs\0old.rs\0\
                   u UU N... 100644 100644 100644 100644 aaa bbb ccc clash.rs\0\
                   ? notes.txt\0";
        let mut s = GitState::default();
        parse_status(out, &mut s);
        assert_eq!(s.branch.as_deref(), Some("main"));
        assert_eq!(s.head.as_deref(), Some("1234abcd"));
        assert_eq!(s.upstream.as_deref(), Some("origin/main"));
        assert_eq!((s.ahead, s.behind), (2, 1));
        assert_eq!(s.staged, ["staged.rs", "both.rs", "new.rs"]);
        assert_eq!(s.unstaged, ["edited file.rs", "both.rs"]);
        assert_eq!(s.conflicted, ["clash.rs"]);
        assert_eq!(s.untracked, ["notes.txt"]);
        assert_eq!(s.counts.staged, 3);
    }

    #[test]
    fn a_detached_head_before_any_commit() {
        let mut s = GitState::default();
        parse_status("# branch.oid (initial)\0# branch.head (detached)\0", &mut s);
        assert_eq!((s.branch, s.head), (None, None));
    }

    #[test]
    fn log_records() {
        let c = parse_log("abc\x1fAda\x1f1700000000\x1ffix: it\0\ndef\x1fBo\x1f1700000001\x1fadd");
        assert_eq!(c.len(), 2);
        assert_eq!(c[1].subject, "add");
        assert_eq!(c[0].time, 1_700_000_000);
    }
}
