//! Rollouts of stacks from one version to another, and versions marked bad for a stack.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use rusqlite::{OptionalExtension, params};

use super::Registry;
use super::versions::VersionInfo;
use crate::model::states::ChangeState;
use crate::support::time::now;

/// One rollout of a stack from one version to another, as `fleet history` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Rollout {
    pub(crate) id: i64,
    pub(crate) stack: String,
    pub(crate) region: String,
    /// deploy, rollout, rollback or auto-rollback.
    pub(crate) kind: String,
    pub(crate) image: String,
    pub(crate) from: Option<String>,
    pub(crate) to: String,
    /// in-progress, interrupted, succeeded, failed, rolled-back, unchanged.
    pub(crate) state: ChangeState,
    pub(crate) reason: Option<String>,
    #[serde(serialize_with = "crate::support::time::serialize_iso")]
    pub(crate) started_at: u64,
    #[serde(serialize_with = "crate::support::time::serialize_iso_opt")]
    pub(crate) finished_at: Option<u64>,
    /// Seconds from the command's start to the stack update being issued.
    pub(crate) issued_after: Option<f64>,
    /// The values the parameters the change gave had before it (a parameter the stack
    /// did not have yet: the template's default for it).
    #[serde(skip)]
    pub(crate) parameters_before: BTreeMap<String, String>,
}

/// The locks this process holds (stacks', feeds'): one change of a stack at a time,
/// across processes. An in-place rollout changes no stack, so CloudFormation's own "in
/// progress" cannot keep a second one (or a replacement) from crossing it. A lock is
/// held until the process ends, so a rollout and the automatic rollback it starts
/// share it.
static HELD: Mutex<Vec<(PathBuf, File)>> = Mutex::new(Vec::new());

impl Registry {
    /// Hold the lock of `stack` in `region` — a file beside the registry — until this
    /// process ends, however it ends; an error naming it if another process holds it.
    /// Take it before reading what the change is planned from.
    pub(crate) fn lock_stack(&self, stack: &str, region: &str) -> Result<()> {
        self.hold_lock(&format!("fleet-{stack}@{region}"), |path| {
            format!(
                "another devos-build is changing stack {stack} in {region}, or deregistering an image while it checks what the stack runs (it holds {})\n  hint: wait for it to finish; `devos-build fleet status --stack {stack} --region {region}` shows where the instances are",
                path.display()
            )
        })
    }

    /// Hold the lock of the update feed at `location` (one publish to a feed at a time:
    /// each writes the index it read plus its version, so the second would drop the
    /// first's), as [`Registry::lock_stack`] does. `identity` names the feed however
    /// it was spelled (`FeedStore::identity`).
    pub(crate) fn lock_feed(&self, identity: &str, location: &str) -> Result<()> {
        let id = crate::support::digest::sha256_hex(identity.as_bytes());
        self.hold_lock(&format!("feed-{}", &id[..16]), |path| {
            format!(
                "another devos-build is publishing to the feed {location} (it holds {})\n  hint: wait for it to finish, then publish again",
                path.display()
            )
        })
    }

    /// Hold the lock of `v`'s AMIs (one publish or deregister of a version at a time: a
    /// second publish would take the first's snapshot in flight for one an earlier run
    /// left, and delete it), as [`Registry::lock_stack`] does.
    pub(crate) fn lock_publication(&self, v: &VersionInfo) -> Result<()> {
        self.hold_lock(&format!("ami-{}", v.build_id), |path| {
            format!(
                "another devos-build is publishing or deregistering {}@{} (it holds {})\n  hint: wait for it to finish, then run this again",
                v.name,
                v.version,
                path.display()
            )
        })
    }

    /// Hold the lock file `REGISTRY.WHAT.lock` until this process ends.
    fn hold_lock(&self, what: &str, busy: impl FnOnce(&std::path::Path) -> String) -> Result<()> {
        let name = self.path.file_name().unwrap_or_default().to_string_lossy();
        let path = self.path.with_file_name(format!("{name}.{what}.lock"));
        let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
        if held.iter().any(|(p, _)| *p == path) {
            return Ok(());
        }
        // Never through a symlink, never truncating: only the lock on it matters.
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .with_context(|| format!("cannot open the lock {}", path.display()))?;
        crate::support::paths::hand_over(&path)
            .with_context(|| format!("cannot give {} to the sudo user", path.display()))?;
        if file.try_lock().is_err() {
            bail!(busy(&path));
        }
        held.push((path, file));
        Ok(())
    }

    /// Record the start of a rollout (holding the stack's lock, if the command did not
    /// take it already); returns its id for [`Registry::finish_rollout`].
    pub(crate) fn start_rollout(
        &mut self,
        stack: &str,
        region: &str,
        kind: &str,
        from: Option<&VersionInfo>,
        to: &VersionInfo,
    ) -> Result<i64> {
        self.lock_stack(stack, region)?;
        self.conn.execute(
            "INSERT INTO rollouts (stack, region, kind, from_version_id, to_version_id, state, started_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                stack,
                region,
                kind,
                from.map(|v| v.id),
                to.id,
                ChangeState::InProgress,
                now()
            ],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Keep what the parameters rollout `id` gives were before it.
    pub(crate) fn rollout_parameters_before(
        &mut self,
        id: i64,
        before: &BTreeMap<String, String>,
    ) -> Result<()> {
        self.conn.execute(
            "UPDATE rollouts SET parameters_before = ?2 WHERE id = ?1",
            params![id, serde_json::to_string(before)?],
        )?;
        Ok(())
    }

    pub(crate) fn rollout_issued(&mut self, id: i64, seconds: f64) -> Result<()> {
        self.conn.execute(
            "UPDATE rollouts SET issued_after = ?2 WHERE id = ?1",
            params![id, seconds],
        )?;
        Ok(())
    }

    pub(crate) fn finish_rollout(
        &mut self,
        id: i64,
        state: ChangeState,
        reason: Option<&str>,
    ) -> Result<()> {
        self.conn.execute(
            "UPDATE rollouts SET state = ?2, reason = ?3, finished_at = ?4 WHERE id = ?1",
            params![id, state, reason, now()],
        )?;
        Ok(())
    }

    /// Finish every rollout of the stack still in progress as interrupted, saying `why`.
    /// Only the holder of the stack's lock calls it: any such rollout is then its own
    /// (ended by an error or a signal) or one of a process that ended without finishing it.
    /// How many there were.
    pub(crate) fn interrupt_unfinished(
        &mut self,
        stack: &str,
        region: &str,
        why: &str,
    ) -> Result<usize> {
        self.lock_stack(stack, region)?;
        Ok(self.conn.execute(
            "UPDATE rollouts SET state = ?3, reason = ?4, finished_at = ?5
             WHERE stack = ?1 AND region = ?2 AND state = ?6",
            params![
                stack,
                region,
                ChangeState::Interrupted,
                why,
                now(),
                ChangeState::InProgress
            ],
        )?)
    }

    /// Take up interrupted rollout `id` again (its judgement is to be made now).
    pub(crate) fn resume_rollout(&mut self, id: i64) -> Result<()> {
        self.conn.execute(
            "UPDATE rollouts SET state = ?2, reason = NULL, finished_at = NULL WHERE id = ?1",
            params![id, ChangeState::InProgress],
        )?;
        Ok(())
    }

    /// The rollouts of a stack (every stack if None), newest first.
    pub(crate) fn rollouts(
        &self,
        stack: Option<&str>,
        region: Option<&str>,
    ) -> Result<Vec<Rollout>> {
        let mut stmt = self.conn.prepare(
            "SELECT r.id, r.stack, r.region, r.kind, i.name, fv.version, tv.version, r.state,
                    r.reason, r.started_at, r.finished_at, r.issued_after, r.parameters_before
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
                parameters_before: r
                    .get::<_, Option<String>>(12)?
                    .and_then(|json| serde_json::from_str(&json).ok())
                    .unwrap_or_default(),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Mark `v` bad for a stack: rollouts of it to that stack are refused from now on.
    pub(crate) fn mark_bad(
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

    /// Take back the marks of `v` (every version if None) for a stack; how many there were.
    pub(crate) fn unmark_bad(
        &mut self,
        stack: &str,
        region: &str,
        v: Option<&VersionInfo>,
    ) -> Result<usize> {
        Ok(self.conn.execute(
            "DELETE FROM bad_versions WHERE stack = ?1 AND region = ?2 AND (?3 IS NULL OR version_id = ?3)",
            params![stack, region, v.map(|v| v.id)],
        )?)
    }

    /// Why `v` is marked bad for the stack, if it is.
    pub(crate) fn bad_reason(
        &self,
        stack: &str,
        region: &str,
        v: &VersionInfo,
    ) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row(
                "SELECT reason FROM bad_versions WHERE stack = ?1 AND region = ?2 AND version_id = ?3",
                params![stack, region, v.id],
                |r| r.get(0),
            )
            .optional()?)
    }
}
