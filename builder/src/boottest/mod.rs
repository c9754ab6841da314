//! `image test` and `image boot`: boot the exact artifact under QEMU + OVMF through a
//! throw-away overlay; for a test, switch the guest's self-test on and collect its
//! report, failing with the console's last lines on a panic, a crash or a timeout.

pub mod vm;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::build;

use crate::boottest::vm::AccelChoice;
use crate::boottest::vm::Vm;
use crate::model::manifest::Manifest;

/// What to boot: an image file, an output directory, a spec (its newest build), or a
/// registry reference `NAME[@VERSION]`.
pub struct Target {
    pub disk: PathBuf,
    pub manifest: Option<Manifest>,
    /// The spec's `[[tests]]`, run inside the guest after the built-in checks.
    pub tests: Vec<crate::model::spec::Test>,
}

impl Target {
    /// The built version in `dir`, with the tests of `spec` (if given).
    pub fn from_dir(dir: &Path, spec: Option<&crate::model::spec::Spec>) -> Result<Self> {
        let manifest = Manifest::load(dir)?;
        let disk = manifest.raw(dir).with_context(|| {
            format!(
                "{} lists no raw artifact",
                dir.join("manifest.json").display()
            )
        })?;
        Ok(Self {
            disk,
            manifest: Some(manifest),
            tests: spec.map(|s| s.tests.clone()).unwrap_or_default(),
        })
    }
}

pub fn resolve_target(arg: &Path, registry: &Path) -> Result<Target> {
    if arg.is_dir() {
        return Target::from_dir(arg, None);
    }
    if arg.extension().is_some_and(|e| e == "toml") {
        let spec = crate::model::spec::load(arg)?;
        // The newest version built from this spec file, else the newest of its name.
        let from_registry = crate::store::registry::Registry::open(registry)
            .and_then(|r| r.versions(Some(&spec.name)))
            .unwrap_or_default()
            .into_iter()
            .filter(|v| v.state == "built" && v.dir.join("manifest.json").is_file())
            .max_by_key(|v| (same_file(Path::new(&v.spec), &spec.path), v.built_at))
            .map(|v| v.dir);
        let dir = build::images_root(&spec.path).join(&spec.name);
        let newest = from_registry.or_else(|| newest_build(&dir)).with_context(|| {
            format!(
                "no build of `{}` found in the registry or {}\n  hint: run `devos-build image build {}` first (or `image build --test`)",
                spec.name,
                dir.display(),
                arg.display()
            )
        })?;
        return Target::from_dir(&newest, Some(&spec));
    }
    if arg.is_file() {
        let manifest = arg.parent().and_then(|d| Manifest::load(d).ok());
        return Ok(Target {
            disk: arg.to_path_buf(),
            manifest,
            tests: Vec::new(),
        });
    }
    let reference = arg.to_string_lossy();
    if !reference.contains('/') {
        let reg = crate::store::registry::Registry::open(registry)?;
        let v = reg.find(&reference)?;
        if v.state != "built" || !v.dir.join("manifest.json").is_file() {
            bail!(
                "{}@{} is in the registry but its artifacts are gone ({})\n  hint: rebuild it with `devos-build image build {}`",
                v.name,
                v.version,
                v.dir.display(),
                v.spec
            );
        }
        // The tests of the spec it was built from, as that spec reads now.
        let spec = crate::model::spec::load(Path::new(&v.spec)).ok();
        return Target::from_dir(&v.dir, spec.as_ref());
    }
    bail!(
        "`{}` is neither an image file, an image output directory, a spec nor a registry reference\n  hint: pass e.g. `images/devos-debian.toml`, `target/images/devos-debian/VERSION/` or `devos-debian@VERSION`",
        arg.display()
    )
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

fn newest_build(dir: &Path) -> Option<PathBuf> {
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("manifest.json").is_file())
        .max_by_key(|p| {
            fs::metadata(p.join("manifest.json"))
                .and_then(|m| m.modified())
                .ok()
        })
}

pub struct TestOptions {
    pub memory_mib: u32,
    pub cpus: u32,
    pub timeout: Duration,
    /// Keep the overlay and logs (their directory is printed).
    pub keep: bool,
}

impl Default for TestOptions {
    fn default() -> Self {
        Self {
            memory_mib: 1024,
            cpus: 2,
            timeout: Duration::from_secs(180),
            keep: false,
        }
    }
}

/// One check reported by the guest (see `devos_agent::selftest`) or made by the host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Check {
    pub check: String,
    pub ok: bool,
    pub detail: String,
    #[serde(default)]
    pub ms: u128,
}

#[derive(Debug, Serialize)]
pub struct TestReport {
    pub disk: PathBuf,
    pub version: Option<String>,
    pub accel: AccelChoice,
    pub passed: bool,
    pub checks: Vec<Check>,
    /// Seconds from QEMU start until the guest's report was complete.
    pub seconds: f64,
    /// Seconds from QEMU start until the host saw the agent answer `Ping`.
    pub agent_answered_seconds: Option<f64>,
    pub failure: Option<String>,
    pub console_tail: Vec<String>,
    /// Where the console log and overlay were kept (`--keep`).
    pub kept: Option<PathBuf>,
}

/// QEMU messages that mean KVM itself failed (a probe can pass on a host whose KVM
/// then dies on the real machine type, mid-run or at once): the run is repeated under
/// TCG. Seen: "KVM internal error" (and a hang), "kvm run failed", and an abort at
/// start from "failed to set MSR ..." (`kvm_buf_set_msrs` assertion).
const KVM_FAILURES: &[&str] = &[
    "KVM internal error",
    "kvm run failed",
    "failed to set MSR",
    "kvm_buf_set_msrs",
];

/// The first line of QEMU's stderr that says KVM failed.
fn kvm_failure(said: &str) -> Option<String> {
    said.lines()
        .find(|l| KVM_FAILURES.iter().any(|k| l.contains(k)))
        .map(|l| l.trim().to_owned())
}

/// One VM run: how it ended, and when the agent answered.
struct Run {
    outcome: Result<(), String>,
    kvm_failed: Option<String>,
    seconds: f64,
    agent_answered_seconds: Option<f64>,
}

fn run_vm(scratch: &Scratch, target: &Target, opts: &TestOptions) -> Result<Run> {
    let dir = &scratch.dir;
    let console = dir.path().join("console.log");
    let report = dir.path().join("selftest.jsonl");
    let stderr_path = dir.path().join("qemu.stderr");
    for stale in [&console, &report] {
        let _ = fs::remove_file(stale);
    }
    let tests_json = (!target.tests.is_empty())
        .then(|| serde_json::to_string(&target.tests))
        .transpose()?;
    let mut vm = scratch.vm(
        opts.memory_mib,
        opts.cpus,
        Some(&console),
        Some(&report),
        None,
    );
    vm.tests_json = tests_json.as_deref();
    let stderr = fs::File::create(&stderr_path)?;
    let start = Instant::now();
    let mut child = crate::support::cmd::spawn(
        vm.command(&scratch.fw).stdout(Stdio::null()).stderr(stderr),
        false,
    )?;
    let mut agent_answered_seconds = None;
    let kvm = scratch.accel.accel == vm::Accel::Kvm;
    let mut kvm_failed = None;
    let outcome = watch(&mut child, &console, &report, opts.timeout, |checks| {
        if agent_answered_seconds.is_none()
            && checks.iter().any(|c| c.check == "agent-ping" && c.ok)
        {
            agent_answered_seconds = Some(start.elapsed().as_secs_f64());
        }
        if kvm {
            kvm_failed = kvm_failure(&fs::read_to_string(&stderr_path).unwrap_or_default());
        }
        kvm_failed.is_some()
    });
    let _ = child.kill();
    let _ = child.wait();
    // QEMU may have died before the watcher looked at its stderr.
    if kvm && kvm_failed.is_none() && outcome.is_err() {
        kvm_failed = kvm_failure(&fs::read_to_string(&stderr_path).unwrap_or_default());
    }
    Ok(Run {
        outcome,
        kvm_failed,
        seconds: start.elapsed().as_secs_f64(),
        agent_answered_seconds,
    })
}

/// Boot the target with the self-test switched on and collect its report.
pub fn test(target: &Target, opts: &TestOptions) -> Result<TestReport> {
    let mut scratch = Scratch::prepare(target, "devos-test-")?;
    let mut run = run_vm(&scratch, target, opts)?;
    if let Some(error) = run.kvm_failed.take() {
        tracing::warn!("KVM failed during the run ({error}); booting again under TCG");
        scratch.fall_back_to_tcg(
            target,
            &format!(
                "{}, but the VM then failed under KVM ({error}); fell back to TCG",
                scratch.accel.reason
            ),
        )?;
        run = run_vm(&scratch, target, opts)?;
    }
    let Run {
        outcome,
        seconds,
        agent_answered_seconds,
        ..
    } = run;
    let dir = &scratch.dir;
    let console = dir.path().join("console.log");
    let report = dir.path().join("selftest.jsonl");

    let (mut checks, _) = read_report(&report);
    let expected = target.manifest.as_ref().map(|m| m.version.clone());
    if let (Some(want), Some(got)) = (
        &expected,
        checks.iter().find(|c| c.check == "agent-version"),
    ) {
        checks.push(Check {
            check: "version-matches-build".into(),
            ok: got.ok && &got.detail == want,
            detail: format!("agent reports {}, build is {want}", got.detail),
            ms: 0,
        });
    }
    let mut failure = outcome.err();
    if failure.is_none() {
        if let Some(bad) = checks.iter().find(|c| !c.ok) {
            failure = Some(format!("check `{}` failed: {}", bad.check, bad.detail));
        } else if !checks.iter().any(|c| c.check == "agent-ping") {
            failure = Some("the guest reported no agent-ping result".into());
        }
    }
    let qemu_err = fs::read_to_string(dir.path().join("qemu.stderr")).unwrap_or_default();
    if let Some(f) = &mut failure
        && !qemu_err.trim().is_empty()
    {
        f.push_str(&format!("\n  QEMU said: {}", qemu_err.trim()));
    }
    let console_tail = tail_lines(&console, 30);
    let Scratch { dir, accel, .. } = scratch;
    let kept = if opts.keep { Some(dir.keep()) } else { None };
    Ok(TestReport {
        disk: target.disk.clone(),
        version: expected,
        accel,
        passed: failure.is_none(),
        checks,
        seconds,
        agent_answered_seconds,
        failure,
        console_tail,
        kept,
    })
}

/// Wait for the guest's final report line, a kernel panic, QEMU exiting, the timeout,
/// or `progress` (called with the checks so far) asking to stop.
fn watch(
    child: &mut Child,
    console: &Path,
    report: &Path,
    timeout: Duration,
    mut progress: impl FnMut(&[Check]) -> bool,
) -> Result<(), String> {
    let start = Instant::now();
    loop {
        let (checks, done) = read_report(report);
        if progress(&checks) {
            return Err("stopped by the watcher".into());
        }
        if done {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&fs::read(console).unwrap_or_default()).into_owned();
        if let Some(diagnosis) = diagnose_console(&text) {
            return Err(diagnosis);
        }
        match child.try_wait() {
            Ok(Some(status)) => {
                // The report may have landed just before the guest powered off.
                if read_report(report).1 {
                    return Ok(());
                }
                return Err(format!(
                    "the VM stopped ({status}) before the self-test reported"
                ));
            }
            Ok(None) => {}
            Err(e) => return Err(format!("cannot watch QEMU: {e}")),
        }
        if start.elapsed() > timeout {
            return Err(format!(
                "timed out after {}s waiting for the guest's self-test (the boot hung or the agent never answered)",
                timeout.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Console lines that mean the boot cannot succeed, and what they mean. Seen, the test
/// fails at once instead of waiting for its timeout.
const FATAL_CONSOLE: &[(&str, &str)] = &[
    (
        "VFS: Unable to mount root fs",
        "the kernel could not find the root filesystem (check root= on the kernel command line)",
    ),
    ("Kernel panic", "kernel panic"),
    (
        "Gave up waiting for root",
        "the initramfs could not find the root filesystem (check root= on the kernel command line)",
    ),
    (
        "does not exist.  Dropping to a shell",
        "the initramfs could not find the root filesystem (check root= on the kernel command line)",
    ),
    (
        "You are in emergency mode",
        "systemd entered emergency mode",
    ),
    (
        "Failed to start Switch Root",
        "switching to the root filesystem failed",
    ),
];

fn diagnose_console(text: &str) -> Option<String> {
    for line in text.lines() {
        for (needle, meaning) in FATAL_CONSOLE {
            if line.contains(needle) {
                let line = line.replace(|c: char| c.is_control() && c != '\t', "");
                return Some(format!("{meaning}: {}", line.trim()));
            }
        }
    }
    None
}

/// The guest's results so far, and whether its final line (`{"done": ...}`) arrived.
fn read_report(report: &Path) -> (Vec<Check>, bool) {
    let text = fs::read_to_string(report).unwrap_or_default();
    let mut checks = Vec::new();
    let mut done = false;
    for line in text.lines() {
        if let Ok(check) = serde_json::from_str::<Check>(line) {
            checks.push(check);
        } else if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
            done |= v.get("done").is_some();
        }
    }
    (checks, done)
}

fn tail_lines(path: &Path, n: usize) -> Vec<String> {
    let text = fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<String> = text
        .lines()
        .map(|l| l.replace(|c: char| c.is_control() && c != '\t', ""))
        .filter(|l| !l.trim().is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

impl TestReport {
    /// The human summary printed after a test.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "boot test of {} ({}): {} in {:.1}s under {:?} ({})\n",
            self.disk.display(),
            self.version.as_deref().unwrap_or("unknown version"),
            if self.passed { "PASSED" } else { "FAILED" },
            self.seconds,
            self.accel.accel,
            self.accel.reason
        );
        if let Some(t) = self.agent_answered_seconds {
            s.push_str(&format!("  agent answered {t:.1}s after QEMU started\n"));
        }
        for c in &self.checks {
            s.push_str(&format!(
                "  [{}] {}: {}\n",
                if c.ok { " ok " } else { "FAIL" },
                c.check,
                c.detail
            ));
        }
        if let Some(f) = &self.failure {
            s.push_str(&format!("failure: {f}\nlast console lines:\n"));
            for l in &self.console_tail {
                s.push_str(&format!("  | {l}\n"));
            }
        }
        if let Some(k) = &self.kept {
            s.push_str(&format!("kept overlay and logs in {}\n", k.display()));
        }
        s
    }
}

impl TestReport {
    /// The report as JUnit XML: one test case per check, the failure's diagnosis and
    /// the console's last lines when the run failed.
    pub fn junit(&self) -> String {
        let name = self.version.as_deref().unwrap_or("image");
        let failures = self.checks.iter().filter(|c| !c.ok).count()
            + usize::from(self.failure.is_some() && self.checks.iter().all(|c| c.ok));
        let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        x.push_str(&format!(
            "<testsuites>\n  <testsuite name=\"devos boot test {}\" tests=\"{}\" failures=\"{failures}\" time=\"{:.3}\">\n",
            xml(name),
            self.checks.len() + 1,
            self.seconds
        ));
        for c in &self.checks {
            x.push_str(&format!(
                "    <testcase classname=\"{}\" name=\"{}\" time=\"{:.3}\">",
                xml(name),
                xml(&c.check),
                c.ms as f64 / 1000.0
            ));
            if c.ok {
                x.push_str(&format!("<system-out>{}</system-out>", xml(&c.detail)));
            } else {
                x.push_str(&format!(
                    "<failure message=\"{}\">{}</failure>",
                    xml(c.detail.lines().next().unwrap_or_default()),
                    xml(&c.detail)
                ));
            }
            x.push_str("</testcase>\n");
        }
        x.push_str(&format!(
            "    <testcase classname=\"{}\" name=\"boot\" time=\"{:.3}\">",
            xml(name),
            self.seconds
        ));
        if let Some(f) = &self.failure {
            x.push_str(&format!(
                "<failure message=\"{}\">{}\n\nlast console lines:\n{}</failure>",
                xml(f.lines().next().unwrap_or_default()),
                xml(f),
                xml(&self.console_tail.join("\n"))
            ));
        }
        x.push_str("</testcase>\n  </testsuite>\n</testsuites>\n");
        x
    }
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace(|c: char| c.is_control() && c != '\n' && c != '\t', "")
}

/// An interactive boot: the serial console on this terminal (Ctrl-A X quits).
pub fn boot(target: &Target, memory_mib: u32, cpus: u32, ssh_port: Option<u16>) -> Result<()> {
    let scratch = Scratch::prepare(target, "devos-boot-")?;
    eprintln!(
        "booting {} under {:?} ({}); quit with Ctrl-A X",
        target.disk.display(),
        scratch.accel.accel,
        scratch.accel.reason
    );
    if let Some(port) = ssh_port {
        eprintln!("ssh: ssh -p {port} USER@127.0.0.1");
    }
    let vm = scratch.vm(memory_mib, cpus, None, None, ssh_port);
    let status = crate::support::cmd::spawn(&mut vm.command(&scratch.fw), true)?.wait()?;
    if !status.success() {
        bail!("QEMU exited with {status}");
    }
    Ok(())
}

/// What every VM run needs: firmware, the accelerator choice, and a scratch directory
/// with a copy-on-write overlay over the target and a private UEFI variable store.
struct Scratch {
    dir: tempfile::TempDir,
    fw: vm::Firmware,
    accel: AccelChoice,
    overlay: PathBuf,
    vars: PathBuf,
}

impl Scratch {
    /// Start over under TCG: a fresh overlay and variable store (the failed run may
    /// have written to them).
    fn fall_back_to_tcg(&mut self, target: &Target, reason: &str) -> Result<()> {
        self.accel = AccelChoice {
            accel: vm::Accel::Tcg,
            reason: reason.to_owned(),
        };
        tracing::info!("accelerator: Tcg ({reason})");
        let _ = fs::remove_file(&self.overlay);
        vm::overlay(&target.disk, vm::disk_format(&target.disk), &self.overlay)?;
        vm::vars_copy(&self.fw, &self.vars)?;
        Ok(())
    }

    fn prepare(target: &Target, prefix: &str) -> Result<Self> {
        vm::require_qemu()?;
        let fw = vm::firmware()?;
        let dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
        let accel = vm::choose_accel(dir.path());
        tracing::info!("accelerator: {:?} ({})", accel.accel, accel.reason);
        let overlay = dir.path().join("overlay.qcow2");
        vm::overlay(&target.disk, vm::disk_format(&target.disk), &overlay)?;
        let vars = dir.path().join("vars.fd");
        vm::vars_copy(&fw, &vars)?;
        Ok(Self {
            dir,
            fw,
            accel,
            overlay,
            vars,
        })
    }

    fn vm<'a>(
        &'a self,
        memory_mib: u32,
        cpus: u32,
        console_log: Option<&'a Path>,
        selftest_report: Option<&'a Path>,
        ssh_port: Option<u16>,
    ) -> Vm<'a> {
        Vm {
            disk: &self.overlay,
            vars: &self.vars,
            accel: self.accel.accel,
            memory_mib,
            cpus,
            console_log,
            selftest_report,
            tests_json: None,
            ssh_port,
        }
    }
}

#[cfg(test)]
mod kvm_tests {
    use super::{diagnose_console, kvm_failure};

    #[test]
    fn a_root_that_cannot_be_found_is_named_with_or_without_an_initramfs() {
        let direct = "[    4.548902] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)\n";
        let initramfs = "Gave up waiting for root file system device.\nALERT!  PARTUUID=0000 does not exist.  Dropping to a shell!\n";
        for console in [direct, initramfs] {
            let d = diagnose_console(console).unwrap();
            assert!(d.contains("could not find the root filesystem"), "{d}");
        }
        assert!(
            diagnose_console("Kernel panic - not syncing: Attempted to kill init!\n")
                .unwrap()
                .starts_with("kernel panic")
        );
    }

    #[test]
    fn kvm_failures_are_recognised_in_qemu_stderr() {
        let abort = "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69\nqemu-system-x86_64: ../../target/i386/kvm/kvm.c:3183: kvm_buf_set_msrs: Assertion failed.\n";
        assert_eq!(
            kvm_failure(abort).as_deref(),
            Some("qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69")
        );
        assert!(kvm_failure("KVM internal error. Suberror: 1\n").is_some());
        assert!(kvm_failure("qemu-system-x86_64: terminating on signal 15\n").is_none());
    }
}
