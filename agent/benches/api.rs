//! The agent's API figures: idle RSS, `Ping` round trip and submit → plan →
//! classification latency, against the release daemon on a private system bus.
//! `cargo bench -p devos-agent --bench api` (as root: the daemon runs as root).

#![allow(clippy::unwrap_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use devos_agent::client::Agent1Proxy;
use support::Daemon;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{name}: n={} p50={:.3} ms p99={:.3} ms max={:.3} ms",
        samples.len(),
        percentile(&samples, 0.5).as_secs_f64() * 1e3,
        percentile(&samples, 0.99).as_secs_f64() * 1e3,
        samples.last().unwrap().as_secs_f64() * 1e3,
    );
}

fn main() {
    // The submit samples leave 1,000 requests waiting for approval.
    let daemon = Daemon::start_with(
        "IMAGE_VERSION=1\n",
        "log-level = \"warn\"\n[limits]\nrequests-per-user = 100000\n",
    );
    let pid = daemon.pid();
    let bus = &daemon.bus;
    // A project in the caller's (root's) home: shared temporary directories are never
    // a working directory.
    let home = std::env::var_os("HOME").map_or_else(|| "/root".into(), std::path::PathBuf::from);
    let project_dir = tempfile::tempdir_in(home).unwrap();
    let project = project_dir.path().to_path_buf();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let conn = zbus::connection::Builder::address(bus.address.as_str())
            .unwrap()
            .build()
            .await
            .unwrap();
        let agent = Agent1Proxy::new(&conn).await.unwrap();
        let start = Instant::now();
        while agent.ping().await.is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "agent did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        println!("idle RSS after start: {} KiB", rss_kib(pid));

        for _ in 0..200 {
            agent.ping().await.unwrap();
        }
        let mut pings = Vec::new();
        for _ in 0..5000 {
            let t = Instant::now();
            agent.ping().await.unwrap();
            pings.push(t.elapsed());
        }
        report("Ping round trip", pings);

        // Requests that need approval: planned and classified, nothing executes, so
        // each sample is the submit path alone.
        let cwd = project.to_string_lossy().into_owned();
        let mut submits = Vec::new();
        let mut internal = Vec::new();
        for i in 0..1000 {
            let text = match i % 4 {
                0 => "create directory build",
                1 => "commit with message \"bench\"",
                2 => "run: git -c core.pager=less log",
                _ => "organise files by type in /usr/share/doc/dbus",
            };
            let t = Instant::now();
            let id = agent.submit(text, &cwd).await.unwrap();
            submits.push(t.elapsed());
            let r: serde_json::Value =
                serde_json::from_str(&agent.get(&id).await.unwrap()).unwrap();
            internal.push(Duration::from_micros(r["plan-micros"].as_u64().unwrap()));
        }
        report(
            "Submit -> plan -> classification (client round trip)",
            submits,
        );
        report(
            "  of which planning + classification inside the agent",
            internal,
        );
        // Read-only requests run in the sandbox: the whole path — planning as the
        // caller, the decision, the namespaces, Landlock and seccomp, `ls` itself,
        // the audit entries.
        let mut runs = Vec::new();
        for _ in 0..300 {
            let t = Instant::now();
            let id = agent.submit("list files", &cwd).await.unwrap();
            loop {
                let r: serde_json::Value =
                    serde_json::from_str(&agent.get(&id).await.unwrap()).unwrap();
                if r["state"] == "done" {
                    break;
                }
                assert!(r["state"] != "failed", "{r}");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            runs.push(t.elapsed());
        }
        report("read-only request end to end (sandboxed `ls`)", runs);
        tokio::time::sleep(Duration::from_secs(2)).await;
        println!("RSS after 1,300 requests: {} KiB", rss_kib(pid));
    });
}
