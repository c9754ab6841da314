//! The health signal behind fleet rollouts. The fleet and instance templates put
//! `{"devos-health-signal": {"stack", "resource", "region", "version"}}` in the
//! instance's user data, and CloudFormation waits (CreationPolicy, rolling update with
//! WaitOnResourceSignals) until each new instance signals. Once serving, the agent
//! checks itself and calls SignalResource: SUCCESS when healthy, FAILURE with the
//! reason otherwise. Once per boot; on a machine that is not on EC2, or whose user
//! data asks for no signal, it does nothing.
//!
//! Instance metadata is read with IMDSv2 (session tokens) and the call is signed
//! with the instance role's credentials, both through the AWS SDK's own clients.

use std::path::Path;

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
#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub result: Result<(), String>,
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
        (_, Err(e)) => Err(e),
        (Some(want), Ok(have)) if want != have => {
            Err(format!("this image is {have}, the stack expects {want}"))
        }
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
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    if std::fs::read_to_string(marker).is_ok_and(|m| m == boot_id) {
        return Ok(Outcome::AlreadySent);
    }
    let imds = aws_config::imds::Client::builder().build();
    let user_data = match imds.get("/latest/user-data").await {
        Ok(text) => text,
        Err(e) => {
            tracing::debug!("no instance metadata (not on EC2?): {e}");
            return Ok(Outcome::NotAsked);
        }
    };
    let Some(request) = parse_user_data(user_data.as_ref()) else {
        return Ok(Outcome::NotAsked);
    };
    let instance = imds
        .get("/latest/meta-data/instance-id")
        .await
        .map_err(|e| anyhow::anyhow!("cannot read the instance id from instance metadata: {e}"))?;
    let instance = instance.as_ref().trim().to_owned();
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
            result: Err("this image is 1, the stack expects 2".into()),
        };
        let (status, reason) = verdict(&[ok, bad]);
        assert_eq!(status, ResourceSignalStatus::Failure);
        assert_eq!(
            reason.as_deref(),
            Some("devos-agent unhealthy: image-version: this image is 1, the stack expects 2")
        );
    }
}
