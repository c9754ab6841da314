//! The sandbox's inner stage, inside the namespaces bubblewrap built: become the
//! caller, set rlimits, enter the working directory as the caller, apply Landlock
//! and seccomp, then execute the program (argv only, no shell) or perform the file
//! operation itself.
//!
//! Order matters: what must be hidden is covered first (as root, the one step that
//! needs it), then identity (so Landlock and seccomp bind the user's process, and
//! `setuid` is not itself filtered), rlimits, `chdir` as the user, Landlock (which
//! sets no_new_privs), then seccomp.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use super::{APPLIED_PREFIX, Cover, EXIT_ACTION_FAILED, EXIT_INSIDE_FAILED, Inner as Spec};
use crate::action::Action;
use crate::caller::IdentityError;

/// Why the inner stage could not confine an action; nothing of it ran.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("{0} changed between its check and the sandbox; nothing ran")]
    Changed(PathBuf),
    #[error("{0} is not hidden where it was checked; nothing ran")]
    NotHidden(PathBuf),
    #[error("cannot cover {path}: {source}; nothing ran")]
    Cover { path: PathBuf, source: nix::Error },
    #[error(
        "this kernel cannot open a path without following links (openat2, Linux 5.6 or later is needed); nothing ran"
    )]
    NoOpenat2,
    #[error("capabilities: {0}")]
    Capabilities(caps::errors::CapsError),
    #[error("close_range: {0}")]
    CloseOnExec(std::io::Error),
    #[error("setrlimit {name}: {source}")]
    Rlimit {
        name: &'static str,
        source: nix::Error,
    },
    #[error("cannot enter the working directory {cwd} as {user}: {source}")]
    EnterCwd {
        cwd: PathBuf,
        user: String,
        source: nix::Error,
    },
    #[error("landlock: {0}")]
    Landlock(landlock::RulesetError),
    #[error("this kernel cannot enforce Landlock and [sandbox] required = true")]
    LandlockRequired,
    #[error("no_new_privs: {0}")]
    NoNewPrivs(nix::Error),
    #[error("seccomp: {0}")]
    Seccomp(seccompiler::BackendError),
    #[error("seccomp: {0:?}")]
    SeccompCompile(seccompiler::BackendError),
    #[error("seccomp: {0}")]
    SeccompApply(seccompiler::Error),
}

/// Why a file operation failed (the action's own failure, as `rm` or `cp` would).
#[derive(Debug, thiserror::Error)]
pub enum FileOpError {
    /// `what` is the verb: read, write, create, move, delete, copy, copy to.
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} already exists; nothing was replaced")]
    Exists(PathBuf),
    #[error("not a file operation")]
    NotAFileOperation,
}

/// System calls an action never needs: debugging other processes, io_uring (which
/// bypasses seccomp for its operations), kernel modules, mounts, namespaces, kexec,
/// BPF, keyrings, userfaultfd, swap, reboot, accounting.
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
    libc::SYS_chroot,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_fsopen,
    libc::SYS_fsmount,
    libc::SYS_fsconfig,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_userfaultfd,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_reboot,
    libc::SYS_acct,
];

/// `clone` flags that would make new namespaces.
const NAMESPACE_FLAGS: &[u64] = &[
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWCGROUP as u64,
];

/// The inner stage's main: read the spec, confine ourselves, run the action. Returns
/// only on failure (with the exit status); a program run replaces this process.
pub fn exec_from_stdin() -> i32 {
    let spec: Spec = match crate::caller::job_from_stdin() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("devos sandbox (inside): {e}");
            return EXIT_INSIDE_FAILED;
        }
    };
    // Opened before Landlock, which would refuse it; closed when the action starts.
    // Without it the daemon could not tell that the action started: nothing runs.
    let Some(mut status) = super::status_pipe(spec.status_fd) else {
        eprintln!("devos sandbox (inside): refused: no status pipe from the outer stage");
        return EXIT_INSIDE_FAILED;
    };
    let applied = match confine(&spec) {
        Ok(applied) => applied,
        Err(e) => {
            eprintln!("devos sandbox (inside): refused: {e}");
            return EXIT_INSIDE_FAILED;
        }
    };
    // The daemon reads this line, on the status pipe, to record what the sandbox
    // applied; nothing of the action has run before it. One line, whatever the paths
    // in it hold.
    let line: String = format!("{}; {applied}", spec.outer)
        .chars()
        .map(|c| if c.is_control() { '\u{FFFD}' } else { c })
        .collect();
    {
        use std::io::Write;
        // (A daemon gone meanwhile takes the action down with it: nothing to do here.)
        let _ = writeln!(status, "{APPLIED_PREFIX}{line}");
    }
    drop(status);
    run(&spec)
}

fn confine(spec: &Spec) -> Result<String, SetupError> {
    use nix::unistd::chdir;
    cover(&spec.covers, &spec.stand_ins)?;
    let switching = !spec.as_root && spec.uid != 0;
    if !spec.as_root {
        drop_capabilities(switching)?;
    }
    // Root's own requests stay uid 0, without capabilities.
    if switching {
        crate::caller::switch_identity(spec.uid, spec.gid, &spec.groups)?;
    }
    if !spec.as_root {
        holding_only(&caps::CapsHashSet::new())?;
    }
    // Each bound path is still the file it was when checked: a working directory
    // swapped for a symlink (to a socket directory, say) in between is refused.
    for want in &spec.identities {
        let now = super::Identity::of(&want.path);
        if now.as_ref() != Some(want) {
            return Err(SetupError::Changed(want.path.clone()));
        }
    }
    // Each covered place is hidden where the caller finds it too: an empty
    // directory, /dev/null, nothing, or out of their reach (a denied place in root's
    // directories, seen covered as root above). Whatever else they find there is
    // refused like any failure.
    for Cover { path, dir, .. } in &spec.covers {
        use std::os::unix::fs::FileTypeExt;
        let hidden = match std::fs::metadata(path) {
            Ok(m) if *dir => {
                m.is_dir() && std::fs::read_dir(path).is_ok_and(|mut d| d.next().is_none())
            }
            Ok(m) => {
                m.file_type().is_char_device()
                    && std::fs::metadata("/dev/null").is_ok_and(|n| {
                        use std::os::unix::fs::MetadataExt;
                        n.rdev() == m.rdev()
                    })
            }
            Err(e) => matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
            ),
        };
        if !hidden {
            return Err(SetupError::NotHidden(path.clone()));
        }
    }
    super::close_on_exec_from_3().map_err(SetupError::CloseOnExec)?;
    rlimits(spec)?;
    chdir(&spec.cwd).map_err(|source| SetupError::EnterCwd {
        cwd: spec.cwd.clone(),
        user: spec.user.clone(),
        source,
    })?;
    let landlock = if spec.as_root {
        "landlock not applied (package install as root)".to_owned()
    } else {
        landlock(spec)?
    };
    seccomp(spec.as_root)?;
    Ok(format!(
        "{landlock}; seccomp denies {} syscalls and new namespaces; no_new_privs",
        DENIED_SYSCALLS.len()
    ))
}

/// Mount an empty tmpfs over each covered directory and /dev/null over anything else,
/// on the place itself: opened as a handle without following any link (a user's link
/// planted on the way refuses the action; nothing is mounted or made elsewhere), its
/// type still the one the outer stage saw; then opened again the same way to see the
/// cover there. A place that is not there inside (below a hidden place) has nothing
/// to hide.
fn cover(covers: &[Cover], stand_ins: &[PathBuf]) -> Result<(), SetupError> {
    use nix::errno::Errno;
    use nix::mount::{MsFlags, mount};
    use nix::sys::stat::{FileStat, SFlag, fstat};
    let kind = |s: &FileStat| SFlag::from_bits_truncate(s.st_mode & libc::S_IFMT);
    let null = nix::sys::stat::stat("/dev/null").map_err(|source| SetupError::Cover {
        path: "/dev/null".into(),
        source,
    })?;
    // bubblewrap's stand-ins, and the directories covered here so far (a place below
    // one, the agent's actions below its state, is gone with it).
    // Each with its file system's device, as found now.
    let mut stand_ins: Vec<(PathBuf, u64)> = stand_ins
        .iter()
        .filter_map(|s| {
            let fd = open_without_links(s).ok()?;
            Some((s.clone(), fstat(&fd).ok()?.st_dev))
        })
        .collect();
    for c in covers {
        let failed = |source| match source {
            Errno::ENOSYS => SetupError::NoOpenat2,
            source => SetupError::Cover {
                path: c.path.clone(),
                source,
            },
        };
        let changed = || SetupError::Changed(c.path.clone());
        let found = match open_without_links(&c.path) {
            Ok(fd) => Some((fstat(&fd).map_err(failed)?, fd)),
            Err(Errno::ENOENT) => None,
            Err(Errno::ELOOP | Errno::ENOTDIR | Errno::EXDEV) => return Err(changed()),
            Err(e) => return Err(failed(e)),
        };
        // Not there inside, or another file at the name: left out with a place
        // bubblewrap hid or put its own empty one on (`/root` for a rule on it):
        // nothing to hide; or taken out of, or swapped in, a directory the action sees
        // since the outer stage looked (to come back once it runs, uncovered).
        let same = |(b, _): &(FileStat, _)| c.id.is_none_or(|id| id == (b.st_dev, b.st_ino));
        let Some((before, place)) = found.filter(same) else {
            match in_stand_in(&c.path, &stand_ins).map_err(failed)? {
                true => continue,
                false => return Err(changed()),
            }
        };
        if (kind(&before) == SFlag::S_IFDIR) != c.dir || kind(&before) == SFlag::S_IFLNK {
            return Err(changed());
        }
        let read_only = if c.read_only {
            MsFlags::MS_RDONLY
        } else {
            MsFlags::empty()
        };
        let safe = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        // The handle's own place, whatever its name has become.
        let target = handle_path(&place);
        if c.dir {
            let flags = safe | read_only;
            mount(
                Some("tmpfs"),
                &target,
                Some("tmpfs"),
                flags,
                Some("mode=0755"),
            )
        } else {
            mount(
                Some("/dev/null"),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
        }
        .map_err(failed)?;
        // What the name leads to now, without links: the cover.
        let covered = open_without_links(&c.path).map_err(failed)?;
        let after = fstat(&covered).map_err(failed)?;
        let hidden = if c.dir {
            kind(&after) == SFlag::S_IFDIR && after.st_dev != before.st_dev
        } else {
            kind(&after) == SFlag::S_IFCHR && after.st_rdev == null.st_rdev
        };
        if !hidden {
            return Err(SetupError::NotHidden(c.path.clone()));
        }
        if c.dir {
            stand_ins.push((c.path.clone(), after.st_dev));
        }
        if !c.dir && c.read_only {
            let flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY;
            mount(
                None::<&str>,
                &handle_path(&covered),
                None::<&str>,
                flags,
                None::<&str>,
            )
            .map_err(failed)?;
        }
    }
    Ok(())
}

/// Whether what `path` leads to inside, or the nearest directory above it that is
/// there, is on one of the empty file systems bubblewrap put in place of others
/// (`stand_ins`: `/home`, `/run`, the private `/tmp`, ...), not on something bound
/// from outside (a directory the action sees, which shows what users change there).
fn in_stand_in(path: &Path, stand_ins: &[(PathBuf, u64)]) -> nix::Result<bool> {
    use nix::errno::Errno;
    use nix::sys::stat::fstat;
    for above in path.ancestors() {
        let dev = match open_without_links(above) {
            Ok(fd) => fstat(&fd)?.st_dev,
            Err(Errno::ENOENT) => continue,
            Err(e) => return Err(e),
        };
        let on = |(s, d): &(PathBuf, u64)| above.starts_with(s) && *d == dev;
        return Ok(stand_ins.iter().any(on));
    }
    Ok(false)
}

/// `path` opened as a handle (`O_PATH`) without following any link on the way, the
/// last part included.
fn open_without_links(path: &Path) -> nix::Result<std::os::fd::OwnedFd> {
    use nix::fcntl::{AT_FDCWD, OFlag, OpenHow, ResolveFlag, openat2};
    let how = OpenHow::new()
        // (Not O_NOFOLLOW: with O_PATH it would open a link itself.)
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    openat2(AT_FDCWD, path, how)
}

/// The name that leads to exactly what `fd` is (a mount's target given as a handle).
fn handle_path(fd: &std::os::fd::OwnedFd) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Give up what covering needed (bubblewrap added it for this stage): no capability
/// stays in any set but `CAP_SETUID` and `CAP_SETGID` when the switch to a caller
/// other than root needs them (and loses them with it), and none can come back (the
/// bounding set is empty).
fn drop_capabilities(switching: bool) -> Result<(), SetupError> {
    use caps::{CapSet, Capability, CapsHashSet};
    let err = SetupError::Capabilities;
    caps::clear(None, CapSet::Bounding).map_err(err)?;
    caps::clear(None, CapSet::Ambient).map_err(err)?;
    caps::clear(None, CapSet::Inheritable).map_err(err)?;
    let keep: CapsHashSet = if switching {
        [Capability::CAP_SETUID, Capability::CAP_SETGID].into()
    } else {
        CapsHashSet::new()
    };
    caps::set(None, CapSet::Effective, &keep).map_err(err)?;
    caps::set(None, CapSet::Permitted, &keep).map_err(err)?;
    holding_only(&keep)
}

/// This process may hold `want` and no other capability, and none can come back.
fn holding_only(want: &caps::CapsHashSet) -> Result<(), SetupError> {
    use caps::CapSet;
    let err = SetupError::Capabilities;
    let held = caps::read(None, CapSet::Permitted).map_err(err)?;
    let bounding = caps::read(None, CapSet::Bounding).map_err(err)?;
    if held != *want || !bounding.is_empty() {
        return Err(SetupError::Capabilities(
            format!("still held: {held:?}, bounding {bounding:?}").into(),
        ));
    }
    Ok(())
}

fn rlimits(spec: &Spec) -> Result<(), SetupError> {
    use nix::sys::resource::{Resource, setrlimit};
    let set = |r: Resource, v: u64, name: &'static str| {
        setrlimit(r, v, v).map_err(|source| SetupError::Rlimit { name, source })
    };
    set(Resource::RLIMIT_CORE, 0, "core")?;
    set(Resource::RLIMIT_CPU, spec.limits.cpu_secs, "cpu")?;
    set(
        Resource::RLIMIT_FSIZE,
        spec.limits.max_file_mib * 1024 * 1024,
        "fsize",
    )?;
    set(
        Resource::RLIMIT_NOFILE,
        spec.limits.max_open_files,
        "nofile",
    )?;
    Ok(())
}

fn landlock(spec: &Spec) -> Result<String, SetupError> {
    use landlock::{
        ABI, Access, AccessFs, AccessNet, CompatLevel, Compatible, Ruleset, RulesetAttr,
        RulesetCreatedAttr, RulesetStatus, Scope, path_beneath_rules,
    };
    let abi = ABI::V6;
    let err = SetupError::Landlock;
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))
        .map_err(err)?
        .scope(Scope::AbstractUnixSocket | Scope::Signal)
        .map_err(err)?;
    if !spec.network {
        ruleset = ruleset
            .handle_access(AccessNet::BindTcp | AccessNet::ConnectTcp)
            .map_err(err)?;
    }
    let mut writable: Vec<&Path> = spec.writable.iter().map(|p| p.as_path()).collect();
    writable.extend(
        super::PRIVATE_DIRS
            .iter()
            .map(|(_, inside)| Path::new(inside)),
    );
    let devices = [
        "/dev/null",
        "/dev/zero",
        "/dev/full",
        "/dev/tty",
        "/dev/pts",
    ];
    let status = ruleset
        .create()
        .map_err(err)?
        .add_rules(path_beneath_rules(["/"], AccessFs::from_read(abi)))
        .map_err(err)?
        .add_rules(path_beneath_rules(
            devices.iter().filter(|d| Path::new(d).exists()),
            AccessFs::from_all(abi),
        ))
        .map_err(err)?
        .add_rules(path_beneath_rules(
            writable.iter().filter(|p| p.exists()),
            AccessFs::from_all(abi),
        ))
        .map_err(err)?
        .restrict_self()
        .map_err(err)?;
    let abi = match status.landlock {
        landlock::LandlockStatus::Available { effective_abi, .. } => Some(effective_abi),
        _ => None,
    };
    let Some(abi) = abi.filter(|_| status.ruleset != RulesetStatus::NotEnforced) else {
        if spec.required {
            return Err(SetupError::LandlockRequired);
        }
        // Without Landlock nothing set no_new_privs; seccomp needs it.
        nix::sys::prctl::set_no_new_privs().map_err(SetupError::NoNewPrivs)?;
        return Ok("landlock NOT enforced (kernel lacks it; [sandbox] required = false)".into());
    };
    // TCP rules need Landlock ABI 4 (Linux 6.7) and socket scoping ABI 6 (Linux
    // 6.12); say what held rather than claim it. The namespaces hold either way.
    let net = match (spec.network, abi >= ABI::V4) {
        (true, _) => "TCP allowed",
        (false, true) => "no TCP",
        (false, false) => "TCP left to the network namespace (Landlock ABI < 4)",
    };
    let scoped = if abi >= ABI::V6 {
        "abstract UNIX sockets and signals scoped"
    } else {
        "abstract UNIX sockets left to the network namespace (Landlock ABI < 6)"
    };
    let dirs = writable
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    Ok(format!(
        "landlock {abi:?} enforced; writable: {dirs}; {net}; {scoped}"
    ))
}

fn seccomp(as_root: bool) -> Result<(), SetupError> {
    use seccompiler::{
        BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
        SeccompRule, TargetArch,
    };
    let arch = if cfg!(target_arch = "aarch64") {
        TargetArch::aarch64
    } else {
        TargetArch::x86_64
    };
    let err = SetupError::Seccomp;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED_SYSCALLS.iter().map(|s| (*s, Vec::new())).collect();
    // clone() that would make a namespace: one rule per flag (rules are or-ed).
    let clone_rules = NAMESPACE_FLAGS
        .iter()
        .map(|flag| {
            SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(*flag),
                *flag,
            )
            .and_then(|c| SeccompRule::new(vec![c]))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(err)?;
    rules.insert(libc::SYS_clone, clone_rules);
    // vsock reaches the hypervisor's host and other VMs, which no network namespace
    // covers.
    rules.insert(
        libc::SYS_socket,
        vec![
            SeccompRule::new(vec![
                SeccompCondition::new(
                    0,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::Eq,
                    libc::AF_VSOCK as u64,
                )
                .map_err(err)?,
            ])
            .map_err(err)?,
        ],
    );
    // Files made set-user-ID or set-group-ID (what systemd's RestrictSUIDSGID= does for
    // a unit; the agent's unit cannot use it, see setuid_rules). Not for root's package
    // installs: dpkg gives sudo, passwd and others their set-ID modes.
    if !as_root {
        for (syscall, rule) in setuid_rules().map_err(err)? {
            rules.entry(syscall).or_default().push(rule);
        }
    }
    let deny = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(err)?;
    // clone3 passes its flags, and openat2 its mode, in memory seccomp cannot read: say
    // they do not exist, and the C library and programs fall back to clone() and
    // openat(), whose arguments the rules above see.
    let clone3 = SeccompFilter::new(
        [
            (libc::SYS_clone3, Vec::new()),
            (libc::SYS_openat2, Vec::new()),
        ]
        .into_iter()
        .collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(err)?;
    for filter in [deny, clone3] {
        let program: BpfProgram = filter.try_into().map_err(SetupError::SeccompCompile)?;
        seccompiler::apply_filter(&program).map_err(SetupError::SeccompApply)?;
    }
    if cfg!(target_arch = "x86_64") {
        seccompiler::apply_filter(&no_x32()).map_err(SetupError::SeccompApply)?;
    }
    Ok(())
}

/// A filter refusing every x32 system call. They come with the x86-64 architecture
/// (the filters above check it) and the number `__X32_SYSCALL_BIT` added, which none of
/// their rules name: on a kernel built with x32 support they would all be allowed.
fn no_x32() -> seccompiler::BpfProgram {
    use seccompiler::sock_filter;
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    // (BPF: load the syscall number; if >= the bit fall through to refuse, else skip
    // one to allow.)
    let op = |code: u32, jt: u8, jf: u8, k: u32| sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    vec![
        op(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0, 0, 0),
        op(
            libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K,
            0,
            1,
            X32_SYSCALL_BIT,
        ),
        op(
            libc::BPF_RET | libc::BPF_K,
            0,
            0,
            libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
        ),
        op(libc::BPF_RET | libc::BPF_K, 0, 0, libc::SECCOMP_RET_ALLOW),
    ]
}

/// Rules matching the calls that would make a file set-user-ID or set-group-ID: a mode
/// argument with S_ISUID or S_ISGID (for open and openat, only with O_CREAT or
/// O_TMPFILE: an unnamed file, linked in later, keeps a set-group-ID mode).
///
/// The agent's unit cannot say `RestrictSUIDSGID=yes`: systemd enforces it by making
/// openat2() fail with ENOSYS for the whole unit, and bubblewrap 0.11+ opens every bind
/// source with openat2() and (as Debian builds it) has no fallback, so no action could
/// start. The actions get the same protection here, after bubblewrap has run.
fn setuid_rules() -> Result<Vec<(i64, seccompiler::SeccompRule)>, seccompiler::BackendError> {
    use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};
    let has = |arg: u8, bit: u64| {
        SeccompCondition::new(
            arg,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(bit),
            bit,
        )
    };
    // (syscall, the argument holding the mode, the one holding open flags)
    let calls: [(i64, u8, Option<u8>); 9] = [
        (libc::SYS_chmod, 1, None),
        (libc::SYS_fchmod, 1, None),
        (libc::SYS_fchmodat, 2, None),
        (libc::SYS_fchmodat2, 2, None),
        (libc::SYS_creat, 1, None),
        (libc::SYS_mknod, 1, None),
        (libc::SYS_mknodat, 2, None),
        (libc::SYS_open, 2, Some(1)),
        (libc::SYS_openat, 3, Some(2)),
    ];
    let mut rules = Vec::new();
    for (syscall, mode, flags) in calls {
        for bit in [libc::S_ISUID as u64, libc::S_ISGID as u64] {
            let Some(flags) = flags else {
                rules.push((syscall, SeccompRule::new(vec![has(mode, bit)?])?));
                continue;
            };
            for creates in [libc::O_CREAT as u64, libc::O_TMPFILE as u64] {
                let conditions = vec![has(mode, bit)?, has(flags, creates)?];
                rules.push((syscall, SeccompRule::new(conditions)?));
            }
        }
    }
    Ok(rules)
}

fn run(spec: &Spec) -> i32 {
    if let Some(argv) = spec.action.argv() {
        let Some(program) = &spec.program else {
            eprintln!(
                "devos sandbox: {} is not installed in the system directories",
                argv[0]
            );
            return 127;
        };
        // What the action creates gets the usual modes, not the agent's 0077.
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
        let err = std::process::Command::new(program)
            .arg0(&argv[0])
            .args(&argv[1..])
            .env_clear()
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null())
            .exec();
        eprintln!("cannot run {}: {err}", program.display());
        return if err.kind() == std::io::ErrorKind::NotFound {
            127
        } else {
            126
        };
    }
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    match file_operation(&spec.action) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{e}");
            EXIT_ACTION_FAILED
        }
    }
}

/// Print the file at `path`, unless its start holds a NUL byte (git's test for a
/// binary file): then only what it is, since its bytes would reach the user (and a
/// model) as replacement characters.
fn read_text(path: &Path) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let mut file = std::fs::File::open(path)?;
    let mut start = Vec::with_capacity(8192);
    (&mut file).take(8192).read_to_end(&mut start)?;
    let mut out = std::io::stdout().lock();
    if start.contains(&0) {
        let size = file.metadata()?.len();
        writeln!(
            out,
            "{} is a binary file of {size} bytes: not shown (a program that knows its format reads it; `od -c` shows its bytes)",
            path.display()
        )?;
        return Ok(());
    }
    out.write_all(&start)?;
    std::io::copy(&mut file, &mut out)?;
    Ok(())
}

fn file_operation(action: &Action) -> Result<(), FileOpError> {
    let ctx = |what: &'static str, p: &Path| {
        let path = p.to_path_buf();
        move |source| FileOpError::Io { what, path, source }
    };
    let refuse_existing = |p: &Path| {
        if p.symlink_metadata().is_ok() {
            Err(FileOpError::Exists(p.to_path_buf()))
        } else {
            Ok(())
        }
    };
    match action {
        Action::Read { path } => read_text(path).map_err(ctx("read", path))?,
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
        _ => return Err(FileOpError::NotAFileOperation),
    }
    Ok(())
}

/// Copy a file or a tree, keeping symlinks as symlinks and modes; returns the number
/// of files copied.
fn copy_tree(from: &Path, to: &Path) -> Result<u64, FileOpError> {
    let io = |what: &'static str, p: &Path| {
        let path = p.to_path_buf();
        move |source| FileOpError::Io { what, path, source }
    };
    let meta = from.symlink_metadata().map_err(io("copy", from))?;
    let fail = |p: &Path| io("copy to", p);
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(from).map_err(fail(to))?;
        std::os::unix::fs::symlink(target, to).map_err(fail(to))?;
        Ok(1)
    } else if meta.is_dir() {
        std::fs::create_dir(to).map_err(fail(to))?;
        let mut n = 0;
        let mut entries: Vec<_> = std::fs::read_dir(from)
            .map_err(io("read", from))?
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
