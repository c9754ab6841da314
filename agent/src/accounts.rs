//! What counts as a user name and as an SSH public key: one rule for the builder (a
//! spec's `[[users]]`, `image boot --ssh-key`) and the agent (the EC2 key pair's keys
//! handed to the image's default user).

/// A login name useradd accepts on Debian without `--badname`: lower-case letters,
/// digits, `_` and `-`, starting with a letter or `_`, at most 32 characters.
pub fn is_user_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-".contains(c))
}

/// One OpenSSH public key line (`TYPE BASE64 [COMMENT]`), without options such as
/// `command="..."` in front: an authorized_keys line that grants a login and nothing
/// else.
pub fn is_ssh_public_key(s: &str) -> bool {
    let mut parts = s.split_whitespace();
    let kind = parts.next().unwrap_or("");
    let body = parts.next().unwrap_or("");
    (kind.starts_with("ssh-") || kind.starts_with("ecdsa-") || kind.starts_with("sk-"))
        && body.len() > 16
        && !s.contains(['\n', '\r'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_keys() {
        for good in ["dev", "_svc", "a-b_1"] {
            assert!(is_user_name(good), "{good}");
        }
        for bad in ["", "Dev", "1dev", "../etc", "a b", &"a".repeat(33)] {
            assert!(!is_user_name(bad), "{bad}");
        }
        assert!(is_ssh_public_key(
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDevOsTestKey my-key"
        ));
        assert!(!is_ssh_public_key("command=\"rm -rf /\" ssh-ed25519 AAAA"));
        assert!(!is_ssh_public_key("ssh-ed25519"));
        assert!(!is_ssh_public_key(
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDevOsTestKey\nssh-rsa AAAAB3NzaC1yc2EAAAADAQAB"
        ));
    }
}
