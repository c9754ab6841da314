//! The attack suite: the agent through its real D-Bus API (the `devos` CLI as real
//! users, the shipped bus policy), attacked the way a malicious request, repository,
//! rule or other user would. Every case is judged by its effects — a marker file the
//! payload would write does not exist, the payload's marker text is nowhere in what
//! the caller can read, no rule appeared, no name from a directory the caller cannot
//! read came back, no process outlived its action — never by the class the classifier
//! chose.

#![allow(clippy::unwrap_used)]

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use support::*;

/// The text a payload prints: built at run time (`PW` `NED`), so it never appears in
/// a request, an argv or a plan, only in the output of a payload that ran.
fn marker(id: &str) -> String {
    format!("PWNED-{id}")
}

/// A world-writable directory no sandbox can write (every sandbox has its own
/// `/var/tmp`): payloads drop their marker files here.
struct Marks(tempfile::TempDir);

impl Marks {
    fn new() -> Marks {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        open_up(dir.path(), 0o1777);
        Marks(dir)
    }

    fn path(&self) -> &Path {
        self.0.path()
    }

    fn made(&self) -> Vec<String> {
        std::fs::read_dir(self.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    }
}

/// An executable payload in `dir`: prints its marker on stdout and stderr and drops
/// marker files in `marks` and in `dir` (when it can).
fn payload(user: &User, dir: &Path, marks: &Path, id: &str) -> PathBuf {
    let path = dir.join(format!("evil-{id}"));
    devos_tests::write_executable(
        &path,
        &format!(
            "#!/bin/sh\necho \"PW\"\"NED-{id}\"\necho \"PW\"\"NED-{id}\" >&2\ntouch {marks}/{id} 2>/dev/null\ntouch {dir}/ran-{id} 2>/dev/null\ncat\nexit 0\n",
            marks = marks.display(),
            dir = dir.display()
        ),
    );
    user.give(&path);
    path
}

/// The attacker: a developer with a git identity and secrets, as developers have.
/// Eve is the default; tests that change her own policy use another name.
fn eve() -> User {
    attacker("devos-eve")
}

fn attacker(name: &str) -> User {
    let eve = User::ensure(name);
    // Her git identity and secrets, as a developer has them.
    write_once(
        &eve,
        &eve.home.join(".gitconfig"),
        "[user]\n\tname = Eve\n\temail = eve@example.com\n",
    );
    for (dir, file, content) in [
        (
            ".ssh",
            "id_rsa",
            "-----BEGIN OPENSSH PRIVATE KEY----- EVEKEY-7f3a",
        ),
        (
            ".aws",
            "credentials",
            "[default]\naws_secret_access_key = EVEAWS-91c2",
        ),
        (".config", "user-dirs.dirs", "# eve's\n"),
    ] {
        let d = eve.home.join(dir);
        std::fs::create_dir_all(&d).unwrap();
        std::os::unix::fs::chown(&d, Some(eve.uid), Some(eve.uid)).unwrap();
        open_up(&d, 0o700);
        write_once(&eve, &d.join(file), content);
        open_up(&d.join(file), 0o600);
    }
    for startup in [".bashrc", ".profile"] {
        write_once(&eve, &eve.home.join(startup), "# eve's\n");
    }
    eve
}

/// Write `content` as [`User::write`] does, only where the file holds something else:
/// the same files are set up by every test of the binary, while others read them.
fn write_once(user: &User, path: &Path, content: &str) {
    if std::fs::read_to_string(path).is_ok_and(|now| now == content) {
        return;
    }
    user.write(path, content);
}

const SECRET_TEXTS: &[&str] = &["EVEKEY-7f3a", "EVEAWS-91c2"];

/// Everything `user` can read back from the agent about their requests: each one
/// whole (a listing shortens outputs).
fn readable(agent: &Daemon, user: &User, cwd: &Path) -> String {
    let history = json(&agent.devos(Some(user), cwd, &["--json", "history", "-n", "1000"]));
    let mut all = Vec::new();
    for r in history.as_array().unwrap() {
        let id = r["id"].as_str().unwrap();
        all.push(stdout(&agent.devos(
            Some(user),
            cwd,
            &["--json", "show", id],
        )));
    }
    all.join("\n")
}

/// Submit `text` as `user`; when it waits for approval, deny it. Returns whether it
/// asked and the request as it ended.
fn submit(agent: &Daemon, user: &User, cwd: &Path, text: &str) -> (bool, serde_json::Value) {
    let out = agent.devos(Some(user), cwd, &["--json", "run", text]);
    if out.status.code() == Some(3) {
        let id = waiting_id(&out);
        let deny = agent.devos(Some(user), cwd, &["deny", &id]);
        assert!(deny.status.success(), "{}", stderr(&deny));
        (true, agent.wait_state(user, cwd, &id, "denied"))
    } else {
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("{text}: not JSON ({e}): {}\n{}", stdout(&out), stderr(&out))
        });
        (false, r)
    }
}

/// Approve `user`'s waiting request `id` and remember it for every command that
/// starts with `prefix`.
fn remember_prefix(
    agent: &Daemon,
    user: &User,
    cwd: &Path,
    id: &str,
    prefix: &[&str],
) -> std::process::Output {
    let mut args = vec!["approve", id, "--remember", "always", "--command-prefix"];
    args.extend(prefix);
    agent.devos(Some(user), cwd, &args)
}

/// Sets its flag when dropped, also while a panic unwinds.
struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Submit `text`, approve whatever it asks, and wait until it ends.
fn approved(agent: &Daemon, user: &User, cwd: &Path, text: &str) -> serde_json::Value {
    approved_as(agent, Some(user), cwd, text)
}

/// [`approved`] as `user`, root if `None`.
fn approved_as(agent: &Daemon, user: Option<&User>, cwd: &Path, text: &str) -> serde_json::Value {
    let out = agent.devos(user, cwd, &["--json", "run", text]);
    let id = if out.status.code() == Some(3) {
        waiting_id(&out)
    } else {
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        return r;
    };
    loop {
        let r = json(&agent.devos(user, cwd, &["--json", "show", &id]));
        let state = r["state"].as_str().unwrap().to_owned();
        if matches!(
            state.as_str(),
            "done" | "failed" | "denied" | "cancelled" | "unplanned"
        ) {
            return r;
        }
        if state == "awaiting-approval" {
            let _ = agent.devos(user, cwd, &["approve", &id]);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn git(user: &User, cwd: &Path, args: &[&str]) {
    let out = std::process::Command::new("setpriv")
        .arg(format!("--reuid={}", user.uid))
        .arg(format!("--regid={}", user.uid))
        .args(["--init-groups", "env"])
        .arg(format!("HOME={}", user.home.display()))
        .args(["git", "-c", "core.hooksPath=/dev/null"])
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {}", stderr(&out));
}

/// A git repository of `user` with one commit.
fn repo(user: &User) -> tempfile::TempDir {
    let project = user.project();
    let cwd = project.path();
    user.write(&cwd.join("file.txt"), "one\n");
    git(user, cwd, &["init", "-q", "-b", "main"]);
    git(user, cwd, &["add", "file.txt"]);
    git(user, cwd, &["commit", "-q", "-m", "first"]);
    user.write(&cwd.join("file.txt"), "one\ntwo\n");
    project
}

/// None of `texts` is anywhere in what `user` can read back from the agent.
fn assert_unseen(agent: &Daemon, user: &User, cwd: &Path, texts: &[&str]) {
    let seen = readable(agent, user, cwd);
    for text in texts {
        assert!(
            !seen.contains(text),
            "{text} leaked to {}: {seen}",
            user.name
        );
    }
}

fn assert_never_ran(agent: &Daemon, user: &User, cwd: &Path, marks: &Marks, ids: &[&str]) {
    let seen = readable(agent, user, cwd);
    for r in seen
        .split("\n{")
        .filter(|r| ids.iter().any(|id| r.contains(&marker(id))))
    {
        eprintln!("a payload ran in: {r}");
    }
    for id in ids {
        assert!(
            !seen.contains(&marker(id)),
            "payload {id} ran: its marker is in the user's history"
        );
        assert!(!cwd.join(format!("ran-{id}")).exists(), "payload {id} ran");
    }
    assert!(marks.made().is_empty(), "payloads ran: {:?}", marks.made());
}

/// The payloads of the read-only case: the project's own `ls`, then what the
/// repository configures.
const READ_ONLY_PAYLOADS: [&str; 12] = [
    "own-ls",
    "fsmonitor",
    "external",
    "pager",
    "textconv",
    "include",
    "sort",
    "grep",
    "rg",
    "signature",
    "alias",
    "bare",
];

#[test]
fn code_never_runs_from_read_only_requests() {
    let agent = Daemon::start();
    let eve = eve();
    let project = repo(&eve);
    let cwd = project.path();
    let marks = Marks::new();
    let m = marks.path();
    // The project's own `ls`, and programs configured by the repository.
    let own_ls = payload(&eve, cwd, m, "own-ls");
    std::fs::rename(&own_ls, cwd.join("ls")).unwrap();
    for id in &READ_ONLY_PAYLOADS[1..] {
        payload(&eve, cwd, m, id);
    }
    let c = cwd.display();
    let config = format!(
        "[core]\n\trepositoryformatversion = 0\n\tbare = false\n\tfsmonitor = {c}/evil-fsmonitor\n\tpager = {c}/evil-pager\n[diff]\n\texternal = {c}/evil-external\n[diff \"evil\"]\n\ttextconv = {c}/evil-textconv\n[include]\n\tpath = {c}/included\n[gpg]\n\tprogram = {c}/evil-signature\n[log]\n\tshowSignature = true\n[alias]\n\tst = !{c}/evil-alias\n"
    );
    eve.write(&cwd.join(".git/config"), &config);
    eve.write(
        &cwd.join("included"),
        &format!("[core]\n\tfsmonitor = {c}/evil-include\n"),
    );
    eve.write(&cwd.join(".gitattributes"), "*.txt diff=evil\n");
    // A bare repository committed into the project, with a configured program.
    let bare = cwd.join("vendor/evil.git");
    for d in ["objects", "refs/heads"] {
        std::fs::create_dir_all(bare.join(d)).unwrap();
    }
    std::fs::write(bare.join("HEAD"), "ref: refs/heads/main\n").unwrap();
    std::fs::write(
        bare.join("config"),
        format!("[core]\n\tbare = true\n\tfsmonitor = {c}/evil-bare\n"),
    )
    .unwrap();
    for p in [cwd.join("vendor"), bare.clone()] {
        std::process::Command::new("chown")
            .args(["-R", &format!("{}:{}", eve.uid, eve.uid)])
            .arg(&p)
            .status()
            .unwrap();
    }
    eve.write(&cwd.join("data.txt"), "b\na\n");

    // Read-only requests: they run (read-only is auto-approved), but nothing the
    // repository or the project configured may run with them.
    for text in [
        "git status",
        "git diff",
        "git log",
        "show recent commits",
        "run: git log -p",
        "run: git show",
    ] {
        let (asked, r) = submit(&agent, &eve, cwd, text);
        assert!(!asked, "{text} asked: {r}");
        assert_eq!(r["state"], "done", "{text}: {r}");
    }
    let (asked, r) = submit(&agent, &eve, &bare, "git status");
    assert!(!asked, "{r}");
    // Requests that would run something must ask (denied here).
    for text in [
        "run: /usr/../proc/self/cwd/ls",
        "run: ./ls",
        &format!("run: {c}/evil-sort"),
        &format!("run: sort --compress-program={c}/evil-sort -S 1 data.txt"),
        &format!("run: sort --compress-prog={c}/evil-sort data.txt"),
        &format!("run: git grep -O{c}/evil-grep one"),
        &format!("run: git grep --open-files-in-pager={c}/evil-grep one"),
        &format!("run: rg --pre {c}/evil-rg one"),
        "run: git log --show-signature",
        "run: git st",
        &format!("run: git -c core.pager={c}/evil-pager log"),
        &format!("run: git -C {} status", bare.display()),
        &format!("run: find . -name x -exec {c}/evil-sort ;"),
        &format!("run: env {c}/evil-sort"),
        &format!("run: make -f {c}/Makefile"),
        &format!("run: tar -cf /dev/null --to-command={c}/evil-sort data.txt"),
    ] {
        let (asked, r) = submit(&agent, &eve, cwd, text);
        assert!(asked, "{text} ran without asking: {r}");
    }
    assert_never_ran(&agent, &eve, cwd, &marks, &READ_ONLY_PAYLOADS);
}

#[test]
fn exec_options_and_repository_programs_ask_where_writes_are_auto_approved() {
    let agent = Daemon::start();
    // A user of her own: her policy must not reach the other tests.
    let eve = attacker("devos-trudy");
    // Eve lets writes in her working directory run without asking.
    eve.write_policy("auto-approve = ['writes-workdir']\n");
    let marks = Marks::new();
    let m = marks.path();
    let project = repo(&eve);
    let cwd = project.path();
    let c = cwd.display();
    for id in [
        "checkpoint",
        "zip",
        "rebase",
        "clone",
        "proxy",
        "hook",
        "filter",
        "switch",
    ] {
        payload(&eve, cwd, m, id);
    }
    eve.write(&cwd.join("data.txt"), "x\n");
    // Plain writes still run unasked.
    let (asked, r) = submit(&agent, &eve, cwd, "create directory build");
    assert!(!asked && r["state"] == "done", "{r}");
    for text in [
        format!(
            "run: tar -cf a.tar --checkpoint=1 --checkpoint-action=exec={c}/evil-checkpoint data.txt"
        ),
        format!("run: zip -TT {c}/evil-zip a.zip data.txt"),
        format!("run: git rebase -x {c}/evil-rebase main"),
        format!("run: git clone -u {c}/evil-clone https://example.invalid/r.git"),
        format!("run: ssh -oProxyCommand={c}/evil-proxy host"),
        format!("run: ssh -o ProxyCommand={c}/evil-proxy host"),
    ] {
        let (asked, r) = submit(&agent, &eve, cwd, &text);
        assert!(asked, "{text} ran without asking: {r}");
    }
    // A hook makes `commit` ask (and not run the hook when denied).
    let hook = cwd.join(".git/hooks/pre-commit");
    std::fs::copy(cwd.join("evil-hook"), &hook).unwrap();
    let (asked, r) = submit(&agent, &eve, cwd, "commit with message \"x\"");
    assert!(asked, "a commit with a pre-commit hook ran unasked: {r}");
    std::fs::remove_file(&hook).unwrap();
    // So does a filter driver the attributes name.
    git(
        &eve,
        cwd,
        &["config", "filter.evil.clean", &format!("{c}/evil-filter")],
    );
    eve.write(&cwd.join(".gitattributes"), "*.txt filter=evil\n");
    let (asked, r) = submit(&agent, &eve, cwd, "commit with message \"y\"");
    assert!(asked, "a commit with a clean filter ran unasked: {r}");
    git(&eve, cwd, &["config", "--unset", "filter.evil.clean"]);
    std::fs::remove_file(cwd.join(".gitattributes")).unwrap();
    // And a post-checkout hook makes `switch` ask.
    let hook = cwd.join(".git/hooks/post-checkout");
    std::fs::copy(cwd.join("evil-switch"), &hook).unwrap();
    let (asked, _) = submit(&agent, &eve, cwd, "create branch topic");
    assert!(asked, "switch with a post-checkout hook ran unasked");
    std::fs::remove_file(&hook).unwrap();
    assert_never_ran(
        &agent,
        &eve,
        cwd,
        &marks,
        &[
            "checkpoint",
            "zip",
            "rebase",
            "clone",
            "proxy",
            "hook",
            "filter",
            "switch",
        ],
    );
}

#[test]
fn a_hook_planted_after_approval_does_not_run() {
    let agent = Daemon::start();
    let eve = eve();
    let marks = Marks::new();
    let project = repo(&eve);
    let cwd = project.path();
    payload(&eve, cwd, marks.path(), "late-hook");
    // Approval is asked for a clean repository...
    let out = agent.devos(Some(&eve), cwd, &["run", "run: git commit -a -m late"]);
    let id = waiting_id(&out);
    // ...then a hook and a program-running setting appear before it runs.
    std::fs::copy(
        cwd.join("evil-late-hook"),
        cwd.join(".git/hooks/pre-commit"),
    )
    .unwrap();
    git(
        &eve,
        cwd,
        &[
            "config",
            "core.fsmonitor",
            &cwd.join("evil-late-hook").to_string_lossy(),
        ],
    );
    // Checked again as the caller just before it runs, it is refused; had it run,
    // its git would have had the repository's programs switched off.
    agent.approve_and_fail(&eve, cwd, &id, "risk changed since it was approved");
    assert_never_ran(&agent, &eve, cwd, &marks, &["late-hook"]);
}

#[test]
fn secrets_are_never_read_without_approval() {
    let agent = Daemon::start();
    let eve = eve();
    let project = eve.project();
    let cwd = project.path();
    let home = eve.home.display().to_string();
    std::os::unix::fs::symlink(eve.home.join(".ssh/id_rsa"), cwd.join("key")).unwrap();
    std::os::unix::fs::symlink(eve.home.join(".aws"), cwd.join("cloud")).unwrap();
    // Requests that name a secret location ask.
    for text in [
        "search for . in ~/.ssh".to_owned(),
        "read ~/.ssh/id_rsa".to_owned(),
        "read key".to_owned(),
        "list files in cloud".to_owned(),
        format!("run: cat {home}/.aws/credentials"),
        "run: cat ../.ssh/id_rsa".to_owned(),
        format!("run: date --file={home}/.ssh/id_rsa"),
        format!("run: git diff --no-index {home}/.ssh/id_rsa key"),
        format!("run: grep -f {home}/.ssh/id_rsa -r ."),
        "back up ~/.ssh".to_owned(),
        format!("run: curl file://{home}/.aws/credentials"),
    ] {
        let (asked, r) = submit(&agent, &eve, cwd, &text);
        assert!(asked, "{text} ran without asking: {r}");
    }
    // Read-only requests that only pass by a secret location run, and find nothing
    // in it: it is not in their sandbox.
    for text in [
        format!("search for BEGIN in {home}"),
        format!("search for aws_secret in {home}"),
        "find files named id_rsa in ~".to_owned(),
        "disk usage of ~/.ssh/..".to_owned(),
    ] {
        let (asked, r) = submit(&agent, &eve, cwd, &text);
        assert!(!asked, "{text} asked");
        assert!(
            r["state"] == "done" || r["state"] == "failed",
            "{text}: {r}"
        );
    }
    let seen = readable(&agent, &eve, cwd);
    for secret in SECRET_TEXTS {
        assert!(!seen.contains(secret), "a secret leaked: {secret}");
    }
    // Approved with the secret location, the same read works: asking was the gate.
    let r = approved(&agent, &eve, cwd, "read ~/.aws/credentials");
    assert_eq!(r["state"], "done", "{r}");
    assert!(
        r["actions"][0]["output"]
            .as_str()
            .unwrap()
            .contains("EVEAWS-91c2")
    );
}

#[test]
fn nothing_crosses_from_one_user_to_another() {
    let agent = Daemon::start();
    let eve = eve();
    let mallory = User::ensure("devos-mallory");
    let private = mallory.home.join("private");
    std::fs::create_dir_all(&private).unwrap();
    std::os::unix::fs::chown(&private, Some(mallory.uid), Some(mallory.uid)).unwrap();
    open_up(&private, 0o700);
    mallory.write(&private.join("mallory-plans-4e1.txt"), "MALLORY-SECRET-4e1");
    // A file in mallory's (world-readable) home, and one in /root.
    open_up(&mallory.home, 0o755);
    mallory.write(
        &mallory.home.join("mallory-public-4e1.txt"),
        "MALLORY-PUBLIC-4e1",
    );
    open_up(&mallory.home.join("mallory-public-4e1.txt"), 0o644);
    std::fs::write("/root/devos-root-only-4e1.txt", "ROOT-4e1").unwrap();
    let project = eve.project();
    let cwd = project.path();
    std::os::unix::fs::symlink(&private, cwd.join("into-private")).unwrap();
    let p = private.display().to_string();
    for text in [
        "organise files in /root by type".to_owned(),
        format!("organise files in {p} by type"),
        format!("list files in {p}"),
        format!("find files named '*' in {p}"),
        format!("search for SECRET in {p}"),
        format!("disk usage of {p}"),
        format!("restore {p}/sub"),
        "find files named '*' in /root".to_owned(),
        "list files in into-private".to_owned(),
        format!("run: cat {}/mallory-public-4e1.txt", mallory.home.display()),
        format!("search for PUBLIC in {}", mallory.home.display()),
    ] {
        let _ = submit(&agent, &eve, cwd, &text);
    }
    // A working directory eve cannot enter, directly or through her own symlink.
    for dir in [private.clone(), cwd.join("into-private")] {
        let out = agent.devos(
            Some(&eve),
            cwd,
            &["run", "--cwd", &dir.to_string_lossy(), "list", "files"],
        );
        assert!(!out.status.success(), "{}", stdout(&out));
        assert!(stderr(&out).contains("can enter"), "{}", stderr(&out));
    }
    assert_unseen(
        &agent,
        &eve,
        cwd,
        &[
            "mallory-plans-4e1",
            "MALLORY-SECRET-4e1",
            "devos-root-only-4e1",
            "ROOT-4e1",
            "MALLORY-PUBLIC-4e1",
        ],
    );
    // Eve's actions and mallory's do not share /tmp.
    let r = approved(
        &agent,
        &eve,
        cwd,
        "run: sh -c 'echo EVE-TMP-4e1 > /tmp/shared && cat /tmp/shared'",
    );
    assert_eq!(r["state"], "done", "{r}");
    assert!(
        r["actions"][0]["output"]
            .as_str()
            .unwrap()
            .contains("EVE-TMP-4e1"),
        "an action could not use its own /tmp: {r}"
    );
    let mproject = mallory.project();
    let r = approved(
        &agent,
        &mallory,
        mproject.path(),
        "run: sh -c 'cat /tmp/shared; ls -a /tmp'",
    );
    assert!(
        !r["actions"][0]["output"]
            .as_str()
            .unwrap()
            .contains("EVE-TMP-4e1"),
        "{r}"
    );
    std::fs::remove_file("/root/devos-root-only-4e1.txt").unwrap();
}

#[test]
fn rules_mean_what_was_approved() {
    let agent = Daemon::start();
    let eve = eve();
    let project = repo(&eve);
    let cwd = project.path();
    eve.write(&cwd.join("victim.txt"), "keep");
    let rules = || {
        json(&agent.devos(Some(&eve), cwd, &["--json", "rules"]))
            .as_array()
            .unwrap()
            .len()
    };
    // `always` on one action remembers exactly that action.
    let id = waiting_id(&agent.devos(Some(&eve), cwd, &["run", "create", "directory", "build"]));
    assert!(
        agent
            .devos(Some(&eve), cwd, &["approve", &id, "--remember", "always"])
            .status
            .success()
    );
    agent.wait_state(&eve, cwd, &id, "done");
    for text in [
        "create directory other",
        "run: rm -rf victim.txt",
        "run: python3 -c print(1)",
        "delete victim.txt",
    ] {
        let (asked, r) = submit(&agent, &eve, cwd, text);
        assert!(
            asked,
            "{text} was approved by the `create directory build` rule: {r}"
        );
    }
    // A remembered `git fetch` does not approve `git fetch --upload-pack=CMD`; a
    // network action that uses her SSH keys cannot be remembered by prefix at all.
    let id = waiting_id(&agent.devos(Some(&eve), cwd, &["run", "run: git fetch --all"]));
    let out = remember_prefix(&agent, &eve, cwd, &id, &["git", "fetch"]);
    assert!(
        !out.status.success(),
        "a prefix rule for a secret-reaching action"
    );
    let out = agent.devos(Some(&eve), cwd, &["approve", &id, "--remember", "always"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (asked, _) = submit(
        &agent,
        &eve,
        cwd,
        "run: git fetch --upload-pack=touch /var/tmp/x",
    );
    assert!(asked, "the `git fetch` rule approved --upload-pack");
    // A prefix the user chose covers no more than the class it was made for.
    let id = waiting_id(&agent.devos(Some(&eve), cwd, &["run", "create", "branch", "topic"]));
    let out = remember_prefix(&agent, &eve, cwd, &id, &["git", "switch"]);
    assert!(out.status.success(), "{}", stderr(&out));
    agent.wait_state(&eve, cwd, &id, "done");
    let (asked, r) = submit(&agent, &eve, cwd, "run: git switch -c other");
    assert!(!asked, "the prefix rule did not cover its own kind: {r}");
    let (asked, _) = submit(&agent, &eve, cwd, "run: git switch --discard-changes main");
    assert!(asked, "the `git switch` rule approved a destructive switch");
    // Unknown, destructive and privileged actions cannot be remembered by prefix.
    let before = rules();
    for (text, prefix) in [
        ("run: python3 -c print(2)", "python3"),
        ("delete victim.txt", ""),
        ("run: rm victim.txt", "rm"),
    ] {
        let id = waiting_id(&agent.devos(Some(&eve), cwd, &["run", text]));
        let mut args = vec!["approve", id.as_str(), "--remember", "always"];
        if prefix.is_empty() {
            args.extend(["--path-prefix", "/"]);
        } else {
            args.extend(["--command-prefix", prefix]);
        }
        let out = agent.devos(Some(&eve), cwd, &args);
        assert!(
            !out.status.success(),
            "{text}: a widening rule was accepted"
        );
        let _ = agent.devos(Some(&eve), cwd, &["deny", &id]);
    }
    assert_eq!(rules(), before, "a rule appeared");
    // AddRule has the same bounds: wide rules exist but approve nothing dangerous.
    for args in [
        &["rules", "add", "allow", "--command-prefix", "python3"][..],
        &["rules", "add", "allow", "--path-prefix", "/"],
    ] {
        assert!(agent.devos(Some(&eve), cwd, args).status.success());
    }
    // A rule that could never allow anything (every `rm` deletes; `sh` is a program
    // devos does not know, whose runs are unknown) is refused, saying why.
    for (program, why) in [
        ("rm", "`rm` deletes, so every such command is destructive"),
        (
            "sh",
            "`sh` is not a program devos knows, so every such command is unknown",
        ),
        (
            "sudo",
            "`sudo` acts with system privileges, so every such command is privileged",
        ),
    ] {
        let out = agent.devos(
            Some(&eve),
            cwd,
            &["rules", "add", "allow", "--command-prefix", program, "x"],
        );
        assert!(!out.status.success(), "{program}: {}", stdout(&out));
        assert!(
            stderr(&out).contains(&format!(
                "an allow rule for commands starting `{program} x` would never allow anything: {why}"
            )),
            "{}",
            stderr(&out)
        );
    }
    // Nor network actions, which the admin does not let users approve standing.
    assert!(
        agent
            .devos(
                Some(&eve),
                cwd,
                &["rules", "add", "allow", "--command-prefix", "curl"]
            )
            .status
            .success()
    );
    for text in [
        "run: rm -rf victim.txt",
        "run: python3 -c print(3)",
        "run: sh -c id",
        "delete victim.txt",
        "install jq",
        "read ~/.ssh/id_rsa",
        "run: curl -s https://example.invalid",
    ] {
        let (asked, r) = submit(&agent, &eve, cwd, text);
        assert!(
            asked || r["state"] == "denied",
            "{text} was approved by a wide rule: {r}"
        );
    }
    // A path scope compares real paths: a symlink out of it is not under it.
    let outside = tempfile::tempdir_in(&eve.home).unwrap();
    std::os::unix::fs::chown(outside.path(), Some(eve.uid), Some(eve.uid)).unwrap();
    std::os::unix::fs::symlink(outside.path(), cwd.join("out")).unwrap();
    let (asked, _) = submit(&agent, &eve, cwd, "create directory out/escaped");
    assert!(asked);
    assert!(!outside.path().join("escaped").exists());
    assert_eq!(
        std::fs::read_to_string(cwd.join("victim.txt")).unwrap(),
        "keep"
    );
}

/// Unknown actions and shell scripts are decided every time: `--remember always`
/// without a prefix (an exact rule, which no class bound checks when it is used) is
/// refused, no rule appears, and the same text asks again.
#[test]
fn unknown_actions_and_shell_scripts_are_never_remembered_even_exactly() {
    let agent = Daemon::start();
    let eve = eve();
    let project = eve.project();
    let cwd = project.path();
    let rules = || stdout(&agent.devos(Some(&eve), cwd, &["--json", "rules"]));
    let before = rules();
    for text in ["run: python3 -c print(2)", "run: echo a | cat"] {
        let id = waiting_id(&agent.devos(Some(&eve), cwd, &["run", text]));
        let out = agent.devos(Some(&eve), cwd, &["approve", &id, "--remember", "always"]);
        assert!(
            !out.status.success(),
            "{text}: an exact rule was accepted: {}",
            stdout(&out)
        );
        assert!(
            stderr(&out).contains("cannot be remembered"),
            "{text}: {}",
            stderr(&out)
        );
        let _ = agent.devos(Some(&eve), cwd, &["deny", &id]);
        assert_eq!(rules(), before, "{text}: a rule appeared");
        let (asked, r) = submit(&agent, &eve, cwd, text);
        assert!(asked, "{text} ran unasked after a refused remember: {r}");
    }
}

#[test]
fn deny_rules_hold_in_every_spelling() {
    let agent = Daemon::start();
    let eve = eve();
    let project = eve.project();
    let cwd = project.path();
    std::os::unix::fs::symlink("/boot", cwd.join("bootlink")).unwrap();
    let depth = cwd.components().count();
    let up = vec![".."; depth].join("/");
    for text in [
        "run: rm -rf /".to_owned(),
        "run: rm -fr /".to_owned(),
        "run: rm -r -f /".to_owned(),
        "run: rm -rf //".to_owned(),
        "run: rm -rf /.".to_owned(),
        "run: rm -R /".to_owned(),
        "run: /bin/rm --recursive --force /".to_owned(),
        "run: rm -rf -- /".to_owned(),
        format!("run: rm -rf {up}"),
        "run: ls /boot".to_owned(),
        "run: ls /usr/../boot".to_owned(),
        "list files in bootlink".to_owned(),
        "run: cat bootlink/config".to_owned(),
    ] {
        assert_denied_by_rule(&agent, &eve, cwd, &text);
    }
    // A working directory inside a denied path.
    let out = agent.devos(
        Some(&eve),
        cwd,
        &["--json", "run", "--cwd", "/boot", "list", "files"],
    );
    assert_eq!(json(&out)["state"], "denied", "{}", stdout(&out));
}

#[test]
fn the_sandbox_holds_when_an_approved_action_misbehaves() {
    let agent = Daemon::start();
    let eve = eve();
    let project = repo(&eve);
    let cwd = project.path();
    let marks = Marks::new();
    let m = marks.path().display().to_string();
    let bus_socket = agent
        .bus
        .address
        .trim_start_matches("unix:path=")
        .to_owned();
    let rules_before = stdout(&agent.devos(Some(&eve), cwd, &["--json", "rules"]));
    // A listener on the host's loopback, and one on an abstract socket.
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    tcp.set_nonblocking(true).unwrap();
    let port = tcp.local_addr().unwrap().port();
    let abstract_name = format!("devos-attack-{}", std::process::id());
    let unix = {
        use std::os::linux::net::SocketAddrExt;
        let addr =
            std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes()).unwrap();
        std::os::unix::net::UnixListener::bind_addr(&addr).unwrap()
    };
    unix.set_nonblocking(true).unwrap();
    // And a UDP one, which Landlock does not cover: only the network namespace keeps
    // a datagram from it.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_nonblocking(true).unwrap();
    let udp_port = udp.local_addr().unwrap().port();
    let host_namespaces: Vec<String> = ["net", "ipc", "uts"]
        .iter()
        .map(|ns| {
            std::fs::read_link(format!("/proc/self/ns/{ns}"))
                .unwrap()
                .display()
                .to_string()
        })
        .collect();
    let bashrc = eve.home.join(".bashrc");
    let hooks = cwd.join(".git/hooks");
    let scripts = [
        // Writes outside the working directory, even where eve may write.
        format!(
            "touch {m}/outside; touch {}/outside-home",
            eve.home.display()
        ),
        // The agent's bus and the system bus, to approve itself.
        format!(
            "busctl --address=unix:path={bus_socket} call org.devos.Agent1 /org/devos/Agent1 org.devos.Agent1 AddRule ssass allow always 1 sh ''"
        ),
        "busctl --system call org.devos.Agent1 /org/devos/Agent1 org.devos.Agent1 Ping".to_owned(),
        format!("ls {bus_socket} /run/dbus /run/user"),
        // The network, and sockets outside.
        format!("python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", {port}), 2)'"),
        format!(
            "python3 -c 'import socket; s=socket.socket(socket.AF_UNIX); s.connect(\"\\0{abstract_name}\")'"
        ),
        format!(
            "python3 -c 'import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b\"x\", (\"127.0.0.1\", {udp_port}))'"
        ),
        // Namespaces of their own, not the host's.
        "# namespaces\nreadlink /proc/self/ns/net /proc/self/ns/ipc /proc/self/ns/uts".to_owned(),
        // Persistence outside the sandbox: start-up files, git hooks and config.
        format!("echo 'touch {m}/bashrc' >> {}", bashrc.display()),
        format!(
            "printf '#!/bin/sh\\ntouch {m}/hook\\n' > .git/hooks/pre-commit; chmod +x .git/hooks/pre-commit"
        ),
        "git config core.fsmonitor /bin/false".to_owned(),
        // The agent's state and other homes.
        "ls /var/lib/devos-agent /root /home".to_owned(),
        // Privileges and namespaces.
        "id; sudo -n id; unshare -r id; unshare -m id".to_owned(),
        // Other processes.
        "ps ax; kill -9 -1".to_owned(),
        // Set-user-ID and set-group-ID files, made by every route that takes a mode.
        "cp /bin/true setid; chmod u+s setid; chmod g+s setid; chmod 6755 setid; \
         python3 -c 'import os; os.close(os.open(\"setid-open\", os.O_CREAT | os.O_WRONLY, 0o4755))'; \
         python3 -c 'import os; os.close(os.open(\"setid-creat\", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o2755))'; \
         install -m 4755 /bin/true setid-install; mkfifo -m 4755 setid-fifo; \
         python3 -c 'import ctypes; ctypes.CDLL(None).syscall(452, -100, b\"setid\", 0o6755, 0)'; \
         python3 -c 'import os, ctypes; fd = os.open(\".\", os.O_TMPFILE | os.O_WRONLY, 0o2755); \
         ctypes.CDLL(None).linkat(-100, b\"/proc/self/fd/%d\" % fd, -100, b\"setid-tmpfile\", 0x400)'"
            .to_owned(),
        // What no network namespace covers (vsock, to the hypervisor's host), and x32
        // system calls, which a filter that checks only the architecture would allow.
        "# refused calls\npython3 - <<'PY'\n\
         import ctypes, os, socket\n\
         libc = ctypes.CDLL(None, use_errno=True)\n\
         print('x32', libc.syscall(0x40000000 + 39), ctypes.get_errno())\n\
         try:\n    socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM); print('vsock opened')\n\
         except OSError as e:\n    print('vsock errno', e.errno)\n\
         def call(name, nr, *args):\n\
         \x20   ctypes.set_errno(0)\n\
         \x20   r = libc.syscall(nr, *args)\n\
         \x20   if r == 0 and name.startswith('clone'):\n\
         \x20       os._exit(0)\n\
         \x20   print(name, r, ctypes.get_errno())\n\
         call('clone-newuser', 56, ctypes.c_ulong(0x10000000 | 0x200 | 17), 0, 0, 0, 0)\n\
         call('clone-newns', 56, ctypes.c_ulong(0x20000 | 0x200 | 17), 0, 0, 0, 0)\n\
         call('clone3', 435, 0, 0)\n\
         call('openat2', 437, -100, b'x', 0, 0)\n\
         call('io_uring_setup', 425, 1, 0)\n\
         call('keyctl', 250, 9999, 0, 0, 0, 0)\n\
         call('ptrace', 101, 2, 999999, 0, 0)\n\
         call('bpf', 321, 9999, 0, 0)\n\
         call('perf_event_open', 298, 0, 0, -1, -1, 0)\n\
         call('userfaultfd', 323, 0xFFFF)\n\
         PY"
            .to_owned(),
    ];
    for (i, script) in scripts.iter().enumerate() {
        let file = cwd.join(format!("attack-{i}.sh"));
        eve.write(&file, &format!("{script}\n"));
        let r = approved(&agent, &eve, cwd, &format!("run: sh attack-{i}.sh"));
        assert!(
            r["state"] == "done" || r["state"] == "failed",
            "{script}: {r}"
        );
        let out = r["actions"][0]["output"].as_str().unwrap_or("");
        if script.starts_with("ps ax") {
            assert!(
                !out.contains("devos-agent serve"),
                "the action saw the agent: {out}"
            );
        }
        if script.starts_with("# refused calls") {
            // EPERM from the sandbox's filters (the kernel's own answers differ:
            // ENOSYS without x32, EAFNOSUPPORT without vsock).
            assert!(out.contains("x32 -1 1\n"), "{out}");
            assert!(out.contains("vsock errno 1\n"), "{out}");
            // The kernel itself would refuse each of these calls as asked (an invalid
            // flag pair, size, command or pid: EINVAL, EFAULT, EOPNOTSUPP, ESRCH), so
            // only the filters answer EPERM (the denied calls and clone with a
            // namespace flag) or ENOSYS (clone3 and openat2, whose arguments seccomp
            // cannot read).
            for call in [
                "clone-newuser",
                "clone-newns",
                "io_uring_setup",
                "keyctl",
                "ptrace",
                "bpf",
                "perf_event_open",
                "userfaultfd",
            ] {
                assert!(out.contains(&format!("{call} -1 1\n")), "{call}: {out}");
            }
            for call in ["clone3", "openat2"] {
                assert!(out.contains(&format!("{call} -1 38\n")), "{call}: {out}");
            }
        }
        if script.starts_with("# namespaces") {
            for ns in ["net", "ipc", "uts"] {
                assert!(out.contains(&format!("{ns}:[")), "{out}");
            }
            for host in &host_namespaces {
                assert!(!out.contains(host), "the action shares {host}: {out}");
            }
        }
        if script.starts_with("id;") {
            assert_eq!(out.matches(&format!("uid={}", eve.uid)).count(), 1, "{out}");
            assert!(!out.contains("uid=0"), "{out}");
        }
    }
    assert!(marks.made().is_empty(), "{:?}", marks.made());
    assert!(!eve.home.join("outside-home").exists());
    for entry in std::fs::read_dir(cwd).unwrap().flatten() {
        use std::os::unix::fs::PermissionsExt;
        let mode = entry.metadata().unwrap().permissions().mode();
        assert_eq!(
            mode & 0o6000,
            0,
            "{} was made set-user/group-ID: {mode:o}",
            entry.path().display()
        );
    }
    assert!(
        tcp.accept().is_err(),
        "the action reached the host's loopback"
    );
    assert!(
        unix.accept().is_err(),
        "the action reached an abstract socket"
    );
    assert!(
        udp.recv(&mut [0; 16]).is_err(),
        "a datagram from the action reached the host's loopback"
    );
    assert_eq!(std::fs::read_to_string(&bashrc).unwrap(), "# eve's\n");
    assert!(!hooks.join("pre-commit").exists());
    assert!(
        !std::fs::read_to_string(cwd.join(".git/config"))
            .unwrap()
            .contains("fsmonitor")
    );
    assert_eq!(
        stdout(&agent.devos(Some(&eve), cwd, &["--json", "rules"])),
        rules_before,
        "a rule was added from inside a sandbox"
    );
    // With her home as the working directory, writes ask (the whole home would be
    // writable), and once approved they still cannot touch her start-up files.
    let home_script = eve.home.join("devos-attack-home.sh");
    eve.write(
        &home_script,
        "echo x >> .bashrc; echo x >> .profile; mkdir .config/autostart\n",
    );
    let (asked, _) = submit(&agent, &eve, &eve.home, "create directory devos-attack-dir");
    assert!(asked, "a write in the home directory ran unasked");
    let r = approved(&agent, &eve, &eve.home, "run: sh devos-attack-home.sh");
    assert_eq!(r["state"], "failed", "{r}");
    for startup in [".bashrc", ".profile"] {
        assert_eq!(
            std::fs::read_to_string(eve.home.join(startup)).unwrap(),
            "# eve's\n"
        );
    }
    assert!(!eve.home.join(".config/autostart").exists());
    std::fs::remove_file(home_script).unwrap();
}

/// Processes whose command line holds `needle`.
fn processes_with(needle: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(needle))
        .collect()
}

/// A repository's own configuration cannot turn on git's `ext::` transport (a remote
/// that is a command line): the sandbox lets git speak file, git, http(s) and ssh only
/// (docs/agent.md, "The sandbox"), so an approved `git fetch` runs no command the
/// repository names.
#[test]
fn a_repository_cannot_make_git_fetch_run_a_command() {
    let agent = Daemon::start();
    let eve = eve();
    let project = repo(&eve);
    let cwd = project.path();
    git(&eve, cwd, &["config", "protocol.ext.allow", "always"]);
    git(
        &eve,
        cwd,
        &[
            "remote",
            "add",
            "origin",
            "ext::sh -c touch% ran-by-the-remote",
        ],
    );
    let r = approved(&agent, &eve, cwd, "run: git fetch origin");
    let output = r["actions"][0]["output"].as_str().unwrap_or_default();
    assert!(output.contains("transport 'ext' not allowed"), "{r:#}");
    assert!(!cwd.join("ran-by-the-remote").exists(), "{r:#}");
}

/// An action runs under the configured resource limits (docs/agent.md, "The
/// sandbox"): no core dumps, CPU seconds twice the timeout, files no larger than
/// `max-file-mib` (a larger write is cut there), at most `max-open-files` open.
#[test]
fn an_action_runs_under_its_resource_limits() {
    let agent = Daemon::start_with(
        "IMAGE_VERSION=1\n",
        "[sandbox]\ntimeout-secs = 30\nmax-file-mib = 1\nmax-open-files = 64\n",
    );
    let eve = eve();
    let project = eve.project();
    let cwd = project.path();
    let script = "echo core=$(ulimit -c) cpu=$(ulimit -t) fsize=$(ulimit -f) nofile=$(ulimit -n); \
                  head -c 2097152 /dev/zero > big; echo size=$(stat -c %s big)";
    let r = approved(&agent, &eve, cwd, &format!("run: sh -c '{script}'"));
    let output = r["actions"][0]["output"].as_str().unwrap_or_default();
    // (dash's `ulimit -f` counts 512-byte blocks: 2048 is 1 MiB.)
    assert!(
        output.contains("core=0 cpu=60 fsize=2048 nofile=64"),
        "{r:#}"
    );
    assert!(output.contains("size=1048576"), "{r:#}");
}

#[test]
fn the_end_of_an_action_ends_every_process_it_started() {
    let agent = Daemon::start_with("IMAGE_VERSION=1\n", "[sandbox]\ntimeout-secs = 3\n");
    let eve = eve();
    let project = eve.project();
    let cwd = project.path();
    // setsid() and a closed output do not let anything outlive the timeout...
    for (n, script) in [
        "setsid sleep 7001 & sleep 7002",
        "exec >&- 2>&-; setsid sleep 7003 & sleep 7004",
        "exec >&- 2>&-; sleep 7005",
    ]
    .iter()
    .enumerate()
    {
        let r = approved(&agent, &eve, cwd, &format!("run: sh -c '{script}'"));
        assert_eq!(r["state"], "failed", "{script}: {r}");
        assert!(
            r["actions"][0]["error"]
                .as_str()
                .unwrap()
                .contains("timed out"),
            "{r}"
        );
        assert!(
            wait_for(Duration::from_secs(30), || processes_with(&format!(
                "sleep 700{}",
                2 * n + 1
            ))
            .is_empty()
                && processes_with(&format!("sleep 700{}", 2 * n + 2)).is_empty()),
            "{script}: processes outlived the action: {:?}",
            processes_with("sleep 700")
        );
    }
    // ...nor Cancel (with a timeout that cannot end the action first on a busy host).
    drop(agent);
    let agent = Daemon::start_with("IMAGE_VERSION=1\n", "[sandbox]\ntimeout-secs = 120\n");
    let out = agent.devos(
        Some(&eve),
        cwd,
        &[
            "run",
            "run: sh -c 'exec >&- 2>&-; setsid sleep 7101 & sleep 7102'",
        ],
    );
    let id = waiting_id(&out);
    assert!(
        agent
            .devos(Some(&eve), cwd, &["approve", &id])
            .status
            .success()
    );
    // The PID namespace of `sleep 7102` itself (not of the shell that starts it).
    let sleeper_ns = || {
        std::fs::read_dir("/proc").unwrap().flatten().find_map(|e| {
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            if cmd != b"sleep\x007102\x00" {
                return None;
            }
            std::fs::read_link(e.path().join("ns/pid")).ok()
        })
    };
    let mut pid_ns = None;
    assert!(
        wait_for(Duration::from_secs(30), || {
            pid_ns = sleeper_ns();
            pid_ns.is_some()
        }),
        "the action's sleep never started"
    );
    let pid_ns = pid_ns.unwrap();
    let own_ns = std::fs::read_link("/proc/self/ns/pid").unwrap();
    assert_ne!(pid_ns, own_ns, "the action ran in the host's PID namespace");
    assert!(
        agent
            .devos(Some(&eve), cwd, &["cancel", &id])
            .status
            .success()
    );
    agent.wait_state(&eve, cwd, &id, "cancelled");
    assert!(
        wait_for(Duration::from_secs(30), || processes_with("sleep 710")
            .is_empty()),
        "processes outlived Cancel"
    );
    // The action's PID namespace is gone: no process is in it.
    let in_ns = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| std::fs::read_link(e.path().join("ns/pid")).is_ok_and(|ns| ns == pid_ns))
            .count()
    };
    assert!(
        wait_for(Duration::from_secs(30), || in_ns() == 0),
        "the action's PID namespace {} still has {} processes",
        pid_ns.display(),
        in_ns()
    );
}

/// The agent's audit log on a tmpfs of `size` (unmounted when dropped), for tests that
/// fill its disk; `extra` is more of the agent's configuration.
fn with_audit_on_a_small_disk(extra: &str, size: &str) -> (Daemon, SmallDisk) {
    let agent = Daemon::start_prepared(
        "IMAGE_VERSION=1\n",
        extra,
        &[("AWS_EC2_METADATA_DISABLED", "true")],
        |dir| {
            let audit = dir.join("state/audit");
            std::fs::create_dir_all(&audit).unwrap();
            let ok = std::process::Command::new("mount")
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={size}"),
                    "devos-audit-test",
                ])
                .arg(&audit)
                .status()
                .unwrap()
                .success();
            assert!(ok, "cannot mount a small tmpfs for the audit log");
        },
    );
    let audit = SmallDisk(agent.dir.path().join("state/audit"));
    (agent, audit)
}

/// The audit log's directory, a small tmpfs of its own.
struct SmallDisk(PathBuf);

impl SmallDisk {
    /// A file that takes up the room left.
    fn filler(&self) -> PathBuf {
        self.0.join("filler")
    }

    /// Fill the disk up.
    fn fill(&self) {
        let _ = std::process::Command::new("dd")
            .args(["if=/dev/zero", "bs=4k", "count=100000"])
            .arg(format!("of={}", self.filler().display()))
            .stderr(std::process::Stdio::null())
            .status();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn an_action_that_cannot_be_audited_does_not_run() {
    let marks = Marks::new();
    let (agent, audit) = with_audit_on_a_small_disk("", "256k");
    let eve = eve();
    let project = eve.project();
    let cwd = project.path();
    // Waiting for approval while the disk is fine...
    let waiting = waiting_id(&agent.devos(Some(&eve), cwd, &["run", "run: touch late ran-late"]));
    // ...then the audit log's disk fills up.
    audit.fill();
    // A user's request is refused at once: the disk is down to its reserve.
    let out = agent.devos(Some(&eve), cwd, &["run", "list", "files"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("disk is nearly full"),
        "{}",
        stderr(&out)
    );
    // Root's requests may use the reserve. The log's last page may still have room for
    // a few entries: requests run while their entries fit, and are refused as soon
    // as one does not.
    let root_dir = tempfile::tempdir_in("/var/lib").unwrap();
    let mut ran = Vec::new();
    let mut refused = None;
    for _ in 0..60 {
        let out = agent.devos(None, root_dir.path(), &["--json", "run", "list", "files"]);
        if out.status.success() {
            ran.push(json(&out)["id"].as_str().unwrap().to_owned());
            continue;
        }
        refused = Some(format!("{}{}", stdout(&out), stderr(&out)));
        break;
    }
    let refused = refused.expect("the audit log's disk never filled up");
    assert!(refused.contains("cannot write the audit log"), "{refused}");
    assert!(refused.contains("nothing ran"), "{refused}");
    assert!(!refused.contains("ran-late"), "{refused}");
    // Whatever ran is on record, from its submission to its start.
    let log = std::fs::read_to_string(audit.0.join("log-000001.jsonl")).unwrap();
    for id in &ran {
        for event in ["request.submitted", "action.started"] {
            assert!(
                log.lines()
                    .any(|l| l.contains(&format!("\"event\":\"{event}\""))
                        && l.contains(&format!("\"request\":\"{id}\""))),
                "request {id} ran without its {event} entry"
            );
        }
    }
    let out = agent.devos(Some(&eve), cwd, &["approve", &waiting]);
    assert!(
        !out.status.success(),
        "an approval was taken without being recorded"
    );
    assert!(!cwd.join("ran-late").exists() && !cwd.join("late").exists());
    assert!(marks.made().is_empty());
    // Once there is room again, the log goes on whole: no half-written entry swallowed
    // the next one.
    std::fs::remove_file(audit.filler()).unwrap();
    assert!(
        agent
            .devos(Some(&eve), cwd, &["run", "list", "files"])
            .status
            .success()
    );
    let out = agent.devos(Some(&eve), cwd, &["audit", "verify"]);
    assert!(out.status.success(), "{}", stdout(&out));
}

#[test]
fn a_consistent_rewrite_or_a_dropped_tail_of_the_audit_log_is_reported() {
    use devos_agent::audit::{AuditLog, Entry};
    let mut agent = Daemon::start();
    let eve = eve();
    let project = eve.project();
    let cwd = project.path();
    for _ in 0..4 {
        assert!(
            agent
                .devos(Some(&eve), cwd, &["run", "list", "files"])
                .status
                .success()
        );
    }
    let dir = agent.state().join("audit");
    let log = dir.join("log-000001.jsonl");
    let entries: Vec<Entry> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Rebuild the whole log with one entry changed: every hash, checkpoint and HEAD
    // agree, as whoever can write the state directory could make them.
    let scratch = tempfile::tempdir().unwrap();
    let config = devos_agent::config::AuditConfig {
        anchor_file: scratch.path().join("anchors.jsonl"),
        journal: false,
        ..Default::default()
    };
    let mut forged = AuditLog::open(&scratch.path().join("audit"), &config).unwrap();
    for e in &entries {
        let mut detail = e.detail.clone();
        if e.event == "request.submitted" {
            detail["text"] = serde_json::json!("nothing to see");
        }
        forged
            .append(&e.event, e.uid, e.request.as_deref(), e.action, detail)
            .unwrap();
    }
    drop(forged);
    agent.stop();
    for f in std::fs::read_dir(&dir).unwrap().flatten() {
        std::fs::remove_file(f.path()).unwrap();
    }
    for f in std::fs::read_dir(scratch.path().join("audit"))
        .unwrap()
        .flatten()
    {
        std::fs::copy(f.path(), dir.join(f.file_name())).unwrap();
    }
    agent.restart();
    let out = agent.devos(Some(&eve), cwd, &["audit", "verify"]);
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("the log was rewritten"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn one_user_cannot_starve_the_others() {
    let agent = Daemon::start_with("IMAGE_VERSION=1\n", "[limits]\nrequests-per-user = 3\n");
    let eve = eve();
    let mallory = User::ensure("devos-mallory");
    let project = eve.project();
    let cwd = project.path();
    let ids: Vec<String> = (0..3)
        .map(|i| {
            waiting_id(&agent.devos(
                Some(&eve),
                cwd,
                &["run", "create", "directory", &format!("d{i}")],
            ))
        })
        .collect();
    let out = agent.devos(Some(&eve), cwd, &["run", "list", "files"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("requests in flight"),
        "{}",
        stderr(&out)
    );
    // Others are served.
    let mproject = mallory.project();
    assert!(
        agent
            .devos(Some(&mallory), mproject.path(), &["run", "list", "files"])
            .status
            .success()
    );
    // A finished request frees its place.
    assert!(
        agent
            .devos(Some(&eve), cwd, &["cancel", &ids[0]])
            .status
            .success()
    );
    agent.wait_state(&eve, cwd, &ids[0], "cancelled");
    assert!(wait_for(Duration::from_secs(30), || agent
        .devos(Some(&eve), cwd, &["run", "list", "files"])
        .status
        .success()));
}

/// No user fills the agent's disk or its replies for everyone: a rule is bounded in
/// size and a user's rules in number (all of them fit one reply), reading processes
/// takes one of the caller's slots, a user's daily share of the audit log is bounded,
/// and the log's file system keeps a reserve that only root's requests may use.
#[test]
fn one_user_cannot_fill_the_agents_disk_or_its_replies() {
    let (agent, audit) = with_audit_on_a_small_disk(
        "[limits]\nrequests-per-user = 2\naudit-mib-per-user-per-day = 1\n[model]\nenabled = false\n",
        "8m",
    );
    let eve = eve();
    let mallory = User::ensure("devos-mallory");
    let project = eve.project();
    let cwd = project.path();
    let refused = |out: &std::process::Output, why: &str| {
        assert!(!out.status.success(), "{}", stdout(out));
        assert!(stderr(out).contains(why), "{}", stderr(out));
    };
    let serving = || {
        let mproject = mallory.project();
        let out = agent.devos(Some(&mallory), mproject.path(), &["run", "list", "files"]);
        assert!(out.status.success(), "{}", stderr(&out));
    };

    // A rule as large as the bus carries is refused; a user's rules are bounded in
    // number, and listing them all (root: everyone's) answers.
    let huge: Vec<String> = (0..40)
        .map(|i| format!("{i}{}", "x".repeat(1000)))
        .collect();
    let mut args = vec!["rules", "add", "deny", "--command-prefix"];
    args.extend(huge.iter().map(String::as_str));
    refused(&agent.devos(Some(&eve), cwd, &args), "KiB a rule may");
    for i in 0..256 {
        let word = format!("tool{i}");
        let out = agent.devos(
            Some(&eve),
            cwd,
            &["rules", "add", "deny", "--command-prefix", &word],
        );
        assert!(out.status.success(), "rule {i}: {}", stderr(&out));
    }
    refused(
        &agent.devos(
            Some(&eve),
            cwd,
            &["rules", "add", "deny", "--command-prefix", "one-more"],
        ),
        "as many as a user may",
    );
    let listed = json(&agent.devos(Some(&eve), cwd, &["--json", "rules"]));
    assert_eq!(listed.as_array().map(Vec::len), Some(256));
    assert!(agent.devos(None, cwd, &["rules"]).status.success());
    // A decision that would leave one rule too many is refused whole: the action
    // still waits, and can be approved once.
    let id = waiting_id(&agent.devos(Some(&eve), cwd, &["run", "create", "directory", "kept"]));
    let out = agent.devos(Some(&eve), cwd, &["approve", &id, "--remember", "always"]);
    refused(&out, "as many as a user may");
    let out = agent.devos(Some(&eve), cwd, &["approve", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    agent.wait_state(&eve, cwd, &id, "done");
    assert!(cwd.join("kept").is_dir());

    // Reading processes takes a slot like a request.
    for i in 0..2 {
        waiting_id(&agent.devos(
            Some(&eve),
            cwd,
            &["run", "create", "directory", &format!("d{i}")],
        ));
    }
    refused(
        &agent.devos(Some(&eve), cwd, &["context", "ps"]),
        "requests in flight",
    );
    for id in json(&agent.devos(Some(&eve), cwd, &["--json", "history"]))
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["state"] == "awaiting-approval")
    {
        let id = id["id"].as_str().unwrap();
        assert!(
            agent
                .devos(Some(&eve), cwd, &["cancel", id])
                .status
                .success()
        );
        agent.wait_state(&eve, cwd, id, "cancelled");
    }

    // A user's share of the audit log for the day: past it, their new requests and
    // rules are refused; others are served. (One request waits through it, and
    // she has room for one more rule.)
    let removed = listed[0]["id"].as_i64().unwrap().to_string();
    let out = agent.devos(Some(&eve), cwd, &["rules", "remove", &removed]);
    assert!(out.status.success(), "{}", stderr(&out));
    let late = waiting_id(&agent.devos(Some(&eve), cwd, &["run", "create", "directory", "late"]));
    let long = format!("count the words in {}", "these ".repeat(2700));
    let mut tries = 0;
    let out = loop {
        tries += 1;
        assert!(
            tries < 200,
            "eve's share of the audit log was never used up"
        );
        let out = agent.devos(Some(&eve), cwd, &["run", &long]);
        if stderr(&out).contains("audit-mib-per-user-per-day") {
            break out;
        }
    };
    refused(&out, "until tomorrow");
    refused(
        &agent.devos(
            Some(&eve),
            cwd,
            &["rules", "add", "deny", "--command-prefix", "late"],
        ),
        "audit-mib-per-user-per-day",
    );
    // Nor a follow-up, a project to index, or a decision that leaves a rule...
    refused(
        &agent_call(&agent, Some(&eve), &["Continue", "ss", &late, "and more"]),
        "audit-mib-per-user-per-day",
    );
    refused(
        &agent.devos(Some(&eve), cwd, &["context", "add", &cwd.to_string_lossy()]),
        "audit-mib-per-user-per-day",
    );
    for decide in ["approve", "deny"] {
        refused(
            &agent.devos(Some(&eve), cwd, &[decide, &late, "--remember", "always"]),
            "audit-mib-per-user-per-day",
        );
    }
    assert_eq!(
        json(&agent.devos(Some(&eve), cwd, &["--json", "rules"]))
            .as_array()
            .map(Vec::len),
        Some(255)
    );
    // ...while a decision taken once goes on.
    agent.approve_and_wait(&eve, cwd, &late, "done");
    assert!(cwd.join("late").is_dir());
    serving();

    // The file system down to its reserve: users are refused, root is served.
    audit.fill();
    let ok = std::process::Command::new("truncate")
        .args(["-s", "-128K"])
        .arg(audit.filler())
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let mproject = mallory.project();
    refused(
        &agent.devos(Some(&mallory), mproject.path(), &["run", "list", "files"]),
        "disk is nearly full",
    );
    let root_dir = tempfile::tempdir_in("/var/lib").unwrap();
    let out = agent.devos(None, root_dir.path(), &["run", "list", "files"]);
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::remove_file(audit.filler()).unwrap();
    serving();
    assert!(
        json(&agent.devos(None, cwd, &["--json", "audit", "verify"]))["ok"]
            .as_bool()
            .unwrap()
    );
}

#[test]
fn verifying_a_large_audit_log_does_not_hold_up_other_callers() {
    let agent = Daemon::start_prepared(
        "IMAGE_VERSION=1\n",
        "",
        &[("AWS_EC2_METADATA_DISABLED", "true")],
        |dir| {
            // A log of 150,000 entries, as years of use leave it.
            let config = devos_agent::config::AuditConfig {
                anchor_file: dir.join("anchors/audit-anchors.jsonl"),
                checkpoint_every: 1_000_000,
                journal: false,
                ..Default::default()
            };
            let mut log =
                devos_agent::audit::AuditLog::open(&dir.join("state/audit"), &config).unwrap();
            for i in 0..150_000u32 {
                log.append(
                    "action.finished",
                    Some(1000),
                    Some("old"),
                    Some(i),
                    serde_json::json!({"argv": ["ls", "-la"], "exit-code": 0}),
                )
                .unwrap();
            }
        },
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let connect = || async {
            let conn = zbus::connection::Builder::address(agent.bus.address.as_str())
                .unwrap()
                .build()
                .await
                .unwrap();
            devos_agent::client::Agent1Proxy::new(&conn)
                .await
                .map(|p| (conn, p))
                .unwrap()
        };
        let mut verifiers = Vec::new();
        for _ in 0..4 {
            let (conn, proxy) = connect().await;
            verifiers.push(tokio::spawn(async move {
                let _conn = conn;
                proxy.verify_audit().await.unwrap()
            }));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (_c, pinger) = connect().await;
        assert_eq!(pinger.ping().await.unwrap(), "pong");
        // Ping answered while the verifications are still going.
        assert!(
            verifiers.iter().any(|v| !v.is_finished()),
            "the verifications ended before Ping: make the log larger"
        );
        // A user asking for verification after verification queues one at most:
        // the others are refused, so no one can make the boot check wait behind a
        // queue of theirs.
        let eve = User::ensure("devos-eve");
        let answers: Vec<std::process::Output> = std::thread::scope(|s| {
            let calls: Vec<_> = (0..8)
                .map(|_| s.spawn(|| agent_call(&agent, Some(&eve), &["VerifyAuditSinceLast"])))
                .collect();
            calls.into_iter().map(|c| c.join().unwrap()).collect()
        });
        let refused = answers.iter().filter(|o| !o.status.success()).count();
        for o in answers.iter().filter(|o| !o.status.success()) {
            assert!(
                stderr(o).contains("waiting or running as a user may"),
                "{}",
                stderr(o)
            );
        }
        assert!(refused > 0 && refused < 8, "{refused} of 8 refused");
        for v in verifiers {
            let report: serde_json::Value = serde_json::from_str(&v.await.unwrap()).unwrap();
            assert_eq!(report["ok"], true, "{report}");
        }
    });
}

#[test]
fn arguments_longer_than_any_call_needs_are_refused_and_the_agent_stays_on_the_bus() {
    use devos_agent::client::{AdminProxy, Agent1Proxy, ContextProxy};
    let agent = Daemon::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let conn = zbus::connection::Builder::address(agent.bus.address.as_str())
            .unwrap()
            .build()
            .await
            .unwrap();
        let a = Agent1Proxy::new(&conn).await.unwrap();
        let c = ContextProxy::new(&conn).await.unwrap();
        let admin = AdminProxy::new(&conn).await.unwrap();
        // Each of these characters is six in an error that quotes it: echoed whole,
        // 4 MiB of them would be a reply larger than the bus carries, which takes the
        // agent off the bus.
        let huge = "\u{7f}".repeat(4 << 20);
        let path = format!("/{huge}");
        let calls: Vec<(&str, zbus::Result<()>)> = vec![
            ("Recent", c.recent(&huge, 5).await.map(drop)),
            ("GitState", c.git_state(&path).await.map(drop)),
            ("AddProject", c.add_project(&path, false).await.map(drop)),
            ("RemoveProject", c.remove_project(&path).await),
            ("Get", a.get(&huge).await.map(drop)),
            ("Cancel", a.cancel(&huge).await),
            ("Continue", a.continue_(&huge, "and then").await.map(drop)),
            ("Usage", a.usage(&huge).await.map(drop)),
            ("Submit", a.submit("list files", &path).await.map(drop)),
            (
                "SubmitToModel",
                a.submit_to_model("list files", "/", &huge).await.map(drop),
            ),
            ("Approve", a.approve(&huge, 0, "once", &[], "").await),
            ("Deny", a.deny("r", 0, &huge, &[], "").await),
            ("Deny path", a.deny("r", 0, "always", &[], &path).await),
            (
                "AddRule",
                a.add_rule(&huge, "always", &[], "").await.map(drop),
            ),
            (
                "AddRule prefix",
                a.add_rule("deny", "always", &[huge.as_str()], "")
                    .await
                    .map(drop),
            ),
            ("Update", admin.update(&huge).await.map(drop)),
        ];
        for (method, result) in calls {
            let e = result.expect_err(method).to_string();
            let shown = &e[..e.len().min(300)];
            assert!(e.len() < 1024 && e.contains("at most"), "{method}: {shown}");
        }
        assert_eq!(a.ping().await.unwrap(), "pong");
    });
}

#[test]
fn ordinary_requests_still_work_in_a_plain_project() {
    let agent = Daemon::start();
    let eve = eve();
    let project = repo(&eve);
    let cwd = project.path();
    eve.write(
        &cwd.join("Makefile"),
        "test:\n\t@echo all tests passed > result.txt\n\t@cat result.txt\n",
    );
    eve.write(&cwd.join("notes.md"), "TODO: write more\n");
    let run = |text: &str| approved(&agent, &eve, cwd, text);
    let output = |r: &serde_json::Value| {
        r["actions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["output"].as_str().unwrap_or("").to_owned())
            .collect::<String>()
    };
    for (text, want) in [
        ("list files", "notes.md"),
        ("search for TODO", "write more"),
        ("find files named '*.md'", "notes.md"),
        ("git status", "file.txt"),
        ("git diff", "+two"),
        ("git log", "first"),
        ("disk usage", "."),
    ] {
        let r = run(text);
        assert_eq!(r["state"], "done", "{text}: {r}");
        assert!(output(&r).contains(want), "{text}: {}", output(&r));
    }
    let r = run("commit with message \"second\"");
    assert_eq!(r["state"], "done", "{r}");
    let r = run("git log");
    assert!(output(&r).contains("second"), "{}", output(&r));
    let r = run("run the tests");
    assert_eq!(r["state"], "done", "{r}");
    assert!(output(&r).contains("all tests passed"));
    let docs = cwd.join("docs");
    std::fs::create_dir(&docs).unwrap();
    std::os::unix::fs::chown(&docs, Some(eve.uid), Some(eve.uid)).unwrap();
    eve.write(&docs.join("a.md"), "a");
    eve.write(&docs.join("b.txt"), "b");
    let r = run("organise files in docs by type");
    assert_eq!(r["state"], "done", "{r}");
    assert!(docs.join("md/a.md").exists() && docs.join("txt/b.txt").exists());
    let r = run("back up docs");
    assert_eq!(r["state"], "done", "{r}");
    std::fs::remove_dir_all(docs.join("md")).unwrap();
    let r = run("restore docs");
    assert_eq!(r["state"], "done", "{r}");
    assert!(docs.join("md/a.md").exists());
    let r = run("create branch feature-x");
    assert_eq!(r["state"], "done", "{r}");
}

#[test]
fn working_above_or_inside_a_hidden_place_does_not_uncover_it() {
    let agent = Daemon::start();
    let eve = eve();
    let mallory = User::ensure("devos-mallory");
    open_up(&mallory.home, 0o755);
    mallory.write(&mallory.home.join("mallory-visible-9b2.txt"), "MALLORY-9b2");
    open_up(&mallory.home.join("mallory-visible-9b2.txt"), 0o644);
    let host_tmp = tempfile::Builder::new()
        .prefix("devos-host-tmp-9b2-")
        .tempfile_in("/tmp")
        .unwrap();
    std::fs::write(host_tmp.path(), "HOST-TMP-9b2").unwrap();
    open_up(host_tmp.path(), 0o644);
    // Read-only requests from `/`, `/home` and `/tmp`: the hidden places stay hidden.
    for (cwd, text) in [
        ("/", "list files in /home"),
        ("/", "search for MALLORY in /home"),
        ("/", "find files named '*9b2*' in /home"),
        ("/home", "list files"),
        ("/home", "search for MALLORY in ."),
        ("/tmp", "list files"),
        ("/tmp", "search for HOST-TMP in ."),
        ("/", "find files named '*9b2*' in /tmp"),
    ] {
        let out = agent.devos(
            Some(&eve),
            Path::new("/"),
            &["--json", "run", "--cwd", cwd, text],
        );
        assert!(out.status.code() != Some(3), "{cwd}: {text} asked");
    }
    assert_unseen(
        &agent,
        &eve,
        Path::new("/"),
        &[
            "mallory-visible-9b2",
            "MALLORY-9b2",
            "devos-host-tmp-9b2",
            "HOST-TMP-9b2",
        ],
    );
    // Writing with `/` as the working directory: it asks, and even approved the
    // system stays read-only.
    let r = approved(
        &agent,
        &eve,
        Path::new("/"),
        "create directory devos-attack-9b2",
    );
    assert_eq!(r["state"], "failed", "{r}");
    assert!(r["actions"][0]["risk"]["class"] == "privileged", "{r}");
    assert!(!Path::new("/devos-attack-9b2").exists());
    // `/run` (every socket), `/tmp` and `/dev/shm` (shared with every user) are never
    // working directories: an action there is refused when planned, not asked about
    // and then refused by the sandbox.
    for (cwd, text) in [
        ("/run", "list files"),
        ("/tmp", "create directory devos-attack-9b2"),
        ("/dev/shm", "create directory devos-attack-9b2"),
    ] {
        let out = agent.devos(
            Some(&eve),
            Path::new("/"),
            &["--json", "run", "--cwd", cwd, text],
        );
        let r = json(&out);
        assert_eq!(r["state"], "denied", "{cwd}: {r}");
        let decision = &r["actions"][0]["decision"];
        assert_eq!(decision["by"], "the sandbox", "{cwd}: {r}");
        assert!(
            decision["reason"]
                .as_str()
                .unwrap()
                .contains(&format!("{cwd} is a place no action may see")),
            "{r}"
        );
        assert!(!Path::new(cwd).join("devos-attack-9b2").exists());
    }
    // Nor is a path there written from a home.
    let r = json(&agent.devos(
        Some(&eve),
        &eve.home,
        &["--json", "run", "create directory /tmp/devos-attack-9b2"],
    ));
    assert_eq!(r["state"], "denied", "{r}");
    assert!(
        r["actions"][0]["decision"]["reason"]
            .as_str()
            .unwrap()
            .contains("/tmp is a place no action may see"),
        "{r}"
    );
}

/// Found by red-teaming: a place the administrator's deny rules name below a home was
/// put back by the bind of the working directory above it, so code run there (whose
/// paths no rule can see before it runs) read and wrote it.
#[test]
fn a_denied_place_below_the_working_directory_stays_hidden() {
    let eve = eve();
    let proj = eve.project();
    let denied = proj.path().join("denied");
    std::fs::create_dir(&denied).unwrap();
    std::os::unix::fs::chown(&denied, Some(eve.uid), Some(eve.uid)).unwrap();
    eve.write(&denied.join("f"), "DENIED-4d1");
    let agent = Daemon::start_with(
        "IMAGE_VERSION=1\n",
        &format!("[[policy.deny]]\npath-prefix = \"{}\"\n", denied.display()),
    );
    eve.write(
        &proj.path().join("peek.py"),
        "d = 'den' + 'ied'\n\
         try:\n    print(open(d + '/f').read())\nexcept OSError as e:\n    print('read', e)\n\
         try:\n    open(d + '/planted', 'w').write('x')\nexcept OSError as e:\n    print('write', e)\n",
    );
    let r = approved(&agent, &eve, proj.path(), "run: python3 peek.py");
    assert!(r["state"] == "done" || r["state"] == "failed", "{r}");
    let out = r["actions"][0]["output"].as_str().unwrap_or("");
    assert!(out.contains("read "), "{out}");
    assert!(!out.contains("DENIED-4d1"), "{out}");
    assert!(!denied.join("planted").exists());
    // Nor may an action work in it.
    let out = agent.devos(
        Some(&eve),
        proj.path(),
        &[
            "--json",
            "run",
            "--cwd",
            &denied.to_string_lossy(),
            "list files",
        ],
    );
    let r = json(&out);
    assert!(r["state"] == "denied" || r["state"] == "failed", "{r}");
}

/// `/home` bound on another place for as long as it lives.
struct HomeAlias(PathBuf);

impl HomeAlias {
    fn mount(at: &str) -> HomeAlias {
        let at = PathBuf::from(at);
        std::fs::create_dir_all(&at).unwrap();
        let out = std::process::Command::new("mount")
            .args(["--bind", "/home"])
            .arg(&at)
            .output()
            .unwrap();
        assert!(out.status.success(), "mount: {}", stderr(&out));
        HomeAlias(at)
    }
}

impl Drop for HomeAlias {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("--lazy")
            .arg(&self.0)
            .status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Found by red-teaming: NixOS images mount `/var/home` on `/home` (a bind mount, not
/// a link), and under that other name the homes were not hidden and secrets were not
/// secrets: other users' files and the caller's own keys were read without asking.
#[test]
fn homes_and_secrets_stay_hidden_under_another_mount_name() {
    let eve = eve();
    let mallory = User::ensure("devos-mallory");
    open_up(&mallory.home, 0o755);
    mallory.write(&mallory.home.join("mallory-5e8.txt"), "MALLORY-5e8");
    open_up(&mallory.home.join("mallory-5e8.txt"), 0o644);
    let alias = HomeAlias::mount("/srv/devos-home-alias-5e8");
    let other = alias.0.display().to_string();
    let project = eve.project();
    let cwd = project.path();
    let denied = cwd.join("denied");
    std::fs::create_dir(&denied).unwrap();
    std::os::unix::fs::chown(&denied, Some(eve.uid), Some(eve.uid)).unwrap();
    eve.write(&denied.join("f"), "DENIED-5e8");
    let agent = Daemon::start_with(
        "IMAGE_VERSION=1\n",
        &format!("[[policy.deny]]\npath-prefix = \"{}\"\n", denied.display()),
    );
    // A denied place named by the other name is refused, not asked about.
    let by_other_name = Path::new(&other).join(denied.strip_prefix("/home").unwrap());
    let (_, r) = submit(
        &agent,
        &eve,
        cwd,
        &format!("read {}", by_other_name.join("f").display()),
    );
    assert_eq!(r["state"], "denied", "{r}");
    // Naming a secret by the other name asks.
    for text in [
        format!("read {other}/devos-eve/.ssh/id_rsa"),
        format!("run: cat {other}/devos-eve/.aws/credentials"),
    ] {
        let (asked, r) = submit(&agent, &eve, cwd, &text);
        assert!(asked, "{text} ran without asking: {r}");
    }
    // Code whose paths are only known when it runs finds nothing there.
    eve.write(
        &cwd.join("peek.py"),
        &format!(
            "import os\n\
             base = '{other}'\n\
             for p in ['/devos-eve/.ssh/id_rsa', '/devos-eve/.aws/credentials', '/devos-mallory/mallory-5e8.txt']:\n\
             \x20   try:\n\
             \x20       print(open(base + p).read())\n\
             \x20   except OSError as e:\n\
             \x20       print('no', p, e.errno)\n\
             print('listing', os.listdir(base))\n"
        ),
    );
    let r = approved(&agent, &eve, cwd, "run: python3 peek.py");
    assert!(r["state"] == "done" || r["state"] == "failed", "{r}");
    let out = r["actions"][0]["output"].as_str().unwrap_or("");
    // (The caller's own secret locations are hidden there too, by empty directories.)
    let listing = out.lines().find(|l| l.starts_with("listing")).unwrap_or("");
    assert!(
        listing.starts_with("listing [") && !listing.contains("devos-mallory"),
        "{out}"
    );
    let seen = readable(&agent, &eve, cwd);
    for secret in SECRET_TEXTS.iter().chain(&["MALLORY-5e8", "DENIED-5e8"]) {
        assert!(!seen.contains(secret), "{secret} leaked: {out}");
    }
}

/// Found by red-teaming: a submodule's own configuration (filter, textconv) ran during
/// a read-only `git status`/`git diff` of the superproject, and could plant
/// `.git/commondir` from an approved `git add`.
#[test]
fn a_submodules_configuration_runs_nothing() {
    let agent = Daemon::start();
    let eve = eve();
    let marks = Marks::new();
    let upstream = repo(&eve);
    let project = repo(&eve);
    let cwd = project.path();
    git(
        &eve,
        cwd,
        &[
            "-c",
            "protocol.file.allow=always",
            "submodule",
            "add",
            "-q",
            &upstream.path().to_string_lossy(),
            "sub",
        ],
    );
    git(&eve, cwd, &["commit", "-q", "-m", "with sub"]);
    let evil = payload(&eve, cwd, marks.path(), "submodule");
    let config = cwd.join(".git/modules/sub/config");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "[filter \"evil\"]\n\tclean = {e}\n[diff \"evil\"]\n\ttextconv = {e}\n[core]\n\tfsmonitor = {e}\n",
        e = evil.display()
    ));
    eve.write(&config, &text);
    eve.write(&cwd.join("sub/.gitattributes"), "* filter=evil diff=evil\n");
    // The same content, a newer time: git must hash the file again, through its
    // clean filter.
    let same = std::fs::read_to_string(cwd.join("sub/file.txt")).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    eve.write(&cwd.join("sub/file.txt"), &same);
    for text in [
        "git status",
        "git diff",
        "run: git status --porcelain=2",
        "run: git diff --stat",
    ] {
        let (asked, r) = submit(&agent, &eve, cwd, text);
        assert!(!asked, "{text}: {r}");
    }
    let (asked, _) = submit(&agent, &eve, cwd, "run: git diff --submodule=diff");
    assert!(asked, "--submodule=diff steps into the submodule");
    // Changing the repository would step into the submodule with its own
    // configuration (git add does, whatever it is told): that asks, and says why.
    let (asked, r) = submit(&agent, &eve, cwd, "run: git add --all");
    assert!(asked, "{r}");
    assert!(
        r["actions"][0]["risk"]["reasons"]
            .to_string()
            .contains("submodules"),
        "{r}"
    );
    assert!(!cwd.join(".git/commondir").exists());
    assert_never_ran(&agent, &eve, cwd, &marks, &["submodule"]);
}

/// Found by red-teaming: `/proc/PID/root` led past the `/boot` deny rule, and shell
/// scripts and wrappers past `rm -r /`.
#[test]
fn deny_rules_hold_through_proc_shells_and_wrappers() {
    let agent = Daemon::start();
    let eve = eve();
    let project = eve.project();
    let cwd = project.path();
    for text in [
        "run: cat /proc/2/root/boot/config",
        "run: ls /proc/self/root/boot",
        "search for x in /proc/1/root/boot",
        "$ rm -r --no-preserve-root / 2>/dev/null; echo RAN",
        "$ cd /tmp && rm -rf /",
        "run: env rm -r /",
        "run: nice rm -r /",
        "run: timeout 5 rm -r /",
        "run: rm -r /proc/2/root/",
        "run: rm -r --no-preserve-root /proc/self/root",
        "$ cat /boot/x | wc -l",
    ] {
        assert_denied_by_rule(&agent, &eve, cwd, text);
    }
    // Approved or not, /boot is not in any sandbox (a script's contents are not
    // checked against deny rules: the sandbox has the last word).
    eve.write(&cwd.join("boot.sh"), "ls -a /boot | wc -l\n");
    let r = approved(&agent, &eve, cwd, "run: sh boot.sh");
    assert_eq!(
        r["actions"][0]["output"].as_str().unwrap().trim(),
        "2",
        "{r}"
    );
}

/// Found by red-teaming: exact rules, symlinks, unreachable places, the home as
/// working directory, sockets below a shared temporary directory, and a NUL byte in
/// an action's output.
#[test]
fn the_red_team_findings_stay_fixed() {
    let agent = Daemon::start();
    // (Her own: a Makefile in the home is written and removed here.)
    let eve = attacker("devos-rt1");
    let project = eve.project();
    let cwd = project.path();
    // An exact rule does not follow a symlink swapped in later.
    let important = tempfile::tempdir_in(&eve.home).unwrap();
    std::os::unix::fs::chown(important.path(), Some(eve.uid), Some(eve.uid)).unwrap();
    eve.write(&important.path().join("thesis.txt"), "years of work");
    std::fs::create_dir(cwd.join("build")).unwrap();
    std::os::unix::fs::chown(cwd.join("build"), Some(eve.uid), Some(eve.uid)).unwrap();
    let id = waiting_id(&agent.devos(Some(&eve), cwd, &["run", "run: rm -r build/"]));
    assert!(
        agent
            .devos(Some(&eve), cwd, &["approve", &id, "--remember", "always"])
            .status
            .success()
    );
    agent.wait_state(&eve, cwd, &id, "done");
    std::os::unix::fs::symlink(important.path(), cwd.join("build")).unwrap();
    let (asked, r) = submit(&agent, &eve, cwd, "run: rm -r build/");
    assert!(asked, "the exact rule followed the symlink: {r}");
    assert!(important.path().join("thesis.txt").exists());
    // A place the caller cannot reach is never mounted for her.
    let hidden = tempfile::Builder::new()
        .prefix("devos-rootonly-")
        .tempdir_in("/root")
        .unwrap();
    open_up(hidden.path(), 0o755);
    std::fs::write(hidden.path().join("root-notes-5d1.txt"), "x").unwrap();
    std::os::unix::fs::symlink(hidden.path(), cwd.join("r")).unwrap();
    let r = approved(
        &agent,
        &eve,
        cwd,
        &format!(
            "run: find r/ {}/zz -print -o -delete",
            hidden.path().display()
        ),
    );
    assert_ne!(r["state"], "done", "{r}");
    assert!(!readable(&agent, &eve, cwd).contains("root-notes-5d1"));
    // With the home as working directory nothing new appears in it.
    eve.write(
        &eve.home.join("Makefile"),
        "test:\n\techo x > .bash_profile; echo x > .bash_aliases; mkdir -p .local/bin .config/git; echo x > .config/git/config; echo x > new-in-home\n",
    );
    let _ = approved(&agent, &eve, &eve.home, "run the tests");
    for planted in [
        ".bash_profile",
        ".bash_aliases",
        ".local/bin",
        ".config/git/config",
        "new-in-home",
    ] {
        assert!(
            !eve.home.join(planted).exists(),
            "{planted} was planted in the home"
        );
    }
    std::fs::remove_file(eve.home.join("Makefile")).unwrap();
    // A socket below a shared temporary directory is out of reach, even as the
    // working directory.
    let bus_dir = Path::new(agent.bus.address.trim_start_matches("unix:path="))
        .parent()
        .unwrap()
        .to_path_buf();
    open_up(&bus_dir, 0o755);
    let requests_before =
        json(&agent.devos(None, Path::new("/"), &["--json", "history", "-n", "1000"]))
            .as_array()
            .unwrap()
            .len();
    let r = approved(
        &agent,
        &eve,
        &bus_dir,
        &format!(
            "run: busctl --address=unix:path={}/system_bus_socket call org.devos.Agent1 /org/devos/Agent1 org.devos.Agent1 Submit ss list /",
            bus_dir.display()
        ),
    );
    // (Refused when planned: no one is asked about an action that could not run.)
    assert_eq!(r["state"], "denied", "{r}");
    assert!(
        r["actions"][0]["decision"]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("which no action may see"),
        "{r}"
    );
    let requests_after =
        json(&agent.devos(None, Path::new("/"), &["--json", "history", "-n", "1000"]))
            .as_array()
            .unwrap()
            .len();
    assert_eq!(
        requests_after,
        requests_before + 1,
        "a request was submitted from inside a sandbox"
    );
    let out = agent.devos(
        Some(&eve),
        Path::new("/"),
        &["--json", "run", "--cwd", "/proc", "list", "files"],
    );
    // (Refused when planned: the sandbox would refuse it.)
    let r = json(&out);
    assert_eq!(r["state"], "denied", "{r}");
    assert_eq!(r["actions"][0]["decision"]["by"], "the sandbox", "{r}");
    // A NUL byte in an action's output does not take the agent off the bus.
    let (_, r) = submit(&agent, &eve, cwd, "run: head -c 64 /usr/bin/true");
    assert_eq!(r["state"], "done", "{r}");
    std::thread::sleep(Duration::from_secs(1));
    let out = agent.devos(Some(&eve), cwd, &["run", "list", "files"]);
    assert!(out.status.success(), "the agent is gone: {}", stderr(&out));
    // The agent's state is root's alone, whatever umask it was started with.
    for f in std::fs::read_dir(agent.state()).unwrap().flatten() {
        let mode = f.metadata().unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{} is {mode:o}", f.path().display());
    }
}

/// Found by the second round of red-teaming: files that say where a repository is,
/// read differently by devos and by git, led git to a configuration devos had not
/// reduced — also against another user who works in a shared directory.
#[test]
fn git_finds_exactly_the_repository_devos_checked() {
    let agent = Daemon::start();
    let eve = eve();
    let marks = Marks::new();
    for (n, layout) in ["commondir-space", "commondir-bytes", "gitdir-space"]
        .iter()
        .enumerate()
    {
        let project = repo(&eve);
        let cwd = project.path();
        let id = format!("layout{n}");
        let evil = payload(&eve, cwd, marks.path(), &id);
        // A second, complete git directory whose configuration runs the payload.
        let other = cwd.join("evil ");
        let copied = std::process::Command::new("cp")
            .arg("-a")
            .arg(cwd.join(".git"))
            .arg(&other)
            .status()
            .unwrap();
        assert!(copied.success());
        std::fs::write(
            other.join("config"),
            format!(
                "[core]\n\trepositoryformatversion = 0\n[diff]\n\texternal = {e}\n[core]\n\tpager = {e}\n[gpg]\n\tprogram = {e}\n[log]\n\tshowSignature = true\n",
                e = evil.display()
            ),
        )
        .unwrap();
        match *layout {
            "commondir-space" => std::fs::write(cwd.join(".git/commondir"), "../evil \n").unwrap(),
            "commondir-bytes" => {
                use std::os::unix::ffi::OsStrExt;
                let raw = std::ffi::OsStr::from_bytes(b"evil\xff");
                std::os::unix::fs::symlink(&other, cwd.join(raw)).unwrap();
                std::fs::write(cwd.join(".git/commondir"), b"../evil\xff\n").unwrap();
            }
            _ => {
                std::fs::rename(cwd.join(".git"), cwd.join("realgit ")).unwrap();
                std::fs::write(cwd.join(".git"), "gitdir: realgit \n").unwrap();
            }
        }
        std::process::Command::new("chown")
            .args(["-R", &format!("{}:{}", eve.uid, eve.uid)])
            .arg(cwd)
            .status()
            .unwrap();
        for text in ["git diff", "git log", "git status"] {
            let _ = submit(&agent, &eve, cwd, text);
        }
        assert_never_ran(&agent, &eve, cwd, &marks, &[&id]);
    }
}

/// Found by the second round: deny rules read past abbreviations, commands inside an
/// argument, `~`/`$HOME`, globs, `cd`, and file actions.
#[test]
fn deny_rules_hold_in_yet_more_spellings() {
    let agent = Daemon::start();
    let eve = eve();
    let project = eve.project();
    let cwd = project.path();
    let up = vec![".."; eve.home.components().count()].join("/");
    for text in [
        "run: rm --recursiv --no-preserve-root --force /".to_owned(),
        "run: rm --recu -f /".to_owned(),
        "run: sh -c \"rm -r /\"".to_owned(),
        "run: bash -c \"rm -rf /\"".to_owned(),
        "run: env -S \"rm -r /\"".to_owned(),
        format!("$ rm -r ~/{up}"),
        format!("$ rm -r $HOME/{up}"),
        "$ rm -rf /*".to_owned(),
        "$ cd / && rm -r .".to_owned(),
        "delete /".to_owned(),
        "$ cd /boot; cat x".to_owned(),
    ] {
        assert_denied_by_rule(&agent, &eve, cwd, &text);
    }
}

/// Found by the second round: a linked worktree's `.git` file was writable, a bind
/// could be raced to another place, huge outputs took the agent off the bus, a
/// decision could be lost, outputs reached terminals raw, a half-written audit line
/// swallowed the next entry.
#[test]
fn the_second_round_stays_fixed() {
    let agent = Daemon::start_with("IMAGE_VERSION=1\n", "[sandbox]\ntimeout-secs = 20\n");
    let eve = eve();
    // A worktree's `.git` file stays as it is.
    let main = repo(&eve);
    let wt = eve.home.join(format!("devos-wt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&wt);
    git(
        &eve,
        main.path(),
        &["worktree", "add", "-q", &wt.to_string_lossy()],
    );
    eve.write(&wt.join("Makefile"), "test:\n\techo 'gitdir: .gd' > .git\n");
    let r = approved(&agent, &eve, &wt, "run the tests");
    assert_ne!(r["state"], "done", "{r}");
    assert!(
        std::fs::read_to_string(wt.join(".git"))
            .unwrap()
            .contains("worktrees")
    );
    let _ = std::fs::remove_dir_all(&wt);
    // Outputs the bus cannot carry are cut; the agent stays.
    let project = eve.project();
    let cwd = project.path();
    for _ in 0..3 {
        let (_, r) = submit(&agent, &eve, cwd, "run: head -c 3000000 /dev/zero");
        assert_eq!(r["state"], "done", "{r}");
        assert_eq!(r["actions"][0]["output-truncated"], true);
    }
    let out = agent.devos(Some(&eve), cwd, &["--json", "history"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        agent
            .devos(Some(&eve), cwd, &["run", "list", "files"])
            .status
            .success()
    );
    // Escape sequences in output are not passed on raw.
    eve.write(&cwd.join("esc.txt"), "before\u{1b}[2K\rafter\u{0}\n");
    let (_, r) = submit(&agent, &eve, cwd, "read esc.txt");
    let shown = r["actions"][0]["output"].as_str().unwrap();
    assert!(
        !shown.contains('\u{1b}') && !shown.contains('\r') && !shown.contains('\0'),
        "{shown:?}"
    );
    // Approving two actions quickly loses neither decision.
    let repo_dir = repo(&eve);
    for n in 0..4 {
        eve.write(&repo_dir.path().join("file.txt"), &format!("round {n}\n"));
        let out = agent.devos(
            Some(&eve),
            repo_dir.path(),
            &["run", &format!("commit with message \"m{n}\"")],
        );
        let id = waiting_id(&out);
        let first = std::thread::scope(|s| {
            let h = s.spawn(|| agent.devos(Some(&eve), repo_dir.path(), &["approve", &id, "0"]));
            std::thread::sleep(Duration::from_millis(30));
            let second = agent.devos(Some(&eve), repo_dir.path(), &["approve", &id, "1"]);
            (h.join().unwrap(), second)
        });
        assert!(first.0.status.success(), "{}", stderr(&first.0));
        // The second may come before the first is recorded; then it is refused and
        // given again.
        if !first.1.status.success() {
            assert!(wait_for(Duration::from_secs(10), || agent
                .devos(Some(&eve), repo_dir.path(), &["approve", &id, "1"])
                .status
                .success()));
        }
        agent.wait_state(&eve, repo_dir.path(), &id, "done");
    }
}

/// `text` is refused by a deny rule outright (not asked and then denied).
fn assert_denied_by_rule(agent: &Daemon, user: &User, cwd: &Path, text: &str) {
    let (asked, r) = submit(agent, user, cwd, text);
    assert!(!asked, "{text}: asked instead of refusing: {r}");
    assert_eq!(r["state"], "denied", "{text}: {r}");
    assert!(
        r["actions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["decision"]["by"]
                .as_str()
                .is_some_and(|b| b.contains("deny rule"))),
        "{text}: {r}"
    );
}

/// A copy of `cwd`'s git directory at `to` whose configuration runs `evil`.
fn evil_git_dir(cwd: &Path, to: &Path, evil: &Path) {
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(cwd.join(".git"))
        .arg(to)
        .status()
        .unwrap();
    assert!(copied.success());
    std::fs::write(to.join("config"), evil_config(evil)).unwrap();
}

fn evil_config(evil: &Path) -> String {
    format!(
        "[core]\n\trepositoryformatversion = 0\n\tfsmonitor = {e}\n\tpager = {e}\n[diff]\n\texternal = {e}\n[gpg]\n\tprogram = {e}\n[log]\n\tshowSignature = true\n",
        e = evil.display()
    )
}

/// Found by the third round of red-teaming: a `commondir` naming a directory with a
/// line break, and repositories another user can change — their configuration
/// replaced underneath the sandbox's reduced copy while git ran — had git run the
/// repository's programs without asking.
#[test]
fn git_runs_without_asking_only_in_repositories_nobody_else_can_change() {
    let agent = Daemon::start();
    let eve = eve();
    let marks = Marks::new();
    let chown = |path: &Path| {
        let ok = std::process::Command::new("chown")
            .args(["-R", &format!("{}:{}", eve.uid, eve.uid)])
            .arg(path)
            .status()
            .unwrap();
        assert!(ok.success());
    };
    // `commondir` names "evil<newline>" (a harmless copy); git, dropping trailing
    // line breaks, would go on to "evil".
    let project = repo(&eve);
    let cwd = project.path();
    let evil = payload(&eve, cwd, marks.path(), "newline");
    evil_git_dir(cwd, &cwd.join("evil"), &evil);
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(cwd.join(".git"))
        .arg(cwd.join("evil\n"))
        .status()
        .unwrap();
    assert!(copied.success());
    std::fs::write(cwd.join(".git/commondir"), "../evil\n/.\n").unwrap();
    chown(cwd);
    for text in ["git diff", "git log", "git status"] {
        let (asked, r) = submit(&agent, &eve, cwd, text);
        assert!(asked, "{text} ran without asking: {r}");
    }
    assert_never_ran(&agent, &eve, cwd, &marks, &["newline"]);

    // Another user may write the git directory, and replaces its configuration over
    // and over while eve's git runs.
    let project = repo(&eve);
    let cwd = project.path().to_path_buf();
    let evil = payload(&eve, &cwd, marks.path(), "shared");
    open_up(&cwd.join(".git"), 0o777);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let seen = std::thread::scope(|s| {
        s.spawn(|| {
            let fresh = cwd.join(".git/config.new");
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::fs::write(&fresh, evil_config(&evil)).unwrap();
                std::fs::rename(&fresh, cwd.join(".git/config")).unwrap();
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        // The writer stops however this ends, so that a failure ends the test.
        let _stop = StopOnDrop(&stop);
        ["git diff", "git log", "git status", "git diff", "git log"]
            .into_iter()
            .map(|text| (text, submit(&agent, &eve, &cwd, text)))
            .collect::<Vec<_>>()
    });
    for (text, (asked, r)) in seen {
        assert!(asked, "{text} ran without asking: {r}");
        assert!(
            r["actions"][0]["risk"]["reasons"]
                .to_string()
                .contains("others can change this repository"),
            "{r}"
        );
    }
    assert_never_ran(&agent, &eve, &cwd, &marks, &["shared"]);

    // Anyone may replace a directory above it: the same. A sticky one (as /tmp is)
    // lets nobody replace what is not theirs, and a group of eve's own is eve.
    for (mode, asks) in [(0o777, true), (0o1777, false)] {
        let above = tempfile::tempdir_in(&eve.home).unwrap();
        std::os::unix::fs::chown(above.path(), Some(eve.uid), Some(eve.uid)).unwrap();
        open_up(above.path(), mode);
        let inside = above.path().join("repo");
        std::fs::create_dir(&inside).unwrap();
        std::os::unix::fs::chown(&inside, Some(eve.uid), Some(eve.uid)).unwrap();
        eve.write(&inside.join("file.txt"), "one\n");
        git(&eve, &inside, &["init", "-q", "-b", "main"]);
        let (asked, r) = submit(&agent, &eve, &inside, "git status");
        assert_eq!(asked, asks, "below a {mode:o} directory: {r}");
    }
    let project = repo(&eve);
    open_up(&project.path().join(".git"), 0o775);
    let (asked, r) = submit(&agent, &eve, project.path(), "git status");
    assert!(!asked, "eve's own group made git ask: {r}");
    assert_eq!(r["state"], "done", "{r}");

    // Another user's repository, where eve may look: asked, as git would refuse it.
    let carol = User::ensure("devos-carol");
    let theirs = tempfile::tempdir_in("/srv").unwrap();
    open_up(theirs.path(), 0o755);
    std::os::unix::fs::chown(theirs.path(), Some(carol.uid), Some(carol.uid)).unwrap();
    carol.write(&theirs.path().join("file.txt"), "one\n");
    git(&carol, theirs.path(), &["init", "-q", "-b", "main"]);
    let (asked, r) = submit(&agent, &eve, theirs.path(), "git status");
    assert!(asked, "{r}");
}

/// Found by the third round: bubblewrap, as root, looked up the caller's paths and
/// said what it found — swapping a directory for a symlink into another user's
/// private directory told whether a name existed there. Paths are opened as the
/// caller, and what bubblewrap says goes to the journal only.
#[test]
fn the_sandbox_never_tells_the_caller_what_it_found_where_they_cannot_look() {
    // What bubblewrap says never reaches the caller.
    let fake = tempfile::tempdir().unwrap();
    open_up(fake.path(), 0o755);
    let bwrap = fake.path().join("bwrap");
    devos_tests::write_executable(
        &bwrap,
        "#!/bin/sh\necho \"bwrap: Can't find source path /srv/other/private/NAME-5e2a: No such file or directory\" >&2\nexit 1\n",
    );
    let agent = Daemon::start_with(
        "IMAGE_VERSION=1\n",
        &format!("[sandbox]\nbwrap = \"{}\"\n", bwrap.display()),
    );
    let eve = eve();
    let project = eve.project();
    let (_, r) = submit(&agent, &eve, project.path(), "list files");
    assert_eq!(r["state"], "failed", "{r}");
    let error = r["actions"][0]["error"].as_str().unwrap();
    assert!(error.contains("journal"), "{r}");
    assert_unseen(&agent, &eve, project.path(), &["NAME-5e2a", "/srv/other"]);
    drop(agent);

    // The race itself: eve's working directory flips between a directory and a
    // symlink into carol's private directory while the sandbox is built. Whatever
    // happens, nothing eve sees depends on what carol's directory holds.
    let agent = Daemon::start();
    let carol = User::ensure("devos-carol");
    let private = tempfile::tempdir_in("/srv").unwrap();
    std::os::unix::fs::chown(private.path(), Some(carol.uid), Some(carol.uid)).unwrap();
    open_up(private.path(), 0o700);
    std::fs::create_dir(private.path().join("there-77c1")).unwrap();
    let probe = eve.project();
    let w = probe.path().join("w");
    let link = probe.path().join("wl");
    let mut seen = std::collections::BTreeMap::new();
    for name in ["there-77c1", "absent-77c1"] {
        std::fs::create_dir(&w).unwrap();
        std::os::unix::fs::chown(&w, Some(eve.uid), Some(eve.uid)).unwrap();
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(private.path().join(name), &link).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let outcomes: Vec<String> = std::thread::scope(|s| {
            s.spawn(|| {
                use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = renameat2(AT_FDCWD, &w, AT_FDCWD, &link, RenameFlags::RENAME_EXCHANGE);
                    std::thread::sleep(Duration::from_millis(3));
                }
            });
            let _stop = StopOnDrop(&stop);
            (0..12)
                .map(|_| {
                    let out = agent.devos(
                        Some(&eve),
                        Path::new("/"),
                        &["--json", "run", "--cwd", &w.to_string_lossy(), "run: true"],
                    );
                    let text = format!("{}{}", stdout(&out), stderr(&out));
                    assert!(
                        !text.contains(name) && !text.contains(&*private.path().to_string_lossy()),
                        "{text}"
                    );
                    match serde_json::from_slice::<serde_json::Value>(&out.stdout) {
                        Ok(r) => format!("{} {}", r["state"], r["actions"][0]["error"]),
                        Err(_) => format!("refused: {}", stderr(&out)),
                    }
                })
                .collect()
        });
        if std::fs::symlink_metadata(&w).is_ok_and(|m| m.file_type().is_symlink()) {
            std::fs::remove_file(&w).unwrap();
            std::fs::remove_dir(&link).unwrap();
        } else {
            std::fs::remove_dir(&w).unwrap();
        }
        seen.insert(name, outcomes);
    }
    // Every failure reads the same, wherever the symlink led.
    for outcomes in seen.values() {
        for o in outcomes {
            assert!(
                o.starts_with("\"done\"")
                    || o.contains("bubblewrap failed, or a place the action works in changed")
                    || o.contains("Permission denied")
                    || o.contains("EACCES"),
                "{seen:?}"
            );
        }
    }
    assert_unseen(&agent, &eve, probe.path(), &["there-77c1", "absent-77c1"]);
}

/// Found by the third round: deny rules read a command as spelled, so a shell
/// variable, a substitution, `xargs` or `find` carried a denied command past them.
/// Part of a command only known when it runs could be the denied one: refused, and
/// the refusal says to spell it out. Commands that could not be one run as before.
#[test]
fn deny_rules_hold_when_part_of_a_command_is_only_known_when_it_runs() {
    let agent = Daemon::start();
    let eve = eve();
    let project = eve.project();
    let cwd = project.path();
    for text in [
        "$ X=/; rm -r $X",
        "$ rm -r ${X:-/}",
        "$ R=rm; $R -r /",
        "$ env $R -r /",
        "$ rm -r $(dirname /x)",
        "$ rm -r `dirname /x`",
        "$ echo / | xargs rm -r",
        "$ find / -maxdepth 0 -exec rm -r {} +",
        "$ find / -delete",
    ] {
        assert_denied_by_rule(&agent, &eve, cwd, text);
    }
    let (_, r) = submit(&agent, &eve, cwd, "$ X=/; rm -r $X");
    assert!(
        r["actions"][0]["decision"]["reason"]
            .as_str()
            .unwrap()
            .contains("spell the command out"),
        "{r}"
    );
    for text in ["$ echo $PATH", "$ ls $HOME", "$ echo a | xargs echo"] {
        let r = approved(&agent, &eve, cwd, text);
        assert_eq!(r["state"], "done", "{text}: {r}");
    }
}

/// Found by the third round: a line break in the working directory split what the
/// sandbox reported, `~/bin` and Python's user site stayed writable with the home,
/// bidirectional overrides reached terminals, a huge path prefix kept the agent busy,
/// and a history of large requests was read whole.
#[test]
fn the_third_round_stays_fixed() {
    let agent = Daemon::start();
    // (Her own: a Makefile in the home is written and removed here.)
    let eve = attacker("devos-rt3");
    // A line break in the working directory.
    let dir = eve.home.join(format!("devos-nl-{}\nx", std::process::id()));
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(eve.uid), Some(eve.uid)).unwrap();
    let (_, r) = submit(&agent, &eve, &dir, "list files");
    assert_eq!(r["state"], "done", "{r}");
    assert!(
        r["actions"][0]["sandbox"]
            .as_str()
            .unwrap()
            .contains("seccomp"),
        "{r}"
    );
    assert!(
        !r["actions"][0]["output"]
            .as_str()
            .unwrap()
            .contains("seccomp"),
        "{r}"
    );
    std::fs::remove_dir(&dir).unwrap();
    // No descriptor of the stages before (bubblewrap's, the caller's directories
    // opened for it) reaches the action: `ls` sees its standard three and its own.
    let r = approved(&agent, &eve, &eve.home, "run: ls /proc/self/fd");
    let fds: Vec<&str> = r["actions"][0]["output"]
        .as_str()
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(fds, ["0", "1", "2", "3"], "{r}");
    // What runs later from the home stays as it is.
    for d in ["bin", ".local/lib/python3/site-packages"] {
        std::fs::create_dir_all(eve.home.join(d)).unwrap();
    }
    let chowned = std::process::Command::new("chown")
        .args(["-R", &format!("{}:{}", eve.uid, eve.uid)])
        .arg(eve.home.join("bin"))
        .arg(eve.home.join(".local"))
        .status()
        .unwrap();
    assert!(chowned.success());
    eve.write(
        &eve.home.join("Makefile"),
        "test:\n\techo x > bin/ls; echo 'import os' > .local/lib/python3/site-packages/x.pth\n",
    );
    let _ = approved(&agent, &eve, &eve.home, "run the tests");
    std::fs::remove_file(eve.home.join("Makefile")).unwrap();
    assert!(!eve.home.join("bin/ls").exists(), "~/bin was written");
    assert!(
        !eve.home
            .join(".local/lib/python3/site-packages/x.pth")
            .exists(),
        "Python's user site was written"
    );
    // Bidirectional overrides are not passed on.
    let project = eve.project();
    let cwd = project.path();
    eve.write(&cwd.join("bidi.txt"), "abc\u{202E}fed\u{2066}x\u{2069}\n");
    let (_, r) = submit(&agent, &eve, cwd, "read bidi.txt");
    let shown = r["actions"][0]["output"].as_str().unwrap();
    assert!(
        !shown.contains('\u{202E}') && !shown.contains('\u{2066}'),
        "{shown:?}"
    );
    // A path prefix longer than any path is refused before anything resolves it.
    let long = format!("/{}", "a/".repeat(3000));
    let out = agent.devos(
        Some(&eve),
        cwd,
        &["rules", "add", "allow", "--path-prefix", &long],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("at most 4096 bytes"),
        "{}",
        stderr(&out)
    );
    // A history of large requests is listed in short form, whatever it holds.
    for _ in 0..20 {
        let (_, r) = submit(&agent, &eve, cwd, "run: head -c 2000000 /dev/zero");
        assert_eq!(r["state"], "done", "{r}");
    }
    let out = agent.devos(Some(&eve), cwd, &["--json", "history", "-n", "10000"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(out.stdout.len() < 2 << 20, "{} bytes", out.stdout.len());
}

/// Entries of the home come and go while their owner works. One removed while an
/// action that writes the home is being sandboxed (between the listing of the home
/// and bubblewrap's mounts) fails nothing: the action runs without it.
#[test]
fn an_entry_of_the_home_removed_while_an_action_starts_fails_nothing() {
    let agent = Daemon::start();
    let eve = eve();
    for n in 0..16u64 {
        let going = eve
            .home
            .join(format!("devos-going-{}-{n}", std::process::id()));
        std::fs::create_dir(&going).unwrap();
        std::os::unix::fs::chown(&going, Some(eve.uid), Some(eve.uid)).unwrap();
        let out = agent.devos(Some(&eve), &eve.home, &["run", "run: ls -d /proc/self/cwd"]);
        let id = waiting_id(&out);
        let r = std::thread::scope(|s| {
            // Removed at a different moment of the set-up each round.
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(n * 6));
                std::fs::remove_dir(&going).unwrap();
            });
            let out = agent.devos(Some(&eve), &eve.home, &["approve", &id]);
            assert!(out.status.success(), "{}", stderr(&out));
            agent.wait_state(&eve, &eve.home, &id, "done")
        });
        assert_eq!(r["actions"][0]["output"], "/proc/self/cwd\n", "{r}");
        assert!(
            r["actions"][0]["profile"]
                .as_str()
                .unwrap()
                .starts_with("writes"),
            "{r}"
        );
        assert!(!going.exists());
    }
}

/// What the sandbox applied is said on a pipe of its own, closed before the action
/// starts: nothing the action writes (on stderr, where that line once came first) is
/// taken for it, and an action that ran is never recorded as one that did not. (Its
/// stderr cannot be read back through `/proc/self/fd/2` either: the agent's pipes are
/// root's.)
#[test]
fn an_action_cannot_say_what_its_sandbox_applied_nor_hide_that_it_ran() {
    let agent = Daemon::start();
    let eve = eve();
    let project = eve.project();
    let cwd = project.path();
    let r = approved(
        &agent,
        &eve,
        cwd,
        "run: sh -c \"echo ran >> runs; timeout 2 head -c 100000 /proc/self/fd/2 > /dev/null; echo 'devos-sandbox: FORGED, no sandbox' >&2; exit 3\"",
    );
    let action = &r["actions"][0];
    let applied = action["sandbox"].as_str().unwrap_or_default();
    assert!(
        applied.contains("seccomp") && !applied.contains("FORGED"),
        "{r}"
    );
    assert_eq!(action["exit-code"], 3, "{r}");
    assert!(action["output"].as_str().unwrap().contains("FORGED"), "{r}");
    assert_eq!(std::fs::read_to_string(cwd.join("runs")).unwrap(), "ran\n");
}

/// The inner stage alone, as bubblewrap would start it but in a mount namespace of
/// its own, covering `covers` and then running `script` as `user` in `cwd`.
fn inner_stage(
    user: &User,
    cwd: &Path,
    covers: Vec<devos_agent::sandbox::Cover>,
    script: &str,
) -> std::process::Output {
    inner_stage_after("true", Vec::new(), user, cwd, covers, script)
}

/// [`inner_stage`] after the shell command `before` ran in its mount namespace (as
/// bubblewrap's mounts would), with `stand_ins` where it put file systems of its own.
fn inner_stage_after(
    before: &str,
    stand_ins: Vec<PathBuf>,
    user: &User,
    cwd: &Path,
    covers: Vec<devos_agent::sandbox::Cover>,
    script: &str,
) -> std::process::Output {
    let spec = devos_agent::sandbox::Inner {
        uid: user.uid,
        gid: user.uid,
        groups: vec![user.uid],
        user: user.name.clone(),
        as_root: false,
        cwd: cwd.to_path_buf(),
        action: devos_agent::action::Action::Run {
            argv: vec!["sh".into(), "-c".into(), script.into()],
        },
        program: Some(PathBuf::from("/bin/sh")),
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        writable: vec![cwd.to_path_buf()],
        identities: Vec::new(),
        covers,
        stand_ins,
        network: false,
        required: false,
        limits: devos_agent::sandbox::Limits {
            cpu_secs: 60,
            max_file_mib: 16,
            max_open_files: 256,
        },
        outer: "test".into(),
        // (What it applied comes on stderr here.)
        status_fd: 2,
    };
    let mut child = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(format!("{before} && exec {AGENT} sandbox-exec --inside"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&serde_json::to_vec(&spec).unwrap())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn covers_land_on_the_place_checked_or_nothing_runs() {
    use devos_agent::sandbox::Cover;
    let eve = eve();
    let project = eve.project();
    let cwd = project.path();
    let elsewhere = tempfile::tempdir().unwrap();
    // As the outer stage makes them, but without what it found there: the way to
    // these places is changed after it looked, below.
    let cover = |path: PathBuf, dir: bool| Cover {
        path,
        dir,
        read_only: true,
        id: None,
    };
    // What the outer stage saw: `way/key` and `way/keys/` hidden there. By the time the
    // inner stage covers them, eve has swapped `way` for a link to a directory of
    // root's where neither exists: root must neither mount there nor make them (as
    // bubblewrap, which finds a mount's place by name, once did).
    std::os::unix::fs::symlink(elsewhere.path(), cwd.join("way")).unwrap();
    eve.write(&cwd.join("key"), "EVEKEY-5e1f\n");
    std::os::unix::fs::symlink(elsewhere.path().join("key"), cwd.join("linked-key")).unwrap();
    std::fs::create_dir(cwd.join("keys")).unwrap();
    for (covers, what) in [
        (
            vec![cover(cwd.join("way/key"), false)],
            "a file beyond a link",
        ),
        (
            vec![cover(cwd.join("way/keys/a"), true)],
            "a directory beyond a link",
        ),
        (vec![cover(cwd.join("linked-key"), false)], "a link itself"),
        (
            vec![cover(cwd.join("key"), true)],
            "a file where a directory was",
        ),
        (
            vec![cover(cwd.join("keys"), false)],
            "a directory where a file was",
        ),
        (
            vec![cover(cwd.join("gone"), false)],
            "a place taken away since",
        ),
    ] {
        let out = inner_stage(&eve, cwd, covers, "echo RAN");
        assert_eq!(out.status.code(), Some(124), "{what}: {out:?}");
        assert!(
            stderr(&out).contains("changed between its check and the sandbox"),
            "{what}: {}",
            stderr(&out)
        );
        assert!(!stdout(&out).contains("RAN"), "{what}: the action ran");
        let made: Vec<_> = std::fs::read_dir(elsewhere.path()).unwrap().collect();
        assert!(
            made.is_empty(),
            "{what}: root made {made:?} through the link"
        );
    }
    // What the outer stage found there is what is covered: a place swapped for
    // another directory, or moved out of a directory the action sees (to come back
    // once it runs), refuses the action; one below a place hidden inside (a
    // different directory there) has nothing to hide.
    let looked = Cover::of(cwd.join("keys"), true, true).unwrap();
    std::fs::rename(cwd.join("keys"), cwd.join("keys.away")).unwrap();
    let out = inner_stage(&eve, cwd, vec![looked.clone()], "echo RAN");
    assert!(
        stderr(&out).contains("changed between"),
        "moved away: {out:?}"
    );
    std::fs::create_dir(cwd.join("keys")).unwrap();
    let out = inner_stage(&eve, cwd, vec![looked.clone()], "echo RAN");
    assert!(
        stderr(&out).contains("changed between"),
        "replaced: {out:?}"
    );
    std::fs::remove_dir(cwd.join("keys")).unwrap();
    std::fs::rename(cwd.join("keys.away"), cwd.join("keys")).unwrap();
    let hide = format!("mount -t tmpfs none {}", cwd.display());
    let stand_ins = vec![cwd.to_path_buf()];
    let out = inner_stage_after(&hide, stand_ins, &eve, cwd, vec![looked], "echo RAN");
    assert!(
        stdout(&out).contains("RAN"),
        "below a hidden place: {out:?}"
    );
    // The place itself replaced by such a stand-in (a rule on `/root`): nothing of it
    // is there to hide.
    let looked = Cover::of(cwd.join("keys"), true, true).unwrap();
    let hide = format!("mount -t tmpfs none {}/keys", cwd.display());
    let stand_ins = vec![cwd.join("keys")];
    let out = inner_stage_after(&hide, stand_ins, &eve, cwd, vec![looked], "echo RAN");
    assert!(
        stdout(&out).contains("RAN"),
        "replaced by a stand-in: {out:?}"
    );
    // Its directory swapped for a new one, to be swapped back once the action runs.
    std::fs::create_dir_all(cwd.join("sub/keys")).unwrap();
    let looked = Cover::of(cwd.join("sub/keys"), true, true).unwrap();
    std::fs::rename(cwd.join("sub"), cwd.join("sub.old")).unwrap();
    std::fs::create_dir(cwd.join("sub")).unwrap();
    let out = inner_stage(&eve, cwd, vec![looked], "echo RAN");
    assert!(
        stderr(&out).contains("changed between"),
        "parent swapped: {out:?}"
    );
    // On the places themselves: the file is /dev/null, the directory empty and
    // read-only, one in a directory of
    // root's that eve cannot enter (as a deny rule may name) is covered all the same,
    // and nothing of the covering's power is left to the action.
    eve.write(&cwd.join("keys/a"), "EVEKEY-5e1f\n");
    std::fs::create_dir(elsewhere.path().join("data")).unwrap();
    let out = inner_stage(
        &eve,
        cwd,
        vec![
            cover(cwd.join("key"), false),
            cover(cwd.join("keys"), true),
            cover(elsewhere.path().join("data"), true),
        ],
        "cat key; ls -A keys; touch keys/new || echo READ-ONLY; grep ^Cap /proc/self/status",
    );
    assert!(out.status.success(), "{out:?}");
    let seen = stdout(&out);
    assert!(!seen.contains("EVEKEY"), "{seen}");
    assert!(seen.contains("READ-ONLY"), "{seen}");
    assert_no_capabilities(&seen);
    assert_eq!(
        std::fs::read_to_string(cwd.join("key")).unwrap(),
        "EVEKEY-5e1f\n"
    );
    // Through the agent and bubblewrap, which give this stage what covering needs:
    // none of it reaches an action, eve's or root's, with a secret location covered
    // in the home they work in.
    let agent = Daemon::start();
    let roots = tempfile::tempdir_in("/root").unwrap();
    let made_ssh = std::fs::create_dir("/root/.ssh").is_ok();
    for (user, cwd) in [(Some(&eve), eve.home.as_path()), (None, roots.path())] {
        let r = approved_as(&agent, user, cwd, "run: grep ^Cap /proc/self/status");
        assert_eq!(r["state"], "done", "{r}");
        assert!(
            r["actions"][0]["sandbox"]
                .as_str()
                .unwrap()
                .contains("secret locations hidden"),
            "{r}"
        );
        assert_no_capabilities(r["actions"][0]["output"].as_str().unwrap());
    }
    if made_ssh {
        std::fs::remove_dir("/root/.ssh").unwrap();
    }
}

/// `status` (of `grep ^Cap /proc/self/status`) shows no capability in any set.
fn assert_no_capabilities(status: &str) {
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert!(
            status.contains(&format!("{set}:\t0000000000000000")),
            "{set}: {status}"
        );
    }
}

/// `user` adds a deny rule for argv starting with `prefix`, for `lifetime`.
fn deny_rule(agent: &Daemon, user: &User, cwd: &Path, lifetime: &str, prefix: &[&str]) {
    let mut args = vec![
        "rules",
        "add",
        "deny",
        "--lifetime",
        lifetime,
        "--command-prefix",
    ];
    args.extend_from_slice(prefix);
    let out = agent.devos(Some(user), cwd, &args);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// The number of `event` entries in the audit log of `agent`.
fn audit_events(agent: &Daemon, event: &str) -> usize {
    let log = std::fs::read_to_string(agent.state().join("audit/log-000001.jsonl")).unwrap();
    log.lines()
        .filter(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["event"] == event)
        .count()
}

#[test]
fn a_second_agent_on_the_same_state_directory_changes_nothing() {
    let agent = Daemon::start();
    let eve = eve();
    let project = eve.project();
    let cwd = project.path();
    // What a second agent's start would undo: a request waiting for approval and a
    // rule for the session.
    let id = waiting_id(&agent.devos(Some(&eve), cwd, &["run", "create directory kept"]));
    deny_rule(&agent, &eve, cwd, "session", &["curl"]);

    // An administrator starts another agent on the same configuration.
    let mut second = std::process::Command::new(AGENT);
    second
        .arg("--config")
        .arg(&agent.config)
        .arg("serve")
        .env("DBUS_SYSTEM_BUS_ADDRESS", &agent.bus.address)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stdin(std::process::Stdio::null());
    let out = run_with_timeout(&mut second, Duration::from_secs(20)).unwrap();
    assert!(!out.status.success(), "a second agent ran");
    let lock = agent.state().join("agent.lock");
    assert!(
        stderr(&out).contains(&lock.display().to_string())
            && stderr(&out).contains("another devos-agent"),
        "{}",
        stderr(&out)
    );

    // It changed nothing: the request still waits, the rule is still there, the
    // audit chain has one start and verifies; the first agent goes on.
    let r = json(&agent.devos(Some(&eve), cwd, &["--json", "show", &id]));
    assert_eq!(r["state"], "awaiting-approval", "{r}");
    let rules = json(&agent.devos(Some(&eve), cwd, &["--json", "rules"]));
    assert_eq!(rules.as_array().unwrap().len(), 1, "{rules}");
    assert_eq!(audit_events(&agent, "agent.started"), 1);
    let v = json(&agent.devos(None, cwd, &["--json", "audit", "verify"]));
    assert_eq!(v["ok"], true, "{v}");
    agent.approve_and_wait(&eve, cwd, &id, "done");
    assert!(cwd.join("kept").is_dir());
}

/// `user`'s request `id` once `done(request)` holds (20 s at most).
fn wait_until(
    agent: &Daemon,
    user: &User,
    cwd: &Path,
    id: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let reached = wait_for(Duration::from_secs(20), || {
        last = json(&agent.devos(Some(user), cwd, &["--json", "show", id]));
        done(&last)
    });
    assert!(reached, "request {id} did not get there: {last}");
    last
}

#[test]
fn a_deny_rule_reloaded_after_planning_holds_for_requests_already_waiting() {
    let agent = Daemon::start();
    let eve = eve();
    let project = eve.project();
    let cwd = project.path();
    // Planned and waiting for eve's approval...
    let id = waiting_id(&agent.devos(Some(&eve), cwd, &["run", "create directory late"]));
    // ...when root denies it and reloads the configuration.
    reload_with(
        &agent,
        "[[policy.deny]]\ncommand-prefix = [\"mkdir\"]\nreason = \"no new directories today\"\n",
    );
    assert_denied_by_rule(&agent, &eve, cwd, "create directory fresh");
    // Eve's approval does not outrun it: nothing runs, and the request says why.
    let out = agent.devos(Some(&eve), cwd, &["approve", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let r = agent.wait_state(&eve, cwd, &id, "denied");
    assert!(!cwd.join("late").exists(), "the denied action ran: {r}");
    let decision = &r["actions"][0]["decision"];
    assert_eq!(decision["decision"], "denied", "{r}");
    assert!(
        decision["by"].as_str().unwrap().contains("deny rule")
            && decision["reason"] == "no new directories today",
        "{r}"
    );
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("no new directories today"),
        "{r}"
    );
    assert_eq!(audit_events(&agent, "action.started"), 0);
    let v = json(&agent.devos(None, cwd, &["--json", "audit", "verify"]));
    assert_eq!(v["ok"], true, "{v}");
}

/// Who is an administrator is looked up again when an action starts: a package install
/// planned while eve was in an admin group is refused once she is not, however she
/// approves it.
#[test]
fn an_administrator_no_longer_one_cannot_approve_what_was_planned_before() {
    let agent = Daemon::start();
    let eve = attacker("devos-ada");
    let project = eve.project();
    let cwd = project.path();
    let group = "devos-atk-admins";
    let _ = std::process::Command::new("groupadd").arg(group).status();
    let member = |how: &str| {
        let done = std::process::Command::new("gpasswd")
            .args([how, &eve.name, group])
            .output()
            .unwrap();
        assert!(done.status.success(), "{}", stderr(&done));
    };
    member("-a");
    reload_with(&agent, &format!("[policy]\nadmin-groups = [\"{group}\"]\n"));
    // As an administrator, her install asks (it would run as root once approved)...
    let id = waiting_id(&agent.devos(Some(&eve), cwd, &["run", "install devos-no-such-package"]));
    // ...and then she is one no longer.
    member("-d");
    let out = agent.devos(Some(&eve), cwd, &["approve", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let r = agent.wait_state(&eve, cwd, &id, "denied");
    assert!(
        r["actions"][0]["decision"]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("needs an administrator"),
        "{r}"
    );
    assert_eq!(audit_events(&agent, "action.started"), 0);
}

#[test]
fn an_approval_given_without_asking_is_asked_again_when_it_no_longer_holds() {
    let agent = Daemon::start();
    let eve = eve();
    let project = repo(&eve);
    let cwd = project.path();
    let commits = || {
        let out = sh(&eve, cwd, "git log --oneline | wc -l");
        stdout(&out).trim().parse::<u32>().unwrap()
    };
    // Eve commits once, and remembers the commit itself.
    let id = waiting_id(&agent.devos(Some(&eve), cwd, &["run", "commit with message \"x\""]));
    agent.approve_and_wait(&eve, cwd, &id, "awaiting-approval");
    let out = agent.devos(
        Some(&eve),
        cwd,
        &["approve", &id, "1", "--remember", "always"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    agent.wait_state(&eve, cwd, &id, "done");
    assert_eq!(commits(), 2);

    // The same commit again: its `git add` asks, its commit is approved by the rule.
    eve.write(&cwd.join("file.txt"), "three\n");
    let id = waiting_id(&agent.devos(Some(&eve), cwd, &["run", "commit with message \"x\""]));
    let r = json(&agent.devos(Some(&eve), cwd, &["--json", "show", &id]));
    let by = r["actions"][1]["decision"]["by"]
        .as_str()
        .unwrap_or_default();
    assert!(by.starts_with("remembered rule"), "{r}");
    // While the `git add` waits, eve removes the rule; then approves the `git add`.
    let rules = json(&agent.devos(Some(&eve), cwd, &["--json", "rules"]));
    let rule = rules[0]["id"].as_i64().unwrap().to_string();
    let out = agent.devos(Some(&eve), cwd, &["rules", "remove", &rule]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = agent.devos(Some(&eve), cwd, &["approve", &id, "0"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The commit is asked for again instead of running on the rule that is gone.
    let r = wait_until(&agent, &eve, cwd, &id, |r| {
        r["actions"][0]["state"] == "succeeded" && r["state"] != "running"
    });
    assert_eq!(r["state"], "awaiting-approval", "{r}");
    assert_eq!(r["actions"][1]["decision"]["decision"], "ask", "{r}");
    assert_eq!(commits(), 2, "the commit ran on a removed rule");
    agent.approve_and_wait(&eve, cwd, &id, "done");
    assert_eq!(commits(), 3);
}

/// A remembered deny rule on `git commit` holds however git is told to commit — with
/// a global option in front too — where commits otherwise run without asking. Was a
/// finding: a remembered deny rule matched only an argv that started with its words,
/// so `git --no-pager commit` got past it and, auto-approved, ran.
#[test]
fn a_remembered_deny_rule_holds_whatever_global_options_come_first() {
    let agent = Daemon::start();
    // A user of her own: her policy must not reach the other tests.
    let eve = attacker("devos-dora");
    // She lets writes in her working directory (commits among them) run unasked...
    eve.write_policy("auto-approve = ['writes-workdir']\n");
    let project = repo(&eve);
    let cwd = project.path();
    let commits = || {
        let out = sh(&eve, cwd, "git log --oneline | wc -l");
        stdout(&out).trim().parse::<u32>().unwrap()
    };
    let (asked, r) = submit(&agent, &eve, cwd, "run: git --no-pager commit -a -m one");
    assert!(!asked && r["state"] == "done", "{r}");
    assert_eq!(commits(), 2);
    // ...but never a commit, she says.
    deny_rule(&agent, &eve, cwd, "always", &["git", "commit"]);
    eve.write(&cwd.join("file.txt"), "three\n");
    for text in [
        "run: git commit -a -m two",
        "run: git --no-pager commit -a -m two",
        "run: git -P commit -a -m two",
        "run: git --no-optional-locks --no-pager commit -a -m two",
    ] {
        let (asked, r) = submit(&agent, &eve, cwd, text);
        assert!(!asked, "{text}: asked instead of refusing: {r}");
        assert_eq!(r["state"], "denied", "{text}: {r}");
        let by = r["actions"][0]["decision"]["by"]
            .as_str()
            .unwrap_or_default();
        assert!(by.starts_with("remembered rule"), "{text}: {r}");
    }
    assert_eq!(commits(), 2, "a commit ran past the deny rule");
    // Other git commands still run.
    let (asked, r) = submit(&agent, &eve, cwd, "run: git --no-pager status");
    assert!(!asked && r["state"] == "done", "{r}");
}

/// What reaches a secret location never runs on its class alone: with `network`
/// auto-approved, a network action runs unasked, but `ssh` and network git (which get
/// `~/.ssh`) ask.
#[test]
fn an_action_reaching_a_secret_asks_even_where_its_class_is_auto_approved() {
    let agent = Daemon::start_with(
        "IMAGE_VERSION=1.0\n",
        "[policy]\nauto-approve = ['read-only', 'network']\n",
    );
    let eve = eve();
    let project = repo(&eve);
    let cwd = project.path();
    let (asked, r) = submit(&agent, &eve, cwd, "run: curl -s https://example.invalid");
    assert!(
        !asked,
        "a network action asked where network is auto-approved: {r}"
    );
    for text in ["run: ssh example.invalid true", "run: git fetch --all"] {
        let (asked, r) = submit(&agent, &eve, cwd, text);
        assert!(asked, "{text} ran unasked with her SSH keys: {r}");
        assert_eq!(r["actions"][0]["output"].as_str().unwrap_or(""), "", "{r}");
    }
}

/// A request with any denied action runs nothing: the first action of a two-action
/// plan (`git add --all`, then `git commit`) is auto-approved, the second denied by a
/// rule, and the first never runs.
#[test]
fn a_request_with_a_denied_action_runs_none_of_its_actions() {
    let agent = Daemon::start_with(
        "IMAGE_VERSION=1.0\n",
        "[policy]\nauto-approve = ['read-only', 'writes-workdir']\n",
    );
    let eve = eve();
    let project = repo(&eve);
    let cwd = project.path();
    deny_rule(&agent, &eve, cwd, "always", &["git", "commit"]);
    eve.write(&cwd.join("new.txt"), "new\n");
    let (asked, r) = submit(&agent, &eve, cwd, "commit with message \"x\"");
    assert!(!asked, "{r}");
    assert_eq!(r["state"], "denied", "{r}");
    assert_eq!(r["actions"].as_array().unwrap().len(), 2, "{r}");
    // (Its own decision was policy's: only the request's other action stopped it.)
    let add = &r["actions"][0]["decision"];
    assert!(
        add["decision"] == "approved" && add["by"].as_str().unwrap().starts_with("policy"),
        "the `git add` was not auto-approved, so this proves nothing: {r}"
    );
    let status = stdout(&sh(&eve, cwd, "git status --porcelain"));
    assert!(
        status.contains("?? new.txt"),
        "the `git add` of a denied request ran: {status}"
    );
}

/// System places are never writable, whatever was approved and whoever approved it:
/// root's own `create directory x` in a directory under `/var/lib`, approved, makes
/// nothing (root's actions other than package installs run as uid 0 with no
/// capability, on a read-only system).
#[test]
fn a_system_place_is_not_writable_even_to_roots_approved_actions() {
    let agent = Daemon::start();
    let place = tempfile::tempdir_in("/var/lib").unwrap();
    let cwd = place.path();
    let r = approved_as(&agent, None, cwd, "create directory x");
    assert_eq!(r["actions"][0]["risk"]["class"], "privileged", "{r}");
    assert_eq!(r["state"], "failed", "{r}");
    assert!(
        !cwd.join("x").exists(),
        "root's action wrote below /var/lib: {r}"
    );
}

/// A prefix rule is a standing approval, checked against `user-may-auto-approve` each
/// time it is used: when the administrator narrows the list, rules made before
/// approve no more than it allows, read-only ones included.
#[test]
fn a_prefix_rule_holds_only_while_the_administrator_lets_its_class_stand() {
    let agent = Daemon::start();
    let config = std::fs::read_to_string(&agent.config).unwrap();
    let reload_policy = |table: &str| {
        std::fs::write(&agent.config, format!("{config}\n[policy]\n{table}")).unwrap();
        let out = bus_call(&agent, None, "org.devos.Agent1.Admin", &["ReloadConfig"]);
        assert!(out.status.success(), "{}", stderr(&out));
    };
    let eve = eve();
    let project = eve.project();
    let cwd = project.path();
    // Nothing runs on the policy alone: only her rules approve.
    reload_policy("auto-approve = []\n");
    for prefix in ["mkdir", "ls"] {
        let out = agent.devos(
            Some(&eve),
            cwd,
            &["rules", "add", "allow", "--command-prefix", prefix],
        );
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let (asked, r) = submit(&agent, &eve, cwd, "run: mkdir x");
    assert!(!asked && r["state"] == "done", "the rule did not hold: {r}");
    reload_policy("auto-approve = []\nuser-may-auto-approve = ['read-only']\n");
    let (asked, r) = submit(&agent, &eve, cwd, "run: mkdir y");
    assert!(
        asked,
        "a writes-workdir prefix rule outlived its class: {r}"
    );
    assert!(!cwd.join("y").exists());
    let (asked, r) = submit(&agent, &eve, cwd, "run: ls");
    assert!(!asked && r["state"] == "done", "{r}");
    reload_policy("auto-approve = []\nuser-may-auto-approve = []\n");
    let (asked, r) = submit(&agent, &eve, cwd, "run: ls");
    assert!(asked, "a read-only prefix rule outlived its class: {r}");
    // Nor may she add one now, nor while the list names only classes no prefix rule
    // may cover; the refusal says so.
    for listed in ["[]", "['destructive']"] {
        reload_policy(&format!(
            "auto-approve = []\nuser-may-auto-approve = {listed}\n"
        ));
        let out = agent.devos(
            Some(&eve),
            cwd,
            &["rules", "add", "allow", "--command-prefix", "cat"],
        );
        assert!(!out.status.success(), "{listed}: {}", stdout(&out));
        assert!(
            stderr(&out).contains("names none of read-only, writes-workdir, network"),
            "{listed}: {}",
            stderr(&out)
        );
    }
}

/// `ReloadConfig` with an invalid file is refused and the configuration in force
/// stays: the administrator's deny rule still denies.
#[test]
fn an_invalid_configuration_is_refused_on_reload_and_the_old_one_kept() {
    let agent = Daemon::start_with(
        "IMAGE_VERSION=1.0\n",
        "[[policy.deny]]\ncommand-prefix = [\"mkdir\"]\nreason = \"no new directories\"\n",
    );
    let eve = eve();
    let project = eve.project();
    let cwd = project.path();
    assert_denied_by_rule(&agent, &eve, cwd, "create directory before");
    let config = std::fs::read_to_string(&agent.config).unwrap();
    for invalid in [
        // A table the agent does not know, a value of the wrong type, no TOML.
        "[policy.limits-that-do-not-exist]\n",
        "[limits]\nrequests-per-user = \"many\"\n",
        "this is not TOML\n",
    ] {
        std::fs::write(&agent.config, format!("{config}\n{invalid}")).unwrap();
        let out = bus_call(&agent, None, "org.devos.Agent1.Admin", &["ReloadConfig"]);
        assert!(!out.status.success(), "{invalid}: the reload was accepted");
        assert_denied_by_rule(&agent, &eve, cwd, "create directory after");
    }
    assert!(!cwd.join("before").exists() && !cwd.join("after").exists());
    // The agent's policy may not list `unknown`, even where it parses.
    std::fs::write(
        &agent.config,
        config.replace(
            "[[policy.deny]]",
            "[policy]\nauto-approve = ['read-only', 'unknown']\n\n[[policy.deny]]",
        ),
    )
    .unwrap();
    let out = bus_call(&agent, None, "org.devos.Agent1.Admin", &["ReloadConfig"]);
    assert!(!out.status.success(), "a policy auto-approving unknown");
    assert!(stderr(&out).contains("auto-approve"), "{}", stderr(&out));
    let (asked, r) = submit(&agent, &eve, cwd, "run: python3 -c print(1)");
    assert!(asked, "{r}");
    assert_denied_by_rule(&agent, &eve, cwd, "create directory after");
}

/// An install that cannot be recorded before it starts (`update.started`) does not
/// start: with the audit log's disk full, every systemd-sysupdate run has its
/// `update.started` entry on disk before it, and an install whose entry could not
/// be written ran nothing.
#[test]
fn an_update_that_cannot_be_audited_does_not_start() {
    let tools = tempfile::tempdir().unwrap();
    let log = tools.path().join("calls");
    let esp = tools.path().join("efi");
    std::fs::create_dir(&esp).unwrap();
    let tool = |name: &str, body: String| {
        let path = tools.path().join(name);
        devos_tests::write_executable(&path, &format!("#!/bin/sh\n{body}\n"));
        path.display().to_string()
    };
    let sysupdate = tool(
        "sysupdate",
        format!(
            "case $1 in check-new) echo '{{\"available\":\"0.3.0_new\"}}';; *) echo \"sysupdate $*\" >> {};; esac",
            log.display()
        ),
    );
    let bootctl = tool("bootctl", "true".to_owned());
    let (agent, audit) = with_audit_on_a_small_disk(
        &format!(
            "[update]\nsysupdate = \"{sysupdate}\"\nbootctl = \"{bootctl}\"\nkernel-images = \"{}\"\nlauncher = []\n",
            esp.display()
        ),
        "256k",
    );
    let installs = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("sysupdate update")
            .count()
    };
    let started = || {
        std::fs::read_dir(agent.state().join("audit"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("log-"))
            .map(|e| {
                std::fs::read_to_string(e.path())
                    .unwrap()
                    .matches("\"update.started\"")
                    .count()
            })
            .sum::<usize>()
    };
    audit.fill();
    // The log's last page may still hold an entry or two: install until one could
    // not be recorded before it started.
    let mut refused_before_start = false;
    for _ in 0..60 {
        let before = installs();
        let out = agent.devos(None, tools.path(), &["update"]);
        assert!(
            installs() <= started(),
            "systemd-sysupdate ran without its update.started entry: {} runs, {} entries",
            installs(),
            started()
        );
        if !out.status.success() && installs() == before {
            assert!(stderr(&out).contains("audit"), "{}", stderr(&out));
            refused_before_start = true;
            break;
        }
    }
    assert!(
        refused_before_start,
        "no install was refused for want of its update.started entry"
    );
}
