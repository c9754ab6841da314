//! git by allow-list: the global options and subcommands devos knows, with the
//! options that keep each in its class. Read-only subcommands always run with the
//! repository's programs switched off (see `crate::gitrepo`); subcommands that change
//! the repository or talk to a remote ask when the repository has hooks, drivers or
//! configured programs, and then run with them.

use std::path::Path;

use super::programs::{Opts, Parsed, grant_ssh_keys, parse};
use super::{Access, Classifier, RiskClass};
use crate::gitrepo;

/// How a subcommand is classified once its options are known to be listed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Network,
}

struct Sub {
    names: &'static [&'static str],
    kind: Kind,
    opts: Opts,
    /// Refines the class from the parsed options (destructive flags, read-only
    /// forms of a writing subcommand, ...).
    refine: fn(&mut Classifier, &str, &Parsed),
}

const LOG_LONG: &[&str] = &[
    "oneline",
    "decorate?",
    "no-decorate",
    "graph",
    "all",
    "branches?",
    "tags?",
    "remotes?",
    "stat?",
    "shortstat",
    "numstat",
    "name-only",
    "name-status",
    "patch",
    "no-patch",
    "format=",
    "pretty?",
    "abbrev-commit",
    "no-abbrev-commit",
    "abbrev?",
    "since=",
    "until=",
    "after=",
    "before=",
    "author=",
    "committer=",
    "grep=",
    "all-match",
    "invert-grep",
    "regexp-ignore-case",
    "follow",
    "reverse",
    "date=",
    "relative-date",
    "first-parent",
    "no-merges",
    "merges",
    "max-count=",
    "skip=",
    "color?",
    "no-color",
    "ignore-all-space",
    "ignore-space-change",
    "word-diff?",
    "diff-filter=",
    "summary",
    "full-history",
    "simplify-by-decoration",
    "left-right",
    "cherry-pick",
    "cherry-mark",
    "topo-order",
    "date-order",
    "author-date-order",
    "unified=",
    "find-renames?",
    "find-copies?",
    "no-renames",
    "raw",
    "full-diff",
    "source",
    "parents",
    "children",
    "boundary",
    "count",
    "no-notes",
    "encoding=",
    "minimal",
    "patience",
    "histogram",
    "diff-algorithm=",
    "no-ext-diff",
    "no-textconv",
    "mailmap",
    "no-mailmap",
    "use-mailmap",
    "quiet",
    "compact-summary",
    "dirstat?",
    "text",
    "cached",
    "staged",
    "merge-base",
    "exit-code",
    "check",
    "relative?",
    "no-relative",
    "src-prefix=",
    "dst-prefix=",
    "no-prefix",
    "function-context",
    "ignore-blank-lines",
    "ignore-cr-at-eol",
    "color-words?",
    "word-diff-regex=",
    "inter-hunk-context=",
    "ita-invisible-in-index",
];

const LOG_OPTS: Opts = Opts {
    short: "puswzRWM0123456789",
    short_arg: "nSGU",
    long: LOG_LONG,
};

fn read_only(_c: &mut Classifier, _sub: &str, _p: &Parsed) {}

fn writes(c: &mut Classifier, sub: &str, _p: &Parsed) {
    c.risk.raise(
        RiskClass::WritesWorkdir,
        format!("`git {sub}` changes the repository"),
    );
}

fn branch(c: &mut Classifier, _sub: &str, p: &Parsed) {
    if p.has(&["-D", "-f", "--force"]) {
        c.risk.raise(
            RiskClass::Destructive,
            "`git branch -D`/`--force` can drop unmerged work",
        );
    } else if !p.operands.is_empty()
        || p.has(&["-d", "--delete", "-m", "-M", "-c", "-C", "--move", "--copy"])
    {
        if p.has(&[
            "--list",
            "-l",
            "--contains",
            "--merged",
            "--no-merged",
            "--points-at",
        ]) {
            return;
        }
        c.risk
            .raise(RiskClass::WritesWorkdir, "`git branch` changes branches");
    }
}

fn tag(c: &mut Classifier, _sub: &str, p: &Parsed) {
    if p.has(&["-d", "--delete", "-f", "--force"]) {
        c.risk.raise(
            RiskClass::Destructive,
            "`git tag -d`/`--force` drops or moves a tag",
        );
    } else if !p.operands.is_empty() && !p.has(&["-l", "--list", "--contains", "--points-at"]) {
        c.risk
            .raise(RiskClass::WritesWorkdir, "`git tag` creates a tag");
    }
}

fn stash(c: &mut Classifier, _sub: &str, p: &Parsed) {
    match p.operands.first().map(String::as_str) {
        Some("list" | "show") => {}
        Some("drop" | "clear") => c.risk.raise(
            RiskClass::Destructive,
            "`git stash drop`/`clear` deletes stashed work",
        ),
        Some("push" | "save" | "apply" | "pop" | "branch" | "create" | "store") | None => {
            c.risk.raise(
                RiskClass::WritesWorkdir,
                "`git stash` changes the working tree",
            )
        }
        Some(other) => c.risk.raise(
            RiskClass::Unknown,
            format!("`git stash {other}` is not a stash command devos knows"),
        ),
    }
}

fn reflog(c: &mut Classifier, _sub: &str, p: &Parsed) {
    if let Some("expire" | "delete") = p.operands.first().map(String::as_str) {
        c.risk.raise(
            RiskClass::Destructive,
            "`git reflog expire`/`delete` drops history",
        );
    }
}

fn remote(c: &mut Classifier, _sub: &str, p: &Parsed) {
    match p.operands.first().map(String::as_str) {
        None | Some("get-url") => {}
        Some("show") => c.risk.net("`git remote show` asks the remote"),
        Some(other) => c.risk.raise(
            RiskClass::Unknown,
            format!("`git remote {other}` changes the repository's configuration"),
        ),
    }
}

fn config(c: &mut Classifier, _sub: &str, p: &Parsed) {
    let reading = p.has(&["--get", "--get-all", "--get-regexp", "--list", "-l"])
        || matches!(p.operands.first().map(String::as_str), Some("get" | "list"));
    if !reading {
        c.risk.raise(
            RiskClass::Unknown,
            "`git config` other than reading can set programs to run",
        );
    }
}

fn commit(c: &mut Classifier, sub: &str, p: &Parsed) {
    writes(c, sub, p);
    if p.has(&["--amend"]) {
        c.risk.raise(
            RiskClass::Destructive,
            "`git commit --amend` rewrites the last commit",
        );
    }
}

fn checkout(c: &mut Classifier, sub: &str, p: &Parsed) {
    writes(c, sub, p);
    let paths = p.operands.iter().any(|o| o == "." || o.contains('/'));
    if p.has(&[
        "-f",
        "--force",
        "--discard-changes",
        "-C",
        "--force-create",
        "-B",
    ]) || paths
        || sub == "restore"
    {
        c.risk.raise(
            RiskClass::Destructive,
            format!("`git {sub}` can discard uncommitted changes"),
        );
    }
}

fn reset(c: &mut Classifier, sub: &str, p: &Parsed) {
    writes(c, sub, p);
    if p.has(&["--hard", "--merge", "--keep"]) {
        c.risk.raise(
            RiskClass::Destructive,
            "`git reset --hard` discards uncommitted changes",
        );
    }
}

fn forced(c: &mut Classifier, sub: &str, p: &Parsed) {
    writes(c, sub, p);
    if p.has(&["-f", "--force"]) {
        c.risk.raise(
            RiskClass::Destructive,
            format!("`git {sub} --force` can discard changes"),
        );
    }
}

fn clean(c: &mut Classifier, _sub: &str, p: &Parsed) {
    if !p.has(&["-n", "--dry-run"]) {
        c.risk.raise(
            RiskClass::Destructive,
            "`git clean` deletes untracked files",
        );
    }
}

fn apply(c: &mut Classifier, sub: &str, p: &Parsed) {
    for patch in &p.operands {
        c.path(Path::new(patch), Access::Read);
    }
    if !p.has(&["--check", "--stat", "--numstat", "--summary"]) {
        writes(c, sub, p);
    }
}

fn init(c: &mut Classifier, sub: &str, p: &Parsed) {
    writes(c, sub, p);
    for dir in &p.operands {
        c.path(Path::new(dir), Access::Write);
    }
}

fn fetch(c: &mut Classifier, sub: &str, p: &Parsed) {
    c.risk.net(format!("`git {sub}` talks to a remote"));
    if sub == "pull" {
        writes(c, sub, p);
    }
    if p.has(&["-f", "--force"]) {
        c.risk.raise(
            RiskClass::Destructive,
            format!("`git {sub} --force` can overwrite refs"),
        );
    }
}

fn push(c: &mut Classifier, _sub: &str, p: &Parsed) {
    c.risk.net("`git push` sends to a remote");
    if p.has(&[
        "-f",
        "--force",
        "--force-with-lease",
        "--delete",
        "-d",
        "--mirror",
        "--prune",
    ]) || p
        .operands
        .iter()
        .skip(1)
        .any(|a| a.starts_with('+') || a.starts_with(':'))
    {
        c.risk.raise(
            RiskClass::Destructive,
            "`git push --force`/`--delete` can drop remote history",
        );
    }
}

fn clone(c: &mut Classifier, sub: &str, p: &Parsed) {
    c.risk.net("`git clone` downloads a repository");
    match p.operands.get(1) {
        Some(dir) => c.path(Path::new(dir), Access::Write),
        None => writes(c, sub, p),
    }
    if let Some(url) = p.operands.first()
        && !(url.starts_with("https://")
            || url.starts_with("http://")
            || url.starts_with("ssh://")
            || url.starts_with("git://")
            || url.contains('@') && url.contains(':'))
    {
        c.path(Path::new(url), Access::Read);
    }
}

macro_rules! sub {
    ($names:expr, $kind:expr, $refine:expr, short: $s:expr, arg: $a:expr, long: $l:expr) => {
        Sub {
            names: $names,
            kind: $kind,
            refine: $refine,
            opts: Opts {
                short: $s,
                short_arg: $a,
                long: $l,
            },
        }
    };
}

/// Every git subcommand devos knows, with the options that keep it in its class.
/// Missing on purpose: options that run programs (`--ext-diff`, `--textconv`,
/// `--upload-pack`, `-x/--exec`, `-O`, `--show-signature`, `-S/--gpg-sign`), read
/// paths outside the repository (`--no-index`, `-F FILE`, `--contents`) or write the
/// configuration (`-u/--set-upstream(-to)`, `--track`, `--template`, `-c`).
static SUBS: &[Sub] = &[
    sub!(&["status"], Kind::Read, read_only, short: "sbvz", arg: "",
        long: &["short", "branch", "porcelain?", "long", "verbose", "untracked-files?",
            "ignored?", "ahead-behind", "no-ahead-behind", "renames",
            "no-renames", "find-renames?", "show-stash", "column?", "no-column", "null"]),
    sub!(&["log", "show", "diff", "whatchanged"], Kind::Read, read_only, short: LOG_OPTS.short,
        arg: LOG_OPTS.short_arg, long: LOG_OPTS.long),
    sub!(&["shortlog"], Kind::Read, read_only, short: "sne", arg: "",
        long: &["summary", "numbered", "email", "committer", "group=", "format=", "all"]),
    sub!(&["blame"], Kind::Read, read_only, short: "lstfnpwce", arg: "L",
        long: &["show-email", "show-name", "show-number", "porcelain", "line-porcelain",
            "incremental", "root", "first-parent", "date=", "abbrev?", "no-textconv",
            "ignore-rev=", "color-lines", "color-by-age", "minimal"]),
    sub!(&["rev-parse"], Kind::Read, read_only, short: "q", arg: "",
        long: &["show-toplevel", "abbrev-ref?", "git-dir", "git-common-dir",
            "is-inside-work-tree", "is-inside-git-dir", "is-bare-repository", "short?",
            "verify", "quiet", "symbolic-full-name", "show-prefix", "show-cdup",
            "absolute-git-dir", "all", "branches?", "tags?", "remotes?", "default=",
            "path-format=", "show-object-format?"]),
    sub!(&["ls-files"], Kind::Read, read_only, short: "cdmoiksuvtzf", arg: "x",
        long: &["cached", "deleted", "modified", "others", "ignored", "stage", "unmerged",
            "killed", "directory", "no-empty-directory", "exclude=", "exclude-standard",
            "full-name", "abbrev?", "eol", "deduplicate",
            "error-unmatch", "format=", "sparse"]),
    sub!(&["ls-tree"], Kind::Read, read_only, short: "rdtlz", arg: "",
        long: &["name-only", "name-status", "object-only", "full-name", "full-tree",
            "abbrev?", "long", "format="]),
    sub!(&["cat-file"], Kind::Read, read_only, short: "tsep", arg: "",
        long: &["batch?", "batch-check?", "batch-all-objects", "follow-symlinks", "buffer",
            "unordered", "allow-unknown-type", "use-mailmap", "mailmap"]),
    sub!(&["rev-list"], Kind::Read, read_only, short: "", arg: "n",
        long: &["all", "count", "max-count=", "since=", "until=", "reverse", "objects",
            "no-merges", "first-parent", "topo-order", "left-right", "abbrev-commit",
            "oneline", "pretty?", "format=", "header", "parents", "branches?", "tags?"]),
    sub!(&["describe"], Kind::Read, read_only, short: "", arg: "",
        long: &["tags", "all", "always", "long", "abbrev=", "dirty?", "broken?", "contains",
            "exact-match", "first-parent", "match=", "exclude=", "candidates="]),
    sub!(&["grep"], Kind::Read, read_only, short: "nilwcvhHEFPIz", arg: "ABCem",
        long: &["cached", "untracked", "text", "ignore-case",
            "word-regexp", "invert-match", "full-name", "extended-regexp", "basic-regexp",
            "fixed-strings", "perl-regexp", "line-number", "column", "files-with-matches",
            "name-only", "files-without-match", "count", "color?", "no-color", "break",
            "heading", "show-function", "function-context", "all-match", "quiet", "threads=",
            "max-depth=", "after-context=", "before-context=", "context=", "max-count=",
            "null"]),
    sub!(&["reflog"], Kind::Read, reflog, short: "n", arg: "",
        long: &["oneline", "date=", "all", "expire=", "expire-unreachable=", "stale-fix",
            "rewrite", "updateref", "verbose", "dry-run"]),
    sub!(&["config"], Kind::Read, config, short: "lz", arg: "",
        long: &["get", "get-all", "get-regexp", "list", "show-origin", "show-scope",
            "name-only", "null", "type=", "bool", "int", "default=", "local", "global",
            "system", "worktree"]),
    sub!(&["branch"], Kind::Read, branch, short: "arvdDmMcCfl", arg: "",
        long: &["all", "remotes", "verbose", "list", "merged?", "no-merged?", "contains?",
            "no-contains?", "points-at=", "sort=", "format=", "show-current", "color?",
            "no-color", "delete", "move", "copy", "force", "column?", "ignore-case"]),
    sub!(&["tag"], Kind::Read, tag, short: "lnadfm", arg: "",
        long: &["list", "annotate", "delete", "force", "message=", "contains?",
            "no-contains?", "points-at=", "sort=", "format=", "merged?", "no-merged?",
            "color?", "column?", "ignore-case"]),
    sub!(&["remote"], Kind::Read, remote, short: "v", arg: "", long: &["verbose"]),
    sub!(&["stash"], Kind::Read, stash, short: "upqak", arg: "m",
        long: &["include-untracked", "keep-index", "no-keep-index", "quiet", "all",
            "message=", "staged", "index"]),
    sub!(&["add"], Kind::Write, writes, short: "AuvnNf", arg: "",
        long: &["all", "update", "verbose", "dry-run", "intent-to-add", "force",
            "ignore-errors", "ignore-removal", "no-ignore-removal", "chmod=", "renormalize",
            "no-all", "sparse"]),
    sub!(&["commit"], Kind::Write, commit, short: "amqvsne", arg: "mC",
        long: &["message=", "all", "amend", "no-edit", "quiet", "verbose", "signoff",
            "no-verify", "allow-empty", "allow-empty-message", "author=", "date=", "fixup=",
            "squash=", "reuse-message=", "only", "include", "cleanup=", "untracked-files?",
            "dry-run", "short", "branch", "porcelain", "no-status", "status", "reset-author",
            "trailer="]),
    sub!(&["switch"], Kind::Write, checkout, short: "dfmq", arg: "cC",
        long: &["create=", "force-create=", "detach", "discard-changes", "force", "merge",
            "guess", "no-guess", "quiet", "orphan=", "ignore-other-worktrees", "progress",
            "no-progress", "no-track"]),
    sub!(&["checkout", "restore"], Kind::Write, checkout, short: "fqmSW", arg: "bBs",
        long: &["force", "quiet", "merge", "detach", "ours", "theirs", "staged", "worktree",
            "source=", "no-track", "progress", "no-progress", "ignore-other-worktrees",
            "orphan=", "patch"]),
    sub!(&["merge"], Kind::Write, writes, short: "qvn", arg: "msX",
        long: &["no-ff", "ff-only", "ff", "squash", "no-squash", "abort", "continue", "quit",
            "message=", "no-edit", "no-verify", "quiet", "verbose", "stat", "no-stat",
            "allow-unrelated-histories", "strategy=", "strategy-option=", "no-commit",
            "commit", "log?", "no-log", "autostash", "no-autostash"]),
    sub!(&["rebase"], Kind::Write, writes, short: "qv", arg: "",
        long: &["abort", "continue", "skip", "quit", "onto=", "quiet", "verbose", "autostash",
            "no-autostash", "keep-base", "root", "stat", "no-stat", "update-refs",
            "no-update-refs", "rebase-merges?", "no-rebase-merges"]),
    sub!(&["cherry-pick", "revert"], Kind::Write, writes, short: "nxe", arg: "m",
        long: &["abort", "continue", "skip", "quit", "no-commit", "edit", "no-edit", "ff",
            "mainline=", "allow-empty", "signoff"]),
    sub!(&["init"], Kind::Write, init, short: "q", arg: "b",
        long: &["quiet", "bare", "initial-branch=", "object-format=", "shared?"]),
    sub!(&["mv", "rm"], Kind::Write, forced, short: "fnvkqr", arg: "",
        long: &["force", "dry-run", "verbose", "cached", "quiet", "ignore-unmatch",
            "sparse"]),
    sub!(&["reset"], Kind::Write, reset, short: "qNp", arg: "",
        long: &["soft", "mixed", "hard", "merge", "keep", "quiet", "no-refresh", "refresh",
            "intent-to-add", "no-recurse-submodules"]),
    sub!(&["clean"], Kind::Read, clean, short: "dfnqxX", arg: "e",
        long: &["dry-run", "quiet", "force", "exclude="]),
    sub!(&["apply"], Kind::Read, apply, short: "Rv3", arg: "pC",
        long: &["check", "stat", "numstat", "summary", "index", "cached", "3way", "reverse",
            "reject", "whitespace=", "exclude=", "include=", "recount", "verbose", "quiet",
            "allow-empty"]),
    sub!(&["fetch", "pull"], Kind::Network, fetch, short: "pqtvfr", arg: "j",
        long: &["all", "prune", "prune-tags", "tags", "no-tags", "quiet", "verbose", "depth=",
            "deepen=", "shallow-since=", "unshallow", "dry-run", "force", "atomic",
            "multiple", "jobs=", "no-recurse-submodules", "rebase?",
            "no-rebase", "ff-only", "ff", "no-ff", "autostash", "no-autostash", "progress",
            "no-progress", "set-upstream?", "stat", "no-stat", "no-edit", "squash"]),
    sub!(&["push"], Kind::Network, push, short: "fnqvd", arg: "",
        long: &["force", "force-with-lease?", "delete", "mirror", "prune", "tags",
            "follow-tags", "dry-run", "quiet", "verbose", "atomic", "no-verify", "all",
            "porcelain", "progress", "no-progress"]),
    sub!(&["clone"], Kind::Network, clone, short: "q", arg: "bo",
        long: &["depth=", "branch=", "single-branch", "no-single-branch", "no-tags",
            "quiet", "filter=", "origin=", "shallow-since=", "bare", "no-checkout",
            "progress"]),
    sub!(&["ls-remote"], Kind::Network, fetch, short: "qht", arg: "",
        long: &["heads", "tags", "refs", "quiet", "exit-code", "symref", "sort=",
            "branches"]),
];

/// Global options of `git` itself that change nothing about what runs.
const GLOBAL_OPTIONS: &[&str] = &[
    "--no-pager",
    "-P",
    "--no-replace-objects",
    "--literal-pathspecs",
    "--glob-pathspecs",
    "--noglob-pathspecs",
    "--icase-pathspecs",
    "--no-optional-locks",
];

pub(crate) fn classify(c: &mut Classifier, args: &[String]) {
    let mut i = 0;
    while let Some(a) = args.get(i) {
        if !a.starts_with('-') {
            break;
        }
        if !GLOBAL_OPTIONS.contains(&a.as_str()) {
            c.risk.raise(
                RiskClass::Unknown,
                format!(
                    "`git {a}` is not a global option devos knows (`-c`, `-C`, `--git-dir`, `--exec-path` and the like can run programs or point git elsewhere)"
                ),
            );
            return;
        }
        i += 1;
    }
    let Some(name) = args.get(i) else {
        return;
    };
    let Some(sub) = SUBS.iter().find(|s| s.names.contains(&name.as_str())) else {
        c.risk.raise(
            RiskClass::Unknown,
            format!("`git {name}` is not a subcommand devos knows (aliases can run anything)"),
        );
        return;
    };
    let parsed = parse(&args[i + 1..], &sub.opts);
    for u in &parsed.unknown {
        c.risk.raise(
            RiskClass::Unknown,
            format!("`{u}` is not an option devos knows for git {name}"),
        );
    }
    if let Some(v) = parsed
        .opts
        .iter()
        .filter_map(|(_, v)| v.as_deref())
        .find(|v| v.starts_with('-'))
    {
        c.risk.raise(
            RiskClass::Unknown,
            format!("`{v}` looks like an option given as a value"),
        );
    }
    match sub.kind {
        Kind::Read => {}
        Kind::Write => c.risk.raise(
            RiskClass::WritesWorkdir,
            format!("`git {name}` changes the repository"),
        ),
        Kind::Network => {}
    }
    (sub.refine)(c, name, &parsed);
    if c.risk.network {
        grant_ssh_keys(c, &format!("git {name}"));
        let home = c.scope.home.to_path_buf();
        for creds in [".git-credentials", ".config/git/credentials"] {
            let path = home.join(creds);
            if c.scope.secrets.contains(&path) && path.exists() && !c.risk.secrets.contains(&path) {
                c.risk.secrets.push(path.clone());
                c.risk.reasons.push(format!(
                    "`git {name}` may use your stored credentials: approving gives it {}",
                    path.display()
                ));
            }
        }
    }
    repository_programs(c, name);
}

/// What the repository would run: hooks, configured programs, attribute drivers.
/// Changing commands that would run them ask (and then run them); read-only commands
/// run with them switched off.
fn repository_programs(c: &mut Classifier, name: &str) {
    let repo = match gitrepo::find(c.scope.cwd) {
        Ok(Some(repo)) => repo,
        Ok(None) => return,
        Err(e) => {
            c.risk.raise(
                RiskClass::Unknown,
                format!("the repository's layout is one devos cannot follow ({e})"),
            );
            return;
        }
    };
    if let Some(why) = repo.changeable_by_others(c.scope.uid) {
        c.risk.repo_programs = true;
        c.risk.raise(
            RiskClass::Unknown,
            format!(
                "others can change this repository ({why}): devos cannot switch its programs off, so `git {name}` runs with whatever they configure"
            ),
        );
        return;
    }
    let mut found: Vec<String> = repo.hooks().iter().map(|h| format!("hook {h}")).collect();
    if repo.has_submodules() {
        found.push("its submodules, with their own configuration".into());
    }
    let mut global_keys = Vec::new();
    for f in [".gitconfig", ".config/git/config"] {
        if let Ok(text) = std::fs::read_to_string(c.scope.home.join(f)) {
            global_keys.extend(gitrepo::keys(&text));
        }
    }
    for f in repo.config_files() {
        if let Ok(text) = std::fs::read_to_string(&f) {
            found.extend(
                gitrepo::keys(&text)
                    .into_iter()
                    .filter(|k| gitrepo::runs_programs(k))
                    .map(|k| format!("setting {k}")),
            );
        }
    }
    if global_keys.iter().any(|k| k == "core.hookspath") {
        found.push("your global core.hooksPath hooks".into());
    }
    let defined: Vec<&String> = global_keys.iter().collect();
    // Your own drivers (git-lfs, say) run for the files whose attributes name them,
    // in any directory: look for those attributes everywhere, up to a limit.
    let drivers = if defined
        .iter()
        .any(|k| gitrepo::runs_programs(k) && gitrepo::is_driver(k))
    {
        gitrepo::all_attribute_drivers(&repo, 20_000).unwrap_or_else(|| {
            found.push("attributes in a tree too large to check for your drivers".into());
            Vec::new()
        })
    } else {
        gitrepo::attribute_drivers(&repo)
    };
    for driver in drivers {
        let prefix = format!("{driver}.");
        if defined
            .iter()
            .any(|k| k.starts_with(&prefix) && gitrepo::runs_programs(k))
        {
            found.push(format!("the {driver} driver the attributes name"));
        }
    }
    found.dedup();
    if found.is_empty() {
        return;
    }
    let list = found.join(", ");
    if c.risk.class == RiskClass::ReadOnly && !c.risk.network {
        c.risk.reasons.push(format!(
            "the repository's own programs are switched off for this: {list}"
        ));
    } else {
        c.risk.repo_programs = true;
        c.risk.raise(
            RiskClass::Unknown,
            format!("`git {name}` would run the repository's own programs: {list}"),
        );
    }
}
