//! The image registry: every image version ever built, its artifacts (sha256, size),
//! stage timings, files, test runs, and (later) publications and rollouts, in SQLite.
//!
//! WAL mode, a busy timeout so concurrent builds wait rather than fail, and every
//! change in one transaction. The schema version is SQLite's `user_version`; opening
//! a registry applies the missing forward migrations in order, each in a transaction.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rusqlite::{Connection, OptionalExtension, params};

use crate::model::manifest::Manifest;
use crate::support::digest::FileEntry;
use crate::support::time::now;

/// Forward migrations; migration `i` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: images, versions, artifacts, stage timings, files.
    "CREATE TABLE images (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE versions (
        id INTEGER PRIMARY KEY,
        image_id INTEGER NOT NULL REFERENCES images(id),
        version TEXT NOT NULL,
        build_id TEXT NOT NULL,
        dir TEXT NOT NULL,
        spec TEXT NOT NULL,
        manifest TEXT NOT NULL,
        built_at INTEGER NOT NULL,
        -- 'built', or 'removed' once `image gc` deleted its artifacts.
        state TEXT NOT NULL DEFAULT 'built',
        UNIQUE (image_id, version)
    );
    CREATE TABLE artifacts (
        version_id INTEGER NOT NULL REFERENCES versions(id) ON DELETE CASCADE,
        file TEXT NOT NULL,
        format TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size INTEGER NOT NULL,
        PRIMARY KEY (version_id, file)
    );
    CREATE TABLE stage_timings (
        version_id INTEGER NOT NULL REFERENCES versions(id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        stage TEXT NOT NULL,
        seconds REAL NOT NULL,
        PRIMARY KEY (version_id, seq)
    );
    CREATE TABLE files (
        version_id INTEGER NOT NULL REFERENCES versions(id) ON DELETE CASCADE,
        path TEXT NOT NULL,
        kind TEXT NOT NULL,
        mode INTEGER NOT NULL,
        uid INTEGER NOT NULL,
        gid INTEGER NOT NULL,
        size INTEGER NOT NULL,
        mtime INTEGER NOT NULL,
        -- sha256 for regular files, the target for symlinks, else empty.
        content TEXT NOT NULL,
        PRIMARY KEY (version_id, path)
    ) WITHOUT ROWID;",
    // 2: boot-test runs, AMI publications and fleet rollouts.
    "CREATE TABLE test_runs (
        id INTEGER PRIMARY KEY,
        version_id INTEGER NOT NULL REFERENCES versions(id) ON DELETE CASCADE,
        started_at INTEGER NOT NULL,
        passed INTEGER NOT NULL,
        accelerator TEXT NOT NULL,
        seconds REAL NOT NULL,
        report TEXT NOT NULL
    );
    CREATE TABLE publications (
        id INTEGER PRIMARY KEY,
        version_id INTEGER NOT NULL REFERENCES versions(id),
        region TEXT NOT NULL,
        snapshot_id TEXT,
        ami_id TEXT,
        state TEXT NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE rollouts (
        id INTEGER PRIMARY KEY,
        stack TEXT NOT NULL,
        region TEXT NOT NULL,
        from_version_id INTEGER REFERENCES versions(id),
        to_version_id INTEGER NOT NULL REFERENCES versions(id),
        state TEXT NOT NULL,
        reason TEXT,
        started_at INTEGER NOT NULL,
        finished_at INTEGER
    );",
    // 3: publications know their kind (ami, packer), SSM parameter and last change;
    // one row per version, region and kind.
    "ALTER TABLE publications ADD COLUMN kind TEXT NOT NULL DEFAULT 'ami';
    ALTER TABLE publications ADD COLUMN parameter TEXT;
    ALTER TABLE publications ADD COLUMN updated_at INTEGER;
    CREATE UNIQUE INDEX publications_once ON publications (version_id, region, kind);",
    // 4: rollouts know their kind (deploy, rollout, rollback, auto-rollback) and how
    // long the stack call took to issue; versions that failed their gate on a stack
    // are marked bad there.
    "ALTER TABLE rollouts ADD COLUMN kind TEXT NOT NULL DEFAULT 'rollout';
    ALTER TABLE rollouts ADD COLUMN issued_after REAL;
    CREATE TABLE bad_versions (
        stack TEXT NOT NULL,
        region TEXT NOT NULL,
        version_id INTEGER NOT NULL REFERENCES versions(id),
        reason TEXT NOT NULL,
        marked_at INTEGER NOT NULL,
        UNIQUE (stack, region, version_id)
    );",
];

pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// `$DEVOS_REGISTRY`, else `$XDG_DATA_HOME/devos/registry.db`, else
/// `~/.local/share/devos/registry.db`.
pub fn default_path() -> PathBuf {
    if let Some(p) = std::env::var_os("DEVOS_REGISTRY") {
        return PathBuf::from(p);
    }
    let data = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("/var/lib"));
    data.join("devos/registry.db")
}

pub struct Registry {
    conn: Connection,
    path: PathBuf,
}

/// One rollout of a stack from one version to another, as `fleet history` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Rollout {
    pub id: i64,
    pub stack: String,
    pub region: String,
    /// deploy, rollout, rollback or auto-rollback.
    pub kind: String,
    pub image: String,
    pub from: Option<String>,
    pub to: String,
    /// in-progress, succeeded, failed, rolled-back.
    pub state: String,
    pub reason: Option<String>,
    pub started_at: u64,
    pub finished_at: Option<u64>,
    /// Seconds from the command's start to the stack update being issued.
    pub issued_after: Option<f64>,
}

/// One version as `image list` and `image show` report it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VersionInfo {
    #[serde(skip)]
    pub id: i64,
    pub name: String,
    pub version: String,
    pub build_id: String,
    pub dir: PathBuf,
    pub spec: String,
    pub built_at: u64,
    pub state: String,
    /// `None` if never boot-tested, else whether the latest test run passed.
    pub tested: Option<bool>,
    pub artifacts: Vec<ArtifactRow>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ArtifactRow {
    pub file: String,
    pub format: String,
    pub sha256: String,
    pub size: u64,
}

/// An AMI of one version in one region.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Publication {
    pub name: String,
    pub version: String,
    pub build_id: String,
    pub region: String,
    /// `ami` (EBS direct upload) or `packer`.
    pub kind: String,
    pub ami_id: Option<String>,
    pub snapshot_ids: Vec<String>,
    /// The SSM parameter holding the AMI id, if one was written.
    pub parameter: Option<String>,
    /// `available`, or `deregistered` once `publish deregister` removed it.
    pub state: String,
    pub created_at: u64,
    pub updated_at: u64,
}

impl Publication {
    /// A new, available publication of `v` (the registry stamps the times).
    pub fn available(
        v: &VersionInfo,
        region: &str,
        kind: &str,
        ami_id: &str,
        snapshot_ids: Vec<String>,
        parameter: Option<String>,
    ) -> Self {
        Self {
            name: v.name.clone(),
            version: v.version.clone(),
            build_id: v.build_id.clone(),
            region: region.to_owned(),
            kind: kind.to_owned(),
            ami_id: Some(ami_id.to_owned()),
            snapshot_ids,
            parameter,
            state: "available".into(),
            created_at: 0,
            updated_at: 0,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct TestRun {
    pub started_at: u64,
    pub passed: bool,
    pub accelerator: String,
    pub seconds: f64,
}

impl Registry {
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_at(path, SCHEMA_VERSION)
    }

    /// Open, migrating up to `target` (tests use older targets to check migrations).
    pub fn open_at(path: &Path, target: i64) -> Result<Self> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let conn = Connection::open(path)
            .with_context(|| format!("cannot open the registry {}", path.display()))?;
        conn.busy_timeout(Duration::from_secs(30))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let mut reg = Self {
            conn,
            path: path.to_path_buf(),
        };
        reg.migrate(target)?;
        Ok(reg)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn schema_version(&self) -> Result<i64> {
        Ok(self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    fn migrate(&mut self, target: i64) -> Result<()> {
        loop {
            // IMMEDIATE: two processes opening an old registry migrate one after the other.
            let tx = self
                .conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let current: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
            if current > SCHEMA_VERSION {
                bail!(
                    "the registry {} has schema version {current}, newer than this devos-build knows ({SCHEMA_VERSION})\n  hint: use a newer devos-build, or point DEVOS_REGISTRY at another file",
                    self.path.display()
                );
            }
            if current >= target {
                return Ok(());
            }
            let sql = MIGRATIONS[usize::try_from(current)?];
            tx.execute_batch(sql).with_context(|| {
                format!(
                    "while migrating the registry {} to schema version {}",
                    self.path.display(),
                    current + 1
                )
            })?;
            tx.pragma_update(None, "user_version", current + 1)?;
            tx.commit()?;
        }
    }

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
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'built')
             ON CONFLICT(image_id, version) DO UPDATE SET
               build_id = excluded.build_id, dir = excluded.dir, spec = excluded.spec,
               manifest = excluded.manifest, built_at = excluded.built_at, state = 'built'",
            params![
                image_id,
                manifest.version,
                manifest.build_id,
                dir.to_string_lossy(),
                spec.to_string_lossy(),
                serde_json::to_string(manifest)?,
                now
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

    /// Record a boot-test run of `name@version` (no-op if the version is unknown).
    pub fn record_test(
        &mut self,
        name: &str,
        version: &str,
        run: &TestRun,
        report: &serde_json::Value,
    ) -> Result<()> {
        let tx = self.conn.transaction()?;
        if let Some(vid) = version_id(&tx, name, version)? {
            tx.execute(
                "INSERT INTO test_runs (version_id, started_at, passed, accelerator, seconds, report)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    vid,
                    run.started_at,
                    run.passed,
                    run.accelerator,
                    run.seconds,
                    report.to_string()
                ],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Every version of every image (or of `name`), newest first.
    pub fn versions(&self, name: Option<&str>) -> Result<Vec<VersionInfo>> {
        let mut stmt = self.conn.prepare(
            "SELECT v.id, i.name, v.version, v.build_id, v.dir, v.spec, v.built_at, v.state,
                    (SELECT passed FROM test_runs t WHERE t.version_id = v.id
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
    pub fn find(&self, reference: &str) -> Result<VersionInfo> {
        let (name, wanted) = match reference.split_once('@') {
            Some((n, v)) => (n, Some(v)),
            None => (reference, None),
        };
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

    pub fn manifest(&self, v: &VersionInfo) -> Result<Manifest> {
        let text: String =
            self.conn
                .query_row("SELECT manifest FROM versions WHERE id = ?1", [v.id], |r| {
                    r.get(0)
                })?;
        Ok(serde_json::from_str(&text)?)
    }

    pub fn files(&self, v: &VersionInfo) -> Result<Vec<FileEntry>> {
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

    pub fn test_runs(&self, v: &VersionInfo) -> Result<Vec<TestRun>> {
        let mut stmt = self.conn.prepare(
            "SELECT started_at, passed, accelerator, seconds FROM test_runs
             WHERE version_id = ?1 ORDER BY started_at DESC, id DESC",
        )?;
        let rows = stmt.query_map([v.id], |r| {
            Ok(TestRun {
                started_at: r.get(0)?,
                passed: r.get(1)?,
                accelerator: r.get(2)?,
                seconds: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The gate publishing and rollouts pass through: the version's latest boot test
    /// must have passed.
    pub fn require_passing(&self, reference: &str) -> Result<VersionInfo> {
        let v = self.find(reference)?;
        match v.tested {
            Some(true) => Ok(v),
            Some(false) => bail!(
                "{}@{} failed its last boot test; only versions that pass may be published or rolled out\n  hint: `devos-build image show {}@{}` shows the failure; fix it and build again",
                v.name,
                v.version,
                v.name,
                v.version
            ),
            None => bail!(
                "{}@{} has not been boot-tested; only versions that pass may be published or rolled out\n  hint: run `devos-build image test {}@{}`",
                v.name,
                v.version,
                v.name,
                v.version
            ),
        }
    }

    /// Record (or update) the publication of `v` in a region.
    pub fn record_publication(&mut self, v: &VersionInfo, p: &Publication) -> Result<()> {
        let now = now();
        self.conn.execute(
            "INSERT INTO publications
               (version_id, region, kind, snapshot_id, ami_id, parameter, state, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8)
             ON CONFLICT (version_id, region, kind) DO UPDATE SET
               snapshot_id = excluded.snapshot_id, ami_id = excluded.ami_id,
               parameter = excluded.parameter, state = excluded.state,
               updated_at = excluded.updated_at",
            params![
                v.id,
                p.region,
                p.kind,
                p.snapshot_ids.join(","),
                p.ami_id,
                p.parameter,
                p.state,
                now
            ],
        )?;
        Ok(())
    }

    /// Publications of every version (or of `name`, or of `name@version`), newest first.
    pub fn publications(
        &self,
        name: Option<&str>,
        version: Option<&str>,
    ) -> Result<Vec<Publication>> {
        let mut stmt = self.conn.prepare(
            "SELECT i.name, v.version, v.build_id, p.region, p.kind, p.ami_id, p.snapshot_id,
                    p.parameter, p.state, p.created_at, COALESCE(p.updated_at, p.created_at)
             FROM publications p JOIN versions v ON v.id = p.version_id
             JOIN images i ON i.id = v.image_id
             WHERE (?1 IS NULL OR i.name = ?1) AND (?2 IS NULL OR v.version = ?2)
             ORDER BY p.created_at DESC, p.id DESC",
        )?;
        let rows = stmt.query_map(params![name, version], |r| {
            let snapshots: Option<String> = r.get(6)?;
            Ok(Publication {
                name: r.get(0)?,
                version: r.get(1)?,
                build_id: r.get(2)?,
                region: r.get(3)?,
                kind: r.get(4)?,
                ami_id: r.get(5)?,
                snapshot_ids: snapshots
                    .unwrap_or_default()
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect(),
                parameter: r.get(7)?,
                state: r.get(8)?,
                created_at: r.get(9)?,
                updated_at: r.get(10)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Add (or replace) an artifact of `v`, e.g. an export made after the build.
    pub fn record_artifact(&mut self, v: &VersionInfo, a: &ArtifactRow) -> Result<()> {
        self.conn.execute(
            "INSERT INTO artifacts (version_id, file, format, sha256, size) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (version_id, file) DO UPDATE SET
               format = excluded.format, sha256 = excluded.sha256, size = excluded.size",
            params![v.id, a.file, a.format, a.sha256, a.size],
        )?;
        Ok(())
    }

    /// Record the start of a rollout; returns its id for [`Registry::finish_rollout`].
    pub fn start_rollout(
        &mut self,
        stack: &str,
        region: &str,
        kind: &str,
        from: Option<&VersionInfo>,
        to: &VersionInfo,
    ) -> Result<i64> {
        self.conn.execute(
            "INSERT INTO rollouts (stack, region, kind, from_version_id, to_version_id, state, started_at)
             VALUES (?1, ?2, ?3, ?4, ?5, 'in-progress', ?6)",
            params![stack, region, kind, from.map(|v| v.id), to.id, now()],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    pub fn rollout_issued(&mut self, id: i64, seconds: f64) -> Result<()> {
        self.conn.execute(
            "UPDATE rollouts SET issued_after = ?2 WHERE id = ?1",
            params![id, seconds],
        )?;
        Ok(())
    }

    pub fn finish_rollout(&mut self, id: i64, state: &str, reason: Option<&str>) -> Result<()> {
        self.conn.execute(
            "UPDATE rollouts SET state = ?2, reason = ?3, finished_at = ?4 WHERE id = ?1",
            params![id, state, reason, now()],
        )?;
        Ok(())
    }

    /// The rollouts of a stack (every stack if None), newest first.
    pub fn rollouts(&self, stack: Option<&str>, region: Option<&str>) -> Result<Vec<Rollout>> {
        let mut stmt = self.conn.prepare(
            "SELECT r.id, r.stack, r.region, r.kind, i.name, fv.version, tv.version, r.state,
                    r.reason, r.started_at, r.finished_at, r.issued_after
             FROM rollouts r JOIN versions tv ON tv.id = r.to_version_id
             JOIN images i ON i.id = tv.image_id
             LEFT JOIN versions fv ON fv.id = r.from_version_id
             WHERE (?1 IS NULL OR r.stack = ?1) AND (?2 IS NULL OR r.region = ?2)
             ORDER BY r.id DESC",
        )?;
        let rows = stmt.query_map(params![stack, region], |r| {
            Ok(Rollout {
                id: r.get(0)?,
                stack: r.get(1)?,
                region: r.get(2)?,
                kind: r.get(3)?,
                image: r.get(4)?,
                from: r.get(5)?,
                to: r.get(6)?,
                state: r.get(7)?,
                reason: r.get(8)?,
                started_at: r.get(9)?,
                finished_at: r.get(10)?,
                issued_after: r.get(11)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Mark `v` bad for a stack: rollouts of it to that stack are refused from now on.
    pub fn mark_bad(
        &mut self,
        stack: &str,
        region: &str,
        v: &VersionInfo,
        reason: &str,
    ) -> Result<()> {
        self.conn.execute(
            "INSERT INTO bad_versions (stack, region, version_id, reason, marked_at)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (stack, region, version_id) DO UPDATE SET
               reason = excluded.reason, marked_at = excluded.marked_at",
            params![stack, region, v.id, reason, now()],
        )?;
        Ok(())
    }

    /// Why `v` is marked bad for the stack, if it is.
    pub fn bad_reason(&self, stack: &str, region: &str, v: &VersionInfo) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row(
                "SELECT reason FROM bad_versions WHERE stack = ?1 AND region = ?2 AND version_id = ?3",
                params![stack, region, v.id],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Mark a version's artifacts as deleted (the row stays, for history and diffs).
    pub fn mark_removed(&mut self, v: &VersionInfo) -> Result<()> {
        self.conn.execute(
            "UPDATE versions SET state = 'removed' WHERE id = ?1",
            [v.id],
        )?;
        Ok(())
    }
}

fn version_id(conn: &Connection, name: &str, version: &str) -> Result<Option<i64>> {
    Ok(conn
        .query_row(
            "SELECT v.id FROM versions v JOIN images i ON i.id = v.image_id
             WHERE i.name = ?1 AND v.version = ?2",
            params![name, version],
            |r| r.get(0),
        )
        .optional()?)
}

#[cfg(test)]
mod tests;
