//! The health gate: what the stack's real resources run, judged against the new
//! version, watched for the bake time.

use std::time::{Duration, Instant};

use anyhow::Result;
use devos_aws::Aws;
use devos_aws::stack::{self, Event, Running};
use serde::Serialize;

/// The health gate's verdict on the real resources.
#[derive(Debug, Serialize)]
pub(crate) struct Gate {
    pub(crate) passed: bool,
    pub(crate) reason: Option<String>,
    pub(crate) image_id: String,
    pub(crate) in_service: usize,
    pub(crate) baked_seconds: f64,
    pub(crate) running: Running,
}

/// Why the resources do not (yet) run `ami` healthily: Err for a failure that waiting
/// cannot mend, Ok(Some) for a shortfall that may still fill up, Ok(None) for healthy.
pub(super) fn judge(r: &Running, ami: &str) -> Result<Option<String>, String> {
    if let Some(lt_ami) = &r.launch_template_image
        && lt_ami != ami
    {
        return Err(format!(
            "launch template {} version {} launches {lt_ami}, not {ami}",
            r.launch_template.as_deref().unwrap_or("?"),
            r.launch_template_version.as_deref().unwrap_or("?")
        ));
    }
    for m in &r.instances {
        if m.health.as_deref() == Some("Unhealthy") {
            return Err(format!("instance {} is Unhealthy", m.id));
        }
        let serving =
            m.state == "running" && m.lifecycle.as_deref().is_none_or(|l| l == "InService");
        if serving && m.image_id != ami {
            return Err(format!(
                "instance {} is in service on {}, not {ami}",
                m.id, m.image_id
            ));
        }
        // One the group still counts in service that went down; not one it is taking
        // out itself (a scale-in: Terminating, Detaching, Standby), which only counts
        // against the capacity below.
        let counted = m
            .lifecycle
            .as_deref()
            .is_none_or(|l| l == "InService" || l.starts_with("Pending"));
        if counted && matches!(m.state.as_str(), "shutting-down" | "terminated" | "stopped") {
            return Err(format!("instance {} is {}", m.id, m.state));
        }
    }
    let serving = in_service(r, ami);
    if serving < r.desired {
        return Ok(Some(format!(
            "{serving} of {} instances in service on {ami}",
            r.desired
        )));
    }
    Ok(None)
}

pub(super) fn in_service(r: &Running, ami: &str) -> usize {
    r.instances
        .iter()
        .filter(|m| {
            m.state == "running"
                && m.image_id == ami
                && m.lifecycle.as_deref().is_none_or(|l| l == "InService")
        })
        .count()
}

/// Watch the stack's resources for `bake`: every instance in service must run `ami`
/// and stay healthy, and as many as the group wants must be in service at the end.
pub(super) async fn gate(
    aws: &Aws,
    region: &str,
    stack_name: &str,
    ami: &str,
    bake: Duration,
) -> Result<Gate> {
    let started = Instant::now();
    loop {
        let running = stack::running(aws, region, stack_name).await?;
        let verdict = judge(&running, ami);
        let done = started.elapsed() >= bake;
        let reason = match verdict {
            Err(why) => Some(why),
            Ok(Some(short)) if done => Some(short),
            Ok(None) if done => None,
            Ok(_) => {
                tokio::time::sleep(Duration::from_secs(2).min(bake)).await;
                continue;
            }
        };
        return Ok(Gate {
            passed: reason.is_none(),
            reason,
            image_id: ami.to_owned(),
            in_service: in_service(&running, ami),
            baked_seconds: started.elapsed().as_secs_f64(),
            running,
        });
    }
}

pub(super) fn print_event(e: &Event) {
    let time = e.time.get(11..19).unwrap_or(&e.time);
    eprintln!(
        "  {time} {:<16} {:<28} {}",
        e.logical_id,
        e.status,
        e.reason.as_deref().unwrap_or("")
    );
}
