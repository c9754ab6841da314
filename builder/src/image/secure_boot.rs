//! Secure Boot (`[disk] secure-boot = true`): systemd-boot and the unified kernel image
//! signed with the builder's key (made and read by update/boot_key.rs), and the
//! authenticated variables systemd-boot enrolls from the ESP on a machine's first
//! boot, while the firmware is in setup mode (`secure-boot-enroll if-safe`: in a
//! virtual machine only, where nothing can be bricked). From then on the firmware
//! starts only what that key signed: systemd-boot, then a unified kernel image whose
//! command line carries the root's dm-verity hash, so every block from the boot loader
//! to the root is the one built. The signatures are reproducible: their signing time is
//! the build's SOURCE_DATE_EPOCH. An AMI gets the certificate as its UEFI data
//! ([`uefi_data`]).

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
        signature_list(&self.cert_file, &esl)?;
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

/// The EFI signature list holding the certificate `cert` (PEM), written to `esl`: what
/// PK, KEK and db hold.
fn signature_list(cert: &Path, esl: &Path) -> Result<()> {
    cmd::run(
        Command::new("cert-to-efi-sig-list")
            .args(["-g", OWNER_GUID])
            .arg(cert)
            .arg(esl),
    )
    .context("while making the Secure Boot signature list")?;
    Ok(())
}

/// The one certificate `pem` holds, as openssl writes it (PEM), and its DER. A text
/// with anything else — a private key beside it, a second certificate, a `TRUSTED
/// CERTIFICATE` that tools read differently — is refused: what is hashed, recorded and
/// enrolled must be one and the same certificate, and never a key. `what` names it in
/// errors (which never quote its text).
pub(crate) fn single_certificate(pem: &[u8], what: &str) -> Result<(String, Vec<u8>)> {
    let text = std::str::from_utf8(pem).map_err(|_| anyhow::anyhow!("{what} is not PEM text"))?;
    let blocks: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("-----BEGIN "))
        .collect();
    if blocks != ["-----BEGIN CERTIFICATE-----"] {
        anyhow::bail!(
            "{what} must hold one PEM certificate and nothing else; it holds {}\n  hint: keep the certificate alone in its file (`openssl x509 -in FILE -out secure-boot.crt`)",
            if blocks.is_empty() {
                "no PEM block".to_owned()
            } else {
                blocks.join(", ")
            }
        );
    }
    let der = cmd::run_with_input(
        Command::new("openssl").args(["x509", "-outform", "DER"]),
        Some(pem),
    )
    .with_context(|| format!("{what} is not a PEM certificate"))?
    .stdout;
    let canonical = cmd::run_with_input(
        Command::new("openssl").args(["x509", "-inform", "DER", "-outform", "PEM"]),
        Some(&der),
    )
    .with_context(|| format!("{what}: openssl cannot write it back"))?
    .stdout;
    let canonical = String::from_utf8(canonical).context("openssl wrote PEM that is not text")?;
    Ok((canonical, der))
}

/// The most EC2 takes as an AMI's UEFI data (RegisterImage's `UefiData`, base64).
const UEFI_DATA_MAX: usize = 64_000;

/// An AMI's UEFI data (EC2's variable store, base64, as `RegisterImage` takes it) with
/// the certificate `cert_pem` as PK, KEK and db: an instance of the AMI starts with
/// Secure Boot enforced from its first boot, with no enrolling boot and on instance
/// types where systemd-boot would not enroll by itself. The certificate must be the
/// one the image was signed with (`sha256` of its DER, as the manifest records it):
/// keys that are not would leave every instance stopped in its firmware. Made with
/// AWS's own tool, `uefivars` (python-uefivars), from the signature list efitools
/// makes; `work` holds the files in between.
pub(crate) fn uefi_data(cert_pem: &str, sha256: &str, work: &Path) -> Result<String> {
    if cmd::which("uefivars").is_none() {
        anyhow::bail!(
            "uefivars is not installed (AWS's python-uefivars: it writes the AMI's UEFI variables)\n  hint: `pip install uefivars` (or run tests/setup-host) so that `uefivars` is on PATH"
        );
    }
    let (cert_pem, der) =
        single_certificate(cert_pem.as_bytes(), "the recorded Secure Boot certificate")?;
    let actual = crate::support::digest::sha256_hex(&der);
    if actual != sha256 {
        anyhow::bail!(
            "the recorded Secure Boot certificate has sha256 {actual}, not the {sha256} the image was signed with"
        );
    }
    let cert = work.join("secure-boot.crt");
    let esl = work.join("secure-boot.esl");
    let blob = work.join("uefi-data.b64");
    fs::write(&cert, &cert_pem).with_context(|| format!("cannot write {}", cert.display()))?;
    signature_list(&cert, &esl)?;
    cmd::run(
        Command::new("uefivars")
            .args(["-i", "none", "-o", "aws", "-O"])
            .arg(&blob)
            .arg("-P")
            .arg(&esl)
            .arg("-K")
            .arg(&esl)
            .arg("-b")
            .arg(&esl),
    )
    .context("while making the AMI's UEFI variables (uefivars)")?;
    let data = fs::read_to_string(&blob)
        .with_context(|| format!("cannot read {}", blob.display()))?
        .trim()
        .to_owned();
    if data.is_empty() || data.len() > UEFI_DATA_MAX {
        anyhow::bail!(
            "uefivars made {} bytes of UEFI data; EC2 takes 1 to {UEFI_DATA_MAX}",
            data.len()
        );
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The UEFI data holds the certificate as PK, KEK and db, each an X.509 signature
    /// list owned by DevOS's GUID, as uefivars reads it back.
    #[test]
    fn uefi_data_enrolls_the_certificate_as_pk_kek_and_db() {
        let work = tempfile::tempdir().expect("tempdir");
        let key = work.path().join("k.pem");
        let crt = work.path().join("c.pem");
        cmd::run(
            Command::new("openssl")
                .args(["req", "-new", "-x509", "-newkey", "rsa:2048", "-nodes"])
                .args(["-subj", "/CN=DevOS test/", "-days", "1", "-keyout"])
                .arg(&key)
                .arg("-out")
                .arg(&crt),
        )
        .expect("openssl makes a certificate");
        let pem = fs::read_to_string(&crt).expect("certificate");
        let der = cmd::run(
            Command::new("openssl")
                .args(["x509", "-outform", "DER", "-in"])
                .arg(&crt),
        )
        .expect("DER")
        .stdout;
        let sha256 = crate::support::digest::sha256_hex(&der);
        let data = uefi_data(&pem, &sha256, work.path()).expect("UEFI data");
        let blob = work.path().join("read-back.b64");
        fs::write(&blob, &data).expect("write");
        let json = cmd::run(
            Command::new("uefivars")
                .args(["-i", "aws", "-o", "json", "-I"])
                .arg(&blob),
        )
        .expect("uefivars reads its own output")
        .stdout;
        let store: serde_json::Value = serde_json::from_slice(&json).expect("json");
        let vars = store["variables"].as_array().expect("variables");
        assert_eq!(vars.len(), 3, "{store}");
        for (name, guid) in [
            ("PK", "8be4df61-93ca-11d2-aa0d-00e098032b8c"),
            ("KEK", "8be4df61-93ca-11d2-aa0d-00e098032b8c"),
            ("db", "d719b2cb-3d3a-4596-a3bc-dad00e67656f"),
        ] {
            let var = vars
                .iter()
                .find(|v| v["name"] == name)
                .unwrap_or_else(|| panic!("{name} in {store}"));
            assert_eq!(var["guid"], guid, "{name}");
            // Non-volatile, boot and run time, time-based authenticated writes only.
            assert_eq!(var["attr"], 0x27, "{name}");
            let bytes = hex::decode(var["data"].as_str().expect("data")).expect("hex");
            assert!(
                bytes.windows(der.len()).any(|w| w == der.as_slice()),
                "{name} holds the certificate"
            );
            // The signature list's owner: the first GUID after the list's header (28
            // bytes), in EFI's mixed-endian layout.
            let owner = &bytes[28..44];
            assert_eq!(owner[..4], [0x5a, 0x3e, 0x0d, 0x6b], "{name}'s owner");
        }
        // Not a certificate, or another one than the image was signed with: refused.
        let junk = uefi_data("not a certificate", &sha256, work.path()).unwrap_err();
        assert!(format!("{junk:#}").contains("no PEM block"), "{junk:#}");
        // Anything beside the certificate: a private key (never recorded or enrolled),
        // or a second certificate that one tool would read and another skip.
        let key_pem = fs::read_to_string(&key).expect("key");
        let with_key = uefi_data(&format!("{key_pem}{pem}"), &sha256, work.path()).unwrap_err();
        let said = format!("{with_key:#}");
        assert!(
            said.contains("must hold one PEM certificate and nothing else"),
            "{said}"
        );
        assert!(
            !said.contains(key_pem.lines().nth(1).expect("key body")),
            "{said}"
        );
        let trusted = cmd::run(
            Command::new("openssl")
                .args(["x509", "-trustout", "-in"])
                .arg(&crt),
        )
        .expect("trusted form")
        .stdout;
        let two = format!("{}{pem}", String::from_utf8_lossy(&trusted));
        let two = uefi_data(&two, &sha256, work.path()).unwrap_err();
        assert!(
            format!("{two:#}").contains("TRUSTED CERTIFICATE"),
            "{two:#}"
        );
        // A certificate with text around it (as `openssl x509 -text` writes) is
        // enrolled as the bare certificate.
        let texted = cmd::run(
            Command::new("openssl")
                .args(["x509", "-text", "-in"])
                .arg(&crt),
        )
        .expect("text form")
        .stdout;
        assert!(uefi_data(&String::from_utf8_lossy(&texted), &sha256, work.path()).is_ok());
        let other = uefi_data(&pem, &"0".repeat(64), work.path()).unwrap_err();
        assert!(format!("{other:#}").contains("not the 0000"), "{other:#}");
    }
}
