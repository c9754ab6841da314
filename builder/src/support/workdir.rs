//! Scratch directories that hold a lock while in use, so that what a killed run left
//! behind can be told from what a running one still uses, and removed by the next run.
//!
//! Two kinds use this: a build's work directories (`.build-*`, next to where their
//! result goes, which they are renamed to in one step) and a boot's scratch
//! directories in the temporary directory (`devos-boot-*`, `devos-test-*`). Each holds
//! a [`LOCK`] file, `flock`ed for as long as the directory is in use. A directory whose
//! lock can be taken is stale: nothing uses it any more. A directory without a lock
//! file (a boot's kept with `--keep-vm`, one on a file system without locks) is never
//! removed.

use std::fs::{self, File};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rustix::fs::{FlockOperation, Mode, OFlags};

/// The lock file in a scratch directory.
pub(crate) const LOCK: &str = "lock";
/// The prefix of a build's work directories.
const WORK_PREFIX: &str = ".build-";

/// A scratch directory's lock, held while this value lives (and, when taken with
/// [`DirLock::take_for_children`], while a child process started meanwhile lives).
#[derive(Debug)]
pub(crate) struct DirLock {
    _file: File,
}

impl DirLock {
    /// Lock the new directory `dir`.
    pub(crate) fn take(dir: &Path) -> Result<Self> {
        Self::take_as(dir, false)
    }

    /// Lock the new directory `dir`, and hand the lock to every child process started
    /// while it is held: the directory stays in use while a VM runs, even if this
    /// process is killed.
    pub(crate) fn take_for_children(dir: &Path) -> Result<Self> {
        Self::take_as(dir, true)
    }

    /// The lock is taken on a file of another name and then renamed into place, so
    /// that a sweep never sees the lock file unlocked.
    fn take_as(dir: &Path, inherited: bool) -> Result<Self> {
        let path = dir.join(LOCK);
        let new = dir.join(format!("{LOCK}.new"));
        let file = File::create(&new)
            .with_context(|| format!("cannot create the lock file {}", new.display()))?;
        rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive)
            .with_context(|| format!("cannot lock {}", new.display()))?;
        if inherited {
            rustix::io::fcntl_setfd(&file, rustix::io::FdFlags::empty())
                .with_context(|| format!("cannot hand the lock {} on", new.display()))?;
        }
        fs::rename(&new, &path)
            .with_context(|| format!("cannot rename {} to {LOCK}", new.display()))?;
        Ok(Self { _file: file })
    }
}

/// A build's work directory next to where its result goes, locked while the build
/// runs, so that [`remove_stale_work_dirs`] can tell a killed build's leftovers from a
/// running build's work.
pub(crate) struct WorkDir {
    dir: tempfile::TempDir,
    _lock: DirLock,
}

impl WorkDir {
    pub(crate) fn new(parent: &Path) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(WORK_PREFIX)
            .tempdir_in(parent)
            .with_context(|| format!("cannot create a work directory in {}", parent.display()))?;
        let lock = DirLock::take(dir.path())?;
        Ok(Self { dir, _lock: lock })
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Rename the directory to `dest` in one step. If `dest` already exists (another
    /// build made the same thing), keep that one and drop this; any other failure to
    /// rename is an error.
    pub(crate) fn persist(self, dest: &Path) -> Result<()> {
        // Removed while still held: a sweep that opened it before finds it has no
        // name any more and leaves the directory alone.
        let lock = self.dir.path().join(LOCK);
        fs::remove_file(&lock).with_context(|| format!("cannot remove {}", lock.display()))?;
        let path = self.dir.keep();
        let Err(e) = fs::rename(&path, dest) else {
            return Ok(());
        };
        // Without its lock file now, so no sweep would take it: remove it here.
        if let Err(e) = fs::remove_dir_all(&path) {
            tracing::warn!("cannot remove the work directory {}: {e}", path.display());
        }
        if dest.is_dir() {
            return Ok(());
        }
        Err(e).with_context(|| format!("cannot move {} to {}", path.display(), dest.display()))
    }
}

/// What an entry of a directory is, to a sweep.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum State {
    /// A scratch directory of this user that nothing uses: remove it.
    Stale,
    /// A scratch directory whose lock is held: its run (or a VM it started) goes on.
    InUse,
    /// Not ours to judge: another name, a symlink, not a directory, another user's,
    /// or no lock file.
    Other,
}

/// The state of `path` for user `uid`, when scratch directories' names start with one
/// of `prefixes`. With [`State::Stale`], the lock taken to find that out is returned:
/// holding it while removing keeps the directory from being judged by another sweep
/// at the same time.
pub(crate) fn state(path: &Path, prefixes: &[&str], uid: u32) -> (State, Option<File>) {
    use std::os::unix::fs::MetadataExt;
    let other = (State::Other, None);
    let named = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| prefixes.iter().any(|p| n.starts_with(p)));
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

/// Remove the stale scratch directories of this process's user in `parent` whose
/// names start with one of `prefixes`; the ones removed. Failures are warnings:
/// sweeping only frees space, and a run goes on without it.
pub(crate) fn sweep(parent: &Path, prefixes: &[&str]) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Some(uid) = super::paths::effective_uid() else {
        return removed;
    };
    let entries = match fs::read_dir(parent) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return removed,
        Err(e) => {
            tracing::warn!(
                "cannot look in {} for what killed runs left: {e}",
                parent.display()
            );
            return removed;
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let (State::Stale, Some(_lock)) = state(&path, prefixes, uid) else {
            continue;
        };
        // remove_dir_all does not follow symlinks inside the directory, but it would go
        // into what is mounted there (a bind mount of the host's /dev/shm in a killed
        // build's tree): what an older devos-build's killed build left mounted is taken
        // away first, and a directory with anything still mounted in it is left alone.
        if let Err(e) = detach_mounts_under(&path) {
            tracing::warn!(
                "{e:#}; a killed run left {} with this mounted in it, so it stays\n  hint: `umount -R {}` as root, then run again",
                path.display(),
                path.display()
            );
            continue;
        }
        match super::remove::dir_if_present(&path) {
            Ok(()) => removed.push(path),
            Err(e) => tracing::warn!("{e:#}; a killed run left it"),
        }
    }
    removed
}

/// The mount points at or below `dir` (as the kernel names them: `dir` resolved),
/// outermost first.
fn mounts_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let dir = fs::canonicalize(dir).with_context(|| format!("cannot resolve {}", dir.display()))?;
    let info =
        fs::read_to_string("/proc/self/mountinfo").context("cannot read /proc/self/mountinfo")?;
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(devos_agent::risk::paths::unescape_mount_path)
        .filter(|p| p.starts_with(&dir))
        .collect();
    points.sort_by_key(|p| p.components().count());
    Ok(points)
}

/// Take away everything mounted at or below `dir`: each outermost mount made private
/// with what is below it first (an unmount of a shared mount would be passed on to its
/// peers: a bind of the host's /sys would unmount the host's own), then detached with
/// its submounts. An error unless nothing is mounted there afterwards.
fn detach_mounts_under(dir: &Path) -> Result<()> {
    use rustix::mount::{MountPropagationFlags, UnmountFlags};
    let points = mounts_under(dir)?;
    if points.is_empty() {
        return Ok(());
    }
    let outermost = points
        .iter()
        .filter(|p| !points.iter().any(|q| q != *p && p.starts_with(q)));
    for point in outermost {
        // Each is tried; what is left is said below.
        let _ = rustix::mount::mount_change(
            point,
            MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
        )
        .and_then(|()| rustix::mount::unmount(point, UnmountFlags::DETACH));
    }
    match mounts_under(dir)?.first() {
        Some(left) => bail!("cannot unmount {}", left.display()),
        None => Ok(()),
    }
}

/// Remove the work directories in `parent` that builds which were killed left (their
/// lock is free). Directories of builds still running are locked and left alone.
pub(crate) fn remove_stale_work_dirs(parent: &Path) {
    for path in sweep(parent, &[WORK_PREFIX]) {
        tracing::info!("removed {}, left by a killed build", path.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    const PREFIXES: &[&str] = &["devos-boot-", "devos-test-"];

    #[test]
    fn only_unlocked_scratch_directories_of_this_user_are_stale() {
        let tmp = tempfile::tempdir().unwrap();
        let uid = tmp.path().metadata().unwrap().uid();
        let make = |name: &str| {
            let dir = tmp.path().join(name);
            fs::create_dir(&dir).unwrap();
            fs::write(dir.join("overlay.qcow2"), "disk").unwrap();
            dir
        };
        // In use: its lock is held (here by this test, as by a boot or its QEMU).
        let running = make("devos-boot-running");
        let held = DirLock::take_for_children(&running).unwrap();
        assert!(!running.join(format!("{LOCK}.new")).exists());
        assert_eq!(state(&running, PREFIXES, uid).0, State::InUse);
        // Killed: the lock file is there, nobody holds it.
        let killed = make("devos-test-killed");
        drop(DirLock::take(&killed).unwrap());
        assert_eq!(state(&killed, PREFIXES, uid).0, State::Stale);
        // Another user's is not ours to remove.
        assert_eq!(state(&killed, PREFIXES, uid + 1).0, State::Other);
        // No lock file (kept with --keep-vm), another name, a symlink.
        let kept = make("devos-boot-kept");
        assert_eq!(state(&kept, PREFIXES, uid).0, State::Other);
        let foreign = make("someone-else");
        drop(DirLock::take(&foreign).unwrap());
        assert_eq!(state(&foreign, PREFIXES, uid).0, State::Other);
        let link = tmp.path().join("devos-boot-link");
        std::os::unix::fs::symlink(&killed, &link).unwrap();
        assert_eq!(state(&link, PREFIXES, uid).0, State::Other);
        // A lock file that is a symlink is not followed.
        let trap = make("devos-test-trap");
        std::os::unix::fs::symlink(killed.join(LOCK), trap.join(LOCK)).unwrap();
        assert_eq!(state(&trap, PREFIXES, uid).0, State::Other);

        // The sweep removes the killed one only (after the symlink to it, which stays).
        assert_eq!(sweep(tmp.path(), PREFIXES), std::slice::from_ref(&killed));
        assert!(!killed.exists());
        for p in [&running, &kept, &foreign, &trap] {
            assert!(p.exists(), "{}", p.display());
        }
        assert!(link.symlink_metadata().is_ok());
        // Once the run ends, its directory is stale too.
        drop(held);
        assert_eq!(state(&running, PREFIXES, uid).0, State::Stale);
    }

    #[test]
    fn work_dirs_of_killed_builds_go_and_running_and_finished_ones_stay() {
        let images = tempfile::tempdir().unwrap();
        let running = WorkDir::new(images.path()).unwrap();
        let killed = WorkDir::new(images.path()).unwrap();
        // A killed build runs no destructor: its directory stays, its lock is let go.
        let WorkDir { dir, _lock } = killed;
        let killed_path = dir.keep();
        drop(_lock);
        let finished = WorkDir::new(images.path()).unwrap();
        let version = images.path().join("0.1.0+abc");
        fs::write(finished.path().join("disk.raw"), "disk").unwrap();
        finished.persist(&version).unwrap();

        remove_stale_work_dirs(images.path());
        assert!(
            running.path().exists(),
            "a running build's directory must stay"
        );
        assert!(!killed_path.exists(), "a killed build's directory must go");
        assert!(version.join("disk.raw").exists(), "finished versions stay");
        assert!(
            !version.join(LOCK).exists(),
            "a finished version has no lock"
        );
    }

    /// What a build killed mid-way by an older devos-build left mounted in its tree
    /// (mmdebstrap's proc, sys, devpts) is unmounted, and then the directory goes.
    #[test]
    fn a_killed_builds_mounts_are_taken_away_with_its_directory() {
        let images = tempfile::tempdir().unwrap();
        let killed = WorkDir::new(images.path()).unwrap();
        let WorkDir { dir, _lock } = killed;
        let killed_path = dir.keep();
        drop(_lock);
        let tree = killed_path.join("tree with space");
        for inner in ["proc", "dev/pts"] {
            fs::create_dir_all(tree.join(inner)).unwrap();
        }
        let mount = |point: &Path| {
            rustix::mount::mount(
                "devos-test",
                point,
                "tmpfs",
                rustix::mount::MountFlags::empty(),
                None,
            )
            .unwrap_or_else(|e| panic!("mounting a tmpfs needs root: {e}"))
        };
        mount(&tree.join("proc"));
        fs::create_dir(tree.join("proc/sys")).unwrap();
        mount(&tree.join("proc/sys"));
        mount(&tree.join("dev/pts"));
        remove_stale_work_dirs(images.path());
        assert!(!killed_path.exists(), "a killed build's directory must go");
        let left = fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !left.contains(&images.path().display().to_string()),
            "{left}"
        );
    }
}
