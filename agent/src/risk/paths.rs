//! Paths as the kernel will see them: lexical normalisation, symlinks resolved as far
//! as a path exists, and the secret locations a path falls in.

use std::path::{Component, Path, PathBuf};

/// Lexically normalise an absolute path: drop `.` and repeated slashes, apply `..`.
pub fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// A path through `/proc/PID/root`, `/proc/PID/cwd` (or `self`, `thread-self`) leads
/// to another process's view of the file system — in a sandbox, the sandbox's own
/// root. Returns where such a path leads (`/...` or `cwd/...`), or the path itself for
/// other process entries (`fd/`, `map_files/`, `exe`), and `None` for any other path.
pub fn through_proc(path: &Path, cwd: &Path) -> Option<PathBuf> {
    let rel = path.strip_prefix("/proc").ok()?;
    let mut parts = rel.components();
    let pid = parts.next()?.as_os_str().to_string_lossy().into_owned();
    if !(pid == "self" || pid == "thread-self" || pid.bytes().all(|b| b.is_ascii_digit())) {
        return None;
    }
    let kind = parts.next()?.as_os_str().to_string_lossy().into_owned();
    let rest: PathBuf = parts.collect();
    Some(match kind.as_str() {
        "root" => normalize(&Path::new("/").join(rest)),
        "cwd" => normalize(&cwd.join(rest)),
        _ => path.to_path_buf(),
    })
}

/// Resolve symlinks in the longest existing prefix of `path`, keep the rest as is.
pub fn resolve_existing(path: &Path) -> PathBuf {
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = std::fs::canonicalize(&existing) {
            return normalize(&rest.iter().rev().fold(real, |p: PathBuf, n| p.join(n)));
        }
        match (
            existing.file_name().map(|n| n.to_owned()),
            existing.parent(),
        ) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent.to_path_buf();
            }
            _ => return path.to_path_buf(),
        }
    }
}

/// Expand the policy's secret locations for a user: `~/x` under their home,
/// absolute paths as they are. Each is returned with the place it resolves to when
/// it is a symlink, so both spellings are caught.
pub fn expand_secrets(patterns: &[String], home: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for p in patterns {
        let path = match p.strip_prefix("~/") {
            Some(rest) => home.join(rest),
            None if p == "~" => continue,
            None => PathBuf::from(p),
        };
        if !path.is_absolute() {
            continue;
        }
        let path = normalize(&path);
        let real = resolve_existing(&path);
        for candidate in [path, real] {
            if !out.contains(&candidate) {
                out.push(candidate);
            }
        }
    }
    out
}

/// The secret location (from `secrets`) that one of `paths` lies in, if any.
pub fn secret_of(paths: &[&Path], secrets: &[PathBuf]) -> Option<PathBuf> {
    secrets
        .iter()
        .find(|s| paths.iter().any(|p| p.starts_with(s)))
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_removes_dots_and_slashes() {
        for (input, want) in [
            ("//", "/"),
            ("/.", "/"),
            ("/a/./b//c/", "/a/b/c"),
            ("/a/../../b", "/b"),
            ("/usr/../proc/self/cwd/ls", "/proc/self/cwd/ls"),
        ] {
            assert_eq!(normalize(Path::new(input)), Path::new(want), "{input}");
        }
    }

    #[test]
    fn paths_through_proc_lead_where_the_sandbox_would_go() {
        let cwd = Path::new("/home/dev/p");
        assert_eq!(
            through_proc(Path::new("/proc/2/root/boot/x"), cwd),
            Some("/boot/x".into())
        );
        assert_eq!(
            through_proc(Path::new("/proc/self/root"), cwd),
            Some("/".into())
        );
        assert_eq!(
            through_proc(Path::new("/proc/self/cwd/../q"), cwd),
            Some("/home/dev/q".into())
        );
        assert_eq!(
            through_proc(Path::new("/proc/1/fd/3"), cwd),
            Some("/proc/1/fd/3".into())
        );
        assert_eq!(through_proc(Path::new("/proc/cpuinfo"), cwd), None);
        assert_eq!(through_proc(Path::new("/usr/bin"), cwd), None);
    }

    #[test]
    fn symlinks_are_resolved_in_the_existing_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let real = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir(real.join("target")).unwrap();
        std::os::unix::fs::symlink(real.join("target"), real.join("link")).unwrap();
        assert_eq!(
            resolve_existing(&real.join("link/new/file")),
            real.join("target/new/file")
        );
    }

    #[test]
    fn secrets_expand_and_match_both_spellings() {
        let dir = tempfile::tempdir().unwrap();
        let home = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir(home.join("keys")).unwrap();
        std::os::unix::fs::symlink(home.join("keys"), home.join(".ssh")).unwrap();
        let secrets = expand_secrets(&["~/.ssh".into(), "/etc/shadow".into()], &home);
        assert!(secrets.contains(&home.join(".ssh")));
        assert!(secrets.contains(&home.join("keys")));
        assert_eq!(
            secret_of(&[&home.join("keys/id_rsa")], &secrets),
            Some(home.join("keys"))
        );
        assert_eq!(secret_of(&[&home.join("notes")], &secrets), None);
    }
}
