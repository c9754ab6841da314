//! The instance's side of an in-place fleet rollout (see [`crate::inplace`]): read the
//! instance's `devos:update-to` tag from instance metadata every
//! `[update] fleet-poll-seconds`, move and reboot, and report on the instance's own
//! tags. Logged and audited, never fatal; off EC2 it does nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_config::BehaviorVersion;

use super::shared::Shared;
use crate::ec2::{metadata, on_ec2};
use crate::inplace::{
    Attempt, HEALTHY, Step, TAG_RUNNING, TAG_STATE, TAG_UPDATE_TO, decide, not_moved_state,
    updating_state,
};

/// How long a reboot the agent asked for may take to happen before it asks again.
const REBOOT_PATIENCE: Duration = Duration::from_secs(120);

/// systemd-boot's variable for a boot of an entry with tries left (a counted boot).
const BOOT_COUNTED: &str =
    "/sys/firmware/efi/efivars/LoaderBootCountPath-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";

/// What the poll keeps between looks.
struct Follower {
    imds: aws_config::imds::Client,
    instance: String,
    /// Made at the first report: most instances are never asked for anything.
    ec2: Option<aws_sdk_ec2::Client>,
    /// The last (running, state) reported.
    reported: Option<(String, String)>,
    /// When the agent last asked for a reboot.
    rebooted: Option<Instant>,
}

pub(super) async fn follow(shared: Arc<Shared>, conn: zbus::Connection) {
    if !on_ec2() {
        return;
    }
    let imds = aws_config::imds::Client::builder().build();
    let instance = match metadata(&imds, "/latest/meta-data/instance-id").await {
        Ok(Some(id)) => id.trim().to_owned(),
        Ok(None) => {
            return tracing::warn!("in-place updates: instance metadata has no instance-id");
        }
        Err(e) => return tracing::warn!("in-place updates: {e:#}"),
    };
    let mut me = Follower {
        imds,
        instance,
        ec2: None,
        reported: None,
        rebooted: None,
    };
    loop {
        if let Err(e) = me.tick(&shared, &conn).await {
            tracing::warn!("in-place updates: {e:#}");
        }
        let period = shared.config().update.fleet_poll_seconds.max(1);
        tokio::time::sleep(Duration::from_secs(period)).await;
    }
}

impl Follower {
    /// One look at the instance's tags, and what follows from it.
    async fn tick(&mut self, shared: &Shared, conn: &zbus::Connection) -> anyhow::Result<()> {
        let target = self.tag(TAG_UPDATE_TO).await?;
        let target = target.as_deref();
        let config = shared.config();
        let (image, running) = crate::os_release::image_identity(&config.os_release);
        let Some(running) = running else {
            if target.is_none() {
                return Ok(());
            }
            anyhow::bail!(
                "{} has no IMAGE_VERSION: cannot tell which version this machine runs",
                config.os_release.display()
            );
        };
        let marker = config.state_dir.join(crate::inplace::ATTEMPT_FILE);
        let mut attempt = Attempt::load(&marker);
        let boot = crate::health::boot_id()?;
        if let Some(a) = attempt.as_ref().filter(|a| a.stale(target)) {
            if let Step::Undo(version) = decide(target, &running, Some(a), &boot) {
                // One change of the slots at a time (an admin's `devos update`).
                let _updating = shared.updating.lock().await;
                // Recorded before it is done; not done if it cannot be recorded.
                let detail =
                    serde_json::json!({ "by": "fleet", "undone": version, "running": running });
                let mut started = detail.clone();
                started["action"] = "update.rollback".into();
                shared.audit("update.started", Some(0), None, None, started)?;
                let update = config.update.clone();
                let stayed =
                    tokio::task::spawn_blocking(move || crate::update::stay(&update)).await?;
                let mut outcome = detail;
                if let Err(e) = &stayed {
                    outcome["error"] = e.to_string().into();
                }
                // (A failed append is logged; `update.started` recorded the attempt.)
                let _ = shared.audit("update.rollback", Some(0), None, None, outcome);
                stayed?;
                tracing::info!(
                    "in-place updates: {version} is no longer asked for; {running} boots next"
                );
            }
            std::fs::remove_file(&marker)?;
            attempt = None;
        }
        let state = match decide(target, &running, attempt.as_ref(), &boot) {
            Step::Idle | Step::Undo(_) => return Ok(()),
            Step::Reboot => {
                if self.rebooted.is_none_or(|t| t.elapsed() >= REBOOT_PATIENCE) {
                    let version = attempt.map(|a| a.version).unwrap_or_default();
                    self.reboot(shared, &running, &version).await?;
                }
                return Ok(());
            }
            Step::Report => {
                if boot_unblessed(conn).await {
                    // A counted boot is healthy once boot-complete.target is reached.
                    return Ok(());
                }
                let checks = super::health::self_checks(shared, conn, Some(&running)).await;
                match crate::health::verdict(&checks).1 {
                    None => HEALTHY.to_owned(),
                    Some(reason) => format!("unhealthy: {reason}"),
                }
            }
            Step::Failed(why) => why,
            Step::Move(version) => {
                // One change of the slots at a time: an admin's `devos update` may have
                // run while this one waited, and the rollout may have asked for
                // something else meanwhile: look again.
                let _updating = shared.updating.lock().await;
                if self.tag(TAG_UPDATE_TO).await?.as_deref() != Some(version.as_str()) {
                    return Ok(());
                }
                self.report(&running, &updating_state(&version, None))
                    .await?;
                let mut attempt = Attempt {
                    version: version.clone(),
                    boot,
                    moved: false,
                    error: None,
                };
                // Recorded before it starts; not started if it cannot be recorded.
                shared.audit(
                    "update.started",
                    Some(0),
                    None,
                    None,
                    serde_json::json!({ "by": "fleet", "action": "update.install", "to": version, "running": running }),
                )?;
                attempt.save(&marker)?;
                let update = config.update.clone();
                let (image, from) = (image.clone(), running.clone());
                let moved = tokio::task::spawn_blocking(move || {
                    crate::update::move_to(&update, image.as_deref(), Some(&from), &version)
                })
                .await?;
                let detail = match &moved {
                    Ok(done) => {
                        serde_json::json!({ "by": "fleet", "to": attempt.version, "message": done })
                    }
                    Err(e) => {
                        serde_json::json!({ "by": "fleet", "to": attempt.version, "error": e.to_string() })
                    }
                };
                // The outcome (`update.started` recorded the attempt; a failed append
                // is logged, and the move stands either way).
                let _ = shared.audit("update.install", Some(0), None, None, detail);
                match moved {
                    Ok(done) => {
                        attempt.moved = true;
                        attempt.save(&marker)?;
                        // An install takes minutes: the rollout may have gone back
                        // meanwhile. Then the next look undoes the move instead.
                        let now = self.tag(TAG_UPDATE_TO).await?;
                        if decide(now.as_deref(), &running, Some(&attempt), &attempt.boot)
                            != Step::Reboot
                        {
                            return Ok(());
                        }
                        tracing::info!(to = %attempt.version, "{done}; rebooting");
                        return self.reboot(shared, &running, &attempt.version).await;
                    }
                    // Another install runs (one an agent restarted in the middle of
                    // left behind): still moving; the next look tries again.
                    Err(crate::update::UpdateError::Busy(_)) => updating_state(
                        &attempt.version,
                        Some("another update is running on this machine; trying again"),
                    ),
                    Err(e) => {
                        attempt.error = Some(e.to_string());
                        attempt.save(&marker)?;
                        not_moved_state(&attempt.version, &e.to_string())
                    }
                }
            }
        };
        if self.reported.as_ref().is_none_or(|(_, s)| *s != state) {
            // (`audit` logs a failed append; the report goes out either way.)
            let _ = shared.audit(
                "update.fleet-report",
                None,
                None,
                None,
                serde_json::json!({ "instance": self.instance, "running": running, "state": state }),
            );
        }
        self.report(&running, &state).await
    }

    /// Ask for the reboot into `version`; a failure is reported (the version is not
    /// to blame) and the next look asks again.
    async fn reboot(
        &mut self,
        shared: &Shared,
        running: &str,
        version: &str,
    ) -> anyhow::Result<()> {
        self.rebooted = Some(Instant::now());
        let update = shared.config().update.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || crate::update::reboot(&update)).await? {
            tracing::warn!("in-place updates: the reboot into {version} failed: {e}");
            self.report(
                running,
                &updating_state(
                    version,
                    Some(&format!("the reboot failed ({e}); trying again")),
                ),
            )
            .await?;
        }
        Ok(())
    }

    /// This instance's tag `key`, from instance metadata.
    async fn tag(&self, key: &str) -> anyhow::Result<Option<String>> {
        metadata(
            &self.imds,
            &format!("/latest/meta-data/tags/instance/{key}"),
        )
        .await
    }

    /// Tag the instance with the version it runs and its state, unless its tags say
    /// that already. The tags are read back, not remembered: a report someone else
    /// overwrote is written again.
    async fn report(&mut self, running: &str, state: &str) -> anyhow::Result<()> {
        let now = (running.to_owned(), state.to_owned());
        let shown = (
            self.tag(TAG_RUNNING).await?.unwrap_or_default(),
            self.tag(TAG_STATE).await?.unwrap_or_default(),
        );
        if shown == (now.0.clone(), crate::inplace::tag_value(&now.1)) {
            self.reported = Some(now);
            return Ok(());
        }
        if self.ec2.is_none() {
            let config = aws_config::defaults(BehaviorVersion::latest()).load().await;
            self.ec2 = Some(aws_sdk_ec2::Client::new(&config));
        }
        let Some(ec2) = &self.ec2 else {
            return Ok(());
        };
        let tag = |key: &str, value: &str| {
            aws_sdk_ec2::types::Tag::builder()
                .key(key)
                .value(crate::inplace::tag_value(value))
                .build()
        };
        ec2.create_tags()
            .resources(&self.instance)
            .tags(tag(TAG_RUNNING, running))
            .tags(tag(TAG_STATE, state))
            .send()
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "ec2:CreateTags on {} failed: {}",
                    self.instance,
                    aws_sdk_ec2::error::DisplayErrorContext(&e)
                )
            })?;
        tracing::info!(instance = %self.instance, %running, %state, "reported on the instance's tags");
        self.reported = Some(now);
        Ok(())
    }
}

/// Whether this is a counted boot (an entry on trial) that systemd has not blessed
/// yet: boot-complete.target not reached. A boot that is not counted is never
/// unblessed.
async fn boot_unblessed(conn: &zbus::Connection) -> bool {
    if !std::path::Path::new(BOOT_COUNTED).exists() {
        return false;
    }
    let state = async {
        let manager = crate::selftest::systemd_manager(conn).await?;
        let unit: zbus::zvariant::OwnedObjectPath =
            manager.call("GetUnit", &("boot-complete.target",)).await?;
        let unit = zbus::Proxy::new(
            conn,
            "org.freedesktop.systemd1",
            unit,
            "org.freedesktop.systemd1.Unit",
        )
        .await?;
        unit.get_property::<String>("ActiveState").await
    };
    !matches!(state.await, Ok(s) if s == "active")
}
