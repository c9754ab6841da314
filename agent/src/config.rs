//! `/etc/devos/agent.toml`: the agent's configuration, one documented source per key.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The path the packaged daemon reads its configuration from.
pub const DEFAULT_PATH: &str = "/etc/devos/agent.toml";

/// The agent's configuration. Every key is optional; defaults live in [`Default`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct AgentConfig {
    /// Log verbosity: `error`, `warn`, `info`, `debug` or `trace`.
    pub log_level: LogLevel,
    /// Where the image version is read from (`IMAGE_VERSION=`).
    pub os_release: PathBuf,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            log_level: LogLevel::Info,
            os_release: PathBuf::from(crate::os_release::DEFAULT_PATH),
        }
    }
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
}

impl AgentConfig {
    /// Read a config file. A missing file means all defaults: the daemon must start
    /// on an image whose admin removed the file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).map_err(|e| ConfigError::Parse {
                path: path.to_path_buf(),
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Build a config from an already parsed table (an image spec's `[agent.config]`).
    pub fn from_table(table: toml::Table) -> Result<Self, String> {
        Self::deserialize(toml::Value::Table(table)).map_err(|e| e.message().to_owned())
    }

    /// The file as written into an image: a header and every key with its value.
    pub fn to_file(&self) -> String {
        let body = toml::to_string(self).unwrap_or_default();
        format!(
            "# DevOS agent configuration. Every key is optional; see `man devos-agent` or\n\
             # docs/spec.md ([agent.config]) for what each one does.\n{body}"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_default_file_matches_defaults() {
        let shipped = include_str!("../dist/agent.toml");
        let parsed: AgentConfig = toml::from_str(shipped).expect("dist/agent.toml parses");
        assert_eq!(parsed, AgentConfig::default());
        assert_eq!(shipped, AgentConfig::default().to_file());
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err =
            AgentConfig::from_table(toml::from_str("log-levle = 'info'").unwrap()).unwrap_err();
        assert!(err.contains("log-levle"), "{err}");
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
