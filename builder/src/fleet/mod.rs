//! Fleets: the CloudFormation templates in `cloudformation/` (handlebars → YAML),
//! rendered for one published version, and the stacks made from them — deployed,
//! rolled forward (canary first) and back, each change gated on the health of what
//! actually runs and recorded in the registry.
//!
//! A rollout updates the stack through a change set (CloudFormation's rolling update
//! replaces the instances, each new one healthy only once its agent signals), streams
//! the stack's events, and then gates: the group's launch template version must hold
//! the new AMI and every instance in service must run it and stay healthy for the bake
//! time. If the update or the gate fails, the stack goes back to the version it ran and
//! the new version is marked bad for that stack.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use devos_aws::stack::{self, Deployment, ResourceChange, Stack};
use devos_aws::{Aws, AwsOptions, interrupted};

mod gate;
mod inplace;
mod report;
mod templates;

use gate::{gate, print_event};
pub(crate) use inplace::{Batches, rollout as rollout_in_place};
pub(crate) use report::{Outcome, Status, history_human};
use templates::{
    MAX_VOLUME_GIB, check_volume_size, declared_parameters, published_ami, render_for, role_models,
    template_parameters,
};
pub(crate) use templates::{Template, render};

use crate::model::states::ChangeState;
use crate::store::registry::{Registry, Rollout, VersionInfo};

use devos_aws::stack::TAG_IMAGE;
const TAG_TEMPLATE: &str = "devos:template";

/// How a fleet command reaches its stack.
pub(crate) struct Target {
    pub(crate) stack: String,
    /// Default: `[aws] region`, else the standard chain's.
    pub(crate) region: Option<String>,
    /// How long the gate watches the new version after the stack update.
    pub(crate) bake: Duration,
    /// Show the change set and change nothing.
    pub(crate) dry_run: bool,
}

/// Everything a fleet command works with.
struct Ctx<'a> {
    reg: &'a mut Registry,
    aws: Aws,
    region: String,
    started: Instant,
}

/// What a stack runs, by its tags and parameters.
struct Current {
    image: String,
    /// NAME@VERSION.
    reference: String,
    /// That version, if this registry knows it.
    known: Option<VersionInfo>,
}

impl Current {
    /// `to` as a reference: NAME@VERSION as given, or VERSION of the stack's image.
    fn resolve(&self, to: &str) -> String {
        if to.contains('@') {
            to.to_owned()
        } else {
            format!("{}@{to}", self.image)
        }
    }
}

/// Why a stack of `image` does not take a version of `other`: one stack runs one
/// image, its versions rolled forward and back.
fn other_image(stack: &str, image: &str, other: &str) -> String {
    format!(
        "stack {stack} runs image {image}, not {other}\n  hint: the stack takes versions of {image}; {other} goes in a stack of its own (`devos-build fleet deploy --stack NEW-STACK --template fleet --image {other}@VERSION`)"
    )
}

/// The image and version a stack runs, by its image tag and ImageVersion parameter;
/// an error for a stack devos-build did not deploy.
fn running_version(s: &Stack) -> Result<(&str, &str)> {
    let image = s.tags.get(TAG_IMAGE).with_context(|| {
        format!(
            "stack {} has no {TAG_IMAGE} tag: it was not deployed by devos-build",
            s.name
        )
    })?;
    let version = s
        .parameters
        .get("ImageVersion")
        .with_context(|| format!("stack {} has no ImageVersion parameter", s.name))?;
    Ok((image, version))
}

/// One planned change of a stack to a version.
struct Plan<'a> {
    kind: &'a str,
    stack: &'a str,
    template: Template,
    from: Option<VersionInfo>,
    to: VersionInfo,
    ami: String,
    /// Parameters set explicitly besides ImageId and ImageVersion.
    parameters: BTreeMap<String, String>,
    bake: Duration,
    dry_run: bool,
}

impl Ctx<'_> {
    /// The version to go to: passed its boot test, published here, not bad here.
    fn target(&self, stack_name: &str, reference: &str) -> Result<(VersionInfo, String)> {
        let (v, ami) = self.candidate(reference)?;
        self.refuse_bad(stack_name, &v)?;
        Ok((v, ami))
    }

    /// The version to go to, wherever it goes: passed its boot test, published here.
    fn candidate(&self, reference: &str) -> Result<(VersionInfo, String)> {
        let v = self.reg.require_passing(reference)?;
        let ami = published_ami(self.reg, &v, &self.region)?;
        Ok((v, ami))
    }

    fn refuse_bad(&self, stack_name: &str, v: &VersionInfo) -> Result<()> {
        if let Some(why) = self.reg.bad_reason(stack_name, &self.region, v)? {
            bail!(
                "{}@{} is marked bad for stack {stack_name} in {}: {why}\n  hint: roll out a fixed version; if the failure was not the version's (capacity, permissions, a parameter), take the mark back with `devos-build fleet unmark --stack {stack_name} {}@{}`",
                v.name,
                v.version,
                self.region,
                v.name,
                v.version
            );
        }
        Ok(())
    }

    async fn existing(&self, stack_name: &str) -> Result<Stack> {
        let s = stack::describe(&self.aws, &self.region, stack_name)
            .await?
            .with_context(|| {
                format!(
                    "there is no stack {stack_name} in {}\n  hint: create it with `devos-build fleet deploy --stack {stack_name} --template fleet --image NAME@VERSION`",
                    self.region
                )
            })?;
        self.require_settled(&s)?;
        Ok(s)
    }

    fn require_settled(&self, s: &Stack) -> Result<()> {
        if s.status == "ROLLBACK_COMPLETE" {
            bail!(
                "stack {} in {} failed its creation ({}): CloudFormation can only delete it\n  hint: delete it (`aws cloudformation delete-stack --stack-name {} --region {}`), then deploy it again",
                s.name,
                self.region,
                s.status,
                s.name,
                self.region
            );
        }
        if s.status.ends_with("_IN_PROGRESS") {
            bail!(
                "stack {} in {} is {}; wait until it settles (`devos-build fleet status --stack {}`)",
                s.name,
                self.region,
                s.status,
                s.name
            );
        }
        Ok(())
    }

    /// The version a stack runs, from its ImageVersion parameter and image tag.
    fn current(&self, s: &Stack) -> Result<Current> {
        let (image, version) = running_version(s)?;
        Ok(Current {
            image: image.to_owned(),
            reference: format!("{image}@{version}"),
            known: self.known(image, version)?,
        })
    }

    /// `image` at `version`, if this registry has it (a failure to read the registry
    /// is an error, not "unknown").
    fn known(&self, image: &str, version: &str) -> Result<Option<VersionInfo>> {
        Ok(self
            .reg
            .versions(Some(image))?
            .into_iter()
            .find(|v| v.version == version))
    }

    fn template_of(s: &Stack) -> Result<Template> {
        match s.tags.get(TAG_TEMPLATE).map(String::as_str) {
            Some("fleet") => Ok(Template::Fleet),
            Some("instance") => Ok(Template::Instance),
            other => bail!(
                "stack {} has template tag {:?}; devos-build rolls out only fleet and instance stacks",
                s.name,
                other.unwrap_or("(none)")
            ),
        }
    }

    /// Change an existing stack to `plan.to`, stream its events, gate, and on failure
    /// go back to `plan.from` and mark `plan.to` bad for the stack.
    async fn change(&mut self, s: &Stack, plan: Plan<'_>) -> Result<Outcome> {
        let (deployment, mut outcome) = self.deployment(s, &plan)?;
        if let Some(row) = self.unjudged(s, &plan)? {
            return self.judge_again(row, plan).await;
        }
        if plan.dry_run {
            outcome.changes =
                stack::preview(&self.aws, &self.region, plan.stack, &deployment).await?;
            outcome.state = ChangeState::DryRun;
            return Ok(outcome);
        }
        // What a failure puts back besides the version: the parameters given, as they
        // were (a stack made before a template had one: its default).
        let before: BTreeMap<String, String> = plan
            .parameters
            .keys()
            .filter_map(|k| {
                let was = s.parameters.get(k).cloned().or_else(|| {
                    NEW_PARAMETER_DEFAULTS
                        .iter()
                        .find(|(name, _)| name == k)
                        .map(|(_, default)| (*default).to_owned())
                })?;
                Some((k.clone(), was))
            })
            .collect();
        let id = self.reg.start_rollout(
            plan.stack,
            &self.region,
            plan.kind,
            plan.from.as_ref(),
            &plan.to,
        )?;
        self.reg.rollout_parameters_before(id, &before)?;
        let mut seen = stack::seen_events(&self.aws, &self.region, plan.stack).await?;
        eprintln!(
            "{} {}: {} -> {}@{} ({})",
            plan.kind,
            plan.stack,
            outcome.from.as_deref().unwrap_or("?"),
            plan.to.name,
            plan.to.version,
            plan.ami
        );
        let update = stack::update(&self.aws, &self.region, plan.stack, &deployment).await;
        let Some(changes) = self.issued(id, &mut outcome, update)? else {
            self.reg.finish_rollout(id, ChangeState::Unchanged, None)?;
            outcome.state = ChangeState::Unchanged;
            return Ok(outcome);
        };
        outcome.changes = changes;
        self.judge(id, plan, before, &mut seen, outcome).await
    }

    /// Wait for the stack of rollout `id`, gate, and on failure go back to `plan.from`
    /// (with the parameters `before`) and mark `plan.to` bad for the stack.
    async fn judge(
        &mut self,
        id: i64,
        plan: Plan<'_>,
        before: BTreeMap<String, String>,
        seen: &mut HashSet<String>,
        mut outcome: Outcome,
    ) -> Result<Outcome> {
        let failure = self
            .settle_and_gate(plan.stack, &plan.ami, plan.bake, seen, &mut outcome)
            .await?;
        let Some(why) = failure else {
            self.reg.finish_rollout(id, ChangeState::Succeeded, None)?;
            outcome.state = ChangeState::Succeeded;
            if let Err(e) = self.narrow_role(&plan, seen).await {
                eprintln!(
                    "warning: {} {}: the agents' role still allows the models of the version it came from too: {e:#}\n  hint: `devos-build fleet deploy --stack {} --template {} --image {}@{}` leaves it only this version's",
                    plan.kind,
                    plan.stack,
                    plan.stack,
                    plan.template.as_str(),
                    plan.to.name,
                    plan.to.version
                );
            }
            return Ok(outcome);
        };
        eprintln!("{} {} failed: {why}", plan.kind, plan.stack);
        outcome.reason = Some(why.clone());
        if plan.kind == "auto-rollback" {
            self.reg
                .finish_rollout(id, ChangeState::Failed, Some(&why))?;
            outcome.state = ChangeState::Failed;
            return Ok(outcome);
        }
        let recovered = self.recover(id, plan, before, &why, outcome).await;
        if let Err(e) = &recovered {
            self.reg.finish_rollout(
                id,
                ChangeState::Failed,
                Some(&format!("{why}; then, going back: {e:#}")),
            )?;
        }
        recovered
    }

    /// Once a change of the stack to `plan.to` passed its gate, no instance runs the
    /// version it came from: the agents' role, which allowed that version's models too
    /// while both ran, is left allowing `plan.to`'s only (a second stack update that
    /// changes the role's policy and nothing else).
    async fn narrow_role(&mut self, plan: &Plan<'_>, seen: &mut HashSet<String>) -> Result<()> {
        let from = plan.from.as_ref();
        if role_models(self.reg, &plan.to, from)? == role_models(self.reg, &plan.to, None)? {
            return Ok(());
        }
        let s = stack::describe(&self.aws, &self.region, plan.stack)
            .await?
            .with_context(|| format!("stack {} disappeared", plan.stack))?;
        // The same update as the change's (its parameters the stack now has), with the
        // role of `plan.to` alone.
        let narrow = self.stack_update(&s, plan, None)?;
        eprintln!(
            "{} {}: leaving the agents' role only {}@{}'s models",
            plan.kind, plan.stack, plan.to.name, plan.to.version
        );
        if stack::update(&self.aws, &self.region, plan.stack, &narrow)
            .await?
            .is_none()
        {
            return Ok(());
        }
        let settled = stack::settle(&self.aws, &self.region, plan.stack, seen, print_event).await?;
        if !stack::succeeded(&settled.status) {
            bail!(
                "its update ended {}{}",
                settled.status,
                settled.reason.map(|r| format!(": {r}")).unwrap_or_default()
            );
        }
        Ok(())
    }

    /// The stack's newest change, if it was interrupted before it was judged and the
    /// stack runs what it went to with nothing else for `plan` to change: it is judged
    /// now rather than taken for done.
    fn unjudged(&self, s: &Stack, plan: &Plan<'_>) -> Result<Option<Rollout>> {
        if plan.kind == "auto-rollback" {
            return Ok(None);
        }
        let Some(last) = self
            .reg
            .rollouts(Some(plan.stack), Some(&self.region))?
            .into_iter()
            .next()
        else {
            return Ok(None);
        };
        // (A dry run takes no lock: a change in progress may be another's, under way.)
        let unjudged = last.state == ChangeState::Interrupted && last.kind != "in-place";
        let runs = s.tags.get(TAG_IMAGE) == Some(&plan.to.name)
            && s.parameters.get("ImageVersion") == Some(&plan.to.version)
            && s.parameters.get("ImageId") == Some(&plan.ami)
            && plan
                .parameters
                .iter()
                .all(|(k, v)| s.parameters.get(k) == Some(v));
        Ok(
            (unjudged && runs && last.image == plan.to.name && last.to == plan.to.version)
                .then_some(last),
        )
    }

    /// Judge interrupted change `row`, which the stack runs: gate it and, if it fails,
    /// go back to the version it came from.
    async fn judge_again(&mut self, row: Rollout, plan: Plan<'_>) -> Result<Outcome> {
        let from = match &row.from {
            Some(version) => self.known(&row.image, version)?,
            None => None,
        };
        let plan = Plan {
            kind: &row.kind,
            from,
            ..plan
        };
        let mut outcome = Outcome::planned(
            plan.stack,
            &self.region,
            plan.kind,
            plan.from.as_ref(),
            &plan.to,
            BTreeMap::new(),
        );
        let what = format!(
            "the stack runs {}@{}, which its {} #{} went to and did not judge ({})",
            plan.to.name, plan.to.version, row.kind, row.id, row.state
        );
        if plan.dry_run {
            outcome.state = ChangeState::DryRun;
            outcome.reason = Some(format!(
                "{what}: this would gate it, and roll back if it fails"
            ));
            return Ok(outcome);
        }
        eprintln!("{} {}: {what}; gating it now", plan.kind, plan.stack);
        self.reg.resume_rollout(row.id)?;
        let mut seen = stack::seen_events(&self.aws, &self.region, plan.stack).await?;
        let before = row.parameters_before.clone();
        self.judge(row.id, plan, before, &mut seen, outcome).await
    }

    /// The stack update `plan` makes of `s`, and the outcome it starts with (the
    /// parameters that change).
    fn deployment(&self, s: &Stack, plan: &Plan<'_>) -> Result<(Deployment, Outcome)> {
        self.check_volume_size(s, plan)?;
        let deployment = self.stack_update(s, plan, plan.from.as_ref())?;
        let outcome = Outcome::planned(
            plan.stack,
            &self.region,
            plan.kind,
            plan.from.as_ref(),
            &plan.to,
            deployment
                .parameters
                .iter()
                .filter(|(k, v)| s.parameters.get(*k) != Some(*v))
                .map(|(k, v)| (k.clone(), (s.parameters.get(k).cloned(), v.clone())))
                .collect(),
        );
        Ok((deployment, outcome))
    }

    /// The root volume `plan` gives `s`'s instances (`VolumeSize` given, else the
    /// stack's) fits `plan.to`'s disk. A deploy takes a new value with the change; a
    /// rollout or rollback needs it changed first, on the version the stack runs.
    fn check_volume_size(&self, s: &Stack, plan: &Plan<'_>) -> Result<()> {
        let value = plan
            .parameters
            .get(VOLUME_SIZE)
            .or(s.parameters.get(VOLUME_SIZE));
        check_volume_size(self.reg, &plan.to, &plan.ami, plan.stack, value, |gib| {
            if plan.kind == "deploy" {
                return deploy_volume_hint(gib);
            }
            let running = plan.from.as_ref().map_or_else(
                || format!("{}@VERSION", plan.to.name),
                |v| format!("{}@{}", v.name, v.version),
            );
            format!(
                "hint: give the stack the room first, on the version it runs: `devos-build fleet deploy --stack {} --template {} --image {running} --param VolumeSize=N` with N from {gib} to {MAX_VOLUME_GIB} (GiB; `VolumeSize=` for each image's own size), then run the {} again",
                plan.stack,
                plan.template.as_str(),
                plan.kind
            )
        })
    }

    /// The update that puts `s` on `plan.to` with `plan.parameters` (the others kept),
    /// its agents' role allowing the models of `also` too.
    fn stack_update(
        &self,
        s: &Stack,
        plan: &Plan<'_>,
        also: Option<&VersionInfo>,
    ) -> Result<Deployment> {
        let yaml = render_for(
            self.reg,
            plan.template,
            &plan.to,
            also,
            &self.region,
            &plan.ami,
        )?;
        let declared = template_parameters(&yaml);
        let mut parameters = plan.parameters.clone();
        parameters.insert("ImageId".into(), plan.ami.clone());
        parameters.insert("ImageVersion".into(), plan.to.version.clone());
        let keep: Vec<String> = declared
            .iter()
            .filter(|k| !parameters.contains_key(*k) && s.parameters.contains_key(*k))
            .cloned()
            .collect();
        Ok(Deployment {
            template: yaml,
            tags: tags(plan.template, &plan.to),
            keep,
            parameters,
        })
    }

    /// After a failed gate: mark the version bad for the stack and put the stack back
    /// on the version it ran, with the parameters `before` (unless CloudFormation
    /// already did, or the change was a rollback: one is not undone by rolling forward),
    /// finishing rollout `id`.
    async fn recover(
        &mut self,
        id: i64,
        plan: Plan<'_>,
        before: BTreeMap<String, String>,
        why: &str,
        mut outcome: Outcome,
    ) -> Result<Outcome> {
        // A change of parameters alone is not the version's failure.
        let same_version = plan.from.as_ref().is_some_and(|f| f.id == plan.to.id);
        if !same_version {
            self.reg.mark_bad(plan.stack, &self.region, &plan.to, why)?;
        }
        let now = stack::describe(&self.aws, &self.region, plan.stack)
            .await?
            .with_context(|| format!("stack {} disappeared", plan.stack))?;
        if now.status == "UPDATE_ROLLBACK_COMPLETE"
            || now.parameters.get("ImageVersion") != Some(&plan.to.version)
        {
            // CloudFormation rolled the update back itself.
            self.reg
                .finish_rollout(id, ChangeState::RolledBack, Some(why))?;
            outcome.state = ChangeState::RolledBack;
            return Ok(outcome);
        }
        let back = match self.way_back(&plan) {
            Ok(back) => back,
            Err(stays) => {
                self.reg
                    .finish_rollout(id, ChangeState::Failed, Some(why))?;
                outcome.state = ChangeState::Failed;
                outcome.reason = Some(format!(
                    "{why}; {stays}\n  hint: `devos-build fleet rollback --stack {} --to VERSION` puts it on a version that passed there (`devos-build fleet history --stack {}` lists them)",
                    plan.stack, plan.stack
                ));
                return Ok(outcome);
            }
        };
        let back = Plan {
            kind: "auto-rollback",
            stack: plan.stack,
            template: plan.template,
            from: Some(plan.to.clone()),
            to: back.0,
            ami: back.1,
            parameters: before,
            bake: Duration::ZERO,
            dry_run: false,
        };
        let rollback = Box::pin(self.change(&now, back)).await?;
        let state = if rollback.ok() {
            ChangeState::RolledBack
        } else {
            ChangeState::Failed
        };
        self.reg.finish_rollout(id, state, Some(why))?;
        outcome.state = state;
        outcome.rollback = Some(Box::new(rollback));
        Ok(outcome)
    }

    /// The version (and its AMI here) a failed `plan` goes back to, or why the stack
    /// stays on `plan.to`.
    fn way_back(&self, plan: &Plan<'_>) -> Result<(VersionInfo, String), String> {
        let to = format!("{}@{}", plan.to.name, plan.to.version);
        let Some(from) = plan.from.clone() else {
            return Err(format!(
                "the version the stack ran before is not in this registry, so it stays on {to}"
            ));
        };
        let from_ref = format!("{}@{}", from.name, from.version);
        if plan.kind == "rollback" {
            return Err(format!(
                "a rollback is not undone by going forward again: the stack stays on {to}, now marked bad for it, not on {from_ref}"
            ));
        }
        match self.reg.bad_reason(plan.stack, &self.region, &from) {
            Ok(Some(bad)) => {
                return Err(format!(
                    "{from_ref}, which the stack ran before, is marked bad for it ({bad}), so the stack stays on {to}"
                ));
            }
            Ok(None) => {}
            Err(e) => {
                return Err(format!(
                    "the registry could not be read ({e:#}), so the stack stays on {to}"
                ));
            }
        }
        match published_ami(self.reg, &from, &self.region) {
            Ok(ami) => Ok((from, ami)),
            Err(e) => Err(format!(
                "it could not go back to {from_ref} ({e:#}), so the stack stays on {to}"
            )),
        }
    }

    /// Record the stack call of rollout `id` that just returned: a failure finishes the
    /// rollout as failed; otherwise the seconds since the command started are kept.
    fn issued<T>(&mut self, id: i64, outcome: &mut Outcome, call: Result<T>) -> Result<T> {
        let issued = match call {
            Ok(issued) => issued,
            Err(e) => {
                self.reg
                    .finish_rollout(id, ChangeState::Failed, Some(&format!("{e:#}")))?;
                return Err(e);
            }
        };
        let issued_after = self.started.elapsed().as_secs_f64();
        self.reg.rollout_issued(id, issued_after)?;
        outcome.issued_after = Some(issued_after);
        Ok(issued)
    }

    /// Wait for the stack, streaming its events, then gate. Returns why it failed.
    async fn settle_and_gate(
        &mut self,
        stack_name: &str,
        ami: &str,
        bake: Duration,
        seen: &mut HashSet<String>,
        outcome: &mut Outcome,
    ) -> Result<Option<String>> {
        let mut first_failure = None;
        let settled = stack::settle(&self.aws, &self.region, stack_name, seen, |e| {
            print_event(e);
            if first_failure.is_none() && e.status.ends_with("_FAILED") {
                first_failure = Some(format!(
                    "{} {}: {}",
                    e.logical_id,
                    e.status,
                    e.reason.as_deref().unwrap_or("no reason given")
                ));
            }
        })
        .await?;
        if !stack::succeeded(&settled.status) {
            let why = first_failure
                .or(settled.reason.clone())
                .unwrap_or_else(|| "no reason given".into());
            return Ok(Some(format!("the stack ended {}: {why}", settled.status)));
        }
        let gate = gate(&self.aws, &self.region, stack_name, ami, bake).await?;
        let failure = gate.reason.clone().filter(|_| !gate.passed);
        outcome.gate = Some(gate);
        Ok(failure.map(|why| format!("health gate: {why}")))
    }
}

fn tags(template: Template, v: &VersionInfo) -> BTreeMap<String, String> {
    BTreeMap::from([
        (TAG_IMAGE.to_owned(), v.name.clone()),
        ("devos:version".to_owned(), v.version.clone()),
        (TAG_TEMPLATE.to_owned(), template.as_str().to_owned()),
    ])
}

/// The context of a command that changes stack `t.stack` (and `also`, a canary): the
/// stacks' locks are taken first (not for a dry run), so what the change is planned
/// from cannot move under it. A change of theirs a devos-build that ended left in
/// progress is then recorded as interrupted (the next change to its version judges it).
fn changing<'a>(
    reg: &'a mut Registry,
    aws: &AwsOptions,
    t: &Target,
    also: Option<&str>,
) -> Result<Ctx<'a>> {
    let cx = context(reg, aws, t.region.as_deref())?;
    if !t.dry_run {
        for stack_name in also.into_iter().chain([t.stack.as_str()]) {
            cx.reg.lock_stack(stack_name, &cx.region)?;
            cx.reg.interrupt_unfinished(
                stack_name,
                &cx.region,
                "the devos-build that made this change ended before it judged it",
            )?;
        }
    }
    Ok(cx)
}

impl Ctx<'_> {
    /// What a command changing `stacks` (`t.stack`, and `also`) ends with: `done`; if
    /// that is an error (a signal's among them), a change of theirs it left in
    /// progress is recorded as interrupted and the error says how to go on.
    fn ended<T>(&mut self, t: &Target, also: Option<&str>, done: Result<T>) -> Result<T> {
        let Err(e) = done else {
            return done;
        };
        if t.dry_run {
            return Err(e);
        }
        let mut left = Vec::new();
        for stack_name in also.into_iter().chain([t.stack.as_str()]) {
            match self
                .reg
                .interrupt_unfinished(stack_name, &self.region, &format!("{e:#}"))
            {
                Ok(0) => {}
                Ok(_) => left.push(stack_name),
                Err(r) => {
                    return Err(anyhow!(
                        "{e:#}\nand then the registry could not record it as interrupted: {r:#}"
                    ));
                }
            }
        }
        if left.is_empty() {
            return Err(e);
        }
        Err(anyhow!(
            "{e:#}\n  hint: the change of {} may have been part-way (`devos-build fleet history --stack {}` shows it as interrupted); once the stack settles, run the same command again: it gates the version the stack then runs and goes back if that fails; or roll back with `devos-build fleet rollback --stack {} --to VERSION`",
            left.join(" and "),
            left[0],
            left[0]
        ))
    }
}

/// `work` until it ends or the first SIGINT or SIGTERM comes (an error then).
fn until_interrupted<T>(work: impl Future<Output = Result<T>>) -> Result<T> {
    devos_aws::block_on(async {
        tokio::select! {
            done = work => done,
            signal = interrupted() => Err(anyhow!("interrupted by {signal}")),
        }
    })
}

fn context<'a>(reg: &'a mut Registry, aws: &AwsOptions, region: Option<&str>) -> Result<Ctx<'a>> {
    let started = Instant::now();
    let (aws, region) = devos_aws::block_on(async {
        let aws = Aws::load(aws).await?;
        let region = match region {
            Some(r) => r.to_owned(),
            None => aws.default_region()?,
        };
        Ok((aws, region))
    })?;
    Ok(Ctx {
        reg,
        aws,
        region,
        started,
    })
}

/// `--param KEY=VALUE` pairs, checked against the template's parameters.
fn parse_params(
    given: &[String],
    declared: &[String],
    template: Template,
) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for p in given {
        let Some((k, v)) = p.split_once('=') else {
            bail!(
                "--param {p}: expected KEY=VALUE, and it has no `=`\n  hint: write `--param {p}=VALUE`, e.g. `--param InstanceType=t3.small`"
            );
        };
        if k == "ImageId" || k == "ImageVersion" {
            bail!(
                "--param {k}: set by --image, not by --param\n  hint: leave out `--param {k}=...` and choose the version with `--image NAME@VERSION` (its AMI in the region becomes ImageId)"
            );
        }
        if !declared.iter().any(|d| d == k) {
            bail!(
                "--param {k}: the {} template has no such parameter\n  hint: it has {}",
                template.as_str(),
                declared.join(", ")
            );
        }
        out.insert(k.to_owned(), v.to_owned());
    }
    Ok(out)
}

/// The parameter of the instance and fleet templates that sizes instances' root
/// volumes (GiB; empty: the image's size).
const VOLUME_SIZE: &str = "VolumeSize";
/// How a `fleet deploy` gives its stack a root volume of at least `gib` GiB.
fn deploy_volume_hint(gib: u64) -> String {
    format!(
        "hint: pass `--param VolumeSize=N` with N from {gib} to {MAX_VOLUME_GIB} (GiB), or `--param VolumeSize=` for the image's size"
    )
}

/// Parameters the templates gained after stacks were made from them, with the default
/// that stands for what those stacks had (what a failed change given one puts back).
const NEW_PARAMETER_DEFAULTS: &[(&str, &str)] = &[(VOLUME_SIZE, "")];

pub(crate) struct DeployRequest {
    pub(crate) template: Template,
    pub(crate) image: String,
    pub(crate) params: Vec<String>,
}

/// Create the stack from a template for a version, or update it to that version
/// (and those parameters) if it exists.
pub(crate) fn deploy(
    reg: &mut Registry,
    aws: &AwsOptions,
    t: &Target,
    req: &DeployRequest,
) -> Result<Outcome> {
    if req.template == Template::Workspaces {
        return Err(crate::support::Usage(
            "fleet deploy: the workspaces template needs a WorkSpaces bundle made from a provisioned WorkSpace\n  hint: follow docs/fleet.md (WorkSpaces), then `devos-build fleet render workspaces` and deploy it with `aws cloudformation deploy`".into(),
        )
        .into());
    }
    // What needs neither AWS nor credentials is checked first: the parameters given,
    // and the version (boot-tested) in the registry.
    parse_params(
        &req.params,
        &declared_parameters(req.template)?,
        req.template,
    )?;
    reg.require_passing(&req.image)?;
    let mut cx = changing(reg, aws, t, None)?;
    let (v, ami) = cx.candidate(&req.image)?;
    let yaml = render_for(cx.reg, req.template, &v, None, &cx.region, &ami)?;
    let declared = template_parameters(&yaml);
    let mut parameters = parse_params(&req.params, &declared, req.template)?;
    let done = until_interrupted(async {
        let existing = stack::describe(&cx.aws, &cx.region, &t.stack).await?;
        if let Some(s) = existing {
            cx.require_settled(&s)?;
            if let Some(image) = s.tags.get(TAG_IMAGE)
                && image != &v.name
            {
                bail!(other_image(&t.stack, image, &v.name));
            }
            if let Some(made) = s.tags.get(TAG_TEMPLATE)
                && made != req.template.as_str()
            {
                bail!(
                    "stack {} was made from the {made} template, not {}: deploying it would replace what it holds (its instances, and their /var)\n  hint: deploy it with --template {made}; to make it from another template, delete the stack first (`aws cloudformation delete-stack --stack-name {}`) and deploy again",
                    t.stack,
                    req.template.as_str(),
                    t.stack
                );
            }
            cx.refuse_bad(&t.stack, &v)?;
            // A stack devos-build did not deploy runs no version to go back to.
            let from = match running_version(&s) {
                Ok((image, version)) => cx.known(image, version)?,
                Err(e) => {
                    tracing::warn!("{e:#}; deploying without a version to roll back to");
                    None
                }
            };
            let plan = Plan {
                kind: "deploy",
                stack: &t.stack,
                template: req.template,
                from,
                to: v,
                ami,
                parameters,
                bake: t.bake,
                dry_run: t.dry_run,
            };
            return cx.change(&s, plan).await;
        }
        check_volume_size(
            cx.reg,
            &v,
            &ami,
            &t.stack,
            parameters.get(VOLUME_SIZE),
            deploy_volume_hint,
        )?;
        // The marks of an earlier stack of this name are not this one's.
        if !t.dry_run {
            let taken = cx.reg.unmark_bad(&t.stack, &cx.region, None)?;
            if taken > 0 {
                eprintln!(
                    "deploy {}: the stack is new; {taken} version(s) marked bad for an earlier stack of that name are no longer",
                    t.stack
                );
            }
        }
        fill_default_network(&cx, &declared, &mut parameters).await?;
        create(&mut cx, t, req.template, v, ami, yaml, parameters).await
    });
    cx.ended(t, None, done)
}

/// When the template needs a network and neither `VpcId` nor its subnets were
/// given, the region's default VPC and its subnets.
async fn fill_default_network(
    cx: &Ctx<'_>,
    declared: &[String],
    parameters: &mut BTreeMap<String, String>,
) -> Result<()> {
    if declared.iter().any(|d| d == "VpcId") {
        let subnet_key = if declared.iter().any(|d| d == "Subnets") {
            "Subnets"
        } else {
            "SubnetId"
        };
        match (
            parameters.contains_key("VpcId"),
            parameters.contains_key(subnet_key),
        ) {
            (true, true) => {}
            (false, false) => {
                let (vpc, subnets) = stack::default_network(&cx.aws, &cx.region).await?;
                let subnets = if subnet_key == "Subnets" {
                    subnets.join(",")
                } else {
                    subnets[0].clone()
                };
                parameters.insert("VpcId".into(), vpc);
                parameters.insert(subnet_key.into(), subnets);
            }
            _ => bail!(
                "--param VpcId and --param {subnet_key} go together: give both, or neither for the default VPC and its subnets"
            ),
        }
    }
    Ok(())
}

/// `fleet deploy` of a stack that does not exist yet: create it and gate it.
async fn create(
    cx: &mut Ctx<'_>,
    t: &Target,
    template: Template,
    v: VersionInfo,
    ami: String,
    yaml: String,
    mut parameters: BTreeMap<String, String>,
) -> Result<Outcome> {
    parameters.insert("ImageId".into(), ami.clone());
    parameters.insert("ImageVersion".into(), v.version.clone());
    let mut outcome = Outcome::planned(
        &t.stack,
        &cx.region,
        "deploy",
        None,
        &v,
        parameters
            .iter()
            .map(|(k, val)| (k.clone(), (None, val.clone())))
            .collect(),
    );
    let deployment = Deployment {
        template: yaml,
        parameters,
        keep: Vec::new(),
        tags: tags(template, &v),
    };
    if t.dry_run {
        outcome.changes = stack::resource_types(&cx.aws, &cx.region, &deployment.template)
            .await?
            .into_iter()
            .map(|resource_type| ResourceChange {
                action: "Add".into(),
                logical_id: String::new(),
                resource_type,
                replacement: None,
            })
            .collect();
        outcome.state = ChangeState::DryRun;
        return Ok(outcome);
    }
    let id = cx
        .reg
        .start_rollout(&t.stack, &cx.region, "deploy", None, &v)?;
    eprintln!(
        "deploy {}: creating with {}@{} ({ami})",
        t.stack, v.name, v.version
    );
    let mut seen = HashSet::new();
    let create = stack::create(&cx.aws, &cx.region, &t.stack, &deployment).await;
    cx.issued(id, &mut outcome, create)?;
    match cx
        .settle_and_gate(&t.stack, &ami, t.bake, &mut seen, &mut outcome)
        .await?
    {
        None => {
            cx.reg.finish_rollout(id, ChangeState::Succeeded, None)?;
            outcome.state = ChangeState::Succeeded;
        }
        Some(why) => {
            cx.reg.finish_rollout(id, ChangeState::Failed, Some(&why))?;
            cx.reg.mark_bad(&t.stack, &cx.region, &v, &why)?;
            outcome.state = ChangeState::Failed;
            outcome.reason = Some(format!(
                "{why}\n  hint: `devos-build fleet status --stack {}` shows what runs; a stack that failed its creation must be deleted before it is deployed again",
                t.stack
            ));
        }
    }
    Ok(outcome)
}

/// Roll a stack to a version: the canary stack first (if any), gated, then the stack.
pub(crate) fn rollout(
    reg: &mut Registry,
    aws: &AwsOptions,
    t: &Target,
    to: &str,
    canary: Option<&str>,
) -> Result<Vec<Outcome>> {
    check_rollout(reg, t, to, canary)?;
    let mut cx = changing(reg, aws, t, canary)?;
    let done = until_interrupted(roll(&mut cx, t, to, canary));
    cx.ended(t, canary, done)
}

async fn roll(
    cx: &mut Ctx<'_>,
    t: &Target,
    to: &str,
    canary: Option<&str>,
) -> Result<Vec<Outcome>> {
    let stacks: Vec<&str> = canary.into_iter().chain([t.stack.as_str()]).collect();
    // Every stack is checked before the first is changed: a mistake about the main
    // stack is said before the canary moves.
    for stack_name in &stacks {
        cx.planned(stack_name, to).await?;
    }
    let mut outcomes = Vec::new();
    for stack_name in stacks {
        let (s, plan) = cx.planned(stack_name, to).await?;
        let plan = Plan {
            bake: t.bake,
            dry_run: t.dry_run,
            ..plan
        };
        let reference = format!("{}@{}", plan.to.name, plan.to.version);
        if s.parameters.get("ImageVersion") == Some(&plan.to.version)
            && cx.unjudged(&s, &plan)?.is_none()
        {
            eprintln!("{stack_name} already runs {reference}");
            continue;
        }
        let v = plan.to.clone();
        let outcome = cx.change(&s, plan).await?;
        let ok = outcome.ok();
        if !ok && Some(stack_name) == canary {
            let why = format!(
                "failed on canary stack {stack_name}: {}",
                outcome.reason.as_deref().unwrap_or("?")
            );
            cx.reg.mark_bad(&t.stack, &cx.region, &v, &why)?;
        }
        outcomes.push(outcome);
        if !ok {
            break;
        }
    }
    Ok(outcomes)
}

impl Ctx<'_> {
    /// Stack `stack_name` as it is now, and its rollout to `to` (without bake or dry
    /// run): the stack exists, is settled and runs the image `to` is of; `to` passed
    /// its boot test, is published here and is not bad for the stack.
    async fn planned<'s>(&self, stack_name: &'s str, to: &str) -> Result<(Stack, Plan<'s>)> {
        let s = self.existing(stack_name).await?;
        let template = Ctx::template_of(&s)?;
        let current = self.current(&s)?;
        let (v, ami) = self.target(stack_name, &current.resolve(to))?;
        if v.name != current.image {
            bail!(other_image(stack_name, &current.image, &v.name));
        }
        let plan = Plan {
            kind: "rollout",
            stack: stack_name,
            template,
            from: current.known,
            to: v,
            ami,
            parameters: BTreeMap::new(),
            bake: Duration::ZERO,
            dry_run: true,
        };
        // Every stack is checked before the first (a canary) changes.
        self.check_volume_size(&s, &plan)?;
        Ok((s, plan))
    }
}

/// What `fleet rollout` can refuse before AWS is asked: a canary that is the stack
/// itself, and a NAME@VERSION that has not passed its boot test (a bare VERSION is of
/// the stack's image, known only from AWS).
fn check_rollout(reg: &Registry, t: &Target, to: &str, canary: Option<&str>) -> Result<()> {
    if canary == Some(t.stack.as_str()) {
        bail!(
            "--canary-stack {0} is the stack being rolled out (--stack {0})\n  hint: name another stack to roll first, or leave out --canary-stack",
            t.stack
        );
    }
    if to.contains('@') {
        reg.require_passing(to)?;
    }
    Ok(())
}

/// Roll a stack back to `to`, or to the last version that passed its gate there.
pub(crate) fn rollback(
    reg: &mut Registry,
    aws: &AwsOptions,
    t: &Target,
    to: Option<&str>,
) -> Result<Outcome> {
    let mut cx = changing(reg, aws, t, None)?;
    let done = until_interrupted(async {
        let s = cx.existing(&t.stack).await?;
        let template = Ctx::template_of(&s)?;
        let current = cx.current(&s)?;
        let newest = cx
            .reg
            .rollouts(Some(&t.stack), Some(&cx.region))?
            .into_iter()
            .next();
        let reference = match to {
            Some(to) => current.resolve(to),
            // Run again after it was interrupted: the rollback the stack runs is judged.
            None if newest.is_some_and(|r| {
                r.kind == "rollback"
                    && r.state == ChangeState::Interrupted
                    && format!("{}@{}", r.image, r.to) == current.reference
            }) =>
            {
                current.reference.clone()
            }
            None => last_good(cx.reg, &t.stack, &cx.region, &current.reference)?,
        };
        let (v, ami) = cx.target(&t.stack, &reference)?;
        let plan = Plan {
            kind: "rollback",
            stack: &t.stack,
            template,
            from: current.known,
            to: v,
            ami,
            parameters: BTreeMap::new(),
            bake: t.bake,
            dry_run: t.dry_run,
        };
        cx.change(&s, plan).await
    });
    cx.ended(t, None, done)
}

/// The newest version other than `current` that passed its gate on the stack, is
/// not marked bad there and was not rolled back from by hand since.
fn last_good(reg: &Registry, stack_name: &str, region: &str, current: &str) -> Result<String> {
    let mut left = HashSet::new();
    for r in reg.rollouts(Some(stack_name), Some(region))? {
        let reference = format!("{}@{}", r.image, r.to);
        // Left by hand, however that went (a rollback that failed or was interrupted
        // left it too).
        if r.kind == "rollback"
            && r.state != ChangeState::Unchanged
            && let Some(from) = &r.from
        {
            left.insert(format!("{}@{from}", r.image));
        }
        // An in-place rollout leaves the stack's AMI as it was: not one to go back to.
        if r.state != ChangeState::Succeeded
            || reference == current
            || r.kind == "in-place"
            || left.contains(&reference)
        {
            continue;
        }
        if let Ok(v) = reg.find(&reference)
            && reg.bad_reason(stack_name, region, &v)?.is_none()
        {
            return Ok(reference);
        }
    }
    bail!(
        "no version other than {current} passed its gate on stack {stack_name} in {region}\n  hint: name one with --to VERSION (`devos-build fleet history --stack {stack_name}` lists what ran)"
    )
}

/// A mark of a version as bad for a stack, taken back.
#[derive(serde::Serialize)]
pub(crate) struct Unmarked {
    stack: String,
    region: String,
    image: String,
    version: String,
    /// Why it had been marked bad.
    reason: String,
    /// `--dry-run`: the mark stays.
    dry_run: bool,
}

impl Unmarked {
    pub(crate) fn human(&self) -> String {
        format!(
            "{}@{} {} marked bad for stack {} in {} (it was: {})\n",
            self.image,
            self.version,
            if self.dry_run {
                "would no longer be"
            } else {
                "is no longer"
            },
            self.stack,
            self.region,
            self.reason
        )
    }
}

/// Take back the mark of `reference` as bad for stack `t.stack`.
pub(crate) fn unmark(
    reg: &mut Registry,
    aws: &AwsOptions,
    t: &Target,
    reference: &str,
) -> Result<Unmarked> {
    let cx = changing(reg, aws, t, None)?;
    let v = cx.reg.find(reference)?;
    let at = format!("stack {} in {}", t.stack, cx.region);
    let why = cx.reg.bad_reason(&t.stack, &cx.region, &v)?.with_context(|| {
        format!(
            "{}@{} is not marked bad for {at}\n  hint: `devos-build fleet history --stack {}` lists its changes; a version is marked bad where a rollout of it failed",
            v.name, v.version, t.stack
        )
    })?;
    if !t.dry_run {
        cx.reg.unmark_bad(&t.stack, &cx.region, Some(&v))?;
    }
    Ok(Unmarked {
        stack: t.stack.clone(),
        region: cx.region.clone(),
        image: v.name,
        version: v.version,
        reason: why,
        dry_run: t.dry_run,
    })
}

pub(crate) fn status(reg: &mut Registry, aws: &AwsOptions, t: &Target) -> Result<Status> {
    let cx = context(reg, aws, t.region.as_deref())?;
    devos_aws::block_on(async {
        let stack = stack::describe(&cx.aws, &cx.region, &t.stack)
            .await?
            .with_context(|| {
                format!(
                    "there is no stack {} in {}\n  hint: `devos-build fleet history` lists the stacks devos-build changed, and where; create one with `devos-build fleet deploy --stack {} --template fleet --image NAME@VERSION`",
                    t.stack, cx.region, t.stack
                )
            })?;
        // None for a stack devos-build did not deploy: the report shows no version.
        let version = running_version(&stack)
            .ok()
            .map(|(image, version)| format!("{image}@{version}"));
        let running = stack::running(&cx.aws, &cx.region, &t.stack).await?;
        let last = cx
            .reg
            .rollouts(Some(&t.stack), Some(&cx.region))?
            .into_iter()
            .next();
        Ok(Status {
            stack,
            version,
            running,
            last,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::gate::judge;
    use super::*;
    use devos_aws::stack::{Member, Running};
    use std::path::Path;

    fn member(id: &str, ami: &str, health: &str) -> Member {
        Member {
            id: id.into(),
            image_id: ami.into(),
            state: "running".into(),
            lifecycle: Some("InService".into()),
            health: Some(health.into()),
            tags: BTreeMap::new(),
            address: None,
        }
    }

    fn running(instances: Vec<Member>) -> Running {
        Running {
            group: Some("g".into()),
            desired: 2,
            launch_template: Some("lt-1".into()),
            launch_template_version: Some("2".into()),
            launch_template_image: Some("ami-new".into()),
            held: Vec::new(),
            held_tag: false,
            instances,
        }
    }

    #[test]
    fn the_gate_passes_only_a_full_healthy_group_on_the_new_ami() {
        let good = running(vec![
            member("i-1", "ami-new", "Healthy"),
            member("i-2", "ami-new", "Healthy"),
        ]);
        assert_eq!(judge(&good, "ami-new"), Ok(None));
        let short = running(vec![member("i-1", "ami-new", "Healthy")]);
        assert_eq!(
            judge(&short, "ami-new"),
            Ok(Some("1 of 2 instances in service on ami-new".into()))
        );
        let sick = running(vec![
            member("i-1", "ami-new", "Healthy"),
            member("i-2", "ami-new", "Unhealthy"),
        ]);
        assert_eq!(
            judge(&sick, "ami-new"),
            Err("instance i-2 is Unhealthy".into())
        );
        let old = running(vec![
            member("i-1", "ami-old", "Healthy"),
            member("i-2", "ami-new", "Healthy"),
        ]);
        assert!(
            judge(&old, "ami-new")
                .unwrap_err()
                .contains("i-1 is in service on ami-old")
        );
        // A healthy instance the group takes out itself (a scale-in) fails nothing; one
        // it counts in service that stopped does.
        let mut leaving = member("i-3", "ami-new", "Healthy");
        leaving.state = "shutting-down".into();
        leaving.lifecycle = Some("Terminating".into());
        let mut scaled_in = running(vec![
            member("i-1", "ami-new", "Healthy"),
            member("i-2", "ami-new", "Healthy"),
            leaving.clone(),
        ]);
        assert_eq!(judge(&scaled_in, "ami-new"), Ok(None));
        leaving.lifecycle = Some("InService".into());
        leaving.state = "stopped".into();
        scaled_in.instances[2] = leaving;
        assert_eq!(
            judge(&scaled_in, "ami-new"),
            Err("instance i-3 is stopped".into())
        );
        let mut stale = good;
        stale.launch_template_image = Some("ami-old".into());
        assert!(
            judge(&stale, "ami-new")
                .unwrap_err()
                .contains("launch template lt-1 version 2 launches ami-old")
        );
    }

    /// A registry (in `tmp`) holding builds of `versions` of devos-test.
    fn registry_with(tmp: &Path, versions: &[&str]) -> (Registry, Vec<VersionInfo>) {
        let builds: Vec<_> = versions.iter().map(|v| (*v, None)).collect();
        templates::tests::registry_calling(tmp, &builds)
    }

    /// A change of stack `s` in region `r` that succeeded.
    fn succeeded(reg: &mut Registry, kind: &str, from: Option<&VersionInfo>, to: &VersionInfo) {
        let id = reg.start_rollout("s", "r", kind, from, to).unwrap();
        reg.finish_rollout(id, ChangeState::Succeeded, None)
            .unwrap();
    }

    #[test]
    fn a_version_rolled_back_from_by_hand_is_no_default_to_roll_back_to() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut reg, v) = registry_with(tmp.path(), &["1.0.0+a", "2.0.0+b"]);
        let (v1, v2) = (&v[0], &v[1]);
        succeeded(&mut reg, "deploy", None, v1);
        succeeded(&mut reg, "rollout", Some(v1), v2);
        succeeded(&mut reg, "rollback", Some(v2), v1);
        // Back on 1.0.0 by hand, away from 2.0.0: a second rollback does not go forward.
        let e = last_good(&reg, "s", "r", "devos-test@1.0.0+a").unwrap_err();
        assert!(e.to_string().contains("no version other than"), "{e}");
        // Rolled out again and passed: 1.0.0 is where a rollback goes.
        succeeded(&mut reg, "rollout", Some(v1), v2);
        assert_eq!(
            last_good(&reg, "s", "r", "devos-test@2.0.0+b").unwrap(),
            "devos-test@1.0.0+a"
        );
    }

    #[test]
    fn a_rollback_without_to_skips_versions_marked_bad() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut reg, v) = registry_with(tmp.path(), &["1.0.0+a", "2.0.0+b", "3.0.0+c"]);
        let (v1, v2, v3) = (&v[0], &v[1], &v[2]);
        succeeded(&mut reg, "rollout", None, v1);
        succeeded(&mut reg, "rollout", Some(v1), v2);
        succeeded(&mut reg, "rollout", Some(v2), v3);
        assert_eq!(
            last_good(&reg, "s", "r", "devos-test@3.0.0+c").unwrap(),
            "devos-test@2.0.0+b"
        );
        // 2.0.0 passed its gate there, but was marked bad since (on a canary, say).
        reg.mark_bad("s", "r", v2, "failed on canary stack c")
            .unwrap();
        assert_eq!(
            last_good(&reg, "s", "r", "devos-test@3.0.0+c").unwrap(),
            "devos-test@1.0.0+a"
        );
        // Marked bad for another stack, or in another region: still where s goes back.
        reg.mark_bad("other", "r", v1, "x").unwrap();
        reg.mark_bad("s", "elsewhere", v1, "x").unwrap();
        assert_eq!(
            last_good(&reg, "s", "r", "devos-test@3.0.0+c").unwrap(),
            "devos-test@1.0.0+a"
        );
        reg.mark_bad("s", "r", v1, "x").unwrap();
        assert!(last_good(&reg, "s", "r", "devos-test@3.0.0+c").is_err());
    }

    #[test]
    fn template_parameters_are_the_top_level_parameter_keys() {
        let yaml = "Parameters:\n  ImageId:\n    Type: String\n    Default: x\n  Subnets:\n    Type: String\nResources:\n  Group:\n    Type: X\n";
        assert_eq!(template_parameters(yaml), ["ImageId", "Subnets"]);
    }
}
