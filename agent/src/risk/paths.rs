//! Paths as the kernel will see them: lexical normalisation, symlinks resolved as far
//! as a path exists, and the secret locations a path falls in.

use std::path::{Component, Path, PathBuf};

/// Lexically normalise an absolute path: drop `.` and repeated slashes, apply `..`.
pub fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// A path through `/proc/PID/root`, `/proc/PID/cwd` (or `self`, `thread-self`) leads
/// to another process's view of the file system — in a sandbox, the sandbox's own
/// root. Returns where such a path leads (`/...` or `cwd/...`), or the path itself for
/// other process entries (`fd/`, `map_files/`, `exe`), and `None` for any other path.
pub fn through_proc(path: &Path, cwd: &Path) -> Option<PathBuf> {
    let rel = path.strip_prefix("/proc").ok()?;
    let mut parts = rel.components();
    let pid = parts.next()?.as_os_str().to_string_lossy().into_owned();
    if !(pid == "self" || pid == "thread-self" || pid.bytes().all(|b| b.is_ascii_digit())) {
        return None;
    }
    let kind = parts.next()?.as_os_str().to_string_lossy().into_owned();
    let rest: PathBuf = parts.collect();
    Some(match kind.as_str() {
        "root" => normalize(&Path::new("/").join(rest)),
        "cwd" => normalize(&cwd.join(rest)),
        _ => path.to_path_buf(),
    })
}

/// Resolve symlinks in the longest existing prefix of `path`, keep the rest as is.
pub fn resolve_existing(path: &Path) -> PathBuf {
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = std::fs::canonicalize(&existing) {
            return normalize(&rest.iter().rev().fold(real, |p: PathBuf, n| p.join(n)));
        }
        match (
            existing.file_name().map(|n| n.to_owned()),
            existing.parent(),
        ) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent.to_path_buf();
            }
            _ => return path.to_path_buf(),
        }
    }
}

/// `path` (absolute) with the symlinks on its way followed only where root alone could
/// have made them: a link owned by root in a directory owned by root that no one else
/// may write (`/home` -> `var/home` in DevOS images). From any other link on, or from
/// the first part that does not exist, the path stays as written. The second value
/// says whether it exists that way: every part there, no other link on the way.
///
/// For what root does with paths others may name (the administrator's deny rules name
/// places in users' homes): a link a user planted must not send root elsewhere.
pub fn resolve_trusted(path: &Path) -> (PathBuf, bool) {
    resolve_trusted_within(&normalize(path), 0, &std::cell::OnceCell::new())
}

/// [`resolve_trusted`] `depth` links in, with the mount table read at most once.
fn resolve_trusted_within(
    path: &Path,
    depth: u32,
    mounts: &std::cell::OnceCell<MountTable>,
) -> (PathBuf, bool) {
    use std::os::unix::fs::MetadataExt;
    let only_root =
        |dir: &Path| std::fs::metadata(dir).is_ok_and(|m| m.uid() == 0 && m.mode() & 0o022 == 0);
    let mut out = PathBuf::from("/");
    let mut parts = path
        .components()
        .filter(|c| matches!(c, Component::Normal(_)));
    while let Some(part) = parts.next() {
        let next = out.join(part);
        let followed = match std::fs::symlink_metadata(&next) {
            Ok(m) if !m.file_type().is_symlink() => {
                out = next;
                continue;
            }
            Ok(m)
                if depth < 40
                    && m.uid() == 0
                    && only_root(&out)
                    && !mounts
                        .get_or_init(MountTable::read)
                        .on_user_file_system(&next) =>
            {
                std::fs::read_link(&next).ok().map(|target| {
                    resolve_trusted_within(&normalize(&out.join(target)), depth + 1, mounts)
                })
            }
            _ => None,
        };
        match followed {
            Some((real, true)) => out = real,
            Some((real, false)) => {
                return (normalize(&real.join(parts.collect::<PathBuf>())), false);
            }
            None => return (normalize(&next.join(parts.collect::<PathBuf>())), false),
        }
    }
    (out, true)
}

/// The first directory on the way to `real` (a path with no link of a user's on it)
/// that someone other than root may change: rename the entry the path goes through,
/// or put something else there. Others may when the directory is not root's, or is
/// writable by others — unless it is sticky (`/tmp`) and the entry root's — and when
/// it cannot be looked at or is on a file system users fill as they like (FUSE, in
/// `mounts`: its owners mean nothing). `None` when the whole way is root's alone.
pub fn changeable_by_users(real: &Path, mounts: &MountTable) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let steps: Vec<&Path> = real.ancestors().collect();
    steps.windows(2).rev().find_map(|w| {
        let (entry, dir) = (w[0], w[1]);
        let Ok(d) = std::fs::metadata(dir) else {
            return Some(dir.to_path_buf());
        };
        let entry_roots = std::fs::symlink_metadata(entry).is_ok_and(|m| m.uid() == 0);
        let sticky = d.mode() & 0o1000 != 0;
        let others_write = d.mode() & 0o022 != 0 && !(sticky && entry_roots);
        (d.uid() != 0 || others_write || mounts.on_user_file_system(dir)).then(|| dir.to_path_buf())
    })
}

/// The other places `path` shows up through bind mounts (NixOS images mount
/// `/var/home` on `/home`; hosts often bind a data disk's directory there): the same
/// directory of the same file system mounted elsewhere, from this process's mount
/// table. Empty when there is none or the table cannot be read.
pub fn mount_aliases(path: &Path) -> Vec<PathBuf> {
    MountTable::read().aliases(path)
}

/// This process's mount table, read and parsed once, for [`MountTable::aliases`].
pub struct MountTable(Vec<Mount>);

impl MountTable {
    /// `/proc/self/mountinfo` (empty when it cannot be read).
    pub fn read() -> MountTable {
        MountTable::of(&std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default())
    }

    /// A table in proc(5)'s mountinfo format.
    pub fn of(mountinfo: &str) -> MountTable {
        MountTable(parse_mounts(mountinfo))
    }

    /// [`mount_aliases`] in this table.
    pub fn aliases(&self, path: &Path) -> Vec<PathBuf> {
        aliases_in(&self.0, &normalize(path))
    }

    /// Whether `path` is on a file system its users mount and fill as they like
    /// (FUSE): its owners and modes say nothing about who made what is there.
    pub fn on_user_file_system(&self, path: &Path) -> bool {
        mount_of(&self.0, path)
            .is_some_and(|m| m.fs_type == "fuse" || m.fs_type.starts_with("fuse."))
    }
}

/// One line of a mount table.
struct Mount {
    dev: String,
    /// Where in its file system the mount starts, and where it is mounted.
    root: PathBuf,
    point: PathBuf,
    fs_type: String,
}

impl Mount {
    /// A file system through which the kernel shows its own state (processes,
    /// devices, sysfs, …), where no one keeps files of their own. (Not cgroup, bpf,
    /// configfs, mqueue or hugetlbfs: what is made there can be anyone's.)
    fn kernel_interface(&self) -> bool {
        matches!(
            self.fs_type.as_str(),
            "proc"
                | "sysfs"
                | "devtmpfs"
                | "devpts"
                | "securityfs"
                | "debugfs"
                | "tracefs"
                | "efivarfs"
                | "pstore"
                | "nsfs"
                | "fusectl"
                | "binfmt_misc"
        )
    }
}

/// The lines of `mountinfo` (proc(5)'s format).
fn parse_mounts(mountinfo: &str) -> Vec<Mount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (fields, rest) = line.split_once(" - ")?;
            let mut fields = fields.split(' ').skip(2);
            let dev = fields.next()?.to_owned();
            let root = unescape_mount_path(fields.next()?);
            let point = unescape_mount_path(fields.next()?);
            let fs_type = rest.split(' ').next()?.to_owned();
            Some(Mount {
                dev,
                root,
                point,
                fs_type,
            })
        })
        .collect()
}

/// The mount `path` is in (the last of the deepest: it covers those before it).
fn mount_of<'a>(mounts: &'a [Mount], path: &Path) -> Option<&'a Mount> {
    mounts
        .iter()
        .filter(|m| path.starts_with(&m.point))
        .max_by_key(|m| m.point.components().count())
}

/// [`mount_aliases`] in the mount table `mounts`.
fn aliases_in(mounts: &[Mount], path: &Path) -> Vec<PathBuf> {
    let Some(mount) = mount_of(mounts, path) else {
        return Vec::new();
    };
    let Ok(below) = path.strip_prefix(&mount.point) else {
        return Vec::new();
    };
    let mut aliases = Vec::new();
    let mut add = |dev: &str, in_fs: &Path, path: &Path| {
        for other in mounts.iter().filter(|m| m.dev == dev) {
            let alias = match in_fs.strip_prefix(&other.root) {
                Ok(rest) => normalize(&other.point.join(rest)),
                // A part of it mounted elsewhere (one home bound on `/srv/alice`): all
                // of that mount is another name of the place.
                // (But a whole file system shown below the place — a container's view
                // of its host's root on `/run/host` — does not make the parts of it
                // bound on their own names, `/etc/hosts`, `/home/dev`, other names.)
                Err(_)
                    if other.root.starts_with(in_fs)
                        && !(in_fs == Path::new("/") && other.root == other.point) =>
                {
                    normalize(&other.point)
                }
                Err(_) => continue,
            };
            // (Never `/`: what backs the root is not hidden as a whole. Nor what is
            // below the place itself, bound on its own name.)
            if !alias.starts_with(path) && alias.parent().is_some() && !aliases.contains(&alias) {
                aliases.push(alias);
            }
        }
    };
    add(&mount.dev, &mount.root.join(below), path);
    // What is mounted below `path` (each home its own mount on `/home`) has its own
    // other names. Not the kernel's own file systems mounted there (a chroot's `proc`,
    // `sys` and `dev` below `/tmp` or `/run/schroot`): they hold nothing of the place,
    // and their other names are the system's `/proc`, `/sys` and `/dev`.
    for m in mounts
        .iter()
        .filter(|m| m.point != path && m.point.starts_with(path) && !m.kernel_interface())
    {
        add(&m.dev, &m.root, &m.point);
    }
    aliases
}

/// A path as mountinfo writes it: space, tab, newline and backslash as `\NNN` (octal).
/// (The builder reads mountinfo with it too.)
pub fn unescape_mount_path(field: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)))
            .map(|d| d.iter().fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0')));
        match octal.and_then(|v| u8::try_from(v).ok()) {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// Expand the policy's secret locations for a user: `~/x` under their home,
/// absolute paths as they are. Each is returned with the place it resolves to when
/// it is a symlink, so both spellings are caught.
pub fn expand_secrets(patterns: &[String], home: &Path) -> Vec<PathBuf> {
    let mounts = MountTable::read();
    let mut out = Vec::new();
    for p in patterns {
        let path = match p.strip_prefix("~/") {
            Some(rest) => home.join(rest),
            None if p == "~" => continue,
            None => PathBuf::from(p),
        };
        if !path.is_absolute() {
            continue;
        }
        let path = normalize(&path);
        let real = resolve_existing(&path);
        let aliases = mounts.aliases(&real);
        for candidate in [path, real].into_iter().chain(aliases) {
            if !out.contains(&candidate) {
                out.push(candidate);
            }
        }
    }
    out
}

/// The secret location (from `secrets`) that one of `paths` lies in, if any.
pub fn secret_of(paths: &[&Path], secrets: &[PathBuf]) -> Option<PathBuf> {
    secrets
        .iter()
        .find(|s| paths.iter().any(|p| p.starts_with(s)))
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_paths_are_read_as_mountinfo_escapes_them() {
        assert_eq!(
            unescape_mount_path("/a\\040b\\011c\\134d\\012"),
            Path::new("/a b\tc\\d\n")
        );
        // Not three octal digits, or more than a byte: as written.
        assert_eq!(unescape_mount_path("/x\\04"), Path::new("/x\\04"));
        assert_eq!(unescape_mount_path("/x\\777"), Path::new("/x\\777"));
    }

    #[test]
    fn a_directory_mounted_in_two_places_has_both_names() {
        // NixOS images: /var is the writable partition, /home a bind of /var/home; a
        // host's data disk with a directory bound on /srv/my dir (a space, escaped).
        let info = "\
22 1 253:0 / / ro,relatime - erofs /dev/mapper/root ro
30 22 8:6 / /var rw,relatime - ext4 /dev/vda6 rw
31 22 8:6 /home /home rw,relatime - ext4 /dev/vda6 rw
40 22 8:7 /data/my\\040dir /srv/my\\040dir rw - ext4 /dev/vdb rw
41 22 8:7 / /mnt/disk rw - ext4 /dev/vdb rw
50 22 8:9 /users/alice /srv/homes/alice rw - ext4 /dev/vdc rw
51 22 8:9 / /data rw - ext4 /dev/vdc rw
";
        let aliases = |p: &str| MountTable::of(info).aliases(Path::new(p));
        assert_eq!(
            aliases("/home/dev/.ssh"),
            [PathBuf::from("/var/home/dev/.ssh")]
        );
        assert_eq!(aliases("/var/home/dev"), [PathBuf::from("/home/dev")]);
        assert_eq!(aliases("/home"), [PathBuf::from("/var/home")]);
        // Elsewhere on /var: no other name.
        assert!(aliases("/var/lib").is_empty());
        assert!(aliases("/usr/bin").is_empty());
        assert_eq!(
            aliases("/srv/my dir/x"),
            [PathBuf::from("/mnt/disk/data/my dir/x")]
        );
        assert_eq!(
            aliases("/mnt/disk/data/my dir"),
            [PathBuf::from("/srv/my dir")]
        );
        assert!(aliases("/mnt/disk/other").is_empty());
        // A home mounted on its own below a hidden place: its other name is hidden too.
        assert_eq!(aliases("/srv/homes"), [PathBuf::from("/data/users/alice")]);
        assert_eq!(
            aliases("/srv"),
            [
                PathBuf::from("/mnt/disk/data/my dir"),
                PathBuf::from("/data/users/alice")
            ]
        );
    }

    #[test]
    fn a_part_of_a_place_mounted_elsewhere_is_another_name_of_it() {
        let info = "\
22 1 253:0 / / rw - ext4 /dev/vda1 rw
70 22 253:0 /home/alice /srv/alice rw - ext4 /dev/vda1 rw
71 22 253:0 /home/alice/proj/.ssh /opt/keys rw - ext4 /dev/vda1 rw
";
        let aliases = |p: &str| MountTable::of(info).aliases(Path::new(p));
        assert_eq!(
            aliases("/home"),
            [PathBuf::from("/srv/alice"), PathBuf::from("/opt/keys")]
        );
        assert_eq!(
            aliases("/home/alice/proj"),
            [PathBuf::from("/srv/alice/proj"), PathBuf::from("/opt/keys")]
        );
        assert!(aliases("/home/bob").is_empty());
        // Each home its own file system (a ZFS dataset per user), a part of one bound
        // elsewhere.
        let info = "\
22 1 253:0 / / rw - ext4 /dev/vda1 rw
70 22 0:50 / /home/alice rw - zfs rpool/alice rw
71 22 0:50 /proj /srv/proj rw - zfs rpool/alice rw
";
        assert_eq!(
            MountTable::of(info).aliases(Path::new("/home")),
            [PathBuf::from("/srv/proj")]
        );
        // A project bound on its own name is no other name; nor is every bind of the
        // host's root file system one of `/run` when that is shown on `/run/host`.
        let info = "\
22 1 0:40 / / rw - overlay overlay rw
72 22 253:0 /home/alice/proj /home/alice/proj rw - ext4 /dev/vda1 rw
73 22 0:25 / /run rw - tmpfs tmpfs rw
74 73 253:0 / /run/host rw - ext4 /dev/vda1 rw
75 22 253:0 /etc/hosts /etc/hosts rw - ext4 /dev/vda1 rw
";
        let aliases = |p: &str| MountTable::of(info).aliases(Path::new(p));
        // (The project shown below `/run/host` is one, rightly: the same directory.)
        assert_eq!(
            aliases("/home"),
            [PathBuf::from("/run/host/home/alice/proj")]
        );
        assert!(aliases("/run").is_empty(), "{:?}", aliases("/run"));
    }

    #[test]
    fn a_chroots_kernel_file_systems_below_a_place_are_no_other_names_of_it() {
        // A build chroot below `/tmp` with the host's `/proc`, `/sys` and `/dev`
        // mounted in it (as schroot does below `/run/schroot`), and a scratch tmpfs of
        // its that is also bound elsewhere.
        let info = "\
22 1 253:0 / / rw - ext4 /dev/vda1 rw
23 22 0:5 / /dev rw,nosuid - devtmpfs udev rw
24 23 0:24 / /dev/pts rw - devpts devpts rw
25 22 0:22 / /proc rw - proc proc rw
26 22 0:21 / /sys rw - sysfs sysfs rw
27 26 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw
80 22 0:22 / /tmp/chroot/proc rw - proc proc rw
81 22 0:5 / /tmp/chroot/dev rw - devtmpfs udev rw
82 81 0:24 / /tmp/chroot/dev/pts rw - devpts devpts rw
83 22 0:21 / /tmp/chroot/sys rw - sysfs sysfs rw
84 83 0:26 / /tmp/chroot/sys/fs/cgroup rw - cgroup2 cgroup2 rw
85 22 0:60 / /tmp/chroot/scratch rw - tmpfs tmpfs rw
86 22 0:60 / /srv/scratch rw - tmpfs tmpfs rw
";
        let aliases = |p: &str| MountTable::of(info).aliases(Path::new(p));
        // (cgroup2 is one: a delegated cgroup below it can be anyone's.)
        assert_eq!(
            aliases("/tmp"),
            [
                PathBuf::from("/sys/fs/cgroup"),
                PathBuf::from("/srv/scratch")
            ]
        );
        // A place on one of them still has its other names there.
        assert_eq!(aliases("/proc/1"), [PathBuf::from("/tmp/chroot/proc/1")]);
    }

    #[test]
    fn fuse_file_systems_are_the_users() {
        let info = "\
22 1 253:0 / / ro,relatime - erofs /dev/mapper/root ro
60 22 0:70 / /home/dev/mnt rw,nosuid,nodev - fuse.sshfs dev@host:/ rw,user_id=1000
61 22 0:71 / /home/dev/raw rw,nosuid,nodev - fuse /dev/fuse rw,user_id=1000
62 22 0:72 / /home/dev/fusectl rw - fusectl fusectl rw
";
        let table = MountTable::of(info);
        assert!(table.on_user_file_system(Path::new("/home/dev/mnt/etc/l")));
        assert!(table.on_user_file_system(Path::new("/home/dev/raw")));
        assert!(!table.on_user_file_system(Path::new("/home/dev/fusectl/x")));
        assert!(!table.on_user_file_system(Path::new("/home/dev/other")));
    }

    #[test]
    fn only_roots_links_are_followed_for_root() {
        use std::os::unix::fs::{PermissionsExt, symlink};
        let dir = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
        // root's link in root's directory, as /home -> var/home.
        std::fs::create_dir_all(base.join("var/home/dev/proj")).unwrap();
        symlink("var/home", base.join("home")).unwrap();
        let (real, exists) = resolve_trusted(&base.join("home/dev/proj"));
        assert_eq!(real, base.join("var/home/dev/proj"));
        assert!(exists);
        let (real, exists) = resolve_trusted(&base.join("home/dev/proj/missing/x"));
        assert_eq!(real, base.join("var/home/dev/proj/missing/x"));
        assert!(!exists);
        // A link in a directory others may write (a user's, here 0777) is not followed,
        // wherever it leads, nor is anything after it.
        let open = base.join("var/home/dev");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        symlink("/", open.join("evil")).unwrap();
        let (real, exists) = resolve_trusted(&base.join("home/dev/evil/etc"));
        assert_eq!(real, base.join("var/home/dev/evil/etc"));
        assert!(!exists);
        // A link owned by someone else is not followed either (when the test runs as
        // root, hand one over).
        if nix::unistd::geteuid().is_root() {
            std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
            let theirs = open.join("theirs");
            symlink("/", &theirs).unwrap();
            nix::unistd::fchownat(
                nix::fcntl::AT_FDCWD,
                &theirs,
                Some(nix::unistd::Uid::from_raw(65534)),
                None,
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .unwrap();
            let (real, exists) = resolve_trusted(&theirs.join("etc"));
            assert_eq!(real, theirs.join("etc"));
            assert!(!exists);
        }
    }

    #[test]
    fn normalisation_removes_dots_and_slashes() {
        for (input, want) in [
            ("//", "/"),
            ("/.", "/"),
            ("/a/./b//c/", "/a/b/c"),
            ("/a/../../b", "/b"),
            ("/usr/../proc/self/cwd/ls", "/proc/self/cwd/ls"),
        ] {
            assert_eq!(normalize(Path::new(input)), Path::new(want), "{input}");
        }
    }

    #[test]
    fn paths_through_proc_lead_where_the_sandbox_would_go() {
        let cwd = Path::new("/home/dev/p");
        assert_eq!(
            through_proc(Path::new("/proc/2/root/boot/x"), cwd),
            Some("/boot/x".into())
        );
        assert_eq!(
            through_proc(Path::new("/proc/self/root"), cwd),
            Some("/".into())
        );
        assert_eq!(
            through_proc(Path::new("/proc/self/cwd/../q"), cwd),
            Some("/home/dev/q".into())
        );
        assert_eq!(
            through_proc(Path::new("/proc/1/fd/3"), cwd),
            Some("/proc/1/fd/3".into())
        );
        assert_eq!(through_proc(Path::new("/proc/cpuinfo"), cwd), None);
        assert_eq!(through_proc(Path::new("/usr/bin"), cwd), None);
    }

    #[test]
    fn symlinks_are_resolved_in_the_existing_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let real = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir(real.join("target")).unwrap();
        std::os::unix::fs::symlink(real.join("target"), real.join("link")).unwrap();
        assert_eq!(
            resolve_existing(&real.join("link/new/file")),
            real.join("target/new/file")
        );
    }

    #[test]
    fn secrets_expand_and_match_both_spellings() {
        let dir = tempfile::tempdir().unwrap();
        let home = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir(home.join("keys")).unwrap();
        std::os::unix::fs::symlink(home.join("keys"), home.join(".ssh")).unwrap();
        let secrets = expand_secrets(&["~/.ssh".into(), "/etc/shadow".into()], &home);
        assert!(secrets.contains(&home.join(".ssh")));
        assert!(secrets.contains(&home.join("keys")));
        assert_eq!(
            secret_of(&[&home.join("keys/id_rsa")], &secrets),
            Some(home.join("keys"))
        );
        assert_eq!(secret_of(&[&home.join("notes")], &secrets), None);
    }
}
