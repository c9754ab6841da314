//! The agent's CloudFormation health signal against stand-ins for the instance
//! metadata service and the CloudFormation endpoint (one local HTTP server): IMDSv2
//! tokens on every metadata read, the instance role's credentials signing the call,
//! SUCCESS from a healthy agent, FAILURE from one whose image is not the version the
//! stack expects, and one signal per boot.

#![allow(clippy::unwrap_used)]

mod support;

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
}

impl StandIn {
    fn start(user_data: &str) -> StandIn {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (log, user_data) = (seen.clone(), user_data.to_owned());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let (log, user_data) = (log.clone(), user_data.clone());
                std::thread::spawn(move || serve(stream, &log, &user_data));
            }
        });
        StandIn { port, seen }
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

fn serve(stream: std::net::TcpStream, log: &Mutex<Vec<Seen>>, user_data: &str) {
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
    let endpoint = stand_in.endpoint();
    Daemon::start_with_env(
        OS_RELEASE,
        "",
        &[
            ("AWS_EC2_METADATA_SERVICE_ENDPOINT", endpoint.as_str()),
            ("AWS_ENDPOINT_URL_CLOUDFORMATION", endpoint.as_str()),
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

    // A restart in the same boot does not signal again.
    let requests = stand_in.seen.lock().unwrap().len();
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
        stand_in.seen.lock().unwrap().len(),
        requests,
        "metadata read again after a restart"
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
