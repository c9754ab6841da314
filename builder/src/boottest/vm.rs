//! QEMU for boot tests and local boots: firmware lookup, a fast probe that tells a
//! working KVM from a broken one, and the command line for a UEFI VM.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::Target;
use crate::support::cmd::{self, which};
use crate::support::{remove, workdir};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// The accelerator in words, for people.
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Accel::Kvm => "KVM",
            Accel::Tcg => "TCG (software emulation)",
        }
    }

    /// The name QEMU's `-accel` takes, as the registry records it.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Which accelerator a run uses, and why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AccelChoice {
    pub accel: Accel,
    pub reason: String,
}

/// How long the KVM probe may take before KVM counts as broken. A working KVM
/// finishes the probe in well under a second; a broken one here sometimes limps
/// through it in ~4 s (and then fails on the real machine type, which the boot test
/// also catches and retries under TCG).
const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Use KVM only if it actually runs a guest. `DEVOS_ACCEL=kvm|tcg` overrides.
pub fn choose_accel(work: &Path) -> AccelChoice {
    match std::env::var("DEVOS_ACCEL").as_deref() {
        Ok("tcg") => {
            return AccelChoice {
                accel: Accel::Tcg,
                reason: "DEVOS_ACCEL=tcg".into(),
            };
        }
        Ok("kvm") => {
            return AccelChoice {
                accel: Accel::Kvm,
                reason: "DEVOS_ACCEL=kvm".into(),
            };
        }
        Ok(other) if !other.is_empty() => {
            tracing::warn!(
                "DEVOS_ACCEL={other} is neither `kvm` nor `tcg`: ignored, KVM is probed"
            );
        }
        _ => {}
    }
    if let Err(e) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return AccelChoice {
            accel: Accel::Tcg,
            reason: format!("/dev/kvm is not usable ({e})"),
        };
    }
    match probe_kvm(work) {
        Ok(took) => AccelChoice {
            accel: Accel::Kvm,
            reason: format!("KVM probe passed in {} ms", took.as_millis()),
        },
        Err(why) => AccelChoice {
            accel: Accel::Tcg,
            reason: format!("KVM is broken: {why}"),
        },
    }
}

/// A boot sector that writes 0x10 to the isa-debug-exit port: QEMU exits with status
/// (0x10 << 1) | 1 = 33 as soon as the guest's first instructions have run.
fn probe_sector() -> Vec<u8> {
    let code = [
        0xB0, 0x10, // mov al, 0x10
        0xE6, 0xF4, // out 0xf4, al
        0xF4, // hlt
        0xEB, 0xFD, // jmp back to hlt
    ];
    let mut sector = vec![0u8; 512];
    sector[..code.len()].copy_from_slice(&code);
    sector[510] = 0x55;
    sector[511] = 0xAA;
    sector
}

/// Run a one-instruction guest under KVM: how long it took, or why it failed. Cheap
/// (at most [`KVM_PROBE_TIMEOUT`]); `devos-build doctor` runs it too.
pub(crate) fn probe_kvm(work: &Path) -> Result<Duration, String> {
    let img = work.join("kvm-probe.img");
    fs::write(&img, probe_sector()).map_err(|e| e.to_string())?;
    let log = work.join("kvm-probe.log");
    let stderr = fs::File::create(&log).map_err(|e| e.to_string())?;
    let start = Instant::now();
    let mut child = cmd::spawn(
        Command::new("qemu-system-x86_64")
            .args([
                "-machine",
                "pc,accel=kvm",
                "-cpu",
                "host",
                "-m",
                "16",
                "-nodefaults",
                "-no-user-config",
            ])
            .args([
                "-display",
                "none",
                "-device",
                "isa-debug-exit,iobase=0xf4,iosize=0x04",
            ])
            .arg("-drive")
            .arg(format!("file={},format=raw,if=ide", img.display()))
            .stdout(Stdio::null())
            .stderr(stderr),
        false,
    )
    .map_err(|e| e.to_string())?;
    let outcome = loop {
        match child.try_wait() {
            Ok(Some(status)) if status.code() == Some(33) => break Ok(start.elapsed()),
            Ok(Some(status)) => break Err(format!("probe VM exited with {status}")),
            Ok(None) if start.elapsed() > KVM_PROBE_TIMEOUT => {
                // It may exit just now (the kill then fails); waiting only reaps it.
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!(
                    "probe VM did not finish within {}s",
                    KVM_PROBE_TIMEOUT.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => break Err(e.to_string()),
        }
    };
    let said = fs::read_to_string(&log).unwrap_or_default();
    outcome.map_err(|why| match said.lines().find(|l| !l.trim().is_empty()) {
        Some(first) => format!("{why}; QEMU said: {}", first.trim()),
        None => why,
    })
}

/// UEFI firmware: the read-only code and a template for the per-VM variable store.
pub(crate) struct Firmware {
    pub(crate) code: PathBuf,
    pub(crate) vars: PathBuf,
    /// Secure Boot: OVMF built with it (it needs SMM, and only SMM may write its
    /// variables), the variable store empty (setup mode), so that the image's
    /// systemd-boot enrolls the image's own keys on the first boot.
    pub(crate) secure_boot: bool,
}

/// The firmware for an image; with Secure Boot, OVMF's Secure Boot build.
fn firmware(secure_boot: bool) -> Result<Firmware> {
    let candidates: &[(&str, &str)] = if secure_boot {
        &[
            (
                "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd",
                "/usr/share/OVMF/OVMF_VARS_4M.fd",
            ),
            (
                "/usr/share/OVMF/OVMF_CODE.secboot.fd",
                "/usr/share/OVMF/OVMF_VARS.fd",
            ),
        ]
    } else {
        &[
            (
                "/usr/share/OVMF/OVMF_CODE_4M.fd",
                "/usr/share/OVMF/OVMF_VARS_4M.fd",
            ),
            (
                "/usr/share/OVMF/OVMF_CODE.fd",
                "/usr/share/OVMF/OVMF_VARS.fd",
            ),
            (
                "/usr/share/edk2/ovmf/OVMF_CODE.fd",
                "/usr/share/edk2/ovmf/OVMF_VARS.fd",
            ),
        ]
    };
    candidates
        .iter()
        .map(|(c, v)| Firmware {
            code: c.into(),
            vars: v.into(),
            secure_boot,
        })
        .find(|f| f.code.is_file() && f.vars.is_file())
        .with_context(|| match secure_boot {
            true => "no UEFI firmware with Secure Boot (OVMF_CODE_4M.secboot.fd) found, and the image's boot chain is signed for it\n  hint: install it with `apt-get install ovmf`",
            false => "no UEFI firmware (OVMF) found\n  hint: install it with `apt-get install ovmf`",
        })
}

/// A VM to start. Its disk is always a qcow2 overlay (see [`overlay`]).
/// How the VM's disk is attached: the buses the image must boot from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum DiskBus {
    /// NVMe, as EC2's Nitro instances attach EBS volumes.
    #[default]
    Nvme,
    /// virtio-blk, the default disk of QEMU and libvirt.
    VirtioBlk,
    /// A SCSI disk on virtio-scsi (libvirt's `bus='scsi'`, many clouds).
    VirtioScsi,
}

impl DiskBus {
    /// The QEMU devices that attach drive `disk` on this bus.
    fn devices(self) -> &'static [&'static str] {
        match self {
            DiskBus::Nvme => &["-device", "nvme,drive=disk,serial=devos"],
            DiskBus::VirtioBlk => &["-device", "virtio-blk-pci,drive=disk"],
            DiskBus::VirtioScsi => &[
                "-device",
                "virtio-scsi-pci,id=scsi",
                "-device",
                "scsi-hd,drive=disk,bus=scsi.0",
            ],
        }
    }
}

pub(crate) struct Vm<'a> {
    pub(crate) disk: &'a Path,
    pub(crate) disk_bus: DiskBus,
    pub(crate) vars: &'a Path,
    pub(crate) accel: Accel,
    pub(crate) memory_mib: u32,
    pub(crate) cpus: u32,
    /// `None`: the serial console is the terminal (interactive boot).
    pub(crate) console_log: Option<&'a Path>,
    /// Switch the guest's self-test on and collect its report here.
    pub(crate) selftest_report: Option<&'a Path>,
    /// The spec's tests for the guest's runner, as JSON (passed as a credential).
    pub(crate) tests_json: Option<&'a str>,
    /// The network: none, or the QEMU arguments of an EC2 stand-in (see `ec2.rs`).
    pub(crate) network: Option<&'a [String]>,
    /// systemd credentials for the guest, `NAME=VALUE` (passed as SMBIOS type 11).
    pub(crate) credentials: Vec<String>,
}

impl Vm<'_> {
    /// The QEMU command that runs this VM on the firmware `fw`.
    pub(crate) fn command(&self, fw: &Firmware) -> Command {
        let mut c = Command::new("qemu-system-x86_64");
        self.machine_args(&mut c, fw);
        self.device_args(&mut c, fw);
        self.console_args(&mut c);
        if let Some(report) = self.selftest_report {
            self.selftest_args(&mut c, report);
        }
        for credential in &self.credentials {
            c.arg("-smbios")
                .arg(format!("type=11,value=io.systemd.credential:{credential}"));
        }
        match self.network {
            Some(args) => c.args(args),
            None => c.args(["-nic", "none"]),
        };
        c
    }

    /// The machine: q35, accelerator and CPU, memory, CPUs, no default devices or display.
    fn machine_args(&self, c: &mut Command, fw: &Firmware) {
        let (accel, cpu) = match self.accel {
            Accel::Kvm => ("kvm", "host"),
            // Under TCG a plain x86-64-v2 CPU with QEMU's AMD identity, not `max`: with
            // `max` the guest kernel turns on mitigations (page-table isolation among
            // them) and vector code paths that are slow to emulate; the same image
            // answers about 1.5 s sooner (docs/benchmarks.md). Without SVM, like EC2's
            // instances: the guest would load kvm and kvm_amd for a nested
            // virtualization TCG cannot give it.
            Accel::Tcg => (
                "tcg,thread=multi,tb-size=256",
                "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt,+cx16,-svm",
            ),
        };
        let machine = match fw.secure_boot {
            true => "q35,smm=on,vmport=off",
            false => "q35,smm=off,vmport=off",
        };
        c.args(["-machine", machine, "-accel", accel, "-cpu", cpu]);
        if fw.secure_boot {
            // The variable store writable from SMM only: the OS cannot enroll keys past
            // the firmware's checks.
            c.args(["-global", "driver=cfi.pflash01,property=secure,value=on"]);
        }
        c.arg("-m")
            .arg(self.memory_mib.to_string())
            .arg("-smp")
            .arg(self.cpus.to_string())
            .args(["-nodefaults", "-no-user-config", "-display", "none"]);
        // A test's boot ends when the guest reboots (the harness decides what comes
        // next, as the machine would); an interactive one reboots in place, on the same
        // disk, as a machine does (`devos update --reboot` included).
        if self.console_log.is_some() {
            c.arg("-no-reboot");
        }
    }

    /// The UEFI firmware (code read-only, this VM's variables), the disk, a random source.
    fn device_args(&self, c: &mut Command, fw: &Firmware) {
        c.arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={}",
                fw.code.display()
            ))
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=1,file={}",
                self.vars.display()
            ))
            .arg("-drive")
            .arg(format!(
                "file={},format=qcow2,if=none,id=disk,cache=unsafe,discard=unmap",
                self.disk.display()
            ))
            .args(self.disk_bus.devices())
            .args(["-device", "virtio-rng-pci"]);
    }

    /// The serial console: into the log, or on this terminal with the QEMU monitor.
    fn console_args(&self, c: &mut Command) {
        match self.console_log {
            Some(log) => {
                c.arg("-chardev")
                    .arg(format!("file,id=console,path={}", log.display()))
                    .args(["-serial", "chardev:console"]);
                // Asked where the guest was when a boot times out.
                if let Some(socket) = super::monitor::socket(log) {
                    c.arg("-monitor")
                        .arg(format!("unix:{},server=on,wait=off", socket.display()));
                }
            }
            None => {
                c.args(["-serial", "mon:stdio"]);
            }
        };
    }

    /// The guest's self-test switched on, with the spec's tests and a port for its report.
    fn selftest_args(&self, c: &mut Command, report: &Path) {
        c.args(["-device", "virtio-serial-pci"])
            .arg("-chardev")
            .arg(format!("file,id=selftest,path={}", report.display()))
            .args([
                "-device",
                "virtserialport,chardev=selftest,name=org.devos.selftest",
            ])
            .args([
                "-smbios",
                "type=11,value=io.systemd.credential:devos.selftest=1",
            ]);
        if let Some(json) = self.tests_json {
            use base64::Engine;
            let b64 = base64::engine::general_purpose::STANDARD.encode(json);
            c.arg("-smbios").arg(format!(
                "type=11,value=io.systemd.credential.binary:devos.tests={b64}"
            ));
        }
    }
}

/// A copy-on-write overlay over `base`, so the artifact's bytes never change, `grow`
/// bytes larger than it (a disk larger than the image, as EC2 launches volumes).
fn overlay(base: &Path, base_format: &str, overlay: &Path, grow: u64) -> Result<()> {
    let base = fs::canonicalize(base).with_context(|| format!("cannot open {}", base.display()))?;
    cmd::run(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", base_format, "-b"])
            .arg(&base)
            .arg(overlay),
    )?;
    if grow > 0 {
        cmd::run(
            Command::new("qemu-img")
                .args(["resize", "-q", "-f", "qcow2"])
                .arg(overlay)
                .arg(format!("+{grow}")),
        )?;
    }
    Ok(())
}

/// A private copy of the firmware variable store for one VM.
fn vars_copy(fw: &Firmware, dest: &Path) -> Result<()> {
    copy(&fw.vars, dest)
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    fs::copy(from, to)
        .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    Ok(())
}

/// The format of a disk image file, by extension (raw unless qcow2/vmdk/vhd).
pub(super) fn disk_format(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()) {
        Some("qcow2") => "qcow2",
        Some("vmdk") => "vmdk",
        Some("vhd") => "vpc",
        _ => "raw",
    }
}

fn require_qemu() -> Result<()> {
    if which("qemu-system-x86_64").is_none() {
        bail!(
            "qemu-system-x86_64 is not installed\n  hint: `apt-get install qemu-system-x86 ovmf`"
        );
    }
    Ok(())
}

/// What systemd-boot prints once it has enrolled the keys (before it resets).
const ENROLLED: &str = "Secure Boot keys successfully enrolled";

/// How long the enrolling boot may take (about 10 s under TCG).
const ENROLL_TIMEOUT: Duration = Duration::from_secs(180);

/// The prefixes of boots' scratch directories in the temporary directory: the ones
/// a boot may remove when a killed boot left them.
const SCRATCH_PREFIXES: &[&str] = &["devos-boot-", "devos-test-"];

/// What every VM run needs: firmware, the accelerator choice, and a scratch directory
/// with a copy-on-write overlay over the target and a private UEFI variable store.
pub(super) struct Scratch {
    pub(super) dir: tempfile::TempDir,
    pub(super) fw: Firmware,
    pub(super) accel: AccelChoice,
    pub(super) overlay: PathBuf,
    pub(super) vars: PathBuf,
    /// Bytes the VM's disk has beyond the image's.
    grow: u64,
    /// Boots of the overlay so far: after the first, the disk holds what they wrote.
    pub(super) boots: u32,
    /// Held (by this process and by QEMU) while the directory is in use: a later boot
    /// removes the directory once nothing holds it (see [`workdir`]). None for a
    /// directory that is to be kept (`--keep-vm`, never removed for the user), or where
    /// the file system takes no locks.
    pub(super) lock: Option<workdir::DirLock>,
}

impl Scratch {
    /// Go on under TCG from the disk and variables as they were before the boot KVM
    /// failed in (that run may have written to them).
    pub(super) fn fall_back_to_tcg(&mut self, target: &Target, kvm_error: &str) -> Result<()> {
        let reason = format!(
            "{}, but the VM then failed under KVM ({kvm_error}); fell back to TCG",
            self.accel.reason
        );
        tracing::info!("accelerator: {} ({reason})", Accel::Tcg.describe());
        self.accel = AccelChoice {
            accel: Accel::Tcg,
            reason,
        };
        self.rewind(target)
    }

    /// Keep the overlay and variable store as they are before the next boot, so that a
    /// boot the host's emulator spoiled can be run again from exactly where it started
    /// (what earlier boots wrote — an update, its tries — included). Before the first
    /// boot there is nothing to keep: the image is that state.
    pub(super) fn checkpoint(&self) -> Result<()> {
        if self.boots > 0 {
            copy(&self.overlay, &self.before(&self.overlay))?;
            copy(&self.vars, &self.before(&self.vars))?;
        }
        Ok(())
    }

    /// Back to the last checkpoint: the disk and variables as they were before the boot
    /// that is to be run again.
    pub(super) fn rewind(&mut self, target: &Target) -> Result<()> {
        if self.boots == 0 {
            return self.start_over(target);
        }
        copy(&self.before(&self.overlay), &self.overlay)?;
        copy(&self.before(&self.vars), &self.vars)
    }

    fn before(&self, file: &Path) -> PathBuf {
        let name = file.file_name().unwrap_or_default().to_string_lossy();
        self.dir.path().join(format!("before-boot.{name}"))
    }

    /// A fresh overlay and variable store: the disk as the image has it, never booted.
    pub(super) fn start_over(&mut self, target: &Target) -> Result<()> {
        remove::file_if_present(&self.overlay)?;
        overlay(
            &target.disk,
            disk_format(&target.disk),
            &self.overlay,
            self.grow,
        )?;
        vars_copy(&self.fw, &self.vars)?;
        self.boots = 0;
        self.enroll()
    }

    /// With Secure Boot, the first boot of a machine: the firmware is in setup mode,
    /// and the image's systemd-boot enrolls its keys from the ESP and resets (QEMU,
    /// run with -no-reboot, then exits). From then on the firmware starts only what
    /// the image's key signed. An image that does not enroll fails here, saying what
    /// its console said.
    fn enroll(&self) -> Result<()> {
        if !self.fw.secure_boot {
            return Ok(());
        }
        let console = self.dir.path().join("enroll.log");
        let vm = self.vm(1024, 2, DiskBus::Nvme, Some(&console), None);
        let mut child = cmd::spawn(
            vm.command(&self.fw)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
            false,
        )?;
        super::exits_within(&mut child, ENROLL_TIMEOUT);
        let exited = matches!(child.try_wait(), Ok(Some(_)));
        super::stop_qemu(&mut child);
        let said = String::from_utf8_lossy(&fs::read(&console).unwrap_or_default())
            .replace(|c: char| c.is_control() && c != '\n', "");
        if exited && said.contains(ENROLLED) {
            tracing::info!(
                "Secure Boot: the image's systemd-boot enrolled its keys in the VM's firmware"
            );
            return Ok(());
        }
        let last = super::diagnosis::tail_lines(&console, 8);
        bail!(
            "the image's Secure Boot keys were not enrolled on its first boot ({}); its console said:\n{}",
            if exited {
                "the VM stopped without enrolling them"
            } else {
                "no reset within 3 minutes"
            },
            last.join("\n")
        )
    }

    /// A scratch directory for a boot, its disk `grow` bytes larger than the image;
    /// `keep`: it stays after the run (no lock: never taken for what a killed boot left).
    pub(super) fn prepare(target: &Target, prefix: &str, keep: bool, grow: u64) -> Result<Self> {
        debug_assert!(SCRATCH_PREFIXES.contains(&prefix), "{prefix}");
        require_qemu()?;
        let fw = firmware(target.secure_boot())?;
        // What boots that were killed (no cleanup ran) left behind.
        for path in workdir::sweep(&std::env::temp_dir(), SCRATCH_PREFIXES) {
            tracing::info!("removed {}, left by a boot that was killed", path.display());
        }
        let dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
        let lock = match keep {
            true => None,
            false => workdir::DirLock::take_for_children(dir.path())
                .inspect_err(|e| {
                    tracing::warn!(
                        "{e:#}; {} stays behind if this boot is killed",
                        dir.path().display()
                    )
                })
                .ok(),
        };
        let accel = choose_accel(dir.path());
        tracing::info!("accelerator: {} ({})", accel.accel.describe(), accel.reason);
        let overlay = dir.path().join("overlay.qcow2");
        self::overlay(&target.disk, disk_format(&target.disk), &overlay, grow)?;
        let vars = dir.path().join("vars.fd");
        vars_copy(&fw, &vars)?;
        let scratch = Self {
            dir,
            fw,
            accel,
            overlay,
            vars,
            grow,
            boots: 0,
            lock,
        };
        scratch.enroll()?;
        Ok(scratch)
    }

    pub(super) fn vm<'a>(
        &'a self,
        memory_mib: u32,
        cpus: u32,
        disk_bus: DiskBus,
        console_log: Option<&'a Path>,
        selftest_report: Option<&'a Path>,
    ) -> Vm<'a> {
        Vm {
            disk: &self.overlay,
            disk_bus,
            vars: &self.vars,
            accel: self.accel.accel,
            memory_mib,
            cpus,
            console_log,
            selftest_report,
            tests_json: None,
            network: None,
            credentials: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_disk_bus_attaches_the_one_drive() {
        let fw = Firmware {
            code: "/code.fd".into(),
            vars: "/vars.fd".into(),
            secure_boot: false,
        };
        let args_of = |vm: &Vm| -> Vec<String> {
            vm.command(&fw)
                .get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect()
        };
        for (bus, device) in [
            (DiskBus::Nvme, "nvme,drive=disk,serial=devos"),
            (DiskBus::VirtioBlk, "virtio-blk-pci,drive=disk"),
            (DiskBus::VirtioScsi, "scsi-hd,drive=disk,bus=scsi.0"),
        ] {
            let vm = Vm {
                disk: Path::new("/overlay.qcow2"),
                disk_bus: bus,
                vars: Path::new("/vars"),
                accel: Accel::Tcg,
                memory_mib: 1024,
                cpus: 2,
                console_log: None,
                selftest_report: None,
                tests_json: None,
                network: None,
                credentials: Vec::new(),
            };
            let args = args_of(&vm);
            assert!(args.iter().any(|a| a == device), "{bus:?}: {args:?}");
            let drives = args.iter().filter(|a| a.contains("drive=disk")).count();
            assert_eq!(drives, 1, "{bus:?}: {args:?}");
            // An interactive boot (console on the terminal) reboots in place; a test's
            // boot, whose console goes to a log, ends when the guest reboots.
            assert!(!args.iter().any(|a| a == "-no-reboot"), "{args:?}");
            let log = Path::new("/console.log");
            let logged = Vm {
                console_log: Some(log),
                ..vm
            };
            let args = args_of(&logged);
            assert!(args.iter().any(|a| a == "-no-reboot"), "{args:?}");
        }
    }

    #[test]
    fn a_boot_run_again_starts_from_the_disk_as_it_was_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let (overlay, vars) = (dir.path().join("overlay.qcow2"), dir.path().join("vars.fd"));
        let mut scratch = Scratch {
            fw: Firmware {
                code: "/code.fd".into(),
                vars: "/vars.fd".into(),
                secure_boot: false,
            },
            accel: AccelChoice {
                accel: Accel::Tcg,
                reason: "test".into(),
            },
            overlay: overlay.clone(),
            vars: vars.clone(),
            grow: 0,
            boots: 1,
            lock: Some(workdir::DirLock::take_for_children(dir.path()).unwrap()),
            dir,
        };
        let target = Target {
            disk: "/image.raw".into(),
            manifest: None,
            tests: Vec::new(),
        };
        // What an earlier boot wrote (an update) is kept; what the spoiled boot wrote
        // (a used try, a changed boot variable) is not.
        fs::write(&overlay, "updated").unwrap();
        fs::write(&vars, "entry v2").unwrap();
        scratch.checkpoint().unwrap();
        fs::write(&overlay, "updated, one try used").unwrap();
        fs::write(&vars, "entry v2, booting").unwrap();
        scratch.rewind(&target).unwrap();
        assert_eq!(fs::read_to_string(&overlay).unwrap(), "updated");
        assert_eq!(fs::read_to_string(&vars).unwrap(), "entry v2");
        // A second spoiled boot of the same state goes back to the same place.
        fs::write(&overlay, "spoiled again").unwrap();
        scratch.rewind(&target).unwrap();
        assert_eq!(fs::read_to_string(&overlay).unwrap(), "updated");
    }

    #[test]
    fn probe_sector_is_bootable() {
        let s = probe_sector();
        assert_eq!(s.len(), 512);
        assert_eq!(&s[510..], &[0x55, 0xAA]);
    }
}
