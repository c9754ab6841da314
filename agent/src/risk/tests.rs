use super::*;

fn run(words: &[&str], cwd: &Path) -> Risk {
    classify(
        &Action::Run {
            argv: words.iter().map(|s| (*s).to_owned()).collect(),
        },
        cwd,
    )
}

fn class(words: &[&str], cwd: &Path) -> RiskClass {
    run(words, cwd).class
}

#[test]
fn commands_are_classified_by_their_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    std::fs::write(cwd.join("existing.txt"), "x").unwrap();
    use RiskClass::*;
    let cases: &[(&[&str], RiskClass)] = &[
        (&["ls", "-la"], ReadOnly),
        (&["grep", "-rn", "$(touch pwned)", "."], ReadOnly),
        (&["find", ".", "-name", "*.rs"], ReadOnly),
        (&["find", ".", "-exec", "rm", "{}", ";"], Unknown),
        (&["find", ".", "-delete"], Destructive),
        (&["sort", "-o", "existing.txt", "existing.txt"], Destructive),
        (&["rg", "--pre", "sh", "x"], Unknown),
        (&["git", "status"], ReadOnly),
        (&["git", "-c", "core.pager=sh", "log"], Unknown),
        (&["git", "-ccore.pager=sh", "log"], Unknown),
        (&["git", "--exec-path=/tmp", "status"], Unknown),
        (&["git", "diff", "--ext-diff"], Unknown),
        (&["git", "diff", "--output=x.patch"], WritesWorkdir),
        (&["git", "commit", "-m", "x; rm -rf ~"], WritesWorkdir),
        (&["git", "branch"], ReadOnly),
        (&["git", "branch", "feature"], WritesWorkdir),
        (&["git", "branch", "-D", "feature"], Destructive),
        (&["git", "reset", "--hard"], Destructive),
        (&["git", "clean", "-fdx"], Destructive),
        (&["git", "push"], Network),
        (&["git", "push", "--force"], Destructive),
        (&["git", "push", "origin", "+main"], Destructive),
        (&["git", "frobnicate"], Unknown),
        (&["git", "config", "core.pager", "sh"], Unknown),
        (&["rm", "existing.txt"], Destructive),
        (&["rm", "-rf", "/"], Destructive),
        (&["mkdir", "new"], WritesWorkdir),
        (&["mkdir", "/tmp/elsewhere-devos"], Destructive),
        (&["mkdir", "../sibling"], Destructive),
        (&["cp", "existing.txt", "copy.txt"], WritesWorkdir),
        (&["cp", "a", "existing.txt"], Destructive),
        (&["sudo", "ls"], Privileged),
        (&["/usr/bin/sudo", "ls"], Privileged),
        (&["apt-get", "install", "x"], Privileged),
        (&["curl", "https://example.com"], Network),
        (&["bash", "-c", "ls"], Unknown),
        (&["env", "LD_PRELOAD=/tmp/x.so", "ls"], Unknown),
        (&["LD_PRELOAD=/tmp/x.so", "ls"], Unknown),
        (&["./configure"], Unknown),
        (&["/tmp/evil"], Unknown),
        (&["python3", "-c", "print(1)"], Unknown),
        (&["python3", "-m", "pytest"], WritesWorkdir),
        (&["cargo", "test"], Network),
        (&["cargo", "install", "x"], Unknown),
        (&["frobnicate"], Unknown),
        (&[], Unknown),
        (&["cat", "/etc/shadow"], Unknown),
        (&["cat", "../../../root/.ssh/id_rsa"], Unknown),
    ];
    for (argv, want) in cases {
        let got = run(argv, cwd);
        assert_eq!(got.class, *want, "{argv:?}: {:?}", got.reasons);
        assert!(
            !got.reasons.is_empty() || *want == ReadOnly,
            "{argv:?} has no reason"
        );
    }
}

#[test]
fn literal_shell_syntax_is_explained_not_escalated() {
    let dir = tempfile::tempdir().unwrap();
    let risk = run(&["echo", "a; rm -rf ~"], dir.path());
    assert_eq!(risk.class, RiskClass::ReadOnly);
    assert!(
        risk.reasons[0].contains("passed literally"),
        "{:?}",
        risk.reasons
    );
}

#[test]
fn symlinks_leading_out_of_the_workdir_are_caught() {
    let outside = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).unwrap();
    let risk = classify(
        &Action::Write {
            path: dir.path().join("link/file.txt"),
            content: String::new(),
        },
        dir.path(),
    );
    assert_eq!(risk.class, RiskClass::Destructive, "{:?}", risk.reasons);
    assert!(
        risk.reasons.iter().any(|r| r.contains("symlink")),
        "{:?}",
        risk.reasons
    );
    let canonical_outside = std::fs::canonicalize(outside.path()).unwrap();
    assert_eq!(risk.writes_outside, vec![canonical_outside]);
}

#[test]
fn file_actions() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    std::fs::create_dir(cwd.join("src")).unwrap();
    let c = |a: Action| classify(&a, cwd).class;
    assert_eq!(
        c(Action::Read {
            path: cwd.join("src")
        }),
        RiskClass::ReadOnly
    );
    assert_eq!(
        c(Action::Mkdir {
            path: cwd.join("new")
        }),
        RiskClass::WritesWorkdir
    );
    assert_eq!(
        c(Action::Delete {
            path: cwd.join("src")
        }),
        RiskClass::Destructive
    );
    assert_eq!(
        c(Action::Write {
            path: cwd.to_path_buf(),
            content: String::new()
        }),
        RiskClass::Destructive
    );
    assert_eq!(
        c(Action::Shell {
            script: "ls".into()
        }),
        RiskClass::Unknown
    );
    assert_eq!(
        c(Action::PackageInstall {
            packages: vec!["ripgrep".into()]
        }),
        RiskClass::Privileged
    );
    assert_eq!(
        c(Action::PackageInstall {
            packages: vec!["--allow-unauthenticated".into()]
        }),
        RiskClass::Unknown
    );
    assert_eq!(
        class(&["ls"], Path::new("/nonexistent/dir")),
        RiskClass::ReadOnly
    );
}
