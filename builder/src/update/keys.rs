//! The builder's update signing key: one OpenPGP key (Ed25519, made and used by GnuPG)
//! in a GnuPG home of its own under the invoking user's data directory. It signs each
//! update bundle's and each feed's `SHA256SUMS`; images trust its public key
//! (`[update] key`), which systemd-pull checks the signature with.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::support::cmd;

/// Where the key lives: `DEVOS_KEYS`, else `devos/keys` in the invoking user's data
/// directory (as the registry).
pub(crate) fn dir() -> PathBuf {
    match std::env::var_os("DEVOS_KEYS").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => crate::support::paths::xdg_dir("XDG_DATA_HOME", ".local/share", "/var/lib")
            .join("devos/keys"),
    }
}

/// The signing key, as `keys show` prints it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct KeyInfo {
    pub(crate) fingerprint: String,
    pub(crate) user_id: String,
    /// Unix time the key was made (signatures are never older).
    pub(crate) created: u64,
    pub(crate) dir: PathBuf,
}

impl KeyInfo {
    pub(crate) fn human(&self) -> String {
        format!(
            "fingerprint: {}\nuser id:     {}\nkept in:     {}\n",
            self.fingerprint,
            self.user_id,
            self.dir.display()
        )
    }
}

/// `gpg` in the key's home, without the user's options or agent.
fn gpg(dir: &Path) -> Command {
    let mut c = Command::new("gpg");
    c.arg("--homedir")
        .arg(dir)
        .args(["--batch", "--no-tty", "--quiet", "--no-options"])
        .args(["--pinentry-mode", "loopback", "--passphrase", ""]);
    c
}

/// Stop the gpg-agent a command in `dir` started (it would outlive this process).
fn stop_agent(dir: &Path) {
    let _ = Command::new("gpgconf")
        .arg("--homedir")
        .arg(dir)
        .args(["--kill", "gpg-agent"])
        .output();
}

/// Run `c` (a gpg in `dir`), its agent stopped afterwards; the output on success.
fn run_gpg(dir: &Path, c: &mut Command, what: &str) -> Result<String> {
    let out = cmd::run(c);
    stop_agent(dir);
    let out =
        out.with_context(|| format!("gpg could not {what} (key directory {})", dir.display()))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Make the signing key; refused when there is one (images trust it: replacing it
/// must be deliberate).
pub(crate) fn generate(dir: &Path) -> Result<KeyInfo> {
    if let Ok(k) = current(dir) {
        bail!(
            "{} already holds the signing key {}: images built with it trust only it\n  hint: `devos-build keys show` prints it; to start over, move that directory away first",
            dir.display(),
            k.fingerprint
        );
    }
    crate::support::paths::create_user_dirs(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    let host = fs::read_to_string("/etc/hostname").unwrap_or_default();
    let host = host.trim();
    let uid = format!(
        "DevOS update signing key ({})",
        if host.is_empty() { "builder" } else { host }
    );
    run_gpg(
        dir,
        gpg(dir).args(["--quick-generate-key", &uid, "ed25519", "sign", "never"]),
        "generate the signing key",
    )?;
    hand_over_all(dir)?;
    current(dir)
}

/// Check, before any key is made or file written, that the public key may be written
/// to `file`: its directory exists, it is no directory, and it holds nothing but this
/// same public key (`key`; `None` for a key about to be made, which no file holds yet).
pub(crate) fn check_export_destination(file: &Path, key: Option<&KeyInfo>) -> Result<()> {
    if file.is_dir() {
        bail!(
            "cannot write the public key to {}: it is a directory\n  hint: name a file in it, e.g. {}",
            file.display(),
            file.join("update-key.pgp").display()
        );
    }
    let parent = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !parent.is_dir() {
        bail!(
            "cannot write the public key to {}: there is no directory {}\n  hint: create it, or choose another path",
            file.display(),
            parent.display()
        );
    }
    if file.symlink_metadata().is_err() {
        return Ok(());
    }
    match key {
        Some(key) if fingerprint_of(file).is_ok_and(|f| f == key.fingerprint) => Ok(()),
        Some(key) => bail!(
            "{} exists and is not the public key {}; it is left as it is\n  hint: remove it, or choose another path",
            file.display(),
            key.fingerprint
        ),
        None => bail!(
            "{} exists; the new key's public key would replace it\n  hint: remove it, or choose another path",
            file.display()
        ),
    }
}

/// Under sudo, everything gpg made in `dir` becomes the invoking user's (as `dir`).
fn hand_over_all(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        crate::support::paths::hand_over(&path)?;
        if path.symlink_metadata()?.is_dir() {
            hand_over_all(&path)?;
        }
    }
    Ok(())
}

/// The key in `dir`, or an error saying how to make one.
pub(crate) fn current(dir: &Path) -> Result<KeyInfo> {
    let listing = if dir.join("pubring.kbx").is_file() {
        run_gpg(
            dir,
            gpg(dir).args(["--with-colons", "--list-secret-keys"]),
            "list the keys",
        )?
    } else {
        String::new()
    };
    let keys = parse_listing(&listing);
    match keys.as_slice() {
        [(fingerprint, user_id, created)] => Ok(KeyInfo {
            fingerprint: fingerprint.clone(),
            user_id: user_id.clone(),
            created: *created,
            dir: dir.to_path_buf(),
        }),
        [] => bail!(
            "no update signing key in {}\n  hint: make one with `devos-build keys generate`",
            dir.display()
        ),
        many => bail!(
            "{} holds {} secret keys; the builder signs with exactly one\n  hint: remove the others with `gpg --homedir {} --delete-secret-and-public-keys FINGERPRINT`",
            dir.display(),
            many.len(),
            dir.display()
        ),
    }
}

/// (fingerprint, first user id, creation time) of each primary key in gpg's
/// `--with-colons` listing.
fn parse_listing(text: &str) -> Vec<(String, String, u64)> {
    let mut keys: Vec<(String, String, u64)> = Vec::new();
    let mut in_primary = false;
    for line in text.lines() {
        let f: Vec<&str> = line.split(':').collect();
        match f.first().copied() {
            Some("sec" | "pub") => {
                in_primary = true;
                let created = f.get(5).and_then(|t| t.parse().ok()).unwrap_or(0);
                keys.push((String::new(), String::new(), created));
            }
            Some("ssb" | "sub") => in_primary = false,
            Some("fpr") if in_primary => {
                if let (Some(k), Some(fpr)) = (keys.last_mut(), f.get(9))
                    && k.0.is_empty()
                {
                    k.0 = (*fpr).to_owned();
                }
            }
            Some("uid") => {
                if let (Some(k), Some(uid)) = (keys.last_mut(), f.get(9))
                    && k.1.is_empty()
                {
                    k.1 = unescape(uid);
                }
            }
            _ => {}
        }
    }
    keys
}

/// gpg's `\xNN` escapes in colon listings.
fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("\\x") {
        out.push_str(&rest[..i]);
        match rest
            .get(i + 2..i + 4)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            Some(b) => {
                out.push(b as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push_str("\\x");
                rest = &rest[i + 2..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The public key, binary, as images carry it (`/etc/systemd/import-pubring.gpg`).
pub(crate) fn export(key: &KeyInfo) -> Result<Vec<u8>> {
    let out = gpg(&key.dir)
        .args(["--export", &key.fingerprint])
        .output()
        .context("cannot run gpg")?;
    stop_agent(&key.dir);
    if !out.status.success() || out.stdout.is_empty() {
        bail!(
            "gpg could not export {} from {}: {}",
            key.fingerprint,
            key.dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

/// The fingerprint of the (one) public key in the file `path`.
pub(crate) fn fingerprint_of(path: &Path) -> Result<String> {
    let scratch = tempfile::tempdir()?;
    let listing = run_gpg(
        scratch.path(),
        gpg(scratch.path())
            .args(["--with-colons", "--show-keys"])
            .arg(path),
        &format!("read the key {}", path.display()),
    )?;
    match parse_listing(&listing).as_slice() {
        [(fpr, ..)] if !fpr.is_empty() => Ok(fpr.clone()),
        _ => bail!(
            "{} must hold exactly one OpenPGP public key\n  hint: export it with `devos-build keys export FILE`",
            path.display()
        ),
    }
}

/// Sign `file` with `key` into `sig` (a detached binary signature, as systemd-pull
/// reads `SHA256SUMS.gpg`). Made at `time` (or the key's creation, if later): Ed25519
/// signatures are deterministic, so the same file signed at the same time gives the
/// same bytes.
pub(crate) fn sign(key: &KeyInfo, file: &Path, sig: &Path, time: u64) -> Result<()> {
    let time = time.max(key.created);
    run_gpg(
        &key.dir,
        gpg(&key.dir)
            .arg("--faked-system-time")
            .arg(format!("{time}!"))
            .args(["--yes", "--local-user", &key.fingerprint, "--detach-sign"])
            .arg("--output")
            .arg(sig)
            .arg(file),
        &format!("sign {}", file.display()),
    )?;
    Ok(())
}

/// Whether `sig` is a valid detached signature of `data` by `key` (gpg's `VALIDSIG`
/// naming the key's primary fingerprint); false for a bad, foreign or unreadable one.
pub(crate) fn verifies(key: &KeyInfo, data: &[u8], sig: &[u8]) -> Result<bool> {
    let scratch = tempfile::tempdir().context("cannot make a temporary directory")?;
    let (file, sig_file) = (scratch.path().join("data"), scratch.path().join("data.sig"));
    fs::write(&file, data).with_context(|| format!("cannot write {}", file.display()))?;
    fs::write(&sig_file, sig).with_context(|| format!("cannot write {}", sig_file.display()))?;
    let out = gpg(&key.dir)
        .args(["--status-fd", "1", "--verify"])
        .arg(&sig_file)
        .arg(&file)
        .output()
        .context("cannot run gpg (install it with `apt-get install gpg`)")?;
    stop_agent(&key.dir);
    Ok(out.status.success()
        && String::from_utf8_lossy(&out.stdout).lines().any(|l| {
            l.strip_prefix("[GNUPG:] VALIDSIG ")
                .and_then(|rest| rest.split_whitespace().last())
                == Some(key.fingerprint.as_str())
        }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listings_name_each_primary_key_once() {
        let text = "sec:u:255:22:ABCDEF0123456789:1700000000:::u:::scESC:::+:::ed25519:::0:\n\
                    fpr:::::::::0123456789ABCDEF0123456789ABCDEF01234567:\n\
                    grp:::::::::AAAA:\n\
                    uid:u::::1700000000::HASH::DevOS update signing key (b\\x3a1)::::::::::0:\n\
                    ssb:u:255:18:1111:1700000000::::::e:::+:::cv25519::\n\
                    fpr:::::::::FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF:\n";
        assert_eq!(
            parse_listing(text),
            [(
                "0123456789ABCDEF0123456789ABCDEF01234567".to_owned(),
                "DevOS update signing key (b:1)".to_owned(),
                1_700_000_000
            )]
        );
        assert!(parse_listing("").is_empty());
    }
}
