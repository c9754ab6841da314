//! Who decides whether an action runs: deny rules (always first), then the policy's
//! auto-approved classes, then the user's remembered rules; anything else asks.

use std::path::Path;

use crate::action::Action;
use crate::config::{DenyRule, Policy, UserPolicy};
use crate::request::{Decision, Rule};
use crate::risk::{Risk, RiskClass};

/// The facts about the caller that decisions depend on.
pub struct Subject<'a> {
    pub uid: u32,
    pub is_admin: bool,
    pub user_policy: &'a UserPolicy,
}

/// Decide an action: `Denied`, `Approved` (by policy or a remembered rule) or `Ask`.
pub fn decide(
    action: &Action,
    risk: &Risk,
    cwd: &Path,
    policy: &Policy,
    subject: &Subject,
    rules: &[Rule],
) -> Decision {
    for (origin, rules) in [
        ("policy", &policy.deny),
        ("your policy", &subject.user_policy.deny),
    ] {
        if let Some(rule) = rules.iter().find(|r| deny_matches(r, action, cwd)) {
            return Decision::Denied {
                by: format!("{origin} deny rule"),
                reason: rule.reason.clone().unwrap_or_else(|| describe_deny(rule)),
            };
        }
    }
    if let Some(rule) = rules
        .iter()
        .find(|r| !r.allow && rule_matches(r, action, cwd))
    {
        return Decision::Denied {
            by: format!("remembered rule {}", rule.id),
            reason: "you chose to always deny this".into(),
        };
    }
    if risk.class == RiskClass::Privileged && !subject.is_admin && privileged_runs_as_root(action) {
        return Decision::Denied {
            by: "policy".into(),
            reason: format!(
                "this needs an administrator: only root and members of {} may approve it",
                policy.admin_groups.join(", ")
            ),
        };
    }
    if risk.classifier_failed {
        return Decision::Ask;
    }
    let user_auto = subject
        .user_policy
        .auto_approve
        .iter()
        .filter(|c| policy.user_may_auto_approve.contains(c));
    let auto = policy
        .auto_approve
        .iter()
        .chain(user_auto)
        .any(|c| *c == risk.class);
    if auto && risk.class != RiskClass::Unknown {
        return Decision::Approved {
            by: format!("policy: {} runs without asking", risk.class),
        };
    }
    if !matches!(action, Action::Shell { .. })
        && risk.class != RiskClass::Privileged
        && let Some(rule) = rules
            .iter()
            .find(|r| r.allow && rule_matches(r, action, cwd))
    {
        return Decision::Approved {
            by: format!("remembered rule {} ({})", rule.id, describe_rule(rule)),
        };
    }
    Decision::Ask
}

/// Privileged actions that the executor runs as root (package installs); other
/// privileged commands run as the user, where they simply fail.
pub fn privileged_runs_as_root(action: &Action) -> bool {
    matches!(action, Action::PackageInstall { .. })
}

/// Whether a remember scope may be attached to this action: shells and privileged
/// actions are decided every time.
pub fn may_remember(action: &Action, risk: &Risk) -> Result<(), String> {
    if matches!(action, Action::Shell { .. }) {
        return Err("shell scripts are approved one at a time; they cannot be remembered".into());
    }
    if risk.class == RiskClass::Privileged || risk.classifier_failed {
        return Err(
            "privileged actions are approved one at a time; they cannot be remembered".into(),
        );
    }
    Ok(())
}

fn argv_starts_with(argv: &[String], prefix: &[String]) -> bool {
    if prefix.is_empty() || argv.len() < prefix.len() {
        return false;
    }
    let base = |s: &str| s.rsplit('/').next().unwrap_or(s).to_owned();
    base(&argv[0]) == base(&prefix[0]) && argv[1..prefix.len()] == prefix[1..]
}

fn path_under(action: &Action, cwd: &Path, prefix: &Path) -> bool {
    let paths = action.paths();
    if paths.is_empty() {
        return cwd.starts_with(prefix);
    }
    paths
        .iter()
        .all(|p| crate::risk::normalize(&cwd.join(p)).starts_with(prefix))
}

fn deny_matches(rule: &DenyRule, action: &Action, cwd: &Path) -> bool {
    if let Some(prefix) = &rule.path_prefix {
        let touches = action
            .paths()
            .iter()
            .any(|p| crate::risk::normalize(&cwd.join(p)).starts_with(prefix))
            || action.argv().is_some_and(|argv| {
                argv.iter()
                    .skip(1)
                    .filter(|a| a.starts_with('/') || a.contains(".."))
                    .any(|a| crate::risk::normalize(&cwd.join(a)).starts_with(prefix))
            });
        return touches;
    }
    action
        .argv()
        .is_some_and(|argv| argv_starts_with(&argv, &rule.command_prefix))
}

/// Whether a remembered rule covers an action: its command starts with the rule's
/// prefix, and/or every path it names (or its working directory) is under the rule's
/// path.
pub fn rule_matches(rule: &Rule, action: &Action, cwd: &Path) -> bool {
    let command_ok = rule.command_prefix.is_empty()
        || action
            .argv()
            .is_some_and(|argv| argv_starts_with(&argv, &rule.command_prefix));
    let path_ok = rule
        .path_prefix
        .as_ref()
        .is_none_or(|p| path_under(action, cwd, p));
    command_ok && path_ok && (!rule.command_prefix.is_empty() || rule.path_prefix.is_some())
}

pub fn describe_rule(rule: &Rule) -> String {
    let mut parts = Vec::new();
    if !rule.command_prefix.is_empty() {
        parts.push(format!(
            "commands starting `{}`",
            rule.command_prefix.join(" ")
        ));
    }
    if let Some(p) = &rule.path_prefix {
        parts.push(format!("paths under {}", p.display()));
    }
    parts.join(" and ")
}

fn describe_deny(rule: &DenyRule) -> String {
    match &rule.path_prefix {
        Some(p) => format!("nothing may touch {}", p.display()),
        None => format!("`{}` is never run", rule.command_prefix.join(" ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::Remember;
    use crate::risk::classify;

    fn rule(id: i64, allow: bool, cmd: &[&str], path: Option<&Path>) -> Rule {
        Rule {
            id,
            uid: 1000,
            allow,
            lifetime: Remember::Always,
            command_prefix: cmd.iter().map(|s| (*s).to_owned()).collect(),
            path_prefix: path.map(Path::to_path_buf),
            created: String::new(),
        }
    }

    fn decide_argv(argv: &[&str], cwd: &Path, rules: &[Rule], user: &UserPolicy) -> Decision {
        let action = Action::Run {
            argv: argv.iter().map(|s| (*s).to_owned()).collect(),
        };
        let risk = classify(&action, cwd);
        let subject = Subject {
            uid: 1000,
            is_admin: false,
            user_policy: user,
        };
        decide(&action, &risk, cwd, &Policy::default(), &subject, rules)
    }

    #[test]
    fn deny_wins_then_policy_then_rules_else_ask() {
        let dir = tempfile::tempdir().unwrap();
        let cwd = dir.path();
        let none = UserPolicy::default();
        assert!(matches!(
            decide_argv(&["ls"], cwd, &[], &none),
            Decision::Approved { .. }
        ));
        assert_eq!(decide_argv(&["mkdir", "x"], cwd, &[], &none), Decision::Ask);
        // A remembered allow covers it; a remembered deny beats policy.
        let allow = [rule(1, true, &["mkdir"], None)];
        assert!(matches!(
            decide_argv(&["mkdir", "x"], cwd, &allow, &none),
            Decision::Approved { .. }
        ));
        let deny = [rule(2, false, &["ls"], None), rule(3, true, &["ls"], None)];
        assert!(matches!(
            decide_argv(&["ls"], cwd, &deny, &none),
            Decision::Denied { .. }
        ));
        // The admin's deny list wins over everything.
        let all = [rule(4, true, &["rm"], None)];
        assert!(matches!(
            decide_argv(&["rm", "-rf", "/"], cwd, &all, &none),
            Decision::Denied { .. }
        ));
        assert!(matches!(
            decide_argv(&["ls", "/boot"], cwd, &[], &none),
            Decision::Denied { .. }
        ));
        // Users may widen auto-approval only as far as the admin allows.
        let user = UserPolicy {
            auto_approve: vec![RiskClass::WritesWorkdir, RiskClass::Destructive],
            deny: Vec::new(),
        };
        assert!(matches!(
            decide_argv(&["mkdir", "x"], cwd, &[], &user),
            Decision::Approved { .. }
        ));
        std::fs::write(cwd.join("f"), "").unwrap();
        assert_eq!(decide_argv(&["rm", "f"], cwd, &[], &user), Decision::Ask);
        // Unknown never runs unasked, privileged needs an admin for package installs.
        assert_eq!(
            decide_argv(&["bash", "-c", "ls"], cwd, &[], &none),
            Decision::Ask
        );
        let install = Action::PackageInstall {
            packages: vec!["jq".into()],
        };
        let risk = classify(&install, cwd);
        let subject = Subject {
            uid: 1000,
            is_admin: false,
            user_policy: &none,
        };
        assert!(matches!(
            decide(&install, &risk, cwd, &Policy::default(), &subject, &[]),
            Decision::Denied { .. }
        ));
    }

    #[test]
    fn rules_match_by_prefix_and_path() {
        let cwd = Path::new("/home/dev/proj");
        let git_commit = Action::Git {
            args: vec!["commit".into(), "-m".into(), "x".into()],
        };
        assert!(rule_matches(
            &rule(1, true, &["git", "commit"], None),
            &git_commit,
            cwd
        ));
        assert!(!rule_matches(
            &rule(1, true, &["git", "push"], None),
            &git_commit,
            cwd
        ));
        assert!(rule_matches(
            &rule(1, true, &[], Some(Path::new("/home/dev"))),
            &git_commit,
            cwd
        ));
        assert!(!rule_matches(
            &rule(1, true, &[], Some(Path::new("/srv"))),
            &git_commit,
            cwd
        ));
        let escape = Action::Write {
            path: "/home/dev/proj/../../other/x".into(),
            content: String::new(),
        };
        assert!(!rule_matches(&rule(1, true, &[], Some(cwd)), &escape, cwd));
        assert!(
            !rule_matches(&rule(1, true, &[], None), &git_commit, cwd),
            "an empty rule matches nothing"
        );
    }
}
