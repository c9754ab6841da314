//! Helpers shared by the image-building integration tests: an isolated registry, the
//! shared test cache, an agent package, spec copies and command runners.

// Not every test file uses every helper.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::Duration;

use devos_tests::{isolate_aws, repo_root, require, require_root, run_with_timeout};
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_devos-build");
pub static HEAVY: Mutex<()> = Mutex::new(());

/// `devos-build`, as every test runs it: without the developer's AWS variables,
/// profiles and credentials (a test sets the ones it means, such as moto's endpoint),
/// and never with the developer's cache, registry or settings: the shared test cache,
/// a registry of this test process, no settings file. (Tests that need their own
/// registry or cache set `DEVOS_REGISTRY` and `DEVOS_CACHE_DIR` over these.)
pub fn devos_build_command() -> Command {
    let scratch = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let mut c = Command::new(BIN);
    isolate_aws(&mut c);
    c.env("DEVOS_CACHE_DIR", test_cache())
        .env(
            "DEVOS_REGISTRY",
            scratch.join(format!("registry-{}.db", std::process::id())),
        )
        .env_remove("DEVOS_CONFIG")
        .env("XDG_CONFIG_HOME", scratch.join("no-config"))
        .env("XDG_DATA_HOME", scratch.join("no-data"));
    c
}

/// The cache every test shares (downloaded packages, stage entries): under the
/// build's target directory, never the developer's.
pub fn test_cache() -> PathBuf {
    repo_root().join("target/test-cache")
}

pub struct Env {
    pub dir: tempfile::TempDir,
    pub cache: PathBuf,
    pub agent_deb: PathBuf,
}

impl Env {
    pub fn new() -> Self {
        require_root();
        for (tool, package) in [
            ("mmdebstrap", "mmdebstrap"),
            ("qemu-img", "qemu-utils"),
            ("mkfs.vfat", "dosfstools"),
            ("mcopy", "mtools"),
            ("sfdisk", "fdisk"),
            ("debugfs", "e2fsprogs"),
            ("zstd", "zstd"),
            ("osslsigncode", "osslsigncode"),
            ("sbverify", "sbsigntool"),
            ("sign-efi-sig-list", "efitools"),
        ] {
            require(tool, package);
        }
        let dir = tempfile::tempdir().unwrap();
        let cache = test_cache();
        let agent_deb = devos_build::build::agent_pkg::build(&repo_root(), dir.path(), 0, &cache)
            .unwrap()
            .path;
        Self {
            dir,
            cache,
            agent_deb,
        }
    }

    pub fn registry(&self) -> PathBuf {
        self.dir.path().join("registry.db")
    }

    /// A spec whose image no earlier run can have cached: the default spec with a
    /// hostname unique to this run and `edit` applied.
    pub fn fresh_spec(&self, file: &str, edit: impl Fn(String) -> String) -> PathBuf {
        let nonce = format!(
            "devos-{}-{}",
            std::process::id(),
            file.trim_end_matches(".toml")
        );
        self.spec(file, |t| {
            edit(t.replace("hostname = \"devos\"", &format!("hostname = \"{nonce}\"")))
        })
    }

    /// A copy of the default spec with `edit` applied, in this test's directory.
    pub fn spec(&self, file: &str, edit: impl Fn(String) -> String) -> PathBuf {
        self.spec_from("devos-debian.toml", file, edit)
    }

    /// A copy of `images/BASE` with `edit` applied, in this test's directory.
    pub fn spec_from(&self, base: &str, file: &str, edit: impl Fn(String) -> String) -> PathBuf {
        let text = std::fs::read_to_string(repo_root().join("images").join(base)).unwrap();
        let path = self.dir.path().join(file);
        std::fs::write(&path, edit(text)).unwrap();
        path
    }

    pub fn out(&self, spec: &Path) -> PathBuf {
        self.dir
            .path()
            .join("images")
            .join(spec.file_stem().unwrap())
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = devos_build_command();
        c.env("DEVOS_CACHE_DIR", &self.cache)
            .env("DEVOS_REGISTRY", self.registry())
            .env("DEVOS_KEYS", self.dir.path().join("keys"))
            .env_remove("SOURCE_DATE_EPOCH")
            .args(args);
        c
    }

    pub fn build_cmd(&self, spec: &Path, extra: &[&str]) -> Command {
        let mut c = self.cmd(&["image", "build", "--json"]);
        c.arg(spec)
            .arg("--agent-deb")
            .arg(&self.agent_deb)
            .arg("--out")
            .arg(self.out(spec).join("current"))
            .args(extra);
        c
    }

    /// Build; must succeed. (stdout as JSON, stderr)
    pub fn build(&self, spec: &Path, extra: &[&str]) -> (Value, String) {
        let out = run(&mut self.build_cmd(spec, extra), 15);
        ok(&out);
        (
            serde_json::from_slice(&out.stdout).unwrap(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let out = run(&mut self.cmd(args), 5);
        ok(&out);
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn versions(&self) -> Vec<String> {
        self.json(&["image", "list", "--json"])
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["version"].as_str().unwrap().to_owned())
            .collect()
    }
}

pub fn run(cmd: &mut Command, minutes: u64) -> Output {
    run_with_timeout(cmd, Duration::from_secs(minutes * 60)).unwrap()
}

pub fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "command failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The check `name` of a boot test's report (`report["checks"]`).
pub fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == name)
        .unwrap_or_else(|| panic!("no `{name}` check in {report:#}"))
}

/// Flip one byte in the middle of a file.
pub fn flip_byte(path: &Path) {
    let len = std::fs::metadata(path).unwrap().len();
    flip_byte_at(path, len / 2);
}

/// Flip the byte at `offset` of a file, in place.
pub fn flip_byte_at(path: &Path, offset: u64) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.read_exact(&mut b).unwrap();
    b[0] ^= 0x55;
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&b).unwrap();
}

/// `gpg --verify` of `sig` on `file` with only the keys in `keyring`, as systemd-pull
/// checks a feed; whether it passed.
pub fn gpg_verifies(keyring: &Path, file: &Path, sig: &Path) -> bool {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new("gpg")
        .arg("--homedir")
        .arg(home.path())
        .args(["--batch", "--no-default-keyring", "--trust-model", "always"])
        .arg("--keyring")
        .arg(keyring)
        .arg("--verify")
        .arg(sig)
        .arg(file)
        .output()
        .unwrap();
    let _ = Command::new("gpgconf")
        .arg("--homedir")
        .arg(home.path())
        .args(["--kill", "gpg-agent"])
        .output();
    out.status.success()
}
