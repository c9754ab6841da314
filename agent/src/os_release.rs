//! Reading `os-release(5)`: the image's identity and version.

use std::path::{Path, PathBuf};

pub const DEFAULT_PATH: &str = "/etc/os-release";

/// The value of `key` in an os-release file, unquoted.
pub fn field(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let (k, v) = line.trim().split_once('=')?;
        (k == key).then(|| unquote(v.trim()))
    })
}

fn unquote(v: &str) -> String {
    let inner = v
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .or_else(|| v.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')))
        .unwrap_or(v);
    inner.replace("\\\"", "\"").replace("\\\\", "\\")
}

/// Why an image's version could not be read.
#[derive(Debug, thiserror::Error)]
pub enum OsReleaseError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} has no IMAGE_VERSION: this is not a DevOS image")]
    NoImageVersion { path: PathBuf },
}

/// `IMAGE_ID` and `IMAGE_VERSION` of the os-release at `path`: `None` where a field is
/// missing or the file cannot be read (callers say what that means for them).
pub fn image_identity(path: &Path) -> (Option<String>, Option<String>) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    (field(&text, "IMAGE_ID"), field(&text, "IMAGE_VERSION"))
}

/// `IMAGE_VERSION` of the os-release at `path`, or an error naming the file.
pub fn image_version(path: &Path) -> Result<String, OsReleaseError> {
    let text = std::fs::read_to_string(path).map_err(|source| OsReleaseError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    field(&text, "IMAGE_VERSION").ok_or_else(|| OsReleaseError::NoImageVersion {
        path: path.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_quoted_and_bare_values() {
        let text = "NAME=\"Debian GNU/Linux\"\nIMAGE_ID=devos-debian\nIMAGE_VERSION='0.1.0+abc'\n";
        assert_eq!(field(text, "NAME").as_deref(), Some("Debian GNU/Linux"));
        assert_eq!(field(text, "IMAGE_ID").as_deref(), Some("devos-debian"));
        assert_eq!(field(text, "IMAGE_VERSION").as_deref(), Some("0.1.0+abc"));
        assert_eq!(field(text, "VERSION_ID"), None);
    }
}
