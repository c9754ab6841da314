//! Byte-shaping file helpers of the stages: sparse copies and clamped times.

use std::fs;
use std::path::Path;

use filetime::FileTime;
use sha2::{Digest, Sha256};

use std::io::Read;

/// Copy `src` into `dst` at `offset`, writing only the 64 KiB blocks that are not all
/// zero (so `dst` stays sparse) and feeding every byte to `hasher` if given.
pub(crate) fn copy_sparse(
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
pub(crate) fn clamp_mtimes(root: &Path, epoch: u64) -> std::io::Result<()> {
    let limit = FileTime::from_unix_time(i64::try_from(epoch).unwrap_or(i64::MAX), 0);
    walk(root, &mut |path, meta| {
        let mtime = FileTime::from_last_modification_time(meta).min(limit);
        filetime::set_symlink_file_times(path, mtime, mtime)
    })
}

/// Visit `root` and everything under it (not following symlinks), parents after
/// their contents, so changing a directory's times is not undone by its children.
pub(crate) fn walk(
    root: &Path,
    f: &mut impl FnMut(&Path, &fs::Metadata) -> std::io::Result<()>,
) -> std::io::Result<()> {
    for entry in walkdir::WalkDir::new(root).contents_first(true) {
        let entry = entry?;
        f(entry.path(), &entry.metadata()?)?;
    }
    Ok(())
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
}
