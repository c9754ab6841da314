//! Decisions on waiting actions and the rules they may leave behind. A remembered
//! approval is the exact action in its working directory unless the user chose a
//! prefix, which must cover the action and stays bounded by its class; rules made
//! with `AddRule` have the same bounds. Path scopes are resolved as the caller sees
//! them.

use std::path::{Path, PathBuf};

use zbus::fdo;

use super::agent::Agent;
use super::shared::{
    Control, MAX_PATH, MAX_WORD, bounded, failed, invalid_args, lock, now, to_value,
};
use crate::approval;
use crate::caller::{self as as_caller, Caller, PlanJob};
use crate::request::{ActionRecord, Decision, Exact, Remember, Request, Rule};
use crate::risk::RiskClass;

/// A user's decision on one action, as `Approve`/`Deny` receive it.
pub(super) struct Verdict<'a> {
    pub id: &'a str,
    pub index: u32,
    pub approve: bool,
    pub remember: &'a str,
    pub command_prefix: Vec<String>,
    pub path_prefix: &'a str,
}

impl Verdict<'_> {
    /// Refuse arguments longer than any decision needs (see [`bounded`]).
    pub(super) fn bounded(&self) -> fdo::Result<()> {
        bounded("the request id", self.id, MAX_WORD)?;
        bounded("remember", self.remember, MAX_WORD)?;
        prefixes_bounded(&self.command_prefix, self.path_prefix)
    }
}

/// Refuse a rule's prefixes when they are longer than a rule may be.
pub(super) fn prefixes_bounded(command_prefix: &[String], path_prefix: &str) -> fdo::Result<()> {
    bounded("the path prefix", path_prefix, MAX_PATH)?;
    let words: usize = command_prefix.iter().map(|w| w.len() + 1).sum();
    if words > MAX_RULE_BYTES {
        return Err(fdo::Error::LimitsExceeded(format!(
            "a command prefix is at most the {} KiB a rule may: remember a shorter one, or decide this once",
            MAX_RULE_BYTES >> 10
        )));
    }
    Ok(())
}

pub(super) async fn decide_action(
    agent: &Agent,
    caller: &Caller,
    verdict: Verdict<'_>,
) -> fdo::Result<()> {
    let Verdict {
        id,
        index,
        approve,
        remember,
        command_prefix,
        path_prefix,
    } = verdict;
    let remember: Remember = remember.parse().map_err(invalid_args)?;
    let path_prefix = resolve_prefix(agent, caller, path_prefix).await?;
    let shared = &agent.shared;
    let r = agent.own_request(id, caller, false).await?;
    let record = waiting_action(&r, id, index)?;
    let rule = if remember == Remember::Once {
        None
    } else {
        let asked = Rule::new(
            caller.uid,
            approve,
            remember,
            command_prefix,
            path_prefix,
            now(),
        );
        Some(remembered_rule(
            asked,
            record,
            &r.cwd,
            &shared.config().policy,
        )?)
    };
    let by = approval::by_user(&caller.user, caller.uid);
    let decision = if approve {
        Decision::Approved { by: by.clone() }
    } else {
        Decision::Denied {
            by: by.clone(),
            reason: "denied by the user".into(),
        }
    };
    let audited = record.audit_detail(serde_json::json!({
        "risk": record.risk.class,
        "profile": record.profile,
        "decision": if approve { "approved" } else { "denied" },
        "by": by,
        "remember": remember,
    }));
    if let Some(rule) = &rule {
        shared.may_record(caller.uid)?;
        within_bounds(&lock(&shared.store), rule)?;
    }
    record_decision(agent, caller, id, index, decision, audited)?;
    // The decision stands, whatever becomes of the rule: the request goes on.
    let stored = rule.map_or(Ok(0), |rule| {
        store_rule(agent, caller, &rule, Some(id), Some(index))
    });
    if let Some(live) = lock(&shared.live).get(id) {
        // (Fails only when the request's task has ended: nobody waits for this.)
        let _ = live.control.send(Control::Decided);
    }
    stored.map(|_| ()).map_err(|e| {
        let why = match e {
            fdo::Error::LimitsExceeded(why) | fdo::Error::Failed(why) => why,
            other => other.to_string(),
        };
        fdo::Error::Failed(format!(
            "the action was {}, but the rule was not stored: {why}",
            if approve { "approved" } else { "denied" },
        ))
    })
}

/// Action `index` of request `r`, which must be waiting for a decision.
fn waiting_action<'r>(r: &'r Request, id: &str, index: u32) -> fdo::Result<&'r ActionRecord> {
    if r.state.is_final() {
        return Err(fdo::Error::Failed(format!(
            "request {id} is already {}",
            r.state.as_str()
        )));
    }
    let record = r
        .actions
        .get(index as usize)
        .ok_or_else(|| fdo::Error::InvalidArgs(format!("request {id} has no action {index}")))?;
    if record.decision != Decision::Ask {
        return Err(fdo::Error::Failed(format!(
            "action {index} of request {id} is not waiting for a decision"
        )));
    }
    Ok(record)
}

/// Check, record and store the decision in one step: the request's task saves the
/// same request, and neither may lose what the other wrote. A decision that cannot
/// be audited is not stored.
fn record_decision(
    agent: &Agent,
    caller: &Caller,
    id: &str,
    index: u32,
    decision: Decision,
    audited: serde_json::Value,
) -> fdo::Result<()> {
    let shared = &agent.shared;
    let store = lock(&shared.store);
    let mut now_r = store
        .request(id)
        .map_err(failed)?
        .ok_or_else(|| failed("request vanished"))?;
    let waiting = now_r
        .actions
        .get(index as usize)
        .is_some_and(|a| a.decision == Decision::Ask);
    if now_r.state.is_final() || !waiting {
        return Err(fdo::Error::Failed(format!(
            "action {index} of request {id} is no longer waiting for a decision"
        )));
    }
    // Durable: the action may start as soon as the decision is stored.
    shared.audit_durable(
        "action.decided",
        Some(caller.uid),
        Some(id),
        Some(index),
        audited,
    )?;
    now_r.actions[index as usize].decision = decision;
    now_r.updated = now();
    store.save_request(&now_r).map_err(failed)?;
    Ok(())
}

/// Record a rule, audited first: a rule that is not on record does not exist. Its
/// `rule.added` entry (durable: the rule may approve an action as soon as it exists)
/// is written inside the transaction that adds it, which is committed only after the
/// entry is on disk and rolled back when it cannot be written; the store stays locked
/// throughout, so no decision sees the rule before its entry.
fn store_rule(
    agent: &Agent,
    caller: &Caller,
    rule: &Rule,
    request: Option<&str>,
    action: Option<u32>,
) -> fdo::Result<i64> {
    let shared = &agent.shared;
    let store = lock(&shared.store);
    within_bounds(&store, rule)?;
    let rule = store.add_rule_recorded(rule, |rule| {
        shared.audit_durable(
            "rule.added",
            Some(caller.uid),
            request,
            action,
            to_value(rule),
        )
    })?;
    Ok(rule.id)
}

/// How many rules one user may have, and how large one may be (its prefixes or the
/// exact action it remembers, as listed): every user's rules fit in one reply
/// (`Rules`), and no one fills the agent's disk through them.
const MAX_RULES_PER_USER: u64 = 256;
const MAX_RULE_BYTES: usize = 16 << 10;

/// Whether `rule` may be stored beside its owner's others.
fn within_bounds(store: &crate::store::Store, rule: &Rule) -> fdo::Result<()> {
    let bytes = serde_json::to_string(rule).map_or(usize::MAX, |s| s.len());
    if bytes > MAX_RULE_BYTES {
        return Err(fdo::Error::LimitsExceeded(format!(
            "the rule would take {} KiB, more than the {} KiB a rule may: remember a shorter command prefix, or decide this once",
            bytes.div_ceil(1024),
            MAX_RULE_BYTES >> 10
        )));
    }
    if store.count_rules(rule.uid).map_err(failed)? >= MAX_RULES_PER_USER {
        return Err(fdo::Error::LimitsExceeded(format!(
            "you have {MAX_RULES_PER_USER} rules, as many as a user may: remove some first (`devos rules`, `devos rules remove ID`)"
        )));
    }
    Ok(())
}

/// A path prefix as the caller's file system view resolves it.
async fn resolve_prefix(
    agent: &Agent,
    caller: &Caller,
    path_prefix: &str,
) -> fdo::Result<Option<PathBuf>> {
    if path_prefix.is_empty() {
        return Ok(None);
    }
    let path = PathBuf::from(path_prefix);
    if !path.is_absolute() {
        return Err(fdo::Error::InvalidArgs(
            "a path prefix must be absolute".into(),
        ));
    }
    if path_prefix.len() > MAX_PATH || path_prefix.chars().any(char::is_control) {
        return Err(fdo::Error::InvalidArgs(format!(
            "a path prefix is at most {MAX_PATH} bytes, without control characters"
        )));
    }
    // Resolving it takes a helper process: one of the caller's slots.
    let _slot = agent.shared.reserve(caller.uid)?;
    let job = PlanJob {
        resolve: vec![path],
        ..PlanJob::new(caller, None, PathBuf::from("/"), &[])
    };
    let reply = as_caller::plan(&agent.shared.exe, &job)
        .await
        .map_err(failed)?;
    Ok(reply.resolved.into_iter().next())
}

/// The rule a "remember" creates: the exact action by default, or the prefix the
/// user gave, which must cover this action and is bounded by its class.
fn remembered_rule(
    asked: Rule,
    record: &ActionRecord,
    cwd: &Path,
    policy: &crate::config::Policy,
) -> fdo::Result<Rule> {
    if asked.allow {
        approval::may_remember(&record.action, &record.risk).map_err(invalid_args)?;
    }
    let exact = asked.command_prefix.is_empty() && asked.path_prefix.is_none();
    if asked.allow && !exact {
        approval::may_remember_prefix(&record.risk, policy).map_err(invalid_args)?;
    }
    let rule = Rule {
        exact: exact.then(|| Exact {
            action: record.action.clone(),
            cwd: cwd.to_path_buf(),
        }),
        max_class: Some(record.risk.class),
        approved: Some(record.risk.clone()),
        ..asked
    };
    if !approval::rule_matches(&rule, &record.action, &record.risk, cwd) {
        return Err(fdo::Error::InvalidArgs(format!(
            "the scope ({}) does not cover this action ({}); give a prefix of its command or a directory holding its paths",
            approval::describe_rule(&rule),
            record.description
        )));
    }
    Ok(rule)
}

/// `AddRule`: a rule without an action to start from. Allow rules get the widest
/// bounds a prefix can have (up to `network`; never unknown, destructive, privileged
/// or secrets).
pub(super) async fn add_rule(
    agent: &Agent,
    caller: &Caller,
    decision: &str,
    lifetime: &str,
    command_prefix: Vec<String>,
    path_prefix: &str,
) -> fdo::Result<i64> {
    let allow = match decision {
        "allow" => true,
        "deny" => false,
        other => {
            return Err(fdo::Error::InvalidArgs(format!(
                "decision must be allow or deny, not `{other}`"
            )));
        }
    };
    agent.shared.may_record(caller.uid)?;
    let lifetime: Remember = lifetime.parse().map_err(invalid_args)?;
    if lifetime == Remember::Once {
        return Err(fdo::Error::InvalidArgs(
            "a rule lives for the session or always".into(),
        ));
    }
    let path_prefix = resolve_prefix(agent, caller, path_prefix).await?;
    if command_prefix.is_empty() && path_prefix.is_none() {
        return Err(fdo::Error::InvalidArgs(
            "a rule needs a command prefix and/or an absolute path prefix".into(),
        ));
    }
    let max_class = if allow {
        Some(
            approval::widest_standing_class(&agent.shared.config().policy).ok_or_else(|| {
                let classes: Vec<&str> =
                    approval::PREFIX_CLASSES.iter().map(|c| c.as_str()).collect();
                fdo::Error::InvalidArgs(format!(
                    "the policy's user-may-auto-approve names none of {}: users may not add allow rules (approve actions one at a time)",
                    classes.join(", ")
                ))
            })?,
        )
    } else {
        None
    };
    // (What the rule's first word alone makes every command it starts: a rule that
    // could never match is refused, not kept to mislead.)
    if let Some(max) = max_class
        && let Some(program) = command_prefix.first()
        && let Some((class, why)) = crate::risk::programs::class_of_every_run(program)
        && class > max
    {
        let instead = match class {
            RiskClass::Privileged => {
                "in the sandbox such a command cannot gain privileges anyway: run it yourself"
            }
            RiskClass::Destructive => "approve each one when asked, or add a deny rule",
            _ => "approve each one when asked",
        };
        return Err(fdo::Error::InvalidArgs(format!(
            "an allow rule for commands starting `{}` would never allow anything: {why}, so every such command is {class}, and allow rules cover up to {max}; {instead}",
            command_prefix.join(" "),
        )));
    }
    let rule = Rule {
        max_class,
        ..Rule::new(
            caller.uid,
            allow,
            lifetime,
            command_prefix,
            path_prefix,
            now(),
        )
    };
    store_rule(agent, caller, &rule, None, None)
}
