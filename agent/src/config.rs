//! `/etc/devos/agent.toml`: the agent's configuration, one documented source per key.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::risk::RiskClass;

/// The path the packaged daemon reads its configuration from.
pub const DEFAULT_PATH: &str = "/etc/devos/agent.toml";

/// The agent's configuration. Every key is optional; defaults live in [`Default`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct AgentConfig {
    /// Log verbosity: `error`, `warn`, `info`, `debug` or `trace`.
    pub log_level: LogLevel,
    /// Where the image version is read from (`IMAGE_VERSION=`).
    pub os_release: PathBuf,
    /// Where requests, remembered rules and the audit log are kept.
    pub state_dir: PathBuf,
    /// Per-action private directories (each action's `/tmp`, `/var/tmp` and
    /// `/dev/shm`), on disk, reachable by root only.
    pub actions_dir: PathBuf,
    /// Which actions run without asking, and which never run.
    pub policy: Policy,
    /// How approved actions are confined.
    pub sandbox: SandboxConfig,
    /// The tamper-evident audit log.
    pub audit: AuditConfig,
    /// How much one user may ask of the agent at once.
    pub limits: Limits,
    /// The model route: Amazon Bedrock for what the local rules cannot plan.
    pub model: ModelConfig,
    /// What users may spend on the model.
    pub budgets: Budgets,
    /// The context engine.
    pub context: ContextConfig,
    /// What `devos update` runs.
    pub update: crate::update::UpdateConfig,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            log_level: LogLevel::Info,
            os_release: PathBuf::from(crate::os_release::DEFAULT_PATH),
            state_dir: PathBuf::from("/var/lib/devos-agent"),
            actions_dir: PathBuf::from("/var/lib/devos-agent/actions"),
            policy: Policy::default(),
            sandbox: SandboxConfig::default(),
            audit: AuditConfig::default(),
            limits: Limits::default(),
            model: ModelConfig::default(),
            budgets: Budgets::default(),
            context: ContextConfig::default(),
            update: crate::update::UpdateConfig::default(),
        }
    }
}

/// `[policy]`: the administrator's approval policy. Users may narrow it (and widen
/// auto-approval only within `user-may-auto-approve`) in `~/.config/devos/agent.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Policy {
    /// Risk classes that run without asking. `unknown` and `privileged` are not
    /// allowed here.
    pub auto_approve: Vec<RiskClass>,
    /// Classes a user may add to their own `auto-approve` (not `unknown` nor
    /// `privileged` either).
    pub user_may_auto_approve: Vec<RiskClass>,
    /// Actions that never run, whoever approves them. Deny always wins.
    pub deny: Vec<DenyRule>,
    /// Members of these groups (and root) may approve privileged actions, which run
    /// as root (package installs). Everyone else is refused them.
    pub admin_groups: Vec<String>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            auto_approve: vec![RiskClass::ReadOnly],
            user_may_auto_approve: vec![RiskClass::ReadOnly, RiskClass::WritesWorkdir],
            deny: vec![
                DenyRule {
                    command_prefix: vec!["rm".into(), "-r".into(), "/".into()],
                    path_prefix: None,
                    reason: Some("never delete the root directory".into()),
                },
                DenyRule {
                    command_prefix: Vec::new(),
                    path_prefix: Some(PathBuf::from("/boot")),
                    reason: Some("the boot partition belongs to the image".into()),
                },
            ],
            admin_groups: vec!["sudo".into()],
        }
    }
}

/// One deny rule: a command (argv words) or a path prefix. A command rule matches
/// any action whose program is the same and whose argv holds every option and operand
/// of the rule, in any order or spelling (`rm -r /` matches `rm -fr //` and
/// `/bin/rm --recursive -f /`). A path rule matches any action that names a path, or
/// runs in a directory, at or below it, compared as real paths.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DenyRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command_prefix: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `[sandbox]`: how every action the agent runs is confined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct SandboxConfig {
    /// Refuse an action when Landlock or seccomp cannot be applied (kernel without
    /// Landlock, say). `false` runs it with what could be applied and says so.
    pub required: bool,
    /// The bubblewrap binary that builds each action's namespaces.
    pub bwrap: PathBuf,
    /// Seconds an action may run before it is killed.
    pub timeout_secs: u64,
    /// Bytes of stdout+stderr kept per request (all its actions together); the rest
    /// is dropped and reported.
    pub max_output_bytes: u64,
    /// Largest file an action may write (RLIMIT_FSIZE), MiB.
    pub max_file_mib: u64,
    /// Open files per action (RLIMIT_NOFILE).
    pub max_open_files: u64,
    /// Memory of an action (cgroup `memory.max`, where the agent has a delegated
    /// cgroup v2), MiB.
    pub memory_max_mib: u64,
    /// Processes and threads of an action (cgroup `pids.max`).
    pub tasks_max: u64,
    /// The users' secret locations (`~/` is the caller's home): absent in every
    /// sandbox unless the action was approved with them.
    pub secrets: Vec<String>,
    /// Paths that stay read-only even inside a writable working directory (shell
    /// start-up files, configuration, `~/bin`, `~/.local/bin`, Python's user site in
    /// `~/.local/lib`): what would run later, outside the sandbox.
    pub read_only: Vec<String>,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            required: true,
            bwrap: PathBuf::from("/usr/bin/bwrap"),
            timeout_secs: 600,
            max_output_bytes: 1 << 20,
            max_file_mib: 4096,
            max_open_files: 4096,
            memory_max_mib: 4096,
            tasks_max: 1024,
            secrets: [
                "~/.ssh",
                "~/.gnupg",
                "~/.aws",
                "~/.azure",
                "~/.config/gcloud",
                "~/.kube",
                "~/.docker/config.json",
                "~/.netrc",
                "~/.git-credentials",
                "~/.config/git/credentials",
                "~/.config/gh",
                "~/.password-store",
                "~/.local/share/keyrings",
                "~/.pypirc",
                "~/.npmrc",
                "~/.cargo/credentials.toml",
                "~/.vault-token",
            ]
            .map(String::from)
            .to_vec(),
            read_only: [
                "~/.bashrc",
                "~/.bash_profile",
                "~/.bash_login",
                "~/.bash_logout",
                "~/.profile",
                "~/.zshrc",
                "~/.zshenv",
                "~/.zprofile",
                "~/.zlogin",
                "~/.inputrc",
                "~/.gitconfig",
                "~/.config",
                "~/bin",
                "~/.local/bin",
                "~/.local/lib",
                "~/.local/share/applications",
                "~/.cargo/bin",
                "~/.cargo/config.toml",
                "~/.pam_environment",
                "~/.xprofile",
                "~/.xsessionrc",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

/// `[audit]`: the hash-chained audit log under `state-dir/audit/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct AuditConfig {
    /// Write a checkpoint (sequence number and hash) every this many entries.
    pub checkpoint_every: u64,
    /// Start a new log file when the current one passes this size, MiB.
    pub rotate_mib: u64,
    /// Every entry's sequence number and hash are also appended here, outside the log
    /// directory; `audit verify` checks the log against them.
    pub anchor_file: PathBuf,
    /// Also send every anchor to the systemd journal (when it runs), where a rewrite
    /// of the log and the anchor file together is still caught.
    pub journal: bool,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            checkpoint_every: 32,
            rotate_mib: 16,
            anchor_file: PathBuf::from("/var/log/devos-agent/audit-anchors.jsonl"),
            journal: true,
        }
    }
}

/// `[limits]`: fairness between users.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Limits {
    /// Requests one user may have in flight (planned, waiting for approval or
    /// running); more are refused until one finishes.
    pub requests_per_user: u32,
    /// Finished requests kept per user (with their output); older ones are
    /// dropped. The audit log keeps every request regardless.
    pub history_per_user: u32,
    /// MiB of audit entries one user's requests and rules may add in a day (UTC);
    /// past it their new requests and rules are refused until the next day, so that
    /// no one fills the agent's disk for everyone (root is not limited).
    pub audit_mib_per_user_per_day: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            requests_per_user: 8,
            history_per_user: 1000,
            audit_mib_per_user_per_day: 64,
        }
    }
}

/// `[context]`: the per-user index of projects (files, git state) kept current with
/// inotify; see docs/agent.md "The context engine".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct ContextConfig {
    pub enabled: bool,
    /// Register the git repository a request runs in as a project.
    pub auto_add_repos: bool,
    /// Projects one user may register.
    pub max_projects: u32,
    /// Entries (files and directories) one user's index holds at most.
    pub max_files: u64,
    /// One user's index database grows to this size at most.
    pub max_index_mib: u64,
    /// inotify watches one user's watcher uses at most (0: what the kernel allows,
    /// `fs.inotify.max_user_watches`). Past it, projects are rescanned instead.
    pub max_watches: u64,
    /// How often a project that could not be watched whole is rescanned.
    pub rescan_secs: u64,
}

impl Default for ContextConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            auto_add_repos: true,
            max_projects: 20,
            max_files: 250_000,
            max_index_mib: 128,
            max_watches: 0,
            rescan_secs: 60,
        }
    }
}

/// `[model]`: requests the local rules cannot plan go to a model on Amazon Bedrock
/// (the Converse API with tool use). Credentials come from the AWS SDK's default chain
/// (on EC2 the instance role); docs/agent.md says how to enable model access.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct ModelConfig {
    /// `false` keeps the agent on its local rules; requests they cannot plan say so.
    pub enabled: bool,
    /// The AWS region of Bedrock. Empty: the SDK's chain (`AWS_REGION`, the profile,
    /// the instance's region on EC2).
    pub region: String,
    /// Another endpoint for Bedrock Runtime (a VPC endpoint, or a stand-in in tests).
    /// Empty: the region's public endpoint.
    pub endpoint_url: String,
    /// The model (or inference profile) for short requests.
    pub small: String,
    /// The model for everything else.
    pub large: String,
    /// Requests of at most this many characters, in one sentence, go to `small`.
    pub small_max_chars: u32,
    /// Output tokens per model call.
    pub max_tokens: u32,
    pub temperature: f32,
    /// Model calls per request before it is stopped.
    pub max_steps: u32,
    /// Stream the model's text as it is produced (ConverseStream); `false` uses
    /// Converse and shows the answer when it is complete.
    pub stream: bool,
    /// Mark the system prompt and tool definitions as a cache point, for models that
    /// support prompt caching (Claude from 3.5 Haiku on, Amazon Nova).
    pub prompt_caching: bool,
    /// Attempts per model call when Bedrock throttles or is briefly unavailable
    /// (exponential backoff with jitter between them).
    pub max_attempts: u32,
    /// Bytes of one tool result (a file, a command's output) sent back to the model.
    pub tool_output_bytes: u32,
    /// Prices in USD per million tokens, by model id (the defaults still price the
    /// models they name); a model priced nowhere has an unknown cost (shown as such,
    /// and not counted against budgets).
    pub prices: std::collections::BTreeMap<String, Price>,
}

/// Whether `id` can name a Bedrock model, inference profile or ARN: what Bedrock's
/// ids are made of, and nothing an IAM policy or a template would read as syntax.
pub fn is_model_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 2048
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_:/".contains(&b))
}

/// Why Bedrock in `region` would refuse `id`, when `id` is a cross-region inference
/// profile of a geography `region` is plainly outside of (`us.…` called in `eu-west-1`):
/// those profiles are served only from the regions of their geography.
pub fn profile_outside_region(id: &str, region: &str) -> Option<String> {
    let (geography, region_prefix) = match id.split_once('.')? {
        ("us", _) => ("a US", "us-"),
        ("eu", _) => ("an EU", "eu-"),
        ("apac", _) => ("an Asia Pacific", "ap-"),
        _ => return None,
    };
    // (GovCloud's regions, `us-gov-…`, have profiles of their own.)
    let inside = region.starts_with(region_prefix) && !region.starts_with("us-gov-");
    (!region.is_empty() && !inside).then(|| {
        format!("`{id}` is {geography} cross-region inference profile, which Bedrock serves only from {region_prefix}* regions, not from {region}")
    })
}

/// The Claude Haiku 4.5 US cross-region inference profile.
pub const HAIKU_4_5: &str = "us.anthropic.claude-haiku-4-5-20251001-v1:0";
/// The Claude Sonnet 4.5 US cross-region inference profile.
pub const SONNET_4_5: &str = "us.anthropic.claude-sonnet-4-5-20250929-v1:0";

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            region: String::new(),
            endpoint_url: String::new(),
            small: HAIKU_4_5.into(),
            large: SONNET_4_5.into(),
            small_max_chars: 120,
            max_tokens: 4096,
            temperature: 0.2,
            max_steps: 12,
            stream: true,
            prompt_caching: true,
            max_attempts: 4,
            tool_output_bytes: 16 * 1024,
            prices: [
                (HAIKU_4_5, Price::per_million(1.0, 5.0, 0.10, 1.25)),
                (SONNET_4_5, Price::per_million(3.0, 15.0, 0.30, 3.75)),
            ]
            .into_iter()
            .map(|(m, p)| (m.to_owned(), p))
            .collect(),
        }
    }
}

/// A model's prices, USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Price {
    pub input: f64,
    pub output: f64,
    #[serde(default)]
    pub cache_read: f64,
    #[serde(default)]
    pub cache_write: f64,
}

impl Price {
    pub fn per_million(input: f64, output: f64, cache_read: f64, cache_write: f64) -> Price {
        Price {
            input,
            output,
            cache_read,
            cache_write,
        }
    }
}

/// `[budgets]`: model spending limits in USD, set by the administrator. A request
/// that would start past one is refused with the figures; 0 means no limit. Days and
/// months are UTC.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Budgets {
    /// What one user may spend per day.
    pub user_daily_usd: f64,
    /// What one user may spend per calendar month.
    pub user_monthly_usd: f64,
    /// What all users together may spend per calendar month.
    pub machine_monthly_usd: f64,
}

/// `~/.config/devos/agent.toml`: what a user may set for themselves.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct UserPolicy {
    /// Classes that run without asking for this user (only those the admin's
    /// `user-may-auto-approve` lists take effect).
    pub auto_approve: Vec<RiskClass>,
    /// More deny rules, for this user only.
    pub deny: Vec<DenyRule>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Invalid {
        path: PathBuf,
        source: InvalidConfig,
    },
}

/// A configuration that parses but says something the agent cannot do; each names
/// the key.
#[derive(Debug, thiserror::Error)]
pub enum InvalidConfig {
    /// Not the schema (an image spec's `[agent.config]`).
    #[error("{}", .0.message())]
    Schema(toml::de::Error),
    #[error("{key}: `unknown` can never run without asking; remove it")]
    UnknownAutoApproved { key: &'static str },
    /// A privileged action (a package install) runs as root with the system
    /// writable: approving each one is the only boundary besides its class.
    #[error(
        "{key}: `privileged` can never run without asking: it runs as root with the system writable, so an administrator approves each one; remove it"
    )]
    PrivilegedAutoApproved { key: &'static str },
    #[error("policy.deny[{index}]: {source}")]
    DenyRule {
        index: usize,
        source: InvalidDenyRule,
    },
    /// Limits that must be above 0 (`keys` names them).
    #[error("{keys} must be above 0")]
    Zero { keys: &'static str },
    #[error("{key}: `{pattern}` must be absolute or start with `~/`, without `..`")]
    BadPattern { key: &'static str, pattern: String },
    #[error("{key}: {path} must be an absolute path")]
    NotAbsolute { key: &'static str, path: PathBuf },
    #[error("{key}: {why}")]
    Model { key: &'static str, why: String },
    #[error(
        "audit.anchor-file must be outside state-dir/audit: whoever can rewrite the log must not rewrite its anchors too"
    )]
    AnchorsInsideLog,
}

/// A deny rule that names nothing, or too much.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidDenyRule {
    #[error("a deny rule needs `command-prefix` or `path-prefix`")]
    Empty,
    #[error("a deny rule takes `command-prefix` or `path-prefix`, not both")]
    Both,
    #[error("path-prefix {0} must be absolute")]
    RelativePath(PathBuf),
}

impl AgentConfig {
    /// Read a config file. A missing file means all defaults: the daemon must start
    /// on an image whose admin removed the file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let config: Self = toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })?;
                config.validate().map_err(|source| ConfigError::Invalid {
                    path: path.to_path_buf(),
                    source,
                })?;
                Ok(config)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Build a config from an already parsed table (an image spec's `[agent.config]`).
    pub fn from_table(table: toml::Table) -> Result<Self, InvalidConfig> {
        let config = Self::deserialize(toml::Value::Table(table)).map_err(InvalidConfig::Schema)?;
        config.validate()?;
        Ok(config)
    }

    /// What serde cannot check: rules that must name something, classes that may
    /// never run unasked (`unknown`, and `privileged`, which runs as root).
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        for (key, classes) in [
            ("policy.auto-approve", &self.policy.auto_approve),
            (
                "policy.user-may-auto-approve",
                &self.policy.user_may_auto_approve,
            ),
        ] {
            if classes.contains(&RiskClass::Unknown) {
                return Err(InvalidConfig::UnknownAutoApproved { key });
            }
            if classes.contains(&RiskClass::Privileged) {
                return Err(InvalidConfig::PrivilegedAutoApproved { key });
            }
        }
        for (i, rule) in self.policy.deny.iter().enumerate() {
            rule.validate()
                .map_err(|source| InvalidConfig::DenyRule { index: i, source })?;
        }
        if self.sandbox.timeout_secs == 0 || self.sandbox.max_output_bytes == 0 {
            return Err(InvalidConfig::Zero {
                keys: "sandbox.timeout-secs and sandbox.max-output-bytes",
            });
        }
        if self.audit.checkpoint_every == 0 || self.audit.rotate_mib == 0 {
            return Err(InvalidConfig::Zero {
                keys: "audit.checkpoint-every and audit.rotate-mib",
            });
        }
        if self.sandbox.memory_max_mib == 0 || self.sandbox.tasks_max == 0 {
            return Err(InvalidConfig::Zero {
                keys: "sandbox.memory-max-mib and sandbox.tasks-max",
            });
        }
        if self.limits.requests_per_user == 0
            || self.limits.history_per_user == 0
            || self.limits.audit_mib_per_user_per_day == 0
        {
            return Err(InvalidConfig::Zero {
                keys: "limits.requests-per-user, limits.history-per-user and limits.audit-mib-per-user-per-day",
            });
        }
        for (key, list) in [
            ("sandbox.secrets", &self.sandbox.secrets),
            ("sandbox.read-only", &self.sandbox.read_only),
        ] {
            if let Some(bad) = list
                .iter()
                .find(|p| !(p.starts_with("~/") || p.starts_with('/')) || p.contains(".."))
            {
                return Err(InvalidConfig::BadPattern {
                    key,
                    pattern: bad.clone(),
                });
            }
        }
        for (key, path) in [
            ("state-dir", &self.state_dir),
            ("actions-dir", &self.actions_dir),
            ("audit.anchor-file", &self.audit.anchor_file),
            ("sandbox.bwrap", &self.sandbox.bwrap),
        ] {
            if !path.is_absolute() {
                return Err(InvalidConfig::NotAbsolute {
                    key,
                    path: path.clone(),
                });
            }
        }
        self.validate_model()?;
        if self
            .audit
            .anchor_file
            .starts_with(self.state_dir.join("audit"))
        {
            return Err(InvalidConfig::AnchorsInsideLog);
        }
        Ok(())
    }

    fn validate_model(&self) -> Result<(), InvalidConfig> {
        let m = &self.model;
        if m.max_tokens == 0 || m.max_steps == 0 || m.max_attempts == 0 || m.tool_output_bytes == 0
        {
            return Err(InvalidConfig::Zero {
                keys: "model.max-tokens, model.max-steps, model.max-attempts and model.tool-output-bytes",
            });
        }
        if m.enabled && (m.small.trim().is_empty() || m.large.trim().is_empty()) {
            return Err(InvalidConfig::Model {
                key: "model.small and model.large",
                why: "name a Bedrock model or inference profile id (or set model.enabled = false)"
                    .into(),
            });
        }
        for (key, id) in [("model.small", &m.small), ("model.large", &m.large)] {
            if !(id.is_empty() || is_model_id(id)) {
                return Err(InvalidConfig::Model {
                    key,
                    why: format!(
                        "`{id}` is not a Bedrock model id, inference profile id or ARN (letters, digits and . _ : / - only)"
                    ),
                });
            }
        }
        if !(0.0..=1.0).contains(&m.temperature) {
            return Err(InvalidConfig::Model {
                key: "model.temperature",
                why: format!("{} is outside 0.0 to 1.0", m.temperature),
            });
        }
        let url = &m.endpoint_url;
        if !(url.is_empty() || url.starts_with("https://") || url.starts_with("http://")) {
            return Err(InvalidConfig::Model {
                key: "model.endpoint-url",
                why: format!("`{}` must be an http:// or https:// URL", m.endpoint_url),
            });
        }
        for (model, p) in &m.prices {
            if [p.input, p.output, p.cache_read, p.cache_write]
                .iter()
                .any(|v| !v.is_finite() || *v < 0.0)
            {
                return Err(InvalidConfig::Model {
                    key: "model.prices",
                    why: format!("the prices of {model} must be numbers of 0 or more"),
                });
            }
        }
        let b = &self.budgets;
        for (key, v) in [
            ("budgets.user-daily-usd", b.user_daily_usd),
            ("budgets.user-monthly-usd", b.user_monthly_usd),
            ("budgets.machine-monthly-usd", b.machine_monthly_usd),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(InvalidConfig::Model {
                    key,
                    why: format!("{v} must be 0 (no limit) or more"),
                });
            }
        }
        Ok(())
    }

    /// The file as written into an image: a header and every key with its value.
    pub fn to_file(&self) -> String {
        let body = toml::to_string(self).unwrap_or_default();
        format!(
            "# DevOS agent configuration. Every key is optional; DevOS's docs/spec.md\n\
             # ([agent.config]) says what each one does.\n{body}"
        )
    }
}

impl Policy {
    /// Log a warning for each of [`Policy::deny_places_users_can_move`].
    pub fn warn_of_movable_deny_places(&self) {
        for (place, dir) in self.deny_places_users_can_move() {
            tracing::warn!(
                "the deny rule on {} holds only while it stays there: {} may be changed by users other than root, who (and actions they approve) can rename it away from the rule; deny places whose parents are root's alone",
                place.display(),
                dir.display()
            );
        }
    }

    /// The deny rules' places that users can move: each with the first directory on
    /// its way that someone other than root may change (rename an entry of). A path
    /// rule names a place; once what was there is renamed, it names an empty one.
    pub fn deny_places_users_can_move(&self) -> Vec<(PathBuf, PathBuf)> {
        use crate::risk::paths::{MountTable, changeable_by_users, resolve_trusted};
        let mounts = MountTable::read();
        self.deny
            .iter()
            .filter_map(|d| d.path_prefix.as_ref())
            .filter_map(|place| {
                let dir = changeable_by_users(&resolve_trusted(place).0, &mounts)?;
                Some((place.clone(), dir))
            })
            .collect()
    }
}

impl DenyRule {
    pub fn validate(&self) -> Result<(), InvalidDenyRule> {
        match (self.command_prefix.is_empty(), &self.path_prefix) {
            (true, None) => Err(InvalidDenyRule::Empty),
            (false, Some(_)) => Err(InvalidDenyRule::Both),
            (_, Some(p)) if !p.is_absolute() => Err(InvalidDenyRule::RelativePath(p.clone())),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profile_of_another_geography_is_named_with_the_region() {
        let why = profile_outside_region(HAIKU_4_5, "eu-west-1").unwrap();
        assert!(
            why.contains("a US cross-region") && why.contains("eu-west-1"),
            "{why}"
        );
        assert!(profile_outside_region("eu.anthropic.x-v1:0", "us-east-1").is_some());
        assert!(profile_outside_region("apac.anthropic.x-v1:0", "eu-west-1").is_some());
        assert!(profile_outside_region(HAIKU_4_5, "us-gov-west-1").is_some());
        for (id, region) in [
            (HAIKU_4_5, "us-west-2"),
            ("eu.anthropic.x-v1:0", "eu-central-1"),
            ("apac.anthropic.x-v1:0", "ap-northeast-1"),
            ("global.anthropic.x-v1:0", "eu-west-1"),
            ("anthropic.claude-v2", "eu-west-1"),
            (HAIKU_4_5, ""),
        ] {
            assert_eq!(profile_outside_region(id, region), None, "{id} {region}");
        }
    }

    #[test]
    fn shipped_default_file_matches_defaults() {
        // `DEVOS_BLESS=1 cargo test -p devos-agent shipped_default` rewrites the file.
        if std::env::var_os("DEVOS_BLESS").is_some() {
            let path = concat!(env!("CARGO_MANIFEST_DIR"), "/dist/agent.toml");
            std::fs::write(path, AgentConfig::default().to_file()).unwrap();
            return;
        }
        let shipped = include_str!("../dist/agent.toml");
        let parsed: AgentConfig = toml::from_str(shipped).expect("dist/agent.toml parses");
        assert_eq!(parsed, AgentConfig::default());
        assert_eq!(shipped, AgentConfig::default().to_file());
    }

    #[test]
    fn deny_places_users_can_move_are_named() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
        let theirs = base.join("home/dev");
        std::fs::create_dir_all(theirs.join("proj/secrets")).unwrap();
        std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o777)).unwrap();
        let rule = |p: PathBuf| DenyRule {
            command_prefix: Vec::new(),
            path_prefix: Some(p),
            reason: None,
        };
        let policy = Policy {
            deny: vec![
                rule(theirs.join("proj/secrets")),
                rule(base.join("home")),
                rule(PathBuf::from("/boot")),
            ],
            ..Policy::default()
        };
        // (Run as root, the temporary directory is root's, in sticky `/tmp`.)
        let moved = policy.deny_places_users_can_move();
        assert!(
            moved.iter().all(|(p, _)| *p == theirs.join("proj/secrets")),
            "{moved:?}"
        );
        if nix::unistd::geteuid().is_root() {
            assert_eq!(moved, [(theirs.join("proj/secrets"), theirs.clone())]);
        }
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = AgentConfig::from_table(toml::from_str("log-levle = 'info'").unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("log-levle"), "{err}");
    }

    #[test]
    fn policy_mistakes_name_the_key() {
        let err = AgentConfig::from_table(
            toml::from_str("[policy]\nauto-approve = ['read-only', 'unknown']").unwrap(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("policy.auto-approve"), "{err}");
        // Privileged actions run as root: never on the strength of their class alone.
        for key in ["auto-approve", "user-may-auto-approve"] {
            let err = AgentConfig::from_table(
                toml::from_str(&format!("[policy]\n{key} = ['read-only', 'privileged']")).unwrap(),
            )
            .unwrap_err()
            .to_string();
            assert!(
                err.contains(&format!("policy.{key}")) && err.contains("`privileged`"),
                "{err}"
            );
            assert!(err.contains("runs as root"), "{err}");
        }
        let err = AgentConfig::from_table(toml::from_str("[[policy.deny]]\nreason = 'x'").unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("policy.deny[0]"), "{err}");
        let err = AgentConfig::from_table(
            toml::from_str("[policy]\nauto-approve = ['sometimes']").unwrap(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("sometimes"), "{err}");
    }

    #[test]
    fn model_ids_are_what_bedrock_names() {
        for id in [
            HAIKU_4_5,
            "anthropic.claude-3-haiku-20240307-v1:0",
            "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/a1b2c3",
        ] {
            assert!(is_model_id(id), "{id}");
            let table = toml::from_str(&format!("[model]\nsmall = '{id}'")).unwrap();
            AgentConfig::from_table(table).unwrap();
        }
        // What an IAM policy or a template would read as syntax, or as nothing.
        for id in [
            "",
            "us.*",
            "a b",
            "x${AWS::Region}",
            "m\"",
            "m'",
            "m\n",
            "m*",
        ] {
            assert!(!is_model_id(id), "{id:?}");
        }
        let table = toml::from_str("[model]\nlarge = 'anthropic.*'").unwrap();
        let err = AgentConfig::from_table(table).unwrap_err().to_string();
        assert!(
            err.contains("model.large") && err.contains("anthropic.*"),
            "{err}"
        );
    }

    #[test]
    fn missing_file_means_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = AgentConfig::load(&dir.path().join("absent.toml")).unwrap();
        assert_eq!(cfg, AgentConfig::default());
    }

    #[test]
    fn bad_file_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "log-level = 'loud'\n").unwrap();
        let err = AgentConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("agent.toml") && err.contains("loud"), "{err}");
    }
}
