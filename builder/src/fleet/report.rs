//! What fleet commands report: one change's outcome, a stack's status, the
//! rollout history; serializable, with a human rendering.

use std::collections::BTreeMap;

use devos_aws::stack::{ResourceChange, Running, Stack};
use serde::Serialize;

use super::gate::Gate;
use super::inplace::Moved;
use crate::model::states::ChangeState;
use crate::store::registry::{Rollout, VersionInfo};
use devos_agent::inplace::{TAG_RUNNING, TAG_STATE};

/// What one deploy, rollout or rollback of one stack did.
#[derive(Debug, Serialize)]
pub(crate) struct Outcome {
    pub(crate) stack: String,
    pub(crate) region: String,
    pub(crate) kind: String,
    pub(crate) image: String,
    pub(crate) from: Option<String>,
    pub(crate) to: String,
    /// succeeded, failed, rolled-back, unchanged or dry-run (interrupted in the registry).
    pub(crate) state: ChangeState,
    pub(crate) reason: Option<String>,
    /// Parameters that change: (before, after).
    pub(crate) parameters: BTreeMap<String, (Option<String>, String)>,
    pub(crate) changes: Vec<ResourceChange>,
    /// Seconds from the command's start to the stack call being issued.
    pub(crate) issued_after: Option<f64>,
    pub(crate) gate: Option<Gate>,
    /// The automatic rollback after a failed update or gate.
    pub(crate) rollback: Option<Box<Outcome>>,
    /// An in-place rollout's instances: the version each ran and its agent's last report.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) instances: Vec<Moved>,
}

impl Outcome {
    /// A change of `stack` to `to` that has not happened yet.
    pub(super) fn planned(
        stack: &str,
        region: &str,
        kind: &str,
        from: Option<&VersionInfo>,
        to: &VersionInfo,
        parameters: BTreeMap<String, (Option<String>, String)>,
    ) -> Self {
        Outcome {
            stack: stack.to_owned(),
            region: region.to_owned(),
            kind: kind.to_owned(),
            image: to.name.clone(),
            from: from.map(|v| v.version.clone()),
            to: to.version.clone(),
            state: ChangeState::InProgress,
            reason: None,
            parameters,
            changes: Vec::new(),
            issued_after: None,
            gate: None,
            rollback: None,
            instances: Vec::new(),
        }
    }

    pub(crate) fn ok(&self) -> bool {
        matches!(
            self.state,
            ChangeState::Succeeded | ChangeState::Unchanged | ChangeState::DryRun
        )
    }

    /// A dry run (or a run) that would change nothing: the stack is at the version
    /// already, or the change set is empty.
    pub(crate) fn nothing_to_do(&self) -> bool {
        self.state == ChangeState::Unchanged
            || (self.state == ChangeState::DryRun
                && self.reason.is_none()
                && self.instances.is_empty()
                && self.changes.is_empty()
                && self.parameters.is_empty())
    }

    pub(crate) fn human(&self) -> String {
        let from = match &self.from {
            Some(from) => format!("{}@{from}", self.image),
            None => format!("new stack of {}", self.image),
        };
        let mut s = format!(
            "{} {} in {}: {from} -> {}: {}\n",
            self.kind, self.stack, self.region, self.to, self.state
        );
        if let Some(r) = &self.reason {
            s.push_str(&format!("  why: {r}\n"));
        }
        for (k, (before, after)) in &self.parameters {
            s.push_str(&format!(
                "  parameter {k}: {} -> {after}\n",
                before.as_deref().unwrap_or("(the template's default)")
            ));
        }
        if self.state == ChangeState::DryRun && self.changes.is_empty() {
            s.push_str("  (CloudFormation reported no resource changes)\n");
        }
        for c in &self.changes {
            s.push_str(&format!(
                "  {:<8} {:<16} {:<36} replacement: {}\n",
                c.action,
                c.logical_id,
                c.resource_type,
                c.replacement.as_deref().unwrap_or("-")
            ));
        }
        if let Some(g) = &self.gate {
            s.push_str(&format!(
                "  gate: {} ({} of {} instances on {} in service)\n",
                if g.passed { "passed" } else { "FAILED" },
                g.in_service,
                g.running.desired,
                g.image_id
            ));
        }
        for m in &self.instances {
            s.push_str(&format!(
                "  {:<20} from {:<24} {}\n",
                m.id,
                m.from,
                if m.state.is_empty() {
                    "(no report)"
                } else {
                    &m.state
                }
            ));
        }
        if let Some(r) = &self.rollback {
            for line in r.human().lines() {
                s.push_str(&format!("  {line}\n"));
            }
        }
        s
    }
}

/// What a stack runs now.
#[derive(Debug, Serialize)]
pub(crate) struct Status {
    pub(crate) stack: Stack,
    pub(crate) version: Option<String>,
    pub(crate) running: Running,
    pub(crate) last: Option<Rollout>,
}

impl Status {
    pub(crate) fn human(&self) -> String {
        let mut s = format!(
            "{} ({}): {}\n",
            self.stack.name,
            self.stack.status,
            self.version.as_deref().unwrap_or("(unknown version)")
        );
        if let Some(g) = &self.running.group {
            s.push_str(&format!("  group {g}, desired {}\n", self.running.desired));
            if !self.running.held.is_empty() {
                s.push_str(&format!(
                    "  suspended by an in-place rollout: {} (resumed when it ends; if none is running, it was killed: the next in-place rollout of the stack resumes them)\n",
                    self.running.held.join(", ")
                ));
            }
        }
        if let Some(lt) = &self.running.launch_template {
            s.push_str(&format!(
                "  launch template {lt} version {} -> {}\n",
                self.running
                    .launch_template_version
                    .as_deref()
                    .unwrap_or("?"),
                self.running.launch_template_image.as_deref().unwrap_or("?")
            ));
        }
        for m in &self.running.instances {
            s.push_str(&format!(
                "  {:<20} {:<22} {:<10} {:<10} {:<9} {}",
                m.id,
                m.image_id,
                m.state,
                m.lifecycle.as_deref().unwrap_or("-"),
                m.health.as_deref().unwrap_or("-"),
                m.address.as_deref().unwrap_or("-")
            ));
            // What its agent reported in an in-place rollout.
            if let Some(running) = m.tags.get(TAG_RUNNING) {
                let state = m.tags.get(TAG_STATE).map_or("", String::as_str);
                s.push_str(&format!("  runs {running} ({state})"));
            }
            s.push('\n');
        }
        if let Some(r) = &self.last {
            s.push_str(&format!(
                "  last: {} {} -> {} {}\n",
                r.kind,
                r.from.as_deref().unwrap_or("-"),
                r.to,
                r.state
            ));
        }
        s
    }
}

pub(crate) fn history_human(rows: &[Rollout]) -> String {
    if rows.is_empty() {
        return "no deploys, rollouts or rollbacks recorded yet\n".to_owned();
    }
    let mut s = String::new();
    for r in rows {
        s.push_str(&format!(
            "{:>4} {} {:<14} {:<20} {:<14} {} -> {} {:<12} {}\n",
            r.id,
            crate::support::time::utc(r.started_at),
            r.kind,
            r.stack,
            r.region,
            r.from.as_deref().unwrap_or("-"),
            r.to,
            r.state,
            r.reason.as_deref().unwrap_or("")
        ));
    }
    s
}
