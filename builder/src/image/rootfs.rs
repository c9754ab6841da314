//! The `rootfs` stage: bootstrap the base tree with mmdebstrap, and the package
//! sources it uses (the spec's mirror, the host's apt sources, or the distro default).

// `let _ = write!(string, ...)` below: writing to a String cannot fail.
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::model::spec::{Distro, Spec};
use crate::support::cmd;

/// Where packages come from for one build.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Sources {
    /// Why these sources: `spec`, `host` or `default`.
    pub(crate) origin: &'static str,
    /// deb822 text handed to mmdebstrap as the chroot's sources list.
    pub(crate) deb822: String,
    /// Every (mirror URI, suite) pair, in the order of the sources.
    pub(crate) repos: Vec<(String, String)>,
}

/// Pick the sources for a spec: its `mirror`, else the host's apt sources when the
/// host runs the same distro and suite, else the distro's official mirror.
pub(crate) fn sources(spec: &Spec) -> Sources {
    if let Some(mirror) = &spec.mirror {
        return mirror_sources(spec, mirror, "spec");
    }
    if let Some(host) = host_sources(spec) {
        return host;
    }
    mirror_sources(spec, spec.distro.default_mirror(), "default")
}

fn mirror_sources(spec: &Spec, mirror: &str, origin: &'static str) -> Sources {
    let suites = match spec.distro {
        Distro::Debian if is_debian_stable(&spec.suite) => {
            format!("{0} {0}-updates", spec.suite)
        }
        Distro::Ubuntu => format!("{0} {0}-updates {0}-security", spec.suite),
        _ => spec.suite.clone(),
    };
    let repos = suites
        .split_whitespace()
        .map(|s| (mirror.to_owned(), s.to_owned()))
        .collect();
    let mut deb822 = format!(
        "Types: deb\nURIs: {mirror}\nSuites: {suites}\nComponents: {}\n",
        spec.components.join(" ")
    );
    if let Some(keyring) = keyring(spec) {
        let _ = writeln!(deb822, "Signed-By: {}", keyring.display());
    }
    Sources {
        origin,
        deb822,
        repos,
    }
}

fn is_debian_stable(suite: &str) -> bool {
    matches!(suite, "bookworm" | "trixie" | "bullseye")
}

/// The keyring that verifies the archive: the spec's, else the distro's default.
fn keyring(spec: &Spec) -> Option<PathBuf> {
    if let Some(k) = &spec.keyring {
        return Some(k.clone());
    }
    match spec.distro {
        Distro::Debian => Some("/usr/share/keyrings/debian-archive-keyring.gpg".into()),
        Distro::Ubuntu => Some("/usr/share/keyrings/ubuntu-archive-keyring.gpg".into()),
        Distro::Nixos => None,
    }
}

/// The host's deb822 apt sources, rewritten to the spec's components, when the host
/// runs the spec's distro and suite.
fn host_sources(spec: &Spec) -> Option<Sources> {
    let os_release = read_host_file(Path::new("/etc/os-release"))?;
    let id = devos_agent::os_release::field(&os_release, "ID")?;
    let codename = devos_agent::os_release::field(&os_release, "VERSION_CODENAME")?;
    let wanted = match spec.distro {
        Distro::Debian => "debian",
        Distro::Ubuntu => "ubuntu",
        Distro::Nixos => return None,
    };
    if id != wanted || codename != spec.suite {
        return None;
    }
    let mut stanzas = Vec::new();
    let list_dir = Path::new("/etc/apt/sources.list.d");
    let entries = match std::fs::read_dir(list_dir) {
        Ok(entries) => entries,
        Err(e) => {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(
                    "cannot list {}: {e}; using the distro's default mirror",
                    list_dir.display()
                );
            }
            return None;
        }
    };
    let mut dir: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "sources"))
        .collect();
    dir.sort();
    for path in dir {
        let text = read_host_file(&path)?;
        stanzas.extend(parse_deb822(&text));
    }
    let mut deb822 = String::new();
    let mut repos = Vec::new();
    for s in stanzas.iter().filter(|s| {
        s.types.split_whitespace().any(|t| t == "deb")
            && s.suites
                .split_whitespace()
                .any(|x| x == spec.suite || x.starts_with(&format!("{}-", spec.suite)))
    }) {
        let _ = write!(
            deb822,
            "Types: deb\nURIs: {}\nSuites: {}\nComponents: {}\n",
            s.uris,
            s.suites,
            spec.components.join(" ")
        );
        // apt here trusts only what a stanza names: default to the distro's keyring.
        let signed_by = s
            .signed_by
            .clone()
            .or_else(|| keyring(spec).map(|k| k.display().to_string()));
        if let Some(k) = signed_by {
            let _ = writeln!(deb822, "Signed-By: {k}");
        }
        deb822.push('\n');
        for uri in s.uris.split_whitespace() {
            repos.extend(
                s.suites
                    .split_whitespace()
                    .map(|suite| (uri.to_owned(), suite.to_owned())),
            );
        }
    }
    (!repos.is_empty()).then_some(Sources {
        origin: "host",
        deb822,
        repos,
    })
}

/// A host file `host_sources` reads; `None` when it cannot be read, logged unless it
/// is missing, since the build then takes the default mirror instead of the host's.
fn read_host_file(path: &Path) -> Option<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => Some(text),
        Err(e) => {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(
                    "cannot read {}: {e}; using the distro's default mirror",
                    path.display()
                );
            }
            None
        }
    }
}

struct Stanza {
    types: String,
    uris: String,
    suites: String,
    signed_by: Option<String>,
}

fn parse_deb822(text: &str) -> Vec<Stanza> {
    text.split("\n\n")
        .filter_map(|block| {
            let get = |key: &str| {
                block.lines().find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    (k.trim().eq_ignore_ascii_case(key)).then(|| v.trim().to_owned())
                })
            };
            let enabled = get("Enabled").is_none_or(|v| v != "no");
            enabled.then_some(())?;
            Some(Stanza {
                types: get("Types")?,
                uris: get("URIs")?,
                suites: get("Suites")?,
                signed_by: get("Signed-By").filter(|v| !v.is_empty()),
            })
        })
        .collect()
}

/// Fail fast, before anything is downloaded or built, when the archive keyring is
/// missing ([`crate::image::apt::Index::refresh`] calls it once the mirror answered).
pub(crate) fn preflight(spec: &Spec) -> Result<()> {
    if let Some(k) = keyring(spec).filter(|k| !k.is_file()) {
        let package = match spec.distro {
            Distro::Ubuntu => "ubuntu-keyring",
            _ => "debian-archive-keyring",
        };
        if spec.keyring.is_some() {
            let state = if k.exists() {
                "not a regular file"
            } else {
                "missing on this host"
            };
            bail!(
                "the archive keyring {} for {:?} is {state} (`[base] keyring` in {})\n  hint: fix `[base] keyring` to name a keyring file that signs the mirror, or install `{package}` if it is that package's",
                k.display(),
                spec.distro,
                spec.path.display()
            );
        }
        bail!(
            "the archive keyring {} for {:?} is missing on this host\n  hint: install `{package}`, or set `[base] keyring` in {} to a keyring file that signs the mirror",
            k.display(),
            spec.distro,
            spec.path.display()
        );
    }
    Ok(())
}

/// Bootstrap `target` (which must not exist) with mmdebstrap, from the package
/// lists in `lists` (the ones the package set was resolved from, so apt picks the
/// same versions). Downloaded packages are kept in `package_cache` for later builds.
/// `merged_usr`: the resolution has `usr-is-merged`, so /usr is merged by symlinks
/// before anything is unpacked (as debootstrap does) instead of by usrmerge.
pub(crate) fn bootstrap(
    spec: &Spec,
    sources: &Sources,
    lists: &Path,
    target: &Path,
    package_cache: &Path,
    source_date_epoch: u64,
    merged_usr: bool,
) -> Result<()> {
    spec.check_buildable()?;
    // The hooks below name these paths inside single quotes.
    for path in [package_cache, lists, target] {
        if path.to_string_lossy().contains('\'') {
            bail!(
                "{} has a `'` in its path, which mmdebstrap's hooks cannot be given\n  hint: build with a cache (`DEVOS_CACHE_DIR`) and `--out` whose paths have none",
                path.display()
            );
        }
    }
    std::fs::create_dir_all(package_cache)?;
    sweep_package_leftovers(package_cache);
    let work = target.with_extension("sources");
    std::fs::write(&work, &sources.deb822)?;
    let dracut_conf = target.with_extension("dracut.conf");
    std::fs::write(&dracut_conf, dracut_config())?;
    let cache = package_cache.display().to_string();
    let mut mm = mmdebstrap_command();
    mm.env("SOURCE_DATE_EPOCH", source_date_epoch.to_string())
        .arg("--variant=minbase")
        .arg(format!("--include={}", spec.all_packages().join(",")))
        .arg(format!("--components={}", spec.components.join(",")))
        .arg("--aptopt=Acquire::Languages \"none\"")
        .args(DPKG_EXCLUDES.iter().map(|p| format!("--dpkgopt={p}")))
        // A targeted initrd: only the storage drivers of the clouds and hypervisors
        // DevOS images run on, instead of every module (`MODULES=most`). They are
        // added by a hook, not listed for loading: udev in the initrd loads only the
        // ones whose hardware is there (each module load costs time, much under TCG).
        .arg(format!(
            "--setup-hook=mkdir -p \"$1\"/etc/initramfs-tools/conf.d \"$1\"/etc/initramfs-tools/hooks && echo MODULES=list > \"$1\"/etc/initramfs-tools/conf.d/devos.conf && printf '%s\\n' '#!/bin/sh' '[ \"$1\" = prereqs ] && exit 0' '. /usr/share/initramfs-tools/hook-functions' 'for m in {}; do manual_add_modules $m; done' > \"$1\"/etc/initramfs-tools/hooks/devos-storage && chmod 755 \"$1\"/etc/initramfs-tools/hooks/devos-storage",
            INITRD_MODULES.join(" ")
        ))
        // The same for dracut, which puts systemd in the initrd (a verified root needs
        // it), should the spec install dracut instead of initramfs-tools.
        .arg(format!(
            "--setup-hook=mkdir -p \"$1\"/etc/dracut.conf.d && cp '{}' \"$1\"/etc/dracut.conf.d/devos.conf",
            dracut_conf.display()
        ))
        // Keep every downloaded .deb: copy the cache in before apt runs, and the
        // (possibly larger) cache back out before mmdebstrap cleans it.
        //
        // Out, each package the cache lacks or holds differently (cut short by a
        // killed build, which apt then fetched again) goes through a file of this
        // build's own (mktemp: builds in PID namespaces of their own share PIDs),
        // named as `replace_file` names its own (`.NAME.XXXXXX.tmp`, what a killed
        // build leaves is swept by the next), and is renamed into place: another
        // build copying the cache in never takes half a package, and a broken one
        // does not stay.
        .arg("--skip=essential/unlink")
        .arg("--skip=update")
        .arg(format!(
            "--setup-hook=mkdir -p \"$1\"/var/lib/apt/lists && find '{}' -maxdepth 1 -type f -name '*_*' -exec cp -t \"$1\"/var/lib/apt/lists/ {{}} +",
            lists.display()
        ))
        .arg("--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/")
        .arg(format!(
            "--setup-hook=find '{cache}' -maxdepth 1 -name '*.deb' -exec cp -t \"$1\"/var/cache/apt/archives/ {{}} +"
        ))
        .arg(format!(
            "--customize-hook=for f in \"$1\"/var/cache/apt/archives/*.deb; do [ -f \"$f\" ] || continue; n=\"${{f##*/}}\"; cmp -s \"$f\" '{cache}'/\"$n\" && continue; t=$(mktemp --suffix=.tmp '{cache}'/.\"$n\".XXXXXX) && cp \"$f\" \"$t\" && chmod 644 \"$t\" && mv -f \"$t\" '{cache}'/\"$n\" || {{ rm -f \"$t\"; exit 1; }}; done"
        ));
    if let Some(k) = keyring(spec) {
        mm.arg(format!("--keyring={}", k.display()));
    }
    if merged_usr {
        if !Path::new(MERGED_USR_HOOK).is_dir() {
            bail!(
                "mmdebstrap has no merged-usr hook ({MERGED_USR_HOOK})\n  hint: install mmdebstrap 1.0 or newer (`sudo apt-get install mmdebstrap`)"
            );
        }
        mm.arg(format!("--hook-dir={MERGED_USR_HOOK}"));
    }
    // dpkg without fsync: the tree is thrown away if the build dies anyway.
    if Path::new(EATMYDATA_HOOK).is_dir() {
        mm.arg(format!("--hook-dir={EATMYDATA_HOOK}"));
    }
    mm.arg(&spec.suite).arg(target).arg(&work);
    let result = cmd::run(&mut mm).with_context(|| {
        format!(
            "while bootstrapping {:?} {} with mmdebstrap",
            spec.distro, spec.suite
        )
    });
    // Scratch beside the tree in the build's work directory, removed with it anyway.
    let _ = std::fs::remove_file(&work);
    let _ = std::fs::remove_file(&dracut_conf);
    result?;
    Ok(())
}

/// mmdebstrap in a mount and PID namespace of its own: however the build ends (Ctrl-C,
/// a kill), every process mmdebstrap started ends with it, and the mounts it makes in
/// the tree (proc, sys, devpts) go with the namespace, so the tree can be removed.
/// Where this host cannot make them (a container without the right to mount proc, a
/// chroot whose `/` is no mount point) mmdebstrap runs as it is, and a killed build
/// Remove the temporary packages killed builds left in the package cache (see the
/// customize hook above); a failure only costs space, so it is a warning.
fn sweep_package_leftovers(cache: &Path) {
    let leftover = |name: &str| {
        crate::support::paths::replacing(name).is_some_and(|file| file.ends_with(".deb"))
    };
    let swept = crate::support::paths::open_dir(cache)
        .with_context(|| format!("cannot open {}", cache.display()))
        .and_then(|dir| crate::support::paths::sweep_leftovers(&dir, cache, leftover));
    match swept {
        Ok(removed) if !removed.is_empty() => tracing::info!(
            "removed {} package(s) a killed build left half-copied in {}",
            removed.len(),
            cache.display()
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!("{e:#}; what killed builds left in it stays"),
    }
}

/// may leave both behind: said in a warning.
fn mmdebstrap_command() -> Command {
    const IN_NAMESPACES: [&str; 4] = ["--pid", "--kill-child=SIGKILL", "--mount-proc", "--"];
    let probe = Command::new("unshare")
        .args(IN_NAMESPACES)
        .arg("true")
        .output();
    match probe {
        Ok(out) if out.status.success() => {
            let mut mm = Command::new("unshare");
            mm.args(IN_NAMESPACES).arg("mmdebstrap");
            mm
        }
        other => {
            let why = match other {
                Ok(out) => String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                Err(e) => e.to_string(),
            };
            tracing::warn!(
                "mmdebstrap runs without a mount and PID namespace of its own (`unshare --pid --mount-proc` failed here: {why}): a build killed while it runs may leave its processes running and its mounts in the work directory, which the next build then leaves alone\n  hint: build on a host (or a container allowed to mount proc) where `unshare --pid --fork --mount-proc true` works"
            );
            Command::new("mmdebstrap")
        }
    }
}

/// Block and filesystem drivers the initrd needs to find the root on QEMU/KVM (virtio),
/// AWS (Nitro NVMe, Xen), Azure (Hyper-V), VMware and VirtualBox (PVSCSI, SATA, and IDE:
/// the controller a VMDK's `ide` hint asks for); dm-verity and the SHA-256 code it
/// checks the root with.
const INITRD_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "sd_mod",
    "nvme",
    "xen_blkfront",
    "hv_storvsc",
    "vmw_pvscsi",
    "ahci",
    "ata_piix",
    "ext4",
    "erofs",
    "dm_mod",
    "dm_verity",
    crate::image::disk::VERITY_HASH_MODULE,
];

/// dracut's modules in the initrd, and only these (with what they depend on: udev,
/// journald, tmpfiles, dm): systemd as the initrd's init, which opens the verified root
/// from `roothash=` and mounts it from `root=`, and the kernel's drivers. A generic
/// dracut initrd also carries its own hook services (a shell script each, slow under
/// TCG), the 13 MB hardware database, LUKS, FIDO2, PKCS#11, resume, overlay-root,
/// virtiofs, ...: about three times the size, all of it unpacked and much of it run on
/// every boot, none of it needed to open a verity root.
const DRACUT_MODULES: &[&str] = &["systemd-initrd", "systemd-veritysetup", "kernel-modules"];

/// dracut's configuration: a generic (not host-only) initrd of `DRACUT_MODULES`, and of
/// the kernel's drivers only `INITRD_MODULES`; reproducible (file times from
/// SOURCE_DATE_EPOCH, archive in a fixed order), as the image must be.
fn dracut_config() -> String {
    format!(
        "# DevOS: a targeted initrd with systemd, which opens a verified root (roothash=).\n\
         hostonly=\"no\"\nhostonly_cmdline=\"no\"\ncompress=\"zstd\"\n\
         reproducible=\"yes\"\n\
         dracutmodules=\" {} \"\n\
         drivers=\" {} \"\n",
        DRACUT_MODULES.join(" "),
        INITRD_MODULES.join(" ")
    )
}

const MERGED_USR_HOOK: &str = "/usr/share/mmdebstrap/hooks/merged-usr";
const EATMYDATA_HOOK: &str = "/usr/share/mmdebstrap/hooks/eatmydata";

/// Documentation and translations are not part of an image (copyright files are).
const DPKG_EXCLUDES: &[&str] = &[
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/info/*",
];

/// Installed packages and their versions, from the tree's dpkg database.
pub(crate) fn installed_packages(root: &Path) -> Result<Vec<(String, String)>> {
    let out = cmd::stdout(
        Command::new("dpkg-query")
            .arg(format!(
                "--admindir={}",
                root.join("var/lib/dpkg").display()
            ))
            .args(["-W", "-f", "${Package}\t${Version}\n"]),
    )?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let (p, v) = l.split_once('\t')?;
            Some((p.to_owned(), v.to_owned()))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_copied_packages_killed_builds_left_are_swept() {
        let cache = tempfile::tempdir().unwrap();
        let old = std::time::SystemTime::now() - 2 * crate::support::paths::LEFTOVER_AGE;
        let put = |name: &str, modified: std::time::SystemTime| {
            let f = std::fs::File::create(cache.path().join(name)).unwrap();
            f.set_modified(modified).unwrap();
        };
        put(".less_590-2_amd64.deb.AbC123.tmp", old);
        // Being copied by a build now; a package; not a package's temporary file.
        let kept = [
            ".less_590-2_amd64.deb.Fresh1.tmp",
            "less_590-2_amd64.deb",
            ".notes.AbC123.tmp",
        ];
        put(kept[0], std::time::SystemTime::now());
        put(kept[1], old);
        put(kept[2], old);
        sweep_package_leftovers(cache.path());
        let mut left: Vec<String> = std::fs::read_dir(cache.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        let mut kept = kept.map(String::from).to_vec();
        kept.sort();
        assert_eq!(left, kept);
    }

    #[test]
    fn deb822_stanzas() {
        let text = "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\nTypes: deb\nURIs: http://x\nSuites: sid\nComponents: main\nEnabled: no\n";
        let s = parse_deb822(text);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].uris, "http://deb.debian.org/debian");
        assert_eq!(s[0].suites, "bookworm bookworm-updates");
    }
}
