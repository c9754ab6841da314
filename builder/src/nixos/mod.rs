//! NixOS images (`distro = "nixos"`): the spec rendered as a NixOS module beside the
//! output, and Nix driven to build the image of nixos/image.nix with it, using the
//! nixpkgs this repository's flake.lock pins. What a Nix build needs is checked first —
//! Nix itself, a version with flakes, the binary cache — each with what to do.

pub(crate) mod render;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::model::manifest::PartitionInfo;
use crate::model::spec::Spec;
use crate::support::cmd;

/// The oldest Nix that evaluates the pinned nixpkgs (its `lib/minver.nix`: 2.18; flakes
/// and the nix command this uses arrived in 2.4). Debian 12's `nix-bin` (2.8) is too
/// old, Debian 13's (2.26) is not.
const MIN_NIX: (u64, u64) = (2, 18);

/// What Nix needs switched on, whatever the host's nix.conf says.
const FEATURES: &[&str] = &["--extra-experimental-features", "nix-command flakes"];

/// The installed Nix's version (`2.8.0`), or why there is none.
pub(crate) fn nix_version() -> Result<String, String> {
    let out = cmd::stdout(Command::new("nix").arg("--version"))
        .map_err(|e| format!("`nix --version`: {e}"))?;
    // "nix (Nix) 2.8.0"
    out.split_whitespace()
        .last()
        .map(str::to_owned)
        .ok_or_else(|| format!("`nix --version` printed nothing useful: {out}"))
}

/// Whether this builder can drive a Nix of `version`.
pub(crate) fn nix_is_usable(version: &str) -> bool {
    major_minor(version).is_some_and(|v| v >= MIN_NIX)
}

fn major_minor(version: &str) -> Option<(u64, u64)> {
    let mut parts = version.split(['.', 'p', '-']);
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Everything a build of `spec` needs from the host, before any work: Nix (new
/// enough), the repository's flake (`source`), and an answering binary cache.
pub(crate) fn check_host(spec: &Spec, source: Option<&Path>) -> Result<PathBuf> {
    let version = nix_version().map_err(|e| {
        anyhow::anyhow!(
            "{}: a NixOS image is built with Nix, and there is none here ({e})\n  \
             hint: install Nix 2.18 or newer (https://nixos.org/download, or `nix-bin` on Debian 13), then run this again",
            spec.path.display()
        )
    })?;
    if !nix_is_usable(&version) {
        bail!(
            "{}: Nix {version} is too old to build NixOS images (nixpkgs needs {}.{} or newer)\n  \
             hint: install a newer Nix (https://nixos.org/download)",
            spec.path.display(),
            MIN_NIX.0,
            MIN_NIX.1
        );
    }
    let Some(flake) = source.filter(|s| s.join("flake.nix").is_file()) else {
        bail!(
            "{}: a NixOS image is built from the DevOS flake (flake.nix, nixos/), and neither the spec's directory nor this builder's source tree has it\n  \
             hint: put the spec inside a DevOS checkout, or build with a devos-build installed from one",
            spec.path.display()
        );
    };
    let cache = substituter(spec);
    let url = format!("{cache}/nix-cache-info");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(std::time::Duration::from_secs(10)))
        .build()
        .into();
    if let Err(e) = agent.get(&url).call() {
        bail!(
            "{}: the Nix binary cache {cache} does not answer ({url}: {e}); without it Nix compiles all of NixOS\n  \
             hint: check the network or proxy, or set `[base] mirror` to a cache that answers",
            spec.path.display()
        );
    }
    Ok(flake.to_path_buf())
}

/// The binary cache builds substitute from: `[base] mirror`, else cache.nixos.org.
pub(crate) fn substituter(spec: &Spec) -> String {
    spec.mirror
        .clone()
        .unwrap_or_else(|| spec.distro.default_mirror().to_owned())
}

/// The Nix expression of the image of the module at `config`, from the flake at `flake`:
/// `finalImage`, the disk whose ESP holds the unified kernel image with the store's
/// root hash (`image` is the one before it, with nothing to boot).
fn image_expr(flake: &Path, config: &Path) -> String {
    format!(
        "((builtins.getFlake {}).lib.image [ {} ]).config.system.build.finalImage",
        render::string(&flake_url(flake)),
        render::string(&config.display().to_string())
    )
}

/// How Nix is to read the flake at `flake`: a git checkout as git (only the files git
/// tracks are copied into the store, not `target/` with its builds and images), any
/// other directory whole.
fn flake_url(flake: &Path) -> String {
    if flake.join(".git").exists() {
        format!("git+file://{}", flake.display())
    } else {
        format!("path:{}", flake.display())
    }
}

fn nix(flake: &Path, spec: &Spec, args: &[&str]) -> Command {
    let mut c = Command::new("nix");
    c.args(FEATURES)
        .args(["--option", "substituters", &substituter(spec)])
        .args(args)
        .current_dir(flake);
    c
}

/// The derivation of the image `spec` renders to with `version`, written to `config`:
/// its store path, which names everything that goes into the image.
pub(crate) fn derivation(
    flake: &Path,
    spec: &Spec,
    config: &Path,
    version: &str,
) -> Result<String> {
    write_config(config, &render::render(spec, version))?;
    let expr = format!("({}).drvPath", image_expr(flake, config));
    let out = cmd::stdout(&mut nix(
        flake,
        spec,
        &["eval", "--raw", "--impure", "--expr", &expr],
    ))
    .with_context(|| {
        format!(
            "cannot evaluate the NixOS configuration {}",
            config.display()
        )
    })?;
    Ok(out.trim().to_owned())
}

/// A short build id from a derivation's store path: its hash part (input-addressed,
/// so it already says what went in), shortened like the Debian images' ids.
pub(crate) fn build_id(drv: &str) -> Result<String> {
    let name = drv.rsplit('/').next().unwrap_or(drv);
    match name.split_once('-') {
        Some((hash, _)) if hash.len() == 32 && hash.chars().all(|c| c.is_ascii_alphanumeric()) => {
            Ok(hash[..12].to_owned())
        }
        _ => bail!("`nix eval` gave `{drv}`, which is not a derivation's store path"),
    }
}

/// Build the image of `spec` with `version`, its module at `config`; the raw disk.
pub(crate) fn build(flake: &Path, spec: &Spec, config: &Path, version: &str) -> Result<PathBuf> {
    write_config(config, &render::render(spec, version))?;
    let expr = image_expr(flake, config);
    let out = cmd::stdout(&mut nix(
        flake,
        spec,
        &[
            "build",
            "--no-link",
            "--print-out-paths",
            "--impure",
            "--expr",
            &expr,
        ],
    ))
    .with_context(|| {
        format!(
            "`nix build` of the NixOS image of {} failed",
            spec.path.display()
        )
    })?;
    let result = PathBuf::from(out.trim());
    let raw = std::fs::read_dir(&result)
        .with_context(|| format!("cannot read the image build's output {}", result.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "raw"))
        .with_context(|| {
            format!(
                "the image build's output {} holds no .raw disk",
                result.display()
            )
        })?;
    Ok(raw)
}

/// When the pinned nixpkgs was made (flake.lock's `lastModified`): the version's
/// source date. 0 when the lock does not say.
pub(crate) fn locked_time(lock: &[u8]) -> u64 {
    serde_json::from_slice::<serde_json::Value>(lock)
        .ok()
        .and_then(|l| l["nodes"]["nixpkgs"]["locked"]["lastModified"].as_u64())
        .unwrap_or(0)
}

/// The partitions of a disk the image build made, as the manifest lists them.
pub(crate) fn partitions(raw: &Path) -> Result<Vec<PartitionInfo>> {
    let json = cmd::stdout(Command::new("sfdisk").arg("--json").arg(raw))
        .with_context(|| format!("cannot read the partition table of {}", raw.display()))?;
    partitions_of(&json)
}

/// GPT partition types (systemd's Discoverable Partitions) and what is on them.
const FILESYSTEMS: &[(&str, &str)] = &[
    ("C12A7328-F81F-11D2-BA4B-00A0C93EC93B", "vfat"),
    // /usr (the store) and its dm-verity hash tree, x86-64.
    ("8484680C-9521-48C6-9C11-B0720656F69E", "erofs"),
    ("77FF5F63-E7B6-4633-ACF4-1565B864C0E6", "verity"),
    ("4D21B016-B534-45C2-A9FB-5C16E091FD2D", "ext4"),
];

fn partitions_of(json: &str) -> Result<Vec<PartitionInfo>> {
    let table: serde_json::Value =
        serde_json::from_str(json).context("sfdisk printed no JSON partition table")?;
    let table = &table["partitiontable"];
    let sector = table["sectorsize"].as_u64().unwrap_or(512);
    let parts = table["partitions"]
        .as_array()
        .context("the image build's disk has no partitions")?;
    Ok(parts
        .iter()
        .map(|p| {
            let kind = p["type"].as_str().unwrap_or("").to_ascii_uppercase();
            PartitionInfo {
                label: p["name"].as_str().unwrap_or("").to_owned(),
                filesystem: FILESYSTEMS
                    .iter()
                    .find(|(t, _)| *t == kind)
                    .map_or("", |(_, f)| f)
                    .to_owned(),
                offset: p["start"].as_u64().unwrap_or(0) * sector,
                size: p["size"].as_u64().unwrap_or(0) * sector,
            }
        })
        .collect())
}

/// Write the rendered module (whole, then renamed: never half a file).
fn write_config(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    crate::support::paths::replace_file(path, &mut text.as_bytes(), 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nix_versions_and_build_ids_are_read_as_nix_prints_them() {
        assert_eq!(major_minor("2.8.0"), Some((2, 8)));
        assert_eq!(major_minor("2.24.10"), Some((2, 24)));
        assert!(major_minor("2.3.16").is_some_and(|v| v < MIN_NIX));
        assert!(!nix_is_usable("2.8.0"));
        let checkout = tempfile::tempdir().unwrap();
        let url = flake_url(checkout.path());
        assert!(url.starts_with("path:/"), "{url}");
        std::fs::create_dir(checkout.path().join(".git")).unwrap();
        let url = flake_url(checkout.path());
        assert!(url.starts_with("git+file:///"), "{url}");
        assert!(nix_is_usable("2.18.1") && nix_is_usable("2.26.3"));
        assert_eq!(major_minor("unknown"), None);
        assert_eq!(
            build_id("/nix/store/0c6d3kqmwwg3zphsbc1y8ipwlgxrb6qx-image.drv").unwrap(),
            "0c6d3kqmwwg3"
        );
        assert!(build_id("error: nothing").is_err());
    }

    #[test]
    fn the_disk_nix_built_is_listed_like_a_debian_one() {
        let json = r#"{"partitiontable": {"label": "gpt", "sectorsize": 512, "partitions": [
            {"node": "d1", "start": 2048, "size": 524288, "type": "C12A7328-F81F-11D2-BA4B-00A0C93EC93B", "name": "esp"},
            {"node": "d2", "start": 526336, "size": 800000, "type": "8484680c-9521-48c6-9c11-b0720656f69e", "name": "devos-nixos_0.1.0"},
            {"node": "d3", "start": 1326336, "size": 8000, "type": "77FF5F63-E7B6-4633-ACF4-1565B864C0E6", "name": "devos-nixos_0.1.0"}]}}"#;
        let parts = partitions_of(json).unwrap();
        let seen: Vec<(&str, &str, u64)> = parts
            .iter()
            .map(|p| (p.label.as_str(), p.filesystem.as_str(), p.offset))
            .collect();
        assert_eq!(
            seen,
            [
                ("esp", "vfat", 2048 * 512),
                ("devos-nixos_0.1.0", "erofs", 526336 * 512),
                ("devos-nixos_0.1.0", "verity", 1326336 * 512),
            ]
        );
        assert_eq!(parts[1].size, 800000 * 512);
        assert!(partitions_of("{}").is_err());
        assert_eq!(
            locked_time(br#"{"nodes": {"nixpkgs": {"locked": {"lastModified": 1753749649}}}}"#),
            1753749649
        );
        assert_eq!(locked_time(b"not json"), 0);
    }
}
