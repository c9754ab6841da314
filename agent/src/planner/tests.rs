use super::*;

fn ctx(cwd: &Path) -> Context<'_> {
    Context {
        cwd,
        home: Path::new("/home/dev"),
        now: UNIX_EPOCH + std::time::Duration::from_secs(1_795_000_000),
    }
}

fn argv(plan: &Plan, i: usize) -> Vec<String> {
    plan.actions[i].argv().unwrap()
}

#[test]
fn common_requests_become_typed_actions() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    let c = ctx(cwd);
    let cwds = cwd.to_string_lossy().into_owned();

    let p = plan("list files", &c).unwrap();
    assert_eq!(argv(&p, 0), ["ls", "-la", "--", &cwds]);
    let p = plan("show the files in src", &c).unwrap();
    assert_eq!(argv(&p, 0), ["ls", "-la", "--", &format!("{cwds}/src")]);
    let p = plan("find rust files", &c).unwrap();
    assert_eq!(
        argv(&p, 0),
        ["find", &cwds, "-name", "*.rs", "-not", "-path", "*/.git/*"]
    );
    let p = plan("find files named 'Cargo.toml' in crates", &c).unwrap();
    assert_eq!(
        argv(&p, 0)[1..4],
        [
            format!("{cwds}/crates"),
            "-name".into(),
            "Cargo.toml".into()
        ]
    );
    let p = plan("search for -rf in src", &c).unwrap();
    assert_eq!(
        argv(&p, 0),
        [
            "grep",
            "-rn",
            "--exclude-dir=.git",
            "-e",
            "-rf",
            "--",
            &format!("{cwds}/src")
        ]
    );
    let p = plan("what's the disk usage here", &c).unwrap();
    assert_eq!(p.actions.len(), 2);
    assert_eq!(argv(&plan("git status", &c).unwrap(), 0), ["git", "status"]);
    assert_eq!(argv(&plan("show recent commits", &c).unwrap(), 0)[1], "log");
    assert_eq!(argv(&plan("git diff", &c).unwrap(), 0), ["git", "diff"]);
    let p = plan("commit with message \"Fix the $(build)\"", &c).unwrap();
    assert_eq!(argv(&p, 1), ["git", "commit", "-m", "Fix the $(build)"]);
    assert_eq!(
        argv(&plan("create branch Feature/x", &c).unwrap(), 0),
        ["git", "switch", "-c", "Feature/x"]
    );
    assert!(plan("create branch --upload-pack=x", &c).is_err());
    assert_eq!(
        plan("install ripgrep and jq", &c).unwrap().actions,
        vec![Action::PackageInstall {
            packages: vec!["ripgrep".into(), "jq".into()]
        }]
    );
    assert!(matches!(plan("install -y", &c), Err(PlanError::Invalid(_))));
}

#[test]
fn typed_commands_are_argv_unless_they_use_shell_syntax() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx(dir.path());
    assert_eq!(
        plan("run `ls -la`", &c).unwrap().actions,
        vec![Action::Run {
            argv: vec!["ls".into(), "-la".into()]
        }]
    );
    assert_eq!(
        plan("$ git log -n 3", &c).unwrap().actions,
        vec![Action::Git {
            args: vec!["log".into(), "-n".into(), "3".into()]
        }]
    );
    assert_eq!(
        plan("run: ls; rm -rf ~", &c).unwrap().actions,
        vec![Action::Shell {
            script: "ls; rm -rf ~".into()
        }]
    );
}

#[test]
fn tests_backups_and_organising_look_at_the_project() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    let c = ctx(cwd);
    assert!(matches!(
        plan("run the tests", &c),
        Err(PlanError::Invalid(_))
    ));
    std::fs::write(cwd.join("Cargo.toml"), "").unwrap();
    assert_eq!(
        argv(&plan("run the tests", &c).unwrap(), 0),
        ["cargo", "test"]
    );

    std::fs::write(cwd.join("a.txt"), "").unwrap();
    std::fs::write(cwd.join("b.TXT"), "").unwrap();
    std::fs::write(cwd.join("README"), "").unwrap();
    std::fs::write(cwd.join(".hidden"), "").unwrap();
    let p = plan("organise files by type", &c).unwrap();
    assert!(p.actions.contains(&Action::Mkdir {
        path: cwd.join("txt")
    }));
    assert!(p.actions.contains(&Action::Move {
        from: cwd.join("b.TXT"),
        to: cwd.join("txt/b.TXT")
    }));
    assert!(p.actions.contains(&Action::Move {
        from: cwd.join("README"),
        to: cwd.join("other/README")
    }));
    assert!(!p.actions.iter().any(|a| a.describe().contains(".hidden")));
    let p = plan("organize the files by date", &c).unwrap();
    assert!(p.summary.contains("by month"), "{}", p.summary);

    std::fs::create_dir(cwd.join("data")).unwrap();
    let p = plan("back up data", &c).unwrap();
    let Action::Copy { to, .. } = &p.actions[0] else {
        panic!("{p:?}")
    };
    assert!(
        to.to_string_lossy()
            .ends_with("data.backup-20261118T110640Z"),
        "{to:?}"
    );
    std::fs::create_dir(to).unwrap();
    let p = plan("restore data from backup", &c).unwrap();
    assert_eq!(
        p.actions[1],
        Action::Copy {
            from: to.clone(),
            to: cwd.join("data")
        }
    );
}

#[test]
fn unknown_requests_need_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let err = plan("refactor the parser to use nom", &ctx(dir.path())).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("cannot plan this without the model"),
        "{err}"
    );
}

#[test]
fn context_questions_go_to_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx(dir.path());
    let question = |text: &str| plan(text, &c).unwrap().question;
    assert_eq!(
        question("find the nginx config"),
        Some(Question::Find {
            words: "nginx conf".into()
        })
    );
    assert_eq!(
        question("where is the login handler?"),
        Some(Question::Find {
            words: "login handler".into()
        })
    );
    assert_eq!(
        question("which files mention parse_config?"),
        Some(Question::FindText {
            words: "parse_config".into()
        })
    );
    assert_eq!(
        question("where is MAX_RETRIES used"),
        Some(Question::FindText {
            words: "max_retries".into()
        })
    );
    assert_eq!(
        question("what did I change today"),
        Some(Question::Recent {
            since: "today".into()
        })
    );
    assert_eq!(
        question("what's using all the memory?"),
        Some(Question::Processes { by_memory: true })
    );
    assert_eq!(
        question("what is eating my CPU"),
        Some(Question::Processes { by_memory: false })
    );
    assert_eq!(
        question("which projects have uncommitted changes"),
        Some(Question::Git)
    );
    // The local rules these do not shadow: they still plan actions.
    for text in ["what changed", "find rust files", "find files named 'a b'"] {
        let p = plan(text, &c).unwrap();
        assert_eq!(p.question, None, "{text}");
        assert!(!p.actions.is_empty(), "{text}");
    }
}
