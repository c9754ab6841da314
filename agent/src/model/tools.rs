//! The tools the model may call. Each call becomes an ordinary typed [`Action`] that
//! is classified, decided and run in the sandbox exactly like one the local rules
//! planned — or, for the read-only context tools, a question the planning helper
//! answers as the caller. The model never approves anything: a tool call is only a
//! proposal.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::action::Action;

/// One tool as the model sees it.
pub struct ToolDef {
    pub name: &'static str,
    pub description: &'static str,
    /// JSON Schema of the input object.
    pub schema: Value,
}

/// What the planning helper answers as the caller, without running anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ContextQuery {
    /// Project kind, git branch, changed and recent files of the working directory.
    Project,
    /// The caller's processes (root: everyone's), busiest first.
    Processes,
}

/// What a tool call asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    Act(Action),
    Context(ContextQuery),
    /// A question the user's context index answers (the daemon reads it; nothing runs).
    Index(crate::context::Question),
}

fn path_arg(description: &str) -> Value {
    json!({ "type": "string", "description": description })
}

fn object(properties: Value, required: &[&str]) -> Value {
    json!({
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": false,
    })
}

/// Every tool, in the order the model is told about them.
pub fn definitions() -> Vec<ToolDef> {
    let path = || path_arg("A path, absolute or relative to the working directory");
    vec![
        ToolDef {
            name: "run",
            description: "Run a program with arguments (no shell: no pipes, redirections or globs) in the working directory. The user may be asked to approve it.",
            schema: object(
                json!({ "argv": { "type": "array", "items": { "type": "string" }, "minItems": 1,
                    "description": "The program and its arguments, e.g. [\"cargo\", \"test\"]" } }),
                &["argv"],
            ),
        },
        ToolDef {
            name: "read_file",
            description: "Read a text file.",
            schema: object(json!({ "path": path() }), &["path"]),
        },
        ToolDef {
            name: "write_file",
            description: "Create or replace a file with this content. The user may be asked to approve it.",
            schema: object(
                json!({ "path": path(), "content": { "type": "string" } }),
                &["path", "content"],
            ),
        },
        ToolDef {
            name: "list_dir",
            description: "List a directory (names, sizes, dates).",
            schema: object(json!({ "path": path() }), &["path"]),
        },
        ToolDef {
            name: "search",
            description: "Search under a directory: file names matching a glob pattern (in = \"names\"), or lines matching a regular expression (in = \"contents\").",
            schema: object(
                json!({
                    "pattern": { "type": "string" },
                    "path": path(),
                    "in": { "type": "string", "enum": ["names", "contents"] }
                }),
                &["pattern"],
            ),
        },
        ToolDef {
            name: "git",
            description: "Run git with these arguments in the working directory (status, log, diff, show, branch, switch, add, commit, ...).",
            schema: object(
                json!({ "args": { "type": "array", "items": { "type": "string" }, "minItems": 1 } }),
                &["args"],
            ),
        },
        ToolDef {
            name: "mkdir",
            description: "Create a directory and its parents.",
            schema: object(json!({ "path": path() }), &["path"]),
        },
        ToolDef {
            name: "move",
            description: "Move or rename a file or directory; never replaces an existing target.",
            schema: object(json!({ "from": path(), "to": path() }), &["from", "to"]),
        },
        ToolDef {
            name: "copy",
            description: "Copy a file or directory tree; never replaces an existing target.",
            schema: object(json!({ "from": path(), "to": path() }), &["from", "to"]),
        },
        ToolDef {
            name: "delete",
            description: "Delete a file or a whole directory tree. The user is asked.",
            schema: object(json!({ "path": path() }), &["path"]),
        },
        ToolDef {
            name: "project_info",
            description: "Facts about the working directory: project kind, git branch, files changed since the last commit, recently modified files.",
            schema: object(json!({}), &[]),
        },
        ToolDef {
            name: "git_state",
            description: "The git branch, upstream and the status of every changed file.",
            schema: object(json!({}), &[]),
        },
        ToolDef {
            name: "find_files",
            description: "Look up files and directories in the user's indexed projects (a live index: answers at once). By name (the default): every word must appear in the path, case-insensitive. By text: files whose text holds every word (only projects the user indexed with their text).",
            schema: object(
                json!({
                    "query": { "type": "string", "description": "Words of the name or path, e.g. `nginx conf`; or of the text" },
                    "in": { "type": "string", "enum": ["names", "text"], "description": "Search names and paths (default) or the files' text" }
                }),
                &["query"],
            ),
        },
        ToolDef {
            name: "recent_files",
            description: "Files changed recently in the user's indexed projects, newest first (ignored files left out).",
            schema: object(
                json!({ "since": { "type": "string", "description": "`today`, a duration back such as `2h` or `3d`, or an RFC 3339 time; default: the last 24 hours" } }),
                &[],
            ),
        },
        ToolDef {
            name: "processes",
            description: "The user's running processes: pid, command, working directory, CPU%, memory.",
            schema: object(json!({}), &[]),
        },
    ]
}

/// Why a tool call cannot be carried out (sent back to the model as a tool error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ToolError {
    #[error("there is no tool `{0}`; use one of the tools you were given")]
    Unknown(String),
    #[error("the input of `{tool}` must be a JSON object matching its schema: {why}")]
    BadInput { tool: String, why: String },
}

/// The action or question a tool call stands for. Paths are made absolute against
/// `cwd` (`~/` is the caller's `home`).
pub fn parse(name: &str, input: &Value, cwd: &Path, home: &Path) -> Result<Call, ToolError> {
    let allowed: &[&str] = match name {
        "run" => &["argv"],
        "git" => &["args"],
        "read_file" | "list_dir" | "mkdir" | "delete" => &["path"],
        "write_file" => &["path", "content"],
        "move" | "copy" => &["from", "to"],
        "search" => &["pattern", "path", "in"],
        "project_info" | "git_state" | "processes" => &[],
        "find_files" => &["query", "in"],
        "recent_files" => &["since"],
        other => return Err(ToolError::Unknown(other.to_owned())),
    };
    let i = Input::new(name, input, cwd, home)?;
    if let Some(extra) = i.fields.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(i.bad(format!("unexpected field `{extra}`")));
    }
    let act = |a| Ok(Call::Act(a));
    match name {
        "run" => act(Action::Run {
            argv: i.words("argv")?,
        }),
        "git" => act(Action::Git {
            args: i.words("args")?,
        }),
        "read_file" => act(Action::Read {
            path: i.path("path")?,
        }),
        "write_file" => act(Action::Write {
            path: i.path("path")?,
            content: i.string("content")?,
        }),
        "list_dir" => act(Action::Run {
            argv: vec![
                "ls".into(),
                "-la".into(),
                "--".into(),
                i.path("path")?.to_string_lossy().into_owned(),
            ],
        }),
        "mkdir" => act(Action::Mkdir {
            path: i.path("path")?,
        }),
        "delete" => act(Action::Delete {
            path: i.path("path")?,
        }),
        "move" => act(Action::Move {
            from: i.path("from")?,
            to: i.path("to")?,
        }),
        "copy" => act(Action::Copy {
            from: i.path("from")?,
            to: i.path("to")?,
        }),
        "search" => {
            let dir = match i.fields.get("path") {
                Some(_) => i.path("path")?,
                None => cwd.to_path_buf(),
            };
            let within = match i.fields.get("in") {
                Some(_) => i.string("in")?,
                None => "contents".to_owned(),
            };
            act(search(&i.word("pattern")?, dir, &within).map_err(|why| i.bad(why))?)
        }
        "git_state" => act(Action::Git {
            args: vec!["status".into(), "--short".into(), "--branch".into()],
        }),
        "project_info" => Ok(Call::Context(ContextQuery::Project)),
        "find_files" => {
            let words = i.string("query")?;
            match i
                .fields
                .get("in")
                .map(|_| i.string("in"))
                .transpose()?
                .as_deref()
            {
                None | Some("names") => Ok(Call::Index(crate::context::Question::Find { words })),
                Some("text") => Ok(Call::Index(crate::context::Question::FindText { words })),
                Some(other) => Err(i.bad(format!("`in` is `names` or `text`, not {other:?}"))),
            }
        }
        "recent_files" => Ok(Call::Index(crate::context::Question::Recent {
            since: match i.fields.get("since") {
                Some(_) => i.string("since")?,
                None => String::new(),
            },
        })),
        _ => Ok(Call::Context(ContextQuery::Processes)),
    }
}

/// A tool call's input object, read field by field with errors that name the field.
struct Input<'a> {
    tool: &'a str,
    fields: &'a serde_json::Map<String, Value>,
    cwd: &'a Path,
    home: &'a Path,
}

impl<'a> Input<'a> {
    fn new(
        tool: &'a str,
        input: &'a Value,
        cwd: &'a Path,
        home: &'a Path,
    ) -> Result<Self, ToolError> {
        let bad = |why| ToolError::BadInput {
            tool: tool.to_owned(),
            why,
        };
        let fields = input
            .as_object()
            .ok_or_else(|| bad(format!("got {input}")))?;
        Ok(Input {
            tool,
            fields,
            cwd,
            home,
        })
    }

    fn bad(&self, why: String) -> ToolError {
        ToolError::BadInput {
            tool: self.tool.to_owned(),
            why,
        }
    }

    fn string(&self, key: &str) -> Result<String, ToolError> {
        match self.fields.get(key) {
            Some(Value::String(s)) if !s.contains('\0') => Ok(s.clone()),
            Some(_) => Err(self.bad(format!("`{key}` must be a string without NUL"))),
            None => Err(self.bad(format!("`{key}` is missing"))),
        }
    }

    fn path(&self, key: &str) -> Result<PathBuf, ToolError> {
        let p = self.word(key)?;
        if p.is_empty() {
            return Err(self.bad(format!("`{key}` is empty")));
        }
        Ok(absolute(&p, self.cwd, self.home))
    }

    /// A string that becomes a path (or a search pattern): no control characters.
    fn word(&self, key: &str) -> Result<String, ToolError> {
        let s = self.string(key)?;
        self.without_controls(key, &s, &[])?;
        Ok(s)
    }

    fn words(&self, key: &str) -> Result<Vec<String>, ToolError> {
        let list = match self.fields.get(key) {
            Some(Value::Array(list)) if !list.is_empty() => list,
            _ => return Err(self.bad(format!("`{key}` must be a non-empty array of strings"))),
        };
        list.iter()
            .map(|w| match w {
                // Newlines and tabs are an argument's text (a commit message of
                // several lines); the prompt shows them as `\n` and `\t`.
                Value::String(s) if !s.contains('\0') => {
                    self.without_controls(key, s, &['\n', '\t'])?;
                    Ok(s.clone())
                }
                _ => Err(self.bad(format!("every element of `{key}` must be a string"))),
            })
            .collect()
    }

    /// Refuse control characters (C0, DEL, C1) but those `allowed` in a path or
    /// command word. The user is shown these words when asked to approve: a terminal
    /// takes such characters as commands (move the cursor, clear the screen), and no
    /// path or argument a developer needs holds one (a command's argument may hold
    /// newlines and tabs, shown escaped).
    fn without_controls(&self, key: &str, s: &str, allowed: &[char]) -> Result<(), ToolError> {
        match s.chars().find(|c| c.is_control() && !allowed.contains(c)) {
            None => Ok(()),
            Some(c) => Err(self.bad(format!(
                "`{key}` holds the control character U+{:04X}: paths and command arguments may hold no control characters (escapes; in paths tabs and newlines too); write text that needs them to a file with write_file and name the file",
                c as u32
            ))),
        }
    }
}

/// `find` for names, `grep` for contents; the pattern is always an operand, never an
/// option.
fn search(pattern: &str, dir: PathBuf, within: &str) -> Result<Action, String> {
    if pattern.is_empty() {
        return Err("`pattern` is empty".into());
    }
    let dir = dir.to_string_lossy().into_owned();
    let argv: Vec<String> = match within {
        "names" => vec![
            "find".into(),
            dir,
            "-name".into(),
            pattern.into(),
            "-not".into(),
            "-path".into(),
            "*/.git/*".into(),
        ],
        "contents" => vec![
            "grep".into(),
            "-rnI".into(),
            "--exclude-dir=.git".into(),
            "-e".into(),
            pattern.into(),
            "--".into(),
            dir,
        ],
        other => {
            return Err(format!(
                "`in` must be \"names\" or \"contents\", not {other:?}"
            ));
        }
    };
    Ok(Action::Run { argv })
}

fn absolute(p: &str, cwd: &Path, home: &Path) -> PathBuf {
    if let Some(rest) = p.strip_prefix("~/") {
        home.join(rest)
    } else if p == "~" {
        home.to_path_buf()
    } else {
        cwd.join(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, input: Value) -> Result<Call, ToolError> {
        parse(name, &input, Path::new("/home/a/p"), Path::new("/home/a"))
    }

    #[test]
    fn tool_calls_become_typed_actions() {
        assert_eq!(
            call("read_file", json!({ "path": "src/main.rs" })),
            Ok(Call::Act(Action::Read {
                path: "/home/a/p/src/main.rs".into()
            }))
        );
        assert_eq!(
            call("delete", json!({ "path": "~" })),
            Ok(Call::Act(Action::Delete {
                path: "/home/a".into()
            }))
        );
        assert_eq!(
            call("run", json!({ "argv": ["rm", "-rf", "/home/a"] })),
            Ok(Call::Act(Action::Run {
                argv: vec!["rm".into(), "-rf".into(), "/home/a".into()]
            }))
        );
        let Ok(Call::Act(Action::Run { argv })) =
            call("search", json!({ "pattern": "-delete", "in": "names" }))
        else {
            panic!()
        };
        assert_eq!(argv[..4], ["find", "/home/a/p", "-name", "-delete"]);
        assert_eq!(
            call("processes", json!({})),
            Ok(Call::Context(ContextQuery::Processes))
        );
    }

    #[test]
    fn malformed_calls_are_tool_errors() {
        for (name, input) in [
            ("run", json!({ "argv": [] })),
            ("run", json!({ "argv": "rm -rf ~" })),
            ("run", json!({ "argv": ["ls"], "shell": true })),
            ("read_file", json!("src/main.rs")),
            ("read_file", json!({ "path": 3 })),
            ("write_file", json!({ "path": "a" })),
            ("search", json!({ "pattern": "x", "in": "everywhere" })),
            ("git", json!({ "args": [1] })),
            ("read_file", json!({ "path": "a\u{0}b" })),
        ] {
            assert!(
                matches!(call(name, input.clone()), Err(ToolError::BadInput { .. })),
                "{name} {input}"
            );
        }
        assert_eq!(
            call("sudo", json!({})),
            Err(ToolError::Unknown("sudo".into()))
        );
    }

    #[test]
    fn control_characters_in_paths_and_command_words_are_refused() {
        for c in [
            '\u{1b}', '\n', '\t', '\r', '\u{7}', '\u{7f}', '\u{9b}', '\u{85}',
        ] {
            let word = format!("x{c}[2J");
            let words = [
                ("run", json!({ "argv": ["ls", word] })),
                ("git", json!({ "args": ["log", word] })),
            ];
            for (name, input) in &words {
                let refused = matches!(call(name, input.clone()), Err(ToolError::BadInput { .. }));
                assert_eq!(refused, !matches!(c, '\n' | '\t'), "{name} {input}");
            }
            for (name, input) in [
                ("read_file", json!({ "path": word })),
                ("write_file", json!({ "path": word, "content": "x" })),
                ("list_dir", json!({ "path": word })),
                ("mkdir", json!({ "path": word })),
                ("delete", json!({ "path": word })),
                ("move", json!({ "from": "a", "to": word })),
                ("copy", json!({ "from": word, "to": "b" })),
                ("search", json!({ "pattern": word })),
                ("search", json!({ "pattern": "x", "path": word })),
            ] {
                let Err(ToolError::BadInput { why, .. }) = call(name, input.clone()) else {
                    panic!("{name} {input} was not refused");
                };
                assert!(
                    why.contains(&format!("U+{:04X}", c as u32)) && why.contains("control"),
                    "{why}"
                );
            }
        }
        // A file's content is text, newlines and tabs included; other text stays as it
        // was (not a control character: U+00A0, U+2028).
        assert!(
            call(
                "write_file",
                json!({ "path": "a", "content": "a\n\tb\u{1b}" })
            )
            .is_ok()
        );
        assert!(call("run", json!({ "argv": ["echo", "\u{a0}\u{2028}é"] })).is_ok());
    }

    #[test]
    fn every_definition_parses_its_own_required_fields() {
        for def in definitions() {
            let required = def.schema["required"].as_array().unwrap().clone();
            let input: serde_json::Map<String, Value> = required
                .iter()
                .map(|k| {
                    let k = k.as_str().unwrap();
                    let v = match def.schema["properties"][k]["type"].as_str() {
                        Some("array") => json!(["x"]),
                        _ => json!("x"),
                    };
                    (k.to_owned(), v)
                })
                .collect();
            assert!(call(def.name, Value::Object(input)).is_ok(), "{}", def.name);
        }
    }
}
