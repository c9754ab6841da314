//! Programs the classifier knows, by allow-list: which program an argv runs (its
//! canonical path, trusted only when root owns it and the caller cannot change it),
//! the options that keep each known program in its class, and what its operands are.
//! Anything not listed here — program or option — is `unknown` and asks.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Access, Classifier, RiskClass, normalize, paths};

/// Where programs are looked up, in order: the system directories only, the last one
/// NixOS's system profile (root switches it; what it holds are links into the Nix
/// store). The sandbox runs with the same `PATH`.
pub const SYSTEM_PATH: &[&str] = &[
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
    "/run/current-system/sw/bin",
];

/// Programs that talk to the network (for shell scripts: the network is given when one
/// of them appears).
pub const NETWORK_PROGRAMS: &[&str] = &[
    "curl", "wget", "ssh", "scp", "sftp", "rsync", "nc", "ncat", "netcat", "ping", "telnet", "ftp",
    "dig", "nslookup", "host", "git", "apt", "apt-get", "pip", "pip3", "npm", "cargo",
];

/// Programs that act with system privileges; in the sandbox they cannot gain them
/// (no_new_privs, no capabilities), so they run as the user and fail.
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

/// The known programs every run of which deletes (their role is [`delete`]): classed
/// destructive whatever their other words.
const DELETERS: &[&str] = &["rm", "rmdir", "unlink", "shred", "truncate"];

/// The class of every run of the program `argv0` names, whatever its other words, when
/// its name alone decides it: a program devos does not know (unknown), one that acts
/// with system privileges, one that deletes (destructive). With why. None when its
/// other words matter (or it is known by its path, not its name: a program outside
/// the system directories is unknown too, which this does not say).
pub fn class_of_every_run(argv0: &str) -> Option<(RiskClass, String)> {
    let name = running_as(argv0);
    if PRIVILEGED.contains(&name.as_str()) {
        return Some((
            RiskClass::Privileged,
            format!("`{argv0}` acts with system privileges"),
        ));
    }
    if DELETERS.contains(&name.as_str()) {
        return Some((RiskClass::Destructive, format!("`{argv0}` deletes")));
    }
    (own_rules(&name).is_none() && known(&name).is_none()).then(|| {
        (
            RiskClass::Unknown,
            format!("`{argv0}` is not a program devos knows"),
        )
    })
}

/// The classifier of a program with rules of its own, not the table's.
fn own_rules(name: &str) -> Option<fn(&mut Classifier, &[String])> {
    match name {
        "git" => Some(super::git::classify),
        "find" => Some(find),
        "python3" => Some(python3),
        _ => None,
    }
}

/// Only `python3 -m pytest` is known; anything else it runs is arbitrary code.
fn python3(c: &mut Classifier, args: &[String]) {
    match (
        args.first().map(String::as_str),
        args.get(1).map(String::as_str),
        known("pytest"),
    ) {
        (Some("-m"), Some("pytest"), Some(pytest)) => apply(c, "pytest", pytest, &args[2..]),
        _ => c.risk.raise(
            RiskClass::Unknown,
            "`python3` runs arbitrary code; only `python3 -m pytest` is known",
        ),
    }
}

/// Characters that mean something to a shell; in an argv they are literal, which is
/// worth saying so nobody believes otherwise.
const SHELL_SYNTAX: &[char] = &[';', '&', '|', '$', '`', '>', '<', '\n', '*', '?', '(', ')'];

/// An argv as deny rules compare it: the program's name, its options (clusters split,
/// long spellings mapped to short ones where known, values dropped) and its operands
/// (paths canonical).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Normalized {
    pub program: String,
    pub options: BTreeSet<String>,
    pub operands: Vec<String>,
}

impl Normalized {
    /// Normalise a command prefix as an administrator or user wrote it (a deny rule).
    /// Paths are normalised lexically (a rule names no working directory).
    pub fn of_rule(words: &[String]) -> Option<Normalized> {
        Self::of_words(words, |o| {
            o.starts_with('/')
                .then(|| normalize(Path::new(o)).to_string_lossy().into_owned())
        })
    }

    /// `words` as program, options and operands; `path` says what a path-like
    /// operand stands for (`None`: keep it as written).
    fn of_words(words: &[String], path: impl Fn(&str) -> Option<String>) -> Option<Normalized> {
        let (first, rest) = words.split_first()?;
        let program = canonical_name(first.rsplit('/').next().unwrap_or(first));
        let (options, operands) = split_generic(rest, known(&program));
        let operands = operands
            .into_iter()
            .map(|o| looks_like_path(&o).then(|| path(&o)).flatten().unwrap_or(o))
            .collect();
        Some(Normalized {
            program,
            options,
            operands,
        })
    }

    /// Every way a deny rule may see an argv: from each word on (so `env rm -r /`,
    /// `nice rm -r /` and `timeout 5 rm -r /` hold `rm -r /`), paths made absolute
    /// against `cwd`, lexically, and through `/proc/PID/root` to where they lead.
    pub fn views(words: &[String], cwd: &Path) -> Vec<View> {
        // A word a shell expands (`$X`, `${X:-/}`, `$(...)`, backquotes: `~` and
        // `$HOME` are already the caller's home) is only known when it runs.
        let dynamic = |w: &String| w.contains('$') || w.contains('`');
        let named = |w: &String, names: &[&str]| names.contains(&w.rsplit('/').next().unwrap_or(w));
        let appends = |w: &String| named(w, &["xargs", "parallel"]);
        (0..words.len())
            .filter_map(|i| {
                let mut n = Self::of_words(&words[i..], |o| {
                    Some(lexical_path(o, cwd).to_string_lossy().into_owned())
                })?;
                // A program only known when it runs, where a program is named: first,
                // or after a command that runs the rest.
                if dynamic(&words[i]) && (i == 0 || words[..i].iter().any(|w| named(w, RUNNERS))) {
                    n.program.clear();
                }
                // A glob stands for what is below the directory before it (`/*` is
                // everything in `/`).
                let globbed: Vec<String> = n
                    .operands
                    .iter()
                    .filter_map(|o| {
                        let at = o.find(['*', '?', '['])?;
                        let dir = o[..at].rsplit_once('/').map_or("", |(d, _)| d);
                        Some(
                            lexical_path(if dir.is_empty() { "/" } else { dir }, cwd)
                                .to_string_lossy()
                                .into_owned(),
                        )
                    })
                    .collect();
                n.operands.extend(globbed);
                // Words only known when it runs, arguments `xargs` adds, the names
                // `find -exec` puts in for `{}`: the command may be more than it
                // spells out.
                let open = words.iter().any(dynamic)
                    || words[..i].iter().any(appends)
                    || words[i..].iter().any(|w| w.contains("{}"));
                Some(View { argv: n, open })
            })
            .collect()
    }

    /// Whether this action's argv contains everything the rule names: the same program,
    /// every option and every operand of the rule (in any order).
    pub fn contains(&self, rule: &Normalized) -> bool {
        self.program == rule.program
            && rule.options.is_subset(&self.options)
            && rule.operands.iter().all(|o| self.operands.contains(o))
    }
}

/// Commands that run the rest of their command line.
const RUNNERS: &[&str] = &[
    "env", "nice", "nohup", "timeout", "sudo", "doas", "exec", "command", "builtin", "xargs",
    "parallel", "stdbuf", "ionice", "setsid", "time", "chrt", "taskset", "flock", "unbuffer",
    "watch", "strace", "ltrace", "busybox",
];

/// A command line from one of its words on, as a deny rule sees it.
pub struct View {
    pub argv: Normalized,
    /// Some of it is only known when it runs (a shell variable or substitution,
    /// what `xargs` appends, `find -exec`'s `{}`).
    pub open: bool,
}

impl View {
    /// Whether it is the rule's command for certain.
    pub fn is(&self, rule: &Normalized) -> bool {
        self.argv.contains(rule)
    }

    /// Whether it could be the rule's command once what it leaves open is known: the
    /// same program (or a program only known then); the options and operands the
    /// rule names could come from what is open.
    pub fn might_be(&self, rule: &Normalized) -> bool {
        self.open && (self.argv.program.is_empty() || self.argv.program == rule.program)
    }
}

/// A word as the path it names: against `cwd`, normalised, through `/proc`.
pub fn lexical_path(word: &str, cwd: &Path) -> PathBuf {
    let p = normalize(&cwd.join(word));
    paths::through_proc(&p, cwd).unwrap_or(p)
}

pub(crate) fn looks_like_path(word: &str) -> bool {
    !word.contains("://")
        && (word.contains('/') || word == "." || word == ".." || word.starts_with('~'))
}

/// Options and operands of an argv without knowing the program's option table:
/// `-abc` is three flags, `--name=value` is `--name`, the rest are operands.
fn split_generic(args: &[String], known: Option<&Known>) -> (BTreeSet<String>, Vec<String>) {
    let mut options = BTreeSet::new();
    let mut operands = Vec::new();
    let mut after_dashes = false;
    for a in args {
        if after_dashes || a == "-" || !a.starts_with('-') {
            operands.push(a.clone());
        } else if a == "--" {
            after_dashes = true;
        } else if let Some(long) = a.strip_prefix("--") {
            let name = long.split('=').next().unwrap_or(long);
            options.insert(alias(known, format!("--{}", unabbreviated(known, name))));
        } else {
            for ch in a[1..].chars() {
                options.insert(alias(known, format!("-{ch}")));
            }
        }
    }
    (options, operands)
}

/// A long option as GNU getopt reads it: an unambiguous prefix of a known option is
/// that option (`--recu` is `--recursive`).
fn unabbreviated<'a>(known: Option<&'a Known>, name: &'a str) -> &'a str {
    let Some(known) = known else { return name };
    let names = || {
        known
            .opts
            .long
            .iter()
            .map(|l| l.trim_end_matches(['=', '?']))
    };
    if names().any(|l| l == name) {
        return name;
    }
    let mut candidates = names().filter(|l| l.starts_with(name));
    match (candidates.next(), candidates.next()) {
        (Some(only), None) if !name.is_empty() => only,
        _ => name,
    }
}

fn alias(known: Option<&Known>, key: String) -> String {
    known
        .and_then(|k| k.aliases.iter().find(|(from, _)| *from == key))
        .map_or(key, |(_, to)| (*to).to_owned())
}

/// The name a program is started by: the last component of `argv0`, which is what
/// programs that act on their name look at.
fn started_as(argv0: &str) -> Option<&str> {
    argv0.rsplit('/').next().filter(|n| !n.is_empty())
}

/// What runs when a trusted program is started as `argv0`: the name a system
/// directory gives it (see [`trusted`]), as the tables spell it.
fn running_as(argv0: &str) -> String {
    canonical_name(started_as(argv0).unwrap_or(argv0))
}

/// A program's name as the tables use it: interpreter versions dropped
/// (`python3.11` is `python3`).
fn canonical_name(name: &str) -> String {
    if let Some(v) = name.strip_prefix("python3.")
        && v.bytes().all(|b| b.is_ascii_digit())
    {
        return "python3".into();
    }
    name.to_owned()
}

/// Why a program is not found, or not known.
#[derive(Debug, thiserror::Error)]
pub enum ProgramError {
    #[error("empty program name")]
    EmptyName,
    #[error("cannot find the program `{argv0}`: {source}")]
    NotFound {
        argv0: String,
        source: std::io::Error,
    },
    #[error("cannot resolve {path}: {source}")]
    Unresolvable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "`{argv0}` is not installed in the system directories ({}); give its path to run a program from elsewhere",
        SYSTEM_PATH.join(":")
    )]
    NotInstalled { argv0: String },
    #[error("no system directory holds {program} as `{name}`")]
    NotInSystemDirectory { program: PathBuf, name: String },
    #[error("{path}: {source}")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is not a regular file")]
    NotRegularFile(PathBuf),
    #[error("{0} can be changed by someone other than root")]
    ChangeableByOthers(PathBuf),
}

/// Find `argv0` as the sandbox will run it: a path (resolved against `cwd`) or a name
/// in the system directories; the result is canonical.
pub fn resolve(argv0: &str, cwd: &Path) -> Result<PathBuf, ProgramError> {
    if argv0.is_empty() {
        return Err(ProgramError::EmptyName);
    }
    if argv0.contains('/') {
        return std::fs::canonicalize(cwd.join(argv0)).map_err(|source| ProgramError::NotFound {
            argv0: argv0.to_owned(),
            source,
        });
    }
    for dir in SYSTEM_PATH {
        let candidate = Path::new(dir).join(argv0);
        if candidate
            .metadata()
            .is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0)
        {
            return std::fs::canonicalize(&candidate).map_err(|source| {
                ProgramError::Unresolvable {
                    path: candidate,
                    source,
                }
            });
        }
    }
    Err(ProgramError::NotInstalled {
        argv0: argv0.to_owned(),
    })
}

/// Whether a canonical program path, started as `argv0`, counts as known: the file a
/// system directory holds under the name it is started by — itself or through links
/// (`awk` to mawk; NixOS: `/run/current-system/sw/bin/ls` into the Nix store, where any
/// user may add files but only root names them in the system profile) — owned by
/// root, and neither it nor any directory above it lets anyone but root change it.
///
/// The name matters because programs act on it: git runs its command `checkout` when
/// started as `git-checkout`, busybox and NixOS's coreutils run the tool they are
/// named as. So `./git-checkout` linked to `/usr/bin/git` is not git, and an action is
/// classified as the name it starts ([`running_as`]).
pub fn trusted(program: &Path, argv0: &str) -> Result<(), ProgramError> {
    trusted_in(program, argv0, SYSTEM_PATH)
}

fn trusted_in(
    program: &Path,
    argv0: &str,
    system_path: &[impl AsRef<Path>],
) -> Result<(), ProgramError> {
    let name = started_as(argv0).unwrap_or_default();
    // A system directory this machine lacks holds no program.
    let offered = !name.is_empty()
        && system_path
            .iter()
            .any(|d| std::fs::canonicalize(d.as_ref().join(name)).is_ok_and(|p| p == program));
    if !offered {
        return Err(ProgramError::NotInSystemDirectory {
            program: program.to_path_buf(),
            name: name.to_owned(),
        });
    }
    let unreadable = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ProgramError::Unreadable { path, source }
    };
    let meta = program.metadata().map_err(unreadable(program))?;
    if !meta.is_file() {
        return Err(ProgramError::NotRegularFile(program.to_path_buf()));
    }
    if meta.uid() != 0 || meta.mode() & 0o022 != 0 {
        return Err(ProgramError::ChangeableByOthers(program.to_path_buf()));
    }
    let mut below = meta;
    for dir in program.ancestors().skip(1) {
        // A directory above that cannot be looked at is not known to be root's.
        let meta = dir.metadata().map_err(unreadable(dir))?;
        // Others may write to a sticky directory of root's (the Nix store, 1775
        // root:nixbld) but not rename or remove what root owns in it.
        let sticky_over_roots = meta.mode() & 0o1000 != 0 && below.uid() == 0;
        if meta.uid() != 0 || (meta.mode() & 0o022 != 0 && !sticky_over_roots) {
            return Err(ProgramError::ChangeableByOthers(dir.to_path_buf()));
        }
        below = meta;
    }
    Ok(())
}

/// How a known program's options are spelled. Long options: `name` is a flag,
/// `name=` takes an argument (`--name=V` or `--name V`), `name?` takes one only as
/// `--name=V`.
pub(crate) struct Opts {
    pub(crate) short: &'static str,
    pub(crate) short_arg: &'static str,
    pub(crate) long: &'static [&'static str],
}

/// What a known program does with its operands, and its class.
#[derive(Clone, Copy)]
enum Role {
    /// Operands are paths it reads.
    Reads,
    /// Operands are not paths (text, names, patterns).
    Text,
    /// Takes no operands.
    NoOperands,
    /// `grep`-like: a pattern first (unless given with `-e`), then paths it reads.
    Search,
    /// A program with rules of its own.
    Custom(fn(&mut Classifier, &str, &Parsed)),
}

struct Known {
    names: &'static [&'static str],
    opts: Opts,
    role: Role,
    /// Long spellings (and short synonyms) mapped to one key, for deny rules.
    aliases: &'static [(&'static str, &'static str)],
}

/// An argv parsed against a program's option table, GNU style: options anywhere
/// until `--`, clusters (`-rn`), attached values (`-n5`, `--max-depth=1`).
pub(crate) struct Parsed {
    /// Options as given, keyed `-x` or `--name`, with their values.
    pub opts: Vec<(String, Option<String>)>,
    pub operands: Vec<String>,
    /// Options not in the table, as written.
    pub unknown: Vec<String>,
}

impl Parsed {
    pub(crate) fn has(&self, keys: &[&str]) -> bool {
        self.opts.iter().any(|(k, _)| keys.contains(&k.as_str()))
    }

    fn value(&self, keys: &[&str]) -> Option<&str> {
        self.opts
            .iter()
            .find(|(k, _)| keys.contains(&k.as_str()))
            .and_then(|(_, v)| v.as_deref())
    }
}

pub(crate) fn parse(args: &[String], opts: &Opts) -> Parsed {
    let mut p = Parsed {
        opts: Vec::new(),
        operands: Vec::new(),
        unknown: Vec::new(),
    };
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        if a == "--" {
            p.operands.extend(args[i..].iter().cloned());
            break;
        }
        if a == "-" || !a.starts_with('-') {
            p.operands.push(a.clone());
            continue;
        }
        if let Some(long) = a.strip_prefix("--") {
            let (name, value) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v.to_owned())),
                None => (long, None),
            };
            let spec = opts
                .long
                .iter()
                .find(|s| s.trim_end_matches(['=', '?']) == name);
            match (spec, value) {
                (Some(s), value) if s.ends_with('?') => p.opts.push((format!("--{name}"), value)),
                (Some(s), Some(v)) if s.ends_with('=') => {
                    p.opts.push((format!("--{name}"), Some(v)))
                }
                (Some(s), None) if s.ends_with('=') => match args.get(i) {
                    Some(v) => {
                        i += 1;
                        p.opts.push((format!("--{name}"), Some(v.clone())));
                    }
                    None => p.unknown.push(a.clone()),
                },
                (Some(_), None) => p.opts.push((format!("--{name}"), None)),
                _ => p.unknown.push(a.clone()),
            }
            continue;
        }
        let cluster: Vec<char> = a[1..].chars().collect();
        for (j, ch) in cluster.iter().enumerate() {
            if opts.short.contains(*ch) {
                p.opts.push((format!("-{ch}"), None));
            } else if opts.short_arg.contains(*ch) {
                let rest: String = cluster[j + 1..].iter().collect();
                let value = if rest.is_empty() {
                    let v = args.get(i).cloned();
                    i += 1;
                    v
                } else {
                    Some(rest)
                };
                match value {
                    Some(v) => p.opts.push((format!("-{ch}"), Some(v))),
                    None => p.unknown.push(a.clone()),
                }
                break;
            } else {
                p.unknown.push(format!("-{ch}"));
                break;
            }
        }
    }
    p
}

/// The classification of one argv: program identity first, then what the table says.
pub(crate) fn classify_argv(c: &mut Classifier, argv: &[String]) {
    let Some((argv0, args)) = argv.split_first() else {
        c.risk.raise(RiskClass::Unknown, "empty command");
        return;
    };
    for a in argv.iter().filter(|a| a.contains(SHELL_SYNTAX)) {
        c.risk.raise(
            RiskClass::ReadOnly,
            format!(
                "argument {} contains shell syntax; it is passed literally, not interpreted",
                crate::action::quote(a)
            ),
        );
    }
    if argv0.contains('=') && !argv0.contains('/') {
        c.risk.raise(
            RiskClass::Unknown,
            format!(
                "`{argv0}` looks like an environment assignment, which the sandbox does not honour"
            ),
        );
    }
    let program = match resolve(argv0, c.scope.cwd) {
        Ok(p) => p,
        Err(e) => {
            let name = running_as(argv0);
            // (`FOO=1` is an assignment, refused as such above, not a program.)
            if matches!(e, ProgramError::NotInstalled { .. }) && !argv0.contains('=') {
                c.risk.not_installed = Some(argv0.to_owned());
            }
            c.risk.normalized = Some(normalized(c, &name, args, known(&name)));
            if PRIVILEGED.contains(&name.as_str()) {
                c.risk.raise(
                    RiskClass::Privileged,
                    format!("`{name}` acts with system privileges"),
                );
                c.risk.raise(RiskClass::Privileged, e.to_string());
            } else {
                unknown_program(c, &name, e.to_string());
            }
            return;
        }
    };
    c.risk.program = Some(program.clone());
    let name = running_as(argv0);
    let entry = known(&name);
    c.risk.normalized = Some(normalized(c, &name, args, entry));
    if let Err(why) = trusted(&program, argv0) {
        return unknown_program(
            c,
            &name,
            format!(
                "runs {}, which is not a known system program: {why}",
                program.display()
            ),
        );
    }
    if PRIVILEGED.contains(&name.as_str()) {
        c.risk.raise(
            RiskClass::Privileged,
            format!("`{name}` acts with system privileges (in the sandbox it cannot gain them)"),
        );
        return;
    }
    if let Some(classify) = own_rules(&name) {
        return classify(c, args);
    }
    let Some(entry) = entry else {
        return unknown_program(c, &name, format!("`{name}` is not a program devos knows"));
    };
    apply(c, &name, entry, args);
}

/// An unknown program asks; one known to talk to the network gets it if approved.
fn unknown_program(c: &mut Classifier, name: &str, reason: String) {
    c.risk.raise(RiskClass::Unknown, reason);
    if NETWORK_PROGRAMS.contains(&name) {
        c.risk.net(format!(
            "`{name}` may talk to the network: it gets the network"
        ));
    }
}

/// Parse `args` against a known program's options and classify by its role.
fn apply(c: &mut Classifier, name: &str, known: &Known, args: &[String]) {
    let parsed = parse(args, &known.opts);
    for u in &parsed.unknown {
        c.risk.raise(
            RiskClass::Unknown,
            format!("`{u}` is not an option devos knows for {name}"),
        );
    }
    match known.role {
        Role::Reads => reads(c, &parsed.operands),
        Role::Text => {}
        Role::NoOperands => {
            if let Some(o) = parsed.operands.first() {
                c.risk.raise(
                    RiskClass::Unknown,
                    format!("{name} takes no operand like `{o}`"),
                );
            }
        }
        Role::Search => {
            let skip = usize::from(!parsed.has(&["-e", "--regexp"]));
            reads(c, &parsed.operands[skip.min(parsed.operands.len())..]);
        }
        Role::Custom(f) => f(c, name, &parsed),
    }
}

/// `find` operators, tests and options without an argument that neither run nor write
/// anything.
const FIND_FLAGS: &[&str] = &[
    "-print",
    "-print0",
    "-ls",
    "-prune",
    "-quit",
    "-true",
    "-false",
    "-not",
    "!",
    "-a",
    "-and",
    "-o",
    "-or",
    ",",
    "(",
    ")",
    "-depth",
    "-empty",
    "-readable",
    "-writable",
    "-executable",
    "-nouser",
    "-nogroup",
    "-xdev",
    "-mount",
    "-follow",
    "-daystart",
    "-noleaf",
    "-ignore_readdir_race",
    "-noignore_readdir_race",
];

/// `find` tests and options with one argument that neither run nor write anything.
const FIND_WITH_ARG: &[&str] = &[
    "-name",
    "-iname",
    "-path",
    "-ipath",
    "-wholename",
    "-iwholename",
    "-regex",
    "-iregex",
    "-type",
    "-xtype",
    "-size",
    "-mtime",
    "-mmin",
    "-atime",
    "-amin",
    "-ctime",
    "-cmin",
    "-perm",
    "-user",
    "-group",
    "-uid",
    "-gid",
    "-links",
    "-maxdepth",
    "-mindepth",
    "-printf",
    "-regextype",
    "-inum",
    "-used",
    "-fstype",
    "-lname",
    "-ilname",
];

/// `find`: starting points are read; its expression may only use tests and actions
/// that print. `-delete` is destructive; anything else (`-exec`, `-fprint`, `-newer
/// FILE`, ...) is unknown.
fn find(c: &mut Classifier, args: &[String]) {
    let mut i = find_options_end(args);
    let starts: Vec<&String> = args[i.min(args.len())..]
        .iter()
        .take_while(|a| !(a.starts_with('-') || *a == "(" || *a == "!" || *a == ","))
        .collect();
    i += starts.len();
    if starts.is_empty() {
        c.path(Path::new("."), Access::Read);
    }
    for s in &starts {
        c.path(Path::new(s.as_str()), Access::Read);
    }
    find_expression(c, args, i, &starts);
}

/// Where the options before the starting points (`-H`, `-L`, `-P`, `-D ...`, `-O...`)
/// end.
fn find_options_end(args: &[String]) -> usize {
    let mut i = 0;
    while let Some(a) = args.get(i) {
        match a.as_str() {
            "-H" | "-L" | "-P" => i += 1,
            "-D" => i += 2,
            s if s.starts_with("-O") => i += 1,
            _ => break,
        }
    }
    i
}

/// The expression from `args[i]` on: known tests pass, `-delete` replaces the
/// starting points, anything else is unknown.
fn find_expression(c: &mut Classifier, args: &[String], mut i: usize, starts: &[&String]) {
    while let Some(a) = args.get(i) {
        i += 1;
        if FIND_FLAGS.contains(&a.as_str()) {
            continue;
        }
        if FIND_WITH_ARG.contains(&a.as_str()) {
            i += 1;
            continue;
        }
        if a == "-delete" {
            c.risk.raise(
                RiskClass::Destructive,
                "`find -delete` deletes what it finds",
            );
            for s in starts {
                c.path(Path::new(s.as_str()), Access::Replace);
            }
            continue;
        }
        c.risk.raise(
            RiskClass::Unknown,
            format!("`find {a}` is not a test or action devos knows (it may run commands or write files)"),
        );
    }
}

fn normalized(c: &Classifier, name: &str, args: &[String], known: Option<&Known>) -> Normalized {
    let (options, operands) = split_generic(args, known);
    let operands = operands
        .into_iter()
        .map(|o| {
            if looks_like_path(&o) {
                let p = match o.strip_prefix("~/") {
                    Some(rest) => c.scope.home.join(rest),
                    None => c.scope.cwd.join(&o),
                };
                paths::resolve_existing(&normalize(&p))
                    .to_string_lossy()
                    .into_owned()
            } else {
                o
            }
        })
        .collect();
    Normalized {
        program: canonical_name(name.rsplit('/').next().unwrap_or(name)),
        options,
        operands,
    }
}

fn reads(c: &mut Classifier, operands: &[String]) {
    for p in operands {
        if p != "-" {
            c.path(Path::new(p), Access::Read);
        }
    }
}

fn known(name: &str) -> Option<&'static Known> {
    KNOWN.iter().find(|k| k.names.contains(&name))
}

/// Writes each operand (new), or replaces it when it exists and is not a directory.
fn write_or_replace(c: &mut Classifier, p: &str) {
    let full = c.scope.cwd.join(p);
    let exists = full.symlink_metadata().is_ok() && !full.is_dir();
    c.path(
        Path::new(p),
        if exists {
            Access::Replace
        } else {
            Access::Write
        },
    );
}

fn writes(c: &mut Classifier, name: &str, p: &Parsed) {
    for o in &p.operands {
        c.path(Path::new(o), Access::Write);
    }
    if p.operands.is_empty() {
        c.risk
            .raise(RiskClass::Unknown, format!("{name} without a path"));
    }
}

fn chmod(c: &mut Classifier, name: &str, p: &Parsed) {
    if p.operands.len() < 2 {
        c.risk.raise(
            RiskClass::Unknown,
            format!("{name} needs a mode and a path"),
        );
    }
    for o in p.operands.iter().skip(1) {
        c.path(Path::new(o), Access::Write);
    }
}

fn copy_move(c: &mut Classifier, name: &str, p: &Parsed) {
    let Some((dest, sources)) = p.operands.split_last() else {
        c.risk
            .raise(RiskClass::Unknown, format!("{name} without paths"));
        return;
    };
    if sources.is_empty() {
        c.risk.raise(
            RiskClass::Unknown,
            format!("{name} needs a source and a target"),
        );
    }
    for s in sources {
        match name {
            "mv" => c.path(Path::new(s), Access::Write),
            "cp" => c.path(Path::new(s), Access::Read),
            // A symlink's target is text; what it points at is checked when used.
            _ => {}
        }
    }
    write_or_replace(c, dest);
}

fn delete(c: &mut Classifier, name: &str, p: &Parsed) {
    let recursive = p.has(&["-r", "-R", "--recursive"]);
    c.risk.raise(
        RiskClass::Destructive,
        if recursive {
            format!("`{name}` deletes recursively")
        } else {
            format!("`{name}` deletes")
        },
    );
    if p.operands.is_empty() {
        c.risk
            .raise(RiskClass::Unknown, format!("{name} without a path"));
    }
    for o in &p.operands {
        c.path(Path::new(o), Access::Replace);
    }
}

fn touch(c: &mut Classifier, name: &str, p: &Parsed) {
    writes(c, name, p);
}

fn date(c: &mut Classifier, _name: &str, p: &Parsed) {
    for o in &p.operands {
        if !o.starts_with('+') {
            c.risk.raise(
                RiskClass::Unknown,
                format!("`date {o}` would set the clock; only +FORMAT operands are known"),
            );
        }
    }
}

fn sort(c: &mut Classifier, _name: &str, p: &Parsed) {
    reads(c, &p.operands);
    if let Some(out) = p.value(&["-o", "--output"]) {
        c.risk
            .raise(RiskClass::WritesWorkdir, "`sort -o` writes a file");
        write_or_replace(c, out);
    }
}

fn uniq(c: &mut Classifier, _name: &str, p: &Parsed) {
    if let Some(input) = p.operands.first() {
        reads(c, std::slice::from_ref(input));
    }
    if let Some(out) = p.operands.get(1) {
        write_or_replace(c, out);
    }
    if p.operands.len() > 2 {
        c.risk.raise(
            RiskClass::Unknown,
            "uniq takes at most an input and an output",
        );
    }
}

fn jq(c: &mut Classifier, _name: &str, p: &Parsed) {
    reads(c, p.operands.get(1..).unwrap_or_default());
}

fn gzip(c: &mut Classifier, name: &str, p: &Parsed) {
    let to_stdout = p.has(&["-c", "--stdout", "-t", "--test", "-l", "--list"]);
    for o in &p.operands {
        if to_stdout {
            c.path(Path::new(o), Access::Read);
        } else if p.has(&["-k", "--keep"]) {
            c.path(Path::new(o), Access::Write);
        } else {
            c.risk.raise(
                RiskClass::Destructive,
                format!("`{name}` replaces {o} with its (de)compressed form"),
            );
            c.path(Path::new(o), Access::Replace);
        }
    }
}

/// `tar`: the archive (`-f`) is written when creating and read otherwise; extraction
/// writes into `-C DIR` or the working directory.
fn tar(c: &mut Classifier, _name: &str, p: &Parsed) {
    let creates = p.has(&[
        "-c",
        "--create",
        "-r",
        "--append",
        "-u",
        "--update",
        "-A",
        "--concatenate",
    ]);
    let extracts = p.has(&["-x", "--extract", "--get"]);
    let lists = p.has(&["-t", "--list", "-d", "--diff", "--compare"]);
    if usize::from(creates) + usize::from(extracts) + usize::from(lists) != 1 {
        c.risk.raise(
            RiskClass::Unknown,
            "tar needs exactly one of create (-c), extract (-x) or list (-t)",
        );
        return;
    }
    let archive = p.value(&["-f", "--file"]);
    let dir = p.value(&["-C", "--directory"]).map(Path::new);
    if creates {
        match archive {
            Some("-") | None => {}
            Some(a) => {
                c.risk
                    .raise(RiskClass::WritesWorkdir, "`tar` writes an archive");
                write_or_replace(c, a);
            }
        }
        let base = dir.map_or_else(|| c.scope.cwd.to_path_buf(), |d| c.scope.cwd.join(d));
        for m in &p.operands {
            c.path(&base.join(m), Access::Read);
        }
    } else {
        if let Some(a) = archive.filter(|a| *a != "-") {
            c.path(Path::new(a), Access::Read);
        }
        if extracts && !p.has(&["-O", "--to-stdout"]) {
            extract_into(c, dir, "tar");
        }
    }
}

/// Extracting writes into `dir` (or the working directory): inside it this is a
/// workdir write, elsewhere a write outside.
fn extract_into(c: &mut Classifier, dir: Option<&Path>, name: &str) {
    let target =
        paths::resolve_existing(&normalize(&c.scope.cwd.join(dir.unwrap_or(Path::new(".")))));
    if target.starts_with(c.scope.cwd) {
        c.risk.raise(
            RiskClass::WritesWorkdir,
            format!(
                "`{name}` extracts into {} (files there may be replaced)",
                target.display()
            ),
        );
    } else if let Some(d) = dir {
        c.path(&d.join("extracted"), Access::Write);
    }
}

fn zip(c: &mut Classifier, _name: &str, p: &Parsed) {
    let Some((archive, members)) = p.operands.split_first() else {
        c.risk.raise(RiskClass::Unknown, "zip needs an archive");
        return;
    };
    c.risk
        .raise(RiskClass::WritesWorkdir, "`zip` writes an archive");
    write_or_replace(c, archive);
    reads(c, members);
}

fn unzip(c: &mut Classifier, _name: &str, p: &Parsed) {
    let Some(archive) = p.operands.first() else {
        c.risk.raise(RiskClass::Unknown, "unzip needs an archive");
        return;
    };
    c.path(Path::new(archive), Access::Read);
    if p.has(&["-l", "-v", "-t", "-p", "-c"]) {
        return;
    }
    if p.has(&["-o"]) {
        c.risk.raise(
            RiskClass::Destructive,
            "`unzip -o` overwrites existing files",
        );
    }
    extract_into(c, p.value(&["-d"]).map(Path::new), "unzip");
}

/// URL operands: `file:` URLs read local files; others are the network's.
fn urls(c: &mut Classifier, name: &str, p: &Parsed) {
    c.risk.net(format!("`{name}` talks to the network"));
    for u in &p.operands {
        if let Some(path) = u.strip_prefix("file://") {
            c.path(Path::new(path), Access::Read);
        } else if !(u.starts_with("https://") || u.starts_with("http://")) {
            c.risk
                .raise(RiskClass::Unknown, format!("`{u}` is not an http(s) URL"));
        }
    }
    for (k, v) in &p.opts {
        if v.as_deref().is_some_and(|v| v.starts_with('@')) {
            c.risk.raise(
                RiskClass::Unknown,
                format!(
                    "`{name} {k} {}` reads a local file",
                    v.as_deref().unwrap_or("")
                ),
            );
        }
    }
}

fn curl(c: &mut Classifier, name: &str, p: &Parsed) {
    urls(c, name, p);
    if let Some(out) = p
        .value(&["-o", "--output", "-D", "--dump-header"])
        .filter(|o| *o != "-")
    {
        write_or_replace(c, out);
    }
    if p.has(&["-O", "--remote-name"]) {
        c.risk.raise(
            RiskClass::WritesWorkdir,
            "`curl -O` saves the download in the working directory",
        );
    }
    if let Some(up) = p.value(&["-T", "--upload-file"]) {
        c.path(Path::new(up), Access::Read);
    }
}

fn wget(c: &mut Classifier, name: &str, p: &Parsed) {
    urls(c, name, p);
    match p.value(&["-O", "--output-document"]) {
        Some("-") => {}
        Some(out) => write_or_replace(c, out),
        None => {
            let dir = p.value(&["-P", "--directory-prefix"]).unwrap_or(".");
            let target = c.scope.cwd.join(dir).join("download");
            c.path(&target, Access::Write);
        }
    }
}

/// `ssh HOST [COMMAND...]`: network, with the caller's SSH keys and configuration.
fn ssh(c: &mut Classifier, name: &str, p: &Parsed) {
    c.risk.net(format!("`{name}` connects to a remote host"));
    if p.operands.is_empty() {
        c.risk.raise(RiskClass::Unknown, "ssh needs a host");
    }
    grant_ssh_keys(c, name);
}

/// Programs that use the caller's SSH keys get `~/.ssh` (when it is a secret
/// location) in their sandbox; such actions are never approved by class alone.
pub(crate) fn grant_ssh_keys(c: &mut Classifier, name: &str) {
    let ssh_dir = c.scope.home.join(".ssh");
    if c.scope.secrets.contains(&ssh_dir) {
        if !c.risk.secrets.contains(&ssh_dir) {
            c.risk.secrets.push(ssh_dir.clone());
        }
        c.risk.reasons.push(format!(
            "`{name}` uses your SSH keys: approving gives it {}",
            ssh_dir.display()
        ));
    }
}

fn lookup(c: &mut Classifier, name: &str, _p: &Parsed) {
    c.risk.net(format!("`{name}` sends network queries"));
}

/// The project's own test and build runners: they run the project's code, confined to
/// the working directory; online they also fetch dependencies.
fn runner(c: &mut Classifier, name: &str, p: &Parsed) {
    let sub = p.operands.first().map(String::as_str).unwrap_or("");
    let (subs, online): (&[&str], bool) = match name {
        "cargo" => (
            &[
                "test", "build", "check", "clippy", "fmt", "doc", "bench", "run",
            ],
            !p.has(&["--offline", "--frozen"]) && sub != "fmt",
        ),
        "npm" => (
            &["test", "run", "run-script", "ci", "install"],
            matches!(sub, "ci" | "install"),
        ),
        "go" => (&["test", "build", "vet"], true),
        "make" | "pytest" => (&[], false),
        _ => (&[], true),
    };
    if !subs.is_empty() && !subs.contains(&sub) {
        c.risk.raise(
            RiskClass::Unknown,
            format!("`{name} {sub}` is not a known build or test command"),
        );
        return;
    }
    if name == "make"
        && let Some(bad) = p
            .operands
            .iter()
            .find(|t| t.contains('=') || t.starts_with('-') || t.contains('/'))
    {
        c.risk.raise(
            RiskClass::Unknown,
            format!("`make {bad}` sets a variable or names a path; only target names are known"),
        );
        return;
    }
    c.risk.raise(
        RiskClass::WritesWorkdir,
        "runs the project's own code (its tests or build), confined to the working directory",
    );
    if online {
        c.risk.net(format!("`{name}` may download dependencies"));
        for cache in match name {
            "cargo" => &[".cargo/registry", ".cargo/git"][..],
            "npm" => &[".npm"][..],
            "go" => &["go/pkg/mod", ".cache/go-build"][..],
            _ => &[][..],
        } {
            let dir = c.scope.home.join(cache);
            if dir.is_dir() && !c.risk.writes_outside.contains(&dir) {
                c.risk
                    .reasons
                    .push(format!("may write its cache {}", dir.display()));
                c.risk.writes_outside.push(dir);
            }
        }
    }
}

fn any_args(_c: &mut Classifier, _name: &str, _p: &Parsed) {}

macro_rules! known {
    ($names:expr, $role:expr, short: $s:expr, arg: $a:expr, long: $l:expr $(, aliases: $al:expr)?) => {
        Known {
            names: $names,
            opts: Opts { short: $s, short_arg: $a, long: $l },
            role: $role,
            aliases: known!(@aliases $($al)?),
        }
    };
    (@aliases $al:expr) => { $al };
    (@aliases) => { &[] };
}

/// Every known program. Options that run programs, read or write paths given inside
/// them, or change the system are deliberately missing: they make an action unknown.
static KNOWN: &[Known] = &[
    known!(&["ls"], Role::Reads, short: "aAbBcCdDfFgGhHiklLmnNopqQrRsStuUvxXZ1", arg: "IwT",
        long: &["all", "almost-all", "author", "escape", "block-size=", "ignore-backups",
            "directory", "dired", "classify?", "file-type", "format=", "full-time",
            "group-directories-first", "no-group", "human-readable", "si",
            "dereference-command-line", "dereference-command-line-symlink-to-dir", "hide=",
            "hyperlink?", "indicator-style=", "inode", "ignore=", "kibibytes", "dereference",
            "numeric-uid-gid", "literal", "hide-control-chars", "show-control-chars",
            "quote-name", "quoting-style=", "reverse", "recursive", "size", "sort=", "time=",
            "time-style=", "tabsize=", "width=", "context", "zero", "color?"]),
    known!(&["cat"], Role::Reads, short: "AbeEnstTuv", arg: "",
        long: &["show-all", "number-nonblank", "show-ends", "number", "squeeze-blank",
            "show-tabs", "show-nonprinting"]),
    known!(&["head", "tail"], Role::Reads, short: "qvzfF0123456789", arg: "ncs",
        long: &["lines=", "bytes=", "quiet", "silent", "verbose", "zero-terminated", "follow?",
            "retry", "pid=", "sleep-interval="]),
    known!(&["wc"], Role::Reads, short: "cmlLw", arg: "",
        long: &["bytes", "chars", "lines", "max-line-length", "words", "total="]),
    known!(&["du"], Role::Reads, short: "abcDhHklLmPsSx0", arg: "Bdt",
        long: &["all", "apparent-size", "block-size=", "bytes", "total", "dereference-args",
            "max-depth=", "human-readable", "inodes", "dereference", "count-links",
            "no-dereference", "null", "separate-dirs", "si", "summarize", "threshold=", "time?",
            "time-style=", "exclude=", "one-file-system"]),
    known!(&["df"], Role::Reads, short: "ahHiklPTv", arg: "Btx",
        long: &["all", "block-size=", "human-readable", "si", "inodes", "local", "no-sync",
            "sync", "output?", "portability", "total", "type=", "print-type", "exclude-type="]),
    known!(&["stat"], Role::Reads, short: "Lft", arg: "c",
        long: &["dereference", "file-system", "format=", "printf=", "terse", "cached="]),
    known!(&["file"], Role::Reads, short: "bchiLlNnprsv0E", arg: "eFP",
        long: &["brief", "mime", "mime-type", "mime-encoding", "keep-going", "no-dereference",
            "dereference", "no-pad", "no-buffer", "preserve-date", "raw", "special-files",
            "print0", "separator=", "exclude=", "exclude-quiet=", "extension", "apple",
            "parameter="]),
    known!(&["tree"], Role::Reads, short: "adflixpsugDFqNQrtvUCnJhS", arg: "LPIHT",
        long: &["noreport", "charset=", "filelimit=", "dirsfirst", "filesfirst", "prune",
            "matchdirs", "ignore-case", "du", "si", "inodes", "device", "sort=", "gitignore",
            "timefmt=", "metafirst", "nolinks", "noindent"]),
    known!(&["pwd"], Role::NoOperands, short: "LP", arg: "", long: &["logical", "physical"]),
    known!(&["echo"], Role::Text, short: "neE", arg: "", long: &[]),
    known!(&["printf"], Role::Text, short: "", arg: "", long: &[]),
    known!(&["true", "false"], Role::Custom(any_args), short: "", arg: "", long: &["help", "version"]),
    known!(&["uname"], Role::NoOperands, short: "asnrvmpio", arg: "",
        long: &["all", "kernel-name", "nodename", "kernel-release", "kernel-version", "machine",
            "processor", "hardware-platform", "operating-system"]),
    known!(&["whoami", "nproc", "uptime"], Role::NoOperands, short: "ps", arg: "",
        long: &["all", "ignore=", "pretty", "since"]),
    known!(&["id"], Role::Text, short: "gGnruzZ", arg: "",
        long: &["group", "groups", "name", "real", "user", "zero", "context"]),
    known!(&["date"], Role::Custom(date), short: "uRI", arg: "d",
        long: &["date=", "utc", "universal", "rfc-email", "rfc-3339=", "iso-8601?", "debug"]),
    known!(&["grep", "egrep", "fgrep", "rgrep"], Role::Search,
        short: "EFGPHhiIlLnoqrRsTUvwxyzZabc", arg: "ABCemdD",
        long: &["extended-regexp", "fixed-strings", "basic-regexp", "perl-regexp",
            "ignore-case", "no-ignore-case", "word-regexp", "line-regexp", "null-data",
            "no-messages", "invert-match", "byte-offset", "line-number", "line-buffered",
            "with-filename", "no-filename", "label=", "only-matching", "quiet", "silent",
            "binary-files=", "text", "directories=", "devices=", "recursive",
            "dereference-recursive", "include=", "exclude=", "exclude-dir=",
            "files-without-match", "files-with-matches", "count", "initial-tab", "null",
            "before-context=", "after-context=", "context=", "color?", "colour?", "regexp=",
            "max-count="],
        aliases: &[("--recursive", "-r"), ("-R", "-r"), ("--ignore-case", "-i"),
            ("--regexp", "-e")]),
    known!(&["rg"], Role::Search, short: "ilnNvwxcoqsSuUFLpH0aI.", arg: "ABCmMjtTgedEr",
        long: &["hidden", "no-ignore", "no-ignore-vcs", "no-ignore-parent", "ignore-case",
            "smart-case", "case-sensitive", "fixed-strings", "word-regexp", "line-regexp",
            "invert-match", "count", "count-matches", "files", "files-with-matches",
            "files-without-match", "only-matching", "line-number", "no-line-number",
            "no-heading", "heading", "with-filename", "no-filename", "null", "json", "vimgrep",
            "column", "follow", "glob=", "iglob=", "type=", "type-not=", "max-count=",
            "max-depth=", "max-filesize=", "threads=", "after-context=", "before-context=",
            "context=", "regexp=", "replace=", "sort=", "sortr=", "color=", "colors=",
            "max-columns=", "text", "binary", "multiline", "multiline-dotall", "trim",
            "stats", "quiet", "passthru", "no-messages", "one-file-system", "unrestricted",
            "encoding=", "engine=", "pcre2", "no-config"]),
    known!(&["diff"], Role::Reads, short: "abBdEiNpqrstTuwy", arg: "CUxIWSLD",
        long: &["unified?", "context?", "brief", "recursive", "new-file",
            "unidirectional-new-file", "side-by-side", "ignore-case", "ignore-tab-expansion",
            "ignore-trailing-space", "ignore-space-change", "ignore-all-space",
            "ignore-blank-lines", "ignore-matching-lines=", "text", "strip-trailing-cr",
            "report-identical-files", "suppress-common-lines", "show-c-function",
            "show-function-line=", "label=", "exclude=", "starting-file=", "minimal",
            "speed-large-files", "color?", "expand-tabs", "initial-tab", "width=",
            "no-dereference", "normal", "left-column", "suppress-blank-empty", "tabsize=",
            "horizon-lines=", "palette="]),
    known!(&["cmp"], Role::Reads, short: "blsv", arg: "in",
        long: &["print-bytes", "verbose", "quiet", "silent", "ignore-initial=", "bytes="]),
    known!(&["md5sum", "sha1sum", "sha224sum", "sha256sum", "sha384sum", "sha512sum",
            "b2sum", "cksum"], Role::Reads, short: "bctwz", arg: "",
        long: &["binary", "check", "tag", "text", "zero", "ignore-missing", "quiet", "status",
            "strict", "warn"]),
    known!(&["realpath"], Role::Reads, short: "eLmPqsz", arg: "",
        long: &["canonicalize-existing", "canonicalize-missing", "logical", "physical",
            "quiet", "strip", "no-symlinks", "zero"]),
    known!(&["readlink"], Role::Reads, short: "fenmqsvz", arg: "",
        long: &["canonicalize", "canonicalize-existing", "canonicalize-missing",
            "no-newline", "quiet", "silent", "verbose", "zero"]),
    known!(&["basename"], Role::Text, short: "az", arg: "s",
        long: &["multiple", "suffix=", "zero"]),
    known!(&["dirname"], Role::Text, short: "z", arg: "", long: &["zero"]),
    known!(&["which", "which.debianutils"], Role::Text, short: "as", arg: "", long: &[]),
    known!(&["sort"], Role::Custom(sort), short: "bdfgiMhnRrVcCsuz", arg: "ktSo",
        long: &["ignore-leading-blanks", "dictionary-order", "ignore-case",
            "general-numeric-sort", "ignore-nonprinting", "month-sort", "human-numeric-sort",
            "numeric-sort", "random-sort", "reverse", "sort=", "version-sort", "check?",
            "merge", "key=", "field-separator=", "stable", "unique", "zero-terminated",
            "buffer-size=", "parallel=", "debug", "output="]),
    known!(&["uniq"], Role::Custom(uniq), short: "cdDuiz", arg: "fsw",
        long: &["count", "repeated", "all-repeated?", "unique", "ignore-case",
            "zero-terminated", "skip-fields=", "skip-chars=", "check-chars=", "group?"]),
    known!(&["cut"], Role::Reads, short: "snz", arg: "bcdf",
        long: &["bytes=", "characters=", "delimiter=", "fields=", "only-delimited",
            "output-delimiter=", "complement", "zero-terminated"]),
    known!(&["tr"], Role::Text, short: "cCdst", arg: "",
        long: &["complement", "delete", "squeeze-repeats", "truncate-set1"]),
    known!(&["nl"], Role::Reads, short: "p", arg: "bdfhilnsvw", long: &[]),
    known!(&["jq"], Role::Custom(jq), short: "rjacnesSCMR", arg: "",
        long: &["raw-output", "join-output", "ascii-output", "compact-output", "null-input",
            "exit-status", "slurp", "sort-keys", "color-output", "monochrome-output",
            "raw-input", "tab", "indent="]),
    // Writers: their operands are paths they create or change.
    known!(&["mkdir"], Role::Custom(writes), short: "pv", arg: "m",
        long: &["parents", "verbose", "mode="]),
    known!(&["touch"], Role::Custom(touch), short: "achm", arg: "dt",
        long: &["no-create", "no-dereference", "date=", "time="]),
    known!(&["cp"], Role::Custom(copy_move), short: "rRapPLHdvnuflsTxb", arg: "",
        long: &["archive", "recursive", "preserve?", "no-preserve=", "parents", "verbose",
            "no-clobber", "update?", "force", "link", "symbolic-link", "no-target-directory",
            "one-file-system", "backup?", "suffix=", "sparse=", "reflink?", "attributes-only",
            "strip-trailing-slashes", "remove-destination", "dereference", "no-dereference"]),
    known!(&["mv"], Role::Custom(copy_move), short: "fnuvTbi", arg: "",
        long: &["force", "no-clobber", "update?", "verbose", "no-target-directory", "backup?",
            "suffix=", "strip-trailing-slashes"]),
    known!(&["ln"], Role::Custom(copy_move), short: "sfnvTrLPb", arg: "",
        long: &["symbolic", "force", "no-dereference", "verbose", "relative", "logical",
            "physical", "backup?", "suffix=", "no-target-directory"]),
    known!(&["chmod"], Role::Custom(chmod), short: "Rvcf", arg: "",
        long: &["recursive", "verbose", "changes", "silent", "quiet", "preserve-root"]),
    known!(&["rm"], Role::Custom(delete), short: "rRfiIdv", arg: "",
        long: &["recursive", "force", "dir", "verbose", "interactive?", "one-file-system",
            "preserve-root?"],
        aliases: &[("--recursive", "-r"), ("-R", "-r"), ("--force", "-f"), ("--dir", "-d")]),
    known!(&["rmdir"], Role::Custom(delete), short: "pv", arg: "",
        long: &["parents", "verbose", "ignore-fail-on-non-empty"]),
    known!(&["unlink"], Role::Custom(delete), short: "", arg: "", long: &[]),
    known!(&["shred"], Role::Custom(delete), short: "fuvxz", arg: "ns",
        long: &["force", "iterations=", "remove?", "size=", "verbose", "exact", "zero"]),
    known!(&["truncate"], Role::Custom(delete), short: "co", arg: "s",
        long: &["no-create", "io-blocks", "size="]),
    known!(&["tar"], Role::Custom(tar), short: "cxtrudAvzjJkpOhWPS", arg: "fC",
        long: &["create", "extract", "get", "list", "append", "update", "concatenate", "diff",
            "compare", "file=", "directory=", "verbose", "gzip", "bzip2", "xz", "zstd",
            "keep-old-files", "skip-old-files", "preserve-permissions", "to-stdout",
            "dereference", "verify", "sparse", "exclude=", "strip-components=", "wildcards",
            "no-wildcards", "no-same-owner", "no-same-permissions", "owner=", "group=",
            "mode=", "mtime=", "sort=", "numeric-owner", "transform=", "xform=",
            "one-file-system", "totals?", "checkpoint?", "auto-compress", "exclude-vcs"]),
    known!(&["gzip", "gunzip", "zcat"], Role::Custom(gzip),
        short: "dkcfvqrtlnN123456789", arg: "",
        long: &["decompress", "keep", "stdout", "to-stdout", "force", "verbose", "quiet",
            "recursive", "test", "list", "no-name", "name", "best", "fast"]),
    known!(&["zip"], Role::Custom(zip), short: "rqvjuyDX0123456789", arg: "", long: &[]),
    known!(&["unzip"], Role::Custom(unzip), short: "lvtpcqnoj", arg: "d", long: &[]),
    // Network clients.
    known!(&["curl"], Role::Custom(curl), short: "sSLfIkviOG#46", arg: "HXAedumowrCxTD",
        long: &["silent", "show-error", "location", "fail", "fail-with-body", "head",
            "insecure", "verbose", "include", "remote-name", "compressed", "get", "http1.1",
            "http2", "no-progress-meter", "progress-bar", "ipv4", "ipv6", "retry=",
            "retry-delay=", "max-time=", "connect-timeout=", "header=", "request=",
            "user-agent=", "referer=", "data=", "data-raw=", "data-urlencode=", "json=",
            "user=", "output=", "write-out=", "range=", "limit-rate=", "continue-at=",
            "proxy=", "upload-file=", "dump-header="]),
    known!(&["wget"], Role::Custom(wget), short: "qcNv", arg: "OPtU",
        long: &["quiet", "continue", "timestamping", "timeout=", "tries=",
            "no-check-certificate", "no-verbose", "show-progress", "header=", "user-agent=",
            "output-document=", "directory-prefix="]),
    known!(&["ssh"], Role::Custom(ssh), short: "vqTtN46Cn", arg: "pl", long: &[]),
    known!(&["ping"], Role::Custom(lookup), short: "qn46", arg: "cWiw", long: &[]),
    known!(&["dig", "host", "nslookup"], Role::Custom(lookup), short: "46av", arg: "tpWx",
        long: &[]),
    // Project runners.
    known!(&["cargo"], Role::Custom(runner), short: "qvr", arg: "jpF",
        long: &["release", "workspace", "all", "all-targets", "all-features",
            "no-default-features", "lib", "bins", "tests", "benches", "examples", "doc",
            "locked", "offline", "frozen", "quiet", "verbose", "no-fail-fast", "no-run",
            "keep-going", "jobs=", "package=", "features=", "bin=", "test=", "example=",
            "bench=", "exclude=", "message-format=", "color=", "check", "timings?"]),
    known!(&["npm"], Role::Custom(runner), short: "s", arg: "",
        long: &["silent", "quiet", "ignore-scripts", "no-audit", "no-fund"]),
    known!(&["go"], Role::Custom(runner), short: "v", arg: "",
        long: &[]),
    known!(&["make"], Role::Custom(runner), short: "kstBn", arg: "j",
        long: &["keep-going", "silent", "quiet", "no-print-directory", "always-make",
            "dry-run", "jobs?"]),
    known!(&["pytest", "pytest-3", "py.test"], Role::Custom(runner), short: "qvxsl", arg: "km",
        long: &["quiet", "verbose", "exitfirst", "maxfail=", "tb=", "capture=", "lf", "ff",
            "last-failed", "failed-first", "co", "collect-only", "durations=", "strict-markers",
            "no-header", "showlocals"]),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &[&str]) -> Vec<String> {
        s.iter().map(|w| (*w).to_owned()).collect()
    }

    #[test]
    fn the_deleters_are_the_programs_whose_role_is_to_delete() {
        let deleting = |k: &Known| matches!(k.role, Role::Custom(f) if std::ptr::fn_addr_eq(f, delete as fn(&mut Classifier, &str, &Parsed)));
        let mut names: Vec<&str> = KNOWN
            .iter()
            .filter(|k| deleting(k))
            .flat_map(|k| k.names.iter().copied())
            .collect();
        names.sort_unstable();
        let mut listed = DELETERS.to_vec();
        listed.sort_unstable();
        assert_eq!(names, listed);
    }

    #[test]
    fn options_parse_gnu_style() {
        let opts = &known("sort").unwrap().opts;
        let p = parse(
            &words(&["-rn", "-kfoo", "--output=x", "a", "--", "-b"]),
            opts,
        );
        assert_eq!(p.operands, ["a", "-b"]);
        assert!(p.has(&["-r"]) && p.has(&["-n"]));
        assert_eq!(p.value(&["-k"]), Some("foo"));
        assert_eq!(p.value(&["--output"]), Some("x"));
        assert!(p.unknown.is_empty());
        // Abbreviations are not what they would abbreviate: they are unknown.
        let p = parse(
            &words(&["--compress=sh", "--compress-program=sh", "-T", "/x"]),
            opts,
        );
        assert_eq!(p.unknown, ["--compress=sh", "--compress-program=sh", "-T"]);
    }

    #[test]
    fn deny_normalisation_ignores_spelling() {
        let rule = Normalized::of_rule(&words(&["rm", "-rf", "/"])).unwrap();
        for spelling in [
            &["-fr", "/"][..],
            &["-r", "-f", "/"],
            &["--recursive", "--force", "/"],
            &["-R", "-f", "--", "/"],
            &["-rfv", "/", "x"],
        ] {
            let (options, operands) = split_generic(&words(spelling), known("rm"));
            let action = Normalized {
                program: "rm".into(),
                options,
                operands,
            };
            assert!(action.contains(&rule), "{spelling:?}");
        }
        let (options, operands) = split_generic(&words(&["-r", "/srv"]), known("rm"));
        assert!(
            !Normalized {
                program: "rm".into(),
                options,
                operands
            }
            .contains(&rule)
        );
    }

    #[test]
    fn only_root_owned_system_programs_are_trusted() {
        let ls = resolve("ls", Path::new("/")).unwrap();
        trusted(&ls, "ls").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("ls");
        std::fs::write(&fake, "#!/bin/sh\n").unwrap();
        let fake = std::fs::canonicalize(&fake).unwrap();
        assert!(trusted(&fake, "ls").is_err());
        assert!(trusted(&fake, fake.to_str().unwrap()).is_err());
        // A system program under a name the system does not give it is not known: git
        // started as `git-checkout` runs `git checkout`, whatever its arguments say.
        let git = resolve("git", Path::new("/")).unwrap();
        trusted(&git, "git").unwrap();
        let links = tempfile::tempdir().unwrap();
        for (link, target) in [("git-checkout", &git), ("sneaky", &ls), ("ls", &ls)] {
            std::os::unix::fs::symlink(target, links.path().join(link)).unwrap();
            let argv0 = format!("./{link}");
            let p = resolve(&argv0, links.path()).unwrap();
            assert_eq!(&p, target);
            assert_eq!(trusted(&p, &argv0).is_ok(), link == "ls", "{argv0}");
        }
        // A path that only looks like a system path is what it resolves to.
        let sneaky = resolve("/usr/../proc/self/cwd/ls", dir.path());
        if let Ok(p) = sneaky {
            assert!(trusted(&p, "ls").is_err() || p == ls, "{}", p.display());
        }
        assert!(resolve("no-such-program-devos", Path::new("/")).is_err());
    }

    /// A NixOS system: the profile links into a store that others may add to (sticky,
    /// group-writable); only what the profile names is trusted, and under that name.
    #[test]
    fn programs_a_system_profile_links_to_are_trusted_by_that_name_only() {
        use std::os::unix::fs::{PermissionsExt, symlink};
        let tmp = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(tmp.path()).unwrap();
        assert_eq!(
            root.metadata().unwrap().uid(),
            0,
            "this test makes files owned by root: run it as root (the README's test command does)"
        );
        let mode = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        let store = root.join("nix/store");
        let coreutils = store.join("aaaa-coreutils-9.7/bin");
        let evil = store.join("bbbb-coreutils-9.7/bin");
        let profile = root.join("run/current-system/sw/bin");
        for d in [&coreutils, &evil, &profile] {
            std::fs::create_dir_all(d).unwrap();
        }
        for f in [coreutils.join("coreutils"), evil.join("ls")] {
            std::fs::write(&f, "#!/bin/sh\n").unwrap();
            mode(&f, 0o555);
        }
        symlink("coreutils", coreutils.join("ls")).unwrap();
        symlink(coreutils.join("ls"), profile.join("ls")).unwrap();
        mode(&store, 0o1775);
        let system_path = [profile.clone()];
        let real = std::fs::canonicalize(profile.join("ls")).unwrap();
        assert_eq!(real, coreutils.join("coreutils"));

        trusted_in(&real, "ls", &system_path).unwrap();
        trusted_in(&real, &profile.join("ls").to_string_lossy(), &system_path).unwrap();
        assert_eq!(running_as("ls"), "ls");
        assert_eq!(running_as("/run/current-system/sw/bin/rm"), "rm");
        // Not named by the profile: a store path anyone could have added.
        assert!(matches!(
            trusted_in(&evil.join("ls"), "ls", &system_path),
            Err(ProgramError::NotInSystemDirectory { .. })
        ));
        // Named, but under another name than it is started by.
        assert!(trusted_in(&real, "rm", &system_path).is_err());
        // A store entry not root's could be replaced by its owner.
        let pkg = store.join("aaaa-coreutils-9.7");
        std::os::unix::fs::chown(&pkg, Some(65534), None).unwrap();
        assert!(matches!(
            trusted_in(&real, "ls", &system_path),
            Err(ProgramError::ChangeableByOthers(p)) if p == pkg
        ));
        std::os::unix::fs::chown(&pkg, Some(0), None).unwrap();
        // Without the sticky bit, a group-writable store lets others rename entries.
        mode(&store, 0o775);
        assert!(matches!(
            trusted_in(&real, "ls", &system_path),
            Err(ProgramError::ChangeableByOthers(p)) if p == store
        ));
    }
}
