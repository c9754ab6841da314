//! One user's index: an SQLite database only root can read (`<state-dir>/context/UID/
//! index.db`, 0600 in a 0700 directory), written from the watcher's updates and
//! queried by the daemon.
//!
//! Paths are kept relative to their project, with an FTS5 trigram index over them
//! (substring search in any part of a path, in milliseconds). The database never grows
//! past `[context] max-index-mib` (SQLite's `max_page_count`) nor past `max-files`
//! entries; a database SQLite finds corrupt is moved aside and rebuilt from the
//! project list, which is also kept beside it as JSON.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{Entry, Kind, Mode, Update, git::GitState};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS projects (
    id INTEGER PRIMARY KEY,
    root TEXT NOT NULL UNIQUE,
    auto INTEGER NOT NULL,
    added INTEGER NOT NULL,
    mode TEXT NOT NULL DEFAULT '{\"mode\":\"scanning\"}',
    scanned_at INTEGER,
    scan_millis INTEGER,
    complete INTEGER NOT NULL DEFAULT 1,
    git TEXT,
    text INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY,
    project INTEGER NOT NULL,
    rel TEXT NOT NULL,
    kind TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime INTEGER NOT NULL,
    lang TEXT,
    ignored INTEGER NOT NULL,
    UNIQUE (project, rel)
);
CREATE INDEX IF NOT EXISTS files_mtime ON files (mtime);
CREATE VIRTUAL TABLE IF NOT EXISTS files_fts USING fts5 (
    rel, content = 'files', content_rowid = 'id', tokenize = 'trigram'
);
CREATE TRIGGER IF NOT EXISTS files_ai AFTER INSERT ON files BEGIN
    INSERT INTO files_fts (rowid, rel) VALUES (new.id, new.rel);
END;
CREATE VIRTUAL TABLE IF NOT EXISTS texts USING fts5 (
    body, tokenize = 'unicode61 remove_diacritics 2'
);
CREATE TRIGGER IF NOT EXISTS files_ad AFTER DELETE ON files BEGIN
    INSERT INTO files_fts (files_fts, rowid, rel) VALUES ('delete', old.id, old.rel);
    DELETE FROM texts WHERE rowid = old.id;
END;
PRAGMA user_version = 2;
";

/// The schema version `SCHEMA` sets; an index of another is rebuilt (it is a cache of
/// the file system, and the project list is kept beside it).
const SCHEMA_VERSION: i64 = 2;

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the context index {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
}

/// Why entries are dropped once the database is as large as it may grow.
const FULL: &str = "the index reached [context] max-index-mib; raise it or remove a project";

/// Whether an SQLite error says the file is damaged (or not a database at all).
pub fn is_corrupt(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
    )
}

/// A registered project, as the user sees it in `devos context list`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ProjectInfo {
    pub root: PathBuf,
    /// Registered because a request ran in it (not by `devos context add`).
    pub auto: bool,
    pub added: i64,
    #[serde(flatten)]
    pub mode: Mode,
    pub entries: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scanned_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scan_millis: Option<u64>,
    /// The last scan reached every entry (false: it stopped at `max-files`).
    pub complete: bool,
    /// The text of its small text files is indexed too.
    pub text: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_branch: Option<String>,
}

/// One search result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Hit {
    pub path: String,
    pub project: String,
    pub kind: Kind,
    pub size: u64,
    pub mtime: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lang: Option<String>,
    pub ignored: bool,
    /// Where the words are, for a text search: `[`word`]` in up to 12 words around it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snippet: Option<String>,
}

/// The fewest characters a prefix (`word*`) of a text search has.
pub const MIN_PREFIX: usize = 3;

/// The scan in progress: what it has reported so far, as keyed hashes of the paths
/// (8 bytes each, whatever the paths' length: a scan of the most entries a project may
/// have, each with a path of the longest, keeps a few MiB, not gigabytes).
struct Scan {
    project: i64,
    under: String,
    seen: HashSet<u64>,
    keys: std::collections::hash_map::RandomState,
}

impl Scan {
    fn saw(&mut self, rel: &str) {
        let h = std::hash::BuildHasher::hash_one(&self.keys, rel);
        self.seen.insert(h);
    }

    fn has_seen(&self, rel: &str) -> bool {
        self.seen
            .contains(&std::hash::BuildHasher::hash_one(&self.keys, rel))
    }
}

pub struct Index {
    path: PathBuf,
    conn: Connection,
    max_files: u64,
    scan: Option<Scan>,
    /// Entries not taken because of `max-files` or the size limit, since the start.
    pub dropped: u64,
    /// Why entries are being dropped.
    pub full: Option<String>,
    /// When the database was found corrupt and where it was moved.
    pub rebuilt: Option<Value>,
}

impl Index {
    /// Open (or create) the index at `path`; a corrupt one is moved aside and a new
    /// one made.
    pub fn open(path: &Path, max_files: u64, max_mib: u64) -> Result<Index, IndexError> {
        let dir = path.parent().unwrap_or(Path::new("/"));
        create_private_dir(dir)?;
        let mut rebuilt = None;
        let conn = match open_checked(path, max_mib) {
            Ok(c) => c,
            Err(e) if is_corrupt(&e) => {
                let aside =
                    path.with_extension(format!("db.corrupt-{}", crate::caller::now_secs()));
                std::fs::rename(path, &aside).map_err(|source| IndexError::Io {
                    path: path.to_path_buf(),
                    source,
                })?;
                for suffix in ["-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
                }
                tracing::warn!(
                    "the context index {} was corrupt ({e}); moved to {} and rebuilt",
                    path.display(),
                    aside.display()
                );
                rebuilt = Some(json!({
                    "at": crate::caller::now_secs(),
                    "error": e.to_string(),
                    "moved-to": aside,
                }));
                open_checked(path, max_mib).map_err(|source| IndexError::Sqlite {
                    path: path.to_path_buf(),
                    source,
                })?
            }
            Err(source) => {
                return Err(IndexError::Sqlite {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        Ok(Index {
            path: path.to_path_buf(),
            conn,
            max_files,
            scan: None,
            dropped: 0,
            full: None,
            rebuilt,
        })
    }

    fn err(&self, source: rusqlite::Error) -> IndexError {
        IndexError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Register a project (again: nothing changes but `auto`, which only goes down, and
    /// `text`, which only goes up: a project once asked for with its text keeps it until
    /// it is removed).
    pub fn add_project(&self, root: &Path, auto: bool, text: bool) -> Result<(), IndexError> {
        self.conn
            .execute(
                "INSERT INTO projects (root, auto, added, text) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (root) DO UPDATE SET auto = min(auto, excluded.auto),
                     text = max(text, excluded.text)",
                params![
                    path_text(root),
                    auto,
                    crate::caller::now_secs() as i64,
                    text
                ],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// The projects as the watcher resumes them: root, whether their text is indexed,
    /// and the files whose text the index has, with the mtime and size they had.
    pub fn project_jobs(&self) -> Result<Vec<super::ProjectJob>, IndexError> {
        let mut jobs = Vec::new();
        for p in self.projects()? {
            let mut known = Vec::new();
            if p.text {
                let mut stmt = self
                    .conn
                    .prepare_cached(
                        "SELECT f.rel, f.mtime, f.size FROM files f
                         JOIN projects p ON p.id = f.project
                         JOIN texts t ON t.rowid = f.id WHERE p.root = ?1",
                    )
                    .map_err(|e| self.err(e))?;
                known = stmt
                    .query_map([path_text(&p.root)], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64))
                    })
                    .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| self.err(e))?;
            }
            jobs.push(super::ProjectJob {
                root: p.root,
                text: p.text,
                known,
            });
        }
        Ok(jobs)
    }

    /// Forget a project and everything indexed in it.
    pub fn remove_project(&self, root: &Path) -> Result<bool, IndexError> {
        let Some(id) = self.project_id(root)? else {
            return Ok(false);
        };
        let tx = self.conn.unchecked_transaction().map_err(|e| self.err(e))?;
        tx.execute("DELETE FROM files WHERE project = ?1", [id])
            .map_err(|e| self.err(e))?;
        tx.execute("DELETE FROM projects WHERE id = ?1", [id])
            .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(true)
    }

    fn project_id(&self, root: &Path) -> Result<Option<i64>, IndexError> {
        self.conn
            .query_row(
                "SELECT id FROM projects WHERE root = ?1",
                [path_text(root)],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// The registered roots, in the order they were added.
    pub fn roots(&self) -> Result<Vec<PathBuf>, IndexError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT root FROM projects ORDER BY id")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.err(e))?;
        Ok(rows.into_iter().map(PathBuf::from).collect())
    }

    pub fn projects(&self) -> Result<Vec<ProjectInfo>, IndexError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT p.root, p.auto, p.added, p.mode, p.scanned_at, p.scan_millis,
                        p.complete, p.git,
                        (SELECT count(*) FROM files f WHERE f.project = p.id), p.text
                 FROM projects p ORDER BY p.id",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                let mode: String = r.get(3)?;
                let git: Option<String> = r.get(7)?;
                Ok(ProjectInfo {
                    root: PathBuf::from(r.get::<_, String>(0)?),
                    auto: r.get(1)?,
                    added: r.get(2)?,
                    mode: serde_json::from_str(&mode).unwrap_or(Mode::Scanning),
                    scanned_at: r.get(4)?,
                    scan_millis: r.get(5)?,
                    complete: r.get(6)?,
                    git_branch: git
                        .and_then(|g| serde_json::from_str::<GitState>(&g).ok())
                        .and_then(|g| g.branch),
                    entries: r.get::<_, i64>(8)? as u64,
                    text: r.get(9)?,
                })
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.err(e))?;
        Ok(rows)
    }

    /// The stored git state of the project at (or containing) `root`.
    pub fn git_state(&self, root: &Path) -> Result<Option<GitState>, IndexError> {
        let text: Option<Option<String>> = self
            .conn
            .query_row(
                "SELECT git FROM projects WHERE root = ?1",
                [path_text(root)],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        Ok(text.flatten().and_then(|t| serde_json::from_str(&t).ok()))
    }

    /// Take one update from the watcher.
    pub fn apply(&mut self, update: &Update) -> Result<(), IndexError> {
        match update {
            Update::Added { .. } | Update::Refused { .. } => Ok(()),
            Update::ScanStarted { root, under } => {
                if let Some(project) = self.project_id(root)? {
                    self.scan = Some(Scan {
                        project,
                        under: rel_of(root, under),
                        seen: HashSet::new(),
                        keys: Default::default(),
                    });
                }
                Ok(())
            }
            Update::Entries { root, entries } => self.upsert(root, entries),
            Update::Removed { root, paths } => {
                let Some(project) = self.project_id(root)? else {
                    return Ok(());
                };
                let tx = self.conn.unchecked_transaction().map_err(|e| self.err(e))?;
                for p in paths {
                    // (The root itself: everything in the project.)
                    let rel = rel_of(root, Path::new(p));
                    if rel.is_empty() {
                        tx.execute("DELETE FROM files WHERE project = ?1", [project])
                            .map_err(|e| self.err(e))?;
                        continue;
                    }
                    tx.execute(
                        "DELETE FROM files WHERE project = ?1
                         AND (rel = ?2 OR (rel >= ?2 || '/' AND rel < ?2 || '0'))",
                        params![project, rel],
                    )
                    .map_err(|e| self.err(e))?;
                }
                tx.commit().map_err(|e| self.err(e))
            }
            Update::ScanDone {
                root,
                under,
                complete,
                millis,
            } => self.finish_scan(root, under, *complete, *millis),
            Update::Git { root, state } => self
                .conn
                .execute(
                    "UPDATE projects SET git = ?2 WHERE root = ?1",
                    params![path_text(root), serde_json::to_string(state).ok()],
                )
                .map(|_| ())
                .map_err(|e| self.err(e)),
            Update::Mode { root, mode } => self
                .conn
                .execute(
                    "UPDATE projects SET mode = ?2 WHERE root = ?1",
                    params![path_text(root), serde_json::to_string(mode).ok()],
                )
                .map(|_| ())
                .map_err(|e| self.err(e)),
        }
    }

    fn entries(&self) -> Result<u64, IndexError> {
        self.conn
            .query_row("SELECT count(*) FROM files", [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .map_err(|e| self.err(e))
    }

    fn upsert(&mut self, root: &Path, entries: &[Entry]) -> Result<(), IndexError> {
        let Some(project) = self.project_id(root)? else {
            return Ok(());
        };
        let mut room = self.max_files.saturating_sub(self.entries()?);
        let tx = self.conn.unchecked_transaction().map_err(|e| self.err(e))?;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO files (project, rel, kind, size, mtime, lang, ignored)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT (project, rel) DO UPDATE SET kind = excluded.kind,
                         size = excluded.size, mtime = excluded.mtime, lang = excluded.lang,
                         ignored = excluded.ignored
                     WHERE kind != excluded.kind OR size != excluded.size
                         OR mtime != excluded.mtime OR ignored != excluded.ignored",
                )
                .map_err(|e| self.err(e))?;
            let mut update = tx
                .prepare_cached(
                    "UPDATE files SET kind = ?3, size = ?4, mtime = ?5, lang = ?6, ignored = ?7
                     WHERE project = ?1 AND rel = ?2",
                )
                .map_err(|e| self.err(e))?;
            let mut text = tx
                .prepare_cached("SELECT id FROM files WHERE project = ?1 AND rel = ?2")
                .map_err(|e| self.err(e))?;
            let mut drop_text = tx
                .prepare_cached("DELETE FROM texts WHERE rowid = ?1")
                .map_err(|e| self.err(e))?;
            let mut put_text = tx
                .prepare_cached("INSERT INTO texts (rowid, body) VALUES (?1, ?2)")
                .map_err(|e| self.err(e))?;
            for e in entries {
                let rel = rel_of(root, Path::new(&e.path));
                if rel.is_empty() {
                    continue;
                }
                let values = params![
                    project,
                    rel,
                    e.kind.as_str(),
                    e.size as i64,
                    e.mtime,
                    e.lang,
                    e.ignored
                ];
                let result = if room > 0 {
                    insert.execute(values)
                } else {
                    update.execute(values)
                };
                match result {
                    Ok(n) => {
                        if room > 0 && n > 0 {
                            // (An upsert that changed a row counts too: the limit errs
                            // on the side of fewer entries.)
                            room -= 1;
                        } else if room == 0 && n == 0 {
                            self.dropped += 1;
                            self.full = Some(format!(
                                "the index holds [context] max-files = {} entries; raise it or remove a project",
                                self.max_files
                            ));
                        }
                    }
                    Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull) => {
                        self.dropped += 1;
                        self.full = Some(FULL.into());
                        room = 0;
                    }
                    Err(e) => return Err(self.err(e)),
                }
                if let Some(body) = &e.text {
                    let id: Option<i64> = text
                        .query_row(params![project, rel], |r| r.get(0))
                        .optional()
                        .map_err(|e| self.err(e))?;
                    if let Some(id) = id {
                        drop_text.execute([id]).map_err(|e| self.err(e))?;
                        match put_text.execute(params![id, body]) {
                            Ok(_) => {}
                            Err(e)
                                if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull) =>
                            {
                                self.dropped += 1;
                                self.full = Some(FULL.into());
                            }
                            Err(e) => return Err(self.err(e)),
                        }
                    }
                }
                if let Some(scan) = &mut self.scan
                    && scan.project == project
                {
                    scan.saw(&rel);
                }
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    fn finish_scan(
        &mut self,
        root: &Path,
        under: &Path,
        complete: bool,
        millis: u64,
    ) -> Result<(), IndexError> {
        let Some(scan) = self.scan.take() else {
            return Ok(());
        };
        if complete && Some(scan.project) == self.project_id(root)? {
            let mut gone = Vec::new();
            {
                let mut stmt = self
                    .conn
                    .prepare_cached(
                        "SELECT rel FROM files WHERE project = ?1
                         AND (?2 = '' OR rel = ?2 OR (rel >= ?2 || '/' AND rel < ?2 || '0'))",
                    )
                    .map_err(|e| self.err(e))?;
                let mut rows = stmt
                    .query(params![scan.project, scan.under])
                    .map_err(|e| self.err(e))?;
                while let Some(row) = rows.next().map_err(|e| self.err(e))? {
                    let rel: String = row.get(0).map_err(|e| self.err(e))?;
                    if !scan.has_seen(&rel) {
                        gone.push(rel);
                    }
                }
            }
            let tx = self.conn.unchecked_transaction().map_err(|e| self.err(e))?;
            for rel in gone {
                tx.execute(
                    "DELETE FROM files WHERE project = ?1 AND rel = ?2",
                    params![scan.project, rel],
                )
                .map_err(|e| self.err(e))?;
            }
            tx.commit().map_err(|e| self.err(e))?;
        }
        if under == root {
            self.conn
                .execute(
                    "UPDATE projects SET scanned_at = ?2, scan_millis = ?3, complete = ?4
                     WHERE root = ?1",
                    params![
                        path_text(root),
                        crate::caller::now_secs() as i64,
                        millis as i64,
                        complete
                    ],
                )
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Entries whose path holds every word of `query` (case-insensitive substrings),
    /// best first: all words in the name, then not ignored, then shorter paths and
    /// newer files.
    pub fn find(&self, query: &str, limit: usize) -> Result<Vec<Hit>, IndexError> {
        let words: Vec<String> = query
            .split_whitespace()
            .map(str::to_lowercase)
            .filter(|w| !w.is_empty())
            .collect();
        if words.is_empty() {
            return Ok(Vec::new());
        }
        // The trigram index answers words of three characters or more; shorter ones
        // are checked on the candidates.
        let long: Vec<String> = words
            .iter()
            .filter(|w| w.chars().count() >= 3)
            .map(|w| format!("\"{}\"", w.replace('"', "\"\"")))
            .collect();
        let (sql, arg) = if long.is_empty() {
            (
                "SELECT f.rel, p.root, f.kind, f.size, f.mtime, f.lang, f.ignored
                 FROM files f JOIN projects p ON p.id = f.project
                 WHERE instr(lower(f.rel), ?1) > 0 LIMIT 5000",
                words[0].clone(),
            )
        } else {
            (
                "SELECT f.rel, p.root, f.kind, f.size, f.mtime, f.lang, f.ignored
                 FROM files_fts JOIN files f ON f.id = files_fts.rowid
                 JOIN projects p ON p.id = f.project
                 WHERE files_fts MATCH ?1 LIMIT 5000",
                long.join(" AND "),
            )
        };
        let mut stmt = self.conn.prepare_cached(sql).map_err(|e| self.err(e))?;
        let mut hits: Vec<(u32, Hit)> = stmt
            .query_map([arg], hit)
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.err(e))?
            .into_iter()
            .filter_map(|h| {
                // (Matched in the path below the project's root, as the index has it.)
                let rel = h.path.get(h.project.len() + 1..).unwrap_or(&h.path);
                let lower = rel.to_lowercase();
                if !words.iter().all(|w| lower.contains(w.as_str())) {
                    return None;
                }
                let name = lower.rsplit('/').next().unwrap_or(&lower);
                let in_name = words.iter().filter(|w| name.contains(w.as_str())).count();
                Some(((words.len() - in_name) as u32, h))
            })
            .collect();
        hits.sort_by(|(sa, a), (sb, b)| {
            (sa, a.ignored, a.path.len(), std::cmp::Reverse(a.mtime)).cmp(&(
                sb,
                b.ignored,
                b.path.len(),
                std::cmp::Reverse(b.mtime),
            ))
        });
        Ok(hits.into_iter().take(limit).map(|(_, h)| h).collect())
    }

    /// Text-indexed files holding every word of `query` (as whole words; `word*` for
    /// a prefix of at least [`MIN_PREFIX`] characters), best match first, with a
    /// snippet around the match.
    pub fn find_text(&self, query: &str, limit: usize) -> Result<Vec<Hit>, IndexError> {
        let words: Vec<String> = query
            .split_whitespace()
            .filter_map(|w| {
                let (w, prefix) = match w.strip_suffix('*') {
                    // A shorter prefix would match most of the index, and a query of
                    // a few of them would take seconds: it is a whole word.
                    Some(w) if w.chars().count() >= MIN_PREFIX => (w, "*"),
                    Some(w) => (w, ""),
                    None => (w, ""),
                };
                (!w.is_empty()).then(|| format!("\"{}\"{prefix}", w.replace('"', "\"\"")))
            })
            .collect();
        if words.is_empty() {
            return Ok(Vec::new());
        }
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT f.rel, p.root, f.kind, f.size, f.mtime, f.lang, f.ignored,
                        snippet(texts, 0, '[', ']', '…', 12)
                 FROM texts JOIN files f ON f.id = texts.rowid
                 JOIN projects p ON p.id = f.project
                 WHERE texts MATCH ?1 ORDER BY rank LIMIT ?2",
            )
            .map_err(|e| self.err(e))?;
        let hits = stmt
            .query_map(params![words.join(" AND "), limit as i64], |r| {
                let mut hit = hit(r)?;
                hit.snippet = r.get(7)?;
                Ok(hit)
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.err(e))?;
        Ok(hits)
    }

    /// Files changed at or after `since` (seconds since the epoch), newest first,
    /// ignored ones left out.
    pub fn recent(&self, since: i64, limit: usize) -> Result<Vec<Hit>, IndexError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT f.rel, p.root, f.kind, f.size, f.mtime, f.lang, f.ignored
                 FROM files f JOIN projects p ON p.id = f.project
                 WHERE f.mtime >= ?1 AND f.kind = 'file' AND f.ignored = 0
                 ORDER BY f.mtime DESC LIMIT ?2",
            )
            .map_err(|e| self.err(e))?;
        let hits = stmt
            .query_map(params![since, limit as i64], hit)
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.err(e))?;
        Ok(hits)
    }

    /// The database's size on disk, bytes (with its write-ahead log).
    pub fn bytes(&self) -> u64 {
        ["", "-wal"]
            .iter()
            .filter_map(|s| std::fs::metadata(format!("{}{s}", self.path.display())).ok())
            .map(|m| m.len())
            .sum()
    }
}

/// A hit from a row of `rel, root, kind, size, mtime, lang, ignored`.
fn hit(r: &rusqlite::Row) -> rusqlite::Result<Hit> {
    let rel: String = r.get(0)?;
    let root: String = r.get(1)?;
    Ok(Hit {
        path: format!("{root}/{rel}"),
        project: root,
        kind: Kind::parse(&r.get::<_, String>(2)?),
        size: r.get::<_, i64>(3)? as u64,
        mtime: r.get(4)?,
        lang: r.get(5)?,
        ignored: r.get(6)?,
        snippet: None,
    })
}

fn open_checked(path: &Path, max_mib: u64) -> Result<Connection, rusqlite::Error> {
    use std::os::unix::fs::PermissionsExt;
    let conn = Connection::open(path)?;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    let check: String = conn.query_row("PRAGMA quick_check(1)", [], |r| r.get(0))?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let problem = if check != "ok" {
        Some(check)
    } else if version != 0 && version != SCHEMA_VERSION {
        Some(format!(
            "index format {version}, this agent's is {SCHEMA_VERSION}"
        ))
    } else {
        None
    };
    if let Some(problem) = problem {
        // (Moved aside and rebuilt like a damaged one.)
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
            Some(problem),
        ));
    }
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(SCHEMA)?;
    let page: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    conn.pragma_update(
        None,
        "max_page_count",
        (max_mib as i64 * 1024 * 1024) / page,
    )?;
    Ok(conn)
}

/// Make `dir` (root's alone) if it is missing.
pub fn create_private_dir(dir: &Path) -> Result<(), IndexError> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => Ok(()),
        Err(source) => Err(IndexError::Io {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

fn path_text(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// `path` relative to `root` ("" for the root itself).
fn rel_of(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .map(|r| r.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, mtime: i64) -> Entry {
        Entry {
            path: path.into(),
            kind: Kind::File,
            size: 1,
            mtime,
            lang: None,
            ignored: false,
            text: None,
        }
    }

    fn scan(index: &mut Index, root: &str, paths: &[&str]) {
        let root = PathBuf::from(root);
        index
            .apply(&Update::ScanStarted {
                root: root.clone(),
                under: root.clone(),
            })
            .unwrap();
        index
            .apply(&Update::Entries {
                root: root.clone(),
                entries: paths.iter().map(|p| entry(p, 10)).collect(),
            })
            .unwrap();
        index
            .apply(&Update::ScanDone {
                root: root.clone(),
                under: root,
                complete: true,
                millis: 1,
            })
            .unwrap();
    }

    #[test]
    fn find_ranks_names_first_and_a_rescan_drops_what_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let mut index = Index::open(&dir.path().join("u/index.db"), 1000, 10).unwrap();
        index.add_project(Path::new("/p"), false, false).unwrap();
        scan(
            &mut index,
            "/p",
            &[
                "/p/etc/nginx/nginx.conf",
                "/p/nginx/readme.md",
                "/p/src/main.rs",
            ],
        );
        let hits = index.find("nginx conf", 10).unwrap();
        assert_eq!(hits[0].path, "/p/etc/nginx/nginx.conf");
        assert_eq!(hits.len(), 1);
        assert_eq!(index.find("NGINX", 10).unwrap().len(), 2);
        assert_eq!(index.find("rs", 10).unwrap()[0].path, "/p/src/main.rs");
        scan(&mut index, "/p", &["/p/src/main.rs"]);
        assert!(index.find("nginx", 10).unwrap().is_empty());
        index
            .apply(&Update::Removed {
                root: "/p".into(),
                paths: vec!["/p/src".into()],
            })
            .unwrap();
        assert!(index.find("main", 10).unwrap().is_empty());
    }

    #[test]
    fn the_file_limit_holds() {
        let dir = tempfile::tempdir().unwrap();
        let mut index = Index::open(&dir.path().join("index.db"), 2, 10).unwrap();
        index.add_project(Path::new("/p"), false, false).unwrap();
        scan(&mut index, "/p", &["/p/a", "/p/b", "/p/c"]);
        assert_eq!(index.entries().unwrap(), 2);
        assert!(index.full.is_some());
    }

    #[test]
    fn a_corrupt_database_is_moved_aside_and_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.db");
        std::fs::write(&path, vec![7u8; 8192]).unwrap();
        let index = Index::open(&path, 10, 10).unwrap();
        assert!(index.rebuilt.is_some());
        assert!(index.roots().unwrap().is_empty());
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains("corrupt"))
            .collect();
        assert_eq!(aside.len(), 1);
    }
}
