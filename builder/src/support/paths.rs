//! Whose home a command works for. Builds run as root (loop devices, mounts,
//! chroots); run through sudo, the files a user looks for afterwards (their SSH keys,
//! their registry) are in the home of the user who ran sudo, not in root's.

use std::path::PathBuf;

/// The home of the user who ran this command: under sudo (as root, with
/// `SUDO_USER` naming another user), that user's home from the password database;
/// otherwise `$HOME`.
pub(crate) fn invoking_home() -> Option<PathBuf> {
    if let Some(user) = sudo_user() {
        return home_of(&user, &std::fs::read_to_string("/etc/passwd").ok()?);
    }
    std::env::var_os("HOME").map(PathBuf::from)
}

/// The user who ran sudo, when this process is root because of it.
pub(crate) fn sudo_user() -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the process's effective user.
    if std::fs::metadata("/proc/self").map_or(true, |m| m.uid() != 0) {
        return None;
    }
    std::env::var("SUDO_USER")
        .ok()
        .filter(|u| !u.is_empty() && u != "root")
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
