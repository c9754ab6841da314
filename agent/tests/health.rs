//! The agent's CloudFormation health signal against stand-ins for the instance
//! metadata service and the CloudFormation endpoint (one local HTTP server): IMDSv2
//! tokens on every metadata read, the instance role's credentials signing the call,
//! SUCCESS from a healthy agent, FAILURE from one whose image is not the version the
//! stack expects, and one signal per boot. The same stand-ins (instance tags in
//! metadata, EC2's CreateTags) test the instance's side of an in-place fleet rollout.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devos_tests::wait_for;
use support::*;

const TOKEN: &str = "imds-session-token";
const INSTANCE: &str = "i-0123456789abcdef0";

/// One HTTP request the stand-in received.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: String,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Instance metadata (IMDSv2 only: reads without the session token get 401) and
/// CloudFormation's query API, on one port.
struct StandIn {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// The instance's tags, as metadata shows them and CreateTags changes them.
    tags: Arc<Mutex<BTreeMap<String, String>>>,
}

impl StandIn {
    fn start(user_data: &str) -> StandIn {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let tags = Arc::new(Mutex::new(BTreeMap::new()));
        let (log, user_data, instance_tags) = (seen.clone(), user_data.to_owned(), tags.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let (log, user_data, tags) =
                    (log.clone(), user_data.clone(), instance_tags.clone());
                std::thread::spawn(move || serve(stream, &log, &user_data, &tags));
            }
        });
        StandIn { port, seen, tags }
    }

    fn tag(&self, key: &str) -> Option<String> {
        self.tags.lock().unwrap().get(key).cloned()
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn signals(&self) -> Vec<Seen> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.body.contains("Action=SignalResource"))
            .cloned()
            .collect()
    }
}

/// A form-encoded value, decoded.
fn form_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

/// CreateTags on this instance: its `Tag.N.Key`/`Tag.N.Value` pairs into `tags`.
fn create_tags(body: &str, tags: &Mutex<BTreeMap<String, String>>) {
    let form: BTreeMap<String, String> = body
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (form_decode(k), form_decode(v)))
        .collect();
    assert_eq!(
        form.get("ResourceId.1").map(String::as_str),
        Some(INSTANCE),
        "{body}"
    );
    assert!(
        !form.contains_key("ResourceId.2"),
        "tags only its own instance: {body}"
    );
    for n in 1.. {
        let Some(key) = form.get(&format!("Tag.{n}.Key")) else {
            break;
        };
        let value = form
            .get(&format!("Tag.{n}.Value"))
            .cloned()
            .unwrap_or_default();
        tags.lock().unwrap().insert(key.clone(), value);
    }
}

fn serve(
    stream: std::net::TcpStream,
    log: &Mutex<Vec<Seen>>,
    user_data: &str,
    tags: &Mutex<BTreeMap<String, String>>,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut stream = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (
            parts.next().unwrap_or("").to_owned(),
            parts.next().unwrap_or("").to_owned(),
        );
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            reader.read_line(&mut h).unwrap();
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_owned(), v.trim().to_owned()));
            }
        }
        let length: usize = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .map_or(0, |(_, v)| v.parse().unwrap());
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        let seen = Seen {
            method,
            path,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        };
        let tokened = seen.header("x-aws-ec2-metadata-token") == Some(TOKEN);
        let seen_token = seen.path == "/latest/api/token";
        let (status, reply) = match (seen.method.as_str(), seen.path.as_str()) {
            ("PUT", "/latest/api/token") => (200, TOKEN.to_owned()),
            ("GET", p) if p.starts_with("/latest/") && !tokened => (401, String::new()),
            ("GET", "/latest/user-data") => (200, user_data.to_owned()),
            ("GET", "/latest/meta-data/instance-id") => (200, INSTANCE.to_owned()),
            ("GET", "/latest/meta-data/placement/region") => (200, "eu-west-1".to_owned()),
            ("GET", p) if p.starts_with("/latest/meta-data/tags/instance/") => {
                let key = &p["/latest/meta-data/tags/instance/".len()..];
                match tags.lock().unwrap().get(key) {
                    Some(v) => (200, v.clone()),
                    None => (404, String::new()),
                }
            }
            ("POST", "/") if seen.body.contains("Action=CreateTags") => {
                create_tags(&seen.body, tags);
                (
                    200,
                    r#"<CreateTagsResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><requestId>1</requestId><return>true</return></CreateTagsResponse>"#.into(),
                )
            }
            ("GET", "/latest/meta-data/iam/security-credentials/") => (200, "devos-agent-role".into()),
            ("GET", "/latest/meta-data/iam/security-credentials/devos-agent-role") => (
                200,
                r#"{"Code": "Success", "LastUpdated": "2026-01-01T00:00:00Z", "Type": "AWS-HMAC", "AccessKeyId": "ASIAROLEKEY", "SecretAccessKey": "role-secret", "Token": "role-session-token", "Expiration": "2099-01-01T00:00:00Z"}"#.into(),
            ),
            ("POST", "/") if seen.body.contains("Action=SignalResource") => (
                200,
                r#"<SignalResourceResponse xmlns="http://cloudformation.amazonaws.com/doc/2010-05-15/"><ResponseMetadata><RequestId>1</RequestId></ResponseMetadata></SignalResourceResponse>"#.into(),
            ),
            _ => (404, String::new()),
        };
        log.lock().unwrap().push(seen);
        let reason = match status {
            200 => "OK",
            401 => "Unauthorized",
            _ => "Not Found",
        };
        // A token answer says how long the token lives, as IMDS does.
        let ttl = if seen_token {
            "x-aws-ec2-metadata-token-ttl-seconds: 21600\r\n"
        } else {
            ""
        };
        let head = format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-length: {}\r\ncontent-type: text/plain\r\n{ttl}\r\n",
            reply.len()
        );
        if stream.write_all(head.as_bytes()).is_err() || stream.write_all(reply.as_bytes()).is_err()
        {
            return;
        }
    }
}

const OS_RELEASE: &str = "ID=debian\nIMAGE_ID=devos\nIMAGE_VERSION=\"0.1.0+abcdef012345\"\n";

fn start(stand_in: &StandIn) -> Daemon {
    start_with(stand_in, "")
}

fn start_with(stand_in: &StandIn, config: &str) -> Daemon {
    let endpoint = stand_in.endpoint();
    Daemon::start_with_env(
        OS_RELEASE,
        config,
        &[
            ("AWS_EC2_METADATA_SERVICE_ENDPOINT", endpoint.as_str()),
            ("AWS_ENDPOINT_URL_CLOUDFORMATION", endpoint.as_str()),
            ("AWS_ENDPOINT_URL_EC2", endpoint.as_str()),
            ("AWS_CONFIG_FILE", "/dev/null"),
            ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
        ],
    )
}

fn user_data(version: &str) -> String {
    format!(
        "{{\"devos-health-signal\": {{\"stack\": \"devfleet\", \"resource\": \"Group\", \"region\": \"eu-west-1\", \"version\": \"{version}\"}}}}\n"
    )
}

/// Every entry of the agent's audit log.
fn audit_log(agent: &Daemon) -> String {
    let mut files: Vec<_> = std::fs::read_dir(agent.state().join("audit"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("log-"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect()
}

fn wait_signal(stand_in: &StandIn) -> Seen {
    assert!(
        wait_for(Duration::from_secs(30), || !stand_in.signals().is_empty()),
        "no SignalResource within 30 s; requests seen: {:#?}",
        stand_in.seen.lock().unwrap()
    );
    stand_in.signals().remove(0)
}

#[test]
fn a_healthy_agent_signals_success_once_per_boot_with_imdsv2_and_the_role() {
    for var in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
    ] {
        assert!(
            std::env::var_os(var).is_none(),
            "unset {var} to run this test: the agent must use the instance role"
        );
    }
    let stand_in = StandIn::start(&user_data("0.1.0+abcdef012345"));
    let mut agent = start(&stand_in);
    let signal = wait_signal(&stand_in);
    for needle in [
        "Action=SignalResource",
        "StackName=devfleet",
        "LogicalResourceId=Group",
        &format!("UniqueId={INSTANCE}"),
        "Status=SUCCESS",
    ] {
        assert!(
            signal.body.contains(needle),
            "{needle} not in {}",
            signal.body
        );
    }
    let auth = signal.header("authorization").unwrap();
    assert!(
        auth.starts_with("AWS4-HMAC-SHA256 Credential=ASIAROLEKEY/")
            && auth.contains("/eu-west-1/cloudformation/aws4_request"),
        "signed with the instance role in the stack's region: {auth}"
    );
    assert_eq!(
        signal.header("x-amz-security-token"),
        Some("role-session-token")
    );
    // IMDSv2: every metadata read carried the session token (the stand-in answers 401
    // otherwise, so a v1 read would have failed).
    for s in stand_in
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.method == "GET")
    {
        assert_eq!(s.header("x-aws-ec2-metadata-token"), Some(TOKEN), "{s:?}");
    }
    // Audited.
    let audit = audit_log(&agent);
    assert!(
        audit.contains("health.signalled") && audit.contains("SUCCESS"),
        "{audit}"
    );

    // A restart in the same boot does not signal again. (The in-place rollout's poll of
    // the instance's tags goes on; it is not the signal.)
    let requests = user_data_reads(&stand_in);
    agent.restart();
    assert!(
        wait_for(Duration::from_secs(20), || audit_log(&agent)
            .contains("health.already-signalled")),
        "the restarted agent did not say it had signalled already: {}",
        audit_log(&agent)
    );
    assert_eq!(
        stand_in.signals().len(),
        1,
        "signalled again after a restart"
    );
    assert_eq!(
        user_data_reads(&stand_in),
        requests,
        "user data read again after a restart"
    );
}

#[test]
fn an_agent_on_the_wrong_version_signals_failure() {
    let stand_in = StandIn::start(&user_data("9.9.9+000000000000"));
    let agent = start(&stand_in);
    let signal = wait_signal(&stand_in);
    assert!(signal.body.contains("Status=FAILURE"), "{}", signal.body);
    let audit = audit_log(&agent);
    assert!(
        audit.contains(
            "image-version: this image is 0.1.0+abcdef012345, the stack expects 9.9.9+000000000000"
        ),
        "{audit}"
    );
}

/// The user data's region names the host the signed call goes to: one that is not a
/// region's name gets no signal.
#[test]
fn user_data_naming_no_region_gets_no_signal() {
    let stand_in = StandIn::start(
        "{\"devos-health-signal\": {\"stack\": \"devfleet\", \"resource\": \"Group\", \"region\": \"eu-west-1.attacker.example\", \"version\": \"0.1.0+abcdef012345\"}}\n",
    );
    let _agent = start(&stand_in);
    assert!(
        wait_for(Duration::from_secs(30), || user_data_reads(&stand_in) > 0),
        "the user data was never read"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(stand_in.signals().is_empty(), "a signal was sent");
}

fn user_data_reads(stand_in: &StandIn) -> usize {
    stand_in
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.path == "/latest/user-data")
        .count()
}

/// A program that appends its arguments to `log`.
fn recorder(dir: &std::path::Path, name: &str, log: &std::path::Path) -> String {
    let path = dir.join(name);
    devos_tests::write_executable(
        &path,
        &format!("#!/bin/sh\necho \"{name} $*\" >> {}\n", log.display()),
    );
    path.display().to_string()
}

#[test]
fn an_in_place_rollout_moves_the_machine_once_and_reports_on_its_own_tags() {
    let tools = tempfile::tempdir().unwrap();
    let log = tools.path().join("calls");
    std::fs::create_dir(tools.path().join("efi")).unwrap();
    let config = format!(
        "[update]\nsysupdate = \"{}\"\nbootctl = \"{}\"\nkernel-images = \"{}\"\nlauncher = []\nreboot = [\"{}\"]\nfleet-poll-seconds = 1\n",
        recorder(tools.path(), "sysupdate", &log),
        recorder(tools.path(), "bootctl", &log),
        tools.path().join("efi").display(),
        recorder(tools.path(), "reboot", &log),
    );
    let calls = || std::fs::read_to_string(&log).unwrap_or_default();
    // No signal asked for; the rollout asks this instance for 0.2.0.
    let stand_in = StandIn::start("#!/bin/sh\n");
    let mut agent = start_with(&stand_in, &config);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(calls(), "", "moved with nothing asked");
    assert_eq!(
        stand_in.tag("devos:running"),
        None,
        "reported with nothing asked"
    );

    stand_in
        .tags
        .lock()
        .unwrap()
        .insert("devos:update-to".into(), "0.2.0+fedcba987654".into());
    assert!(
        wait_for(Duration::from_secs(30), || calls().contains("reboot")),
        "no move and reboot within 30 s: {:?}; requests: {:#?}",
        calls(),
        stand_in.seen.lock().unwrap()
    );
    assert_eq!(
        calls(),
        "sysupdate update 0.2.0_fedcba987654\nbootctl set-default \nreboot \n",
        "installed the version asked for, made it the next boot, rebooted"
    );
    assert_eq!(
        stand_in.tag("devos:update-state").as_deref(),
        Some("updating to 0.2.0+fedcba987654")
    );
    assert_eq!(
        stand_in.tag("devos:running").as_deref(),
        Some("0.1.0+abcdef012345")
    );
    let audit = audit_log(&agent);
    assert!(
        audit.contains("update.install") && audit.contains("\"by\":\"fleet\""),
        "{audit}"
    );
    // Polls go on; the version is not installed again in this boot, nor after a restart.
    std::thread::sleep(Duration::from_secs(3));
    agent.restart();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(calls().matches("sysupdate").count(), 1, "{}", calls());

    // The rollout went back before this machine rebooted: the move is undone (the
    // running version boots next) and it reports itself healthy where it is; asked
    // again later, it moves again.
    let marker = agent.state().join("in-place-attempt");
    let ask = |version: &str| {
        stand_in
            .tags
            .lock()
            .unwrap()
            .insert("devos:update-to".into(), version.into())
    };
    ask("0.1.0+abcdef012345");
    assert!(
        wait_for(Duration::from_secs(30), || stand_in
            .tag("devos:update-state")
            .as_deref()
            == Some("healthy")),
        "{:?}",
        stand_in.tag("devos:update-state")
    );
    assert!(
        calls().ends_with("bootctl set-default @current\n"),
        "{}",
        calls()
    );
    assert!(!marker.exists(), "the undone attempt is forgotten");
    // Someone else overwrote this instance's report: it is written again.
    stand_in.tags.lock().unwrap().insert(
        "devos:update-state".into(),
        "failed 0.1.0+abcdef012345: forged".into(),
    );
    assert!(
        wait_for(Duration::from_secs(30), || stand_in
            .tag("devos:update-state")
            .as_deref()
            == Some("healthy")),
        "{:?}",
        stand_in.tag("devos:update-state")
    );
    ask("0.2.0+fedcba987654");
    assert!(
        wait_for(Duration::from_secs(30), || calls()
            .matches("sysupdate")
            .count()
            == 2
            && calls().ends_with("reboot \n")),
        "{}",
        calls()
    );

    // The machine came back on 0.1.0 in a later boot (its boot tries ran out): the
    // failure is reported, and it is not tried again.
    let attempt = std::fs::read_to_string(&marker).unwrap();
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    std::fs::write(&marker, attempt.replace(boot.trim(), "an-earlier-boot")).unwrap();
    agent.restart();
    assert!(
        wait_for(Duration::from_secs(30), || stand_in
            .tag("devos:update-state")
            .is_some_and(|s| s.starts_with("failed 0.2.0+fedcba987654:"))),
        "{:?}",
        stand_in.tag("devos:update-state")
    );
    assert!(
        stand_in
            .tag("devos:update-state")
            .unwrap()
            .contains("back on 0.1.0+abcdef012345")
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(calls().matches("sysupdate").count(), 2, "{}", calls());

    // Told to go back to what it runs: it reports itself healthy there.
    stand_in
        .tags
        .lock()
        .unwrap()
        .insert("devos:update-to".into(), "0.1.0+abcdef012345".into());
    assert!(
        wait_for(Duration::from_secs(30), || stand_in
            .tag("devos:update-state")
            .as_deref()
            == Some("healthy")),
        "{:?}",
        stand_in.tag("devos:update-state")
    );
    assert_eq!(calls().matches("sysupdate").count(), 2, "{}", calls());
    let audit = audit_log(&agent);
    assert!(audit.contains("update.fleet-report"), "{audit}");
    // Every report was signed by the instance role, in the instance's region.
    for s in stand_in
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.body.contains("Action=CreateTags"))
    {
        let auth = s.header("authorization").unwrap();
        assert!(
            auth.starts_with("AWS4-HMAC-SHA256 Credential=ASIAROLEKEY/")
                && auth.contains("/eu-west-1/ec2/aws4_request"),
            "{auth}"
        );
    }
}

#[test]
fn an_install_left_running_by_a_restarted_agent_is_waited_for_not_reported_as_a_failure() {
    let tools = tempfile::tempdir().unwrap();
    let log = tools.path().join("calls");
    let busy = tools.path().join("busy");
    std::fs::create_dir(tools.path().join("efi")).unwrap();
    // systemd-run with the update unit's name taken while `busy` exists.
    let launcher = tools.path().join("launcher");
    devos_tests::write_executable(
        &launcher,
        &format!(
            "#!/bin/sh\nif [ -e {} ]; then echo 'Failed to start transient service unit: Unit devos-update.service was already loaded or has a fragment file.' >&2; exit 1; fi\nexec \"$@\"\n",
            busy.display()
        ),
    );
    let config = format!(
        "[update]\nsysupdate = \"{}\"\nbootctl = \"{}\"\nkernel-images = \"{}\"\nlauncher = [\"{}\"]\nreboot = [\"{}\"]\nfleet-poll-seconds = 1\n",
        recorder(tools.path(), "sysupdate", &log),
        recorder(tools.path(), "bootctl", &log),
        tools.path().join("efi").display(),
        launcher.display(),
        recorder(tools.path(), "reboot", &log),
    );
    let calls = || std::fs::read_to_string(&log).unwrap_or_default();
    std::fs::write(&busy, "").unwrap();
    let stand_in = StandIn::start("#!/bin/sh\n");
    let _agent = start_with(&stand_in, &config);
    stand_in
        .tags
        .lock()
        .unwrap()
        .insert("devos:update-to".into(), "0.2.0+fedcba987654".into());
    let waiting =
        "updating to 0.2.0+fedcba987654: another update is running on this machine; trying again";
    assert!(
        wait_for(Duration::from_secs(30), || stand_in
            .tag("devos:update-state")
            .as_deref()
            == Some(waiting)),
        "{:?}",
        stand_in.tag("devos:update-state")
    );
    assert_eq!(calls(), "", "ran an install beside the other one");
    // The other install ended: this one goes ahead.
    std::fs::remove_file(&busy).unwrap();
    assert!(
        wait_for(Duration::from_secs(30), || calls().contains("reboot")),
        "{:?} {:?}",
        calls(),
        stand_in.tag("devos:update-state")
    );
    assert_eq!(
        calls(),
        "sysupdate update 0.2.0_fedcba987654\nbootctl set-default \nreboot \n"
    );
}

#[test]
fn a_machine_moved_in_place_is_checked_against_the_version_it_moved_to() {
    // The stack's user data still names the version the instance was launched with.
    let stand_in = StandIn::start(&user_data("0.0.9+000000000000"));
    let endpoint = stand_in.endpoint();
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let agent = Daemon::start_prepared(
        OS_RELEASE,
        "",
        &[
            ("AWS_EC2_METADATA_SERVICE_ENDPOINT", endpoint.as_str()),
            ("AWS_ENDPOINT_URL_CLOUDFORMATION", endpoint.as_str()),
            ("AWS_ENDPOINT_URL_EC2", endpoint.as_str()),
            ("AWS_CONFIG_FILE", "/dev/null"),
            ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
        ],
        |dir| {
            let state = dir.join("state");
            std::fs::create_dir_all(&state).unwrap();
            std::fs::write(
                state.join("in-place-attempt"),
                format!(
                    "{{\"version\": \"0.1.0+abcdef012345\", \"boot\": \"{}-earlier\", \"moved\": true}}",
                    boot.trim()
                ),
            )
            .unwrap();
        },
    );
    let signal = wait_signal(&stand_in);
    assert!(
        signal.body.contains("Status=SUCCESS"),
        "{}\n{}",
        signal.body,
        audit_log(&agent)
    );
}

/// One change of the slots at a time: while an administrator's install runs (a slow
/// systemd-sysupdate), another install or a rollback is refused with a message
/// saying another update is running, and nothing more is started; once it is done,
/// updates are served again.
#[test]
fn a_second_update_while_one_runs_is_refused() {
    let tools = tempfile::tempdir().unwrap();
    let log = tools.path().join("calls");
    let gate = tools.path().join("gate");
    let esp = tools.path().join("efi");
    std::fs::create_dir(&esp).unwrap();
    let write_tool = |name: &str, body: String| {
        let path = tools.path().join(name);
        devos_tests::write_executable(&path, &format!("#!/bin/sh\n{body}\n"));
        path.display().to_string()
    };
    // The install waits for the gate (60 s at most).
    let sysupdate = write_tool(
        "sysupdate",
        format!(
            "case $1 in check-new) echo '{{\"available\":\"0.3.0_new\"}}';; *) echo \"sysupdate $*\" >> {log}; \
             n=0; while [ ! -e {gate} ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n+1)); done;; esac",
            log = log.display(),
            gate = gate.display()
        ),
    );
    let bootctl = recorder(tools.path(), "bootctl", &log);
    let agent = Daemon::start_with(
        OS_RELEASE,
        &format!(
            "[update]\nsysupdate = \"{sysupdate}\"\nbootctl = \"{bootctl}\"\nkernel-images = \"{}\"\nlauncher = []\n",
            esp.display()
        ),
    );
    let calls = || std::fs::read_to_string(&log).unwrap_or_default();
    let cwd = tools.path().to_path_buf();
    let first = std::thread::scope(|s| {
        let first = s.spawn(|| agent.devos(None, &cwd, &["update"]));
        assert!(
            wait_for(Duration::from_secs(20), || calls().contains("sysupdate")),
            "the first install did not start"
        );
        for args in [&["update"][..], &["update", "--rollback"]] {
            let out = agent.devos(None, &cwd, args);
            assert!(!out.status.success(), "{args:?}: {}", stdout(&out));
            assert!(
                stderr(&out).contains("another update is running"),
                "{args:?}: {}",
                stderr(&out)
            );
        }
        // A check changes nothing: it is served meanwhile.
        let out = agent.devos(None, &cwd, &["update", "--check"]);
        assert!(out.status.success(), "{}", stderr(&out));
        std::fs::write(&gate, "").unwrap();
        first.join().unwrap()
    });
    assert!(first.status.success(), "{}", stderr(&first));
    assert_eq!(calls().matches("sysupdate").count(), 1, "{}", calls());
    assert!(!calls().contains("devos_"), "a rollback ran: {}", calls());
    let audit = audit_log(&agent);
    assert_eq!(audit.matches("\"update.started\"").count(), 1, "{audit}");
    // Done: the next one runs.
    let out = agent.devos(None, &cwd, &["update"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(calls().matches("sysupdate").count(), 2, "{}", calls());
}
