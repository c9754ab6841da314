//! The agent's API figures: idle RSS, `Ping` round trip, submit → plan →
//! classification latency, and the model route's own overhead per model round trip
//! and tokens per task (against a stand-in Bedrock that answers at once), against the
//! release daemon on a private system bus.
//! `cargo bench -p devos-agent --bench api` (as root: the daemon runs as root).

#![allow(clippy::unwrap_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use devos_agent::client::Agent1Proxy;
use devos_tests::bedrock::{Reply, StandIn};
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
    let standin = StandIn::start().unwrap();
    // The submit samples leave 1,000 requests waiting for approval.
    let daemon = Daemon::start_with_env(
        "IMAGE_VERSION=1\n",
        &format!(
            "log-level = \"warn\"\n[limits]\nrequests-per-user = 100000\n\
             [model]\nregion = \"us-east-1\"\nendpoint-url = \"{}\"\n",
            standin.endpoint()
        ),
        &[
            ("AWS_EC2_METADATA_DISABLED", "true"),
            ("AWS_ACCESS_KEY_ID", "AKIDBENCH"),
            ("AWS_SECRET_ACCESS_KEY", "bench"),
            ("AWS_CONFIG_FILE", "/dev/null"),
            ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
        ],
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
        model_route(&agent, &standin, &project).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        println!(
            "RSS after 1,300 requests and 1,000 model requests: {} KiB",
            rss_kib(pid)
        );
    });
}

/// Submit `text` straight to the model and wait until it is done: the time it took,
/// and the part of it the agent spent waiting for the model's answers.
async fn model_request(agent: &Agent1Proxy<'_>, cwd: &str, text: &str) -> (Duration, Duration) {
    let t = Instant::now();
    let id = agent.submit_to_model(text, cwd, "small").await.unwrap();
    loop {
        let r: serde_json::Value = serde_json::from_str(&agent.get(&id).await.unwrap()).unwrap();
        if r["state"] == "done" {
            let waited = Duration::from_micros(r["usage"]["model-micros"].as_u64().unwrap());
            return (t.elapsed(), waited);
        }
        assert!(
            !["failed", "cancelled", "denied"].contains(&r["state"].as_str().unwrap()),
            "{r}"
        );
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

/// The model route's own cost, the stand-in answering at once: a one-call request
/// end to end, the overhead each further model round trip adds (a context tool call,
/// answered by the planning helper as the caller, then the next model call), and the
/// tokens a typical three-step task sends.
async fn model_route(agent: &Agent1Proxy<'_>, standin: &StandIn, project: &std::path::Path) {
    let cwd = project.to_string_lossy().into_owned();
    std::fs::write(project.join("Cargo.toml"), "[package]\nname = \"bench\"\n").unwrap();
    std::fs::write(
        project.join("build.log"),
        "error[E0425]: cannot find value `x` in this scope\n".repeat(20),
    )
    .unwrap();
    for _ in 0..20 {
        standin.push(Reply::text("ok"));
        model_request(agent, &cwd, "hello").await;
    }
    // The agent's own time per model round trip: the whole request less the time
    // spent waiting for the model, per model call.
    let mut one = Vec::new();
    let mut waits = Vec::new();
    for _ in 0..500 {
        standin.push(Reply::text("ok"));
        let (whole, waited) = model_request(agent, &cwd, "hello").await;
        one.push(whole.saturating_sub(waited));
        waits.push(waited);
    }
    const STEPS: u32 = 5;
    let mut per_step = Vec::new();
    for _ in 0..100 {
        for _ in 0..STEPS {
            standin.push(Reply::tool("project_info", serde_json::json!({})));
        }
        standin.push(Reply::text("ok"));
        let (whole, waited) = model_request(agent, &cwd, "look around").await;
        per_step.push(whole.saturating_sub(waited) / (STEPS + 1));
    }
    report(
        "model request with one call: the agent's own time (submit -> done, less the model's)",
        one,
    );
    report(
        "  the model's answer as the agent waited for it (stand-in, at once)",
        waits,
    );
    report(
        "  per model round trip in a 6-call request (a context tool call + the next call)",
        per_step,
    );

    // A typical three-step task: look at the project, read the log, answer.
    let before = standin.requests().len();
    standin.push(Reply::tool("list_dir", serde_json::json!({ "path": "." })));
    standin.push(Reply::tool(
        "read_file",
        serde_json::json!({ "path": "build.log" }),
    ));
    standin.push(Reply::text("The build fails on an undefined `x`."));
    model_request(agent, &cwd, "why does the build fail?").await;
    let sent = standin.requests();
    let bodies: Vec<&serde_json::Value> = sent[before..].iter().map(|r| &r.body).collect();
    let size = |v: &serde_json::Value| v.to_string().len();
    let fixed = size(&bodies[0]["system"]) + size(&bodies[0]["toolConfig"]);
    let total: usize = bodies.iter().map(|b| size(b)).sum();
    println!(
        "three-step task: {} model calls, {} bytes of request JSON (~{} tokens at 4 bytes each); \
         system prompt + tool definitions {} bytes per call (~{} tokens, a cache read after the first call \
         where the model caches); first user turn with its context {} bytes",
        bodies.len(),
        total,
        total / 4,
        fixed,
        fixed / 4,
        size(&bodies[0]["messages"][0]),
    );
}
