//! Runs an approved action in its sandbox (`devos-agent sandbox-exec`, see
//! [`crate::sandbox`]) with a timeout, a cap on captured output and cancellation;
//! output is streamed to a callback as it arrives. The timeout and Cancel cover the
//! action's whole life, not only its output: an action that closes its output and
//! goes on is still killed, with everything it started.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::caller::Caller;
use crate::config::AgentConfig;
use crate::request::ActionRecord;
use crate::sandbox::{
    APPLIED_PREFIX, EXIT_RISK_CHANGED, EXIT_SANDBOX_FAILED, Limits, REFUSED_PREFIX, STATUS_FD, Spec,
};

/// The outer stage's own refusals (its checks ran as the caller): shown as they are.
const OUTER_REFUSED: &str = "devos sandbox: refused: ";

/// Output as it is kept and shown: control characters other than newline and tab
/// (NUL, escape sequences that could rewrite a terminal, carriage returns) and the
/// bidirectional overrides that reorder what a terminal shows become U+FFFD, so
/// nothing an action prints can break the bus or fake a prompt.
pub fn printable(text: &str) -> String {
    let reorders = |c: char| matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}');
    text.chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' || reorders(c) {
                '\u{FFFD}'
            } else {
                c
            }
        })
        .collect()
}

/// `text` on one line, as an action's description is shown where a decision is asked
/// for: [`printable`], with newlines and tabs as `\n` and `\t` and the invisible
/// formatting characters (zero-width spaces and joiners, ...) as U+FFFD, so that an
/// argument cannot lay out lines that look like the prompt's own.
pub fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in printable(text).chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if is_format(c) => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// Unicode's invisible formatting characters (general category Cf) that show as
/// nothing in a terminal.
fn is_format(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{2060}'..='\u{2064}'
        | '\u{2066}'..='\u{206F}' | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFB}' | '\u{E0001}' | '\u{E0020}'..='\u{E007F}')
}

/// The longest start of `text` of at most `max` bytes that ends where a character
/// does.
pub fn head(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// What became of a run.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub exit_code: Option<i32>,
    pub output: String,
    pub truncated: bool,
    pub error: Option<String>,
    pub sandbox: Option<String>,
    /// The action was refused before it started because its risk grew.
    pub risk_changed: bool,
}

impl Outcome {
    pub fn succeeded(&self) -> bool {
        self.exit_code == Some(0) && self.error.is_none()
    }
}

/// The sandbox spec for an approved action of `caller`.
pub fn spec_for(
    record: &ActionRecord,
    caller: &Caller,
    cwd: &Path,
    private_dir: PathBuf,
    cgroup: Option<PathBuf>,
    config: &AgentConfig,
) -> Spec {
    let as_root = caller.runs_as_root(&record.action);
    let sandbox = &config.sandbox;
    Spec {
        caller: caller.clone(),
        cwd: cwd.to_path_buf(),
        action: record.action.clone(),
        approved: record.risk.clone(),
        as_root,
        secrets: sandbox.secrets.clone(),
        read_only: sandbox.read_only.clone(),
        // The agent's own files, and what the administrator's deny rules say nothing
        // may touch.
        hide: [
            config.state_dir.clone(),
            config.actions_dir.clone(),
            config
                .audit
                .anchor_file
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default(),
        ]
        .into_iter()
        .chain(
            config
                .policy
                .deny
                .iter()
                .filter_map(|d| d.path_prefix.clone()),
        )
        .filter(|p| p.is_absolute() && p != Path::new("/"))
        .collect(),
        private_dir,
        cgroup,
        bwrap: sandbox.bwrap.clone(),
        required: sandbox.required,
        limits: Limits {
            cpu_secs: sandbox.timeout_secs.saturating_mul(2),
            max_file_mib: sandbox.max_file_mib,
            max_open_files: sandbox.max_open_files,
        },
    }
}

/// An action's private directory that could not be made.
#[derive(Debug, thiserror::Error)]
#[error("cannot prepare {path}: {source}")]
pub struct PrivateDirError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// A directory for one action that only root can reach, with `tmp/`, `var-tmp/` and
/// `shm/` inside that belong to the caller (the action's `/tmp`, `/var/tmp` and
/// `/dev/shm`: on disk, so an action cannot fill a memory file system).
pub fn private_dir(
    actions_dir: &Path,
    label: &str,
    caller: &Caller,
) -> Result<PathBuf, PrivateDirError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let fail = |p: &Path, source| PrivateDirError {
        path: p.to_path_buf(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(actions_dir)
        .map_err(|e| fail(actions_dir, e))?;
    let dir = actions_dir.join(label);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| fail(&dir, e))?;
    for name in crate::sandbox::PRIVATE_DIRS.iter().map(|(name, _)| name) {
        let sub = dir.join(name);
        std::fs::create_dir(&sub)
            .and_then(|()| std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o700)))
            .and_then(|()| std::os::unix::fs::chown(&sub, Some(caller.uid), Some(caller.gid)))
            .map_err(|e| fail(&sub, e))?;
    }
    Ok(dir)
}

/// How many times a sandbox that failed before the action started is set up again.
/// Such a failure is most often a race with the caller's own work (an entry of the
/// home removed while bubblewrap binds it): nothing ran, and every attempt checks
/// everything afresh.
const SETUP_ATTEMPTS: u32 = 3;

/// Run `spec` in the sandbox. `on_output` gets each chunk of output; `cancel`
/// resolving kills the action.
pub async fn execute(
    spec: &Spec,
    timeout: Duration,
    max_output: usize,
    mut on_output: impl FnMut(&str),
    cancel: impl std::future::Future<Output = ()>,
) -> Outcome {
    let mut cancel = std::pin::pin!(cancel);
    // One timeout for every attempt together.
    let deadline = tokio::time::Instant::now() + timeout;
    let mut attempt = 1;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let (mut outcome, set_up) = execute_once(
            spec,
            left,
            timeout,
            max_output,
            &mut on_output,
            cancel.as_mut(),
        )
        .await;
        if set_up || attempt == SETUP_ATTEMPTS {
            return outcome;
        }
        attempt += 1;
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))) => {}
            () = cancel.as_mut() => {
                outcome.error = Some("cancelled".to_owned());
                return outcome;
            }
        }
    }
}

/// One attempt of [`execute`]; false when the sandbox failed before the action
/// started for a reason another attempt may not meet.
async fn execute_once(
    spec: &Spec,
    left: Duration,
    timeout: Duration,
    max_output: usize,
    on_output: impl FnMut(&str),
    cancel: impl std::future::Future<Output = ()>,
) -> (Outcome, bool) {
    let mut outcome = Outcome::default();
    let (mut child, status) = match start_sandbox(spec).await {
        Ok(started) => started,
        Err(why) => {
            outcome.error = Some(why);
            return (outcome, true);
        }
    };
    let rx = read_pipes(&mut child, status);
    let collect = collect_output(rx, &mut outcome, max_output, on_output);
    let (status, killed) = wait_or_kill(&mut child, collect, left, timeout, cancel, spec).await;
    let interrupted = killed.is_some();
    if let Some(why) = killed {
        outcome.error = Some(why);
    }
    let set_up = record_exit(&mut outcome, status, spec) || interrupted;
    if outcome.truncated {
        outcome
            .output
            .push_str(&format!("\n[output truncated at {max_output} bytes]\n"));
    }
    (outcome, set_up)
}

/// Start the sandbox (`devos-agent sandbox-exec`) and hand it the spec on stdin; the
/// read end of its status pipe (its descriptor [`STATUS_FD`]).
async fn start_sandbox(
    spec: &Spec,
) -> Result<(tokio::process::Child, std::os::fd::OwnedFd), String> {
    use std::os::fd::AsRawFd;
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find the agent's own binary: {e}"))?;
    // Both ends close-on-exec: no other child of the daemon gets either.
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| format!("cannot make the sandbox's status pipe: {e}"))?;
    let write_fd = write.as_raw_fd();
    let mut command = tokio::process::Command::new(exe);
    command
        .arg("sandbox-exec")
        .env_clear()
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: between fork and exec only async-signal-safe calls: dup2(2) gives the
    // child the write end as STATUS_FD (without close-on-exec), fcntl(2) clears the
    // flag when it is that descriptor already.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(move || {
            let r = if write_fd == STATUS_FD {
                libc::fcntl(write_fd, libc::F_SETFD, 0)
            } else {
                libc::dup2(write_fd, STATUS_FD)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot start the sandbox: {e}"))?;
    drop(write);
    if let Some(mut stdin) = child.stdin.take() {
        let json = serde_json::to_vec(spec).unwrap_or_default();
        if let Err(e) = stdin.write_all(&json).await {
            return Err(format!("cannot hand the action to the sandbox: {e}"));
        }
    }
    Ok((child, read))
}

/// Where a chunk the sandbox wrote came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Stdout,
    Stderr,
    /// The status pipe: the stages' own lines.
    Status,
}

/// The child's stdout, stderr and status pipe as one stream of chunks, each marked
/// with where it came from.
fn read_pipes(
    child: &mut tokio::process::Child,
    status: std::os::fd::OwnedFd,
) -> tokio::sync::mpsc::Receiver<(Source, Vec<u8>)> {
    let (tx, rx) = tokio::sync::mpsc::channel::<(Source, Vec<u8>)>(64);
    // (Read as the other two are, on the runtime's own poller: no thread waits on it
    // while the action runs. Not a pipe: never, and the action counts as not started.)
    let status = tokio::net::unix::pipe::Receiver::from_owned_fd(status).ok();
    let pipes: [(Source, Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>); 3] = [
        (
            Source::Stdout,
            child.stdout.take().map(|p| Box::new(p) as _),
        ),
        (
            Source::Stderr,
            child.stderr.take().map(|p| Box::new(p) as _),
        ),
        (Source::Status, status.map(|p| Box::new(p) as _)),
    ];
    for (source, pipe) in pipes {
        let Some(mut pipe) = pipe else { continue };
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n) = pipe.read(&mut buf).await {
                if n == 0 || tx.send((source, buf[..n].to_vec())).await.is_err() {
                    break;
                }
            }
        });
    }
    rx
}

/// Keep the output, up to `max_output` bytes, and pass each chunk on as it comes,
/// once the sandbox's status line said the action started; that line goes into the
/// outcome instead.
async fn collect_output(
    mut rx: tokio::sync::mpsc::Receiver<(Source, Vec<u8>)>,
    outcome: &mut Outcome,
    max_output: usize,
    mut on_output: impl FnMut(&str),
) {
    // The status pipe's first line says what the sandbox applied (or why it refused);
    // nothing of the action ran before it. Nothing else is written there.
    let mut status = Vec::new();
    let mut status_read = false;
    // Output read before that line (the pipes are read apart): passed on once it says
    // the action started, never if it does not.
    let mut held = String::new();
    while let Some((source, chunk)) = rx.recv().await {
        if source == Source::Status {
            if status_read {
                continue;
            }
            status.extend_from_slice(&chunk);
            if let Some(nl) = status.iter().position(|b| *b == b'\n') {
                status_read = true;
                read_sandbox_line(&status[..nl], outcome);
                if outcome.sandbox.is_some() && !held.is_empty() {
                    on_output(&std::mem::take(&mut held));
                }
            } else if status.len() > MAX_STATUS_LINE {
                status_read = true;
            }
            continue;
        }
        let text = printable(&String::from_utf8_lossy(&chunk));
        if text.is_empty() {
            continue;
        }
        let room = max_output.saturating_sub(outcome.output.len());
        if room == 0 {
            outcome.truncated = true;
            // Past the cap, drain slowly: the action waits on its pipe instead of
            // keeping the agent busy with output nobody keeps.
            tokio::time::sleep(Duration::from_millis(2)).await;
            continue;
        }
        let taken = head(&text, room);
        outcome.output.push_str(taken);
        outcome.truncated |= taken.len() < text.len();
        // Only what the action wrote is passed on: what bubblewrap or the inner stage
        // say when they fail may name what lies where the caller cannot look.
        if outcome.sandbox.is_some() {
            on_output(taken);
        } else {
            held.push_str(taken);
        }
    }
}

/// The longest status line read (what the sandbox applied, with its paths).
const MAX_STATUS_LINE: usize = 1 << 20;

/// Take the sandbox's status line into the outcome.
fn read_sandbox_line(line: &[u8], outcome: &mut Outcome) {
    let line = String::from_utf8_lossy(line);
    if let Some(applied) = line.strip_prefix(APPLIED_PREFIX) {
        outcome.sandbox = Some(applied.to_owned());
    } else if let Some(why) = line.strip_prefix(REFUSED_PREFIX) {
        outcome.risk_changed = true;
        outcome.error = Some(format!(
            "its risk changed since it was approved ({why}); nothing ran"
        ));
    }
}

/// Wait for the output to end and the child to exit; on a timeout or a cancel, kill
/// the action and say why.
async fn wait_or_kill(
    child: &mut tokio::process::Child,
    collect: impl std::future::Future<Output = ()>,
    left: Duration,
    timeout: Duration,
    cancel: impl std::future::Future<Output = ()>,
    spec: &Spec,
) -> (std::io::Result<std::process::ExitStatus>, Option<String>) {
    let mut killed = None;
    let status = tokio::select! {
        status = async { collect.await; child.wait().await } => Some(status),
        _ = tokio::time::sleep(left) => {
            killed = Some(format!("timed out after {}s ([sandbox] timeout-secs) and was killed", timeout.as_secs()));
            None
        }
        _ = cancel => {
            killed = Some("cancelled".to_owned());
            None
        }
    };
    let status = match status {
        Some(s) => s,
        None => {
            // Killing bubblewrap ends the action's PID namespace, and with it every
            // process the action started.
            // (Fails only when it has exited already.)
            let _ = child.start_kill();
            if let Some(cgroup) = &spec.cgroup {
                // What is left is killed again, and any failure logged, when the
                // daemon removes the cgroup.
                let _ = std::fs::write(cgroup.join("cgroup.kill"), "1");
            }
            child.wait().await
        }
    };
    (status, killed)
}

/// Put how the child ended into the outcome. A sandbox that never said what it
/// applied did not run the action: its exit code says why. False when that was a
/// failure of bubblewrap or the inner stage, which another attempt may not meet.
fn record_exit(
    outcome: &mut Outcome,
    status: std::io::Result<std::process::ExitStatus>,
    spec: &Spec,
) -> bool {
    match status {
        Ok(s) => {
            use std::os::unix::process::ExitStatusExt;
            outcome.exit_code = s.code();
            if outcome.sandbox.is_none() && outcome.error.is_none() {
                let (why, transient) = sandbox_failure(spec, s, outcome.output.trim());
                outcome.error = Some(why);
                outcome.output.clear();
                return !transient;
            } else if let Some(sig) = s.signal() {
                outcome
                    .error
                    .get_or_insert_with(|| format!("killed by signal {sig}"));
            }
        }
        Err(e) => outcome.error = Some(format!("lost the action's process: {e}")),
    }
    true
}

/// Why a sandbox that exited with `s`, having said `said`, ran nothing, and whether
/// the failure was bubblewrap's or the inner stage's (a place that changed while they
/// looked may be back as it was on another attempt).
fn sandbox_failure(spec: &Spec, s: std::process::ExitStatus, said: &str) -> (String, bool) {
    match s.code() {
        Some(EXIT_RISK_CHANGED) => (
            "its risk changed since it was approved; nothing ran".into(),
            false,
        ),
        Some(EXIT_SANDBOX_FAILED) if said.starts_with(OUTER_REFUSED) => (
            format!(
                "the sandbox could not be set up, so the action was refused: {}",
                &said[OUTER_REFUSED.len()..]
            ),
            false,
        ),
        // bubblewrap (root) or the inner stage: what they say may name what lies
        // behind a path swapped while they looked; it goes to the journal only.
        _ => {
            let label = spec.private_dir.file_name().unwrap_or_default();
            eprintln!(
                "devos-agent: the sandbox of {} failed ({}): {}",
                label.to_string_lossy(),
                s,
                said.replace('\n', " | ")
            );
            (
                format!(
                    "the sandbox could not be set up in {SETUP_ATTEMPTS} attempts, so nothing ran: bubblewrap failed, or a place the action works in changed while the sandbox was being built (the agent's journal has the details)"
                ),
                true,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `collect_output` passes on, and what it keeps, for `chunks`.
    fn collected(chunks: &[(Source, &str)]) -> (Vec<String>, Outcome) {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        for (source, text) in chunks {
            tx.try_send((*source, text.as_bytes().to_vec())).unwrap();
        }
        drop(tx);
        let mut outcome = Outcome::default();
        let mut passed = Vec::new();
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(collect_output(rx, &mut outcome, 1 << 20, |t| {
                passed.push(t.to_owned())
            }));
        (passed, outcome)
    }

    #[test]
    fn only_what_the_action_wrote_is_passed_on() {
        use Source::*;
        // A sandbox that failed: what bubblewrap said stays with the daemon.
        let (passed, outcome) = collected(&[(Stderr, "bwrap: Can't find /home/x/secret\n")]);
        assert!(passed.is_empty(), "{passed:?}");
        assert!(outcome.sandbox.is_none());
        // Output read before the sandbox's line is passed on after it, in order.
        let applied = format!("{APPLIED_PREFIX}no network\n");
        let (passed, outcome) = collected(&[
            (Stdout, "early\n"),
            (Status, &applied[..5]),
            (Status, &applied[5..]),
            (Stderr, "late\n"),
        ]);
        assert_eq!(passed, ["early\n", "late\n"]);
        assert_eq!(outcome.sandbox.as_deref(), Some("no network"));
        // The action's own output never says what the sandbox applied: a line it
        // writes (having read the real one away, or not) is only output.
        let (passed, outcome) = collected(&[(Stderr, &applied), (Stdout, "x\n")]);
        assert!(
            outcome.sandbox.is_none() && passed.is_empty(),
            "{outcome:?}"
        );
    }

    #[test]
    fn a_description_asked_about_is_one_line_with_nothing_invisible() {
        let forged = "rm -rf build\n      risk: read-only\u{200B}\u{2066}\t\u{1b}[2J";
        assert_eq!(
            one_line(forged),
            "rm -rf build\\n      risk: read-only\u{FFFD}\u{FFFD}\\t\u{FFFD}[2J"
        );
        assert_eq!(one_line("ls -la ~/src"), "ls -la ~/src");
        assert_eq!(head("héllo", 2), "h");
        assert_eq!(head("héllo", 3), "hé");
        assert_eq!(head("hé", 10), "hé");
    }
}
