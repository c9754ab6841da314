//! The build pipeline: a flat list of named stages over an immutable spec, producing
//! a versioned output directory that appears atomically.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::agent_pkg::{self, AgentPackage};
use crate::disk::Partition;
use crate::identity;
use crate::spec::{self, Format, Spec};
use crate::ui::Ui;
use crate::{convert, customize, digest, disk, rootfs};

/// The stages, in order; these names appear in logs, timings and the manifest.
pub const STAGES: &[&str] = &["load", "resolve", "rootfs", "customize", "disk", "convert"];

pub struct BuildOptions {
    pub spec: PathBuf,
    pub out: Option<PathBuf>,
    pub agent_deb: Option<PathBuf>,
    pub force: bool,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Artifact {
    pub file: String,
    pub format: String,
    pub sha256: String,
    pub size: u64,
    /// Bytes actually allocated on disk (sparse files use less than `size`).
    pub used_bytes: u64,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct StageTiming {
    pub name: String,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Package {
    pub name: String,
    pub version: String,
}

/// `manifest.json` in every output directory.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Manifest {
    pub name: String,
    pub version: String,
    pub build_id: String,
    pub description: String,
    pub distro: String,
    pub suite: String,
    pub builder_version: String,
    pub source_date_epoch: u64,
    pub kernel_cmdline: String,
    pub inputs: Vec<identity::Input>,
    pub package_sources: String,
    pub agent: Option<AgentInfo>,
    pub packages: Vec<Package>,
    pub partitions: Vec<PartitionInfo>,
    pub artifacts: Vec<Artifact>,
    pub stages: Vec<StageTiming>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct AgentInfo {
    pub file: String,
    pub version: String,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct PartitionInfo {
    pub label: String,
    pub filesystem: String,
    pub offset: u64,
    pub size: u64,
}

impl From<Partition> for PartitionInfo {
    fn from(p: Partition) -> Self {
        Self {
            label: p.label,
            filesystem: p.filesystem,
            offset: p.offset,
            size: p.size,
        }
    }
}

impl Manifest {
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("manifest.json");
        let text = fs::read_to_string(&path).with_context(|| {
            format!(
                "cannot read {}: is this an image output directory?",
                path.display()
            )
        })?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid manifest", path.display()))
    }

    /// The raw artifact's path in `dir`.
    pub fn raw(&self, dir: &Path) -> Option<PathBuf> {
        self.artifacts
            .iter()
            .find(|a| a.format == "raw")
            .map(|a| dir.join(&a.file))
    }
}

/// The result of a build: where it is and what it is.
pub struct Built {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// False when an identical build already existed and nothing was built.
    pub fresh: bool,
}

/// Where output goes when `--out` is not given: `target/images` of the source tree
/// the spec belongs to, else of the current directory.
pub fn images_root(spec_path: &Path) -> PathBuf {
    agent_pkg::find_source_tree(spec_path)
        .unwrap_or_else(|| PathBuf::from("."))
        .join("target/images")
}

/// The persistent cache (downloaded packages): `$DEVOS_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/devos`, else `~/.cache/devos`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("DEVOS_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("devos");
    }
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache"))
        .join(".cache/devos")
}

struct Timer<'a> {
    ui: &'a mut Ui,
    timings: Vec<StageTiming>,
}

impl Timer<'_> {
    fn run<T>(&mut self, name: &str, f: impl FnOnce(&mut Ui) -> Result<T>) -> Result<T> {
        let index = STAGES.iter().position(|s| *s == name).map_or(0, |i| i + 1);
        let start = self.ui.stage(index, STAGES.len(), name);
        let out = f(self.ui).with_context(|| format!("stage `{name}` failed"))?;
        let took = start.elapsed();
        self.ui.stage_done(name, took);
        self.timings.push(StageTiming {
            name: name.to_owned(),
            seconds: took.as_secs_f64(),
        });
        Ok(out)
    }
}

pub fn build(opts: &BuildOptions, ui: &mut Ui) -> Result<Built> {
    let mut t = Timer {
        ui,
        timings: Vec::new(),
    };
    let spec = t.run("load", |_| Ok(spec::load(&opts.spec)?))?;

    let images = opts
        .out
        .as_ref()
        .and_then(|o| o.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| images_root(&spec.path).join(&spec.name));
    fs::create_dir_all(&images).with_context(|| format!("cannot create {}", images.display()))?;
    remove_stale_work_dirs(&images);
    let work = tempfile::Builder::new()
        .prefix(WORK_PREFIX)
        .tempdir_in(&images)
        .with_context(|| format!("cannot create a work directory in {}", images.display()))?;
    // Held for the whole build: it tells later builds this work directory is alive.
    let lock = fs::File::create(work.path().join(WORK_LOCK))?;
    lock.lock()?;
    let staged = work.path().join("out");
    fs::create_dir(&staged)?;

    // Mirrors are checked before the agent is compiled, so a bad mirror fails in seconds.
    let (sources, agent, id) = t.run("resolve", |ui| {
        let sources = rootfs::sources(&spec);
        rootfs::preflight(&spec, &sources)?;
        let agent = agent_package(&spec, opts, &staged)?;
        let id = identity::resolve(
            &spec,
            agent.as_ref().map_or("none", |a| &a.sha256),
            &sources.deb822,
        );
        ui.info(&format!(
            "    {} {} (package sources: {})",
            spec.name, id.version, sources.origin
        ));
        Ok((sources, agent, id))
    })?;

    let final_dir = opts.out.clone().unwrap_or_else(|| images.join(&id.version));
    if final_dir.join("manifest.json").is_file() && !opts.force {
        let manifest = Manifest::load(&final_dir)?;
        if manifest.build_id == id.build_id {
            t.ui.info(&format!(
                "{} is up to date in {}",
                id.version,
                final_dir.display()
            ));
            return Ok(Built {
                dir: final_dir,
                manifest,
                fresh: false,
            });
        }
    }

    let tree = work.path().join("tree");
    t.run("rootfs", |_| {
        rootfs::bootstrap(
            &spec,
            &sources,
            &tree,
            &cache_dir()
                .join("packages")
                .join(format!("{:?}-{}", spec.distro, spec.suite).to_lowercase()),
            id.source_date_epoch,
        )
    })?;
    t.run("customize", |_| {
        let deb = agent.as_ref().map(|a| a.path.as_path());
        customize::customize(&spec, &id, &tree, deb.unwrap_or(Path::new("")))
    })?;
    let packages = rootfs::installed_packages(&tree)?
        .into_iter()
        .map(|(name, version)| Package { name, version })
        .collect();

    let raw_name = format!("{}-{}.raw", spec.name, id.version);
    let raw = staged.join(&raw_name);
    let partitions = t.run("disk", |_| {
        disk::build(&spec, &id, &tree, work.path(), &raw)
    })?;
    // The tree is no longer needed; free the space before converting.
    fs::remove_dir_all(&tree).ok();

    t.run("convert", |_| {
        for format in &spec.formats {
            let out = staged.join(format!(
                "{}-{}.{}",
                spec.name,
                id.version,
                format.extension()
            ));
            convert::convert(&raw, *format, &out)?;
        }
        Ok(())
    })?;

    let mut artifacts = Vec::new();
    for format in &spec.formats {
        let file = format!("{}-{}.{}", spec.name, id.version, format.extension());
        artifacts.push(artifact(&staged, &file, *format)?);
    }
    let manifest = Manifest {
        name: spec.name.clone(),
        version: id.version.clone(),
        build_id: id.build_id.clone(),
        description: spec.description.clone(),
        distro: format!("{:?}", spec.distro).to_lowercase(),
        suite: spec.suite.clone(),
        builder_version: identity::BUILDER_VERSION.to_owned(),
        source_date_epoch: id.source_date_epoch,
        kernel_cmdline: disk::kernel_cmdline(&spec, &id),
        inputs: id.inputs.clone(),
        package_sources: sources.origin.to_owned(),
        agent: agent.as_ref().map(|a| AgentInfo {
            file: a
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            version: a.version.clone(),
            sha256: a.sha256.clone(),
        }),
        packages,
        partitions: partitions.into_iter().map(Into::into).collect(),
        artifacts,
        stages: t.timings,
    };
    write_outputs(&staged, &manifest)?;
    publish_dir(&staged, &final_dir)?;
    Ok(Built {
        dir: final_dir,
        manifest,
        fresh: true,
    })
}

const WORK_PREFIX: &str = ".build-";
const WORK_LOCK: &str = "lock";

/// Remove work directories left by builds that were killed (their lock is free).
/// Directories of builds still running are locked and left alone.
pub fn remove_stale_work_dirs(images: &Path) {
    let Ok(entries) = fs::read_dir(images) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let stale = entry.file_name().to_string_lossy().starts_with(WORK_PREFIX)
            && fs::File::open(dir.join(WORK_LOCK)).is_ok_and(|f| f.try_lock().is_ok());
        if stale {
            tracing::info!("removing {} left by a killed build", dir.display());
            let _ = fs::remove_dir_all(&dir);
        }
    }
}

fn agent_package(spec: &Spec, opts: &BuildOptions, staged: &Path) -> Result<Option<AgentPackage>> {
    if !spec.agent_enabled {
        return Ok(None);
    }
    let pkg = match &opts.agent_deb {
        Some(deb) => {
            let pkg = AgentPackage::from_file(deb)?;
            let dest = staged.join(deb.file_name().unwrap_or_default());
            fs::copy(deb, &dest).with_context(|| format!("cannot copy {}", deb.display()))?;
            AgentPackage { path: dest, ..pkg }
        }
        None => {
            let Some(source) = agent_pkg::find_source_tree(&spec.path) else {
                bail!(
                    "{} is not inside a DevOS source tree, so the agent cannot be built from source\n  hint: pass a prebuilt package with `--agent-deb devos-agent_VERSION_amd64.deb`",
                    spec.path.display()
                );
            };
            // Unset, the package's files carry epoch 0, so the same sources give
            // the same .deb and so the same build id.
            agent_pkg::build(&source, staged, identity::source_date_epoch().unwrap_or(0))?
        }
    };
    Ok(Some(pkg))
}

fn artifact(dir: &Path, file: &str, format: Format) -> Result<Artifact> {
    use std::os::unix::fs::MetadataExt;
    let path = dir.join(file);
    let meta = fs::metadata(&path)?;
    Ok(Artifact {
        file: file.to_owned(),
        format: format.extension().to_owned(),
        sha256: digest::file_sha256(&path)?,
        size: meta.len(),
        used_bytes: meta.blocks() * 512,
    })
}

fn write_outputs(dir: &Path, manifest: &Manifest) -> Result<()> {
    let mut sums = String::new();
    for a in &manifest.artifacts {
        sums.push_str(&format!("{}  {}\n", a.sha256, a.file));
    }
    if let Some(agent) = &manifest.agent {
        sums.push_str(&format!("{}  {}\n", agent.sha256, agent.file));
    }
    fs::write(dir.join("SHA256SUMS"), sums)?;
    fs::write(
        dir.join("manifest.json"),
        serde_json::to_string_pretty(manifest)? + "\n",
    )?;
    Ok(())
}

/// Move a finished output directory to its final name in one rename; an existing
/// one (a `--force` rebuild) is replaced only after the new one is complete.
fn publish_dir(staged: &Path, final_dir: &Path) -> Result<()> {
    if final_dir.exists() {
        let old = final_dir.with_extension("old");
        fs::rename(final_dir, &old)?;
        fs::rename(staged, final_dir)?;
        fs::remove_dir_all(&old).ok();
    } else {
        if let Some(parent) = final_dir.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::rename(staged, final_dir)
            .with_context(|| format!("cannot move the output to {}", final_dir.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_work_dirs_go_and_live_ones_stay() {
        let images = tempfile::tempdir().unwrap();
        let live = images.path().join(".build-live");
        let dead = images.path().join(".build-dead");
        let done = images.path().join("0.1.0+abc");
        for d in [&live, &dead, &done] {
            fs::create_dir(d).unwrap();
            fs::write(d.join(WORK_LOCK), "").unwrap();
        }
        let held = fs::File::open(live.join(WORK_LOCK)).unwrap();
        held.lock().unwrap();
        remove_stale_work_dirs(images.path());
        assert!(live.exists(), "a running build's directory must stay");
        assert!(!dead.exists(), "a killed build's directory must go");
        assert!(done.exists(), "finished versions are never touched");
    }
}
