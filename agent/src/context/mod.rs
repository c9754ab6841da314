//! The context engine: a live, per-user index of the caller's projects (files and
//! directories, git state) and, on demand, their processes.
//!
//! Two halves, so that nothing in the index comes from a file its user could not read:
//! - [`watch`] runs as the user (`devos-agent context-watch`, started by the daemon,
//!   one per user with projects): it scans each project honouring ripgrep's ignore
//!   rules, keeps it current with inotify watches, reads git state without running
//!   anything the repository configures, and reports [`Update`]s as JSON lines.
//! - [`index`] runs in the daemon: one SQLite database per user (root's alone, 0600),
//!   with an FTS5 trigram index of paths, answering [`Find`](index::Index::find),
//!   [`Recent`](index::Index::recent), git state and status in milliseconds.
//!
//! [`procs`] samples processes from /proc when asked; [`service`](crate::service)
//! serves all of it as the `org.devos.Agent1.Context` interface.

pub mod git;
pub mod index;
pub mod procs;
pub mod watch;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// What an index entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Other,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Dir => "dir",
            Kind::Symlink => "symlink",
            Kind::Other => "other",
        }
    }

    pub fn parse(s: &str) -> Kind {
        match s {
            "file" => Kind::File,
            "dir" => Kind::Dir,
            "symlink" => Kind::Symlink,
            _ => Kind::Other,
        }
    }
}

/// One file or directory as the index keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Entry {
    /// Absolute.
    pub path: String,
    pub kind: Kind,
    pub size: u64,
    /// Seconds since the epoch.
    pub mtime: i64,
    /// The language or type its extension says (`rust`, `markdown`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lang: Option<String>,
    /// Ignored by `.gitignore`, `.ignore`, `.git/info/exclude` or the user's global
    /// excludes. Ignored directories are listed but not entered.
    #[serde(default)]
    pub ignored: bool,
    /// For projects whose text is indexed: the file's text (`Some("")`: it has none —
    /// binary, too large, ignored or unreadable as text); `None`: unchanged since it
    /// was last read, or not a text-indexed project.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

/// Files larger than this are not read for the text index.
pub const MAX_TEXT_BYTES: u64 = 64 * 1024;

/// Read a regular file of at most `max` bytes without blocking: a FIFO, a device or a
/// directory put where a file was expected (by the user, or by whoever can write
/// there) is an error, never a read that waits forever.
pub fn read_regular(path: &std::path::Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::OpenOptionsExt;
    // Looked at before it is opened: opening a device can act by itself (a watchdog
    // arms, a tape rewinds). What is opened is looked at again below.
    if !std::fs::metadata(path)?.is_file() {
        return Err(not_regular(path));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    read_opened(file, path, max)
}

/// `file`, opened as `path` (which names it in errors), read when it is a regular file
/// of at most `max` bytes.
pub fn read_opened(
    file: std::fs::File,
    path: &std::path::Path,
    max: u64,
) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(not_regular(path));
    }
    if meta.len() > max {
        return Err(std::io::Error::other(format!(
            "{} is larger than {max} bytes",
            path.display()
        )));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The error of a path that is not a regular file.
pub fn not_regular(path: &std::path::Path) -> std::io::Error {
    std::io::Error::other(format!("{} is not a regular file", path.display()))
}

/// How a project is kept current.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "mode",
    rename_all = "kebab-case",
    rename_all_fields = "kebab-case"
)]
pub enum Mode {
    /// The first scan (or a rescan after a change of ignore rules) is running.
    Scanning,
    /// inotify watches every directory that is not ignored.
    Watching { watches: u64 },
    /// Not every directory could be watched: rescanned every `every_secs`.
    Rescanning { every_secs: u64, reason: String },
    /// The project cannot be indexed (gone, or unreadable); said why.
    Failed { reason: String },
}

/// What the watcher tells the daemon, one JSON line each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    tag = "update",
    rename_all = "kebab-case",
    rename_all_fields = "kebab-case"
)]
pub enum Update {
    /// A project was added (the answer to [`Command::Add`]); `root` is canonical, as
    /// the user sees it.
    Added {
        token: u64,
        root: PathBuf,
    },
    /// A project could not be added (the answer to [`Command::Add`]).
    Refused {
        token: u64,
        why: String,
    },
    /// A scan of `under` (the project root, or a directory in it) begins: entries under
    /// it that the scan does not report are gone.
    ScanStarted {
        root: PathBuf,
        under: PathBuf,
    },
    /// Entries of a project (new or changed).
    Entries {
        root: PathBuf,
        entries: Vec<Entry>,
    },
    /// Paths that are gone, with everything under them.
    Removed {
        root: PathBuf,
        paths: Vec<String>,
    },
    /// The scan of `under` is complete (`complete: false`: it stopped at the file
    /// limit; entries it did not reach are kept).
    ScanDone {
        root: PathBuf,
        under: PathBuf,
        complete: bool,
        millis: u64,
    },
    Git {
        root: PathBuf,
        state: Box<git::GitState>,
    },
    Mode {
        root: PathBuf,
        mode: Mode,
    },
}

/// What the daemon tells the watcher, one JSON line each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Command {
    /// Add a project: answered with [`Update::Added`] or [`Update::Refused`].
    Add {
        token: u64,
        path: PathBuf,
        /// Index the text of small text files too.
        text: bool,
    },
    /// Stop watching a project.
    Remove { root: PathBuf },
}

/// A question about the caller's context the local planner recognised; the daemon
/// answers it from the index (and /proc) without running anything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "question",
    rename_all = "kebab-case",
    rename_all_fields = "kebab-case"
)]
pub enum Question {
    /// Where is ...: entries whose path holds these words.
    Find { words: String },
    /// Which files mention ...: text-indexed files holding these words.
    FindText { words: String },
    /// What changed: files changed since `since` (as `Recent` takes it: empty for
    /// the last day, `today`, `1h`, ...).
    Recent { since: String },
    /// The git state of every project.
    Git,
    /// What is running: the caller's processes, by CPU or by memory.
    Processes { by_memory: bool },
}

/// The watcher's job (the first line on its stdin).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct WatchJob {
    pub caller: crate::caller::Caller,
    /// Projects to resume.
    pub projects: Vec<ProjectJob>,
    /// Entries indexed at most, over all projects.
    pub max_files: u64,
    /// inotify watches used at most (0: as many as the kernel gives).
    pub max_watches: u64,
    /// How often a project that could not be watched whole is rescanned.
    pub rescan_secs: u64,
    /// The user's secret locations (`[sandbox] secrets`, expanded): their files' names
    /// are indexed, never their text (a search would show it without approval).
    #[serde(default)]
    pub secrets: Vec<PathBuf>,
}

/// A project to resume.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ProjectJob {
    /// Canonical.
    pub root: PathBuf,
    /// Its text is indexed.
    pub text: bool,
    /// For a text-indexed project: the files whose text the index has (or knows they
    /// have none), with the mtime and size they had then — not read again unless they
    /// changed.
    #[serde(default)]
    pub known: Vec<(String, i64, u64)>,
}

/// The language or file type a name's extension says.
pub fn language(name: &str) -> Option<&'static str> {
    let ext = name.rsplit_once('.')?.1.to_ascii_lowercase();
    Some(match ext.as_str() {
        "rs" => "rust",
        "py" | "pyi" => "python",
        "js" | "mjs" | "cjs" | "jsx" => "javascript",
        "ts" | "tsx" => "typescript",
        "go" => "go",
        "c" | "h" => "c",
        "cc" | "cpp" | "cxx" | "hpp" | "hh" => "c++",
        "java" => "java",
        "kt" | "kts" => "kotlin",
        "rb" => "ruby",
        "php" => "php",
        "cs" => "c#",
        "swift" => "swift",
        "sh" | "bash" | "zsh" => "shell",
        "nix" => "nix",
        "md" | "markdown" => "markdown",
        "rst" => "restructuredtext",
        "txt" => "text",
        "toml" => "toml",
        "yaml" | "yml" => "yaml",
        "json" => "json",
        "xml" => "xml",
        "html" | "htm" => "html",
        "css" | "scss" => "css",
        "sql" => "sql",
        "conf" | "cfg" | "ini" => "config",
        "lock" => "lockfile",
        "png" | "jpg" | "jpeg" | "gif" | "svg" | "webp" => "image",
        "pdf" => "pdf",
        "tar" | "gz" | "tgz" | "zst" | "xz" | "zip" | "bz2" => "archive",
        "log" => "log",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn languages_come_from_extensions() {
        assert_eq!(language("main.rs"), Some("rust"));
        assert_eq!(language("nginx.CONF"), Some("config"));
        assert_eq!(language("Makefile"), None);
        assert_eq!(language("archive.tar.gz"), Some("archive"));
    }

    #[test]
    fn updates_are_json_lines() {
        let u = Update::Removed {
            root: "/p".into(),
            paths: vec!["/p/a".into()],
        };
        let line = serde_json::to_string(&u).unwrap();
        assert!(line.starts_with(r#"{"update":"removed""#), "{line}");
        assert_eq!(serde_json::from_str::<Update>(&line).unwrap(), u);
    }
}
