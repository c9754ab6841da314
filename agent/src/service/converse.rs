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
use super::budget;
use super::runner::{Driver, set_state};
use super::shared::{Control, Shared, Slot, failed, lock, now};
use crate::caller::{self as as_caller, Caller, PlanJob};
use crate::config::AgentConfig;
use crate::model::bedrock::{self, ModelError, Reply};
use crate::model::conversation::{Block, Conversation, Role, Turn};
use crate::model::tools::{self, Call, ContextQuery};
use crate::model::{self, first_turn, tool_result};
use crate::request::{ActionState, Decision, Origin, Request, RequestUsage, State};
use crate::store::ModelCall;

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
    let (model, why) = model::route(&config.model, &request.text, explicit);
    if let Some(why) = budget::refusal(shared, request.uid, config, &model)? {
        request.state = State::Unplanned;
        request.error = Some(why);
        return Ok(());
    }
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
    slot: &mut Slot,
) -> fdo::Result<Request> {
    let Some(conversation_id) = previous.conversation.clone() else {
        return Err(fdo::Error::InvalidArgs(format!(
            "request {} did not go to the model: there is no conversation to continue (`devos run` starts one)",
            previous.id
        )));
    };
    if !slot.hold_conversation(&conversation_id) {
        return Err(fdo::Error::Failed(format!(
            "the conversation of request {} is still going on; wait for it or cancel it",
            previous.id
        )));
    }
    let (model, mut conversation) = lock(&shared.store)
        .conversation(&conversation_id, caller.uid)
        .map_err(failed)?
        .ok_or_else(|| {
            fdo::Error::InvalidArgs(format!(
                "the conversation of request {} is no longer kept; start a new one with `devos run`",
                previous.id
            ))
        })?;
    let mut request = Request {
        summary: format!("continuing with {model}"),
        planner: "model".into(),
        conversation: Some(conversation_id.clone()),
        model: Some(model.clone()),
        ..Request::new(
            shared.new_id(),
            caller.uid,
            caller.user.clone(),
            text.to_owned(),
            previous.cwd.clone(),
            now(),
        )
    };
    if !config.model.enabled {
        request.state = State::Unplanned;
        request.error =
            Some("the model route is off on this machine ([model] enabled = false)".into());
    } else if let Some(why) = budget::refusal(shared, caller.uid, config, &model)? {
        request.state = State::Unplanned;
        request.error = Some(why);
    } else {
        conversation.add_user_text(text.to_owned());
        lock(&shared.store)
            .save_conversation(&conversation_id, caller.uid, &model, &conversation, &now())
            .map_err(failed)?;
    }
    Ok(request)
}

/// Carry out a request of the model route: call the model, carry out the tool calls
/// it makes and answer them, until it ends its turn or something ends the request.
pub(super) async fn drive(mut d: Driver<'_>) -> fdo::Result<()> {
    let (model_id, mut conversation) = open(&d)?;
    set_state(d.shared, &mut d.r, State::Running).await?;
    let tools = tools::definitions();
    let mut trimmed = false;
    let mut steps = 0;
    loop {
        // Each call under the configuration of its time: budgets, prices, limits and
        // the endpoint an administrator changed (`ReloadConfig`) reach conversations
        // already going.
        let config = d.shared.config();
        let (client, region) = match client(d.shared, &config).await {
            Ok(c) => c,
            Err(e) => return fail(&mut d, e.to_string()).await,
        };
        if steps >= config.model.max_steps {
            let why = format!(
                "stopped after {steps} model calls ([model] max-steps = {}); `devos run --continue` goes on",
                config.model.max_steps
            );
            return fail(&mut d, why).await;
        }
        // (Only an endpoint that is no model's makes a conversation this long.)
        while conversation.size() > MAX_CONVERSATION_BYTES && conversation.trim() {}
        let shared = d.shared;
        let hold = match budget::hold(shared, d.r.uid, &config, &model_id, &conversation)? {
            Ok(hold) => hold,
            Err(why) => return fail(&mut d, why).await,
        };
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
        let (outcome, streamed) = call_streaming(&mut d, &client, &call).await;
        // What the model wrote of a call that ended without an answer is billed: the
        // text and tool input streamed so far, or its worst case where what it wrote is
        // not known (a call that streams nothing until it is done; one given up on as
        // silent, or whose answer could not be read).
        let reply = match outcome {
            None => {
                let written = config.model.stream.then_some(streamed);
                record_estimate(&mut d, &config, &model_id, &conversation, written)?;
                return d.end(d.r.actions.len(), State::Cancelled).await.map(|_| ());
            }
            Some(Err(e)) if e.is_too_long() && !trimmed && conversation.trim() => {
                trimmed = true;
                steps -= 1;
                continue;
            }
            Some(Err(e)) => {
                if e.may_have_answered() {
                    record_estimate(&mut d, &config, &model_id, &conversation, None)?;
                } else if config.model.stream && streamed > 0 {
                    let written = Some(streamed);
                    record_estimate(&mut d, &config, &model_id, &conversation, written)?;
                }
                return fail(&mut d, e.to_string()).await;
            }
            Some(Ok(reply)) => reply,
        };
        take_reply(
            &mut d,
            &config,
            &model_id,
            &reply,
            streamed,
            &mut conversation,
        )?;
        drop(hold);
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

/// Keep a model reply (and the bytes of text and tool input it wrote): on the ledger,
/// in the conversation, its text in the answer.
fn take_reply(
    d: &mut Driver<'_>,
    config: &AgentConfig,
    model_id: &str,
    reply: &Reply,
    written: usize,
    conversation: &mut Conversation,
) -> fdo::Result<()> {
    // (Bedrock always says; a reply of an endpoint that did not is charged what it wrote.)
    let (usage, estimated) = match reply.usage {
        Some(usage) => (usage, false),
        None => (estimate(config, conversation, Some(written)), true),
    };
    let (latency, stop) = (reply.latency, &reply.stop_reason);
    record(d, config, model_id, usage, latency, stop, estimated)?;
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

/// The bytes of text, tool input and results past which a conversation is trimmed before
/// it is sent, as for a model that said it was too long: twice a context window of a
/// million tokens. (Its first request and last exchange stay, whatever their size.)
const MAX_CONVERSATION_BYTES: usize = 8 << 20;

/// The most tool calls of one turn carried out (the rest are answered "not run").
const MAX_TOOL_CALLS: usize = 32;

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
        } else if results.len() >= MAX_TOOL_CALLS {
            (
                false,
                format!("not run: at most {MAX_TOOL_CALLS} tool calls are answered in one turn"),
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

/// The most text one `ModelOutput` signal carries: far below what a bus daemon
/// accepts in a message (it drops the sender of a larger one).
const SIGNAL_TEXT: usize = 32 << 10;

/// One model call, its text sent to the submitter as it comes (`None` when the
/// request was cancelled meanwhile), and how many bytes of text and tool input came.
async fn call_streaming(
    d: &mut Driver<'_>,
    client: &aws_sdk_bedrockruntime::Client,
    call: &bedrock::Call<'_>,
) -> (Option<Result<Reply, ModelError>>, usize) {
    let emitter = d.shared.emitter(d.id);
    let mut separate = d.r.answer.is_some();
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let id = d.id.to_owned();
    let forward = async move {
        while let Some(text) = rx.recv().await {
            let Some(e) = &emitter else { continue };
            for piece in pieces(&crate::executor::printable(&text), SIGNAL_TEXT) {
                // (A courtesy: the request keeps the answer.)
                let _ = Agent::model_output(e, &id, piece).await;
            }
        }
    };
    let mut streamed = 0;
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
        let r = bedrock::converse(client, call, |text, bytes| {
            streamed = bytes;
            if text.is_empty() {
                return;
            }
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
    let outcome = tokio::select! {
        (reply, ()) = async { tokio::join!(call, forward) } => Some(reply),
        () = cancelled => None,
    };
    (outcome, streamed)
}

/// `text` in pieces of at most `max` bytes, split at character boundaries.
fn pieces(text: &str, max: usize) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (piece, tail) = rest.split_at(crate::executor::head(rest, max).len());
        rest = tail;
        Some(piece)
    })
}

/// Put a call that ended without its usage on the ledger, at [`estimate`].
fn record_estimate(
    d: &mut Driver<'_>,
    config: &AgentConfig,
    model_id: &str,
    conversation: &Conversation,
    written: Option<usize>,
) -> fdo::Result<()> {
    let usage = estimate(config, conversation, written);
    record(
        d,
        config,
        model_id,
        usage,
        std::time::Duration::ZERO,
        "",
        true,
    )
}

/// What a call with `conversation` is charged when its usage did not come back: its
/// input (prompt, tools and conversation) at the usual bytes a token, and as output at
/// most a token for each of the `written` bytes of text and tool input (a token is at
/// least a byte), never more than `max-tokens` — `max-tokens` when what it wrote is not known.
fn estimate(
    config: &AgentConfig,
    conversation: &Conversation,
    written: Option<usize>,
) -> bedrock::Usage {
    let most = u64::from(config.model.max_tokens);
    bedrock::Usage {
        input: budget::estimated_tokens(conversation.size() + model::prompt_bytes()),
        output: written.map_or(most, |bytes| (bytes as u64).min(most)),
        cache_read: 0,
        cache_write: 0,
    }
}

fn record(
    d: &mut Driver<'_>,
    config: &AgentConfig,
    model_id: &str,
    usage: bedrock::Usage,
    latency: std::time::Duration,
    stop_reason: &str,
    estimated: bool,
) -> fdo::Result<()> {
    let cost = model::cost(&config.model, model_id, &usage);
    let call = ModelCall {
        uid: d.r.uid,
        user: d.r.user.clone(),
        request: d.r.id.clone(),
        model: model_id.to_owned(),
        at: now(),
        usage,
        latency_ms: latency.as_millis() as u64,
        cost_usd: cost,
        estimated,
    };
    lock(&d.shared.store)
        .record_model_call(&call)
        .map_err(failed)?;
    let u = d.r.usage.get_or_insert_with(|| RequestUsage {
        cost_micro_usd: Some(0),
        ..RequestUsage::default()
    });
    u.calls += 1;
    u.model_micros += latency.as_micros() as u64;
    u.input_tokens += usage.input;
    u.output_tokens += usage.output;
    u.cache_read_tokens += usage.cache_read;
    u.cache_write_tokens += usage.cache_write;
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
            "stop-reason": stop_reason,
            "estimated": estimated,
            "usage": usage,
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
        Err(e) => {
            return Ok(ControlFlow::Continue((
                false,
                tool_result(&e.to_string(), limit),
            )));
        }
        Ok(Call::Context(query)) => {
            let answer = context(d, config, query).await?;
            return Ok(ControlFlow::Continue((true, tool_result(&answer, limit))));
        }
        Ok(Call::Index(question)) => {
            // (`audit` logs a failed append; reading one's own index changes nothing.)
            let _ = d.shared.audit(
                "model.context",
                Some(d.r.uid),
                Some(d.id),
                None,
                serde_json::json!({ "query": question }),
            );
            let (ok, answer) = match super::context::answer(d.shared, &d.caller, &question).await {
                Ok(a) => (true, a),
                Err(e) => (false, e.to_string()),
            };
            return Ok(ControlFlow::Continue((ok, tool_result(&answer, limit))));
        }
        Ok(Call::Act(action)) => action,
    };
    let i = match propose(d, action).await? {
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
/// its index, or (`Break`) what the model is told when it cannot be classified. The
/// configuration is read now, not when the conversation began: an administrator's
/// `ReloadConfig` (a deny rule, fewer classes auto-approved) holds for the next
/// proposal.
async fn propose(
    d: &mut Driver<'_>,
    action: crate::action::Action,
) -> fdo::Result<ControlFlow<String, usize>> {
    let config = d.shared.config();
    let job = PlanJob {
        classify: vec![action.clone()],
        ..PlanJob::new(&d.caller, None, d.r.cwd.clone(), &config.sandbox.secrets)
    };
    let reply = as_caller::plan(&d.shared.exe, &job).await.map_err(failed)?;
    let (Some(risk), Ok(user_policy)) = (reply.risks.into_iter().next(), reply.user_policy) else {
        let why = "cannot classify the action as you (is your ~/.config/devos/agent.toml valid?)";
        return Ok(ControlFlow::Break(why.into()));
    };
    // A program that is not there: the model hears so and may try another way (the
    // local rules' plans are refused instead; nothing to ask the user about either way).
    if let Some(program) = &risk.not_installed {
        return Ok(ControlFlow::Break(format!(
            "not run: `{program}` is not installed on this machine (no system directory holds it); use another program, or tell the user which package provides it"
        )));
    }
    let i = d.r.actions.len();
    let decider = Decider::new(d.shared, &d.caller, &user_policy, &config)?;
    let record = decider.record(i as u32, action, risk, &d.r.cwd, Origin::Model);
    d.r.actions.push(record);
    d.user_policy = user_policy;
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
        d.r.actions[i].audit_detail(serde_json::json!({ "origin": "model" })),
    );
    if let Err(e) = proposed.and_then(|()| audit_decided(d.shared, &d.r, &d.r.actions[i..])) {
        let _ended = d.refuse(i, format!("{e}; nothing ran")).await?;
        return Ok(ControlFlow::Break(
            "not run: it could not be put on record".into(),
        ));
    }
    d.shared.save_merging(&mut d.r)?;
    let denied = |d: &Driver<'_>| match &d.r.actions[i].decision {
        Decision::Denied { by, reason } => format!("denied by {by}: {reason}"),
        _ => "denied".to_owned(),
    };
    let why = if d.wait_for_decision(i).await?.is_break() {
        "cancelled by the user".to_owned()
    } else if d.end_if_denied(i).await?.is_break() {
        denied(d)
    } else if d.run_action(i).await?.is_break() {
        // (It may have ended before it started: decided again, it was denied, or
        // asked for again and the request cancelled.)
        let a = &d.r.actions[i];
        match (&a.decision, a.state) {
            (Decision::Denied { .. }, _) => denied(d),
            (_, ActionState::Skipped) => "cancelled by the user".to_owned(),
            _ => "the request ended while this action ran".to_owned(),
        }
    } else {
        return Ok(ControlFlow::Continue(()));
    };
    Ok(ControlFlow::Break(why))
}

/// Answer a context question as the caller (nothing runs; it is put on record).
async fn context(
    d: &mut Driver<'_>,
    config: &AgentConfig,
    query: ContextQuery,
) -> fdo::Result<String> {
    let job = PlanJob {
        context: Some(query),
        ..PlanJob::new(&d.caller, None, d.r.cwd.clone(), &config.sandbox.secrets)
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
