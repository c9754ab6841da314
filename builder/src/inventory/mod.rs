//! The registry's commands: `image list`, `show`, `diff`, `verify` and `gc`. Each
//! returns a serializable report with a human rendering; `cli` prints one or the other.

pub(crate) mod export;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;

use anyhow::Result;
use serde::Serialize;

use crate::model::manifest::Manifest;
use crate::model::spec::Format;
use crate::model::states::VersionState;
use crate::store::cache::{self, mib};
use crate::store::registry::{Registry, TestRun, VersionInfo};
use crate::support::digest;
use anyhow::{Context, bail};
use std::path::PathBuf;

pub(crate) fn list(reg: &Registry, name: Option<&str>) -> Result<Vec<VersionInfo>> {
    let all = reg.versions(name)?;
    if all.is_empty()
        && let Some(n) = name
    {
        reg.find(n)?;
    }
    Ok(all)
}

pub(crate) fn list_human(versions: &[VersionInfo]) -> String {
    if versions.is_empty() {
        return "no images in the registry yet: build one with `devos-build image build`\n"
            .to_owned();
    }
    let mut s = format!(
        "{:<20} {:<28} {:<20} {:<8} {:>10}\n",
        "IMAGE", "VERSION", "BUILT (UTC)", "TESTED", "RAW"
    );
    for v in versions {
        let raw = v
            .artifacts
            .iter()
            .find(|a| a.format == Format::Raw)
            .map_or(String::new(), |a| mib(a.size));
        let tested = match (v.state, v.tested) {
            (VersionState::Removed, _) => "removed",
            (_, Some(true)) => "passed",
            (_, Some(false)) => "FAILED",
            (_, None) => "-",
        };
        s.push_str(&format!(
            "{:<20} {:<28} {:<20} {:<8} {:>10}\n",
            v.name,
            v.version,
            utc(v.built_at),
            tested,
            raw
        ));
    }
    s
}

#[derive(Debug, Serialize)]
pub(crate) struct Show {
    #[serde(flatten)]
    pub(crate) version: VersionInfo,
    pub(crate) manifest: Manifest,
    pub(crate) test_runs: Vec<TestRun>,
    pub(crate) files: usize,
}

pub(crate) fn show(reg: &Registry, reference: &str) -> Result<Show> {
    let version = reg.find(reference)?;
    Ok(Show {
        manifest: reg.manifest(&version)?,
        test_runs: reg.test_runs(&version)?,
        files: reg.files(&version)?.len(),
        version,
    })
}

impl Show {
    pub(crate) fn human(&self) -> String {
        let v = &self.version;
        let m = &self.manifest;
        let mut s = format!(
            "{} {}\n  build id      {}\n  built         {} (state: {})\n  output        {}\n  spec          {}\n  distro        {} {} ({} packages, {} files)\n  source date   {}\n",
            v.name,
            v.version,
            v.build_id,
            utc(v.built_at),
            v.state,
            v.dir.display(),
            v.spec,
            m.distro,
            m.suite,
            m.packages.len(),
            self.files,
            utc(m.source_date_epoch)
        );
        if let Some(root_hash) = &m.root_hash {
            s.push_str(&format!(
                "  verified root {root_hash} (dm-verity root hash)\n"
            ));
        }
        if let Some(u) = &m.update_feed {
            s.push_str(&format!("  updates       {}\n", u.describe()));
        }
        if let Some(sb) = &m.secure_boot {
            s.push_str(&format!("  secure boot   {}\n", sb.describe()));
        }
        s.push_str("  artifacts:\n");
        for a in &v.artifacts {
            s.push_str(&format!(
                "    {:<48} {:>10}  {}\n",
                a.file,
                mib(a.size),
                a.sha256
            ));
        }
        s.push_str("  stages:");
        for t in &m.stages {
            s.push_str(&format!(" {} {:.1}s", t.name, t.seconds));
        }
        s.push('\n');
        if self.test_runs.is_empty() {
            s.push_str("  boot tests:   none yet (`devos-build image test`)\n");
        }
        let raw = self
            .version
            .artifacts
            .iter()
            .find(|a| a.format == Format::Raw)
            .map(|a| a.sha256.as_str());
        for t in &self.test_runs {
            // A run of other bytes (before a `--force` rebuild) does not count.
            let other = t.raw_sha256.as_deref().is_some_and(|sha| Some(sha) != raw);
            s.push_str(&format!(
                "  boot test     {} {} in {:.1}s ({}){}\n",
                utc(t.started_at),
                if t.passed { "passed" } else { "FAILED" },
                t.seconds,
                t.accelerator,
                if other {
                    " — of a raw image this version no longer has: does not count"
                } else {
                    ""
                }
            ));
            // Why it failed, as the test said it (its first lines).
            if let Some(f) = &t.failure {
                for line in f.lines().take(4) {
                    s.push_str(&format!("                {line}\n"));
                }
            }
        }
        s
    }
}

#[derive(Debug, Serialize)]
pub(crate) struct Diff {
    pub(crate) from: String,
    pub(crate) to: String,
    pub(crate) packages_added: Vec<String>,
    pub(crate) packages_removed: Vec<String>,
    /// `name: old -> new`.
    pub(crate) packages_changed: Vec<String>,
    pub(crate) files_added: Vec<String>,
    pub(crate) files_removed: Vec<String>,
    /// `path (content, mode, ...)`.
    pub(crate) files_changed: Vec<String>,
    /// Per artifact format: (from bytes, to bytes).
    pub(crate) sizes: BTreeMap<String, (u64, u64)>,
}

pub(crate) fn diff(reg: &Registry, a: &str, b: &str) -> Result<Diff> {
    let (va, vb) = (reg.find(a)?, reg.find(b)?);
    let (ma, mb) = (reg.manifest(&va)?, reg.manifest(&vb)?);
    let pa: BTreeMap<&str, &str> = ma
        .packages
        .iter()
        .map(|p| (p.name.as_str(), p.version.as_str()))
        .collect();
    let pb: BTreeMap<&str, &str> = mb
        .packages
        .iter()
        .map(|p| (p.name.as_str(), p.version.as_str()))
        .collect();
    let names: BTreeSet<&str> = pa.keys().chain(pb.keys()).copied().collect();
    let mut d = Diff {
        from: format!("{}@{}", va.name, va.version),
        to: format!("{}@{}", vb.name, vb.version),
        packages_added: Vec::new(),
        packages_removed: Vec::new(),
        packages_changed: Vec::new(),
        files_added: Vec::new(),
        files_removed: Vec::new(),
        files_changed: Vec::new(),
        sizes: BTreeMap::new(),
    };
    for n in names {
        match (pa.get(n), pb.get(n)) {
            (None, Some(v)) => d.packages_added.push(format!("{n} {v}")),
            (Some(v), None) => d.packages_removed.push(format!("{n} {v}")),
            (Some(x), Some(y)) if x != y => d.packages_changed.push(format!("{n}: {x} -> {y}")),
            _ => {}
        }
    }
    let (fa, fb) = (reg.files(&va)?, reg.files(&vb)?);
    for (path, x, y) in digest::diff_files(&fa, &fb, false) {
        match (x, y) {
            (None, Some(_)) => d.files_added.push(path.to_owned()),
            (Some(_), None) => d.files_removed.push(path.to_owned()),
            (Some(x), Some(y)) => {
                let what: Vec<&str> = x
                    .differences(y)
                    .into_iter()
                    .filter(|w| *w != "mtime")
                    .collect();
                d.files_changed
                    .push(format!("{path} ({})", what.join(", ")));
            }
            (None, None) => {}
        }
    }
    for a in &va.artifacts {
        if let Some(b) = vb.artifacts.iter().find(|b| b.format == a.format) {
            d.sizes
                .insert(a.format.extension().to_owned(), (a.size, b.size));
        }
    }
    if let (Some(a), Some(b)) = (used(&ma), used(&mb)) {
        d.sizes.insert("raw (used)".into(), (a, b));
    }
    Ok(d)
}

fn used(m: &Manifest) -> Option<u64> {
    m.artifacts
        .iter()
        .find(|a| a.format == Format::Raw)
        .map(|a| a.used_bytes)
}

impl Diff {
    pub(crate) fn human(&self) -> String {
        let mut s = format!("{} -> {}\n", self.from, self.to);
        let section = |s: &mut String, title: &str, sign: &str, items: &[String]| {
            if !items.is_empty() {
                s.push_str(&format!("{title} ({}):\n", items.len()));
                for i in items {
                    s.push_str(&format!("  {sign} {i}\n"));
                }
            }
        };
        section(&mut s, "packages added", "+", &self.packages_added);
        section(&mut s, "packages removed", "-", &self.packages_removed);
        section(&mut s, "packages changed", "~", &self.packages_changed);
        section(&mut s, "files added", "+", &self.files_added);
        section(&mut s, "files removed", "-", &self.files_removed);
        section(&mut s, "files changed", "~", &self.files_changed);
        if self.packages_added.is_empty()
            && self.packages_removed.is_empty()
            && self.packages_changed.is_empty()
            && self.files_added.is_empty()
            && self.files_removed.is_empty()
            && self.files_changed.is_empty()
        {
            s.push_str("no package or file differences\n");
        }
        s.push_str("sizes:\n");
        for (format, (a, b)) in &self.sizes {
            let delta = i128::from(*b) - i128::from(*a);
            s.push_str(&format!(
                "  {format:<11} {} -> {} ({}{:.1} MiB)\n",
                mib(*a),
                mib(*b),
                if delta >= 0 { "+" } else { "-" },
                delta.unsigned_abs() as f64 / (1 << 20) as f64
            ));
        }
        s
    }
}

#[derive(Debug, Serialize)]
pub(crate) struct Verify {
    pub(crate) version: String,
    pub(crate) ok: bool,
    pub(crate) artifacts: Vec<VerifiedArtifact>,
}

#[derive(Debug, Serialize)]
pub(crate) struct VerifiedArtifact {
    pub(crate) file: String,
    pub(crate) expected: String,
    /// `None` when the file is missing.
    pub(crate) actual: Option<String>,
    pub(crate) ok: bool,
}

pub(crate) fn verify(reg: &Registry, reference: &str) -> Result<Verify> {
    let v = reg.find(reference)?;
    let mut artifacts = Vec::new();
    for a in &v.artifacts {
        let path = v.dir.join(&a.file);
        let actual = match digest::file_sha256(&path) {
            Ok(sha256) => Some(sha256),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            // Not "missing": the user has to fix access before anything can be verified.
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        artifacts.push(VerifiedArtifact {
            ok: actual.as_deref() == Some(a.sha256.as_str()),
            file: a.file.clone(),
            expected: a.sha256.clone(),
            actual,
        });
    }
    Ok(Verify {
        version: format!("{}@{}", v.name, v.version),
        ok: !artifacts.is_empty() && artifacts.iter().all(|a| a.ok),
        artifacts,
    })
}

impl Verify {
    pub(crate) fn human(&self) -> String {
        let mut s = String::new();
        for a in &self.artifacts {
            let state = match (&a.actual, a.ok) {
                (_, true) => "ok".to_owned(),
                (None, _) => "MISSING".to_owned(),
                (Some(h), false) => format!("MISMATCH (now {h}, recorded {})", a.expected),
            };
            s.push_str(&format!("  {:<48} {state}\n", a.file));
        }
        s.push_str(&format!(
            "{} {}\n",
            self.version,
            if self.ok {
                "verified: every artifact matches the sha256 recorded when it was built"
            } else {
                "FAILED verification: the artifacts above are not what was built"
            }
        ));
        if !self.ok {
            s.push_str(&format!(
                "  hint: a MISSING image format is made again from the raw image with `devos-build image export {} --format FORMAT` (once the raw image verifies); a changed or missing raw image cannot be repaired: build the version again (`image build --force`)\n",
                self.version
            ));
        }
        s
    }
}

#[derive(Debug, Default, Serialize)]
pub(crate) struct Gc {
    /// Nothing was deleted: this is what would be (`--dry-run`).
    pub(crate) dry_run: bool,
    pub(crate) kept: Vec<String>,
    pub(crate) removed: Vec<String>,
    /// Versions gc would have removed whose output directory holds something without a
    /// readable manifest: left alone, with why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) left: Vec<String>,
    pub(crate) freed_bytes: u64,
    pub(crate) cache_entries_removed: usize,
}

/// Keep the `keep` newest versions of each image (or of `name`) and its newest
/// version that passed a boot test; delete the others' artifacts and the cache
/// entries only they used. With `dry_run`, delete nothing and say what would go.
pub(crate) fn gc(reg: &mut Registry, name: Option<&str>, keep: usize, dry_run: bool) -> Result<Gc> {
    let all = list(reg, name)?;
    let mut by_image: BTreeMap<&str, Vec<&VersionInfo>> = BTreeMap::new();
    for v in all.iter().filter(|v| v.state == VersionState::Built) {
        by_image.entry(&v.name).or_default().push(v);
    }
    let mut report = Gc {
        dry_run,
        ..Gc::default()
    };
    let mut kept_keys = BTreeSet::new();
    let mut dropped_keys = BTreeSet::new();
    let on_stacks = on_stacks(reg)?;
    for versions in by_image.values() {
        let newest_passing = versions
            .iter()
            .find(|v| v.tested == Some(true))
            .map(|v| v.id);
        for (i, v) in versions.iter().enumerate() {
            let keys = reg
                .manifest(v)
                .map(|m| [m.cache_keys.base, m.cache_keys.tree])
                .unwrap_or_default();
            if i < keep
                || Some(v.id) == newest_passing
                || on_stacks.contains(&(v.name.clone(), v.version.clone()))
            {
                report.kept.push(format!("{}@{}", v.name, v.version));
                kept_keys.extend(keys);
                continue;
            }
            // Only ever delete a directory that really is this version's output.
            let gone = gone_name(&v.dir);
            let there = Manifest::load(&v.dir).ok();
            if there.as_ref().is_some_and(|m| m.build_id == v.build_id) {
                report.freed_bytes += cache::dir_size(&v.dir);
                if !dry_run {
                    remove_output(&v.dir)?;
                }
            } else if there.is_some() {
                // Another build's output replaced it (`image build --out DIR` again):
                // the version's files are gone already; the other build's stay.
            } else if v.dir.exists() {
                // Something is there without a manifest that can be read: not deleted,
                // and the version stays as it is.
                report.left.push(format!(
                    "{}@{}: {} holds no manifest.json that can be read; remove it yourself if it is not needed",
                    v.name,
                    v.version,
                    v.dir.display()
                ));
                kept_keys.extend(keys);
                continue;
            } else if gone.is_dir() {
                // What an earlier gc moved out of the way and could not remove.
                report.freed_bytes += cache::dir_size(&gone);
                if !dry_run {
                    fs::remove_dir_all(&gone)
                        .map_err(|e| not_removed(&gone, "the output directory", e))?;
                }
            }
            if !dry_run {
                reg.mark_removed(v)?;
            }
            report.removed.push(format!("{}@{}", v.name, v.version));
            dropped_keys.extend(keys);
        }
    }
    let stages = cache::dir().join("stages");
    // Keys come from manifests in the registry: only a plain name (hex, as the build
    // makes them) can name a cache entry, never `..` or a path.
    for key in dropped_keys
        .difference(&kept_keys)
        .filter(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        for kind in cache::KINDS {
            let dir = stages.join(kind).join(key);
            if dir.is_dir() {
                report.freed_bytes += cache::dir_size(&dir);
                if !dry_run {
                    fs::remove_dir_all(&dir)
                        .map_err(|e| not_removed(&dir, "the cache entry", e))?;
                }
                report.cache_entries_removed += 1;
            }
        }
    }
    Ok(report)
}

/// The versions each stack the registry changed runs, or would go back to: the two
/// ends of its newest change. `image gc` keeps their files.
fn on_stacks(reg: &Registry) -> Result<BTreeSet<(String, String)>> {
    let mut seen = BTreeSet::new();
    let mut versions = BTreeSet::new();
    // Newest first: the first change of each stack is its newest.
    for r in reg.rollouts(None, None)? {
        if seen.insert((r.stack.clone(), r.region.clone())) {
            versions.insert((r.image.clone(), r.to.clone()));
            if let Some(from) = r.from {
                versions.insert((r.image, from));
            }
        }
    }
    Ok(versions)
}

/// Where [`remove_output`] moves `dir` before removing it; a later gc removes what a
/// failed removal left there.
fn gone_name(dir: &std::path::Path) -> std::path::PathBuf {
    crate::support::remove::aside(dir, "gone")
}

/// Remove a version's output directory: first out of its name in one rename (a
/// removal cut short leaves no half a version under it), then whole.
fn remove_output(dir: &std::path::Path) -> Result<()> {
    let gone = gone_name(dir);
    crate::support::remove::dir_if_present(&gone)?;
    fs::rename(dir, &gone).map_err(|e| not_removed(dir, "the output directory", e))?;
    fs::remove_dir_all(&gone).map_err(|e| not_removed(&gone, "the output directory", e))
}

/// The error of a removal that failed, naming what and where (and sudo, when
/// permissions were the reason: builds under sudo leave root's files).
fn not_removed(path: &std::path::Path, what: &str, e: std::io::Error) -> anyhow::Error {
    let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
        "\n  hint: images built with sudo are root's: run `sudo devos-build image gc`"
    } else {
        ""
    };
    anyhow::anyhow!("cannot remove {what} {}: {e}{hint}", path.display())
}

impl Gc {
    pub(crate) fn human(&self) -> String {
        let mut s = String::new();
        let (removed, freed) = if self.dry_run {
            ("would remove", "would free")
        } else {
            ("removed", "freed")
        };
        for r in &self.removed {
            s.push_str(&format!("  {removed} {r}\n"));
        }
        for k in &self.kept {
            s.push_str(&format!("  kept    {k}\n"));
        }
        for l in &self.left {
            s.push_str(&format!("  left    {l}\n"));
        }
        s.push_str(&format!(
            "{removed} {} versions and {} cache entries, {freed} {}\n",
            self.removed.len(),
            self.cache_entries_removed,
            mib(self.freed_bytes)
        ));
        s
    }
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) for a Unix time.
fn utc(t: u64) -> String {
    let stamp = crate::image::disk::debugfs_time(t);
    format!(
        "{}-{}-{} {}:{}:{}",
        &stamp[..4],
        &stamp[4..6],
        &stamp[6..8],
        &stamp[8..10],
        &stamp[10..12],
        &stamp[12..14]
    )
}

/// The raw image of `v` and the sha256 the registry holds for it.
pub(crate) fn raw_path(v: &VersionInfo) -> Result<(PathBuf, String)> {
    let a = v
        .artifacts
        .iter()
        .find(|a| a.format == Format::Raw)
        .with_context(|| format!("{}@{} has no raw image in the registry", v.name, v.version))?;
    let path = v.dir.join(&a.file);
    if !path.is_file() {
        bail!(
            "the raw image of {}@{} is gone ({})\n  hint: `image gc` may have removed it; build the version again",
            v.name,
            v.version,
            path.display()
        );
    }
    Ok((path, a.sha256.clone()))
}

/// The raw image of `v`, checked against the sha256 the registry holds, so that what
/// is compared is exactly what was tested. (`publish ami` checks it in the same read
/// that finds the blocks to upload.)
pub(crate) fn raw_artifact(v: &VersionInfo) -> Result<(PathBuf, String)> {
    let (path, recorded) = raw_path(v)?;
    let actual =
        digest::file_sha256(&path).with_context(|| format!("cannot read {}", path.display()))?;
    if actual != recorded {
        bail!(
            "{} changed since it was built (sha256 {actual}, registry {recorded})\n  hint: rebuild with `devos-build image build --force` and test it again",
            path.display()
        );
    }
    Ok((path, actual))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::registry::tests::manifest;

    /// A registry in `dir` with `versions` built, each with its output in `dir/VERSION`.
    fn built(dir: &std::path::Path, versions: &[&str]) -> Registry {
        let mut reg = Registry::open(&dir.join("r.db")).unwrap();
        for version in versions {
            reg.record_build(
                &dir.join(version),
                std::path::Path::new("s"),
                &manifest(version, &[]),
                &[],
            )
            .unwrap();
        }
        reg
    }

    #[test]
    fn gc_keeps_what_a_stack_runs_and_what_it_would_go_back_to() {
        let tmp = tempfile::tempdir().unwrap();
        let mut reg = built(tmp.path(), &["1.0.0", "2.0.0", "3.0.0", "4.0.0"]);
        let find = |v: &str| reg.find(&format!("devos-test@{v}")).unwrap();
        let (v1, v2, v3) = (find("1.0.0"), find("2.0.0"), find("3.0.0"));
        let mut change = |stack: &str, from: Option<&VersionInfo>, to: &VersionInfo| {
            let id = reg.start_rollout(stack, "r", "rollout", from, to).unwrap();
            reg.finish_rollout(id, crate::model::states::ChangeState::Succeeded, None)
                .unwrap();
        };
        // Stack s went 3.0.0 -> 1.0.0 -> 2.0.0: it runs 2.0.0 and would go back to
        // 1.0.0; 3.0.0 is no end of its newest change.
        change("s", None, &v3);
        change("s", Some(&v3), &v1);
        change("s", Some(&v1), &v2);
        let report = gc(&mut reg, None, 1, true).unwrap();
        let mut kept = report.kept.clone();
        kept.sort();
        assert_eq!(
            kept,
            ["devos-test@1.0.0", "devos-test@2.0.0", "devos-test@4.0.0"]
        );
        assert_eq!(report.removed, ["devos-test@3.0.0"]);
    }

    #[test]
    fn gc_leaves_a_directory_that_is_not_the_versions_output_and_the_version() {
        let tmp = tempfile::tempdir().unwrap();
        let mut reg = built(tmp.path(), &["1.0.0", "2.0.0"]);
        // Something else now lives where 1.0.0's output was (no manifest).
        fs::create_dir(tmp.path().join("1.0.0")).unwrap();
        fs::write(tmp.path().join("1.0.0/precious"), "x").unwrap();
        let report = gc(&mut reg, None, 1, false).unwrap();
        assert!(report.removed.is_empty(), "{report:?}");
        assert!(
            report.left.len() == 1 && report.left[0].starts_with("devos-test@1.0.0: "),
            "{report:?}"
        );
        assert!(report.human().contains("left    devos-test@1.0.0"));
        assert!(tmp.path().join("1.0.0/precious").exists());
        assert_eq!(
            reg.find("devos-test@1.0.0").unwrap().state,
            VersionState::Built
        );
        // Another build's output in its place (`image build --out DIR` again): the
        // version's files are gone, so it is removed, and the other build's files stay.
        let other = manifest("9.0.0", &[]);
        fs::write(
            tmp.path().join("1.0.0/manifest.json"),
            serde_json::to_string(&other).unwrap(),
        )
        .unwrap();
        let report = gc(&mut reg, None, 1, false).unwrap();
        assert_eq!(report.removed, ["devos-test@1.0.0"], "{report:?}");
        assert!(report.left.is_empty(), "{report:?}");
        assert!(tmp.path().join("1.0.0/precious").exists());
    }
}
