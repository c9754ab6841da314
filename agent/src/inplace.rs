//! In-place fleet rollouts, the instance's side. `devos-build fleet rollout --in-place`
//! tags instances `devos:update-to=VERSION`, batch by batch. The agent of an instance
//! reads its own tags from instance metadata (the templates enable tags there), moves
//! the machine to that version the way `devos update` does — systemd-sysupdate writes
//! the other slot, or the boot loader's default switches to it when it is installed
//! there already (a rollback) — and reboots. It reports on its own instance with two
//! tags the rollout reads: `devos:running` (the version it runs) and
//! `devos:update-state` (`healthy`, `unhealthy: …`, `updating to …`, `failed …: …`).
//!
//! Each version is tried once: before it moves, the agent writes an attempt marker
//! (version, boot id) into its state directory. A later boot that does not run that
//! version means the version did not come up healthy within its boot tries and
//! systemd-boot went back; the agent reports that and does not try again.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Set by the rollout: the version this instance should run.
pub const TAG_UPDATE_TO: &str = "devos:update-to";
/// Set by the agent: the version it runs.
pub const TAG_RUNNING: &str = "devos:running";
/// Set by the agent: how it is doing (see the module's documentation).
pub const TAG_STATE: &str = "devos:update-state";
/// `devos:update-state` of a machine whose checks pass.
pub const HEALTHY: &str = "healthy";

/// The last move this machine made, kept across reboots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// The version it moved to.
    pub version: String,
    /// The boot that moved (`/proc/sys/kernel/random/boot_id`).
    pub boot: String,
    /// Why the move itself failed (nothing was rebooted), if it did.
    #[serde(default)]
    pub error: Option<String>,
}

impl Attempt {
    /// The marker in `path`; None if there is none or it cannot be read as one.
    pub fn load(path: &Path) -> Option<Attempt> {
        serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
    }

    /// Write the marker durably (a new file renamed over the old one).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("new");
        let file = std::fs::File::create(&tmp)?;
        serde_json::to_writer(&file, self)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    }
}

/// What the agent does about the version its instance's tags ask for.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing asked for.
    Idle,
    /// Running the version asked for: report how it is doing.
    Report,
    /// The version asked for was tried and this machine is not on it: report the
    /// failure and leave the machine as it is.
    Failed(String),
    /// Moved in this boot; the reboot is on its way.
    Rebooting,
    /// Move to this version and reboot.
    Move(String),
}

/// Decide, from the version asked for, the one running, the last attempt and this
/// boot's id.
pub fn decide(target: Option<&str>, running: &str, attempt: Option<&Attempt>, boot: &str) -> Step {
    let Some(target) = target.map(str::trim).filter(|t| !t.is_empty()) else {
        return Step::Idle;
    };
    if target == running {
        return Step::Report;
    }
    match attempt {
        Some(a) if a.version == target => match &a.error {
            Some(error) => Step::Failed(format!("failed {target}: {error}")),
            None if a.boot == boot => Step::Rebooting,
            None => Step::Failed(format!(
                "failed {target}: it did not come up healthy within its boot tries; back on {running}"
            )),
        },
        _ => Step::Move(target.to_owned()),
    }
}

/// A tag value as EC2 takes it: at most 256 characters.
pub fn tag_value(text: &str) -> String {
    text.chars().take(256).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(version: &str, boot: &str, error: Option<&str>) -> Attempt {
        Attempt {
            version: version.into(),
            boot: boot.into(),
            error: error.map(str::to_owned),
        }
    }

    #[test]
    fn each_version_is_tried_once_and_a_machine_back_on_the_old_one_reports_the_failure() {
        assert_eq!(decide(None, "1", None, "b1"), Step::Idle);
        assert_eq!(decide(Some(" "), "1", None, "b1"), Step::Idle);
        assert_eq!(decide(Some("1"), "1", None, "b1"), Step::Report);
        assert_eq!(decide(Some("2"), "1", None, "b1"), Step::Move("2".into()));
        // An attempt at another version does not count against this one.
        let other = attempt("3", "b0", None);
        assert_eq!(
            decide(Some("2"), "1", Some(&other), "b1"),
            Step::Move("2".into())
        );
        // Moved in this boot (the agent restarted before the reboot): wait.
        let now = attempt("2", "b1", None);
        assert_eq!(decide(Some("2"), "1", Some(&now), "b1"), Step::Rebooting);
        // Moved in an earlier boot and still on the old version: boot counting went back.
        match decide(Some("2"), "1", Some(&now), "b2") {
            Step::Failed(why) => assert!(why.contains("back on 1"), "{why}"),
            other => panic!("{other:?}"),
        }
        // The move itself failed: never retried, the error reported.
        let broken = attempt("2", "b1", Some("no such version in the feed"));
        match decide(Some("2"), "1", Some(&broken), "b1") {
            Step::Failed(why) => assert!(why.contains("no such version"), "{why}"),
            other => panic!("{other:?}"),
        }
        // Arrived: report, whatever the marker says.
        assert_eq!(decide(Some("2"), "2", Some(&now), "b2"), Step::Report);
    }

    #[test]
    fn tag_values_are_cut_to_what_ec2_takes() {
        assert_eq!(tag_value("healthy"), "healthy");
        assert_eq!(tag_value(&"é".repeat(300)).chars().count(), 256);
    }
}
