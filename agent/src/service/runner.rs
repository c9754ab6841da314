//! Carrying out a request: wait for each pending decision, decide each action again
//! just before it starts (the policy or the rules may have changed since it was
//! planned), record it before it runs (an action that cannot be recorded does not
//! run), run it in its sandbox, record what happened, stop at the first denial or
//! failure.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::mpsc;
use zbus::fdo;

use super::agent::{Agent, Decider};
use super::shared::{Control, ServiceError, Shared, Slot, failed, lock, now};
use crate::caller::Caller;
use crate::config::{AgentConfig, UserPolicy};
use crate::executor;
use crate::request::{ActionState, Decision, Request, State};
use crate::sandbox::Spec;

pub(super) async fn run_request(
    shared: Arc<Shared>,
    id: String,
    caller: Caller,
    user_policy: UserPolicy,
    mut control: mpsc::UnboundedReceiver<Control>,
    _slot: Slot,
) {
    let outcome = drive(&shared, &id, &caller, user_policy, &mut control).await;
    if let Err(e) = outcome {
        tracing::error!(request = %id, "request failed inside the agent: {e}");
        if let Ok(Some(mut r)) = shared.load(&id) {
            r.state = State::Failed;
            r.error = Some(format!("internal error: {e}"));
            r.updated = now();
            if let Err(e) = shared.save(&r) {
                tracing::error!(request = %id, "cannot record that the request failed: {e}");
            }
            state_changed(&shared, &r).await;
        }
    }
    lock(&shared.live).remove(&id);
}

async fn state_changed(shared: &Shared, r: &Request) {
    if let Some(e) = shared.emitter(&r.id) {
        // Signals are a courtesy to a client still listening; `Get` has the state.
        let _ = Agent::request_changed(&e, &r.id, r.state.as_str()).await;
    }
}

pub(super) async fn set_state(shared: &Shared, r: &mut Request, state: State) -> fdo::Result<()> {
    r.state = state;
    r.updated = now();
    shared.save_merging(r)?;
    state_changed(shared, r).await;
    if state.is_final() {
        let keep = shared.config().limits.history_per_user;
        if let Err(e) = lock(&shared.store).prune(r.uid, keep) {
            tracing::warn!(uid = r.uid, "cannot drop old requests: {e}");
        }
        // (`audit` logs a failed append; the request has ended either way.)
        let _ = shared.audit(
            "request.finished",
            Some(r.uid),
            Some(&r.id),
            None,
            serde_json::json!({ "state": state, "error": r.error }),
        );
    }
    Ok(())
}

fn skip_rest(r: &mut Request, from: usize) {
    for a in r.actions.iter_mut().skip(from) {
        if a.state == ActionState::Pending {
            a.state = ActionState::Skipped;
        }
    }
}

/// Fail action `i` before it ran.
async fn refuse(shared: &Shared, r: &mut Request, i: usize, why: String) -> fdo::Result<()> {
    let a = &mut r.actions[i];
    a.state = ActionState::Failed;
    a.error = Some(why.clone());
    r.error = Some(format!("action {i}: {why}"));
    skip_rest(r, i + 1);
    // (`audit` logs a failed append; the action does not run either way.)
    let _ = shared.audit(
        "action.refused",
        Some(r.uid),
        Some(&r.id),
        Some(i as u32),
        r.actions[i].audit_detail(serde_json::json!({ "reason": why })),
    );
    set_state(shared, r, State::Failed).await
}

async fn drive(
    shared: &Arc<Shared>,
    id: &str,
    caller: &Caller,
    user_policy: UserPolicy,
    control: &mut mpsc::UnboundedReceiver<Control>,
) -> fdo::Result<()> {
    let r = shared.load(id)?.ok_or_else(|| failed("request vanished"))?;
    let mut driver = Driver {
        shared,
        id,
        caller: caller.clone(),
        user_policy,
        control,
        r,
    };
    if driver.r.conversation.is_some() {
        return super::converse::drive(driver).await;
    }
    if driver.end_if_denied_up_front().await?.is_break() {
        return Ok(());
    }
    for i in 0..driver.r.actions.len() {
        if driver.wait_for_decision(i).await?.is_break()
            || driver.end_if_denied(i).await?.is_break()
            || driver.run_action(i).await?.is_break()
        {
            return Ok(());
        }
    }
    set_state(shared, &mut driver.r, State::Done).await
}

/// One request being carried out. Each step either lets the request go on
/// (`Continue`) or has ended it and saved its final state (`Break`).
pub(super) struct Driver<'a> {
    pub(super) shared: &'a Arc<Shared>,
    pub(super) id: &'a str,
    /// Who the caller is: as at submission, then as looked up again before each action
    /// starts (group memberships and `admin-groups` may have changed since).
    pub(super) caller: Caller,
    /// The caller's policy file as the actions waiting to run were decided with (the
    /// model's: as the last one proposed was).
    pub(super) user_policy: UserPolicy,
    pub(super) control: &'a mut mpsc::UnboundedReceiver<Control>,
    pub(super) r: Request,
}

/// What deciding an action again just before it starts came to.
#[derive(Debug, PartialEq, Eq)]
enum Again {
    /// Its decision stands: it may start.
    Stands,
    /// Something now denies it.
    Denied,
    /// It was approved without asking, and that approval no longer holds.
    Ask,
}

impl Again {
    /// An action approved `before` and decided `current` now: whatever denies it now
    /// denies it; an approval that was not the user's own (`by_user`, who approved it
    /// by `Approve`) must still hold.
    fn of(current: &Decision, before: &Decision, by_user: &str) -> Again {
        match (current, before) {
            (Decision::Denied { .. }, _) => Again::Denied,
            (Decision::Ask, Decision::Approved { by }) if by != by_user => Again::Ask,
            _ => Again::Stands,
        }
    }
}

impl Driver<'_> {
    /// Skip the actions from `from` on (those still pending) and end the request in `state`.
    pub(super) async fn end(&mut self, from: usize, state: State) -> fdo::Result<ControlFlow<()>> {
        skip_rest(&mut self.r, from);
        set_state(self.shared, &mut self.r, state).await?;
        Ok(ControlFlow::Break(()))
    }

    /// Fail action `i` before it ran, which ends the request.
    pub(super) async fn refuse(&mut self, i: usize, why: String) -> fdo::Result<ControlFlow<()>> {
        refuse(self.shared, &mut self.r, i, why).await?;
        Ok(ControlFlow::Break(()))
    }

    /// An action denied before the request started means nothing runs.
    async fn end_if_denied_up_front(&mut self) -> fdo::Result<ControlFlow<()>> {
        let Some(denied) = self
            .r
            .actions
            .iter()
            .find(|a| matches!(a.decision, Decision::Denied { .. }))
        else {
            return Ok(ControlFlow::Continue(()));
        };
        self.r.error = Some(format!(
            "action {} was denied, so nothing ran: {}",
            denied.index,
            match &denied.decision {
                Decision::Denied { by, reason } => format!("{reason} ({by})"),
                _ => String::new(),
            }
        ));
        self.end(0, State::Denied).await
    }

    /// Wait until action `i` is decided, asking for approval while it is not; a cancel
    /// ends the request.
    pub(super) async fn wait_for_decision(&mut self, i: usize) -> fdo::Result<ControlFlow<()>> {
        // A decision may have come while an earlier action ran.
        self.shared.save_merging(&mut self.r)?;
        while self.r.actions[i].decision == Decision::Ask {
            if self.r.state != State::AwaitingApproval {
                set_state(self.shared, &mut self.r, State::AwaitingApproval).await?;
            }
            if let Some(e) = self.shared.emitter(self.id) {
                let a = &self.r.actions[i];
                // (A courtesy, as for state changes: `Get` shows what waits.)
                let _ = Agent::approval_needed(
                    &e,
                    self.id,
                    a.index,
                    a.risk.class.as_str(),
                    &shown(&a.description),
                    a.origin.as_str(),
                )
                .await;
            }
            match self.control.recv().await {
                Some(Control::Decided) => {
                    self.r = self
                        .shared
                        .load(self.id)?
                        .ok_or_else(|| failed("request vanished"))?
                }
                Some(Control::Cancel) | None => return self.end(i, State::Cancelled).await,
            }
        }
        Ok(ControlFlow::Continue(()))
    }

    /// A denied action ends the request; what follows it does not run.
    pub(super) async fn end_if_denied(&mut self, i: usize) -> fdo::Result<ControlFlow<()>> {
        if let Decision::Denied { by, reason } = &self.r.actions[i].decision {
            self.r.error = Some(format!("action {i} denied by {by}: {reason}"));
            return self.end(i, State::Denied).await;
        }
        Ok(ControlFlow::Continue(()))
    }

    /// Decide approved action `i` again (and ask for it again, or end the request,
    /// when that changes its decision); then record it as started (it does not run
    /// unless that is on record), give it a private directory and a cgroup, run it in
    /// its sandbox, clean up, and record what happened.
    pub(super) async fn run_action(&mut self, i: usize) -> fdo::Result<ControlFlow<()>> {
        loop {
            let admin_groups = self.shared.config().policy.admin_groups.clone();
            let uid = self.caller.uid;
            match tokio::task::spawn_blocking(move || Caller::from_uid(uid, &admin_groups)).await {
                Ok(Ok(now)) => self.caller = now,
                Ok(Err(e)) => return self.refuse(i, format!("{e}; nothing ran")).await,
                Err(e) => return self.refuse(i, format!("{e}; nothing ran")).await,
            }
            let again = match self.decide_again(i) {
                Ok(again) => again,
                Err(e) => return self.refuse(i, format!("{e}; nothing ran")).await,
            };
            match again {
                Again::Stands => break,
                Again::Denied => return self.end_if_denied(i).await,
                Again::Ask => {
                    if self.wait_for_decision(i).await?.is_break()
                        || self.end_if_denied(i).await?.is_break()
                    {
                        return Ok(ControlFlow::Break(()));
                    }
                }
            }
        }
        // (Nothing is awaited from here to the record that it started: the decision
        // just made is the one it runs on.)
        let config = self.shared.config();
        if let Err(e) = self.audit_started(i) {
            return self.refuse(i, format!("{e}; nothing ran")).await;
        }
        let label = format!("{}-{i}", self.id);
        let private = match executor::private_dir(&config.actions_dir, &label, &self.caller) {
            Ok(p) => p,
            Err(e) => return self.refuse(i, format!("{e}; nothing ran")).await,
        };
        let cgroup = action_cgroup(self.shared, &label, &config);
        self.r.actions[i].state = ActionState::Running;
        set_state(self.shared, &mut self.r, State::Running).await?;
        let spec = executor::spec_for(
            &self.r.actions[i],
            &self.caller,
            &self.r.cwd,
            private.clone(),
            cgroup.clone(),
            &config,
        );
        // One budget for the whole request, so no request is larger than the bus can
        // carry.
        let max_output = (config.sandbox.max_output_bytes as usize)
            .saturating_sub(self.r.actions.iter().map(|a| a.output.len()).sum());
        let outcome = execute_forwarding(
            self.shared,
            self.id,
            i,
            &spec,
            std::time::Duration::from_secs(config.sandbox.timeout_secs),
            max_output,
            self.control,
        )
        .await;
        clean_up(private, cgroup).await;
        self.record_outcome(i, outcome).await
    }

    /// Decide action `i` again with the configuration and the remembered rules as they
    /// are now: an administrator's deny rule (after `ReloadConfig`), a class no longer
    /// auto-approved or a rule removed since the request was planned holds for it as
    /// for a new request. Something that now denies it denies it, whoever approved
    /// it; an approval the policy or a rule gave without asking that no longer holds
    /// is asked for again; the user's own approval stands otherwise. A change is on
    /// record before it counts (an error: it could not be recorded).
    fn decide_again(&mut self, i: usize) -> Result<Again, ServiceError> {
        let config = self.shared.config();
        let a = &self.r.actions[i];
        let current = Decider::new(self.shared, &self.caller, &self.user_policy, &config)?.decide(
            &a.action,
            &a.risk,
            &self.r.cwd,
        );
        let by_user = crate::approval::by_user(&self.r.user, self.r.uid);
        let again = Again::of(&current, &a.decision, &by_user);
        if again == Again::Stands {
            return Ok(again);
        }
        self.shared.audit_durable(
            "action.decided",
            Some(self.r.uid),
            Some(self.id),
            Some(i as u32),
            a.audit_detail(serde_json::json!({
                "origin": a.origin,
                "risk": a.risk.class,
                "profile": a.profile,
                "decision": current,
                "was": a.decision,
                "why": "decided again before it started: the policy or the rules changed since it was planned",
            })),
        )?;
        self.r.actions[i].decision = current.clone();
        // Straight into the stored request (as `Approve` does): merging would take the
        // old approval back.
        let store = lock(&self.shared.store);
        if let Some(mut stored) = store.request(self.id)?
            && let Some(record) = stored.actions.get_mut(i)
        {
            record.decision = current;
            stored.updated = now();
            store.save_request(&stored)?;
        }
        Ok(again)
    }

    /// Put action `i` on record as started, durably: what it does (a `git push`)
    /// cannot be taken back, so its entry must outlast a power loss right after.
    fn audit_started(&self, i: usize) -> Result<(), ServiceError> {
        let a = &self.r.actions[i];
        self.shared.audit_durable(
            "action.started",
            Some(self.r.uid),
            Some(self.id),
            Some(i as u32),
            a.audit_detail(serde_json::json!({
                "risk": a.risk.class,
                "profile": a.profile,
            })),
        )
    }

    /// Keep what action `i` did and put it on record; a cancel or an outcome that
    /// could not be recorded ends the request, and so does a failure — except in a
    /// conversation with the model, which is told about it instead.
    async fn record_outcome(
        &mut self,
        i: usize,
        outcome: executor::Outcome,
    ) -> fdo::Result<ControlFlow<()>> {
        let ok = outcome.succeeded();
        let a = &mut self.r.actions[i];
        a.state = if ok {
            ActionState::Succeeded
        } else {
            ActionState::Failed
        };
        a.exit_code = outcome.exit_code;
        a.output = outcome.output;
        a.output_truncated = outcome.truncated;
        a.error = outcome.error.clone();
        a.sandbox = outcome.sandbox;
        let finished = self.shared.audit(
            if outcome.risk_changed {
                "action.refused"
            } else {
                "action.finished"
            },
            Some(self.r.uid),
            Some(self.id),
            Some(i as u32),
            a.audit_detail(serde_json::json!({
                "exit-code": a.exit_code,
                "error": a.error,
                "sandbox": a.sandbox,
                "output-sha256": hex::encode(<sha2::Sha256 as sha2::Digest>::digest(a.output.as_bytes())),
            })),
        );
        let cancelled = outcome.error.as_deref() == Some("cancelled");
        let model_is_told = self.r.conversation.is_some() && !cancelled;
        if finished.is_ok() && (ok || model_is_told) {
            return Ok(ControlFlow::Continue(()));
        }
        self.r.error = Some(match (&outcome.error, outcome.exit_code, finished) {
            (Some(e), _, _) => format!("action {i} failed: {e}"),
            (None, _, Err(e)) => format!("action {i} ran, but {e}; nothing more runs"),
            (None, Some(code), _) => format!("action {i} exited with status {code}"),
            (None, None, _) => format!("action {i} failed"),
        });
        let state = if cancelled {
            State::Cancelled
        } else {
            State::Failed
        };
        self.end(i + 1, state).await
    }
}

/// The most of an action's description a prompt shows (a `write` of a large file
/// names only its size, but an argv can be long): `devos show` has all of it.
const PROMPT_DESCRIPTION: usize = 4096;

/// `description` as an approval prompt carries it: whole, or cut with a note.
fn shown(description: &str) -> std::borrow::Cow<'_, str> {
    if description.len() <= PROMPT_DESCRIPTION {
        return description.into();
    }
    format!(
        "{}… ({} bytes in all; `devos show` has it whole)",
        crate::executor::head(description, PROMPT_DESCRIPTION),
        description.len()
    )
    .into()
}

/// A cgroup with the configured limits for one action, where the agent has cgroups;
/// an action runs without one rather than not at all.
fn action_cgroup(shared: &Shared, label: &str, config: &AgentConfig) -> Option<PathBuf> {
    shared.cgroups.as_ref().and_then(|c| {
        c.action(
            &format!("action-{label}"),
            config.sandbox.memory_max_mib,
            config.sandbox.tasks_max,
        )
        .map_err(|e| tracing::warn!("no cgroup for action {label}: {e}"))
        .ok()
    })
}

/// Run action `i` in its sandbox, sending its output as signals while it runs, until
/// it ends or the request is cancelled.
async fn execute_forwarding(
    shared: &Shared,
    id: &str,
    i: usize,
    spec: &Spec,
    timeout: std::time::Duration,
    max_output: usize,
    control: &mut mpsc::UnboundedReceiver<Control>,
) -> executor::Outcome {
    let emitter = shared.emitter(id);
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<String>();
    let forward = {
        let id = id.to_owned();
        async move {
            while let Some(chunk) = out_rx.recv().await {
                // (Already printable: no NUL, which a bus daemon answers by dropping
                // the sender's connection.)
                if let Some(e) = &emitter {
                    // (A courtesy: the record keeps the output.)
                    let _ = Agent::action_output(e, &id, i as u32, &chunk).await;
                }
            }
        }
    };
    let cancel = async {
        loop {
            match control.recv().await {
                Some(Control::Cancel) | None => break,
                Some(Control::Decided) => {}
            }
        }
    };
    let (outcome, ()) = tokio::join!(
        async {
            let o = executor::execute(
                spec,
                timeout,
                max_output,
                |chunk| {
                    // (The forwarder outlives every chunk: it stops when this
                    // sender is dropped.)
                    let _ = out_tx.send(chunk.to_owned());
                },
                cancel,
            )
            .await;
            drop(out_tx);
            o
        },
        forward
    );
    outcome
}

/// Remove an action's cgroup and private directory once it has ended.
async fn clean_up(private: PathBuf, cgroup: Option<PathBuf>) {
    let dir = private.clone();
    let cleaned = tokio::task::spawn_blocking(move || {
        if let Some(c) = cgroup {
            crate::sandbox::cgroup::remove(&c);
        }
        std::fs::remove_dir_all(private)
    })
    .await;
    if let Err(e) = cleaned.map_err(std::io::Error::other).and_then(|r| r) {
        tracing::warn!(dir = %dir.display(), "cannot clean up after an action: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_approval_not_the_users_own_must_still_hold_and_a_denial_always_wins() {
        let user = crate::approval::by_user("dev", 1000);
        let approved = |by: &str| Decision::Approved { by: by.into() };
        let denied = Decision::Denied {
            by: "policy deny rule".into(),
            reason: "no".into(),
        };
        let by_policy = approved("policy: writes-workdir runs without asking");
        let by_rule = approved("remembered rule 7 (exactly `mkdir x` in /p)");
        for before in [&by_policy, &by_rule, &approved(&user)] {
            assert_eq!(Again::of(&denied, before, &user), Again::Denied);
            assert_eq!(Again::of(&by_policy, before, &user), Again::Stands);
        }
        // No longer auto-approved, or the rule is gone: asked again.
        assert_eq!(Again::of(&Decision::Ask, &by_policy, &user), Again::Ask);
        assert_eq!(Again::of(&Decision::Ask, &by_rule, &user), Again::Ask);
        // The user asked and approved it: that stands.
        assert_eq!(
            Again::of(&Decision::Ask, &approved(&user), &user),
            Again::Stands
        );
        // Another user's name is not the user's own approval.
        let other = crate::approval::by_user("eve", 1001);
        assert_eq!(
            Again::of(&Decision::Ask, &approved(&other), &user),
            Again::Ask
        );
    }
}
