//! Attacks on the model route: a malicious (or prompt-injected) model, a hostile
//! Bedrock endpoint, and other users of the same machine against the real agent, the
//! real `devos` CLI and real users on a private bus, with the stand-in Bedrock of
//! `tests/src/bedrock.rs`.
//!
//! Each test is named for an attack class and checks, by its effects, that the attack
//! is stopped. Those marked "Was a finding" failed when first written, and say what
//! now stops the attack.

#![allow(clippy::unwrap_used)]

mod support;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use devos_tests::bedrock::{Reply, StandIn, ToolCall, Usage};
use serde_json::{Value, json};
use support::*;

/// Every tool result (status, text) the agent sent to the stand-in, in all requests.
fn all_tool_results(standin: &StandIn) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for r in standin.requests() {
        let Some(messages) = r.body["messages"].as_array() else {
            continue;
        };
        let Some(last) = messages.last() else {
            continue;
        };
        for b in last["content"].as_array().into_iter().flatten() {
            if let Some(t) = b.get("toolResult") {
                out.push((
                    t["status"].as_str().unwrap_or("success").to_owned(),
                    t["content"][0]["text"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                ));
            }
        }
    }
    out
}

/// Everything the agent ever sent to the stand-in, as one string.
fn everything_sent(standin: &StandIn) -> String {
    standin
        .requests()
        .iter()
        .map(|r| r.body.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Check a Converse request body the way Bedrock does before it runs a model: the
/// messages alternate user/assistant starting and ending with the user, and every
/// tool call of an assistant message is answered, exactly, by the tool results of
/// the next user message (and no tool result answers nothing). Returns what is wrong.
fn conversation_problems(body: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let messages = body["messages"].as_array().cloned().unwrap_or_default();
    let role = |m: &Value| m["role"].as_str().unwrap_or("?").to_owned();
    let ids = |m: &Value, kind: &str| -> Vec<String> {
        m["content"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| b.get(kind)?["toolUseId"].as_str().map(str::to_owned))
            .collect()
    };
    if messages.first().map(role).as_deref() != Some("user") {
        problems.push("the first message is not the user's".into());
    }
    if messages.last().map(role).as_deref() != Some("user") {
        problems.push("the last message is not the user's".into());
    }
    for (i, pair) in messages.windows(2).enumerate() {
        if role(&pair[0]) == role(&pair[1]) {
            problems.push(format!(
                "messages {i} and {} are both {}: roles must alternate",
                i + 1,
                role(&pair[0])
            ));
        }
    }
    for (i, m) in messages.iter().enumerate() {
        if role(m) == "assistant" {
            let asked = ids(m, "toolUse");
            let answered = messages
                .get(i + 1)
                .map(|n| ids(n, "toolResult"))
                .unwrap_or_default();
            if !asked.is_empty() && asked != answered {
                problems.push(format!(
                    "tool calls {asked:?} of message {i} are answered by {answered:?}"
                ));
            }
        } else {
            let answered = ids(m, "toolResult");
            let asked = i
                .checked_sub(1)
                .and_then(|p| messages.get(p))
                .filter(|p| role(p) == "assistant")
                .map(|p| ids(p, "toolUse"))
                .unwrap_or_default();
            if !answered.is_empty() && answered != asked {
                problems.push(format!(
                    "tool results {answered:?} of message {i} answer the calls {asked:?}"
                ));
            }
        }
    }
    problems
}

/// `program args...` as `user` (setpriv), with the private bus and the user's HOME.
fn as_user(agent: &Daemon, user: &User, program: &str) -> Command {
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={}", user.uid))
        .arg(format!("--regid={}", user.uid))
        .arg("--init-groups")
        .arg(program)
        .env("DBUS_SYSTEM_BUS_ADDRESS", &agent.bus.address)
        .env("HOME", &user.home);
    c
}

/// The id of `user`'s newest request, once it is in `state`.
fn newest_in_state(agent: &Daemon, user: &User, cwd: &Path, state: &str) -> Option<String> {
    let mut id = None;
    wait_for(Duration::from_secs(15), || {
        let h = json(&agent.devos(Some(user), cwd, &["--json", "history", "-n", "1"]));
        match h.as_array().and_then(|a| a.first()) {
            Some(r) if r["state"] == state => {
                id = r["id"].as_str().map(str::to_owned);
                true
            }
            _ => false,
        }
    });
    id
}

/// `user`'s usage rows (their own).
fn usage_rows(agent: &Daemon, user: &User, cwd: &Path) -> Vec<Value> {
    let usage = json(&agent.devos(Some(user), cwd, &["--json", "usage"]));
    usage["rows"].as_array().cloned().unwrap_or_default()
}

/// The sum of `key` (`calls`, `output-tokens`, ...) over usage rows.
fn usage_sum(rows: &[Value], key: &str) -> u64 {
    rows.iter().map(|r| r[key].as_u64().unwrap_or(0)).sum()
}

// ---------------------------------------------------------------------------------
// Conversations: what a follow-up sends must be a conversation Bedrock accepts.
// ---------------------------------------------------------------------------------

/// After a denied model action the stored conversation ends with the user's tool
/// results; a follow-up appended as a second user message would be refused by Bedrock
/// ("A conversation must alternate between user and assistant roles") and the
/// conversation could never go on. (Fails at c14b755; `Conversation::add_user_text`,
/// dfd660a, stops it.)
#[test]
fn conversation_integrity_a_follow_up_after_a_denial_is_a_valid_conversation() {
    let standin = StandIn::start().unwrap();
    let agent = model_agent(&standin, "", "");
    let user = User::ensure("devos-ma-anna");
    let project = user.project();
    let cwd = project.path();
    standin.push(Reply::tool(
        "write_file",
        json!({ "path": "notes.txt", "content": "x\n" }),
    ));
    let out = agent.devos(
        Some(&user),
        cwd,
        &["run", "--model", "small", "write my notes"],
    );
    let id = waiting_id(&out);
    assert!(
        agent
            .devos(Some(&user), cwd, &["deny", &id])
            .status
            .success()
    );
    agent.wait_state(&user, cwd, &id, "denied");

    standin.push(Reply::text("Fine, I will not."));
    let r = run_json(
        &agent,
        &user,
        cwd,
        &[&format!("--continue={id}"), "why did you want that?"],
    );
    assert_eq!(r["state"], "done", "{r}");
    let sent = standin.requests();
    let problems = conversation_problems(&sent.last().unwrap().body);
    assert!(
        problems.is_empty(),
        "the follow-up sent a conversation Bedrock refuses: {problems:?}\n{}",
        sent.last().unwrap().body["messages"]
    );
}

/// A request cancelled while its model call is in flight leaves the conversation
/// ending with the user's message; a follow-up must not add a second user message in
/// a row, which Bedrock refuses. (Fails at c14b755; fixed in dfd660a.)
#[test]
fn conversation_integrity_a_follow_up_after_a_cancelled_model_call_is_a_valid_conversation() {
    let standin = StandIn::start().unwrap();
    let agent = model_agent(&standin, "", "");
    let user = User::ensure("devos-ma-bert");
    let project = user.project();
    let cwd = project.path().to_path_buf();
    standin.push(Reply::text("too late").after(Duration::from_secs(30)));
    std::thread::scope(|s| {
        let run = s.spawn(|| {
            agent.devos(
                Some(&user),
                &cwd,
                &["--json", "run", "--model", "small", "slow question"],
            )
        });
        let id = newest_in_state(&agent, &user, &cwd, "running").expect("never running");
        assert!(wait_for(Duration::from_secs(10), || standin
            .requests()
            .len()
            == 1));
        assert!(
            agent
                .devos(Some(&user), &cwd, &["cancel", &id])
                .status
                .success()
        );
        agent.wait_state(&user, &cwd, &id, "cancelled");
        run.join().unwrap();
        standin.push(Reply::text("Here it is."));
        let r = run_json(
            &agent,
            &user,
            &cwd,
            &[&format!("--continue={id}"), "try again"],
        );
        assert_eq!(r["state"], "done", "{r}");
    });
    let sent = standin.requests();
    let problems = conversation_problems(&sent.last().unwrap().body);
    assert!(
        problems.is_empty(),
        "the follow-up sent a conversation Bedrock refuses: {problems:?}\n{}",
        sent.last().unwrap().body["messages"]
    );
}

/// The agent restarts while a model action waits for approval: the stored
/// conversation ends with the model's tool call, never answered. A follow-up must
/// answer it (not run) before the user's words, or Bedrock refuses the conversation
/// for good. (Fails at c14b755; fixed in dfd660a.)
#[test]
fn conversation_integrity_a_follow_up_after_a_restart_is_a_valid_conversation() {
    let standin = StandIn::start().unwrap();
    let mut agent = model_agent(&standin, "", "");
    let user = User::ensure("devos-ma-cleo");
    let project = user.project();
    let cwd = project.path();
    standin.push(Reply::tool("mkdir", json!({ "path": "build" })));
    let out = agent.devos(
        Some(&user),
        cwd,
        &["run", "--model", "small", "make a build directory"],
    );
    let id = waiting_id(&out);
    agent.restart();
    agent.wait_state(&user, cwd, &id, "cancelled");
    assert!(!cwd.join("build").exists());

    standin.push(Reply::text("Nothing was made."));
    let r = run_json(
        &agent,
        &user,
        cwd,
        &[&format!("--continue={id}"), "what happened?"],
    );
    assert_eq!(r["state"], "done", "{r}");
    let sent = standin.requests();
    let problems = conversation_problems(&sent.last().unwrap().body);
    assert!(
        problems.is_empty(),
        "the follow-up sent a conversation Bedrock refuses: {problems:?}\n{}",
        sent.last().unwrap().body["messages"]
    );
}

/// Was a finding. Two `Continue` calls for the same conversation at the same moment: the
/// check that the conversation has no request in flight (`follow_up`, under the store
/// lock) and the registration of the new request in `live` (`admit`) are separate
/// steps, with an audit append and a database write between them and no lock held
/// across, so both calls can pass the check. The conversation then has two requests at
/// once, each appending to — and overwriting — the same stored history (and each
/// spending on the same budget). A race: the test tries up to 20 rounds of 24
/// simultaneous calls; on a 2-core machine it shows within about ten.
/// Now the check and the hold on the conversation are one step (`Slot::hold_conversation`).
#[test]
fn conversation_race_concurrent_continues_get_one_request_per_conversation() {
    let standin = StandIn::start().unwrap();
    let agent = model_agent(&standin, "", "[limits]\nrequests-per-user = 32\n");
    let user = User::ensure("devos-ma-dora");
    let project = user.project();
    let cwd = project.path();
    standin.push(Reply::text("hello"));
    let r = run_json(&agent, &user, cwd, &["--model", "small", "hi"]);
    assert_eq!(r["state"], "done", "{r}");
    let id = r["id"].as_str().unwrap().to_owned();
    for _ in 0..20 * 24 {
        standin.push(Reply::text("slow follow-up").after(Duration::from_secs(20)));
    }
    let script = format!(
        "for i in $(seq 24); do busctl --address='{}' call org.devos.Agent1 /org/devos/Agent1 org.devos.Agent1 Continue ss {id} \"again $i\" & done; wait",
        agent.bus.address
    );
    for round in 0..20 {
        let mut cmd = as_user(&agent, &user, "sh");
        cmd.args(["-c", &script]).current_dir(cwd);
        let out = run_with_timeout(&mut cmd, Duration::from_secs(30)).unwrap();
        let accepted: Vec<String> = std::str::from_utf8(&out.stdout)
            .unwrap()
            .lines()
            .filter_map(|l| l.strip_prefix("s "))
            .map(|l| l.trim_matches('"').to_owned())
            .collect();
        assert_eq!(
            accepted.len(),
            1,
            "round {round}: one request per conversation at a time, but {} follow-ups were accepted at once: {accepted:?}\nstderr: {}",
            accepted.len(),
            stderr(&out)
        );
        for a in &accepted {
            agent.devos(Some(&user), cwd, &["cancel", a]);
            agent.wait_state(&user, cwd, a, "cancelled");
        }
    }
}

/// Was a finding. Only a follow-up held its conversation while it ran: a `Continue` of
/// a conversation's first request, while that request still waited for the model (or
/// for approval), was taken, and two tasks drove one conversation (the second
/// answering the first's tool calls "not run" while the first could still run them).
/// Now the first request holds its conversation too.
#[test]
fn conversation_race_a_continue_of_a_first_request_still_running_waits() {
    let standin = StandIn::start().unwrap();
    let agent = model_agent(&standin, "", "");
    let user = User::ensure("devos-ma-fern");
    let project = user.project();
    let cwd = project.path();
    standin.push(Reply::text("slow").after(Duration::from_secs(15)));
    let id = submit_to_model(&agent, &user, cwd, "hi");
    let out = agent_call(&agent, Some(&user), &["Continue", "ss", &id, "and then"]);
    assert!(
        !out.status.success(),
        "a second request of the conversation was taken"
    );
    assert!(stderr(&out).contains("still going on"), "{}", stderr(&out));
    agent.devos(Some(&user), cwd, &["cancel", &id]);
    agent.wait_state(&user, cwd, &id, "cancelled");
}

/// Was a finding. A turn's tool calls were all carried out, however many: a model (or
/// a prompt injected into it) could ask for hundreds of context answers in one turn,
/// each read as the user and kept in the conversation. Now 32 are carried out and
/// the rest answered "not run", each still answered, so the conversation stays valid.
#[test]
fn robustness_a_turn_of_many_tool_calls_carries_out_32() {
    let standin = StandIn::start().unwrap();
    let agent = model_agent(&standin, "", "");
    let user = User::ensure("devos-ma-gus");
    let project = user.project();
    let cwd = project.path();
    standin.push(Reply::tools(
        (0..40)
            .map(|_| ToolCall::new("project_info", json!({})))
            .collect(),
    ));
    standin.push(Reply::text("done"));
    let r = run_json(&agent, &user, cwd, &["--model", "small", "look around"]);
    assert_eq!(r["state"], "done", "{r}");
    let results = all_tool_results(&standin);
    assert_eq!(results.len(), 40, "{results:?}");
    let refused = results
        .iter()
        .filter(|(status, text)| status == "error" && text.contains("at most 32 tool calls"))
        .count();
    assert_eq!(refused, 8, "{results:?}");
    let last = standin.requests().pop().unwrap();
    assert!(conversation_problems(&last.body).is_empty());
}

/// Was a finding. A tool input nested a little less deeply than the parser follows
/// (about 124 levels) was taken and kept in the conversation, which is stored as JSON
/// with a few levels of its own: past that parser's limit, it could not be read again,
/// and a follow-up went on with no history at all, silently. Now input nested more than
/// 64 levels is kept as a note (the tool call fails on it), and a conversation that
/// cannot be read is an error that says so.
#[test]
fn conversation_integrity_a_deeply_nested_tool_input_keeps_the_history() {
    let standin = StandIn::start().unwrap();
    let agent = model_agent(&standin, "", "");
    let user = User::ensure("devos-ma-ivo");
    let project = user.project();
    let cwd = project.path();
    // The deepest input the parser takes (126 levels within the object).
    let deep = format!("{{\"argv\": {}{}}}", "[".repeat(126), "]".repeat(126));
    assert!(serde_json::from_str::<Value>(&deep).is_ok());
    standin.push(Reply::raw_tool("run", &deep));
    standin.push(Reply::text("that failed"));
    let r = run_json(&agent, &user, cwd, &["--model", "small", "FIRST-REQUEST"]);
    assert_eq!(r["state"], "done", "{r}");
    let results = all_tool_results(&standin);
    assert!(
        results
            .iter()
            .any(|(status, text)| status == "error" && text.contains("64 levels")),
        "{results:?}"
    );
    let id = r["id"].as_str().unwrap().to_owned();
    standin.push(Reply::text("I remember"));
    let r = run_json(
        &agent,
        &user,
        cwd,
        &[&format!("--continue={id}"), "and now?"],
    );
    assert_eq!(r["state"], "done", "{r}");
    let sent = standin.requests().last().unwrap().body.clone();
    assert!(
        sent["messages"].to_string().contains("FIRST-REQUEST"),
        "the follow-up went on without the conversation's history: {}",
        sent["messages"]
    );
    assert!(conversation_problems(&sent).is_empty());
}

/// Was a finding. An answer that is not streamed (`stream = false`) was bounded by its
/// bytes but not its parts, and a call that failed once the model had answered (it
/// could not be read, or came too late) was never put on the ledger, so no budget saw
/// it. Now an answer of more than 1024 parts is refused whether streamed or not, no
/// tool call of it runs, and the failed call is on the ledger: at what streamed, or,
/// not streamed, at its worst case (`max-tokens`).
#[test]
fn robustness_an_answer_of_too_many_parts_is_refused_and_still_counted() {
    let standin = StandIn::start().unwrap();
    for stream in [true, false] {
        let keys = format!("stream = {stream}\nmax-tokens = 1000\n");
        let agent = model_agent(&standin, &keys, "");
        let user = User::ensure("devos-ma-jon");
        let project = user.project();
        let cwd = project.path();
        let before = standin.requests().len();
        standin.push(Reply::tools(
            (0..1100)
                .map(|i| ToolCall::new("mkdir", json!({ "path": format!("d{i}") })))
                .collect(),
        ));
        let r = run_json(&agent, &user, cwd, &["--model", "small", "make dirs"]);
        assert_eq!(r["state"], "failed", "stream = {stream}: {r}");
        assert!(
            r["error"]
                .as_str()
                .unwrap_or_default()
                .contains("1024 parts"),
            "stream = {stream}: {r}"
        );
        assert_eq!(standin.requests().len(), before + 1, "stream = {stream}");
        assert!(!cwd.join("d0").exists());
        // An answer that could not be taken may be anything up to `max-tokens` long,
        // however much of it streamed.
        let rows = usage_rows(&agent, &user, cwd);
        assert!(
            usage_sum(&rows, "calls") >= 1,
            "stream = {stream}: {rows:?}"
        );
        let output = usage_sum(&rows, "output-tokens");
        assert!(output >= 1000, "stream = {stream}: {rows:?}");
    }
}

/// Was a finding. A whole answer (`stream = false`) that came but could not be read — here
/// a tool input nested deeper than the SDK's parser follows — was taken for a failed
/// connection ("cannot reach Bedrock") and never put on the ledger, though the model
/// wrote it and Bedrock bills it. Now it is "could not be read" and counts at its worst
/// case (`max-tokens`).
#[test]
fn budget_a_whole_answer_that_cannot_be_read_counts_its_worst_case() {
    let standin = StandIn::start().unwrap();
    let agent = model_agent(&standin, "stream = false\nmax-tokens = 1000\n", "");
    let user = User::ensure("devos-ma-lou");
    let project = user.project();
    let cwd = project.path();
    let mut deep = json!("x");
    for _ in 0..300 {
        deep = json!([deep]);
    }
    standin.push(Reply::tool("run", json!({ "argv": deep })));
    let r = run_json(&agent, &user, cwd, &["--model", "small", "answer"]);
    assert_eq!(r["state"], "failed", "{r}");
    assert!(
        r["error"]
            .as_str()
            .unwrap_or_default()
            .contains("could not be read"),
        "{r}"
    );
    let rows = usage_rows(&agent, &user, cwd);
    let output = usage_sum(&rows, "output-tokens");
    assert_eq!(output, 1000, "{rows:?}");
}

/// Was a finding. `devos run` subscribed to the agent's signals before submitting, but
/// did not read them while it waited for the replies to its own calls (the submit, the
/// first look at the request): an answer streamed faster than that — more than 64
/// pieces — filled the connection's queue, the reply waited behind them, and `devos
/// run` hung for ever though the request was done. Now the signals are read as they
/// come, by tasks of their own.
#[test]
fn robustness_an_answer_streamed_at_once_does_not_stall_devos_run() {
    let standin = StandIn::start().unwrap();
    let agent = model_agent(&standin, "", "");
    let user = User::ensure("devos-ma-pia");
    let project = user.project();
    let cwd = project.path();
    for json in [true, false, true, false] {
        // 2000 pieces of 4 bytes, sent as fast as the stand-in can.
        let answer = "w".repeat(8000);
        standin.push(Reply::text(&answer));
        let mut args = vec!["run", "--model", "small", "answer"];
        if json {
            args.insert(0, "--json");
        }
        // (`devos` calls panic after 60 s.)
        let out = agent.devos(Some(&user), cwd, &args);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(stdout(&out).contains(&answer), "json = {json}");
    }
}

/// Was a finding. A conversation was bounded by its steps and tool calls but not by its
/// bytes: an endpoint that answers with megabytes each turn (a real model's context
/// window is refused long before) grew it without end, in what the agent sent, held in
/// memory and kept. Now one over 8 MiB is trimmed before it is sent, as for a model that
/// said it was too long: the first request and the last exchange stay.
#[test]
fn robustness_a_conversation_is_kept_within_8_mib() {
    let standin = StandIn::start().unwrap();
    let agent = model_agent(&standin, "", "");
    let user = User::ensure("devos-ma-kai");
    let project = user.project();
    let cwd = project.path();
    for i in 0..4 {
        let filler = format!("{i}").repeat(3 << 20);
        standin.push(Reply::tool("project_info", json!({ "filler": filler })));
    }
    standin.push(Reply::text("done"));
    let r = run_json(&agent, &user, cwd, &["--model", "small", "FIRST-REQUEST"]);
    assert_eq!(r["state"], "done", "{r}");
    let sent = standin.requests();
    assert_eq!(sent.len(), 5);
    let last = &sent.last().unwrap().body;
    let bytes = last["messages"].to_string().len();
    assert!(
        bytes < 9 << 20,
        "the agent sent a conversation of {} MiB",
        bytes >> 20
    );
    assert!(last["messages"].to_string().contains("FIRST-REQUEST"));
    assert!(conversation_problems(last).is_empty());
}

// ---------------------------------------------------------------------------------
// Budgets and the ledger.
// ---------------------------------------------------------------------------------

/// Was a finding. A model call was put on the ledger only when its stream has ended (the
/// usage comes in the last event). A user who cancels while the answer streams gets
/// the text — it is shown as it comes — but the call, which Bedrock bills in full up
/// to that point, is never recorded: nothing counts against any budget, and `devos
/// usage` shows nothing. Repeated, this is unlimited model use under any budget.
/// Now a call that does not finish goes on the ledger at an estimate (prompt, tools
/// and conversation in, the streamed text out), which counts against budgets.
#[test]
fn budget_bypass_cancelling_while_the_answer_streams_leaves_no_trace_on_the_ledger() {
    let standin = StandIn::start().unwrap();
    standin.set_frame_delay(Duration::from_millis(150));
    let agent = model_agent(&standin, "", "[budgets]\nuser-daily-usd = 0.001\n");
    let user = User::ensure("devos-ma-emil");
    let project = user.project();
    let cwd = project.path();
    let answer = "THE-WHOLE-ANSWER-42";
    // (Held after the text: the test cancels while the answer is shown but not over.)
    standin.push(
        Reply::text(answer)
            .with_usage(Usage {
                input: 100_000,
                output: 20_000,
                cache_read: 0,
                cache_write: 0,
            })
            .holding_after_text(Duration::from_secs(30)),
    );
    let mut child = as_user(&agent, &user, DEVOS)
        .args(["run", "--model", "small", "tell me"])
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read what `devos run` prints until the whole answer has been shown.
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(20) {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
            if String::from_utf8_lossy(&seen).contains("THE-WHOLE-ANSWER-42") {
                break;
            }
        }
        (String::from_utf8_lossy(&seen).into_owned(), stdout)
    });
    let (shown, _stdout) = reader.join().unwrap();
    assert!(shown.contains(answer), "the answer was not shown: {shown}");
    // The whole answer is on the user's screen; the stream is not over yet.
    let id = newest_in_state(&agent, &user, cwd, "running").expect("not running");
    assert!(
        agent
            .devos(Some(&user), cwd, &["cancel", &id])
            .status
            .success()
    );
    agent.wait_state(&user, cwd, &id, "cancelled");
    let _ = child.wait();

    let rows = usage_rows(&agent, &user, cwd);
    assert!(
        usage_sum(&rows, "calls") >= 1,
        "a model call whose answer the user read is not on the ledger: {rows:?}"
    );
    // And the budget ($0.001; the call was $1.00) stops the next request.
    let r = run_json(&agent, &user, cwd, &["--model", "small", "again"]);
    assert_eq!(r["state"], "unplanned", "{r}");
}

/// Was a finding. A call that streams nothing until it is done (`stream = false`) and
/// was cancelled meanwhile went on the ledger at its prompt alone, though Bedrock bills
/// what the model wrote before the cancel: cancel and repeat, and the ledger (and every
/// budget) shows a fraction of the bill. Now such a call counts at its worst case
/// (`max-tokens` of output).
#[test]
fn budget_bypass_cancelling_a_call_that_does_not_stream_counts_its_worst_case() {
    let standin = StandIn::start().unwrap();
    let agent = model_agent(&standin, "stream = false\nmax-tokens = 1000\n", "");
    let user = User::ensure("devos-ma-hal");
    let project = user.project();
    let cwd = project.path();
    standin.push(Reply::text("a long essay").after(Duration::from_secs(20)));
    let id = submit_to_model(&agent, &user, cwd, "write an essay");
    assert!(
        newest_in_state(&agent, &user, cwd, "running").is_some(),
        "not running"
    );
    // Cancelled once the call is on its way (before, nothing is billed).
    assert!(wait_for(Duration::from_secs(10), || standin
        .requests()
        .len()
        == 1));
    agent.devos(Some(&user), cwd, &["cancel", &id]);
    agent.wait_state(&user, cwd, &id, "cancelled");
    let rows = usage_rows(&agent, &user, cwd);
    let output = usage_sum(&rows, "output-tokens");
    assert_eq!(output, 1000, "{rows:?}");
}

/// Was a finding. A streamed answer that ended without its `metadata` event (the usage)
/// went on the ledger as an exact $0 call. Now it is an estimate, marked so: its input,
/// and a token for each byte it wrote (a token is at least a byte), at most
/// `max-tokens`; `devos usage` marks estimated costs with `~`.
#[test]
fn budget_an_answer_without_its_usage_is_charged_an_estimate() {
    let standin = StandIn::start().unwrap();
    let agent = model_agent(&standin, "max-tokens = 1000\n", "");
    let user = User::ensure("devos-ma-ned");
    let project = user.project();
    let cwd = project.path();
    for text in ["y".repeat(600), "z".repeat(3000)] {
        standin.push(Reply::text(&text).without_metadata());
        let r = run_json(&agent, &user, cwd, &["--model", "small", "answer"]);
        assert_eq!(r["state"], "done", "{r}");
    }
    let rows = usage_rows(&agent, &user, cwd);
    let sum = |key: &str| usage_sum(&rows, key);
    assert_eq!(sum("calls"), 2, "{rows:?}");
    assert_eq!(sum("estimated-calls"), 2, "{rows:?}");
    assert_eq!(sum("output-tokens"), 600 + 1000, "{rows:?}");
    assert!(sum("input-tokens") > 0, "{rows:?}");
    let shown = stdout(&agent.devos(Some(&user), cwd, &["usage"]));
    assert!(
        shown.contains("~$") && shown.contains("2 call(s)") && shown.contains("estimate"),
        "{shown}"
    );
}

/// Was a finding. A conversation read the configuration once, when it started: budgets
/// an administrator set or lowered (`ReloadConfig`) to stop a user's spending did not
/// reach the requests already going, each of which could still make its remaining
/// model calls. Now every call is held against the budgets in force when it is made.
#[test]
fn budget_a_budget_set_by_reload_stops_a_conversation_already_going() {
    let standin = StandIn::start().unwrap();
    let agent = model_agent(&standin, "", "");
    let user = User::ensure("devos-ma-olga");
    let project = user.project();
    let cwd = project.path();
    // The first call (a read-only tool call, which runs unasked) answers slowly; the
    // budget comes while it is on its way. It costs $0.00135, past the $0.001 set.
    standin.push(Reply::tool("project_info", json!({})).after(Duration::from_secs(5)));
    standin.push(Reply::text("the second call"));
    let id = submit_to_model(&agent, &user, cwd, "look around");
    assert!(wait_for(Duration::from_secs(30), || standin
        .requests()
        .len()
        == 1));
    reload_with(&agent, "[budgets]\nuser-daily-usd = 0.001\n");
    let r = agent.wait_state(&user, cwd, &id, "failed");
    assert!(
        r["error"]
            .as_str()
            .unwrap_or_default()
            .contains("daily model budget"),
        "{r}"
    );
    assert_eq!(standin.requests().len(), 1, "the second call was made");
}

/// Was a finding (low). Budgets were checked before each call but nothing is reserved for
/// calls in flight: every request a user starts at once passes the check, so one user
/// spends up to `requests-per-user` calls beyond their budget (and all users together
/// as many beyond the machine's).
/// Now each call in flight is held against the budgets at its worst-case cost.
#[test]
fn budget_overshoot_concurrent_requests_all_pass_the_check() {
    let standin = StandIn::start().unwrap();
    let agent = model_agent(&standin, "", "[budgets]\nuser-daily-usd = 0.002\n");
    let user = User::ensure("devos-ma-finn");
    let project = user.project();
    let cwd = project.path();
    const AT_ONCE: usize = 6;
    for _ in 0..AT_ONCE {
        // $0.00135 a call.
        standin.push(Reply::text("ok").after(Duration::from_secs(3)));
    }
    std::thread::scope(|s| {
        let runs: Vec<_> = (0..AT_ONCE)
            .map(|i| {
                let (agent, user) = (&agent, &user);
                s.spawn(move || run_json(agent, user, cwd, &["--model", "small", &format!("q{i}")]))
            })
            .collect();
        for r in runs {
            r.join().unwrap();
        }
    });
    let spent: f64 = usage_rows(&agent, &user, cwd)
        .iter()
        .map(|r| r["cost-usd"].as_f64().unwrap_or(0.0))
        .sum();
    // At most one call past the budget: the one that crossed it.
    assert!(
        spent <= 0.002 + 0.00135 + 1e-9,
        "a $0.002 daily budget let ${spent:.5} through ({} calls at once)",
        standin.requests().len()
    );
}

/// Was a finding. Any user may name any model id (`devos run --model ID`), and a model with
/// no price is "not counted against budgets". With a budget in force, a user simply
/// names a model the price table lacks — another spelling of a configured one, or
/// an expensive one (here Sonnet's global inference profile) — and spends without
/// limit: every call is on the ledger with an unknown cost, and no budget ever bites.
/// Now, with budgets set, a model without a price is refused.
#[test]
fn budget_bypass_an_unpriced_model_id_of_the_users_choosing_is_never_limited() {
    let standin = StandIn::start().unwrap();
    let agent = model_agent(&standin, "", "[budgets]\nuser-daily-usd = 0.002\n");
    let user = User::ensure("devos-ma-gina");
    let project = user.project();
    let cwd = project.path();
    let unpriced = "global.anthropic.claude-sonnet-4-5-20250929-v1:0";
    let mut states = Vec::new();
    for i in 0..4 {
        // A million tokens in and 100k out each: about $4.50 at Sonnet's prices.
        standin.push(Reply::text("expensive").with_usage(Usage {
            input: 1_000_000,
            output: 100_000,
            cache_read: 0,
            cache_write: 0,
        }));
        let r = run_json(&agent, &user, cwd, &["--model", unpriced, &format!("q{i}")]);
        states.push(r["state"].as_str().unwrap_or_default().to_owned());
    }
    let calls = standin.requests().len();
    assert!(
        calls <= 1 && states.last().map(String::as_str) != Some("done"),
        "a $0.002 daily budget let {calls} calls of 1.1M tokens each through on an unpriced model id: {states:?}"
    );
}

// ---------------------------------------------------------------------------------
// Helpers for the attack batteries.
// ---------------------------------------------------------------------------------

fn is_final(state: &str) -> bool {
    matches!(
        state,
        "done" | "failed" | "denied" | "cancelled" | "unplanned"
    )
}

/// Start a model request of `text` as `user` in `cwd` through the bus (`SubmitToModel`,
/// the small model) and return its id without waiting for it.
fn submit_to_model(agent: &Daemon, user: &User, cwd: &Path, text: &str) -> String {
    let args = ["SubmitToModel", "sss", text, cwd.to_str().unwrap(), "small"];
    let out = agent_call(agent, Some(user), &args);
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out)
        .trim()
        .trim_start_matches("s ")
        .trim_matches('"')
        .to_owned()
}

/// Start a model request as `user` (`devos run --model small TEXT`, no terminal) and
/// return the id of the request it made (from the first line `devos run` prints).
fn submit(agent: &Daemon, user: &User, cwd: &Path, text: &str) -> String {
    let out = agent.devos(Some(user), cwd, &["run", "--model", "small", text]);
    stdout(&out)
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("request "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no request: {}\n{}", stdout(&out), stderr(&out)))
        .to_owned()
}

fn show(agent: &Daemon, user: &User, cwd: &Path, id: &str) -> Value {
    json(&agent.devos(Some(user), cwd, &["--json", "show", id]))
}

/// Approve, as the user, every action of request `id` that waits, until it ends
/// (the worst case: a user who approves whatever the model proposes).
fn approve_everything(agent: &Daemon, user: &User, cwd: &Path, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = show(agent, user, cwd, id);
        if is_final(r["state"].as_str().unwrap_or_default()) {
            return r;
        }
        assert!(Instant::now() < deadline, "request {id} never ended: {r}");
        if r["state"] == "awaiting-approval"
            && let Some(a) = r["actions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|a| a["decision"]["decision"] == "ask")
        {
            let i = a["index"].to_string();
            agent.devos(Some(user), cwd, &["approve", id, &i]);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Let requests take what is left in the stand-in's queue (after a request ended
/// before its model took every scripted reply).
fn drain(agent: &Daemon, standin: &StandIn, user: &User, cwd: &Path) {
    while standin.remaining() > 0 {
        run_json(agent, user, cwd, &["--model", "small", "drain"]);
    }
}

/// Propose each of `attempts` as the model: none may be approved without asking, and
/// nothing the proposals would have printed (`id`'s `uid=`) may reach the model.
fn none_ran_unasked(
    agent: &Daemon,
    standin: &StandIn,
    user: &User,
    cwd: &Path,
    attempts: &[(&str, Value)],
) {
    let mut ran_unasked = Vec::new();
    for (name, input) in attempts {
        let (decision, r) = outcome_of(agent, standin, user, cwd, name, input);
        if decision == "approved" {
            ran_unasked.push(format!("{name} {input}: {}", r["actions"][0]["risk"]));
        }
    }
    assert!(
        ran_unasked.is_empty(),
        "ran without asking: {ran_unasked:#?}"
    );
    assert!(
        !all_tool_results(standin)
            .iter()
            .any(|(_, text)| text.contains("uid=")),
        "{:?}",
        all_tool_results(standin)
    );
}

/// Make `link` a symlink to `to`, owned by `user` (as if they had made it).
fn user_symlink(user: &User, to: &Path, link: &Path) {
    std::os::unix::fs::symlink(to, link).unwrap();
    std::os::unix::fs::lchown(link, Some(user.uid), Some(user.uid)).unwrap();
}

/// What one proposal came to: its decision (`approved`/`ask`/`denied`, or
/// `tool-error` when no action was made) and who decided.
fn outcome_of(
    agent: &Daemon,
    standin: &StandIn,
    user: &User,
    cwd: &Path,
    name: &str,
    input: &Value,
) -> (String, Value) {
    standin.push(Reply::tool(name, input.clone()));
    standin.push(Reply::text("end"));
    let id = submit(agent, user, cwd, "go ahead");
    let mut r = show(agent, user, cwd, &id);
    if !is_final(r["state"].as_str().unwrap_or_default()) {
        agent.devos(Some(user), cwd, &["cancel", &id]);
        r = agent.wait_state(user, cwd, &id, "cancelled");
    }
    drain(agent, standin, user, cwd);
    let decision = match r["actions"].as_array().and_then(|a| a.first()) {
        Some(a) => {
            assert_eq!(a["origin"], "model", "{a}");
            a["decision"]["decision"].as_str().unwrap_or("?").to_owned()
        }
        None => "tool-error".to_owned(),
    };
    (decision, r)
}

// ---------------------------------------------------------------------------------
// Cross-user: paths, symlinks, other users' files.
// ---------------------------------------------------------------------------------

/// Regression: a model whose every proposal the user approves — reads, copies,
/// moves, deletes and writes through `..`, absolute paths, `~/..`, symlinks planted
/// in the project, `/proc/self/root`, greps over `/home` — neither reads nor changes
/// anything of another user, even when their home is world-readable and has a
/// world-writable directory (the sandbox leaves other homes out), and no secret of
/// theirs ever reaches the model.
#[test]
fn cross_user_paths_symlinks_and_tilde_tricks_reach_nothing_even_when_approved() {
    let standin = StandIn::start().unwrap();
    let agent = model_agent(&standin, "max-steps = 3", "");
    let victim = User::ensure("devos-ma-vera");
    let mal = User::ensure("devos-ma-mal");
    let marker = format!("VERA-SECRET-{}", std::process::id());
    open_up(&victim.home, 0o755);
    let secret = victim.home.join("secret.txt");
    victim.write(&secret, &format!("{marker}\n"));
    open_up(&secret, 0o644);
    let drop = victim.home.join("drop");
    let _ = std::fs::remove_dir_all(&drop);
    std::fs::create_dir(&drop).unwrap();
    std::os::unix::fs::chown(&drop, Some(victim.uid), Some(victim.uid)).unwrap();
    open_up(&drop, 0o777);
    let _ = std::fs::remove_file(victim.home.join("pwned"));
    let project = mal.project();
    let cwd = project.path();
    user_symlink(&mal, &secret, &cwd.join("vlink"));
    user_symlink(&mal, &victim.home, &cwd.join("vdir"));
    let v = victim.home.to_string_lossy().into_owned();
    let s = secret.to_string_lossy().into_owned();
    let rel = format!("../../{}/secret.txt", victim.name);
    let tilde = format!("~/../{}/secret.txt", victim.name);
    let through_proc = format!("/proc/self/root{s}");
    let calls = vec![
        ToolCall::new("read_file", json!({ "path": rel })),
        ToolCall::new("read_file", json!({ "path": s })),
        ToolCall::new("read_file", json!({ "path": "vlink" })),
        ToolCall::new("read_file", json!({ "path": "vdir/secret.txt" })),
        ToolCall::new("read_file", json!({ "path": tilde })),
        ToolCall::new("read_file", json!({ "path": through_proc })),
        ToolCall::new("read_file", json!({ "path": "/etc/shadow" })),
        ToolCall::new(
            "read_file",
            json!({ "path": agent.state().join("state.db").to_string_lossy() }),
        ),
        ToolCall::new("list_dir", json!({ "path": v })),
        ToolCall::new(
            "search",
            json!({ "pattern": "VERA-SECRET", "path": "/home" }),
        ),
        ToolCall::new(
            "search",
            json!({ "pattern": "secret*", "path": "vdir/", "in": "names" }),
        ),
        ToolCall::new("run", json!({ "argv": ["cat", s] })),
        ToolCall::new(
            "run",
            json!({ "argv": ["grep", "-r", "VERA-SECRET", "/home"] }),
        ),
        ToolCall::new("run", json!({ "argv": ["cp", s, "stolen-by-cp.txt"] })),
        ToolCall::new("copy", json!({ "from": "vlink", "to": "stolen.txt" })),
        ToolCall::new("copy", json!({ "from": "vdir", "to": "stolen-dir" })),
        ToolCall::new(
            "move",
            json!({ "from": "vdir/secret.txt", "to": "moved.txt" }),
        ),
        ToolCall::new("delete", json!({ "path": "vdir/secret.txt" })),
        ToolCall::new(
            "write_file",
            json!({ "path": "vlink", "content": "overwritten\n" }),
        ),
        ToolCall::new(
            "write_file",
            json!({ "path": "vdir/drop/planted", "content": "x\n" }),
        ),
        ToolCall::new(
            "write_file",
            json!({ "path": format!("{v}/pwned"), "content": "x\n" }),
        ),
        ToolCall::new("mkdir", json!({ "path": "vdir/drop/newdir" })),
        ToolCall::new(
            "run",
            json!({ "argv": ["touch", format!("{v}/drop/touched")] }),
        ),
    ];
    standin.push(Reply::tools(calls));
    standin.push(Reply::text("done"));
    let id = submit(&agent, &mal, cwd, "tidy up");
    let r = approve_everything(&agent, &mal, cwd, &id);
    assert_eq!(r["state"], "done", "{r}");
    assert_eq!(
        all_tool_results(&standin).len(),
        23,
        "every call was answered"
    );

    assert!(
        !everything_sent(&standin).contains(&marker),
        "another user's file reached the model"
    );
    assert!(
        !r.to_string().contains(&marker),
        "another user's file is in the request: {r}"
    );
    assert_eq!(
        std::fs::read_to_string(&secret).unwrap(),
        format!("{marker}\n")
    );
    let planted: Vec<_> = std::fs::read_dir(&drop)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        planted.is_empty(),
        "files appeared in another user's home: {planted:?}"
    );
    assert!(!victim.home.join("pwned").exists());
    // (A copied symlink stays a symlink: only what was really copied counts.)
    for stolen in ["stolen.txt", "stolen-by-cp.txt", "moved.txt", "stolen-dir"] {
        let path = cwd.join(stolen);
        let copied = path
            .symlink_metadata()
            .is_ok_and(|m| !m.file_type().is_symlink());
        let text = if copied {
            std::fs::read_to_string(&path)
                .or_else(|_| std::fs::read_to_string(path.join("secret.txt")))
                .unwrap_or_default()
        } else {
            String::new()
        };
        assert!(
            !text.contains(&marker),
            "{stolen} holds another user's secret"
        );
    }
}

// ---------------------------------------------------------------------------------
// Approvals: what runs unasked, and what approvals cover.
// ---------------------------------------------------------------------------------

/// Regression: a model's `run` of interpreters, shells, wrappers and programs with
/// options that run commands or write files never runs without asking (or is refused),
/// nor do tools spelled in other cases or with extra fields.
#[test]
fn approval_bypass_wrappers_interpreters_and_exec_options_in_run_always_ask() {
    let standin = StandIn::start().unwrap();
    let agent = model_agent(&standin, "", "[sandbox]\ntimeout-secs = 10\n");
    let user = User::ensure("devos-ma-hugo");
    let project = user.project();
    let cwd = project.path();
    user.write(&cwd.join("README"), "hello\n");
    devos_tests::write_executable(&cwd.join("tool"), "#!/bin/sh\nid\n");
    user.give(&cwd.join("tool"));
    let run = |argv: &[&str]| ("run", json!({ "argv": argv }));
    let attempts = [
        run(&["env", "sh", "-c", "id"]),
        run(&["env", "-S", "sh -c id"]),
        run(&["sh", "-c", "id"]),
        run(&["bash", "-c", "id"]),
        run(&["/bin/sh", "-c", "id"]),
        run(&["/proc/self/root/bin/sh", "-c", "id"]),
        run(&["/usr/bin/../bin/sh", "-c", "id"]),
        run(&["python3", "-c", "import os; os.system('id')"]),
        run(&["perl", "-e", "system('id')"]),
        run(&["awk", "BEGIN{system(\"id\")}"]),
        run(&["xargs", "-a", "README", "id"]),
        run(&["sudo", "id"]),
        run(&["nice", "id"]),
        run(&["timeout", "5", "id"]),
        run(&["nohup", "id"]),
        run(&["setsid", "id"]),
        run(&["stdbuf", "-o0", "id"]),
        run(&["./tool"]),
        run(&["PATH=/tmp", "ls"]),
        run(&["find", ".", "-exec", "id", ";"]),
        run(&["find", ".", "-execdir", "id", ";"]),
        run(&["find", ".", "-ok", "id", ";"]),
        run(&["find", ".", "-fprint", "out"]),
        run(&["find", ".", "-newer", "/etc/shadow"]),
        run(&["sort", "--compress-program=id", "README"]),
        run(&["sort", "-o", "/etc/passwd", "README"]),
        run(&["tar", "-xf", "a.tar", "--to-command=id"]),
        run(&[
            "tar",
            "-cf",
            "a.tar",
            "--checkpoint-action=exec=id",
            "README",
        ]),
        run(&["rg", "--pre", "id", "x"]),
        run(&["grep", "-f", "/etc/shadow", "README"]),
        run(&["less", "README"]),
        run(&["date", "-s", "2000-01-01"]),
        run(&["cat", "/proc/self/root/etc/shadow"]),
        run(&["ls", "/proc/1/cwd"]),
        ("RUN", json!({ "argv": ["id"] })),
        ("Run", json!({ "argv": ["id"] })),
        ("run ", json!({ "argv": ["id"] })),
        ("", json!({ "argv": ["id"] })),
        ("run", json!({ "argv": ["id"], "shell": true })),
        ("run", json!({ "argv": ["id"], "approved": true })),
        (
            "write_file",
            json!({ "path": "x", "content": "y", "mode": "4755" }),
        ),
        ("run", json!({ "argv": ["ls", "a\u{0}b"] })),
    ];
    none_ran_unasked(&agent, &standin, &user, cwd, &attempts);
}

/// Regression: git options and subcommands that run programs or write files — `-c`
/// settings (pager, fsmonitor, alias, external diff, ssh), `--exec-path`,
/// `--upload-pack`, `ext::` transports, `--output`, `submodule foreach`, `bisect run`,
/// `rebase --exec` — never run without asking when the model proposes them.
#[test]
fn approval_bypass_git_options_that_run_programs_always_ask() {
    let standin = StandIn::start().unwrap();
    let agent = model_agent(&standin, "", "[sandbox]\ntimeout-secs = 10\n");
    let user = User::ensure("devos-ma-iris");
    let project = user.project();
    let cwd = project.path();
    let git = |args: &[&str]| {
        let out = Command::new("setpriv")
            .arg(format!("--reuid={}", user.uid))
            .arg(format!("--regid={}", user.uid))
            .arg("--init-groups")
            .arg("git")
            .args(args)
            .current_dir(cwd)
            .env("HOME", &user.home)
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {}", stderr(&out));
    };
    git(&["init", "-q", "-b", "main"]);
    user.write(&cwd.join("a.txt"), "a\n");
    git(&["add", "a.txt"]);
    git(&[
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@t",
        "commit",
        "-qm",
        "one",
    ]);
    user.write(&cwd.join("a.txt"), "b\n");
    let g = |args: &[&str]| ("git", json!({ "args": args }));
    let attempts = [
        g(&["-c", "core.pager=id", "log"]),
        g(&["-c", "core.fsmonitor=id", "status"]),
        g(&["-c", "alias.st=!id", "st"]),
        g(&["-c", "diff.external=id", "diff"]),
        g(&["-c", "core.sshCommand=id", "fetch", "x"]),
        g(&["--config-env=core.pager=HOME", "log"]),
        g(&["--exec-path=/tmp", "status"]),
        g(&["-c", "core.hooksPath=/tmp", "status"]),
        g(&["fetch", "--upload-pack=id", "origin"]),
        g(&["ls-remote", "--upload-pack=id", "."]),
        g(&["clone", "ext::sh -c id", "x"]),
        g(&["archive", "--remote=ext::sh -c id", "HEAD"]),
        g(&["log", "--output=/tmp/x"]),
        g(&["diff", "--ext-diff"]),
        g(&["diff", "--output=../out.txt"]),
        g(&["grep", "--open-files-in-pager=id", "a"]),
        g(&["submodule", "foreach", "id"]),
        g(&["bisect", "run", "id"]),
        g(&["rebase", "--exec", "id", "HEAD"]),
        g(&["difftool", "-x", "id"]),
        g(&["-C", "/", "status"]),
        g(&["--git-dir=/etc", "status"]),
        g(&["--work-tree=/", "status"]),
    ];
    none_ran_unasked(&agent, &standin, &user, cwd, &attempts);
}

/// Regression: the `search` tool's pattern and path never become options of `find`
/// or `grep` (`-delete`, `-exec`, `--include`, `-f FILE`): such searches are
/// read-only, run, and delete or run nothing.
#[test]
fn approval_bypass_search_patterns_never_become_options() {
    let standin = StandIn::start().unwrap();
    let agent = model_agent(&standin, "", "");
    let user = User::ensure("devos-ma-jana");
    let project = user.project();
    let cwd = project.path();
    user.write(&cwd.join("keep.txt"), "keep\n");
    user.write(&cwd.join("-delete"), "odd name\n");
    let calls = vec![
        ToolCall::new("search", json!({ "pattern": "-delete", "in": "names" })),
        ToolCall::new(
            "search",
            json!({ "pattern": "*", "in": "names", "path": "-delete" }),
        ),
        ToolCall::new("search", json!({ "pattern": "-exec", "in": "names" })),
        ToolCall::new("search", json!({ "pattern": "-f/etc/shadow" })),
        ToolCall::new("search", json!({ "pattern": "--include=*", "path": "-r" })),
        ToolCall::new("search", json!({ "pattern": "x", "in": "names; rm -rf ." })),
    ];
    standin.push(Reply::tools(calls));
    standin.push(Reply::text("done"));
    let id = submit(&agent, &user, cwd, "search around");
    let r = agent.wait_state(&user, cwd, &id, "done");
    for a in r["actions"].as_array().unwrap() {
        assert_eq!(a["risk"]["class"], "read-only", "{a}");
    }
    assert!(cwd.join("keep.txt").exists() && cwd.join("-delete").exists());
    let results = all_tool_results(&standin);
    assert_eq!(results.len(), 6, "{results:?}");
    assert_eq!(results[5].0, "error", "{results:?}");
}

/// Regression: a remembered approval covers exactly what was approved. The model
/// cannot ride on one: not with other content for the same file, not the same write
/// in another project, not a command-prefix rule for a write outside the project, not
/// a path-prefix rule through a symlink that leads out.
#[test]
fn approval_reuse_remembered_rules_cover_nothing_the_model_varies() {
    let standin = StandIn::start().unwrap();
    let agent = model_agent(&standin, "", "");
    let user = User::ensure("devos-ma-kurt");
    let (p1, p2, p3) = (user.project(), user.project(), user.project());
    let (cwd, other, scoped) = (p1.path(), p2.path(), p3.path());
    let outside = user.project();
    user_symlink(&user, outside.path(), &scoped.join("out"));

    // The user approves three model proposals, each remembered for good: a write
    // exactly, `mkdir` by command prefix, and `touch` for paths under `scoped`.
    let approve = |dir: &Path, name: &str, input: Value, extra: &[&str]| {
        standin.push(Reply::tool(name, input));
        standin.push(Reply::text("ok"));
        let id = submit(&agent, &user, dir, "set up");
        let mut args = vec!["approve", id.as_str(), "0", "--remember", "always"];
        args.extend_from_slice(extra);
        let out = agent.devos(Some(&user), dir, &args);
        assert!(out.status.success(), "{}", stderr(&out));
        agent.wait_state(&user, dir, &id, "done");
    };
    approve(
        cwd,
        "write_file",
        json!({ "path": "a.txt", "content": "A\n" }),
        &[],
    );
    approve(
        cwd,
        "run",
        json!({ "argv": ["mkdir", "build"] }),
        &["--command-prefix", "mkdir"],
    );
    let dir = scoped.to_string_lossy().into_owned();
    approve(
        scoped,
        "run",
        json!({ "argv": ["touch", "t1"] }),
        &["--path-prefix", &dir],
    );
    let rules = json(&agent.devos(Some(&user), cwd, &["--json", "rules"]));
    assert_eq!(rules.as_array().unwrap().len(), 3, "{rules}");

    let o = outside.path().to_string_lossy().into_owned();
    let mut covered = Vec::new();
    for (where_, name, input) in [
        (
            cwd,
            "write_file",
            json!({ "path": "a.txt", "content": "B\n" }),
        ),
        (
            cwd,
            "write_file",
            json!({ "path": "b.txt", "content": "A\n" }),
        ),
        (
            other,
            "write_file",
            json!({ "path": "a.txt", "content": "A\n" }),
        ),
        (
            cwd,
            "run",
            json!({ "argv": ["mkdir", "-p", format!("{o}/x")] }),
        ),
        (cwd, "run", json!({ "argv": ["mkdir", "../escape"] })),
        (cwd, "run", json!({ "argv": ["touch", "t1"] })),
        (scoped, "run", json!({ "argv": ["touch", "out/t2"] })),
        (scoped, "run", json!({ "argv": ["rm", "t1"] })),
        (
            scoped,
            "write_file",
            json!({ "path": "t1", "content": "x" }),
        ),
        (other, "run", json!({ "argv": ["touch", "t1"] })),
    ] {
        let (decision, r) = outcome_of(&agent, &standin, &user, where_, name, &input);
        if decision == "approved" {
            covered.push(format!(
                "{name} {input} in {}: {}",
                where_.display(),
                r["actions"][0]["decision"]
            ));
        }
    }
    assert!(covered.is_empty(), "remembered rules covered: {covered:#?}");
    assert!(!outside.path().join("x").exists() && !outside.path().join("t2").exists());
}

// ---------------------------------------------------------------------------------
// Cross-user: requests, conversations, the ledger, signals, context tools.
// ---------------------------------------------------------------------------------

/// Regression: another user cannot see, continue, cancel, approve or deny a user's
/// model request, read their ledger rows, eavesdrop on the model's streamed text or
/// the approval prompts (signals go to the submitter's connection only), or see their
/// processes through the `processes` tool.
#[test]
fn cross_user_requests_conversations_ledger_signals_and_processes_stay_private() {
    let standin = StandIn::start().unwrap();
    let agent = model_agent(&standin, "", "");
    let (ada, ben) = (User::ensure("devos-ma-ada"), User::ensure("devos-ma-ben"));
    let (pa, pb) = (ada.project(), ben.project());
    let (cwd_a, cwd_b) = (pa.path(), pb.path());

    // A process of ada's that only she may see.
    let mut sleeper = Command::new("setpriv")
        .arg(format!("--reuid={}", ada.uid))
        .arg(format!("--regid={}", ada.uid))
        .arg("--init-groups")
        .args(["sleep", "987654"])
        .spawn()
        .unwrap();
    // Ben listens to everything the bus lets him.
    require("dbus-monitor", "dbus-bin");
    let mut monitor = as_user(&agent, &ben, "dbus-monitor")
        .args(["--address", &agent.bus.address])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut monitor_out = monitor.stdout.take().unwrap();
    let mut monitor_err = monitor.stderr.take().unwrap();
    let heard = std::thread::spawn(move || {
        let mut all = String::new();
        let _ = monitor_out.read_to_string(&mut all);
        let _ = monitor_err.read_to_string(&mut all);
        all
    });
    std::thread::sleep(Duration::from_millis(500));

    // Ada's model streams text, looks at her processes, then proposes a write that
    // waits for her.
    standin.push(Reply::tool("processes", json!({})).with_leading_text("ADA-STREAMED-TEXT. "));
    standin.push(Reply::tool(
        "write_file",
        json!({ "path": "ada-private-name.txt", "content": "x" }),
    ));
    let id = submit(&agent, &ada, cwd_a, "what runs?");
    let r = show(&agent, &ada, cwd_a, &id);
    assert_eq!(r["state"], "awaiting-approval", "{r}");
    let hers = &all_tool_results(&standin)[0].1;
    assert!(hers.contains("987654"), "ada sees her own process: {hers}");

    // Ben, by the CLI and straight on the bus.
    for args in [
        vec!["show", id.as_str()],
        vec!["run", &format!("--continue={id}"), "and now?"],
        vec!["cancel", id.as_str()],
        vec!["approve", id.as_str(), "1"],
        vec!["deny", id.as_str(), "1"],
    ] {
        let out = agent.devos(Some(&ben), cwd_b, &args);
        assert!(
            !out.status.success(),
            "ben could {args:?}: {}",
            stdout(&out)
        );
        assert!(
            stderr(&out).contains("no request"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    for call in [
        vec!["Get", "s", id.as_str()],
        vec!["Continue", "ss", id.as_str(), "hi"],
        vec!["Cancel", "s", id.as_str()],
        vec!["Approve", "susass", id.as_str(), "1", "always", "0", ""],
        vec!["Usage", "s", "2000-01-01' OR uid != 0 OR '1'='1"],
    ] {
        let out = agent_call(&agent, Some(&ben), &call);
        assert!(
            !out.status.success(),
            "ben could {call:?}: {}",
            stdout(&out)
        );
    }
    let history = json(&agent.devos(Some(&ben), cwd_b, &["--json", "history"]));
    assert!(!history.to_string().contains(&id), "{history}");
    assert_eq!(show(&agent, &ada, cwd_a, &id)["state"], "awaiting-approval");

    // Ben's own model asks for processes and project facts: only his.
    standin.push(Reply::tools(vec![
        ToolCall::new("processes", json!({})),
        ToolCall::new("project_info", json!({})),
    ]));
    standin.push(Reply::text("ok"));
    let theirs = submit(&agent, &ben, cwd_b, "what runs?");
    agent.wait_state(&ben, cwd_b, &theirs, "done");
    let results = all_tool_results(&standin);
    let his = &results[results.len() - 2].1;
    assert!(his.contains("\"uid\""), "{his}");
    assert!(!his.contains("987654"), "ben sees ada's process: {his}");
    let listed: Value = serde_json::from_str(
        his.trim_start_matches("<data>\n")
            .trim_end_matches("\n</data>"),
    )
    .unwrap();
    for p in listed["processes"].as_array().unwrap() {
        assert_eq!(p["uid"], ben.uid, "ben sees a process not his: {p}");
    }

    // The ledger: each sees their own rows.
    let rows = usage_rows(&agent, &ben, cwd_b);
    assert!(!rows.is_empty());
    assert!(
        rows.iter().all(|r| r["user"] == ben.name.as_str()),
        "{rows:?}"
    );

    assert!(
        agent
            .devos(Some(&ada), cwd_a, &["deny", &id])
            .status
            .success()
    );
    agent.wait_state(&ada, cwd_a, &id, "denied");
    std::thread::sleep(Duration::from_millis(300));
    let _ = monitor.kill();
    let _ = monitor.wait();
    let heard = heard.join().unwrap();
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert!(
        heard.contains("NameOwnerChanged") || heard.contains("NameAcquired"),
        "the monitor heard nothing at all: {heard}"
    );
    for private in ["ADA-STREAMED-TEXT", "ada-private-name", &id] {
        assert!(
            !heard.contains(private),
            "ben overheard `{private}` of ada's request:\n{heard}"
        );
    }
}

// ---------------------------------------------------------------------------------
// Robustness: a hostile model or endpoint.
// ---------------------------------------------------------------------------------

/// Regression: hundreds of tool calls in one reply, input nested 20 000 deep, input
/// that is not an object, control characters and NUL in the model's text and in what
/// it proposes, binary tool output going back, a 256 KiB write: each gets a tool error,
/// a question or printable text, and the agent stays up and answers.
#[test]
fn robustness_hostile_model_replies_neither_crash_nor_wedge_the_agent() {
    let standin = StandIn::start().unwrap();
    let agent = model_agent(&standin, "", "");
    let user = User::ensure("devos-ma-lena");
    let project = user.project();
    let cwd = project.path();
    let bytes: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    std::fs::write(cwd.join("blob.bin"), &bytes).unwrap();
    std::os::unix::fs::chown(cwd.join("blob.bin"), Some(user.uid), Some(user.uid)).unwrap();

    // Hundreds of calls of tools that do not exist, in one reply.
    let many: Vec<ToolCall> = (0..300)
        .map(|i| ToolCall::new(&format!("tool_{i}"), json!({})))
        .collect();
    standin.push(Reply::tools(many));
    standin.push(Reply::text("ok"));
    let started = Instant::now();
    let r = run_json(&agent, &user, cwd, &["--model", "small", "many"]);
    assert_eq!(r["state"], "done", "{r}");
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(all_tool_results(&standin).len(), 300);

    // Input nested deeper than any parser should follow, and inputs that are no
    // objects.
    let deep = format!("{{\"argv\": {}{}}}", "[".repeat(20_000), "]".repeat(20_000));
    standin.push(Reply::tools(vec![
        ToolCall::raw("run", &deep),
        ToolCall::raw("run", "null"),
        ToolCall::raw("read_file", "42"),
        ToolCall::raw("read_file", "\"blob.bin\""),
        ToolCall::raw(
            "read_file",
            "{\"path\": \"blob.bin\", \"path\": \"/etc/shadow\"}",
        ),
    ]));
    standin.push(Reply::text("ok"));
    let r = run_json(&agent, &user, cwd, &["--model", "small", "deep"]);
    assert_eq!(r["state"], "done", "{r}");

    // Binary output goes back printable; the next request is still valid JSON.
    standin.push(Reply::tool("read_file", json!({ "path": "blob.bin" })));
    standin.push(Reply::text("binary"));
    let r = run_json(&agent, &user, cwd, &["--model", "small", "read the blob"]);
    assert_eq!(r["state"], "done", "{r}");
    let last = standin.requests().last().unwrap().body.clone();
    assert!(
        last.is_object(),
        "the agent sent something that is not JSON"
    );
    assert!(
        !last.to_string().contains("\\u0000"),
        "NUL went back to the model"
    );

    // Control characters in the model's text never reach the terminal as such, and a
    // proposal with them in a path or an argument is refused back to the model with
    // why: it is never shown in a prompt at all.
    let escapes = "x\u{1b}[1A\u{1b}[2K\rls -la\u{7}";
    standin.push(
        Reply::tools(vec![
            ToolCall::new("run", json!({ "argv": ["rm", "-f", escapes] })),
            ToolCall::new("delete", json!({ "path": escapes })),
            ToolCall::new("run", json!({ "argv": ["rm", "-f", "a\u{9b}2J"] })),
        ])
        .with_leading_text("a\u{0}b\u{1b}]0;owned\u{7}c\u{202e}d\u{1b}[2J "),
    );
    standin.push(Reply::text("refused"));
    let out = agent.devos(Some(&user), cwd, &["run", "--model", "small", "escape"]);
    assert!(out.status.success(), "{}", stderr(&out));
    for (what, text) in [("stdout", stdout(&out)), ("stderr", stderr(&out))] {
        assert!(
            !text.contains(['\u{1b}', '\u{0}', '\u{7}', '\r', '\u{202e}', '\u{9b}']),
            "control characters on the terminal ({what}): {text:?}"
        );
        assert!(!text.contains("waits for approval"), "{what}: {text}");
    }
    let results = all_tool_results(&standin);
    let refused: Vec<_> = results.iter().rev().take(3).collect();
    assert!(
        refused
            .iter()
            .all(|(status, text)| status == "error" && text.contains("control character")),
        "{refused:?}"
    );

    // A large write is a question like any other.
    standin.push(Reply::tool(
        "write_file",
        json!({ "path": "big.txt", "content": "x".repeat(256 << 10) }),
    ));
    let out = agent.devos(Some(&user), cwd, &["run", "--model", "small", "big"]);
    let id = waiting_id(&out);
    assert!(
        stderr(&out).contains("write 262144 bytes"),
        "{}",
        stderr(&out)
    );
    agent.devos(Some(&user), cwd, &["cancel", &id]);
    agent.wait_state(&user, cwd, &id, "cancelled");
    assert!(!cwd.join("big.txt").exists());

    // Still up, still answering.
    let out = agent_call(&agent, Some(&user), &["Ping"]);
    assert!(stdout(&out).contains("pong"), "{}", stderr(&out));
    standin.push(Reply::text("still here"));
    let r = run_json(&agent, &user, cwd, &["--model", "small", "hello"]);
    assert_eq!(r["answer"], "still here", "{r}");
    assert_eq!(standin.remaining(), 0);
}

/// Regression: token counts near the top of what Bedrock's API can carry are
/// recorded and priced (a $10 000 call), the budget stops the next request, and a
/// user past a budget cannot go on through `Continue` either: nothing more is sent.
#[test]
fn budget_huge_token_counts_count_and_an_over_budget_user_cannot_continue() {
    let standin = StandIn::start().unwrap();
    let agent = model_agent(&standin, "", "[budgets]\nuser-daily-usd = 1.0\n");
    let user = User::ensure("devos-ma-milo");
    let project = user.project();
    let cwd = project.path();
    standin.push(Reply::text("pricey").with_usage(Usage {
        input: 2_000_000_000,
        output: 0,
        cache_read: 0,
        cache_write: 0,
    }));
    let r = run_json(&agent, &user, cwd, &["--model", "small", "one"]);
    assert_eq!(r["state"], "done", "{r}");
    let id = r["id"].as_str().unwrap().to_owned();
    let rows = usage_rows(&agent, &user, cwd);
    assert_eq!(rows[0]["input-tokens"], 2_000_000_000u64, "{rows:?}");
    assert!((rows[0]["cost-usd"].as_f64().unwrap() - 10_000.0).abs() < 1e-6);

    let r = run_json(&agent, &user, cwd, &["--model", "small", "two"]);
    assert_eq!(r["state"], "unplanned", "{r}");
    let r = run_json(&agent, &user, cwd, &[&format!("--continue={id}"), "three"]);
    assert_eq!(r["state"], "unplanned", "{r}");
    assert!(
        r["error"].as_str().unwrap().contains("daily model budget"),
        "{r}"
    );
    assert_eq!(
        standin.requests().len(),
        1,
        "nothing more went to the model"
    );
}

/// Was a finding. What the model says was forwarded to the submitter as `ModelOutput` signals
/// with no bound on their size: without streaming (`[model] stream = false`) the whole
/// answer goes in one signal, and a streamed delta is forwarded as it comes. A reply
/// larger than the bus's largest message (32 MiB for dbus-daemon's system bus) makes
/// the bus daemon drop the agent's connection; the agent exits ("lost the system
/// bus"): `org.devos.Agent1` is gone for every user, clients waiting on it hang, and
/// at the next start every user's request in flight is cancelled. A real
/// model is bounded by `max-tokens`, but the endpoint (`[model] endpoint-url`, a
/// gateway or proxy) is not: one hostile reply takes the service down. (`MAX_REPLY`
/// guards `Get`/`History` against exactly this; the signals have no such guard, nor
/// does `ApprovalNeeded`'s description, which holds whatever path or argv the model
/// sent.)
/// Now model text goes out in signals of at most 32 KiB, an answer over 4 MiB is a bad
/// reply, and a prompt's description is cut at 4 KiB.
#[test]
fn robustness_one_oversized_model_reply_takes_the_agent_off_the_bus() {
    let standin = StandIn::start().unwrap();
    let agent = model_agent(&standin, "stream = false", "");
    let user = User::ensure("devos-ma-nora");
    let project = user.project();
    let cwd = project.path();
    standin.push(Reply::text(&"x".repeat(33 << 20)));
    let id = submit_to_model(&agent, &user, cwd, "tell me everything");
    // The reply has come and gone (the request ends one way or another).
    assert!(wait_for(Duration::from_secs(20), || standin
        .requests()
        .len()
        == 1));
    let mut state = String::new();
    let ended = wait_for(Duration::from_secs(60), || {
        state = show(&agent, &user, cwd, &id)["state"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        is_final(&state)
    });
    let out = agent_call(&agent, Some(&user), &["Ping"]);
    assert!(
        stdout(&out).contains("pong"),
        "after one large model reply the agent no longer answers on the bus: {}",
        stderr(&out)
    );
    assert!(ended, "the request did not end: {state}");
}

/// Regression: the model never reaches the caller's secret locations (`~/.ssh`, ...)
/// without asking: reads, listings and names of secret places ask, and a search over
/// the whole home (read-only, so it runs) finds nothing in them (they are absent from
/// the sandbox), so no key reaches the model.
#[test]
fn secrets_a_model_never_reaches_secret_locations_unasked() {
    let standin = StandIn::start().unwrap();
    let agent = model_agent(&standin, "", "");
    let user = User::ensure("devos-ma-otto");
    let ssh = user.home.join(".ssh");
    std::fs::create_dir_all(&ssh).unwrap();
    std::os::unix::fs::chown(&ssh, Some(user.uid), Some(user.uid)).unwrap();
    let key = "OTTO-PRIVATE-KEY-MATERIAL";
    user.write(
        &ssh.join("id_ed25519"),
        &format!("-----BEGIN OPENSSH PRIVATE KEY-----\n{key}\n"),
    );
    user.write(
        &user.home.join(".netrc"),
        &format!("machine x login o password {key}\n"),
    );
    user.write(
        &user.home.join("public-notes.txt"),
        "KEY-MATERIAL is a phrase\n",
    );
    let project = user.project();
    let cwd = project.path();
    user_symlink(&user, &ssh, &cwd.join("keys"));

    // Searches over the home run (read-only) and find nothing secret.
    standin.push(Reply::tools(vec![
        ToolCall::new("search", json!({ "pattern": "KEY-MATERIAL", "path": "~" })),
        ToolCall::new(
            "search",
            json!({ "pattern": "id_*", "path": "~", "in": "names" }),
        ),
        ToolCall::new(
            "run",
            json!({ "argv": ["grep", "-R", "KEY-MATERIAL", user.home.to_string_lossy()] }),
        ),
        ToolCall::new("project_info", json!({})),
    ]));
    standin.push(Reply::text("nothing"));
    let id = submit(&agent, &user, cwd, "find my keys");
    let r = agent.wait_state(&user, cwd, &id, "done");
    assert!(
        r["actions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["decision"]["decision"] == "approved"),
        "{r}"
    );
    let found = &all_tool_results(&standin)[0].1;
    assert!(
        found.contains("public-notes.txt"),
        "the search ran over the home: {found}"
    );
    // Direct reads, listings and copies of secret places ask.
    let mut unasked = Vec::new();
    for (name, input) in [
        ("read_file", json!({ "path": "~/.ssh/id_ed25519" })),
        ("read_file", json!({ "path": "keys/id_ed25519" })),
        ("read_file", json!({ "path": "~/.netrc" })),
        ("list_dir", json!({ "path": "~/.ssh" })),
        ("copy", json!({ "from": "~/.ssh", "to": "loot" })),
        ("search", json!({ "pattern": "PRIVATE", "path": "keys/" })),
        (
            "run",
            json!({ "argv": ["cat", "/proc/self/root/home/devos-ma-otto/.ssh/id_ed25519"] }),
        ),
    ] {
        let (decision, r) = outcome_of(&agent, &standin, &user, cwd, name, &input);
        if decision == "approved" {
            unasked.push(format!("{name} {input}: {}", r["actions"][0]["risk"]));
        }
    }
    assert!(unasked.is_empty(), "reached secrets unasked: {unasked:#?}");
    let results = all_tool_results(&standin);
    assert!(
        !results
            .iter()
            .any(|(_, text)| text.contains("OTTO-PRIVATE")),
        "a secret reached the model: {results:?}"
    );
    assert!(!cwd.join("loot").exists());
}

/// Two writes the model proposes to the same file, of the same size and alike in
/// their first bytes, read the same in their descriptions; their audit entries must
/// still tell them apart, by a digest of each action that the action kept in the
/// store can be checked against. Was a finding: entries held only the description,
/// and the content lived only in the store, which is pruned.
#[test]
fn audit_integrity_writes_alike_in_their_description_differ_in_their_entries() {
    use sha2::{Digest, Sha256};
    let standin = StandIn::start().unwrap();
    let agent = model_agent(&standin, "", "");
    let user = User::ensure("devos-ma-audit");
    let project = user.project();
    let cwd = project.path();
    let head = "# notes\n".repeat(20);
    standin.push(Reply::tools(vec![
        ToolCall::new(
            "write_file",
            json!({ "path": "notes.md", "content": format!("{head}keep all\n") }),
        ),
        ToolCall::new(
            "write_file",
            json!({ "path": "notes.md", "content": format!("{head}rm -rf ~\n") }),
        ),
    ]));
    standin.push(Reply::text("written"));
    let id = submit(&agent, &user, cwd, "write my notes twice");
    let r = approve_everything(&agent, &user, cwd, &id);
    assert_eq!(r["state"], "done", "{r}");
    let actions = r["actions"].as_array().unwrap();
    assert_eq!(actions.len(), 2, "{r}");
    assert_eq!(actions[0]["description"], actions[1]["description"], "{r}");

    let log = std::fs::read_to_string(agent.state().join("audit/log-000001.jsonl")).unwrap();
    let entries: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|e: &Value| e["request"] == id.as_str())
        .collect();
    let mut digests = Vec::new();
    for (index, action) in actions.iter().enumerate() {
        // The action as the store keeps it, serialised as the agent does.
        let stored: devos_agent::action::Action =
            serde_json::from_value(action["action"].clone()).unwrap();
        let digest = hex::encode(Sha256::digest(serde_json::to_vec(&stored).unwrap()));
        for event in [
            "action.proposed",
            "action.decided",
            "action.started",
            "action.finished",
        ] {
            let entry = entries
                .iter()
                .find(|e| e["event"] == event && e["action"] == index)
                .unwrap_or_else(|| panic!("no {event} for action {index}: {entries:?}"));
            assert_eq!(entry["detail"]["action-sha256"], digest.as_str(), "{entry}");
            assert_eq!(entry["detail"]["action"], action["description"]);
        }
        digests.push(digest);
    }
    assert_ne!(digests[0], digests[1]);
}
