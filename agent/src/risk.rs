//! Risk classification of actions, argument-aware: what an action may do to the
//! user's files, the network and the system, and why we think so.
//!
//! The classifier errs upward: anything it does not understand is `unknown` (which
//! always asks), and a classifier that fails counts as `privileged`.

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::action::Action;

/// Risk classes, least to most dangerous. A policy names the classes that run without
/// asking; `unknown` never does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RiskClass {
    /// Reads files or state, changes nothing.
    ReadOnly,
    /// Creates or changes files inside the request's working directory only.
    WritesWorkdir,
    /// Talks to the network.
    Network,
    /// Deletes or overwrites data, or writes outside the working directory.
    Destructive,
    /// Needs or changes system-wide privileges (sudo, packages, services).
    Privileged,
    /// Could do anything: shells, interpreters, options that run commands.
    Unknown,
}

impl RiskClass {
    pub const ALL: [RiskClass; 6] = [
        RiskClass::ReadOnly,
        RiskClass::WritesWorkdir,
        RiskClass::Network,
        RiskClass::Destructive,
        RiskClass::Privileged,
        RiskClass::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RiskClass::ReadOnly => "read-only",
            RiskClass::WritesWorkdir => "writes-workdir",
            RiskClass::Network => "network",
            RiskClass::Destructive => "destructive",
            RiskClass::Privileged => "privileged",
            RiskClass::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for RiskClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The verdict on one action: its class, every reason that raised it, and what the
/// sandbox must allow for it to work.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Risk {
    pub class: RiskClass,
    pub reasons: Vec<String>,
    /// Directories outside the working directory the action must be able to write.
    pub writes_outside: Vec<PathBuf>,
    /// Whether the action needs the network.
    pub network: bool,
    /// Whether the classifier itself failed (then `class` is `privileged`).
    #[serde(default)]
    pub classifier_failed: bool,
}

impl Risk {
    fn new() -> Self {
        Risk {
            class: RiskClass::ReadOnly,
            reasons: Vec::new(),
            writes_outside: Vec::new(),
            network: false,
            classifier_failed: false,
        }
    }

    fn raise(&mut self, class: RiskClass, reason: impl Into<String>) {
        self.class = self.class.max(class);
        let reason = reason.into();
        if !self.reasons.contains(&reason) {
            self.reasons.push(reason);
        }
    }

    fn net(&mut self, reason: impl Into<String>) {
        self.network = true;
        self.raise(RiskClass::Network, reason);
    }
}

/// Classify an action run in `cwd`. Never panics: a failure inside the classifier is
/// reported as a `privileged` risk with the reason.
pub fn classify(action: &Action, cwd: &Path) -> Risk {
    match std::panic::catch_unwind(|| classify_inner(action, cwd)) {
        Ok(risk) => risk,
        Err(_) => Risk {
            class: RiskClass::Privileged,
            reasons: vec!["the risk classifier failed on this action; treated as high risk".into()],
            writes_outside: Vec::new(),
            network: true,
            classifier_failed: true,
        },
    }
}

fn classify_inner(action: &Action, cwd: &Path) -> Risk {
    let mut risk = Risk::new();
    let cwd = std::fs::canonicalize(cwd).unwrap_or_else(|_| normalize(cwd));
    match action {
        Action::Read { path } => path_risk(&mut risk, &cwd, path, Access::Read),
        Action::Write { path, .. } => {
            if path.symlink_metadata().is_ok() {
                path_risk(&mut risk, &cwd, path, Access::Replace);
            } else {
                path_risk(&mut risk, &cwd, path, Access::Write);
            }
        }
        Action::Mkdir { path } => path_risk(&mut risk, &cwd, path, Access::Write),
        Action::Delete { path } => {
            path_risk(&mut risk, &cwd, path, Access::Write);
            let what = if path.is_dir() {
                "a directory tree"
            } else {
                "a file"
            };
            risk.raise(RiskClass::Destructive, format!("deletes {what}"));
        }
        Action::Move { from, to } => {
            path_risk(&mut risk, &cwd, from, Access::Write);
            path_risk(&mut risk, &cwd, to, Access::Write);
        }
        Action::Copy { from, to } => {
            path_risk(&mut risk, &cwd, from, Access::Read);
            path_risk(&mut risk, &cwd, to, Access::Write);
        }
        Action::Shell { script } => {
            risk.raise(
                RiskClass::Unknown,
                "runs a shell script; anything is possible",
            );
            for (needle, what) in [
                (";", "command separator `;`"),
                ("&&", "command chaining `&&`"),
                ("||", "command chaining `||`"),
                ("|", "a pipe"),
                ("$(", "command substitution `$(...)`"),
                ("`", "command substitution with backticks"),
                (">", "output redirection"),
                ("<", "input redirection"),
                ("\n", "several lines"),
                ("sudo", "`sudo`"),
                ("rm ", "`rm`"),
            ] {
                if script.contains(needle) {
                    risk.raise(RiskClass::Unknown, format!("script uses {what}"));
                }
            }
        }
        Action::Git { args } => git_risk(&mut risk, &cwd, args),
        Action::Run { argv } => run_risk(&mut risk, &cwd, argv),
        Action::PackageInstall { packages } => {
            risk.net("downloads packages");
            risk.raise(
                RiskClass::Privileged,
                format!("installs system packages as root: {}", packages.join(" ")),
            );
            for p in packages {
                if !valid_package_name(p) {
                    risk.raise(RiskClass::Unknown, format!("`{p}` is not a package name"));
                }
            }
        }
    }
    risk
}

/// Debian package names: lowercase alphanumerics and `+-.`, starting alphanumeric.
pub fn valid_package_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_lowercase() || b.is_ascii_digit())
        && name.len() >= 2
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b))
}

#[derive(Clone, Copy, PartialEq)]
enum Access {
    Read,
    /// Creates something new.
    Write,
    /// Overwrites or removes what exists.
    Replace,
}

/// Secrets a read must never take without asking, relative to a home directory or
/// absolute.
const SECRET_PATHS: &[&str] = &[
    ".ssh",
    ".gnupg",
    ".aws",
    ".netrc",
    ".docker/config.json",
    ".git-credentials",
    ".config/gh",
    ".kube",
    "/etc/shadow",
    "/etc/gshadow",
    "/etc/sudoers",
    "/root",
    "/var/lib/devos-agent",
    "/proc",
];

fn path_risk(risk: &mut Risk, cwd: &Path, path: &Path, access: Access) {
    let shown = path.display();
    let full = if path.is_absolute() {
        path.to_path_buf()
    } else {
        cwd.join(path)
    };
    if path.components().any(|c| c == Component::ParentDir) {
        risk.raise(RiskClass::ReadOnly, format!("`{shown}` uses `..`"));
    }
    let lexical = normalize(&full);
    let real = resolve_existing(&lexical);
    if real != lexical {
        let inside_before = lexical.starts_with(cwd);
        let inside_after = real.starts_with(cwd);
        if inside_before && !inside_after {
            risk.raise(
                match access {
                    Access::Read => RiskClass::ReadOnly,
                    _ => RiskClass::Destructive,
                },
                format!(
                    "`{shown}` is a symlink that leads outside the working directory, to {}",
                    real.display()
                ),
            );
        }
    }
    let home_secret = SECRET_PATHS.iter().any(|s| {
        if s.starts_with('/') {
            real.starts_with(s)
        } else {
            real.components()
                .collect::<Vec<_>>()
                .windows(Path::new(s).components().count())
                .any(|w| w.iter().collect::<PathBuf>() == Path::new(s))
        }
    });
    if home_secret {
        risk.raise(
            RiskClass::Unknown,
            format!("`{shown}` holds secrets or system state"),
        );
    }
    let inside = real.starts_with(cwd);
    match (access, inside) {
        (Access::Read, _) => {}
        (Access::Write, true) => risk.raise(RiskClass::WritesWorkdir, format!("writes {shown}")),
        (Access::Replace, true) => risk.raise(
            RiskClass::Destructive,
            format!("overwrites or removes existing {shown}"),
        ),
        (_, false) => {
            risk.raise(
                RiskClass::Destructive,
                format!("writes {shown}, outside the working directory"),
            );
            let parent = real.parent().unwrap_or(Path::new("/")).to_path_buf();
            if !risk.writes_outside.contains(&parent) {
                risk.writes_outside.push(parent);
            }
        }
    }
    if real == cwd && access != Access::Read {
        risk.raise(
            RiskClass::Destructive,
            "changes the working directory itself",
        );
    }
}

/// Lexically normalise an absolute path: drop `.`, apply `..`.
pub fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// Resolve symlinks in the longest existing prefix of `path`, keep the rest as is.
fn resolve_existing(path: &Path) -> PathBuf {
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = std::fs::canonicalize(&existing) {
            return rest.iter().rev().fold(real, |p: PathBuf, n| p.join(n));
        }
        match (
            existing.file_name().map(|n| n.to_owned()),
            existing.parent(),
        ) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent.to_path_buf();
            }
            _ => return path.to_path_buf(),
        }
    }
}

/// Programs that only read, given the options they are given (checked per program
/// below), and whose non-option arguments are paths they read.
const READ_ONLY: &[&str] = &[
    "ls",
    "cat",
    "head",
    "tail",
    "wc",
    "du",
    "df",
    "stat",
    "file",
    "tree",
    "pwd",
    "echo",
    "which",
    "uname",
    "whoami",
    "id",
    "date",
    "grep",
    "egrep",
    "fgrep",
    "rg",
    "diff",
    "cmp",
    "md5sum",
    "sha1sum",
    "sha256sum",
    "sha512sum",
    "ps",
    "free",
    "uptime",
    "realpath",
    "basename",
    "dirname",
    "sort",
    "uniq",
    "find",
    "true",
    "false",
    "printf",
    "nproc",
    "lsblk",
    "hostname",
    "cut",
    "tr",
    "column",
    "jq",
];
/// Programs whose arguments name paths they create or change.
const WRITERS: &[&str] = &[
    "mkdir", "touch", "cp", "mv", "ln", "chmod", "tar", "gzip", "gunzip", "zip", "unzip",
];
const DELETERS: &[&str] = &["rm", "rmdir", "shred", "truncate", "unlink"];
const NETWORK: &[&str] = &[
    "curl", "wget", "ssh", "scp", "sftp", "rsync", "nc", "ncat", "netcat", "ping", "telnet", "ftp",
    "dig", "nslookup", "host",
];
const PRIVILEGED: &[&str] = &[
    "sudo",
    "su",
    "doas",
    "pkexec",
    "apt",
    "apt-get",
    "aptitude",
    "dpkg",
    "systemctl",
    "mount",
    "umount",
    "chown",
    "chgrp",
    "useradd",
    "userdel",
    "usermod",
    "passwd",
    "reboot",
    "shutdown",
    "poweroff",
    "modprobe",
    "insmod",
    "rmmod",
    "iptables",
    "nft",
    "setcap",
    "chroot",
    "journalctl",
    "loginctl",
    "snap",
];
/// Programs that run other programs or code given as arguments.
const INTERPRETERS: &[&str] = &[
    "sh", "bash", "zsh", "dash", "fish", "ksh", "csh", "tcsh", "python", "python2", "python3",
    "perl", "ruby", "node", "nodejs", "php", "lua", "env", "xargs", "nohup", "timeout", "nice",
    "ionice", "exec", "eval", "awk", "gawk", "mawk", "sed", "vi", "vim", "nvim", "emacs", "less",
    "more", "man", "watch", "script", "strace", "ltrace", "gdb", "busybox", "setsid", "flock",
    "stdbuf", "time", "parallel", "make", "docker", "podman",
];
/// Project test and build runners: they execute the project's own code, which the
/// sandbox confines to the working directory.
const RUNNERS: &[(&str, &[&str])] = &[
    (
        "cargo",
        &[
            "test", "build", "check", "fmt", "clippy", "run", "bench", "doc",
        ],
    ),
    ("npm", &["test", "run", "ci"]),
    ("go", &["test", "build", "vet"]),
    ("pytest", &[]),
    ("tox", &[]),
];

/// Characters that mean something to a shell; in an argv they are literal, which is
/// worth saying so nobody believes otherwise.
const SHELL_SYNTAX: &[char] = &[';', '&', '|', '$', '`', '>', '<', '\n', '*', '?', '(', ')'];

fn run_risk(risk: &mut Risk, cwd: &Path, argv: &[String]) {
    let Some(program) = argv.first() else {
        risk.raise(RiskClass::Unknown, "empty command");
        return;
    };
    let args = &argv[1..];
    for a in argv {
        if a.contains(SHELL_SYNTAX) {
            risk.raise(
                RiskClass::ReadOnly,
                format!(
                    "argument {} contains shell syntax; it is passed literally, not interpreted",
                    crate::action::quote(a)
                ),
            );
        }
    }
    if program.contains('=') {
        risk.raise(
            RiskClass::Unknown,
            format!("`{program}` looks like an environment assignment, which the sandbox does not honour"),
        );
        return;
    }
    if program.contains('/') && !program.starts_with("/usr/") && !program.starts_with("/bin/") {
        risk.raise(
            RiskClass::Unknown,
            format!("runs `{program}`, a program outside the system directories"),
        );
        return;
    }
    let name = program.rsplit('/').next().unwrap_or(program).to_owned();
    let name = name.as_str();
    if name == "git" {
        return git_risk(risk, cwd, args);
    }
    if PRIVILEGED.contains(&name) {
        risk.raise(
            RiskClass::Privileged,
            format!("`{name}` acts with system privileges"),
        );
        return;
    }
    if INTERPRETERS.contains(&name) {
        let pytest = matches!(name, "python" | "python3")
            && args.first().map(String::as_str) == Some("-m")
            && args.get(1).map(String::as_str) == Some("pytest");
        if pytest {
            risk.raise(
                RiskClass::WritesWorkdir,
                "runs the project's tests (its own code)",
            );
        } else {
            risk.raise(
                RiskClass::Unknown,
                format!("`{name}` can run arbitrary commands"),
            );
        }
        return;
    }
    if NETWORK.contains(&name) {
        risk.net(format!("`{name}` talks to the network"));
        for a in args
            .iter()
            .filter(|a| a.starts_with("-o") || a.starts_with("--output"))
        {
            risk.raise(RiskClass::WritesWorkdir, format!("`{a}` writes a file"));
        }
        return;
    }
    if let Some((_, subs)) = RUNNERS.iter().find(|(r, _)| *r == name) {
        let sub = args.first().map(String::as_str).unwrap_or("");
        if subs.is_empty() || subs.contains(&sub) {
            risk.raise(
                RiskClass::WritesWorkdir,
                "runs the project's own code (tests or build)",
            );
            if matches!(name, "npm" | "cargo") {
                risk.net("may download dependencies");
            }
        } else {
            risk.raise(
                RiskClass::Unknown,
                format!("`{name} {sub}` is not a known build or test command"),
            );
        }
        return;
    }
    if DELETERS.contains(&name) {
        let recursive = args.iter().any(|a| {
            a == "--recursive"
                || (a.starts_with('-')
                    && !a.starts_with("--")
                    && (a.contains('r') || a.contains('R')))
        });
        risk.raise(
            RiskClass::Destructive,
            if recursive {
                format!("`{name}` deletes recursively")
            } else {
                format!("`{name}` deletes")
            },
        );
        for p in operands(args) {
            path_risk(risk, cwd, Path::new(p), Access::Replace);
        }
        return;
    }
    if WRITERS.contains(&name) {
        let ops = operands(args);
        match name {
            "cp" | "mv" | "ln" => {
                if let Some((dest, sources)) = ops.split_last() {
                    for s in sources {
                        path_risk(
                            risk,
                            cwd,
                            Path::new(s),
                            if name == "mv" {
                                Access::Write
                            } else {
                                Access::Read
                            },
                        );
                    }
                    let d = Path::new(dest);
                    let exists = cwd.join(d).symlink_metadata().is_ok() && !cwd.join(d).is_dir();
                    path_risk(
                        risk,
                        cwd,
                        d,
                        if exists {
                            Access::Replace
                        } else {
                            Access::Write
                        },
                    );
                }
            }
            "chmod" => {
                for p in ops.iter().skip(1) {
                    path_risk(risk, cwd, Path::new(p), Access::Write);
                }
            }
            "tar" | "zip" | "unzip" | "gzip" | "gunzip" => {
                risk.raise(
                    RiskClass::WritesWorkdir,
                    format!("`{name}` writes archives or extracted files"),
                );
                for p in ops {
                    path_risk(risk, cwd, Path::new(p), Access::Write);
                }
            }
            _ => {
                for p in ops {
                    path_risk(risk, cwd, Path::new(p), Access::Write);
                }
            }
        }
        return;
    }
    if READ_ONLY.contains(&name) {
        read_only_options(risk, cwd, name, args);
        for p in operands(args) {
            if !matches!(
                name,
                "grep"
                    | "egrep"
                    | "fgrep"
                    | "rg"
                    | "echo"
                    | "printf"
                    | "jq"
                    | "find"
                    | "tr"
                    | "cut"
            ) {
                path_risk(risk, cwd, Path::new(p), Access::Read);
            }
        }
        return;
    }
    risk.raise(
        RiskClass::Unknown,
        format!("`{name}` is not a program the classifier knows"),
    );
}

/// Options that turn a read-only program into something else.
fn read_only_options(risk: &mut Risk, cwd: &Path, name: &str, args: &[String]) {
    let mut iter = args.iter().peekable();
    while let Some(a) = iter.next() {
        let a = a.as_str();
        match (name, a) {
            ("find", "-exec" | "-execdir" | "-ok" | "-okdir") => {
                risk.raise(RiskClass::Unknown, format!("`find {a}` runs commands"))
            }
            ("find", "-delete") => {
                risk.raise(RiskClass::Destructive, "`find -delete` deletes files")
            }
            ("find", "-fprint" | "-fprint0" | "-fprintf" | "-fls") => {
                if let Some(p) = iter.peek() {
                    path_risk(risk, cwd, Path::new(p.as_str()), Access::Replace);
                }
            }
            ("sort", _) if a == "-o" || a.starts_with("--output") => {
                risk.raise(RiskClass::WritesWorkdir, "`sort -o` writes a file");
                if let Some(p) = iter.peek() {
                    path_risk(risk, cwd, Path::new(p.as_str()), Access::Replace);
                }
            }
            ("tree", "-o") => risk.raise(RiskClass::WritesWorkdir, "`tree -o` writes a file"),
            ("rg", _) if a.starts_with("--pre") => {
                risk.raise(RiskClass::Unknown, "`rg --pre` runs a preprocessor command")
            }
            ("grep" | "egrep" | "fgrep" | "rg", _) if a.starts_with("--file") || a == "-f" => {}
            _ => {}
        }
    }
}

/// Non-option arguments (everything after `--`, and anything not starting with `-`).
fn operands(args: &[String]) -> Vec<&str> {
    let mut out = Vec::new();
    let mut after_dashes = false;
    for a in args {
        if after_dashes || !a.starts_with('-') || a == "-" {
            out.push(a.as_str());
        } else if a == "--" {
            after_dashes = true;
        }
    }
    out
}

fn git_risk(risk: &mut Risk, cwd: &Path, args: &[String]) {
    let mut i = 0;
    // Global options before the subcommand.
    while let Some(a) = args.get(i) {
        match a.as_str() {
            "-c" | "--config-env" => {
                risk.raise(
                    RiskClass::Unknown,
                    format!("`git {a}` can set options that run commands"),
                );
                i += 2;
            }
            s if s.starts_with("--exec-path")
                || s.starts_with("--config-env=")
                || s.starts_with("-c") && s.len() > 2 =>
            {
                risk.raise(
                    RiskClass::Unknown,
                    format!("`git {s}` can run arbitrary programs"),
                );
                i += 1;
            }
            "-C" | "--git-dir" | "--work-tree" => {
                if let Some(p) = args.get(i + 1) {
                    path_risk(risk, cwd, Path::new(p), Access::Read);
                }
                i += 2;
            }
            s if s.starts_with("--git-dir=") || s.starts_with("--work-tree=") => i += 1,
            "--no-pager" | "--bare" | "-P" | "--no-replace-objects" | "--literal-pathspecs" => {
                i += 1
            }
            s if s.starts_with('-') => {
                risk.raise(RiskClass::Unknown, format!("unrecognised git option `{s}`"));
                i += 1;
            }
            _ => break,
        }
    }
    let Some(sub) = args.get(i) else {
        return;
    };
    let rest = &args[i + 1..];
    let has = |opts: &[&str]| {
        rest.iter().any(|a| {
            opts.iter()
                .any(|o| a == o || a.starts_with(&format!("{o}=")))
        })
    };
    for a in rest {
        if a.starts_with("--output") {
            risk.raise(
                RiskClass::WritesWorkdir,
                format!("`git {sub} {a}` writes a file"),
            );
        }
        if a == "--ext-diff"
            || a.starts_with("--upload-pack")
            || a.starts_with("--receive-pack")
            || a == "--exec"
            || a.starts_with("--exec=")
        {
            risk.raise(
                RiskClass::Unknown,
                format!("`git {sub} {a}` runs a configured program"),
            );
        }
    }
    match sub.as_str() {
        "status" | "log" | "diff" | "show" | "rev-parse" | "ls-files" | "blame" | "shortlog"
        | "describe" | "rev-list" | "cat-file" | "ls-tree" | "whatchanged" | "reflog" => {
            if sub == "reflog" && rest.first().is_some_and(|a| a == "expire" || a == "delete") {
                risk.raise(RiskClass::Destructive, "`git reflog expire` drops history");
            }
        }
        "grep" => {
            if has(&["-O", "--open-files-in-pager"]) {
                risk.raise(RiskClass::Unknown, "`git grep -O` runs a pager program");
            }
        }
        "branch" => {
            if has(&["-D", "--delete --force"]) || rest.iter().any(|a| a == "-D") {
                risk.raise(
                    RiskClass::Destructive,
                    "`git branch -D` deletes an unmerged branch",
                );
            } else if rest.iter().any(|a| !a.starts_with('-'))
                || has(&["-d", "--delete", "-m", "-M", "-c", "-C", "--move", "--copy"])
            {
                risk.raise(RiskClass::WritesWorkdir, "changes branches");
            }
        }
        "tag" | "remote" | "stash" => {
            if rest.iter().any(|a| {
                a == "drop"
                    || a == "clear"
                    || a == "-d"
                    || a == "--delete"
                    || a == "remove"
                    || a == "rm"
            }) {
                risk.raise(RiskClass::Destructive, format!("`git {sub}` deletes"));
            } else if !rest.is_empty() && !has(&["-l", "--list", "-v", "--verbose", "list", "show"])
                || sub == "stash" && rest.is_empty()
            {
                risk.raise(
                    RiskClass::WritesWorkdir,
                    format!("`git {sub}` changes the repository"),
                );
            }
        }
        "add" | "commit" | "switch" | "merge" | "rebase" | "cherry-pick" | "revert" | "init"
        | "mv" | "rm" | "am" | "apply" | "notes" | "worktree" => {
            risk.raise(
                RiskClass::WritesWorkdir,
                format!("`git {sub}` changes the repository"),
            );
            if has(&["--force", "-f"]) && sub != "commit" {
                risk.raise(
                    RiskClass::Destructive,
                    format!("`git {sub} --force` can discard changes"),
                );
            }
        }
        "checkout" | "restore" => {
            risk.raise(
                RiskClass::WritesWorkdir,
                format!("`git {sub}` changes the working tree"),
            );
            if has(&["--force", "-f", "--", "."]) || sub == "restore" {
                risk.raise(
                    RiskClass::Destructive,
                    format!("`git {sub}` can discard uncommitted changes"),
                );
            }
        }
        "reset" => {
            risk.raise(RiskClass::WritesWorkdir, "`git reset` moves the branch");
            if has(&["--hard", "--merge", "--keep"]) {
                risk.raise(
                    RiskClass::Destructive,
                    "`git reset --hard` discards uncommitted changes",
                );
            }
        }
        "clean" => risk.raise(
            RiskClass::Destructive,
            "`git clean` deletes untracked files",
        ),
        "gc" | "prune" => risk.raise(
            RiskClass::Destructive,
            format!("`git {sub}` drops unreachable objects"),
        ),
        "push" => {
            risk.net("`git push` sends to a remote");
            if has(&[
                "--force",
                "-f",
                "--force-with-lease",
                "--delete",
                "--mirror",
                "--prune",
            ]) || rest
                .iter()
                .any(|a| a.starts_with('+') || a.starts_with(':'))
            {
                risk.raise(
                    RiskClass::Destructive,
                    "`git push --force`/`--delete` can drop remote history",
                );
            }
        }
        "fetch" | "pull" | "clone" | "ls-remote" | "submodule" => {
            risk.net(format!("`git {sub}` talks to a remote"));
            if sub != "ls-remote" && sub != "fetch" {
                risk.raise(
                    RiskClass::WritesWorkdir,
                    format!("`git {sub}` changes files"),
                );
            }
        }
        "config" => {
            if !has(&["--get", "--list", "-l", "--get-all", "--get-regexp"]) {
                risk.raise(
                    RiskClass::Unknown,
                    "`git config` can set options that run commands",
                );
            }
        }
        other => risk.raise(
            RiskClass::Unknown,
            format!(
                "`git {other}` is not a subcommand the classifier knows (aliases can run anything)"
            ),
        ),
    }
}

#[cfg(test)]
mod tests;
