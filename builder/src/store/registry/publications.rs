//! AMIs of a version, per region.

use anyhow::Result;
use rusqlite::params;

use super::Registry;
use super::versions::VersionInfo;
use crate::model::states::PublicationState;
use crate::support::time::now;

/// An AMI of one version in one region.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Publication {
    pub(crate) name: String,
    pub(crate) version: String,
    pub(crate) build_id: String,
    pub(crate) region: String,
    /// `ami` (EBS direct upload) or `packer`.
    pub(crate) kind: String,
    pub(crate) ami_id: Option<String>,
    pub(crate) snapshot_ids: Vec<String>,
    /// The SSM parameter holding the AMI id, if one was written.
    pub(crate) parameter: Option<String>,
    /// `available`, or `deregistered` once `publish deregister` removed it.
    pub(crate) state: PublicationState,
    #[serde(serialize_with = "crate::support::time::serialize_iso")]
    pub(crate) created_at: u64,
    #[serde(serialize_with = "crate::support::time::serialize_iso")]
    pub(crate) updated_at: u64,
}

impl Publication {
    /// A new, available publication of `v` (the registry stamps the times).
    pub(crate) fn available(
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
            state: PublicationState::Available,
            created_at: 0,
            updated_at: 0,
        }
    }
}

impl Registry {
    /// Record (or update) the publication of `v` in a region.
    pub(crate) fn record_publication(&mut self, v: &VersionInfo, p: &Publication) -> Result<()> {
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
    pub(crate) fn publications(
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
}
