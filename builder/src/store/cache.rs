//! The build cache: stage outputs stored by the hash of their inputs, and the
//! downloaded packages and package lists the stages reuse.
//!
//! A stage entry is a directory `stages/KIND/KEY/` holding `tree.tar.zst` and
//! `entry.json` (the archive's sha256 and size). It is assembled under a temporary
//! name and renamed into place, so a reader never sees half an entry; the archive's
//! hash is checked before every use, and an entry that fails the check is removed and
//! rebuilt, never used.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use anyhow::{Context, Result};

use crate::support::time::secs;
use crate::support::{cmd, digest, remove};

/// Where the cache lives: `$DEVOS_CACHE_DIR`, else `$XDG_CACHE_HOME/devos`, else
/// `~/.cache/devos`.
pub(crate) fn dir() -> PathBuf {
    // (Empty is unset, as for DEVOS_REGISTRY: never the current directory.)
    if let Some(d) = std::env::var_os("DEVOS_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    crate::support::paths::xdg_dir("XDG_CACHE_HOME", ".cache", "/var/cache").join("devos")
}

/// The kinds of stage entries, in pipeline order.
pub(crate) const KINDS: &[&str] = &["base", "tree"];

/// What `entry.json` records.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Entry {
    pub(crate) kind: String,
    pub(crate) key: String,
    pub(crate) sha256: String,
    pub(crate) size: u64,
    /// Unix time the entry was stored.
    pub(crate) created: u64,
    /// What the entry was made from, for people reading the cache.
    pub(crate) about: String,
}

pub(crate) struct Cache {
    root: PathBuf,
    /// False with `--no-cache`: nothing is read or written.
    enabled: bool,
}

const ARCHIVE: &str = "tree.tar.zst";
/// The cache directory's tag (bford.info/cachedir: backup tools skip such a
/// directory), written when a build first uses it; `prune` works only where it is.
const TAG: &str = "CACHEDIR.TAG";

/// Whether `dir` holds the cache's `stages/` (a cache from before the tag), or nothing
/// (a missing directory holds nothing).
fn holds_stages_or_nothing(dir: &Path) -> bool {
    dir.join("stages").is_dir() || fs::read_dir(dir).map_or(true, |mut d| d.next().is_none())
}

/// Tag the cache directory `dir`, opened as `handle` (see [`TAG`]), if it is not yet,
/// and only when it is the builder's: `made` just now, empty, or holding the cache's
/// `stages/` — never a home or a checkout `DEVOS_CACHE_DIR` names by mistake, which
/// backup tools would then skip. Written through the handle, never through a link put
/// at the tag's name (the build runs as root in a user's cache).
pub(crate) fn tag(handle: &fs::File, dir: &Path, made: bool) -> Result<()> {
    use rustix::fs::AtFlags;
    if rustix::fs::statat(handle, TAG, AtFlags::SYMLINK_NOFOLLOW).is_ok() {
        return Ok(());
    }
    if !made && !holds_stages_or_nothing(dir) {
        return Ok(());
    }
    let text = "Signature: 8a477f597d28d172789f06886806bc55\n# This directory is devos-build's cache (packages, package lists, stage outputs).\n";
    crate::support::paths::replace_in(handle, &dir.join(TAG), &mut text.as_bytes(), 0o644)
}
const ENTRY: &str = "entry.json";
/// The cache's own code, hashed into every stage key: a change to how trees are
/// stored or restored (tar flags, what is kept) never restores an entry written the
/// old way.
pub(crate) fn format_digest() -> String {
    crate::support::digest::sha256_hex(include_str!("cache.rs").as_bytes())
}

const TAR_COMMON: &[&str] = &[
    "--numeric-owner",
    "--xattrs",
    "--xattrs-include=*",
    "--acls",
];

impl Cache {
    pub(crate) fn new(root: PathBuf, enabled: bool) -> Self {
        Self { root, enabled }
    }

    fn entry_dir(&self, kind: &str, key: &str) -> PathBuf {
        self.root.join("stages").join(kind).join(key)
    }

    /// Whether an entry exists (its hash is checked only when it is used).
    pub(crate) fn contains(&self, kind: &str, key: &str) -> bool {
        self.enabled && self.entry_dir(kind, key).join(ENTRY).is_file()
    }

    /// Restore the tree stored for `kind`/`key` into `dest` (which must not exist).
    /// `Ok(false)` when there is no usable entry; a corrupt entry is removed.
    pub(crate) fn restore(&self, kind: &str, key: &str, dest: &Path) -> Result<bool> {
        if !self.enabled {
            return Ok(false);
        }
        let dir = self.entry_dir(kind, key);
        let text = match fs::read_to_string(dir.join(ENTRY)) {
            Ok(text) => text,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
            Err(e) => {
                tracing::warn!(
                    "cannot read {}: {e}; building the stage again",
                    dir.join(ENTRY).display()
                );
                return Ok(false);
            }
        };
        let archive = dir.join(ARCHIVE);
        let problem = match serde_json::from_str::<Entry>(&text) {
            Err(e) => Some(format!("its entry.json is not valid: {e}")),
            Ok(entry) => match digest::file_sha256(&archive) {
                Err(e) => Some(format!("cannot read its {ARCHIVE}: {e}")),
                Ok(actual) if actual != entry.sha256 => {
                    Some("its sha256 does not match entry.json".to_owned())
                }
                Ok(_) => None,
            },
        };
        if let Some(problem) = problem {
            tracing::warn!(
                "cache entry {} is corrupt ({problem}); removing it and building the stage again",
                dir.display()
            );
            if let Err(e) = remove_entry(&dir) {
                tracing::warn!("{e:#}");
            }
            return Ok(false);
        }
        fs::create_dir_all(dest)?;
        let result = cmd::run(
            Command::new("tar")
                .arg("--extract")
                .arg("--file")
                .arg(&archive)
                .arg("--directory")
                .arg(dest)
                .args(TAR_COMMON)
                .args(["--same-permissions", "--same-owner"])
                .arg("--use-compress-program=zstd -d -q"),
        );
        if let Err(e) = result {
            tracing::warn!(
                "cannot restore {}: {e}; building the stage again",
                dir.display()
            );
            // The stage is built into `dest` next: it must not hold half a tree.
            remove::dir_if_present(dest)?;
            return Ok(false);
        }
        touch(&dir);
        Ok(true)
    }

    /// Store `tree` as the entry for `kind`/`key`. Another build storing the same key
    /// at the same time is fine: the first complete entry wins.
    pub(crate) fn store(&self, kind: &str, key: &str, tree: &Path, about: &str) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        let parent = self.root.join("stages").join(kind);
        fs::create_dir_all(&parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
        crate::support::workdir::remove_stale_work_dirs(&parent);
        let tmp = crate::support::workdir::WorkDir::new(&parent)?;
        let archive = tmp.path().join(ARCHIVE);
        cmd::run(
            Command::new("tar")
                .arg("--create")
                .arg("--file")
                .arg(&archive)
                .arg("--directory")
                .arg(tree)
                .args(TAR_COMMON)
                .args(["--sort=name", "--one-file-system"])
                .arg("--use-compress-program=zstd -T0 -1 -q")
                .arg("."),
        )
        .with_context(|| format!("while storing the {kind} stage in the cache"))?;
        let entry = Entry {
            kind: kind.to_owned(),
            key: key.to_owned(),
            sha256: digest::file_sha256(&archive)?,
            size: fs::metadata(&archive)?.len(),
            created: crate::support::time::now(),
            about: about.to_owned(),
        };
        fs::write(
            tmp.path().join(ENTRY),
            serde_json::to_string_pretty(&entry)?,
        )?;
        tmp.persist(&self.entry_dir(kind, key))?;
        Ok(())
    }

    /// Refuse to prune a directory that is not a build cache: one with neither the
    /// cache's tag nor its `stages` (a `DEVOS_CACHE_DIR` set to a checkout or a home
    /// would otherwise lose its `agent/`, `packages/` or `apt/`).
    fn check_is_cache(&self) -> Result<()> {
        if !self.root.join(TAG).is_file() && !holds_stages_or_nothing(&self.root) {
            anyhow::bail!(
                "{} is not a devos-build cache (no {TAG}, no stages/): nothing pruned\n  hint: check DEVOS_CACHE_DIR (unset, the cache is ~/.cache/devos)",
                self.root.display()
            );
        }
        Ok(())
    }

    /// Every stage entry, plus the sizes of the package and package-list caches.
    pub(crate) fn status(&self) -> Result<Status> {
        let mut entries = Vec::new();
        for kind in KINDS {
            let kind_dir = self.root.join("stages").join(kind);
            let dirs = match fs::read_dir(&kind_dir) {
                Ok(dirs) => dirs,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot list {}", kind_dir.display()));
                }
            };
            for d in dirs.flatten() {
                if d.file_name().to_string_lossy().starts_with('.') {
                    continue;
                }
                let about = match fs::read_to_string(d.path().join(ENTRY)) {
                    Ok(text) => match serde_json::from_str::<Entry>(&text) {
                        Ok(entry) => entry.about,
                        Err(e) => {
                            tracing::warn!("{} is not valid: {e}", d.path().join(ENTRY).display());
                            "corrupt".into()
                        }
                    },
                    Err(e) if e.kind() == ErrorKind::NotFound => "incomplete".into(),
                    Err(e) => {
                        tracing::warn!("cannot read {}: {e}", d.path().join(ENTRY).display());
                        "unreadable".into()
                    }
                };
                let last_used = fs::metadata(d.path().join(ENTRY))
                    .and_then(|m| m.modified())
                    .map_or(0, secs);
                entries.push(StatusEntry {
                    kind: (*kind).to_owned(),
                    key: d.file_name().to_string_lossy().into_owned(),
                    size: dir_size(&d.path()),
                    last_used,
                    about,
                });
            }
        }
        entries.sort_by_key(|e| std::cmp::Reverse(e.last_used));
        Ok(Status {
            dir: self.root.clone(),
            packages_bytes: dir_size(&self.root.join("packages")),
            package_lists_bytes: dir_size(&self.root.join("apt")),
            stages_bytes: entries.iter().map(|e| e.size).sum(),
            entries,
        })
    }

    /// Remove all but the `keep` most recently used entries of each stage (and with
    /// `packages` the downloaded packages, package lists and agent packages), or with
    /// `dry_run` only say what that would remove.
    pub(crate) fn prune(&self, keep: usize, packages: bool, dry_run: bool) -> Result<Pruned> {
        self.check_is_cache()?;
        // Held until the package lists are removed: no build reads them meanwhile.
        let _lists = if packages {
            self.hold_package_lists()?
        } else {
            Vec::new()
        };
        let status = self.status()?;
        let mut pruned = Pruned {
            dry_run,
            ..Pruned::default()
        };
        for kind in KINDS {
            // Entries a removal cut short left out of their names: nobody reads them.
            let stage = self.root.join("stages").join(kind);
            let leftovers = fs::read_dir(&stage).into_iter().flatten().flatten();
            for gone in leftovers.filter(|d| d.file_name().to_string_lossy().starts_with(".gone-"))
            {
                pruned.remove_dir(&gone.path())?;
            }
            for e in status.entries.iter().filter(|e| e.kind == *kind).skip(keep) {
                if !dry_run {
                    remove_entry(&self.entry_dir(kind, &e.key))?;
                }
                pruned.entries_removed += 1;
                pruned.freed_bytes += e.size;
                pruned
                    .removed
                    .push(format!("{} {} ({})", e.kind, e.key, e.about));
            }
        }
        if packages {
            for sub in ["packages", "apt", "agent"] {
                pruned.remove_dir(&self.root.join(sub))?;
            }
        }
        Ok(pruned)
    }

    /// Every package index's lock (`apt/KEY/`[`INDEX_LOCK`]), exclusive; refused
    /// before anything is removed while a build reads or updates one.
    fn hold_package_lists(&self) -> Result<Vec<fs::File>> {
        let mut held = Vec::new();
        for index in fs::read_dir(self.root.join("apt"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let path = index.path().join(INDEX_LOCK);
            let lock = match fs::File::open(&path) {
                Ok(lock) => lock,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
            };
            match lock.try_lock() {
                Ok(()) => held.push(lock),
                Err(fs::TryLockError::WouldBlock) => anyhow::bail!(
                    "a build is using the package lists in {}; nothing was removed\n  hint: run `devos-build cache prune --all` again once it has finished",
                    index.path().display()
                ),
                Err(fs::TryLockError::Error(e)) => {
                    return Err(e).with_context(|| format!("cannot lock {}", path.display()));
                }
            }
        }
        Ok(held)
    }
}

/// The lock file of a package index (`apt/KEY/`): shared while a build reads its lists,
/// exclusive while they are updated or removed.
pub(crate) const INDEX_LOCK: &str = "lock";

#[derive(Debug, serde::Serialize)]
pub(crate) struct Status {
    pub(crate) dir: PathBuf,
    pub(crate) stages_bytes: u64,
    pub(crate) packages_bytes: u64,
    pub(crate) package_lists_bytes: u64,
    pub(crate) entries: Vec<StatusEntry>,
}

#[derive(Debug, serde::Serialize)]
pub(crate) struct StatusEntry {
    pub(crate) kind: String,
    pub(crate) key: String,
    pub(crate) size: u64,
    #[serde(serialize_with = "crate::support::time::serialize_iso")]
    pub(crate) last_used: u64,
    pub(crate) about: String,
}

#[derive(Debug, Default, serde::Serialize)]
pub(crate) struct Pruned {
    /// Named as `image gc` names what it freed.
    pub(crate) entries_removed: usize,
    pub(crate) freed_bytes: u64,
    /// What was removed (or, with `dry_run`, would be).
    pub(crate) removed: Vec<String>,
    pub(crate) dry_run: bool,
}

impl Pruned {
    /// Remove `dir` whole (unless this is a dry run) and count it.
    fn remove_dir(&mut self, dir: &Path) -> Result<()> {
        let bytes = dir_size(dir);
        if !self.dry_run {
            remove::dir_if_present(dir)?;
        }
        self.freed_bytes += bytes;
        self.removed.push(dir.display().to_string());
        Ok(())
    }
}

impl Status {
    pub(crate) fn human(&self) -> String {
        let mut s = format!("cache: {}\n", self.dir.display());
        s.push_str(&format!(
            "  stage entries      {:>4}  {:>8}\n  downloaded packages     {:>8}\n  package lists           {:>8}\n",
            self.entries.len(),
            mib(self.stages_bytes),
            mib(self.packages_bytes),
            mib(self.package_lists_bytes)
        ));
        for e in &self.entries {
            s.push_str(&format!(
                "  {:<5} {}  {:>8}  {}\n",
                e.kind,
                e.key.chars().take(16).collect::<String>(),
                mib(e.size),
                e.about
            ));
        }
        s
    }
}

pub(crate) fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

/// Move an entry out of the way in one rename, then delete it: a reader either
/// sees the whole entry or none. An entry already gone (another build removed it)
/// is fine.
fn remove_entry(dir: &Path) -> Result<()> {
    let gone = dir.with_file_name(format!(
        ".gone-{}-{}",
        std::process::id(),
        dir.file_name().unwrap_or_default().to_string_lossy()
    ));
    match fs::rename(dir, &gone) {
        Ok(()) => remove::dir_if_present(&gone),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => {
            Err(e).with_context(|| format!("cannot remove the cache entry {}", dir.display()))
        }
    }
}

/// Record a use (prune keeps the most recently used entries). A failure only makes
/// the entry look older to prune, so it is logged, not an error.
fn touch(dir: &Path) {
    let path = dir.join(ENTRY);
    let touched = fs::File::options()
        .append(true)
        .open(&path)
        .and_then(|f| f.set_modified(SystemTime::now()));
    if let Err(e) = touched {
        tracing::warn!("cannot record the use of {}: {e}", path.display());
    }
}

pub(crate) fn dir_size(root: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    // Unreadable entries count as nothing: this is a size shown to the user, not a
    // reason to fail `cache status` or `cache prune`.
    for m in walkdir::WalkDir::new(root)
        .min_depth(1)
        .into_iter()
        .flatten()
        .filter_map(|e| e.metadata().ok())
    {
        if !m.is_dir() {
            total += m.blocks() * 512;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(root: &Path) {
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::write(root.join("etc/hostname"), "devos\n").unwrap();
        std::os::unix::fs::symlink("hostname", root.join("etc/link")).unwrap();
    }

    #[test]
    fn store_restore_and_corruption() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::new(tmp.path().join("cache"), true);
        let src = tmp.path().join("src");
        tree(&src);
        cache.store("base", "k1", &src, "test").unwrap();
        let out = tmp.path().join("out");
        assert!(cache.restore("base", "k1", &out).unwrap());
        assert_eq!(
            fs::read_to_string(out.join("etc/hostname")).unwrap(),
            "devos\n"
        );
        assert_eq!(
            fs::read_link(out.join("etc/link")).unwrap(),
            Path::new("hostname")
        );
        assert!(
            !cache
                .restore("base", "other", &tmp.path().join("x"))
                .unwrap()
        );

        let status = cache.status().unwrap();
        assert_eq!(status.entries.len(), 1);
        assert!(status.stages_bytes > 0);

        // Flip one byte of the archive: detected, removed, not used.
        let archive = cache.entry_dir("base", "k1").join(ARCHIVE);
        let mut bytes = fs::read(&archive).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        fs::write(&archive, bytes).unwrap();
        let again = tmp.path().join("again");
        assert!(!cache.restore("base", "k1", &again).unwrap());
        assert!(!again.exists());
        assert!(!cache.entry_dir("base", "k1").exists());
    }

    #[test]
    fn package_lists_a_build_uses_are_not_pruned() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("cache");
        let index = root.join("apt/0123456789abcdef");
        fs::create_dir_all(index.join("lists")).unwrap();
        fs::create_dir_all(root.join("packages")).unwrap();
        tag(&fs::File::open(&root).unwrap(), &root, true).unwrap();
        // A build reading the lists (its own open file, as another process's).
        let build = fs::File::create(index.join(INDEX_LOCK)).unwrap();
        build.lock_shared().unwrap();
        let cache = Cache::new(root.clone(), true);
        for dry_run in [true, false] {
            let e = format!("{:#}", cache.prune(0, true, dry_run).unwrap_err());
            assert!(
                e.contains("a build is using the package lists in")
                    && e.contains(&index.display().to_string())
                    && e.contains("nothing was removed")
                    && e.contains("cache prune --all"),
                "{e}"
            );
        }
        assert!(index.join("lists").is_dir() && root.join("packages").is_dir());
        // Stage entries alone are pruned as before.
        cache.prune(0, false, false).unwrap();
        // Once the build is done, the lists go with the rest.
        drop(build);
        cache.prune(0, true, false).unwrap();
        assert!(!root.join("apt").exists() && !root.join("packages").exists());
    }

    #[test]
    fn prune_works_only_in_a_cache_and_status_shows_any_entry_name() {
        let tmp = tempfile::tempdir().unwrap();
        // A checkout or a home given as the cache: its `agent/` stays.
        let checkout = tmp.path().join("checkout");
        fs::create_dir_all(checkout.join("agent/src")).unwrap();
        fs::create_dir_all(checkout.join("packages")).unwrap();
        let e = format!(
            "{:#}",
            Cache::new(checkout.clone(), true)
                .prune(0, true, false)
                .unwrap_err()
        );
        assert!(e.contains("is not a devos-build cache"), "{e}");
        assert!(checkout.join("agent/src").is_dir());
        // A tagged one, or one with stages (made before the tag), is pruned; an empty
        // or missing one has nothing to prune.
        let tagged = tmp.path().join("tagged");
        fs::create_dir_all(tagged.join("packages")).unwrap();
        tag(&fs::File::open(&tagged).unwrap(), &tagged, true).unwrap();
        assert!(
            fs::read_to_string(tagged.join(TAG))
                .unwrap()
                .starts_with("Signature: 8a477f597d28d172789f06886806bc55")
        );
        Cache::new(tagged.clone(), true)
            .prune(0, true, false)
            .unwrap();
        assert!(!tagged.join("packages").exists());
        Cache::new(tmp.path().join("none"), true)
            .prune(0, true, false)
            .unwrap();
        // The tag is never written through a link put at its name.
        let linked = tmp.path().join("linked");
        fs::create_dir_all(&linked).unwrap();
        std::os::unix::fs::symlink(tmp.path().join("elsewhere"), linked.join(TAG)).unwrap();
        tag(&fs::File::open(&linked).unwrap(), &linked, true).unwrap();
        assert!(!tmp.path().join("elsewhere").exists());
        // A directory with other things in it (a home, a checkout) is never tagged.
        tag(&fs::File::open(&checkout).unwrap(), &checkout, false).unwrap();
        assert!(!checkout.join(TAG).exists());
        // Entry names of any characters are shown, cut to 16 characters.
        let odd = tagged.join("stages/base/aéééééééééééééééé");
        fs::create_dir_all(&odd).unwrap();
        let shown = Cache::new(tagged, true).status().unwrap().human();
        assert!(shown.contains("aééééééééééééééé "), "{shown}");
    }

    #[test]
    fn disabled_cache_neither_reads_nor_writes() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        tree(&src);
        Cache::new(tmp.path().join("c"), true)
            .store("base", "k", &src, "")
            .unwrap();
        let off = Cache::new(tmp.path().join("c"), false);
        assert!(!off.restore("base", "k", &tmp.path().join("o")).unwrap());
        off.store("tree", "k", &src, "").unwrap();
        assert!(!tmp.path().join("c/stages/tree").exists());
    }

    #[test]
    fn prune_keeps_the_most_recent() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::new(tmp.path().join("cache"), true);
        let src = tmp.path().join("src");
        tree(&src);
        for k in ["a", "b", "c"] {
            cache.store("base", k, &src, "").unwrap();
            let e = cache.entry_dir("base", k).join(ENTRY);
            let age = match k {
                "a" => 300,
                "b" => 200,
                _ => 100,
            };
            fs::File::options()
                .append(true)
                .open(&e)
                .unwrap()
                .set_modified(SystemTime::now() - std::time::Duration::from_secs(age))
                .unwrap();
        }
        // What a removal cut short left: out of its name, removed by the next prune.
        let gone = cache.root.join("stages/base/.gone-1-z");
        fs::create_dir_all(gone.join("tree")).unwrap();
        let said = cache.prune(1, false, true).unwrap();
        assert!(
            said.removed.iter().any(|r| r.ends_with(".gone-1-z")),
            "{said:?}"
        );
        assert!(gone.exists(), "a dry run removes nothing");
        assert_eq!(said.entries_removed, 2);
        assert!(
            said.removed.iter().any(|r| r.starts_with("base a")),
            "{said:?}"
        );
        assert!(
            cache.entry_dir("base", "a").exists(),
            "a dry run removes nothing"
        );
        let pruned = cache.prune(1, false, false).unwrap();
        assert_eq!(pruned.entries_removed, 2);
        assert!(cache.entry_dir("base", "c").exists());
        assert!(!cache.entry_dir("base", "a").exists());
        assert!(!gone.exists());
    }
}
