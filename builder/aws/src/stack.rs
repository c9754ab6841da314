//! CloudFormation stacks and what runs in them: create a stack, update it through a
//! change set (or only preview the change set), stream its events while it changes,
//! and read back the real resources the health gate looks at — the launch template
//! version in use with its AMI, and every instance with its AMI and health.
//!
//! Also the account's default VPC and its default subnets, which network parameters
//! default to, as the AWS CLI's `run-instances` does.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use aws_sdk_cloudformation::types::{Capability, ChangeSetStatus, ChangeSetType, Parameter, Tag};
use aws_sdk_ec2::types::Filter;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use serde::Serialize;

use crate::{Aws, explain};

/// How often a changing stack is polled for events.
const POLL: Duration = Duration::from_secs(2);
/// CloudFormation gives up on its own long before this; it only guards against a
/// stack that never settles.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(3 * 3600);

/// A stack as CloudFormation reports it.
#[derive(Debug, Clone, Serialize)]
pub struct Stack {
    pub name: String,
    pub id: String,
    pub status: String,
    pub reason: Option<String>,
    pub parameters: BTreeMap<String, String>,
    pub tags: BTreeMap<String, String>,
    pub outputs: BTreeMap<String, String>,
}

/// What to deploy: the template and the parameters that differ from the stack's
/// current values (or, for a new stack, from the template's defaults).
#[derive(Debug, Clone)]
pub struct Deployment {
    pub template: String,
    pub parameters: BTreeMap<String, String>,
    /// Parameters the stack already has that keep their value.
    pub keep: Vec<String>,
    pub tags: BTreeMap<String, String>,
}

impl Deployment {
    fn parameters(&self) -> Vec<Parameter> {
        let set = self.parameters.iter().map(|(k, v)| {
            Parameter::builder()
                .parameter_key(k)
                .parameter_value(v)
                .build()
        });
        let kept = self.keep.iter().map(|k| {
            Parameter::builder()
                .parameter_key(k)
                .use_previous_value(true)
                .build()
        });
        set.chain(kept).collect()
    }

    fn tags(&self) -> Vec<Tag> {
        self.tags
            .iter()
            .map(|(k, v)| Tag::builder().key(k).value(v).build())
            .collect()
    }
}

/// One resource change of a change set.
#[derive(Debug, Clone, Serialize)]
pub struct ResourceChange {
    pub action: String,
    pub logical_id: String,
    pub resource_type: String,
    /// True, False or Conditional (for a Modify).
    pub replacement: Option<String>,
}

/// One stack event, as streamed while the stack changes.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub time: String,
    pub logical_id: String,
    pub resource_type: String,
    pub status: String,
    pub reason: Option<String>,
}

/// A name no earlier call used: milliseconds since the epoch.
fn unique() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default()
}

/// Whether a settled stack status means the last operation worked.
pub fn succeeded(status: &str) -> bool {
    matches!(
        status,
        "CREATE_COMPLETE" | "UPDATE_COMPLETE" | "IMPORT_COMPLETE"
    )
}

fn settled(status: &str) -> bool {
    !status.ends_with("_IN_PROGRESS")
}

/// The tag naming the image a stack devos-build deployed runs (its version is the
/// stack's `ImageVersion` parameter).
pub const TAG_IMAGE: &str = "devos:image";

/// The stacks among `names` in `region` that run `image` at `version`, by their
/// [`TAG_IMAGE`] tag and `ImageVersion` parameter (a stack gone since is none).
pub async fn running_version(
    aws: &Aws,
    region: &str,
    names: &[String],
    image: &str,
    version: &str,
) -> Result<Vec<String>> {
    let mut running = Vec::new();
    for name in names {
        if let Some(s) = describe(aws, region, name).await?
            && s.tags.get(TAG_IMAGE).is_some_and(|i| i == image)
            && s.parameters
                .get("ImageVersion")
                .is_some_and(|v| v == version)
        {
            running.push(name.clone());
        }
    }
    Ok(running)
}

/// The stack, or None if there is none of that name.
pub async fn describe(aws: &Aws, region: &str, name: &str) -> Result<Option<Stack>> {
    let out = match aws
        .cloudformation(region)
        .describe_stacks()
        .stack_name(name)
        .send()
        .await
    {
        Ok(out) => out,
        Err(e) if e.message().is_some_and(|m| m.contains("does not exist")) => return Ok(None),
        Err(e) => return Err(explain("cloudformation:DescribeStacks", region, e)),
    };
    let Some(s) = out.stacks().first() else {
        return Ok(None);
    };
    Ok(Some(Stack {
        name: s.stack_name().unwrap_or(name).to_owned(),
        id: s.stack_id().unwrap_or_default().to_owned(),
        status: s
            .stack_status()
            .map(|st| st.as_str().to_owned())
            .unwrap_or_default(),
        reason: s.stack_status_reason().map(str::to_owned),
        parameters: s
            .parameters()
            .iter()
            .filter_map(|p| {
                Some((
                    p.parameter_key()?.to_owned(),
                    p.parameter_value()?.to_owned(),
                ))
            })
            .collect(),
        tags: s
            .tags()
            .iter()
            .filter_map(|t| Some((t.key()?.to_owned(), t.value()?.to_owned())))
            .collect(),
        outputs: s
            .outputs()
            .iter()
            .filter_map(|o| Some((o.output_key()?.to_owned(), o.output_value()?.to_owned())))
            .collect(),
    }))
}

/// The ids of the events the stack has now, so that [`settle`] shows only new ones.
pub async fn seen_events(aws: &Aws, region: &str, name: &str) -> Result<HashSet<String>> {
    Ok(events(aws, region, name)
        .await?
        .into_iter()
        .map(|(id, _)| id)
        .collect())
}

/// The stack's most recent events (one page, not a paginator: a poll needs only what
/// happened since the last one, not the stack's whole history), newest first.
async fn events(aws: &Aws, region: &str, name: &str) -> Result<Vec<(String, Event)>> {
    let out = aws
        .cloudformation(region)
        .describe_stack_events()
        .stack_name(name)
        .send()
        .await
        .map_err(|e| explain("cloudformation:DescribeStackEvents", region, e))?;
    Ok(out
        .stack_events()
        .iter()
        .map(|e| {
            let time = e
                .timestamp()
                .and_then(|t| t.fmt(aws_smithy_types::date_time::Format::DateTime).ok())
                .unwrap_or_default();
            (
                e.event_id().unwrap_or_default().to_owned(),
                Event {
                    time,
                    logical_id: e.logical_resource_id().unwrap_or_default().to_owned(),
                    resource_type: e.resource_type().unwrap_or_default().to_owned(),
                    status: e
                        .resource_status()
                        .map(|s| s.as_str().to_owned())
                        .unwrap_or_default(),
                    reason: e.resource_status_reason().map(str::to_owned),
                },
            )
        })
        .collect())
}

/// Create a stack (IAM capability granted: the templates create the agent's role).
pub async fn create(aws: &Aws, region: &str, name: &str, d: &Deployment) -> Result<()> {
    aws.cloudformation(region)
        .create_stack()
        .stack_name(name)
        // The SDK retries a CreateStack whose answer was lost; the token makes the
        // retry the same request instead of a second stack.
        .client_request_token(format!("devos-{}", unique()))
        .template_body(&d.template)
        .set_parameters(Some(d.parameters()))
        .set_tags(Some(d.tags()))
        .capabilities(Capability::CapabilityIam)
        .send()
        .await
        .map_err(|e| explain("cloudformation:CreateStack", region, e))?;
    Ok(())
}

/// Make a change set for updating the stack and wait until CloudFormation has worked
/// out its changes. Returns its name and the changes; None if there are none.
async fn change_set(
    aws: &Aws,
    region: &str,
    name: &str,
    d: &Deployment,
) -> Result<Option<(String, Vec<ResourceChange>)>> {
    let cf = aws.cloudformation(region);
    let set = format!("devos-{}", unique());
    cf.create_change_set()
        .stack_name(name)
        .change_set_name(&set)
        .change_set_type(ChangeSetType::Update)
        .template_body(&d.template)
        .set_parameters(Some(d.parameters()))
        .set_tags(Some(d.tags()))
        .capabilities(Capability::CapabilityIam)
        .send()
        .await
        .map_err(|e| explain("cloudformation:CreateChangeSet", region, e))?;
    // Not the SDK's change_set_create_complete waiter: it waits a fixed 30 s before its
    // second poll (Rust waiters take only a deadline), which every dry run and rollout
    // step would feel for a change set CloudFormation works out in seconds; and its
    // failure state, FAILED, is here also the normal answer to an update that changes
    // nothing.
    let started = Instant::now();
    loop {
        let out = cf
            .describe_change_set()
            .stack_name(name)
            .change_set_name(&set)
            .send()
            .await
            .map_err(|e| explain("cloudformation:DescribeChangeSet", region, e))?;
        match out.status() {
            Some(ChangeSetStatus::CreateComplete) => {
                let changes = out
                    .changes()
                    .iter()
                    .filter_map(|c| c.resource_change())
                    .map(|r| ResourceChange {
                        action: r
                            .action()
                            .map(|a| a.as_str().to_owned())
                            .unwrap_or_default(),
                        logical_id: r.logical_resource_id().unwrap_or_default().to_owned(),
                        resource_type: r.resource_type().unwrap_or_default().to_owned(),
                        replacement: r.replacement().map(|x| x.as_str().to_owned()),
                    })
                    .collect();
                return Ok(Some((set, changes)));
            }
            Some(ChangeSetStatus::Failed) => {
                let reason = out.status_reason().unwrap_or_default().to_owned();
                delete_change_set(aws, region, name, &set).await?;
                // CloudFormation refuses an update that changes nothing.
                if reason.contains("didn't contain changes") || reason.contains("No updates") {
                    return Ok(None);
                }
                bail!("the change set for stack {name} in {region} failed: {reason}");
            }
            _ if started.elapsed() > Duration::from_secs(600) => {
                bail!(
                    "the change set {set} for stack {name} in {region} is not ready after 10 minutes"
                )
            }
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

async fn delete_change_set(aws: &Aws, region: &str, name: &str, set: &str) -> Result<()> {
    aws.cloudformation(region)
        .delete_change_set()
        .stack_name(name)
        .change_set_name(set)
        .send()
        .await
        .map_err(|e| explain("cloudformation:DeleteChangeSet", region, e))?;
    Ok(())
}

/// What updating the stack would change, without changing it.
pub async fn preview(
    aws: &Aws,
    region: &str,
    name: &str,
    d: &Deployment,
) -> Result<Vec<ResourceChange>> {
    match change_set(aws, region, name, d).await? {
        Some((set, changes)) => {
            delete_change_set(aws, region, name, &set).await?;
            Ok(changes)
        }
        None => Ok(Vec::new()),
    }
}

/// Update the stack through a change set. Returns the changes, or None when the
/// update would change nothing (and nothing was done).
pub async fn update(
    aws: &Aws,
    region: &str,
    name: &str,
    d: &Deployment,
) -> Result<Option<Vec<ResourceChange>>> {
    let Some((set, changes)) = change_set(aws, region, name, d).await? else {
        return Ok(None);
    };
    aws.cloudformation(region)
        .execute_change_set()
        .stack_name(name)
        .change_set_name(&set)
        .client_request_token(&set)
        .send()
        .await
        .map_err(|e| explain("cloudformation:ExecuteChangeSet", region, e))?;
    Ok(Some(changes))
}

/// The resource types a template creates, for previewing a stack that does not exist.
pub async fn resource_types(aws: &Aws, region: &str, template: &str) -> Result<Vec<String>> {
    let out = aws
        .cloudformation(region)
        .get_template_summary()
        .template_body(template)
        .send()
        .await
        .map_err(|e| explain("cloudformation:GetTemplateSummary", region, e))?;
    Ok(out.resource_types().to_vec())
}

/// Wait until the stack settles, passing each new event (oldest first) to `on_event`.
/// Returns the settled stack. (Not a stack_*_complete waiter: those show no events
/// while they wait, and each knows the end states of one kind of operation only.)
pub async fn settle(
    aws: &Aws,
    region: &str,
    name: &str,
    seen: &mut HashSet<String>,
    mut on_event: impl FnMut(&Event),
) -> Result<Stack> {
    let started = Instant::now();
    loop {
        let mut new: Vec<(String, Event)> = events(aws, region, name)
            .await?
            .into_iter()
            .filter(|(id, _)| !seen.contains(id))
            .collect();
        new.reverse();
        for (id, e) in new {
            on_event(&e);
            seen.insert(id);
        }
        let stack = describe(aws, region, name)
            .await?
            .with_context(|| format!("stack {name} in {region} disappeared"))?;
        if settled(&stack.status) {
            return Ok(stack);
        }
        if started.elapsed() > SETTLE_TIMEOUT {
            bail!(
                "stack {name} in {region} is still {} after {} hours",
                stack.status,
                SETTLE_TIMEOUT.as_secs() / 3600
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The account's default VPC in the region and its default subnets (one per
/// availability zone), as `aws ec2 run-instances` would use them.
pub async fn default_network(aws: &Aws, region: &str) -> Result<(String, Vec<String>)> {
    let ec2 = aws.ec2(region);
    let vpcs = ec2
        .describe_vpcs()
        .filters(Filter::builder().name("isDefault").values("true").build())
        .send()
        .await
        .map_err(|e| explain("ec2:DescribeVpcs", region, e))?;
    let Some(vpc) = vpcs.vpcs().first().and_then(|v| v.vpc_id()) else {
        bail!(
            "{region} has no default VPC\n  hint: pass --param VpcId=vpc-... and the subnets (--param Subnets=subnet-a,subnet-b, or SubnetId=subnet-... for an instance)"
        );
    };
    let subnets = ec2
        .describe_subnets()
        .filters(Filter::builder().name("vpc-id").values(vpc).build())
        .filters(
            Filter::builder()
                .name("default-for-az")
                .values("true")
                .build(),
        )
        .send()
        .await
        .map_err(|e| explain("ec2:DescribeSubnets", region, e))?;
    let mut by_zone: Vec<(String, String)> = subnets
        .subnets()
        .iter()
        .filter_map(|s| Some((s.availability_zone()?.to_owned(), s.subnet_id()?.to_owned())))
        .collect();
    by_zone.sort();
    if by_zone.is_empty() {
        bail!(
            "the default VPC {vpc} in {region} has no default subnets\n  hint: pass --param Subnets=subnet-a,subnet-b (or SubnetId=subnet-...)"
        );
    }
    Ok((
        vpc.to_owned(),
        by_zone.into_iter().map(|(_, s)| s).collect(),
    ))
}

/// One instance a stack runs.
#[derive(Debug, Clone, Serialize)]
pub struct Member {
    pub id: String,
    pub image_id: String,
    /// EC2 state (running, ...).
    pub state: String,
    /// Auto Scaling lifecycle state (InService, Pending, ...); None outside a group.
    pub lifecycle: Option<String>,
    /// Auto Scaling health (Healthy, Unhealthy); None outside a group.
    pub health: Option<String>,
    /// The instance's tags (what its agent reports in an in-place rollout among them).
    pub tags: BTreeMap<String, String>,
    /// Where to reach it (`ssh dev@ADDRESS`): its public DNS name, else its public IP,
    /// else its private IP; None before it has one.
    pub address: Option<String>,
}

/// The real resources of a fleet or instance stack.
#[derive(Debug, Clone, Serialize)]
pub struct Running {
    /// The Auto Scaling group, if the stack has one.
    pub group: Option<String>,
    pub desired: usize,
    pub launch_template: Option<String>,
    pub launch_template_version: Option<String>,
    /// The AMI of that launch template version.
    pub launch_template_image: Option<String>,
    /// The group's processes an in-place rollout suspended and has not resumed (it is
    /// running, or it was killed): named by the group's `devos:suspended` tag.
    pub held: Vec<String>,
    /// Whether the group has that tag at all (it may outlive what it names).
    #[serde(skip)]
    pub held_tag: bool,
    pub instances: Vec<Member>,
}

/// Read the group (or the instance), its launch template version and its instances.
pub async fn running(aws: &Aws, region: &str, name: &str) -> Result<Running> {
    let resources = aws
        .cloudformation(region)
        .describe_stack_resources()
        .stack_name(name)
        .send()
        .await
        .map_err(|e| explain("cloudformation:DescribeStackResources", region, e))?;
    let physical = |kind: &str| {
        resources
            .stack_resources()
            .iter()
            .find(|r| r.resource_type() == Some(kind))
            .and_then(|r| r.physical_resource_id())
            .map(str::to_owned)
    };
    let mut state = Running {
        group: physical("AWS::AutoScaling::AutoScalingGroup"),
        desired: 1,
        launch_template: physical("AWS::EC2::LaunchTemplate"),
        launch_template_version: None,
        launch_template_image: None,
        held: Vec::new(),
        held_tag: false,
        instances: Vec::new(),
    };
    let mut ids = Vec::new();
    let mut in_group = BTreeMap::new();
    if let Some(group) = &state.group {
        let g = self::group(aws, region, group)
            .await
            .with_context(|| format!("reading stack {name}"))?;
        state.desired = usize::try_from(g.desired_capacity().unwrap_or(0)).unwrap_or(0);
        (state.held, state.held_tag) = held(&g);
        if let Some(lt) = g.launch_template() {
            state.launch_template = lt.launch_template_id().map(str::to_owned);
            state.launch_template_version = lt.version().map(str::to_owned);
        }
        for i in g.instances() {
            let id = i.instance_id().unwrap_or_default().to_owned();
            in_group.insert(
                id.clone(),
                (
                    i.lifecycle_state().map(|l| l.as_str().to_owned()),
                    i.health_status().map(str::to_owned),
                ),
            );
            ids.push(id);
        }
    } else if let Some(instance) = physical("AWS::EC2::Instance") {
        ids.push(instance);
    }
    let ec2 = aws.ec2(region);
    if let Some(lt) = &state.launch_template {
        let out = ec2
            .describe_launch_template_versions()
            .launch_template_id(lt)
            .versions(
                state
                    .launch_template_version
                    .as_deref()
                    .unwrap_or("$Latest"),
            )
            .send()
            .await
            .map_err(|e| explain("ec2:DescribeLaunchTemplateVersions", region, e))?;
        if let Some(v) = out.launch_template_versions().first() {
            state.launch_template_version = v.version_number().map(|n| n.to_string());
            state.launch_template_image = v
                .launch_template_data()
                .and_then(|d| d.image_id())
                .map(str::to_owned);
        }
    }
    if !ids.is_empty() {
        let out = ec2
            .describe_instances()
            .set_instance_ids(Some(ids.clone()))
            .send()
            .await
            .map_err(|e| explain("ec2:DescribeInstances", region, e))?;
        for i in out.reservations().iter().flat_map(|r| r.instances()) {
            let id = i.instance_id().unwrap_or_default().to_owned();
            let (lifecycle, health) = in_group.remove(&id).unwrap_or_default();
            state.instances.push(Member {
                image_id: i.image_id().unwrap_or_default().to_owned(),
                state: i
                    .state()
                    .and_then(|s| s.name())
                    .map(|n| n.as_str().to_owned())
                    .unwrap_or_default(),
                lifecycle,
                health,
                tags: i
                    .tags()
                    .iter()
                    .filter_map(|t| Some((t.key()?.to_owned(), t.value()?.to_owned())))
                    .collect(),
                address: [
                    i.public_dns_name(),
                    i.public_ip_address(),
                    i.private_ip_address(),
                ]
                .into_iter()
                .flatten()
                .find(|a| !a.is_empty())
                .map(str::to_owned),
                id,
            });
        }
        state.instances.sort_by(|a, b| a.id.cmp(&b.id));
    }
    Ok(state)
}

/// The Auto Scaling processes an in-place rollout suspends while instances install,
/// reboot and report: those that start or end instances for reasons of their own (a
/// rebooting instance is no reason to replace it, and one ended by a scale-in while it
/// installs would count against the version). The same CloudFormation's rolling
/// updates suspend.
pub const HOLD: [&str; 5] = [
    "HealthCheck",
    "ReplaceUnhealthy",
    "AZRebalance",
    "AlarmNotification",
    "ScheduledActions",
];

/// The group's tag naming the processes an in-place rollout suspended, from before it
/// suspends them until it has resumed them: a rollout that was killed leaves it, and
/// the next one resumes them too.
pub const TAG_SUSPENDED: &str = "devos:suspended";

/// The processes of `g` that a rollout suspended and did not resume: those of
/// [`HOLD`] its tag names that are still suspended (a process suspended by someone else
/// before the rollout is never in the tag); and whether it has the tag.
fn held(g: &aws_sdk_autoscaling::types::AutoScalingGroup) -> (Vec<String>, bool) {
    let suspended = suspended(g);
    let Some(tag) = g.tags().iter().find(|t| t.key() == Some(TAG_SUSPENDED)) else {
        return (Vec::new(), false);
    };
    let held = tag
        .value()
        .unwrap_or_default()
        .split(',')
        .filter(|p| HOLD.contains(p) && suspended.contains(p))
        .map(str::to_owned)
        .collect();
    (held, true)
}

/// The names of `g`'s suspended processes.
fn suspended(g: &aws_sdk_autoscaling::types::AutoScalingGroup) -> Vec<&str> {
    g.suspended_processes()
        .iter()
        .filter_map(|p| p.process_name())
        .collect()
}

async fn group(
    aws: &Aws,
    region: &str,
    name: &str,
) -> Result<aws_sdk_autoscaling::types::AutoScalingGroup> {
    let out = aws
        .autoscaling(region)
        .describe_auto_scaling_groups()
        .auto_scaling_group_names(name)
        .send()
        .await
        .map_err(|e| explain("autoscaling:DescribeAutoScalingGroups", region, e))?;
    out.auto_scaling_groups()
        .first()
        .cloned()
        .with_context(|| format!("the Auto Scaling group {name} is gone"))
}

fn suspended_tag(group: &str, value: Option<String>) -> aws_sdk_autoscaling::types::Tag {
    aws_sdk_autoscaling::types::Tag::builder()
        .resource_id(group)
        .resource_type("auto-scaling-group")
        .key(TAG_SUSPENDED)
        .set_value(value)
        .propagate_at_launch(false)
        .build()
}

/// Suspend those of [`HOLD`]'s processes of group `name` that are running, for an
/// in-place rollout; returns them, for [`release`]. Never one that was suspended
/// already (by someone else, or by a rollout whose processes [`release`] has not
/// resumed yet).
pub async fn hold(aws: &Aws, region: &str, name: &str) -> Result<Vec<String>> {
    let g = group(aws, region, name).await?;
    let suspended = suspended(&g);
    let now: Vec<String> = HOLD
        .iter()
        .filter(|p| !suspended.contains(p))
        .map(|p| (*p).to_owned())
        .collect();
    if now.is_empty() {
        return Ok(now);
    }
    // Named before they are suspended: whatever ends this process, a process suspended
    // here is in the tag.
    aws.autoscaling(region)
        .create_or_update_tags()
        .tags(suspended_tag(name, Some(now.join(","))))
        .send()
        .await
        .map_err(|e| explain("autoscaling:CreateOrUpdateTags", region, e))?;
    let suspend = aws
        .autoscaling(region)
        .suspend_processes()
        .auto_scaling_group_name(name)
        .set_scaling_processes(Some(now.clone()))
        .send()
        .await
        .map_err(|e| explain("autoscaling:SuspendProcesses", region, e));
    if let Err(e) = suspend {
        // Nothing suspended: the tag would name processes someone may suspend later.
        let _ = release(aws, region, name, &[], true).await;
        return Err(e);
    }
    Ok(now)
}

/// Resume `held` (what [`hold`] returned, or [`Running::held`]) of group `name`, then
/// drop its `devos:suspended` tag when `tagged` or anything was resumed.
pub async fn release(
    aws: &Aws,
    region: &str,
    name: &str,
    held: &[String],
    tagged: bool,
) -> Result<()> {
    // Never an empty list: ResumeProcesses without processes resumes every one,
    // those someone else suspended too.
    if !held.is_empty() {
        aws.autoscaling(region)
            .resume_processes()
            .auto_scaling_group_name(name)
            .set_scaling_processes(Some(held.to_vec()))
            .send()
            .await
            .map_err(|e| explain("autoscaling:ResumeProcesses", region, e))
            .with_context(|| format!("while resuming {} of {name}", held.join(", ")))?;
    }
    if tagged || !held.is_empty() {
        aws.autoscaling(region)
            .delete_tags()
            .tags(suspended_tag(name, None))
            .send()
            .await
            .map_err(|e| explain("autoscaling:DeleteTags", region, e))
            .with_context(|| {
                format!(
                    "while removing the tag {TAG_SUSPENDED} of {name} (what it named is resumed)"
                )
            })?;
    }
    Ok(())
}

/// Tag instances `key=value` (what an in-place rollout asks their agents for).
pub async fn tag_instances(
    aws: &Aws,
    region: &str,
    ids: &[String],
    key: &str,
    value: &str,
) -> Result<()> {
    aws.ec2(region)
        .create_tags()
        .set_resources(Some(ids.to_vec()))
        .tags(
            aws_sdk_ec2::types::Tag::builder()
                .key(key)
                .value(value)
                .build(),
        )
        .send()
        .await
        .map_err(|e| explain("ec2:CreateTags", region, e))?;
    Ok(())
}
