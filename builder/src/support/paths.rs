//! Whose home a command works for. Builds run as root (mmdebstrap's root mode,
//! files owned by the image's users, chroots); run through sudo, the files a user looks for afterwards (their SSH keys,
//! their registry) are in the home of the user who ran sudo, not in root's.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

/// The home of the user who ran this command: under sudo (as root, with
/// `SUDO_USER` naming another user), that user's home from the password database;
/// otherwise `$HOME`.
pub(crate) fn invoking_home() -> Option<PathBuf> {
    // Asked of the name service once per process: the registry and cache paths and
    // every hand-over need it.
    static SUDO_HOME: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    match sudo_user() {
        Some(user) => SUDO_HOME
            .get_or_init(|| passwd_entry(&user).and_then(|line| home_of(&user, &line)))
            .clone(),
        None => std::env::var_os("HOME").map(PathBuf::from),
    }
}

/// `user`'s passwd(5) line from the name service (files, LDAP, SSSD: `getent`).
fn passwd_entry(user: &str) -> Option<String> {
    let out = std::process::Command::new("getent")
        .args(["passwd", "--", user])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The user who ran sudo, when this process is root because of it.
pub(crate) fn sudo_user() -> Option<String> {
    if !is_root() {
        return None;
    }
    std::env::var("SUDO_USER")
        .ok()
        .filter(|u| !u.is_empty() && u != "root")
}

/// The uid and primary gid of the user who ran sudo (`SUDO_UID`, `SUDO_GID`), when
/// this process is root because of it.
pub(crate) fn sudo_ids() -> Option<(u32, u32)> {
    sudo_user()?;
    let id = |var: &str| std::env::var(var).ok()?.parse::<u32>().ok();
    Some((id("SUDO_UID")?, id("SUDO_GID")?))
}

/// This process's effective uid (/proc/self belongs to it).
pub(crate) fn effective_uid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

/// The uid of the user a command works for: under sudo, the user who ran it; else
/// this process's own.
pub(crate) fn acting_uid() -> Option<u32> {
    sudo_ids().map(|(uid, _)| uid).or_else(effective_uid)
}

/// Whether this process runs as root (builds need it: mmdebstrap, chroots, the
/// image's file ownership).
pub(crate) fn is_root() -> bool {
    effective_uid() == Some(0)
}

/// Whether `uid` is one of the users a command works for: root, this process's user,
/// or the user who ran sudo.
pub(crate) fn is_own_uid(uid: u32) -> bool {
    uid == 0 || Some(uid) == effective_uid() || sudo_ids().is_some_and(|(u, _)| u == uid)
}

/// An XDG base directory of the invoking user: `$VAR` (not under sudo, where it
/// would be root's or sudo's environment), else `~/FALLBACK` of the invoking user,
/// else `system` (no home at all).
pub(crate) fn xdg_dir(var: &str, fallback: &str, system: &str) -> PathBuf {
    if sudo_user().is_none()
        && let Some(d) = std::env::var_os(var).filter(|d| !d.is_empty())
    {
        return PathBuf::from(d);
    }
    invoking_home().map_or_else(|| PathBuf::from(system), |h| h.join(fallback))
}

/// Give `path` to the user who ran sudo (their uid and primary gid), when this is
/// root under sudo and the directory it lies in is theirs: the registry and the
/// cache's directory live in that user's home and must stay theirs. A registry or
/// cache named elsewhere (`--registry /srv/...`) keeps its owner. Judged on the
/// directory as opened, never on how the path is spelled, and never through a link:
/// swapping a directory of the path for a link cannot point it at anything else.
pub(crate) fn hand_over(path: &Path) -> std::io::Result<()> {
    if sudo_ids().is_none() {
        return Ok(());
    }
    let (Some(name), parent) = (path.file_name(), parent_of(path)) else {
        return Ok(());
    };
    match open_dir(parent) {
        Ok(dir) => give_in(&dir, name),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// The topmost file or directory on the way from the invoking user's home down to
/// `path` that is not `uid`'s: what `chown -R` gives back. None when every one is
/// theirs, when `path` is not in that home, or when a link is on the way (what a link
/// leads to is not the home's to give).
pub(crate) fn foreign_above(path: &Path, uid: u32) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let home = invoking_home()?;
    let below = path.strip_prefix(&home).ok()?;
    let mut at = home;
    for part in below.components() {
        let std::path::Component::Normal(part) = part else {
            return None;
        };
        at.push(part);
        let meta = at.symlink_metadata().ok()?;
        if meta.file_type().is_symlink() {
            return None;
        }
        if meta.uid() != uid {
            return Some(at);
        }
    }
    None
}

/// Under sudo, warn when `path` (`what`: "the registry", ...) stays root's in the
/// invoking user's home: the directory it lies in (as opened, as [`hand_over`] judges
/// it) is not theirs, because something above it there is root's (a `~/.local` an
/// older tool made as root). Names the `chown` that gives it back, the same
/// [`foreign_above`] target the user's own refused run names.
pub(crate) fn warn_if_kept(path: &Path, what: &str) {
    let Some((uid, _)) = sudo_ids() else {
        return;
    };
    let theirs = open_dir(parent_of(path))
        .and_then(|dir| Ok(rustix::fs::fstat(&dir)?.st_uid == uid))
        .unwrap_or(true);
    let Some(top) = foreign_above(path, uid).filter(|_| !theirs) else {
        return;
    };
    let user = sudo_user().unwrap_or_default();
    eprintln!(
        "warning: {what} {} stays root's: {} in {user}'s home is not theirs, so nothing made under it is given to them, and their own runs without sudo cannot write it\n  hint: sudo chown -R {user}: {}",
        path.display(),
        top.display(),
        crate::support::cmd::quote(top.as_os_str())
    );
}

/// The name of user `uid` from the name service.
pub(crate) fn passwd_name(uid: u32) -> Option<String> {
    let line = passwd_entry(&uid.to_string())?;
    let fields: Vec<&str> = line.trim_end().split(':').collect();
    (fields.get(2) == Some(&uid.to_string().as_str())).then(|| fields[0].to_owned())
}

/// The longest part of `dir` that exists (empty: the working directory): what
/// [`create_user_dirs_made`] makes is below it.
pub(crate) fn nearest_existing(dir: &Path) -> &Path {
    dir.ancestors()
        .find(|d| d.as_os_str().is_empty() || d.exists())
        .unwrap_or(Path::new("/"))
}

/// The directory `path` lies in (`.` for a bare name).
pub(crate) fn parent_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// A handle of the directory `dir` (links on the way followed: what matters is what it is).
pub(crate) fn open_dir(dir: &Path) -> std::io::Result<OwnedFd> {
    use rustix::fs::{CWD, Mode, OFlags};
    Ok(rustix::fs::openat(
        CWD,
        dir,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// The sudo user, when `dir` (a handle) is theirs.
fn owner_is_sudo_user(dir: &impl std::os::fd::AsFd) -> std::io::Result<Option<(u32, u32)>> {
    let Some((uid, gid)) = sudo_ids() else {
        return Ok(None);
    };
    Ok((rustix::fs::fstat(dir)?.st_uid == uid).then_some((uid, gid)))
}

/// Give the entry `name` of the directory `dir` to the sudo user when the directory
/// is theirs: the entry itself, opened without following a link, and never a file
/// with other names (a hard link the user made to a file elsewhere stays as it is).
fn give_in(dir: &OwnedFd, name: &std::ffi::OsStr) -> std::io::Result<()> {
    use rustix::fs::{AtFlags, FileType, Gid, Mode, OFlags, Uid};
    let Some((uid, gid)) = owner_is_sudo_user(dir)? else {
        return Ok(());
    };
    let entry = match rustix::fs::openat(
        dir,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        // Nothing there (a database's journal already gone): nothing to give.
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let stat = rustix::fs::fstat(&entry)?;
    if FileType::from_raw_mode(stat.st_mode) != FileType::Directory && stat.st_nlink > 1 {
        return Ok(());
    }
    Ok(rustix::fs::chownat(
        &entry,
        "",
        Some(Uid::from_raw(uid)),
        Some(Gid::from_raw(gid)),
        AtFlags::EMPTY_PATH,
    )?)
}

/// Like [`create_user_dirs`]; also says whether `dir` itself was made by this call.
pub(crate) fn create_user_dirs_made(dir: &Path) -> anyhow::Result<(std::fs::File, bool)> {
    use anyhow::Context as _;
    use rustix::fs::{Mode, OFlags};
    let cannot = |e: std::io::Error| {
        anyhow::Error::from(e).context(format!("cannot create {}", dir.display()))
    };
    let existing = nearest_existing(dir);
    let mut handle = open_dir(if existing.as_os_str().is_empty() {
        Path::new(".")
    } else {
        existing
    })
    .map_err(cannot)?;
    let mut made = false;
    // The missing part as `mkdir -p` meets it: `..` is the parent of the directory
    // just made or opened, as the kernel will resolve the path later.
    for part in dir
        .strip_prefix(existing)
        .unwrap_or(Path::new(""))
        .components()
    {
        let name = match part {
            std::path::Component::Normal(name) => name,
            std::path::Component::CurDir => continue,
            std::path::Component::ParentDir => {
                handle = rustix::fs::openat(
                    &handle,
                    "..",
                    OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| cannot(e.into()))?;
                made = false;
                continue;
            }
            _ => anyhow::bail!("cannot create {}: it is not a relative part", dir.display()),
        };
        made = match rustix::fs::mkdirat(&handle, name, Mode::from_raw_mode(0o755)) {
            Ok(()) => {
                give_in(&handle, name).with_context(|| {
                    format!(
                        "cannot give {} (in {}) to the sudo user",
                        name.to_string_lossy(),
                        dir.display()
                    )
                })?;
                true
            }
            Err(rustix::io::Errno::EXIST) => false,
            Err(e) => return Err(cannot(e.into())),
        };
        handle = rustix::fs::openat(
            &handle,
            name,
            OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| cannot(e.into()))?;
    }
    Ok((std::fs::File::from(handle), made))
}

/// Create `dir` and its missing parents, one at a time through the handle of the one
/// above (a link put in their place is not followed); under sudo, each one it makes in
/// a directory of the invoking user's is given to them ([`hand_over`]). Returns a
/// handle of `dir`.
pub(crate) fn create_user_dirs(dir: &Path) -> anyhow::Result<std::fs::File> {
    Ok(create_user_dirs_made(dir)?.0)
}

/// Write `content` to `dest` whole or not at all, with `mode` whatever the umask:
/// into a temporary file of its own in the same directory, made through the
/// directory's handle (never through a link, never another writer's file), synced,
/// then renamed over `dest` in that same directory (a link there is replaced, not
/// followed); under sudo, given to the invoking user when the directory is theirs.
pub(crate) fn replace_file(
    dest: &Path,
    content: &mut dyn std::io::Read,
    mode: u32,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let dir =
        open_dir(parent_of(dest)).with_context(|| format!("cannot write {}", dest.display()))?;
    replace_in(&dir, dest, content, mode)
}

/// The random part of [`replace_in`]'s temporary names (`.FILE.XXXXXX.tmp`).
const REPLACING_RANDOM: usize = 6;

/// The file a temporary file of [`replace_in`] named `name` was to replace, if `name`
/// is one (what a write cut short leaves beside that file).
pub(crate) fn replacing(name: &str) -> Option<&str> {
    let middle = name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let (file, random) = middle.rsplit_once('.')?;
    (random.len() == REPLACING_RANDOM && random.chars().all(|c| c.is_ascii_alphanumeric()))
        .then_some(file)
}

/// How long a temporary file of [`replace_in`] (or of a hook that names its files
/// the same way) stays untouched before it is taken for what a write cut short left:
/// one being written is touched all along, but a writer this process does not see (a
/// publish from another registry, a build with another cache lock) may sync a large
/// file for a while. Until then a leftover is its writer's alone (0600), never used.
pub(crate) const LEFTOVER_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Remove from the directory `dir` the regular files whose names `leftover` accepts
/// and that were untouched for [`LEFTOVER_AGE`]; the names removed. `what` names the
/// directory in errors.
pub(crate) fn sweep_leftovers(
    dir: &impl std::os::fd::AsFd,
    what: &Path,
    leftover: impl Fn(&str) -> bool,
) -> anyhow::Result<Vec<String>> {
    use rustix::fs::{AtFlags, FileType};
    let cannot = |e: rustix::io::Errno| {
        anyhow::Error::from(std::io::Error::from(e))
            .context(format!("cannot list {}", what.display()))
    };
    let now = std::time::SystemTime::now();
    let mut removed = Vec::new();
    for entry in rustix::fs::Dir::read_from(dir).map_err(cannot)? {
        let entry = entry.map_err(cannot)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !leftover(&name) {
            continue;
        }
        let Ok(stat) = rustix::fs::statat(dir, entry.file_name(), AtFlags::SYMLINK_NOFOLLOW) else {
            continue;
        };
        let modified = std::time::UNIX_EPOCH
            + std::time::Duration::from_secs(u64::try_from(stat.st_mtime).unwrap_or(0));
        let untouched = now.duration_since(modified).unwrap_or_default();
        if FileType::from_raw_mode(stat.st_mode) == FileType::RegularFile
            && untouched >= LEFTOVER_AGE
            && rustix::fs::unlinkat(dir, entry.file_name(), AtFlags::empty()).is_ok()
        {
            removed.push(name);
        }
    }
    Ok(removed)
}

/// [`replace_file`] for file `dest`'s name in the directory `dir` already opened
/// (`dest` names it in messages; nothing is resolved through it).
pub(crate) fn replace_in(
    dir: &impl std::os::fd::AsFd,
    dest: &Path,
    content: &mut dyn std::io::Read,
    mode: u32,
) -> anyhow::Result<()> {
    use rustix::fs::{AtFlags, Mode, OFlags};
    let Some(name) = dest.file_name() else {
        anyhow::bail!("cannot write {}: it names no file", dest.display());
    };
    // A random name of its own (tempfile picks it and tries again while taken), made
    // through the directory's handle: another writer's file there is neither used nor
    // removed.
    let (mut out, tmp) = tempfile::Builder::new()
        .prefix(&format!(".{}.", name.to_string_lossy()))
        .rand_bytes(REPLACING_RANDOM)
        .suffix(".tmp")
        .make_in(parent_of(dest), |path| {
            let fd = rustix::fs::openat(
                dir,
                path.file_name().unwrap_or_default(),
                OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::WRONLY | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )?;
            Ok(std::fs::File::from(fd))
        })
        .and_then(|f| f.keep().map_err(|e| e.error))
        .map_err(|e| anyhow::Error::from(e).context(format!("cannot write {}", dest.display())))?;
    let tmp = tmp.file_name().unwrap_or_default().to_owned();
    let mut write = || -> std::io::Result<()> {
        std::io::copy(content, &mut out)?;
        // On disk before its name is: a crash leaves the old file or the whole new one.
        out.sync_all()?;
        // Its mode (and owner) only now: a write cut short leaves a file only its
        // writer reads, never half a file a web server would serve.
        rustix::fs::fchmod(&out, Mode::from_raw_mode(mode))?;
        if let Some((uid, gid)) = owner_is_sudo_user(dir)? {
            rustix::fs::fchown(
                &out,
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(gid)),
            )?;
        }
        Ok(rustix::fs::renameat(dir, &tmp, dir, name)?)
    };
    write().map_err(|e| {
        let _ = rustix::fs::unlinkat(dir, &tmp, AtFlags::empty());
        anyhow::Error::from(e).context(format!("cannot write {}", dest.display()))
    })
}

/// `user`'s home in a passwd(5) file.
fn home_of(user: &str, passwd: &str) -> Option<PathBuf> {
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 7 && f[0] == user)
        .map(|f| PathBuf::from(f[5]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn home_comes_from_the_users_own_line() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000:Alice:/home/alice:/bin/bash\nmalice:x:1001:1001::/home/m:/bin/sh\n";
        assert_eq!(home_of("alice", passwd), Some(PathBuf::from("/home/alice")));
        assert_eq!(home_of("ali", passwd), None);
        assert_eq!(home_of("bob", passwd), None);
    }
}
