//! What the agent must know about a git repository to run git safely in it: where
//! its git directory and configuration are, whether it has hooks or configured
//! programs, and its configuration reduced to keys that cannot start a program.
//!
//! The sandbox runs git with the repository's configuration replaced by that
//! reduced copy (an allow-list: anything not listed is dropped, so a setting this
//! module has never heard of cannot run anything), hooks pointed at an empty
//! directory, no pager, no system configuration and a reduced global one — unless the
//! user approved the action with the repository's own programs.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Why devos cannot read a repository the way git would.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is not a gitdir file")]
    NotGitdirFile(PathBuf),
    #[error("{0} has a control character in its name")]
    ControlCharacter(PathBuf),
    /// A configuration file git would refuse, with the line.
    #[error("line {line}: {what}")]
    ConfigSyntax { line: usize, what: &'static str },
    #[error(transparent)]
    IndexUnreadable(std::io::Error),
    #[error("not an index")]
    NotAnIndex,
    #[error("truncated index")]
    TruncatedIndex,
    #[error("cannot read the index")]
    IndexLayout,
}

/// A repository as git will see it from a working directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repo {
    /// The directory holding the working tree.
    pub work_tree: PathBuf,
    /// `.git` (or the directory a `.git` file points to, for worktrees and submodules).
    pub git_dir: PathBuf,
    /// Where the shared state lives (the main `.git` for a linked worktree).
    pub common_dir: PathBuf,
}

impl Repo {
    /// The configuration files of the repository itself (the shared `config` and a
    /// worktree's `config.worktree`), those that exist.
    pub fn config_files(&self) -> Vec<PathBuf> {
        [
            self.common_dir.join("config"),
            self.git_dir.join("config.worktree"),
        ]
        .into_iter()
        .filter(|p| p.symlink_metadata().is_ok())
        .collect()
    }

    /// Whether the repository has submodules: declared in `.gitmodules`, cloned under
    /// `modules/`, or committed as gitlinks in the index. git steps into them with
    /// their own configuration, whatever the superproject's says (`git add` does even
    /// when told to ignore them). An index devos cannot read counts as having them.
    pub fn has_submodules(&self) -> bool {
        self.work_tree.join(".gitmodules").exists()
            || std::fs::read_dir(self.common_dir.join("modules"))
                .is_ok_and(|mut d| d.next().is_some())
            || index_has_gitlinks(&self.git_dir.join("index")).unwrap_or(true)
    }

    /// The configuration files of the submodules cloned under `modules/` (and of
    /// theirs), at most four levels down.
    pub fn submodule_configs(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, depth: u32, out: &mut Vec<PathBuf>) {
            if depth == 0 {
                return;
            }
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                if path.join("HEAD").is_file() && path.join("config").is_file() {
                    out.push(path.join("config"));
                    walk(&path.join("modules"), depth - 1, out);
                } else {
                    walk(&path, depth - 1, out);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.common_dir.join("modules"), 4, &mut out);
        out
    }

    /// Who besides `uid` (and root) could change what git reads from this repository
    /// while it runs: the first directory or file on the way to it that another user
    /// may write or replace, with why. git's programs can be switched off only in a
    /// repository nobody else can change: copies of its configuration stand over the
    /// originals, and a file replaced underneath lets the original through.
    ///
    /// Checked: every directory from `/` down to the working tree, the git directory
    /// and the common directory (others may write a directory above only when it is
    /// sticky, as `/tmp` is); those three, `.git`, `modules/` and the submodule git
    /// directories in it; and the files git reads a path or its settings from.
    pub fn changeable_by_others(&self, uid: u32) -> Option<String> {
        use std::os::unix::fs::MetadataExt;
        let owner_name = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()
            .map(|u| u.name);
        // A group of the owner alone (a user private group) is the owner. A failed
        // look-up of either makes the group count as shared: the safe way.
        let private_group = |gid: u32| {
            nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
                .ok()
                .flatten()
                .is_some_and(|g| {
                    owner_name
                        .as_ref()
                        .is_some_and(|n| g.name == *n && g.mem.iter().all(|m| m == n))
                })
        };
        let why = |path: &Path, above: bool| -> Option<String> {
            // What does not exist (or the caller cannot look at) git does not read
            // either; who may put it there is asked of the directory above.
            let m = path.symlink_metadata().ok()?;
            let mode = m.mode();
            if m.uid() != uid && m.uid() != 0 {
                return Some(format!("{} belongs to user {}", path.display(), m.uid()));
            }
            let sticky = above && m.is_dir() && mode & 0o1000 != 0;
            if mode & 0o002 != 0 && !sticky {
                return Some(format!("everyone may write {}", path.display()));
            }
            if mode & 0o020 != 0 && !sticky && !private_group(m.gid()) {
                return Some(format!("group {} may write {}", m.gid(), path.display()));
            }
            None
        };
        let mut checked: Vec<&Path> = Vec::new();
        for dir in [&self.work_tree, &self.git_dir, &self.common_dir] {
            for above in dir.ancestors().skip(1) {
                if !checked.contains(&above) {
                    checked.push(above);
                    if let Some(w) = why(above, true) {
                        return Some(w);
                    }
                }
            }
        }
        let mut own: Vec<PathBuf> = [
            self.work_tree.clone(),
            self.work_tree.join(".git"),
            self.work_tree.join(".gitmodules"),
            self.git_dir.clone(),
            self.git_dir.join("commondir"),
            self.git_dir.join("config.worktree"),
            self.common_dir.clone(),
            self.common_dir.join("config"),
            self.common_dir.join("modules"),
        ]
        .into();
        own.extend(
            self.submodule_configs()
                .iter()
                .flat_map(|c| c.ancestors().skip(1).take(2))
                .filter(|d| d.starts_with(self.common_dir.join("modules")))
                .map(Path::to_path_buf),
        );
        own.iter().find_map(|p| why(p, false))
    }

    /// Hooks that are active: executable files in `hooks/` that are not samples.
    pub fn hooks(&self) -> Vec<String> {
        use std::os::unix::fs::PermissionsExt;
        let mut hooks: Vec<String> = std::fs::read_dir(self.common_dir.join("hooks"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                !e.file_name().to_string_lossy().ends_with(".sample")
                    && e.metadata()
                        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            })
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        hooks.sort();
        hooks
    }
}

/// Whether an index (version 2, 3 or 4) holds a gitlink (mode 160000), read directly
/// so that nothing of the repository's runs; `Ok(false)` without an index.
pub fn index_has_gitlinks(index: &Path) -> Result<bool, RepoError> {
    let data = match std::fs::read(index) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(RepoError::IndexUnreadable(e)),
    };
    let be32 = |at: usize| -> Result<u32, RepoError> {
        data.get(at..at + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or(RepoError::TruncatedIndex)
    };
    if data.get(..4) != Some(b"DIRC") {
        return Err(RepoError::NotAnIndex);
    }
    let version = be32(4)?;
    let count = be32(8)?;
    // The object id length is not recorded: try SHA-1 first, then SHA-256.
    'hash: for hash in [20usize, 32] {
        let mut at = 12;
        for _ in 0..count {
            let start = at;
            let Ok(mode) = be32(start + 24) else {
                continue 'hash;
            };
            if mode == 0o160000 {
                return Ok(true);
            }
            at = start + 40 + hash;
            let Some(flags) = data
                .get(at..at + 2)
                .map(|b| u16::from_be_bytes([b[0], b[1]]))
            else {
                continue 'hash;
            };
            at += 2;
            if version >= 3 && flags & 0x4000 != 0 {
                at += 2;
            }
            if version == 4 {
                // A varint (bytes to drop from the previous path), then the rest of
                // the path up to NUL.
                while data.get(at).is_some_and(|b| b & 0x80 != 0) {
                    at += 1;
                }
                at += 1;
                let Some(nul) = data.get(at..).and_then(|r| r.iter().position(|b| *b == 0)) else {
                    continue 'hash;
                };
                at += nul + 1;
            } else {
                let Some(nul) = data.get(at..).and_then(|r| r.iter().position(|b| *b == 0)) else {
                    continue 'hash;
                };
                // Entries are padded with 1 to 8 NULs to a multiple of 8 bytes.
                let len = at + nul - start;
                at = start + (len + 8) / 8 * 8;
            }
        }
        // Entries end where extensions (four capital letters) or the checksum begin.
        let tail_ok = data.len() == at + hash
            || data
                .get(at..at + 4)
                .is_some_and(|s| s.iter().all(u8::is_ascii_uppercase));
        if tail_ok {
            return Ok(false);
        }
    }
    Err(RepoError::IndexLayout)
}

/// Find the repository `cwd` is in, the way git does: a `.git` directory or a
/// `gitdir:` file in `cwd` or a directory above it. A bare repository is not
/// returned (the sandbox's git refuses bare repositories it was not pointed at).
///
/// `.git` files and `commondir` are read the way git reads them — raw bytes, only
/// trailing newlines and carriage returns dropped — and the sandbox hands git this
/// reading (`GIT_DIR`, and copies of those files with the absolute paths), so git
/// cannot find another configuration than the one devos reduced. A `.git` or
/// `commondir` devos cannot follow makes the repository unusable (`Err`): git runs
/// with nothing of it.
pub fn discover(cwd: &Path) -> Option<Repo> {
    // One devos cannot follow is none here: git gets nothing of it.
    find(cwd).ok().flatten()
}

/// [`discover`], telling a repository devos cannot follow (`Err`) from none (`Ok(None)`).
pub fn find(cwd: &Path) -> Result<Option<Repo>, RepoError> {
    for dir in cwd.ancestors() {
        let dot_git = dir.join(".git");
        let Ok(meta) = dot_git.symlink_metadata() else {
            continue;
        };
        let git_dir = if meta.is_file() {
            let raw = git_file(&dot_git)?;
            let target = raw
                .strip_prefix(b"gitdir: ")
                .ok_or_else(|| RepoError::NotGitdirFile(dot_git.clone()))?;
            canonical(&dir.join(std::ffi::OsStr::from_bytes(target)))?
        } else {
            canonical(&dot_git)?
        };
        if !git_dir.join("HEAD").exists() {
            continue;
        }
        let common_dir = match git_file(&git_dir.join("commondir")) {
            Ok(raw) => canonical(&git_dir.join(std::ffi::OsStr::from_bytes(&raw)))?,
            Err(_) if !git_dir.join("commondir").exists() => git_dir.clone(),
            Err(e) => return Err(e),
        };
        // git drops every trailing line break of what it reads, so a path with line
        // breaks cannot be handed on exactly.
        if let Some(p) = [&git_dir, &common_dir]
            .into_iter()
            .find(|p| p.as_os_str().as_bytes().iter().any(u8::is_ascii_control))
        {
            return Err(RepoError::ControlCharacter(p.clone()));
        }
        return Ok(Some(Repo {
            work_tree: dir.to_path_buf(),
            git_dir,
            common_dir,
        }));
    }
    Ok(None)
}

/// A file git reads a path from: its bytes without trailing `\n` and `\r`. Read
/// without blocking: a FIFO put in its place is an error, not a wait.
fn git_file(path: &Path) -> Result<Vec<u8>, RepoError> {
    let mut raw = crate::context::read_regular(path, 64 * 1024).map_err(io(path))?;
    while raw.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        raw.pop();
    }
    Ok(raw)
}

fn canonical(path: &Path) -> Result<PathBuf, RepoError> {
    std::fs::canonicalize(path).map_err(io(path))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RepoError + '_ {
    move |source| RepoError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How much of a configuration the sandbox keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// The repository's own configuration: only keys that cannot start a program.
    Repository,
    /// The user's global configuration for commands that change the repository:
    /// also their credential helper and filter drivers (dropping a filter such as
    /// git-lfs would commit the wrong content; commands that would run one ask).
    GlobalWrite,
    /// The user's global configuration for read-only commands: identity and inert
    /// keys only.
    GlobalRead,
}

/// Keys (lower case; `*` is one subsection) that cannot start a program, whatever
/// their value. Everything else is dropped.
const INERT: &[&str] = &[
    "core.repositoryformatversion",
    "core.bare",
    "core.filemode",
    "core.symlinks",
    "core.ignorecase",
    "core.precomposeunicode",
    "core.logallrefupdates",
    "core.autocrlf",
    "core.eol",
    "core.safecrlf",
    "core.quotepath",
    "core.abbrev",
    "core.sharedrepository",
    "core.untrackedcache",
    "core.checkstat",
    "core.trustctime",
    "core.compression",
    "core.bigfilethreshold",
    "core.preloadindex",
    "core.commentchar",
    "core.whitespace",
    "extensions.objectformat",
    "extensions.worktreeconfig",
    "extensions.refstorage",
    "extensions.preciousobjects",
    "extensions.partialclone",
    "remote.*.url",
    "remote.*.pushurl",
    "remote.*.fetch",
    "remote.*.push",
    "remote.*.tagopt",
    "remote.*.prune",
    "remote.*.mirror",
    "remote.*.promisor",
    "remote.*.partialclonefilter",
    "branch.*.remote",
    "branch.*.merge",
    "branch.*.rebase",
    "branch.*.pushremote",
    "branch.*.description",
    "user.name",
    "user.email",
    "author.name",
    "author.email",
    "committer.name",
    "committer.email",
    "init.defaultbranch",
    "pull.rebase",
    "pull.ff",
    "push.default",
    "push.autosetupremote",
    "fetch.prune",
    "merge.ff",
    "merge.conflictstyle",
    "diff.renames",
    "diff.algorithm",
    "diff.noprefix",
    "diff.mnemonicprefix",
    "diff.context",
    "status.showuntrackedfiles",
    "status.short",
    "status.branch",
    "log.date",
    "log.decorate",
    "format.pretty",
    "submodule.*.url",
    "submodule.*.active",
];

/// Extra keys the global configuration keeps for commands that change the repository.
const GLOBAL_WRITE: &[&str] = &[
    "filter.*.clean",
    "filter.*.smudge",
    "filter.*.process",
    "filter.*.required",
    "credential.helper",
];

/// Keys that are known to run programs (for telling the user what approving a
/// repository's own programs means). Not the safety mechanism: that is [`INERT`].
const RUNS_PROGRAMS: &[&str] = &[
    "core.fsmonitor",
    "core.hookspath",
    "core.pager",
    "core.editor",
    "core.sshcommand",
    "core.gitproxy",
    "core.askpass",
    "core.alternaterefscommand",
    "diff.external",
    "diff.*.textconv",
    "diff.*.command",
    "filter.*.clean",
    "filter.*.smudge",
    "filter.*.process",
    "merge.*.driver",
    "credential.helper",
    "credential.*.helper",
    "gpg.program",
    "gpg.*.program",
    "log.showsignature",
    "commit.gpgsign",
    "tag.gpgsign",
    "push.gpgsign",
    "sequence.editor",
    "pager.*",
    "alias.*",
    "include.path",
    "includeif.*.path",
    "remote.*.uploadpack",
    "remote.*.receivepack",
    "remote.*.vcs",
    "uploadpack.packobjectshook",
    "interactive.difffilter",
    "web.browser",
    "browser.*.cmd",
    "difftool.*.cmd",
    "mergetool.*.cmd",
    "protocol.*.allow",
    "url.*.insteadof",
    "trace2.eventtarget",
    "trace2.normaltarget",
    "trace2.perftarget",
    "submodule.*.update",
];

/// Split a key into section, subsection and name (lower case where git ignores case).
fn split_key(key: &str) -> Option<(String, Option<&str>, String)> {
    let (section, rest) = key.split_once('.')?;
    let (sub, name) = match rest.rsplit_once('.') {
        Some((sub, name)) => (Some(sub), name),
        None => (None, rest),
    };
    Some((section.to_lowercase(), sub, name.to_lowercase()))
}

fn matches(patterns: &[&str], key: &str) -> bool {
    let Some((section, sub, name)) = split_key(key) else {
        return false;
    };
    patterns.iter().any(|p| {
        let mut parts = p.split('.');
        let (ps, pm, pn) = (parts.next(), parts.next(), parts.next());
        match (ps, pm, pn, sub) {
            // `section.*`: any key of the section.
            (Some(ps), Some("*"), None, _) => ps == section,
            (Some(ps), Some(pn), None, None) => ps == section && pn == name,
            (Some(ps), Some("*"), Some(pn), Some(_)) => ps == section && pn == name,
            _ => false,
        }
    })
}

/// Whether a key is kept at this level.
pub fn kept(key: &str, level: Level) -> bool {
    matches(INERT, key) || (level == Level::GlobalWrite && matches(GLOBAL_WRITE, key))
}

/// Whether a key is known to run a program.
pub fn runs_programs(key: &str) -> bool {
    matches(RUNS_PROGRAMS, key)
}

/// One setting of a configuration file: section (lower case), subsection (as
/// written), name (lower case) and value (`None` for a bare boolean).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    pub section: String,
    pub subsection: Option<String>,
    pub name: String,
    pub value: Option<String>,
}

impl Setting {
    pub fn key(&self) -> String {
        match &self.subsection {
            Some(sub) => format!("{}.{sub}.{}", self.section, self.name),
            None => format!("{}.{}", self.section, self.name),
        }
    }
}

/// Parse a git configuration file the way git does (sections, quoted subsections,
/// quoted values, escapes, line continuations, comments). A file git would refuse is
/// refused, with the line.
pub fn parse_config(text: &str) -> Result<Vec<Setting>, RepoError> {
    let chars: Vec<char> = text.chars().collect();
    let mut p = Cursor {
        chars: &chars,
        i: 0,
        line: 1,
    };
    let mut out = Vec::new();
    let mut section: Option<(String, Option<String>)> = None;
    while let Some(c) = p.peek() {
        match c {
            '\n' => {
                p.line += 1;
                p.i += 1;
            }
            c if c.is_whitespace() => p.i += 1,
            '#' | ';' => p.skip_line(),
            '[' => {
                p.i += 1;
                section = Some(p.header()?);
            }
            c if c.is_ascii_alphabetic() => {
                let name = p
                    .take_while(|c| c.is_ascii_alphanumeric() || c == '-')
                    .to_lowercase();
                let Some((sec, sub)) = &section else {
                    return Err(p.error("a setting before any [section]"));
                };
                while matches!(p.peek(), Some(' ' | '\t')) {
                    p.i += 1;
                }
                let value = match p.peek() {
                    Some('=') => {
                        p.i += 1;
                        Some(p.value()?)
                    }
                    None | Some('\n' | '#' | ';') => None,
                    Some('\r') => None,
                    Some(_) => return Err(p.error("expected `=` after the name")),
                };
                out.push(Setting {
                    section: sec.clone(),
                    subsection: sub.clone(),
                    name,
                    value,
                });
            }
            _ => return Err(p.error("not a section, setting or comment")),
        }
    }
    Ok(out)
}

struct Cursor<'a> {
    chars: &'a [char],
    i: usize,
    line: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.i).copied()
    }

    fn error(&self, what: &'static str) -> RepoError {
        RepoError::ConfigSyntax {
            line: self.line,
            what,
        }
    }

    fn skip_line(&mut self) {
        while let Some(c) = self.peek() {
            if c == '\n' {
                break;
            }
            self.i += 1;
        }
    }

    fn take_while(&mut self, f: impl Fn(char) -> bool) -> String {
        let start = self.i;
        while self.peek().is_some_and(&f) {
            self.i += 1;
        }
        self.chars[start..self.i].iter().collect()
    }

    /// `[name]`, `[name "sub"]` or the old `[name.sub]`; the `[` is consumed.
    fn header(&mut self) -> Result<(String, Option<String>), RepoError> {
        let name = self.take_while(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
        if name.is_empty() {
            return Err(self.error("an empty section name"));
        }
        let mut sub = None;
        if self.peek().is_some_and(|c| c == ' ' || c == '\t') {
            while matches!(self.peek(), Some(' ' | '\t')) {
                self.i += 1;
            }
            if self.peek() != Some('"') {
                return Err(self.error("a subsection must be quoted"));
            }
            self.i += 1;
            let mut s = String::new();
            loop {
                match self.peek() {
                    None | Some('\n') => return Err(self.error("an unterminated subsection")),
                    Some('"') => {
                        self.i += 1;
                        break;
                    }
                    Some('\\') => {
                        self.i += 1;
                        match self.peek() {
                            None | Some('\n') => {
                                return Err(self.error("an unterminated subsection"));
                            }
                            Some(c) => s.push(c),
                        }
                        self.i += 1;
                    }
                    Some(c) => {
                        s.push(c);
                        self.i += 1;
                    }
                }
            }
            sub = Some(s);
        }
        if self.peek() != Some(']') {
            return Err(self.error("a section header without `]`"));
        }
        self.i += 1;
        match (name.split_once('.'), sub) {
            (Some((sec, old)), None) => Ok((sec.to_lowercase(), Some(old.to_lowercase()))),
            (Some(_), Some(_)) => Err(self.error("a dotted section name with a subsection")),
            (None, sub) => Ok((name.to_lowercase(), sub)),
        }
    }

    /// A value after `=`: whitespace trimmed outside quotes (inner runs become
    /// spaces, as git does), quotes removed, escapes applied, continuations joined.
    fn value(&mut self) -> Result<String, RepoError> {
        let mut out = String::new();
        let mut quoted = false;
        let mut spaces = 0;
        let mut started = false;
        loop {
            let Some(c) = self.peek() else {
                if quoted {
                    return Err(self.error("an unterminated quote"));
                }
                return Ok(out);
            };
            self.i += 1;
            match c {
                '\n' => {
                    if quoted {
                        return Err(self.error("an unterminated quote"));
                    }
                    self.line += 1;
                    return Ok(out);
                }
                '#' | ';' if !quoted => {
                    self.skip_line();
                    return Ok(out);
                }
                c if !quoted && c.is_whitespace() => {
                    if started {
                        spaces += 1;
                    }
                }
                c => {
                    started = true;
                    out.extend(std::iter::repeat_n(' ', spaces));
                    spaces = 0;
                    match c {
                        '"' => quoted = !quoted,
                        '\\' => {
                            let Some(e) = self.peek() else {
                                return Err(self.error("a backslash at the end"));
                            };
                            self.i += 1;
                            match e {
                                '\n' => self.line += 1,
                                'n' => out.push('\n'),
                                't' => out.push('\t'),
                                'b' => out.push('\u{8}'),
                                '"' | '\\' => out.push(e),
                                _ => return Err(self.error("an unknown escape in a value")),
                            }
                        }
                        c => out.push(c),
                    }
                }
            }
        }
    }
}

/// The keys of a configuration text (empty if git could not read it either).
pub fn keys(text: &str) -> Vec<String> {
    parse_config(text)
        .map(|s| s.iter().map(Setting::key).collect())
        .unwrap_or_default()
}

/// A configuration reduced to the keys kept at `level`, written back in git's file
/// format with every value quoted.
pub fn sanitize(settings: &[Setting], level: Level) -> String {
    let mut out =
        String::from("# devos: this configuration without the keys that could run programs\n");
    for s in settings.iter().filter(|s| kept(&s.key(), level)) {
        let header = match &s.subsection {
            Some(sub) => format!("[{} \"{}\"]", s.section, escape(sub)),
            None => format!("[{}]", s.section),
        };
        match &s.value {
            Some(v) => out.push_str(&format!("{header}\n\t{} = \"{}\"\n", s.name, escape(v))),
            None => out.push_str(&format!("{header}\n\t{}\n", s.name)),
        }
    }
    out
}

/// Escape a value for a double-quoted git config string (control characters other
/// than newline, tab and backspace are dropped).
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for ch in value.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// Whether a key defines a filter, diff or merge driver's program.
pub fn is_driver(key: &str) -> bool {
    ["filter.", "diff.", "merge."]
        .iter()
        .any(|p| key.starts_with(p))
}

/// Drivers named by any attributes file of the work tree (every `.gitattributes`,
/// tracked or not, and `info/attributes`), or `None` when the tree has more than
/// `limit` entries to look through.
pub fn all_attribute_drivers(repo: &Repo, limit: usize) -> Option<Vec<String>> {
    let mut files = vec![repo.common_dir.join("info/attributes")];
    let mut dirs = vec![repo.work_tree.clone()];
    let mut seen = 0;
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            seen += 1;
            if seen > limit {
                return None;
            }
            let name = entry.file_name();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() && name != ".git" {
                dirs.push(entry.path());
            } else if name == ".gitattributes" {
                files.push(entry.path());
            }
        }
    }
    Some(drivers_in(&files))
}

/// Filter, diff and merge drivers named in the repository's top-level attributes.
pub fn attribute_drivers(repo: &Repo) -> Vec<String> {
    drivers_in(&[
        repo.work_tree.join(".gitattributes"),
        repo.common_dir.join("info/attributes"),
    ])
}

fn drivers_in(files: &[PathBuf]) -> Vec<String> {
    let mut drivers = Vec::new();
    for file in files {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for word in text.split_whitespace() {
            for kind in ["filter", "diff", "merge"] {
                if let Some(name) = word.strip_prefix(kind).and_then(|r| r.strip_prefix('=')) {
                    let d = format!("{kind}.{name}");
                    if !drivers.contains(&d) {
                        drivers.push(d);
                    }
                }
            }
        }
    }
    drivers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_inert_keys_survive() {
        let text = "[core]\n\tfsmonitor = /tmp/x\n\tbare = false\n[remote \"origin\"]\n\turl = https://example.com/r.git\n\tuploadpack = sh -c x\n[diff \"evil\"]\n\ttextconv = sh\n[include]\n\tpath = /tmp/i\n[user]\n\tname = \"A \\\"quoted\\\" name\\\\\"\n[filter \"lfs\"]\n\tprocess = git-lfs filter-process\n[core]\n\tbare\n";
        let settings = parse_config(text).unwrap();
        let repo = sanitize(&settings, Level::Repository);
        assert!(repo.contains("\tbare = \"false\""), "{repo}");
        assert!(repo.contains("[remote \"origin\"]\n\turl = \"https://example.com/r.git\""));
        assert!(
            repo.contains("name = \"A \\\"quoted\\\" name\\\\\""),
            "{repo}"
        );
        for gone in ["fsmonitor", "uploadpack", "textconv", "include", "filter"] {
            assert!(!repo.contains(gone), "{gone} survived: {repo}");
        }
        // What we write, we read back the same.
        let again = parse_config(&repo).unwrap();
        assert_eq!(
            again
                .iter()
                .find(|s| s.name == "name")
                .unwrap()
                .value
                .as_deref(),
            Some("A \"quoted\" name\\")
        );
        let global = sanitize(&settings, Level::GlobalWrite);
        assert!(
            global.contains("process = \"git-lfs filter-process\""),
            "{global}"
        );
        assert!(!sanitize(&settings, Level::GlobalRead).contains("filter"));
    }

    #[test]
    fn values_parse_like_git() {
        let s = parse_config("[a]\n x =  one  two \t# c\n y = \"  q ; # \" z\n w = a\\\n b\n[b.Sub] v\n[c \"S\\\"x\"] k=1 ; c\n").unwrap();
        let v: Vec<(String, Option<String>)> =
            s.iter().map(|s| (s.key(), s.value.clone())).collect();
        assert_eq!(
            v,
            [
                ("a.x".into(), Some("one  two".into())),
                ("a.y".into(), Some("  q ; #  z".into())),
                ("a.w".into(), Some("a b".into())),
                ("b.sub.v".into(), None),
                ("c.S\"x.k".into(), Some("1".into())),
            ]
        );
        for bad in [
            "x = 1\n",
            "[a]\n x = \"open\n",
            "[a \"s]\n",
            "[a]\n 1x = 2\n",
            "[a]\n x = \\q\n",
        ] {
            assert!(parse_config(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn keys_and_programs_are_found() {
        let text = "[core]\n\tfsmonitor = x\n[diff \"a\"]\ntextconv=cat\n[Alias] st = status\n[user]\n\tname = x\n";
        let k = keys(text);
        assert_eq!(
            k,
            ["core.fsmonitor", "diff.a.textconv", "alias.st", "user.name"]
        );
        let programs: Vec<&String> = k.iter().filter(|k| runs_programs(k)).collect();
        assert_eq!(programs, ["core.fsmonitor", "diff.a.textconv", "alias.st"]);
        assert!(!kept("core.hooksPath", Level::GlobalWrite));
        assert!(
            kept("remote.a.b.url", Level::Repository),
            "subsections may hold dots"
        );
    }

    #[test]
    fn gitlinks_are_found_in_every_index_version() {
        let git = |dir: &Path, args: &[&str]| {
            let out = std::process::Command::new("git")
                .args([
                    "-c",
                    "user.name=t",
                    "-c",
                    "user.email=t@t",
                    "-c",
                    "protocol.file.allow=always",
                ])
                .args(args)
                .current_dir(dir)
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .env("GIT_CONFIG_GLOBAL", "/dev/null")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let dir = tempfile::tempdir().unwrap();
        let up = dir.path().join("up");
        let main = dir.path().join("main");
        for d in [&up, &main] {
            std::fs::create_dir(d).unwrap();
            git(d, &["init", "-q"]);
            std::fs::write(d.join("f"), "x").unwrap();
            git(d, &["add", "f"]);
            git(d, &["commit", "-qm", "x"]);
        }
        for version in ["2", "3", "4"] {
            git(&main, &["update-index", "--index-version", version]);
            assert_eq!(
                index_has_gitlinks(&main.join(".git/index")).ok(),
                Some(false),
                "v{version}"
            );
        }
        git(
            &main,
            &["submodule", "add", "-q", &up.to_string_lossy(), "sub"],
        );
        for version in ["2", "3", "4"] {
            git(&main, &["update-index", "--index-version", version]);
            assert_eq!(
                index_has_gitlinks(&main.join(".git/index")).ok(),
                Some(true),
                "v{version}"
            );
        }
        let repo = discover(&main).unwrap();
        assert!(repo.has_submodules());
        assert_eq!(
            repo.submodule_configs(),
            vec![
                std::fs::canonicalize(&main)
                    .unwrap()
                    .join(".git/modules/sub/config")
            ]
        );
        assert!(!discover(&up).unwrap().has_submodules());
    }

    #[test]
    fn discovery_follows_gitdir_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir_all(root.join("main/.git/worktrees/wt")).unwrap();
        std::fs::write(root.join("main/.git/HEAD"), "ref: refs/heads/main\n").unwrap();
        std::fs::write(root.join("main/.git/worktrees/wt/HEAD"), "x\n").unwrap();
        std::fs::write(root.join("main/.git/worktrees/wt/commondir"), "../..\n").unwrap();
        std::fs::create_dir_all(root.join("wt/sub")).unwrap();
        std::fs::write(
            root.join("wt/.git"),
            format!(
                "gitdir: {}\n",
                root.join("main/.git/worktrees/wt").display()
            ),
        )
        .unwrap();
        let repo = discover(&root.join("wt/sub")).unwrap();
        assert_eq!(repo.work_tree, root.join("wt"));
        assert_eq!(repo.common_dir, root.join("main/.git"));
        assert!(discover(&root).is_none());
    }

    #[test]
    fn a_path_git_would_read_otherwise_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        for name in ["common\n", "common"] {
            std::fs::create_dir_all(root.join(name)).unwrap();
            std::fs::write(root.join(name).join("HEAD"), "ref: refs/heads/main\n").unwrap();
        }
        std::fs::create_dir_all(root.join("wt/.git")).unwrap();
        std::fs::write(root.join("wt/.git/HEAD"), "x\n").unwrap();
        std::fs::write(root.join("wt/.git/commondir"), "../../common\n/.\n").unwrap();
        let err = find(&root.join("wt")).unwrap_err().to_string();
        assert!(err.contains("control character"), "{err}");
    }

    #[test]
    fn others_who_can_change_a_repository_are_named() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        mode(&root, 0o755);
        std::fs::create_dir_all(root.join("p/.git")).unwrap();
        std::fs::write(root.join("p/.git/HEAD"), "ref: refs/heads/main\n").unwrap();
        std::fs::write(root.join("p/.git/config"), "").unwrap();
        let repo = find(&root.join("p")).unwrap().unwrap();
        let uid = nix::unistd::geteuid().as_raw();
        assert_eq!(repo.changeable_by_others(uid), None);
        // Another owner, anyone or a shared group may write: named.
        let other = nix::unistd::Uid::from_raw(4242);
        nix::unistd::chown(&root.join("p/.git"), Some(other), None).unwrap();
        assert!(
            repo.changeable_by_others(uid)
                .is_some_and(|w| w.contains("4242"))
        );
        nix::unistd::chown(&root.join("p/.git"), Some(nix::unistd::geteuid()), None).unwrap();
        let users = nix::unistd::Gid::from_raw(100);
        nix::unistd::chown(&root.join("p"), None, Some(users)).unwrap();
        for (path, m) in [
            (root.join("p/.git"), 0o777),
            (root.join("p/.git/config"), 0o666),
            (root.join("p"), 0o775),
            (root.clone(), 0o777),
        ] {
            mode(&path, m);
            let why = repo.changeable_by_others(uid);
            assert!(
                why.as_deref()
                    .is_some_and(|w| w.contains(&*path.to_string_lossy())),
                "{} {m:o}: {why:?}",
                path.display()
            );
            mode(&path, if path.is_dir() { 0o755 } else { 0o644 });
        }
        // A sticky directory above lets nobody replace what is not theirs.
        mode(&root, 0o1777);
        assert_eq!(repo.changeable_by_others(uid), None);
    }
}
