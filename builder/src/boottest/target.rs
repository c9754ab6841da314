//! What a boot test or a local boot runs: an image file, an output directory, a spec
//! (its newest build) or a registry reference, resolved to the disk and its manifest.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::build;
use crate::model::manifest::Manifest;
use crate::model::spec::Spec;
use crate::model::states::VersionState;
use crate::store::registry::VersionInfo;

/// What to boot: an image file, an output directory, a spec (its newest build), or a
/// registry reference `NAME[@VERSION]`.
pub(crate) struct Target {
    pub(crate) disk: PathBuf,
    pub(crate) manifest: Option<Manifest>,
    /// The spec's `[[tests]]`, run inside the guest after the built-in checks.
    pub(crate) tests: Vec<crate::model::spec::Test>,
}

impl Target {
    /// Whether the image's boot chain is signed for Secure Boot (its manifest says so).
    pub(crate) fn secure_boot(&self) -> bool {
        self.manifest
            .as_ref()
            .is_some_and(|m| m.secure_boot.is_some())
    }

    /// The built version in `dir`, with the tests of `spec` (if given).
    pub(crate) fn from_dir(dir: &Path, spec: Option<&crate::model::spec::Spec>) -> Result<Self> {
        let manifest = Manifest::load(dir)?;
        let disk = manifest.raw(dir).with_context(|| {
            format!(
                "{} lists no raw artifact",
                dir.join("manifest.json").display()
            )
        })?;
        Ok(Self {
            disk,
            manifest: Some(manifest),
            tests: spec.map(|s| s.tests.clone()).unwrap_or_default(),
        })
    }
}

pub(crate) fn resolve_target(arg: &Path, registry: &Path) -> Result<Target> {
    if arg.is_dir() {
        return Target::from_dir(arg, None);
    }
    if arg.extension().is_some_and(|e| e == "toml") {
        let spec = crate::model::spec::load(arg)?;
        // The newest version built from this spec file, else the newest of its name.
        let from_registry = crate::store::registry::Registry::open_read(registry)
            .and_then(|r| r.versions(Some(&spec.name)))
            .unwrap_or_default()
            .into_iter()
            .filter(|v| v.state == VersionState::Built && v.dir.join("manifest.json").is_file())
            .max_by_key(|v| (same_file(Path::new(&v.spec), &spec.path), v.built_at))
            .map(|v| v.dir);
        let dir = build::images_root(&spec.path).join(&spec.name);
        let newest = from_registry.or_else(|| newest_build(&dir)).with_context(|| {
            format!(
                "no build of `{}` found in the registry or {}\n  hint: run `devos-build image build {}` first (or `image build --test`)",
                spec.name,
                dir.display(),
                arg.display()
            )
        })?;
        return Target::from_dir(&newest, Some(&spec));
    }
    if arg.is_file() {
        // An image file alone has no manifest; one beside it that cannot be read is
        // worth saying, as the test then cannot check the version that booted.
        let manifest = match arg.parent() {
            Some(d) if d.join("manifest.json").exists() => match Manifest::load(d) {
                Ok(manifest) => Some(manifest),
                Err(e) => {
                    tracing::warn!("{e:#}; booting {} without it", arg.display());
                    None
                }
            },
            _ => None,
        };
        check_disk(arg)?;
        return Ok(Target {
            disk: arg.to_path_buf(),
            manifest,
            tests: Vec::new(),
        });
    }
    let reference = arg.to_string_lossy();
    // Named as the builder names its images (or `.img`).
    let image_file = arg.extension().and_then(|e| e.to_str()).is_some_and(|e| {
        e == "img" || <crate::model::spec::Format as clap::ValueEnum>::from_str(e, false).is_ok()
    });
    if (image_file && !reference.contains('@')) || reference.contains('/') {
        let what = if arg.exists() {
            format!(
                "`{}` is neither an image file nor a directory",
                arg.display()
            )
        } else if image_file {
            format!("there is no image file `{}`", arg.display())
        } else {
            format!("there is no file or directory `{}`", arg.display())
        };
        bail!(
            "{what}\n  hint: pass an image file, an image output directory (`target/images/devos-debian/VERSION/`), a spec (`images/devos-debian.toml`) or a registry reference (`devos-debian@VERSION`; `devos-build image list` lists them)"
        );
    }
    let reg = crate::store::registry::Registry::open_read(registry)?;
    let v = reg.find(&reference)?;
    if v.state != VersionState::Built || !v.dir.join("manifest.json").is_file() {
        bail!(
            "{}@{} is in the registry but its artifacts are gone ({})\n  hint: rebuild it with `devos-build image build {}`",
            v.name,
            v.version,
            v.dir.display(),
            v.spec
        );
    }
    let spec = built_from(&v)?;
    let target = Target::from_dir(&v.dir, Some(&spec))?;
    // One `--out` used for several versions holds only the newest.
    if let Some(m) = &target.manifest
        && m.build_id != v.build_id
    {
        bail!(
            "{}@{}'s output directory {} now holds {}@{} (a later build with the same --out)\n  hint: test {}@{}, the version there now; give each version its own --out (or leave --out out) to keep them all",
            v.name,
            v.version,
            v.dir.display(),
            m.name,
            m.version,
            m.name,
            m.version
        );
    }
    Ok(target)
}

/// The spec `v` was built from, as it reads now: the boot test runs its `[[tests]]`.
/// One that cannot be read fails the test rather than silently testing less.
fn built_from(v: &VersionInfo) -> Result<Spec> {
    let path = Path::new(&v.spec);
    match crate::model::spec::load(path) {
        Ok(spec) => Ok(spec),
        // Registries written before spec paths were kept absolute hold the path as
        // given to `image build`, relative to the directory it ran in.
        Err(_) if path.is_relative() && !path.exists() => bail!(
            "{}@{} was built from the spec `{}`, a path relative to the directory that build ran in, and there is no such file here; the boot test would miss its [[tests]]\n  hint: pass the spec instead, `devos-build image test PATH/TO/{}` (its newest build), or run this from the directory the build ran in",
            v.name,
            v.version,
            v.spec,
            v.spec
        ),
        Err(e) => {
            // Its own hint is about passing a spec, which the user did not do here.
            let e = e.to_string();
            bail!(
                "{}; it is the spec {}@{} was built from, whose [[tests]] the boot test runs\n  hint: restore it, or pass a spec instead, `devos-build image test PATH/TO/SPEC.toml` (its newest build); `devos-build image test {}` runs only the built-in checks",
                e.lines().next().unwrap_or_default(),
                v.name,
                v.version,
                v.dir.display()
            )
        }
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// The most recently written output directory in `dir`; `None` when there is none
/// (the caller says so).
fn newest_build(dir: &Path) -> Option<PathBuf> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("cannot list {}: {e}", dir.display());
            }
            return None;
        }
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("manifest.json").is_file())
        // A manifest whose time cannot be read sorts as the oldest.
        .max_by_key(|p| {
            fs::metadata(p.join("manifest.json"))
                .and_then(|m| m.modified())
                .ok()
        })
}

/// Refuse a file that is not a disk image of the format its name says (what QEMU
/// would be told it is): booting anything else only times out in the firmware.
fn check_disk(path: &Path) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let format = super::vm::disk_format(path);
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut head = vec![0u8; 1024];
    let n = f
        .read(&mut head)
        .with_context(|| format!("cannot read {}", path.display()))?;
    head.truncate(n);
    let (ok, expected) = match format {
        "qcow2" => (head.starts_with(b"QFI\xfb"), "a qcow2 header"),
        "vmdk" => (head.starts_with(b"KDMV"), "a VMDK header"),
        "vpc" => {
            let mut footer = [0u8; 8];
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let at_end = len >= 512
                && f.seek(SeekFrom::Start(len - 512)).is_ok()
                && f.read_exact(&mut footer).is_ok()
                && &footer == b"conectix";
            (
                at_end || head.starts_with(b"conectix"),
                "a VHD footer at its end",
            )
        }
        _ => (
            head.get(512..520) == Some(b"EFI PART".as_slice())
                || head.get(510..512) == Some([0x55, 0xaa].as_slice()),
            "a GPT or MBR partition table",
        ),
    };
    if !ok {
        bail!(
            "{} is not a disk image: read as {}, it should have {expected}, and it does not\n  hint: pass an image output directory, a spec, NAME@VERSION, or a disk image (.raw, .qcow2, .vmdk or .vhd, named by its format; other names are read as raw)",
            path.display(),
            if format == "vpc" { "vhd" } else { format }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn built_with_spec(spec: &str) -> VersionInfo {
        VersionInfo {
            id: 1,
            name: "devos-debian".into(),
            version: "0.1.0".into(),
            build_id: "b".into(),
            dir: PathBuf::from("/out/devos-debian/0.1.0"),
            spec: spec.into(),
            built_at: 0,
            state: VersionState::Built,
            tested: None,
            artifacts: Vec::new(),
        }
    }

    #[test]
    fn a_file_that_is_not_there_is_said_as_such_not_looked_up_in_the_registry() {
        let dir = tempfile::tempdir().unwrap();
        let registry = dir.path().join("registry.db");
        for (arg, said) in [
            ("nosuch.raw", "there is no image file `nosuch.raw`"),
            (
                "out/nosuch.qcow2",
                "there is no image file `out/nosuch.qcow2`",
            ),
            ("./out/v1", "there is no file or directory `./out/v1`"),
            (
                "/dev/null",
                "`/dev/null` is neither an image file nor a directory",
            ),
        ] {
            let e = format!(
                "{:#}",
                resolve_target(Path::new(arg), &registry).err().unwrap()
            );
            assert!(e.contains(said) && e.contains("hint: "), "{arg}: {e}");
        }
        assert!(!registry.exists(), "a registry was made");
    }

    #[test]
    fn a_spec_that_cannot_be_read_fails_the_test_naming_it() {
        // An older registry's relative path, from another directory.
        let e = built_from(&built_with_spec("images/no-such-spec.toml")).unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains("`images/no-such-spec.toml`, a path relative"),
            "{e}"
        );
        assert!(
            e.contains("hint: pass the spec instead, `devos-build image test PATH/TO/images/no-such-spec.toml`"),
            "{e}"
        );
        // An absolute path whose file is gone.
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("gone.toml");
        let e = built_from(&built_with_spec(&gone.to_string_lossy())).unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains(&*gone.to_string_lossy()), "{e}");
        assert!(e.contains("devos-debian@0.1.0 was built from"), "{e}");
        assert!(e.contains("image test /out/devos-debian/0.1.0"), "{e}");
    }

    #[test]
    fn the_spec_built_from_gives_its_tests() {
        let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/devos-debian.toml");
        let spec = built_from(&built_with_spec(&spec.to_string_lossy())).unwrap();
        assert_eq!(spec.name, "devos-debian");
    }
}
