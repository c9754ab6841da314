//! Getting into an image: the console login (a password hash from the spec, or an
//! autologin the host asks for at boot), and an SSH server whose host keys are made on
//! each machine's first boot into /var, with the EC2 key pair's key for the default
//! user read from instance metadata at boot.
//!
//! Nothing here is a secret baked into the read-only root: two machines from the same
//! image never share a host key, and no login works that the spec or the machine's
//! owner did not hand in.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, Result};

use crate::model::spec::Spec;

/// Who gets the EC2 key pair's key (`DEVOS_EC2_USER=`), relative to the root; the
/// agent's devos-ec2-keys.service runs only where this file is.
pub(crate) const EC2_KEYS_ENV: &str = "etc/devos/ec2-keys.env";

/// The systemd credential that turns on the console autologin for one boot; its value
/// is the user. Only the host can pass it (QEMU's SMBIOS type 11, as `devos-build image
/// boot` does); EC2 and other clouds cannot, so published images ask for a login.
pub(crate) const AUTOLOGIN_CREDENTIAL: &str = "devos.autologin";

/// The getty wrapper: agetty as Debian's units run it, with `--autologin USER` when the
/// host passed the credential naming an existing user.
const CONSOLE_GETTY: &str = r#"#!/bin/sh
# DevOS console login (written by devos-build, see its image/access.rs): agetty as
# Debian's getty units run it, with --autologin when the host passed the
# devos.autologin credential for this boot (`devos-build image boot` does; clouds
# cannot, so their consoles ask for a login).
set -eu
tty=$1
shift
user=
cred=/run/credentials/@system/devos.autologin
if [ -r "$cred" ]; then
    user=$(head -c 64 "$cred" | tr -cd 'a-z0-9_-')
fi
if [ -n "$user" ] && getent passwd "$user" >/dev/null; then
    exec /sbin/agetty --autologin "$user" "$@" - "${TERM:-vt220}"
fi
exec /sbin/agetty -o '-p -- \u' "$@" - "${TERM:-vt220}"
"#;

/// Host keys for this machine, made once on its first boot (ed25519 and ECDSA: RSA
/// keys take seconds to make under emulation and every current client has ed25519).
const SSH_HOST_KEYS: &str = r#"#!/bin/sh
# DevOS SSH host keys (written by devos-build, see its image/access.rs): made on this
# machine's first boot into /var, never baked into the image.
set -eu
dir=/var/lib/devos/ssh
mkdir -p -m 0755 "$dir"
for type in ed25519 ecdsa; do
    key="$dir/ssh_host_${type}_key"
    if [ ! -s "$key" ] || [ ! -s "$key.pub" ]; then
        rm -f "$key" "$key.pub" "$key.new" "$key.new.pub"
        ssh-keygen -q -t "$type" -N '' -C "root@$(hostname)" -f "$key.new"
        mv "$key.new.pub" "$key.pub"
        mv "$key.new" "$key"
    fi
done
"#;

const SSH_HOST_KEYS_UNIT: &str = "\
# DevOS (written by devos-build, see its image/access.rs).
[Unit]
Description=SSH host keys of this machine (made on first boot, kept in /var)
DefaultDependencies=no
After=local-fs.target
Before=ssh.service ssh.socket
ConditionPathExists=|!/var/lib/devos/ssh/ssh_host_ed25519_key.pub
ConditionPathExists=|!/var/lib/devos/ssh/ssh_host_ecdsa_key.pub

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/libexec/devos/ssh-host-keys
";

const SSHD_CONFIG: &str = "\
# DevOS (written by devos-build, see its image/access.rs): host keys are made on each
# machine's first boot in /var, so no two machines share them; keys handed in at boot
# (the EC2 key pair's) are read from /var as well as from ~/.ssh.
HostKey /var/lib/devos/ssh/ssh_host_ed25519_key
HostKey /var/lib/devos/ssh/ssh_host_ecdsa_key
AuthorizedKeysFile .ssh/authorized_keys /var/lib/devos/ssh/authorized_keys/%u
# Keys only, and no root: a password hash in a spec is in every copy of the image,
# for the console; root's is locked and members of sudo reach it from their own login.
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
X11Forwarding no
";

const SSH_SERVICE_DROP_IN: &str = "\
# DevOS (written by devos-build, see its image/access.rs).
[Unit]
Wants=devos-ssh-host-keys.service
After=devos-ssh-host-keys.service
";

/// The console login and, when the image has OpenSSH's server, SSH.
pub(crate) fn set_up(spec: &Spec, root: &Path) -> Result<()> {
    console_login(root)?;
    if root.join("usr/sbin/sshd").exists() {
        ssh_server(spec, root)?;
    }
    Ok(())
}

fn console_login(root: &Path) -> Result<()> {
    write_exec(root, "usr/libexec/devos/console-getty", CONSOLE_GETTY)?;
    // The options each package unit passes to agetty, kept.
    for (unit, options) in [
        (
            "serial-getty@.service",
            "--keep-baud 115200,57600,38400,9600",
        ),
        ("getty@.service", "--noclear"),
    ] {
        let dir = root.join(format!("etc/systemd/system/{unit}.d"));
        fs::create_dir_all(&dir)?;
        fs::write(
            dir.join("devos-console.conf"),
            format!(
                "# DevOS (written by devos-build, see its image/access.rs).\n[Service]\nExecStart=\nExecStart=-/usr/libexec/devos/console-getty %I {options}\n"
            ),
        )?;
    }
    Ok(())
}

fn ssh_server(spec: &Spec, root: &Path) -> Result<()> {
    // openssh-server's postinst made host keys at build time: every machine would
    // share them.
    let etc_ssh = root.join("etc/ssh");
    for entry in
        fs::read_dir(&etc_ssh).with_context(|| format!("cannot list {}", etc_ssh.display()))?
    {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with("ssh_host_") {
            fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        }
    }
    fs::create_dir_all(etc_ssh.join("sshd_config.d"))?;
    fs::write(etc_ssh.join("sshd_config.d/00-devos.conf"), SSHD_CONFIG)?;
    write_exec(root, "usr/libexec/devos/ssh-host-keys", SSH_HOST_KEYS)?;
    let units = root.join("etc/systemd/system");
    fs::write(
        units.join("devos-ssh-host-keys.service"),
        SSH_HOST_KEYS_UNIT,
    )?;
    fs::create_dir_all(units.join("ssh.service.d"))?;
    fs::write(units.join("ssh.service.d/devos.conf"), SSH_SERVICE_DROP_IN)?;
    crate::image::customize::enable(root, "ssh.service", "multi-user.target")?;
    // The EC2 key pair's key goes to the default user (the spec's first), through the
    // agent's devos-ec2-keys.service, which runs only where this file is.
    if let Some(user) = spec.users.first()
        && spec.agent_enabled
    {
        fs::create_dir_all(root.join("etc/devos"))?;
        fs::write(
            root.join(EC2_KEYS_ENV),
            format!(
                "# DevOS (written by devos-build): who gets the EC2 key pair's SSH key.\nDEVOS_EC2_USER={}\n",
                user.name
            ),
        )?;
    }
    Ok(())
}

fn write_exec(root: &Path, path: &str, text: &str) -> Result<()> {
    let path = root.join(path);
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default image's spec: one user, `dev`, and the agent.
    fn default_spec() -> Spec {
        crate::model::spec::load(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../images/devos-debian.toml"
        )))
        .unwrap()
    }

    #[test]
    fn host_keys_are_taken_out_of_the_image_and_made_on_first_boot() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        for dir in ["etc/ssh", "usr/sbin", "etc/systemd/system"] {
            fs::create_dir_all(r.join(dir)).unwrap();
        }
        fs::write(r.join("usr/sbin/sshd"), "").unwrap();
        for key in ["ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"] {
            fs::write(r.join("etc/ssh").join(key), "baked").unwrap();
        }
        fs::write(r.join("etc/ssh/moduli"), "kept").unwrap();
        let spec = default_spec();
        set_up(&spec, r).unwrap();
        let left: Vec<_> = fs::read_dir(r.join("etc/ssh"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(!left.iter().any(|n| n.starts_with("ssh_host_")), "{left:?}");
        assert!(left.contains(&"moduli".to_owned()));
        let conf = fs::read_to_string(r.join("etc/ssh/sshd_config.d/00-devos.conf")).unwrap();
        assert!(conf.contains("HostKey /var/lib/devos/ssh/ssh_host_ed25519_key"));
        assert!(
            fs::read_to_string(r.join("etc/devos/ec2-keys.env"))
                .unwrap()
                .contains("DEVOS_EC2_USER=dev\n")
        );
        assert!(
            r.join("etc/systemd/system/multi-user.target.wants/ssh.service")
                .symlink_metadata()
                .is_ok()
        );
    }

    #[test]
    fn without_sshd_only_the_console_is_set_up() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        fs::create_dir_all(r.join("etc/systemd/system")).unwrap();
        let spec = default_spec();
        set_up(&spec, r).unwrap();
        assert!(r.join("usr/libexec/devos/console-getty").exists());
        assert!(!r.join("etc/ssh").exists());
        assert!(!r.join("etc/devos/ec2-keys.env").exists());
    }
}
