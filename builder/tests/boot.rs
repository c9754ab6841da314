//! The boot test's diagnoses, each on a deliberately broken image: an agent that
//! crashes at start, a unit that fails and a spec test that exits non-zero, a kernel
//! command line that cannot find root; the verified boot chain (a signed, Secure Boot
//! image that updates itself from a feed and rolls back, falls back from a version that
//! crashes, and stops on a changed block or command line); and the bookworm image (ext4
//! root, initramfs-tools) passing. (The default image passing is tested in `image.rs`,
//! the README's command.)
//!
//! The tests run side by side (cargo's default of one thread per CPU): a VM under TCG
//! keeps a core busy only part of the time, and the builds between boots fill the rest.
//! Tests start in the order of their names, so the longest (the verified chain's three,
//! each several boots) are named to start first.

// Test helpers fail the test by panicking, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use devos_tests::require;
use serde_json::Value;

mod common;

use common::{Env, check, flip_byte_at, gpg_verifies, ok, run};

/// The agent package with `edit` applied to its unpacked tree, repacked.
fn repack(env: &Env, name: &str, edit: impl Fn(&Path)) -> PathBuf {
    let root = env.dir.path().join(format!("pkg-{name}"));
    ok(&Command::new("dpkg-deb")
        .arg("-R")
        .arg(&env.agent_deb)
        .arg(&root)
        .output()
        .unwrap());
    edit(&root);
    let deb = env.dir.path().join(format!("{name}.deb"));
    ok(&Command::new("dpkg-deb")
        .args(["--root-owner-group", "-b"])
        .arg(&root)
        .arg(&deb)
        .output()
        .unwrap());
    deb
}

/// Build `spec` (with `deb` as the agent) and boot-test it; the test must fail.
/// Returns the report and the JUnit XML.
fn failing_test(env: &Env, spec: &Path, deb: &Path) -> (Value, String) {
    failing_test_with(env, spec, deb, &[])
}

fn failing_test_with(env: &Env, spec: &Path, deb: &Path, vars: &[(&str, &str)]) -> (Value, String) {
    for (tool, package) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("dpkg-deb", "dpkg"),
    ] {
        require(tool, package);
    }
    let junit = env.dir.path().join(format!(
        "{}.xml",
        spec.file_stem().unwrap().to_string_lossy()
    ));
    // The verified trixie image takes about a minute to boot under TCG, and a broken
    // agent is given its retries before the report (docs/benchmarks.md).
    let mut c = env.cmd(&["image", "build", "--json", "--test", "--timeout", "300"]);
    c.arg(spec)
        .arg("--agent-deb")
        .arg(deb)
        .arg("--out")
        .arg(env.out(spec))
        .arg("--junit")
        .arg(&junit)
        .envs(vars.iter().copied());
    let out = run(&mut c, 15);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the broken image passed:\n{stderr}");
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON report ({e}):\n{stderr}"));
    assert_eq!(report["test"]["passed"], false);
    (
        report["test"].clone(),
        std::fs::read_to_string(&junit).unwrap(),
    )
}

#[test]
fn an_agent_that_crashes_at_start_is_named_with_its_journal() {
    let env = Env::new();
    // The daemon dies at once; the self-test mode (the same binary) still works.
    let deb = repack(&env, "agent-crash", |root| {
        let bin = root.join("usr/bin/devos-agent");
        let real = root.join("usr/lib/devos/devos-agent-real");
        std::fs::create_dir_all(real.parent().unwrap()).unwrap();
        std::fs::rename(&bin, &real).unwrap();
        devos_tests::write_executable(
            &bin,
            "#!/bin/sh\nif [ \"$1\" = self-test ]; then exec /usr/lib/devos/devos-agent-real \"$@\"; fi\necho 'devos-agent: simulated crash at start' >&2\nkill -SEGV $$\n",
        );
    });
    let spec = env.fresh_spec("agent-crash.toml", |t| t);
    let (report, junit) = failing_test(&env, &spec, &deb);
    let ping = check(&report, "agent-ping");
    assert_eq!(ping["ok"], false);
    let detail = ping["detail"].as_str().unwrap();
    assert!(
        detail.contains("journal of devos-agent.service"),
        "{detail}"
    );
    assert!(detail.contains("simulated crash at start"), "{detail}");
    // The unit restarts on failure, so the system itself may still count as
    // `running`: the failure is the agent's, named with its unit's journal.
    let failure = report["failure"].as_str().unwrap();
    assert!(
        failure.contains("agent-ping") && failure.contains("devos-agent.service"),
        "{failure}"
    );
    assert!(
        junit.contains("<failure") && junit.contains("name=\"agent-ping\""),
        "{junit}"
    );
}

/// A failing unit and a failing spec test in one image (one build, one boot): each is
/// named with its own output, and the report's failure names both.
#[test]
fn a_failing_unit_and_a_failing_spec_test_are_named_with_their_output() {
    let env = Env::new();
    let deb = repack(&env, "unit-fails", |root| {
        let unit = root.join("usr/lib/systemd/system/devos-broken.service");
        std::fs::write(
            &unit,
            "[Unit]\nDescription=A unit that fails\n[Service]\nType=oneshot\nExecStart=/bin/sh -c 'echo devos-broken: cannot reach the license server >&2; exit 3'\n",
        )
        .unwrap();
        let wants = root.join("etc/systemd/system/multi-user.target.wants");
        std::fs::create_dir_all(&wants).unwrap();
        std::os::unix::fs::symlink(
            "/usr/lib/systemd/system/devos-broken.service",
            wants.join("devos-broken.service"),
        )
        .unwrap();
    });
    let spec = env.fresh_spec("unit-and-test-fail.toml", |t| {
        format!(
            "{t}\n[[tests]]\nname = \"disk-space\"\nrun = \"echo 'only 3% free' >&2; exit 4\"\n"
        )
    });
    // Forcing KVM also exercises the fallback: on a host whose KVM dies mid-run (this
    // one does, with "KVM internal error") the run is repeated under TCG.
    let (report, junit) = failing_test_with(&env, &spec, &deb, &[("DEVOS_ACCEL", "kvm")]);
    let accel = &report["accel"];
    assert!(
        accel["accel"] == "kvm"
            || accel["reason"]
                .as_str()
                .unwrap()
                .contains("but the VM then failed under KVM ("),
        "neither ran under KVM nor fell back to TCG with the reason: {accel}"
    );
    // The agent itself is fine.
    assert_eq!(check(&report, "agent-ping")["ok"], true);
    // The unit, with its journal.
    let state = check(&report, "system-state");
    assert_eq!(state["ok"], false);
    let detail = state["detail"].as_str().unwrap();
    assert!(detail.contains("devos-broken.service"), "{detail}");
    assert!(
        detail.contains("cannot reach the license server"),
        "{detail}"
    );
    // The spec's test, with its output; its passing tests ran too.
    assert_eq!(check(&report, "test:agent-unit-active")["ok"], true);
    assert_eq!(check(&report, "test:root-is-read-only")["ok"], true);
    let t = check(&report, "test:disk-space");
    assert_eq!(t["ok"], false);
    let detail = t["detail"].as_str().unwrap();
    assert!(detail.starts_with("exit 4 (expected 0)"), "{detail}");
    assert!(detail.contains("only 3% free"), "{detail}");
    assert!(junit.contains("name=\"test:disk-space\""), "{junit}");
    assert!(
        junit.contains("<failure") && junit.contains("name=\"system-state\""),
        "{junit}"
    );
    let failure = report["failure"].as_str().unwrap();
    assert!(
        failure.contains("system-state") && failure.contains("test:disk-space"),
        "{report:#}"
    );
    // The other built-in checks all passed.
    for name in [
        "bus-policy",
        "agent-request",
        "packages-refused",
        "audit-anchors",
        "root-read-only",
        "var-writable",
        "hardening",
        "os-release",
    ] {
        assert_eq!(check(&report, name)["ok"], true, "{name}: {report:#}");
    }
}

#[test]
fn a_kernel_command_line_without_root_is_diagnosed_not_waited_out() {
    let env = Env::new();
    // On the bookworm image (initramfs-tools). The default image's dracut initrd waits
    // out its own device timeout instead, so there the boot test reports the timeout.
    let spec = env.spec_from("devos-debian-bookworm.toml", "no-root.toml", |t| {
        t.replace(
            "kernel-cmdline = \"",
            "kernel-cmdline = \"root=PARTUUID=00000000-0000-4000-8000-000000000000 rootdelay=3 ",
        )
    });
    let deb = env.agent_deb.clone();
    let (report, _) = failing_test(&env, &spec, &deb);
    let failure = report["failure"].as_str().unwrap();
    assert!(
        failure.contains("could not find the root filesystem"),
        "{failure}"
    );
    assert!(
        report["seconds"].as_f64().unwrap() < 140.0,
        "the failure must be seen before the timeout: {report:#}"
    );
    assert!(!report["console_tail"].as_array().unwrap().is_empty());
}

/// What the verified test's spec adds: updates from a feed, signed by the builder's key
/// (exported beside the spec), and a check that systemd-sysupdate in the booted image
/// sees the running version in slot A.
const UPDATE: &str = r#"
[update]
url = "http://10.0.2.2:8080/devos-debian/"
key = "update.pgp"

[[tests]]
name = "sysupdate-sees-this-version"
run = """
set -e
. /etc/os-release
version=$(echo "$IMAGE_VERSION" | tr + _)
test -s /etc/systemd/import-pubring.gpg
ls /usr/lib/sysupdate.d/
/usr/lib/systemd/systemd-sysupdate --offline list > /tmp/list 2>&1 || { cat /tmp/list; exit 1; }
cat /tmp/list
# Installed: the newest installed version is `current`; after a rollback to an older
# one, the running version is `protected` (never overwritten) instead.
grep -F "$version" /tmp/list | grep -Eq 'current|protected'
# A version on trial is good only once the agent is healthy; the boot loader lists
# this version's kernel image (what `devos update --rollback` chooses among).
test -L /etc/systemd/system/boot-complete.target.requires/devos-boot-complete.service
systemctl cat devos-boot-complete.service > /dev/null
bootctl list --no-pager > /tmp/entries 2>&1 || { cat /tmp/entries; exit 1; }
grep -F "$version.efi" /tmp/entries
"""
"#;

/// The verified image's spec in this test's directory (Secure Boot, updates from a
/// feed signed by the builder's key, exported beside it as the spec's `update.pgp`),
/// after `keys generate`: (spec, exported key, what `keys generate --json` said).
fn verified_spec(env: &Env) -> (PathBuf, PathBuf, Value) {
    let key_file = env.dir.path().join("update.pgp");
    let key = env.json(&[
        "keys",
        "generate",
        "--json",
        "--export",
        key_file.to_str().unwrap(),
    ]);
    // Secure Boot too: every boot starts from firmware in setup mode, in which the
    // image's systemd-boot enrolls the builder's certificate, and then runs only what
    // that key signed (the updates' kernel images included).
    let spec = env.fresh_spec("verity.toml", |t| {
        assert!(t.contains("verity = true\n"));
        format!(
            "{}{UPDATE}",
            t.replace("verity = true\n", "verity = true\nsecure-boot = true\n")
        )
    });
    (spec, key_file, key)
}

/// The verified spec as `version` with `extra` appended, written as `file` beside it.
fn another_version(env: &Env, spec: &Path, file: &str, version: &str, extra: &str) -> PathBuf {
    let text = std::fs::read_to_string(spec).unwrap();
    assert_eq!(text.matches("version = \"0.2.0\"").count(), 1);
    let path = env.dir.path().join(file);
    let version = format!("version = \"{version}\"");
    std::fs::write(
        &path,
        format!("{}{extra}", text.replace("version = \"0.2.0\"", &version)),
    )
    .unwrap();
    path
}

/// Build `spec`; `NAME@VERSION` of the build and its manifest.
fn build_version(env: &Env, spec: &Path) -> (String, Value) {
    let (built, _) = env.build(spec, &[]);
    let m = built["manifest"].clone();
    (
        format!(
            "{}@{}",
            m["name"].as_str().unwrap(),
            m["version"].as_str().unwrap()
        ),
        m,
    )
}

/// `image test --update-to TO FROM`: FROM's image boots, updates itself to TO from a
/// feed the test serves on the host, and boots again. (report, passed)
fn update_test(env: &Env, to: &str, from: &str, minutes: u64) -> (Value, bool) {
    let mut c = env.cmd(&["image", "test", "--json", "--update-to"]);
    c.arg(to).arg(from);
    let out = run(&mut c, minutes);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}):\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (report, out.status.success())
}

/// The slot label of a version: `NAME_VERSION`, `+` as `_`.
fn slot_label(manifest: &Value) -> String {
    format!(
        "{}_{}",
        manifest["name"].as_str().unwrap(),
        manifest["version"].as_str().unwrap().replace('+', "_")
    )
}

// The verified boot chain is three tests that run side by side: the update and the
// rollback (the longest, named to start first), the fall-back from a crashing version,
// and the verified image itself (its layout, bundle and feed, and the changed-block and
// changed-UKI boots). Each builds the versions it needs from the shared cache.

/// The boot test's disk is larger than the image: /var took the difference (its
/// partition and its filesystem), as on an instance launched with a larger volume.
#[track_caller]
fn var_grew(report: &Value) {
    let var = check(report, "var-fills-disk");
    let detail = var["detail"].as_str().unwrap();
    assert!(
        var["ok"] == true && detail.starts_with("disk ") && detail.contains(" MiB after it)"),
        "{report:#}"
    );
}

#[test]
fn a_boot_chain_verified_end_to_end_updates_from_a_signed_feed_and_rolls_back() {
    let env = Env::new();
    let (spec, _, _) = verified_spec(&env);
    let (reference, m) = build_version(&env, &spec);
    // The next version (one patch on): the running image updates itself to it from a
    // feed on this host, the same disk boots again, the new version runs and its
    // counted boot is blessed once the agent is healthy.
    let next_spec = another_version(&env, &spec, "verity-next.toml", "0.2.1", "");
    let (next, next_m) = build_version(&env, &next_spec);
    let (report, passed) = update_test(&env, &next, &reference, 15);
    assert!(passed, "{report:#}");
    assert_eq!(report["version"], next_m["version"], "{report:#}");
    for name in [
        "update",
        "secure-boot",
        "boot-blessed",
        "version-matches-build",
        "agent-ping",
        "rollback",
        "rollback-boot",
    ] {
        assert_eq!(check(&report, name)["ok"], true, "{name}: {report:#}");
    }
    var_grew(&report);
    // `devos status` said what each step left for the next boot: the new version,
    // not booted yet, with its tries; once it was blessed, that it is good and the
    // version before it is still there.
    let version = m["version"].as_str().unwrap();
    let next_version = next_m["version"].as_str().unwrap();
    let said = |name: &str| check(&report, name)["detail"].as_str().unwrap().to_owned();
    assert!(
        said("update").contains(&format!(
            "devos status: next boot {next_version} (installed, not booted yet: 3 tries)"
        )),
        "{report:#}"
    );
    let status = said("update-status");
    assert!(
        status.starts_with(&format!("booted {next_version}: good; "))
            && status.contains(&format!("other versions {version} (good)"))
            && status.contains("feed http://"),
        "{status}"
    );
    // Then `devos update --rollback` in 0.2.1, recorded in the audit log beside the
    // update (and `devos status` names 0.2.0 as the boot loader's choice), and the boot
    // after it: 0.2.0 again, from its own (uncounted) entry.
    let rollback = said("rollback");
    assert!(rollback.contains("in the audit log"), "{report:#}");
    assert!(
        rollback.contains(&format!(
            "next boot {version} (good): the boot loader's default"
        )),
        "{rollback}"
    );
    let back = check(&report, "rollback-boot")["detail"].as_str().unwrap();
    assert!(
        back.contains(&format!("started {}", slot_label(&m)))
            && back.contains(&format!("agent {version}")),
        "{report:#}"
    );
    // Before it: a feed with a forged signature and one with a changed root image were
    // refused, and nothing was installed from them.
    let refused: Vec<&Value> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["check"] == "update-refused")
        .collect();
    assert_eq!(refused.len(), 2, "{report:#}");
    assert!(refused.iter().all(|c| c["ok"] == true), "{report:#}");
    eprintln!(
        "update download + apply: {} ms; boot after the update to the agent: {} s",
        check(&report, "update")["ms"],
        report["agent_answered_seconds"]
    );
}

#[test]
fn a_broken_update_is_tried_three_times_then_the_machine_falls_back_by_itself() {
    // A version whose first boot panics the kernel and whose agent crashes on start
    // after that: the machine that updates to it tries it three times (the panic
    // reboots by itself; each boot is a counted boot never blessed), then starts the
    // version it came from by itself, healthy.
    let env = Env::new();
    let (spec, _, _) = verified_spec(&env);
    let (from, m) = build_version(&env, &spec);
    let broken_tree = env
        .dir
        .path()
        .join("broken-agent/etc/systemd/system/devos-agent.service.d");
    std::fs::create_dir_all(&broken_tree).unwrap();
    std::fs::write(
        broken_tree.join("crash.conf"),
        "[Service]\n\
         ExecStartPre=+/bin/sh -c 'test -e /var/lib/devos-panicked || \
         { touch /var/lib/devos-panicked; sync; echo c > /proc/sysrq-trigger; }'\n\
         ExecStart=\nExecStart=/bin/false\n",
    )
    .unwrap();
    let broken_spec = another_version(
        &env,
        &spec,
        "verity-broken.toml",
        "0.2.2",
        "\n[files]\nextra-trees = [\"broken-agent\"]\n",
    );
    let (broken, broken_m) = build_version(&env, &broken_spec);
    let started = std::time::Instant::now();
    let (report, passed) = update_test(&env, &broken, &from, 25);
    eprintln!(
        "update to a crashing version, its three tries and the fall-back boot: {:.0} s",
        started.elapsed().as_secs_f64()
    );
    assert!(!passed, "a crashing agent passed: {report:#}");
    assert_eq!(check(&report, "update")["ok"], true, "{report:#}");
    let trial = check(&report, "update-trial")["detail"].as_str().unwrap();
    assert!(trial.contains("in 3 counted boot(s)"), "{report:#}");
    assert!(trial.contains("kernel panic"), "{trial}");
    assert!(
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["check"] != "rollback-boot"),
        "{report:#}"
    );
    // (A try that reboots before its self-test says which entry it is still counts.)
    assert!(trial.contains(&slot_label(&broken_m)), "{trial}");
    // The boot after: the previous version, not counted, its agent answering.
    let entry = check(&report, "boot-entry")["detail"].as_str().unwrap();
    assert!(
        entry.starts_with(&slot_label(&m)) && !entry.contains("counted"),
        "{report:#}"
    );
    assert_eq!(check(&report, "agent-version")["detail"], m["version"]);
    assert_eq!(check(&report, "agent-ping")["ok"], true, "{report:#}");
    // And `devos status` there says so: this version good, the other one failed.
    let status = check(&report, "update-status")["detail"].as_str().unwrap();
    assert!(
        status.starts_with(&format!(
            "booted {}: good; ",
            m["version"].as_str().unwrap()
        )) && status.contains(&format!(
            "other versions {} (failed: 3 tries used up)",
            broken_m["version"].as_str().unwrap()
        )),
        "{status}"
    );
}

#[test]
fn a_changed_block_or_kernel_command_line_stops_a_verified_image_signed_and_published() {
    let env = Env::new();
    let (spec, key_file, key) = verified_spec(&env);
    let fingerprint = key["fingerprint"].as_str().unwrap();
    assert_eq!(fingerprint.len(), 40, "{key:#}");
    // And the Secure Boot key beside it, which signs the boot chain of this test's image.
    let certificate = key["secure_boot"]["sha256"].as_str().unwrap();
    assert_eq!(certificate.len(), 64, "{key:#}");
    // A second key is refused: images trust the first.
    let again = run(&mut env.cmd(&["keys", "generate"]), 1);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds the signing key"));
    assert_eq!(
        env.json(&["keys", "show", "--json"])["fingerprint"],
        fingerprint
    );

    let (built, _) = env.build(&spec, &["--test"]);
    let m = &built["manifest"];
    assert_eq!(m["update_feed"]["key_fingerprint"], fingerprint, "{m:#}");
    assert_eq!(m["secure_boot"]["certificate_sha256"], certificate, "{m:#}");
    // The certificate itself, for `publish ami` to give the AMI as its UEFI data.
    assert!(
        m["secure_boot"]["certificate"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----"),
        "{m:#}"
    );
    let secure = check(&built["test"], "secure-boot");
    assert_eq!(secure["ok"], true, "{secure:#}");
    assert!(
        secure["detail"]
            .as_str()
            .unwrap()
            .contains("enforced by the firmware; kernel lockdown integrity"),
        "{secure:#}"
    );
    let (name, version) = (m["name"].as_str().unwrap(), m["version"].as_str().unwrap());
    // The verified layout: slot A holds this version (named NAME_VERSION, `+` as `_`;
    // UUIDs the halves of the root hash on the command line), slot B is empty.
    let root_hash = m["root_hash"].as_str().unwrap();
    let cmdline = m["kernel_cmdline"].as_str().unwrap();
    assert!(
        cmdline.contains(&format!("roothash={root_hash}")),
        "{cmdline}"
    );
    let label = slot_label(m);
    let parts = m["partitions"].as_array().unwrap();
    let labels: Vec<&str> = parts.iter().map(|p| p["label"].as_str().unwrap()).collect();
    assert_eq!(
        labels,
        ["esp", &label, &label, "_empty", "_empty", "devos-var"],
        "{m:#}"
    );
    // The update bundle: the root and its hash tree (named with the partition UUIDs
    // their slot gets), the UKI, their sums, signed with the key the image trusts.
    let update = env.out(&spec).join("current/update");
    let sums = std::fs::read_to_string(update.join("SHA256SUMS")).unwrap();
    let (data_uuid, hash_uuid) = (&root_hash[..8], &root_hash[32..40]);
    let files: Vec<&str> = m["update"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["file"].as_str().unwrap())
        .collect();
    assert!(
        files[0].starts_with(&format!("{label}+{data_uuid}")) && files[0].ends_with(".root"),
        "{files:?}"
    );
    assert!(
        files[1].starts_with(&format!("{label}+{hash_uuid}")) && files[1].ends_with(".verity"),
        "{files:?}"
    );
    assert_eq!(files[2], format!("{label}.efi"));
    for file in &files {
        let bytes = std::fs::read(update.join(file)).unwrap();
        let sha = format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(&bytes));
        assert!(sums.contains(&format!("{sha}  {file}")), "{file}: {sums}");
    }
    assert!(gpg_verifies(
        &key_file,
        &update.join("SHA256SUMS"),
        &update.join("SHA256SUMS.gpg")
    ));

    // The feed: the bundle added and signed; again, nothing added; a changed
    // SHA256SUMS no longer verifies.
    let feed = env.dir.path().join("feed");
    let reference = format!("{name}@{version}");
    let publish = |c: &mut Command| {
        let out = run(
            c.args(["publish", "updates", &reference, "--json", "--to"])
                .arg(&feed),
            2,
        );
        ok(&out);
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let dry = run(
        env.cmd(&["publish", "updates", &reference, "--dry-run", "--to"])
            .arg(&feed),
        1,
    );
    ok(&dry);
    assert!(String::from_utf8_lossy(&dry.stdout).contains("would copy"));
    assert!(!feed.exists(), "a dry run made the feed");
    let first = publish(&mut env.cmd(&[]));
    assert_eq!(first["added"].as_array().unwrap().len(), 3, "{first:#}");
    assert_eq!(
        first["versions"],
        serde_json::json!([version.replace('+', "_")])
    );
    let second = publish(&mut env.cmd(&[]));
    assert_eq!(second["added"].as_array().unwrap().len(), 0, "{second:#}");
    let dry = run(
        env.cmd(&["publish", "updates", &reference, "--dry-run", "--to"])
            .arg(&feed),
        1,
    );
    assert_eq!(dry.status.code(), Some(3), "nothing to do: {dry:?}");
    let feed_sums = std::fs::read_to_string(feed.join("SHA256SUMS")).unwrap();
    assert_eq!(feed_sums.lines().count(), 3, "{feed_sums}");
    assert!(gpg_verifies(
        &key_file,
        &feed.join("SHA256SUMS"),
        &feed.join("SHA256SUMS.gpg")
    ));
    let forged = env.dir.path().join("forged-SHA256SUMS");
    std::fs::write(&forged, feed_sums.replace(files[2], "other.efi")).unwrap();
    assert!(!gpg_verifies(
        &key_file,
        &forged,
        &feed.join("SHA256SUMS.gpg")
    ));
    // Another builder's key cannot publish it.
    let mut other = env.cmd(&[]);
    other.env("DEVOS_KEYS", env.dir.path().join("other-keys"));
    ok(&run(other.args(["keys", "generate"]), 1));
    let mut other = env.cmd(&["publish", "updates", &reference, "--to"]);
    other
        .arg(&feed)
        .env("DEVOS_KEYS", env.dir.path().join("other-keys"));
    let refused = run(&mut other, 1);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("trusts updates signed by"));

    // A version of the same feed without Secure Boot: machines that enrolled the key
    // would not start its kernel (and would not fall back), so it is not published.
    let unsigned_spec = env.dir.path().join("verity-unsigned.toml");
    std::fs::write(
        &unsigned_spec,
        std::fs::read_to_string(&spec)
            .unwrap()
            .replace("secure-boot = true\n", "")
            .replace("version = \"0.2.0\"", "version = \"0.2.3\""),
    )
    .unwrap();
    let (unsigned, _) = env.build(&unsigned_spec, &[]);
    assert!(unsigned["manifest"].get("secure_boot").is_none());
    let unsigned_ref = format!(
        "{name}@{}",
        unsigned["manifest"]["version"].as_str().unwrap()
    );
    let refused = run(
        env.cmd(&["publish", "updates", &unsigned_ref, "--to"])
            .arg(&feed),
        1,
    );
    let said = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{said}");
    assert!(
        said.contains("is not signed for Secure Boot") && said.contains("stop in its firmware"),
        "{said}"
    );

    // One byte of the root's superblock (which the initrd reads to mount it) changed.
    let raw = env.out(&spec).join("current").join(format!(
        "{}-{}.raw",
        m["name"].as_str().unwrap(),
        m["version"].as_str().unwrap()
    ));
    // Changed in a copy of the version's output directory, manifest and all: the
    // copy is not the version, so its result is not recorded against it.
    let copy = env.dir.path().join("copy");
    std::fs::create_dir(&copy).unwrap();
    std::fs::copy(
        raw.parent().unwrap().join("manifest.json"),
        copy.join("manifest.json"),
    )
    .unwrap();
    let changed = copy.join(raw.file_name().unwrap());
    ok(&Command::new("cp")
        .args(["--sparse=always"])
        .arg(&raw)
        .arg(&changed)
        .output()
        .unwrap());
    let root = parts.iter().find(|p| p["filesystem"] == "erofs").unwrap();
    flip_byte_at(&changed, root["offset"].as_u64().unwrap() + 1024);
    let runs = || env.json(&["image", "show", &reference, "--json"])["test_runs"].clone();
    let before = runs();
    let mut c = env.cmd(&["image", "test", "--json", "--timeout", "150"]);
    c.arg(&copy);
    let out = run(&mut c, 10);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the changed image passed:\n{stderr}");
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON report ({e}):\n{stderr}"));
    let failure = report["failure"].as_str().unwrap_or_default();
    assert!(
        failure.contains("failed dm-verity verification"),
        "{report:#}"
    );
    assert!(
        stderr.contains("this is another copy") && stderr.contains("the result is not recorded"),
        "{stderr}"
    );
    assert_eq!(
        runs(),
        before,
        "a copy's result was recorded for {reference}"
    );

    // One byte of the command line in the signed kernel image changed (the root hash,
    // as whoever changed the root would have to): Secure Boot refuses to start it.
    let root_byte = root["offset"].as_u64().unwrap() + 1024;
    flip_byte_at(&changed, root_byte);
    let esp = format!(
        "{}@@{}",
        changed.display(),
        parts[0]["offset"].as_u64().unwrap()
    );
    let uki_name = format!("{label}.efi");
    let uki = env.dir.path().join(&uki_name);
    let mtools = |args: &[&str]| {
        ok(&Command::new(args[0])
            .args(&args[1..])
            .env("MTOOLS_SKIP_CHECK", "1")
            .output()
            .unwrap())
    };
    let on_esp = format!("::/EFI/Linux/{uki_name}");
    mtools(&["mcopy", "-i", &esp, &on_esp, uki.to_str().unwrap()]);
    let bytes = std::fs::read(&uki).unwrap();
    let at = bytes
        .windows(root_hash.len())
        .position(|w| w == root_hash.as_bytes())
        .expect("the root hash in the kernel image's command line");
    flip_byte_at(&uki, at as u64);
    mtools(&["mcopy", "-o", "-i", &esp, uki.to_str().unwrap(), &on_esp]);
    let mut c = env.cmd(&["image", "test", "--json", "--timeout", "150"]);
    c.arg(&copy);
    let out = run(&mut c, 10);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the changed kernel image booted:\n{stderr}"
    );
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON report ({e}):\n{stderr}"));
    let failure = report["failure"].as_str().unwrap_or_default();
    assert!(
        failure.contains("Secure Boot refused the unified kernel image"),
        "{report:#}"
    );
}

/// What the bookworm test's spec adds: two extra trees and a test that finds their
/// files and the unit's work in the booted image.
const EXTRA_TREES: &str = r#"
[files]
extra-trees = ["tree", "tools:/opt/devos-tools"]

[[tests]]
name = "extra-trees"
run = """
set -e
for i in $(seq 100); do test -e /run/devos-hello && break; sleep 0.2; done
test "$(cat /run/devos-hello)" = hello
systemctl is-enabled devos-hello.service
test "$(stat -c '%U %a' /usr/local/bin/devos-hello)" = 'root 750'
test "$(stat -c %U /opt/devos-tools/README)" = root
"""
"#;

#[test]
fn the_bookworm_image_builds_and_passes_the_boot_test() {
    let env = Env::new();
    // Debian 12 with an ext4 root and initramfs-tools, as images/devos-debian-bookworm.toml.
    // The spec also adds files and a unit of its own (`[files] extra-trees`, `[system]
    // enable-units`): owned by root in the image whoever owns them here, modes kept,
    // the unit enabled and run at boot.
    let tree = env.dir.path().join("tree");
    let unit_dir = tree.join("etc/systemd/system");
    std::fs::create_dir_all(&unit_dir).unwrap();
    std::fs::create_dir_all(tree.join("usr/local/bin")).unwrap();
    std::fs::write(
        unit_dir.join("devos-hello.service"),
        "[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/usr/local/bin/devos-hello\n[Install]\nWantedBy=multi-user.target\n",
    )
    .unwrap();
    let script = tree.join("usr/local/bin/devos-hello");
    std::fs::write(&script, "#!/bin/sh\necho hello > /run/devos-hello\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o750)).unwrap();
    let tools = env.dir.path().join("tools");
    std::fs::create_dir_all(&tools).unwrap();
    std::fs::write(tools.join("README"), "tools\n").unwrap();
    std::os::unix::fs::chown(tools.join("README"), Some(4321), Some(4321)).unwrap();
    let spec = env.spec_from("devos-debian-bookworm.toml", "bookworm.toml", |t| {
        // `dev` uses sudo without a password here (the default image's does not).
        t.replace(
            "initrd = true",
            "initrd = true\nenable-units = [\"devos-hello.service\"]",
        )
        .replace(
            "groups = [\"sudo\"]",
            "groups = [\"sudo\"]\nsudo-without-password = true",
        ) + EXTRA_TREES
    });
    let mut c = env.build_cmd(&spec, &["--test", "--timeout", "150"]);
    let out = run(&mut c, 15);
    ok(&out);
    let built: Value = serde_json::from_slice(&out.stdout).unwrap();
    let root = built["manifest"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["label"] == "devos-root")
        .unwrap_or_else(|| panic!("no root partition in {built:#}"));
    assert_eq!(root["filesystem"], "ext4", "{root}");
    assert_eq!(built["manifest"]["suite"], "bookworm");
    let report = &built["test"];
    assert_eq!(report["passed"], true, "{report:#}");
    assert_eq!(check(report, "root-read-only")["ok"], true);
    assert_eq!(check(report, "agent-ping")["ok"], true);
    assert_eq!(check(report, "test:extra-trees")["ok"], true, "{report:#}");
    assert_eq!(check(report, "hardening")["ok"], true, "{report:#}");
    var_grew(report);
    assert_eq!(check(report, "time-sync")["ok"], true, "{report:#}");
    let login = check(report, "ssh-login");
    assert!(
        login["detail"]
            .as_str()
            .unwrap()
            .contains("sudo without a password, as the spec says"),
        "{login}"
    );
}
