//! `fleet rollout --in-place`: move a stack's running instances to a version through
//! their agents instead of replacing them. Batch by batch, each instance is tagged
//! `devos:update-to=VERSION`; its agent (which reads its instance's tags from instance
//! metadata) installs the version into the other root slot from the image's update
//! feed, reboots, and reports on its own tags (`devos:running`, `devos:update-state`;
//! see `devos_agent::inplace`). A batch passes when every instance in it runs the
//! version and reports itself healthy. A version that fails — an unhealthy agent on it,
//! a machine that went back by itself after its boot tries, a batch that started moving
//! and did not arrive in time — is marked bad for the stack, and every instance already
//! moved is told to go back to the version it ran (the boot loader switches slots: one
//! reboot). A rollout that cannot go on for reasons that say nothing about the version
//! (an install that could not be made, agents that never answer) stops without marking
//! it: instances already on it stay, the rest are told to stay where they are. While
//! instances move, the group's Auto Scaling processes that would replace or scale in
//! instances are suspended (see [`stack::HOLD`]), and resumed however the rollout ends.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use devos_agent::inplace::{
    HEALTHY, TAG_RUNNING, TAG_STATE, TAG_UPDATE_TO, is_failure, is_not_moved, is_updating,
};
use devos_aws::stack::{self, Member};
use devos_aws::{AwsOptions, interrupted};
use serde::Serialize;

use super::templates::agent_models;
use super::{Ctx, Outcome, Target, changing};
use crate::model::states::ChangeState;
use crate::store::registry::{Registry, VersionInfo};

/// How an in-place rollout goes.
pub(crate) struct Batches {
    /// Instances per batch.
    pub(crate) size: usize,
    /// How long one batch may take to report the version healthy.
    pub(crate) timeout: Duration,
}

impl Batches {
    /// Refuse what would make no progress: an empty batch, or none given time to
    /// report (every instance would count as failed at once).
    fn check(&self) -> Result<()> {
        if self.size == 0 {
            bail!("--batch 0: a batch holds at least one instance");
        }
        if self.timeout.is_zero() {
            bail!(
                "--batch-timeout 0: a batch needs time to update, reboot and report\n  hint: give the seconds a batch may take (default 1800)"
            );
        }
        Ok(())
    }
}

/// One instance of an in-place rollout.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Moved {
    pub(crate) id: String,
    /// The version it ran before: its agent's report when that is a version of the
    /// image this registry knows, else the stack's version.
    pub(crate) from: String,
    /// The version its agent last reported running (empty: no report).
    pub(crate) running: String,
    /// Its agent's last `devos:update-state`.
    pub(crate) state: String,
    /// Why it was left out: Auto Scaling ended or replaced it before its agent acted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) left: Option<String>,
}

/// Why a rollout stopped.
#[derive(Debug, PartialEq, Eq)]
enum Failure {
    /// The version failed on an instance: it is marked bad for the stack.
    Version(String),
    /// The rollout cannot go on, but nothing is known against the version: no agent of
    /// a batch acted on the request, or one could not install it.
    Stuck(String),
}

/// What an instance's report says about its move to a version.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// There, and healthy.
    There,
    /// Not yet.
    NotYet,
    /// Ended or replaced by Auto Scaling before it acted on the request: left out.
    Gone(String),
    Failed(Failure),
}

/// Roll the stack's running instances to `to` in place.
pub(crate) fn rollout(
    reg: &mut Registry,
    aws: &AwsOptions,
    t: &Target,
    to: &str,
    batches: &Batches,
) -> Result<Outcome> {
    batches.check()?;
    let mut cx = changing(reg, aws, t, None)?;
    devos_aws::block_on(async {
        let s = cx.existing(&t.stack).await?;
        Ctx::template_of(&s)?;
        let running = stack::running(&cx.aws, &cx.region, &t.stack).await?;
        let group = running.group.as_deref();
        if !t.dry_run {
            // What a killed rollout left suspended, before anything else (this one may
            // be refused next).
            release(&cx, &t.stack, group, &running.held, running.held_tag).await?;
        }
        let current = cx.current(&s)?;
        let reference = current.resolve(to);
        let v = cx.reg.require_passing(&reference)?;
        if v.name != current.image {
            bail!(super::other_image(&t.stack, &current.image, &v.name));
        }
        cx.refuse_bad(&t.stack, &v)?;
        // A verified build without `[update]` has a bundle too, but no feed its machines
        // read and no key they trust: `publish updates` refuses it, so no agent could
        // ever find it.
        // From the registry: the version's files may be gone (`image gc`) while its
        // feed and machines are not.
        let manifest = cx.reg.manifest(&v)?;
        if manifest.update.is_empty() || manifest.update_feed.is_none() {
            bail!(
                "{reference} cannot update machines in place: its spec has no `[update]` (the feed its machines read and the key they trust)\n  hint: roll it out by replacement (`devos-build fleet rollout --stack {} --to {}`), or add `[update]` to the spec and build a new version",
                t.stack,
                v.version
            );
        }
        match &current.known {
            Some(stack_v) => refuse_other_models(cx.reg, &t.stack, stack_v, &v)?,
            None => tracing::warn!(
                "stack {} runs {}, which this registry does not hold: whether its role allows the models {} calls is not checked",
                t.stack,
                current.reference,
                reference
            ),
        }
        let stack_version = current
            .reference
            .rsplit('@')
            .next()
            .unwrap_or_default()
            .to_owned();
        let known = way_back(cx.reg, &t.stack, &cx.region, &v.name, &stack_version)?;
        // What the stack's machines run must be able to start this version's kernel.
        for running in cx.reg.versions(Some(&v.name))? {
            if known.contains(&running.version) {
                crate::update::boots_after(&cx.reg.manifest(&running)?, &manifest)?;
            }
        }
        let serving: Vec<&Member> = running
            .instances
            .iter()
            .filter(|m| {
                m.state == "running" && m.lifecycle.as_deref().is_none_or(|l| l == "InService")
            })
            .collect();
        if serving.is_empty() {
            bail!(
                "stack {} in {} has no running instances to update in place",
                t.stack,
                cx.region
            );
        }
        let mut outcome = Outcome::planned(
            &t.stack,
            &cx.region,
            "in-place",
            current.known.as_ref(),
            &v,
            BTreeMap::new(),
        );
        let (done, todo): (Vec<&Member>, Vec<&Member>) =
            serving.into_iter().partition(|m| arrived(m, &v.version));
        // Already there (an earlier run of this rollout): they go back with the rest
        // if the version fails, to the stack's version.
        let done: Vec<Moved> = done
            .iter()
            .map(|m| Moved {
                from: stack_version.clone(),
                ..moved(m, &stack_version, &known)
            })
            .collect();
        // What they run is where they go back to, unless that is the version rolled
        // out (an earlier run moved them and they are not healthy on it).
        let known: HashSet<String> = known.into_iter().filter(|k| *k != v.version).collect();
        let todo: Vec<Moved> = todo
            .iter()
            .map(|m| moved(m, &stack_version, &known))
            .collect();
        if t.dry_run || todo.is_empty() {
            outcome.state = if todo.is_empty() {
                ChangeState::Unchanged
            } else {
                ChangeState::DryRun
            };
            outcome.instances = [done, todo].concat();
            return Ok(outcome);
        }
        let id =
            cx.reg
                .start_rollout(&t.stack, &cx.region, "in-place", current.known.as_ref(), &v)?;
        eprintln!(
            "in-place {}: {} instance(s) to {} in batches of {}",
            t.stack,
            todo.len(),
            v.version,
            batches.size
        );
        let held = match hold(&cx, &t.stack, group).await {
            Ok(held) => held,
            Err(e) => {
                cx.reg
                    .finish_rollout(id, ChangeState::Failed, Some(&format!("{e:#}")))?;
                return Err(e);
            }
        };
        let driven = tokio::select! {
            driven = drive(&mut cx, id, t, &v, batches, &done, &todo, &mut outcome) => driven,
            signal = interrupted() => Err(anyhow::anyhow!(
                "interrupted by {signal}: the instances already asked go on with their move\n  hint: run the rollout again to go on (it waits for them), or roll out what they ran before with --in-place to go back"
            )),
        };
        let released = release(&cx, &t.stack, group, &held, false).await;
        match (driven, released) {
            (Ok(()), Ok(())) => Ok(outcome),
            // Recorded as it went; the processes left suspended are an error of their own.
            (Ok(()), Err(r)) => Err(r),
            (Err(e), released) => {
                let e = match released {
                    Ok(()) => e,
                    Err(r) => anyhow::anyhow!("{e:#}\nand then: {r:#}"),
                };
                cx.reg
                    .finish_rollout(id, ChangeState::Failed, Some(&format!("{e:#}")))?;
                Err(e)
            }
        }
    })
}

/// The stack's role lets its agents call the models of the version its template was
/// made for, `stack_v`: moved in place to `v`, an agent calling others would have every
/// model call refused by Bedrock, while its health (which calls no model) stays good.
fn refuse_other_models(
    reg: &Registry,
    stack_name: &str,
    stack_v: &VersionInfo,
    v: &VersionInfo,
) -> Result<()> {
    let missing = match (agent_models(reg, stack_v)?, agent_models(reg, v)?) {
        // Made for an older build: its role allows every model.
        (None, _) => return Ok(()),
        (Some(_), None) => {
            "its build did not record the models its agent calls, so it may call one".to_owned()
        }
        (Some(allowed), Some(wanted)) => {
            let missing: Vec<String> = wanted
                .into_iter()
                .filter(|m| !allowed.contains(m))
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            format!("its agent calls {}", missing.join(", "))
        }
    };
    bail!(
        "{}@{} cannot update stack {stack_name}'s machines in place: {missing}, which the stack's role (made for {}@{}) does not allow\n  hint: roll it out by replacement (`devos-build fleet rollout --stack {stack_name} --to {}`), which changes the role too",
        v.name,
        v.version,
        stack_v.name,
        stack_v.version,
        v.version
    )
}

/// Suspend the Auto Scaling processes that would end or replace instances while they
/// move (see [`stack::HOLD`]); what to resume when the rollout ends.
async fn hold(cx: &Ctx<'_>, stack_name: &str, group: Option<&str>) -> Result<Vec<String>> {
    let Some(group) = group else {
        return Ok(Vec::new());
    };
    let held = stack::hold(&cx.aws, &cx.region, group)
        .await
        .with_context(|| format!("while suspending Auto Scaling processes of {group}"))?;
    if !held.is_empty() {
        eprintln!(
            "in-place {stack_name}: {} of {group} suspended while instances move",
            held.join(", ")
        );
    }
    Ok(held)
}

/// Resume `held` (what [`hold`] suspended, or what a killed rollout left) and drop the
/// group's tag (when `tagged`, or anything was resumed); a failure says how to do it by
/// hand.
async fn release(
    cx: &Ctx<'_>,
    stack_name: &str,
    group: Option<&str>,
    held: &[String],
    tagged: bool,
) -> Result<()> {
    let Some(group) = group.filter(|_| tagged || !held.is_empty()) else {
        return Ok(());
    };
    let region = &cx.region;
    if let Err(e) = stack::release(&cx.aws, region, group, held, tagged).await {
        let untag = format!(
            "`aws autoscaling delete-tags --region {region} --tags ResourceId={group},ResourceType=auto-scaling-group,Key={}`",
            stack::TAG_SUSPENDED
        );
        let by_hand = if held.is_empty() {
            untag
        } else {
            format!(
                "`aws autoscaling resume-processes --region {region} --auto-scaling-group-name {group} --scaling-processes {}`, then {untag}",
                held.join(" ")
            )
        };
        bail!(
            "{e:#}\n  hint: `devos-build fleet status --stack {stack_name} --region {region}` shows what stays suspended, and the next in-place rollout of the stack resumes it; by hand: {by_hand}"
        );
    }
    if !held.is_empty() {
        eprintln!(
            "in-place {stack_name}: {} of {group} resumed",
            held.join(", ")
        );
    }
    Ok(())
}

/// Ask batch after batch, gate, and on a failure send the asked instances back;
/// finishes rollout `id` unless it returns an error.
#[allow(clippy::too_many_arguments)]
async fn drive(
    cx: &mut Ctx<'_>,
    id: i64,
    t: &Target,
    v: &VersionInfo,
    batches: &Batches,
    done: &[Moved],
    todo: &[Moved],
    outcome: &mut Outcome,
) -> Result<()> {
    let mut touched: Vec<Moved> = Vec::new();
    let mut failure = None;
    for batch in todo.chunks(batches.size) {
        let ids: Vec<String> = batch.iter().map(|m| m.id.clone()).collect();
        touched.extend(batch.iter().cloned());
        let asked =
            stack::tag_instances(&cx.aws, &cx.region, &ids, TAG_UPDATE_TO, &v.version).await;
        cx.issued(id, outcome, asked)?;
        if let Err(why) = wait(
            cx,
            &t.stack,
            &ids,
            &v.version,
            batches.timeout,
            &mut touched,
        )
        .await?
        {
            failure = Some(why);
            break;
        }
    }
    if failure.is_none() && !t.bake.is_zero() {
        let ids: Vec<String> = touched.iter().map(|m| m.id.clone()).collect();
        failure = bake(cx, &t.stack, &ids, &v.version, t.bake, &mut touched)
            .await?
            .err();
    }
    outcome.instances = [done, &touched].concat();
    let Some(failure) = failure else {
        cx.reg.finish_rollout(id, ChangeState::Succeeded, None)?;
        outcome.state = ChangeState::Succeeded;
        return Ok(());
    };
    let why = match failure {
        Failure::Version(why) => why,
        Failure::Stuck(why) => {
            let state = stay(cx, &t.stack, v, &touched, &why, batches.timeout).await;
            outcome.reason = Some(match &state {
                Ok(reason) => reason.clone(),
                Err(e) => format!("{why}; telling the others to stay failed too: {e:#}"),
            });
            cx.reg
                .finish_rollout(id, ChangeState::Failed, outcome.reason.as_deref())?;
            outcome.state = ChangeState::Failed;
            return Ok(());
        }
    };
    cx.reg.mark_bad(&t.stack, &cx.region, v, &why)?;
    eprintln!("in-place {} failed: {why}", t.stack);
    outcome.reason = Some(why.clone());
    let back: Vec<Moved> = done
        .iter()
        .chain(&touched)
        .filter(|m| m.from != v.version && m.left.is_none())
        .cloned()
        .collect();
    let state = match send(cx, &t.stack, &v.version, &back, batches.timeout, "back to").await? {
        Ok(()) => ChangeState::RolledBack,
        Err(e) => {
            outcome.reason = Some(format!("{why}; going back failed too: {e}"));
            ChangeState::Failed
        }
    };
    cx.reg
        .finish_rollout(id, state, outcome.reason.as_deref())?;
    outcome.state = state;
    Ok(())
}

/// A rollout that cannot go on without a verdict on `v`: the asked instances that are
/// not on it are told to stay on what they run (an agent still installing undoes its
/// move) and those whose agents acted are waited for, so that a rollout run again
/// starts from fresh reports; those on it stay there. The reason, with what to do
/// next.
async fn stay(
    cx: &mut Ctx<'_>,
    stack_name: &str,
    v: &VersionInfo,
    touched: &[Moved],
    why: &str,
    timeout: Duration,
) -> Result<String> {
    eprintln!("in-place {stack_name} stopped: {why}");
    let (there, elsewhere): (Vec<&Moved>, Vec<&Moved>) = touched
        .iter()
        .filter(|m| m.left.is_none())
        .partition(|m| m.running == v.version);
    // Where each is: its agent's report, or where it was before it was asked.
    let stays: Vec<Moved> = elsewhere
        .into_iter()
        .map(|m| Moved {
            from: if m.running.is_empty() {
                m.from.clone()
            } else {
                m.running.clone()
            },
            ..m.clone()
        })
        .collect();
    let waited = send(cx, stack_name, &v.version, &stays, timeout, "stay on").await?;
    let mut reason = match waited {
        Ok(()) => format!("{why}\n  {} is not marked bad", v.version),
        Err(e) => format!(
            "{why}\n  {} is not marked bad; telling the others to stay failed: {e}",
            v.version
        ),
    };
    if !there.is_empty() {
        let ids: Vec<&str> = there.iter().map(|m| m.id.as_str()).collect();
        reason.push_str(&format!(
            "; {} run{} it and stay{}: run the rollout again to go on, or roll out what they ran before with --in-place to go back",
            ids.join(", "),
            if ids.len() == 1 { "s" } else { "" },
            if ids.len() == 1 { "s" } else { "" },
        ));
    }
    Ok(reason)
}

/// The versions an instance of the stack may go back to when its report says it runs
/// one: the stack's own, and the one this registry's last in-place rollout of the stack
/// that succeeded moved it to, unless marked bad for it. A report is the agent's word,
/// which root on any instance of the stack could forge for a sibling: it must not be
/// able to send that sibling to an older signed version the stack no longer runs.
fn way_back(
    reg: &Registry,
    stack: &str,
    region: &str,
    image: &str,
    stack_version: &str,
) -> Result<HashSet<String>> {
    // (Newest first.)
    let last_in_place = reg
        .rollouts(Some(stack), Some(region))?
        .into_iter()
        .find(|r| r.kind == "in-place" && r.image == image && r.state == ChangeState::Succeeded)
        .map(|r| r.to);
    let ran: HashSet<String> = last_in_place
        .into_iter()
        .chain([stack_version.to_owned()])
        .collect();
    let mut known = HashSet::new();
    for k in reg.versions(Some(image))? {
        if ran.contains(&k.version) && reg.bad_reason(stack, region, &k)?.is_none() {
            known.insert(k.version);
        }
    }
    Ok(known)
}

/// Whether the instance's agent reports `version` running and healthy, as asked.
fn arrived(m: &Member, version: &str) -> bool {
    m.tags.get(TAG_UPDATE_TO).map(String::as_str) == Some(version)
        && m.tags.get(TAG_RUNNING).map(String::as_str) == Some(version)
        && m.tags.get(TAG_STATE).map(String::as_str) == Some(HEALTHY)
}

fn moved(m: &Member, stack_version: &str, known: &HashSet<String>) -> Moved {
    let running = m.tags.get(TAG_RUNNING).cloned().unwrap_or_default();
    Moved {
        id: m.id.clone(),
        from: if known.contains(&running) {
            running.clone()
        } else {
            stack_version.to_owned()
        },
        running,
        state: m.tags.get(TAG_STATE).cloned().unwrap_or_default(),
        left: None,
    }
}

/// What an instance's report says about its move to `version`.
fn verdict(m: &Member, version: &str) -> Verdict {
    let tag = |key| m.tags.get(key).map(String::as_str).unwrap_or_default();
    let (running, state) = (tag(TAG_RUNNING), tag(TAG_STATE));
    let ended = if m.state != "running" {
        Some(format!("instance {} is {}", m.id, m.state))
    } else if m.health.as_deref() == Some("Unhealthy") {
        Some(format!("instance {} is Unhealthy", m.id))
    } else {
        None
    };
    if let Some(ended) = ended {
        // Auto Scaling ends and replaces instances for reasons of its own: only one that
        // acted on the request says something about the version.
        return match acted(running, state, version) {
            true => Verdict::Failed(Failure::Version(ended)),
            false => Verdict::Gone(ended),
        };
    }
    if is_failure(state, version) {
        return Verdict::Failed(Failure::Version(format!("instance {}: {state}", m.id)));
    }
    if is_not_moved(state, version) {
        return Verdict::Failed(Failure::Stuck(format!("instance {}: {state}", m.id)));
    }
    let on_it = running == version;
    if on_it && state.starts_with("unhealthy") {
        return Verdict::Failed(Failure::Version(format!(
            "instance {} runs {version} but is {state}",
            m.id
        )));
    }
    match on_it && state == HEALTHY {
        true => Verdict::There,
        false => Verdict::NotYet,
    }
}

/// Whether an agent reporting `running` and `state` has acted on a request for
/// `version`.
fn acted(running: &str, state: &str, version: &str) -> bool {
    running == version
        || is_updating(state, version)
        || is_failure(state, version)
        || is_not_moved(state, version)
}

/// Wait until every instance of `ids` reports `version` healthy, at most `timeout`;
/// Ok(Err(why)) when one fails or time runs out. Keeps `touched`'s reports current.
async fn wait(
    cx: &Ctx<'_>,
    stack_name: &str,
    ids: &[String],
    version: &str,
    timeout: Duration,
    touched: &mut [Moved],
) -> Result<Result<(), Failure>> {
    let started = Instant::now();
    loop {
        let pending = match look(cx, stack_name, ids, version, touched).await? {
            Err(failure) => return Ok(Err(failure)),
            Ok(pending) => pending,
        };
        if pending.is_empty() {
            return Ok(Ok(()));
        }
        if started.elapsed() < timeout {
            tokio::time::sleep(Duration::from_secs(5).min(timeout)).await;
            continue;
        }
        let late: Vec<&Moved> = touched.iter().filter(|m| pending.contains(&m.id)).collect();
        let states: Vec<String> = late
            .iter()
            .map(|m| {
                let state = if m.state.is_empty() {
                    "no report"
                } else {
                    &m.state
                };
                format!("{} ({state})", m.id)
            })
            .collect();
        let why = format!(
            "{} did not report {version} healthy within {}s",
            states.join(", "),
            timeout.as_secs()
        );
        let batch: Vec<&Moved> = touched.iter().filter(|m| ids.contains(&m.id)).collect();
        if batch.iter().any(|m| acted(&m.running, &m.state, version)) {
            return Ok(Err(Failure::Version(why)));
        }
        return Ok(Err(Failure::Stuck(format!(
            "{why}, and no agent of the batch acted on {TAG_UPDATE_TO}: {version} is not marked bad\n  hint: the instances need tags in instance metadata (InstanceMetadataTags: enabled, as the templates set) and an image whose agent follows in-place rollouts; `devos-build fleet status --stack {stack_name} --region {}` shows their reports",
            cx.region
        ))));
    }
}

/// After the last batch: every moved instance must stay on `version` and healthy
/// for `bake`.
async fn bake(
    cx: &Ctx<'_>,
    stack_name: &str,
    ids: &[String],
    version: &str,
    bake: Duration,
    touched: &mut [Moved],
) -> Result<Result<(), Failure>> {
    let started = Instant::now();
    while started.elapsed() < bake {
        match look(cx, stack_name, ids, version, touched).await? {
            Err(failure) => return Ok(Err(failure)),
            Ok(pending) if !pending.is_empty() => {
                return Ok(Err(Failure::Version(format!(
                    "{} stopped reporting {version} healthy during the bake",
                    pending.join(", ")
                ))));
            }
            Ok(_) => tokio::time::sleep(Duration::from_secs(5).min(bake)).await,
        }
    }
    Ok(Ok(()))
}

/// One look at the instances' reports: the ids not yet healthy on `version`, or why
/// one failed. Prints each change of an instance's report. A failed read is tried
/// again a few times (throttling) before it ends the rollout. An instance that left
/// the stack before it acted is left out.
async fn look(
    cx: &Ctx<'_>,
    stack_name: &str,
    ids: &[String],
    version: &str,
    touched: &mut [Moved],
) -> Result<Result<Vec<String>, Failure>> {
    let mut tries = 0;
    let running = loop {
        match stack::running(&cx.aws, &cx.region, stack_name).await {
            Ok(r) => break r,
            Err(e) if tries < 4 => {
                tries += 1;
                tracing::warn!("reading stack {stack_name}: {e:#}; trying again");
                tokio::time::sleep(Duration::from_secs(2 << tries)).await;
            }
            Err(e) => return Err(e),
        }
    };
    let mut pending = Vec::new();
    for id in ids {
        let Some(m) = running.instances.iter().find(|m| &m.id == id) else {
            let known = touched.iter().find(|t| &t.id == id);
            if known.is_some_and(|t| acted(&t.running, &t.state, version)) {
                return Ok(Err(Failure::Version(format!(
                    "instance {id} left the stack"
                ))));
            }
            leave(touched, id, format!("instance {id} left the stack"));
            continue;
        };
        let state = m.tags.get(TAG_STATE).cloned().unwrap_or_default();
        let on = m.tags.get(TAG_RUNNING).cloned().unwrap_or_default();
        if let Some(t) = touched.iter_mut().find(|t| &t.id == id)
            && (t.state != state || t.running != on)
        {
            eprintln!("  {id} {}: {state}", if on.is_empty() { "?" } else { &on });
            t.state = state;
            t.running = on;
        }
        match verdict(m, version) {
            Verdict::Failed(failure) => return Ok(Err(failure)),
            Verdict::NotYet => pending.push(id.clone()),
            Verdict::Gone(why) => leave(touched, id, why),
            Verdict::There => {}
        }
    }
    Ok(Ok(pending))
}

/// Leave instance `id` out of the rollout (once), saying why.
fn leave(touched: &mut [Moved], id: &str, why: String) {
    if let Some(t) = touched.iter_mut().find(|t| t.id == id && t.left.is_none()) {
        eprintln!("  {why} before its agent acted: left out");
        t.left = Some(why);
    }
}

/// Tell every instance in `moves` to go to its `from` (back to what it ran, or to stay
/// where it is), and wait at most `timeout` for those whose agents acted on `version`
/// to report healthy there (one that never left reports at once; one that never acted
/// has nothing to undo).
async fn send(
    cx: &mut Ctx<'_>,
    stack_name: &str,
    version: &str,
    moves: &[Moved],
    timeout: Duration,
    verb: &str,
) -> Result<Result<(), String>> {
    let mut by_version: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for m in moves {
        by_version
            .entry(m.from.as_str())
            .or_default()
            .push(m.id.clone());
    }
    let mut states = moves.to_vec();
    for (to, ids) in &by_version {
        eprintln!("in-place {stack_name}: {verb} {to}: {}", ids.join(", "));
        stack::tag_instances(&cx.aws, &cx.region, ids, TAG_UPDATE_TO, to)
            .await
            .with_context(|| format!("while telling {} to {verb} {to}", ids.join(", ")))?;
    }
    for (to, ids) in &by_version {
        let acted: Vec<String> = moves
            .iter()
            .filter(|m| ids.contains(&m.id) && acted(&m.running, &m.state, version))
            .map(|m| m.id.clone())
            .collect();
        if acted.is_empty() {
            continue;
        }
        match wait(cx, stack_name, &acted, to, timeout, &mut states).await? {
            Ok(()) => {}
            Err(Failure::Version(why) | Failure::Stuck(why)) => return Ok(Err(why)),
        }
    }
    Ok(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(tags: &[(&str, &str)]) -> Member {
        Member {
            id: "i-1".into(),
            image_id: "ami-1".into(),
            state: "running".into(),
            lifecycle: Some("InService".into()),
            health: Some("Healthy".into()),
            tags: tags
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            address: None,
        }
    }

    #[test]
    fn in_place_a_version_may_call_only_the_models_the_stacks_role_allows() {
        let tmp = tempfile::tempdir().unwrap();
        let (reg, v) = super::super::templates::tests::registry_calling(
            tmp.path(),
            &[
                ("1.0.0+a", Some(Some(&["m.a", "m.b"]))),
                ("2.0.0+b", Some(Some(&["m.b"]))),
                ("3.0.0+c", Some(Some(&["m.c", "m.a"]))),
                ("4.0.0+d", Some(None)),
                ("5.0.0+e", None),
            ],
        );
        let refused = |stack: usize, to: usize| {
            refuse_other_models(&reg, "s", &v[stack], &v[to]).map_err(|e| format!("{e:#}"))
        };
        refused(0, 1).unwrap();
        // No agent: it calls nothing.
        refused(0, 4).unwrap();
        // A stack made for a build that did not record its models allows every one.
        refused(3, 2).unwrap();
        let e = refused(0, 2).unwrap_err();
        assert!(
            e.contains("devos-test@3.0.0+c cannot update stack s's machines in place: its agent calls m.c, which the stack's role (made for devos-test@1.0.0+a) does not allow"),
            "{e}"
        );
        assert!(e.contains("--stack s --to 3.0.0+c"), "{e}");
        let e = refused(1, 3).unwrap_err();
        assert!(
            e.contains("its build did not record the models its agent calls, so it may call one, which the stack's role (made for devos-test@2.0.0+b) does not allow"),
            "{e}"
        );
    }

    #[test]
    fn an_empty_batch_or_a_zero_timeout_is_refused_naming_the_flag() {
        let batches = |size, secs| Batches {
            size,
            timeout: Duration::from_secs(secs),
        };
        assert!(batches(1, 1).check().is_ok());
        let e = batches(0, 1800).check().unwrap_err().to_string();
        assert!(e.starts_with("--batch 0:"), "{e}");
        let e = batches(1, 0).check().unwrap_err().to_string();
        assert!(e.starts_with("--batch-timeout 0:"), "{e}");
    }

    #[test]
    fn an_instance_passes_only_when_its_agent_reports_the_version_healthy() {
        let v = "0.2.0";
        assert_eq!(verdict(&member(&[]), v), Verdict::NotYet);
        let old = member(&[(TAG_RUNNING, "0.1.0"), (TAG_STATE, HEALTHY)]);
        assert_eq!(verdict(&old, v), Verdict::NotYet);
        let updating = member(&[(TAG_RUNNING, "0.1.0"), (TAG_STATE, "updating to 0.2.0")]);
        assert_eq!(verdict(&updating, v), Verdict::NotYet);
        let there = member(&[(TAG_RUNNING, v), (TAG_STATE, HEALTHY)]);
        assert_eq!(verdict(&there, v), Verdict::There);
        // Failures of this version (not an old one), or sick on it.
        let version_failed = |m: &Member| match verdict(m, v) {
            Verdict::Failed(Failure::Version(why)) => why,
            other => panic!("{other:?}"),
        };
        let failed = member(&[
            (TAG_RUNNING, "0.1.0"),
            (TAG_STATE, "failed 0.2.0: it did not come up"),
        ]);
        assert!(version_failed(&failed).contains("did not come up"));
        let failed_before = member(&[(TAG_RUNNING, "0.1.0"), (TAG_STATE, "failed 0.1.5: x")]);
        assert_eq!(verdict(&failed_before, v), Verdict::NotYet);
        let sick = member(&[(TAG_RUNNING, v), (TAG_STATE, "unhealthy: audit chain")]);
        assert!(version_failed(&sick).contains("unhealthy"));
        // An install that could not be made stops the rollout without a verdict.
        let stuck = member(&[
            (TAG_RUNNING, "0.1.0"),
            (TAG_STATE, "not moved to 0.2.0: download failed"),
        ]);
        assert!(
            matches!(verdict(&stuck, v), Verdict::Failed(Failure::Stuck(why)) if why.contains("download failed"))
        );
        // Ended by Auto Scaling: the version is to blame only if the agent had acted.
        let mut ended = old.clone();
        ended.state = "shutting-down".into();
        assert!(matches!(verdict(&ended, v), Verdict::Gone(_)));
        let mut replaced = old.clone();
        replaced.health = Some("Unhealthy".into());
        assert!(matches!(verdict(&replaced, v), Verdict::Gone(_)));
        let mut gone = there.clone();
        gone.state = "terminated".into();
        assert!(version_failed(&gone).contains("terminated"));
        let mut moving = updating.clone();
        moving.health = Some("Unhealthy".into());
        assert!(version_failed(&moving).contains("Unhealthy"));
        // Already there only when it was asked for this version.
        assert!(!arrived(&there, v));
        let asked = member(&[(TAG_UPDATE_TO, v), (TAG_RUNNING, v), (TAG_STATE, HEALTHY)]);
        assert!(arrived(&asked, v));
    }

    #[test]
    fn an_instance_goes_back_to_what_it_ran_never_to_the_version_rolled_out() {
        let known: HashSet<String> = ["0.1.0".to_owned()].into();
        let on_old = member(&[(TAG_RUNNING, "0.1.0"), (TAG_STATE, HEALTHY)]);
        assert_eq!(moved(&on_old, "0.0.9", &known).from, "0.1.0");
        // Unknown to this registry (or the version rolled out, which the caller leaves
        // out of `known`): the stack's version.
        let on_new = member(&[(TAG_RUNNING, "0.2.0"), (TAG_STATE, "unhealthy: x")]);
        assert_eq!(moved(&on_new, "0.0.9", &known).from, "0.0.9");
        assert_eq!(moved(&member(&[]), "0.0.9", &known).from, "0.0.9");
    }

    #[test]
    fn a_report_names_the_way_back_only_for_a_version_the_stack_ran() {
        use crate::store::registry::tests::manifest;
        let tmp = tempfile::tempdir().unwrap();
        let mut reg = Registry::open(&tmp.path().join("r.db")).unwrap();
        for v in ["0.0.1", "0.1.0", "0.2.0", "0.3.0", "0.4.0"] {
            reg.record_build(
                std::path::Path::new("/o"),
                std::path::Path::new("s"),
                &manifest(v, &[]),
                &[],
            )
            .unwrap();
        }
        let info = |reg: &Registry, v: &str| reg.find(&format!("devos-test@{v}")).unwrap();
        // Deployed on 0.1.0, once moved in place to 0.0.1 and back, then to 0.2.0; a
        // try of 0.3.0 went back and 0.3.0 is bad here; one of 0.4.0 failed before
        // moving anything; another stack went to 0.4.0.
        let (v0, v1, v2, v3, v4) = (
            info(&reg, "0.0.1"),
            info(&reg, "0.1.0"),
            info(&reg, "0.2.0"),
            info(&reg, "0.3.0"),
            info(&reg, "0.4.0"),
        );
        for (stack, from, to, state) in [
            ("web", &v1, &v0, ChangeState::Succeeded),
            ("web", &v0, &v1, ChangeState::Succeeded),
            ("web", &v1, &v2, ChangeState::Succeeded),
            ("web", &v2, &v3, ChangeState::RolledBack),
            ("web", &v2, &v4, ChangeState::Failed),
            ("other", &v1, &v4, ChangeState::Succeeded),
        ] {
            let id = reg
                .start_rollout(stack, "eu-west-1", "in-place", Some(from), to)
                .unwrap();
            reg.finish_rollout(id, state, None).unwrap();
        }
        reg.mark_bad("web", "eu-west-1", &v3, "x").unwrap();
        let known = way_back(&reg, "web", "eu-west-1", "devos-test", "0.1.0").unwrap();
        let mut sorted: Vec<&str> = known.iter().map(String::as_str).collect();
        sorted.sort();
        assert_eq!(sorted, ["0.1.0", "0.2.0"]);
        // A signed build this stack no longer runs (a report forged by root on a
        // sibling), a version bad here, one whose rollout failed, another stack's:
        // the stack's own version instead.
        for forged in ["0.0.1", "0.3.0", "0.4.0"] {
            let m = member(&[(TAG_RUNNING, forged), (TAG_STATE, HEALTHY)]);
            assert_eq!(moved(&m, "0.1.0", &known).from, "0.1.0", "{forged}");
        }
        let m = member(&[(TAG_RUNNING, "0.2.0"), (TAG_STATE, HEALTHY)]);
        assert_eq!(moved(&m, "0.1.0", &known).from, "0.2.0");
    }
}
