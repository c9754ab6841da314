//! Work directories next to where their result goes: locked while their build runs,
//! renamed into place in one step, and swept when a killed build left them.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

/// A temporary directory next to where its result goes, locked while its owner runs,
/// so that [`remove_stale_work_dirs`] can tell a killed build's leftovers from a
/// running build's work.
pub(crate) struct WorkDir {
    dir: tempfile::TempDir,
    _lock: fs::File,
}

impl WorkDir {
    pub(crate) fn new(parent: &Path) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(WORK_PREFIX)
            .tempdir_in(parent)
            .with_context(|| format!("cannot create a work directory in {}", parent.display()))?;
        let lock = fs::File::create(dir.path().join(WORK_LOCK))?;
        lock.lock()?;
        Ok(Self { dir, _lock: lock })
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Rename the directory to `dest` in one step. If `dest` already exists (another
    /// build made the same thing), keep that one and drop this; any other failure to
    /// rename is an error.
    pub(crate) fn persist(self, dest: &Path) -> Result<()> {
        let lock = self.dir.path().join(WORK_LOCK);
        fs::remove_file(&lock).with_context(|| format!("cannot remove {}", lock.display()))?;
        let path = self.dir.keep();
        let Err(e) = fs::rename(&path, dest) else {
            return Ok(());
        };
        // Unlocked now, so no sweep would take it: say it is left behind.
        if let Err(e) = fs::remove_dir_all(&path) {
            tracing::warn!("cannot remove the work directory {}: {e}", path.display());
        }
        if dest.is_dir() {
            return Ok(());
        }
        Err(e).with_context(|| format!("cannot move {} to {}", path.display(), dest.display()))
    }
}

const WORK_PREFIX: &str = ".build-";
const WORK_LOCK: &str = "lock";

/// Remove work directories left by builds that were killed (their lock is free).
/// Directories of builds still running are locked and left alone.
pub(crate) fn remove_stale_work_dirs(images: &Path) {
    // Sweeping only frees space: a build goes on without it.
    let entries = match fs::read_dir(images) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            tracing::warn!(
                "cannot look for work directories of killed builds in {}: {e}",
                images.display()
            );
            return;
        }
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let stale = entry.file_name().to_string_lossy().starts_with(WORK_PREFIX)
            && fs::File::open(dir.join(WORK_LOCK)).is_ok_and(|f| f.try_lock().is_ok());
        if stale {
            tracing::info!("removing {} left by a killed build", dir.display());
            if let Err(e) = fs::remove_dir_all(&dir) {
                tracing::warn!("cannot remove {}: {e}", dir.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_work_dirs_go_and_live_ones_stay() {
        let images = tempfile::tempdir().unwrap();
        let live = images.path().join(".build-live");
        let dead = images.path().join(".build-dead");
        let done = images.path().join("0.1.0+abc");
        for d in [&live, &dead, &done] {
            fs::create_dir(d).unwrap();
            fs::write(d.join(WORK_LOCK), "").unwrap();
        }
        let held = fs::File::open(live.join(WORK_LOCK)).unwrap();
        held.lock().unwrap();
        remove_stale_work_dirs(images.path());
        assert!(live.exists(), "a running build's directory must stay");
        assert!(!dead.exists(), "a killed build's directory must go");
        assert!(done.exists(), "finished versions are never touched");
    }
}
