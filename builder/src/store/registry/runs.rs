//! Boot-test runs of a version, and the gate that requires the latest to have passed.

use anyhow::{Result, bail};
use rusqlite::params;

use super::Registry;
use super::versions::{VersionInfo, version_id};

#[derive(Debug, Clone, serde::Serialize)]
pub struct TestRun {
    #[serde(serialize_with = "crate::support::time::serialize_iso")]
    pub started_at: u64,
    pub passed: bool,
    pub accelerator: String,
    pub seconds: f64,
}

impl Registry {
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

    pub(crate) fn test_runs(&self, v: &VersionInfo) -> Result<Vec<TestRun>> {
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
