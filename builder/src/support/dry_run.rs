//! What a `--dry-run` prints: the changes the command would make, one sentence each,
//! and nothing else happens.

/// The changes a command would make; none means there is nothing to do (exit code 3).
#[derive(Debug, Default, serde::Serialize)]
pub(crate) struct DryRun {
    /// Always true: tells a script reading `--json` that nothing was changed.
    pub(crate) dry_run: bool,
    /// One sentence per change, in the order the command would make them.
    pub(crate) would: Vec<String>,
    /// What the plan is based on, when not on asking the systems it would change.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) note: Option<String>,
}

impl DryRun {
    pub(crate) fn new() -> Self {
        Self {
            dry_run: true,
            ..Self::default()
        }
    }

    pub(crate) fn would(&mut self, change: impl Into<String>) {
        self.would.push(change.into());
    }

    pub(crate) fn nothing_to_do(&self) -> bool {
        self.would.is_empty()
    }

    pub(crate) fn human(&self) -> String {
        let mut s: String = self.would.iter().map(|w| format!("would {w}\n")).collect();
        if self.nothing_to_do() {
            s.push_str("nothing to do\n");
        }
        if let Some(note) = &self.note {
            s.push_str(&format!("({note})\n"));
        }
        s
    }
}
