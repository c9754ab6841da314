//! The local planner: turns common developer requests into typed actions with rules
//! (no model). Requests it does not recognise get a clear "needs the model" answer.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::action::{Action, split_words};
use crate::context::Question;
use crate::risk::valid_package_name;

/// A plan: what the agent understood and the actions it proposes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub summary: String,
    pub actions: Vec<Action>,
    /// Which planner made it (`local-rules` here; the model route comes later).
    pub planner: String,
    /// A question the context index answers (then there are no actions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub question: Option<Question>,
}

/// What the planner may look at besides the text.
pub struct Context<'a> {
    pub cwd: &'a Path,
    pub home: &'a Path,
    pub now: SystemTime,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error(
        "cannot plan this without the model: no local rule matches {0:?}. Local rules cover: \
         list/find/search files, where is X, what changed today, what is using memory or CPU, disk usage, git status/log/diff/commit/branch, run the tests, \
         organise files by type or date, back up or restore a directory, install a package, \
         and `run <command>`"
    )]
    NeedsModel(String),
    #[error("{0}")]
    Invalid(String),
}

/// The most actions one plan may have (organising a huge directory, say): enough for
/// any request a person reads before approving, small enough for the bus.
pub const MAX_ACTIONS: usize = 1000;

/// Plan a request with the local rules.
pub fn plan(text: &str, ctx: &Context) -> Result<Plan, PlanError> {
    let plan = plan_rules(text, ctx)?;
    if plan.actions.len() > MAX_ACTIONS {
        return Err(PlanError::Invalid(format!(
            "this would take {} actions; at most {MAX_ACTIONS} at once: do it in parts (a smaller directory)",
            plan.actions.len()
        )));
    }
    Ok(plan)
}

fn plan_rules(text: &str, ctx: &Context) -> Result<Plan, PlanError> {
    let text = text.trim();
    if let Some(command) = explicit_command(text) {
        return Ok(local_plan(
            format!("run `{command}`"),
            vec![command_action(&command)?],
        ));
    }
    let lower = text.to_lowercase();
    let req = Words::new(text, &lower, ctx);
    // The themes are tried in this order, and the first pattern that matches wins, so
    // a broad pattern in an earlier theme (`show ... files`) shadows a later one.
    let themes: [Theme; 7] = [
        plan_context,
        plan_browse,
        plan_git,
        plan_project,
        plan_backup,
        plan_package,
        plan_file,
    ];
    for theme in themes {
        if let Some(plan) = theme(&req)? {
            return Ok(plan);
        }
    }
    Err(PlanError::NeedsModel(text.to_owned()))
}

/// One theme of local rules: `None` when none of its patterns matches the request.
type Theme = fn(&Words) -> Result<Option<Plan>, PlanError>;

/// A request split into words, for matching against the local rules.
struct Words<'a> {
    text: &'a str,
    lower: &'a str,
    /// The lowercase words, which the patterns match.
    words: Vec<&'a str>,
    /// The same words as typed, case preserved.
    original: Vec<&'a str>,
    ctx: &'a Context<'a>,
}

impl<'a> Words<'a> {
    fn new(text: &'a str, lower: &'a str, ctx: &'a Context<'a>) -> Self {
        Self {
            text,
            lower,
            words: lower.split_whitespace().collect(),
            original: text.split_whitespace().collect(),
            ctx,
        }
    }

    /// The tail of the original text after the first `n` words, case preserved.
    fn tail(&self, n: usize) -> String {
        self.original
            .get(n..)
            .map(|w| w.join(" "))
            .unwrap_or_default()
    }
}

fn local_plan(summary: String, actions: Vec<Action>) -> Plan {
    Plan {
        summary,
        actions,
        planner: "local-rules".into(),
        question: None,
    }
}

/// Questions the context index answers: where something is, what changed, the state
/// of the repositories, what is running.
fn plan_context(req: &Words) -> Result<Option<Plan>, PlanError> {
    let lower = req.lower.trim_end_matches(['?', '.', '!']);
    let words: Vec<&str> = lower.split_whitespace().collect();
    let ask = |summary: String, question: Question| Plan {
        summary,
        actions: Vec::new(),
        planner: "local-rules".into(),
        question: Some(question),
    };
    let find = |rest: &[&str]| -> Option<Plan> {
        let words = search_words(rest);
        (!words.is_empty()).then(|| {
            ask(
                format!("look up {words:?} in your projects' index"),
                Question::Find { words },
            )
        })
    };
    let mentions = |rest: &[&str]| -> Option<Plan> {
        let words = search_words(rest);
        (!words.is_empty()).then(|| {
            ask(
                format!("look up {words:?} in your projects' indexed text"),
                Question::FindText { words },
            )
        })
    };
    let plan = match words.as_slice() {
        [
            "which" | "what",
            "files" | "file",
            "mention" | "mentions" | "contain" | "contains",
            rest @ ..,
        ] => mentions(rest),
        ["where" | "where's", rest @ ..]
            if matches!(rest.last(), Some(&("mentioned" | "used" | "referenced"))) =>
        {
            let rest = rest.strip_prefix(&["is"]).unwrap_or(rest);
            mentions(&rest[..rest.len() - 1])
        }
        ["where" | "where's", rest @ ..] => {
            let rest = match rest {
                ["is" | "are" | "'s", rest @ ..] => rest,
                rest => rest,
            };
            find(rest)
        }
        ["find" | "locate", "the" | "my", rest @ ..]
            if !rest
                .iter()
                .any(|w| matches!(*w, "named" | "called" | "matching")) =>
        {
            find(rest)
        }
        _ => {
            let has = |w: &[&str]| w.iter().any(|w| words.contains(w));
            let recent = [
                "what changed",
                "what has changed",
                "what have i changed",
                "what did i change",
                "what's changed",
                "recent changes",
                "recently changed",
                "changed files",
            ];
            let when = has(&["today", "recently", "yesterday", "hour", "week", "lately"]);
            // (Plain "what changed" is the git status.)
            if recent.iter().any(|p| lower.starts_with(p))
                && (when || lower.starts_with("recent") || lower.starts_with("changed"))
            {
                let since = if has(&["today"]) {
                    "today"
                } else if has(&["yesterday"]) {
                    "2d"
                } else if has(&["hour"]) {
                    "1h"
                } else if has(&["week"]) {
                    "7d"
                } else {
                    ""
                };
                Some(ask(
                    format!(
                        "list the files changed {} in your projects",
                        if since.is_empty() {
                            "in the last day"
                        } else {
                            since
                        }
                    ),
                    Question::Recent {
                        since: since.to_owned(),
                    },
                ))
            } else if (lower.starts_with("what") || lower.starts_with("which"))
                && has(&["using", "eating", "uses", "hogging", "taking"])
                && has(&["memory", "ram", "cpu", "processor"])
            {
                let by_memory = has(&["memory", "ram"]);
                Some(ask(
                    format!(
                        "list your processes by {}",
                        if by_memory { "memory" } else { "CPU" }
                    ),
                    Question::Processes { by_memory },
                ))
            } else if has(&["uncommitted"])
                || ((lower.contains("state of my") || lower.contains("status of my"))
                    && has(&["repos", "repositories", "projects"]))
            {
                Some(ask(
                    "show the git state of your projects".into(),
                    Question::Git,
                ))
            } else {
                None
            }
        }
    };
    Ok(plan)
}

/// The words of "where is the nginx config" that name what is looked for: no filler,
/// and `config`, `configuration` and `settings` as `conf` (which `config` contains).
fn search_words(rest: &[&str]) -> String {
    rest.iter()
        .filter(|w| {
            !matches!(
                **w,
                "the"
                    | "my"
                    | "a"
                    | "an"
                    | "file"
                    | "files"
                    | "for"
                    | "of"
                    | "is"
                    | "are"
                    | "located"
                    | "kept"
                    | "stored"
                    | "defined"
            )
        })
        .map(|w| match *w {
            "config" | "configuration" | "settings" | "configs" => "conf",
            w => w.trim_matches(|c: char| c == '"' || c == '\'' || c == '`'),
        })
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Listing, finding and searching files, and disk usage.
fn plan_browse(req: &Words) -> Result<Option<Plan>, PlanError> {
    let Words {
        text,
        lower,
        ref words,
        ctx,
        ..
    } = *req;
    let plan = match words.as_slice() {
        ["list" | "show", rest @ ..] if rest.contains(&"files") || rest == ["directory"] => {
            let dir = target_dir(lower, text, ctx, &["in", "under", "of"])?;
            local_plan(
                format!("list the files in {}", dir.display()),
                vec![run(&["ls", "-la", "--"], &[&dir])],
            )
        }
        ["ls", ..] => {
            let dir = if words.len() > 1 {
                resolve(&req.tail(1), ctx)
            } else {
                ctx.cwd.to_path_buf()
            };
            local_plan(
                format!("list {}", dir.display()),
                vec![run(&["ls", "-la", "--"], &[&dir])],
            )
        }
        ["find", ..] => {
            let (pattern, dir) = find_pattern(lower, text, ctx)?;
            local_plan(
                format!("find files named {pattern} under {}", dir.display()),
                vec![Action::Run {
                    argv: strings(&["find"])
                        .into_iter()
                        .chain([dir.to_string_lossy().into_owned()])
                        .chain(strings(&["-name", &pattern, "-not", "-path", "*/.git/*"]))
                        .collect(),
                }],
            )
        }
        ["search" | "grep", ..] => {
            let start = if words.get(1) == Some(&"for") { 2 } else { 1 };
            let rest = req.tail(start);
            let (needle, dir) = split_in(&rest, ctx);
            let needle = unquote(&needle);
            if needle.is_empty() {
                return Err(PlanError::Invalid(
                    "search for what? e.g. `search for TODO in src`".into(),
                ));
            }
            local_plan(
                format!("search for {needle:?} in {}", dir.display()),
                vec![Action::Run {
                    argv: strings(&["grep", "-rn", "--exclude-dir=.git", "-e", &needle, "--"])
                        .into_iter()
                        .chain([dir.to_string_lossy().into_owned()])
                        .collect(),
                }],
            )
        }
        _ if lower.contains("disk usage")
            || lower.contains("disk space")
            || lower.contains("how much space") =>
        {
            let dir = target_dir(lower, text, ctx, &["of", "in", "for"])?;
            local_plan(
                format!("show disk usage of {}", dir.display()),
                vec![
                    run(&["du", "-h", "--max-depth=1", "--"], &[&dir]),
                    run(&["df", "-h", "--"], &[&dir]),
                ],
            )
        }
        _ => return Ok(None),
    };
    Ok(Some(plan))
}

/// Git: status, log, diff, commit and branches.
fn plan_git(req: &Words) -> Result<Option<Plan>, PlanError> {
    let Words {
        text,
        ref words,
        ref original,
        ..
    } = *req;
    let plan = match words.as_slice() {
        ["git", "status"] | ["status"] | ["what", "changed" | "changed?"] => {
            local_plan("show the git status".into(), vec![git(&["status"])])
        }
        ["git", "log", ..]
        | ["show", "git", "log"]
        | ["show", "the", "git", "log"]
        | ["show", "recent", "commits"]
        | ["history"] => local_plan(
            "show recent commits".into(),
            vec![git(&["log", "--oneline", "--decorate", "-n", "20"])],
        ),
        ["git", "diff"] | ["show", "the", "diff"] | ["show", "diff"] => {
            local_plan("show uncommitted changes".into(), vec![git(&["diff"])])
        }
        ["commit", ..] | ["git", "commit", ..] => {
            let message = commit_message(text).ok_or_else(|| {
                PlanError::Invalid(
                    "commit with what message? e.g. `commit with message \"fix typo\"`".into(),
                )
            })?;
            local_plan(
                format!("commit all changes with message {message:?}"),
                vec![git(&["add", "--all"]), git(&["commit", "-m", &message])],
            )
        }
        ["list", "branches"] | ["git", "branch"] | ["show", "branches"] => local_plan(
            "list branches".into(),
            vec![git(&["branch", "--all", "--verbose"])],
        ),
        ["create", "branch", name]
        | ["create", "a", "branch", name]
        | ["create", "a", "new", "branch", name]
        | ["new", "branch", name] => {
            let name = branch_name(original[words.len() - 1], name)?;
            local_plan(
                format!("create and switch to branch {name}"),
                vec![git(&["switch", "-c", &name])],
            )
        }
        ["switch", "to", "branch", name]
        | ["checkout", "branch", name]
        | ["switch", "to", name] => {
            let name = branch_name(original[words.len() - 1], name)?;
            local_plan(
                format!("switch to branch {name}"),
                vec![git(&["switch", &name])],
            )
        }
        _ => return Ok(None),
    };
    Ok(Some(plan))
}

/// Working on the project: run its tests, organise a directory.
fn plan_project(req: &Words) -> Result<Option<Plan>, PlanError> {
    let Words {
        text,
        lower,
        ref words,
        ctx,
        ..
    } = *req;
    let plan = match words.as_slice() {
        ["run", "the", "tests"] | ["run", "tests"] | ["test"] | ["run", "the", "test", "suite"] => {
            let argv = test_command(ctx.cwd, ctx.home).ok_or_else(|| {
                PlanError::Invalid(format!(
                    "found no test setup in {} (looked for Cargo.toml, package.json, pyproject.toml/pytest.ini/setup.py, go.mod, a Makefile with a test target)",
                    ctx.cwd.display()
                ))
            })?;
            local_plan(
                format!("run the project's tests: {}", argv.join(" ")),
                vec![Action::Run { argv }],
            )
        }
        _ if words.first().is_some_and(|w| w.starts_with("organi")) => {
            let by_date = lower.contains("date") || lower.contains("month");
            let by_type =
                lower.contains("type") || lower.contains("extension") || lower.contains("kind");
            if !by_date && !by_type {
                return Err(PlanError::Invalid(
                    "organise by what? say `by type` or `by date`".into(),
                ));
            }
            let dir = target_dir(lower, text, ctx, &["in", "under"])?;
            organise(&dir, by_date)?
        }
        _ => return Ok(None),
    };
    Ok(Some(plan))
}

/// Backing up a directory and restoring it from its latest backup.
fn plan_backup(req: &Words) -> Result<Option<Plan>, PlanError> {
    let Words { ref words, ctx, .. } = *req;
    let plan = match words.as_slice() {
        ["back", "up", ..] | ["backup", ..] => {
            let skip = if words[0] == "back" { 2 } else { 1 };
            let dir = if words.len() > skip {
                resolve(&req.tail(skip), ctx)
            } else {
                ctx.cwd.to_path_buf()
            };
            let dest = PathBuf::from(format!("{}.backup-{}", dir.display(), stamp(ctx.now)));
            local_plan(
                format!("back up {} to {}", dir.display(), dest.display()),
                vec![Action::Copy {
                    from: dir,
                    to: dest,
                }],
            )
        }
        ["restore", ..] => {
            let rest = req.tail(1);
            let rest = rest
                .trim_end_matches(" from backup")
                .trim_end_matches(" from the backup");
            let dir = if rest.is_empty() {
                ctx.cwd.to_path_buf()
            } else {
                resolve(rest, ctx)
            };
            let backup = latest_backup(&dir).ok_or_else(|| {
                PlanError::Invalid(format!(
                    "no backup of {} found (looked for {}.backup-*)",
                    dir.display(),
                    dir.display()
                ))
            })?;
            let aside = PathBuf::from(format!("{}.replaced-{}", dir.display(), stamp(ctx.now)));
            local_plan(
                format!("restore {} from {}", dir.display(), backup.display()),
                vec![
                    Action::Move {
                        from: dir.clone(),
                        to: aside,
                    },
                    Action::Copy {
                        from: backup,
                        to: dir,
                    },
                ],
            )
        }
        _ => return Ok(None),
    };
    Ok(Some(plan))
}

/// Installing packages.
fn plan_package(req: &Words) -> Result<Option<Plan>, PlanError> {
    let ["install", ..] = req.words.as_slice() else {
        return Ok(None);
    };
    let packages: Vec<String> = req.original[1..]
        .iter()
        .map(|w| w.trim_matches(',').to_lowercase())
        .filter(|w| !matches!(w.as_str(), "package" | "packages" | "the" | "and" | ""))
        .collect();
    if packages.is_empty() {
        return Err(PlanError::Invalid(
            "install what? e.g. `install ripgrep`".into(),
        ));
    }
    if let Some(bad) = packages.iter().find(|p| !valid_package_name(p)) {
        return Err(PlanError::Invalid(format!(
            "`{bad}` is not a valid package name (lowercase letters, digits and +-. only)"
        )));
    }
    Ok(Some(local_plan(
        format!("install {}", packages.join(", ")),
        vec![Action::PackageInstall { packages }],
    )))
}

/// Single files and directories: delete, read, create.
fn plan_file(req: &Words) -> Result<Option<Plan>, PlanError> {
    let Words { ref words, ctx, .. } = *req;
    let plan = match words.as_slice() {
        ["delete" | "remove", ..] => {
            let path = resolve(&req.tail(1), ctx);
            local_plan(
                format!("delete {}", path.display()),
                vec![Action::Delete { path }],
            )
        }
        ["read" | "cat", ..] | ["show", "file", ..] => {
            let skip = if words[0] == "show" { 2 } else { 1 };
            let path = resolve(&req.tail(skip), ctx);
            local_plan(
                format!("show {}", path.display()),
                vec![Action::Read { path }],
            )
        }
        ["create", "directory" | "folder", ..] | ["mkdir", ..] => {
            let skip = if words[0] == "mkdir" { 1 } else { 2 };
            let path = resolve(&req.tail(skip), ctx);
            local_plan(
                format!("create directory {}", path.display()),
                vec![Action::Mkdir { path }],
            )
        }
        _ => return Ok(None),
    };
    Ok(Some(plan))
}

/// `run <command>`, `$ <command>` or a command in backticks: the user typed the
/// command line themselves.
fn explicit_command(text: &str) -> Option<String> {
    let rest = text
        .strip_prefix("$ ")
        .or_else(|| text.strip_prefix("run: "))
        .or_else(|| text.strip_prefix("run command "))
        .or_else(|| text.strip_prefix("run `").and_then(|r| r.strip_suffix('`')))?;
    let rest = rest.trim();
    (!rest.is_empty()).then(|| rest.to_owned())
}

/// A typed command line becomes argv when it is plain words, and an explicit shell
/// action (which always asks) when it uses shell syntax.
fn command_action(command: &str) -> Result<Action, PlanError> {
    match split_words(command) {
        Some(argv) if argv.is_empty() => Err(PlanError::Invalid("empty command".into())),
        Some(mut argv) if argv[0] == "git" => {
            argv.remove(0);
            Ok(Action::Git { args: argv })
        }
        Some(argv) => Ok(Action::Run { argv }),
        None => Ok(Action::Shell {
            script: command.to_owned(),
        }),
    }
}

fn strings(words: &[&str]) -> Vec<String> {
    words.iter().map(|s| (*s).to_owned()).collect()
}

fn run(words: &[&str], paths: &[&Path]) -> Action {
    Action::Run {
        argv: strings(words)
            .into_iter()
            .chain(paths.iter().map(|p| p.to_string_lossy().into_owned()))
            .collect(),
    }
}

fn git(args: &[&str]) -> Action {
    Action::Git {
        args: strings(args),
    }
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    for q in ['"', '\'', '`'] {
        if let Some(inner) = s.strip_prefix(q).and_then(|r| r.strip_suffix(q)) {
            return inner.to_owned();
        }
    }
    s.to_owned()
}

/// A path the user named, relative to the working directory; `~` is their home.
fn resolve(word: &str, ctx: &Context) -> PathBuf {
    let word = unquote(word);
    let path = if word == "~" {
        ctx.home.to_path_buf()
    } else if let Some(rest) = word.strip_prefix("~/") {
        ctx.home.join(rest)
    } else if matches!(
        word.as_str(),
        "" | "." | "here" | "this directory" | "the current directory"
    ) {
        ctx.cwd.to_path_buf()
    } else {
        ctx.cwd.join(word)
    };
    crate::risk::normalize(&path)
}

/// The directory after one of `preps` ("in src"), or the working directory.
fn target_dir(
    lower: &str,
    text: &str,
    ctx: &Context,
    preps: &[&str],
) -> Result<PathBuf, PlanError> {
    for prep in preps {
        let needle = format!(" {prep} ");
        if let Some(pos) = lower.rfind(&needle) {
            let rest = &text[pos + needle.len()..];
            let rest = rest.split(" by ").next().unwrap_or(rest);
            return Ok(resolve(rest, ctx));
        }
    }
    Ok(ctx.cwd.to_path_buf())
}

/// Split "X in DIR" into X and DIR (the working directory if no " in ").
fn split_in(rest: &str, ctx: &Context) -> (String, PathBuf) {
    match rest.rfind(" in ") {
        Some(pos) if !rest[..pos].trim().is_empty() => {
            (rest[..pos].to_owned(), resolve(&rest[pos + 4..], ctx))
        }
        _ => (rest.to_owned(), ctx.cwd.to_path_buf()),
    }
}

const LANGUAGES: &[(&str, &str)] = &[
    ("rust", "*.rs"),
    ("python", "*.py"),
    ("javascript", "*.js"),
    ("typescript", "*.ts"),
    ("go", "*.go"),
    ("c", "*.c"),
    ("markdown", "*.md"),
    ("toml", "*.toml"),
    ("yaml", "*.yaml"),
    ("json", "*.json"),
    ("shell", "*.sh"),
    ("log", "*.log"),
];

fn find_pattern(lower: &str, text: &str, ctx: &Context) -> Result<(String, PathBuf), PlanError> {
    let original: Vec<&str> = text.split_whitespace().collect();
    let body = original[1..].join(" ");
    let (what, dir) = split_in(&body, ctx);
    let what_lower = what.to_lowercase();
    let words: Vec<&str> = what.split_whitespace().collect();
    let pattern = if let Some(pos) = words
        .iter()
        .position(|w| matches!(w.to_lowercase().as_str(), "named" | "called" | "matching"))
    {
        unquote(&words[pos + 1..].join(" "))
    } else if let Some((_, glob)) = LANGUAGES
        .iter()
        .find(|(l, _)| what_lower.split_whitespace().next() == Some(l))
    {
        (*glob).to_owned()
    } else {
        let w: Vec<&str> = words
            .iter()
            .copied()
            .filter(|w| !matches!(w.to_lowercase().as_str(), "all" | "the" | "files" | "file"))
            .collect();
        unquote(&w.join(" "))
    };
    if pattern.is_empty() {
        return Err(PlanError::Invalid(format!(
            "find what? e.g. `find files named '*.toml' in src` (got {lower:?})"
        )));
    }
    Ok((pattern, dir))
}

fn commit_message(text: &str) -> Option<String> {
    let lower = text.to_lowercase();
    for marker in [
        "with message ",
        "with the message ",
        "-m ",
        "message: ",
        "saying ",
    ] {
        if let Some(pos) = lower.find(marker) {
            let m = unquote(&text[pos + marker.len()..]);
            return (!m.is_empty()).then_some(m);
        }
    }
    None
}

fn branch_name(original: &str, _lower: &str) -> Result<String, PlanError> {
    let name = unquote(original);
    let ok = !name.is_empty()
        && !name.starts_with('-')
        && !name.contains("..")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
    if ok {
        Ok(name)
    } else {
        Err(PlanError::Invalid(format!(
            "`{name}` is not a branch name this planner accepts (letters, digits, -_./; not starting with -)"
        )))
    }
}

/// The project's test command, from the files in its root.
pub fn test_command(cwd: &Path, home: &Path) -> Option<Vec<String>> {
    let has = |f: &str| cwd.join(f).is_file();
    let argv: &[&str] = if has("Cargo.toml") {
        &["cargo", "test"]
    } else if has("package.json") {
        &["npm", "test"]
    } else if has("pyproject.toml") || has("pytest.ini") || has("setup.py") || has("tox.ini") {
        &["python3", "-m", "pytest"]
    } else if has("go.mod") {
        &["go", "test", "./..."]
    } else if std::fs::read_to_string(cwd.join("Makefile"))
        .is_ok_and(|m| m.lines().any(|l| l.starts_with("test:")))
    {
        &["make", "test"]
    } else {
        return None;
    };
    let mut argv = strings(argv);
    argv[0] = locate(&argv[0], home);
    Some(argv)
}

/// A tool by name when the system directories have it, else by its path in the
/// user's own tool directories (rustup's, pip's), which makes the action unknown:
/// it asks.
fn locate(name: &str, home: &Path) -> String {
    let system = crate::risk::programs::SYSTEM_PATH
        .iter()
        .any(|d| Path::new(d).join(name).is_file());
    if !system {
        for dir in [".cargo/bin", ".local/bin"] {
            let candidate = home.join(dir).join(name);
            if candidate.is_file() {
                return candidate.to_string_lossy().into_owned();
            }
        }
    }
    name.to_owned()
}

fn organise(dir: &Path, by_date: bool) -> Result<Plan, PlanError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| PlanError::Invalid(format!("cannot read {}: {e}", dir.display())))?;
    let mut files: Vec<(String, String)> = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Ok(meta) = entry.path().symlink_metadata() else {
            continue;
        };
        if name.starts_with('.') || !meta.is_file() {
            continue;
        }
        let group = if by_date {
            // (A file system without modification times files everything under 1970-01.)
            let t = civil(meta.modified().unwrap_or(UNIX_EPOCH));
            format!("{:04}-{:02}", t.year(), u8::from(t.month()))
        } else {
            match Path::new(&name).extension() {
                Some(ext) => ext.to_string_lossy().to_lowercase(),
                None => "other".into(),
            }
        };
        files.push((name, group));
    }
    files.sort();
    if files.is_empty() {
        return Err(PlanError::Invalid(format!(
            "{} has no files to organise",
            dir.display()
        )));
    }
    let mut groups: Vec<&str> = files.iter().map(|(_, g)| g.as_str()).collect();
    groups.sort();
    groups.dedup();
    let mut actions: Vec<Action> = groups
        .iter()
        .filter(|g| !dir.join(g).is_dir())
        .map(|g| Action::Mkdir { path: dir.join(g) })
        .collect();
    for (name, group) in &files {
        actions.push(Action::Move {
            from: dir.join(name),
            to: dir.join(group).join(name),
        });
    }
    Ok(Plan {
        summary: format!(
            "organise {} files in {} by {} into {}",
            files.len(),
            dir.display(),
            if by_date { "month" } else { "type" },
            groups.join(", ")
        ),
        actions,
        planner: "local-rules".into(),
        question: None,
    })
}

fn latest_backup(dir: &Path) -> Option<PathBuf> {
    let parent = dir.parent()?;
    let prefix = format!("{}.backup-", dir.file_name()?.to_string_lossy());
    // (A directory the caller cannot list shows them no backup to restore.)
    let mut backups: Vec<PathBuf> = std::fs::read_dir(parent)
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect();
    backups.sort();
    backups.pop()
}

/// `YYYYmmddTHHMMSSZ`, for names that sort by time.
pub fn stamp(t: SystemTime) -> String {
    let t = civil(t);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// A system time as UTC; one before 1970 or past year 9999 (a file's mtime can be
/// anything) shows as the epoch.
fn civil(t: SystemTime) -> time::OffsetDateTime {
    t.duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_secs()).ok())
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

#[cfg(test)]
mod tests;
