//! Attacks on the context engine (org.devos.Agent1.Context) found by a red-team round,
//! kept as regressions: each test makes one attempt, as another user or a careless one
//! would, and asserts the promise it tried to break, judged by effects.

#![allow(clippy::unwrap_used)]

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

/// A root-owned sticky world-writable directory (a stand-in for /tmp).
fn shared_sticky(prefix: &str) -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    d
}

/// Mallory's team directory (world-writable and sticky, like /tmp, in a stand-in for
/// it) with a repository at its top, readable by everyone, after `then` ran in it.
fn mallorys_team(mallory: &User, then: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = shared_sticky("rt-tmp-");
    sh(mallory, tmp.path(), "mkdir -m 1777 team");
    let team = tmp.path().join("team");
    sh(
        mallory,
        &team,
        &format!("git init -q -b main . && {then} && chmod -R a+rX .git"),
    );
    (tmp, team)
}

/// The context watchers `agent` runs for `uid` (its children: other tests' daemons
/// run watchers for the same users).
fn watcher_pids(agent: &Daemon, uid: u32) -> Vec<u32> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(meta) = std::fs::metadata(e.path()) else {
            continue;
        };
        if meta.uid() != uid {
            continue;
        }
        let parent = std::fs::read_to_string(e.path().join("status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .and_then(|p| p.trim().parse::<u32>().ok());
        if parent != Some(agent.pid()) {
            continue;
        }
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).contains("context-watch") {
            out.push(pid);
        }
    }
    out
}

fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

// ---------------------------------------------------------------------------------
// 1. Access taken away at the project root is never noticed.

#[test]
fn rt01_a_project_root_made_unlistable_loses_its_entries() {
    let agent = Daemon::start();
    let alice = User::ensure("devos-alice");
    // A team directory alice may read (root's, 0755) with files in it.
    let shared = tempfile::Builder::new()
        .prefix("rt-team-")
        .tempdir_in("/tmp")
        .unwrap();
    let team = shared.path();
    open_up(team, 0o755);
    std::fs::create_dir(team.join("plans")).unwrap();
    std::fs::write(team.join("plans/acquisition-target-zeta.txt"), "x").unwrap();
    std::fs::write(team.join("layoff-list-q3.txt"), "x").unwrap();
    context(&agent, &alice, &["add", team.to_str().unwrap()]);
    project_status(&agent, &alice);
    assert_eq!(found(&agent, &alice, "layoff").len(), 1);
    // The owner takes alice's access away.
    open_up(team, 0o700);
    assert!(
        std::fs::read_dir(team).is_ok(),
        "(root can still list it, alice cannot)"
    );
    let (mut still, mut still2) = (Vec::new(), Vec::new());
    let gone = wait_for(Duration::from_secs(20), || {
        still = found(&agent, &alice, "layoff");
        still2 = found(&agent, &alice, "acquisition");
        still.is_empty() && still2.is_empty()
    });
    let st = context(&agent, &alice, &["status"]);
    assert!(
        gone,
        "alice can no longer list {} yet her index still answers {still:?} {still2:?}; status: {}",
        team.display(),
        st["projects"][0]
    );
}

#[test]
fn rt02_a_project_root_moved_away_is_emptied_and_said() {
    let agent = Daemon::start();
    let alice = User::ensure("devos-alice");
    let project = alice.project();
    let p = project.path().to_path_buf();
    sh(&alice, &p, "echo x > moved-marker-file.txt");
    context(&agent, &alice, &["add", p.to_str().unwrap()]);
    project_status(&agent, &alice);
    assert_eq!(found(&agent, &alice, "moved-marker").len(), 1);
    let away = p.with_extension("away");
    std::fs::rename(&p, &away).unwrap();
    let (mut hits, mut st) = (Vec::new(), serde_json::Value::Null);
    wait_for(Duration::from_secs(20), || {
        hits = found(&agent, &alice, "moved-marker");
        st = context(&agent, &alice, &["status"]);
        hits.is_empty() || st["projects"][0]["mode"] != "watching"
    });
    std::fs::rename(&away, &p).unwrap();
    assert!(
        hits.is_empty() || st["projects"][0]["mode"] != "watching",
        "the project root is gone but the index still lists {hits:?} and says {}",
        st["projects"][0]
    );
}

// ---------------------------------------------------------------------------------
// 2. A repository above the project, made by another user.

#[test]
fn rt03_a_repository_another_user_planted_above_is_not_used() {
    require("git", "git");
    let agent = Daemon::start();
    let alice = User::ensure("devos-alice");
    let mallory = User::ensure("devos-mallory");
    let (_tmp, team) = mallorys_team(
        &mallory,
        "git commit -q --allow-empty -m 'mallory-was-here' && echo '*' > .git/info/exclude",
    );
    let t = &team;
    // Alice works in her own directory below it.
    sh(
        &alice,
        t,
        "mkdir -m 700 alice-work && mkdir alice-work/proj && echo x > alice-work/proj/payroll.rs",
    );
    let p = t.join("alice-work/proj");
    context(&agent, &alice, &["add", p.to_str().unwrap()]);
    project_status(&agent, &alice);
    std::thread::sleep(Duration::from_secs(1));
    let git = context_call(
        &agent,
        Some(&alice),
        "GitState",
        "s",
        &[p.to_str().unwrap()],
    );
    let hit = context(&agent, &alice, &["find", "payroll"]);
    let git_out = stdout(&git);
    let ignored = hit["results"][0]["ignored"] == true;
    assert!(
        !git_out.contains("mallory-was-here") && !ignored,
        "alice's project took mallory's repository (above it, in a shared dir) as its own:\n\
         GitState: {git_out}\nfind: {hit}"
    );
}

#[test]
fn rt04_a_fifo_in_the_git_dir_does_not_hang_the_watcher() {
    require("git", "git");
    let agent = Daemon::start();
    let alice = User::ensure("devos-alice");
    let mallory = User::ensure("devos-mallory");
    let (_tmp, team) = mallorys_team(&mallory, "git commit -q --allow-empty -m m");
    let t = &team;
    sh(
        &alice,
        t,
        "mkdir -m 700 alice-work && mkdir alice-work/proj && echo x > alice-work/proj/one.rs",
    );
    let p = t.join("alice-work/proj");
    context(&agent, &alice, &["add", p.to_str().unwrap()]);
    project_status(&agent, &alice);
    assert_eq!(found(&agent, &alice, "one.rs").len(), 1);
    // Mallory swaps HEAD for a FIFO: alice's watcher re-reads git state and blocks.
    sh(
        &mallory,
        t,
        "mkfifo .git/HEAD.new && chmod 666 .git/HEAD.new && mv -f .git/HEAD.new .git/HEAD",
    );
    std::thread::sleep(Duration::from_secs(2));
    sh(&alice, &p, "echo x > two-after-fifo.rs");
    let (mut hits, mut st) = (Vec::new(), serde_json::Value::Null);
    wait_for(Duration::from_secs(20), || {
        hits = found(&agent, &alice, "two-after-fifo");
        st = context(&agent, &alice, &["status"]);
        !hits.is_empty() || st["watcher"] != "running" || st["projects"][0]["mode"] != "watching"
    });
    // (Unblock the watcher — it is stuck in open() — so the test cleans up.)
    {
        use std::os::unix::fs::OpenOptionsExt;
        let _w = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc_o_nonblock())
            .open(t.join(".git/HEAD"));
    }
    let _ = std::fs::remove_file(t.join(".git/HEAD"));
    assert!(
        !hits.is_empty() || st["watcher"] != "running" || st["projects"][0]["mode"] != "watching",
        "alice's new file is not indexed and status says all is well: {st}"
    );
}

#[test]
fn rt05_repository_programs_never_run_with_config_tricks() {
    require("git", "git");
    let agent = Daemon::start();
    let alice = User::ensure("devos-alice");
    let project = alice.project();
    let p = project.path();
    let pwned = p.join("pwned");
    let evil = p.join("evil.cfg");
    std::fs::write(
        &evil,
        format!(
            "[core]\n\tfsmonitor = \"touch {0}-inc\"\n\tpager = touch {0}-pager\n[diff \"x\"]\n\ttextconv = touch {0}-textconv\n",
            pwned.display()
        ),
    )
    .unwrap();
    std::os::unix::fs::chown(&evil, Some(alice.uid), Some(alice.uid)).unwrap();
    sh(
        &alice,
        p,
        &format!(
            "git init -q -b main . && echo a > a.txt && git add a.txt && git -c core.fsmonitor= commit -qm first \
             && git config include.path {evil} \
             && git config 'includeIf.gitdir:/.path' {evil} \
             && git config extensions.worktreeConfig true \
             && printf '[core]\\n\\tfsmonitor = touch {pw}-wt\\n' > .git/config.worktree \
             && git config 'remote.origin.url' 'ext::sh -c touch% {pw}-ext' \
             && git config 'remote.origin.promisor' true \
             && git config 'extensions.partialClone' origin \
             && git config 'core.sshCommand' 'touch {pw}-ssh' \
             && echo '* diff=x' > .gitattributes && echo '* diff=x filter=y' > .git/info/attributes \
             && mkdir -p .git/hooks && printf '#!/bin/sh\\ntouch {pw}-hook\\n' > .git/hooks/post-index-change \
             && chmod +x .git/hooks/post-index-change && echo changed > a.txt && echo n > new.txt",
            evil = evil.display(),
            pw = pwned.display()
        ),
    );
    context(&agent, &alice, &["add", p.to_str().unwrap()]);
    project_status(&agent, &alice);
    std::thread::sleep(Duration::from_secs(2));
    let st = context(&agent, &alice, &["git", p.to_str().unwrap()]);
    let ran: Vec<String> = std::fs::read_dir(p)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("pwned"))
        .collect();
    assert!(ran.is_empty(), "programs ran: {ran:?}; state {st}");
}

// ---------------------------------------------------------------------------------
// 3. Limits.

#[test]
fn rt06_concurrent_adds_keep_to_max_projects() {
    let agent = Daemon::start_with("ID=debian\n", "[context]\nmax-projects = 2\n");
    let alice = User::ensure("devos-alice");
    let dirs: Vec<tempfile::TempDir> = (0..8).map(|_| alice.project()).collect();
    let handles: Vec<_> = dirs
        .iter()
        .map(|d| {
            let path = d.path().to_str().unwrap().to_owned();
            let addr = agent.bus.address.clone();
            let uid = alice.uid;
            std::thread::spawn(move || {
                Command::new("setpriv")
                    .arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={uid}"))
                    .arg("--init-groups")
                    .arg("busctl")
                    .arg(format!("--address={addr}"))
                    .args([
                        "call",
                        "org.devos.Agent1",
                        "/org/devos/Agent1",
                        "org.devos.Agent1.Context",
                        "AddProject",
                        "sb",
                        &path,
                        "false",
                    ])
                    .output()
                    .unwrap()
            })
        })
        .collect();
    let ok = handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .filter(|o| o.status.success())
        .count();
    let list = context(&agent, &alice, &["list"]);
    let n = list.as_array().unwrap().len();
    assert!(
        n <= 2,
        "max-projects = 2 but {ok} concurrent adds succeeded and {n} projects are registered"
    );
}

#[test]
fn rt07_max_files_holds_across_projects_and_rescans() {
    let agent = Daemon::start_with("ID=debian\n", "[context]\nmax-files = 50\n");
    let alice = User::ensure("devos-alice");
    let a = alice.project();
    let b = alice.project();
    sh(
        &alice,
        a.path(),
        "for i in $(seq 1 40); do echo > a$i; done",
    );
    sh(
        &alice,
        b.path(),
        "for i in $(seq 1 40); do echo > b$i; done",
    );
    context(&agent, &alice, &["add", a.path().to_str().unwrap()]);
    context(&agent, &alice, &["add", b.path().to_str().unwrap()]);
    std::thread::sleep(Duration::from_secs(3));
    // Churn: make and remove directories to trigger sub-scans.
    sh(
        &alice,
        a.path(),
        "for i in $(seq 1 10); do mkdir d$i; echo > d$i/f; done",
    );
    let mut st = serde_json::Value::Null;
    wait_for(Duration::from_secs(20), || {
        st = context(&agent, &alice, &["status"]);
        st["full"].is_string()
    });
    assert!(st["entries"].as_u64().unwrap() <= 50, "{st}");
    assert!(st["full"].is_string(), "status must say FULL: {st}");
}

#[test]
fn rt08_a_text_project_does_not_make_the_daemon_buffer_huge_lines() {
    let agent = Daemon::start();
    let alice = User::ensure("devos-alice");
    let project = alice.project();
    let p = project.path();
    // 400 files of 64000 bytes of \x01: valid UTF-8, no NUL, so "text"; each byte is
    // six in JSON (\u0001), and 2000 files go in one line.
    sh(
        &alice,
        p,
        "head -c 64000 /dev/zero | tr '\\0' '\\001' > seed && for i in $(seq 1 400); do cp seed f$i.txt; done && rm seed",
    );
    let before = vm_hwm_kib(agent.pid());
    let out = agent.devos(
        Some(&alice),
        p,
        &["context", "add", "--text", p.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    project_status(&agent, &alice);
    std::thread::sleep(Duration::from_secs(2));
    let after = vm_hwm_kib(agent.pid());
    let grew_mib = (after.saturating_sub(before)) / 1024;
    eprintln!(
        "daemon VmHWM {before} KiB -> {after} KiB (+{grew_mib} MiB) for 400 files of 62.5 KiB"
    );
    assert!(
        grew_mib < 64,
        "the root daemon's peak memory grew by {grew_mib} MiB from one user's 25 MiB of files \
         (one JSON line per 2000 entries; scales to ~1 GiB per batch)"
    );
}

#[test]
fn rt09_a_deep_tree_is_scanned() {
    let agent = Daemon::start();
    let alice = User::ensure("devos-alice");
    let project = alice.project();
    let p = project.path();
    // A chain of 1800 one-letter directories (path under PATH_MAX), one file in each.
    sh(
        &alice,
        p,
        "d=.; for i in $(seq 1 1800); do d=$d/a; done; mkdir -p $d && \
         d=.; for i in $(seq 1 1800); do d=$d/a; echo > $d/f; done",
    );
    context(&agent, &alice, &["add", p.to_str().unwrap()]);
    let mut st = Value::Null;
    let done = wait_for(Duration::from_secs(120), || {
        st = context(&agent, &alice, &["status"])["projects"][0].clone();
        st["scanned-at"].is_number()
    });
    assert!(
        done,
        "a 1,800-deep chain of 3,600 entries was not scanned: {st}"
    );
    assert_eq!(st["entries"], 3600, "{st}");
}

// ---------------------------------------------------------------------------------
// 4. Queries.

#[test]
fn rt10_odd_queries_answer_or_refuse_and_the_daemon_stays_up() {
    let agent = Daemon::start();
    let alice = User::ensure("devos-alice");
    let project = alice.project();
    let p = project.path();
    sh(
        &alice,
        p,
        "echo 'hello world' > a.txt && printf 'x' > 'new\nline.txt'",
    );
    let out = agent.devos(
        Some(&alice),
        p,
        &["context", "add", "--text", p.to_str().unwrap()],
    );
    assert!(out.status.success());
    project_status(&agent, &alice);
    let mut report = Vec::new();
    for q in [
        "\"",
        "*",
        "**",
        "\"\"*",
        "NEAR(a b)",
        "^hello",
        "hello:world",
        "-x",
        "a OR b",
        "(",
        ")",
        "hel*lo",
        "{a b}",
        "NOT",
        "AND",
        "x\u{202e}y",
        "\u{1F600}",
        "ééé",
        "'",
        "%",
        "_",
    ] {
        for m in ["Find", "FindText"] {
            let o = context_call(&agent, Some(&alice), m, "su", &[q, "5"]);
            report.push(format!(
                "{m}({q:?}) -> {} {}",
                o.status.success(),
                stderr(&o).trim()
            ));
        }
    }
    let long = "abc".repeat(30_000);
    for m in ["Find", "FindText"] {
        let t = Instant::now();
        let o = context_call(&agent, Some(&alice), m, "su", &[&long, "5"]);
        report.push(format!(
            "{m}(90k chars) -> {} in {:?}",
            o.status.success(),
            t.elapsed()
        ));
    }
    for since in [
        "584942417355y",
        "-1",
        "1e9",
        "99999999999999999999",
        "-9223372036854775808",
    ] {
        let o = context_call(&agent, Some(&alice), "Recent", "su", &[since, "5"]);
        report.push(format!(
            "Recent({since:?}) -> {} {}",
            o.status.success(),
            stderr(&o).trim()
        ));
    }
    for g in ["", "/", "relative", "/proc/self", "//"] {
        let o = context_call(&agent, Some(&alice), "GitState", "s", &[g]);
        report.push(format!(
            "GitState({g:?}) -> {} {}",
            o.status.success(),
            stderr(&o).trim()
        ));
    }
    eprintln!("{}", report.join("\n"));
    let st = context_call(&agent, Some(&alice), "Status", "", &[]);
    assert!(
        st.status.success(),
        "the daemon stopped answering: {}\n{}",
        stderr(&st),
        report.join("\n")
    );
    let nl = found(&agent, &alice, "line.txt");
    eprintln!("newline name: {nl:?}");
}

#[test]
fn rt11_one_users_huge_queries_are_refused_and_others_are_answered() {
    let agent = Daemon::start();
    let alice = User::ensure("devos-alice");
    let mallory = User::ensure("devos-mallory");
    let a = alice.project();
    context(&agent, &alice, &["add", a.path().to_str().unwrap()]);
    let m = mallory.project();
    sh(
        &mallory,
        m.path(),
        "for i in $(seq 1 3000); do : > aa$i; done",
    );
    context(&agent, &mallory, &["add", m.path().to_str().unwrap()]);
    let done = wait_for(Duration::from_secs(30), || {
        context(&agent, &mallory, &["status"])["entries"].as_u64() == Some(3000)
    });
    assert!(done);
    // Thousands of short words, each of which would be checked against every
    // candidate (the attack sent 150,000 from a D-Bus client; busctl's argument must
    // stay under the kernel's 128 KiB).
    let query = "aa ".repeat(20_000);
    for method in ["Find", "FindText"] {
        let out = context_call(&agent, Some(&mallory), method, "su", &[&query, "10"]);
        assert!(!out.status.success(), "{method} took a 60 KB query");
        assert!(
            stderr(&out).contains("at most 16 words"),
            "{}",
            stderr(&out)
        );
    }
    let out = context_call(&agent, Some(&alice), "Status", "", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
}

// ---------------------------------------------------------------------------------
// 5. Project boundaries.

#[test]
fn rt12_a_project_swapped_for_a_symlink_to_proc_is_not_entered_on_resume() {
    let agent = Daemon::start_with("ID=debian\n", "[context]\nmax-files = 3000\n");
    let mallory = User::ensure("devos-mallory");
    let project = mallory.project();
    let p = project.path().to_path_buf();
    context(&agent, &mallory, &["add", p.to_str().unwrap()]);
    project_status(&agent, &mallory);
    // Swap the directory for a symlink, then make the watcher start again.
    let real = p.with_extension("real");
    std::fs::rename(&p, &real).unwrap();
    std::os::unix::fs::symlink("/proc/self/..", &p).unwrap();
    std::os::unix::fs::lchown(&p, Some(mallory.uid), Some(mallory.uid)).unwrap();
    for pid in watcher_pids(&agent, mallory.uid) {
        let _ = Command::new("setpriv")
            .arg(format!("--reuid={}", mallory.uid))
            .arg(format!("--regid={}", mallory.uid))
            .arg("--init-groups")
            .args(["kill", "-9", &pid.to_string()])
            .status();
    }
    std::thread::sleep(Duration::from_secs(8));
    let hits = found(&agent, &mallory, "cmdline");
    let st = context(&agent, &mallory, &["status"]);
    std::fs::remove_file(&p).unwrap();
    std::fs::rename(&real, &p).unwrap();
    assert!(
        hits.is_empty(),
        "/proc was indexed through the project path ({} entries): {:?}",
        st["entries"],
        &hits[..hits.len().min(5)]
    );
}

#[test]
fn rt13_killing_the_watcher_repeatedly_is_reported() {
    let agent = Daemon::start();
    let alice = User::ensure("devos-alice");
    let project = alice.project();
    let p = project.path();
    context(&agent, &alice, &["add", p.to_str().unwrap()]);
    project_status(&agent, &alice);
    for _ in 0..7 {
        for pid in watcher_pids(&agent, alice.uid) {
            let _ = nix_kill(pid);
        }
        std::thread::sleep(Duration::from_millis(2500));
    }
    std::thread::sleep(Duration::from_secs(3));
    sh(&alice, p, "echo x > after-kills.txt");
    let (mut hits, mut st) = (Vec::new(), serde_json::Value::Null);
    wait_for(Duration::from_secs(20), || {
        st = context(&agent, &alice, &["status"]);
        hits = found(&agent, &alice, "after-kills");
        !hits.is_empty() || st["watcher"] != "running"
    });
    assert!(
        !hits.is_empty() || st["watcher"] != "running",
        "the file is not indexed and status says {st}"
    );
    eprintln!("after 7 kills: watcher = {}", st["watcher"]);
}

fn nix_kill(pid: u32) -> bool {
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap()
        .success()
}

#[test]
fn rt14_other_users_paths_and_root_as_project() {
    let agent = Daemon::start_with("ID=debian\n", "[context]\nmax-files = 500\n");
    let alice = User::ensure("devos-alice");
    let bob = User::ensure("devos-bob");
    let b = bob.project();
    std::fs::write(b.path().join("bob-secret.txt"), "x").unwrap();
    let mut report = Vec::new();
    for dir in [
        PathBuf::from("/"),
        b.path().to_path_buf(),
        PathBuf::from("/proc/1/root"),
        PathBuf::from("/run/user"),
        PathBuf::from("/sys"),
        PathBuf::from("/dev/shm"),
    ] {
        let o = context_call(
            &agent,
            Some(&alice),
            "AddProject",
            "sb",
            &[dir.to_str().unwrap(), "false"],
        );
        report.push(format!(
            "{} -> {} {}",
            dir.display(),
            o.status.success(),
            stderr(&o).trim()
        ));
    }
    eprintln!("{}", report.join("\n"));
    std::thread::sleep(Duration::from_secs(5));
    let hits = found(&agent, &alice, "bob-secret");
    let st = context(&agent, &alice, &["status"]);
    eprintln!("alice projects: {}", st["projects"]);
    assert!(hits.is_empty(), "{hits:?}");
    // Bob asks about alice's state: nothing.
    let o = context_call(&agent, Some(&bob), "GitState", "s", &[""]);
    assert!(!stdout(&o).contains("devos-alice"), "{}", stdout(&o));
}

fn libc_o_nonblock() -> i32 {
    0o4000
}

#[test]
fn rt15_recent_with_a_huge_duration_is_answered() {
    let agent = Daemon::start();
    let alice = User::ensure("devos-alice");
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={}", alice.uid))
        .arg(format!("--regid={}", alice.uid))
        .arg("--init-groups")
        .arg("busctl")
        .arg(format!("--address={}", agent.bus.address))
        .args([
            "--timeout=30",
            "call",
            "org.devos.Agent1",
            "/org/devos/Agent1",
            "org.devos.Agent1.Context",
            "Recent",
            "su",
            "9223372036854775808s",
            "5",
        ]);
    let o = cmd.output().unwrap();
    let alive = context_call(&agent, Some(&alice), "Status", "", &[])
        .status
        .success();
    assert!(
        o.status.success() && alive,
        "Recent(\"9223372036854775808s\") got no answer ({}); daemon alive: {alive}",
        stderr(&o).trim()
    );
}

#[test]
fn rt16_a_watcher_its_user_stopped_holds_up_no_one() {
    let agent = Daemon::start();
    // (A user of its own: other tests here kill devos-alice's watchers.)
    let alice = User::ensure("devos-stopper");
    let bob = User::ensure("devos-bob");
    let project = alice.project();
    let p = project.path();
    context(&agent, &alice, &["add", p.to_str().unwrap()]);
    project_status(&agent, &alice);
    let stopped = watcher_pids(&agent, alice.uid);
    assert!(!stopped.is_empty());
    for pid in &stopped {
        assert!(
            Command::new("kill")
                .args(["-STOP", &pid.to_string()])
                .status()
                .unwrap()
                .success()
        );
    }
    // Far more commands than a pipe holds, all at once, to a watcher that reads none.
    let long = format!("{}/{}", p.display(), "a".repeat(4000));
    let started = Instant::now();
    let answers: Vec<std::process::Output> = std::thread::scope(|s| {
        let adds: Vec<_> = (0..100)
            .map(|_| {
                s.spawn(|| {
                    context_call(&agent, Some(&alice), "AddProject", "sb", &[&long, "false"])
                })
            })
            .collect();
        // Meanwhile everyone else is answered.
        std::thread::sleep(Duration::from_secs(2));
        let bobs = bob.project();
        let out = agent.devos(Some(&bob), bobs.path(), &["run", "list", "files"]);
        assert!(out.status.success(), "{}", stderr(&out));
        adds.into_iter().map(|a| a.join().unwrap()).collect()
    });
    eprintln!("100 adds answered in {:?}", started.elapsed());
    assert!(answers.iter().all(|o| !o.status.success()));
    assert!(
        answers
            .iter()
            .any(|o| stderr(o).contains("did not read its commands")),
        "{}",
        stderr(&answers[0])
    );
    // The stopped watcher was killed; a new one serves alice.
    std::thread::sleep(Duration::from_secs(1));
    let running = watcher_pids(&agent, alice.uid);
    assert!(stopped.iter().all(|p| !running.contains(p)), "{running:?}");
    std::thread::sleep(Duration::from_secs(3));
    sh(&alice, p, "echo x > after-the-stop.txt");
    assert!(
        wait_for(Duration::from_secs(30), || !found(
            &agent,
            &alice,
            "after-the-stop"
        )
        .is_empty()),
        "{}",
        context(&agent, &alice, &["status"])
    );
}
