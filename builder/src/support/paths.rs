//! Whose home a command works for. Builds run as root (loop devices, mounts,
//! chroots); run through sudo, the files a user looks for afterwards (their SSH keys,
//! their registry) are in the home of the user who ran sudo, not in root's.

use std::path::PathBuf;

/// The home of the user who ran this command: under sudo (as root, with
/// `SUDO_USER` naming another user), that user's home from the password database;
/// otherwise `$HOME`.
pub(crate) fn invoking_home() -> Option<PathBuf> {
    // Asked of the name service once per process: the registry and cache paths and
    // every hand-over need it.
    static SUDO_HOME: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    match sudo_user() {
        Some(user) => SUDO_HOME
            .get_or_init(|| passwd_entry(&user).and_then(|line| home_of(&user, &line)))
            .clone(),
        None => std::env::var_os("HOME").map(PathBuf::from),
    }
}

/// `user`'s passwd(5) line from the name service (files, LDAP, SSSD: `getent`).
fn passwd_entry(user: &str) -> Option<String> {
    let out = std::process::Command::new("getent")
        .args(["passwd", "--", user])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The user who ran sudo, when this process is root because of it.
pub(crate) fn sudo_user() -> Option<String> {
    if !is_root() {
        return None;
    }
    std::env::var("SUDO_USER")
        .ok()
        .filter(|u| !u.is_empty() && u != "root")
}

/// The uid and primary gid of the user who ran sudo (`SUDO_UID`, `SUDO_GID`), when
/// this process is root because of it.
pub(crate) fn sudo_ids() -> Option<(u32, u32)> {
    sudo_user()?;
    let id = |var: &str| std::env::var(var).ok()?.parse::<u32>().ok();
    Some((id("SUDO_UID")?, id("SUDO_GID")?))
}

/// This process's effective uid (/proc/self belongs to it).
fn effective_uid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

/// The uid of the user a command works for: under sudo, the user who ran it; else
/// this process's own.
pub(crate) fn acting_uid() -> Option<u32> {
    sudo_ids().map(|(uid, _)| uid).or_else(effective_uid)
}

/// Whether this process runs as root (builds need it: mmdebstrap, chroots, the
/// image's file ownership).
pub(crate) fn is_root() -> bool {
    effective_uid() == Some(0)
}

/// Whether `uid` is one of the users a command works for: root, this process's user,
/// or the user who ran sudo.
pub(crate) fn is_own_uid(uid: u32) -> bool {
    uid == 0 || Some(uid) == effective_uid() || sudo_ids().is_some_and(|(u, _)| u == uid)
}

/// An XDG base directory of the invoking user: `$VAR` (not under sudo, where it
/// would be root's or sudo's environment), else `~/FALLBACK` of the invoking user,
/// else `system` (no home at all).
pub(crate) fn xdg_dir(var: &str, fallback: &str, system: &str) -> PathBuf {
    if sudo_user().is_none()
        && let Some(d) = std::env::var_os(var).filter(|d| !d.is_empty())
    {
        return PathBuf::from(d);
    }
    invoking_home().map_or_else(|| PathBuf::from(system), |h| h.join(fallback))
}

/// Give `path` to the user who ran sudo (their uid and primary gid), when this is
/// root under sudo: the registry and the cache's directory live in that user's home
/// and must stay theirs. Elsewhere, nothing changes. Never follows a symlink.
pub(crate) fn hand_over(path: &std::path::Path) -> std::io::Result<()> {
    let Some((uid, gid)) = sudo_ids() else {
        return Ok(());
    };
    // Only what lies in the invoking user's home: a registry or cache named
    // elsewhere (`--registry /srv/...`) keeps its owner. Where it lies, not how it is
    // named: a link in the home to a directory elsewhere does not bring that in.
    let (Some(home), Some(parent), Some(name)) = (invoking_home(), path.parent(), path.file_name())
    else {
        return Ok(());
    };
    let parent = if parent.as_os_str().is_empty() {
        std::path::Path::new(".")
    } else {
        parent
    };
    match (parent.canonicalize(), home.canonicalize()) {
        (Ok(parent), Ok(home))
            if parent.join(name).starts_with(&home) && path.symlink_metadata().is_ok() =>
        {
            std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        }
        _ => Ok(()),
    }
}

/// Create `dir` and its missing parents; under sudo, the ones it makes are given to
/// the invoking user ([`hand_over`]).
pub(crate) fn create_user_dirs(dir: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let missing: Vec<PathBuf> = dir
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
        .map(std::path::Path::to_path_buf)
        .collect();
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for d in missing.iter().rev() {
        hand_over(d).with_context(|| format!("cannot give {} to the sudo user", d.display()))?;
    }
    Ok(())
}

/// Write `content` to `dest` whole or not at all, with `mode` whatever the umask:
/// into a temporary file of its own beside it (never through a link, never another
/// writer's file), synced, then renamed over `dest` (a link there is replaced, not
/// followed); under sudo, given to the invoking user ([`hand_over`]).
pub(crate) fn replace_file(
    dest: &std::path::Path,
    content: &mut dyn std::io::Read,
    mode: u32,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use std::os::unix::fs::PermissionsExt;
    let dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let name = dest.file_name().unwrap_or_default().to_string_lossy();
    let mut write = || -> std::io::Result<()> {
        let mut out = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".tmp")
            .tempfile_in(dir)?;
        std::io::copy(content, out.as_file_mut())?;
        out.as_file()
            .set_permissions(std::fs::Permissions::from_mode(mode))?;
        // On disk before its name is: a crash leaves the old file or the whole new one.
        out.as_file().sync_all()?;
        out.persist(dest).map_err(|e| e.error)?;
        Ok(())
    };
    write().with_context(|| format!("cannot write {}", dest.display()))?;
    hand_over(dest).with_context(|| format!("cannot give {} to the sudo user", dest.display()))
}

/// `user`'s home in a passwd(5) file.
fn home_of(user: &str, passwd: &str) -> Option<PathBuf> {
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 7 && f[0] == user)
        .map(|f| PathBuf::from(f[5]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn home_comes_from_the_users_own_line() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000:Alice:/home/alice:/bin/bash\nmalice:x:1001:1001::/home/m:/bin/sh\n";
        assert_eq!(home_of("alice", passwd), Some(PathBuf::from("/home/alice")));
        assert_eq!(home_of("ali", passwd), None);
        assert_eq!(home_of("bob", passwd), None);
    }
}
