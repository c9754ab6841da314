//! Removals where "already gone" is success: any other failure is an error that
//! names the path.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The hidden name beside `path` that a replacement or removal moves it to first
/// (`.NAME.TAG`): by its whole name, as an extension would cut a version's
/// (`0.2.0+abc` is not `0.2`).
pub(crate) fn aside(path: &Path, tag: &str) -> PathBuf {
    path.with_file_name(format!(
        ".{}.{tag}",
        path.file_name().unwrap_or_default().to_string_lossy()
    ))
}

/// Remove a file, or do nothing if there is none.
pub(crate) fn file_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Remove a directory and everything in it, or do nothing if there is none.
pub(crate) fn dir_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gone_is_fine_and_other_failures_name_the_path() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("f");
        std::fs::write(&file, "").unwrap();
        file_if_present(&file).unwrap();
        assert!(!file.exists());
        file_if_present(&file).unwrap();

        let dir = tmp.path().join("d");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        dir_if_present(&dir).unwrap();
        assert!(!dir.exists());
        dir_if_present(&dir).unwrap();

        // A directory is not a file: the error says which path.
        std::fs::create_dir(&dir).unwrap();
        let e = file_if_present(&dir).unwrap_err();
        assert!(
            format!("{e:#}").contains(&dir.display().to_string()),
            "{e:#}"
        );
    }
}
