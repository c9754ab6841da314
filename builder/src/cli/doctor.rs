//! `devos-build doctor`: which host tools are present, and how to install the rest.

use std::path::Path;

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
        "image build: `root-fs = \"erofs\"`",
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

#[derive(Debug, Serialize)]
pub(crate) struct ToolStatus {
    pub(crate) tool: String,
    pub(crate) package: String,
    pub(crate) purpose: String,
    pub(crate) found: Option<String>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Report {
    pub(crate) tools: Vec<ToolStatus>,
    /// The command that installs every missing Debian package, if any are missing.
    pub(crate) install: Option<String>,
}

pub(crate) fn check() -> Report {
    let tools: Vec<ToolStatus> = TOOLS
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
                found,
            }
        })
        .collect();
    let mut missing: Vec<&str> = tools
        .iter()
        .filter(|t| t.found.is_none() && !t.package.starts_with('('))
        .map(|t| t.package.as_str())
        .collect();
    missing.dedup();
    let install = (!missing.is_empty()).then(|| {
        format!(
            "sudo apt-get install --no-install-recommends {}",
            missing.join(" ")
        )
    });
    Report { tools, install }
}

impl Report {
    pub(crate) fn human(&self) -> String {
        let mut s = String::new();
        for t in &self.tools {
            s.push_str(&format!(
                "{:7} {:48} {:24} {}\n",
                if t.found.is_some() { "ok" } else { "MISSING" },
                t.tool,
                t.package,
                t.purpose
            ));
        }
        match &self.install {
            Some(cmd) => s.push_str(&format!("\nto install what is missing:\n  {cmd}\n")),
            None => s.push_str("\nall host tools are present\n"),
        }
        s
    }
}
