//! The image registry: every image version ever built, its artifacts (sha256, size),
//! stage timings, files, test runs, and (later) publications and rollouts, in SQLite.
//!
//! WAL mode, a busy timeout so concurrent builds wait rather than fail, and every
//! change in one transaction. The schema version is SQLite's `user_version`; opening
//! a registry applies the missing forward migrations in order, each in a transaction.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rusqlite::Connection;

mod migrations;
mod publications;
mod rollouts;
mod runs;
mod versions;

use migrations::MIGRATIONS;
pub(crate) use migrations::SCHEMA_VERSION;
pub(crate) use publications::Publication;
pub(crate) use rollouts::Rollout;
pub use runs::{Booted, TestRun};
pub(crate) use versions::{ArtifactRow, VersionInfo, split_reference};

/// `$DEVOS_REGISTRY`, else `$XDG_DATA_HOME/devos/registry.db`, else
/// `~/.local/share/devos/registry.db`. An empty `DEVOS_REGISTRY` counts as unset.
pub(crate) fn default_path() -> PathBuf {
    if let Some(p) = std::env::var_os("DEVOS_REGISTRY").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let data = crate::support::paths::xdg_dir("XDG_DATA_HOME", ".local/share", "/var/lib");
    data.join("devos/registry.db")
}

/// Whether `e` comes from SQLite finding another process's lock on the registry.
pub fn is_busy(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<rusqlite::Error>()
            .and_then(rusqlite::Error::sqlite_error_code)
            .is_some_and(|code| {
                matches!(
                    code,
                    rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                )
            })
    })
}

/// Why the registry at `path` cannot be opened, and what to do.
fn open_error(path: &Path, e: rusqlite::Error) -> anyhow::Error {
    if path.is_dir() {
        anyhow::anyhow!(
            "{} is a directory, not a registry file\n  hint: point --registry or DEVOS_REGISTRY at a file, e.g. {}",
            path.display(),
            path.join("registry.db").display()
        )
    } else if e.sqlite_error_code() == Some(rusqlite::ErrorCode::NotADatabase) {
        anyhow::anyhow!(
            "{} is not a registry: it is not an SQLite database\n  hint: point --registry or DEVOS_REGISTRY at the registry file (or unset them for the default), or move this file out of the way",
            path.display()
        )
    } else {
        anyhow::Error::new(e).context(format!("cannot open the registry {}", path.display()))
    }
}

/// Refuse a registry this process cannot write (it, or the directory it lies in):
/// SQLite would open it read-only and fail at the first write, or at once in WAL mode.
/// Says why (a read-only filesystem, a mode, another owner) and what to do. Root may
/// write anything.
fn check_writable(path: &Path) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let quote = |p: &Path| crate::support::cmd::quote(p.as_os_str());
    let dir = crate::support::paths::parent_of(path);
    let mine = crate::support::paths::acting_uid();
    for p in [path, dir] {
        let Ok(meta) = p.metadata() else {
            continue;
        };
        let why = match rustix::fs::access(p, rustix::fs::Access::WRITE_OK) {
            Ok(()) => continue,
            Err(rustix::io::Errno::ROFS) => format!(
                "{} is on a read-only filesystem\n  hint: point --registry (DEVOS_REGISTRY) at a registry on a writable one",
                p.display()
            ),
            Err(_) if mine == Some(meta.uid()) => format!(
                "{} is yours, but its mode ({:o}) lets nobody write it\n  hint: chmod u+w {}",
                p.display(),
                meta.permissions().mode() & 0o7777,
                quote(p)
            ),
            Err(_) => {
                let whose = crate::support::paths::passwd_name(meta.uid())
                    .unwrap_or_else(|| format!("uid {}", meta.uid()));
                match crate::support::paths::foreign_above(path, mine.unwrap_or(u32::MAX)) {
                    Some(top) => format!(
                        "{} belongs to {whose}\n  hint: if `sudo devos-build` made it, give it back: sudo chown -R \"$(id -un):\" {}",
                        top.display(),
                        quote(&top)
                    ),
                    None => format!(
                        "{} belongs to {whose}\n  hint: ask {whose} for write access to it, or point --registry (DEVOS_REGISTRY) at a registry of your own",
                        p.display()
                    ),
                }
            }
        };
        bail!(
            "the registry {} cannot be written by you: {why}",
            path.display()
        );
    }
    Ok(())
}

/// The registry's file and its `-wal` and `-shm` files, none of them a symlink:
/// SQLite follows links, and as root in a user's directory it must not.
fn refuse_links(path: &Path) -> Result<[PathBuf; 3]> {
    let files = [
        path.to_path_buf(),
        wal_file(path, "-wal"),
        wal_file(path, "-shm"),
    ];
    for p in &files {
        if p.symlink_metadata()
            .is_ok_and(|m| m.file_type().is_symlink())
        {
            bail!(
                "{} is a symlink; the registry and its -wal and -shm files must be plain files\n  hint: remove it, or point --registry at the file itself",
                p.display()
            );
        }
    }
    Ok(files)
}

/// The first read of the file: it fails here if it is no database, and a database of
/// something else (tables, none of them the registry's) is refused.
fn check_ours(conn: &Connection, path: &Path) -> Result<()> {
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
        .and_then(|mut q| q.query_map([], |r| r.get(0))?.collect())
        .map_err(|e| open_error(path, e))?;
    let has = |name: &str| tables.iter().any(|t| t == name);
    if tables.is_empty() || (has("images") && has("versions")) {
        return Ok(());
    }
    bail!(
        "{} is an SQLite database, but not a devos-build registry (its tables: {}); it was left as it is\n  hint: check the path given with --registry or DEVOS_REGISTRY (the default is ~/.local/share/devos/registry.db)",
        path.display(),
        tables
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
            + if tables.len() > 5 { ", …" } else { "" }
    )
}

fn newer_schema(path: &Path, version: i64) -> String {
    format!(
        "the registry {} has schema version {version}, newer than this devos-build knows ({SCHEMA_VERSION})\n  hint: use a newer devos-build, or point DEVOS_REGISTRY at another file",
        path.display()
    )
}

/// A read-only connection to the registry at `path`. Through SQLite's locks and shared
/// memory like any reader wherever that can work: while another process has the
/// registry open (its `-shm` file is there), or where SQLite may make its `-wal` and
/// `-shm` files (a directory this process can write; as root SQLite gives them to the
/// registry's owner): a writer that commits or checkpoints meanwhile then never changes
/// pages under this reader. Only where neither holds (another user's registry in their
/// directory, nobody using it) is the file read as it is (`immutable`): a writer that
/// starts while this reads can then make the read fail with SQLite's error, or show the
/// registry as it was before that writer (run the command again).
fn open_read_only(path: &Path) -> Result<Connection> {
    let dir = crate::support::paths::parent_of(path);
    let shared = wal_file(path, "-shm").exists()
        || rustix::fs::access(dir, rustix::fs::Access::WRITE_OK).is_ok();
    connect_read_only(path, !shared)
}

/// A connection SQLite made for the registry at `path`, waiting for other processes'
/// locks rather than failing at once.
fn waiting(conn: rusqlite::Result<Connection>, path: &Path) -> Result<Connection> {
    conn.and_then(|conn| {
        conn.busy_timeout(Duration::from_secs(30))?;
        Ok(conn)
    })
    .map_err(|e| open_error(path, e))
}

/// Whether the registry at `path` holds nothing: no file there, or an empty one.
pub(crate) fn holds_nothing(path: &Path) -> bool {
    !path.metadata().is_ok_and(|m| m.len() > 0)
}

/// [`open_read_only`]'s connection, `immutable` or not.
fn connect_read_only(path: &Path, immutable: bool) -> Result<Connection> {
    use rusqlite::OpenFlags;
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = if immutable {
        let absolute = std::path::absolute(path)
            .with_context(|| format!("cannot resolve {}", path.display()))?;
        // `file://` and an empty authority: a path starting `//` stays a path.
        Connection::open_with_flags(
            format!("file://{}?immutable=1", uri_path(&absolute)),
            flags | OpenFlags::SQLITE_OPEN_URI,
        )
    } else {
        Connection::open_with_flags(path, flags)
    };
    waiting(conn, path)
}

/// `path` as the path of an SQLite URI: every byte but letters, digits and `/-._~`
/// percent-encoded (SQLite decodes `%HH`; `?` and `#` would end the path).
fn uri_path(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    path.as_os_str()
        .as_bytes()
        .iter()
        .map(|&b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'/' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// SQLite's `-wal` and `-shm` files beside the database.
fn wal_file(db: &Path, suffix: &str) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

pub struct Registry {
    conn: Connection,
    path: PathBuf,
}

impl Registry {
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_at(path, SCHEMA_VERSION)
    }

    /// Open for a command that only reads: a registry that does not exist yet, or an
    /// empty file, reads as an empty one, and no file or directory is created or
    /// written for it. An existing registry is opened read-only ([`open_read_only`]),
    /// so that reading one another user owns (a team's, root's) works and never writes
    /// it. Only a registry of an older schema is opened for writing, to migrate it.
    pub fn open_read(path: &Path) -> Result<Self> {
        if holds_nothing(path) {
            let mut reg = Self {
                conn: Connection::open_in_memory()?,
                path: path.to_path_buf(),
            };
            reg.migrate(SCHEMA_VERSION)?;
            return Ok(reg);
        }
        refuse_links(path)?;
        let conn = open_read_only(path)?;
        check_ours(&conn, path)?;
        let current: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(|e| open_error(path, e))?;
        if current > SCHEMA_VERSION {
            bail!(newer_schema(path, current));
        }
        if current < SCHEMA_VERSION {
            drop(conn);
            return Self::open(path).with_context(|| {
                format!(
                    "the registry {} has schema version {current}, older than this devos-build's ({SCHEMA_VERSION}), and reading it needs it migrated first",
                    path.display()
                )
            });
        }
        Ok(Self {
            conn,
            path: path.to_path_buf(),
        })
    }

    /// Open, migrating up to `target` (tests use older targets to check migrations).
    fn open_at(path: &Path, target: i64) -> Result<Self> {
        crate::support::paths::create_user_dirs(path.parent().unwrap_or(Path::new(".")))?;
        check_writable(path)?;
        let files = refuse_links(path)?;
        let conn = waiting(Connection::open(path), path)?;
        // Neither switched to WAL nor given the registry's tables when it is another
        // program's database.
        check_ours(&conn, path)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| open_error(path, e))?;
        // Under sudo, the registry is the invoking user's (README: where state lives):
        // their `image list` must read it, and WAL needs them to write it.
        for p in &files {
            crate::support::paths::hand_over(p)
                .with_context(|| format!("cannot give {} to the sudo user", p.display()))?;
        }
        crate::support::paths::warn_if_kept(path, "the registry");
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let mut reg = Self {
            conn,
            path: path.to_path_buf(),
        };
        reg.migrate(target)?;
        Ok(reg)
    }

    #[cfg(test)]
    fn schema_version(&self) -> Result<i64> {
        Ok(self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    fn migrate(&mut self, target: i64) -> Result<()> {
        // Up to date (the usual case): a plain read, which no writer blocks; only a
        // migration takes the write lock.
        let current: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?;
        if (target..=SCHEMA_VERSION).contains(&current) {
            return Ok(());
        }
        loop {
            // IMMEDIATE: two processes opening an old registry migrate one after the other.
            let tx = self
                .conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .with_context(|| format!("cannot migrate the registry {}", self.path.display()))?;
            let current: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
            if current > SCHEMA_VERSION {
                bail!(newer_schema(&self.path, current));
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
}

#[cfg(test)]
pub(crate) mod tests;
