//! Layer 4, the build: the pipeline of named stages over an immutable spec, producing
//! a versioned output directory that appears atomically.

pub mod agent_pkg;
mod nixos;
pub(crate) mod repro;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::build::agent_pkg::AgentPackage;
use crate::image::identity::{self, Identity};
use crate::image::{apt, convert, customize, disk, rootfs, secure_boot};
use crate::model::manifest::{
    AgentInfo, Artifact, CacheKeys, Manifest, Package, StageTiming, UpdateFile,
};
use crate::model::spec::{self, Format, Spec};
use crate::store::{cache, registry};
use crate::support::digest::{self, FileEntry};
use crate::support::ui::Ui;
use crate::support::workdir::{WorkDir, remove_stale_work_dirs};
use crate::support::{cmd, remove};

/// The stages, in order; these names appear in logs, timings and the manifest.
const STAGES: &[&str] = &[
    "load",
    "resolve",
    "agent",
    "rootfs",
    "customize",
    "disk",
    "convert",
];

#[derive(Clone)]
pub(crate) struct BuildOptions {
    pub(crate) spec: PathBuf,
    pub(crate) out: Option<PathBuf>,
    pub(crate) agent_deb: Option<PathBuf>,
    pub(crate) force: bool,
    /// Neither use nor fill the stage cache (downloaded packages are still reused).
    pub(crate) no_cache: bool,
    /// `None`: the default registry.
    pub(crate) registry: Option<PathBuf>,
}

/// The result of a build: where it is and what it is.
pub(crate) struct Built {
    pub(crate) dir: PathBuf,
    pub(crate) manifest: Manifest,
    /// False when an identical build already existed and nothing was built.
    pub(crate) fresh: bool,
    /// The image's file list (empty when nothing was built).
    pub(crate) files: Vec<FileEntry>,
}

/// Where output goes when `--out` is not given: `target/images` of the source tree
/// the spec belongs to, else of the current directory.
pub(crate) fn images_root(spec_path: &Path) -> PathBuf {
    // Absolute: the registry records where versions went, and a relative path would
    // mean another directory for every later command.
    agent_pkg::find_source_tree(spec_path)
        .or_else(|| std::env::current_dir().ok())
        .unwrap_or_else(|| PathBuf::from("."))
        .join("target/images")
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

/// What the `resolve` stage found: everything that determines the image, and so its
/// build id, without building anything.
struct Resolved {
    pub(crate) spec: Spec,
    pub(crate) sources: rootfs::Sources,
    pub(crate) index: apt::Index,
    pub(crate) resolution: apt::Resolution,
    pub(crate) agent: Option<AgentPackage>,
    pub(crate) id: Identity,
}

/// `image plan`: the build id and what went into it.
#[derive(Debug, Serialize)]
pub(crate) struct Plan {
    pub(crate) name: String,
    /// None while the agent package is still to be built: the version depends on it.
    pub(crate) version: Option<String>,
    pub(crate) build_id: Option<String>,
    pub(crate) source_date_epoch: u64,
    pub(crate) inputs: Vec<crate::model::manifest::Input>,
    pub(crate) package_sources: String,
    pub(crate) archive: String,
    pub(crate) packages: Vec<Package>,
    /// The agent package's sha256, or "to be built".
    pub(crate) agent: Option<String>,
    /// Where the build would go, and whether it is already there.
    pub(crate) out: PathBuf,
    pub(crate) up_to_date: bool,
    /// Which stage outputs the cache already holds.
    pub(crate) cached: Vec<String>,
}

impl Plan {
    pub(crate) fn human(&self) -> String {
        let unknown = "(known once the agent package is built)";
        let mut s = format!(
            "{} {}
  build id           {}
  source-date-epoch  {}
",
            self.name,
            self.version.as_deref().unwrap_or("(version not known yet)"),
            self.build_id.as_deref().unwrap_or(unknown),
            self.source_date_epoch
        );
        s.push_str(if self.inputs.is_empty() {
            "  inputs             (known once the agent package is built)
"
        } else {
            "  inputs:
"
        });
        for i in &self.inputs {
            s.push_str(&format!(
                "    {:<18} {}
",
                i.name, i.sha256
            ));
        }
        s.push_str(&format!(
            "  package sources    {}
  archive            {}
  packages           {}
",
            self.package_sources,
            self.archive,
            self.packages.len()
        ));
        for p in &self.packages {
            s.push_str(&format!(
                "    {} {}
",
                p.name, p.version
            ));
        }
        if let Some(a) = &self.agent {
            s.push_str(&format!(
                "  agent package      {a}
"
            ));
        }
        s.push_str(&format!(
            "  output             {}{}
",
            self.out.display(),
            if self.up_to_date { " (up to date)" } else { "" }
        ));
        s.push_str(&format!(
            "  cached stages      {}
",
            if self.cached.is_empty() {
                "none".to_owned()
            } else {
                self.cached.join(", ")
            }
        ));
        s
    }
}

/// The host tools whose versions shape the image's bytes (an input to the build id).
const HOST_TOOLS: &[&str] = &[
    "mmdebstrap",
    "e2fsprogs",
    "erofs-utils",
    // veritysetup (the hash tree) and pefile (under ukify) for a verified root.
    "cryptsetup-bin",
    "python3-pefile",
    "dosfstools",
    "mtools",
    "fdisk",
    "qemu-utils",
    // dpkg writes the image's package database (customize), tar and zstd restore
    // cached trees.
    "dpkg",
    "tar",
    "zstd",
];

fn host_tools(secure_boot: bool) -> Result<String> {
    let signing: &[&str] = if secure_boot { SIGNING_TOOLS } else { &[] };
    cmd::stdout(
        Command::new("dpkg-query")
            .args(["--show", "--showformat=${Package}=${Version}\n"])
            .args(HOST_TOOLS)
            .args(signing),
    )
    .context("a host tool the builder needs is not installed\n  hint: run `devos-build doctor`, or `tests/setup-host`")
}

/// The host tools that sign a Secure Boot image's boot chain (osslsigncode signs, with
/// a signing time of our choosing; sbverify checks; efitools makes the variables).
const SIGNING_TOOLS: &[&str] = &["osslsigncode", "sbsigntool", "efitools"];

/// The package set of a spec: its sources, their lists, and what apt resolves.
struct Packages {
    sources: rootfs::Sources,
    index: apt::Index,
    resolution: apt::Resolution,
}

/// The `resolve` stage: package sources and lists, and the exact package set. For a
/// plan, nothing is written (see [`apt::Index::for_plan`]).
fn resolve_packages(spec: &Spec, for_plan: bool) -> Result<Packages> {
    let sources = rootfs::sources(spec);
    let index = if for_plan {
        apt::Index::for_plan(&cache::dir(), spec, &sources)?
    } else {
        let index = apt::Index::open(&cache::dir(), &sources)?;
        index.refresh(spec, &sources)?;
        index
    };
    let resolution = index.resolve(spec, &sources)?;
    Ok(Packages {
        sources,
        index,
        resolution,
    })
}

/// The identity computed from everything that goes in: the package set, the agent
/// package and the rest (see [`identity::resolve`]).
fn identify(
    spec: Spec,
    packages: Packages,
    agent: Option<AgentPackage>,
    env_source_date_epoch: Option<u64>,
    secure_boot_cert: Option<&str>,
    ui: &Ui,
) -> Result<Resolved> {
    let Packages {
        sources,
        index,
        resolution,
    } = packages;
    let tools = host_tools(spec.secure_boot)?;
    let trees = match spec.extra_trees.as_slice() {
        [] => None,
        t => Some(
            crate::model::spec::trees_digest(t).context("cannot read the spec's extra trees")?,
        ),
    };
    let id = identity::resolve(&identity::Inputs {
        spec: &spec,
        agent_sha256: agent.as_ref().map(|a| a.sha256.as_str()),
        sources_deb822: &sources.deb822,
        packages: &resolution.packages,
        archive_date: resolution.archive_date,
        env_source_date_epoch,
        host_tools: &tools,
        extra_trees: trees.as_deref(),
        secure_boot_cert,
    });
    // A plan's placeholder for an agent package still to be built has no hash.
    let version = match &agent {
        Some(a) if a.sha256.is_empty() => "(version known once the agent package is built)",
        _ => id.version.as_str(),
    };
    ui.info(&format!(
        "    {} {} ({} packages from {} sources)",
        spec.name,
        version,
        resolution.packages.len(),
        sources.origin
    ));
    Ok(Resolved {
        spec,
        sources,
        index,
        resolution,
        agent,
        id,
    })
}

/// Where a spec's versions go: beside `--out`, else `target/images/NAME`.
fn images_dir(opts: &BuildOptions, spec: &Spec) -> PathBuf {
    opts.out
        .as_ref()
        .and_then(|o| o.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| images_root(&spec.path).join(&spec.name))
}

/// The output directory of a version: `--out`, else `target/images/NAME/VERSION`.
fn final_dir(opts: &BuildOptions, spec: &Spec, version: &str) -> PathBuf {
    opts.out
        .clone()
        .unwrap_or_else(|| images_root(&spec.path).join(&spec.name).join(version))
}

/// The spec at `path`, its warnings said on stderr (a plan or a dry run says them as the
/// build would).
fn load_warning(path: &Path) -> Result<Spec> {
    let spec = spec::load(path)?;
    for w in &spec.warnings {
        eprintln!("warning: {w}");
    }
    Ok(spec)
}

/// What the build's `load` stage checks of the builder's keys, by the same calls, for a
/// dry run that must refuse what the build would: an image with `[update]` trusts the
/// key this builder signs with, and a Secure Boot image's key is there, whole, private
/// and its certificate's.
pub(crate) fn check_keys(spec: &Spec) -> Result<()> {
    if let Some(u) = &spec.update {
        crate::update::signing_key_for(&u.key_path)?;
    }
    if spec.secure_boot {
        crate::update::boot_key::load(&crate::update::keys::dir())?;
    }
    Ok(())
}

/// What a build of a Debian or Ubuntu spec needs first, and its dry run checks too.
pub(crate) fn check_root() -> Result<()> {
    if !crate::support::paths::is_root() {
        bail!(
            "`image build` needs root (mmdebstrap, chroots and the image's file ownership need it)\n  hint: run it with sudo; the registry and cache stay in your home, where `devos-build image list` finds them (`devos-build image plan` resolves a spec without root)"
        );
    }
    Ok(())
}

/// What `image build --dry-run` checks before it plans, as the real run does first:
/// root (for a spec this builder builds), then `--out`'s directory.
pub(crate) fn check_dry_run(opts: &BuildOptions, spec: &Spec) -> Result<()> {
    if spec.distro == spec::Distro::Nixos {
        bail!(
            "{}: a NixOS spec has no dry run: its packages are nixpkgs attributes, resolved by Nix only when the image is built\n  \
             hint: `devos-build image validate {}` checks the spec without Nix; `devos-build image build {}` (without --dry-run) builds it",
            spec.path.display(),
            spec.path.display(),
            spec.path.display()
        );
    }
    check_root()?;
    if let Some(out) = &opts.out {
        check_out_parent(out)?;
    }
    check_keys(spec)
}

/// `image plan`: resolve without building.
pub(crate) fn plan(opts: &BuildOptions, ui: &mut Ui) -> Result<Plan> {
    if let Some(out) = &opts.out {
        check_out(out)?;
    }
    let spec = load_warning(&opts.spec)?;
    if spec.distro == spec::Distro::Nixos {
        bail!(
            "{}: a NixOS spec's packages are nixpkgs attributes, resolved by Nix when the image is built, not by this builder\n  \
             hint: `devos-build image build {}` renders the spec as a NixOS module and builds it with `nix build`",
            spec.path.display(),
            spec.path.display()
        );
    }
    spec.check_buildable()?;
    let env_source_date_epoch = identity::source_date_epoch()?;
    // Before the packages are resolved: a bad `--agent-deb` fails at once.
    let agent = planned_agent(&spec, opts, env_source_date_epoch)?;
    let packages = resolve_packages(&spec, true)?;
    let to_be_built = spec.agent_enabled && agent.is_none();
    // With the agent package still to be built the version is not known; the base
    // tree's key does not depend on it.
    let placeholder = to_be_built.then(|| AgentPackage {
        path: PathBuf::new(),
        version: String::new(),
        sha256: String::new(),
    });
    let boot_cert = match spec.secure_boot {
        true => Some(crate::update::boot_key::required(
            &crate::update::keys::dir(),
        )?),
        false => None,
    };
    let r = identify(
        spec,
        packages,
        agent.or(placeholder),
        env_source_date_epoch,
        boot_cert.as_ref().map(|c| c.sha256.as_str()),
        ui,
    )?;
    let out = final_dir(opts, &r.spec, &r.id.version);
    let up_to_date = !to_be_built
        && Manifest::load(&out)
            .is_ok_and(|m| m.build_id == r.id.build_id && incomplete(&out, &m).is_none());
    let cache = cache::Cache::new(cache::dir(), !opts.no_cache);
    let cached = [("base", &r.id.base_key), ("tree", &r.id.tree_key)]
        .into_iter()
        .filter(|(kind, _)| !to_be_built || *kind == "base")
        .filter(|(kind, key)| cache.contains(kind, key))
        .map(|(kind, _)| kind.to_owned())
        .collect();
    let known = |v: &String| (!to_be_built).then(|| v.clone());
    Ok(Plan {
        name: r.spec.name.clone(),
        version: known(&r.id.version),
        build_id: known(&r.id.build_id),
        source_date_epoch: r.id.source_date_epoch,
        inputs: if to_be_built {
            Vec::new()
        } else {
            r.id.inputs.clone()
        },
        package_sources: r.sources.origin.to_owned(),
        archive: r.resolution.archive.clone(),
        packages: r.resolution.packages.clone(),
        agent: r.agent.as_ref().map(|a| {
            if to_be_built {
                "to be built".to_owned()
            } else {
                a.sha256.clone()
            }
        }),
        out: if to_be_built {
            images_root(&r.spec.path).join(&r.spec.name)
        } else {
            out
        },
        up_to_date,
        cached,
    })
}

/// The agent package `image plan` can name without compiling or writing: the one given
/// with `--agent-deb`, or the cached package of fresh binaries; None when it is to be
/// built (or the spec has no agent).
fn planned_agent(
    spec: &Spec,
    opts: &BuildOptions,
    env_source_date_epoch: Option<u64>,
) -> Result<Option<AgentPackage>> {
    if !spec.agent_enabled {
        return Ok(None);
    }
    if let Some(deb) = &opts.agent_deb {
        return AgentPackage::from_file(deb).map(Some);
    }
    match agent_pkg::agent_source(&spec.path) {
        Some(source) => {
            agent_pkg::planned(&source, env_source_date_epoch.unwrap_or(0), &cache::dir())
        }
        None => Ok(None),
    }
}

pub(crate) fn build(opts: &BuildOptions, ui: &mut Ui) -> Result<Built> {
    if let Some(out) = &opts.out {
        check_out(out)?;
    }
    let spec = load_warning(&opts.spec)?;
    // Root first: a user's build would be refused any --out of root's.
    if spec.distro != spec::Distro::Nixos {
        check_root()?;
    }
    if let Some(out) = &opts.out {
        check_out_parent(out)?;
    }
    // A NixOS spec is Nix's to build (no root needed: the Nix daemon builds): the
    // image of nixos/image.nix with the spec rendered as a module (build/nixos.rs).
    if spec.distro == spec::Distro::Nixos {
        return nixos::build(opts, &spec, ui);
    }
    // Checked now, not after the packages are resolved.
    if let Some(deb) = opts.agent_deb.as_ref().filter(|_| spec.agent_enabled) {
        AgentPackage::version_of(deb)?;
    }
    let cache_dir = crate::store::cache::dir();
    let (handle, made) = crate::support::paths::create_user_dirs_made(&cache_dir)?;
    crate::store::cache::tag(&handle, &cache_dir, made)?;
    let mut t = Timer {
        ui,
        timings: Vec::new(),
    };
    let spec = t.run("load", |_| {
        spec.check_buildable()?;
        Ok(spec)
    })?;
    // An image that updates itself trusts one key: the one this builder signs with.
    let update_key = match &spec.update {
        Some(u) => Some(crate::update::signing_key_for(&u.key_path)?),
        None => None,
    };
    // A Secure Boot image's boot chain is signed with the builder's Secure Boot key.
    let boot_key = match spec.secure_boot {
        true => Some(crate::update::boot_key::load(&crate::update::keys::dir())?),
        false => None,
    };

    let images = images_dir(opts, &spec);
    fs::create_dir_all(&images).with_context(|| format!("cannot create {}", images.display()))?;
    remove_stale_work_dirs(&images);
    let work = WorkDir::new(&images)?;
    let staged = work.path().join("out");
    fs::create_dir(&staged)?;

    // Mirrors are checked before the agent is compiled, so a bad mirror fails in seconds.
    let env_source_date_epoch = identity::source_date_epoch()?;
    let packages = t.run("resolve", |_| resolve_packages(&spec, false))?;
    let agent = t.run("agent", |_| {
        agent_package(&spec, opts, &staged, env_source_date_epoch)
    })?;
    let r = identify(
        spec,
        packages,
        agent,
        env_source_date_epoch,
        boot_key.as_ref().map(|k| k.certificate.sha256.as_str()),
        t.ui,
    )?;
    let (spec, id) = (&r.spec, &r.id);
    let final_dir = final_dir(opts, spec, &id.version);

    // One build of a version at a time; a second one waits, then finds it up to date.
    let _version_lock = lock_version(&images, &id.version, t.ui)?;
    let registry_path = opts.registry.clone().unwrap_or_else(registry::default_path);
    if !opts.force
        && let Some(built) = already_built(
            spec,
            &id.version,
            &id.build_id,
            &final_dir,
            &registry_path,
            t.ui,
        )?
    {
        return Ok(built);
    }

    let cache = cache::Cache::new(cache::dir(), !opts.no_cache);
    // The tree and the partition images are scratch: in memory when there is room.
    let scratch_parent = scratch_root(spec.disk_size).unwrap_or_else(|| images.clone());
    remove_stale_work_dirs(&scratch_parent);
    let scratch = WorkDir::new(&scratch_parent)?;
    let tree = scratch.path().join("tree");
    let from_cache = make_tree(&mut t, &r, &cache, &tree)?;
    let (files, packages) = index_tree(&r, &cache, &tree, from_cache)?;

    let raw_name = format!("{}-{}.raw", spec.name, id.version);
    // Assembled in scratch; copied to the output beside the conversions below.
    let raw = scratch.path().join(&raw_name);
    let disk = t.run("disk", |_| {
        let ukify = match spec.verity {
            true => Some(ukify(&r, scratch.path())?),
            false => None,
        };
        let signer = match &boot_key {
            Some(k) => Some(secure_boot::Signer::new(
                &k.key_pem,
                &k.cert_pem,
                &k.certificate.file,
                id.source_date_epoch,
                scratch.path(),
            )?),
            None => None,
        };
        disk::build(
            spec,
            id,
            &tree,
            scratch.path(),
            &raw,
            ukify.as_deref(),
            signer.as_ref(),
        )
    })?;
    // The tree is no longer needed; free the space before converting. Left, it goes
    // with the scratch directory at the end, so a failure here only costs space.
    if let Err(e) = fs::remove_dir_all(&tree) {
        tracing::warn!("cannot remove {} early: {e}", tree.display());
    }
    let artifacts = t.run("convert", |_| convert_all(spec, &id.version, &raw, &staged))?;
    let update = match &disk.bundle {
        Some(b) => crate::update::write_bundle(
            b,
            &crate::image::sysupdate::stem(&spec.name, &id.version),
            &staged.join("update"),
            update_key.as_ref(),
            id.source_date_epoch,
        )?,
        None => Vec::new(),
    };
    let update_feed = match (&spec.update, &update_key) {
        (Some(u), Some(key)) => Some(crate::model::manifest::UpdateFeed {
            url: u.url.clone(),
            key_fingerprint: key.fingerprint.clone(),
        }),
        _ => None,
    };
    let update = (update, update_feed);
    let secure_boot = boot_key.map(|k| crate::model::manifest::SecureBoot {
        certificate_sha256: k.certificate.sha256,
        subject: k.certificate.subject,
        certificate: String::from_utf8_lossy(&k.cert_pem).into_owned(),
    });
    let manifest = manifest_of(
        &r,
        disk,
        update,
        secure_boot,
        artifacts,
        packages,
        t.timings,
    );
    if spec.agent_enabled {
        // The agent's configuration, for images made from other bases (Packer).
        fs::write(staged.join("agent.toml"), spec.agent_config.to_file())?;
    }
    write_outputs(&staged, &manifest)?;
    publish_dir(&staged, &final_dir)?;
    // Recorded only once the output is complete under its final name; a build killed
    // between the two is recorded by the next one (see `already_built`).
    registry::Registry::open(&registry_path)?
        .record_build(&final_dir, &spec.path, &manifest, &files)?;
    Ok(Built {
        dir: final_dir,
        manifest,
        fresh: true,
        files,
    })
}

/// Why the output in `dir`, described by `manifest`, is not whole — a file removed by
/// hand, an interrupted removal (its manifest is no proof the rest is there): the
/// first artifact or update file missing or not at its size.
fn incomplete(dir: &Path, manifest: &Manifest) -> Option<String> {
    let files = manifest
        .artifacts
        .iter()
        .map(|a| (dir.join(&a.file), a.size))
        .chain(
            manifest
                .update
                .iter()
                .map(|f| (dir.join("update").join(&f.file), f.size)),
        );
    for (path, size) in files {
        match path.metadata() {
            Ok(m) if m.len() == size => {}
            Ok(_) => {
                return Some(format!(
                    "{} is not the size it was built at",
                    path.display()
                ));
            }
            Err(_) => return Some(format!("{} is gone", path.display())),
        }
    }
    None
}

/// The version already in `final_dir`, if it has the same build id: nothing to build.
fn already_built(
    spec: &Spec,
    version: &str,
    build_id: &str,
    final_dir: &Path,
    registry_path: &Path,
    ui: &Ui,
) -> Result<Option<Built>> {
    if !final_dir.join("manifest.json").is_file() {
        return Ok(None);
    }
    let manifest = Manifest::load(final_dir)?;
    if manifest.build_id != build_id {
        return Ok(None);
    }
    if let Some(why) = incomplete(final_dir, &manifest) {
        ui.info(&format!(
            "{version} in {} is incomplete ({why}): building it again",
            final_dir.display(),
        ));
        return Ok(None);
    }
    ui.info(&format!(
        "{version} is up to date in {}",
        final_dir.display()
    ));
    // A build killed after its output was complete but before it was recorded: not
    // in the registry, or recorded with the artifacts of the output it replaced (a
    // `--force` rebuild; the file index of the same inputs stays).
    let mut reg = registry::Registry::open(registry_path)?;
    match reg.find(&format!("{}@{version}", spec.name)) {
        Err(_) => reg.record_build(final_dir, &spec.path, &manifest, &[])?,
        Ok(v) if !records(&v, final_dir, &manifest) => {
            let files = reg.files(&v)?;
            reg.record_build(final_dir, &spec.path, &manifest, &files)?;
        }
        Ok(_) => {}
    }
    Ok(Some(Built {
        dir: final_dir.to_path_buf(),
        manifest,
        fresh: false,
        files: Vec::new(),
    }))
}

/// Whether the registry's row `v` records the output in `dir` described by `manifest`:
/// that directory, and each of its artifacts with its hash (exports may add more).
pub(crate) fn records(v: &registry::VersionInfo, dir: &Path, manifest: &Manifest) -> bool {
    let same_dir = match (fs::canonicalize(&v.dir), fs::canonicalize(dir)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    same_dir
        && manifest.artifacts.iter().all(|a| {
            v.artifacts
                .iter()
                .any(|r| r.file == a.file && r.sha256 == a.sha256)
        })
}

/// Where the packages downloaded for a distro's suite are kept between builds.
fn package_cache(spec: &Spec) -> PathBuf {
    cache::dir()
        .join("packages")
        .join(format!("{}-{}", spec.distro.name(), spec.suite).to_lowercase())
}

/// The `rootfs` and `customize` stages into `tree`, or the finished tree from the
/// cache (then true).
fn make_tree(t: &mut Timer<'_>, r: &Resolved, cache: &cache::Cache, tree: &Path) -> Result<bool> {
    let (spec, id) = (&r.spec, &r.id);
    let from_cache = cache.restore("tree", &id.tree_key, tree)?;
    if from_cache {
        t.ui.info("    rootfs and customize: finished tree restored from the cache");
    } else {
        t.run("rootfs", |ui| {
            if cache.restore("base", &id.base_key, tree)? {
                ui.info("    base tree restored from the cache");
                return Ok(());
            }
            rootfs::bootstrap(
                spec,
                &r.sources,
                &r.index.lists(),
                tree,
                &package_cache(spec),
                id.source_date_epoch,
                r.resolution
                    .packages
                    .iter()
                    .any(|p| p.name == apt::MERGED_USR),
            )?;
            check_package_set(tree, &r.resolution.packages, ui)?;
            cache.store(
                "base",
                &id.base_key,
                tree,
                &format!("{} {} base", spec.distro.name(), spec.suite),
            )
        })?;
        t.run("customize", |_| {
            let deb = r.agent.as_ref().map(|a| a.path.as_path());
            customize::customize(spec, id, tree, deb.unwrap_or(Path::new("")))
        })?;
    }
    // Said at every build, from the cache or not.
    if let Some(warning) = repart_warning(tree) {
        t.ui.info(warning);
    }
    Ok(from_cache)
}

/// The finished tree's file list and installed packages, storing it in the cache
/// meanwhile when it was built rather than restored (both only read it).
fn index_tree(
    r: &Resolved,
    cache: &cache::Cache,
    tree: &Path,
    from_cache: bool,
) -> Result<(Vec<FileEntry>, Vec<Package>)> {
    let (spec, id) = (&r.spec, &r.id);
    std::thread::scope(|s| -> Result<_> {
        let store = (!from_cache).then(|| {
            s.spawn(|| {
                let about = format!("{} {}", spec.name, id.version);
                cache.store("tree", &id.tree_key, tree, &about)
            })
        });
        let files = digest::file_index(tree)?;
        let packages: Vec<Package> = rootfs::installed_packages(tree)?
            .into_iter()
            .map(|(name, version)| Package { name, version })
            .collect();
        if let Some(store) = store {
            store
                .join()
                .map_err(|_| anyhow::anyhow!("storing the tree in the cache panicked"))??;
        }
        Ok((files, packages))
    })
}

/// The `convert` stage: the raw image copied (and hashed) into `staged` beside the
/// conversions to the spec's other formats, which read the same file.
fn convert_all(spec: &Spec, version: &str, raw: &Path, staged: &Path) -> Result<Vec<Artifact>> {
    let raw_name = format!("{}-{}.raw", spec.name, version);
    std::thread::scope(|s| -> Result<Vec<Artifact>> {
        let file = |format: &Format| format!("{}-{}.{}", spec.name, version, format.extension());
        let raw_hash = s.spawn(|| copy_raw(raw, &staged.join(&raw_name)));
        for format in spec.formats.iter().filter(|f| **f != Format::Raw) {
            convert::convert(raw, *format, &staged.join(file(format)))?;
        }
        let raw_artifact = raw_hash
            .join()
            .map_err(|_| anyhow::anyhow!("hashing the raw image panicked"))??;
        let mut artifacts = Vec::new();
        for format in &spec.formats {
            artifacts.push(if *format == Format::Raw {
                raw_artifact.clone()
            } else {
                artifact(staged, &file(format), *format)?
            });
        }
        Ok(artifacts)
    })
}

/// What the build says about itself.
fn manifest_of(
    r: &Resolved,
    disk: disk::Disk,
    (update, update_feed): (Vec<UpdateFile>, Option<crate::model::manifest::UpdateFeed>),
    secure_boot: Option<crate::model::manifest::SecureBoot>,
    artifacts: Vec<Artifact>,
    packages: Vec<Package>,
    stages: Vec<StageTiming>,
) -> Manifest {
    let (spec, id) = (&r.spec, &r.id);
    Manifest {
        name: spec.name.clone(),
        version: id.version.clone(),
        build_id: id.build_id.clone(),
        description: spec.description.clone(),
        distro: spec.distro.name().to_owned(),
        suite: spec.suite.clone(),
        builder_version: identity::BUILDER_VERSION.to_owned(),
        source_date_epoch: id.source_date_epoch,
        kernel_cmdline: disk.cmdline,
        root_hash: disk.root_hash,
        update,
        update_feed,
        secure_boot,
        inputs: id.inputs.clone(),
        package_sources: r.sources.origin.to_owned(),
        agent: r.agent.as_ref().map(|a| {
            let file = a.path.file_name().map(|n| n.to_string_lossy().into_owned());
            let (version, sha256) = (a.version.clone(), a.sha256.clone());
            AgentInfo::new(
                file.unwrap_or_default(),
                version,
                sha256,
                &spec.agent_config,
            )
        }),
        users: spec.users.iter().map(|u| u.name.clone()).collect(),
        packages,
        partitions: disk.partitions.into_iter().map(Into::into).collect(),
        artifacts,
        stages,
        cache_keys: CacheKeys {
            base: id.base_key.clone(),
            tree: id.tree_key.clone(),
        },
    }
}

/// mmdebstrap installs from the same package lists the set was resolved from; say so
/// if it still installed something else (the build id then under-describes the image).
fn check_package_set(tree: &Path, resolved: &[Package], ui: &Ui) -> Result<()> {
    let installed: std::collections::BTreeSet<(String, String)> =
        rootfs::installed_packages(tree)?.into_iter().collect();
    let expected: std::collections::BTreeSet<(String, String)> = resolved
        .iter()
        .map(|p| (p.name.clone(), p.version.clone()))
        .collect();
    let extra: Vec<String> = installed
        .difference(&expected)
        .map(|(n, v)| format!("{n} {v}"))
        .collect();
    let missing: Vec<String> = expected
        .difference(&installed)
        .map(|(n, v)| format!("{n} {v}"))
        .collect();
    if !extra.is_empty() || !missing.is_empty() {
        ui.info(&format!(
            "warning: mmdebstrap installed a different package set than was resolved (extra: {}; missing: {})",
            extra.join(", "),
            missing.join(", ")
        ));
    }
    if let Some(warning) = metadata_rule_warning(&installed) {
        ui.info(&warning);
    }
    Ok(())
}

/// /var grows into a larger disk through systemd-repart (the image's repart.d
/// definition): a tree without it is said to keep /var at the image's size.
fn repart_warning(tree: &Path) -> Option<&'static str> {
    let has = devos_agent::selftest::SYSTEMD_REPART
        .iter()
        .any(|f| tree.join(f).exists());
    (!has).then_some(
        "warning: the image has no systemd-repart: /var will not grow into a disk larger than the image (an EBS volume launched larger)\n  hint: add `systemd-repart` to `[packages] include` (Debian trixie and later; bookworm's systemd has it)",
    )
}

/// The routing rule that keeps instance metadata to root is systemd-networkd's
/// (`[RoutingPolicyRule] User=`, `Type=`), from systemd 248 on: older, it does not
/// apply, and the build must say so rather than leave the instance role open quietly.
fn metadata_rule_warning(
    installed: &std::collections::BTreeSet<(String, String)>,
) -> Option<String> {
    let (_, version) = installed.iter().find(|(name, _)| name == "systemd")?;
    let major: u32 = version
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    (major < 248).then(|| format!(
        "warning: systemd {version} in this image is older than 248: its systemd-networkd cannot keep instance metadata to root, so on EC2 every user of a machine could use the instance role\n  hint: build on a newer suite (Debian bookworm, Ubuntu jammy or later)"
    ))
}

/// A tmpfs with room for twice the disk (the tree plus the partition images made
/// from it), if there is one: building there is several times faster than on disk.
/// Without one the build runs on disk, only slower, so a failed check is logged, not
/// an error.
fn scratch_root(disk_size: u64) -> Option<PathBuf> {
    let dir = Path::new("/dev/shm");
    let root = dir.join("devos-build");
    // What killed builds left there first: counted as used, it would send this build
    // to disk, where nothing would ever sweep it.
    if root.is_dir() {
        remove_stale_work_dirs(&root);
    }
    let check = || -> Result<Option<PathBuf>> {
        let out = cmd::stdout(
            Command::new("df")
                .args(["--output=fstype,avail", "-B1"])
                .arg(dir),
        )?;
        let words: Vec<&str> = out
            .lines()
            .nth(1)
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let (fstype, avail) = match words[..] {
            [fstype, avail] => (fstype, avail.parse::<u64>()),
            _ => bail!("unexpected output of df: {out:?}"),
        };
        let avail = avail.with_context(|| format!("unexpected output of df: {out:?}"))?;
        if fstype != "tmpfs" || avail < disk_size.saturating_mul(2) {
            return Ok(None);
        }
        fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
        Ok(Some(root.clone()))
    };
    check().unwrap_or_else(|e| {
        tracing::warn!("building on disk, not in {}: {e:#}", dir.display());
        None
    })
}

/// Hold an exclusive lock on `images/.VERSION.lock` (or, for a NixOS image, on the
/// image's name) for the rest of the build.
fn lock_version(images: &Path, version: &str, ui: &Ui) -> Result<fs::File> {
    let path = images.join(format!(".{version}.lock"));
    let file = fs::File::create(&path)
        .with_context(|| format!("cannot create the lock {}", path.display()))?;
    if file.try_lock().is_err() {
        ui.info(&format!(
            "    waiting for another build of {version} to finish ({})",
            path.display()
        ));
        file.lock()?;
    }
    Ok(file)
}

fn agent_package(
    spec: &Spec,
    opts: &BuildOptions,
    staged: &Path,
    env_source_date_epoch: Option<u64>,
) -> Result<Option<AgentPackage>> {
    if !spec.agent_enabled {
        return Ok(None);
    }
    let pkg = match &opts.agent_deb {
        Some(deb) => {
            // Described as copied: what the image installs is what the manifest
            // names, whatever happens to the file given meanwhile.
            let dest = staged.join(deb.file_name().unwrap_or_default());
            fs::copy(deb, &dest).with_context(|| format!("cannot copy {}", deb.display()))?;
            AgentPackage::from_file(&dest)?
        }
        None => {
            let Some(source) = agent_pkg::agent_source(&spec.path) else {
                bail!(
                    "{} is not inside a DevOS source tree, and the source tree this devos-build was compiled from ({}) is gone or writable by other users, so the agent cannot be built\n  hint: pass a prebuilt package with `--agent-deb devos-agent_VERSION_amd64.deb`, or install devos-build again from a checkout only you and root can write",
                    spec.path.display(),
                    Path::new(env!("CARGO_MANIFEST_DIR"))
                        .parent()
                        .unwrap_or(Path::new("?"))
                        .display()
                );
            };
            // Unset, the package's files carry epoch 0, so the same sources give
            // the same .deb and so the same build id.
            agent_pkg::build(
                &source,
                staged,
                env_source_date_epoch.unwrap_or(0),
                &cache::dir(),
            )?
        }
    };
    Ok(Some(pkg))
}

/// Copy the raw image to the output (sparse), hashing it on the way.
fn copy_raw(raw: &Path, out: &Path) -> Result<Artifact> {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    let mut file = fs::File::create(out)?;
    let len = crate::image::files::copy_sparse(raw, &mut file, 0, Some(&mut hasher))?;
    file.set_len(len)?;
    drop(file);
    described(out, Format::Raw, hex::encode(hasher.finalize()))
}

fn artifact(dir: &Path, file: &str, format: Format) -> Result<Artifact> {
    let path = dir.join(file);
    let sha256 = digest::file_sha256(&path)?;
    described(&path, format, sha256)
}

/// An output file as the manifest lists it, given its sha256.
fn described(path: &Path, format: Format, sha256: String) -> Result<Artifact> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(path)?;
    Ok(Artifact {
        file: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        format,
        sha256,
        size: meta.len(),
        used_bytes: meta.blocks() * 512,
    })
}

/// ukify from the image's own archive (the version of the tree's systemd), unpacked
/// under `work`: bookworm hosts have none, and the tree's systemd-stub is what it
/// assembles. The package is kept with the tree's other downloaded packages.
fn ukify(r: &Resolved, work: &Path) -> Result<PathBuf> {
    let systemd = r
        .resolution
        .packages
        .iter()
        .find(|p| p.name == "systemd")
        .context("a verified root needs systemd in the image")?;
    let debs = package_cache(&r.spec);
    let dir = work.join("ukify");
    r.index
        .unpack("systemd-ukify", &systemd.version, &debs, &dir)
        .context("while fetching ukify from the image's archive")?;
    ["usr/lib/systemd/ukify", "usr/bin/ukify"]
        .iter()
        .map(|p| dir.join(p))
        .find(|p| fs::symlink_metadata(p).is_ok_and(|m| m.is_file()))
        .with_context(|| format!("systemd-ukify {} holds no ukify script", systemd.version))
}

fn write_outputs(dir: &Path, manifest: &Manifest) -> Result<()> {
    let mut sums = String::new();
    for a in &manifest.artifacts {
        sums.push_str(&format!("{}  {}\n", a.sha256, a.file));
    }
    if let Some(agent) = manifest.agent.as_ref().filter(|a| !a.file.is_empty()) {
        sums.push_str(&format!("{}  {}\n", agent.sha256, agent.file));
    }
    fs::write(dir.join("SHA256SUMS"), sums)?;
    fs::write(
        dir.join("manifest.json"),
        serde_json::to_string_pretty(manifest)? + "\n",
    )?;
    Ok(())
}

/// `--out DIR` may name a new directory, an empty one, or an earlier output (which
/// the build replaces once it is complete) — never anything else: the replacement
/// removes what was there.
fn check_out(out: &Path) -> Result<()> {
    let hint = "hint: name a new directory for this build (e.g. --out dist/NAME-VERSION), or leave --out out (target/images/NAME/VERSION)";
    if out.file_name().is_none() {
        bail!(
            "--out {}: the output directory must be named by its own last component, not `.`, `..` or `/` (the build replaces the directory it names)\n  {hint}",
            out.display()
        );
    }
    let Ok(meta) = out.symlink_metadata() else {
        return Ok(());
    };
    if !meta.is_dir() {
        bail!(
            "--out {}: this is {}, not a directory; the build would replace it\n  {hint}",
            out.display(),
            if meta.file_type().is_symlink() {
                "a symlink"
            } else {
                "a file"
            }
        );
    }
    let empty = fs::read_dir(out)
        .with_context(|| format!("--out {}: cannot read the directory", out.display()))?
        .next()
        .is_none();
    if !empty && Manifest::load(out).is_err() {
        bail!(
            "--out {}: the directory is not empty and holds no earlier build (no manifest.json of devos-build's); the build would replace it and everything in it\n  {hint}",
            out.display()
        );
    }
    Ok(())
}

/// The directory a build's `--out` is made in (through a work directory beside it):
/// the nearest one that exists must be a directory this process can write, on a file
/// system that holds files. Checked before anything is built, and by `--dry-run`.
fn check_out_parent(out: &Path) -> Result<()> {
    let hint = "hint: name a directory you can write for --out (e.g. --out dist/NAME-VERSION), or leave --out out (target/images/NAME/VERSION)";
    let Some(existing) = out
        .ancestors()
        .skip(1)
        .find(|a| a.symlink_metadata().is_ok())
    else {
        return Ok(());
    };
    let is_dir = existing.metadata().is_ok_and(|m| m.is_dir());
    let special = rustix::fs::statfs(existing).is_ok_and(|f| {
        [libc::PROC_SUPER_MAGIC, libc::SYSFS_MAGIC].contains(&(f.f_type as libc::c_long))
    });
    let writable = rustix::fs::access(existing, rustix::fs::Access::WRITE_OK);
    let why = if !is_dir {
        "is not a directory".to_owned()
    } else if special {
        "is on a kernel file system (proc or sysfs), which holds no files".to_owned()
    } else if let Err(e) = writable {
        format!("cannot be written ({})", std::io::Error::from(e))
    } else {
        return Ok(());
    };
    bail!(
        "--out {}: {}, where the build's directory would be made, {why}\n  {hint}",
        out.display(),
        existing.display()
    )
}

/// Move a finished output directory to its final name in one rename; an existing
/// one (a `--force` rebuild) is replaced only after the new one is complete.
fn publish_dir(staged: &Path, final_dir: &Path) -> Result<()> {
    let old = remove::aside(final_dir, "old");
    // Left by an earlier replacement that could not remove it, or that was killed
    // between its two renames (then there is no output by the name now).
    remove::dir_if_present(&old)?;
    if final_dir.exists() {
        fs::rename(final_dir, &old).with_context(|| {
            format!(
                "cannot move the previous output {} out of the way",
                final_dir.display()
            )
        })?;
        fs::rename(staged, final_dir)
            .with_context(|| format!("cannot move the output to {}", final_dir.display()))?;
        // The new output is in place; the old one only takes space.
        if let Err(e) = fs::remove_dir_all(&old) {
            tracing::warn!("cannot remove the previous output {}: {e}", old.display());
        }
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
    fn an_output_is_replaced_whole_and_what_a_killed_replacement_left_goes() {
        let tmp = tempfile::tempdir().unwrap();
        let at = |p: &str| tmp.path().join(p);
        let staged = |content: &str| {
            fs::create_dir_all(at("staged")).unwrap();
            fs::write(at("staged/manifest.json"), content).unwrap();
            at("staged")
        };
        // Killed between its two renames: only `.0.2.0+abc.old` is there.
        fs::create_dir(at(".0.2.0+abc.old")).unwrap();
        publish_dir(&staged("new"), &at("0.2.0+abc")).unwrap();
        assert!(!at(".0.2.0+abc.old").exists());
        assert_eq!(
            fs::read_to_string(at("0.2.0+abc/manifest.json")).unwrap(),
            "new"
        );
        // A replacement: the new output in place, nothing left beside it.
        publish_dir(&staged("newer"), &at("0.2.0+abc")).unwrap();
        assert_eq!(
            fs::read_to_string(at("0.2.0+abc/manifest.json")).unwrap(),
            "newer"
        );
        let mut names: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["0.2.0+abc"]);
    }

    #[test]
    fn outs_directory_must_be_one_that_holds_files_and_can_be_written() {
        let tmp = tempfile::tempdir().unwrap();
        let at = |p: &str| tmp.path().join(p);
        fs::write(at("file"), "x").unwrap();
        for (out, why) in [
            (Path::new("/proc/devos-out"), "kernel file system"),
            (Path::new("/sys/a/b/out"), "kernel file system"),
            (&at("file/out"), "is not a directory"),
        ] {
            let err = check_out_parent(out).unwrap_err().to_string();
            assert!(
                err.contains(why) && err.starts_with(&format!("--out {}", out.display())),
                "{}: {err}",
                out.display()
            );
            assert!(
                err.contains("hint: name a directory you can write"),
                "{err}"
            );
        }
        // Directories not made yet are made under the nearest one there.
        check_out_parent(&at("new/dist/out")).unwrap();
    }

    #[test]
    fn out_names_a_new_or_empty_directory_or_an_earlier_output() {
        let tmp = tempfile::tempdir().unwrap();
        let at = |p: &str| tmp.path().join(p);
        for refused in [".", "..", "/", "./", "a/..", "/tmp/.."] {
            let err = check_out(Path::new(refused)).unwrap_err().to_string();
            assert!(err.contains("not `.`, `..` or `/`"), "{refused}: {err}");
        }
        fs::write(at("file"), "x").unwrap();
        std::os::unix::fs::symlink(tmp.path(), at("link")).unwrap();
        fs::create_dir(at("project")).unwrap();
        fs::write(at("project/Cargo.toml"), "x").unwrap();
        for (p, why) in [
            ("file", "a file, not a directory"),
            ("link", "a symlink, not a directory"),
            ("project", "not empty and holds no earlier build"),
        ] {
            let err = check_out(&at(p)).unwrap_err().to_string();
            assert!(
                err.contains(why) && err.contains("hint: name a new directory"),
                "{p}: {err}"
            );
        }
        // A manifest.json that is not devos-build's (a web app's) is no earlier build.
        fs::create_dir(at("webapp")).unwrap();
        fs::write(at("webapp/manifest.json"), "{\"name\": \"app\"}").unwrap();
        let err = check_out(&at("webapp")).unwrap_err().to_string();
        assert!(err.contains("holds no earlier build"), "{err}");
        fs::create_dir(at("empty")).unwrap();
        fs::create_dir(at("earlier")).unwrap();
        let m = crate::store::registry::tests::manifest("0.1.0+aaa", &[]);
        fs::write(
            at("earlier/manifest.json"),
            serde_json::to_string(&m).unwrap(),
        )
        .unwrap();
        for fine in ["new", "new/deeper", "empty", "earlier"] {
            check_out(&at(fine)).unwrap();
        }
    }

    #[test]
    fn a_tree_without_systemd_repart_is_said_to_keep_var_at_the_image_s_size() {
        let tree = tempfile::tempdir().unwrap();
        let warning = repart_warning(tree.path()).unwrap();
        assert!(warning.contains("add `systemd-repart`"), "{warning}");
        // Merged /usr (trixie) and bookworm's systemd, through the /bin link.
        std::fs::create_dir_all(tree.path().join("usr/bin")).unwrap();
        std::os::unix::fs::symlink("usr/bin", tree.path().join("bin")).unwrap();
        std::fs::write(tree.path().join("usr/bin/systemd-repart"), "").unwrap();
        assert_eq!(repart_warning(tree.path()), None);
    }

    #[test]
    fn an_image_whose_networkd_cannot_keep_metadata_to_root_is_warned_about() {
        let with = |v: &str| [("systemd".to_owned(), v.to_owned())].into_iter().collect();
        let warning = metadata_rule_warning(&with("247.3-7+deb11u6")).unwrap();
        assert!(warning.contains("systemd 247.3-7+deb11u6"), "{warning}");
        for fine in ["252.33-1~deb12u1", "257.9-1~deb13u1", "249.11-0ubuntu3"] {
            assert_eq!(metadata_rule_warning(&with(fine)), None, "{fine}");
        }
        assert_eq!(metadata_rule_warning(&Default::default()), None);
    }
}
