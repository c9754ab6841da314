//! The instance's side of an in-place fleet rollout (see [`crate::inplace`]): read the
//! instance's `devos:update-to` tag from instance metadata every
//! `[update] fleet-poll-seconds`, move and reboot, and report on the instance's own
//! tags. Logged and audited, never fatal; off EC2 it does nothing.

use std::sync::Arc;
use std::time::Duration;

use aws_config::BehaviorVersion;

use super::shared::Shared;
use crate::ec2::{metadata, on_ec2};
use crate::inplace::{Attempt, HEALTHY, Step, TAG_RUNNING, TAG_STATE, TAG_UPDATE_TO, decide};

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
    let ec2 =
        aws_sdk_ec2::Client::new(&aws_config::defaults(BehaviorVersion::latest()).load().await);
    let mut reported: Option<(String, String)> = None;
    loop {
        if let Err(e) = tick(&shared, &conn, &imds, &ec2, &instance, &mut reported).await {
            tracing::warn!("in-place updates: {e:#}");
        }
        let period = shared.config().update.fleet_poll_seconds.max(1);
        tokio::time::sleep(Duration::from_secs(period)).await;
    }
}

/// One look at the instance's tags, and what follows from it.
async fn tick(
    shared: &Shared,
    conn: &zbus::Connection,
    imds: &aws_config::imds::Client,
    ec2: &aws_sdk_ec2::Client,
    instance: &str,
    reported: &mut Option<(String, String)>,
) -> anyhow::Result<()> {
    let target = metadata(
        imds,
        &format!("/latest/meta-data/tags/instance/{TAG_UPDATE_TO}"),
    )
    .await?;
    let config = shared.config();
    let os_release = std::fs::read_to_string(&config.os_release).unwrap_or_default();
    let field = |name: &str| crate::os_release::field(&os_release, name);
    let (image, running) = (
        field("IMAGE_ID"),
        field("IMAGE_VERSION").unwrap_or_default(),
    );
    let marker = config.state_dir.join("in-place-attempt");
    let attempt = Attempt::load(&marker);
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let state = match decide(target.as_deref(), &running, attempt.as_ref(), &boot) {
        Step::Idle | Step::Rebooting => return Ok(()),
        Step::Report => {
            let checks = super::health::self_checks(shared, conn, Some(&running)).await;
            match crate::health::verdict(&checks).1 {
                None => HEALTHY.to_owned(),
                Some(reason) => format!("unhealthy: {reason}"),
            }
        }
        Step::Failed(why) => why,
        Step::Move(version) => {
            report(
                ec2,
                instance,
                &running,
                &format!("updating to {version}"),
                reported,
            )
            .await?;
            let mut attempt = Attempt {
                version: version.clone(),
                boot,
                error: None,
            };
            attempt.save(&marker)?;
            let update = config.update.clone();
            let (image, from) = (image.clone(), running.clone());
            let moved = tokio::task::spawn_blocking(move || {
                crate::update::move_to(&update, image.as_deref(), Some(&from), &version)
                    .and_then(|done| crate::update::reboot(&update).map(|()| done))
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
            // (`audit` logs a failed append; the update happened either way.)
            let _ = shared.audit("update.install", Some(0), None, None, detail);
            match moved {
                Ok(done) => {
                    tracing::info!(to = %attempt.version, "{done}; rebooting");
                    return Ok(());
                }
                Err(e) => {
                    attempt.error = Some(e.to_string());
                    attempt.save(&marker)?;
                    format!("failed {}: {e}", attempt.version)
                }
            }
        }
    };
    if reported.as_ref().is_none_or(|(_, s)| *s != state) {
        let _ = shared.audit(
            "update.fleet-report",
            None,
            None,
            None,
            serde_json::json!({ "instance": instance, "running": running, "state": state }),
        );
    }
    report(ec2, instance, &running, &state, reported).await
}

/// Tag the instance with the version it runs and its state, unless that is what the
/// last report said.
async fn report(
    ec2: &aws_sdk_ec2::Client,
    instance: &str,
    running: &str,
    state: &str,
    reported: &mut Option<(String, String)>,
) -> anyhow::Result<()> {
    let now = (running.to_owned(), state.to_owned());
    if reported.as_ref() == Some(&now) {
        return Ok(());
    }
    let tag = |key: &str, value: &str| {
        aws_sdk_ec2::types::Tag::builder()
            .key(key)
            .value(crate::inplace::tag_value(value))
            .build()
    };
    ec2.create_tags()
        .resources(instance)
        .tags(tag(TAG_RUNNING, running))
        .tags(tag(TAG_STATE, state))
        .send()
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "ec2:CreateTags on {instance} failed: {}",
                aws_sdk_ec2::error::DisplayErrorContext(&e)
            )
        })?;
    tracing::info!(%instance, %running, %state, "reported on the instance's tags");
    *reported = Some(now);
    Ok(())
}
