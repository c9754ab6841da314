//! The sandbox an approved action runs in. The daemon starts `devos-agent
//! sandbox-exec` (a fresh, single-threaded process) with a [`Spec`] on stdin; it drops
//! to the calling user, applies rlimits, Landlock and seccomp, and then executes the
//! program (argv only) or performs the file operation itself.
//!
//! Order matters: identity first (so Landlock and seccomp bind the user's process,
//! and `setuid` is not itself filtered), rlimits, `chdir` as the user (so a working
//! directory the user cannot enter fails here), Landlock (which sets no_new_privs),
//! then seccomp.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::action::Action;

/// Exit status of `sandbox-exec` when the sandbox could not be set up; the action
/// never started.
pub const EXIT_SANDBOX_FAILED: i32 = 125;
/// Exit status when the file operation itself failed.
pub const EXIT_ACTION_FAILED: i32 = 1;

/// Everything the helper needs, passed as JSON on stdin.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Spec {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub user: String,
    pub home: PathBuf,
    pub cwd: PathBuf,
    pub action: Action,
    /// Directories the action may write beneath (empty: it may write nothing).
    pub writable: Vec<PathBuf>,
    /// A private temporary directory (writable; `TMPDIR`).
    pub tmp: Option<PathBuf>,
    pub network: bool,
    /// Stay root (package installs approved by an administrator); the file system is
    /// then not confined by Landlock, seccomp and rlimits still apply.
    pub as_root: bool,
    /// Refuse to run when Landlock cannot be enforced.
    pub required: bool,
    pub cpu_secs: u64,
    pub max_file_mib: u64,
    pub max_open_files: u64,
}

/// System calls an action never needs: debugging other processes, io_uring (which
/// bypasses seccomp for its operations), kernel modules, mounts and namespaces of
/// mounts, kexec, BPF, keyrings, and userfaultfd.
const DENIED_SYSCALLS: &[i64] = &[
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_fsopen,
    libc::SYS_fsmount,
    libc::SYS_fsconfig,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_bpf,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_userfaultfd,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_reboot,
    libc::SYS_acct,
];

/// The helper's main: read the spec, confine ourselves, run the action. Returns only
/// on failure (with the exit code to use); a program run replaces this process.
pub fn exec_from_stdin() -> i32 {
    let mut input = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut input) {
        eprintln!("devos sandbox: cannot read the action: {e}");
        return EXIT_SANDBOX_FAILED;
    }
    let spec: Spec = match serde_json::from_str(&input) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("devos sandbox: invalid action spec: {e}");
            return EXIT_SANDBOX_FAILED;
        }
    };
    let applied = match confine(&spec) {
        Ok(applied) => applied,
        Err(e) => {
            eprintln!("devos sandbox: refused: {e}");
            return EXIT_SANDBOX_FAILED;
        }
    };
    // The daemon reads this first line to record what the sandbox applied.
    eprintln!("devos-sandbox: {applied}");
    run(&spec)
}

fn confine(spec: &Spec) -> Result<String, String> {
    use nix::unistd::{Gid, Uid, chdir, setgroups, setresgid, setresuid};
    if !spec.as_root {
        if spec.uid == 0 && spec.gid == 0 {
            // Root's own requests run as root, confined like anyone else's.
        }
        let groups: Vec<Gid> = spec.groups.iter().map(|g| Gid::from_raw(*g)).collect();
        setgroups(&groups).map_err(|e| format!("setgroups: {e}"))?;
        let gid = Gid::from_raw(spec.gid);
        setresgid(gid, gid, gid).map_err(|e| format!("setgid {}: {e}", spec.gid))?;
        let uid = Uid::from_raw(spec.uid);
        setresuid(uid, uid, uid).map_err(|e| format!("setuid {}: {e}", spec.uid))?;
    }
    rlimits(spec)?;
    chdir(&spec.cwd).map_err(|e| {
        format!(
            "cannot enter the working directory {} as {}: {e}",
            spec.cwd.display(),
            spec.user
        )
    })?;
    let landlock = if spec.as_root {
        "landlock not applied (privileged action as root)".to_owned()
    } else {
        landlock(spec)?
    };
    seccomp()?;
    Ok(format!(
        "{landlock}; seccomp denies {} syscalls; no_new_privs",
        DENIED_SYSCALLS.len()
    ))
}

fn rlimits(spec: &Spec) -> Result<(), String> {
    use nix::sys::resource::{Resource, setrlimit};
    let set = |r: Resource, v: u64, name: &str| {
        setrlimit(r, v, v).map_err(|e| format!("setrlimit {name}: {e}"))
    };
    set(Resource::RLIMIT_CORE, 0, "core")?;
    set(Resource::RLIMIT_CPU, spec.cpu_secs, "cpu")?;
    set(
        Resource::RLIMIT_FSIZE,
        spec.max_file_mib * 1024 * 1024,
        "fsize",
    )?;
    set(Resource::RLIMIT_NOFILE, spec.max_open_files, "nofile")?;
    Ok(())
}

fn landlock(spec: &Spec) -> Result<String, String> {
    use landlock::{
        ABI, Access, AccessFs, AccessNet, CompatLevel, Compatible, Ruleset, RulesetAttr,
        RulesetCreatedAttr, RulesetStatus, path_beneath_rules,
    };
    let abi = ABI::V5;
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))
        .map_err(|e| format!("landlock: {e}"))?;
    if !spec.network {
        ruleset = ruleset
            .handle_access(AccessNet::BindTcp | AccessNet::ConnectTcp)
            .map_err(|e| format!("landlock: {e}"))?;
    }
    let mut writable: Vec<&Path> = spec.writable.iter().map(PathBuf::as_path).collect();
    writable.extend(spec.tmp.as_deref());
    let devices = [
        "/dev/null",
        "/dev/zero",
        "/dev/full",
        "/dev/tty",
        "/dev/pts",
    ];
    let created = ruleset
        .create()
        .map_err(|e| format!("landlock: {e}"))?
        .add_rules(path_beneath_rules(["/"], AccessFs::from_read(abi)))
        .map_err(|e| format!("landlock: {e}"))?
        .add_rules(path_beneath_rules(
            devices.iter().filter(|d| Path::new(d).exists()),
            AccessFs::from_all(abi),
        ))
        .map_err(|e| format!("landlock: {e}"))?
        .add_rules(path_beneath_rules(
            writable.iter().filter(|p| p.exists()),
            AccessFs::from_all(abi),
        ))
        .map_err(|e| format!("landlock: {e}"))?;
    let status = created
        .restrict_self()
        .map_err(|e| format!("landlock: {e}"))?;
    let abi = match status.landlock {
        landlock::LandlockStatus::Available { effective_abi, .. } => Some(effective_abi),
        _ => None,
    };
    let Some(abi) = abi.filter(|_| status.ruleset != RulesetStatus::NotEnforced) else {
        if spec.required {
            return Err("this kernel cannot enforce Landlock and [sandbox] required = true".into());
        }
        // Without Landlock nothing set no_new_privs; seccomp needs it.
        nix::sys::prctl::set_no_new_privs().map_err(|e| format!("no_new_privs: {e}"))?;
        return Ok("landlock NOT enforced (kernel lacks it; [sandbox] required = false)".into());
    };
    // TCP rules need Landlock ABI 4 (Linux 6.7); say so rather than claim them.
    let net = match (spec.network, abi >= ABI::V4) {
        (true, _) => "network allowed",
        (false, true) => "no TCP",
        (false, false) => "TCP not restricted (kernel Landlock ABI < 4)",
    };
    let dirs = writable
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    Ok(format!(
        "landlock {abi:?} enforced; writable: {}; {net}",
        if dirs.is_empty() {
            "nothing".into()
        } else {
            dirs
        }
    ))
}

fn seccomp() -> Result<(), String> {
    use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        DENIED_SYSCALLS.iter().map(|s| (*s, Vec::new())).collect();
    let arch = if cfg!(target_arch = "aarch64") {
        TargetArch::aarch64
    } else {
        TargetArch::x86_64
    };
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| format!("seccomp: {e}"))?;
    let program: BpfProgram = filter.try_into().map_err(|e| format!("seccomp: {e:?}"))?;
    seccompiler::apply_filter(&program).map_err(|e| format!("seccomp: {e}"))
}

/// A clean environment: nothing of the daemon's, only what programs expect.
fn environment(spec: &Spec) -> Vec<(String, String)> {
    let mut env = vec![
        ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()),
        ("HOME".into(), spec.home.to_string_lossy().into_owned()),
        ("USER".into(), spec.user.clone()),
        ("LOGNAME".into(), spec.user.clone()),
        ("LANG".into(), "C.UTF-8".into()),
        ("TERM".into(), "dumb".into()),
        ("NO_COLOR".into(), "1".into()),
        ("GIT_TERMINAL_PROMPT".into(), "0".into()),
        ("DEBIAN_FRONTEND".into(), "noninteractive".into()),
    ];
    if let Some(tmp) = &spec.tmp {
        env.push(("TMPDIR".into(), tmp.to_string_lossy().into_owned()));
    }
    env
}

fn run(spec: &Spec) -> i32 {
    if let Some(argv) = spec.action.argv() {
        let Some((program, args)) = argv.split_first() else {
            eprintln!("devos sandbox: empty command");
            return EXIT_ACTION_FAILED;
        };
        let err = std::process::Command::new(program)
            .args(args)
            .env_clear()
            .envs(environment(spec))
            .exec();
        eprintln!("cannot run {program}: {err}");
        return if err.kind() == std::io::ErrorKind::NotFound {
            127
        } else {
            126
        };
    }
    match file_operation(&spec.action) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{e}");
            EXIT_ACTION_FAILED
        }
    }
}

fn file_operation(action: &Action) -> Result<(), String> {
    let ctx = |what: &str, p: &Path| {
        let p = p.display().to_string();
        let what = what.to_owned();
        move |e: std::io::Error| format!("cannot {what} {p}: {e}")
    };
    let refuse_existing = |p: &Path| {
        if p.symlink_metadata().is_ok() {
            Err(format!(
                "{} already exists; nothing was replaced",
                p.display()
            ))
        } else {
            Ok(())
        }
    };
    match action {
        Action::Read { path } => {
            let mut file = std::fs::File::open(path).map_err(ctx("read", path))?;
            std::io::copy(&mut file, &mut std::io::stdout()).map_err(ctx("read", path))?;
        }
        Action::Write { path, content } => {
            std::fs::write(path, content).map_err(ctx("write", path))?;
            println!("wrote {} bytes to {}", content.len(), path.display());
        }
        Action::Mkdir { path } => {
            std::fs::create_dir_all(path).map_err(ctx("create", path))?;
        }
        Action::Move { from, to } => {
            refuse_existing(to)?;
            std::fs::rename(from, to).map_err(ctx("move", from))?;
            println!("moved {} to {}", from.display(), to.display());
        }
        Action::Copy { from, to } => {
            refuse_existing(to)?;
            let n = copy_tree(from, to)?;
            println!(
                "copied {n} files from {} to {}",
                from.display(),
                to.display()
            );
        }
        Action::Delete { path } => {
            let meta = path.symlink_metadata().map_err(ctx("delete", path))?;
            if meta.is_dir() {
                std::fs::remove_dir_all(path).map_err(ctx("delete", path))?;
            } else {
                std::fs::remove_file(path).map_err(ctx("delete", path))?;
            }
            println!("deleted {}", path.display());
        }
        _ => return Err("not a file operation".into()),
    }
    Ok(())
}

/// Copy a file or a tree, keeping symlinks as symlinks and modes; returns the number
/// of files copied.
fn copy_tree(from: &Path, to: &Path) -> Result<u64, String> {
    let meta = from
        .symlink_metadata()
        .map_err(|e| format!("cannot copy {}: {e}", from.display()))?;
    let fail = |p: &Path| {
        let p = p.display().to_string();
        move |e: std::io::Error| format!("cannot copy to {p}: {e}")
    };
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(from).map_err(fail(to))?;
        std::os::unix::fs::symlink(target, to).map_err(fail(to))?;
        Ok(1)
    } else if meta.is_dir() {
        std::fs::create_dir(to).map_err(fail(to))?;
        let mut n = 0;
        let mut entries: Vec<_> = std::fs::read_dir(from)
            .map_err(|e| format!("cannot read {}: {e}", from.display()))?
            .flatten()
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            n += copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
        std::fs::set_permissions(to, meta.permissions()).map_err(fail(to))?;
        Ok(n)
    } else {
        std::fs::copy(from, to).map_err(fail(to))?;
        Ok(1)
    }
}
