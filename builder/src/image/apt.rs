//! The `resolve` stage's package resolution: a private apt state per set of package
//! sources (kept in the cache), refreshed only when an archive's signed `InRelease`
//! changed, and the exact package set (names and versions) an image gets, computed by
//! apt without installing anything. mmdebstrap later installs from the same indices.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::image::rootfs::Sources;
use crate::model::manifest::Package;
use crate::model::spec::Spec;
use crate::store::cache::INDEX_LOCK as LOCK;
use crate::support::cmd;
use crate::support::digest::sha256_hex;

/// The apt state (configuration and package lists) for one set of sources.
///
/// Builds that share a cache share its indices, and apt's own locks are off (the state
/// is the builder's, not the system's): an index is locked by [`LOCK`] instead, shared
/// for as long as a build reads its lists (resolving, then mmdebstrap installing from
/// them), exclusive while `apt-get update` rewrites them.
pub(crate) struct Index {
    dir: PathBuf,
    /// Whether what is worked out is kept in `dir` (false for `image plan`, which
    /// writes nothing).
    keep: bool,
    /// The temporary directory `dir` is in, for a plan made without current lists.
    _scratch: Option<tempfile::TempDir>,
    /// [`LOCK`], held shared while this value lives (none for a scratch index, and for a
    /// plan reading a cache made before the lock existed).
    lock: Option<fs::File>,
}

/// What was resolved: the package set and the archive state it came from.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Resolution {
    /// sha256 over the `InRelease` files the package lists came from.
    pub(crate) archive: String,
    /// The `Date:` of the first source's `InRelease` (the suite itself), as epoch.
    pub(crate) archive_date: u64,
    /// Every package the rootfs gets from the archive, sorted by name.
    pub(crate) packages: Vec<Package>,
}

impl Index {
    /// The index for `sources` under `cache` (created on first use).
    pub(crate) fn open(cache: &Path, sources: &Sources) -> Result<Self> {
        let dir = index_dir(cache, sources);
        for sub in [
            "lists/partial",
            "cache/archives/partial",
            "etc/sources.list.d",
            "etc/apt.conf.d",
            "etc/preferences.d",
            "etc/trusted.gpg.d",
            "resolved",
        ] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("cannot create {}", dir.join(sub).display()))?;
        }
        let lock = create_lock(&dir.join(LOCK))?;
        lock_shared(&lock, &dir)?;
        // Another build may be reading these as they are written: each is replaced
        // whole, and only when it changed (the same sources give the same files).
        write_if_changed(
            &dir.join("etc/sources.list.d/devos.sources"),
            &sources.deb822,
        )?;
        if !dir.join("status").exists() {
            write_if_changed(&dir.join("status"), "")?;
        }
        let d = dir.display();
        // apt reads only this file: nothing from the host's apt configuration leaks in.
        write_if_changed(
            &dir.join("apt.conf"),
            &format!(
                "Dir::Etc::SourceList \"/dev/null\";\n\
                 Dir::Etc::SourceParts \"{d}/etc/sources.list.d\";\n\
                 Dir::Etc::Parts \"{d}/etc/apt.conf.d\";\n\
                 Dir::Etc::Preferences \"/dev/null\";\n\
                 Dir::Etc::PreferencesParts \"{d}/etc/preferences.d\";\n\
                 Dir::Etc::TrustedParts \"{d}/etc/trusted.gpg.d\";\n\
                 Dir::State::Lists \"{d}/lists\";\n\
                 Dir::State::status \"{d}/status\";\n\
                 Dir::Cache \"{d}/cache\";\n\
                 Debug::NoLocking \"true\";\n\
                 APT::Architecture \"{ARCH}\";\n\
                 APT::Architectures \"{ARCH}\";\n\
                 APT::Install-Recommends \"false\";\n\
                 Acquire::Languages \"none\";\n\
                 Acquire::Retries \"3\";\n"
            ),
        )?;
        Ok(Self {
            dir,
            keep: true,
            _scratch: None,
            lock: Some(lock),
        })
    }

    /// The index `image plan` reads, writing nothing: the cache's, used as it is, when
    /// its lists are those the mirror serves now; else lists downloaded into a
    /// temporary directory that goes with the index.
    pub(crate) fn for_plan(cache: &Path, spec: &Spec, sources: &Sources) -> Result<Self> {
        let current = mirror_state(spec, sources)?;
        let dir = index_dir(cache, sources);
        // Read under the cache's lock when it has one (a plan creates nothing there).
        let lock = match fs::File::open(dir.join(LOCK)) {
            Ok(lock) => {
                lock_shared(&lock, &dir)?;
                Some(lock)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(e).with_context(|| format!("cannot open {}", dir.join(LOCK).display()));
            }
        };
        let cached = Self {
            dir,
            keep: false,
            _scratch: None,
            lock,
        };
        if cached.is_current(&current) && cached.dir.join("apt.conf").is_file() {
            return Ok(cached);
        }
        // Not the cache's lists: its lock is not held while others are downloaded.
        drop(cached);
        let scratch = tempfile::tempdir().context("cannot make a temporary directory")?;
        let index = Self::open(scratch.path(), sources)?;
        index.update(spec)?;
        Ok(Self {
            keep: false,
            _scratch: Some(scratch),
            lock: None,
            ..index
        })
    }

    /// Whether the lists are those of the `InRelease` files whose sha256 is `current`.
    fn is_current(&self, current: &str) -> bool {
        fs::read_to_string(self.dir.join("in-release.sha256")).is_ok_and(|s| s == current)
            && self.archive().is_ok()
    }

    /// The package lists, for mmdebstrap to install from (`--skip=update`).
    pub(crate) fn lists(&self) -> PathBuf {
        self.dir.join("lists")
    }

    /// Unpack `package` at `version` into `into`, downloading its .deb into `debs`
    /// unless it is there already (for tools the image's archive has and the host
    /// lacks, such as ukify).
    pub(crate) fn unpack(
        &self,
        package: &str,
        version: &str,
        debs: &Path,
        into: &Path,
    ) -> Result<()> {
        fs::create_dir_all(debs)?;
        // apt names a downloaded package NAME_VERSION_ARCH.deb, the epoch's colon as %3a.
        let prefix = format!("{package}_{}_", version.replace(':', "%3a"));
        let find = || {
            fs::read_dir(debs).ok().and_then(|d| {
                d.flatten().map(|e| e.path()).find(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
                })
            })
        };
        let deb = match find() {
            Some(deb) => deb,
            None => {
                // apt-get download writes under the final name as it goes: into a
                // directory of this build's own, then renamed beside the others whole
                // (another build finding it meanwhile never reads half a file).
                let partial = tempfile::tempdir_in(debs)
                    .with_context(|| format!("cannot make a directory in {}", debs.display()))?;
                cmd::run(
                    self.apt("apt-get")
                        .current_dir(partial.path())
                        .args(["-q", "download"])
                        .arg(format!("{package}={version}")),
                )
                .with_context(|| format!("cannot download {package} {version}"))?;
                for entry in fs::read_dir(partial.path())? {
                    let from = entry?.path();
                    let to = debs.join(from.file_name().unwrap_or_default());
                    fs::rename(&from, &to).with_context(|| {
                        format!("cannot move {} to {}", from.display(), to.display())
                    })?;
                }
                find().with_context(|| format!("apt downloaded no {package} {version}"))?
            }
        };
        cmd::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(into))
            .with_context(|| format!("cannot unpack {}", deb.display()))?;
        Ok(())
    }

    /// What apt would install into an empty tree for `request` (plus mmdebstrap's
    /// minbase: everything `Essential`, every `Priority: required` package and apt),
    /// without recommends.
    fn simulate(&self, spec: &Spec, request: &[String]) -> Result<Vec<Package>> {
        let mut c = self.apt("apt-get");
        c.args([
            "-q",
            "--simulate",
            "install",
            "?essential",
            "?priority(required)",
            "apt",
        ])
        .args(request);
        let out = cmd::output_with_input(&mut c, None)?;
        if !out.status.success() {
            // The whole of stderr, not the error's tail: which packages apt could not
            // find says whether the names or the archive are wrong.
            let stderr = String::from_utf8_lossy(&out.stderr);
            let missing = unlocatable(&stderr);
            bail!(
                "apt cannot install the packages of {} from {} {}: {}\n  hint: {}",
                spec.path.display(),
                spec.distro.name(),
                spec.suite,
                cmd::failure(&c, &out),
                install_hint(spec, request, &missing)
            );
        }
        let packages = parse_simulation(&String::from_utf8_lossy(&out.stdout));
        if packages.is_empty() {
            bail!("apt resolved no packages for {}", spec.path.display());
        }
        Ok(packages)
    }

    /// Whether the archive has a package called `name`.
    fn has_package(&self, name: &str) -> Result<bool> {
        let out = self
            .apt("apt-cache")
            .args(["show", "--no-all-versions", name])
            .output()
            .context("cannot run apt-cache")?;
        Ok(out.status.success() && !out.stdout.is_empty())
    }

    fn apt(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("APT_CONFIG", self.dir.join("apt.conf"))
            .env("LC_ALL", "C.UTF-8");
        if !self.keep {
            // apt keeps binary caches of the lists in Dir::Cache: not for a plan.
            c.args([
                "-o",
                "Dir::Cache::pkgcache=",
                "-o",
                "Dir::Cache::srcpkgcache=",
            ]);
        }
        c
    }

    /// Bring the package lists up to date. Each archive's `InRelease` is fetched
    /// (small, signed); apt downloads the indices only when one of them changed.
    /// An archive that cannot be reached fails here, naming the mirror, and then a
    /// missing archive keyring.
    pub(crate) fn refresh(&self, spec: &Spec, sources: &Sources) -> Result<()> {
        let current = mirror_state(spec, sources)?;
        if self.is_current(&current) {
            return Ok(());
        }
        // Only a build's index is refreshed (a plan's scratch lists are fetched anew),
        // and [`Index::open`] always locks it.
        let lock = self
            .lock
            .as_ref()
            .context("only an index opened for a build is refreshed")?;
        update_exclusive(
            lock,
            &self.dir,
            || self.is_current(&current),
            || {
                self.update(spec)?;
                write_if_changed(&self.dir.join("in-release.sha256"), &current)
            },
        )
    }

    /// `apt-get update` into this index's lists.
    fn update(&self, spec: &Spec) -> Result<()> {
        cmd::run(self.apt("apt-get").args(["-q", "update", "--error-on=any"])).with_context(
            || {
                format!(
                    "while downloading the package lists for {} {}",
                    spec.distro.name(),
                    spec.suite
                )
            },
        )?;
        Ok(())
    }

    /// sha256 over the `InRelease` files apt's lists come from, in name order.
    fn archive(&self) -> Result<String> {
        let files = self.in_release_files()?;
        if files.is_empty() {
            bail!("no package lists in {}", self.lists().display());
        }
        let mut h = Sha256::new();
        for f in &files {
            h.update(f.file_name().unwrap_or_default().as_encoded_bytes());
            h.update(crate::support::digest::file_sha256(f)?);
        }
        Ok(hex::encode(h.finalize()))
    }

    fn in_release_files(&self) -> Result<Vec<PathBuf>> {
        let mut files: Vec<PathBuf> = fs::read_dir(self.lists())?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().ends_with("_InRelease"))
            .collect();
        files.sort();
        Ok(files)
    }

    /// The package set an image with these packages gets: everything `Essential`,
    /// every `Priority: required` package and apt (mmdebstrap's `minbase`), plus
    /// `packages` and their dependencies, without recommends. Cached by the
    /// archive state and the request, so an unchanged archive costs nothing.
    pub(crate) fn resolve(&self, spec: &Spec, sources: &Sources) -> Result<Resolution> {
        let archive = self.archive()?;
        let mut request = spec.all_packages();
        let key = sha256_hex(format!("{archive}\n{}", request.join("\n")).as_bytes());
        let cached = self.dir.join("resolved").join(format!("{key}.json"));
        // A cached resolution that cannot be used is computed again (and replaced).
        match fs::read(&cached) {
            Ok(bytes) => match serde_json::from_slice::<Resolution>(&bytes) {
                Ok(r) => return Ok(r),
                Err(e) => tracing::warn!(
                    "cached resolution {} is corrupt ({e}); resolving again",
                    cached.display()
                ),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("cannot read {}: {e}; resolving again", cached.display()),
        }
        let mut packages = self.simulate(spec, &request)?;
        // apt satisfies `usrmerge | usr-is-merged` (bookworm's init-system-helpers)
        // with the first, which converts the tree and needs Perl (~47 MB). Merge /usr
        // the way debootstrap does instead: the symlinks made before anything is
        // unpacked and `usr-is-merged` installed with the essential set (`bootstrap`
        // runs mmdebstrap's merged-usr hook), so the dependency is already satisfied.
        let has = |name: &str| packages.iter().any(|p| p.name == name);
        if has("usrmerge")
            && !request.iter().any(|p| p == "usrmerge")
            && self.has_package(MERGED_USR)?
        {
            request.push(MERGED_USR.to_owned());
            packages = self.simulate(spec, &request)?;
        }
        // The date of the suite itself (the first source), else of any archive.
        let files = self.in_release_files()?;
        let first = sources
            .repos
            .first()
            .map(|(uri, suite)| self.lists().join(list_name(uri, suite)))
            .filter(|f| files.contains(f))
            .or_else(|| files.into_iter().next());
        // The date becomes every file time in the image: an unreadable file is an
        // error, not 1970.
        let archive_date = match first {
            Some(f) => {
                let text = fs::read_to_string(&f)
                    .with_context(|| format!("cannot read {}", f.display()))?;
                release_date(&text).unwrap_or_else(|| {
                    tracing::warn!(
                        "{} has no valid Date: field; the image's files are dated 1970 unless the spec or SOURCE_DATE_EPOCH sets a date",
                        f.display()
                    );
                    0
                })
            }
            None => 0,
        };
        let r = Resolution {
            archive,
            archive_date,
            packages,
        };
        if self.keep {
            // Whole or not at all, through a temporary file of its own: builds
            // resolving the same request at once each write it.
            crate::support::paths::replace_file(
                &cached,
                &mut serde_json::to_vec(&r)?.as_slice(),
                0o644,
            )?;
        }
        Ok(r)
    }
}

/// sha256 over the `InRelease` files the mirrors serve now, once they answered and
/// the keyring that must verify them is there.
fn mirror_state(spec: &Spec, sources: &Sources) -> Result<String> {
    let fetched = fetch_in_releases(spec, sources)?;
    // Reachable: now the keyring that must verify it.
    crate::image::rootfs::preflight(spec)?;
    Ok(sha256_hex(fetched.as_bytes()))
}

/// The lock file of an index, 0644 whatever the umask (`image plan` run by a user
/// reads under it).
fn create_lock(path: &Path) -> Result<fs::File> {
    use std::os::unix::fs::PermissionsExt;
    let lock =
        fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    lock.set_permissions(fs::Permissions::from_mode(0o644))
        .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    Ok(lock)
}

/// Take `lock` on the index in `dir` shared, saying on stderr what is waited for when
/// another build is updating the lists.
fn lock_shared(lock: &fs::File, dir: &Path) -> Result<()> {
    match lock.try_lock_shared() {
        Ok(()) => Ok(()),
        Err(fs::TryLockError::WouldBlock) => {
            eprintln!(
                "    waiting for another build to finish updating the package lists in {}",
                dir.display()
            );
            lock.lock_shared().map_err(|e| lock_error(e, dir))
        }
        Err(fs::TryLockError::Error(e)) => Err(lock_error(e, dir)),
    }
}

/// Run `update` holding `lock` on the index in `dir` exclusive, unless the lists are
/// `current` by then; return holding it shared. Builds reading the lists finish first;
/// while waiting for them, the lists are looked at again now and then (shared, which
/// waits only for an updater): when another build brought them up to date meanwhile,
/// there is nothing to do and nothing more to wait for.
fn update_exclusive(
    lock: &fs::File,
    dir: &Path,
    current: impl Fn() -> bool,
    update: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let mut said = false;
    loop {
        match lock.try_lock() {
            Ok(()) => break,
            Err(fs::TryLockError::WouldBlock) => {}
            Err(fs::TryLockError::Error(e)) => return Err(lock_error(e, dir)),
        }
        lock_shared(lock, dir)?;
        if current() {
            return Ok(());
        }
        if !said {
            eprintln!(
                "    waiting for other builds to finish with the package lists in {} (they are out of date)",
                dir.display()
            );
            said = true;
        }
        lock.unlock().map_err(|e| lock_error(e, dir))?;
        std::thread::sleep(Duration::from_secs(1));
    }
    let updated = if current() { Ok(()) } else { update() };
    lock_shared(lock, dir)?;
    updated
}

fn lock_error(e: std::io::Error, dir: &Path) -> anyhow::Error {
    anyhow::Error::from(e).context(format!("cannot lock {}", dir.join(LOCK).display()))
}

/// Replace `path` with `content` whole (a reader sees the old file or the new one),
/// unless it holds that already.
fn write_if_changed(path: &Path, content: &str) -> Result<()> {
    if fs::read(path).is_ok_and(|old| old == content.as_bytes()) {
        return Ok(());
    }
    crate::support::paths::replace_file(path, &mut content.as_bytes(), 0o644)
}

/// Where the cache keeps the index of `sources`.
fn index_dir(cache: &Path, sources: &Sources) -> PathBuf {
    let key = sha256_hex(format!("{}\n{}", ARCH, sources.deb822).as_bytes());
    cache.join("apt").join(&key[..16])
}

/// The package that says /usr is merged by symlinks (debootstrap's way), when the
/// archive has it.
pub(crate) const MERGED_USR: &str = "usr-is-merged";

/// The architecture images are built for.
const ARCH: &str = "amd64";

/// `Inst NAME (VERSION ARCHIVE [ARCH])` lines of `apt-get --simulate`.
fn parse_simulation(out: &str) -> Vec<Package> {
    let mut set = BTreeMap::new();
    for line in out.lines() {
        let Some(rest) = line.strip_prefix("Inst ") else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let (Some(name), Some(version)) = (words.next(), words.next()) else {
            continue;
        };
        // `Inst foo [old] (new ...)` appears only on upgrades, never from an empty status.
        let version = version.trim_start_matches('(');
        set.insert(name.to_owned(), version.to_owned());
    }
    set.into_iter()
        .map(|(name, version)| Package { name, version })
        .collect()
}

/// apt's file name for a list: the URI without its scheme, `/` turned into `_`.
fn list_name(uri: &str, suite: &str) -> String {
    let bare = uri.split_once("://").map_or(uri, |(_, r)| r);
    format!("{}/dists/{suite}/InRelease", bare.trim_end_matches('/')).replace('/', "_")
}

/// The `Date:` field of a Release file as a Unix time; `None` when there is none or
/// it is not an HTTP date.
fn release_date(text: &str) -> Option<u64> {
    let value = text
        .lines()
        .find_map(|l| l.strip_prefix("Date:"))?
        .trim()
        .replace(" UTC", " GMT");
    let t = httpdate::parse_http_date(&value).ok()?;
    t.duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs())
}

/// One `InRelease`. A local (`file://`) mirror is read directly; if it is missing,
/// apt says so when it updates.
fn fetch_one(agent: &ureq::Agent, url: &str) -> Result<String, String> {
    if let Some(path) = url.strip_prefix("file://") {
        return Ok(fs::read_to_string(path).unwrap_or_default());
    }
    agent
        .get(url)
        .call()
        .map_err(|e| e.to_string())
        .and_then(|mut r| {
            r.body_mut()
                .with_config()
                .limit(16 << 20)
                .read_to_string()
                .map_err(|e| e.to_string())
        })
}

/// Fetch every archive's `InRelease` (in parallel); their concatenation says whether
/// the lists are current. Fails naming the first mirror that cannot be reached.
fn fetch_in_releases(spec: &Spec, sources: &Sources) -> Result<String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(8)))
        .build()
        .into();
    let results: Vec<(String, Result<String, String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = sources
            .repos
            .iter()
            .map(|(uri, suite)| {
                let agent = agent.clone();
                let url = format!("{}/dists/{suite}/InRelease", uri.trim_end_matches('/'));
                s.spawn(move || {
                    let body = fetch_one(&agent, &url);
                    (url, body)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| (String::new(), Err("fetch thread panicked".into())))
            })
            .collect()
    });
    let mut all = String::new();
    for ((uri, suite), (url, body)) in sources.repos.iter().zip(results) {
        match body {
            Ok(text) => {
                all.push_str(&url);
                all.push('\n');
                all.push_str(&text);
            }
            Err(e) if e.contains("404") && *suite == spec.suite => {
                bail!(
                    "suite `{}` not found on {uri} (GET {url}: {e})\n  hint: {}",
                    spec.suite,
                    suite_hint(spec, &spec.suite)
                );
            }
            Err(e) => {
                let hint = match sources.origin {
                    "spec" => format!("fix `[base] mirror` in {}", spec.path.display()),
                    "host" => "check the host's apt sources (/etc/apt/sources.list.d)".to_owned(),
                    _ => format!(
                        "set `[base] mirror` in {} to a {} mirror this machine can reach (a local mirror or apt proxy)",
                        spec.path.display(),
                        spec.distro.name()
                    ),
                };
                bail!(
                    "cannot reach the package mirror {uri} for {} {} (GET {url}: {e})\n  hint: {hint}",
                    spec.distro.name(),
                    spec.suite
                );
            }
        }
    }
    Ok(all)
}

/// The packages apt reported as `E: Unable to locate package NAME`.
fn unlocatable(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter_map(|l| l.trim().strip_prefix("E: Unable to locate package "))
        .map(str::trim)
        .collect()
}

/// What to say when apt cannot resolve the request: when `apt` itself or every
/// requested package is missing, the lists are empty or wrong (mirror or components),
/// not the names.
fn install_hint(spec: &Spec, request: &[String], missing: &[&str]) -> String {
    let all_missing = !request.is_empty() && request.iter().all(|r| missing.contains(&r.as_str()));
    if missing.contains(&"apt") || all_missing {
        let mirror = match &spec.mirror {
            Some(m) => format!("`[base] mirror` ({m})"),
            None => {
                "`[base] mirror` (unset: the host's apt sources or the default mirror)".to_owned()
            }
        };
        format!(
            "apt found none of the packages (not even `apt`), so the package lists are empty: check {mirror} and `[base] components` ({}) in {}: the mirror must be a {} mirror with suite `{}`, and components are names such as `main`",
            spec.components.join(", "),
            spec.path.display(),
            spec.distro.name(),
            spec.suite
        )
    } else if !missing.is_empty() {
        format!(
            "the archive has no package {}: check these names in `[packages] include` of {} and its layers (`apt-cache search NAME` finds the right one)",
            missing.join(", "),
            spec.path.display()
        )
    } else {
        format!(
            "check the names in `[packages] include` of {} and its layers; apt's last output above says what conflicts",
            spec.path.display()
        )
    }
}

/// What to say about a suite the mirror does not have: the nearest known one, or the
/// known ones.
fn suite_hint(spec: &Spec, suite: &str) -> String {
    if spec.distro.known_suites().contains(&suite) {
        // The suite is right for the distro: the mirror is the wrong one.
        let mirror = match &spec.mirror {
            Some(m) => format!("the mirror {m}"),
            None => "the mirror".to_owned(),
        };
        return format!(
            "{mirror} does not carry {} suite `{suite}`: check `[base] mirror` in {} against `distro = \"{}\"` (a {} mirror is e.g. {})",
            spec.distro.name(),
            spec.path.display(),
            spec.distro.name(),
            spec.distro.name(),
            spec.distro.default_mirror()
        );
    }
    match spec.distro.nearest_suite(suite) {
        Some(k) => format!(
            "did you mean `{k}`? Set `[base] suite` in {}",
            spec.path.display()
        ),
        None => format!(
            "set `[base] suite` in {} to one the mirror carries, e.g. {}",
            spec.path.display(),
            spec.distro.recent_suites()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Instant;

    /// Another build's hold on an index's lock: its own open file, as another process's.
    fn other(dir: &Path) -> fs::File {
        fs::File::open(dir.join(LOCK)).unwrap()
    }

    #[test]
    fn an_update_holds_the_index_alone_and_leaves_it_shared() {
        let dir = tempfile::tempdir().unwrap();
        let lock = create_lock(&dir.path().join(LOCK)).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(lock.metadata().unwrap().permissions().mode() & 0o777, 0o644);
        lock_shared(&lock, dir.path()).unwrap();
        let runs = AtomicUsize::new(0);
        update_exclusive(
            &lock,
            dir.path(),
            || false,
            || {
                // Nobody reads the lists while they are rewritten.
                assert!(matches!(
                    other(dir.path()).try_lock_shared(),
                    Err(fs::TryLockError::WouldBlock)
                ));
                runs.fetch_add(1, Ordering::SeqCst);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        // Then read by this build and others, updated by none until it is done.
        other(dir.path()).try_lock_shared().unwrap();
        assert!(other(dir.path()).try_lock().is_err());
    }

    #[test]
    fn an_update_waits_for_readers_and_not_once_another_build_updated() {
        let dir = tempfile::tempdir().unwrap();
        let lock = create_lock(&dir.path().join(LOCK)).unwrap();
        // A build reading the lists for the next minute.
        let reader = other(dir.path());
        reader.try_lock_shared().unwrap();
        // Another build brings the lists up to date two seconds from now: this one
        // stops waiting then, without the update and long before the reader is done.
        let current = AtomicBool::new(false);
        let started = Instant::now();
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_secs(2));
                current.store(true, Ordering::SeqCst);
            });
            update_exclusive(
                &lock,
                dir.path(),
                || current.load(Ordering::SeqCst),
                || panic!("updated lists another build had updated"),
            )
            .unwrap();
        });
        assert!(started.elapsed() < Duration::from_secs(30));
        // Out of date and nobody updating: the update runs once the reader is done.
        let runs = AtomicUsize::new(0);
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_secs(2));
                drop(reader);
            });
            lock.unlock().unwrap();
            update_exclusive(
                &lock,
                dir.path(),
                || false,
                || {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                },
            )
            .unwrap();
        });
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_mistyped_suite_gets_the_nearest_known_one() {
        let mut spec = crate::model::spec::parse(
            Path::new("images/x.toml"),
            "[image]\nname = \"x\"\nversion = \"0.1.0\"\n[base]\ndistro = \"debian\"\n",
        )
        .unwrap();
        assert_eq!(
            suite_hint(&spec, "bookwrom"),
            "did you mean `bookworm`? Set `[base] suite` in images/x.toml"
        );
        assert!(suite_hint(&spec, "potato").contains("bookworm, trixie"));
        spec.distro = crate::model::spec::Distro::Ubuntu;
        assert!(suite_hint(&spec, "nobel").contains("`noble`"));
    }

    #[test]
    fn a_known_suite_missing_from_the_mirror_blames_the_mirror() {
        let spec = crate::model::spec::parse(
            Path::new("images/x.toml"),
            "[image]\nname = \"x\"\nversion = \"0.1.0\"\n[base]\ndistro = \"debian\"\nsuite = \"trixie\"\nmirror = \"http://archive.ubuntu.com/ubuntu\"\n",
        )
        .unwrap();
        let hint = suite_hint(&spec, "trixie");
        assert!(!hint.contains("did you mean"), "{hint}");
        assert!(
            hint.contains("does not carry debian suite `trixie`")
                && hint.contains(
                    "check `[base] mirror` in images/x.toml against `distro = \"debian\"`"
                ),
            "{hint}"
        );
    }

    #[test]
    fn every_package_missing_blames_the_mirror_or_components() {
        let spec = crate::model::spec::parse(
            Path::new("images/x.toml"),
            "[image]\nname = \"x\"\nversion = \"0.1.0\"\n[base]\ndistro = \"debian\"\ncomponents = [\"mian\"]\n",
        )
        .unwrap();
        let request = vec!["dbus".to_owned(), "kmod".to_owned()];
        let stderr = "E: Unable to locate package apt\nE: Unable to locate package dbus\nE: Unable to locate package kmod\n";
        let missing = unlocatable(stderr);
        assert_eq!(missing, ["apt", "dbus", "kmod"]);
        let hint = install_hint(&spec, &request, &missing);
        assert!(
            hint.contains("`[base] mirror`") && hint.contains("`[base] components` (mian)"),
            "{hint}"
        );
        assert!(!hint.contains("[packages] include"), "{hint}");
        // One mistyped name: the names are to blame.
        let hint = install_hint(&spec, &request, &["kmdo"]);
        assert!(
            hint.contains("no package kmdo") && hint.contains("[packages] include"),
            "{hint}"
        );
    }

    #[test]
    fn simulation_lines() {
        let out = "NOTE: This is only a simulation!\n\
                   Inst gcc-12-base (12.2.0-14+deb12u1 Debian:12.15/oldstable [amd64])\n\
                   Inst libc6 (2.36-9+deb12u14 Debian:12.15/oldstable [amd64]) []\n\
                   Conf libc6 (2.36-9+deb12u14 Debian:12.15/oldstable [amd64])\n";
        let p = parse_simulation(out);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].name, "gcc-12-base");
        assert_eq!(p[1].version, "2.36-9+deb12u14");
    }

    #[test]
    fn list_names_match_apt() {
        assert_eq!(
            list_name("http://deb.debian.org/debian/", "bookworm-updates"),
            "deb.debian.org_debian_dists_bookworm-updates_InRelease"
        );
    }

    #[test]
    fn release_dates() {
        let t = "Origin: Debian\nDate: Sat, 10 May 2025 09:51:40 UTC\nValid-Until: x\n";
        assert_eq!(release_date(t), Some(1_746_870_700));
    }
}
