//! The model route of a request: a conversation with a model on Bedrock in which
//! every tool call the model makes becomes an action that is classified as the
//! caller, decided by policy, remembered rules and the user, and run in the sandbox
//! exactly like a local plan's — until the model ends its turn with an answer, the
//! step limit, a denial or a cancel. Each model call goes on the ledger (tokens,
//! latency, cost) and budgets are checked before each one.

use std::ops::ControlFlow;

use tokio::sync::mpsc;
use zbus::fdo;

use super::agent::{Agent, Decider, audit_decided};
use super::runner::{Driver, set_state};
use super::shared::{Control, Shared, failed, lock, now};
use crate::caller::{self as as_caller, Caller, PlanJob};
use crate::config::AgentConfig;
use crate::model::bedrock::{self, ModelError, Reply};
use crate::model::conversation::{Block, Conversation, Role, Turn};
use crate::model::tools::{self, Call, ContextQuery};
use crate::model::{self, first_turn, tool_result};
use crate::request::{ActionState, Origin, Request, RequestUsage, State};
use crate::store::{ModelCall, Spent};

/// Between the texts of two model turns, in the answer and as streamed.
const TURN_BREAK: &str = "\n\n";

/// How the summary of a request the local rules could not plan starts.
const NO_LOCAL_RULE: &str = "no local rule matches";

/// A Bedrock client, kept while the settings it was made with stay the same.
pub(super) struct Bedrock {
    key: (String, String, u32),
    client: aws_sdk_bedrockruntime::Client,
    region: String,
}

/// Make `request` (which the local rules could not plan, or which asked for a model)
/// the start of a conversation: choose the model, check the budgets, keep the first
/// turn. `local` is why the local rules could not plan it.
pub(super) fn start(
    shared: &Shared,
    request: &mut Request,
    config: &AgentConfig,
    explicit: Option<&str>,
    local: Option<String>,
    context: &serde_json::Value,
) -> fdo::Result<()> {
    if !config.model.enabled {
        request.state = State::Unplanned;
        request.error = Some(format!(
            "{}; the model route is off on this machine ([model] enabled = false in /etc/devos/agent.toml)",
            local.unwrap_or_else(|| "cannot plan this without the model".into())
        ));
        return Ok(());
    }
    if let Some(why) = over_budget(shared, request.uid, config)? {
        request.state = State::Unplanned;
        request.error = Some(why);
        return Ok(());
    }
    let (model, why) = model::route(&config.model, &request.text, explicit);
    request.planner = "model".into();
    request.summary = match local {
        Some(_) => format!("{NO_LOCAL_RULE}; asking {model} ({why})"),
        None => format!("asking {model} ({why})"),
    };
    request.model = Some(model.clone());
    request.conversation = Some(request.id.clone());
    let conversation = Conversation {
        turns: vec![Turn::user_text(first_turn(&request.text, context))],
    };
    lock(&shared.store)
        .save_conversation(&request.id, request.uid, &model, &conversation, &now())
        .map_err(failed)
}

/// A follow-up request in the conversation of `previous`.
pub(super) fn follow_up(
    shared: &Shared,
    caller: &Caller,
    previous: &Request,
    text: &str,
    config: &AgentConfig,
) -> fdo::Result<Request> {
    let Some(conversation_id) = previous.conversation.clone() else {
        return Err(fdo::Error::InvalidArgs(format!(
            "request {} did not go to the model: there is no conversation to continue (`devos run` starts one)",
            previous.id
        )));
    };
    let store = lock(&shared.store);
    let (model, mut conversation) = store
        .conversation(&conversation_id, caller.uid)
        .map_err(failed)?
        .ok_or_else(|| {
            fdo::Error::InvalidArgs(format!(
                "the conversation of request {} is no longer kept; start a new one with `devos run`",
                previous.id
            ))
        })?;
    if lock(&shared.live)
        .values()
        .any(|l| l.conversation.as_deref() == Some(&conversation_id))
    {
        return Err(fdo::Error::Failed(format!(
            "the conversation of request {} is still going on; wait for it or cancel it",
            previous.id
        )));
    }
    let mut request = Request {
        id: shared.new_id(),
        uid: caller.uid,
        user: caller.user.clone(),
        text: text.to_owned(),
        cwd: previous.cwd.clone(),
        state: State::Planned,
        summary: format!("continuing with {model}"),
        planner: "model".into(),
        error: None,
        created: now(),
        updated: now(),
        actions: Vec::new(),
        plan_micros: 0,
        answer: None,
        conversation: Some(conversation_id.clone()),
        model: Some(model.clone()),
        usage: None,
    };
    if !config.model.enabled {
        request.state = State::Unplanned;
        request.error =
            Some("the model route is off on this machine ([model] enabled = false)".into());
    } else if let Some(why) = over_budget_in(&store, caller.uid, config)? {
        request.state = State::Unplanned;
        request.error = Some(why);
    } else {
        conversation.add_user_text(text.to_owned());
        store
            .save_conversation(&conversation_id, caller.uid, &model, &conversation, &now())
            .map_err(failed)?;
    }
    Ok(request)
}

/// Usage as JSON for `Usage`: rows per day, user and model, totals and budgets.
pub(super) fn usage(shared: &Shared, caller: &Caller, since: &str) -> fdo::Result<String> {
    let since = if since.is_empty() {
        day_of(std::time::SystemTime::now() - std::time::Duration::from_secs(30 * 86400))
    } else if is_day(since) {
        since.to_owned()
    } else {
        return Err(fdo::Error::InvalidArgs(format!(
            "since must be a date YYYY-MM-DD, not `{since}`"
        )));
    };
    let uid = (caller.uid != 0).then_some(caller.uid);
    let store = lock(&shared.store);
    let rows = store.usage(uid, &since).map_err(failed)?;
    let spent = store.spent(caller.uid, &today()).map_err(failed)?;
    let budgets = shared.config().budgets.clone();
    Ok(serde_json::json!({
        "since": since,
        "rows": rows,
        "total-cost-usd": rows.iter().map(|r| r.cost_usd).sum::<f64>(),
        "unpriced-calls": rows.iter().map(|r| r.unpriced_calls).sum::<u64>(),
        "spent": {
            "user-today-usd": spent.user_today,
            "user-month-usd": spent.user_month,
            "machine-month-usd": spent.machine_month,
        },
        "budgets": budgets,
    })
    .to_string())
}

/// Whether `s` is a calendar date written `YYYY-MM-DD`.
fn is_day(s: &str) -> bool {
    let part = |r: std::ops::Range<usize>| {
        s.get(r)
            .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|p| p.parse::<u16>().ok())
    };
    let (Some(y), Some(m), Some(d)) = (part(0..4), part(5..7), part(8..10)) else {
        return false;
    };
    s.len() == 10
        && &s[4..5] == "-"
        && &s[7..8] == "-"
        && time::Month::try_from(m as u8)
            .ok()
            .and_then(|m| time::Date::from_calendar_date(y as i32, m, d as u8).ok())
            .is_some()
}

fn day_of(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()[..10].to_owned()
}

fn today() -> String {
    day_of(std::time::SystemTime::now())
}

fn over_budget(shared: &Shared, uid: u32, config: &AgentConfig) -> fdo::Result<Option<String>> {
    over_budget_in(&lock(&shared.store), uid, config)
}

/// Why `uid` may not make another model call now, with the figures, or `None`.
fn over_budget_in(
    store: &crate::store::Store,
    uid: u32,
    config: &AgentConfig,
) -> fdo::Result<Option<String>> {
    let b = &config.budgets;
    let Spent {
        user_today,
        user_month,
        machine_month,
    } = store.spent(uid, &today()).map_err(failed)?;
    let over = [
        (
            b.user_daily_usd,
            user_today,
            "your daily model budget",
            "today",
            "user-daily-usd",
        ),
        (
            b.user_monthly_usd,
            user_month,
            "your monthly model budget",
            "this month",
            "user-monthly-usd",
        ),
        (
            b.machine_monthly_usd,
            machine_month,
            "this machine's monthly model budget",
            "this month by all users",
            "machine-monthly-usd",
        ),
    ]
    .into_iter()
    .find(|(limit, spent, ..)| *limit > 0.0 && spent >= limit);
    Ok(over.map(|(limit, spent, what, when, key)| {
        format!(
            "{what} is used up: ${spent:.4} spent {when} (UTC) of ${limit:.4}; nothing was sent to the model. It resets at the start of the next UTC day or month; an administrator can raise [budgets] {key} in /etc/devos/agent.toml"
        )
    }))
}

/// Carry out a request of the model route: call the model, carry out the tool calls
/// it makes and answer them, until it ends its turn or something ends the request.
pub(super) async fn drive(mut d: Driver<'_>) -> fdo::Result<()> {
    let config = d.shared.config();
    let (model_id, mut conversation) = open(&d)?;
    set_state(d.shared, &mut d.r, State::Running).await?;
    let (client, region) = match client(d.shared, &config).await {
        Ok(c) => c,
        Err(e) => return fail(&mut d, e.to_string()).await,
    };
    let tools = tools::definitions();
    let mut trimmed = false;
    let mut steps = 0;
    loop {
        if let Some(why) = must_stop(&d, &config, steps)? {
            return fail(&mut d, why).await;
        }
        steps += 1;
        let call = bedrock::Call {
            model: &model_id,
            region: &region,
            endpoint: &config.model.endpoint_url,
            system: model::SYSTEM_PROMPT,
            tools: &tools,
            turns: &conversation.turns,
            max_tokens: config.model.max_tokens,
            temperature: config.model.temperature,
            caching: config.model.prompt_caching,
            stream: config.model.stream,
            max_attempts: config.model.max_attempts,
        };
        let reply = match call_streaming(&mut d, &client, &call).await {
            None => return d.end(d.r.actions.len(), State::Cancelled).await.map(|_| ()),
            Some(Err(e)) if e.is_too_long() && !trimmed && conversation.trim() => {
                trimmed = true;
                steps -= 1;
                continue;
            }
            Some(Err(e)) => return fail(&mut d, e.to_string()).await,
            Some(Ok(reply)) => reply,
        };
        take_reply(&mut d, &config, &model_id, &reply, &mut conversation)?;
        if !reply.wants_tools() {
            return set_state(d.shared, &mut d.r, State::Done).await;
        }
        let (results, ended) = answer_tool_calls(&mut d, &config, &reply.turn).await?;
        conversation.turns.push(results);
        save(&d, &model_id, &conversation)?;
        if ended {
            return Ok(());
        }
    }
}

/// The request's model and its conversation so far.
fn open(d: &Driver<'_>) -> fdo::Result<(String, Conversation)> {
    let id = d.r.conversation.as_deref().unwrap_or(d.id);
    let (model_id, conversation) = lock(&d.shared.store)
        .conversation(id, d.r.uid)
        .map_err(failed)?
        .ok_or_else(|| failed("the conversation vanished"))?;
    Ok((d.r.model.clone().unwrap_or(model_id), conversation))
}

/// Why no further model call may be made after `steps` of them: the step limit, or a
/// budget used up.
fn must_stop(d: &Driver<'_>, config: &AgentConfig, steps: u32) -> fdo::Result<Option<String>> {
    if steps == config.model.max_steps {
        return Ok(Some(format!(
            "stopped after {steps} model calls ([model] max-steps = {}); `devos run --continue` goes on",
            config.model.max_steps
        )));
    }
    over_budget(d.shared, d.r.uid, config)
}

/// Keep a model reply: on the ledger, in the conversation, its text in the answer.
fn take_reply(
    d: &mut Driver<'_>,
    config: &AgentConfig,
    model_id: &str,
    reply: &Reply,
    conversation: &mut Conversation,
) -> fdo::Result<()> {
    record_call(d, config, model_id, reply)?;
    conversation.turns.push(reply.turn.clone());
    save(d, model_id, conversation)?;
    let text = reply.turn.text();
    if !text.trim().is_empty() {
        let answer = d.r.answer.get_or_insert_with(String::new);
        if !answer.is_empty() {
            answer.push_str(TURN_BREAK);
        }
        answer.push_str(text.trim());
    }
    Ok(())
}

/// Carry out the tool calls of `turn` in order and answer every one of them (so the
/// conversation can go on later), and whether the request ended on the way.
async fn answer_tool_calls(
    d: &mut Driver<'_>,
    config: &AgentConfig,
    turn: &Turn,
) -> fdo::Result<(Turn, bool)> {
    let mut results = Vec::new();
    let mut ended = false;
    for block in &turn.blocks {
        let Block::ToolUse { id, name, input } = block else {
            continue;
        };
        let (ok, content) = if ended {
            (
                false,
                "not run: the request ended before this call".to_owned(),
            )
        } else {
            match tool_call(d, config, name, input).await? {
                ControlFlow::Continue(answer) => answer,
                ControlFlow::Break(why) => {
                    ended = true;
                    (false, why)
                }
            }
        };
        results.push(Block::ToolResult {
            id: id.clone(),
            ok,
            content,
        });
    }
    let results = Turn {
        role: Role::User,
        blocks: results,
    };
    Ok((results, ended))
}

/// End the request as failed with `why` — and when the model could not be asked at
/// all for a request the local rules could not plan, what the local rules cover.
async fn fail(d: &mut Driver<'_>, mut why: String) -> fdo::Result<()> {
    if d.r.usage.is_none() && d.r.summary.starts_with(NO_LOCAL_RULE) {
        why = format!(
            "{why}\n{}",
            crate::planner::PlanError::NeedsModel(d.r.text.clone())
        );
    }
    // (`audit` logs a failed append; the request ends either way.)
    let _ = d.shared.audit(
        "model.failed",
        Some(d.r.uid),
        Some(d.id),
        None,
        serde_json::json!({ "model": d.r.model, "error": why }),
    );
    d.r.error = Some(why);
    d.end(d.r.actions.len(), State::Failed).await.map(|_| ())
}

fn save(d: &Driver<'_>, model: &str, conversation: &Conversation) -> fdo::Result<()> {
    let id = d.r.conversation.as_deref().unwrap_or(d.id);
    lock(&d.shared.store)
        .save_conversation(id, d.r.uid, model, conversation, &now())
        .map_err(failed)
}

/// The client for the configured model settings, made once and kept.
async fn client(
    shared: &Shared,
    config: &AgentConfig,
) -> Result<(aws_sdk_bedrockruntime::Client, String), ModelError> {
    let m = &config.model;
    let key = (m.region.clone(), m.endpoint_url.clone(), m.max_attempts);
    let mut kept = shared.bedrock.lock().await;
    if let Some(b) = kept.as_ref().filter(|b| b.key == key) {
        return Ok((b.client.clone(), b.region.clone()));
    }
    let (client, region) = bedrock::client(m).await?;
    *kept = Some(Bedrock {
        key,
        client: client.clone(),
        region: region.clone(),
    });
    Ok((client, region))
}

/// One model call, its text sent to the submitter as it comes; `None` when the
/// request was cancelled meanwhile.
async fn call_streaming(
    d: &mut Driver<'_>,
    client: &aws_sdk_bedrockruntime::Client,
    call: &bedrock::Call<'_>,
) -> Option<Result<Reply, ModelError>> {
    let emitter = d.shared.emitter(d.id);
    let mut separate = d.r.answer.is_some();
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let id = d.id.to_owned();
    let forward = async move {
        while let Some(text) = rx.recv().await {
            if let Some(e) = &emitter {
                // (A courtesy: the request keeps the answer.)
                let _ = Agent::model_output(e, &id, &crate::executor::printable(&text)).await;
            }
        }
    };
    let control = &mut *d.control;
    let cancelled = async {
        loop {
            match control.recv().await {
                Some(Control::Cancel) | None => break,
                Some(Control::Decided) => {}
            }
        }
    };
    let call = async {
        let r = bedrock::converse(client, call, |text| {
            let text = if std::mem::take(&mut separate) {
                format!("{TURN_BREAK}{}", text.trim_start())
            } else {
                text.to_owned()
            };
            // (The forwarder runs until this sender is dropped.)
            let _ = tx.send(text);
        })
        .await;
        drop(tx);
        r
    };
    tokio::select! {
        (reply, ()) = async { tokio::join!(call, forward) } => Some(reply),
        () = cancelled => None,
    }
}

/// Put a model call on the ledger and in the request's usage.
fn record_call(
    d: &mut Driver<'_>,
    config: &AgentConfig,
    model_id: &str,
    reply: &Reply,
) -> fdo::Result<()> {
    let cost = model::cost(&config.model, model_id, &reply.usage);
    let call = ModelCall {
        uid: d.r.uid,
        user: d.r.user.clone(),
        request: d.r.id.clone(),
        model: model_id.to_owned(),
        at: now(),
        usage: reply.usage,
        latency_ms: reply.latency.as_millis() as u64,
        cost_usd: cost,
    };
    lock(&d.shared.store)
        .record_model_call(&call)
        .map_err(failed)?;
    let u = d.r.usage.get_or_insert_with(|| RequestUsage {
        cost_micro_usd: Some(0),
        ..RequestUsage::default()
    });
    u.calls += 1;
    u.model_micros += reply.latency.as_micros() as u64;
    u.input_tokens += reply.usage.input;
    u.output_tokens += reply.usage.output;
    u.cache_read_tokens += reply.usage.cache_read;
    u.cache_write_tokens += reply.usage.cache_write;
    u.cost_micro_usd = u
        .cost_micro_usd
        .zip(cost)
        .map(|(sum, c)| sum + (c * 1e6).round() as u64);
    // (`audit` logs a failed append; the call has happened either way.)
    let _ = d.shared.audit(
        "model.called",
        Some(d.r.uid),
        Some(d.id),
        None,
        serde_json::json!({
            "model": model_id,
            "stop-reason": reply.stop_reason,
            "usage": reply.usage,
            "latency-ms": call.latency_ms,
            "cost-usd": cost,
        }),
    );
    d.shared.save_merging(&mut d.r)
}

/// Carry out one tool call: a context question answered as the caller, or an action
/// classified, decided and run like any other. `Continue` carries the answer for the
/// model (whether it succeeded, and what it says); `Break` means the request ended
/// (denied, cancelled, not on record), with what the model is told.
async fn tool_call(
    d: &mut Driver<'_>,
    config: &AgentConfig,
    name: &str,
    input: &serde_json::Value,
) -> fdo::Result<ControlFlow<String, (bool, String)>> {
    let limit = config.model.tool_output_bytes as usize;
    let action = match tools::parse(name, input, &d.r.cwd, &d.caller.home) {
        Err(e) => return Ok(ControlFlow::Continue((false, e.to_string()))),
        Ok(Call::Context(query)) => {
            let answer = context(d, config, query).await?;
            return Ok(ControlFlow::Continue((true, tool_result(&answer, limit))));
        }
        Ok(Call::Act(action)) => action,
    };
    let i = match propose(d, config, action).await? {
        ControlFlow::Continue(i) => i,
        ControlFlow::Break(answer) => return Ok(ControlFlow::Continue((false, answer))),
    };
    if let ControlFlow::Break(why) = carry_out(d, i).await? {
        return Ok(ControlFlow::Break(why));
    }
    let a = &d.r.actions[i];
    let status = match (a.state, a.exit_code, &a.error) {
        (_, _, Some(e)) => format!("failed: {e}"),
        (ActionState::Succeeded, _, None) => "succeeded".to_owned(),
        (_, Some(code), None) => format!("exited with status {code}"),
        _ => "failed".to_owned(),
    };
    let cut = if a.output_truncated {
        " (output cut)"
    } else {
        ""
    };
    let body = format!("{status}{cut}\n{}", a.output);
    let ok = a.state == ActionState::Succeeded;
    Ok(ControlFlow::Continue((ok, tool_result(&body, limit))))
}

/// Classify `action` as the caller, decide it, and add it to the request on record:
/// its index, or (`Break`) what the model is told when it cannot be classified.
async fn propose(
    d: &mut Driver<'_>,
    config: &AgentConfig,
    action: crate::action::Action,
) -> fdo::Result<ControlFlow<String, usize>> {
    let job = PlanJob {
        classify: vec![action.clone()],
        ..PlanJob::new(d.caller, None, d.r.cwd.clone(), &config.sandbox.secrets)
    };
    let reply = as_caller::plan(&d.shared.exe, &job).await.map_err(failed)?;
    let (Some(risk), Ok(user_policy)) = (reply.risks.into_iter().next(), reply.user_policy) else {
        let why = "cannot classify the action as you (is your ~/.config/devos/agent.toml valid?)";
        return Ok(ControlFlow::Break(why.into()));
    };
    let i = d.r.actions.len();
    let decider = Decider::new(d.shared, d.caller, &user_policy, config)?;
    let record = decider.record(i as u32, action, risk, &d.r.cwd, Origin::Model);
    d.r.actions.push(record);
    Ok(ControlFlow::Continue(i))
}

/// Put action `i` on record, wait for its decision and run it: `Break` (with what the
/// model is told) when that ended the request.
async fn carry_out(d: &mut Driver<'_>, i: usize) -> fdo::Result<ControlFlow<String>> {
    let proposed = d.shared.audit(
        "action.proposed",
        Some(d.r.uid),
        Some(d.id),
        Some(i as u32),
        serde_json::json!({ "action": d.r.actions[i].description, "origin": "model" }),
    );
    if let Err(e) = proposed.and_then(|()| audit_decided(d.shared, &d.r, &d.r.actions[i..])) {
        let _ended = d.refuse(i, format!("{e}; nothing ran")).await?;
        return Ok(ControlFlow::Break(
            "not run: it could not be put on record".into(),
        ));
    }
    d.shared.save_merging(&mut d.r)?;
    let why = if d.wait_for_decision(i).await?.is_break() {
        "cancelled by the user"
    } else if d.end_if_denied(i).await?.is_break() {
        "denied: the user or policy refused this action"
    } else if d.run_action(i).await?.is_break() {
        "the request ended while this action ran"
    } else {
        return Ok(ControlFlow::Continue(()));
    };
    Ok(ControlFlow::Break(why.into()))
}

/// Answer a context question as the caller (nothing runs; it is put on record).
async fn context(
    d: &mut Driver<'_>,
    config: &AgentConfig,
    query: ContextQuery,
) -> fdo::Result<String> {
    let job = PlanJob {
        context: Some(query),
        ..PlanJob::new(d.caller, None, d.r.cwd.clone(), &config.sandbox.secrets)
    };
    // (`audit` logs a failed append; reading one's own context changes nothing.)
    let _ = d.shared.audit(
        "model.context",
        Some(d.r.uid),
        Some(d.id),
        None,
        serde_json::json!({ "query": query }),
    );
    let reply = as_caller::plan(&d.shared.exe, &job).await.map_err(failed)?;
    Ok(match (reply.cwd, reply.context) {
        (Err(e), _) => e,
        (Ok(_), Some(v)) => serde_json::to_string_pretty(&v).unwrap_or_default(),
        (Ok(_), None) => "nothing known".to_owned(),
    })
}
