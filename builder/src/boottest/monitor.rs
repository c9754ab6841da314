//! Where a hung guest was: when a boot times out, QEMU's monitor is asked for every
//! CPU's registers, and the failure says whether the guest was still in the firmware
//! or boot loader, in the kernel or in user space, and whether it was waiting.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The longest path a Unix socket may have (`sun_path`, with its terminating NUL).
const SOCKET_PATH_MAX: usize = 107;

/// The monitor's socket for a run whose console goes to `console_log`: beside it, or
/// none where that path is too long for a socket (QEMU would refuse to start).
pub(super) fn socket(console_log: &Path) -> Option<PathBuf> {
    let socket = console_log.with_file_name("monitor.sock");
    (socket.as_os_str().len() <= SOCKET_PATH_MAX).then_some(socket)
}

/// Where the running VM's CPUs are, asked through its monitor at `socket`; None when
/// the monitor does not answer within a few seconds. (The monitor can do anything QEMU
/// can, on the host too: its socket lives only in the VM's private scratch directory.)
pub(super) fn where_cpus(socket: &Path) -> Option<String> {
    let mut stream = UnixStream::connect(socket).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream.write_all(b"info registers -a\n").ok()?;
    let until = Instant::now() + Duration::from_secs(10);
    let mut said = Vec::new();
    let mut buf = [0u8; 8192];
    // The monitor greets with a prompt, echoes the command, prints the registers and
    // prompts again.
    while Instant::now() < until && count(&said, b"(qemu)") < 2 {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => said.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    describe(&String::from_utf8_lossy(&said))
}

fn count(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| w == &needle)
        .count()
}

/// "CPU 0 in the kernel (0xffffffff81c8a1ce), halted; ..." from `info registers -a`
/// (each CPU's registers follow a `CPU#N` line).
pub(super) fn describe(registers: &str) -> Option<String> {
    let mut cpu = None;
    let mut cpus = Vec::new();
    for line in registers.lines() {
        if let Some(n) = line.trim().strip_prefix("CPU#") {
            cpu = Some(n.trim().to_owned());
        } else if let (Some(n), Some(place)) = (&cpu, place(line)) {
            cpus.push(format!("CPU {n} {place}"));
            cpu = None;
        }
    }
    (!cpus.is_empty()).then(|| cpus.join("; "))
}

/// Where one CPU was, from its `RIP=... RFL=... CPL=0 II=0 A20=1 SMM=0 HLT=1` line.
fn place(line: &str) -> Option<String> {
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|word| word.strip_prefix(name))
    };
    // EIP in 32-bit and 16-bit modes (a firmware's or the kernel's first steps).
    let rip = u64::from_str_radix(field("RIP=").or_else(|| field("EIP="))?, 16).ok()?;
    let place = if field("SMM=") == Some("1") {
        "in the firmware (system management mode)"
    } else if field("CPL=") == Some("3") {
        "in user space"
    } else if rip >= 0xffff_8000_0000_0000 {
        "in the kernel"
    } else {
        "in the firmware, the boot loader or the kernel's first steps"
    };
    let state = match field("HLT=") {
        Some("1") => "halted, waiting for an interrupt",
        _ => "running",
    };
    Some(format!("{place} ({rip:#x}), {state}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cpu_is_placed_from_its_registers() {
        // QEMU 7.2's `info registers -a`, shortened.
        let said = "QEMU 7.2.15 monitor - type 'help' for more information\n\
            (qemu) info registers -a\n\
            \n\
            CPU#0\n\
            RAX=0000000000000000 RBX=ffffffff82a0c940 RCX=0000000000000000\n\
            RIP=ffffffff81c8a1ce RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1\n\
            ES =0000 0000000000000000 ffffffff 00c00000\n\
            \n\
            CPU#1\n\
            RIP=00007f3c2a1b4e10 RFL=00000202 [-------] CPL=3 II=0 A20=1 SMM=0 HLT=0\n\
            CPU#2\n\
            RIP=000000007fe3a2b1 RFL=00000002 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=0\n\
            CPU#3\n\
            RIP=000000000000a1b2 RFL=00000002 [-------] CPL=0 II=0 A20=1 SMM=1 HLT=0\n\
            CPU#4\n\
            EIP=000fd09a EFL=00000002 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=1\n\
            (qemu) ";
        let described = describe(said).unwrap();
        assert_eq!(
            described,
            "CPU 0 in the kernel (0xffffffff81c8a1ce), halted, waiting for an interrupt; \
             CPU 1 in user space (0x7f3c2a1b4e10), running; \
             CPU 2 in the firmware, the boot loader or the kernel's first steps (0x7fe3a2b1), running; \
             CPU 3 in the firmware (system management mode) (0xa1b2), running; \
             CPU 4 in the firmware, the boot loader or the kernel's first steps (0xfd09a), halted, waiting for an interrupt"
        );
        assert_eq!(describe("(qemu) info registers -a\n(qemu) "), None);
    }

    #[test]
    fn a_running_qemu_says_where_its_cpus_are() {
        // A machine with no disk: its firmware looks for something to boot and stays.
        let dir = tempfile::tempdir().unwrap();
        let socket = socket(&dir.path().join("console.log")).unwrap();
        let mut qemu = std::process::Command::new("qemu-system-x86_64")
            .args(["-machine", "pc", "-accel", "tcg", "-smp", "2", "-m", "64"])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .arg("-monitor")
            .arg(format!("unix:{},server=on,wait=off", socket.display()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64 (tests/setup-host installs it)");
        let until = Instant::now() + Duration::from_secs(20);
        let mut cpus = None;
        while cpus.is_none() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(200));
            cpus = where_cpus(&socket);
        }
        let _ = qemu.kill();
        let _ = qemu.wait();
        let cpus = cpus.expect("an answer from QEMU's monitor");
        assert!(
            cpus.starts_with("CPU 0 in the firmware") && cpus.contains("; CPU 1 "),
            "{cpus}"
        );
    }

    #[test]
    fn no_socket_where_its_path_would_be_too_long() {
        let short = socket(Path::new("/tmp/devos-test-abc/console.log")).unwrap();
        assert_eq!(short, Path::new("/tmp/devos-test-abc/monitor.sock"));
        let long = format!("/{}/console.log", "d".repeat(100));
        assert_eq!(socket(Path::new(&long)), None);
    }
}
