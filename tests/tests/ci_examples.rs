//! The CI examples in docs/ci/ are valid workflows: each is checked against its CI
//! system's own schema (check-jsonschema's bundled copies, offline), and runs the
//! commands the README documents.

#![allow(clippy::unwrap_used)]

use devos_tests::{python_tool, repo_root};

fn check(file: &str, schema: &str) {
    let path = repo_root().join("docs/ci").join(file);
    let tool = python_tool("check-jsonschema");
    let out = std::process::Command::new(&tool)
        .args(["--builtin-schema", schema])
        .arg(&path)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e}; run tests/setup-host to install it",
                tool.display()
            )
        });
    assert!(
        out.status.success(),
        "docs/ci/{file} is not a valid {schema} file:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&path).unwrap();
    for command in [
        "tests/setup-host",
        "image validate",
        "image build --test --junit junit.xml",
        "publish ami devos-debian",
        "DEVOS_REGISTRY",
        "DEVOS_CACHE_DIR",
    ] {
        assert!(
            text.contains(command),
            "docs/ci/{file} does not run `{command}`"
        );
    }
}

#[test]
fn the_github_actions_example_is_a_valid_workflow() {
    check("github-actions.yml", "vendor.github-workflows");
}

#[test]
fn the_gitlab_ci_example_is_a_valid_pipeline() {
    check("gitlab-ci.yml", "vendor.gitlab-ci");
}
