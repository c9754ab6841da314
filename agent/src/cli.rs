//! The `devos` command: a thin client of the agent's D-Bus API. Data goes to stdout
//! (`--json` for scripts), prompts and progress to stderr.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use futures_util::StreamExt;

use crate::client::Agent1Proxy;
use crate::executor::{one_line, printable};
use crate::request::{ActionState, Decision, Request, Rule, State};
use crate::{out, outln};

/// Talk to the DevOS agent: run requests, approve what it wants to do, see history.
#[derive(Parser)]
#[command(name = "devos", version, about)]
pub struct Cli {
    /// Machine-readable JSON on stdout.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Ask the agent to do something, e.g. `devos run "find rust files"`. Shows the
    /// plan, asks for approvals (with the risk and why) and streams the output.
    Run {
        /// The request, in words.
        #[arg(required = true, num_args = 1..)]
        text: Vec<String>,
        /// Working directory for the request (default: the current directory).
        #[arg(long)]
        cwd: Option<PathBuf>,
        /// Without a terminal, wait for approvals given elsewhere (`devos approve`)
        /// instead of exiting with status 3.
        #[arg(long)]
        wait: bool,
        /// Go straight to the model (skipping the local rules): `small`, `large` or a
        /// Bedrock model id.
        #[arg(long, value_name = "MODEL", conflicts_with = "continue_")]
        model: Option<String>,
        /// A follow-up in a conversation with the model: your latest one, or that of
        /// request ID (`--continue=ID`).
        #[arg(
            long = "continue",
            value_name = "ID",
            num_args = 0..=1,
            require_equals = true,
            default_missing_value = ""
        )]
        continue_: Option<String>,
    },
    /// Your model usage per day and model: tokens and cost (root: everyone's).
    Usage {
        /// From this day on: YYYY-MM-DD, or a number of days back such as `7d`
        /// (default: 30 days).
        #[arg(long)]
        since: Option<String>,
    },
    /// Approve an action waiting for a decision.
    Approve(DecideArgs),
    /// Deny an action waiting for a decision (the request stops).
    Deny(DecideArgs),
    /// Cancel a request; a running action is killed.
    Cancel { id: String },
    /// Show one request: plan, risks, decisions, output.
    Show { id: String },
    /// Your recent requests, newest first.
    History {
        /// How many (1 to 10000).
        #[arg(short = 'n', long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        limit: u32,
    },
    /// Remembered approvals and denials.
    Rules {
        #[command(subcommand)]
        command: Option<RulesCommand>,
    },
    /// The audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// The agent's status.
    Status,
    /// Install the newest version from the image's update feed into the other root
    /// slot (root only; it boots next, with three tries before the machine goes back
    /// by itself), say whether there is one, or go back to the previous version.
    Update {
        /// Only say whether a newer version is available.
        #[arg(long, conflicts_with = "rollback")]
        check: bool,
        /// Boot the version installed before this one from now on.
        #[arg(long)]
        rollback: bool,
        /// Reboot once the next version is set.
        #[arg(long, conflicts_with = "check")]
        reboot: bool,
    },
    /// Your projects' index: where things are, what changed, git state, processes.
    Context {
        #[command(subcommand)]
        command: ContextCommand,
    },
}

#[derive(Subcommand)]
enum ContextCommand {
    /// Index a directory and keep it current (scanned as you, watched with inotify).
    Add {
        /// The directory (default: the current one).
        dir: Option<PathBuf>,
        /// Index the text of its small text files too (`find --text`).
        #[arg(long)]
        text: bool,
    },
    /// Stop indexing a project and forget what was indexed in it.
    Remove { dir: PathBuf },
    /// Your projects and how each is kept current.
    List,
    /// Files and directories whose path holds every word, best first.
    Find {
        #[arg(required = true, num_args = 1..)]
        words: Vec<String>,
        #[arg(short = 'n', long, default_value_t = 20)]
        limit: u32,
        /// Search the text of files (projects added with `--text`) instead of names.
        #[arg(long)]
        text: bool,
    },
    /// Files changed recently, newest first.
    Recent {
        /// `today`, a duration back (`2h`, `3d`), an RFC 3339 time.
        #[arg(long, default_value = "24h")]
        since: String,
        #[arg(short = 'n', long, default_value_t = 30)]
        limit: u32,
    },
    /// The git state of the project DIR is in (default: every project's).
    Git { dir: Option<PathBuf> },
    /// Your processes (root: everyone's), busiest first, with their project.
    Ps,
    /// Projects, entries, index size and limits, the watcher.
    Status,
}

#[derive(clap::Args)]
struct DecideArgs {
    /// The request id.
    id: String,
    /// The action's index (default: the one waiting).
    action: Option<u32>,
    /// Remember the decision: once (default), session (until the agent restarts) or
    /// always.
    #[arg(long, default_value = "once")]
    remember: String,
    /// Scope of a remembered decision: commands starting with these words
    /// (default: this exact command).
    #[arg(long, num_args = 1.., value_name = "WORD")]
    command_prefix: Vec<String>,
    /// Scope of a remembered decision: paths under this directory (a relative one is
    /// taken from the current directory).
    #[arg(long)]
    path_prefix: Option<PathBuf>,
}

#[derive(Subcommand)]
enum RulesCommand {
    /// List your rules (root: everyone's).
    List,
    /// Add a rule.
    Add {
        /// `allow` or `deny`.
        decision: String,
        /// `session` or `always`.
        #[arg(long, default_value = "always")]
        lifetime: String,
        /// Commands starting with these words.
        #[arg(long, num_args = 1.., value_name = "WORD")]
        command_prefix: Vec<String>,
        /// Paths under this directory (a relative one is taken from the current
        /// directory).
        #[arg(long)]
        path_prefix: Option<PathBuf>,
    },
    /// Remove a rule by id.
    Remove { id: i64 },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the hash chain, checkpoints and head; report the first bad entry.
    Verify,
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async_run(cli))
}

async fn connect() -> anyhow::Result<(zbus::Connection, Agent1Proxy<'static>)> {
    // (zbus's I/O error says its cause in its own words: not the chain, which would
    // say it twice.)
    let conn = zbus::Connection::system().await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the system bus ({e})\n  hint: devos talks to the DevOS agent on the system bus of a DevOS image: check that D-Bus runs (`systemctl status dbus`), or set DBUS_SYSTEM_BUS_ADDRESS"
        )
    })?;
    let proxy = Agent1Proxy::new(&conn).await?;
    Ok((conn, proxy))
}

/// What `devos update` prints of the agent's `message`: when it reboots the machine
/// itself (`--reboot`), that instead of the message's "reboot to …".
fn update_message(message: &str, rebooting: bool) -> String {
    match message.rsplit_once(": reboot to ") {
        Some((done, _)) if rebooting => format!("{done}: rebooting now"),
        _ => message.to_owned(),
    }
}

/// `devos update`: the admin interface's `Update`, then a reboot if asked for.
async fn update(
    conn: &zbus::Connection,
    check: bool,
    rollback: bool,
    reboot: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let action = match (check, rollback) {
        (true, _) => "check",
        (_, true) => "rollback",
        _ => "install",
    };
    let admin = crate::client::AdminProxy::new(conn).await?;
    let reply = admin.update(action).await.map_err(|e| match e {
        zbus::Error::MethodError(name, _, _)
            if name.as_str() == "org.freedesktop.DBus.Error.AccessDenied" =>
        {
            let command = match action {
                "install" => "devos update".to_owned(),
                other => format!("devos update --{other}"),
            };
            anyhow::anyhow!(
                "only root may update the machine: {}",
                as_root(&command, &my_groups())
            )
        }
        other => agent_error(other),
    })?;
    let v: serde_json::Value = serde_json::from_str(&reply)?;
    let rebooting = reboot && v["reboot"] == true;
    let message = update_message(v["message"].as_str().unwrap_or_default(), rebooting);
    // (Said before the reboot, which happens even if no one reads it.)
    let shown = crate::stdout::print(if json {
        serde_json::to_string_pretty(&v)? + "\n"
    } else {
        format!("{}\n", printable(&message))
    });
    if rebooting {
        let status = std::process::Command::new("systemctl")
            .arg("reboot")
            .status()
            .context("cannot run systemctl reboot")?;
        if !status.success() {
            anyhow::bail!("systemctl reboot failed ({status})");
        }
    }
    shown?;
    Ok(ExitCode::SUCCESS)
}

/// D-Bus errors carry the agent's own message; show that, not the wrapper.
fn agent_error(e: zbus::Error) -> anyhow::Error {
    match e {
        zbus::Error::MethodError(name, Some(msg), _) => {
            if name.as_str() == "org.freedesktop.DBus.Error.ServiceUnknown" {
                anyhow::anyhow!("the DevOS agent is not running (systemctl status devos-agent)")
            } else {
                anyhow::anyhow!("{msg}")
            }
        }
        other => other.into(),
    }
}

async fn async_run(cli: Cli) -> anyhow::Result<ExitCode> {
    let (conn, agent) = connect().await?;
    let json = cli.json;
    match cli.command {
        Command::Context { command } => context(&conn, command, json).await,
        Command::Update {
            check,
            rollback,
            reboot,
        } => update(&conn, check, rollback, reboot, json).await,
        Command::Run {
            text,
            cwd,
            wait,
            model,
            continue_,
        } => {
            let how = match (model, continue_) {
                (_, Some(id)) => How::Continue(id),
                (Some(m), None) => How::Model(m),
                (None, None) => How::Auto,
            };
            run_request(&agent, &text.join(" "), cwd, how, wait, json).await
        }
        Command::Usage { since } => usage(&agent, since.as_deref(), json).await,
        Command::Approve(args) => decide(&agent, args, true, json).await,
        Command::Deny(args) => decide(&agent, args, false, json).await,
        Command::Cancel { id } => {
            agent.cancel(&id).await.map_err(agent_error)?;
            if json {
                outln!("{}", serde_json::json!({ "id": id, "cancelled": true }));
            } else {
                eprintln!("cancelled {id}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Show { id } => {
            let r: Request = serde_json::from_str(&agent.get(&id).await.map_err(agent_error)?)?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print_request(&r, true)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::History { limit } => {
            let text = agent.history(limit).await.map_err(agent_error)?;
            let list: Vec<Request> = serde_json::from_str(&text)?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for r in &list {
                    outln!(
                        "{}  {:<17}  {}  {}",
                        one_line(&r.id),
                        r.state.as_str(),
                        one_line(r.created.get(..19).unwrap_or(&r.created)),
                        one_line(&r.text)
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Rules { command } => {
            rules(&agent, command.unwrap_or(RulesCommand::List), json).await
        }
        Command::Audit {
            command: AuditCommand::Verify,
        } => {
            let text = agent.verify_audit().await.map_err(agent_error)?;
            let v: crate::audit::Verification = serde_json::from_str(&text)?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&v)?);
            } else if let Some(bad) = &v.first_bad {
                outln!(
                    "audit log: TAMPERED — first bad entry: {} line {}{}: {}",
                    one_line(&bad.file),
                    bad.line,
                    bad.seq.map(|s| format!(" (entry {s})")).unwrap_or_default(),
                    one_line(&bad.reason)
                );
            } else if let Some(after) = v.resumed_after.filter(|after| *after >= v.entries) {
                outln!(
                    "audit log: ok — nothing appended since the last verification (up to entry {after}), head {}; {} reads the whole log",
                    &v.last_hash[..16],
                    root_runs("devos audit verify", &my_groups())
                );
            } else if let Some(after) = v.resumed_after {
                outln!(
                    "audit log: ok — entries {}–{} since the last verification (up to entry {after}), head {}; {} reads the whole log",
                    after + 1,
                    v.entries,
                    &v.last_hash[..16],
                    root_runs("devos audit verify", &my_groups())
                );
            } else {
                outln!(
                    "audit log: ok — {} entries in {} file(s), {} checkpoints, head {}",
                    v.entries,
                    v.files,
                    v.checkpoints,
                    &v.last_hash[..16]
                );
            }
            Ok(if v.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Status => {
            let text = agent.status().await.map_err(agent_error)?;
            let v: serde_json::Value = serde_json::from_str(&text)?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&v)?);
            } else if let Some(map) = v.as_object() {
                for (k, v) in map {
                    // Text as it is, everything else as JSON; one line each either way.
                    let text = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
                    outln!("{}: {}", one_line(k), one_line(&text));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A request as `devos show` and `devos run` print it. Every line of text in it that
/// came from a user, the model or the file system (the request, descriptions, paths
/// in profiles and reasons, rule descriptions) is shown with [`one_line`]; output and
/// answers, which are text of many lines, with [`printable`].
fn print_request(r: &Request, with_output: bool) -> anyhow::Result<()> {
    outln!(
        "request {} ({}): {}",
        one_line(&r.id),
        r.state.as_str(),
        one_line(&r.text)
    );
    if !r.summary.is_empty() {
        outln!("plan: {}", one_line(&r.summary));
    }
    for a in &r.actions {
        let decision = match &a.decision {
            Decision::Ask => "needs your approval".to_owned(),
            Decision::Approved { by } => format!("approved ({})", one_line(by)),
            Decision::Denied { by, reason } => {
                format!("DENIED ({}): {}", one_line(by), one_line(reason))
            }
        };
        outln!("  [{}] {}", a.index, one_line(&a.description));
        outln!(
            "      risk: {} — {}",
            a.risk.class,
            if a.risk.reasons.is_empty() {
                "nothing risky found".into()
            } else {
                one_line(&a.risk.reasons.join("; "))
            }
        );
        if !a.profile.is_empty() {
            outln!("      sandbox: {}", one_line(&a.profile));
        }
        outln!("      {decision}; {:?}", a.state);
        if with_output && !a.output.is_empty() {
            for line in printable(&a.output).lines() {
                outln!("      | {line}");
            }
        }
        if let Some(e) = &a.error {
            outln!("      error: {}", one_line(e));
        }
    }
    if let (true, Some(answer)) = (with_output, &r.answer) {
        outln!("answer:\n{}", printable(answer));
    }
    if let Some(e) = &r.error {
        outln!("{}", printable(e));
    }
    Ok(())
}

/// One rule as `devos rules` lists it; its description names argv words and paths
/// that a user or the model chose.
fn rule_line(r: &Rule) -> String {
    format!(
        "{:>4}  {:<5}  {:<7}  uid {:<6} {}",
        r.id,
        if r.allow { "allow" } else { "deny" },
        format!("{:?}", r.lifetime).to_lowercase(),
        r.uid,
        one_line(&crate::approval::describe_rule(r))
    )
}

/// The question `devos run` asks on the terminal about action `index` (without the
/// choices). The description, class and sandbox profile come from the agent, and
/// name what the user or the model asked for (argv words, paths): each is shown with
/// [`one_line`], so that nothing in them can move the cursor, clear the screen or lay
/// out a line that looks like the prompt's own.
fn approval_question(
    index: u32,
    description: &str,
    from_model: bool,
    risk: &str,
    profile: &str,
) -> String {
    let proposed = if from_model {
        " [proposed by the model]"
    } else {
        ""
    };
    format!(
        "[{index}] {}{proposed} ({}; sandbox: {})",
        one_line(description),
        one_line(risk),
        one_line(profile)
    )
}

fn exit_for(r: &Request) -> ExitCode {
    match r.state {
        State::Done => ExitCode::SUCCESS,
        State::AwaitingApproval => ExitCode::from(3),
        _ => ExitCode::FAILURE,
    }
}

/// How `devos run` submits: local rules first, a chosen model, or a follow-up.
enum How {
    Auto,
    Model(String),
    /// In the conversation of this request (empty: the latest).
    Continue(String),
}

/// The newest of the caller's requests that talked to the model.
async fn latest_conversation(agent: &Agent1Proxy<'_>) -> anyhow::Result<String> {
    let list: Vec<Request> = serde_json::from_str(&agent.history(200).await.map_err(agent_error)?)?;
    list.into_iter()
        .find(|r| r.conversation.is_some())
        .map(|r| r.id)
        .context("you have no conversation with the model to continue; start one with `devos run \"...\"`")
}

/// Hand the request to the agent the way `how` says; its id.
async fn submit(
    agent: &Agent1Proxy<'_>,
    text: &str,
    cwd: &str,
    how: How,
) -> anyhow::Result<String> {
    let submitted = match how {
        How::Auto => agent.submit(text, cwd).await,
        How::Model(model) => agent.submit_to_model(text, cwd, &model).await,
        How::Continue(id) => {
            let id = if id.is_empty() {
                latest_conversation(agent).await?
            } else {
                id
            };
            agent.continue_(&id, text).await
        }
    };
    submitted.map_err(agent_error)
}

async fn run_request(
    agent: &Agent1Proxy<'_>,
    text: &str,
    cwd: Option<PathBuf>,
    how: How,
    wait: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let cwd = match cwd {
        Some(c) => std::path::absolute(c)?,
        None => std::env::current_dir().context("the current directory")?,
    };
    // Ctrl-C from here on cancels the request (a running action is killed), as it
    // would stop a command run by hand: caught before submitting, so none is missed.
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    // Subscribe before submitting: the agent may start at once.
    let mut signals = drained(agent).await?;
    let id = submit(agent, text, &cwd.to_string_lossy(), how).await?;
    let watch = Watch {
        agent,
        id: &id,
        wait,
        json,
        streamed: std::cell::Cell::new(false),
    };
    let follow = async {
        let r = watch.get().await?;
        if !json {
            // (A request answered at once — a question to the context index — shows
            // its answer.)
            print_request(&r, r.state.is_final())?;
        }
        if r.state.is_final() {
            if json {
                outln!("{}", serde_json::to_string_pretty(&r)?);
            }
            return Ok(exit_for(&r));
        }
        let interactive = std::io::stdin().is_terminal();
        loop {
            let Some(signal) = signals.recv().await else {
                bail!("lost the connection to the agent");
            };
            match signal {
                Signal::Text(sig) => {
                    let args = sig.args()?;
                    if args.id == id && !json {
                        out!("{}", printable(args.text));
                        std::io::stdout().flush().ok();
                        watch.streamed.set(true);
                    }
                }
                Signal::Output(sig) => {
                    let args = sig.args()?;
                    if args.id == id && !json {
                        out!("{}", printable(args.data));
                        // (Live output only; the request keeps all of it.)
                        std::io::stdout().flush().ok();
                    }
                }
                Signal::Approval(sig) => {
                    let args = sig.args()?;
                    if args.id != id {
                        continue;
                    }
                    let asked = Asked {
                        index: args.action,
                        risk: args.risk.to_owned(),
                        description: args.description.to_owned(),
                        from_model: args.origin == "model",
                    };
                    if let Some(code) = watch.approval_needed(asked, interactive).await? {
                        return Ok(code);
                    }
                }
                Signal::Changed(sig) => {
                    let args = sig.args()?;
                    if args.id != id {
                        continue;
                    }
                    if matches!(args.state, "done" | "failed" | "denied" | "cancelled") {
                        return watch.finished().await;
                    }
                }
            }
        }
    };
    tokio::select! {
        code = follow => match code {
            // The reader has gone (`devos run ... | head`): no one follows the request
            // any more, so it does not go on holding a slot or waiting for approval.
            Err(e) if crate::stdout::is_closed(&e) => {
                let _ = tokio::time::timeout(CANCEL_WAIT, agent.cancel(&id)).await;
                Err(e)
            }
            code => code,
        },
        _ = sigint.recv() => interrupted(agent, &id).await,
    }
}

/// A signal about a request, as `devos run` follows one.
enum Signal {
    Text(crate::client::ModelOutput),
    Output(crate::client::ActionOutput),
    Approval(crate::client::ApprovalNeeded),
    Changed(crate::client::RequestChanged),
}

/// The agent's signals about requests as they come, read by a task of their own: a
/// stream left unread while `devos` waits for a method's reply (or an approval) fills
/// the connection's queue (64 messages) — a fast answer streams more — and the reply
/// waits behind it for ever. One task, biased: text and output that came before an
/// approval prompt or the end are passed on first.
async fn drained(
    agent: &Agent1Proxy<'_>,
) -> anyhow::Result<tokio::sync::mpsc::UnboundedReceiver<Signal>> {
    let mut text = agent.receive_model_output().await?;
    let mut output = agent.receive_action_output().await?;
    let mut approvals = agent.receive_approval_needed().await?;
    let mut changed = agent.receive_request_changed().await?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let signal = tokio::select! {
                biased;
                Some(s) = text.next() => Signal::Text(s),
                Some(s) = output.next() => Signal::Output(s),
                Some(s) = approvals.next() => Signal::Approval(s),
                Some(s) = changed.next() => Signal::Changed(s),
                else => break,
            };
            if tx.send(signal).is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

/// How long a cancel on the way out may take before `devos` stops waiting for it.
const CANCEL_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Ctrl-C while `devos run` follows request `id`: cancel it, say so, and exit as an
/// interrupted command does (at once: an approval prompt may still be reading stdin).
async fn interrupted(agent: &Agent1Proxy<'_>, id: &str) -> ! {
    eprintln!();
    match tokio::time::timeout(CANCEL_WAIT, agent.cancel(id)).await {
        Ok(Ok(())) => eprintln!("request {id}: cancelled (Ctrl-C)"),
        Ok(Err(e)) => eprintln!("request {id}: not cancelled: {}", agent_error(e)),
        Err(_) => eprintln!(
            "request {id}: the agent did not answer the cancel within 5 s; `devos cancel {id}`"
        ),
    }
    std::process::exit(130)
}

/// An `ApprovalNeeded` signal's action, as the agent sent it (not yet made safe to
/// print).
struct Asked {
    index: u32,
    risk: String,
    description: String,
    from_model: bool,
}

/// A submitted request the CLI follows until it ends.
struct Watch<'a> {
    agent: &'a Agent1Proxy<'a>,
    id: &'a str,
    wait: bool,
    json: bool,
    /// Whether the model's text was shown as it came.
    streamed: std::cell::Cell<bool>,
}

impl Watch<'_> {
    async fn get(&self) -> anyhow::Result<Request> {
        let text = self.agent.get(self.id).await.map_err(agent_error)?;
        anyhow::Ok(serde_json::from_str::<Request>(&text)?)
    }

    /// Ask the user about an action and pass on their answer. Without a terminal to
    /// ask on, say how to decide and go on waiting (`--wait`) or stop: the returned
    /// exit code ends the CLI.
    async fn approval_needed(
        &self,
        asked: Asked,
        interactive: bool,
    ) -> anyhow::Result<Option<ExitCode>> {
        let id = self.id;
        let index = asked.index;
        if !interactive {
            eprintln!(
                "action {index} ({}) waits for approval: {}{}\n  approve: devos approve {id} {index}\n  deny:    devos deny {id} {index}",
                one_line(&asked.risk),
                one_line(&asked.description),
                if asked.from_model {
                    " [proposed by the model]"
                } else {
                    ""
                },
            );
            if self.wait {
                return Ok(None);
            }
            if self.json {
                // The request as it waits, for a script to decide on.
                outln!("{}", serde_json::to_string_pretty(&self.get().await?)?);
            }
            return Ok(Some(ExitCode::from(3)));
        }
        // (Only the prompt's detail: without it the prompt still asks.)
        let profile = self
            .get()
            .await
            .ok()
            .and_then(|r| r.actions.get(index as usize).map(|a| a.profile.clone()))
            .unwrap_or_default();
        let question = approval_question(
            index,
            &asked.description,
            asked.from_model,
            &asked.risk,
            &profile,
        );
        let (approve, remember) = ask_approval(question).await?;
        let res = if approve {
            self.agent.approve(id, index, remember, &[], "").await
        } else {
            self.agent.deny(id, index, "once", &[], "").await
        };
        res.map_err(agent_error)?;
        Ok(None)
    }

    /// Show how the request ended and pick the exit code.
    async fn finished(&self) -> anyhow::Result<ExitCode> {
        let r = self.get().await?;
        if self.json {
            outln!("{}", serde_json::to_string_pretty(&r)?);
        } else {
            for a in r.actions.iter().filter(|a| a.state == ActionState::Failed) {
                eprintln!(
                    "action {} failed: {}",
                    a.index,
                    a.error
                        .as_deref()
                        .map(one_line)
                        .unwrap_or_else(|| match a.exit_code {
                            Some(code) => format!("exit status {code}"),
                            None => "ended without an exit status".into(),
                        })
                );
            }
            match &r.answer {
                Some(_) if self.streamed.get() => outln!(),
                Some(answer) => outln!("{}", printable(answer)),
                None => {}
            }
            if let Some(e) = &r.error {
                eprintln!("{}", printable(e));
            }
            if let Some(u) = &r.usage {
                eprintln!(
                    "{}",
                    describe_usage(&one_line(r.model.as_deref().unwrap_or("model")), u)
                );
            }
            eprintln!("request {}: {}", self.id, r.state.as_str());
        }
        Ok(exit_for(&r))
    }
}

/// One line about a request's model calls.
fn describe_usage(model: &str, u: &crate::request::RequestUsage) -> String {
    format!(
        "{model}: {} call(s), {} tokens in ({} from cache), {} out, {}",
        u.calls,
        u.input_tokens + u.cache_read_tokens + u.cache_write_tokens,
        u.cache_read_tokens,
        u.output_tokens,
        match u.cost_micro_usd {
            Some(c) => format!("${:.4}", c as f64 / 1e6),
            None => "cost unknown (no price for this model)".into(),
        }
    )
}

/// `devos usage`: per day and model, tokens and cost.
async fn usage(
    agent: &Agent1Proxy<'_>,
    since: Option<&str>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let since = match since {
        None => String::new(),
        Some(s) => match s.strip_suffix('d').and_then(|n| n.parse::<u64>().ok()) {
            Some(days) => humantime::format_rfc3339_seconds(
                std::time::SystemTime::now() - std::time::Duration::from_secs(days * 86400),
            )
            .to_string()[..10]
                .to_owned(),
            None => s.to_owned(),
        },
    };
    let v: serde_json::Value =
        serde_json::from_str(&agent.usage(&since).await.map_err(agent_error)?)?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<crate::store::UsageRow> = serde_json::from_value(v["rows"].clone())?;
    outln!(
        "{:<10}  {:<12}  {:<46}  {:>5}  {:>10}  {:>10}  {:>10}",
        "day",
        "user",
        "model",
        "calls",
        "in",
        "out",
        "cost"
    );
    for r in &rows {
        outln!(
            "{:<10}  {:<12}  {:<46}  {:>5}  {:>10}  {:>10}  {:>10}",
            one_line(&r.day),
            one_line(&r.user),
            one_line(&r.model),
            r.calls,
            r.input_tokens + r.cache_read_tokens + r.cache_write_tokens,
            r.output_tokens,
            if r.unpriced_calls == r.calls {
                "unknown".to_owned()
            } else {
                format!(
                    "{}${:.4}{}",
                    if r.estimated_calls > 0 { "~" } else { "" },
                    r.cost_usd,
                    if r.unpriced_calls > 0 { "+" } else { "" }
                )
            }
        );
    }
    let f = |k: &str| v["spent"][k].as_f64().unwrap_or(0.0);
    let b = |k: &str| v["budgets"][k].as_f64().unwrap_or(0.0);
    let limit = |x: f64| {
        if x > 0.0 {
            format!("${x:.2}")
        } else {
            "no limit".into()
        }
    };
    outln!(
        "since {}: ${:.4}{}{}\nyou: ${:.4} today (budget {}), ${:.4} this month (budget {}); machine: ${:.4} this month (budget {})",
        one_line(v["since"].as_str().unwrap_or("?")),
        v["total-cost-usd"].as_f64().unwrap_or(0.0),
        match v["unpriced-calls"].as_u64().unwrap_or(0) {
            0 => String::new(),
            n => format!(" and {n} call(s) of unknown cost"),
        },
        match v["estimated-calls"].as_u64().unwrap_or(0) {
            0 => String::new(),
            n => format!(
                " ({n} call(s) that ended without Bedrock's count at an estimate, marked ~)"
            ),
        },
        f("user-today-usd"),
        limit(b("user-daily-usd")),
        f("user-month-usd"),
        limit(b("user-monthly-usd")),
        f("machine-month-usd"),
        limit(b("machine-monthly-usd")),
    );
    Ok(ExitCode::SUCCESS)
}

/// Ask `question` (from [`approval_question`]) on the terminal; returns whether to
/// approve and for how long.
async fn ask_approval(question: String) -> anyhow::Result<(bool, &'static str)> {
    let answer = tokio::task::spawn_blocking(move || {
        eprint!("approve {question}? [y]es once, [s]ession, [a]lways, [N]o: ");
        let mut line = String::new();
        // (A failed read is an empty answer, which is No.)
        std::io::stdin().lock().read_line(&mut line).ok();
        line.trim().to_lowercase()
    })
    .await?;
    Ok(match answer.as_str() {
        "y" | "yes" => (true, "once"),
        "s" | "session" => (true, "session"),
        "a" | "always" => (true, "always"),
        _ => (false, "once"),
    })
}

async fn decide(
    agent: &Agent1Proxy<'_>,
    args: DecideArgs,
    approve: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let r: Request = serde_json::from_str(&agent.get(&args.id).await.map_err(agent_error)?)?;
    let index = match args.action {
        Some(i) => i,
        None => r
            .actions
            .iter()
            .find(|a| a.decision == Decision::Ask)
            .map(|a| a.index)
            .with_context(|| format!("request {} has no action waiting for a decision", args.id))?,
    };
    // What was decided is said, so a decision by id alone is never blind.
    let what = r
        .actions
        .iter()
        .find(|a| a.index == index)
        .map(|a| format!(": {} ({})", one_line(&a.description), a.risk.class))
        .unwrap_or_default();
    let prefix: Vec<&str> = args.command_prefix.iter().map(String::as_str).collect();
    let path = absolute_prefix(args.path_prefix)?;
    let res = if approve {
        agent
            .approve(&args.id, index, &args.remember, &prefix, &path)
            .await
    } else {
        agent
            .deny(&args.id, index, &args.remember, &prefix, &path)
            .await
    };
    res.map_err(agent_error)?;
    let decided = if approve { "approved" } else { "denied" };
    if json {
        outln!(
            "{}",
            serde_json::json!({ "id": args.id, "action": index, "decision": decided })
        );
    } else {
        eprintln!("{decided} action {index} of {}{what}", args.id);
    }
    Ok(ExitCode::SUCCESS)
}

/// A `--path-prefix` as the agent takes it: absolute, a relative one taken from the
/// current directory (as `--cwd` and `context add` take theirs), as written otherwise
/// (links are the agent's to compare). Empty when none was given.
fn absolute_prefix(given: Option<PathBuf>) -> anyhow::Result<String> {
    Ok(match given {
        Some(p) => absolute(Some(p))?.to_string_lossy().into_owned(),
        None => String::new(),
    })
}

async fn rules(
    agent: &Agent1Proxy<'_>,
    command: RulesCommand,
    json: bool,
) -> anyhow::Result<ExitCode> {
    match command {
        RulesCommand::List => {
            let list: Vec<Rule> = serde_json::from_str(&agent.rules().await.map_err(agent_error)?)?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for r in &list {
                    outln!("{}", rule_line(r));
                }
            }
        }
        RulesCommand::Add {
            decision,
            lifetime,
            command_prefix,
            path_prefix,
        } => {
            let prefix: Vec<&str> = command_prefix.iter().map(String::as_str).collect();
            let path = absolute_prefix(path_prefix)?;
            let id = agent
                .add_rule(&decision, &lifetime, &prefix, &path)
                .await
                .map_err(agent_error)?;
            if json {
                outln!("{}", serde_json::json!({ "id": id }));
            } else {
                outln!("rule {id} added");
            }
        }
        RulesCommand::Remove { id } => {
            agent.remove_rule(id).await.map_err(agent_error)?;
            if json {
                outln!("{}", serde_json::json!({ "id": id, "removed": true }));
            } else {
                eprintln!("rule {id} removed");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `dir` (default: the current directory) made absolute from the current directory,
/// `.` components dropped; links and `..` are left for the agent to resolve.
fn absolute(dir: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    std::path::absolute(dir.unwrap_or_else(|| PathBuf::from("."))).context("the current directory")
}

/// `devos context ...`.
async fn context(
    conn: &zbus::Connection,
    command: ContextCommand,
    json: bool,
) -> anyhow::Result<ExitCode> {
    use serde_json::Value;
    let ctx = crate::client::ContextProxy::new(conn).await?;
    // (Names, paths, snippets and reasons: each printed on one line of a listing.)
    let p = one_line;
    let reply: Value = match command {
        ContextCommand::Add { dir, text } => {
            // As the agent will register it (links resolved), so that a project already
            // added is known by the name given; one that cannot be resolved is said so
            // by the agent.
            let dir = absolute(dir)?;
            let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
            let root = ctx
                .add_project(&dir.to_string_lossy(), text)
                .await
                .map_err(agent_error)?;
            if json {
                outln!("{}", serde_json::json!({ "root": root }));
            } else {
                outln!(
                    "indexing {}; `devos context status` shows progress",
                    p(&root)
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        ContextCommand::Remove { dir } => {
            // (Projects are kept by their real path; a removed directory has none.)
            let dir = absolute(Some(dir))?;
            let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
            ctx.remove_project(&dir.to_string_lossy())
                .await
                .map_err(agent_error)?;
            if json {
                outln!("{}", serde_json::json!({ "removed": dir }));
            } else {
                outln!("no longer indexing {}", p(&dir.to_string_lossy()));
            }
            return Ok(ExitCode::SUCCESS);
        }
        ContextCommand::List => serde_json::from_str(&ctx.projects().await.map_err(agent_error)?)?,
        ContextCommand::Find { words, limit, text } => {
            let query = words.join(" ");
            let reply = if text {
                ctx.find_text(&query, limit).await
            } else {
                ctx.find(&query, limit).await
            };
            serde_json::from_str(&reply.map_err(agent_error)?)?
        }
        ContextCommand::Recent { since, limit } => {
            serde_json::from_str(&ctx.recent(&since, limit).await.map_err(agent_error)?)?
        }
        ContextCommand::Git { dir } => {
            let dir = match dir {
                Some(d) => absolute(Some(d))?.to_string_lossy().into_owned(),
                None => String::new(),
            };
            serde_json::from_str(&ctx.git_state(&dir).await.map_err(agent_error)?)?
        }
        ContextCommand::Ps => serde_json::from_str(&ctx.processes().await.map_err(agent_error)?)?,
        ContextCommand::Status => serde_json::from_str(&ctx.status().await.map_err(agent_error)?)?,
    };
    if json {
        outln!("{}", serde_json::to_string_pretty(&reply)?);
        return Ok(ExitCode::SUCCESS);
    }
    let s = |v: &Value| p(v.as_str().unwrap_or(""));
    let list = |v: &Value| v.as_array().cloned().unwrap_or_default();
    if let Some(results) = reply.get("results") {
        for h in list(results) {
            let ignored = if h["ignored"] == true {
                "  (ignored)"
            } else {
                ""
            };
            match h["snippet"].as_str() {
                Some(snippet) => outln!("{}: {}", s(&h["path"]), p(snippet)),
                None => outln!("{}  {}{ignored}", s(&h["path"]), stamp(&h["mtime"])),
            }
        }
    } else if let Some(procs) = reply.get("processes") {
        // The project column as wide as its longest entry (a process in none: `-`).
        let procs = list(procs);
        let project = |pr: &Value| match s(&pr["project"]) {
            none if none.is_empty() => "-".to_owned(),
            root => root,
        };
        let width = procs
            .iter()
            .map(|pr| project(pr).chars().count())
            .chain(["PROJECT".len()])
            .max()
            .unwrap_or_default();
        outln!(
            "{:>7} {:>6} {:>8}  {:<width$}  COMMAND",
            "PID",
            "CPU%",
            "RSS MiB",
            "PROJECT"
        );
        for pr in &procs {
            outln!(
                "{:>7} {:>6.1} {:>8}  {:<width$}  {}",
                pr["pid"].as_u64().unwrap_or_default(),
                pr["cpu-percent"].as_f64().unwrap_or(0.0),
                pr["rss-kib"].as_u64().unwrap_or(0) / 1024,
                project(pr),
                s(&pr["command"])
            );
        }
    } else if let Some(repos) = reply.get("repositories") {
        for r in list(repos) {
            print_git(&r)?;
        }
    } else if reply.get("work-tree").is_some() {
        print_git(&reply)?;
    } else if let Some(projects) = reply.get("projects").or(reply.is_array().then_some(&reply)) {
        for pr in list(projects) {
            let how = match pr["mode"].as_str().unwrap_or("") {
                "watching" => format!("watching ({} watches)", pr["watches"]),
                "rescanning" => format!(
                    "RESCANNING every {}s: {}",
                    pr["every-secs"],
                    s(&pr["reason"])
                ),
                "failed" => format!("FAILED: {}", s(&pr["reason"])),
                other => other.to_owned(),
            };
            let branch = pr["git-branch"]
                .as_str()
                .map(|b| format!(" [{}]", p(b)))
                .unwrap_or_default();
            outln!(
                "{}{branch}: {} entries; {how}",
                s(&pr["root"]),
                pr["entries"]
            );
        }
        if let Some(watcher) = reply.get("watcher") {
            outln!(
                "index: {} entries of at most {}, {} KiB of at most {} MiB; watcher {}",
                reply["entries"],
                reply["max-files"],
                reply["index-bytes"].as_u64().unwrap_or(0) / 1024,
                reply["max-index-mib"],
                s(watcher)
            );
            if let Some(full) = reply["full"].as_str() {
                outln!("FULL: {}", p(full));
            }
            if let Some(rebuilt) = reply["rebuilt"].as_object() {
                outln!(
                    "rebuilt: the index was corrupt ({}) and was moved to {}",
                    s(&rebuilt["error"]),
                    s(&rebuilt["moved-to"])
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn stamp(secs: &serde_json::Value) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.as_u64().unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

fn print_git(r: &serde_json::Value) -> anyhow::Result<()> {
    // (Branches, paths, subjects and authors: each on one line of a listing.)
    let p = one_line;
    let s = |v: &serde_json::Value| p(v.as_str().unwrap_or(""));
    outln!(
        "{}: {}{}",
        s(&r["work-tree"]),
        r["branch"].as_str().map_or("(detached)".to_owned(), p),
        r["upstream"]
            .as_str()
            .map(|u| format!(" → {} (ahead {}, behind {})", p(u), r["ahead"], r["behind"]))
            .unwrap_or_default()
    );
    if let Some(e) = r["error"].as_str() {
        outln!("  error: {}", p(e));
    }
    for (what, key) in [
        ("staged", "staged"),
        ("unstaged", "unstaged"),
        ("untracked", "untracked"),
        ("conflicted", "conflicted"),
    ] {
        let n = r["counts"][key].as_u64().unwrap_or(0);
        if n > 0 {
            let names: Vec<String> = r[key]
                .as_array()
                .into_iter()
                .flatten()
                .take(10)
                .map(s)
                .collect();
            let more = if n > names.len() as u64 { ", ..." } else { "" };
            outln!("  {n} {what}: {}{more}", names.join(", "));
        }
    }
    if r["stashes"].as_u64().unwrap_or(0) > 0 {
        outln!("  {} stashes", r["stashes"]);
    }
    for c in r["commits"].as_array().into_iter().flatten() {
        outln!(
            "  {} {} ({})",
            p(c["id"].as_str().unwrap_or("").get(..10).unwrap_or("")),
            s(&c["subject"]),
            s(&c["author"])
        );
    }
    Ok(())
}

/// The groups Debian's and other distributions' sudoers let run anything as root.
const SUDO_GROUPS: &[&str] = &["sudo", "wheel", "admin"];

/// The names of the groups the user running this is in, as the group database has
/// them now (as sudo reads them; not only those of this login).
fn my_groups() -> Vec<String> {
    use nix::unistd::{Group, User, getgrouplist, getuid};
    let Ok(Some(user)) = User::from_uid(getuid()) else {
        return Vec::new();
    };
    let Ok(name) = std::ffi::CString::new(user.name) else {
        return Vec::new();
    };
    getgrouplist(&name, user.gid)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|gid| Group::from_gid(gid).ok().flatten())
        .map(|g| g.name)
        .collect()
}

/// Whether one of `groups` is one sudo lets in by default.
fn in_sudo_group(groups: &[String]) -> bool {
    groups.iter().any(|g| SUDO_GROUPS.contains(&g.as_str()))
}

/// What to tell a user about running `command` as root: with sudo when they are in a
/// group sudo lets in by default; else that sudo may not let them (it may: its rules
/// can name anyone), and whom to ask.
fn as_root(command: &str, groups: &[String]) -> String {
    match in_sudo_group(groups) {
        true => format!("run `sudo {command}`"),
        false => format!(
            "ask an administrator to run `{command}` as root (or `sudo {command}` if sudo lets you: you are in none of the groups it lets in by default, {})",
            SUDO_GROUPS.join(", ")
        ),
    }
}

/// `command` as root, as a user who may (`sudo COMMAND`) or may not (root's `COMMAND`).
fn root_runs(command: &str, groups: &[String]) -> String {
    match in_sudo_group(groups) {
        true => format!("`sudo {command}`"),
        false => format!("root's `{command}`"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn update_reboot_says_it_reboots_instead_of_asking_for_a_reboot() {
        let installed = "2.0.0+b is installed in the other slot and boots next (three tries; if it does not come up healthy the machine goes back to this version by itself): reboot to start it";
        assert_eq!(super::update_message(installed, false), installed);
        assert_eq!(
            super::update_message(installed, true),
            "2.0.0+b is installed in the other slot and boots next (three tries; if it does not come up healthy the machine goes back to this version by itself): rebooting now"
        );
        let newest = "this machine runs the newest version";
        assert_eq!(super::update_message(newest, true), newest);
    }

    #[test]
    fn root_is_suggested_through_sudo_only_to_those_sudo_lets_in() {
        let sudoer = ["dev".to_owned(), "sudo".to_owned()];
        let user = ["dev".to_owned()];
        assert_eq!(
            super::as_root("devos update", &sudoer),
            "run `sudo devos update`"
        );
        assert_eq!(
            super::as_root("devos update --rollback", &user),
            "ask an administrator to run `devos update --rollback` as root (or `sudo devos update --rollback` if sudo lets you: you are in none of the groups it lets in by default, sudo, wheel, admin)"
        );
        assert_eq!(
            super::root_runs("devos audit verify", &sudoer),
            "`sudo devos audit verify`"
        );
        assert_eq!(
            super::root_runs("devos audit verify", &user),
            "root's `devos audit verify`"
        );
    }

    use super::*;

    /// What a path or argv word proposed by the model may carry: clear the screen, a
    /// CSI in its one-byte (C1) form, DEL, a newline and a reordering mark, laying out
    /// a fake prompt.
    const HOSTILE: &str = "/home/a/p\u{1b}[2J\u{1b}[H\u{9b}1A\u{7f}\napprove [0] ls (read-only; sandbox: none)\u{202e}";

    fn assert_one_safe_line(shown: &str) {
        assert!(
            !shown.chars().any(|c| c.is_control()),
            "a control character is printed: {shown:?}"
        );
        assert!(!shown.contains('\u{202e}'), "{shown:?}");
    }

    #[test]
    fn the_approval_prompt_shows_every_piece_on_one_safe_line() {
        let question = approval_question(0, HOSTILE, true, HOSTILE, HOSTILE);
        assert_one_safe_line(&question);
        assert!(question.ends_with(")"), "{question:?}");
        assert!(question.contains("[proposed by the model]"), "{question:?}");
    }

    #[test]
    fn a_rules_listing_shows_each_rule_on_one_safe_line() {
        let rule = Rule {
            exact: Some(crate::request::Exact {
                action: crate::action::Action::Run {
                    argv: vec!["ls".into(), HOSTILE.into()],
                },
                cwd: PathBuf::from(HOSTILE),
            }),
            ..Rule::new(
                1000,
                true,
                crate::request::Remember::Always,
                vec!["ls".into(), HOSTILE.into()],
                Some(PathBuf::from(HOSTILE)),
                "now".into(),
            )
        };
        assert_one_safe_line(&rule_line(&rule));
    }
}
