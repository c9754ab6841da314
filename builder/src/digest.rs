//! Hashing and file-tree helpers shared by the stages.

use std::fs;
use std::io::Read;
use std::path::Path;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

/// Hex sha256 of a file's contents.
pub fn file_sha256(path: &Path) -> std::io::Result<String> {
    let mut file = fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Set every regular file's and directory's mtime under `root` to at most `epoch`
/// (symlinks are left alone: std cannot set their times without following them).
pub fn clamp_mtimes(root: &Path, epoch: u64) -> std::io::Result<()> {
    let limit = SystemTime::UNIX_EPOCH + Duration::from_secs(epoch);
    let mut stack = vec![root.to_path_buf()];
    let mut dirs = Vec::new();
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let ty = entry.file_type()?;
            if ty.is_dir() {
                stack.push(entry.path());
            } else if ty.is_file() {
                let file = fs::File::options().write(true).open(entry.path())?;
                if file.metadata()?.modified()? > limit {
                    file.set_modified(limit)?;
                }
            }
        }
        dirs.push(dir);
    }
    // Directories last: writing files above does not touch them, but be explicit.
    for dir in dirs {
        let file = fs::File::open(&dir)?;
        if file.metadata()?.modified()? > limit {
            file.set_times(fs::FileTimes::new().set_modified(limit))?;
        }
    }
    Ok(())
}
