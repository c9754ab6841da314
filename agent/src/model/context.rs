//! What the model is told about where the user works, gathered by the planning
//! helper as the caller (so nothing comes from a file they could not read) and kept
//! compact: the project's kind, its git branch, the files changed since they were
//! last staged, the newest files — and, when the model asks, the caller's processes.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde_json::{Value, json};

use super::tools::ContextQuery;

/// Files looked at for recent changes before giving up (a huge tree answers with
/// what it found).
const SCAN_LIMIT: usize = 5000;
/// Directories never walked: build output, dependencies, version control.
const SKIP: &[&str] = &[
    ".git",
    "target",
    "node_modules",
    ".venv",
    "venv",
    "__pycache__",
    "build",
    "dist",
];

/// Answer a context question for `cwd` with this process's credentials.
pub fn answer(query: ContextQuery, cwd: &Path, uid: u32) -> Value {
    match query {
        ContextQuery::Project => project(cwd),
        ContextQuery::Processes => processes(uid),
    }
}

/// The project facts of `cwd`.
pub fn project(cwd: &Path) -> Value {
    let repo = crate::gitrepo::discover(cwd);
    let root = repo.as_ref().map_or(cwd, |r| r.work_tree.as_path());
    let index_time = repo
        .as_ref()
        .and_then(|r| r.git_dir.join("index").metadata().ok()?.modified().ok());
    let files = newest_files(root);
    let changed: Vec<String> = match index_time {
        Some(t) => files
            .iter()
            .filter(|(m, _)| *m > t)
            .map(|(_, p)| rel(p, root))
            .take(20)
            .collect(),
        None => Vec::new(),
    };
    json!({
        "cwd": cwd,
        "project-root": root,
        "kind": kinds(root),
        "git-branch": repo.as_ref().and_then(|r| branch(&r.git_dir)),
        "changed-since-staged": changed,
        "recent-files": files.iter().take(10).map(|(_, p)| rel(p, root)).collect::<Vec<_>>(),
    })
}

fn rel(p: &Path, root: &Path) -> String {
    p.strip_prefix(root)
        .unwrap_or(p)
        .to_string_lossy()
        .into_owned()
}

/// The kinds of project `root` holds, from its marker files.
fn kinds(root: &Path) -> Vec<&'static str> {
    [
        ("Cargo.toml", "rust"),
        ("package.json", "node"),
        ("pyproject.toml", "python"),
        ("setup.py", "python"),
        ("go.mod", "go"),
        ("pom.xml", "java-maven"),
        ("build.gradle", "java-gradle"),
        ("Gemfile", "ruby"),
        ("CMakeLists.txt", "cmake"),
        ("Makefile", "make"),
        ("Dockerfile", "container"),
        ("flake.nix", "nix"),
    ]
    .into_iter()
    .filter(|(marker, _)| root.join(marker).is_file())
    .map(|(_, kind)| kind)
    .collect()
}

/// The branch HEAD points at, or `detached at <commit>`.
fn branch(git_dir: &Path) -> Option<String> {
    let head = std::fs::read_to_string(git_dir.join("HEAD")).ok()?;
    let head = head.trim();
    Some(match head.strip_prefix("ref: refs/heads/") {
        Some(name) => name.to_owned(),
        None => format!("detached at {}", head.get(..12).unwrap_or(head)),
    })
}

/// Regular files under `root` (a few levels deep, skipping build output), newest
/// first.
fn newest_files(root: &Path) -> Vec<(SystemTime, PathBuf)> {
    let mut found = Vec::new();
    let mut dirs = vec![(root.to_path_buf(), 0)];
    while let Some((dir, depth)) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if found.len() >= SCAN_LIMIT {
                break;
            }
            let Ok(meta) = entry.metadata() else { continue };
            let name = entry.file_name();
            if meta.is_dir() {
                let name = name.to_string_lossy();
                if depth < 4 && !SKIP.contains(&name.as_ref()) && !name.starts_with('.') {
                    dirs.push((entry.path(), depth + 1));
                }
            } else if meta.is_file()
                && let Ok(m) = meta.modified()
            {
                found.push((m, entry.path()));
            }
        }
    }
    found.sort_by_key(|(modified, _)| std::cmp::Reverse(*modified));
    found
}

/// Processes of `uid` (every process for root), busiest first, at most 30 (CPU
/// averaged over each one's life: the planning helper does not wait to sample).
pub fn processes(uid: u32) -> Value {
    let mut list = crate::context::procs::list(uid, &[], None);
    list.truncate(30);
    json!({ "processes": list })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_facts_name_kind_branch_and_changes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join(".git/refs/heads")).unwrap();
        std::fs::write(root.join(".git/HEAD"), "ref: refs/heads/login-fix\n").unwrap();
        std::fs::write(root.join(".git/index"), "").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(root.join("Cargo.toml"), "[package]\n").unwrap();
        std::fs::create_dir_all(root.join("target/debug")).unwrap();
        std::fs::write(root.join("target/debug/big"), "x").unwrap();
        let facts = project(root);
        assert_eq!(facts["kind"], json!(["rust"]));
        assert_eq!(facts["git-branch"], "login-fix");
        assert_eq!(facts["changed-since-staged"], json!(["Cargo.toml"]));
        assert_eq!(facts["recent-files"], json!(["Cargo.toml"]));
    }

    #[test]
    fn this_process_is_among_its_users_processes() {
        let me = nix::unistd::getuid().as_raw();
        let v = processes(me);
        let list = v["processes"].as_array().unwrap();
        assert!(!list.is_empty());
        assert!(list.iter().all(|p| me == 0 || p["uid"] == me));
        assert!(list[0]["cpu-percent"].is_number());
    }
}
