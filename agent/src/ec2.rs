//! What the agent reads from EC2's instance metadata (IMDSv2, through the AWS SDK's
//! client): whether this is an instance at all, and the key pair's SSH keys that
//! `devos-ec2-keys.service` hands to the image's default user at boot.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use aws_config::imds::client::error::ImdsError;

/// Where sshd looks for keys handed in at boot (`AuthorizedKeysFile` in the image's
/// sshd configuration, written by the builder), one file per user.
pub const AUTHORIZED_KEYS_DIR: &str = "/var/lib/devos/ssh/authorized_keys";

/// Whether this machine is an EC2 instance: the DMI vendor Nitro instances report, or
/// a Xen instance's hypervisor uuid. An explicit metadata endpoint
/// (`AWS_EC2_METADATA_SERVICE_ENDPOINT`) counts too.
pub(crate) fn on_ec2() -> bool {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    std::env::var_os("AWS_EC2_METADATA_SERVICE_ENDPOINT").is_some()
        || [
            "/sys/class/dmi/id/sys_vendor",
            "/sys/class/dmi/id/board_vendor",
        ]
        .iter()
        .any(|p| read(p).trim() == "Amazon EC2")
        || read("/sys/hypervisor/uuid")
            .to_ascii_lowercase()
            .starts_with("ec2")
}

/// Read from instance metadata, retrying while it cannot be reached (the network may
/// not be up yet): None if the path does not exist.
pub(crate) async fn metadata(
    imds: &aws_config::imds::Client,
    path: &str,
) -> anyhow::Result<Option<String>> {
    let mut wait = Duration::from_secs(1);
    let mut waited = Duration::ZERO;
    loop {
        match imds.get(path).await {
            Ok(text) => return Ok(Some(text.as_ref().to_owned())),
            Err(ImdsError::ErrorResponse(r)) if r.response().status().as_u16() == 404 => {
                return Ok(None);
            }
            Err(e) if waited >= Duration::from_secs(300) => {
                anyhow::bail!("cannot read {path} from instance metadata for 5 minutes: {e}")
            }
            Err(e) => {
                tracing::debug!("instance metadata {path}: {e}; retrying in {wait:?}");
                tokio::time::sleep(wait).await;
                waited += wait;
                wait = (wait * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// What `ec2-keys` did.
#[derive(Debug, PartialEq, Eq)]
pub enum KeysOutcome {
    /// Not an EC2 instance: nothing read, nothing written.
    NotOnEc2,
    /// The instance's keys (none when it was launched without a key pair) were
    /// written for the user, replacing what an earlier boot wrote.
    Written { path: PathBuf, keys: usize },
}

/// Read the instance's key pair keys from metadata and make them the user's keys
/// handed in at boot, in `dir` (normally [`AUTHORIZED_KEYS_DIR`]).
pub async fn install_key_pair(user: &str, dir: &Path) -> anyhow::Result<KeysOutcome> {
    if !crate::accounts::is_user_name(user) {
        bail!("`{user}` is not a user name (set DEVOS_EC2_USER in /etc/devos/ec2-keys.env)");
    }
    if !on_ec2() {
        return Ok(KeysOutcome::NotOnEc2);
    }
    let imds = aws_config::imds::Client::builder().build();
    let mut keys = Vec::new();
    // `0=my-key` per line; none (404) when the instance was launched without a key pair.
    let listing = metadata(&imds, "/latest/meta-data/public-keys/").await?;
    for line in listing.as_deref().unwrap_or("").lines() {
        let Some((index, _name)) = line.split_once('=') else {
            continue;
        };
        if index.is_empty() || !index.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let path = format!("/latest/meta-data/public-keys/{index}/openssh-key");
        for key in metadata(&imds, &path).await?.unwrap_or_default().lines() {
            let key = key.trim();
            if crate::accounts::is_ssh_public_key(key) {
                keys.push(key.to_owned());
            } else if !key.is_empty() {
                tracing::warn!("instance metadata {path}: not an OpenSSH public key, skipped");
            }
        }
    }
    let path = dir.join(user);
    write_keys(&path, &keys)?;
    Ok(KeysOutcome::Written {
        path,
        keys: keys.len(),
    })
}

/// Replace the file whole (a new file renamed over the old), root's, readable by the
/// user: sshd reads authorized keys as the user, so the file and the directories this
/// makes on the way to it are readable by all (the agent's umask would make them
/// root's alone). Directories that already exist are left as they are.
fn write_keys(path: &Path, keys: &[String]) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().context("no directory for the keys")?;
    make_readable_dirs(dir)?;
    let tmp = path.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
    file.write_all(b"# The EC2 key pair's keys, written at boot by devos-ec2-keys.service.\n")?;
    for key in keys {
        writeln!(file, "{key}")?;
    }
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Create `dir` and whichever of its parents are missing, each with mode 0755 whatever
/// the umask.
fn make_readable_dirs(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
    for d in missing.into_iter().rev() {
        match std::fs::DirBuilder::new().mode(0o755).create(d) {
            Ok(()) => std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))
                .with_context(|| format!("cannot make {} readable", d.display()))?,
            // Made by the host keys' unit in the meantime: theirs, as it is.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("cannot create {}", d.display())),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_keys_are_kept_and_the_file_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ssh/keys/dev");
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        // Directories that exist are never changed (the temporary directory is 0700,
        // its parent world-writable and sticky).
        let before = (mode(dir.path()), mode(dir.path().parent().unwrap()));
        // The agent's own umask (as devos-agent sets it for all its commands).
        use nix::sys::stat::{Mode, umask};
        let old = umask(Mode::from_bits_truncate(0o077));
        let written = write_keys(&path, &["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOne".into()])
            .and_then(|()| write_keys(&path, &[]));
        umask(old);
        written.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("AAAA"), "{text}");
        // Readable by the user sshd reads it as, whatever the agent's umask.
        assert_eq!(mode(&path), 0o644);
        assert_eq!(mode(path.parent().unwrap()), 0o755);
        assert_eq!(mode(&dir.path().join("ssh")), 0o755);
        assert_eq!(
            (mode(dir.path()), mode(dir.path().parent().unwrap())),
            before
        );
        assert!(!path.with_extension("new").exists());
    }

    #[tokio::test]
    async fn a_user_name_that_is_not_one_is_refused_before_anything_is_read() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["", "../etc", "Dev", "a b"] {
            assert!(install_key_pair(bad, dir.path()).await.is_err(), "{bad}");
        }
    }
}
