//! Content-addressed builds as a user runs them: the registry commands, stage reuse
//! after small changes, corrupted cache entries, builds killed at every stage,
//! concurrent builds, garbage collection, and two builds from scratch being
//! bit-for-bit identical.
//!
//! The builds share one cache under `target/test-cache` (seeded with the default
//! cache's downloaded packages, so they are not fetched twice) and each test has its
//! own registry. The tests here take the build lock in turn: two image builds at once
//! on a 2-core machine only make both slow.

// Test helpers fail the test by panicking, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use serde_json::Value;

mod common;

use common::{Env, HEAVY, flip_byte, ok, run};
use devos_tests::Steps;

/// How a build's log shows mmdebstrap run (in namespaces of its own).
const MMDEBSTRAP: &str = "$ unshare --pid --kill-child=SIGKILL --mount-proc -- mmdebstrap ";

/// Start a build and SIGKILL it once its log shows `marker` and `ready` (given the
/// log so far, called after each line from the marker on) says the stage is under
/// way. Returns the log.
fn kill_at(
    env: &Env,
    spec: &Path,
    marker: &str,
    extra: &[&str],
    ready: &dyn Fn(&str) -> bool,
) -> String {
    let mut cmd = env.build_cmd(spec, extra);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut log = String::new();
    let mut killed = false;
    let mut seen = false;
    for line in stderr.lines() {
        let line = line.unwrap();
        log.push_str(&line);
        log.push('\n');
        seen |= line.contains(marker);
        if seen && ready(&log) {
            // A moment into the stage, so it is really running when it dies.
            std::thread::sleep(Duration::from_millis(700));
            child.kill().unwrap();
            killed = true;
            break;
        }
    }
    let status = child.wait().unwrap();
    assert!(killed, "the build never reached `{marker}`:\n{log}");
    assert!(
        !status.success(),
        "the build finished before it was killed:\n{log}"
    );
    log
}

/// The work directory of the build whose log is `log`, once it ran mmdebstrap.
fn work_dir(log: &str) -> Option<String> {
    let line = log.lines().find(|l| l.contains(MMDEBSTRAP))?;
    // The first path holding it (in a hook's quoted words, or the target itself).
    let at = line.find("/.build-")?;
    let in_path = |c: char| c.is_ascii_alphanumeric() || "/-_.".contains(c);
    let start = line[..at].rfind(|c| !in_path(c)).map_or(0, |i| i + 1);
    let name = at + "/.build-".len();
    let end = line[name..]
        .find(|c: char| !c.is_ascii_alphanumeric() && c != '_')
        .map_or(line.len(), |i| name + i);
    Some(line[start..end].to_owned())
}

/// The processes whose command line names `text`.
fn processes_naming(text: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(text))
        .collect()
}

/// Whether the mmdebstrap that `log` started has mounted something in its tree (in
/// its own mount namespace, seen through its processes), waiting up to two minutes.
fn mmdebstrap_mounted(log: &str) -> bool {
    let Some(work) = work_dir(log) else {
        return false;
    };
    let mounted = || {
        std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
            std::fs::read_to_string(e.path().join("mountinfo")).is_ok_and(|m| {
                m.lines()
                    .any(|l| l.contains(&work) && l.contains(" - proc "))
            })
        })
    };
    assert!(
        devos_tests::wait_for(Duration::from_secs(120), mounted),
        "mmdebstrap never mounted proc in its tree"
    );
    true
}

fn plan_version(env: &Env, spec: &Path) -> String {
    let mut c = env.cmd(&["image", "plan", "--json"]);
    c.arg(spec).arg("--agent-deb").arg(&env.agent_deb);
    let out = run(&mut c, 5);
    ok(&out);
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    plan["version"].as_str().unwrap().to_owned()
}

#[test]
fn incremental_builds_registry_kills_and_gc() {
    let steps = Steps::default();
    steps.at("set up");
    let _heavy = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new();
    let spec = env.spec("devos-a.toml", |t| t);
    let out_dir = env.out(&spec).join("current");

    // `image plan` says what the build will be, without building it.
    steps.at("`image plan` says what the build will be, without building it");
    let planned = plan_version(&env, &spec);
    let (first, _) = env.build(&spec, &[]);
    let v1 = first["manifest"]["version"].as_str().unwrap().to_owned();
    assert_eq!(v1, planned);
    let status = env.json(&["cache", "status", "--json"]);
    let kinds: Vec<&str> = status["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"base") && kinds.contains(&"tree"),
        "{status:#}"
    );

    // No change: nothing is built.
    steps.at("No change");
    let (again, _) = env.build(&spec, &[]);
    assert_eq!(again["fresh"], false);
    // A dry run says so (exit 3): built and recorded in the registry.
    let dry_run = run(&mut env.build_cmd(&spec, &["--dry-run"]), 5);
    assert_eq!(dry_run.status.code(), Some(3));

    // A version whose output lost a file (by hand, an interrupted removal) is built
    // again, not taken as up to date because its manifest is there.
    steps.at("A version missing a file is built again");
    let qcow2 = out_dir.join(format!("devos-debian-{v1}.qcow2"));
    std::fs::remove_file(&qcow2).unwrap();
    let dry_run = run(&mut env.build_cmd(&spec, &["--dry-run"]), 5);
    assert_eq!(dry_run.status.code(), Some(0), "the dry run says it builds");
    let (again, log) = env.build(&spec, &[]);
    assert_eq!(again["fresh"], true, "{log}");
    assert!(log.contains("is incomplete"), "{log}");
    assert_eq!(again["manifest"]["version"], v1.as_str());
    assert!(qcow2.is_file());

    // A test-only change does not change the image.
    steps.at("A test-only change does not change the image");
    let tests_changed = env.spec("devos-a.toml", |t| {
        t.replace("systemctl is-active devos-agent.service", "true")
    });
    let (same, _) = env.build(&tests_changed, &[]);
    assert_eq!(same["manifest"]["version"], v1.as_str());
    assert_eq!(same["fresh"], false);

    // A configuration change reuses the base tree: no mmdebstrap. (Spec a's own tree
    // may come from an earlier run's cache; this one cannot.)
    steps.at("A configuration change reuses the base tree");
    let config = env.fresh_spec("devos-b.toml", |t| {
        t.replace("log-level = \"info\"", "log-level = \"debug\"")
    });
    let (second, log) = env.build(&config, &[]);
    let v2 = second["manifest"]["version"].as_str().unwrap().to_owned();
    assert_ne!(v2, v1);
    assert!(log.contains("base tree restored from the cache"), "{log}");
    assert!(!log.contains(MMDEBSTRAP), "{log}");

    // The registry: list, show, diff, verify.
    steps.at("The registry");
    let versions = env.versions();
    assert_eq!(versions.len(), 2, "{versions:?}");
    let a = format!("devos-debian@{v1}");
    let b = format!("devos-debian@{v2}");
    let show = env.json(&["image", "show", &b, "--json"]);
    assert_eq!(show["build_id"], second["manifest"]["build_id"]);
    assert!(show["files"].as_u64().unwrap() > 1000);
    let diff = env.json(&["image", "diff", &a, &b, "--json"]);
    assert!(
        diff["packages_changed"].as_array().unwrap().is_empty(),
        "{diff:#}"
    );
    let changed: Vec<&str> = diff["files_changed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert!(
        changed
            .iter()
            .any(|f| f.starts_with("/etc/devos/agent.toml (content")),
        "{changed:?}"
    );
    assert!(
        changed.iter().any(|f| f.starts_with("/usr/lib/os-release")),
        "{changed:?}"
    );
    let verify = env.json(&["image", "verify", &b, "--json"]);
    assert_eq!(verify["ok"], true, "{verify:#}");

    // A flipped byte in an artifact fails verification, naming the file.
    steps.at("A flipped byte in an artifact fails verification, naming the file");
    let qcow2 = env
        .out(&config)
        .join("current")
        .join(format!("devos-debian-{v2}.qcow2"));
    flip_byte(&qcow2);
    let out = run(&mut env.cmd(&["image", "verify", &b]), 5);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("devos-debian-{v2}.qcow2")) && text.contains("MISMATCH"),
        "{text}"
    );

    // A corrupted base entry is detected, rebuilt and not used.
    steps.at("A corrupted base entry is detected, rebuilt and not used");
    let base_key = second["manifest"]["cache_keys"]["base"].as_str().unwrap();
    flip_byte(
        &env.cache
            .join("stages/base")
            .join(base_key)
            .join("tree.tar.zst"),
    );
    let corrupt = env.fresh_spec("devos-c.toml", |t| {
        t.replace("log-level = \"info\"", "log-level = \"warn\"")
    });
    let (third, log) = env.build(&corrupt, &[]);
    assert!(log.contains("is corrupt"), "{log}");
    assert!(log.contains(MMDEBSTRAP), "{log}");
    assert_eq!(third["manifest"]["cache_keys"]["base"], base_key);
    assert!(
        env.cache
            .join("stages/base")
            .join(base_key)
            .join("entry.json")
            .is_file()
    );

    // Killed at any stage: no registry entry, nothing under the final name, and the
    // next build succeeds, reusing what was valid.
    steps.at("Killed at any stage");
    let killed = env.fresh_spec("devos-d.toml", |t| {
        t.replace("log-level = \"info\"", "log-level = \"error\"")
    });
    let v4 = plan_version(&env, &killed);
    let final_dir = env.out(&killed).join("current");
    let at_once = |_: &str| true;
    for (marker, extra, ready) in [
        (
            "==> [2/7] resolve",
            &[][..],
            &at_once as &dyn Fn(&str) -> bool,
        ),
        ("==> [4/7] rootfs", &["--no-cache"][..], &mmdebstrap_mounted),
        ("==> [5/7] customize", &[][..], &at_once),
        ("==> [6/7] disk", &[][..], &at_once),
        ("==> [7/7] convert", &[][..], &at_once),
    ] {
        let log = kill_at(&env, &killed, marker, extra, ready);
        // Nothing of the build lives on, and nothing it mounted stays mounted.
        if let Some(work) = work_dir(&log) {
            let ended = || processes_naming(&work).is_empty();
            assert!(
                devos_tests::wait_for(Duration::from_secs(30), ended),
                "killed at {marker}, the build's processes live on: {:?}",
                processes_naming(&work)
            );
            let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
            assert!(!mounts.contains(&work), "killed at {marker}: {mounts}");
        }
        assert!(
            !final_dir.exists(),
            "killed at {marker}: output under its final name\n{log}"
        );
        assert!(
            !env.versions().contains(&v4),
            "killed at {marker}: the registry has the version"
        );
    }
    let (fourth, log) = env.build(&killed, &[]);
    assert_eq!(fourth["manifest"]["version"], v4.as_str());
    assert!(
        log.contains("finished tree restored from the cache"),
        "{log}"
    );
    assert!(log.contains("left by a killed build"), "{log}");
    assert!(env.versions().contains(&v4));
    let leftovers: Vec<String> = std::fs::read_dir(final_dir.parent().unwrap())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".build-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Two builds of the same version at once, and a third of another spec: all
    // succeed, one of the first two waits for the other and finds it built. The
    // package lists they share are gone first, so all three find them out of date and
    // update them at the same time (one does, the others wait and read what it got).
    steps.at("Two builds of the same version at once, and a third of another spec");
    let lists = env.cache.join("apt").read_dir().unwrap();
    for index in lists.map(|i| i.unwrap().path()) {
        let _ = std::fs::remove_dir_all(index.join("lists"));
        let _ = std::fs::remove_file(index.join("in-release.sha256"));
    }
    let concurrent = env.fresh_spec("devos-e.toml", |t| t);
    let other = env.fresh_spec("devos-f.toml", |t| t);
    let children: Vec<std::process::Child> = [&concurrent, &concurrent, &other]
        .iter()
        .map(|s| {
            env.build_cmd(s, &[])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    // Each read to its end at once: a build waiting on another's lock must not keep
    // that one blocked on a full pipe.
    let outputs: Vec<Output> = std::thread::scope(|s| {
        let readers: Vec<_> = children
            .into_iter()
            .map(|c| s.spawn(|| c.wait_with_output().unwrap()))
            .collect();
        readers.into_iter().map(|r| r.join().unwrap()).collect()
    });
    for o in &outputs {
        ok(o);
    }
    let fresh: Vec<bool> = outputs[..2]
        .iter()
        .map(|o| serde_json::from_slice::<Value>(&o.stdout).unwrap()["fresh"] == true)
        .collect();
    assert_eq!(
        fresh.iter().filter(|f| **f).count(),
        1,
        "exactly one of the two builds builds"
    );
    let all = env.versions();
    assert_eq!(all.len(), 6, "{all:?}");
    // Every version's artifacts are intact (but v2's qcow2, flipped above).
    for v in all.iter().filter(|v| **v != v2) {
        let verify = env.json(&["image", "verify", &format!("devos-debian@{v}"), "--json"]);
        assert_eq!(verify["ok"], true, "{verify:#}");
    }

    // gc keeps the newest version, and the newest one that passed a boot test.
    steps.at("gc keeps the newest version, and the newest one that passed a boot...");
    let mut reg = devos_build::store::registry::Registry::open(&env.registry()).unwrap();
    let run_record = devos_build::store::registry::TestRun {
        started_at: devos_build::support::time::now(),
        passed: true,
        accelerator: "tcg".into(),
        seconds: 30.0,
        raw_sha256: None,
        failure: None,
    };
    let raw = first["manifest"]["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["format"] == "raw")
        .unwrap();
    let booted = devos_build::store::registry::Booted {
        file: raw["file"].as_str().unwrap(),
        sha256: raw["sha256"].as_str().unwrap(),
    };
    reg.record_test("devos-debian", &v1, &run_record, &booted, &Value::Null)
        .unwrap();
    drop(reg);
    // A dry run says the same and deletes nothing.
    let dry = env.json(&["image", "gc", "--keep", "1", "--dry-run", "--json"]);
    assert_eq!(dry["dry_run"], true, "{dry:#}");
    assert_eq!(dry["removed"].as_array().unwrap().len(), 4, "{dry:#}");
    let still = env.json(&["image", "list", "--json"]);
    assert!(
        still
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["state"] != "removed"),
        "{still:#}"
    );
    let gc = env.json(&["image", "gc", "--keep", "1", "--json"]);
    let kept: Vec<&str> = gc["kept"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert_eq!(kept.len(), 2, "{gc:#}");
    assert!(
        kept.contains(&a.as_str()),
        "the newest passing version must stay: {gc:#}"
    );
    assert_eq!(gc["removed"].as_array().unwrap().len(), 4, "{gc:#}");
    assert!(
        out_dir.join("manifest.json").is_file(),
        "{}",
        out_dir.display()
    );
    let listed = env.json(&["image", "list", "--json"]);
    let removed = listed
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["state"] == "removed")
        .count();
    assert_eq!(removed, 4);
}

/// A build that restores its tree from the stage cache gives the same bytes as one
/// built from scratch (the reproducibility check compares exactly these two).
#[test]
fn a_cached_build_and_a_build_from_scratch_are_bit_for_bit_identical() {
    let _heavy = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new();
    // Signed for Secure Boot too (with this test's own key): the signatures are as
    // reproducible as the rest.
    ok(&run(&mut env.cmd(&["keys", "generate"]), 1));
    let spec = env.spec("devos-repro.toml", |t| {
        assert!(t.contains("verity = true\n"));
        t.replace("verity = true\n", "verity = true\nsecure-boot = true\n")
    });
    // Fill the cache.
    let (first, _) = env.build(&spec, &[]);
    // A package the cache holds cut short (a build killed while copying it there) is
    // fetched again by the next build that installs it, and replaced whole.
    let less = first["manifest"]["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "less")
        .unwrap()["version"]
        .as_str()
        .unwrap()
        .to_owned();
    let debs = env.cache.join("packages/debian-trixie");
    let deb = debs.join(format!("less_{}_amd64.deb", less.replace(':', "%3a")));
    let whole = std::fs::read(&deb).unwrap();
    std::fs::write(&deb, &whole[..whole.len() / 2]).unwrap();
    let (report, log) = env.build(&spec, &["--check-reproducible"]);
    assert!(std::fs::read(&deb).unwrap() == whole, "{log}");
    let parts: Vec<String> = std::fs::read_dir(&debs)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        // (Temporary files are hidden: `.NAME.XXXXXX`.)
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(parts.is_empty(), "{parts:?}");
    assert!(
        report["manifest"]["secure_boot"]["certificate_sha256"].is_string(),
        "{report:#}"
    );
    let repro = &report["reproducible"];
    assert_eq!(repro["identical"], true, "{repro:#}\n{log}");
    // The first build restored its tree from the cache; only the second ran mmdebstrap.
    assert!(
        log.contains("finished tree restored from the cache"),
        "{log}"
    );
    assert_eq!(log.matches(MMDEBSTRAP).count(), 1, "{log}");
    let artifacts = repro["artifacts"].as_array().unwrap();
    assert_eq!(artifacts.len(), 2);
    for a in artifacts {
        assert_eq!(a[1], a[2], "{a}");
    }
    // The second build's scratch is gone with it.
    let left: Vec<String> = std::fs::read_dir(env.out(&spec))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".build-") || n.starts_with("repro-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
