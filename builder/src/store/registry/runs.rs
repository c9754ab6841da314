//! Boot-test runs of a version, and the gate that requires the latest to have passed.

use anyhow::{Result, bail};
use rusqlite::{OptionalExtension, params};

use super::Registry;
use super::versions::{VersionInfo, version_id};

#[derive(Debug, Clone, serde::Serialize)]
pub struct TestRun {
    #[serde(serialize_with = "crate::support::time::serialize_iso")]
    pub started_at: u64,
    pub passed: bool,
    pub accelerator: String,
    pub seconds: f64,
    /// The sha256 of the raw image the test booted. A run counts for its version only
    /// while the version's raw image is that one: a `--force` rebuild to other bytes
    /// needs a test of its own. (None: not known — a run recorded before this was.)
    pub raw_sha256: Option<String>,
    /// Why a failed run failed, as its report says (read back; not written from here:
    /// the report holds it).
    pub failure: Option<String>,
}

/// The disk a boot test booted: its file name and the sha256 of its bytes, read after
/// the run (the VM wrote only to its overlay).
pub struct Booted<'a> {
    pub file: &'a str,
    pub sha256: &'a str,
}

impl Registry {
    /// Record a boot-test run of `name@version` (false: the version is unknown), if
    /// what it booted is one of the version's artifacts as the registry holds it now,
    /// byte for byte: a copy whose bytes differ, a file the build did not make, or a
    /// version built again meanwhile is refused, and nothing is recorded. The run
    /// counts for the version's raw image as the registry holds it (`run.raw_sha256`
    /// is not read: a qcow2 that matches was converted from that raw image).
    pub fn record_test(
        &mut self,
        name: &str,
        version: &str,
        run: &TestRun,
        booted: &Booted,
        report: &serde_json::Value,
    ) -> Result<bool> {
        let tx = self.conn.transaction()?;
        let known = version_id(&tx, name, version)?;
        if let Some(vid) = known {
            let sha = |column: &str, value: &str| -> rusqlite::Result<Option<String>> {
                tx.query_row(
                    &format!(
                        "SELECT sha256 FROM artifacts WHERE version_id = ?1 AND {column} = ?2"
                    ),
                    params![vid, value],
                    |r| r.get(0),
                )
                .optional()
            };
            let hint = format!(
                "the result is not recorded\n  hint: test the version where the registry has it (`devos-build image test {name}@{version}`)"
            );
            match sha("file", booted.file)? {
                None => bail!(
                    "`{}`, which this test booted, is not one of {name}@{version}'s artifacts as the registry records them; {hint}",
                    booted.file
                ),
                Some(now) if now != booted.sha256 => bail!(
                    "`{}`, which this test booted (sha256 {}), is not {name}@{version}'s as the registry records it now ({now}): the version was built again meanwhile, or this is another copy; {hint}",
                    booted.file,
                    booted.sha256
                ),
                Some(_) => {}
            }
            let raw: Option<String> = sha("format", "raw")?;
            tx.execute(
                "INSERT INTO test_runs (version_id, started_at, passed, accelerator, seconds, report, raw_sha256)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    vid,
                    run.started_at,
                    run.passed,
                    run.accelerator,
                    run.seconds,
                    report.to_string(),
                    raw
                ],
            )?;
        }
        tx.commit()?;
        Ok(known.is_some())
    }

    pub(crate) fn test_runs(&self, v: &VersionInfo) -> Result<Vec<TestRun>> {
        let mut stmt = self.conn.prepare(
            "SELECT started_at, passed, accelerator, seconds, raw_sha256,
                CASE WHEN json_valid(report) THEN json_extract(report, '$.failure') END
             FROM test_runs WHERE version_id = ?1 ORDER BY started_at DESC, id DESC",
        )?;
        let rows = stmt.query_map([v.id], |r| {
            Ok(TestRun {
                started_at: r.get(0)?,
                passed: r.get(1)?,
                accelerator: r.get(2)?,
                seconds: r.get(3)?,
                raw_sha256: r.get(4)?,
                failure: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The gate publishing and rollouts pass through: the version's latest boot test
    /// must have passed.
    pub(crate) fn require_passing(&self, reference: &str) -> Result<VersionInfo> {
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
}
