//! The real daemon on a private system bus with the shipped bus policy: who may own
//! the name and call it.

#![allow(clippy::unwrap_used)]

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;

fn call(agent: &Daemon, user: Option<&User>, method: &str) -> std::process::Output {
    agent.busctl(
        user,
        &[
            "call",
            "org.devos.Agent1",
            "/org/devos/Agent1",
            "org.devos.Agent1",
            method,
        ],
    )
}

#[test]
fn agent_answers_ping_and_version_to_any_local_user() {
    let agent = Daemon::start();
    let ping = call(&agent, None, "Ping");
    assert_eq!(stdout(&ping).trim(), "s \"pong\"", "{ping:?}");
    let version = call(&agent, None, "Version");
    assert_eq!(stdout(&version).trim(), "s \"0.1.0+abcdef012345\"");
    // An unprivileged user may call the methods too.
    let bob = User::ensure("devos-bob");
    let ping = call(&agent, Some(&bob), "Ping");
    assert!(
        ping.status.success(),
        "bob could not call Ping: {}",
        stderr(&ping)
    );
}

#[test]
fn only_root_may_own_the_name() {
    let agent = Daemon::start();
    let bob = User::ensure("devos-bob");
    // Everything bob's agent needs is his, so only the bus policy can stop it.
    let own = bob.project();
    let config = own.path().join("agent.toml");
    bob.write(
        &config,
        &format!(
            "state-dir = \"{dir}/state\"\nactions-dir = \"{dir}/actions\"\n[audit]\nanchor-file = \"{dir}/anchors.jsonl\"\n",
            dir = own.path().display()
        ),
    );
    let out = run_with_timeout(
        Command::new("setpriv")
            .arg(format!("--reuid={}", bob.uid))
            .arg(format!("--regid={}", bob.uid))
            .args(["--init-groups", AGENT, "--config"])
            .arg(&config)
            .arg("serve")
            .env("DBUS_SYSTEM_BUS_ADDRESS", &agent.bus.address),
        Duration::from_secs(20),
    )
    .unwrap();
    let err = stderr(&out);
    assert!(
        !out.status.success(),
        "a non-root agent must not start: {err}"
    );
    assert!(
        err.contains("not allowed to own") || err.contains("AccessDenied"),
        "{err}"
    );
}

#[test]
fn version_without_image_version_is_a_clear_error() {
    let agent = Daemon::start_with("ID=debian\n", "");
    let out = call(&agent, None, "Version");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no IMAGE_VERSION"),
        "{}",
        stderr(&out)
    );
}

/// The interface blocks of an introspection document, as text.
fn interfaces(xml: &str) -> String {
    let start = xml
        .find("<interface name=\"org.devos.Agent1\">")
        .expect("no Agent1 interface");
    let end = xml[start..]
        .find("<interface name=\"org.freedesktop")
        .map_or_else(|| xml.rfind("</node>").unwrap(), |e| start + e);
    xml[start..end].trim().to_owned()
}

#[test]
fn the_shipped_introspection_xml_is_what_the_daemon_serves() {
    let agent = Daemon::start();
    let live = agent.busctl(
        None,
        &[
            "introspect",
            "--xml-interface",
            "org.devos.Agent1",
            "/org/devos/Agent1",
        ],
    );
    assert!(live.status.success(), "{}", stderr(&live));
    let path = devos_tests::repo_root().join("agent/dist/org.devos.Agent1.xml");
    let shipped = std::fs::read_to_string(&path).unwrap();
    // `DEVOS_BLESS=1 cargo test -p devos-agent --test bus` rewrites the shipped file.
    if std::env::var_os("DEVOS_BLESS").is_some() {
        let blessed = shipped.replace(&interfaces(&shipped), &interfaces(&stdout(&live)));
        std::fs::write(&path, blessed).unwrap();
        return;
    }
    assert_eq!(
        interfaces(&shipped),
        interfaces(&stdout(&live)),
        "agent/dist/org.devos.Agent1.xml is out of date: regenerate it from `busctl introspect --xml-interface`"
    );
}

/// An agent nobody can reach is no agent: when its bus goes away it says so in its
/// audit log and exits with an error, for systemd to start a new one (docs/agent.md).
#[test]
fn an_agent_that_loses_its_bus_exits_and_says_why() {
    let mut agent = Daemon::start();
    agent.bus.stop();
    let status = agent
        .exited_within(Duration::from_secs(20))
        .expect("the agent kept running without its bus");
    assert!(!status.success(), "{status}");
    let log = std::fs::read_to_string(agent.state().join("audit/log-000001.jsonl")).unwrap();
    assert!(
        log.lines().any(
            |l| serde_json::from_str::<serde_json::Value>(l).unwrap()["event"] == "agent.lost-bus"
        ),
        "{log}"
    );
}
