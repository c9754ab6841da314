//! Carrying out a request: wait for each pending decision, record each action before
//! it runs (an action that cannot be recorded does not run), run it in its sandbox,
//! record what happened, stop at the first denial or failure.

use std::sync::Arc;

use tokio::sync::mpsc;
use zbus::fdo;

use super::agent::Agent;
use super::shared::{Control, Shared, Slot, failed, lock, now};
use crate::caller::Caller;
use crate::executor;
use crate::request::{ActionState, Decision, Request, State};

pub(super) async fn run_request(
    shared: Arc<Shared>,
    id: String,
    caller: Caller,
    mut control: mpsc::UnboundedReceiver<Control>,
    _slot: Slot,
) {
    let outcome = drive(&shared, &id, &caller, &mut control).await;
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

async fn set_state(shared: &Shared, r: &mut Request, state: State) -> fdo::Result<()> {
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
        serde_json::json!({ "reason": why }),
    );
    set_state(shared, r, State::Failed).await
}

async fn drive(
    shared: &Arc<Shared>,
    id: &str,
    caller: &Caller,
    control: &mut mpsc::UnboundedReceiver<Control>,
) -> fdo::Result<()> {
    let mut r = shared.load(id)?.ok_or_else(|| failed("request vanished"))?;
    if let Some(denied) = r
        .actions
        .iter()
        .find(|a| matches!(a.decision, Decision::Denied { .. }))
    {
        r.error = Some(format!(
            "action {} was denied, so nothing ran: {}",
            denied.index,
            match &denied.decision {
                Decision::Denied { by, reason } => format!("{reason} ({by})"),
                _ => String::new(),
            }
        ));
        skip_rest(&mut r, 0);
        return set_state(shared, &mut r, State::Denied).await;
    }
    for i in 0..r.actions.len() {
        // A decision may have come while an earlier action ran.
        shared.save_merging(&mut r)?;
        while r.actions[i].decision == Decision::Ask {
            if r.state != State::AwaitingApproval {
                set_state(shared, &mut r, State::AwaitingApproval).await?;
            }
            if let Some(e) = shared.emitter(id) {
                let a = &r.actions[i];
                // (A courtesy, as for state changes: `Get` shows what waits.)
                let _ =
                    Agent::approval_needed(&e, id, a.index, a.risk.class.as_str(), &a.description)
                        .await;
            }
            match control.recv().await {
                Some(Control::Decided) => {
                    r = shared.load(id)?.ok_or_else(|| failed("request vanished"))?
                }
                Some(Control::Cancel) | None => {
                    skip_rest(&mut r, i);
                    return set_state(shared, &mut r, State::Cancelled).await;
                }
            }
        }
        if let Decision::Denied { by, reason } = &r.actions[i].decision {
            r.error = Some(format!("action {i} denied by {by}: {reason}"));
            skip_rest(&mut r, i);
            return set_state(shared, &mut r, State::Denied).await;
        }
        let config = shared.config();
        let started = shared.audit(
            "action.started",
            Some(r.uid),
            Some(id),
            Some(i as u32),
            serde_json::json!({
                "action": r.actions[i].description,
                "risk": r.actions[i].risk.class,
                "profile": r.actions[i].profile,
            }),
        );
        if let Err(e) = started {
            return refuse(shared, &mut r, i, format!("{e}; nothing ran")).await;
        }
        let label = format!("{id}-{i}");
        let private = match executor::private_dir(&config.actions_dir, &label, caller) {
            Ok(p) => p,
            Err(e) => return refuse(shared, &mut r, i, format!("{e}; nothing ran")).await,
        };
        let cgroup = shared.cgroups.as_ref().and_then(|c| {
            c.action(
                &format!("action-{label}"),
                config.sandbox.memory_max_mib,
                config.sandbox.tasks_max,
            )
            .map_err(|e| tracing::warn!("no cgroup for action {label}: {e}"))
            .ok()
        });
        r.actions[i].state = ActionState::Running;
        set_state(shared, &mut r, State::Running).await?;
        let spec = executor::spec_for(
            &r.actions[i],
            caller,
            &r.cwd,
            private.clone(),
            cgroup.clone(),
            &config,
        );
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
                    &spec,
                    std::time::Duration::from_secs(config.sandbox.timeout_secs),
                    // One budget for the whole request, so no request is larger than
                    // the bus can carry.
                    (config.sandbox.max_output_bytes as usize)
                        .saturating_sub(r.actions.iter().map(|a| a.output.len()).sum()),
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
        let ok = outcome.succeeded();
        let a = &mut r.actions[i];
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
        let finished = shared.audit(
            if outcome.risk_changed {
                "action.refused"
            } else {
                "action.finished"
            },
            Some(r.uid),
            Some(id),
            Some(i as u32),
            serde_json::json!({
                "action": a.description,
                "exit-code": a.exit_code,
                "error": a.error,
                "sandbox": a.sandbox,
                "output-sha256": hex::encode(<sha2::Sha256 as sha2::Digest>::digest(a.output.as_bytes())),
            }),
        );
        if !ok || finished.is_err() {
            let cancelled = outcome.error.as_deref() == Some("cancelled");
            r.error = Some(match (&outcome.error, outcome.exit_code, finished) {
                (Some(e), _, _) => format!("action {i} failed: {e}"),
                (None, _, Err(e)) => format!("action {i} ran, but {e}; nothing more runs"),
                (None, Some(code), _) => format!("action {i} exited with status {code}"),
                (None, None, _) => format!("action {i} failed"),
            });
            skip_rest(&mut r, i + 1);
            return set_state(
                shared,
                &mut r,
                if cancelled {
                    State::Cancelled
                } else {
                    State::Failed
                },
            )
            .await;
        }
    }
    set_state(shared, &mut r, State::Done).await
}
