//! Requests as the agent keeps them and the API returns them (JSON): the plan, each
//! action's risk and decision, and what happened when it ran.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::action::Action;
use crate::risk::Risk;

/// The life of a request. `planned` → `awaiting-approval` ⇄ `running` → one of the
/// final states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// No local rule matched (or the request was invalid); nothing will run.
    Unplanned,
    Planned,
    AwaitingApproval,
    Running,
    Done,
    Failed,
    Denied,
    Cancelled,
}

impl State {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            State::Unplanned | State::Done | State::Failed | State::Denied | State::Cancelled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            State::Unplanned => "unplanned",
            State::Planned => "planned",
            State::AwaitingApproval => "awaiting-approval",
            State::Running => "running",
            State::Done => "done",
            State::Failed => "failed",
            State::Denied => "denied",
            State::Cancelled => "cancelled",
        }
    }
}

/// Whether an action may run, and who said so.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "kebab-case")]
pub enum Decision {
    /// Waiting for the user.
    Ask,
    Approved {
        by: String,
    },
    Denied {
        by: String,
        reason: String,
    },
}

/// What became of an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActionState {
    Pending,
    Running,
    Succeeded,
    Failed,
    Skipped,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ActionRecord {
    pub index: u32,
    pub action: Action,
    pub description: String,
    pub risk: Risk,
    pub decision: Decision,
    pub state: ActionState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Captured stdout and stderr, interleaved as produced, capped.
    #[serde(default)]
    pub output: String,
    #[serde(default)]
    pub output_truncated: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What the sandbox will let it do if it runs (writable paths, network,
    /// secrets), from the class it is classified in.
    #[serde(default)]
    pub profile: String,
    /// What the sandbox applied (namespaces, profile, Landlock, seccomp, cgroup).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// Who proposed it.
    #[serde(default)]
    pub origin: Origin,
}

impl ActionRecord {
    /// The `detail` of an audit entry about this action: `more` (an object), with
    /// what says which action it is — `action`, its description (for a person to
    /// read; a write's is only its size and first bytes), `action-sha256`, the digest
    /// of the action itself ([`Action::sha256`]: two actions a description cannot
    /// tell apart differ here, and the action kept in the store can be checked
    /// against it), and `program`, the program it runs as classification resolved
    /// it (its canonical path), where it runs one.
    pub fn audit_detail(&self, more: serde_json::Value) -> serde_json::Value {
        let mut detail = serde_json::Map::new();
        if let serde_json::Value::Object(more) = more {
            detail.extend(more);
        }
        detail.insert("action".into(), self.description.clone().into());
        detail.insert("action-sha256".into(), self.action.sha256().into());
        if let Some(program) = &self.risk.program {
            detail.insert(
                "program".into(),
                program.to_string_lossy().into_owned().into(),
            );
        }
        detail.into()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Request {
    pub id: String,
    pub uid: u32,
    pub user: String,
    pub text: String,
    pub cwd: PathBuf,
    pub state: State,
    pub summary: String,
    pub planner: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub created: String,
    pub updated: String,
    pub actions: Vec<ActionRecord>,
    /// Planning and classification time, microseconds.
    pub plan_micros: u64,
    /// The model's answer, for a request that went to the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
    /// The conversation with the model this request belongs to (the id of the request
    /// that started it): `devos run --continue` goes on with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation: Option<String>,
    /// The model the request went to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// What the request's model calls used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<RequestUsage>,
}

/// The model calls of one request, summed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RequestUsage {
    pub calls: u32,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
    /// Millionths of a USD; `None` once a call had no known price.
    pub cost_micro_usd: Option<u64>,
    /// Time spent waiting for the model (each call from sending it to the end of
    /// its answer), microseconds.
    #[serde(default)]
    pub model_micros: u64,
}

/// Who proposed an action.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    /// The local rules, from the user's own words.
    #[default]
    LocalRules,
    /// The model, as a tool call.
    Model,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::LocalRules => "local-rules",
            Origin::Model => "model",
        }
    }
}

impl Request {
    /// A new request of `uid` (`user`), planned by nothing yet.
    pub fn new(
        id: String,
        uid: u32,
        user: String,
        text: String,
        cwd: PathBuf,
        now: String,
    ) -> Self {
        Request {
            id,
            uid,
            user,
            text,
            cwd,
            state: State::Planned,
            summary: String::new(),
            planner: "local-rules".into(),
            error: None,
            created: now.clone(),
            updated: now,
            actions: Vec::new(),
            plan_micros: 0,
            answer: None,
            conversation: None,
            model: None,
            usage: None,
        }
    }

    /// This request with each action's output cut to `keep` bytes (for listings).
    pub fn shortened(&self, keep: usize) -> Request {
        let mut r = self.clone();
        for a in &mut r.actions {
            if a.output.len() > keep {
                a.output
                    .truncate(crate::executor::head(&a.output, keep).len());
                a.output_truncated = true;
            }
        }
        r
    }
}

/// How long an approval is remembered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Remember {
    /// Just this action.
    Once,
    /// Until the agent restarts (the machine's session).
    Session,
    /// Until the rule is removed.
    Always,
}

/// A `remember` (or rule lifetime) that is none of the three.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("remember must be once, session or always, not `{0}`")]
pub struct UnknownRemember(pub String);

impl std::str::FromStr for Remember {
    type Err = UnknownRemember;
    fn from_str(s: &str) -> Result<Self, UnknownRemember> {
        match s {
            "" | "once" => Ok(Remember::Once),
            "session" => Ok(Remember::Session),
            "always" => Ok(Remember::Always),
            other => Err(UnknownRemember(other.to_owned())),
        }
    }
}

/// A remembered decision of one user: an exact action, or (when the user chose
/// one) a command or path prefix bounded by the class it was approved for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Rule {
    pub id: i64,
    pub uid: u32,
    /// `allow` or `deny`.
    pub allow: bool,
    pub lifetime: Remember,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command_prefix: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<PathBuf>,
    /// The exact action and working directory, for rules remembered without a prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<Exact>,
    /// The highest class an allow rule approves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_class: Option<crate::risk::RiskClass>,
    /// What the action it was made from was approved to reach: a later action it
    /// covers may reach no more (no other place to write, no secret, no network it did
    /// not have).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved: Option<crate::risk::Risk>,
    pub created: String,
}

impl Rule {
    /// A new rule of `uid` (its id comes from the store), scoped by prefixes; the
    /// caller adds what else bounds it.
    pub fn new(
        uid: u32,
        allow: bool,
        lifetime: Remember,
        command_prefix: Vec<String>,
        path_prefix: Option<PathBuf>,
        created: String,
    ) -> Rule {
        Rule {
            id: 0,
            uid,
            allow,
            lifetime,
            command_prefix,
            path_prefix,
            exact: None,
            max_class: None,
            approved: None,
            created,
        }
    }
}

/// One action exactly as it was approved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Exact {
    pub action: Action,
    pub cwd: PathBuf,
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use sha2::{Digest, Sha256};

    use super::*;
    use crate::risk::{Scope, classify};

    fn record(action: Action, cwd: &Path) -> ActionRecord {
        let scope = Scope {
            cwd,
            home: Path::new("/nonexistent"),
            uid: 0,
            secrets: &[],
        };
        ActionRecord {
            index: 0,
            description: action.describe(),
            risk: classify(&action, &scope),
            action,
            decision: Decision::Ask,
            state: ActionState::Pending,
            exit_code: None,
            output: String::new(),
            output_truncated: false,
            error: None,
            profile: String::new(),
            sandbox: None,
            origin: Origin::default(),
        }
    }

    #[test]
    fn an_audit_entry_tells_apart_actions_their_descriptions_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let cwd = &std::fs::canonicalize(dir.path()).unwrap();
        // Two writes of the same size to the same file, alike in what a description
        // shows of them.
        let head = "# notes\n".repeat(crate::action::WRITE_PREVIEW);
        let write = |tail: &str| {
            let content = format!("{head}{tail}");
            record(
                Action::Write {
                    path: cwd.join("notes.md"),
                    content,
                },
                cwd,
            )
        };
        let (harmless, hostile) = (write("ok. \n"), write("rm /\n"));
        assert_eq!(harmless.description, hostile.description);
        let more = serde_json::json!({ "profile": "writes the working directory" });
        let (a, b) = (
            harmless.audit_detail(more.clone()),
            hostile.audit_detail(more),
        );
        assert_eq!(a["action"], b["action"]);
        assert_ne!(a["action-sha256"], b["action-sha256"], "{a} {b}");
        assert_eq!(a["profile"], "writes the working directory");
        assert!(a.get("program").is_none(), "{a}");

        // The digest is of the action exactly as the store keeps it.
        let path = dir.path().join("state.db");
        let store = crate::store::Store::open(&path).unwrap();
        let mut r = Request::new(
            "r1".into(),
            1000,
            "dev".into(),
            "write notes".into(),
            cwd.clone(),
            "2026-01-01T00:00:00Z".into(),
        );
        r.actions = vec![harmless.clone()];
        store.save_request(&r).unwrap();
        let body: String = rusqlite::Connection::open(&path)
            .unwrap()
            .query_row("SELECT body FROM requests WHERE id = 'r1'", [], |row| {
                row.get(0)
            })
            .unwrap();
        let stored = serde_json::to_string(&harmless.action).unwrap();
        assert!(body.contains(&stored), "{body}");
        assert_eq!(a["action-sha256"], hex::encode(Sha256::digest(&stored)));
        let read_back = store.request("r1").unwrap().unwrap();
        assert_eq!(
            read_back.actions[0].action.sha256().as_deref(),
            a["action-sha256"].as_str()
        );

        // A program it runs is named as classification resolved it.
        let ls = record(
            Action::Run {
                argv: vec!["ls".into(), "-l".into()],
            },
            cwd,
        );
        let program = ls.risk.program.clone().expect("ls is installed");
        let detail = ls.audit_detail(serde_json::json!({}));
        assert_eq!(detail["program"], program.to_string_lossy().as_ref());
        assert_eq!(detail["action"], "ls -l");
    }
}
