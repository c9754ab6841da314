//! The context engine end to end: the real daemon on a private system bus, real users,
//! real inotify on real directories, through `devos context` and `devos run`.

#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::*;

fn eventually(what: &str, check: impl FnMut() -> bool) {
    assert!(wait_for(Duration::from_secs(20), check), "{what}");
}

#[test]
fn inotify_keeps_the_index_current_with_ignore_rules_and_permissions() {
    require("git", "git");
    let agent = Daemon::start();
    let alice = User::ensure("devos-alice");
    let project = alice.project();
    let p = project.path();
    let outside = alice.project();
    sh(
        &alice,
        p,
        "git init -q . && mkdir -p src target/debug docs && echo 'fn main(){}' > src/main.rs \
         && echo x > target/debug/app && echo 'target/' > .gitignore && echo '*.log' > .ignore \
         && echo x > build.log && echo x > docs/guide.md && echo secret > private.txt \
         && chmod 000 private.txt",
    );
    // Not the user's to read: a root-owned file and directory in their project.
    std::fs::write(p.join("root-only.txt"), "x").unwrap();
    open_up(&p.join("root-only.txt"), 0o600);
    std::fs::create_dir(p.join("root-dir")).unwrap();
    std::fs::write(p.join("root-dir/inside.txt"), "x").unwrap();
    open_up(&p.join("root-dir"), 0o700);

    let root = context(&agent, &alice, &["add", p.to_str().unwrap()]);
    assert_eq!(root["root"], p.to_str().unwrap());
    let status = project_status(&agent, &alice);
    assert_eq!(status["mode"], "watching", "{status}");

    let hits = context(&agent, &alice, &["find", "main.rs"]);
    let hit = &hits["results"][0];
    assert_eq!(hit["path"], p.join("src/main.rs").to_str().unwrap());
    assert_eq!(hit["lang"], "rust");
    assert_eq!(hit["ignored"], false);
    // Ignored: listed with the flag, and an ignored directory is not entered.
    let target = context(&agent, &alice, &["find", "target"]);
    assert_eq!(target["results"][0]["ignored"], true, "{target}");
    assert!(found(&agent, &alice, "debug").is_empty());
    let log = context(&agent, &alice, &["find", "build.log"]);
    assert_eq!(log["results"][0]["ignored"], true, "{log}");
    // What alice cannot read never appears.
    for name in ["private", "root-only", "inside.txt"] {
        assert!(found(&agent, &alice, name).is_empty(), "{name} is indexed");
    }

    // Create, modify, rename, delete, mkdir with files, move in, move out.
    sh(&alice, p, "echo new > src/lib.rs");
    eventually("a new file is indexed", || {
        found(&agent, &alice, "lib.rs").len() == 1
    });
    sh(&alice, p, "printf 'much longer content' > src/lib.rs");
    eventually("a modified file's size is updated", || {
        context(&agent, &alice, &["find", "lib.rs"])["results"][0]["size"] == 19
    });
    sh(&alice, p, "mv src/lib.rs src/core.rs");
    eventually("a renamed file is indexed under its new name only", || {
        found(&agent, &alice, "lib.rs").is_empty() && found(&agent, &alice, "core.rs").len() == 1
    });
    sh(&alice, p, "rm src/core.rs");
    eventually("a deleted file is gone", || {
        found(&agent, &alice, "core.rs").is_empty()
    });
    sh(&alice, p, "mkdir -p api/v1 && echo x > api/v1/handler.go");
    eventually("files in a new directory tree are indexed", || {
        found(&agent, &alice, "handler.go").len() == 1
    });
    let out = outside.path();
    sh(
        &alice,
        out,
        "mkdir -p vendor/pkg/deep && echo x > vendor/pkg/deep/moved.c",
    );
    sh(
        &alice,
        p,
        &format!("mv {}/vendor {}/vendor", out.display(), p.display()),
    );
    eventually("a directory tree moved in is indexed", || {
        found(&agent, &alice, "moved.c").len() == 1
    });
    sh(&alice, p, &format!("mv api {}/api", out.display()));
    eventually("a directory tree moved out is gone", || {
        found(&agent, &alice, "handler.go").is_empty()
    });
    // Taking read access away takes the entry out.
    sh(&alice, p, "echo x > docs/locked.md");
    eventually("a new file is indexed", || {
        found(&agent, &alice, "locked.md").len() == 1
    });
    sh(&alice, p, "chmod 000 docs/locked.md");
    eventually("a file made unreadable is gone", || {
        found(&agent, &alice, "locked.md").is_empty()
    });
    // Changed files since today, newest first; ignored ones left out.
    let recent = context(&agent, &alice, &["recent", "--since", "today"]);
    let paths: Vec<&str> = recent["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["path"].as_str().unwrap())
        .collect();
    assert!(paths.contains(&p.join("vendor/pkg/deep/moved.c").to_str().unwrap()));
    assert!(!paths.iter().any(|x| x.ends_with("build.log")));
    // A new ignore rule takes entries out.
    sh(&alice, p, "echo 'vendor/' >> .gitignore");
    eventually("a directory newly ignored loses its entries", || {
        found(&agent, &alice, "moved.c").is_empty()
    });

    // The planner answers from the index.
    let r = run_json(&agent, &alice, p, &["where", "is", "the", "guide"]);
    assert_eq!(r["state"], "done", "{r}");
    assert!(
        r["answer"]
            .as_str()
            .unwrap()
            .contains(p.join("docs/guide.md").to_str().unwrap()),
        "{r}"
    );
    assert!(r["actions"].as_array().unwrap().is_empty());

    // The index is root's alone.
    let db = agent
        .state()
        .join(format!("context/{}/index.db", alice.uid));
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&db).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o600));
    let dir = std::fs::metadata(db.parent().unwrap()).unwrap();
    assert_eq!(dir.mode() & 0o777, 0o700);

    // Removing the project forgets it.
    let out = agent.devos(Some(&alice), p, &["context", "remove", p.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(found(&agent, &alice, "main.rs").is_empty());
}

#[test]
fn each_user_sees_only_their_own_index() {
    let agent = Daemon::start();
    let alice = User::ensure("devos-alice");
    let bob = User::ensure("devos-bob");
    let a = alice.project();
    let b = bob.project();
    sh(&alice, a.path(), "echo x > alice-notes.md");
    sh(&bob, b.path(), "echo x > bob-notes.md");
    context(&agent, &alice, &["add", a.path().to_str().unwrap()]);
    context(&agent, &bob, &["add", b.path().to_str().unwrap()]);
    project_status(&agent, &alice);
    project_status(&agent, &bob);
    eventually("each finds their own", || {
        found(&agent, &alice, "notes").len() == 1 && found(&agent, &bob, "notes").len() == 1
    });
    assert!(found(&agent, &alice, "notes")[0].ends_with("alice-notes.md"));
    assert!(found(&agent, &bob, "notes")[0].ends_with("bob-notes.md"));
    let listed = context(&agent, &alice, &["list"]);
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    // Bob's private project cannot become alice's.
    let out = agent.devos(
        Some(&alice),
        Path::new("/"),
        &["context", "add", b.path().to_str().unwrap()],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not a directory you (devos-alice) can list")
            || stderr(&out).contains("Permission denied"),
        "{}",
        stderr(&out)
    );
    // Nor can she ask about his repository's state.
    let out = agent.devos(
        Some(&alice),
        Path::new("/"),
        &["context", "git", b.path().to_str().unwrap()],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not one of your projects"),
        "{}",
        stderr(&out)
    );
    // Overlapping projects, and kernel file systems, are refused with the reason.
    sh(&alice, a.path(), "mkdir -p sub");
    for (dir, why) in [
        (a.path().join("sub"), "overlaps your project"),
        ("/proc/self".into(), "not a project"),
    ] {
        let out = agent.devos(
            Some(&alice),
            Path::new("/"),
            &["context", "add", dir.to_str().unwrap()],
        );
        assert!(!out.status.success());
        assert!(stderr(&out).contains(why), "{}", stderr(&out));
    }
    // A relative path is refused with what to do.
    let out = context_call(
        &agent,
        Some(&alice),
        "AddProject",
        "sb",
        &["relative/dir", "false"],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("must be absolute"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn past_the_watch_limit_projects_are_rescanned_and_say_so() {
    let agent = Daemon::start_with(
        "ID=debian\n",
        "[context]\nmax-watches = 3\nrescan-secs = 1\n",
    );
    let alice = User::ensure("devos-alice");
    let project = alice.project();
    let p = project.path();
    sh(
        &alice,
        p,
        "mkdir -p a/b/c/d e/f g && echo x > a/b/c/d/deep.txt",
    );
    context(&agent, &alice, &["add", p.to_str().unwrap()]);
    let status = project_status(&agent, &alice);
    assert_eq!(status["mode"], "rescanning", "{status}");
    assert!(
        status["reason"]
            .as_str()
            .unwrap()
            .contains("max-watches = 3"),
        "{status}"
    );
    let text = agent.devos(Some(&alice), p, &["context", "status"]);
    assert!(
        stdout(&text).contains("RESCANNING every 1s"),
        "{}",
        stdout(&text)
    );
    // A change in a directory without a watch still arrives, by the rescan.
    sh(&alice, p, "echo x > a/b/c/d/later.txt");
    eventually("a rescan finds the new file", || {
        found(&agent, &alice, "later.txt").len() == 1
    });
}

#[test]
fn restarts_reconcile_and_a_corrupt_index_is_rebuilt() {
    let mut agent = Daemon::start();
    let alice = User::ensure("devos-alice");
    let project = alice.project();
    let p = project.path();
    sh(&alice, p, "echo x > kept.txt && echo x > dropped.txt");
    context(&agent, &alice, &["add", p.to_str().unwrap()]);
    project_status(&agent, &alice);
    eventually("the first scan", || {
        found(&agent, &alice, "kept").len() == 1
    });

    // Changes while the agent is down are found when it comes back.
    agent.stop();
    sh(&alice, p, "rm dropped.txt && echo x > added-offline.txt");
    agent.restart();
    eventually("the restart reconciles", || {
        found(&agent, &alice, "added-offline").len() == 1
            && found(&agent, &alice, "dropped").is_empty()
    });
    assert_eq!(found(&agent, &alice, "kept").len(), 1);

    // A damaged database is moved aside and rebuilt from the project list.
    agent.stop();
    let db = agent
        .state()
        .join(format!("context/{}/index.db", alice.uid));
    std::fs::write(&db, vec![0x5a; 16384]).unwrap();
    let _ = std::fs::remove_file(format!("{}-wal", db.display()));
    let _ = std::fs::remove_file(format!("{}-shm", db.display()));
    agent.restart();
    eventually("the rebuilt index has the project again", || {
        found(&agent, &alice, "kept").len() == 1
    });
    let status = context(&agent, &alice, &["status"]);
    assert!(status["rebuilt"]["moved-to"].is_string(), "{status}");
    assert_eq!(status["projects"][0]["root"], p.to_str().unwrap());
}

#[test]
fn git_state_follows_commits_branches_and_stashes_without_repository_programs() {
    require("git", "git");
    let agent = Daemon::start();
    let alice = User::ensure("devos-alice");
    let project = alice.project();
    let p = project.path();
    let pwned = p.join("pwned");
    sh(
        &alice,
        p,
        &format!(
            "git init -q -b main . && echo a > a.txt && git add a.txt && git commit -qm first \
             && git config core.fsmonitor 'touch {0}' \
             && git config filter.evil.clean 'touch {0}; cat' \
             && git config filter.evil.required true \
             && echo '* filter=evil' > .git/info/attributes \
             && echo b > b.txt && echo changed > a.txt",
            pwned.display()
        ),
    );
    context(&agent, &alice, &["add", p.to_str().unwrap()]);
    project_status(&agent, &alice);
    let git = |agent: &Daemon| context(agent, &alice, &["git", p.to_str().unwrap()]);
    let state = git(&agent);
    assert_eq!(state["branch"], "main", "{state}");
    assert_eq!(state["commits"][0]["subject"], "first");
    assert_eq!(state["untracked"], serde_json::json!(["b.txt"]));
    assert_eq!(state["unstaged"], serde_json::json!(["a.txt"]));
    assert!(
        !pwned.exists(),
        "git ran a program the repository configured"
    );

    // (The test's own git, with the repository's programs off.)
    let safe = "git -c core.fsmonitor= -c filter.evil.clean=cat -c filter.evil.smudge=cat";
    sh(
        &alice,
        p,
        &format!("{safe} add b.txt && {safe} commit -qm second b.txt"),
    );
    eventually("a commit is seen", || {
        git(&agent)["commits"][0]["subject"] == "second"
    });
    sh(&alice, p, &format!("{safe} switch -q -c feature"));
    eventually("a branch switch is seen", || {
        git(&agent)["branch"] == "feature"
    });
    sh(&alice, p, &format!("{safe} stash -q"));
    eventually("a stash is seen", || {
        let s = git(&agent);
        s["stashes"] == 1 && s["unstaged"].as_array().unwrap().is_empty()
    });
    // What anyone with a commit puts in a subject or an author is kept to 1 KiB each.
    sh(
        &alice,
        p,
        &format!(
            "{safe} commit -q --allow-empty \
             --author \"$(head -c 100000 /dev/zero | tr '\\0' n) <n@example.com>\" \
             -m \"$(head -c 100000 /dev/zero | tr '\\0' s)\""
        ),
    );
    eventually("a long commit is seen", || {
        git(&agent)["commits"][0]["subject"]
            .as_str()
            .is_some_and(|s| s.starts_with("sss"))
    });
    let newest = &git(&agent)["commits"][0];
    assert_eq!(newest["subject"].as_str().unwrap().len(), 1024);
    assert_eq!(newest["author"].as_str().unwrap().len(), 1024, "{newest}");
    assert!(
        !pwned.exists(),
        "git ran a program the repository configured"
    );
    let text = agent.devos(Some(&alice), p, &["context", "git"]);
    assert!(stdout(&text).contains(": feature"), "{}", stdout(&text));
}

#[test]
fn processes_are_the_callers_own() {
    let agent = Daemon::start();
    let alice = User::ensure("devos-alice");
    let project = alice.project();
    let p = project.path();
    context(&agent, &alice, &["add", p.to_str().unwrap()]);
    project_status(&agent, &alice);
    let mut sleeper = Command::new("setpriv")
        .arg(format!("--reuid={}", alice.uid))
        .arg(format!("--regid={}", alice.uid))
        .arg("--init-groups")
        .args(["sleep", "60"])
        .current_dir(p)
        .spawn()
        .unwrap();
    // (setpriv has changed user and become `sleep` before it is listed.)
    let comm = format!("/proc/{}/comm", sleeper.id());
    assert!(wait_for(Duration::from_secs(30), || {
        std::fs::read_to_string(&comm).is_ok_and(|c| c == "sleep\n")
    }));
    let list = context(&agent, &alice, &["ps"]);
    let procs = list["processes"].as_array().unwrap();
    assert!(procs.iter().all(|x| x["uid"] == alice.uid), "{list}");
    let sleep = procs
        .iter()
        .find(|x| x["pid"] == sleeper.id())
        .unwrap_or_else(|| panic!("alice's sleep is not listed: {list}"));
    assert_eq!(sleep["project"], p.to_str().unwrap());
    // As a table: each column under its heading, however long the project's path.
    let out = agent.devos(Some(&alice), p, &["context", "ps"]);
    let text = stdout(&out);
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    let pid = sleeper.id().to_string();
    let row = lines
        .find(|l| l.split_whitespace().next() == Some(pid.as_str()))
        .unwrap_or_else(|| panic!("{text}"));
    for (heading, value) in [("PROJECT", p.to_str().unwrap()), ("COMMAND", "sleep")] {
        let at = header.find(heading).unwrap();
        assert_eq!(row.get(at..at + value.len()), Some(value), "{text}");
    }
    assert_eq!(
        row.find(&pid).map(|i| i + pid.len()),
        header.find("PID").map(|i| i + 3),
        "{text}"
    );
    // Root sees everyone's.
    let out = agent.devos(None, Path::new("/"), &["--json", "context", "ps"]);
    let all = json(&out);
    assert!(
        all["processes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["uid"] == 0),
        "{all}"
    );
    // And the planner's question is answered from the same sample.
    let r = run_json(
        &agent,
        &alice,
        p,
        &["what's", "using", "all", "the", "memory?"],
    );
    assert_eq!(r["state"], "done", "{r}");
    assert!(r["answer"].as_str().unwrap().contains("sleep 60"), "{r}");
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
}

#[test]
fn requests_in_a_repository_index_it_and_the_model_reads_the_index() {
    use devos_tests::bedrock::{Reply, StandIn};
    require("git", "git");
    let standin = StandIn::start().unwrap();
    let agent = model_agent(&standin, "", "");
    let alice = User::ensure("devos-alice");
    let project = alice.project();
    let p = project.path();
    sh(
        &alice,
        p,
        "git init -q . && mkdir -p api && echo x > api/handler.go",
    );

    // A request run in a repository registers it (`[context] auto-add-repos`).
    let r = run_json(&agent, &alice, p, &["list", "files"]);
    assert_eq!(r["state"], "done", "{r}");
    let status = project_status(&agent, &alice);
    assert_eq!(status["root"], p.to_str().unwrap());
    assert_eq!(status["auto"], true);
    eventually("the repository is indexed", || {
        found(&agent, &alice, "handler").len() == 1
    });

    // The model's read-only index tools are answered from it, as alice.
    standin.push(Reply::tool(
        "find_files",
        serde_json::json!({ "query": "handler" }),
    ));
    standin.push(Reply::tool(
        "recent_files",
        serde_json::json!({ "since": "1h" }),
    ));
    standin.push(Reply::text("It is api/handler.go."));
    let r = run_json(
        &agent,
        &alice,
        p,
        &["which source file implements the request handling for the api?"],
    );
    assert_eq!(r["state"], "done", "{r}");
    assert_eq!(r["answer"], "It is api/handler.go.");
    assert!(r["actions"].as_array().unwrap().is_empty(), "{r}");
    let requests = standin.requests();
    let handler = p.join("api/handler.go");
    for n in [1, 2] {
        let body = requests[n].body.to_string();
        assert!(
            body.contains(handler.to_str().unwrap()),
            "tool result {n} lacks the file: {body}"
        );
    }
}

#[test]
fn the_text_of_a_project_is_indexed_when_asked_and_read_again_only_when_changed() {
    let mut agent = Daemon::start();
    let alice = User::ensure("devos-alice");
    let with_text = alice.project();
    let names_only = alice.project();
    let p = with_text.path();
    sh(
        &alice,
        p,
        "mkdir src && echo 'fn load_settings() {}' > src/settings.rs \
         && echo 'remember load_settings' > notes.md \
         && head -c 70000 /dev/zero | tr '\\0' 'a' > big.txt && echo ' load_settings' >> big.txt \
         && printf 'load_settings\\0binary' > blob.bin && echo 'alpha' > same.txt",
    );
    sh(&alice, names_only.path(), "echo 'load_settings' > other.rs");
    let out = agent.devos(
        Some(&alice),
        p,
        &["context", "add", "--text", p.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    context(
        &agent,
        &alice,
        &["add", names_only.path().to_str().unwrap()],
    );
    let text = |agent: &Daemon, words: &str| -> Vec<String> {
        context(agent, &alice, &["find", "--text", words])["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["path"].as_str().unwrap().to_owned())
            .collect()
    };
    eventually("the text is indexed", || {
        text(&agent, "load_settings").len() == 2
    });
    // Small text files only, and only of the project that asked for it.
    let hits = text(&agent, "load_settings");
    assert!(hits.contains(&p.join("src/settings.rs").to_string_lossy().into_owned()));
    assert!(hits.contains(&p.join("notes.md").to_string_lossy().into_owned()));
    // A prefix of three characters or more finds what starts with it; a shorter one
    // (which would match most of an index) is a whole word.
    assert_eq!(text(&agent, "load*").len(), 2);
    assert_eq!(text(&agent, "al*").len(), 0);
    assert_eq!(text(&agent, "alp*"), [p.join("same.txt").to_string_lossy()]);
    let shown = agent.devos(
        Some(&alice),
        p,
        &["context", "find", "--text", "load_settings"],
    );
    assert!(
        stdout(&shown).contains("[load_settings]"),
        "{}",
        stdout(&shown)
    );
    // A change is read again.
    sh(&alice, p, "echo 'fn render_page() {}' >> src/settings.rs");
    eventually("changed text is indexed", || {
        text(&agent, "render_page").len() == 1
    });
    // The planner asks the text index for "which files mention ...".
    let r = run_json(
        &agent,
        &alice,
        p,
        &["which", "files", "mention", "render_page"],
    );
    assert!(r["answer"].as_str().unwrap().contains("settings.rs"), "{r}");

    // After a restart only files whose mtime or size changed are read again: same.txt
    // gets other text of the same length with its old mtime while the agent is down,
    // and the index keeps the text it had; notes.md really changed and is read.
    agent.stop();
    sh(
        &alice,
        p,
        "touch -r same.txt /tmp/devos-stamp-$$ && echo 'omega' > same.txt \
         && touch -r /tmp/devos-stamp-$$ same.txt && rm /tmp/devos-stamp-$$ \
         && echo 'offline_change' >> notes.md",
    );
    agent.restart();
    eventually("the changed file is read again", || {
        text(&agent, "offline_change").len() == 1
    });
    assert_eq!(
        text(&agent, "alpha").len(),
        1,
        "unchanged files are not read again"
    );
    assert!(text(&agent, "omega").is_empty());

    // The project added with names only, added again with its text: read now, and
    // still after a restart.
    context(
        &agent,
        &alice,
        &["add", "--text", names_only.path().to_str().unwrap()],
    );
    let other = names_only
        .path()
        .join("other.rs")
        .to_string_lossy()
        .into_owned();
    eventually("the re-added project's text is indexed", || {
        text(&agent, "load_settings").contains(&other)
    });
    // Adding it again without `--text` (as a request run in it does) keeps its text.
    context(
        &agent,
        &alice,
        &["add", names_only.path().to_str().unwrap()],
    );
    agent.stop();
    agent.restart();
    let listed = context(&agent, &alice, &["list"]);
    let entry = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["root"] == names_only.path().to_str().unwrap())
        .unwrap_or_else(|| panic!("{listed}"));
    assert_eq!(entry["text"], true, "{listed}");
    eventually("its text is kept across a restart", || {
        text(&agent, "load_settings").contains(&other)
    });
}

#[test]
fn the_text_of_secret_locations_is_never_indexed() {
    let agent = Daemon::start();
    // (A user of its own: the test indexes their whole home.)
    let user = User::ensure("devos-texthome");
    let home = user.home.clone();
    sh(
        &user,
        &home,
        "mkdir -p .aws && echo 'aws_secret_access_key = HUSH_HUSH_42' > .aws/credentials \
         && echo 'machine example.com password HUSH_HUSH_42' > .netrc \
         && echo 'not a secret: HUSH_HUSH_42' > notes.txt",
    );
    let out = agent.devos(
        Some(&user),
        &home,
        &["context", "add", "--text", home.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = |words: &str| -> Vec<String> {
        context(&agent, &user, &["find", "--text", words])["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["path"].as_str().unwrap().to_owned())
            .collect()
    };
    eventually("the home is indexed", || !text("HUSH_HUSH_42").is_empty());
    assert_eq!(
        text("HUSH_HUSH_42"),
        [home.join("notes.txt").to_string_lossy()],
        "a secret file's text was indexed"
    );
    // Their names are, as any other file's.
    let names = context(&agent, &user, &["find", "credentials"]);
    assert!(names.to_string().contains(".aws/credentials"), "{names}");
}

#[test]
fn a_project_added_again_with_its_text_takes_no_new_place_at_the_limit() {
    let agent = Daemon::start_with("ID=debian\n", "[context]\nmax-projects = 1\n");
    let alice = User::ensure("devos-alice");
    let project = alice.project();
    let p = project.path();
    sh(&alice, p, "echo 'fn at_the_limit() {}' > lib.rs");
    context(&agent, &alice, &["add", p.to_str().unwrap()]);
    // Another project is refused at the limit...
    let other = alice.project();
    let out = agent.devos(
        Some(&alice),
        p,
        &["context", "add", other.path().to_str().unwrap()],
    );
    assert!(!out.status.success(), "{}", stdout(&out));
    // ...the same one again, with its text, is not, by whatever name it is given.
    let alias = other.path().join("alias");
    std::os::unix::fs::symlink(p, &alias).unwrap();
    let out = agent.devos(
        Some(&alice),
        p,
        &["context", "add", "--text", alias.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    eventually("its text is indexed", || {
        context(&agent, &alice, &["find", "--text", "at_the_limit"])["results"]
            .as_array()
            .is_some_and(|hits| hits.len() == 1)
    });
}
