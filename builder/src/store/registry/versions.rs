//! Every version built: recording a build, finding, listing and reading versions.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use rusqlite::{Connection, OptionalExtension, params};

use super::Registry;
use crate::model::manifest::Manifest;
use crate::model::spec::Format;
use crate::model::states::VersionState;
use crate::support::digest::FileEntry;
use crate::support::time::now;

/// One version as `image list` and `image show` report it.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct VersionInfo {
    #[serde(skip)]
    pub(crate) id: i64,
    pub(crate) name: String,
    pub(crate) version: String,
    pub(crate) build_id: String,
    pub(crate) dir: PathBuf,
    pub(crate) spec: String,
    #[serde(serialize_with = "crate::support::time::serialize_iso")]
    pub(crate) built_at: u64,
    pub(crate) state: VersionState,
    /// `None` if never boot-tested, else whether the latest test run passed.
    pub(crate) tested: Option<bool>,
    pub(crate) artifacts: Vec<ArtifactRow>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct ArtifactRow {
    pub(crate) file: String,
    pub(crate) format: Format,
    pub(crate) sha256: String,
    pub(crate) size: u64,
}

/// The spec's path as the registry keeps it: absolute, so that `image test NAME` and
/// the hints that name the spec work from any directory.
fn absolute(spec: &Path) -> PathBuf {
    std::fs::canonicalize(spec)
        .or_else(|_| std::path::absolute(spec))
        .unwrap_or_else(|_| spec.to_path_buf())
}

impl Registry {
    /// Record a finished build (idempotent: the same version again replaces its rows).
    pub fn record_build(
        &mut self,
        dir: &Path,
        spec: &Path,
        manifest: &Manifest,
        files: &[FileEntry],
    ) -> Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let now = now();
        tx.execute(
            "INSERT INTO images (name, created_at) VALUES (?1, ?2) ON CONFLICT(name) DO NOTHING",
            params![manifest.name, now],
        )?;
        let image_id: i64 = tx.query_row(
            "SELECT id FROM images WHERE name = ?1",
            [&manifest.name],
            |r| r.get(0),
        )?;
        tx.execute(
            "INSERT INTO versions (image_id, version, build_id, dir, spec, manifest, built_at, state)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT(image_id, version) DO UPDATE SET
               build_id = excluded.build_id, dir = excluded.dir, spec = excluded.spec,
               manifest = excluded.manifest, built_at = excluded.built_at, state = excluded.state",
            params![
                image_id,
                manifest.version,
                manifest.build_id,
                dir.to_string_lossy(),
                absolute(spec).to_string_lossy(),
                serde_json::to_string(manifest)?,
                now,
                VersionState::Built
            ],
        )?;
        let vid: i64 = tx.query_row(
            "SELECT id FROM versions WHERE image_id = ?1 AND version = ?2",
            params![image_id, manifest.version],
            |r| r.get(0),
        )?;
        for table in ["artifacts", "stage_timings", "files"] {
            tx.execute(&format!("DELETE FROM {table} WHERE version_id = ?1"), [vid])?;
        }
        for a in &manifest.artifacts {
            tx.execute(
                "INSERT INTO artifacts (version_id, file, format, sha256, size) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![vid, a.file, a.format, a.sha256, a.size],
            )?;
        }
        for (seq, s) in manifest.stages.iter().enumerate() {
            tx.execute(
                "INSERT INTO stage_timings (version_id, seq, stage, seconds) VALUES (?1, ?2, ?3, ?4)",
                params![vid, seq, s.name, s.seconds],
            )?;
        }
        {
            let mut ins = tx.prepare(
                "INSERT INTO files (version_id, path, kind, mode, uid, gid, size, mtime, content)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?;
            for f in files {
                ins.execute(params![
                    vid,
                    f.path,
                    f.kind.to_string(),
                    f.mode,
                    f.uid,
                    f.gid,
                    f.size,
                    f.mtime,
                    f.content
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Every version of every image (or of `name`), newest first.
    pub(crate) fn versions(&self, name: Option<&str>) -> Result<Vec<VersionInfo>> {
        let mut stmt = self.conn.prepare(
            "SELECT v.id, i.name, v.version, v.build_id, v.dir, v.spec, v.built_at, v.state,
                    (SELECT passed FROM test_runs t WHERE t.version_id = v.id
                       AND (t.raw_sha256 IS NULL OR t.raw_sha256 IS
                            (SELECT a.sha256 FROM artifacts a
                             WHERE a.version_id = v.id AND a.format = 'raw'))
                     ORDER BY t.started_at DESC, t.id DESC LIMIT 1)
             FROM versions v JOIN images i ON i.id = v.image_id
             WHERE ?1 IS NULL OR i.name = ?1
             ORDER BY i.name, v.built_at DESC, v.id DESC",
        )?;
        let rows = stmt.query_map([name], |r| {
            Ok(VersionInfo {
                id: r.get(0)?,
                name: r.get(1)?,
                version: r.get(2)?,
                build_id: r.get(3)?,
                dir: PathBuf::from(r.get::<_, String>(4)?),
                spec: r.get(5)?,
                built_at: r.get(6)?,
                state: r.get(7)?,
                tested: r.get(8)?,
                artifacts: Vec::new(),
            })
        })?;
        let mut out = Vec::new();
        for v in rows {
            let mut v = v?;
            v.artifacts = self.artifacts(v.id)?;
            out.push(v);
        }
        Ok(out)
    }

    fn artifacts(&self, vid: i64) -> Result<Vec<ArtifactRow>> {
        let mut stmt = self.conn.prepare(
            "SELECT file, format, sha256, size FROM artifacts WHERE version_id = ?1 ORDER BY file",
        )?;
        let rows = stmt.query_map([vid], |r| {
            Ok(ArtifactRow {
                file: r.get(0)?,
                format: r.get(1)?,
                sha256: r.get(2)?,
                size: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Find `NAME`, `NAME@VERSION` or `NAME@PREFIX` (a unique prefix of a version);
    /// `NAME` alone is its newest version.
    pub(crate) fn find(&self, reference: &str) -> Result<VersionInfo> {
        let (name, wanted) = split_reference(reference).map_err(anyhow::Error::msg)?;
        let all = self.versions(Some(name))?;
        if all.is_empty() {
            let known: Vec<String> = self.versions(None)?.into_iter().map(|v| v.name).collect();
            let mut known: Vec<String> = known;
            known.dedup();
            bail!(
                "no image `{name}` in the registry {}\n  hint: {}",
                self.path.display(),
                if known.is_empty() {
                    "build one first with `devos-build image build`".to_owned()
                } else {
                    format!("known images: {}", known.join(", "))
                }
            );
        }
        let Some(wanted) = wanted else {
            return Ok(all.into_iter().next().unwrap_or_else(|| unreachable!()));
        };
        if let Some(v) = all.iter().find(|v| v.version == wanted) {
            return Ok(v.clone());
        }
        let matches: Vec<&VersionInfo> = all
            .iter()
            .filter(|v| v.version.starts_with(wanted) || v.build_id.starts_with(wanted))
            .collect();
        match matches.as_slice() {
            [one] => Ok((*one).clone()),
            [] => bail!(
                "{name} has no version `{wanted}` in the registry\n  hint: `devos-build image list {name}` shows its versions"
            ),
            many => bail!(
                "`{reference}` matches {} versions ({})\n  hint: give more of the version",
                many.len(),
                many.iter()
                    .map(|v| v.version.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    pub(crate) fn manifest(&self, v: &VersionInfo) -> Result<Manifest> {
        let text: String =
            self.conn
                .query_row("SELECT manifest FROM versions WHERE id = ?1", [v.id], |r| {
                    r.get(0)
                })?;
        Ok(serde_json::from_str(&text)?)
    }

    pub(crate) fn files(&self, v: &VersionInfo) -> Result<Vec<FileEntry>> {
        let mut stmt = self.conn.prepare(
            "SELECT path, kind, mode, uid, gid, size, mtime, content FROM files WHERE version_id = ?1 ORDER BY path",
        )?;
        let rows = stmt.query_map([v.id], |r| {
            Ok(FileEntry {
                path: r.get(0)?,
                kind: r.get::<_, String>(1)?.chars().next().unwrap_or('?'),
                mode: r.get(2)?,
                uid: r.get(3)?,
                gid: r.get(4)?,
                size: r.get(5)?,
                mtime: r.get(6)?,
                content: r.get(7)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Add (or replace) an artifact of `v`, e.g. an export made after the build.
    pub(crate) fn record_artifact(&mut self, v: &VersionInfo, a: &ArtifactRow) -> Result<()> {
        self.conn.execute(
            "INSERT INTO artifacts (version_id, file, format, sha256, size) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (version_id, file) DO UPDATE SET
               format = excluded.format, sha256 = excluded.sha256, size = excluded.size",
            params![v.id, a.file, a.format, a.sha256, a.size],
        )?;
        Ok(())
    }

    /// Mark a version's artifacts as deleted (the row stays, for history and diffs).
    pub(crate) fn mark_removed(&mut self, v: &VersionInfo) -> Result<()> {
        self.conn.execute(
            "UPDATE versions SET state = ?2 WHERE id = ?1",
            params![v.id, VersionState::Removed],
        )?;
        Ok(())
    }
}

pub(super) fn version_id(conn: &Connection, name: &str, version: &str) -> Result<Option<i64>> {
    Ok(conn
        .query_row(
            "SELECT v.id FROM versions v JOIN images i ON i.id = v.image_id
             WHERE i.name = ?1 AND v.version = ?2",
            params![name, version],
            |r| r.get(0),
        )
        .optional()?)
}

/// A version's reference, NAME or NAME@VERSION (or a prefix of one), as its name and
/// what it asks for; an error that says what to write when either part is empty.
pub(crate) fn split_reference(reference: &str) -> Result<(&str, Option<&str>), String> {
    let (name, wanted) = match reference.split_once('@') {
        Some((n, v)) => (n, Some(v)),
        None => (reference, None),
    };
    if name.is_empty() {
        return Err(format!(
            "`{reference}` names no image before the `@`\n  hint: give NAME@VERSION, e.g. `devos-debian@0.2.0` (`devos-build image list` shows them)"
        ));
    }
    if wanted == Some("") {
        return Err(format!(
            "`{reference}` names no version after the `@`\n  hint: give NAME@VERSION (`devos-build image list {name}` shows its versions), or `{name}` alone for its newest"
        ));
    }
    Ok((name, wanted))
}
