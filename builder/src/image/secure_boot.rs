//! Secure Boot (`[disk] secure-boot = true`): systemd-boot and the unified kernel image
//! signed with the builder's key (made and read by update/boot_key.rs), and the
//! authenticated variables systemd-boot enrolls from the ESP on a machine's first
//! boot, while the firmware is in setup mode (`secure-boot-enroll if-safe`: in a
//! virtual machine only, where nothing can be bricked). From then on the firmware starts only what that key
//! signed: systemd-boot, then a unified kernel image whose command line carries the
//! root's dm-verity hash, so every block from the boot loader to the root is the one
//! built. The signatures are reproducible: their signing time is the build's
//! SOURCE_DATE_EPOCH.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::support::cmd;

/// The owner of the enrolled signature lists (DevOS's own GUID).
const OWNER_GUID: &str = "6b0d3e5a-2f4c-4d7e-9a51-d3e0b05b0c17";

/// Where on the ESP systemd-boot finds the variables it enrolls by itself.
pub(crate) const ESP_KEYS_DIR: &str = "loader/keys/auto";

/// What loader.conf adds: enroll the keys above when the firmware is in setup mode,
/// in a virtual machine (EC2's instances are), never on bare metal by itself; and no
/// menu entry for the firmware's setup (from which Secure Boot could be switched off
/// where the firmware allows it without a password).
pub(crate) const LOADER_CONF: &str = "secure-boot-enroll if-safe\nauto-firmware no\n";

/// Signs with one key at one time (the build's).
pub(crate) struct Signer<'a> {
    /// The private key (PEM).
    key_pem: &'a [u8],
    /// Where the certificate is kept, for messages.
    kept_in: &'a Path,
    time: u64,
    /// The certificate as a file (public), for the tools that take one.
    cert_file: PathBuf,
}

impl<'a> Signer<'a> {
    /// A signer with the private key `key_pem` and its certificate `cert_pem` (kept in
    /// `kept_in`), the certificate written into `work`.
    pub(crate) fn new(
        key_pem: &'a [u8],
        cert_pem: &[u8],
        kept_in: &'a Path,
        time: u64,
        work: &Path,
    ) -> Result<Self> {
        let cert_file = work.join("secure-boot.crt");
        fs::write(&cert_file, cert_pem)
            .with_context(|| format!("cannot write {}", cert_file.display()))?;
        Ok(Signer {
            key_pem,
            kept_in,
            time,
            cert_file,
        })
    }

    /// Run `c`, a signing tool, with the private key as a file it can open and read
    /// more than once (osslsigncode cannot read it from a pipe): `c` gets the file's
    /// path from `args(path)`. The file is a sealed memory file, never on a disk,
    /// handed to that one child and closed when it has run.
    fn with_key(&self, c: &mut Command, args: impl FnOnce(&mut Command, &str)) -> Result<()> {
        use rustix::fs::{MemfdFlags, SealFlags};
        use std::os::fd::AsRawFd;
        let fd = rustix::fs::memfd_create(
            "devos-secure-boot-key",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )
        .context("cannot make a memory file for the Secure Boot key")?;
        let mut file = fs::File::from(fd);
        std::io::Write::write_all(&mut file, self.key_pem)?;
        rustix::fs::fcntl_add_seals(
            &file,
            SealFlags::WRITE | SealFlags::GROW | SealFlags::SHRINK | SealFlags::SEAL,
        )
        .context("cannot seal the Secure Boot key's memory file")?;
        let raw = file.as_raw_fd();
        args(c, &format!("/proc/self/fd/{raw}"));
        cmd::pass_fd(c, raw);
        let result = cmd::run(c);
        drop(file);
        result?;
        Ok(())
    }

    /// Sign the EFI binary `file` in place (Authenticode, SHA-256), then check the
    /// signature with the certificate (a key that is not the certificate's fails here,
    /// not at the first boot).
    pub(crate) fn sign_pe(&self, file: &Path) -> Result<()> {
        let signed = file.with_extension("signed");
        let mut c = Command::new("osslsigncode");
        self.with_key(&mut c, |c, key| {
            c.args(["sign", "-h", "sha256", "-certs"])
                .arg(&self.cert_file)
                .args(["-key", key, "-time"])
                .arg(self.time.to_string())
                .arg("-in")
                .arg(file)
                .arg("-out")
                .arg(&signed);
        })
        .with_context(|| format!("while signing {} for Secure Boot", file.display()))?;
        cmd::run(
            Command::new("sbverify")
                .arg("--cert")
                .arg(&self.cert_file)
                .arg(&signed),
        )
        .with_context(|| {
            format!(
                "{} signed with the Secure Boot key does not verify with its certificate {}: the key and the certificate are not a pair",
                file.display(),
                self.kept_in.display()
            )
        })?;
        fs::rename(&signed, file)?;
        Ok(())
    }

    /// PK.auth, KEK.auth and db.auth in `dir`: the certificate as each, signed by
    /// itself, with the build's time as the variables' timestamp.
    pub(crate) fn enrollment(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        fs::create_dir_all(dir)?;
        let esl = dir.join("cert.esl");
        cmd::run(
            Command::new("cert-to-efi-sig-list")
                .args(["-g", OWNER_GUID])
                .arg(&self.cert_file)
                .arg(&esl),
        )
        .context("while making the Secure Boot signature list")?;
        let timestamp = crate::support::time::utc(self.time);
        let mut files = Vec::new();
        for var in ["PK", "KEK", "db"] {
            let auth = dir.join(format!("{var}.auth"));
            let mut c = Command::new("sign-efi-sig-list");
            self.with_key(&mut c, |c, key| {
                c.args(["-t", &timestamp, "-g", OWNER_GUID, "-k", key, "-c"])
                    .arg(&self.cert_file)
                    .arg(var)
                    .arg(&esl)
                    .arg(&auth)
                    .env("TZ", "UTC");
            })
            .with_context(|| format!("while making the Secure Boot variable {var}"))?;
            files.push(auth);
        }
        fs::remove_file(&esl)?;
        Ok(files)
    }
}
