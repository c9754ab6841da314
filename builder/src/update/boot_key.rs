//! The builder's Secure Boot key: an RSA-2048 key and its self-signed X.509
//! certificate (what UEFI firmware verifies), made by OpenSSL beside the update signing
//! key and owned by the same user. Images built with `[disk] secure-boot = true` carry
//! systemd-boot and their unified kernel image signed with it, and its certificate as
//! the platform key, key exchange key and signature database that systemd-boot enrolls
//! on a machine's first boot (image/secure_boot.rs).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::support::cmd;

/// The private key's file in the key directory (PEM, 0600).
pub(crate) const KEY_FILE: &str = "secure-boot.key";
/// The certificate's file in the key directory (PEM).
pub(crate) const CERT_FILE: &str = "secure-boot.crt";

/// The certificate, as `keys show` prints it and a manifest records it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Certificate {
    pub(crate) subject: String,
    /// SHA-256 of the certificate (DER), as `openssl x509 -fingerprint -sha256` prints
    /// it without colons, lower case.
    pub(crate) sha256: String,
    /// When it stops being valid, ISO 8601 as every time in `--json` (firmware does not
    /// check it; shown for the record).
    pub(crate) not_after: String,
    pub(crate) file: PathBuf,
}

impl Certificate {
    pub(crate) fn human(&self) -> String {
        format!(
            "secure boot: {} (sha256 {})\n             valid until {}; {}\n",
            self.subject,
            self.sha256,
            self.not_after,
            self.file.display()
        )
    }
}

/// The key and certificate read for signing (the key's user read them: under sudo,
/// nothing their directory links to is read as root).
pub(crate) struct BootKey {
    pub(crate) certificate: Certificate,
    pub(crate) cert_pem: Vec<u8>,
    pub(crate) key_pem: Vec<u8>,
}

/// The most a key or certificate file may hold (both are a few KiB).
const MAX_FILE: usize = 64 << 10;

/// `file` of the key directory `dir`, read as the key's user: at most [`MAX_FILE`]
/// bytes, within 10 s (a FIFO put there must not hang the build, nor a huge file fill
/// memory). A failure says what the reader said on its stderr, never what it read.
fn read_as_key_user(dir: &Path, file: &str) -> Result<Vec<u8>> {
    let path = dir.join(file);
    let out = super::keys::as_key_user("timeout")
        .args(["10", "head", "-c", &(MAX_FILE + 1).to_string(), "--"])
        .arg(&path)
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("cannot run head to read {}", path.display()))?;
    if out.status.code() == Some(124) {
        bail!(
            "reading {} took more than 10 s: it is not a file\n  hint: keep the key and its certificate in the key directory as plain files",
            path.display()
        );
    }
    if !out.status.success() {
        bail!(
            "cannot read {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    if out.stdout.len() > MAX_FILE {
        bail!(
            "{} holds more than {} KiB: it is not a key or a certificate",
            path.display(),
            MAX_FILE >> 10
        );
    }
    Ok(out.stdout)
}

/// The certificate in `dir`; `None` when there is neither it nor its key.
pub(crate) fn find(dir: &Path) -> Result<Option<Certificate>> {
    Ok(read_certificate(dir)?.map(|(_, c)| c))
}

/// The certificate in `dir` as read (PEM) and described.
fn read_certificate(dir: &Path) -> Result<Option<(Vec<u8>, Certificate)>> {
    let (key, cert) = (dir.join(KEY_FILE), dir.join(CERT_FILE));
    match (
        key.symlink_metadata().is_ok(),
        cert.symlink_metadata().is_ok(),
    ) {
        (false, false) => return Ok(None),
        (true, true) => {}
        (has_key, _) => bail!(
            "{} holds {} without {}: the Secure Boot key is half there\n  hint: restore {} from your backup of the key directory{}; only if the key itself is lost, move the directory's {} away and run `devos-build keys generate` — machines that enrolled the old certificate will refuse everything the new key signs, and must be replaced",
            dir.display(),
            if has_key { KEY_FILE } else { CERT_FILE },
            if has_key { CERT_FILE } else { KEY_FILE },
            if has_key { CERT_FILE } else { KEY_FILE },
            if has_key {
                " (the certificate is also in every image's `loader/keys/auto/db.auth` and every signature it made)"
            } else {
                ""
            },
            if has_key { KEY_FILE } else { CERT_FILE },
        ),
    }
    let read = read_as_key_user(dir, CERT_FILE)?;
    // The certificate alone, as openssl writes it: what is signed with, recorded in
    // manifests and enrolled (a private key kept in the same file must never be).
    let (pem, _) =
        crate::image::secure_boot::single_certificate(&read, &cert.display().to_string())?;
    let certificate = describe(pem.as_bytes(), &cert)?;
    Ok(Some((pem.into_bytes(), certificate)))
}

/// What `openssl x509` says of the certificate `pem` (kept in `file`).
fn describe(pem: &[u8], file: &Path) -> Result<Certificate> {
    let out = cmd::run_with_input(
        std::process::Command::new("openssl").args([
            "x509",
            "-noout",
            "-subject",
            "-enddate",
            "-fingerprint",
            "-sha256",
            "-nameopt",
            "oneline",
            "-dateopt",
            "iso_8601",
        ]),
        Some(pem),
    )
    .with_context(|| format!("{} is not a PEM certificate", file.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .map(|v| v.trim().to_owned())
    };
    let (Some(subject), Some(not_after), Some(fingerprint)) = (
        field("subject="),
        field("notAfter="),
        field("sha256 Fingerprint=").or_else(|| field("SHA256 Fingerprint=")),
    ) else {
        bail!(
            "cannot read the certificate {}: openssl said {text}",
            file.display()
        );
    };
    Ok(Certificate {
        subject,
        sha256: fingerprint.replace(':', "").to_lowercase(),
        // `2126-11-12 02:31:26Z` as OpenSSL writes it.
        not_after: not_after.replacen(' ', "T", 1),
        file: file.to_path_buf(),
    })
}

/// Make the key and certificate in `dir` (the caller holds the key directory's lock
/// and has checked there is neither). As the key's user, private from the start.
pub(crate) fn generate(dir: &Path, host: &str) -> Result<Certificate> {
    let subject = format!("/CN=DevOS Secure Boot key ({host})/");
    let out = cmd::run(
        super::keys::as_key_user("sh")
            .args([
                "-c",
                "umask 077 && exec openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 36500 -subj \"$1\" -keyout \"$2\" -out \"$3\"",
                "sh",
            ])
            .arg(&subject)
            .arg(dir.join(KEY_FILE))
            .arg(dir.join(CERT_FILE)),
    );
    if let Err(e) = out {
        // Nothing half made stays: a later run would refuse a key without a certificate.
        // Removed as the key's user, as they were made.
        let _ = super::keys::as_key_user("rm")
            .arg("-f")
            .arg("--")
            .arg(dir.join(KEY_FILE))
            .arg(dir.join(CERT_FILE))
            .output();
        return Err(anyhow::anyhow!(
            "openssl could not make the Secure Boot key in {}: {e}",
            dir.display()
        ));
    }
    find(dir)?.context("internal error: the Secure Boot key just made is not there")
}

/// Why a Secure Boot image cannot be built without the key in `dir`.
fn missing(dir: &Path) -> anyhow::Error {
    anyhow::anyhow!(
        "no Secure Boot key in {} (`[disk] secure-boot = true` signs the boot chain with it)\n  hint: make one with `devos-build keys generate`",
        dir.display()
    )
}

/// The certificate in `dir`, or an error saying how to make it.
pub(crate) fn required(dir: &Path) -> Result<Certificate> {
    find(dir)?.ok_or_else(|| missing(dir))
}

/// The key and certificate in `dir`, for signing; an error saying how to make them.
pub(crate) fn load(dir: &Path) -> Result<BootKey> {
    let Some((cert_pem, certificate)) = read_certificate(dir)? else {
        return Err(missing(dir));
    };
    check_private(dir)?;
    let key_pem = read_as_key_user(dir, KEY_FILE)?;
    check_pair(dir, &key_pem, &cert_pem)?;
    Ok(BootKey {
        cert_pem,
        key_pem,
        certificate,
    })
}

/// The certificate in `dir`, checked to be the one of the key beside it (`keys show`
/// and a dry run, which do not sign).
pub(crate) fn checked(dir: &Path) -> Result<Option<Certificate>> {
    let Some((cert_pem, certificate)) = read_certificate(dir)? else {
        return Ok(None);
    };
    check_pair(dir, &read_as_key_user(dir, KEY_FILE)?, &cert_pem)?;
    Ok(Some(certificate))
}

/// The public key in the certificate `cert_pem` is the one of `key_pem` (both from
/// `dir`): files restored from two backups, or a certificate copied from another
/// builder, are refused here rather than after signing.
fn check_pair(dir: &Path, key_pem: &[u8], cert_pem: &[u8]) -> Result<()> {
    let public = |args: &[&str], input: &[u8], file: &str, what: &str| -> Result<Vec<u8>> {
        let out = cmd::run_with_input(
            std::process::Command::new("openssl").args(args),
            Some(input),
        )
        .with_context(|| format!("{} is not a PEM {what}", dir.join(file).display()))?;
        Ok(out.stdout)
    };
    let of_key = public(&["pkey", "-pubout"], key_pem, KEY_FILE, "private key")?;
    let of_cert = public(
        &["x509", "-noout", "-pubkey"],
        cert_pem,
        CERT_FILE,
        "certificate",
    )?;
    if of_key != of_cert {
        bail!(
            "{} is not the certificate of {} in {}: they come from two different keys\n  hint: restore both files from one backup of the key directory",
            CERT_FILE,
            KEY_FILE,
            dir.display()
        );
    }
    Ok(())
}

/// The Secure Boot key in `dir` is readable by its owner alone: a key restored from a
/// backup with the wrong mode is refused, not used as it is.
fn check_private(dir: &Path) -> Result<()> {
    let key = dir.join(KEY_FILE);
    // Not followed: a link would have root say what lies where the user cannot look.
    let meta = std::fs::symlink_metadata(&key)
        .with_context(|| format!("cannot read {}", key.display()))?;
    if !meta.file_type().is_file() {
        bail!(
            "{} is not a plain file (a link or something else)\n  hint: keep the key itself in the key directory",
            key.display()
        );
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions());
    if mode & 0o077 != 0 {
        bail!(
            "{} can be read by others (mode {:o}): whoever reads it can sign boot chains every machine that enrolled its certificate starts\n  hint: `chmod 600 {}`, and consider the key leaked if others could log in here",
            key.display(),
            mode & 0o777,
            key.display()
        );
    }
    Ok(())
}
