//! The agent's state in SQLite: requests (with their plans, decisions and results) and
//! remembered rules. One connection, WAL, every change in a transaction.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};

use crate::request::{Remember, Request, Rule, State};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("agent state {path}: {source}")]
    Sql {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "agent state {path}: schema version {found} is newer than this agent ({supported}); upgrade devos-agent"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error(
        "agent state {path}: conversation {id} cannot be read ({why}); start a new one with `devos run`"
    )]
    Conversation {
        path: PathBuf,
        id: String,
        why: String,
    },
}

const MIGRATIONS: &[&str] = &[
    // v1
    "CREATE TABLE requests (
        id TEXT PRIMARY KEY,
        uid INTEGER NOT NULL,
        state TEXT NOT NULL,
        created TEXT NOT NULL,
        body TEXT NOT NULL
    );
    CREATE INDEX requests_by_uid ON requests (uid, created);
    CREATE TABLE rules (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        uid INTEGER NOT NULL,
        allow INTEGER NOT NULL,
        lifetime TEXT NOT NULL,
        command_prefix TEXT NOT NULL,
        path_prefix TEXT,
        created TEXT NOT NULL
    );",
    // v2: rules remember an exact action or a bounded prefix.
    "ALTER TABLE rules ADD COLUMN scope TEXT NOT NULL DEFAULT '{}';
    UPDATE rules SET scope = '{\"max-class\":\"writes-workdir\"}';",
    // v3: a short form of each request for listings (filled in on open).
    "ALTER TABLE requests ADD COLUMN summary TEXT;",
    // v4: conversations with the model, and the ledger of model calls.
    "CREATE TABLE conversations (
        id TEXT PRIMARY KEY,
        uid INTEGER NOT NULL,
        model TEXT NOT NULL,
        updated TEXT NOT NULL,
        turns TEXT NOT NULL
    );
    CREATE TABLE model_calls (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        uid INTEGER NOT NULL,
        user TEXT NOT NULL,
        request TEXT NOT NULL,
        model TEXT NOT NULL,
        at TEXT NOT NULL,
        day TEXT NOT NULL,
        input_tokens INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL,
        cache_read_tokens INTEGER NOT NULL,
        cache_write_tokens INTEGER NOT NULL,
        latency_ms INTEGER NOT NULL,
        cost_usd REAL,
        estimated INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX model_calls_by_day ON model_calls (day, uid);",
    // v5: one user's usage is read without the others' calls.
    "CREATE INDEX model_calls_by_user ON model_calls (uid, day);",
];

/// Days the ledger of model calls keeps (`Usage` reaches back this far; the audit log
/// keeps every call for good).
pub const LEDGER_DAYS: u32 = 400;

/// What a user spent on a day (`?2`) and in its month (days `?3` to `?4`), and what
/// everyone spent in the month: read through the day index.
const SPENT: &str = "SELECT
        COALESCE(SUM(CASE WHEN uid = ?1 AND day = ?2 THEN cost_usd END), 0),
        COALESCE(SUM(CASE WHEN uid = ?1 THEN cost_usd END), 0),
        COALESCE(SUM(cost_usd), 0)
    FROM model_calls WHERE day BETWEEN ?3 AND ?4";

/// Usage per day, user and model since `?1`, of the calls `filter` (given `?2`, a
/// uid or NULL) lets through.
macro_rules! usage_query {
    ($filter:literal) => {
        concat!(
            "SELECT day, uid, MAX(user), model, COUNT(*), SUM(input_tokens),
                SUM(output_tokens), SUM(cache_read_tokens), SUM(cache_write_tokens),
                COALESCE(SUM(cost_usd), 0), SUM(cost_usd IS NULL), SUM(estimated)
            FROM model_calls WHERE ",
            $filter,
            " GROUP BY day, uid, model ORDER BY day DESC, uid, model"
        )
    };
}

/// One user's usage, read through their (uid, day) index.
const USAGE_OF_ONE: &str = usage_query!("uid = ?2 AND day >= ?1");

/// Everyone's usage (`?2` NULL), read through the day index.
const USAGE_OF_ALL: &str = usage_query!("day >= ?1 AND ?2 IS NULL");

const CONVERSATION_INDEX: &str = "CREATE INDEX IF NOT EXISTS requests_by_conversation
    ON requests (uid, json_extract(body, '$.conversation'))";

/// Drop conversation `?2` of user `?1` unless one of their requests belongs to it:
/// looked up in [`CONVERSATION_INDEX`], however many and large the requests are.
const DROP_CONVERSATION: &str = "DELETE FROM conversations WHERE uid = ?1 AND id = ?2
    AND NOT EXISTS (SELECT 1 FROM requests
                    WHERE uid = ?1 AND json_extract(body, '$.conversation') = ?2)";

/// Output kept per action in a listing; `Get` has all of it.
pub const LISTING_OUTPUT: usize = 16 << 10;

/// The parts of a rule kept as JSON.
#[derive(Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Scope {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exact: Option<crate::request::Exact>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_class: Option<crate::risk::RiskClass>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    approved: Option<crate::risk::Risk>,
}

pub struct Store {
    path: PathBuf,
    conn: Connection,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let err = |source| StoreError::Sql {
            path: path.to_path_buf(),
            source,
        };
        let mut conn = Connection::open(path).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(err)?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(err)?;
        let supported = MIGRATIONS.len() as i64;
        if version > supported {
            return Err(StoreError::TooNew {
                path: path.to_path_buf(),
                found: version,
                supported,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.transaction().map_err(err)?;
            tx.execute_batch(sql).map_err(err)?;
            tx.pragma_update(None, "user_version", i as i64 + 1)
                .map_err(err)?;
            tx.commit().map_err(err)?;
        }
        // Which conversation each request belongs to, so that pruning finds the ones
        // left without parsing every request (made on open, outside the numbered
        // migrations: an older agent, after a rollback, still opens the store).
        conn.execute_batch(CONVERSATION_INDEX).map_err(err)?;
        let store = Store {
            path: path.to_path_buf(),
            conn,
        };
        store.fill_summaries()?;
        Ok(store)
    }

    /// Requests saved before listings had their short form get it.
    fn fill_summaries(&self) -> Result<(), StoreError> {
        let missing =
            self.query_requests("SELECT body FROM requests WHERE summary IS NULL", params![])?;
        for r in &missing {
            self.save_request(r)?;
        }
        Ok(())
    }

    fn err(&self) -> impl FnOnce(rusqlite::Error) -> StoreError + '_ {
        |source| StoreError::Sql {
            path: self.path.clone(),
            source,
        }
    }

    /// After a restart: requests that were in flight are cancelled (their actions
    /// cannot resume) and session rules are forgotten.
    pub fn recover(&mut self, now: &str) -> Result<usize, StoreError> {
        let open: Vec<Request> = self.query_requests(
            "SELECT body FROM requests WHERE state NOT IN ('unplanned','done','failed','denied','cancelled')",
            params![],
        )?;
        for mut r in open.iter().cloned() {
            r.state = State::Cancelled;
            r.error = Some("the agent restarted while this request was in flight".into());
            r.updated = now.to_owned();
            self.save_request(&r)?;
        }
        self.conn
            .execute("DELETE FROM rules WHERE lifetime = 'session'", [])
            .map_err(self.err())?;
        Ok(open.len())
    }

    pub fn save_request(&self, r: &Request) -> Result<(), StoreError> {
        let body = serde_json::to_string(r).unwrap_or_default();
        let summary = serde_json::to_string(&r.shortened(LISTING_OUTPUT)).unwrap_or_default();
        self.conn
            .execute(
                "INSERT INTO requests (id, uid, state, created, body, summary)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(id) DO UPDATE SET
                    state = excluded.state, body = excluded.body, summary = excluded.summary",
                params![r.id, r.uid, r.state.as_str(), r.created, body, summary],
            )
            .map_err(self.err())?;
        Ok(())
    }

    pub fn request(&self, id: &str) -> Result<Option<Request>, StoreError> {
        Ok(self
            .query_requests("SELECT body FROM requests WHERE id = ?1", params![id])?
            .pop())
    }

    /// Requests newest first, of one user (or all, for root), optionally only those
    /// still in flight, in their short form (outputs cut to [`LISTING_OUTPUT`]) as a
    /// JSON array; `Err(count)` once more than `max_bytes` would be needed for the
    /// first `count` of them.
    pub fn listing(
        &self,
        uid: Option<u32>,
        active_only: bool,
        limit: u32,
        max_bytes: usize,
    ) -> Result<Result<String, usize>, StoreError> {
        let active = if active_only {
            "AND state NOT IN ('unplanned','done','failed','denied','cancelled')"
        } else {
            ""
        };
        let sql = format!(
            "SELECT summary FROM requests WHERE (?1 IS NULL OR uid = ?1) {active}
             ORDER BY created DESC, rowid DESC LIMIT ?2"
        );
        let mut stmt = self.conn.prepare_cached(&sql).map_err(self.err())?;
        let mut rows = stmt.query(params![uid, limit]).map_err(self.err())?;
        let mut out = String::from("[");
        let mut count = 0;
        while let Some(row) = rows.next().map_err(self.err())? {
            let Some(summary) = row.get::<_, Option<String>>(0).map_err(self.err())? else {
                continue;
            };
            count += 1;
            if out.len() + summary.len() + 2 > max_bytes {
                return Ok(Err(count));
            }
            if count > 1 {
                out.push(',');
            }
            out.push_str(&summary);
        }
        out.push(']');
        Ok(Ok(out))
    }

    fn query_requests(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<Request>, StoreError> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(self.err())?;
        let rows = stmt
            .query_map(params, |row| row.get::<_, String>(0))
            .map_err(self.err())?;
        let mut out = Vec::new();
        for body in rows {
            let body = body.map_err(self.err())?;
            // (One request that cannot be read does not hide the others; the log says so.)
            match serde_json::from_str(&body) {
                Ok(r) => out.push(r),
                Err(e) => tracing::warn!(
                    "agent state {}: a request cannot be read ({e}); it is left out",
                    self.path.display()
                ),
            }
        }
        Ok(out)
    }

    /// Add `rule` only once `record` has put it on record (given the rule with its
    /// id): it is inserted in a transaction, `record` runs inside it, and the
    /// transaction is committed when `record` succeeds and rolled back when it fails.
    /// Until the commit no one sees the rule — not another connection, nor a caller
    /// of this one, which the agent keeps behind a lock held across the call — so a
    /// rule never exists before its record; a crash between the two leaves a record
    /// of a rule that was never added (the safe way round), never the reverse.
    pub fn add_rule_recorded<E: From<StoreError>>(
        &self,
        rule: &Rule,
        record: impl FnOnce(&Rule) -> Result<(), E>,
    ) -> Result<Rule, E> {
        let tx = self.conn.unchecked_transaction().map_err(self.err())?;
        let rule = self.add_rule(rule)?;
        // (Dropping `tx` without a commit rolls the insert back.)
        record(&rule)?;
        tx.commit().map_err(self.err())?;
        Ok(rule)
    }

    /// Add `rule` as it is (see [`Store::add_rule_recorded`] for the agent's way).
    pub fn add_rule(&self, rule: &Rule) -> Result<Rule, StoreError> {
        self.conn
            .execute(
                "INSERT INTO rules (uid, allow, lifetime, command_prefix, path_prefix, created, scope)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    rule.uid,
                    rule.allow,
                    lifetime_str(rule.lifetime),
                    serde_json::to_string(&rule.command_prefix).unwrap_or_default(),
                    rule.path_prefix
                        .as_ref()
                        .map(|p| p.to_string_lossy().into_owned()),
                    rule.created,
                    serde_json::to_string(&Scope {
                        exact: rule.exact.clone(),
                        max_class: rule.max_class,
                        approved: rule.approved.clone(),
                    })
                    .unwrap_or_default(),
                ],
            )
            .map_err(self.err())?;
        Ok(Rule {
            id: self.conn.last_insert_rowid(),
            ..rule.clone()
        })
    }

    /// One user's rules, or everyone's (`None`, for root).
    pub fn rules(&self, uid: Option<u32>) -> Result<Vec<Rule>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, uid, allow, lifetime, command_prefix, path_prefix, created, scope FROM rules
                 WHERE ?1 IS NULL OR uid = ?1 ORDER BY id",
            )
            .map_err(self.err())?;
        let rows = stmt
            .query_map(params![uid], |row| {
                let lifetime: String = row.get(3)?;
                let prefix: String = row.get(4)?;
                let scope: Scope =
                    serde_json::from_str(&row.get::<_, String>(7)?).unwrap_or_default();
                Ok(Rule {
                    id: row.get(0)?,
                    uid: row.get(1)?,
                    allow: row.get(2)?,
                    lifetime: lifetime.parse().unwrap_or(Remember::Once),
                    command_prefix: serde_json::from_str(&prefix).unwrap_or_default(),
                    path_prefix: row.get::<_, Option<String>>(5)?.map(PathBuf::from),
                    exact: scope.exact,
                    max_class: scope.max_class,
                    approved: scope.approved,
                    created: row.get(6)?,
                })
            })
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    pub fn rule(&self, id: i64) -> Result<Option<Rule>, StoreError> {
        Ok(self.rules(None)?.into_iter().find(|r| r.id == id))
    }

    pub fn remove_rule(&self, id: i64) -> Result<bool, StoreError> {
        let n = self
            .conn
            .execute("DELETE FROM rules WHERE id = ?1", params![id])
            .map_err(self.err())?;
        Ok(n > 0)
    }

    /// Drop `uid`'s finished requests beyond the newest `keep`, and the
    /// conversations none of the remaining ones belongs to.
    pub fn prune(&self, uid: u32, keep: u32) -> Result<usize, StoreError> {
        const DROPPED: &str = "FROM requests WHERE uid = ?1
            AND state IN ('unplanned','done','failed','denied','cancelled')
            AND rowid NOT IN (SELECT rowid FROM requests WHERE uid = ?1
                              ORDER BY created DESC, rowid DESC LIMIT ?2)";
        let tx = self.conn.unchecked_transaction().map_err(self.err())?;
        // Only the dropped requests are read (not every request of the user, each up
        // to megabytes of output): their conversations may go with them.
        let conversations: Vec<String> = tx
            .prepare(&format!(
                "SELECT DISTINCT json_extract(body, '$.conversation') {DROPPED}
                 AND json_extract(body, '$.conversation') IS NOT NULL"
            ))
            .and_then(|mut s| {
                s.query_map(params![uid, keep], |r| r.get(0))?
                    .collect::<Result<_, _>>()
            })
            .map_err(self.err())?;
        let dropped = tx
            .execute(&format!("DELETE {DROPPED}"), params![uid, keep])
            .map_err(self.err())?;
        for id in &conversations {
            tx.execute(DROP_CONVERSATION, params![uid, id])
                .map_err(self.err())?;
        }
        tx.commit().map_err(self.err())?;
        Ok(dropped)
    }

    /// How many rules `uid` has.
    pub fn count_rules(&self, uid: u32) -> Result<u64, StoreError> {
        self.conn
            .query_row("SELECT count(*) FROM rules WHERE uid = ?1", [uid], |r| {
                r.get(0)
            })
            .map_err(self.err())
    }

    /// How many requests are stored: one user's, or everyone's (`None`).
    pub fn count_requests(&self, uid: Option<u32>) -> Result<u64, StoreError> {
        self.conn
            .query_row(
                "SELECT count(*) FROM requests WHERE ?1 IS NULL OR uid = ?1",
                params![uid],
                |r| r.get(0),
            )
            .optional()
            .map(|n| n.unwrap_or(0))
            .map_err(self.err())
    }
}

/// One model call on the ledger.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ModelCall {
    pub uid: u32,
    pub user: String,
    pub request: String,
    pub model: String,
    /// RFC 3339, UTC.
    pub at: String,
    pub usage: crate::model::bedrock::Usage,
    pub latency_ms: u64,
    /// `None` when the model has no price in the configuration.
    pub cost_usd: Option<f64>,
    /// The call did not finish (cancelled, or failed mid-answer): its tokens are
    /// estimated from what was sent and what streamed back.
    pub estimated: bool,
}

/// Calls of one user to one model on one day, summed.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct UsageRow {
    pub day: String,
    pub uid: u32,
    pub user: String,
    pub model: String,
    pub calls: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
    /// The cost of the calls with a known price.
    pub cost_usd: f64,
    /// Calls whose cost is unknown (a model without a price).
    pub unpriced_calls: u64,
    /// Calls that did not finish, counted at an estimate.
    pub estimated_calls: u64,
}

/// What was spent in a period, for budgets.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Spent {
    pub user_today: f64,
    pub user_month: f64,
    pub machine_month: f64,
}

impl Store {
    /// A conversation's turns and model, if it exists and is `uid`'s.
    pub fn conversation(
        &self,
        id: &str,
        uid: u32,
    ) -> Result<Option<(String, crate::model::conversation::Conversation)>, StoreError> {
        let row: Option<(String, String)> = self
            .conn
            .query_row(
                "SELECT model, turns FROM conversations WHERE id = ?1 AND uid = ?2",
                params![id, uid],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(self.err())?;
        let Some((model, turns)) = row else {
            return Ok(None);
        };
        let turns = serde_json::from_str(&turns).map_err(|e| StoreError::Conversation {
            path: self.path.clone(),
            id: id.to_owned(),
            why: e.to_string(),
        })?;
        Ok(Some((
            model,
            crate::model::conversation::Conversation { turns },
        )))
    }

    pub fn save_conversation(
        &self,
        id: &str,
        uid: u32,
        model: &str,
        conversation: &crate::model::conversation::Conversation,
        now: &str,
    ) -> Result<(), StoreError> {
        let turns = serde_json::to_string(&conversation.turns).unwrap_or_default();
        self.conn
            .execute(
                "INSERT INTO conversations (id, uid, model, updated, turns) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(id) DO UPDATE SET model = excluded.model,
                    updated = excluded.updated, turns = excluded.turns",
                params![id, uid, model, now, turns],
            )
            .map_err(self.err())?;
        Ok(())
    }

    /// Put a model call on the ledger.
    pub fn record_model_call(&self, call: &ModelCall) -> Result<(), StoreError> {
        let u = &call.usage;
        let day = call.at.get(..10).unwrap_or(&call.at);
        self.conn
            .execute(
                "INSERT INTO model_calls (uid, user, request, model, at, day, input_tokens,
                    output_tokens, cache_read_tokens, cache_write_tokens, latency_ms, cost_usd,
                    estimated)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                params![
                    call.uid,
                    call.user,
                    call.request,
                    call.model,
                    call.at,
                    day,
                    u.input as i64,
                    u.output as i64,
                    u.cache_read as i64,
                    u.cache_write as i64,
                    call.latency_ms as i64,
                    call.cost_usd,
                    call.estimated,
                ],
            )
            .map_err(self.err())?;
        // What has left the ledger's window (counted back from this call, i.e. the
        // clock) goes as the next call comes (an index range, empty on most calls). The
        // call is recorded either way: a failure here only keeps old calls longer.
        if let Err(e) = self.conn.execute(
            &format!("DELETE FROM model_calls WHERE day < date(?1, '-{LEDGER_DAYS} days')"),
            params![day],
        ) {
            tracing::warn!(
                "cannot drop model calls older than {LEDGER_DAYS} days from the ledger: {e}"
            );
        }
        Ok(())
    }

    /// What `uid` spent on `day` (`YYYY-MM-DD`) and in its month, and what everyone
    /// spent in that month.
    pub fn spent(&self, uid: u32, day: &str) -> Result<Spent, StoreError> {
        // The month as a range of days, which the day index serves.
        let month = day.get(..7).unwrap_or(day);
        let (first, last) = (format!("{month}-01"), format!("{month}-31"));
        self.conn
            .query_row(SPENT, params![uid, day, first, last], |r| {
                Ok(Spent {
                    user_today: r.get(0)?,
                    user_month: r.get(1)?,
                    machine_month: r.get(2)?,
                })
            })
            .map_err(self.err())
    }

    /// Usage per day, user and model since `since` (`YYYY-MM-DD`), newest day
    /// first: one user's, or everyone's (`None`).
    pub fn usage(&self, uid: Option<u32>, since: &str) -> Result<Vec<UsageRow>, StoreError> {
        let sql = if uid.is_some() {
            USAGE_OF_ONE
        } else {
            USAGE_OF_ALL
        };
        let mut stmt = self.conn.prepare_cached(sql).map_err(self.err())?;
        let rows = stmt
            .query_map(params![since, uid], |r| {
                let n = |i: usize| r.get::<_, i64>(i).map(|v| v.max(0) as u64);
                Ok(UsageRow {
                    day: r.get(0)?,
                    uid: r.get(1)?,
                    user: r.get(2)?,
                    model: r.get(3)?,
                    calls: n(4)?,
                    input_tokens: n(5)?,
                    output_tokens: n(6)?,
                    cache_read_tokens: n(7)?,
                    cache_write_tokens: n(8)?,
                    cost_usd: r.get(9)?,
                    unpriced_calls: n(10)?,
                    estimated_calls: n(11)?,
                })
            })
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }
}

fn lifetime_str(l: Remember) -> &'static str {
    match l {
        Remember::Once => "once",
        Remember::Session => "session",
        Remember::Always => "always",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Query plans of `sql` with `params`, as SQLite says them.
    fn plan(store: &Store, sql: &str, params: impl rusqlite::Params) -> Vec<String> {
        store
            .conn
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .unwrap()
            .query_map(params, |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn the_ledger_keeps_its_window_and_is_read_by_ranges_of_its_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).unwrap();
        let call = |uid: u32, at: &str, cost: f64| {
            store
                .record_model_call(&ModelCall {
                    uid,
                    user: format!("u{uid}"),
                    request: "r".into(),
                    model: "m".into(),
                    at: at.into(),
                    usage: Default::default(),
                    latency_ms: 1,
                    cost_usd: Some(cost),
                    estimated: false,
                })
                .unwrap()
        };
        call(1000, "2025-12-31T23:59:59Z", 1.0);
        call(1000, "2026-01-01T00:00:00Z", 2.0);
        call(1000, "2026-01-31T12:00:00Z", 4.0);
        call(1001, "2026-01-15T12:00:00Z", 8.0);
        call(1000, "2026-02-01T00:00:00Z", 16.0);
        // A month is its own days, the 31st included.
        let spent = store.spent(1000, "2026-01-31").unwrap();
        assert_eq!(
            (spent.user_today, spent.user_month, spent.machine_month),
            (4.0, 6.0, 14.0)
        );
        let mine = store.usage(Some(1000), "2026-01-01").unwrap();
        assert_eq!(
            mine.iter().map(|r| r.day.as_str()).collect::<Vec<_>>(),
            ["2026-02-01", "2026-01-31", "2026-01-01"]
        );
        assert_eq!(store.usage(None, "2026-01-01").unwrap().len(), 4);
        // Neither a budget check nor one user's usage reads the whole ledger.
        let month = plan(
            &store,
            SPENT,
            params![1000, "2026-01-31", "2026-01-01", "2026-01-31"],
        );
        assert!(
            month
                .iter()
                .any(|l| l.contains("INDEX model_calls_by_day (day>? AND day<?)")),
            "{month:?}"
        );
        let user = plan(&store, USAGE_OF_ONE, params!["0000-01-01", 1000]);
        assert!(
            user.iter()
                .any(|l| l.contains("INDEX model_calls_by_user (uid=? AND day>?)")),
            "{user:?}"
        );
        let all = plan(&store, USAGE_OF_ALL, params!["2026-01-01", None::<u32>]);
        assert!(
            all.iter()
                .any(|l| l.contains("INDEX model_calls_by_day (day>?)")),
            "{all:?}"
        );
        // 400 days after, the calls older than the window are gone with the next call.
        call(1001, "2027-02-06T00:00:00Z", 0.0);
        let kept = store.usage(None, "0000-01-01").unwrap();
        assert_eq!(
            kept.iter().map(|r| r.day.as_str()).collect::<Vec<_>>(),
            ["2027-02-06", "2026-02-01", "2026-01-31", "2026-01-15"]
        );
    }

    #[test]
    fn pruning_drops_the_conversations_left_without_requests_found_by_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).unwrap();
        let conversation = crate::model::conversation::Conversation { turns: Vec::new() };
        for (n, c) in ["c1", "c2", "c2", "c3"].iter().enumerate() {
            let mut r = Request::new(
                format!("r{n}"),
                1000,
                "u".into(),
                "t".into(),
                "/".into(),
                format!("2026-01-0{}T00:00:00Z", n + 1),
            );
            r.state = State::Done;
            r.conversation = Some(c.to_string());
            store.save_request(&r).unwrap();
            store
                .save_conversation(c, 1000, "m", &conversation, "now")
                .unwrap();
        }
        // Someone else's conversation of the same name stays.
        store
            .save_conversation("c9", 1001, "m", &conversation, "now")
            .unwrap();
        // The two oldest go: c1 with its only request, c2 stays for r2.
        assert_eq!(store.prune(1000, 2).unwrap(), 2);
        assert!(store.conversation("c1", 1000).unwrap().is_none());
        assert!(store.conversation("c2", 1000).unwrap().is_some());
        assert!(store.conversation("c3", 1000).unwrap().is_some());
        assert!(store.conversation("c9", 1001).unwrap().is_some());

        // Whether a conversation still has requests is an index lookup, not a read
        // of every request.
        let plan = plan(&store, DROP_CONVERSATION, params![1000, "c2"]);
        assert!(
            plan.iter()
                .any(|l| l.contains("INDEX requests_by_conversation (uid=? AND")),
            "{plan:?}"
        );
        // Opening again keeps the index (and does not fail on it).
        drop(store);
        Store::open(&dir.path().join("state.db")).unwrap();
    }

    #[test]
    fn a_rule_exists_only_once_its_record_is_written() {
        /// Why a test's record failed, or the store's error.
        #[derive(Debug)]
        enum Recording {
            NotRecorded,
            Store(#[allow(dead_code)] StoreError),
        }
        impl From<StoreError> for Recording {
            fn from(e: StoreError) -> Self {
                Recording::Store(e)
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let store = Store::open(&path).unwrap();
        // Another reader of the store (as another agent's `Decider` would read it).
        let other = Connection::open(&path).unwrap();
        let seen = || -> i64 {
            other
                .query_row("SELECT count(*) FROM rules", [], |r| r.get(0))
                .unwrap()
        };
        let rule = Rule::new(
            1000,
            true,
            Remember::Always,
            vec!["git".into(), "commit".into()],
            None,
            "t".into(),
        );
        // A record that cannot be written: no rule, then or after.
        let failed = store.add_rule_recorded(&rule, |r| {
            assert!(r.id > 0);
            assert_eq!(seen(), 0, "the rule exists before its record");
            Err(Recording::NotRecorded)
        });
        assert!(matches!(failed, Err(Recording::NotRecorded)), "{failed:?}");
        assert_eq!(seen(), 0);
        assert!(store.rules(None).unwrap().is_empty());
        // A record written: the rule it names (with its id) exists after it.
        let mut recorded = None;
        let added = store
            .add_rule_recorded(&rule, |r| {
                assert_eq!(seen(), 0, "the rule exists before its record");
                recorded = Some(r.clone());
                Ok::<_, Recording>(())
            })
            .unwrap();
        assert_eq!(recorded.as_ref(), Some(&added));
        assert_eq!(seen(), 1);
        assert_eq!(store.rules(None).unwrap(), vec![added]);
    }

    #[test]
    fn rules_round_trip_and_session_rules_do_not_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let mut store = Store::open(&path).unwrap();
        let base = Rule {
            id: 0,
            uid: 1000,
            allow: true,
            lifetime: Remember::Always,
            command_prefix: vec!["git".into(), "status".into()],
            path_prefix: None,
            exact: None,
            max_class: Some(crate::risk::RiskClass::ReadOnly),
            approved: None,
            created: "t".into(),
        };
        let a = store.add_rule(&base).unwrap();
        store
            .add_rule(&Rule {
                lifetime: Remember::Session,
                uid: 1001,
                ..base.clone()
            })
            .unwrap();
        assert_eq!(store.rules(Some(1000)).unwrap(), vec![a.clone()]);
        assert_eq!(store.rules(None).unwrap().len(), 2);
        store.recover("t").unwrap();
        assert_eq!(store.rules(None).unwrap(), vec![a.clone()]);
        assert!(store.remove_rule(a.id).unwrap());
        assert!(!store.remove_rule(a.id).unwrap());
        drop(store);
        // Reopening runs no migration twice.
        Store::open(&path).unwrap();
    }
}
