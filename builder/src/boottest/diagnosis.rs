//! Reading what a run said: KVM failures in QEMU's stderr, fatal lines on the
//! console, the guest's report, the console's last lines.

use std::fs;
use std::path::Path;

use super::Check;

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
pub(super) fn kvm_failure(said: &str) -> Option<String> {
    said.lines()
        .find(|l| KVM_FAILURES.iter().any(|k| l.contains(k)))
        .map(|l| l.trim().to_owned())
}

/// Console lines that mean the boot cannot succeed (a line holding every needle), and
/// what they mean. Seen, the test fails at once instead of waiting for its timeout.
/// The first match in the console wins, so a cause is named before its consequences
/// (a corrupt block before the emergency mode it leads to).
const FATAL_CONSOLE: &[(&[&str], &str)] = &[
    // systemd-boot, then the firmware itself, under Secure Boot.
    (
        &["Error loading", "Access denied"],
        "Secure Boot refused the unified kernel image: its signature does not verify with the key the machine enrolled (it was changed after it was signed, or signed with another key)",
    ),
    (
        &["BdsDxe: failed to load", "Access Denied"],
        "Secure Boot refused the boot loader: its signature does not verify with the key the machine enrolled",
    ),
    (
        &["verity", "is corrupted"],
        "the root filesystem failed dm-verity verification: a block of it is not the one that was built (the disk was modified or damaged)",
    ),
    (
        &["Timed out waiting for device"],
        "the initrd could not find the root filesystem's device (check root= and roothash= on the kernel command line)",
    ),
    (
        &["VFS: Unable to mount root fs"],
        "the kernel could not find the root filesystem (check root= on the kernel command line)",
    ),
    (&["Kernel panic"], "kernel panic"),
    (
        &["Gave up waiting for root"],
        "the initramfs could not find the root filesystem (check root= on the kernel command line)",
    ),
    (
        &["does not exist.  Dropping to a shell"],
        "the initramfs could not find the root filesystem (check root= on the kernel command line)",
    ),
    (
        &["You are in emergency mode"],
        "systemd entered emergency mode",
    ),
    (
        &["Failed to start Switch Root"],
        "switching to the root filesystem failed",
    ),
];

pub(super) fn diagnose_console(text: &str) -> Option<String> {
    for line in text.lines() {
        for (needles, meaning) in FATAL_CONSOLE {
            if needles.iter().all(|n| line.contains(n)) {
                let line = line.replace(|c: char| c.is_control() && c != '\t', "");
                return Some(format!("{meaning}: {}", line.trim()));
            }
        }
    }
    None
}

/// The guest's results so far, and whether its final line (`{"done": ...}`) arrived.
pub(super) fn read_report(report: &Path) -> (Vec<Check>, bool) {
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

pub(super) fn tail_lines(path: &Path, n: usize) -> Vec<String> {
    let text = fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<String> = text
        .lines()
        .map(|l| l.replace(|c: char| c.is_control() && c != '\t', ""))
        .filter(|l| !l.trim().is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

/// Whether a console shows nothing of the system that was to boot: nothing but escape
/// sequences and blank lines after the firmware started the boot loader (`BdsDxe:
/// starting …`), or no such line at all. (An image booted `quiet` prints nothing until
/// its login prompt either; one that printed anything got further than this says.)
pub(super) fn silent_after_firmware(console: &str) -> bool {
    let after = match console.rsplit_once("BdsDxe: starting") {
        // (The rest of that line is the firmware's.)
        Some((_, rest)) => rest.split_once('\n').map_or("", |(_, next)| next),
        None => "",
    };
    let mut chars = after.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // A control sequence: ESC [ parameters, ended by a letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else if !c.is_whitespace() && !c.is_control() {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod kvm_tests {
    use super::{diagnose_console, kvm_failure, silent_after_firmware};

    #[test]
    fn a_console_is_silent_when_nothing_came_after_the_firmware() {
        // The project's CI run of 2026-12-06, as its console ended.
        let hung = "\u{1b}[2J\u{1b}[01;01H\u{1b}[=3h\u{1b}[2J\u{1b}[01;01HBdsDxe: loading Boot0001 \"UEFI QEMU NVMe Ctrl devos 1\" from PciRoot(0x0)/Pci(0x2,0x0)/NVMe(0x1,00-00-00-00-00-00-00-00)\r\nBdsDxe: starting Boot0001 \"UEFI QEMU NVMe Ctrl devos 1\" from PciRoot(0x0)/Pci(0x2,0x0)/NVMe(0x1,00-00-00-00-00-00-00-00)\r\n\u{1b}[2J\r\n";
        assert!(silent_after_firmware(hung));
        assert!(silent_after_firmware(""));
        assert!(silent_after_firmware("BdsDxe: loading Boot0001 \"x\"\r\n"));
        // Anything the booted system printed: it got further.
        for said in [
            "EFI stub: Loaded initrd from LINUX_EFI_INITRD_MEDIA_GUID device path\r\n",
            "[    2.1] systemd[1]: Starting Journal Service...\r\n",
            "\u{1b}[0;1;31mFAILED\u{1b}[0m to start devos-agent.service\r\n",
            "devos login: ",
        ] {
            assert!(!silent_after_firmware(&format!("{hung}{said}")), "{said}");
        }
    }

    #[test]
    fn a_root_that_cannot_be_found_is_named_with_or_without_an_initramfs() {
        let direct = "[    4.548902] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)\n";
        let initramfs = "Gave up waiting for root file system device.\nALERT!  PARTUUID=0000 does not exist.  Dropping to a shell!\n";
        let systemd = "[ TIME ] Timed out waiting for device dev-disk-by\\x2dpartuuid-0000.device - /dev/disk/by-partuuid/0000.\n";
        for console in [direct, initramfs, systemd] {
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
    fn a_corrupt_verified_root_is_named_before_the_emergency_mode_it_causes() {
        let console = "[    3.1] device-mapper: verity: 252:0: data block 0 is corrupted\n[FAILED] Failed to mount sysroot.mount - /sysroot.\nYou are in emergency mode.\n";
        let d = diagnose_console(console).unwrap();
        assert!(
            d.starts_with("the root filesystem failed dm-verity verification"),
            "{d}"
        );
        assert!(d.contains("data block 0 is corrupted"), "{d}");
        // Under Secure Boot: the kernel image refused by systemd-boot (named before the
        // firmware's own line about the boot loader giving up), the boot loader by the
        // firmware.
        let uki = "../src/boot/boot.c:2576@image_start: Error loading \\EFI\\Linux\\d_0.2.0_x.efi: Access denied\nBdsDxe: failed to start Boot0001 \"UEFI QEMU NVMe Ctrl\" from PciRoot(0x0): Access Denied\n";
        assert!(
            diagnose_console(uki)
                .unwrap()
                .starts_with("Secure Boot refused the unified kernel image"),
        );
        let loader = "BdsDxe: failed to load Boot0001 \"UEFI QEMU NVMe Ctrl\" from PciRoot(0x0): Access Denied\n";
        assert!(
            diagnose_console(loader)
                .unwrap()
                .starts_with("Secure Boot refused the boot loader"),
        );
        // Lines that merely mention verity are not failures.
        assert!(
            diagnose_console("device-mapper: verity: sha256 using shash \"sha256-ni\"\n").is_none()
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
