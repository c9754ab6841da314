//! `image build --check-reproducible`: build the same inputs twice — once as a build
//! normally runs (restoring cached stages when the cache has them), once from
//! scratch without the cache — and compare the results bit for bit; on a difference,
//! name the partitions and the first files that differ.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use serde::Serialize;

use crate::build::{self, BuildOptions, Built};
use crate::support::digest;
use crate::support::ui::Ui;

#[derive(Debug, Serialize)]
pub(crate) struct Report {
    pub(crate) version: String,
    pub(crate) identical: bool,
    /// (file, sha256 of the first build, sha256 of the second).
    pub(crate) artifacts: Vec<(String, String, String)>,
    pub(crate) partitions: Vec<PartitionDiff>,
    /// `path: what differs`, at most [`MAX_FILES`].
    pub(crate) files: Vec<String>,
    /// The second build, kept for inspection when the builds differ.
    pub(crate) kept: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub(crate) struct PartitionDiff {
    pub(crate) label: String,
    pub(crate) differing_blocks: u64,
    pub(crate) first_difference: u64,
}

const MAX_FILES: usize = 20;
const BLOCK: usize = 4096;

/// Build twice: the real build as asked (with the stage cache unless `--no-cache`),
/// then one without the cache; a cached build must be the same bytes as a fresh one.
pub(crate) fn check(opts: &BuildOptions, ui: &mut Ui) -> Result<(Built, Report)> {
    let first_opts = BuildOptions {
        force: true,
        ..opts.clone()
    };
    ui.info("==> reproducibility check: first build");
    let a = build::build(&first_opts, ui)?;
    // Locked like a build's work directory: one a killed check left is swept by the
    // next build beside it.
    let parent = a.dir.parent().unwrap_or(Path::new("."));
    let scratch = crate::support::workdir::WorkDir::new(parent)?;
    let second_opts = BuildOptions {
        out: Some(scratch.path().join("out")),
        registry: Some(scratch.path().join("registry.db")),
        no_cache: true,
        ..first_opts
    };
    ui.info("==> reproducibility check: second build, from scratch");
    let b = build::build(&second_opts, ui)?;
    if a.manifest.build_id != b.manifest.build_id {
        bail!(
            "the two builds had different inputs ({} then {}): the package archive or the sources changed in between\n  hint: run the check again",
            a.manifest.version,
            b.manifest.version
        );
    }
    let report = compare(&a, &b)?;
    let kept = match report.identical {
        true => None,
        false => {
            let dest = parent.join(format!(
                "repro-{}-{}",
                a.manifest.version,
                crate::support::time::now()
            ));
            scratch.persist(&dest)?;
            Some(dest)
        }
    };
    let report = Report { kept, ..report };
    Ok((a, report))
}

fn compare(a: &Built, b: &Built) -> Result<Report> {
    let mut artifacts = Vec::new();
    for x in &a.manifest.artifacts {
        let y = b.manifest.artifacts.iter().find(|y| y.format == x.format);
        artifacts.push((
            x.file.clone(),
            x.sha256.clone(),
            y.map(|y| y.sha256.clone()).unwrap_or_default(),
        ));
    }
    let identical = artifacts.iter().all(|(_, x, y)| x == y);
    let mut partitions = Vec::new();
    if let (Some(ra), Some(rb)) = (a.manifest.raw(&a.dir), b.manifest.raw(&b.dir)) {
        for p in &a.manifest.partitions {
            if let Some(d) = compare_range(&ra, &rb, p.offset, p.size)? {
                partitions.push(PartitionDiff {
                    label: p.label.clone(),
                    differing_blocks: d.0,
                    first_difference: d.1,
                });
            }
        }
    }
    let files = digest::diff_files(&a.files, &b.files, true)
        .into_iter()
        .take(MAX_FILES)
        .map(|(path, x, y)| match (x, y) {
            (Some(x), Some(y)) => format!("{path}: {}", x.differences(y).join(", ")),
            (Some(_), None) => format!("{path}: only in the first build"),
            _ => format!("{path}: only in the second build"),
        })
        .collect();
    Ok(Report {
        version: a.manifest.version.clone(),
        identical,
        artifacts,
        partitions,
        files,
        kept: None,
    })
}

/// Count the differing 4 KiB blocks of two files in a byte range, and the offset
/// (within the range) of the first; `None` if the range is identical.
fn compare_range(a: &Path, b: &Path, offset: u64, len: u64) -> Result<Option<(u64, u64)>> {
    use std::io::{Seek, SeekFrom};
    let (mut fa, mut fb) = (fs::File::open(a)?, fs::File::open(b)?);
    fa.seek(SeekFrom::Start(offset))?;
    fb.seek(SeekFrom::Start(offset))?;
    let (mut ba, mut bb) = (vec![0u8; 1 << 22], vec![0u8; 1 << 22]);
    let (mut pos, mut blocks, mut first) = (0u64, 0u64, None);
    while pos < len {
        let want = usize::try_from((len - pos).min(ba.len() as u64))?;
        fa.read_exact(&mut ba[..want])?;
        fb.read_exact(&mut bb[..want])?;
        for (i, (x, y)) in ba[..want]
            .chunks(BLOCK)
            .zip(bb[..want].chunks(BLOCK))
            .enumerate()
        {
            if x != y {
                blocks += 1;
                first.get_or_insert(pos + (i * BLOCK) as u64);
            }
        }
        pos += want as u64;
    }
    Ok(first.map(|f| (blocks, f)))
}

impl Report {
    pub(crate) fn human(&self) -> String {
        if self.identical {
            let mut s = format!(
                "reproducible: two builds of {} from scratch are bit-for-bit identical\n",
                self.version
            );
            for (file, sha, _) in &self.artifacts {
                s.push_str(&format!("  {file:<48} {sha}\n"));
            }
            return s;
        }
        let mut s = format!("NOT reproducible: two builds of {} differ\n", self.version);
        for (file, x, y) in self.artifacts.iter().filter(|(_, x, y)| x != y) {
            s.push_str(&format!("  {file}: {x} vs {y}\n"));
        }
        for p in &self.partitions {
            s.push_str(&format!(
                "  partition {}: {} blocks of 4 KiB differ, the first at byte {} of the partition\n",
                p.label, p.differing_blocks, p.first_difference
            ));
        }
        let raw_same = self
            .artifacts
            .iter()
            .any(|(file, x, y)| file.ends_with(".raw") && x == y);
        if raw_same {
            s.push_str("  the raw images are identical: the difference is in the conversion to the formats above\n");
        } else if self.files.is_empty() {
            s.push_str("  the file trees are identical (contents, modes, owners, times): the difference is filesystem metadata\n");
        } else {
            s.push_str("  first differing files:\n");
            for f in &self.files {
                s.push_str(&format!("    {f}\n"));
            }
        }
        if let Some(k) = &self.kept {
            s.push_str(&format!(
                "  the second build is kept in {} — compare with diffoscope, or `debugfs -R 'stat PATH'` on a partition\n",
                k.display()
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_differing_byte_is_found_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.raw"), dir.path().join("b.raw"));
        // Three 4 KiB blocks of the range, past the 4 MiB the files are read in.
        let mut bytes: Vec<u8> = (0..(5 << 20) as u32).map(|i| (i % 251) as u8).collect();
        fs::write(&a, &bytes).unwrap();
        let at = (4 << 20) + 5 * BLOCK + 17;
        bytes[at] ^= 1;
        fs::write(&b, &bytes).unwrap();

        assert_eq!(compare_range(&a, &a, 0, 5 << 20).unwrap(), None);
        assert_eq!(
            compare_range(&a, &b, 0, 5 << 20).unwrap(),
            Some((1, at as u64 - 17))
        );
        // The difference, in a range that starts before it: one block, counted from
        // the range's start.
        let offset = 1 << 20;
        let len = (4 << 20) - BLOCK as u64;
        assert_eq!(
            compare_range(&a, &b, offset, len).unwrap(),
            Some((1, at as u64 - offset - 17))
        );
        // A range that ends before it sees none.
        assert_eq!(compare_range(&a, &b, 0, (4 << 20) as u64).unwrap(), None);

        let report = Report {
            version: "1.0.0".into(),
            identical: false,
            artifacts: vec![("disk.raw".into(), "aa".into(), "bb".into())],
            partitions: vec![PartitionDiff {
                label: "root".into(),
                differing_blocks: 1,
                first_difference: at as u64 - 17,
            }],
            files: vec!["/etc/machine-id: contents".into()],
            kept: None,
        };
        let said = report.human();
        for needle in [
            "NOT reproducible: two builds of 1.0.0 differ",
            "disk.raw: aa vs bb",
            "partition root: 1 blocks of 4 KiB differ",
            "/etc/machine-id: contents",
        ] {
            assert!(said.contains(needle), "{needle}: {said}");
        }
    }
}
