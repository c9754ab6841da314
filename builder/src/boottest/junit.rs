//! A test report for people (the summary) and for CI (JUnit XML).

use std::path::Path;

use super::{TCG_FAULT, TestReport};

impl TestReport {
    /// The human summary printed after a test.
    pub(crate) fn summary(&self) -> String {
        let mut s = format!(
            "boot test of {} ({}): {} in {:.1}s under {} ({})\n",
            self.disk.display(),
            self.version.as_deref().unwrap_or("unknown version"),
            if self.passed { "PASSED" } else { "FAILED" },
            self.seconds,
            self.accel.accel.describe(),
            self.accel.reason
        );
        if let Some(t) = self.agent_answered_seconds {
            s.push_str(&format!("  agent answered {t:.1}s after QEMU started\n"));
        }
        for c in &self.checks {
            s.push_str(&format!(
                "  [{}] {}: {}\n",
                if c.ok { " ok " } else { "FAIL" },
                c.check,
                c.detail
            ));
        }
        if let Some(f) = &self.failure {
            s.push_str(&format!("failure: {f}\nlast console lines:\n"));
            for l in &self.console_tail {
                s.push_str(&format!("  | {l}\n"));
            }
        }
        if let Some(k) = &self.kept {
            s.push_str(&format!("kept overlay and logs in {}\n", k.display()));
        }
        s
    }
}

impl TestReport {
    /// The report as JUnit XML: one test case per check, the failure's diagnosis and
    /// the console's last lines when the run failed.
    pub(crate) fn junit(&self) -> String {
        let name = self.version.as_deref().unwrap_or("image");
        let failures = self.checks.iter().filter(|c| !c.ok).count()
            + usize::from(self.failure.is_some() && self.checks.iter().all(|c| c.ok));
        let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        x.push_str(&format!(
            "<testsuites>\n  <testsuite name=\"devos boot test {}\" tests=\"{}\" failures=\"{failures}\" time=\"{:.3}\">\n",
            xml(name),
            self.checks.len() + 1,
            self.seconds
        ));
        for c in &self.checks {
            x.push_str(&format!(
                "    <testcase classname=\"{}\" name=\"{}\" time=\"{:.3}\">",
                xml(name),
                xml(&c.check),
                c.ms as f64 / 1000.0
            ));
            if c.ok && c.check == TCG_FAULT {
                // Surefire's form for a case that failed once and passed when run
                // again: Jenkins and other readers count it as flaky, not as a pass.
                x.push_str(&format!(
                    "<flakyFailure message=\"{}\" type=\"{TCG_FAULT}\"><system-out>{}</system-out></flakyFailure>",
                    xml(c.detail.lines().next().unwrap_or_default()),
                    xml(&c.detail)
                ));
            } else if c.ok {
                x.push_str(&format!("<system-out>{}</system-out>", xml(&c.detail)));
            } else {
                x.push_str(&format!(
                    "<failure message=\"{}\">{}</failure>",
                    xml(c.detail.lines().next().unwrap_or_default()),
                    xml(&c.detail)
                ));
            }
            x.push_str("</testcase>\n");
        }
        x.push_str(&format!(
            "    <testcase classname=\"{}\" name=\"boot\" time=\"{:.3}\">",
            xml(name),
            self.seconds
        ));
        if let Some(f) = &self.failure {
            x.push_str(&format!(
                "<failure message=\"{}\">{}\n\nlast console lines:\n{}</failure>",
                xml(f.lines().next().unwrap_or_default()),
                xml(f),
                xml(&self.console_tail.join("\n"))
            ));
        }
        x.push_str("</testcase>\n  </testsuite>\n</testsuites>\n");
        x
    }
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace(|c: char| c.is_control() && c != '\n' && c != '\t', "")
}

/// Check, before a boot test runs, that `--junit PATH` can be written: its directory
/// exists and takes a new file, and PATH is not a directory or a read-only file. A
/// report that cannot be written is then known before minutes of booting.
pub(crate) fn check_writable(path: &Path) -> anyhow::Result<()> {
    use anyhow::{Context, bail};

    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        bail!(
            "--junit {}: the directory {} does not exist\n  hint: create it first, or give a path in an existing directory",
            path.display(),
            dir.display()
        );
    }
    if path.is_dir() {
        bail!(
            "--junit {} is a directory\n  hint: give the path of a file to write, e.g. {}",
            path.display(),
            path.join("boot-test.xml").display()
        );
    }
    let hint = "choose a directory you can write to, or fix its permissions";
    if path.exists() {
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .with_context(|| {
                format!(
                    "--junit {}: cannot write the file\n  hint: {hint}",
                    path.display()
                )
            })?;
    } else {
        tempfile::NamedTempFile::new_in(dir).with_context(|| {
            format!(
                "--junit {}: cannot create a file in {}\n  hint: {hint}",
                path.display(),
                dir.display()
            )
        })?;
    }
    Ok(())
}

/// Write the JUnit XML of `report` to `path` (`--junit`).
pub(crate) fn write(path: &Path, report: &TestReport) -> anyhow::Result<()> {
    use anyhow::Context;

    std::fs::write(path, report.junit()).with_context(|| {
        format!(
            "cannot write the JUnit report --junit {} (the boot test's result is recorded in the registry and printed above)\n  hint: check that the directory exists and can be written, then run the test again for the file",
            path.display()
        )
    })
}

#[cfg(test)]
mod writable_tests {
    use super::check_writable;

    #[test]
    fn junit_paths_are_checked_before_the_test() {
        let dir = tempfile::tempdir().unwrap();
        check_writable(&dir.path().join("report.xml")).unwrap();
        let missing = check_writable(&dir.path().join("no/such/dir/report.xml")).unwrap_err();
        let missing = format!("{missing:#}");
        assert!(
            missing.contains("--junit")
                && missing.contains("does not exist")
                && missing.contains("hint:"),
            "{missing}"
        );
        let is_dir = format!("{:#}", check_writable(dir.path()).unwrap_err());
        assert!(is_dir.contains("is a directory"), "{is_dir}");
        // Permissions mean nothing to root, who runs image builds.
        if !crate::support::paths::is_root() {
            let locked = dir.path().join("locked");
            std::fs::create_dir(&locked).unwrap();
            std::fs::set_permissions(&locked, std::os::unix::fs::PermissionsExt::from_mode(0o555))
                .unwrap();
            let e = format!("{:#}", check_writable(&locked.join("r.xml")).unwrap_err());
            assert!(
                e.contains("--junit") && e.contains("cannot create a file"),
                "{e}"
            );
        }
    }
}

#[cfg(test)]
mod xml_tests {
    use super::super::vm::{Accel, AccelChoice};
    use super::super::{Check, TCG_FAULT, TestReport};

    fn report(checks: Vec<Check>, failure: Option<&str>) -> TestReport {
        TestReport {
            disk: "disk.raw".into(),
            version: Some("devos-debian 0.2.0+abc".into()),
            accel: AccelChoice {
                accel: Accel::Tcg,
                reason: "test".into(),
            },
            passed: failure.is_none(),
            checks,
            seconds: 30.5,
            agent_answered_seconds: Some(28.0),
            ssh_host_key: None,
            failure: failure.map(str::to_owned),
            console_tail: vec!["[  1.0] <last> & line".into()],
            kept: None,
        }
    }

    fn check(name: &str, ok: bool, detail: &str) -> Check {
        Check {
            check: name.into(),
            ok,
            detail: detail.into(),
            ms: 1500,
        }
    }

    #[test]
    fn a_rerun_boot_is_flaky_a_failed_check_fails_and_text_is_escaped() {
        let flaky = report(
            vec![
                check(TCG_FAULT, true, "boot 1 crashed under TCG (\"oops\")"),
                check("agent", true, "answered <Ping> & more"),
            ],
            None,
        )
        .junit();
        assert!(
            flaky.contains("failures=\"0\"") && flaky.contains("tests=\"3\""),
            "{flaky}"
        );
        assert!(
            flaky.contains(
                "name=\"tcg-fault\" time=\"1.500\"><flakyFailure message=\"boot 1 crashed under TCG (&quot;oops&quot;)\" type=\"tcg-fault\">"
            ),
            "{flaky}"
        );
        assert!(
            flaky.contains("answered &lt;Ping&gt; &amp; more"),
            "{flaky}"
        );
        assert_eq!(flaky.matches("<failure").count(), 0, "{flaky}");

        let failed = report(
            vec![check("agent", false, "no answer\nsecond line")],
            Some("the agent did not answer"),
        )
        .junit();
        assert!(failed.contains("failures=\"1\""), "{failed}");
        assert!(
            failed.contains("<failure message=\"no answer\">no answer\nsecond line</failure>"),
            "{failed}"
        );
        assert!(
            failed.contains("last console lines:\n[  1.0] &lt;last&gt; &amp; line</failure>"),
            "{failed}"
        );

        // A failure with every check passing counts once, on the boot case.
        let boot_only = report(vec![check("agent", true, "ok")], Some("timed out")).junit();
        assert!(boot_only.contains("failures=\"1\""), "{boot_only}");
    }
}
