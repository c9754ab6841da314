//! The states a version, a publication and a fleet change can be in: enums with the
//! names the registry stores and `--json` prints.

/// An enum of named states: serde, `Display`, parsing and SQLite use the same names.
macro_rules! named_states {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        pub(crate) enum $name {
            $($(#[$vdoc])* #[serde(rename = $text)] $variant,)+
        }

        impl $name {
            fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(format!(
                        "unknown {} `{other}` (the registry may be from a newer devos-build)",
                        stringify!($name)
                    )),
                }
            }
        }

        impl rusqlite::ToSql for $name {
            fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
                Ok(self.as_str().into())
            }
        }

        impl rusqlite::types::FromSql for $name {
            fn column_result(
                value: rusqlite::types::ValueRef<'_>,
            ) -> rusqlite::types::FromSqlResult<Self> {
                value
                    .as_str()?
                    .parse()
                    .map_err(|e: String| rusqlite::types::FromSqlError::Other(e.into()))
            }
        }
    };
}

named_states! {
    /// Whether a version's artifacts are still on disk.
    VersionState {
        Built = "built",
        /// `image gc` deleted its artifacts; the row stays for history and diffs.
        Removed = "removed",
    }
}

named_states! {
    /// Whether an AMI of a version exists.
    PublicationState {
        Available = "available",
        /// `publish deregister` removed it.
        Deregistered = "deregistered",
    }
}

named_states! {
    /// Where a fleet change (deploy, rollout, rollback) stands or how it ended.
    ChangeState {
        InProgress = "in-progress",
        /// The command that made the change ended (interrupted, killed, an error) before
        /// it judged it; a deploy, rollout or rollback of the stack to the version it
        /// runs then judges it.
        Interrupted = "interrupted",
        Succeeded = "succeeded",
        Failed = "failed",
        /// The gate failed and the stack went back to the version it ran.
        RolledBack = "rolled-back",
        /// The stack already ran the version.
        Unchanged = "unchanged",
        /// `--dry-run`: the change set was shown and nothing changed.
        DryRun = "dry-run",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in [
            ChangeState::InProgress,
            ChangeState::RolledBack,
            ChangeState::DryRun,
        ] {
            assert_eq!(s.as_str().parse::<ChangeState>(), Ok(s));
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        }
        assert!(
            "gone"
                .parse::<VersionState>()
                .unwrap_err()
                .contains("`gone`")
        );
    }
}
