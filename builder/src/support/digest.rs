//! Hashing and file-tree helpers shared by the stages.

use std::fs;
use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

/// Hex sha256 of a file's contents.
pub fn file_sha256(path: &Path) -> std::io::Result<String> {
    reader_sha256(&mut fs::File::open(path)?)
}

/// Hex sha256 of what `file` reads to its end.
pub(crate) fn reader_sha256(file: &mut dyn Read) -> std::io::Result<String> {
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

/// Lower-case hex sha256 of `data`.
pub(crate) fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// One entry of an image's file list: what `image diff` compares and what
/// `--check-reproducible` names when two builds differ.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileEntry {
    /// Absolute path in the image.
    pub(crate) path: String,
    /// `f` file, `d` directory, `l` symlink, `c`/`b` device, `p` fifo, `s` socket.
    pub(crate) kind: char,
    pub(crate) mode: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) size: u64,
    pub(crate) mtime: i64,
    /// sha256 of a file's bytes, a symlink's target, else empty.
    pub(crate) content: String,
}

impl FileEntry {
    /// What differs from `other`, in words (`content`, `mode`, ...).
    pub(crate) fn differences(&self, other: &FileEntry) -> Vec<&'static str> {
        let mut d = Vec::new();
        if self.kind != other.kind {
            d.push("type");
        }
        if self.content != other.content {
            d.push("content");
        }
        if self.size != other.size {
            d.push("size");
        }
        if self.mode != other.mode {
            d.push("mode");
        }
        if (self.uid, self.gid) != (other.uid, other.gid) {
            d.push("owner");
        }
        if self.mtime != other.mtime {
            d.push("mtime");
        }
        d
    }
}

/// The file list of a tree, sorted by path.
pub(crate) fn file_index(root: &Path) -> std::io::Result<Vec<FileEntry>> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut out = Vec::new();
    for entry in walkdir::WalkDir::new(root) {
        let entry = entry?;
        let (path, meta) = (entry.path(), entry.metadata()?);
        let rel = path.strip_prefix(root).unwrap_or(path);
        let ty = meta.file_type();
        let (kind, content) = if ty.is_file() {
            ('f', file_sha256(path)?)
        } else if ty.is_dir() {
            ('d', String::new())
        } else if ty.is_symlink() {
            ('l', fs::read_link(path)?.to_string_lossy().into_owned())
        } else if ty.is_char_device() {
            ('c', format!("{}", meta.rdev()))
        } else if ty.is_block_device() {
            ('b', format!("{}", meta.rdev()))
        } else if ty.is_fifo() {
            ('p', String::new())
        } else {
            ('s', String::new())
        };
        out.push(FileEntry {
            path: format!("/{}", rel.to_string_lossy()).replace("//", "/"),
            kind,
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            size: if kind == 'f' { meta.len() } else { 0 },
            mtime: meta.mtime(),
            content,
        });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Paths present in only one list or different between them, in path order;
/// modification times count only with `times`.
pub(crate) fn diff_files<'a>(
    a: &'a [FileEntry],
    b: &'a [FileEntry],
    times: bool,
) -> Vec<(&'a str, Option<&'a FileEntry>, Option<&'a FileEntry>)> {
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) if x.path == y.path => {
                let d = x.differences(y);
                if d.iter().any(|w| times || *w != "mtime") {
                    out.push((x.path.as_str(), Some(x), Some(y)));
                }
                i += 1;
                j += 1;
            }
            (Some(x), Some(y)) if x.path < y.path => {
                out.push((x.path.as_str(), Some(x), None));
                i += 1;
            }
            (Some(_), Some(y)) | (None, Some(y)) => {
                out.push((y.path.as_str(), None, Some(y)));
                j += 1;
            }
            (Some(x), None) => {
                out.push((x.path.as_str(), Some(x), None));
                i += 1;
            }
            (None, None) => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_and_diff() {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("a");
        fs::create_dir_all(a.join("etc")).unwrap();
        fs::write(a.join("etc/one"), "1").unwrap();
        fs::write(a.join("etc/two"), "2").unwrap();
        let b = tmp.path().join("b");
        fs::create_dir_all(b.join("etc")).unwrap();
        fs::write(b.join("etc/two"), "changed").unwrap();
        fs::write(b.join("etc/three"), "3").unwrap();
        let ia = file_index(&a).unwrap();
        assert_eq!(ia[0].path, "/");
        let ib = file_index(&b).unwrap();
        let d = diff_files(&ia, &ib, false);
        let paths: Vec<&str> = d.iter().map(|x| x.0).collect();
        assert_eq!(paths, ["/etc/one", "/etc/three", "/etc/two"]);
    }
}
