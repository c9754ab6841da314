//! `devos-build doctor`: which host tools are present, and how to install the rest.

use std::path::{Path, PathBuf};

use serde::Serialize;

/// (program or absolute file, Debian package, what needs it).
const TOOLS: &[(&str, &str, &str)] = &[
    (
        "mmdebstrap",
        "mmdebstrap",
        "image build: bootstrap the root filesystem",
    ),
    (
        "dpkg-deb",
        "dpkg",
        "image build: package and install the agent",
    ),
    (
        "mkfs.ext4",
        "e2fsprogs",
        "image build: root and /var filesystems",
    ),
    (
        "mkfs.erofs",
        "erofs-utils",
        "image build: `root-fs = \"erofs\"` (the default image)",
    ),
    (
        "veritysetup",
        "cryptsetup-bin",
        "image build: `verity = true` (the default image): the root's hash tree",
    ),
    (
        "/usr/lib/python3/dist-packages/pefile.py",
        "python3-pefile",
        "image build: `verity = true`: the image's own ukify runs on it to make the unified kernel image",
    ),
    (
        "gpg",
        "gpg",
        "keys generate, image build with `[update]`, publish updates: the signing key",
    ),
    (
        "gpg-agent",
        "gpg-agent",
        "signing with the key (gpg signs through its agent)",
    ),
    (
        "openssl",
        "openssl",
        "keys generate: the Secure Boot key and certificate",
    ),
    (
        "osslsigncode",
        "osslsigncode",
        "image build with `secure-boot = true`: signs the boot chain",
    ),
    (
        "sbverify",
        "sbsigntool",
        "image build with `secure-boot = true`: checks the signatures",
    ),
    (
        "sign-efi-sig-list",
        "efitools",
        "image build with `secure-boot = true`: the variables the image enrolls",
    ),
    (
        "uefivars",
        "(pip: uefivars)",
        "publish ami of a `secure-boot = true` image: the AMI's keys (UEFI data)",
    ),
    (
        "mkfs.vfat",
        "dosfstools",
        "image build: the EFI system partition",
    ),
    (
        "mcopy",
        "mtools",
        "image build: fill the EFI system partition",
    ),
    ("sfdisk", "fdisk", "image build: the GPT partition table"),
    (
        "debugfs",
        "e2fsprogs",
        "image build: reproducible inode times",
    ),
    ("zstd", "zstd", "image build: the stage cache"),
    (
        "qemu-img",
        "qemu-utils",
        "image build: qcow2/vmdk/vhd; image test: overlays",
    ),
    (
        "qemu-system-x86_64",
        "qemu-system-x86",
        "image test / image boot",
    ),
    (
        "/usr/share/OVMF/OVMF_CODE_4M.fd",
        "ovmf",
        "image test / image boot: UEFI firmware",
    ),
    (
        "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd",
        "ovmf",
        "image test / image boot of a `secure-boot = true` image: OVMF with Secure Boot",
    ),
    (
        "ssh",
        "openssh-client",
        "image test: the SSH login to images with an SSH server",
    ),
    (
        "/usr/share/keyrings/debian-archive-keyring.gpg",
        "debian-archive-keyring",
        "Debian images",
    ),
    (
        "/usr/share/keyrings/ubuntu-archive-keyring.gpg",
        "ubuntu-keyring",
        "Ubuntu images",
    ),
    ("packer", "packer", "publish packer / packer render"),
    (
        "dbus-daemon",
        "dbus-daemon",
        "tests: a private system bus for the agent",
    ),
    (
        "cargo",
        "(rustup)",
        "image build: compile devos-agent from source",
    ),
];

/// Tools only some images or commands need: missing, `doctor` still passes.
const OPTIONAL: &[&str] = &[
    "/usr/share/keyrings/ubuntu-archive-keyring.gpg",
    "packer",
    "dbus-daemon",
    "openssl",
    "osslsigncode",
    "sbverify",
    "sign-efi-sig-list",
    "uefivars",
    "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd",
];

/// Free space the default image's build and test need (cache, output, overlay).
const NEEDED_SPACE: u64 = 8 << 30;

#[derive(Debug, Serialize)]
pub(crate) struct ToolStatus {
    pub(crate) tool: String,
    pub(crate) package: String,
    pub(crate) purpose: String,
    /// Whether building and boot-testing the default image needs it.
    pub(crate) required: bool,
    pub(crate) found: Option<String>,
}

/// One fact about the host besides its tools.
#[derive(Debug, Serialize)]
pub(crate) struct HostCheck {
    pub(crate) check: String,
    pub(crate) ok: bool,
    /// Whether a build of the default image fails without it.
    pub(crate) required: bool,
    pub(crate) detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) hint: Option<String>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Report {
    /// Nothing required is missing.
    pub(crate) ok: bool,
    pub(crate) tools: Vec<ToolStatus>,
    pub(crate) host: Vec<HostCheck>,
    /// The command that installs the missing required Debian packages, if any.
    pub(crate) install: Option<String>,
    /// The command that installs the missing optional ones, if any.
    pub(crate) install_optional: Option<String>,
}

/// What the host checks look at, gathered apart from judging it (so the judging is
/// tested without this machine's state).
pub(crate) struct Facts {
    pub(crate) root: bool,
    /// Whether KVM opens and runs the boot test's probe guest.
    pub(crate) kvm: Kvm,
    /// Free bytes where the cache goes, and that place.
    pub(crate) space: Result<(u64, PathBuf), String>,
    /// /tmp's mode.
    pub(crate) tmp_mode: Option<u32>,
    /// The default mirror's answer to a request for the suite's InRelease.
    pub(crate) mirror: (String, Result<(), String>),
    /// The installed Nix's version (NixOS specs are built with it).
    pub(crate) nix: Result<String, String>,
}

/// What the doctor found of KVM: the same probe the boot test runs before it uses KVM.
pub(crate) enum Kvm {
    /// The probe guest ran, in this long.
    Works(std::time::Duration),
    /// /dev/kvm opens, but QEMU is missing, so it was not tried.
    Untried,
    /// /dev/kvm does not open (the error).
    CannotOpen(String),
    /// /dev/kvm opens, but QEMU cannot run a guest with it (why).
    Broken(String),
}

pub(crate) fn check() -> Report {
    judge(find_tools(), &gather())
}

fn find_tools() -> Vec<ToolStatus> {
    TOOLS
        .iter()
        .map(|(tool, package, purpose)| {
            let found = if tool.starts_with('/') {
                Path::new(tool).exists().then(|| tool.to_string())
            } else {
                crate::support::cmd::which(tool).map(|p| p.display().to_string())
            };
            ToolStatus {
                tool: tool.to_string(),
                package: package.to_string(),
                purpose: purpose.to_string(),
                required: !OPTIONAL.contains(tool),
                found,
            }
        })
        .collect()
}

fn gather() -> Facts {
    use std::os::unix::fs::PermissionsExt;
    let kvm = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Err(e) => Kvm::CannotOpen(e.to_string()),
        Ok(_) if crate::support::cmd::which("qemu-system-x86_64").is_none() => Kvm::Untried,
        // The probe takes well under a second where KVM works, and gives up after 2 s.
        Ok(_) => match tempfile::tempdir() {
            Ok(work) => match crate::boottest::vm::probe_kvm(work.path()) {
                Ok(took) => Kvm::Works(took),
                Err(why) => Kvm::Broken(why),
            },
            Err(e) => Kvm::Broken(format!("cannot make a directory for the probe: {e}")),
        },
    };
    let cache = crate::store::cache::dir();
    let space = free_space(&cache);
    let tmp_mode = std::fs::metadata("/tmp")
        .ok()
        .map(|m| m.permissions().mode() & 0o7777);
    let distro = crate::model::spec::Distro::Debian;
    let url = format!(
        "{}/dists/{}/InRelease",
        distro.default_mirror(),
        distro.default_suite()
    );
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(std::time::Duration::from_secs(8)))
        .build()
        .into();
    let answer = agent.get(&url).call().map(drop).map_err(|e| e.to_string());
    Facts {
        root: crate::support::paths::is_root(),
        kvm,
        space,
        tmp_mode,
        mirror: (url, answer),
        nix: crate::nixos::nix_version(),
    }
}

/// Free bytes on the filesystem that holds `path` (or its nearest existing parent).
fn free_space(path: &Path) -> Result<(u64, PathBuf), String> {
    let existing = path
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"))
        .to_path_buf();
    let out = crate::support::cmd::stdout(
        std::process::Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(&existing),
    )
    .map_err(|e| format!("{e:#}"))?;
    out.lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .map(|free| (free, existing))
        .ok_or_else(|| format!("df printed no free space: {out}"))
}

fn judge(tools: Vec<ToolStatus>, facts: &Facts) -> Report {
    let check = |check: &str, ok: bool, required: bool, detail: String, hint: &str| HostCheck {
        check: check.to_owned(),
        ok,
        required,
        detail,
        hint: (!ok).then(|| hint.to_owned()),
    };
    let host = vec![
        check(
            "root",
            facts.root,
            false,
            if facts.root {
                "running as root"
            } else {
                "not root"
            }
            .to_owned(),
            "`image build` needs root: run it with sudo (the registry and cache stay in your home); everything else runs as you",
        ),
        match &facts.kvm {
            Kvm::Works(took) => check(
                "kvm",
                true,
                false,
                format!(
                    "KVM runs a probe guest ({} ms): boot tests use it",
                    took.as_millis()
                ),
                "",
            ),
            Kvm::Untried => check(
                "kvm",
                true,
                false,
                "/dev/kvm opens (not tried: QEMU is missing)".to_owned(),
                "",
            ),
            Kvm::CannotOpen(e) => check(
                "kvm",
                false,
                false,
                format!("/dev/kvm: {e}; boot tests run under TCG, several times slower"),
                "load kvm_intel or kvm_amd and add yourself to the kvm group, or accept TCG",
            ),
            Kvm::Broken(why) => check(
                "kvm",
                false,
                false,
                format!("KVM does not work here: {why}; boot tests run under TCG, slower"),
                "if this machine is a VM, its host must offer nested virtualisation; check `dmesg` for KVM errors; or accept TCG",
            ),
        },
        match &facts.space {
            Ok((free, at)) => check(
                "space",
                *free >= NEEDED_SPACE,
                true,
                format!(
                    "{} GiB free at {} (a build of the default image needs {} GiB)",
                    free >> 30,
                    at.display(),
                    NEEDED_SPACE >> 30
                ),
                "free some (`devos-build cache prune`, `devos-build image gc`) or set DEVOS_CACHE_DIR to a larger disk",
            ),
            Err(e) => check("space", false, true, e.clone(), "check that df works"),
        },
        check(
            "tmp",
            facts.tmp_mode == Some(0o1777),
            true,
            match facts.tmp_mode {
                Some(m) => format!("/tmp has mode {m:o}"),
                None => "/tmp is missing".to_owned(),
            },
            "apt checks signatures as the _apt user, which writes to /tmp: `chmod 1777 /tmp`",
        ),
        check(
            "mirror",
            facts.mirror.1.is_ok(),
            true,
            match &facts.mirror.1 {
                Ok(()) => format!("{} answers", facts.mirror.0),
                Err(e) => format!("{}: {e}", facts.mirror.0),
            },
            "builds download packages from it: check the network or proxy (http_proxy), or set `[base] mirror` in the spec",
        ),
        {
            let usable = facts.nix.as_deref().is_ok_and(crate::nixos::nix_is_usable);
            check(
                "nix",
                usable,
                false,
                match &facts.nix {
                    Ok(v) if usable => format!("Nix {v}: builds `distro = \"nixos\"` specs"),
                    Ok(v) => {
                        format!("Nix {v} is too old for NixOS specs (nixpkgs needs 2.18 or newer)")
                    }
                    Err(e) => format!("no Nix ({e}): only NixOS specs need it"),
                },
                "for NixOS specs: install Nix 2.18 or newer (https://nixos.org/download, or `nix-bin` on Debian 13)",
            )
        },
    ];
    let missing = |required: bool| {
        let mut packages: Vec<&str> = tools
            .iter()
            .filter(|t| t.found.is_none() && t.required == required && !t.package.starts_with('('))
            .map(|t| t.package.as_str())
            .collect();
        packages.sort_unstable();
        packages.dedup();
        (!packages.is_empty()).then(|| {
            format!(
                "sudo apt-get install --no-install-recommends {}",
                packages.join(" ")
            )
        })
    };
    let ok = tools.iter().all(|t| t.found.is_some() || !t.required)
        && host.iter().all(|h| h.ok || !h.required);
    Report {
        ok,
        install: missing(true),
        install_optional: missing(false),
        tools,
        host,
    }
}

impl Report {
    pub(crate) fn human(&self) -> String {
        let mut s = String::new();
        for t in &self.tools {
            s.push_str(&format!(
                "{:8} {:48} {:24} {}\n",
                match (&t.found, t.required) {
                    (Some(_), _) => "ok",
                    (None, true) => "MISSING",
                    (None, false) => "optional",
                },
                t.tool,
                t.package,
                t.purpose
            ));
        }
        s.push('\n');
        for h in &self.host {
            s.push_str(&format!(
                "{:8} {:8} {}\n",
                match (h.ok, h.required) {
                    (true, _) => "ok",
                    (false, true) => "FAILED",
                    (false, false) => "note",
                },
                h.check,
                h.detail
            ));
            if let Some(hint) = &h.hint {
                s.push_str(&format!("                  hint: {hint}\n"));
            }
        }
        if let Some(cmd) = &self.install {
            s.push_str(&format!("\nto install what is missing:\n  {cmd}\n"));
        }
        if let Some(cmd) = &self.install_optional {
            s.push_str(&format!(
                "\noptional (Ubuntu images, Packer, Secure Boot, the agent's tests):\n  {cmd}\n"
            ));
        }
        s.push_str(if self.ok {
            "\nthis host can build and boot-test the default image\n"
        } else {
            "\nthis host cannot build the default image yet: see MISSING and FAILED above\n"
        });
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> Facts {
        Facts {
            root: true,
            kvm: Kvm::Works(std::time::Duration::from_millis(80)),
            space: Ok((20 << 30, PathBuf::from("/var"))),
            tmp_mode: Some(0o1777),
            mirror: ("http://m/dists/s/InRelease".into(), Ok(())),
            nix: Ok("2.24.10".into()),
        }
    }

    fn tool(name: &str, found: bool) -> ToolStatus {
        ToolStatus {
            tool: name.into(),
            package: format!("pkg-{name}"),
            purpose: String::new(),
            required: !OPTIONAL.contains(&name),
            found: found.then(|| name.to_owned()),
        }
    }

    #[test]
    fn only_what_the_default_image_needs_fails_the_doctor() {
        // Every required tool present, optional ones missing: passes, and says how
        // to get the optional ones.
        let r = judge(
            vec![
                tool("mmdebstrap", true),
                tool("packer", false),
                tool("dbus-daemon", false),
            ],
            &facts(),
        );
        assert!(r.ok);
        assert_eq!(r.install, None);
        assert!(
            r.install_optional
                .as_deref()
                .unwrap()
                .contains("pkg-packer")
        );
        // A required tool missing fails, with its package in the install line.
        let r = judge(vec![tool("mmdebstrap", false)], &facts());
        assert!(!r.ok);
        assert!(r.install.as_deref().unwrap().contains("pkg-mmdebstrap"));
        // Not root and no KVM are notes, not failures.
        let r = judge(
            vec![],
            &Facts {
                root: false,
                kvm: Kvm::CannotOpen("Permission denied".into()),
                ..facts()
            },
        );
        assert!(r.ok, "{}", r.human());
        assert!(r.human().contains("note     root"));
        // KVM that opens but cannot run the probe guest is a note that says so.
        let r = judge(
            vec![],
            &Facts {
                kvm: Kvm::Broken("probe VM exited with exit status: 1".into()),
                ..facts()
            },
        );
        assert!(r.ok, "{}", r.human());
        assert!(
            r.human().contains(
                "note     kvm      KVM does not work here: probe VM exited with exit status: 1; boot tests run under TCG, slower"
            ),
            "{}",
            r.human()
        );
        // No Nix, or one too old for flakes: a note (only NixOS specs need it).
        for nix in [Err("not found".to_owned()), Ok("2.3.16".to_owned())] {
            let r = judge(vec![], &Facts { nix, ..facts() });
            assert!(r.ok, "{}", r.human());
            assert!(r.human().contains("note     nix"), "{}", r.human());
        }
        // Too little space, a /tmp apt cannot write to, an unreachable mirror: each fails.
        for bad in [
            Facts {
                space: Ok((1 << 30, PathBuf::from("/"))),
                ..facts()
            },
            Facts {
                tmp_mode: Some(0o755),
                ..facts()
            },
            Facts {
                mirror: ("u".into(), Err("connection refused".into())),
                ..facts()
            },
        ] {
            let r = judge(vec![], &bad);
            assert!(!r.ok);
            let failed: Vec<_> = r.host.iter().filter(|h| !h.ok).collect();
            assert_eq!(failed.len(), 1);
            assert!(failed[0].hint.is_some());
        }
    }

    #[test]
    fn every_optional_tool_is_a_listed_tool() {
        for o in OPTIONAL {
            assert!(TOOLS.iter().any(|(t, ..)| t == o), "{o}");
        }
    }
}
