//! The context engine's figures on a generated tree of 100,000 files in 5,000
//! directories: time to the first complete index, a change visible to `Find` (p99),
//! `Find` latency (p99), the index's size, the agent's and the watcher's RSS with that
//! index, and their CPU while nothing changes. Against the release daemon on a private
//! system bus. `cargo bench -p devos-agent --bench context` (as root).

#![allow(clippy::unwrap_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use devos_agent::client::ContextProxy;
use support::Daemon;

const DIRS_TOP: usize = 50;
const DIRS_EACH: usize = 100;
const FILES_EACH: usize = 20;

fn proc_field(pid: u32, file: &str, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// utime + stime of `pid`, clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    rest[11].parse::<u64>().unwrap() + rest[12].parse::<u64>().unwrap()
}

/// The daemon's `context-watch` child (started from any of its threads).
fn watcher_pid(daemon: u32) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let ppid: u32 = stat
            .rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        (ppid == daemon && String::from_utf8_lossy(&cmd).contains("context-watch")).then_some(pid)
    })
}

fn p(sorted: &[Duration], q: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1e3
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{name}: n={} p50={:.2} ms p99={:.2} ms max={:.2} ms",
        samples.len(),
        p(&samples, 0.5),
        p(&samples, 0.99),
        samples.last().unwrap().as_secs_f64() * 1e3
    );
}

fn main() {
    let daemon = Daemon::start_with("ID=debian\n", "log-level = \"warn\"\n");
    let pid = daemon.pid();
    let home = std::env::var_os("HOME").map_or_else(|| "/root".into(), std::path::PathBuf::from);
    let tree = tempfile::tempdir_in(home).unwrap();
    let root = tree.path().to_path_buf();
    let t = Instant::now();
    for a in 0..DIRS_TOP {
        for b in 0..DIRS_EACH {
            let dir = root.join(format!("mod{a:02}/pkg{b:03}"));
            std::fs::create_dir_all(&dir).unwrap();
            for f in 0..FILES_EACH {
                let ext = ["rs", "py", "md", "toml"][f % 4];
                std::fs::write(dir.join(format!("file_{a:02}_{b:03}_{f:02}.{ext}")), "x").unwrap();
            }
        }
    }
    println!(
        "generated {} files in {} directories in {:.1} s",
        DIRS_TOP * DIRS_EACH * FILES_EACH,
        DIRS_TOP * DIRS_EACH + DIRS_TOP,
        t.elapsed().as_secs_f64()
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let conn = zbus::connection::Builder::address(daemon.bus.address.as_str())
            .unwrap()
            .build()
            .await
            .unwrap();
        let ctx = ContextProxy::new(&conn).await.unwrap();
        let status = || async {
            serde_json::from_str::<serde_json::Value>(&ctx.status().await.unwrap()).unwrap()
        };

        let start = Instant::now();
        ctx.add_project(root.to_str().unwrap(), false)
            .await
            .unwrap();
        loop {
            let s = status().await;
            if s["projects"][0]["scanned-at"].is_number() {
                println!(
                    "first index: {:.2} s ({} entries; the watcher's scan {} ms)",
                    start.elapsed().as_secs_f64(),
                    s["entries"],
                    s["projects"][0]["scan-millis"]
                );
                println!("mode: {}", s["projects"][0]["mode"]);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let mut finds = Vec::new();
        for i in 0..500 {
            let q = match i % 4 {
                0 => format!("file_{:02}_{:03}", i % DIRS_TOP, i % DIRS_EACH),
                1 => format!("pkg{:03} toml", i % DIRS_EACH),
                2 => "readme".to_owned(),
                _ => format!("mod{:02} {:02}.rs", i % DIRS_TOP, i % FILES_EACH),
            };
            let t = Instant::now();
            ctx.find(&q, 20).await.unwrap();
            finds.push(t.elapsed());
        }
        report("Find (20 results)", finds);

        let mut visible = Vec::new();
        for i in 0..100 {
            let name = format!("fresh_{i:04}.txt");
            let path = root.join(format!(
                "mod{:02}/pkg{:03}/{name}",
                i % DIRS_TOP,
                (i * 7) % DIRS_EACH
            ));
            let t = Instant::now();
            std::fs::write(&path, "new").unwrap();
            loop {
                let hits: serde_json::Value =
                    serde_json::from_str(&ctx.find(&name, 1).await.unwrap()).unwrap();
                if hits["results"].as_array().is_some_and(|r| !r.is_empty()) {
                    break;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "{name} never appeared"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            visible.push(t.elapsed());
        }
        report("a new file visible to Find", visible);

        let s = status().await;
        println!(
            "index size: {:.1} MB ({} entries)",
            s["index-bytes"].as_u64().unwrap() as f64 / 1e6,
            s["entries"]
        );
        let watcher = watcher_pid(pid).unwrap();
        println!(
            "RSS with the index: agent {} KiB, watcher {} KiB",
            proc_field(pid, "status", "VmRSS:"),
            proc_field(watcher, "status", "VmRSS:")
        );
        let (a0, w0) = (cpu_ticks(pid), cpu_ticks(watcher));
        tokio::time::sleep(Duration::from_secs(10)).await;
        let ticks = 100.0;
        println!(
            "CPU while idle (10 s): agent {:.2}%, watcher {:.2}%",
            (cpu_ticks(pid) - a0) as f64 / ticks / 10.0 * 100.0,
            (cpu_ticks(watcher) - w0) as f64 / ticks / 10.0 * 100.0
        );
    });
}
