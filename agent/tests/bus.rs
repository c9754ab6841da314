//! The real daemon on a private system bus with the shipped bus policy.

// Test helpers fail the test by panicking, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use devos_tests::{SystemBus, require, require_root, run_with_timeout, wait_for};

const AGENT: &str = env!("CARGO_BIN_EXE_devos-agent");

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn write_config(dir: &Path, os_release: &str) -> std::path::PathBuf {
    let release = dir.join("os-release");
    std::fs::write(&release, os_release).unwrap();
    let config = dir.join("agent.toml");
    std::fs::write(&config, format!("os-release = \"{}\"\n", release.display())).unwrap();
    config
}

fn start_agent(bus: &SystemBus, config: &Path) -> Agent {
    let child = Command::new(AGENT)
        .arg("--config")
        .arg(config)
        .arg("serve")
        .env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let agent = Agent(child);
    let owned = wait_for(Duration::from_secs(10), || {
        busctl(bus, None, &["status", "org.devos.Agent1"])
            .status
            .success()
    });
    assert!(owned, "the agent did not take org.devos.Agent1 within 10s");
    agent
}

/// busctl against the private bus, optionally as another user (via setpriv).
fn busctl(bus: &SystemBus, as_uid: Option<u32>, args: &[&str]) -> std::process::Output {
    let mut cmd = match as_uid {
        Some(uid) => {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={uid}"))
                .arg(format!("--regid={uid}"))
                .arg("--clear-groups")
                .arg("busctl");
            c
        }
        None => Command::new("busctl"),
    };
    cmd.arg(format!("--address={}", bus.address)).args(args);
    run_with_timeout(&mut cmd, Duration::from_secs(20)).unwrap()
}

fn call(bus: &SystemBus, as_uid: Option<u32>, method: &str) -> std::process::Output {
    busctl(
        bus,
        as_uid,
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
    require("busctl", "systemd");
    require("setpriv", "util-linux");
    require_root();
    let bus = SystemBus::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "ID=debian\nIMAGE_ID=devos-debian\nIMAGE_VERSION=\"0.1.0+abcdef012345\"\n",
    );
    let _agent = start_agent(&bus, &config);

    let ping = call(&bus, None, "Ping");
    assert_eq!(
        String::from_utf8_lossy(&ping.stdout).trim(),
        "s \"pong\"",
        "{ping:?}"
    );
    let version = call(&bus, None, "Version");
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        "s \"0.1.0+abcdef012345\""
    );

    // An unprivileged user (nobody) may call the methods too.
    let ping = call(&bus, Some(65534), "Ping");
    assert!(
        ping.status.success(),
        "nobody could not call Ping: {}",
        String::from_utf8_lossy(&ping.stderr)
    );
}

#[test]
fn only_root_may_own_the_name() {
    require("setpriv", "util-linux");
    require_root();
    let bus = SystemBus::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "IMAGE_VERSION=1\n");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let out = run_with_timeout(
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                AGENT,
                "--config",
            ])
            .arg(&config)
            .arg("serve")
            .env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address),
        Duration::from_secs(20),
    )
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a non-root agent must not start: {stderr}"
    );
    assert!(
        stderr.contains("not allowed to own") || stderr.contains("AccessDenied"),
        "{stderr}"
    );
}

#[test]
fn version_without_image_version_is_a_clear_error() {
    require("busctl", "systemd");
    require_root();
    let bus = SystemBus::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "ID=debian\n");
    let _agent = start_agent(&bus, &config);
    let out = call(&bus, None, "Version");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("no IMAGE_VERSION"), "{stderr}");
}
