//! The `org.devos.Agent1` and `org.devos.Agent1.Admin` interfaces: requests in,
//! plans, decisions and results out. Callers are identified by the uid the bus daemon
//! reports for their connection, never by a pid or an argument.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use zbus::fdo;
use zbus::message::Header;
use zbus::object_server::SignalEmitter;

use super::rules::{self, Verdict};
use super::runner::run_request;
use super::shared::{
    Live, MAX_PATH, MAX_REPLY, MAX_WORD, Shared, Verify, bounded, caller, failed, fits, lock, now,
    to_json, to_value, too_large,
};
use crate::action::Action;
use crate::approval::{self, Subject};
use crate::caller::{self as as_caller, Caller, PlanJob};
use crate::config::AgentConfig;
use crate::config::UserPolicy;
use crate::model::tools::ContextQuery;
use crate::request::{ActionRecord, ActionState, Decision, Origin, Request, State};
use crate::sandbox::Profile;

/// The object served at [`crate::OBJECT_PATH`], interface `org.devos.Agent1`.
pub struct Agent {
    pub(super) shared: Arc<Shared>,
}

/// A request's text must say something, and not too much.
fn check_text(text: &str) -> fdo::Result<()> {
    if text.trim().is_empty() {
        return Err(fdo::Error::InvalidArgs(
            "the request is empty: say what you want done, e.g. `devos run \"find rust files\"`"
                .into(),
        ));
    }
    if text.len() > 16 * 1024 {
        return Err(fdo::Error::InvalidArgs(format!(
            "the request text is {} bytes: at most 16384; put long input in a file and name it",
            text.len()
        )));
    }
    Ok(())
}

impl Agent {
    async fn submit_as(
        &self,
        caller: Caller,
        header: &Header<'_>,
        text: &str,
        cwd: &str,
        route: Route<'_>,
    ) -> fdo::Result<String> {
        let owner = header.sender().map(|s| s.to_owned());
        let cwd = PathBuf::from(cwd);
        check_text(text)?;
        if !cwd.is_absolute() {
            return Err(fdo::Error::InvalidArgs(format!(
                "the working directory {} must be absolute",
                cwd.display()
            )));
        }
        self.shared.may_record(caller.uid)?;
        let mut slot = self.shared.reserve(caller.uid)?;
        let config = self.shared.config();
        let (request, user_policy) =
            plan_request(&self.shared, &caller, text, cwd, &config, route).await?;
        // A conversation it starts is its own while it runs: a `Continue` of it waits,
        // as for every later request of the conversation. (New: never held yet.)
        if let Some(conversation) = &request.conversation {
            slot.hold_conversation(conversation);
        }
        self.admit(request, user_policy, caller, owner, slot)
    }

    /// Put a new request on record and start it (if there is anything to run).
    /// `user_policy` is the caller's policy file as its actions were decided with
    /// (they are decided again with it before each one starts).
    pub(super) fn admit(
        &self,
        mut request: Request,
        user_policy: UserPolicy,
        caller: Caller,
        owner: Option<zbus::names::UniqueName<'static>>,
        slot: super::shared::Slot,
    ) -> fdo::Result<String> {
        let config = self.shared.config();
        let submitted = self.shared.audit(
            "request.submitted",
            Some(caller.uid),
            Some(&request.id),
            None,
            serde_json::json!({
                "text": request.text,
                "cwd": request.cwd,
                "summary": request.summary,
                "planner": request.planner,
                "model": request.model,
                "conversation": request.conversation,
                "state": request.state,
                "error": request.error,
            }),
        );
        let decided =
            submitted.and_then(|()| audit_decided(&self.shared, &request, &request.actions));
        if let Err(e) = decided {
            // Nothing runs that is not on record.
            request.state = State::Failed;
            request.error = Some(format!("{e}; nothing ran"));
            for a in &mut request.actions {
                a.state = ActionState::Skipped;
            }
        }
        self.shared.save(&request)?;
        if let Err(e) = lock(&self.shared.store).prune(caller.uid, config.limits.history_per_user) {
            tracing::warn!(uid = caller.uid, "cannot drop old requests: {e}");
        }
        if request.state == State::Planned {
            let (tx, rx) = mpsc::unbounded_channel();
            let live = Live {
                control: tx,
                owner,
                uid: caller.uid,
                cancel_recorded: false,
            };
            lock(&self.shared.live).insert(request.id.clone(), live);
            tokio::spawn(run_request(
                self.shared.clone(),
                request.id.clone(),
                caller,
                user_policy,
                rx,
                slot,
            ));
        }
        Ok(request.id)
    }

    /// A request of this caller (or any, for root when `root_sees_all`), or the same
    /// "not found" either way so ids of others are not confirmed. Read as a query
    /// (a request is up to megabytes of output to parse).
    pub(super) async fn own_request(
        &self,
        id: &str,
        caller: &Caller,
        root_sees_all: bool,
    ) -> fdo::Result<Request> {
        self.owned(id, caller, root_sees_all, true).await
    }

    /// [`Self::own_request`] for `Cancel`: read away from the bus's threads too, but
    /// not counted against the caller's queries, so that stopping a request always
    /// works.
    async fn own_request_to_cancel(&self, id: &str, caller: &Caller) -> fdo::Result<Request> {
        self.owned(id, caller, true, false).await
    }

    async fn owned(
        &self,
        id: &str,
        caller: &Caller,
        root_sees_all: bool,
        counted: bool,
    ) -> fdo::Result<Request> {
        if id.trim().is_empty() {
            return Err(fdo::Error::InvalidArgs(
                "give a request id; `devos history` lists them".into(),
            ));
        }
        let wanted = id.to_owned();
        let load = move |s: &Shared| s.load(&wanted);
        let found = if counted {
            query(&self.shared, caller.uid, load).await?
        } else {
            let shared = self.shared.clone();
            tokio::task::spawn_blocking(move || load(&shared))
                .await
                .map_err(failed)??
        };
        match found {
            Some(r) if r.uid == caller.uid || (root_sees_all && caller.uid == 0) => Ok(r),
            _ => Err(fdo::Error::InvalidArgs(format!(
                "no request {id} of yours; `devos history` lists them"
            ))),
        }
    }
}

/// `work` on the store away from the bus's threads (however long it holds the store,
/// the bus goes on answering), counted against the caller's queries: a user cannot
/// keep more than a few in flight (root's are not counted).
pub(super) async fn query<T: Send + 'static>(
    shared: &Arc<Shared>,
    uid: u32,
    work: impl FnOnce(&Shared) -> fdo::Result<T> + Send + 'static,
) -> fdo::Result<T> {
    let _query = shared.querying.enter(uid)?;
    let shared = shared.clone();
    tokio::task::spawn_blocking(move || work(&shared))
        .await
        .map_err(failed)?
}

/// Requests for `List`/`History` in their short form (`devos show ID` has them
/// whole), never more than a reply carries.
async fn listing(
    shared: &Arc<Shared>,
    uid: Option<u32>,
    active_only: bool,
    limit: u32,
) -> fdo::Result<String> {
    query(shared, uid.unwrap_or(0), move |s| {
        lock(&s.store)
            .listing(uid, active_only, limit, MAX_REPLY)
            .map_err(failed)?
            .map_err(|_| too_large(MAX_REPLY + 1, "ask for fewer (`devos history -n`)"))
    })
    .await
}

/// Whether packages can be installed here at all: not on a read-only root.
fn packages_refused() -> Option<String> {
    let ro = nix::sys::statvfs::statvfs("/usr")
        .is_ok_and(|s| s.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY));
    ro.then(|| {
        "the root file system is read-only: packages belong in the image spec ([packages] include), built into a new version".to_owned()
    })
}

/// How a request is to be planned.
pub(super) enum Route<'a> {
    /// The local rules first; the model for what they cannot plan.
    Auto,
    /// Straight to this model (`devos run --model`): `small`, `large` or a model id.
    Model(&'a str),
}

/// Plan, classify and decide a request as `caller`: with the local rules, or (for
/// what they cannot plan, or when a model was asked for) as the start of a
/// conversation with the model, which the request's task carries on. Also the
/// caller's policy file the actions were decided with (the default when there was
/// none to read, or it was invalid: then nothing runs).
async fn plan_request(
    shared: &Arc<Shared>,
    caller: &Caller,
    text: &str,
    cwd: PathBuf,
    config: &AgentConfig,
    route: Route<'_>,
) -> fdo::Result<(Request, UserPolicy)> {
    let started = Instant::now();
    let mut job = PlanJob::new(caller, Some(text.to_owned()), cwd, &config.sandbox.secrets);
    if let Route::Model(_) = route {
        // Only the context: the local rules are skipped.
        job.text = None;
        job.context = Some(ContextQuery::Project);
    }
    let reply = as_caller::plan(&shared.exe, &job).await.map_err(failed)?;
    let cwd = reply.cwd.clone().map_err(fdo::Error::AccessDenied)?;
    if let Some(root) = &reply.repo_root {
        super::context::auto_add(shared, caller, root, config);
    }
    let mut request = Request::new(
        shared.new_id(),
        caller.uid,
        caller.user.clone(),
        text.to_owned(),
        cwd.clone(),
        now(),
    );
    let explicit = match route {
        Route::Model(m) => Some(m),
        Route::Auto => None,
    };
    let mut decided_with = UserPolicy::default();
    match (reply.plan, reply.user_policy) {
        (_, Err(e)) => {
            request.state = State::Unplanned;
            request.error = Some(format!(
                "your policy file is invalid, so nothing was planned: {e}"
            ));
        }
        (Err(e), Ok(_)) if !reply.needs_model && explicit.is_none() => {
            request.state = State::Unplanned;
            request.error = Some(e);
        }
        (Err(e), Ok(_)) => {
            let context = reply.context.unwrap_or_default();
            let local = (explicit.is_none()).then_some(e);
            super::converse::start(shared, &mut request, config, explicit, local, &context)?;
        }
        (Ok(plan), Ok(_)) if plan.question.is_some() => {
            request.summary = plan.summary;
            request.planner = plan.planner;
            let question = plan.question.unwrap_or(crate::context::Question::Git);
            match super::context::answer(shared, caller, &question).await {
                Ok(answer) => {
                    request.answer = Some(answer);
                    request.state = State::Done;
                }
                Err(e) => {
                    request.state = State::Failed;
                    request.error = Some(e.to_string());
                }
            }
        }
        (Ok(plan), Ok(user_policy)) => {
            request.summary = plan.summary;
            request.planner = plan.planner;
            let decider = Decider::new(shared, caller, &user_policy, config)?;
            for (action, risk) in plan.actions.into_iter().zip(reply.risks) {
                let i = request.actions.len() as u32;
                request
                    .actions
                    .push(decider.record(i, action, risk, &cwd, Origin::LocalRules));
            }
            decided_with = user_policy;
        }
    }
    request.plan_micros = started.elapsed().as_micros() as u64;
    Ok((request, decided_with))
}

/// Decides actions for one caller: policy, their remembered rules, and what this
/// machine refuses.
pub(super) struct Decider<'a> {
    caller: &'a Caller,
    user_policy: &'a UserPolicy,
    config: &'a AgentConfig,
    rules: Vec<crate::request::Rule>,
}

impl<'a> Decider<'a> {
    pub(super) fn new(
        shared: &Shared,
        caller: &'a Caller,
        user_policy: &'a UserPolicy,
        config: &'a AgentConfig,
    ) -> Result<Self, super::shared::ServiceError> {
        let rules = lock(&shared.store).rules(Some(caller.uid))?;
        Ok(Decider {
            caller,
            user_policy,
            config,
            rules,
        })
    }

    /// How `action` (run in `cwd`) is decided: denied, approved without asking, or
    /// asked.
    pub(super) fn decide(
        &self,
        action: &Action,
        risk: &crate::risk::Risk,
        cwd: &std::path::Path,
    ) -> Decision {
        let caller = self.caller;
        let subject = Subject {
            uid: caller.uid,
            home: &caller.home,
            is_admin: caller.is_admin,
            user_policy: self.user_policy,
        };
        let decision = approval::decide(
            action,
            risk,
            cwd,
            &self.config.policy,
            &subject,
            &self.rules,
        );
        if matches!(action, Action::PackageInstall { .. })
            && let Some(why) = packages_refused()
        {
            return Decision::Denied {
                by: "policy".into(),
                reason: why,
            };
        }
        // The sandbox would refuse it once approved: it is not asked about.
        let as_root = caller.runs_as_root(action);
        let profile = Profile::of(risk, cwd, as_root);
        if !profile.root
            && !matches!(decision, Decision::Denied { .. })
            && let Some(why) = std::iter::once(cwd)
                .chain(profile.writable.iter().map(PathBuf::as_path))
                .find_map(crate::sandbox::outer::shared_place)
        {
            return Decision::Denied {
                by: "the sandbox".into(),
                reason: why,
            };
        }
        decision
    }

    /// The record of action `index`, decided (or waiting to be asked).
    pub(super) fn record(
        &self,
        index: u32,
        action: Action,
        risk: crate::risk::Risk,
        cwd: &std::path::Path,
        origin: Origin,
    ) -> ActionRecord {
        let caller = self.caller;
        let decision = self.decide(&action, &risk, cwd);
        let as_root = caller.runs_as_root(&action);
        ActionRecord {
            index,
            description: action.describe(),
            profile: Profile::of(&risk, cwd, as_root).describe(),
            action,
            risk,
            decision,
            state: ActionState::Pending,
            exit_code: None,
            output: String::new(),
            output_truncated: false,
            error: None,
            sandbox: None,
            origin,
        }
    }
}

/// Put the decisions already made on record (an action not on record does not run).
pub(super) fn audit_decided(
    shared: &Shared,
    r: &Request,
    actions: &[ActionRecord],
) -> Result<(), super::shared::ServiceError> {
    actions
        .iter()
        .filter(|a| a.decision != Decision::Ask)
        .try_for_each(|a| {
            shared.audit(
                "action.decided",
                Some(r.uid),
                Some(&r.id),
                Some(a.index),
                a.audit_detail(serde_json::json!({
                    "origin": a.origin,
                    "risk": a.risk.class,
                    "reasons": a.risk.reasons,
                    "profile": a.profile,
                    "decision": a.decision,
                })),
            )
        })
}

#[zbus::interface(name = "org.devos.Agent1")]
impl Agent {
    /// Liveness check: always answers `pong`.
    async fn ping(&self) -> String {
        "pong".to_owned()
    }

    /// The image version (`IMAGE_VERSION` in os-release) this agent runs in.
    async fn version(&self) -> fdo::Result<String> {
        crate::os_release::image_version(&self.shared.config().os_release).map_err(failed)
    }

    /// Submit a request in natural language, to be carried out in `cwd` (absolute).
    /// Returns the request id; planning and classification are done when it returns
    /// (for a request that goes to the model, the conversation goes on in the
    /// request's task).
    async fn submit(
        &self,
        text: &str,
        cwd: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> fdo::Result<String> {
        bounded("the working directory", cwd, MAX_PATH)?;
        let caller = caller(&self.shared, &header, conn).await?;
        self.submit_as(caller, &header, text, cwd, Route::Auto)
            .await
    }

    /// `Submit`, straight to the model: `model` is `small`, `large` or a model id
    /// (empty: the router chooses).
    async fn submit_to_model(
        &self,
        text: &str,
        cwd: &str,
        model: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> fdo::Result<String> {
        bounded("the working directory", cwd, MAX_PATH)?;
        bounded("the model", model, MAX_WORD)?;
        let chosen = model.trim();
        if !(chosen.is_empty() || crate::config::is_model_id(chosen)) {
            return Err(fdo::Error::InvalidArgs(format!(
                "`{chosen}` is not a model: say small, large or a Bedrock model id (letters, digits and . _ : / -)"
            )));
        }
        let caller = caller(&self.shared, &header, conn).await?;
        self.submit_as(caller, &header, text, cwd, Route::Model(model))
            .await
    }

    /// A follow-up in the conversation of request `id` (the caller's own), with the
    /// conversation's history. Returns the new request's id.
    #[zbus(name = "Continue")]
    async fn continue_conversation(
        &self,
        id: &str,
        text: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> fdo::Result<String> {
        bounded("the request id", id, MAX_WORD)?;
        let caller = caller(&self.shared, &header, conn).await?;
        check_text(text)?;
        let previous = self.own_request(id, &caller, false).await?;
        self.shared.may_record(caller.uid)?;
        let mut slot = self.shared.reserve(caller.uid)?;
        let config = self.shared.config();
        let request =
            super::converse::follow_up(&self.shared, &caller, &previous, text, &config, &mut slot)?;
        // (The model's actions are each decided with the policy file read when they
        // are proposed.)
        let user_policy = UserPolicy::default();
        let owner = header.sender().map(|s| s.to_owned());
        self.admit(request, user_policy, caller, owner, slot)
    }

    /// Model usage since `since` (`YYYY-MM-DD`; empty: the last 30 days) per day,
    /// user and model, with tokens and cost, and the budgets (JSON). Root sees
    /// everyone's.
    async fn usage(
        &self,
        since: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> fdo::Result<String> {
        bounded("since", since, MAX_WORD)?;
        let caller = caller(&self.shared, &header, conn).await?;
        let since = since.to_owned();
        query(&self.shared, caller.uid, move |s| {
            fits(
                super::budget::usage(s, &caller, &since)?,
                "ask for a later day (`devos usage --since`)",
            )
        })
        .await
    }

    /// One request (JSON): plan, actions with risk and decision, results.
    async fn get(
        &self,
        id: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> fdo::Result<String> {
        bounded("the request id", id, MAX_WORD)?;
        let caller = caller(&self.shared, &header, conn).await?;
        fits(
            to_json(&self.own_request(id, &caller, true).await?),
            "its actions' output is in `devos history` in short",
        )
    }

    /// Requests still in flight (JSON array): the caller's own; root sees everyone's.
    async fn list(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> fdo::Result<String> {
        let caller = caller(&self.shared, &header, conn).await?;
        let uid = (caller.uid != 0).then_some(caller.uid);
        listing(&self.shared, uid, true, 1000).await
    }

    /// The newest `limit` requests, finished or not (JSON array).
    async fn history(
        &self,
        limit: u32,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> fdo::Result<String> {
        let caller = caller(&self.shared, &header, conn).await?;
        let uid = (caller.uid != 0).then_some(caller.uid);
        listing(&self.shared, uid, false, limit.clamp(1, 10_000)).await
    }

    /// Approve action `action` of request `id`. `remember`: once, session or always;
    /// a remembered approval is this exact action in this directory, unless
    /// `command_prefix` (argv words) or `path_prefix` widen it (never for unknown,
    /// destructive or privileged actions).
    // The D-Bus signature is the API; the header and connection are zbus's.
    #[allow(clippy::too_many_arguments)]
    async fn approve(
        &self,
        id: &str,
        action: u32,
        remember: &str,
        command_prefix: Vec<String>,
        path_prefix: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> fdo::Result<()> {
        let verdict = Verdict {
            id,
            index: action,
            approve: true,
            remember,
            command_prefix,
            path_prefix,
        };
        verdict.bounded()?;
        rules::decide_action(self, &caller(&self.shared, &header, conn).await?, verdict).await
    }

    /// Deny action `action` of request `id` (the request stops). `remember` as for
    /// `Approve` creates a deny rule.
    #[allow(clippy::too_many_arguments)]
    async fn deny(
        &self,
        id: &str,
        action: u32,
        remember: &str,
        command_prefix: Vec<String>,
        path_prefix: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> fdo::Result<()> {
        let verdict = Verdict {
            id,
            index: action,
            approve: false,
            remember,
            command_prefix,
            path_prefix,
        };
        verdict.bounded()?;
        rules::decide_action(self, &caller(&self.shared, &header, conn).await?, verdict).await
    }

    /// Cancel a request: nothing more runs, a running action is killed with every
    /// process it started.
    async fn cancel(
        &self,
        id: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> fdo::Result<()> {
        bounded("the request id", id, MAX_WORD)?;
        let caller = caller(&self.shared, &header, conn).await?;
        let r = self.own_request_to_cancel(id, &caller).await?;
        if r.state.is_final() {
            return Err(fdo::Error::Failed(format!(
                "request {id} is already {}",
                r.state.as_str()
            )));
        }
        // A cancel that is not on record still happens: stopping is always safe. One
        // is recorded per request (more would add to the log without end), and none
        // past the user's share of it.
        let recorded = lock(&self.shared.live)
            .get_mut(id)
            .is_some_and(|l| std::mem::replace(&mut l.cancel_recorded, true));
        if !recorded && self.shared.may_record(caller.uid).is_ok() {
            let _ = self.shared.audit(
                "request.cancel",
                Some(caller.uid),
                Some(id),
                None,
                serde_json::json!({ "by": caller.user }),
            );
        }
        if let Some(live) = lock(&self.shared.live).get(id) {
            // (Fails only when the request's task has ended: nothing left to stop.)
            let _ = live.control.send(super::shared::Control::Cancel);
        }
        Ok(())
    }

    /// Remembered rules (JSON array): the caller's; root sees everyone's.
    async fn rules(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> fdo::Result<String> {
        let caller = caller(&self.shared, &header, conn).await?;
        let uid = (caller.uid != 0).then_some(caller.uid);
        fits(
            to_json(&lock(&self.shared.store).rules(uid).map_err(failed)?),
            match uid {
                Some(_) => "remove rules first (`devos rules remove ID`)",
                // (Each user's are bounded; together they can still be too many.)
                None => {
                    "the audit log's `rule.added` entries name every rule with its id and user: remove some with `devos rules remove ID`"
                }
            },
        )
    }

    /// Add a remembered rule for the caller: `decision` allow|deny, `lifetime`
    /// session|always, scoped by command and/or path prefix. Returns its id. An allow
    /// rule has the bounds of one made by `Approve`: it never covers unknown,
    /// destructive or privileged actions, nor secret locations.
    async fn add_rule(
        &self,
        decision: &str,
        lifetime: &str,
        command_prefix: Vec<String>,
        path_prefix: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> fdo::Result<i64> {
        bounded("the decision", decision, MAX_WORD)?;
        bounded("the lifetime", lifetime, MAX_WORD)?;
        rules::prefixes_bounded(&command_prefix, path_prefix)?;
        let caller = caller(&self.shared, &header, conn).await?;
        rules::add_rule(
            self,
            &caller,
            decision,
            lifetime,
            command_prefix,
            path_prefix,
        )
        .await
    }

    /// Remove one of the caller's rules (root may remove anyone's).
    async fn remove_rule(
        &self,
        id: i64,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> fdo::Result<()> {
        let caller = caller(&self.shared, &header, conn).await?;
        let rule = match lock(&self.shared.store).rule(id).map_err(failed)? {
            Some(rule) if rule.uid == caller.uid || caller.uid == 0 => rule,
            _ => {
                return Err(fdo::Error::InvalidArgs(format!(
                    "no rule {id} of yours; `devos rules` lists them"
                )));
            }
        };
        self.shared.audit(
            "rule.removed",
            Some(caller.uid),
            None,
            None,
            to_value(&rule),
        )?;
        lock(&self.shared.store).remove_rule(id).map_err(failed)?;
        Ok(())
    }

    /// Verify the audit log's hash chain, checkpoints, head and anchors (JSON report;
    /// the first bad entry if any): the whole log for root, for others what came
    /// after the last verification that was ok.
    async fn verify_audit(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> fdo::Result<String> {
        // A whole read costs seconds on a large log, and verifications run one at a
        // time: root's alone, so that no user can keep the boot check waiting behind
        // theirs. Others get what came after the last verification.
        let uid = caller(&self.shared, &header, conn).await?.uid;
        let how = match uid {
            0 => Verify::Whole,
            _ => Verify::SinceLast,
        };
        Ok(to_json(&self.shared.verify_audit(how, Some(uid)).await?))
    }

    /// Verify what was appended to the audit log since the last verification that
    /// was ok (its last entry must be unchanged where it was), against the
    /// checkpoints and anchors written since: what the boot check and the health
    /// signal use, so that their time does not grow with the log. The whole log when
    /// there was no such verification.
    async fn verify_audit_since_last(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> fdo::Result<String> {
        let uid = super::shared::caller_uid(&header, conn).await?;
        let v = self
            .shared
            .verify_audit(Verify::SinceLast, Some(uid))
            .await?;
        Ok(to_json(&v))
    }

    /// The agent's status (JSON): version, uptime, requests in flight and stored (the
    /// caller's; root: everyone's), audit entries (root only), what confines actions,
    /// whether the machine booted with Secure Boot enforced, the update feed, what this
    /// boot started and what the next one starts.
    async fn status(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> fdo::Result<String> {
        let uid = super::shared::caller_uid(&header, conn).await?;
        let config = self.shared.config();
        let (active, entries) = match uid {
            0 => (
                lock(&self.shared.live).len(),
                Some(lock(&self.shared.audit).entries()),
            ),
            uid => {
                let live = lock(&self.shared.live);
                (live.values().filter(|l| l.uid == uid).count(), None)
            }
        };
        let uid = (uid != 0).then_some(uid);
        let requests = lock(&self.shared.store)
            .count_requests(uid)
            .map_err(failed)?;
        let mut status = serde_json::json!({
            "agent-version": env!("CARGO_PKG_VERSION"),
            // (null without one; `Version` says why.)
            "image-version": crate::os_release::image_version(&config.os_release).ok(),
            "uptime-secs": self.shared.started.elapsed().as_secs(),
            "requests-in-flight": active,
            "requests-total": requests,
            "auto-approve": config.policy.auto_approve,
            "sandbox-required": config.sandbox.required,
            "sandbox-bwrap": config.sandbox.bwrap,
            "sandbox-bwrap-installed": config.sandbox.bwrap.exists(),
            "cgroup-limits": self.shared.cgroups.is_some(),
            "model-route": config.model.enabled,
            "model-small": config.model.small,
            "model-large": config.model.large,
        });
        // Whether a request the local rules do not cover could go to the model now.
        if config.model.enabled {
            let (ready, detail) = match self.shared.model_ready(&config.model).await {
                Ok(region) => (true, format!("a region ({region}) and credentials")),
                Err(missing) => (false, missing),
            };
            status["model-ready"] = ready.into();
            status["model-ready-detail"] = detail.into();
        }
        // How this machine booted: whether its firmware enforces Secure Boot, in words;
        // updates: where from, what runs, what boots next (the boot loader's choice).
        // (Files and EFI variables: read on a blocking thread, never the bus's.)
        let (boot, updates) = tokio::task::spawn_blocking(move || {
            let (image, running) = crate::os_release::image_identity(&config.os_release);
            let updates = crate::update::status(
                &config.update,
                image.as_deref(),
                running.as_deref(),
                &crate::bootloader::LoaderState::read(),
                crate::update::feed(&crate::update::TRANSFER_DIRS.map(std::path::Path::new)),
            );
            // (What the firmware enforces does not change while the machine runs.)
            static SECURE_BOOT: std::sync::OnceLock<crate::selftest::CheckResult> =
                std::sync::OnceLock::new();
            (
                SECURE_BOOT
                    .get_or_init(crate::selftest::secure_boot)
                    .clone(),
                updates,
            )
        })
        .await
        .map_err(failed)?;
        status["secure-boot"] = boot.ok.into();
        status["secure-boot-detail"] = boot.detail.into();
        status.as_object_mut().expect("an object").extend(updates);
        if let Some(entries) = entries {
            status["audit-entries"] = entries.into();
        }
        Ok(status.to_string())
    }

    /// A request changed state (sent to the submitting connection only).
    #[zbus(signal)]
    pub async fn request_changed(
        emitter: &SignalEmitter<'_>,
        id: &str,
        state: &str,
    ) -> zbus::Result<()>;

    /// An action waits for `Approve` or `Deny`; `risk` is its class, `description`
    /// the exact command or file operation, `origin` who proposed it (`local-rules`
    /// or `model`).
    #[zbus(signal)]
    pub async fn approval_needed(
        emitter: &SignalEmitter<'_>,
        id: &str,
        action: u32,
        risk: &str,
        description: &str,
        origin: &str,
    ) -> zbus::Result<()>;

    /// The model's text, as it is produced.
    #[zbus(signal)]
    pub async fn model_output(
        emitter: &SignalEmitter<'_>,
        id: &str,
        text: &str,
    ) -> zbus::Result<()>;

    /// Output of a running action, as it is produced.
    #[zbus(signal)]
    pub async fn action_output(
        emitter: &SignalEmitter<'_>,
        id: &str,
        action: u32,
        data: &str,
    ) -> zbus::Result<()>;
}

/// `org.devos.Agent1.Admin`: methods only root may call (the bus policy enforces it;
/// the method checks again).
pub struct Admin {
    pub(super) shared: Arc<Shared>,
}

#[zbus::interface(name = "org.devos.Agent1.Admin")]
impl Admin {
    /// Re-read the configuration file; a broken file is refused and the old one kept.
    async fn reload_config(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> fdo::Result<()> {
        let caller = caller(&self.shared, &header, conn).await?;
        if caller.uid != 0 {
            return Err(fdo::Error::AccessDenied(
                "only root may reload the configuration".into(),
            ));
        }
        let new = AgentConfig::load(&self.shared.config_path).map_err(failed)?;
        new.policy.warn_of_movable_deny_places();
        self.shared.audit(
            "config.reloaded",
            Some(0),
            None,
            None,
            to_value(&new.policy),
        )?;
        self.shared.set_config(new);
        Ok(())
    }

    /// `check`: whether the image's update feed has a newer version; `install`: write
    /// it into the other root slot (it boots next, with three tries); `rollback`: boot
    /// the version installed before this one from now on. A JSON outcome; each install
    /// and rollback, done or failed, is in the audit log.
    async fn update(
        &self,
        action: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> fdo::Result<String> {
        bounded("the action", action, MAX_WORD)?;
        let caller = caller(&self.shared, &header, conn).await?;
        if caller.uid != 0 {
            return Err(fdo::Error::AccessDenied(
                "only root may update the machine".into(),
            ));
        }
        let Some(action) = crate::update::UpdateAction::parse(action) else {
            return Err(fdo::Error::InvalidArgs(format!(
                "unknown update action `{action}`: use check, install or rollback"
            )));
        };
        let event = match action {
            crate::update::UpdateAction::Check => None,
            crate::update::UpdateAction::Install => Some("update.install"),
            crate::update::UpdateAction::Rollback => Some("update.rollback"),
        };
        // One change of the slots at a time (a fleet rollout's move may be running),
        // and none that could not be recorded first.
        let _updating = match event {
            None => None,
            Some(_) => Some(self.shared.updating.try_lock().map_err(|_| {
                fdo::Error::Failed(
                    "another update is running on this machine (a fleet rollout's, or another admin's): try again when it is done".into(),
                )
            })?),
        };
        if let Some(event) = event {
            self.shared.audit(
                "update.started",
                Some(0),
                None,
                None,
                serde_json::json!({ "by": "admin", "action": event }),
            )?;
        }
        let config = self.shared.config();
        let (image, running) = crate::os_release::image_identity(&config.os_release);
        let update = config.update.clone();
        let result = tokio::task::spawn_blocking(move || {
            crate::update::apply(&update, action, image.as_deref(), running.as_deref())
        })
        .await
        .map_err(|e| fdo::Error::Failed(e.to_string()))?;
        if let Some(event) = event {
            let detail = match &result {
                Ok(outcome) => to_value(outcome),
                Err(e) => serde_json::json!({ "error": e.to_string() }),
            };
            self.shared.audit(event, Some(0), None, None, detail)?;
        }
        match result {
            Ok(outcome) => Ok(to_json(&outcome)),
            Err(e) => Err(fdo::Error::Failed(e.to_string())),
        }
    }
}
