//! The health signal behind fleet rollouts. The fleet and instance templates put
//! `{"devos-health-signal": {"stack", "resource", "region", "version"}}` in the
//! instance's user data, and CloudFormation waits (CreationPolicy, rolling update with
//! WaitOnResourceSignals) until each new instance signals. Once serving, the agent
//! checks itself and calls SignalResource: SUCCESS when healthy, FAILURE with the
//! reason otherwise. Once per boot; on a machine that is not on EC2 (by its DMI vendor,
//! as cloud-init tells) or whose user data asks for no signal, it does nothing. The
//! agent may start before the network: metadata reads are retried for a few minutes.
//!
//! Instance metadata is read with IMDSv2 (session tokens) and the call is signed
//! with the instance role's credentials, both through the AWS SDK's own clients.

use std::path::Path;

use crate::ec2::{metadata, on_ec2};

use aws_config::{BehaviorVersion, Region};
use aws_sdk_cloudformation::types::ResourceSignalStatus;
use serde::Deserialize;

/// What the user data asks for.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Request {
    pub stack: String,
    pub resource: String,
    pub region: String,
    /// The image version the stack expects this instance to run.
    #[serde(default)]
    pub version: Option<String>,
}

#[derive(Deserialize)]
struct UserData {
    #[serde(rename = "devos-health-signal")]
    signal: Option<Request>,
}

/// The signal request in the user data, if any. User data that is not this JSON
/// (a cloud-init script, say) asks for nothing.
pub fn parse_user_data(text: &str) -> Option<Request> {
    serde_json::from_str::<UserData>(text.trim()).ok()?.signal
}

/// One of the agent's own checks.
#[derive(Debug)]
pub struct Check {
    pub name: &'static str,
    pub result: Result<(), Unhealthy>,
}

/// Why a check failed; CloudFormation shows it in the stack's events.
#[derive(Debug, thiserror::Error)]
pub enum Unhealthy {
    #[error("{name} is owned by {owner}, not by the agent")]
    NameTaken { name: &'static str, owner: String },
    #[error("cannot ask the bus who owns {name}: {source}")]
    BusUnreachable {
        name: &'static str,
        source: zbus::Error,
    },
    /// The audit log does not verify: the first problem found.
    #[error("{0}")]
    AuditTampered(String),
    #[error("{0}")]
    AuditUnverifiable(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error(transparent)]
    NoImageVersion(#[from] crate::os_release::OsReleaseError),
    #[error("this image is {have}, the stack expects {want}")]
    WrongImage { have: String, want: String },
}

/// SUCCESS if every check passed, else FAILURE and the reasons (CloudFormation shows
/// the reason in the stack's events; it allows 4 KB).
pub fn verdict(checks: &[Check]) -> (ResourceSignalStatus, Option<String>) {
    let failed: Vec<String> = checks
        .iter()
        .filter_map(|c| c.result.as_ref().err().map(|e| format!("{}: {e}", c.name)))
        .collect();
    if failed.is_empty() {
        (ResourceSignalStatus::Success, None)
    } else {
        let mut reason = format!("devos-agent unhealthy: {}", failed.join("; "));
        reason.truncate(4000);
        (ResourceSignalStatus::Failure, Some(reason))
    }
}

/// The image version check: the version the stack expects against os-release's.
pub fn version_check(expected: Option<&str>, os_release: &Path) -> Check {
    let result = match (expected, crate::os_release::image_version(os_release)) {
        (_, Err(e)) => Err(e.into()),
        (Some(want), Ok(have)) if want != have => Err(Unhealthy::WrongImage {
            have,
            want: want.to_owned(),
        }),
        _ => Ok(()),
    };
    Check {
        name: "image-version",
        result,
    }
}

/// What happened, for the log and the audit log.
#[derive(Debug)]
pub enum Outcome {
    /// Not on EC2, or nothing asked for.
    NotAsked,
    /// Already signalled this boot.
    AlreadySent,
    Sent {
        request: Request,
        instance: String,
        status: ResourceSignalStatus,
        reason: Option<String>,
    },
}

/// Read the request from instance metadata and signal it, unless this boot already
/// did (`marker` holds the boot id of the last signal). `checks` runs only if a
/// signal is asked for.
pub async fn signal(
    marker: &Path,
    checks: impl AsyncFnOnce(&Request) -> Vec<Check>,
) -> anyhow::Result<Outcome> {
    let boot_id = boot_id()?;
    if std::fs::read_to_string(marker).is_ok_and(|m| m.trim() == boot_id) {
        return Ok(Outcome::AlreadySent);
    }
    if !on_ec2() {
        return Ok(Outcome::NotAsked);
    }
    let imds = aws_config::imds::Client::builder().build();
    let Some(request) = metadata(&imds, "/latest/user-data")
        .await?
        .and_then(|text| parse_user_data(&text))
    else {
        return Ok(Outcome::NotAsked);
    };
    // (It names the host the signed call goes to.)
    if !is_region_name(&request.region) {
        anyhow::bail!(
            "the user data's devos-health-signal.region `{}` is not an AWS region name (such as eu-west-1): no signal sent",
            request.region.escape_debug()
        );
    }
    let instance = metadata(&imds, "/latest/meta-data/instance-id")
        .await?
        .ok_or_else(|| anyhow::anyhow!("instance metadata has no instance-id"))?
        .trim()
        .to_owned();
    let (status, reason) = verdict(&checks(&request).await);
    let config = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(request.region.clone()))
        .load()
        .await;
    aws_sdk_cloudformation::Client::new(&config)
        .signal_resource()
        .stack_name(&request.stack)
        .logical_resource_id(&request.resource)
        .unique_id(&instance)
        .status(status.clone())
        .send()
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cloudformation:SignalResource for {}/{} in {} failed: {}",
                request.stack,
                request.resource,
                request.region,
                aws_sdk_cloudformation::error::DisplayErrorContext(&e)
            )
        })?;
    if let Some(dir) = marker.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(marker, boot_id)?;
    Ok(Outcome::Sent {
        request,
        instance,
        status,
        reason,
    })
}

/// An AWS region's name: lower-case words of letters and digits joined by `-`, the
/// first of letters (`eu-west-1`, `us-gov-east-1`, `cn-north-1`).
fn is_region_name(name: &str) -> bool {
    let mut words = name.split('-');
    name.len() <= 32
        && words
            .next()
            .is_some_and(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase()))
        && name.contains('-')
        && words.all(|w| {
            !w.is_empty()
                && w.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
}

/// This boot's id: what tells a move made in this boot from one made before a reboot,
/// and a health signal this boot sent from one an earlier boot sent.
pub fn boot_id() -> anyhow::Result<String> {
    const PATH: &str = "/proc/sys/kernel/random/boot_id";
    let id = std::fs::read_to_string(PATH).map_err(|e| anyhow::anyhow!("{PATH}: {e}"))?;
    match id.trim() {
        "" => anyhow::bail!("{PATH} is empty"),
        id => Ok(id.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_asks_for_a_signal_only_in_its_own_json() {
        let asked = parse_user_data(
            "{\"devos-health-signal\": {\"stack\": \"s\", \"resource\": \"Group\", \"region\": \"eu-west-1\", \"version\": \"1.0\"}}\n",
        );
        assert_eq!(
            asked,
            Some(Request {
                stack: "s".into(),
                resource: "Group".into(),
                region: "eu-west-1".into(),
                version: Some("1.0".into()),
            })
        );
        assert_eq!(parse_user_data("#!/bin/sh\necho hi\n"), None);
        assert_eq!(parse_user_data("{\"other\": 1}"), None);
    }

    #[test]
    fn only_region_names_name_the_signal_s_host() {
        for good in ["eu-west-1", "us-gov-east-1", "cn-north-1", "ap-southeast-4"] {
            assert!(is_region_name(good), "{good}");
        }
        for bad in [
            "",
            "eu",
            "-eu-west-1",
            "eu-west-1-",
            "eu--west-1",
            "EU-west-1",
            "1-west",
            "evil.example/x",
            "eu-west-1.evil.example",
            "eu-west-1@evil",
            "eu-west-1 ",
        ] {
            assert!(!is_region_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn any_failed_check_is_a_failure_with_its_reason() {
        let ok = Check {
            name: "bus-name",
            result: Ok(()),
        };
        assert_eq!(
            verdict(std::slice::from_ref(&ok)),
            (ResourceSignalStatus::Success, None)
        );
        let bad = Check {
            name: "image-version",
            result: Err(Unhealthy::WrongImage {
                have: "1".into(),
                want: "2".into(),
            }),
        };
        let (status, reason) = verdict(&[ok, bad]);
        assert_eq!(status, ResourceSignalStatus::Failure);
        assert_eq!(
            reason.as_deref(),
            Some("devos-agent unhealthy: image-version: this image is 1, the stack expects 2")
        );
    }
}
