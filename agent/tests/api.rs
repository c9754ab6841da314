//! The agent's API end to end, through the `devos` CLI as real users, on a private
//! system bus with the shipped bus policy: requests, approvals and remembered rules,
//! isolation between users, the injection corpus, the sandbox and the audit log.

#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;

use support::*;

#[test]
fn requests_plans_approvals_rules_and_history_work_end_to_end() {
    let agent = Daemon::start();
    let alice = User::ensure("devos-alice");
    let project = alice.project();
    let cwd = project.path();
    alice.write(&cwd.join("notes.md"), "hello\n");

    // A read-only request runs at once (the default policy auto-approves read-only).
    let out = agent.devos(Some(&alice), cwd, &["--json", "run", "list", "files"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let r = json(&out);
    assert_eq!(r["state"], "done");
    assert_eq!(r["uid"], alice.uid);
    assert_eq!(r["actions"][0]["risk"]["class"], "read-only");
    assert!(
        r["actions"][0]["output"]
            .as_str()
            .unwrap()
            .contains("notes.md")
    );
    let sandbox = r["actions"][0]["sandbox"].as_str().unwrap();
    assert!(
        sandbox.starts_with("namespaces: mount, pid") && sandbox.contains("landlock V"),
        "{sandbox}"
    );
    // A text file is shown as it is; a binary one is named, not shown as replacement
    // characters.
    let out = agent.devos(Some(&alice), cwd, &["--json", "run", "read", "notes.md"]);
    assert_eq!(
        json(&out)["actions"][0]["output"],
        "hello\n",
        "{}",
        stdout(&out)
    );
    alice.write(&cwd.join("blob.bin"), "\u{7f}ELF\u{2}\0\0\u{ff}");
    let out = agent.devos(Some(&alice), cwd, &["--json", "run", "read", "blob.bin"]);
    let r = json(&out);
    assert_eq!(r["state"], "done", "{r}");
    assert_eq!(
        r["actions"][0]["output"],
        format!(
            "{} is a binary file of 9 bytes: not shown (a program that knows its format reads it; `od -c` shows its bytes)\n",
            cwd.join("blob.bin").display()
        ),
        "{r}"
    );

    // A write asks; without a terminal `devos run` says how to approve and exits 3.
    let out = agent.devos(Some(&alice), cwd, &["run", "create", "directory", "build"]);
    let id = waiting_id(&out);
    assert!(
        stdout(&out).contains("risk: writes-workdir"),
        "{}",
        stdout(&out)
    );
    assert!(!cwd.join("build").exists());
    let out = agent.devos(
        Some(&alice),
        cwd,
        &[
            "approve",
            &id,
            "--remember",
            "always",
            "--command-prefix",
            "mkdir",
        ],
    );
    // A remember scope that does not cover the action is refused...
    assert!(!out.status.success());
    assert!(stderr(&out).contains("does not cover"), "{}", stderr(&out));
    // ...a path scope that does is accepted (a relative one taken from the current
    // directory, as --cwd is).
    let out = agent.devos(
        Some(&alice),
        cwd,
        &["approve", &id, "--remember", "always", "--path-prefix", "."],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    // A decision by id alone says what it decided.
    assert!(
        stderr(&out).contains("approved action 0 of")
            && stderr(&out).contains("create directory")
            && stderr(&out).contains("(writes-workdir)"),
        "{}",
        stderr(&out)
    );
    assert!(wait_for(std::time::Duration::from_secs(20), || cwd
        .join("build")
        .is_dir()));
    let meta = std::fs::metadata(cwd.join("build")).unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&meta),
        alice.uid,
        "ran as the caller"
    );

    // The remembered rule now approves the same kind of action without asking.
    let out = agent.devos(
        Some(&alice),
        cwd,
        &["--json", "run", "create", "directory", "dist"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let r = json(&out);
    assert!(
        r["actions"][0]["decision"]["by"]
            .as_str()
            .unwrap()
            .starts_with("remembered rule"),
        "{r}"
    );
    let rules = json(&agent.devos(Some(&alice), cwd, &["--json", "rules"]));
    let rule_id = rules[0]["id"].as_i64().unwrap();
    assert_eq!(rules.as_array().unwrap().len(), 1);
    assert_eq!(rules[0]["path-prefix"], *cwd.to_string_lossy(), "{rules}");
    // Every command answers --json on stdout, these with what they did.
    let out = agent.devos(
        Some(&alice),
        cwd,
        &["--json", "rules", "remove", &rule_id.to_string()],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        json(&out),
        serde_json::json!({ "id": rule_id, "removed": true })
    );
    let id = waiting_id(&agent.devos(Some(&alice), cwd, &["run", "create", "directory", "again"]));

    // Deny stops the request; cancel stops another.
    let out = agent.devos(Some(&alice), cwd, &["--json", "deny", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        json(&out),
        serde_json::json!({ "id": id, "action": 0, "decision": "denied" })
    );
    agent.wait_state(&alice, cwd, &id, "denied");
    assert!(!cwd.join("again").exists());
    let id = waiting_id(&agent.devos(Some(&alice), cwd, &["run", "create", "directory", "never"]));
    let out = agent.devos(Some(&alice), cwd, &["--json", "cancel", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        json(&out),
        serde_json::json!({ "id": id, "cancelled": true })
    );
    agent.wait_state(&alice, cwd, &id, "cancelled");

    // Something no local rule covers goes to the model; with no model reachable
    // (no region or credentials here) it fails saying what is missing and what the
    // local rules cover, and nothing runs.
    let out = agent.devos(Some(&alice), cwd, &["run", "refactor", "the", "parser"]);
    assert!(!out.status.success());
    let said = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        said.contains("cannot plan this without the model") && said.contains("for Bedrock"),
        "{said}"
    );

    let history = json(&agent.devos(Some(&alice), cwd, &["--json", "history"]));
    let states: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["state"].as_str().unwrap())
        .collect();
    assert_eq!(
        states,
        [
            "failed",
            "cancelled",
            "denied",
            "done",
            "done",
            "done",
            // The two reads after `list files`.
            "done",
            "done"
        ],
        "{states:?}"
    );
    let status = json(&agent.devos(Some(&alice), cwd, &["--json", "status"]));
    assert_eq!(status["image-version"], "0.1.0+abcdef012345");
    // How the machine booted, as the self-test's `secure-boot` check says it (this host
    // is not an image: whatever its firmware does, the answer is a yes or no and why).
    assert!(status["secure-boot"].is_boolean(), "{status}");
    assert!(
        !status["secure-boot-detail"]
            .as_str()
            .unwrap_or("")
            .is_empty(),
        "{status}"
    );
    // Updates: the feed is named (null: this host has no transfers of an image's);
    // what booted and boots next only where systemd-boot started one of the image's
    // kernel images, which this host did not.
    assert!(status.get("update-feed").is_some(), "{status}");
    assert!(status.get("booted").is_none(), "{status}");
    // A user's status counts their own requests; what the whole machine does is root's
    // to see.
    let root_dir = tempfile::tempdir_in("/var/lib").unwrap();
    let out = agent.devos(None, root_dir.path(), &["run", "list", "files"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(status["requests-total"], states.len(), "{status}");
    assert_eq!(status["requests-in-flight"], 0, "{status}");
    assert!(status.get("audit-entries").is_none(), "{status}");
    let status = json(&agent.devos(Some(&alice), cwd, &["--json", "status"]));
    assert_eq!(status["requests-total"], states.len(), "{status}");
    let status = json(&agent.devos(None, root_dir.path(), &["--json", "status"]));
    assert_eq!(status["requests-total"], states.len() + 1, "{status}");
    assert!(status["audit-entries"].as_u64().unwrap() > 10, "{status}");
    let verify = agent.devos(Some(&alice), cwd, &["audit", "verify"]);
    assert!(verify.status.success(), "{}", stdout(&verify));
    assert!(
        stdout(&verify).contains("audit log: ok"),
        "{}",
        stdout(&verify)
    );

    // Ping still answers (the boot test relies on it).
    let ping = agent_call(&agent, Some(&alice), &["Ping"]);
    assert_eq!(stdout(&ping).trim(), "s \"pong\"");
}

#[test]
fn users_see_and_approve_only_their_own_requests() {
    let agent = Daemon::start();
    let alice = User::ensure("devos-alice");
    let bob = User::ensure("devos-bob");
    let project = alice.project();
    let cwd = project.path();
    let id = waiting_id(&agent.devos(Some(&alice), cwd, &["run", "create", "directory", "secret"]));

    let tmp = Path::new("/");
    for args in [
        vec!["show", id.as_str()],
        vec!["approve", id.as_str(), "0"],
        vec!["deny", id.as_str(), "0"],
        vec!["cancel", id.as_str()],
    ] {
        let out = agent.devos(Some(&bob), tmp, &args);
        assert!(!out.status.success(), "bob could {args:?}");
        assert!(
            stderr(&out).contains(&format!("no request {id} of yours")),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    let history = json(&agent.devos(Some(&bob), tmp, &["--json", "history"]));
    assert_eq!(
        history.as_array().unwrap().len(),
        0,
        "bob sees alice's requests: {history}"
    );
    // Bob cannot even submit in alice's directory.
    let out = agent.devos(
        Some(&bob),
        tmp,
        &["run", "--cwd", &cwd.to_string_lossy(), "list", "files"],
    );
    assert!(!out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert!(
        stderr(&out).contains("not a directory you (devos-bob) can enter"),
        "{}",
        stderr(&out)
    );
    // Bob cannot remove alice's rules.
    let out = agent.devos(
        Some(&alice),
        cwd,
        &["--json", "rules", "add", "deny", "--command-prefix", "curl"],
    );
    let rule = json(&out)["id"].as_i64().unwrap();
    assert!(
        !agent
            .devos(Some(&bob), tmp, &["rules", "remove", &rule.to_string()])
            .status
            .success()
    );
    // Nor see them, nor alice's requests in flight (`List`), while she and root do.
    let rules = |user: &User| json(&agent.devos(Some(user), tmp, &["--json", "rules"]));
    assert_eq!(rules(&alice).as_array().unwrap().len(), 1);
    assert_eq!(rules(&bob), serde_json::json!([]), "bob sees alice's rules");
    let in_flight = |user: Option<&User>| -> Vec<String> {
        let out = agent.busctl(
            user,
            &[
                "--json=short",
                "call",
                "org.devos.Agent1",
                "/org/devos/Agent1",
                "org.devos.Agent1",
                "List",
            ],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let list: serde_json::Value =
            serde_json::from_str(reply["data"][0].as_str().unwrap()).unwrap();
        list.as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(in_flight(Some(&alice)), [id.as_str()]);
    assert_eq!(in_flight(None), [id.as_str()]);
    assert!(in_flight(Some(&bob)).is_empty(), "bob sees alice's request");
    // Root may remove anyone's rule.
    let out = agent.devos(None, tmp, &["rules", "remove", &rule.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(rules(&alice), serde_json::json!([]));

    // Root sees everything but approves nothing on alice's behalf.
    let r = json(&agent.devos(None, tmp, &["--json", "show", &id]));
    assert_eq!(r["user"], "devos-alice");
    assert!(
        !agent
            .devos(None, tmp, &["approve", &id, "0"])
            .status
            .success()
    );
    assert!(
        !json(&agent.devos(None, tmp, &["--json", "history"]))
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert!(!cwd.join("secret").exists());

    // The admin interface is root's alone (bus policy).
    let out = bus_call(
        &agent,
        Some(&alice),
        "org.devos.Agent1.Admin",
        &["ReloadConfig"],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("denied") || stderr(&out).contains("Access"),
        "{}",
        stderr(&out)
    );
    let out = bus_call(&agent, None, "org.devos.Agent1.Admin", &["ReloadConfig"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn the_injection_corpus_never_runs_anything_unapproved() {
    let agent = Daemon::start();
    let alice = User::ensure("devos-alice");
    let project = alice.project();
    let cwd = project.path();
    alice.write(&cwd.join("file.txt"), "x\n");
    let marks = tempfile::tempdir_in("/var/tmp").unwrap();
    open_up(marks.path(), 0o777);
    let m = marks.path().display().to_string();
    let victim = marks.path().join("victim");
    std::fs::write(&victim, "keep me").unwrap();
    open_up(&victim, 0o666);
    std::os::unix::fs::symlink(marks.path(), cwd.join("escape")).unwrap();

    let corpus = [
        format!("list files; touch {m}/p1"),
        format!("list files && touch {m}/p2"),
        format!("search for $(touch {m}/p3)"),
        format!("search for `touch {m}/p4`"),
        format!("find files named x; touch {m}/p5"),
        format!("list files\ntouch {m}/p6"),
        format!("run: touch {m}/p7"),
        format!("run: ls; touch {m}/p8"),
        format!("$ env LD_PRELOAD={m}/x.so touch {m}/p9"),
        format!("run: LD_PRELOAD=x touch {m}/p10"),
        format!("run: find . -exec touch {m}/p11 ;"),
        format!("run: git -c core.pager='touch {m}/p12' log"),
        format!("run: sort -o {m}/p13 file.txt"),
        format!("commit with message \"x\"; touch {m}/p14"),
        format!("search for * in ../../../{m}"),
        format!("delete {m}/victim"),
        "delete escape/victim".to_owned(),
        format!("run: rm -rf {m}"),
        "back up escape".to_owned(),
        format!("create directory ../../../../..{m}/p15"),
        "read ~/.ssh/id_rsa".to_owned(),
        format!("run `bash -c 'touch {m}/p16'`"),
        format!("run: python3 -c \"open('{m}/p17','w')\""),
        format!("install jq; touch {m}/p18"),
        format!("create branch x;touch${{IFS}}{m}/p19"),
    ];
    for text in &corpus {
        let out = agent.devos(Some(&alice), cwd, &["run", text]);
        if out.status.code() == Some(3) {
            let id = waiting_id(&out);
            assert!(
                agent
                    .devos(Some(&alice), cwd, &["deny", &id])
                    .status
                    .success()
            );
        }
    }
    // Whatever did run was read-only, and nothing outside was touched.
    let history = json(&agent.devos(Some(&alice), cwd, &["--json", "history", "-n", "100"]));
    for r in history.as_array().unwrap() {
        for a in r["actions"].as_array().unwrap() {
            if a["state"] == "succeeded" || a["state"] == "failed" {
                assert_eq!(a["risk"]["class"], "read-only", "{} ran: {a}", r["text"]);
            }
        }
    }
    let made: Vec<_> = std::fs::read_dir(marks.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        made,
        vec![std::ffi::OsString::from("victim")],
        "an injected command ran"
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
}

#[test]
fn the_sandbox_confines_approved_actions() {
    let agent = Daemon::start();
    let alice = User::ensure("devos-alice");
    let project = alice.project();
    let cwd = project.path();
    let outside = tempfile::tempdir_in("/var/tmp").unwrap();
    open_up(outside.path(), 0o777);
    let o = outside.path().display().to_string();

    // An approved shell script may write in the working directory, nowhere else,
    // even where the user's own permissions would allow it.
    let id = waiting_id(&agent.devos(
        Some(&alice),
        cwd,
        &[
            "run",
            &format!("run: echo in > inside.txt; echo out > {o}/outside.txt"),
        ],
    ));
    let r = agent.approve_and_wait(&alice, cwd, &id, "failed");
    assert_eq!(
        std::fs::read_to_string(cwd.join("inside.txt")).unwrap(),
        "in\n"
    );
    assert!(
        !outside.path().join("outside.txt").exists(),
        "the sandbox let a write outside through"
    );
    // /var/tmp is the sandbox's own, empty: the write went nowhere.
    assert!(
        r["actions"][0]["output"]
            .as_str()
            .unwrap()
            .contains("outside.txt"),
        "{r}"
    );

    let data = cwd.join("data");
    std::fs::create_dir(&data).unwrap();
    std::os::unix::fs::chown(&data, Some(alice.uid), Some(alice.uid)).unwrap();
    alice.write(&data.join("old.txt"), "old");

    // A symlink swapped in after approval does not redirect a write outside.
    std::fs::write(outside.path().join("old.txt"), "precious").unwrap();
    open_up(&outside.path().join("old.txt"), 0o666);
    let id = waiting_id(&agent.devos(Some(&alice), cwd, &["run", "delete", "data/old.txt"]));
    std::fs::remove_dir_all(&data).unwrap();
    std::os::unix::fs::symlink(outside.path(), &data).unwrap();
    agent.approve_and_fail(&alice, cwd, &id, "risk changed since it was approved");
    assert_eq!(
        std::fs::read_to_string(outside.path().join("old.txt")).unwrap(),
        "precious"
    );
}

/// Bind mounts root made elsewhere, removed (with everything below them) when dropped.
struct Mounts(Vec<std::path::PathBuf>);

impl Drop for Mounts {
    fn drop(&mut self) {
        for point in self.0.iter().rev() {
            let _ = std::process::Command::new("umount")
                .args(["-R", "-l"])
                .arg(point)
                .status();
        }
    }
}

#[test]
fn a_build_chroot_with_the_kernels_file_systems_below_tmp_leaves_actions_working() {
    // As a build chroot (schroot, sbuild, a hand-made one) has them: the host's
    // `/proc`, `/sys` and `/dev` mounted below a place every sandbox hides. They are
    // not other names of `/tmp` to hide in turn: hiding `/dev` or `/proc` would leave
    // every action without them.
    let agent = Daemon::start();
    let alice = User::ensure("devos-alice");
    let project = alice.project();
    let cwd = project.path();
    let chroot = tempfile::tempdir_in("/tmp").unwrap();
    let mut mounts = Mounts(Vec::new());
    for (name, how) in [
        ("proc", &["-t", "proc", "proc"][..]),
        ("sys", &["--rbind", "/sys"]),
        ("dev", &["--rbind", "/dev"]),
    ] {
        let point = chroot.path().join(name);
        std::fs::create_dir(&point).unwrap();
        let ok = std::process::Command::new("mount")
            .args(how)
            .arg(&point)
            .status()
            .unwrap();
        assert!(ok.success(), "mount {how:?} {}", point.display());
        mounts.0.push(point);
    }
    let id = waiting_id(&agent.devos(
        Some(&alice),
        cwd,
        &["run", "run: head -c 4 /dev/zero | wc -c; grep -c ^Name /proc/self/status; ls /sys/kernel > /dev/null && echo sys"],
    ));
    let r = agent.approve_and_wait(&alice, cwd, &id, "done");
    assert_eq!(r["actions"][0]["output"], "4\n1\nsys\n", "{r}");
    drop(mounts);
}

#[test]
fn a_tampered_audit_log_is_reported_with_its_first_bad_entry() {
    let agent = Daemon::start();
    let alice = User::ensure("devos-alice");
    let project = alice.project();
    let run = || {
        let out = agent.devos(Some(&alice), project.path(), &["run", "list", "files"]);
        assert!(out.status.success(), "{}", stderr(&out));
    };
    // What `devos audit verify` says, as alice, when it passes.
    let verified = || {
        let out = agent.devos(Some(&alice), project.path(), &["audit", "verify"]);
        assert!(out.status.success(), "{}", stdout(&out));
        stdout(&out)
    };
    for _ in 0..3 {
        run();
    }
    // A user's verification reads what came after the last one (the first, all of
    // it); root's, everything.
    let said = verified();
    assert!(said.contains("entries in 1 file"), "{said}");
    run();
    let said = verified();
    assert!(said.contains("since the last verification"), "{said}");
    assert!(
        said.contains("root's `devos audit verify` reads the whole log"),
        "{said}"
    );
    let log = agent.state().join("audit/log-000001.jsonl");
    let text = std::fs::read_to_string(&log).unwrap();
    let edited = text.replacen("\"list files\"", "\"something else\"", 1);
    assert_ne!(text, edited);
    std::fs::write(&log, edited).unwrap();
    // (The edit moved every entry after it: the user's check finds that too.)
    let out = agent.devos(Some(&alice), project.path(), &["audit", "verify"]);
    assert!(!out.status.success());
    assert!(stdout(&out).contains("TAMPERED"), "{}", stdout(&out));
    let out = agent.devos(None, project.path(), &["audit", "verify"]);
    assert!(!out.status.success());
    assert!(stdout(&out).contains("TAMPERED"), "{}", stdout(&out));
    assert!(stdout(&out).contains("line 2"), "{}", stdout(&out));
}

#[test]
fn actions_are_killed_at_the_timeout_and_their_output_is_capped() {
    let agent = Daemon::start_with(
        "IMAGE_VERSION=1\n",
        "[sandbox]\ntimeout-secs = 2\nmax-output-bytes = 1000\n",
    );
    let alice = User::ensure("devos-alice");
    let project = alice.project();
    let cwd = project.path();
    let out = agent.devos(Some(&alice), cwd, &["run", "run: yes"]);
    assert!(stdout(&out).contains("risk: unknown"), "{}", stdout(&out));
    let id = waiting_id(&out);
    let r = agent.approve_and_wait(&alice, cwd, &id, "failed");
    let a = &r["actions"][0];
    assert!(
        a["error"].as_str().unwrap().contains("timed out after 2s"),
        "{a}"
    );
    assert_eq!(a["output-truncated"], true, "{a}");
    assert!(a["output"].as_str().unwrap().len() < 1100, "{a}");
}

#[test]
fn a_terminal_user_is_prompted_and_the_answer_is_remembered() {
    require("script", "bsdutils");
    let agent = Daemon::start();
    let alice = User::ensure("devos-alice");
    let project = alice.project();
    let cwd = project.path();
    // `script` gives `devos run` a terminal; the answer comes on its stdin.
    let mut cmd = std::process::Command::new("setpriv");
    cmd.arg(format!("--reuid={}", alice.uid))
        .arg(format!("--regid={}", alice.uid))
        .args(["--init-groups", "script", "-q", "-e", "-c"])
        .arg(format!("{DEVOS} run create directory prompted"))
        .arg("/dev/null")
        .current_dir(cwd)
        .env("DBUS_SYSTEM_BUS_ADDRESS", &agent.bus.address)
        .env("HOME", &alice.home)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"a\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    assert!(
        text.contains("approve [0] mkdir") || text.contains("approve [0] create directory"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "(writes-workdir; sandbox: writes {}; no network)",
            cwd.display()
        )),
        "{text}"
    );
    assert!(cwd.join("prompted").is_dir());
    // "always" became a rule for exactly that action: it runs again without asking,
    // anything else still asks.
    let rules = json(&agent.devos(Some(&alice), cwd, &["--json", "rules"]));
    assert_eq!(rules[0]["lifetime"], "always", "{rules}");
    assert!(rules[0]["exact"].is_object(), "{rules}");
    let out = agent.devos(
        Some(&alice),
        cwd,
        &["run", "create", "directory", "prompted"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    waiting_id(&agent.devos(Some(&alice), cwd, &["run", "create", "directory", "other"]));
}

#[test]
fn a_users_own_policy_applies_only_within_what_the_admin_allows() {
    let agent = Daemon::start();
    // A user of its own: other tests must not see this policy file.
    let carol = User::ensure("devos-carol");
    let project = carol.project();
    let cwd = project.path();
    let policy = carol.write_policy(
        "auto-approve = ['writes-workdir', 'destructive']\n[[deny]]\ncommand-prefix = ['git', 'status']\n",
    );
    // Users may auto-approve writes-workdir for themselves; destructive is not theirs to.
    let out = agent.devos(Some(&carol), cwd, &["run", "create", "directory", "auto"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(cwd.join("auto").is_dir());
    waiting_id(&agent.devos(Some(&carol), cwd, &["run", "delete", "auto"]));
    let out = agent.devos(Some(&carol), cwd, &["--json", "run", "git", "status"]);
    assert_eq!(json(&out)["state"], "denied", "{}", stdout(&out));

    // A file that is not a plain file of hers is refused, naming it.
    std::fs::remove_file(&policy).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", &policy).unwrap();
    let out = agent.devos(Some(&carol), cwd, &["--json", "run", "list", "files"]);
    let r = json(&out);
    assert_eq!(r["state"], "unplanned");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains(".config/devos/agent.toml"),
        "{r}"
    );
    std::fs::remove_file(&policy).unwrap();
}

#[test]
fn updates_and_rollbacks_are_roots_alone_and_audited() {
    let fakes = tempfile::tempdir().unwrap();
    let log = fakes.path().join("log");
    let fake = |name: &str, body: &str| {
        let path = fakes.path().join(name);
        devos_tests::write_executable(&path, &format!("#!/bin/sh\n{body}\n"));
        path
    };
    // Its answer to `check-new` as systemd-sysupdate 257 gives it: a newer version; with
    // `none`, nothing newer; with `broken`, a feed it cannot reach.
    let (none, broken) = (fakes.path().join("none"), fakes.path().join("broken"));
    let sysupdate = fake(
        "sysupdate",
        &format!(
            "case $1 in check-new) \
             if [ -e {broken} ]; then echo 'Transfer failed: Could not connect to server' >&2; exit 1; \
             elif [ -e {none} ]; then echo '{{\"available\":null}}'; \
             else echo '{{\"available\":\"0.3.0_new\"}}'; fi;; \
             *) echo \"sysupdate $@\" >> {log}; echo written >&2;; esac",
            broken = broken.display(),
            none = none.display(),
            log = log.display()
        ),
    );
    let bootctl = fake(
        "bootctl",
        &format!("echo \"bootctl $@\" >> {}", log.display()),
    );
    let esp = fakes.path().join("Linux");
    std::fs::create_dir(&esp).unwrap();
    for f in ["devos_0.1.0_prev.efi", "devos_0.2.0_old.efi"] {
        std::fs::write(esp.join(f), "").unwrap();
    }
    let agent = Daemon::start_with(
        "IMAGE_ID=devos\nIMAGE_VERSION=0.2.0+old\n",
        &format!(
            "[update]\nsysupdate = \"{}\"\nbootctl = \"{}\"\nkernel-images = \"{}\"\nlauncher = []\n",
            sysupdate.display(),
            bootctl.display(),
            esp.display()
        ),
    );
    let alice = User::ensure("devos-alice");
    let project = alice.project();
    for args in [
        &["update"][..],
        &["update", "--check"],
        &["update", "--rollback"],
    ] {
        let out = agent.devos(Some(&alice), project.path(), args);
        assert!(!out.status.success(), "{args:?}");
        // (alice is in no group sudo lets in: she is not told to use it.)
        assert!(
            stderr(&out).contains("only root may update the machine: ask an administrator"),
            "{}",
            stderr(&out)
        );
    }
    assert!(!log.exists(), "a user's request ran something");

    let out = agent.devos(None, fakes.path(), &["--json", "update", "--check"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(json(&out)["next"], "0.3.0+new");
    assert!(!log.exists(), "a check changed something");

    let out = agent.devos(None, fakes.path(), &["update"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("0.3.0+new is installed"),
        "{}",
        stdout(&out)
    );
    let out = agent.devos(None, fakes.path(), &["update", "--rollback"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("the next boot starts 0.1.0+prev (devos_0.1.0_prev.efi)"),
        "{}",
        stdout(&out)
    );
    let calls = "sysupdate update 0.3.0_new\nbootctl set-default \nbootctl set-default devos_0.1.0_prev.efi\n";
    assert_eq!(std::fs::read_to_string(&log).unwrap(), calls);
    let audit = std::fs::read_to_string(agent.state().join("audit/log-000001.jsonl")).unwrap();
    // Each recorded before it started, and its outcome after.
    let events: Vec<String> = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|e| e["event"].as_str().map(str::to_owned))
        .filter(|e| e.starts_with("update."))
        .collect();
    assert_eq!(
        events,
        [
            "update.started",
            "update.install",
            "update.started",
            "update.rollback"
        ],
        "{audit}"
    );
    let out = agent.devos(None, fakes.path(), &["audit", "verify"]);
    assert!(out.status.success(), "{}", stdout(&out));

    // Only systemd-sysupdate's own answer says there is nothing newer: a feed it cannot
    // reach (or whose signature or sums are wrong) fails the check and the install,
    // saying why, and nothing is installed.
    std::fs::write(&broken, "").unwrap();
    for args in [&["update", "--check"][..], &["update"]] {
        let out = agent.devos(None, fakes.path(), args);
        assert!(!out.status.success(), "{args:?}: {}", stdout(&out));
        assert!(
            stderr(&out).contains("Could not connect to server"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    std::fs::remove_file(&broken).unwrap();
    std::fs::write(&none, "").unwrap();
    for args in [&["update", "--check"][..], &["update"]] {
        let out = agent.devos(None, fakes.path(), args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        assert!(
            stdout(&out).contains("this machine runs the newest version"),
            "{args:?}: {}",
            stdout(&out)
        );
    }
    assert_eq!(std::fs::read_to_string(&log).unwrap(), calls);

    // What gates a version on trial: the agent serves and its audit log verifies.
    let boot_check = |bus: &str| {
        std::process::Command::new(AGENT)
            .args([
                "--config",
                agent.config.to_str().unwrap(),
                "boot-check",
                "--wait",
                "4",
            ])
            .env("DBUS_SYSTEM_BUS_ADDRESS", bus)
            .output()
            .unwrap()
    };
    let out = boot_check(&agent.bus.address);
    assert!(out.status.success(), "{}", stderr(&out));
    // It read only what came after the last verification (`audit verify` above left
    // its mark), and still finds an entry changed since.
    let mark = agent
        .state()
        .join("../anchors/audit-anchors.jsonl.verified");
    assert!(mark.exists());
    let log = agent.state().join("audit/log-000001.jsonl");
    let text = std::fs::read_to_string(&log).unwrap();
    let tail = text.trim_end().rsplit_once('\n').unwrap().0.len();
    let edited = format!(
        "{}{}",
        &text[..tail],
        text[tail..].replacen("\"event\":\"", "\"event\":\"x", 1)
    );
    std::fs::write(&log, edited).unwrap();
    let out = boot_check(&agent.bus.address);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("does not verify"), "{}", stderr(&out));
    std::fs::write(&log, text).unwrap();
    let nobody = tempfile::tempdir().unwrap();
    let out = boot_check(&format!("unix:path={}/none", nobody.path().display()));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("did not become healthy within 4 s"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn ctrl_c_cancels_a_closed_stdout_ends_quietly_and_missing_programs_are_refused() {
    let agent = Daemon::start();
    let alice = User::ensure("devos-alice");
    let project = alice.project();
    let cwd = project.path();

    // Ctrl-C while `devos run` follows a request (here: one waiting for approval,
    // followed with --wait) cancels the request, says so and exits 130.
    let child = std::process::Command::new("setpriv")
        .arg(format!("--reuid={}", alice.uid))
        .arg(format!("--regid={}", alice.uid))
        .args([
            "--init-groups",
            DEVOS,
            "run",
            "--wait",
            "create directory ctrlc",
        ])
        .current_dir(cwd)
        .env("DBUS_SYSTEM_BUS_ADDRESS", &agent.bus.address)
        .env("HOME", &alice.home)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut waiting = serde_json::Value::Null;
    assert!(
        devos_tests::wait_for(std::time::Duration::from_secs(20), || {
            let list = json(&agent.devos(Some(&alice), cwd, &["--json", "history"]));
            waiting = list[0].clone();
            waiting["state"] == "awaiting-approval"
        }),
        "no request waits: {waiting}"
    );
    let id = waiting["id"].as_str().unwrap().to_owned();
    let killed = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("request {id}: cancelled (Ctrl-C)")),
        "{}",
        stderr(&out)
    );
    let r = json(&agent.devos(Some(&alice), cwd, &["--json", "show", &id]));
    assert_eq!(r["state"], "cancelled", "{r}");
    assert!(!cwd.join("ctrlc").exists());

    // A reader that closes stdout early has all it wanted: no panic, exit 0.
    for args in [&["--json", "history"][..], &["history"], &["show", &id]] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = std::process::Command::new("setpriv")
            .arg(format!("--reuid={}", alice.uid))
            .arg(format!("--regid={}", alice.uid))
            .arg("--init-groups")
            .arg(DEVOS)
            .args(args)
            .current_dir(cwd)
            .env("DBUS_SYSTEM_BUS_ADDRESS", &agent.bus.address)
            .env("HOME", &alice.home)
            .stdin(std::process::Stdio::null())
            .stdout(writer)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        assert_eq!(stderr(&out), "", "{args:?}");
    }

    // A program that is not installed is refused when planned, not offered for
    // approval to fail with status 127.
    let out = agent.devos(
        Some(&alice),
        cwd,
        &["--json", "run", "$ devos-no-such-program --version"],
    );
    let r = json(&out);
    assert_eq!(r["state"], "denied", "{r}");
    let decision = &r["actions"][0]["decision"];
    assert_eq!(decision["by"], "this machine", "{r}");
    assert!(
        decision["reason"]
            .as_str()
            .unwrap()
            .contains("`devos-no-such-program` is not installed"),
        "{r}"
    );
}
