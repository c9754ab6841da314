//! `image test` and `image boot`: boot the exact artifact under QEMU + OVMF through a
//! throw-away overlay; for a test, switch the guest's self-test on and collect its
//! report, failing with the console's last lines on a panic, a crash or a timeout.

mod diagnosis;
pub(crate) mod ec2;
pub(crate) mod junit;
mod monitor;
mod target;
pub(crate) mod update;
pub mod vm;

pub(crate) use target::{Target, resolve_target};

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::support::remove;
use diagnosis::{diagnose_console, kvm_failure, read_report, silent_after_firmware, tail_lines};
use vm::{AccelChoice, Scratch};

pub(crate) struct TestOptions {
    pub(crate) memory_mib: u32,
    pub(crate) cpus: u32,
    pub(crate) timeout: Duration,
    /// Keep the overlay and logs (their directory is printed).
    pub(crate) keep: bool,
    /// The bus the disk is attached to.
    pub(crate) disk_bus: vm::DiskBus,
    /// Boot once, update to this version from a feed on the host, and test the boot
    /// after.
    pub(crate) update_to: Option<update::UpdateTo>,
}

impl Default for TestOptions {
    fn default() -> Self {
        Self {
            memory_mib: 1024,
            cpus: 2,
            timeout: Duration::from_secs(180),
            keep: false,
            disk_bus: vm::DiskBus::default(),
            update_to: None,
        }
    }
}

/// One check reported by the guest (see `devos_agent::selftest`) or made by the host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Check {
    pub(crate) check: String,
    pub(crate) ok: bool,
    pub(crate) detail: String,
    #[serde(default)]
    pub(crate) ms: u128,
}

#[derive(Debug, Serialize)]
pub(crate) struct TestReport {
    pub(crate) disk: PathBuf,
    pub(crate) version: Option<String>,
    pub(crate) accel: AccelChoice,
    pub(crate) passed: bool,
    pub(crate) checks: Vec<Check>,
    /// Seconds from QEMU start until the guest's report was complete.
    pub(crate) seconds: f64,
    /// Seconds from QEMU start until the host saw the agent answer `Ping`.
    pub(crate) agent_answered_seconds: Option<f64>,
    /// The SSH host key (`SHA256:...`) the guest showed the host's login, when the
    /// image has an SSH server.
    pub(crate) ssh_host_key: Option<String>,
    pub(crate) failure: Option<String>,
    pub(crate) console_tail: Vec<String>,
    /// Where the console log and overlay were kept (`--keep`).
    pub(crate) kept: Option<PathBuf>,
}

/// One VM run: how it ended, and when the agent answered.
struct Run {
    outcome: Result<(), String>,
    kvm_failed: Option<String>,
    seconds: f64,
    agent_answered_seconds: Option<f64>,
    /// The host's SSH login, when the image has an SSH server.
    ssh: Option<Result<ec2::LoggedIn, String>>,
    /// The checks the guest reported.
    checks: Vec<Check>,
    /// QEMU exited by itself (the guest powered off or rebooted; QEMU runs with
    /// -no-reboot) rather than being stopped by the host.
    stopped_by_itself: bool,
    /// The console showed nothing after the firmware started the boot loader.
    silent: bool,
}

/// Who the boot test logs in as over SSH: the image's default user, when the image
/// has OpenSSH's server and the agent (whose devos-ec2-keys.service hands the key in).
fn ssh_user(target: &Target) -> Option<&str> {
    let m = target.manifest.as_ref()?;
    (m.has_package("openssh-server") && m.agent.is_some())
        .then(|| m.users.first().map(String::as_str))
        .flatten()
}

/// One boot of the scratch disk; with `feeds`, the guest refuses the forged ones and
/// installs the newest version from the good one; with `rollback`, it goes back to the
/// version before its own once its checks have passed.
fn run_vm(
    scratch: &Scratch,
    target: &Target,
    opts: &TestOptions,
    feeds: Option<&update::Feeds>,
    rollback: bool,
) -> Result<Run> {
    let dir = &scratch.dir;
    let console = dir.path().join("console.log");
    let report = dir.path().join("selftest.jsonl");
    let stderr_path = dir.path().join("qemu.stderr");
    // Left by a run under KVM before the fall-back to TCG: the watcher must not read them.
    for stale in [&console, &report] {
        remove::file_if_present(stale)?;
    }
    let tests_json = (!target.tests.is_empty())
        .then(|| serde_json::to_string(&target.tests))
        .transpose()?;
    let mut vm = scratch.vm(
        opts.memory_mib,
        opts.cpus,
        opts.disk_bus,
        Some(&console),
        Some(&report),
    );
    vm.tests_json = tests_json.as_deref();
    // An image with an SSH server is booted as an EC2 instance with a key pair, and
    // the host logs in with that key while the guest waits for it.
    let login = ssh_user(target)
        .map(|user| ec2::Login::prepare(dir.path(), user))
        .transpose()?;
    let standin = login
        .as_ref()
        .map(|l| ec2::StandIn::start(Some(l.public_key.clone()), None))
        .transpose()?;
    let mut network = standin.as_ref().map(ec2::StandIn::qemu_args).transpose()?;
    if let Some(feeds) = feeds {
        network.get_or_insert_with(update::network);
        vm.credentials
            .push(format!("devos.update-refuse={}", feeds.refuse));
        vm.credentials
            .push(format!("devos.update-feed={}", feeds.install));
    }
    if rollback {
        vm.credentials.push("devos.update-rollback=1".into());
    }
    if target.secure_boot() {
        vm.credentials.push("devos.secure-boot=1".into());
    }
    vm.network = network.as_deref();
    if let Some(login) = &login {
        vm.credentials
            .push(format!("devos.ssh-login={}", login.nonce));
    }
    let stderr = fs::File::create(&stderr_path)?;
    let start = Instant::now();
    let mut child = crate::support::cmd::spawn(
        vm.command(&scratch.fw).stdout(Stdio::null()).stderr(stderr),
        false,
    )?;
    let mut agent_answered_seconds = None;
    let kvm = scratch.accel.accel == vm::Accel::Kvm;
    let mut kvm_failed = None;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (outcome, ssh) = std::thread::scope(|s| {
        let ssh = login
            .as_ref()
            .zip(standin.as_ref())
            .map(|(login, standin)| {
                s.spawn(|| login.until_in(standin.ssh_port, &stop, opts.timeout))
            });
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
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let ssh = ssh.map(|t| {
            t.join()
                .unwrap_or_else(|_| Err("the SSH login thread panicked".into()))
        });
        (outcome, ssh)
    });
    // A boot that timed out: where the guest was (QEMU still runs it).
    let outcome = outcome.map_err(|failure| {
        let cpus = timed_out(&failure)
            .then(|| monitor::socket(&console))
            .flatten()
            .and_then(|socket| monitor::where_cpus(&socket));
        match cpus {
            Some(cpus) => format!("{failure}\n  the guest when the test gave up: {cpus}"),
            None => failure,
        }
    });
    let said = String::from_utf8_lossy(&fs::read(&console).unwrap_or_default()).into_owned();
    let silent = silent_after_firmware(&said);
    // An updatable image reboots a while after a kernel panic (QEMU, run with
    // -no-reboot, then exits): give it that while, for such a reboot is a try used up.
    // (The diagnosis may name what led to the panic rather than the panic.)
    if let (Err(_), Some(seconds)) = (&outcome, panic_reboot(target, opts))
        && said.contains("Kernel panic")
    {
        exits_within(&mut child, Duration::from_secs(seconds.min(300) + 30));
    }
    let stopped_by_itself = matches!(child.try_wait(), Ok(Some(_)));
    stop_qemu(&mut child);
    // QEMU may have died before the watcher looked at its stderr.
    if kvm && kvm_failed.is_none() && outcome.is_err() {
        kvm_failed = kvm_failure(&fs::read_to_string(&stderr_path).unwrap_or_default());
    }
    Ok(Run {
        outcome,
        kvm_failed,
        seconds: start.elapsed().as_secs_f64(),
        agent_answered_seconds,
        ssh,
        checks: read_report(&report).0,
        stopped_by_itself,
        silent,
    })
}

/// Stop a test VM's QEMU so that the next boot of its disk sees everything the guest
/// wrote: SIGTERM first, on which QEMU closes the disk and writes the qcow2 overlay's
/// cached tables (the drive runs with cache=unsafe, so the guest's own flushes do not
/// reach the file; a SIGKILL lost the last writes of a boot, such as the audit entry
/// of an update made just before the host stopped the VM). SIGKILL if it does not
/// exit within 20 s.
fn stop_qemu(child: &mut Child) {
    // Signalled only while QEMU is known not to be reaped, so the pid is its.
    if matches!(child.try_wait(), Ok(None)) {
        sigterm(child);
        exits_within(child, Duration::from_secs(20));
    }
    // QEMU may have exited already (its kill then fails), and waiting only reaps it.
    let _ = child.kill();
    let _ = child.wait();
}

/// Ask QEMU to quit: it closes its disks and gives the terminal back.
fn sigterm(child: &Child) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
}

/// Wait at most `wait` for QEMU to exit by itself.
fn exits_within(child: &mut Child, wait: Duration) {
    let until = Instant::now() + wait;
    while Instant::now() < until && matches!(child.try_wait(), Ok(None)) {
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One boot of the scratch disk with the self-test on (under TCG again when KVM
/// fails during it), and the checks it reported.
fn boot_and_report(
    scratch: &mut Scratch,
    target: &Target,
    opts: &TestOptions,
    feeds: Option<&update::Feeds>,
    rollback: bool,
) -> Result<Run> {
    scratch.checkpoint()?;
    let mut run = run_vm(scratch, target, opts, feeds, rollback)?;
    if let Some(error) = run.kvm_failed.take() {
        tracing::warn!(
            "KVM failed during boot {} ({error}); booting it again under TCG",
            scratch.boots + 1
        );
        scratch.fall_back_to_tcg(target, &error)?;
        run = run_vm(scratch, target, opts, feeds, rollback)?;
    }
    let tcg = scratch.accel.accel == vm::Accel::Tcg;
    if let Some(fault) = tcg_fault(tcg, &run) {
        // This host's QEMU (7.2) runs a multi-threaded TCG guest's kernel into a fault
        // now and then, in code the kernel was patching at the time (seen:
        // `devcgroup_check_permission`, `sched_clock_cpu`), that the same disk does not
        // repeat; once, in this project's CI, a boot of an image that boots in 20 s
        // showed nothing after the firmware for 150 s. That boot is run again once, from
        // the disk as it was before it, and the report says so (the spoiled boot's
        // console is kept beside the next one's, for `--keep-vm`); a kernel that crashes
        // or hangs again fails the test.
        tracing::warn!(
            "boot {} {fault}; booting it again from the disk as it was before, once",
            scratch.boots + 1
        );
        let console = scratch.dir.path().join("console.log");
        let kept = scratch
            .dir
            .path()
            .join(format!("console.boot-{}-spoiled.log", scratch.boots + 1));
        // (Kept for whoever looks, if it can be: the test goes on either way.)
        let _ = fs::rename(&console, &kept);
        scratch.rewind(target)?;
        run = run_vm(scratch, target, opts, feeds, rollback)?;
        run.checks.insert(
            0,
            Check {
                check: TCG_FAULT.into(),
                ok: true,
                detail: format!(
                    "boot {} {fault}; this is that boot again, from the disk as it was before it",
                    scratch.boots + 1
                ),
                ms: 0,
            },
        );
    }
    scratch.boots += 1;
    Ok(run)
}

/// The check that says a boot was spoiled by the emulator and run again (JUnit reports
/// it as a flaky failure of a passing case, so CI dashboards count reruns).
pub(crate) const TCG_FAULT: &str = "tcg-fault";

/// How a boot under TCG ended, when the emulator may have spoiled it: in a kernel oops
/// (`Fatal exception`; not a panic the kernel chose: no root, init died, a `sysrq`
/// crash, which a second boot would only repeat), or out of time with nothing from the
/// guest at all.
fn tcg_fault(tcg: bool, run: &Run) -> Option<String> {
    let Err(outcome) = &run.outcome else {
        return None;
    };
    let first_line = || outcome.lines().next().unwrap_or(outcome).trim();
    let oops = outcome.starts_with("kernel panic")
        && outcome.contains("Kernel panic - not syncing: Fatal exception");
    // Nothing at all from the guest: no check reported, nothing on the console after
    // the firmware started the boot loader (a boot that printed anything, or whose
    // self-test began, got far enough for its own faults to show: not run again).
    let hung = timed_out(outcome) && run.checks.is_empty() && run.silent;
    if tcg && oops {
        Some(format!("crashed under TCG ({})", first_line()))
    } else if tcg && hung {
        Some(format!(
            "showed nothing under TCG after the firmware started the boot loader ({})",
            outcome.replace("\n  ", "; ")
        ))
    } else {
        None
    }
}

/// How long after a kernel panic the booted disk reboots by itself (`panic=N` on the
/// command line of the version under test or the one it updates to), if it does.
fn panic_reboot(target: &Target, opts: &TestOptions) -> Option<u64> {
    let manifests = target
        .manifest
        .iter()
        .chain(opts.update_to.iter().map(|to| &to.manifest));
    manifests
        .filter_map(|m| panic_seconds(&m.kernel_cmdline))
        .max()
}

/// `panic=N` of a kernel command line (the last one counts) as seconds until the
/// reboot: a negative N reboots at once, 0 (the kernel's default) never.
fn panic_seconds(cmdline: &str) -> Option<u64> {
    let n: i64 = cmdline
        .split_whitespace()
        .filter_map(|arg| arg.strip_prefix("panic="))
        .next_back()?
        .parse()
        .ok()?;
    (n != 0).then_some(n.max(0) as u64)
}

/// A boot of a version on trial that failed, in words: a counted boot that was not
/// blessed, or one that stopped by itself (a reboot, a panic) before its self-test
/// reported. None for any other boot.
fn failed_try(run: &Run) -> Option<String> {
    let entry = run.checks.iter().find(|c| c.check == "boot-entry");
    let counted = entry.is_some_and(|c| c.detail.contains("(counted"));
    let blessed = run.checks.iter().any(|c| c.check == "boot-blessed" && c.ok);
    let rebooted = run.stopped_by_itself && run.outcome.is_err();
    let unblessed_try = counted && !blessed;
    if !unblessed_try && !rebooted {
        return None;
    }
    let entry = entry.map_or("no boot entry reported", |c| c.detail.as_str());
    let why = run
        .checks
        .iter()
        .find(|c| !c.ok)
        .map(|c| format!("{}: {}", c.check, c.detail))
        .or_else(|| run.outcome.clone().err())
        .unwrap_or_else(|| "not blessed".into());
    Some(format!("{entry} — {why}"))
}

/// How much larger than the image the boot test's disk is: instances are often
/// launched with volumes larger than their image, and /var must take the difference
/// (the guest's `var-fills-disk` check).
const TEST_DISK_GROWTH: u64 = 1 << 30;

/// Boot the target with the self-test switched on and collect its report.
pub(crate) fn test(target: &Target, opts: &TestOptions) -> Result<TestReport> {
    let mut scratch = Scratch::prepare(target, "devos-test-", opts.keep, TEST_DISK_GROWTH)?;
    // An update test: the boot that installs the newer version comes first.
    let before = match &opts.update_to {
        Some(to) => update::install(&mut scratch, target, opts, to)?,
        None => Vec::new(),
    };
    // The first boot of the new version also goes back, once it has passed its checks.
    let installed = before.iter().any(|c| c.check == "update" && c.ok);
    let mut run = boot_and_report(&mut scratch, target, opts, None, installed)?;
    // After an update the new version is on trial: a boot of it that does not become
    // healthy reboots, systemd-boot counts the try, and once the tries are used up it
    // starts the previous version. Boot again as the machine would, until a boot is
    // not a failed try (or more boots than there are tries).
    let mut tries = Vec::new();
    if opts.update_to.is_some() {
        while tries.len() < crate::image::sysupdate::BOOT_TRIES as usize
            && let Some(failed) = failed_try(&run)
        {
            tries.push(failed);
            run = boot_and_report(&mut scratch, target, opts, None, false)?;
        }
    }
    let before = match (&opts.update_to, tries.is_empty()) {
        (Some(to), false) => {
            let now = run
                .checks
                .iter()
                .find(|c| c.check == "boot-entry")
                .map_or("an entry it did not name", |c| c.detail.as_str());
            let mut before = before;
            before.push(Check {
                check: "update-trial".into(),
                ok: false,
                detail: format!(
                    "{} did not become healthy in {} counted boot(s) ({}); the next boot started {now}",
                    to.manifest.version,
                    tries.len(),
                    tries.join("; ")
                ),
                ms: 0,
            });
            before
        }
        _ => before,
    };
    // It went back (`devos update --rollback`): the boot after must start the version
    // the machine came from, uncounted and healthy.
    let console = scratch.dir.path().join("console.log");
    let mut console_tail = tail_lines(&console, 30);
    let after_rollback = match &opts.update_to {
        Some(to) if run.checks.iter().any(|c| c.check == "rollback" && c.ok) => {
            let back = boot_and_report(&mut scratch, target, opts, None, false)?;
            let checks = rollback_checks(
                &back,
                target.manifest.as_ref().map(|m| m.version.as_str()),
                &to.manifest.version,
            );
            if !checks[0].ok {
                console_tail = tail_lines(&console, 30);
            }
            checks
        }
        _ => Vec::new(),
    };
    let Run {
        outcome,
        seconds,
        agent_answered_seconds,
        ssh,
        ..
    } = run;
    let dir = &scratch.dir;
    let mut checks: Vec<Check> = before
        .into_iter()
        .chain(run.checks)
        .chain(after_rollback)
        .collect();
    let expected = match &opts.update_to {
        Some(to) => Some(to.manifest.version.clone()),
        None => target.manifest.as_ref().map(|m| m.version.clone()),
    };
    if let (Some(want), Some(got)) = (
        &expected,
        checks.iter().find(|c| c.check == "agent-version"),
    ) {
        checks.push(version_matches(want, got));
    }
    let mut ssh_host_key = None;
    if let Some(ssh) = ssh {
        let user = ssh_user(target).unwrap_or_default();
        checks.push(match ssh {
            Ok(login) => {
                let detail = format!(
                    "logged in as {user} with the key handed in as EC2 instance metadata; host key {}",
                    login.host_key
                );
                ssh_host_key = Some(login.host_key);
                Check {
                    check: "ssh-from-host".into(),
                    ok: true,
                    detail,
                    ms: (login.seconds * 1000.0) as u128,
                }
            }
            Err(e) => Check {
                check: "ssh-from-host".into(),
                ok: false,
                detail: e,
                ms: 0,
            },
        });
    }
    let mut failure = outcome.err();
    if failure.is_none() {
        let bad: Vec<&Check> = checks.iter().filter(|c| !c.ok).collect();
        if let Some(first) = bad.first() {
            failure = Some(if bad.len() == 1 {
                format!("check `{}` failed: {}", first.check, first.detail)
            } else {
                // Each is named: the first's detail here, every one's in the checks.
                let names: Vec<String> = bad.iter().map(|c| format!("`{}`", c.check)).collect();
                format!(
                    "checks {} failed; `{}`: {}",
                    names.join(", "),
                    first.check,
                    first.detail
                )
            });
        } else if !checks.iter().any(|c| c.check == "agent-ping") {
            failure = Some("the guest reported no agent-ping result".into());
        }
    }
    let qemu_err = qemu_said(
        &fs::read_to_string(dir.path().join("qemu.stderr")).unwrap_or_default(),
        std::process::id(),
    );
    if let Some(f) = &mut failure
        && !qemu_err.is_empty()
    {
        f.push_str(&format!("\n  QEMU said: {qemu_err}"));
    }
    let Scratch {
        dir, accel, lock, ..
    } = scratch;
    let kept = if opts.keep {
        Some(dir.keep())
    } else {
        // Removed while still locked: no other boot takes it for a killed one's.
        drop(dir);
        None
    };
    drop(lock);
    Ok(TestReport {
        disk: target.disk.clone(),
        version: expected,
        accel,
        passed: failure.is_none(),
        checks,
        seconds,
        agent_answered_seconds,
        ssh_host_key,
        failure,
        console_tail,
        kept,
    })
}

/// The checks of the boot after a rollback from `to`: `rollback-boot` (the version
/// `from`, when known, and not `to`; not on trial; its agent answering), then each of
/// its own checks that failed.
/// Whether the agent that answered (its `agent-version` check) is the build's `want`:
/// an image that booted another version's root passes nothing.
fn version_matches(want: &str, agent_version: &Check) -> Check {
    Check {
        check: "version-matches-build".into(),
        ok: agent_version.ok && agent_version.detail == want,
        detail: format!("agent reports {}, build is {want}", agent_version.detail),
        ms: 0,
    }
}

fn rollback_checks(back: &Run, from: Option<&str>, to: &str) -> Vec<Check> {
    let detail = |name: &str| {
        back.checks
            .iter()
            .find(|c| c.check == name)
            .map(|c| c.detail.as_str())
    };
    let entry = detail("boot-entry").unwrap_or("no boot entry reported");
    let version = detail("agent-version").unwrap_or("no agent version reported");
    let failed: Vec<Check> = back
        .checks
        .iter()
        .filter(|c| !c.ok)
        .map(|c| Check {
            check: format!("after-rollback:{}", c.check),
            ..c.clone()
        })
        .collect();
    let healthy = back.outcome.is_ok()
        && failed.is_empty()
        && back.checks.iter().any(|c| c.check == "agent-ping" && c.ok);
    let ok = healthy
        && !entry.contains("(counted")
        && version != to
        && from.is_none_or(|v| v == version);
    let mut checks = vec![Check {
        check: "rollback-boot".into(),
        ok,
        detail: match &back.outcome {
            Err(e) => format!("the boot after the rollback failed: {e}"),
            Ok(()) => format!(
                "the boot after the rollback started {entry}; agent {version} (expected {})",
                from.unwrap_or("the version before")
            ),
        },
        ms: (back.seconds * 1000.0) as u128,
    }];
    checks.extend(failed);
    checks
}

/// How a boot that ran out of time fails.
const TIMED_OUT: &str = "timed out after";

fn timed_out(failure: &str) -> bool {
    failure.starts_with(TIMED_OUT)
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
                "{TIMED_OUT} {}s waiting for the guest's self-test (the boot hung or the agent never answered)",
                timeout.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// How `image boot` runs a VM.
pub(crate) struct BootOptions {
    pub(crate) memory_mib: u32,
    pub(crate) cpus: u32,
    pub(crate) disk_bus: vm::DiskBus,
    /// Forward this host port to the guest's SSH port, with instance metadata handing
    /// in `ssh_key` as an EC2 key pair's key.
    pub(crate) ssh_port: Option<u16>,
    /// The public key to hand in (its file and its line), read by [`ssh_public_key`]
    /// before anything starts; None: only the spec's keys and passwords work.
    pub(crate) ssh_key: Option<(PathBuf, String)>,
    /// Log this user in on the console; None for a login prompt.
    pub(crate) autologin: Option<String>,
}

/// An interactive boot: the serial console on this terminal (Ctrl-A X quits).
pub(crate) fn boot(target: &Target, opts: &BootOptions) -> Result<()> {
    let scratch = Scratch::prepare(target, "devos-boot-", false, 0)?;
    eprintln!(
        "booting {} under {} ({}); quit with Ctrl-A X",
        target.disk.display(),
        scratch.accel.accel.describe(),
        scratch.accel.reason
    );
    let default_user = target
        .manifest
        .as_ref()
        .and_then(|m| m.users.first().cloned());
    let standin = match opts.ssh_port {
        Some(port) => {
            let key = opts.ssh_key.clone();
            let user = default_user.as_deref().unwrap_or("USER");
            match &key {
                Some((path, _)) => eprintln!(
                    "ssh: ssh -p {port} {user}@127.0.0.1 (the key of {} is handed in as the EC2 key pair's)",
                    path.display()
                ),
                None => eprintln!(
                    "ssh: ssh -p {port} {user}@127.0.0.1 (no ~/.ssh/id_*.pub to hand in: only the spec's keys and passwords work; pass --ssh-key FILE.pub)"
                ),
            }
            Some(ec2::StandIn::start(key.map(|(_, k)| k), Some(port))?)
        }
        None => None,
    };
    let network = standin.as_ref().map(ec2::StandIn::qemu_args).transpose()?;
    if let Some(user) = &opts.autologin {
        eprintln!("console: {user} is logged in (a login prompt: --no-autologin)");
    }
    let mut scratch = scratch;
    loop {
        let mut vm = scratch.vm(opts.memory_mib, opts.cpus, opts.disk_bus, None, None);
        vm.network = network.as_deref();
        if let Some(user) = &opts.autologin {
            vm.credentials.push(format!(
                "{}={user}",
                crate::image::access::AUTOLOGIN_CREDENTIAL
            ));
        }
        let (status, kvm_failed) = run_interactive(&mut vm.command(&scratch.fw))?;
        match kvm_failed {
            // KVM that passes the probe can still fail once the guest runs (seen:
            // "KVM internal error"): boot again under TCG, as `image test` does.
            Some(error) if scratch.accel.accel == vm::Accel::Kvm => {
                eprintln!("KVM failed ({error}); booting again under TCG");
                scratch.fall_back_to_tcg(target, &error)?;
            }
            _ if !status.success() => bail!("QEMU exited with {status}"),
            _ => return Ok(()),
        }
    }
}

/// Run QEMU with the console on this terminal, its stderr passed through and watched:
/// when it says KVM failed, QEMU is stopped (SIGTERM, so it gives the terminal back).
/// The exit status, and the KVM failure if there was one.
fn run_interactive(
    cmd: &mut std::process::Command,
) -> Result<(std::process::ExitStatus, Option<String>)> {
    use std::io::{BufRead as _, Write as _};
    let mut child = crate::support::cmd::spawn(cmd.stderr(Stdio::piped()), true)?;
    let stderr = child.stderr.take().context("QEMU has no stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    let watcher = std::thread::spawn(move || {
        // Read to the end: a full pipe would block QEMU before it sees the signal.
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = writeln!(std::io::stderr(), "{line}");
            if let Some(error) = kvm_failure(&line) {
                let _ = tx.send(error);
            }
        }
    });
    let mut kvm_failed = None;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        // Signalled only while QEMU is known not to be reaped, so the pid is its.
        if kvm_failed.is_none()
            && let Ok(error) = rx.try_recv()
        {
            sigterm(&child);
            kvm_failed = Some(error);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = watcher.join();
    Ok((status, kvm_failed.or_else(|| rx.try_recv().ok())))
}

/// The public key to hand in: the file given, else the invoking user's first
/// `~/.ssh/id_{ed25519,ecdsa,rsa}.pub` (under sudo, the user who ran sudo).
/// The public key `image boot --ssh-port` hands in: `given` (--ssh-key), else the
/// invoking user's first `~/.ssh/id_*.pub`. Checked before anything is started.
pub(crate) fn ssh_public_key(given: Option<&Path>) -> Result<Option<(PathBuf, String)>> {
    let read = |path: &Path| -> Result<(PathBuf, String)> {
        let text = fs::read_to_string(path).map_err(|e| {
            anyhow::anyhow!(
                "cannot read the SSH public key {} (--ssh-key): {e}\n  hint: pass an existing `.pub` file, e.g. --ssh-key ~/.ssh/id_ed25519.pub, or leave --ssh-key out to use yours",
                path.display()
            )
        })?;
        let key = text.lines().next().unwrap_or("").trim().to_owned();
        if !crate::model::spec::is_ssh_key(&key) {
            bail!(
                "{} is not an OpenSSH public key\n  hint: pass the `.pub` file, e.g. --ssh-key ~/.ssh/id_ed25519.pub",
                path.display()
            );
        }
        Ok((path.to_path_buf(), key))
    };
    if let Some(path) = given {
        return read(path).map(Some);
    }
    let Some(home) = crate::support::paths::invoking_home() else {
        return Ok(None);
    };
    ["id_ed25519.pub", "id_ecdsa.pub", "id_rsa.pub"]
        .iter()
        .map(|name| home.join(".ssh").join(name))
        .find(|p| p.is_file())
        .map(|p| read(&p))
        .transpose()
}

/// What QEMU wrote on stderr, less its word on being stopped by this process
/// (`terminating on signal 15 from pid PID`): that is the test ending it, not a cause.
fn qemu_said(stderr: &str, this: u32) -> String {
    let ours = format!("terminating on signal 15 from pid {this}");
    stderr
        .lines()
        .filter(|l| {
            !l.split_once(&ours)
                .is_some_and(|(_, rest)| rest.is_empty() || rest.starts_with(' '))
        })
        .collect::<Vec<_>>()
        .join("\n")
        .trim()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_being_stopped_by_the_test_is_not_what_qemu_said() {
        let err = "qemu-system-x86_64: warning: host doesn't support requested feature\n\
                   qemu-system-x86_64: terminating on signal 15 from pid 4242 (devos-build)\n";
        assert_eq!(
            qemu_said(err, 4242),
            "qemu-system-x86_64: warning: host doesn't support requested feature"
        );
        // Stopped by someone else: that is said.
        let other = "qemu-system-x86_64: terminating on signal 15 from pid 42421 (kill)";
        assert_eq!(qemu_said(other, 4242), other);
        assert_eq!(
            qemu_said("qemu: terminating on signal 15 from pid 4242\n", 4242),
            ""
        );
    }

    /// The version check passes only when the agent answered with the build's version.
    #[test]
    fn the_version_check_fails_on_another_version_or_no_answer() {
        let answer = |detail: &str, ok: bool| Check {
            check: "agent-version".into(),
            ok,
            detail: detail.into(),
            ms: 1,
        };
        assert!(version_matches("1.0.0+a", &answer("1.0.0+a", true)).ok);
        let other = version_matches("1.0.0+a", &answer("1.0.0+b", true));
        assert!(!other.ok);
        assert_eq!(other.detail, "agent reports 1.0.0+b, build is 1.0.0+a");
        assert!(!version_matches("1.0.0+a", &answer("1.0.0+a", false)).ok);
    }

    fn run(
        outcome: Result<(), &str>,
        stopped_by_itself: bool,
        checks: &[(&str, bool, &str)],
    ) -> Run {
        Run {
            outcome: outcome.map_err(str::to_owned),
            kvm_failed: None,
            seconds: 0.0,
            agent_answered_seconds: None,
            ssh: None,
            checks: checks
                .iter()
                .map(|&(check, ok, detail)| Check {
                    check: check.into(),
                    ok,
                    detail: detail.into(),
                    ms: 0,
                })
                .collect(),
            stopped_by_itself,
            silent: false,
        }
    }

    #[test]
    fn only_a_kernel_fault_or_a_silent_hang_under_tcg_is_booted_again() {
        let oops = run(
            Err(
                "kernel panic: [   22.6] Kernel panic - not syncing: Fatal exception in interrupt\n  QEMU said: terminating",
            ),
            true,
            &[],
        );
        let crash = tcg_fault(true, &oops).unwrap();
        assert!(crash.ends_with("Fatal exception in interrupt)"), "{crash}");
        // Not under KVM.
        assert!(tcg_fault(false, &oops).is_none());
        // Panics the kernel chose: a second boot would only repeat them.
        for chosen in [
            "kernel panic: [ 3.1] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)",
            "kernel panic: [ 9.2] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100",
            "kernel panic: [ 30.1] Kernel panic - not syncing: sysrq triggered crash",
            "the root filesystem failed dm-verity verification: ... Fatal exception",
        ] {
            assert!(
                tcg_fault(true, &run(Err(chosen), true, &[])).is_none(),
                "{chosen}"
            );
        }
        assert!(tcg_fault(true, &run(Ok(()), true, &[])).is_none());
        // Out of time with nothing from the guest: where it was is kept.
        let hung = Run {
            silent: true,
            ..run(
                Err(
                    "timed out after 150s waiting for the guest's self-test (the boot hung or the agent never answered)\n  the guest when the test gave up: CPU 0 in the kernel (0xffffffff81c8a1ce), running",
                ),
                false,
                &[],
            )
        };
        let fault = tcg_fault(true, &hung).unwrap();
        assert!(
            fault.starts_with("showed nothing under TCG after the firmware started the boot loader (timed out after 150s")
                && fault.ends_with("; the guest when the test gave up: CPU 0 in the kernel (0xffffffff81c8a1ce), running)"),
            "{fault}"
        );
        assert!(tcg_fault(false, &hung).is_none());
        // Out of time once the system printed something, or its self-test ran: far
        // enough for its own faults to show.
        let printed = run(
            Err("timed out after 150s waiting for the guest's self-test"),
            false,
            &[],
        );
        assert!(tcg_fault(true, &printed).is_none());
        let slow = Run {
            silent: true,
            ..run(
                Err("timed out after 150s waiting for the guest's self-test"),
                false,
                &[("agent-ping", false, "no answer")],
            )
        };
        assert!(tcg_fault(true, &slow).is_none());
    }

    #[test]
    fn a_try_failed_when_a_counted_boot_was_not_blessed_or_the_guest_went_down_unreported() {
        let on_trial = (
            "boot-entry",
            true,
            "d_0.2.2+3.efi (counted: a version on trial)",
        );
        // The new version came up and was blessed; the fall-back boot is not counted.
        assert_eq!(
            failed_try(&run(Ok(()), true, &[on_trial, ("boot-blessed", true, "")])),
            None
        );
        assert_eq!(
            failed_try(&run(Ok(()), true, &[("boot-entry", true, "d_0.2.1.efi")])),
            None
        );
        // A counted boot whose agent failed: named, with the first failed check.
        let failed = failed_try(&run(
            Err("the VM stopped (exit status: 0) before the self-test reported"),
            true,
            &[on_trial, ("agent-ping", false, "no answer")],
        ))
        .unwrap();
        assert!(failed.starts_with("d_0.2.2+3.efi"), "{failed}");
        assert!(failed.contains("agent-ping: no answer"), "{failed}");
        // No report at all (a panic, then a reboot) is a failed try too.
        let silent = failed_try(&run(Err("kernel panic"), true, &[])).unwrap();
        assert!(
            silent.contains("no boot entry reported — kernel panic"),
            "{silent}"
        );
        // A hang the host stopped is not a try the machine would take again by itself.
        assert_eq!(failed_try(&run(Err("timed out"), false, &[])), None);
    }

    #[test]
    fn panic_reboots_are_read_from_the_command_line() {
        assert_eq!(panic_seconds("root=x ro panic=10 quiet"), Some(10));
        assert_eq!(panic_seconds("panic=10 panic=0"), None);
        assert_eq!(panic_seconds("panic=0 panic=-1"), Some(0));
        assert_eq!(panic_seconds("root=x oops=panic"), None);
        assert_eq!(panic_seconds("panic=soon"), None);
    }

    #[test]
    fn the_boot_after_a_rollback_must_be_the_old_version_uncounted_and_healthy() {
        let healthy = |entry: &'static str, version: &'static str| {
            run(
                Ok(()),
                false,
                &[
                    ("boot-entry", true, entry),
                    ("agent-ping", true, "pong"),
                    ("agent-version", true, version),
                ],
            )
        };
        let verdict = |back: &Run| {
            let checks = rollback_checks(back, Some("0.2.0+a"), "0.2.1+b");
            assert_eq!(checks[0].check, "rollback-boot");
            (checks[0].ok, checks[0].detail.clone(), checks.len())
        };
        let (ok, detail, n) = verdict(&healthy("d_0.2.0_a.efi", "0.2.0+a"));
        assert!(ok && n == 1, "{detail}");
        assert!(
            detail.contains("started d_0.2.0_a.efi; agent 0.2.0+a"),
            "{detail}"
        );
        // Still the new version, or the old one on trial: not a rollback.
        assert!(!verdict(&healthy("d_0.2.1_b.efi", "0.2.1+b")).0);
        assert!(
            !verdict(&healthy(
                "d_0.2.0_a+3.efi (counted: a version on trial)",
                "0.2.0+a"
            ))
            .0
        );
        // A failed check of that boot fails it, and is reported under its own name.
        let mut sick = healthy("d_0.2.0_a.efi", "0.2.0+a");
        sick.checks.push(Check {
            check: "var-writable".into(),
            ok: false,
            detail: "read-only".into(),
            ms: 0,
        });
        let checks = rollback_checks(&sick, Some("0.2.0+a"), "0.2.1+b");
        assert!(!checks[0].ok);
        assert_eq!(checks[1].check, "after-rollback:var-writable");
        // The old version unknown (a bare disk): anything but the new one.
        let new_again = healthy("d_0.2.1_b.efi", "0.2.1+b");
        assert!(!rollback_checks(&new_again, None, "0.2.1+b")[0].ok);
        assert!(rollback_checks(&healthy("d_0.2.0_a.efi", "0.2.0+a"), None, "0.2.1+b")[0].ok);
        // A boot that never reported.
        let (ok, detail, _) = verdict(&run(Err("timed out"), false, &[]));
        assert!(!ok && detail.contains("failed: timed out"), "{detail}");
    }
}
