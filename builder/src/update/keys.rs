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

/// What to do when the keys in use are not the ones wanted: the likeliest cause is
/// another key directory (sudo does not pass `DEVOS_KEYS` on).
pub(crate) const OTHER_DIR_HINT: &str = "use the key directory that holds the right key: set DEVOS_KEYS to it (sudo drops DEVOS_KEYS: `sudo DEVOS_KEYS=DIR devos-build ...`)";

/// The signing key, as `keys show` prints it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct KeyInfo {
    pub(crate) fingerprint: String,
    pub(crate) user_id: String,
    /// Unix time the key was made (signatures are never older); ISO 8601 in `--json`,
    /// as every time there.
    #[serde(serialize_with = "crate::support::time::serialize_iso")]
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

/// `program` as the user the key belongs to: under sudo, the user who ran it (their
/// uid, primary gid and no other group). The key lives in their home and stays theirs:
/// what gpg writes beside it is theirs, and a link they put there reaches only what
/// they could reach themselves. Only what they may see is given to it: the key, the
/// builder's own `SHA256SUMS`, a feed's public files.
pub(crate) fn as_key_user(program: &str) -> Command {
    match crate::support::paths::sudo_ids() {
        Some((uid, gid)) => {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={uid}"))
                .arg(format!("--regid={gid}"))
                .args(["--clear-groups", "--", program]);
            c
        }
        None => Command::new(program),
    }
}

/// `gpg` in the key's home, as the key's user, without the user's options or agent.
fn gpg(dir: &Path) -> Command {
    gpg_options(as_key_user("gpg"), dir)
}

/// `c` (a gpg) in the home `dir`, in batch mode, reading no options file.
fn gpg_options(mut c: Command, dir: &Path) -> Command {
    c.arg("--homedir")
        .arg(dir)
        .args(["--batch", "--no-tty", "--quiet", "--no-options"])
        .args(["--pinentry-mode", "loopback", "--passphrase", ""]);
    c
}

/// Stop the gpg-agent a command in the key's home `dir` started (it would outlive
/// this process).
fn stop_agent(dir: &Path) {
    kill_agent(as_key_user("gpgconf"), dir);
}

/// Stop the gpg-agent of the home `dir` with `gpgconf` (a command to run it).
fn kill_agent(mut gpgconf: Command, dir: &Path) {
    let _ = gpgconf
        .arg("--homedir")
        .arg(dir)
        .args(["--kill", "gpg-agent"])
        .output();
}

/// Run `c` (a [`gpg`] in the key's home `dir`) with `input` on its stdin, its agent
/// stopped afterwards; its output on success.
fn run_gpg(dir: &Path, c: &mut Command, input: Option<&[u8]>, what: &str) -> Result<Vec<u8>> {
    let out = cmd::run_with_input(c, input);
    stop_agent(dir);
    out.map(|out| out.stdout).map_err(|e| {
        let hint = match crate::support::paths::sudo_user() {
            Some(user) => format!(
                "\n  hint: under sudo, gpg runs as {user}, who must own the key directory (`chown -R {user}: {}`)",
                dir.display()
            ),
            None => String::new(),
        };
        anyhow::anyhow!(
            "gpg could not {what} (key directory {}): {e}{hint}",
            dir.display()
        )
    })
}

/// Why `keys generate` (and its dry run) refuses when `dir` holds both keys (`k`, the
/// update signing key, and a Secure Boot key).
fn already_there(dir: &Path, k: &KeyInfo) -> anyhow::Error {
    anyhow::anyhow!(
        "{} already holds the signing key {} and a Secure Boot key: images built with them trust only them\n  hint: `devos-build keys show` prints them, `devos-build keys export FILE` writes the public key a spec's `[update] key` names; to start over, move that directory away first",
        dir.display(),
        k.fingerprint
    )
}

/// The keys `dir` holds (the update signing key, the Secure Boot certificate), refused
/// as `keys generate` refuses when it holds both.
pub(crate) fn not_both(
    dir: &Path,
) -> Result<(Option<KeyInfo>, Option<super::boot_key::Certificate>)> {
    match (find(dir)?, super::boot_key::find(dir)?) {
        (Some(k), Some(_)) => Err(already_there(dir, &k)),
        held => Ok(held),
    }
}

/// The host's name for the keys' user ids ("builder" without one).
fn host_name() -> String {
    let host = fs::read_to_string("/etc/hostname").unwrap_or_default();
    match host.trim() {
        "" => "builder".to_owned(),
        h => h.to_owned(),
    }
}

/// Make whichever of the two keys `dir` lacks (the update signing key, the Secure Boot
/// key); refused when it holds both (images trust them: replacing one must be
/// deliberate). Two at once make one pair: the second waits, then refuses.
pub(crate) fn generate(dir: &Path) -> Result<(KeyInfo, super::boot_key::Certificate)> {
    let _held = open_key_dir(dir)?;
    let (key, boot) = not_both(dir)?;
    let host = host_name();
    let key = match key {
        Some(k) => k,
        None => {
            let uid = format!("DevOS update signing key ({host})");
            run_gpg(
                dir,
                gpg(dir).args(["--quick-generate-key", &uid, "ed25519", "sign", "never"]),
                None,
                "generate the signing key",
            )?;
            current(dir)?
        }
    };
    let boot = match boot {
        Some(b) => b,
        None => super::boot_key::generate(dir, &host)?,
    };
    Ok((key, boot))
}

/// The key directory, made if missing (0700; under sudo, the invoking user's when made
/// in a directory of theirs), locked against another `keys generate` while the
/// returned handle lives. It must be the key user's and hold a GnuPG home or nothing:
/// its owner is checked and its mode set through the handle opened, never through a
/// path that could change in between.
fn open_key_dir(dir: &Path) -> Result<fs::File> {
    use std::os::unix::fs::MetadataExt;
    let Some(owner) = crate::support::paths::acting_uid() else {
        bail!("cannot tell which user this command runs for (no /proc/self?)");
    };
    // What is there already: what this call makes below it is removed again if refused.
    let existing = crate::support::paths::nearest_existing(dir).to_path_buf();
    let (handle, made) = crate::support::paths::create_user_dirs_made(dir)?;
    let meta = handle
        .metadata()
        .with_context(|| format!("cannot read {}", dir.display()))?;
    if meta.uid() != owner && made {
        // Emptied from the bottom up; with a `..` in the name, only the key directory.
        let plain = dir.components().all(|c| {
            matches!(
                c,
                std::path::Component::Normal(_) | std::path::Component::RootDir
            )
        });
        let made_here: Vec<&Path> = if plain {
            dir.ancestors().take_while(|d| *d != existing).collect()
        } else {
            vec![dir]
        };
        for d in made_here {
            if fs::remove_dir(d).is_err() {
                break;
            }
        }
        bail!(
            "the key directory {} would be made in a directory that is not yours (uid {owner}), so it would not be yours either; nothing was left there\n  hint: name a directory in one of your own with DEVOS_KEYS",
            dir.display()
        );
    }
    check_owner(dir, meta.uid(), owner)?;
    // Locked before it is looked into: another `keys generate` may be making the key.
    handle
        .lock()
        .with_context(|| format!("cannot lock {}", dir.display()))?;
    check_holds_only_keys(dir)?;
    handle
        .set_permissions(fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot make {} private", dir.display()))?;
    Ok(handle)
}

/// What [`open_key_dir`] refuses of a key directory already there, for `keys generate
/// --dry-run` (which makes nothing): one that is no directory, another user's, or
/// one holding other files. A missing one is fine: the real run makes it.
pub(crate) fn check_existing_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = fs::metadata(dir) else {
        return Ok(());
    };
    if !meta.is_dir() {
        bail!(
            "the key directory {} is not a directory\n  hint: name a new or empty directory with DEVOS_KEYS",
            dir.display()
        );
    }
    if let Some(owner) = crate::support::paths::acting_uid() {
        check_owner(dir, meta.uid(), owner)?;
    }
    check_holds_only_keys(dir)
}

/// The key directory `dir` (owned by `uid`) must be the key user's, `owner`.
fn check_owner(dir: &Path, uid: u32, owner: u32) -> Result<()> {
    if uid != owner {
        bail!(
            "the key directory {} belongs to uid {uid}, not to uid {owner} who the key is for\n  hint: name a directory of your own with DEVOS_KEYS (under sudo: in a directory that is yours), or move that one away",
            dir.display()
        );
    }
    Ok(())
}

/// A key directory holds a GnuPG home, a Secure Boot key, or nothing.
fn check_holds_only_keys(dir: &Path) -> Result<()> {
    let gnupg_home = [
        "pubring.kbx",
        "private-keys-v1.d",
        super::boot_key::KEY_FILE,
        super::boot_key::CERT_FILE,
    ]
    .iter()
    .any(|f| dir.join(f).exists());
    let empty = fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .next()
        .is_none();
    if !gnupg_home && !empty {
        bail!(
            "{} holds files and neither a GnuPG home nor a Secure Boot key; the keys would be made among them\n  hint: name a new or empty directory with DEVOS_KEYS",
            dir.display()
        );
    }
    Ok(())
}

/// Check, before any key is made or file written, that the public key may be written
/// to `file`: its directory exists, it is no directory, and it holds nothing but this
/// same public key (`key`; `None` for a key about to be made, which no file holds yet).
pub(crate) fn check_export_destination(file: &Path, key: Option<&KeyInfo>) -> Result<()> {
    if file.is_dir() || file.as_os_str().to_string_lossy().ends_with('/') {
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
    let Ok(link) = file.symlink_metadata() else {
        return Ok(());
    };
    // The public key is written as a file in its place (renamed over it): never over
    // a device, FIFO or socket (`/dev/stdout`, `/dev/null`), nor is one read to compare.
    let special = |m: fs::Metadata| !m.is_file() && !m.is_dir() && !m.is_symlink();
    if special(link) || file.metadata().is_ok_and(special) {
        bail!(
            "cannot write the public key to {}: it is not a regular file (a device, FIFO or socket)\n  hint: name a file, e.g. update-key.pgp, and read it from there",
            file.display()
        );
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

/// The key in `dir`, or an error saying how to make one (in another directory when
/// `keys generate` would refuse this one).
pub(crate) fn current(dir: &Path) -> Result<KeyInfo> {
    find(dir)?.ok_or_else(|| {
        let hint = match check_existing_dir(dir) {
            Ok(()) => "make one with `devos-build keys generate`".to_owned(),
            Err(e) => format!(
                "`devos-build keys generate` would refuse it ({}): name a new or empty directory with DEVOS_KEYS and make the key there",
                e.to_string().lines().next().unwrap_or_default()
            ),
        };
        anyhow::anyhow!("no update signing key in {}\n  hint: {hint}", dir.display())
    })
}

/// The key in `dir`; `None` when there is none (an error when gpg cannot tell).
pub(crate) fn find(dir: &Path) -> Result<Option<KeyInfo>> {
    let listing = if dir.join("pubring.kbx").is_file() {
        run_gpg(
            dir,
            gpg(dir).args(["--with-colons", "--list-secret-keys"]),
            None,
            "list the keys",
        )?
    } else {
        Vec::new()
    };
    let keys = parse_listing(&String::from_utf8_lossy(&listing));
    // Secret keys gpg cannot list (their public keys live in pubring.kbx): never taken
    // as "no key", which `keys generate` would answer with a new one that images
    // built with the old one reject.
    let secret_files = || {
        fs::read_dir(dir.join("private-keys-v1.d")).map_or(0, |d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".key"))
                .count()
        })
    };
    if keys.is_empty()
        && let secret_files @ 1.. = secret_files()
    {
        // gpg writes a new key's revocation certificate last: without one, the key's
        // making may have been cut short (a `keys generate` interrupted), or the
        // directory was restored without it.
        let finished = fs::read_dir(dir.join("openpgp-revocs.d")).is_ok_and(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().ends_with(".rev"))
        });
        if !finished {
            bail!(
                "{} holds a secret key that gpg does not list, and no revocation certificate: its making was cut short (a `devos-build keys generate` interrupted), or pubring.kbx and openpgp-revocs.d are missing from a restored copy\n  hint: if images were built with this key, restore both from a backup of the key directory (they trust it); if its `keys generate` was interrupted, nothing trusts it: move the directory away (`mv {} {}.unfinished`) and run `devos-build keys generate` again",
                dir.display(),
                dir.display(),
                dir.display()
            );
        }
        bail!(
            "{} holds {secret_files} secret key file(s) in private-keys-v1.d, but gpg lists no key: pubring.kbx is missing or damaged\n  hint: restore pubring.kbx from a backup of the key directory (images trust this key); only if the key is lost, move the directory away and make a new one with `devos-build keys generate`",
            dir.display()
        );
    }
    match keys.as_slice() {
        [(fingerprint, user_id, created)] => Ok(Some(KeyInfo {
            fingerprint: fingerprint.clone(),
            user_id: user_id.clone(),
            created: *created,
            dir: dir.to_path_buf(),
        })),
        [] => Ok(None),
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
    let public = run_gpg(
        &key.dir,
        gpg(&key.dir).args(["--export", &key.fingerprint]),
        None,
        &format!("export {}", key.fingerprint),
    )?;
    if public.is_empty() {
        bail!(
            "gpg exported nothing for {} from {}\n  hint: `devos-build keys show` lists the key there",
            key.fingerprint,
            key.dir.display()
        );
    }
    Ok(public)
}

/// The fingerprint of the (one) public key in the file `path`. Read by this process
/// (root, under sudo) in a scratch home of its own: nothing of the file reaches
/// another user.
pub(crate) fn fingerprint_of(path: &Path) -> Result<String> {
    let scratch = tempfile::tempdir().context("cannot make a temporary directory")?;
    let out = cmd::run(
        gpg_options(Command::new("gpg"), scratch.path())
            .args(["--with-colons", "--show-keys"])
            .arg(path),
    );
    kill_agent(Command::new("gpgconf"), scratch.path());
    let listing = out.with_context(|| format!("gpg could not read the key {}", path.display()))?;
    match parse_listing(&String::from_utf8_lossy(&listing.stdout)).as_slice() {
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
/// same bytes. gpg reads the file and writes the signature through pipes: it runs as
/// the key's user, who need not reach either.
pub(crate) fn sign(key: &KeyInfo, file: &Path, sig: &Path, time: u64) -> Result<()> {
    let time = time.max(key.created);
    let data = fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let signature = run_gpg(
        &key.dir,
        gpg(&key.dir)
            .arg("--faked-system-time")
            .arg(format!("{time}!"))
            .args(["--local-user", &key.fingerprint, "--detach-sign"])
            .args(["--output", "-"]),
        Some(&data),
        &format!("sign {}", file.display()),
    )?;
    fs::write(sig, signature).with_context(|| format!("cannot write {}", sig.display()))
}

/// Whether `sig` is a valid detached signature of `data` by `key` (gpg's `VALIDSIG`
/// naming the key's primary fingerprint); false for a bad, foreign or unreadable one.
pub(crate) fn verifies(key: &KeyInfo, data: &[u8], sig: &[u8]) -> Result<bool> {
    // The signature in a file the key's user may read; the data on gpg's stdin.
    let scratch = tempfile::tempdir().context("cannot make a temporary directory")?;
    let sig_file = scratch.path().join("data.sig");
    let write = || -> std::io::Result<()> {
        let mut f = fs::File::create_new(&sig_file)?;
        std::io::Write::write_all(&mut f, sig)?;
        f.set_permissions(fs::Permissions::from_mode(0o644))?;
        // The directory (made a moment ago by this process) opened for gpg to enter.
        fs::set_permissions(scratch.path(), fs::Permissions::from_mode(0o711))
    };
    write().with_context(|| format!("cannot write {}", sig_file.display()))?;
    let out = cmd::output_with_input(
        gpg(&key.dir)
            .args(["--status-fd", "1", "--verify"])
            .arg(&sig_file)
            .arg("-"),
        Some(data),
    );
    stop_agent(&key.dir);
    let out = out.context("cannot run gpg to check a signature")?;
    let status = String::from_utf8_lossy(&out.stdout);
    // A bad or foreign signature is an answer; a gpg that checked nothing is not.
    if !status.lines().any(|l| l.starts_with("[GNUPG:] ")) {
        bail!(
            "gpg checked no signature (key directory {}): {}",
            key.dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(status.lines().any(|l| {
        l.strip_prefix("[GNUPG:] VALIDSIG ")
            .and_then(|rest| rest.split_whitespace().last())
            == Some(key.fingerprint.as_str())
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_creation_time_is_iso_8601_in_json() {
        let key = KeyInfo {
            fingerprint: "ABCDEF".into(),
            user_id: "devos".into(),
            created: 1_796_437_168,
            dir: PathBuf::from("/k"),
        };
        let json = serde_json::to_value(&key).unwrap();
        assert_eq!(json["created"], "2026-12-05T02:19:28Z", "{json}");
    }

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
