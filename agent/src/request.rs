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
