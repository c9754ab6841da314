//! A test report for people (the summary) and for CI (JUnit XML).

use super::TestReport;

impl TestReport {
    /// The human summary printed after a test.
    pub(crate) fn summary(&self) -> String {
        let mut s = format!(
            "boot test of {} ({}): {} in {:.1}s under {:?} ({})\n",
            self.disk.display(),
            self.version.as_deref().unwrap_or("unknown version"),
            if self.passed { "PASSED" } else { "FAILED" },
            self.seconds,
            self.accel.accel,
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
            if c.ok {
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
