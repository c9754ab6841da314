//! Hashing and file-tree helpers shared by the stages.

use std::fs;
use std::io::Read;
use std::path::Path;

use filetime::FileTime;

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

/// Copy `src` into `dst` at `offset`, writing only the 64 KiB blocks that are not all
/// zero (so `dst` stays sparse) and feeding every byte to `hasher` if given.
pub fn copy_sparse(
    src: &Path,
    dst: &mut fs::File,
    offset: u64,
    mut hasher: Option<&mut Sha256>,
) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom, Write};
    let mut src = fs::File::open(src)?;
    let mut buf = vec![0u8; 4 << 20];
    let mut pos = 0u64;
    loop {
        let n = read_full(&mut src, &mut buf)?;
        if n == 0 {
            break;
        }
        if let Some(h) = hasher.as_deref_mut() {
            h.update(&buf[..n]);
        }
        for (i, block) in buf[..n].chunks(65536).enumerate() {
            if block.iter().any(|&b| b != 0) {
                dst.seek(SeekFrom::Start(offset + pos + (i * 65536) as u64))?;
                dst.write_all(block)?;
            }
        }
        pos += n as u64;
    }
    Ok(pos)
}

fn read_full(f: &mut fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Give every entry under `root` (root included, symlinks too) an mtime of at most
/// `epoch`, and an atime equal to its mtime, so filesystems made from the tree do not
/// carry the time of the build.
pub fn clamp_mtimes(root: &Path, epoch: u64) -> std::io::Result<()> {
    let limit = FileTime::from_unix_time(i64::try_from(epoch).unwrap_or(i64::MAX), 0);
    walk(root, &mut |path, meta| {
        let mtime = FileTime::from_last_modification_time(meta).min(limit);
        filetime::set_symlink_file_times(path, mtime, mtime)
    })
}

/// Visit `root` and everything under it (not following symlinks), parents after
/// their contents, so changing a directory's times is not undone by its children.
pub fn walk(
    root: &Path,
    f: &mut impl FnMut(&Path, &fs::Metadata) -> std::io::Result<()>,
) -> std::io::Result<()> {
    for entry in fs::read_dir(root)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            walk(&entry.path(), f)?;
        } else {
            f(&entry.path(), &meta)?;
        }
    }
    f(root, &fs::symlink_metadata(root)?)
}

/// One entry of an image's file list: what `image diff` compares and what
/// `--check-reproducible` names when two builds differ.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileEntry {
    /// Absolute path in the image.
    pub path: String,
    /// `f` file, `d` directory, `l` symlink, `c`/`b` device, `p` fifo, `s` socket.
    pub kind: char,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: i64,
    /// sha256 of a file's bytes, a symlink's target, else empty.
    pub content: String,
}

impl FileEntry {
    /// What differs from `other`, in words (`content`, `mode`, ...).
    pub fn differences(&self, other: &FileEntry) -> Vec<&'static str> {
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
pub fn file_index(root: &Path) -> std::io::Result<Vec<FileEntry>> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut out = Vec::new();
    walk(root, &mut |path, meta| {
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
        Ok(())
    })?;
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Paths present in only one list or different between them, in path order;
/// modification times count only with `times`.
pub fn diff_files<'a>(
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
    fn clamp_covers_symlinks_and_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("t");
        fs::create_dir_all(root.join("d")).unwrap();
        fs::write(root.join("d/f"), "x").unwrap();
        std::os::unix::fs::symlink("f", root.join("d/l")).unwrap();
        clamp_mtimes(&root, 1000).unwrap();
        for p in ["", "d", "d/f", "d/l"] {
            let m = fs::symlink_metadata(root.join(p)).unwrap();
            assert_eq!(
                FileTime::from_last_modification_time(&m).unix_seconds(),
                1000,
                "{p}"
            );
        }
    }

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
