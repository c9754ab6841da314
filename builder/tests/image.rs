//! End to end, as a user runs it: the agent package, a failing mirror, a bad spec,
//! and the default image built and boot-tested with the `devos-build` binary.

// Test helpers fail the test by panicking, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use devos_build::build::agent_pkg;
use devos_tests::{repo_root, require, require_root, run_with_timeout};

mod common;

use common::devos_build_command;

#[test]
fn agent_package_has_the_files_and_metadata() {
    require("dpkg-deb", "dpkg");
    let dir = tempfile::tempdir().unwrap();
    let pkg = agent_pkg::build(&repo_root(), dir.path(), 0, &common::test_cache()).unwrap();
    let listing = String::from_utf8(
        Command::new("dpkg-deb")
            .arg("-c")
            .arg(&pkg.path)
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    for (_, dest, mode) in agent_pkg::FILES {
        let line = listing
            .lines()
            .find(|l| l.ends_with(&format!("./{dest}")))
            .unwrap_or_else(|| panic!("{dest} is not in the package:\n{listing}"));
        let perms = if *mode == 0o755 {
            "-rwxr-xr-x"
        } else {
            "-rw-r--r--"
        };
        assert!(line.starts_with(perms), "{line}");
        assert!(line.contains("root/root"), "{line}");
    }
    // devos(1), compressed as Debian's manual pages are.
    assert!(
        listing
            .lines()
            .any(|l| l.ends_with("./usr/share/man/man1/devos.1.gz")),
        "no devos(1):\n{listing}"
    );
    let field = |name: &str| {
        let out = Command::new("dpkg-deb")
            .arg("-f")
            .arg(&pkg.path)
            .arg(name)
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    assert_eq!(field("Package"), "devos-agent");
    assert_eq!(field("Architecture"), "amd64");
    assert!(field("Depends").contains("dbus"));
    let conffiles = Command::new("dpkg-deb")
        .arg("-I")
        .arg(&pkg.path)
        .arg("conffiles")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&conffiles.stdout).trim(),
        "/etc/devos/agent.toml"
    );

    // The package is reproducible: the same sources give the same bytes.
    let again = tempfile::tempdir().unwrap();
    assert_eq!(
        agent_pkg::build(&repo_root(), again.path(), 0, &common::test_cache())
            .unwrap()
            .sha256,
        pkg.sha256
    );
}

/// Run `devos-build image build ARGS`, which must fail within a minute; its stderr.
fn failed_build(args: &[&std::ffi::OsStr]) -> String {
    let out = run_with_timeout(
        devos_build_command().args(["image", "build"]).args(args),
        Duration::from_secs(60),
    )
    .unwrap();
    assert!(!out.status.success(), "the build should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn unreachable_mirror_fails_early_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let images = repo_root().join("images");
    std::fs::create_dir(dir.path().join("layers")).unwrap();
    for layer in ["build-tools.toml", "python.toml"] {
        std::fs::copy(
            images.join("layers").join(layer),
            dir.path().join("layers").join(layer),
        )
        .unwrap();
    }
    let spec = std::fs::read_to_string(images.join("devos-ubuntu.toml"))
        .unwrap()
        .replace(
            "http://archive.ubuntu.com/ubuntu",
            "http://127.0.0.1:9/ubuntu",
        );
    let path = dir.path().join("devos-ubuntu.toml");
    std::fs::write(&path, spec).unwrap();
    let out_dir = dir.path().join("out");
    let stderr = failed_build(&[path.as_os_str(), "--out".as_ref(), out_dir.as_os_str()]);
    assert!(
        stderr.contains("cannot reach the package mirror http://127.0.0.1:9/ubuntu"),
        "{stderr}"
    );
    assert!(stderr.contains("hint: fix `[base] mirror`"), "{stderr}");
    assert!(
        !out_dir.exists(),
        "nothing may be left under the output name"
    );
}

#[test]
fn missing_archive_keyring_fails_early_and_says_what_to_install() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spec.toml");
    std::fs::write(
        &path,
        "[image]\nname = \"k\"\nversion = \"0.1.0\"\n[base]\ndistro = \"ubuntu\"\nmirror = \"file:///srv/mirror\"\nkeyring = \"/nonexistent/ubuntu.gpg\"\n\
         [packages]\ninclude = [\"linux-image-virtual\", \"initramfs-tools\", \"systemd-sysv\", \"dbus\", \"systemd-boot-efi\"]\n",
    )
    .unwrap();
    let stderr = failed_build(&[path.as_os_str()]);
    assert!(
        stderr.contains("the archive keyring /nonexistent/ubuntu.gpg for Ubuntu is missing"),
        "{stderr}"
    );
    assert!(stderr.contains("install `ubuntu-keyring`"), "{stderr}");
}

#[test]
fn validate_checks_a_spec_offline_and_names_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let validate = |text: &str| {
        let path = dir.path().join("spec.toml");
        std::fs::write(&path, text).unwrap();
        let out = devos_build_command()
            .args(["image", "validate"])
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let head = "[image]\nname = \"v\"\nversion = \"0.1.0\"\n[base]\n";
    // No kernel, no init, no boot loader: each named with its package.
    let (code, err) = validate(&format!(
        "{head}distro = \"debian\"\n[packages]\ninclude = [\"vim\"]\n"
    ));
    assert_eq!(code, Some(1), "{err}");
    for want in [
        "no kernel: add `linux-image-cloud-amd64`",
        "no systemd as init",
        "no systemd-boot EFI binary",
        "spec.toml",
    ] {
        assert!(err.contains(want), "{want}: {err}");
    }
    // A NixOS spec validates without Nix; a key with no NixOS meaning is named where
    // it is written.
    let (code, err) = validate(&format!("{head}distro = \"nixos\"\n"));
    assert_eq!(code, Some(0), "{err}");
    let (code, err) = validate(&format!(
        "{head}distro = \"nixos\"\n[packages]\nlayers = [\"layers/python.toml\"]\n"
    ));
    assert_eq!(code, Some(1));
    assert!(
        err.contains("spec.toml:")
            && err.contains("`[packages] layers` has no meaning for a NixOS image"),
        "{err}"
    );
    // A bad key is named where it is.
    let (code, err) = validate(&format!("{head}distro = \"debian\"\nsuit = \"bookworm\"\n"));
    assert_eq!(code, Some(1));
    assert!(err.contains("spec.toml:") && err.contains("suit"), "{err}");
    // The shipped specs are valid; nothing is written.
    for spec in ["devos-debian.toml", "devos-ubuntu.toml", "devos-nixos.toml"] {
        let out = devos_build_command()
            .args(["image", "validate", "--json"])
            .arg(repo_root().join("images").join(spec))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{spec}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["valid"], true);
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "only the spec"
    );
}

#[test]
fn doctor_lists_tools_with_their_packages() {
    let out = devos_build_command()
        .args(["doctor", "--json"])
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let tools = report["tools"].as_array().unwrap();
    let mmdebstrap = tools.iter().find(|t| t["tool"] == "mmdebstrap").unwrap();
    assert_eq!(mmdebstrap["package"], "mmdebstrap");
    assert_eq!(mmdebstrap["required"], true);
    let packer = tools.iter().find(|t| t["tool"] == "packer").unwrap();
    assert_eq!(packer["required"], false);
    // Exit status and the install hints agree with what is missing and required.
    let host = report["host"].as_array().unwrap();
    for check in ["root", "kvm", "space", "tmp", "mirror"] {
        assert!(
            host.iter().any(|h| h["check"] == check),
            "{check}: {report:#}"
        );
    }
    let missing = |required: bool| -> Vec<&serde_json::Value> {
        tools
            .iter()
            .filter(|t| t["found"].is_null() && t["required"] == required)
            .collect()
    };
    let failed = host
        .iter()
        .any(|h| h["ok"] == false && h["required"] == true);
    let ok = missing(true).is_empty() && !failed;
    assert_eq!(out.status.success(), ok, "{report:#}");
    assert_eq!(report["ok"], ok);
    for (key, required) in [("install", true), ("install_optional", false)] {
        let want: Vec<_> = missing(required)
            .into_iter()
            .filter(|t| t["package"] != "(rustup)")
            .collect();
        match report[key].as_str() {
            Some(cmd) => {
                assert!(cmd.starts_with("sudo apt-get install"));
                for t in &want {
                    assert!(cmd.contains(t["package"].as_str().unwrap()), "{cmd}");
                }
            }
            None => assert!(want.is_empty(), "{key}: {report:#}"),
        }
    }
    // The host set up as the README says passes every check the set-up controls (tests run
    // as root with the tools). Free space is the machine's own: its verdict must agree
    // with the figures the check reports.
    assert!(missing(true).is_empty(), "{report:#}");
    for h in host.iter().filter(|h| h["required"] == true) {
        if h["check"] == "space" {
            let detail = h["detail"].as_str().unwrap();
            let gib: Vec<u64> = detail
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|n| n.parse().ok())
                .collect();
            let (free, need) = (gib[0], *gib.last().unwrap());
            assert!(detail.contains(&format!("{need} GiB)")), "{detail}");
            assert_eq!(h["ok"], free >= need, "{detail}");
        } else {
            assert_eq!(h["ok"], true, "{report:#}");
        }
    }
    let human = devos_build_command().arg("doctor").output().unwrap();
    assert!(String::from_utf8_lossy(&human.stdout).contains("mmdebstrap"));
}

#[test]
fn bad_spec_is_reported_with_its_location() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[image]\nname = \"x\"\nversion = \"one\"\n[base]\ndistro = \"debian\"\n",
    )
    .unwrap();
    let stderr = failed_build(&[path.as_os_str()]);
    assert!(
        stderr.contains(&format!("{}:3:11: invalid version `one`", path.display())),
        "{stderr}"
    );
    assert!(stderr.contains("hint:"), "{stderr}");
}

/// The README's main command: build the default image and boot-test it.
#[test]
fn default_image_builds_and_boots_until_the_agent_answers() {
    require_root();
    for (tool, package) in [
        ("mmdebstrap", "mmdebstrap"),
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("qemu-img", "qemu-utils"),
        ("mkfs.vfat", "dosfstools"),
        ("mcopy", "mtools"),
        ("sfdisk", "fdisk"),
    ] {
        require(tool, package);
    }
    // Where the build goes by default (`target/images` of the source tree), said by
    // `image plan`; the test itself builds elsewhere, leaving the tree alone.
    let plan = || {
        let plan = devos_build_command()
            .current_dir(repo_root())
            .args(["image", "plan", "--json"])
            .output()
            .unwrap();
        assert!(
            plan.status.success(),
            "{}",
            String::from_utf8_lossy(&plan.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&plan.stdout).unwrap()
    };
    // Before the build the agent's binaries may not be built yet: the plan says so
    // (and compiles nothing) rather than guess a version.
    let before = plan();
    assert!(
        before["agent"] == "to be built" || before["version"].is_string(),
        "{before:#}"
    );
    let images = tempfile::tempdir().unwrap();
    let out = run_with_timeout(
        devos_build_command()
            .current_dir(repo_root())
            .args(["image", "build", "--test", "--json", "--out"])
            .arg(images.path().join("out")),
        Duration::from_secs(20 * 60),
    )
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "build --test failed:\n{stderr}\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let test = &report["test"];
    assert_eq!(test["passed"], true, "{test:#}");
    let checks: Vec<&str> = test["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["check"].as_str().unwrap())
        .collect();
    // Among them the SSH login: the host handed a throw-away key in as EC2's instance
    // metadata does, the agent's unit gave it to `dev`, and a real ssh logged in; and
    // that metadata answers root only.
    for want in [
        "agent-ping",
        "agent-version",
        "version-matches-build",
        "ssh-from-host",
        "ssh-login",
        "ssh-host-keys",
        "metadata-root-only",
        "hardening",
        "time-sync",
    ] {
        assert!(checks.contains(&want), "{checks:?}");
    }
    let detail = |name: &str| common::check(test, name)["detail"].as_str().unwrap();
    // The clock: EC2's time service first.
    let time = detail("time-sync");
    assert!(
        time.starts_with("systemd-timesyncd asks 169.254.169.123 fd00:ec2::123 "),
        "{time}"
    );
    // The default user logs in with keys and has no password: sudo cannot let them in.
    let login = detail("ssh-login");
    assert!(login.ends_with("; no sudo without a password"), "{login}");
    // dm-verity checks the root with the x86 SHA-256 code (SHA-NI or AVX2 on EC2's
    // CPUs), loaded in the initrd before the root is opened, not the generic C code.
    let verity_hash = common::check(test, "verity-hash");
    let detail = verity_hash["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("dm-verity checks the root with sha256-") && !detail.contains("generic"),
        "{verity_hash:#}"
    );
    let mut host_keys = vec![test["ssh_host_key"].as_str().unwrap().to_owned()];

    let manifest = &report["manifest"];
    let dir = Path::new(report["dir"].as_str().unwrap());
    let version = manifest["version"].as_str().unwrap();
    if before["version"].is_string() {
        assert_eq!(before["version"], version);
    }
    // Once built, the plan knows the version the build made.
    let plan = plan();
    assert_eq!(plan["version"], version, "{plan:#}");
    let default = plan["out"].as_str().unwrap();
    assert_eq!(
        Path::new(default),
        repo_root().join(format!("target/images/devos-debian/{version}")),
    );
    assert_eq!(dir, images.path().join("out"), "{}", dir.display());
    let (semver, build) = version.split_once('+').unwrap();
    assert_eq!(semver, "0.2.0");
    assert_eq!(manifest["suite"], "trixie");
    assert_eq!(build, &manifest["build_id"].as_str().unwrap()[..12]);
    let packages = manifest["packages"].as_array().unwrap();
    assert!(packages.iter().any(|p| p["name"] == "devos-agent"));
    assert!(
        packages
            .iter()
            .any(|p| p["name"] == "linux-image-cloud-amd64")
    );
    let labels: Vec<&str> = manifest["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["label"].as_str().unwrap())
        .collect();
    // A verified root in slot A (named with the version), slot B empty.
    let slot = format!("devos-debian_{}", version.replace('+', "_"));
    assert_eq!(
        labels,
        ["esp", &slot, &slot, "_empty", "_empty", "devos-var"]
    );
    assert!(manifest["root_hash"].is_string(), "{manifest:#}");

    // Every artifact is where the manifest says, with the hash SHA256SUMS records,
    // unchanged by the boot test.
    let sums = std::fs::read_to_string(dir.join("SHA256SUMS")).unwrap();
    let artifacts = manifest["artifacts"].as_array().unwrap();
    let formats: Vec<&str> = artifacts
        .iter()
        .map(|a| a["format"].as_str().unwrap())
        .collect();
    assert_eq!(formats, ["raw", "qcow2"]);
    for a in artifacts {
        let file = dir.join(a["file"].as_str().unwrap());
        let hash = devos_build::support::digest::file_sha256(&file).unwrap();
        assert_eq!(hash, a["sha256"].as_str().unwrap(), "{}", file.display());
        assert!(sums.contains(&format!("{hash}  {}", a["file"].as_str().unwrap())));
    }
    let info = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(dir.join(format!("devos-debian-{version}.qcow2")))
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], 2u64 << 30);

    // Same inputs: nothing is rebuilt.
    let again = run_with_timeout(
        devos_build_command()
            .current_dir(repo_root())
            .args(["image", "build", "--json", "--out"])
            .arg(images.path().join("out")),
        Duration::from_secs(10 * 60),
    )
    .unwrap();
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let again: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(again["fresh"], false);
    assert_eq!(again["manifest"]["version"], version);

    // It boots where users run it, not only from EC2's NVMe: QEMU's and libvirt's
    // default virtio-blk (virtio-scsi is the same initramfs path; `image test
    // --disk-bus virtio-scsi` covers it by hand).
    // Tested against a registry path that holds nothing: the test's result stands, it
    // is said not to be recorded, and no registry is made there.
    let bus = "virtio-blk";
    let elsewhere = images.path().join("no-registry-here.db");
    let out = run_with_timeout(
        devos_build_command()
            .env("DEVOS_REGISTRY", &elsewhere)
            .args(["image", "test", "--json", "--disk-bus", bus])
            .arg(dir),
        Duration::from_secs(10 * 60),
    )
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{bus}: {e}: {stderr}"));
    assert_eq!(report["passed"], true, "{bus}: {report:#}");
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "is not in the registry {}: the result is not recorded",
            elsewhere.display()
        )),
        "{stderr}"
    );
    assert!(!elsewhere.exists());
    host_keys.push(report["ssh_host_key"].as_str().unwrap().to_owned());
    // Each boot from the image (each with a fresh /var) made host keys of its own: none
    // is baked into the image.
    let distinct: std::collections::BTreeSet<&String> = host_keys.iter().collect();
    assert_eq!(distinct.len(), host_keys.len(), "{host_keys:?}");

    boot_logs_in_on_the_console_and_over_ssh(dir, images.path());
}

/// `image boot` as a user runs it: the console is logged in as the default user, and
/// `--ssh-port` hands the user's own key in as EC2 does, so `ssh dev@` just works.
fn boot_logs_in_on_the_console_and_over_ssh(dir: &Path, scratch: &Path) {
    require("ssh", "openssh-client");
    let key = scratch.join("id_user");
    let made = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(made.success());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let console = scratch.join("boot-console.log");
    // The accelerator as a user gets it: where KVM passes the probe but then fails
    // inside the VM (as on this kind of host), the boot starts again under TCG.
    let mut boot = devos_build_command()
        .args([
            "image",
            "boot",
            "--ssh-port",
            &port.to_string(),
            "--ssh-key",
        ])
        .arg(key.with_extension("pub"))
        .arg(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&console).unwrap())
        .stderr(std::fs::File::create(scratch.join("boot-stderr.log")).unwrap())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let (mut logged_in, mut last) = (false, String::new());
    while start.elapsed() < Duration::from_secs(300) && boot.try_wait().unwrap().is_none() {
        let out = Command::new("ssh")
            .args(["-F", "/dev/null", "-i"])
            .arg(&key)
            .args([
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "ConnectTimeout=20",
                "-p",
                &port.to_string(),
                "dev@127.0.0.1",
                "id -un",
            ])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        if out.status.success() {
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "dev");
            logged_in = true;
            break;
        }
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        std::thread::sleep(Duration::from_secs(2));
    }
    // The console shows the default user's shell prompt, no login prompt.
    let mut prompt = false;
    while logged_in && !prompt && start.elapsed() < Duration::from_secs(330) {
        prompt = std::fs::read_to_string(&console)
            .unwrap_or_default()
            .contains("dev@devos");
        std::thread::sleep(Duration::from_millis(500));
    }
    let _ = boot.kill();
    let _ = boot.wait();
    let stderr = std::fs::read_to_string(scratch.join("boot-stderr.log")).unwrap_or_default();
    let shown = std::fs::read_to_string(&console).unwrap_or_default();
    let tail: Vec<&str> = shown.lines().rev().take(30).collect();
    assert!(logged_in, "no ssh login: {last}\n{stderr}\n{tail:?}");
    assert!(prompt, "no autologin on the console:\n{stderr}\n{tail:?}");
}

/// `image plan` resolves the package set but never compiles: with no agent binaries
/// built it says the agent package is to be built, and the version not known yet.
#[test]
fn plan_starts_no_compiler() {
    let scratch = tempfile::tempdir().unwrap();
    let marker = scratch.path().join("cargo-ran");
    let fake_cargo = scratch.path().join("cargo");
    devos_tests::write_executable(
        &fake_cargo,
        &format!("#!/bin/sh\ntouch {}\nexit 1\n", marker.display()),
    );
    // A spec anywhere: outside any source tree, the agent comes from the tree this
    // devos-build was built from. And on a clean cache, the plan writes nothing.
    let elsewhere = scratch.path().join("specs/mine.toml");
    std::fs::create_dir(scratch.path().join("specs")).unwrap();
    std::fs::copy(repo_root().join("images/devos-debian.toml"), &elsewhere).unwrap();
    let clean_cache = scratch.path().join("clean-cache");
    let out = devos_build_command()
        .current_dir(scratch.path())
        .env("CARGO", &fake_cargo)
        .env("CARGO_TARGET_DIR", scratch.path().join("empty-target"))
        .env("DEVOS_CACHE_DIR", &clean_cache)
        .args(["image", "plan", "--json"])
        .arg(&elsewhere)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["agent"], "to be built", "{plan:#}");
    assert!(plan["version"].is_null(), "{plan:#}");
    assert!(plan["packages"].as_array().unwrap().len() > 50, "{plan:#}");
    assert!(!marker.exists(), "image plan ran cargo");
    assert!(!scratch.path().join("empty-target").exists());
    assert!(!clean_cache.exists(), "image plan wrote into the cache");
    let mut left: Vec<_> = std::fs::read_dir(scratch.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["cargo", "specs"], "image plan left files");
}

/// The accelerator choice is made by a real probe and always explained.
#[test]
fn kvm_probe_picks_an_accelerator_and_says_why() {
    require("qemu-system-x86_64", "qemu-system-x86");
    let dir = tempfile::tempdir().unwrap();
    let choice = devos_build::boottest::vm::choose_accel(dir.path());
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    match choice.accel {
        devos_build::boottest::vm::Accel::Kvm => {
            assert!(usable);
            assert!(
                choice.reason.starts_with("KVM probe passed"),
                "{}",
                choice.reason
            );
        }
        devos_build::boottest::vm::Accel::Tcg if usable => {
            // This is the path on machines whose /dev/kvm dies with "KVM internal error".
            assert!(
                choice.reason.starts_with("KVM is broken: "),
                "{}",
                choice.reason
            );
        }
        devos_build::boottest::vm::Accel::Tcg => {
            assert!(choice.reason.contains("/dev/kvm"), "{}", choice.reason);
        }
    }
}

/// Where state lives (README): a non-root `image list` with no registry creates
/// nothing; a non-root build stops at once saying to use sudo; under sudo, the
/// registry and cache go to the invoking user's home and are theirs, so their own
/// `image list` reads what the root command recorded.
#[test]
fn state_under_sudo_belongs_to_the_invoking_user() {
    use std::os::unix::fs::MetadataExt;
    let user = devos_tests::sudo::SudoUser::new("t");
    let home = user.home();
    let uid = |p: &Path| std::fs::metadata(p).unwrap().uid();
    let user_uid = user.uid;
    let bin = user.install(Path::new(env!("CARGO_BIN_EXE_devos-build")));
    let as_user = |args: &[&str]| user.run(&bin, args);
    let as_sudo = |args: &[&str]| user.sudo(&bin, args);
    let registry = home.join(".local/share/devos/registry.db");

    // Read-only commands create nothing.
    let list = as_user(&["image", "list", "--json"]);
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&list.stdout).trim(), "[]");
    assert!(!home.join(".local").exists());
    assert!(!home.join(".cache").exists());

    // A build without root stops before doing anything. The spec is one the user can
    // read: the checkout may live where only root may enter.
    let spec = home.join("devos-debian.toml");
    std::fs::copy(repo_root().join("images/devos-debian.toml"), &spec).unwrap();
    user.give(&spec);
    let build = as_user(&["image", "build", "--json", spec.to_str().unwrap()]);
    assert_eq!(build.status.code(), Some(1));
    let err = String::from_utf8_lossy(&build.stderr);
    assert!(err.contains("needs root") && err.contains("sudo"), "{err}");
    assert!(!home.join(".cache").exists());

    // As root under sudo: the registry is made in the user's home, theirs.
    let gc = as_sudo(&["image", "gc", "--json"]);
    assert!(
        gc.status.success(),
        "{}",
        String::from_utf8_lossy(&gc.stderr)
    );
    assert!(
        registry.is_file(),
        "no registry in the invoking user's home"
    );
    for p in [
        home.join(".local"),
        home.join(".local/share/devos"),
        registry.clone(),
    ] {
        assert_eq!(uid(&p), user_uid, "{} is not the user's", p.display());
    }
    // And the user reads (and may write) it without sudo.
    let list = as_user(&["image", "list", "--json"]);
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    let gc = as_user(&["image", "gc", "--json"]);
    assert!(
        gc.status.success(),
        "{}",
        String::from_utf8_lossy(&gc.stderr)
    );
}
