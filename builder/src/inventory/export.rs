//! `image export`: a registered version in another disk format.

use std::path::Path;

use anyhow::{Context, Result};

use crate::image::convert::convert;
use crate::model::spec::Format;
use crate::support::dry_run::DryRun;

#[derive(Debug, serde::Serialize)]
pub(crate) struct Export {
    pub(crate) version: String,
    pub(crate) format: Format,
    pub(crate) path: std::path::PathBuf,
    pub(crate) sha256: String,
    pub(crate) size: u64,
    /// False when the version already had this artifact.
    pub(crate) converted: bool,
}

/// Where an export of a version goes, and whether it is already there.
struct Planned {
    v: crate::store::registry::VersionInfo,
    raw: std::path::PathBuf,
    path: std::path::PathBuf,
    file: String,
    /// The recorded export, when the file at `path` still matches it.
    done: Option<crate::store::registry::ArtifactRow>,
}

fn planned(
    reg: &crate::store::registry::Registry,
    reference: &str,
    format: Format,
    out: Option<&Path>,
) -> Result<Planned> {
    let v = reg.find(reference)?;
    let (raw, _) = crate::inventory::raw_artifact(&v)?;
    let raw_size = std::fs::metadata(&raw)?.len();
    if format == Format::Vhd && raw_size % (1 << 20) != 0 {
        anyhow::bail!(
            "{} is {raw_size} bytes, not a whole number of MiB, which Azure requires of a VHD\n  hint: set `[disk] size` in the spec to whole MiB and build again",
            raw.display()
        );
    }
    if let Some(p) = out {
        let dirs: Vec<std::path::PathBuf> = crate::inventory::list(reg, None)?
            .into_iter()
            .map(|v| v.dir)
            .collect();
        check_out(p, format, &dirs)?;
    }
    let path = match out {
        Some(p) => p.to_path_buf(),
        None => raw.with_extension(format.extension()),
    };
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .with_context(|| format!("{} is not a file path", path.display()))?;
    let done = v
        .artifacts
        .iter()
        .find(|a| a.format == format)
        .filter(|a| out.is_none() && already_exported(&path, &a.sha256))
        .cloned();
    Ok(Planned {
        v,
        raw,
        path,
        file,
        done,
    })
}

/// `--out`: a file to make in a directory that exists (said before anything converts),
/// in place of nothing, a regular file or a symlink (the rename replaces the link),
/// and outside every registered version's output directory (`version_dirs`, whose
/// files the registry and `image verify` vouch for).
fn check_out(out: &Path, format: Format, version_dirs: &[std::path::PathBuf]) -> Result<()> {
    let dir = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if out.is_dir() {
        anyhow::bail!(
            "--out {} is a directory\n  hint: give the file to write, e.g. {}",
            out.display(),
            out.join(format!("image.{}", format.extension())).display()
        );
    }
    if !dir.is_dir() {
        anyhow::bail!(
            "--out {}: there is no directory {}\n  hint: create it first, or write to a directory that exists",
            out.display(),
            dir.display()
        );
    }
    // The export is renamed over `out`: never over a device (`/dev/null`), a FIFO
    // or a socket, which would become a regular file holding the image.
    if let Ok(meta) = out.symlink_metadata()
        && !meta.is_file()
        && !meta.is_symlink()
    {
        anyhow::bail!(
            "--out {} exists and is not a regular file: the export would replace it\n  hint: give the path of a new file, or of a regular file to replace",
            out.display()
        );
    }
    let dir = dir.canonicalize().ok();
    let inside = version_dirs.iter().find(|version_dir| {
        dir.as_ref()
            .zip(version_dir.canonicalize().ok())
            .is_some_and(|(dir, version_dir)| dir.starts_with(version_dir))
    });
    if let Some(version_dir) = inside {
        anyhow::bail!(
            "--out {} lies in the output directory of a registered version, {}: the export could replace its raw image or manifest\n  hint: leave out --out (the export goes beside the raw image and is recorded), or write it elsewhere",
            out.display(),
            version_dir.display()
        );
    }
    Ok(())
}

/// What `image export --dry-run` says: the conversion it would make, if any.
pub(crate) fn dry_run(
    reg: &crate::store::registry::Registry,
    reference: &str,
    format: Format,
    out: Option<&Path>,
) -> Result<DryRun> {
    let p = planned(reg, reference, format, out)?;
    let mut dry = DryRun::new();
    if p.done.is_none() {
        dry.would(format!(
            "convert {} to {} at {}{}",
            p.raw.display(),
            format.extension(),
            p.path.display(),
            if out.is_none() {
                " and record it in the registry"
            } else {
                ""
            }
        ));
    }
    Ok(dry)
}

/// `image export`: the version's raw image (checked against its recorded sha256) in
/// another format, recorded in the registry as one more artifact of the version.
/// Written under a temporary name and renamed, so a killed export leaves nothing.
pub(crate) fn export(
    reg: &mut crate::store::registry::Registry,
    reference: &str,
    format: Format,
    out: Option<&Path>,
) -> Result<Export> {
    let Planned {
        v,
        raw,
        path,
        file,
        done,
    } = planned(reg, reference, format, out)?;
    let version = format!("{}@{}", v.name, v.version);
    if let Some(a) = done {
        return Ok(Export {
            version,
            format,
            path,
            sha256: a.sha256,
            size: a.size,
            converted: false,
        });
    }
    let tmp = path.with_file_name(format!(".{file}.partial"));
    let result = convert(&raw, format, &tmp).and_then(|()| {
        let sha256 = crate::support::digest::file_sha256(&tmp)?;
        let size = std::fs::metadata(&tmp)?.len();
        std::fs::rename(&tmp, &path)
            .with_context(|| format!("cannot move the export to {}", path.display()))?;
        Ok((sha256, size))
    });
    let (sha256, size) = match result {
        Ok(r) => r,
        Err(e) => {
            // The partial file may never have been made; `e` is the error that matters.
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    if out.is_none() {
        reg.record_artifact(
            &v,
            &crate::store::registry::ArtifactRow {
                file,
                format,
                sha256: sha256.clone(),
                size,
            },
        )?;
    }
    Ok(Export {
        version,
        format,
        path,
        sha256,
        size,
        converted: true,
    })
}

/// Whether `path` holds the recorded export. Missing is the usual no; unreadable is
/// logged, and the export is made again and renamed over it.
fn already_exported(path: &Path, sha256: &str) -> bool {
    match crate::support::digest::file_sha256(path) {
        Ok(actual) => actual == sha256,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => {
            tracing::warn!("cannot read {}: {e}; converting again", path.display());
            false
        }
    }
}
