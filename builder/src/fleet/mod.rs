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

use anyhow::{Context, Result, bail};
use devos_aws::stack::{self, Deployment, ResourceChange, Stack};
use devos_aws::{Aws, AwsOptions};

mod gate;
mod inplace;
mod report;
mod templates;

use gate::{gate, print_event};
pub(crate) use inplace::{Batches, rollout as rollout_in_place};
pub(crate) use report::{Outcome, Status, history_human};
pub(crate) use templates::{Template, render};
use templates::{declared_parameters, published_ami, render_for, template_parameters};

use crate::model::states::ChangeState;
use crate::store::registry::{Registry, VersionInfo};

const TAG_IMAGE: &str = "devos:image";
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
        let v = self.reg.require_passing(reference)?;
        let ami = published_ami(self.reg, &v, &self.region)?;
        if let Some(why) = self.reg.bad_reason(stack_name, &self.region, &v)? {
            bail!(
                "{}@{} is marked bad for stack {stack_name} in {}: {why}\n  hint: build and test a fixed version, then roll that out",
                v.name,
                v.version,
                self.region
            );
        }
        Ok((v, ami))
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
        if plan.dry_run {
            outcome.changes =
                stack::preview(&self.aws, &self.region, plan.stack, &deployment).await?;
            outcome.state = ChangeState::DryRun;
            return Ok(outcome);
        }
        let id = self.reg.start_rollout(
            plan.stack,
            &self.region,
            plan.kind,
            plan.from.as_ref(),
            &plan.to,
        )?;
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
        let failure = self
            .settle_and_gate(plan.stack, &plan.ami, plan.bake, &mut seen, &mut outcome)
            .await?;
        let Some(why) = failure else {
            self.reg.finish_rollout(id, ChangeState::Succeeded, None)?;
            outcome.state = ChangeState::Succeeded;
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
        self.recover(id, plan, &why, outcome).await
    }

    /// The stack update `plan` makes of `s`, and the outcome it starts with (the
    /// parameters that change).
    fn deployment(&self, s: &Stack, plan: &Plan<'_>) -> Result<(Deployment, Outcome)> {
        let yaml = render_for(plan.template, &plan.to, &self.region, &plan.ami)?;
        let declared = template_parameters(&yaml);
        let mut parameters = plan.parameters.clone();
        parameters.insert("ImageId".into(), plan.ami.clone());
        parameters.insert("ImageVersion".into(), plan.to.version.clone());
        let keep: Vec<String> = declared
            .iter()
            .filter(|k| !parameters.contains_key(*k) && s.parameters.contains_key(*k))
            .cloned()
            .collect();
        let deployment = Deployment {
            template: yaml,
            tags: tags(plan.template, &plan.to),
            keep,
            parameters: parameters.clone(),
        };
        let outcome = Outcome::planned(
            plan.stack,
            &self.region,
            plan.kind,
            plan.from.as_ref(),
            &plan.to,
            parameters
                .iter()
                .filter(|(k, v)| s.parameters.get(*k) != Some(*v))
                .map(|(k, v)| (k.clone(), (s.parameters.get(k).cloned(), v.clone())))
                .collect(),
        );
        Ok((deployment, outcome))
    }

    /// After a failed gate: mark the version bad for the stack and put the stack back
    /// on the version it ran (unless CloudFormation already did), finishing rollout
    /// `id`.
    async fn recover(
        &mut self,
        id: i64,
        plan: Plan<'_>,
        why: &str,
        mut outcome: Outcome,
    ) -> Result<Outcome> {
        self.reg.mark_bad(plan.stack, &self.region, &plan.to, why)?;
        let now = stack::describe(&self.aws, &self.region, plan.stack)
            .await?
            .with_context(|| format!("stack {} disappeared", plan.stack))?;
        let back_on_old = now.parameters.get("ImageVersion") != Some(&plan.to.version);
        match plan.from {
            _ if back_on_old => {
                // CloudFormation rolled the update back itself.
                self.reg
                    .finish_rollout(id, ChangeState::RolledBack, Some(why))?;
                outcome.state = ChangeState::RolledBack;
            }
            Some(from) => {
                let from_ami = published_ami(self.reg, &from, &self.region)?;
                let back = Plan {
                    kind: "auto-rollback",
                    stack: plan.stack,
                    template: plan.template,
                    from: Some(plan.to.clone()),
                    to: from,
                    ami: from_ami,
                    parameters: plan.parameters,
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
            }
            None => {
                self.reg
                    .finish_rollout(id, ChangeState::Failed, Some(why))?;
                outcome.state = ChangeState::Failed;
                outcome.reason = Some(format!(
                    "{why}; the version it ran before is not in this registry, so it was not rolled back: roll back with `devos-build fleet rollback --stack {} --to VERSION`",
                    plan.stack
                ));
            }
        }
        Ok(outcome)
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

/// The context of a command that changes stack `t.stack`: the stack's lock is taken
/// first (not for a dry run), so what the change is planned from cannot move under it.
fn changing<'a>(reg: &'a mut Registry, aws: &AwsOptions, t: &Target) -> Result<Ctx<'a>> {
    let cx = context(reg, aws, t.region.as_deref())?;
    if !t.dry_run {
        cx.reg.lock_stack(&t.stack, &cx.region)?;
    }
    Ok(cx)
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
        bail!(
            "fleet deploy: the workspaces template needs a WorkSpaces bundle made from a provisioned WorkSpace\n  hint: follow docs/fleet.md (WorkSpaces), then `devos-build fleet render workspaces` and deploy it with `aws cloudformation deploy`"
        );
    }
    // What needs neither AWS nor credentials is checked first: the parameters given,
    // and the version (boot-tested) in the registry.
    parse_params(
        &req.params,
        &declared_parameters(req.template)?,
        req.template,
    )?;
    reg.require_passing(&req.image)?;
    let mut cx = changing(reg, aws, t)?;
    let (v, ami) = cx.target(&t.stack, &req.image)?;
    let yaml = render_for(req.template, &v, &cx.region, &ami)?;
    let declared = template_parameters(&yaml);
    let mut parameters = parse_params(&req.params, &declared, req.template)?;
    devos_aws::block_on(async {
        let existing = stack::describe(&cx.aws, &cx.region, &t.stack).await?;
        if let Some(s) = existing {
            cx.require_settled(&s)?;
            if let Some(image) = s.tags.get(TAG_IMAGE)
                && image != &v.name
            {
                bail!("stack {} runs image {image}, not {}", t.stack, v.name);
            }
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
        fill_default_network(&cx, &declared, &mut parameters).await?;
        create(&mut cx, t, req.template, v, ami, yaml, parameters).await
    })
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
    let mut cx = changing(reg, aws, t)?;
    devos_aws::block_on(async {
        let mut outcomes = Vec::new();
        for stack_name in canary.into_iter().chain([t.stack.as_str()]) {
            let s = cx.existing(stack_name).await?;
            let template = Ctx::template_of(&s)?;
            let current = cx.current(&s)?;
            let (v, ami) = cx.target(stack_name, &current.resolve(to))?;
            if v.name != current.image {
                bail!(
                    "stack {stack_name} runs image {}, not {}",
                    current.image,
                    v.name
                );
            }
            if current.reference == format!("{}@{}", v.name, v.version) {
                eprintln!("{stack_name} already runs {}", current.reference);
                continue;
            }
            let plan = Plan {
                kind: "rollout",
                stack: stack_name,
                template,
                from: current.known,
                to: v.clone(),
                ami,
                parameters: BTreeMap::new(),
                bake: t.bake,
                dry_run: t.dry_run,
            };
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
    })
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
    let mut cx = changing(reg, aws, t)?;
    devos_aws::block_on(async {
        let s = cx.existing(&t.stack).await?;
        let template = Ctx::template_of(&s)?;
        let current = cx.current(&s)?;
        let reference = match to {
            Some(to) => current.resolve(to),
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
    })
}

/// The newest version other than `current` that passed its gate on the stack and is
/// not marked bad there.
fn last_good(reg: &Registry, stack_name: &str, region: &str, current: &str) -> Result<String> {
    for r in reg.rollouts(Some(stack_name), Some(region))? {
        let reference = format!("{}@{}", r.image, r.to);
        // An in-place rollout leaves the stack's AMI as it was: not one to go back to.
        if r.state != ChangeState::Succeeded || reference == current || r.kind == "in-place" {
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

pub(crate) fn status(reg: &mut Registry, aws: &AwsOptions, t: &Target) -> Result<Status> {
    let cx = context(reg, aws, t.region.as_deref())?;
    devos_aws::block_on(async {
        let stack = stack::describe(&cx.aws, &cx.region, &t.stack)
            .await?
            .with_context(|| format!("there is no stack {} in {}", t.stack, cx.region))?;
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

    fn member(id: &str, ami: &str, health: &str) -> Member {
        Member {
            id: id.into(),
            image_id: ami.into(),
            state: "running".into(),
            lifecycle: Some("InService".into()),
            health: Some(health.into()),
            tags: BTreeMap::new(),
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
        let mut stale = good;
        stale.launch_template_image = Some("ami-old".into());
        assert!(
            judge(&stale, "ami-new")
                .unwrap_err()
                .contains("launch template lt-1 version 2 launches ami-old")
        );
    }

    #[test]
    fn template_parameters_are_the_top_level_parameter_keys() {
        let yaml = "Parameters:\n  ImageId:\n    Type: String\n    Default: x\n  Subnets:\n    Type: String\nResources:\n  Group:\n    Type: X\n";
        assert_eq!(template_parameters(yaml), ["ImageId", "Subnets"]);
    }
}
