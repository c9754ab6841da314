//! The agent's Debian package: built from this workspace (cargo + the files in
//! `agent/dist/`) with dpkg-deb, or taken prebuilt from `--agent-deb`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::support::{cmd, digest};

/// Files of the package: (source relative to the repository, destination in the
/// image, mode). The one place that says where each dist file is installed.
pub const FILES: &[(&str, &str, u32)] = &[
    ("target/release/devos-agent", "usr/bin/devos-agent", 0o755),
    ("target/release/devos", "usr/bin/devos", 0o755),
    (
        "agent/dist/devos-agent.service",
        "usr/lib/systemd/system/devos-agent.service",
        0o644,
    ),
    (
        "agent/dist/devos-ec2-keys.service",
        "usr/lib/systemd/system/devos-ec2-keys.service",
        0o644,
    ),
    (
        "agent/dist/devos-selftest.service",
        "usr/lib/systemd/system/devos-selftest.service",
        0o644,
    ),
    (
        "agent/dist/devos-boot-complete.service",
        "usr/lib/systemd/system/devos-boot-complete.service",
        0o644,
    ),
    (
        "agent/dist/org.devos.Agent1.conf",
        "usr/share/dbus-1/system.d/org.devos.Agent1.conf",
        0o644,
    ),
    (
        "agent/dist/org.devos.Agent1.xml",
        "usr/share/dbus-1/interfaces/org.devos.Agent1.xml",
        0o644,
    ),
    (
        "agent/dist/org.devos.Agent1.service",
        "usr/share/dbus-1/system-services/org.devos.Agent1.service",
        0o644,
    ),
    ("agent/dist/agent.toml", "etc/devos/agent.toml", 0o644),
];

/// A built agent package.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AgentPackage {
    pub path: PathBuf,
    pub(crate) version: String,
    pub sha256: String,
}

impl AgentPackage {
    /// Describe an existing .deb (given with `--agent-deb`).
    pub(crate) fn from_file(path: &Path) -> Result<Self> {
        Ok(Self {
            path: path.to_path_buf(),
            version: Self::version_of(path)?,
            sha256: digest::file_sha256(path)?,
        })
    }

    /// The version of the .deb given with `--agent-deb`: an error that names it when
    /// it is missing or no package.
    pub(crate) fn version_of(path: &Path) -> Result<String> {
        if !path.is_file() {
            anyhow::bail!(
                "--agent-deb {}: no such file\n  hint: name the devos-agent .deb to install, or leave --agent-deb out to build the agent from this source tree",
                path.display()
            );
        }
        let version = cmd::stdout(Command::new("dpkg-deb").arg("-f").arg(path).arg("Version"))
            .map_err(|e| match e {
                // No dpkg-deb: the error says what to install, not another package to name.
                cmd::CmdError::NotFound { .. } => anyhow::Error::from(e),
                _ => anyhow::anyhow!(
                    "--agent-deb {}: not a Debian package dpkg-deb can read: {e}\n  hint: name the devos-agent .deb a build left in its output directory, or leave --agent-deb out to build the agent from this source tree",
                    path.display()
                ),
            })?;
        Ok(version.trim().to_owned())
    }
}

/// The DevOS source tree a spec belongs to: the nearest ancestor of the spec that has
/// `agent/Cargo.toml`.
pub(crate) fn find_source_tree(spec_path: &Path) -> Option<PathBuf> {
    let start = match fs::canonicalize(spec_path) {
        Ok(start) => start,
        Err(e) => {
            // Callers fall back to the current directory: say why.
            tracing::warn!("cannot resolve the path of {}: {e}", spec_path.display());
            return None;
        }
    };
    start
        .ancestors()
        .skip(1)
        .find(|dir| dir.join("agent/Cargo.toml").is_file())
        .map(Path::to_path_buf)
}

/// The source tree the agent package of a spec is built from: the spec's own (a spec
/// inside a DevOS checkout builds that checkout's agent), else the tree this builder
/// was compiled from (`cargo install --path builder` remembers it), so a spec in any
/// directory builds. None when neither has the agent's sources.
pub(crate) fn agent_source(spec_path: &Path) -> Option<PathBuf> {
    find_source_tree(spec_path).or_else(|| {
        let own = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?;
        let usable = own.join("agent/Cargo.toml").is_file() && trusted(own);
        usable.then(|| own.to_path_buf())
    })
}

/// Whether nobody but root and the invoking user can have put code into `dir`: it and
/// every directory above it belong to one of them and are not writable by others
/// (sticky directories such as /tmp excepted above it). A builder installed from a
/// checkout that was deleted must not build what someone else put in its place.
fn trusted(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    dir.ancestors().enumerate().all(|(i, d)| {
        fs::metadata(d).is_ok_and(|m| {
            let others_write = m.mode() & 0o022 != 0;
            let sticky = m.mode() & 0o1000 != 0;
            crate::support::paths::is_own_uid(m.uid()) && (!others_write || (i > 0 && sticky))
        })
    })
}

/// Build `devos-agent` in release mode and package it into `out_dir`, reusing the
/// package kept in the cache directory `cache` when its files are the same.
pub fn build(
    source: &Path,
    out_dir: &Path,
    source_date_epoch: u64,
    cache: &Path,
) -> Result<AgentPackage> {
    cargo_build(source)?;
    let target = target_dir(source);
    let version = env!("CARGO_PKG_VERSION");
    let deb = out_dir.join(format!("devos-agent_{version}_amd64.deb"));

    // Packing takes seconds: reuse the package made from the same files.
    let cached = cache_entry(cache, source, &target, version, source_date_epoch)?;
    let recorded = cached.with_extension("deb.sha256");
    if let Some(sha256) = reuse_cached(&cached, &recorded, &deb)? {
        return Ok(AgentPackage {
            sha256,
            path: deb,
            version: version.to_owned(),
        });
    }

    let stage = out_dir.join("agent-pkg");
    stage_tree(source, &target, version, source_date_epoch, &stage)?;
    let sha256 = pack(&stage, &deb, source_date_epoch)?;
    // The cache only saves the next build a repack: failing to fill it is no error.
    if let Err(e) = keep_in_cache(&deb, &cached, &recorded, &sha256) {
        tracing::warn!("cannot keep the agent package in the cache: {e:#}");
    }
    Ok(AgentPackage {
        sha256,
        path: deb,
        version: version.to_owned(),
    })
}

fn target_dir(source: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| source.join("target"))
}

/// The agent package a build would use, found without compiling or writing anything:
/// the cached package of the binaries in target/, when those are newer than every
/// file they are built from (cargo's own test of a local package's freshness). None
/// when the build has to build it. `cache` is the cache directory.
pub(crate) fn planned(
    source: &Path,
    source_date_epoch: u64,
    cache: &Path,
) -> Result<Option<AgentPackage>> {
    let target = target_dir(source);
    let mut built = None;
    for bin in ["devos-agent", "devos"] {
        let Ok(time) = fs::metadata(target.join("release").join(bin)).and_then(|m| m.modified())
        else {
            return Ok(None);
        };
        built = Some(built.map_or(time, |t: std::time::SystemTime| t.min(time)));
    }
    let Some(built) = built else { return Ok(None) };
    // What cargo builds the binaries from (the dist files are hashed into the cache
    // key below, so a changed one finds no cached package).
    let inputs =
        ["agent/src", "agent/Cargo.toml", "Cargo.lock", "Cargo.toml"].map(|p| source.join(p));
    for input in &inputs {
        for entry in walkdir::WalkDir::new(input) {
            let entry = entry.with_context(|| format!("cannot read {}", input.display()))?;
            if entry
                .metadata()
                .ok()
                .and_then(|m| m.modified().ok())
                .is_some_and(|t| t > built)
            {
                return Ok(None);
            }
        }
    }
    let version = env!("CARGO_PKG_VERSION");
    let cached = cache_entry(cache, source, &target, version, source_date_epoch)?;
    let recorded = cached.with_extension("deb.sha256");
    match fs::read_to_string(&recorded) {
        Ok(sha256) if cached.is_file() => Ok(Some(AgentPackage {
            path: cached,
            version: version.to_owned(),
            sha256: sha256.trim().to_owned(),
        })),
        _ => Ok(None),
    }
}

/// The packages the agent's binaries are built with. `devos-build` depends on the agent
/// (with its daemon), so building it alone (`cargo build --release -p devos-build`, as
/// the README does) resolves the features of every shared crate exactly as this
/// selection does: the agent's build then reuses what that build compiled instead of
/// compiling the AWS SDK and the rest a second time with other features. A test
/// compares the two resolutions.
pub const AGENT_BUILD_SELECTION: &[&str] = &["-p", "devos-build", "-p", "devos-agent"];

/// `cargo build --release` of the agent's binaries (the package takes them from
/// target/), its progress on stderr.
fn cargo_build(source: &Path) -> Result<()> {
    let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    // What `cargo run` sets for the program it runs (this builder, when run that way):
    // build scripts that track one (ring tracks CARGO_MANIFEST_DIR) would otherwise run
    // again, and everything above them would compile a second time.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
            ]
            .contains(&name.as_ref())
        {
            cargo.env_remove(name.as_ref());
        }
    }
    cargo
        .current_dir(source)
        .args(["build", "--release", "--locked"])
        .args(AGENT_BUILD_SELECTION)
        .args(["--bin", "devos-agent", "--bin", "devos"])
        .stdout(std::process::Stdio::null());
    let under_sudo = std::env::var_os("SUDO_USER").is_some();
    let status = cmd::spawn(&mut cargo, false)
        .map_err(|e| match e {
            // sudo's PATH (its secure_path) misses a toolchain installed in a home.
            cmd::CmdError::NotFound { .. } if under_sudo => anyhow::anyhow!(
                "{e}\n  hint: under sudo, PATH is sudo's own and misses a cargo installed in your home (rustup): run `sudo env \"PATH=$PATH\" devos-build ...`, or pass an agent package built beforehand with --agent-deb"
            ),
            e => anyhow::Error::from(e),
        })
        .context("while building devos-agent")?
        .wait()?;
    if !status.success() {
        bail!(
            "`cargo build` of devos-agent in {} failed ({status}); its errors are above",
            source.display()
        );
    }
    Ok(())
}

/// Where the cache keeps the package: named by the hash of its files, version and epoch.
fn cache_entry(
    cache: &Path,
    source: &Path,
    target: &Path,
    version: &str,
    source_date_epoch: u64,
) -> Result<PathBuf> {
    let mut key = Sha256::new();
    key.update(format!("{version}\n{source_date_epoch}\n"));
    key.update(control(version, 0));
    for (src, dest, mode) in FILES {
        let from = file_source(source, target, src);
        let sha = digest::file_sha256(&from)
            .with_context(|| format!("cannot read {}", from.display()))?;
        key.update(format!("{dest} {mode:o} {sha}\n"));
    }
    key.update(devos_man_page()?);
    Ok(cache
        .join("agent")
        .join(format!("{}.deb", hex::encode(key.finalize()))))
}

/// Where devos(1) goes (gzip-compressed, as Debian's man pages are).
const MAN_PAGE: &str = "usr/share/man/man1/devos.1";

/// devos(1): made from the `devos` command's clap definitions, as its `--help` is.
fn devos_man_page() -> Result<Vec<u8>> {
    let mut page = Vec::new();
    clap_mangen::Man::new(<devos_agent::cli::Cli as clap::CommandFactory>::command())
        .render(&mut page)
        .context("cannot write the devos(1) manual page")?;
    Ok(page)
}

/// The package's tree in `stage`: [`FILES`], copyright, control files, mtimes clamped.
fn stage_tree(
    source: &Path,
    target: &Path,
    version: &str,
    source_date_epoch: u64,
    stage: &Path,
) -> Result<()> {
    if stage.exists() {
        fs::remove_dir_all(stage)?;
    }
    let mut installed_bytes = 0;
    for (src, dest, mode) in FILES {
        let from = file_source(source, target, src);
        let to = stage.join(dest);
        fs::create_dir_all(to.parent().unwrap_or(stage))?;
        fs::copy(&from, &to).with_context(|| format!("while copying {}", from.display()))?;
        set_mode(&to, *mode)?;
        installed_bytes += fs::metadata(&to)?.len();
    }
    let man = stage.join(MAN_PAGE);
    fs::create_dir_all(man.parent().unwrap_or(stage))?;
    fs::write(&man, devos_man_page()?)?;
    // gzip -n: no name or time in the header, so the package stays reproducible.
    cmd::run(Command::new("gzip").args(["-9nf"]).arg(&man))
        .context("while compressing the devos(1) manual page")?;
    let man = man.with_extension("1.gz");
    set_mode(&man, 0o644)?;
    installed_bytes += fs::metadata(&man)?.len();
    let doc = stage.join("usr/share/doc/devos-agent");
    fs::create_dir_all(&doc)?;
    fs::write(
        doc.join("copyright"),
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
         Upstream-Name: devos\nFiles: *\nLicense: Apache-2.0\n",
    )?;
    let debian = stage.join("DEBIAN");
    fs::create_dir_all(&debian)?;
    fs::write(debian.join("control"), control(version, installed_bytes))?;
    fs::write(debian.join("conffiles"), "/etc/devos/agent.toml\n")?;
    crate::image::files::clamp_mtimes(stage, source_date_epoch)?;
    Ok(())
}

/// dpkg-deb the stage into `deb` (root-owned, reproducible), drop the stage; its sha256.
fn pack(stage: &Path, deb: &Path, source_date_epoch: u64) -> Result<String> {
    cmd::run(
        Command::new("dpkg-deb")
            .env("SOURCE_DATE_EPOCH", source_date_epoch.to_string())
            .args(["--root-owner-group", "-Zzstd", "--build"])
            .arg(stage)
            .arg(deb),
    )
    .context("while packaging devos-agent")?;
    fs::remove_dir_all(stage)?;
    if !deb.is_file() {
        bail!("dpkg-deb reported success but wrote no {}", deb.display());
    }
    Ok(digest::file_sha256(deb)?)
}

/// Copy the cached package to `deb` and return its sha256, if the cache has it with
/// the sha256 recorded beside it and it still has that hash. A cache entry that
/// cannot be used is logged and the package built again.
fn reuse_cached(cached: &Path, recorded: &Path, deb: &Path) -> Result<Option<String>> {
    let want = match fs::read_to_string(recorded) {
        Ok(want) => want,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            tracing::warn!(
                "cannot read {}: {e}; building the agent package again",
                recorded.display()
            );
            return Ok(None);
        }
    };
    if let Err(e) = fs::copy(cached, deb) {
        tracing::warn!(
            "cannot copy the cached agent package {}: {e}; building it again",
            cached.display()
        );
        return Ok(None);
    }
    let sha256 =
        digest::file_sha256(deb).with_context(|| format!("cannot read {}", deb.display()))?;
    if sha256 == want.trim() {
        return Ok(Some(sha256));
    }
    tracing::warn!(
        "cached agent package {} is corrupt; building it again",
        cached.display()
    );
    Ok(None)
}

/// Store `deb` as `cached` (whole or not at all, under a temporary name of its own:
/// builds at once each write theirs), then its sha256 in `recorded`: a reader finds
/// the hash only beside a complete package.
fn keep_in_cache(deb: &Path, cached: &Path, recorded: &Path, sha256: &str) -> Result<()> {
    if let Some(dir) = cached.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut package =
        fs::File::open(deb).with_context(|| format!("cannot read {}", deb.display()))?;
    crate::support::paths::replace_file(cached, &mut package, 0o644)?;
    crate::support::paths::replace_file(recorded, &mut sha256.as_bytes(), 0o644)
}

/// Where a [`FILES`] source is: `target/...` under the cargo target directory, the
/// rest under the source tree.
fn file_source(source: &Path, target: &Path, src: &str) -> PathBuf {
    match src.strip_prefix("target/") {
        Some(rest) => target.join(rest),
        None => source.join(src),
    }
}

fn control(version: &str, installed_bytes: u64) -> String {
    format!(
        "Package: devos-agent\n\
         Version: {version}\n\
         Architecture: amd64\n\
         Maintainer: DevOS developers <devos@localhost>\n\
         Depends: {}, libc6 (>= 2.34)\n\
         Section: admin\n\
         Priority: optional\n\
         Installed-Size: {}\n\
         Homepage: https://github.com/devos-project/devos\n\
         Description: DevOS developer agent (D-Bus system service)\n \
         devos-agent takes natural-language requests from local users over D-Bus\n \
         (org.devos.Agent1), plans them, asks for approval and runs them sandboxed.\n",
        devos_agent::PACKAGE_DEPENDS.join(", "),
        installed_bytes.div_ceil(1024)
    )
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dist(name: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../agent/dist")
            .join(name);
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// `key=value` lines of one section of a systemd unit.
    fn section(unit: &str, name: &str) -> Vec<(String, String)> {
        let header = format!("[{name}]");
        unit.lines()
            .skip_while(|l| l.trim() != header)
            .skip(1)
            .take_while(|l| !l.starts_with('['))
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                l.split_once('=')
                    .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            })
            .collect()
    }

    fn value<'a>(kv: &'a [(String, String)], key: &str) -> Option<&'a str> {
        kv.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    #[test]
    fn agent_unit_is_a_hardened_dbus_service() {
        let unit = dist("devos-agent.service");
        let service = section(&unit, "Service");
        assert_eq!(value(&service, "Type"), Some("dbus"));
        assert_eq!(value(&service, "BusName"), Some(devos_agent::BUS_NAME));
        let exec = value(&service, "ExecStart").unwrap();
        let binary = FILES
            .iter()
            .find(|(s, ..)| s.ends_with("devos-agent"))
            .unwrap()
            .1;
        assert!(exec.starts_with(&format!("/{binary} ")), "{exec}");
        assert!(exec.contains(devos_agent::config::DEFAULT_PATH), "{exec}");
        for (key, want) in [
            ("NoNewPrivileges", "yes"),
            ("PrivateTmp", "yes"),
            ("PrivateDevices", "yes"),
            ("ProtectKernelModules", "yes"),
            ("SystemCallArchitectures", "native"),
        ] {
            assert_eq!(value(&service, key), Some(want), "{key}");
        }
        // Not RestrictSUIDSGID: systemd makes openat2() fail for the whole unit to
        // enforce it, and bubblewrap 0.11+ needs openat2(). Each action's seccomp filter
        // refuses set-id modes instead (agent/tests/attacks.rs makes them every way).
        assert_eq!(value(&service, "RestrictSUIDSGID"), None);
        let caps = value(&service, "CapabilityBoundingSet").unwrap();
        for forbidden in [
            "CAP_SYS_PTRACE",
            "CAP_SYS_MODULE",
            "CAP_SYS_RAWIO",
            "CAP_SYS_BOOT",
            "CAP_SYS_TIME",
            "CAP_BPF",
            "CAP_MAC_ADMIN",
            "CAP_NET_RAW",
        ] {
            assert!(!caps.contains(forbidden), "{caps}");
        }
        // The capabilities only the sandbox builder needs are each justified.
        for builder_only in ["SYS_ADMIN", "NET_ADMIN"] {
            assert!(
                !caps.contains(&format!("CAP_{builder_only}"))
                    || unit
                        .lines()
                        .any(|l| l.starts_with("# Relaxed") && l.contains(builder_only)),
                "CAP_{builder_only} is kept without a `# Relaxed: ...` comment"
            );
        }
        // Namespaces: never user namespaces.
        let ns = value(&service, "RestrictNamespaces").unwrap();
        assert!(
            !ns.split_whitespace().any(|n| n == "user") && ns != "no",
            "{ns}"
        );
        // Every protection the agent cannot have is named in a comment saying why.
        for relaxed in [
            "ProtectSystem",
            "ProtectHome",
            "PrivateNetwork",
            "MemoryDenyWriteExecute",
            "ProtectControlGroups",
        ] {
            assert!(
                value(&service, relaxed).is_none(),
                "{relaxed} is set after all"
            );
            assert!(
                unit.lines()
                    .any(|l| l.starts_with("# Relaxed") && l.contains(relaxed)),
                "{relaxed} is relaxed without a `# Relaxed: ...` comment"
            );
        }
        let install = section(&unit, "Install");
        assert_eq!(value(&install, "WantedBy"), Some("multi-user.target"));
        assert_eq!(
            value(&install, "Alias"),
            Some("dbus-org.devos.Agent1.service")
        );
    }

    #[test]
    fn a_source_tree_others_can_write_is_not_built() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("devos");
        fs::create_dir(&tree).unwrap();
        fs::set_permissions(&tree, fs::Permissions::from_mode(0o755)).unwrap();
        // Ours (the test's user), under a sticky /tmp: fine.
        assert!(trusted(&tree));
        fs::set_permissions(&tree, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(!trusted(&tree));
        fs::set_permissions(&tree, fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        assert!(
            !trusted(&tree),
            "a parent anyone can write to, without the sticky bit"
        );
    }

    #[test]
    fn devos_has_a_manual_page_made_from_its_definitions() {
        let page = String::from_utf8(devos_man_page().unwrap()).unwrap();
        assert!(page.starts_with(".ie"), "roff: {page}");
        assert!(page.contains(".TH devos 1"), "{page}");
        for sub in ["run", "approve", "history"] {
            assert!(
                page.contains(&format!("devos\\-{sub}")) || page.contains(sub),
                "{sub}"
            );
        }
    }

    #[test]
    fn activation_file_points_at_the_unit_alias() {
        let act = dist("org.devos.Agent1.service");
        let kv = section(&act, "D-BUS Service");
        assert_eq!(value(&kv, "Name"), Some(devos_agent::BUS_NAME));
        assert_eq!(
            value(&kv, "SystemdService"),
            Some("dbus-org.devos.Agent1.service")
        );
    }

    #[test]
    fn selftest_unit_runs_only_with_the_credential() {
        let unit = dist("devos-selftest.service");
        let u = section(&unit, "Unit");
        assert_eq!(value(&u, "ConditionCredential"), Some("devos.selftest"));
        assert_eq!(value(&u, "SuccessAction"), Some("poweroff-force"));
        let s = section(&unit, "Service");
        assert!(
            value(&s, "ExecStart")
                .unwrap()
                .contains("/dev/virtio-ports/org.devos.selftest")
        );
    }

    /// Every crate's features as `cargo tree` resolves them for a package selection.
    fn resolved_features(selection: &[&str]) -> String {
        let out = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .args(["tree", "--locked", "--offline", "-e", "normal,build"])
            .args(["--prefix", "none", "-f", "{p} {f}"])
            .args(selection)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut lines: Vec<String> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.replace(" (*)", ""))
            .collect();
        lines.sort();
        lines.dedup();
        lines.join("\n")
    }

    /// One compile: the README's `cargo build --release -p devos-build` and the agent
    /// package's build resolve every shared crate with the same features, so the
    /// second reuses what the first compiled.
    #[test]
    fn the_agent_builds_with_the_features_the_builder_was_built_with() {
        assert_eq!(
            resolved_features(&["-p", "devos-build"]),
            resolved_features(AGENT_BUILD_SELECTION)
        );
    }

    #[test]
    fn ec2_keys_unit_runs_only_where_the_builder_named_a_user() {
        let unit = dist("devos-ec2-keys.service");
        let u = section(&unit, "Unit");
        assert_eq!(
            value(&u, "ConditionPathExists"),
            Some(format!("/{}", crate::image::access::EC2_KEYS_ENV).as_str())
        );
        let s = section(&unit, "Service");
        assert_eq!(
            value(&s, "ExecStart"),
            Some("/usr/bin/devos-agent ec2-keys")
        );
    }

    #[test]
    fn bus_policy_lets_only_root_own_the_name() {
        let policy = dist("org.devos.Agent1.conf");
        let own: Vec<&str> = policy.lines().filter(|l| l.contains("own=")).collect();
        assert_eq!(own, ["    <allow own=\"org.devos.Agent1\"/>"]);
        let root = policy.find("<policy user=\"root\">").unwrap();
        let default = policy.find("<policy context=\"default\">").unwrap();
        let own_at = policy.find("allow own=").unwrap();
        assert!(
            root < own_at && own_at < default,
            "ownership must be granted in the root policy only"
        );
        assert!(
            policy[default..].contains(
                "send_destination=\"org.devos.Agent1\" send_interface=\"org.devos.Agent1\""
            )
        );
        assert!(
            !policy.contains("deny"),
            "no deny rules are needed: the system bus denies by default"
        );
    }

    #[test]
    fn every_packaged_dist_file_exists() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for (src, ..) in FILES.iter().filter(|(s, ..)| s.starts_with("agent/")) {
            assert!(root.join(src).is_file(), "{src}");
        }
    }
    #[test]
    fn a_cached_package_is_used_only_with_the_sha256_recorded_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let (cached, recorded, deb) = (
            dir.path().join("cached.deb"),
            dir.path().join("cached.deb.sha256"),
            dir.path().join("out.deb"),
        );
        fs::write(&cached, b"a package").unwrap();
        // Nothing recorded: not used.
        assert_eq!(reuse_cached(&cached, &recorded, &deb).unwrap(), None);
        let sha = digest::file_sha256(&cached).unwrap();
        fs::write(&recorded, format!("{sha}\n")).unwrap();
        assert_eq!(
            reuse_cached(&cached, &recorded, &deb).unwrap(),
            Some(sha.clone())
        );
        assert_eq!(fs::read(&deb).unwrap(), b"a package");
        // One byte changed in the cache since: built again.
        fs::write(&cached, b"a packagE").unwrap();
        assert_eq!(reuse_cached(&cached, &recorded, &deb).unwrap(), None);
    }
}
