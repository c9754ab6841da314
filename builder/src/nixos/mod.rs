//! NixOS images (`distro = "nixos"`): the spec rendered as a NixOS module beside the
//! output, and Nix driven to build the image of nixos/image.nix with it, using the
//! nixpkgs this repository's flake.lock pins. What a Nix build needs is checked first —
//! Nix itself, a version with flakes, the binary cache — each with what to do.

pub(crate) mod render;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::model::spec::Spec;
use crate::support::cmd;

/// The oldest Nix whose `nix build --expr` and `builtins.getFlake` this uses (flakes
/// and the nix command arrived in 2.4).
const MIN_NIX: (u64, u64) = (2, 4);

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
             hint: install Nix (https://nixos.org/download, or Debian's `nix-bin`), then run this again",
            spec.path.display()
        )
    })?;
    if !nix_is_usable(&version) {
        bail!(
            "{}: Nix {version} is too old to build NixOS images (it needs {}.{} or newer, for flakes)\n  \
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
fn substituter(spec: &Spec) -> String {
    spec.mirror
        .clone()
        .unwrap_or_else(|| spec.distro.default_mirror().to_owned())
}

/// The Nix expression of the image of the module at `config`, from the flake at `flake`.
fn image_expr(flake: &Path, config: &Path) -> String {
    format!(
        "((builtins.getFlake {}).lib.image [ {} ]).config.system.build.image",
        render::string(&format!("path:{}", flake.display())),
        render::string(&config.display().to_string())
    )
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

/// Write the rendered module (whole, then renamed: never half a file).
fn write_config(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let tmp = path.with_extension("nix.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nix_versions_and_build_ids_are_read_as_nix_prints_them() {
        assert_eq!(major_minor("2.8.0"), Some((2, 8)));
        assert_eq!(major_minor("2.24.10"), Some((2, 24)));
        assert!(major_minor("2.3.16").is_some_and(|v| v < MIN_NIX));
        assert_eq!(major_minor("unknown"), None);
        assert_eq!(
            build_id("/nix/store/0c6d3kqmwwg3zphsbc1y8ipwlgxrb6qx-image.drv").unwrap(),
            "0c6d3kqmwwg3"
        );
        assert!(build_id("error: nothing").is_err());
    }
}
