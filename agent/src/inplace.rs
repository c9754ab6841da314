//! In-place fleet rollouts, the instance's side. `devos-build fleet rollout --in-place`
//! tags instances `devos:update-to=VERSION`, batch by batch. The agent of an instance
//! reads its own tags from instance metadata (the templates enable tags there), moves
//! the machine to that version the way `devos update` does — systemd-sysupdate writes
//! the other slot, or the boot loader's default switches to it when it is installed
//! there already (a rollback) — and reboots. It reports on its own instance with two
//! tags the rollout reads: `devos:running` (the version it runs) and
//! `devos:update-state` (`healthy`, `unhealthy: …`, `updating to …`, `failed …: …`).
//!
//! A version is tried once: before it moves, the agent writes an attempt marker
//! (version, boot id, whether the move was done) into its state directory. A later
//! boot that does not run that version means the version did not come up healthy
//! within its boot tries and systemd-boot went back; the agent reports that
//! (`failed …`) and does not try it again while it is the version asked for. A move
//! that could not be made — the install failed, the machine rebooted before it was
//! done — says nothing about the version and is reported as `not moved to …`. When the
//! tag stops asking for the version a move was made to in this boot (the rollout went
//! back while this machine was still installing), the boot loader is pointed at the
//! running version again, so no later reboot starts the version given up on. Only
//! versions are acted on: a tag value that is not one (an option, a path) is refused.

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
/// The attempt marker, in the agent's state directory.
pub const ATTEMPT_FILE: &str = "in-place-attempt";

/// `devos:update-state` while the machine moves to `version`; `note`: what holds it up.
pub fn updating_state(version: &str, note: Option<&str>) -> String {
    match note {
        Some(note) => format!("updating to {version}: {note}"),
        None => format!("updating to {version}"),
    }
}

/// `devos:update-state` of a move to `version` that failed, and why.
pub fn failed_state(version: &str, why: &str) -> String {
    format!("failed {version}: {why}")
}

/// `devos:update-state` of a move to `version` that could not be made: nothing booted
/// it, so this says nothing about the version.
pub fn not_moved_state(version: &str, why: &str) -> String {
    format!("not moved to {version}: {why}")
}

/// Whether `state` says the machine could not move to `version`.
pub fn is_not_moved(state: &str, version: &str) -> bool {
    state.starts_with(&not_moved_state(version, ""))
}

/// Whether `state` says the machine is moving to `version`.
pub fn is_updating(state: &str, version: &str) -> bool {
    let moving = updating_state(version, None);
    state == moving || state.starts_with(&format!("{moving}:"))
}

/// Whether `state` says the move to `version` failed.
pub fn is_failure(state: &str, version: &str) -> bool {
    state.starts_with(&failed_state(version, ""))
}

/// The last move this machine made, kept across reboots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// The version it moved to.
    pub version: String,
    /// The boot that moved (`/proc/sys/kernel/random/boot_id`).
    pub boot: String,
    /// Whether the move was done (the version boots next) and only the reboot is left.
    #[serde(default)]
    pub moved: bool,
    /// Why the move itself failed (nothing was rebooted), if it did.
    #[serde(default)]
    pub error: Option<String>,
}

impl Attempt {
    /// The marker in `path`; None if there is none or it cannot be read as one.
    pub fn load(path: &Path) -> Option<Attempt> {
        serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
    }

    /// Whether the marker no longer matters: its version is not the one asked for. Once
    /// any move it made in this boot is undone it is removed, so a later request for
    /// that version is tried afresh.
    pub fn stale(&self, target: Option<&str>) -> bool {
        target.map(str::trim) != Some(self.version.as_str())
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
    /// The version asked for was tried and this machine is not on it, or it could not
    /// be moved to, or it is no version at all: report that and leave the machine as
    /// it is.
    Failed(String),
    /// A move to this version was made (or tried: a failed install may have got far)
    /// in this boot but is no longer asked for: point the boot loader at the running
    /// version again.
    Undo(String),
    /// Moved in this boot; reboot (again, if the last reboot did not happen).
    Reboot,
    /// Move to this version and reboot.
    Move(String),
}

/// Whether `s` can be a version: what image versions are made of, never an option.
pub fn is_version(s: &str) -> bool {
    s.len() <= 128
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._+~^-".contains(c))
}

/// Decide, from the version asked for, the one running, the last attempt and this
/// boot's id.
pub fn decide(target: Option<&str>, running: &str, attempt: Option<&Attempt>, boot: &str) -> Step {
    let target = target.map(str::trim).filter(|t| !t.is_empty());
    if let Some(a) = attempt
        && a.boot == boot
        && a.version != running
        && target != Some(a.version.as_str())
    {
        return Step::Undo(a.version.clone());
    }
    let Some(target) = target else {
        return Step::Idle;
    };
    if !is_version(target) {
        return Step::Failed(not_moved_state(
            &tag_value(&target.escape_debug().to_string()),
            "not a version",
        ));
    }
    if target == running {
        return Step::Report;
    }
    match attempt {
        Some(a) if a.version == target => match &a.error {
            Some(error) => Step::Failed(not_moved_state(target, error)),
            None if a.boot == boot && a.moved => Step::Reboot,
            // The agent restarted before the move was done: do it again.
            None if a.boot == boot => Step::Move(target.to_owned()),
            None if a.moved => Step::Failed(failed_state(
                target,
                &format!("it did not come up healthy within its boot tries; back on {running}"),
            )),
            None => Step::Failed(not_moved_state(
                target,
                &format!("the machine rebooted before the move was done; still on {running}"),
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

    fn attempt(version: &str, boot: &str, moved: bool, error: Option<&str>) -> Attempt {
        Attempt {
            version: version.into(),
            boot: boot.into(),
            moved,
            error: error.map(str::to_owned),
        }
    }

    fn failed(step: Step) -> String {
        match step {
            Step::Failed(why) => why,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn each_version_is_tried_once_and_a_machine_back_on_the_old_one_reports_the_failure() {
        assert_eq!(decide(None, "1", None, "b1"), Step::Idle);
        assert_eq!(decide(Some(" "), "1", None, "b1"), Step::Idle);
        assert_eq!(decide(Some("1"), "1", None, "b1"), Step::Report);
        assert_eq!(decide(Some("2"), "1", None, "b1"), Step::Move("2".into()));
        // An attempt at another version does not count against this one.
        let other = attempt("3", "b0", true, None);
        assert_eq!(
            decide(Some("2"), "1", Some(&other), "b1"),
            Step::Move("2".into())
        );
        // Moved in this boot (the agent restarted before the reboot): reboot.
        let now = attempt("2", "b1", true, None);
        assert_eq!(decide(Some("2"), "1", Some(&now), "b1"), Step::Reboot);
        // Restarted during the move in this boot: move again.
        let half = attempt("2", "b1", false, None);
        assert_eq!(
            decide(Some("2"), "1", Some(&half), "b1"),
            Step::Move("2".into())
        );
        // Moved in an earlier boot and still on the old version: boot counting went back.
        assert!(failed(decide(Some("2"), "1", Some(&now), "b2")).contains("back on 1"));
        assert!(
            failed(decide(Some("2"), "1", Some(&half), "b2")).contains("before the move was done")
        );
        // The move itself failed: never retried, the error reported.
        let broken = attempt("2", "b1", false, Some("no such version in the feed"));
        assert!(failed(decide(Some("2"), "1", Some(&broken), "b1")).contains("no such version"));
        // Arrived: report, whatever the marker says.
        assert_eq!(decide(Some("2"), "2", Some(&now), "b2"), Step::Report);
    }

    #[test]
    fn only_a_version_that_booted_and_went_back_is_a_failure_of_the_version() {
        let half = attempt("2", "b1", false, None);
        let broken = attempt("2", "b1", false, Some("download failed"));
        for (step, why) in [
            (decide(Some("2"), "1", Some(&half), "b2"), "before the move"),
            (
                decide(Some("2"), "1", Some(&broken), "b1"),
                "download failed",
            ),
            (decide(Some("-x"), "1", None, "b1"), "not a version"),
        ] {
            let state = failed(step);
            assert!(state.contains(why), "{state}");
            assert!(!is_failure(&state, "2"), "{state}");
        }
        assert!(is_not_moved(
            &failed(decide(Some("2"), "1", Some(&half), "b2")),
            "2"
        ));
        assert!(!is_not_moved("not moved to 2.1: x", "2"));
        let gone_back = failed(decide(
            Some("2"),
            "1",
            Some(&attempt("2", "b1", true, None)),
            "b2",
        ));
        assert!(is_failure(&gone_back, "2") && !is_not_moved(&gone_back, "2"));
    }

    #[test]
    fn a_move_made_in_this_boot_and_no_longer_asked_for_is_undone() {
        // Moved (or moving) to 2 in this boot; the rollout now asks for 1, or nothing, or 3.
        for moved in [true, false] {
            let a = attempt("2", "b1", moved, None);
            for target in [Some("1"), None, Some("3")] {
                assert_eq!(
                    decide(target, "1", Some(&a), "b1"),
                    Step::Undo("2".into()),
                    "{target:?}"
                );
                assert!(a.stale(target));
            }
            assert!(!a.stale(Some(" 2 ")));
        }
        // A failed install may have got as far as the boot loader: undone too.
        let broken = attempt("2", "b1", false, Some("x"));
        assert_eq!(
            decide(Some("1"), "1", Some(&broken), "b1"),
            Step::Undo("2".into())
        );
        // Nothing to undo: an earlier boot, or already running it.
        let earlier = attempt("2", "b0", true, None);
        assert_eq!(decide(Some("1"), "1", Some(&earlier), "b1"), Step::Report);
        assert_eq!(
            decide(None, "2", Some(&attempt("2", "b1", true, None)), "b1"),
            Step::Idle
        );
    }

    #[test]
    fn only_versions_are_acted_on() {
        for ok in ["0.2.0+abcdef012345", "1", "2.0~rc1", "1.0-2"] {
            assert!(is_version(ok), "{ok}");
        }
        for bad in [
            "--definitions=/tmp/x",
            "-1",
            "1 2",
            "a/b",
            "../x",
            "1;reboot",
            &"9".repeat(129),
        ] {
            assert!(!is_version(bad), "{bad}");
            assert!(failed(decide(Some(bad), "1", None, "b1")).contains("not a version"));
        }
    }

    #[test]
    fn reports_name_their_version_exactly() {
        assert!(is_updating(&updating_state("2.0", None), "2.0"));
        assert!(is_updating(
            &updating_state("2.0", Some("the reboot failed")),
            "2.0"
        ));
        assert!(!is_updating(&updating_state("2.0.1", None), "2.0"));
        assert!(is_failure(&failed_state("2.0", "x"), "2.0"));
        assert!(!is_failure(&failed_state("2.0.1", "x"), "2.0"));
        assert!(!is_failure(HEALTHY, "2.0"));
    }

    #[test]
    fn tag_values_are_cut_to_what_ec2_takes() {
        assert_eq!(tag_value("healthy"), "healthy");
        assert_eq!(tag_value(&"é".repeat(300)).chars().count(), 256);
    }
}
