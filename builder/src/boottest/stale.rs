//! Boot scratch directories (`devos-boot-*`, `devos-test-*` in the temporary
//! directory) that a killed run left behind, found and removed by the next boot.
//!
//! Each scratch directory holds a lock file, `flock`ed for as long as the directory is
//! in use (its descriptor is inherited by QEMU and the other programs a boot runs; QEMU
//! dies with devos-build). A directory whose lock can be taken is stale: nothing uses
//! it any more. A directory without a lock file (one made with `--keep-vm`, on a file
//! system without locks, or by an older devos-build) is never removed.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rustix::fs::{FlockOperation, Mode, OFlags};

/// The lock file in a scratch directory.
pub(super) const LOCK: &str = ".devos-lock";
/// The prefixes of the scratch directories a boot makes.
pub(super) const PREFIXES: &[&str] = &["devos-boot-", "devos-test-"];

/// A scratch directory's lock, held while this value (or a process that inherited
/// its descriptor, such as QEMU) lives.
#[derive(Debug)]
pub(super) struct DirLock {
    _file: File,
}

impl DirLock {
    /// Lock the new directory `dir`. The lock is taken on a file of another name and
    /// then renamed into place, so a sweeper never sees the lock file unlocked.
    pub(super) fn take(dir: &Path) -> Result<Self> {
        let path = dir.join(LOCK);
        let new = dir.join(format!("{LOCK}.new"));
        let file = File::create(&new)
            .with_context(|| format!("cannot create the lock file {}", new.display()))?;
        rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive)
            .with_context(|| format!("cannot lock {}", new.display()))?;
        // QEMU (and every other child) inherits the locked descriptor: the directory
        // stays in use while the VM runs, even if this process is killed.
        rustix::io::fcntl_setfd(&file, rustix::io::FdFlags::empty())
            .with_context(|| format!("cannot hand the lock {} to the VM", new.display()))?;
        std::fs::rename(&new, &path)
            .with_context(|| format!("cannot rename {} to {LOCK}", new.display()))?;
        Ok(Self { _file: file })
    }
}

/// What a directory in the temporary directory is, to a sweep.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum State {
    /// A scratch directory of this user that nothing uses: remove it.
    Stale,
    /// A scratch directory whose lock is held: a boot (or its QEMU) still runs.
    InUse,
    /// Not ours to judge: another name, a symlink, not a directory, another user's,
    /// or no lock file (kept with --keep-vm, or from an older devos-build).
    Other,
}

/// The state of `path` for a user `uid`. With [`State::Stale`], the lock taken to
/// find that out is returned: holding it while removing keeps the directory from
/// being judged by another sweep at the same time.
pub(super) fn state(path: &Path, uid: u32) -> (State, Option<File>) {
    use std::os::unix::fs::MetadataExt;
    let other = (State::Other, None);
    let named = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| PREFIXES.iter().any(|p| n.starts_with(p)));
    if !named {
        return other;
    }
    // The entry itself, never what a symlink points to.
    let Ok(meta) = path.symlink_metadata() else {
        return other;
    };
    if !meta.file_type().is_dir() || meta.uid() != uid {
        return other;
    }
    let nofollow = OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let Ok(dir) = rustix::fs::open(
        path,
        OFlags::DIRECTORY | OFlags::RDONLY | nofollow,
        Mode::empty(),
    ) else {
        return other;
    };
    let Ok(lock) = rustix::fs::openat(&dir, LOCK, OFlags::RDONLY | nofollow, Mode::empty()) else {
        return other;
    };
    let lock = File::from(lock);
    if rustix::fs::flock(lock.as_fd(), FlockOperation::NonBlockingLockExclusive).is_err() {
        return (State::InUse, None);
    }
    // Still the directory's lock file: not one its owner removed (and so unlocked)
    // between our open and our lock, on its way out.
    let held = rustix::fs::fstat(&lock);
    let named = rustix::fs::statat(&dir, LOCK, rustix::fs::AtFlags::SYMLINK_NOFOLLOW);
    match (held, named) {
        (Ok(h), Ok(n)) if h.st_nlink > 0 && (h.st_dev, h.st_ino) == (n.st_dev, n.st_ino) => {
            (State::Stale, Some(lock))
        }
        _ => other,
    }
}

/// Remove the stale scratch directories of user `uid` in `parent`; the ones removed.
/// Failures are warnings: a sweep never stops a boot.
pub(super) fn sweep(parent: &Path, uid: u32) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(parent) else {
        return removed;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let (State::Stale, Some(_lock)) = state(&path, uid) else {
            continue;
        };
        // remove_dir_all does not follow symlinks inside the directory.
        match crate::support::remove::dir_if_present(&path) {
            Ok(()) => removed.push(path),
            Err(e) => tracing::warn!("a boot left {} behind: {e:#}", path.display()),
        }
    }
    removed
}

/// Before a boot: remove what killed boots of this user left in the temporary
/// directory.
pub(super) fn sweep_temp_dir() {
    let Some(uid) = crate::support::paths::effective_uid() else {
        return;
    };
    for path in sweep(&std::env::temp_dir(), uid) {
        tracing::info!("removed {}, left by a boot that was killed", path.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn only_unlocked_scratch_directories_of_this_user_are_stale() {
        let tmp = tempfile::tempdir().unwrap();
        let uid = tmp.path().metadata().unwrap().uid();
        let make = |name: &str| {
            let dir = tmp.path().join(name);
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(dir.join("overlay.qcow2"), "disk").unwrap();
            dir
        };
        // In use: its lock is held (here by this test, as by a boot or its QEMU).
        let running = make("devos-boot-running");
        let held = DirLock::take(&running).unwrap();
        assert!(!running.join(format!("{LOCK}.new")).exists());
        assert_eq!(state(&running, uid).0, State::InUse);
        // Killed: the lock file is there, nobody holds it.
        let killed = make("devos-test-killed");
        drop(DirLock::take(&killed).unwrap());
        assert_eq!(state(&killed, uid).0, State::Stale);
        // Another user's is not ours to remove.
        assert_eq!(state(&killed, uid + 1).0, State::Other);
        // No lock file (kept with --keep-vm, or an older devos-build's), another name,
        // a symlink.
        let old = make("devos-boot-old");
        assert_eq!(state(&old, uid).0, State::Other);
        let foreign = make("someone-else");
        drop(DirLock::take(&foreign).unwrap());
        assert_eq!(state(&foreign, uid).0, State::Other);
        let link = tmp.path().join("devos-boot-link");
        std::os::unix::fs::symlink(&killed, &link).unwrap();
        assert_eq!(state(&link, uid).0, State::Other);
        // A lock file that is a symlink is not followed.
        let trap = make("devos-test-trap");
        std::os::unix::fs::symlink(killed.join(LOCK), trap.join(LOCK)).unwrap();
        assert_eq!(state(&trap, uid).0, State::Other);

        // The sweep removes the killed one only (after the symlink to it, which stays).
        assert_eq!(sweep(tmp.path(), uid), std::slice::from_ref(&killed));
        assert!(!killed.exists());
        for p in [&running, &old, &foreign, &trap] {
            assert!(p.exists(), "{}", p.display());
        }
        assert!(link.symlink_metadata().is_ok());
        // Once the boot ends, its directory is stale too.
        drop(held);
        assert_eq!(state(&running, uid).0, State::Stale);
    }
}
