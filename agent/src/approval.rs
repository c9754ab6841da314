//! Who decides whether an action runs: deny rules (always first), a program that is
//! not installed (it could not run), then the policy's auto-approved classes, then the
//! user's remembered rules; anything else asks.
//!
//! Rules mean exactly what was approved. A remembered approval is, by default, the
//! exact action (argv or file operation) in the exact working directory. A prefix —
//! of a command, or a directory — is used only when the user chose one, and covers
//! only actions of the class it was approved for or lower, never `unknown`,
//! `destructive` or `privileged` ones and never one that reaches a secret location.
//! Path scopes and deny rules compare canonical real paths; command deny rules compare
//! normalised argv (any order, any spelling of the options).

use std::path::{Path, PathBuf};

use crate::action::Action;
use crate::config::{DenyRule, Policy, UserPolicy};
use crate::request::{Decision, Exact, Rule};
use crate::risk::programs::Normalized;
use crate::risk::{Risk, RiskClass};

/// The facts about the caller that decisions depend on.
pub struct Subject<'a> {
    pub uid: u32,
    /// Their home directory, for `~` and `$HOME` in what they ask.
    pub home: &'a Path,
    pub is_admin: bool,
    pub user_policy: &'a UserPolicy,
}

/// Decide an action run in `cwd` (canonical): `Denied`, `Approved` (by policy or a
/// remembered rule) or `Ask`.
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
        for certain in [true, false] {
            if let Some(rule) = rules
                .iter()
                .find(|r| deny_matches(r, action, risk, cwd, subject.home, certain))
            {
                let mut reason = rule.reason.clone().unwrap_or_else(|| describe_deny(rule));
                if !certain {
                    reason.push_str(&format!(
                        " — and this could be `{}` once it runs: part of it is only known then (a shell variable or substitution, what xargs adds, find's {{}}); spell the command out",
                        rule.command_prefix.join(" ")
                    ));
                }
                return Decision::Denied {
                    by: format!("{origin} deny rule"),
                    reason,
                };
            }
        }
    }
    if let Some(program) = &risk.not_installed {
        return Decision::Denied {
            by: "this machine".into(),
            reason: format!(
                "`{program}` is not installed in the system directories, so this cannot run: give its path to run one from elsewhere (`~/.local/bin/{program}`), or, on a DevOS image, add its package to the image's spec ([packages] include, or a layer such as layers/build-tools.toml) and build it again"
            ),
        };
    }
    if let Some(rule) = rules
        .iter()
        .find(|r| remembered_deny_matches(r, action, risk, cwd, subject.home))
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
    // A secret location is never reached on the strength of a class alone.
    if auto && risk.class != RiskClass::Unknown && risk.secrets.is_empty() {
        return Decision::Approved {
            by: format!("policy: {} runs without asking", risk.class),
        };
    }
    if let Some(rule) = rules.iter().find(|r| {
        r.allow
                // A prefix is a standing approval: only for what the admin lets users
                // approve standing (checked now: the policy may have changed since).
                && (r.exact.is_some() || user_may_stand(policy, risk.class))
                && rule_matches(r, action, risk, cwd)
    }) {
        return Decision::Approved {
            by: format!("remembered rule {} ({})", rule.id, describe_rule(rule)),
        };
    }
    Decision::Ask
}

/// Who a user's own approval (`Approve`) names: the request's user and uid. Any other
/// approval was given without asking them (policy, a remembered rule), and is decided
/// again when it no longer holds.
pub fn by_user(user: &str, uid: u32) -> String {
    format!("{user} (uid {uid})")
}

/// Privileged actions that the executor runs as root (package installs); other
/// privileged commands run as the user, where they simply fail.
pub fn privileged_runs_as_root(action: &Action) -> bool {
    matches!(action, Action::PackageInstall { .. })
}

/// Why a decision cannot be remembered the way the user asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("shell scripts are approved one at a time; they cannot be remembered")]
    ShellScript,
    #[error("privileged actions are approved one at a time; they cannot be remembered")]
    Privileged,
    #[error(
        "actions devos does not understand (`unknown`) are approved one at a time; they cannot be remembered"
    )]
    Unknown,
    #[error(
        "a {class} action can only be remembered exactly: the policy's user-may-auto-approve does not include it"
    )]
    NotStanding { class: RiskClass },
    #[error(
        "a {class} action can only be remembered exactly (drop --command-prefix/--path-prefix)"
    )]
    ExactOnly { class: RiskClass },
    #[error("an action that reaches a secret location can only be remembered exactly")]
    ReachesSecrets,
}

/// Whether an approval of this action may be remembered at all: shell scripts,
/// unknown and privileged actions are decided every time.
pub fn may_remember(action: &Action, risk: &Risk) -> Result<(), RuleError> {
    if matches!(action, Action::Shell { .. }) {
        return Err(RuleError::ShellScript);
    }
    if risk.class == RiskClass::Privileged || risk.classifier_failed {
        return Err(RuleError::Privileged);
    }
    if risk.class == RiskClass::Unknown {
        return Err(RuleError::Unknown);
    }
    Ok(())
}

/// The classes a prefix (command or directory) may ever cover.
fn prefix_may_cover(class: RiskClass) -> bool {
    PREFIX_CLASSES.contains(&class)
}

/// The classes a prefix rule may ever cover.
pub const PREFIX_CLASSES: [RiskClass; 3] = [
    RiskClass::ReadOnly,
    RiskClass::WritesWorkdir,
    RiskClass::Network,
];

/// Whether users may have standing approvals (prefix rules) for a class: only those
/// the admin lets them auto-approve (`policy.user-may-auto-approve`, which lists
/// read-only by default; an admin who removes it means it).
fn user_may_stand(policy: &Policy, class: RiskClass) -> bool {
    prefix_may_cover(class) && policy.user_may_auto_approve.contains(&class)
}

/// The highest class a rule added without an action (`AddRule`) may approve; `None`
/// when the policy lets users approve no class standing.
pub fn widest_standing_class(policy: &Policy) -> Option<RiskClass> {
    RiskClass::ALL
        .into_iter()
        .filter(|c| user_may_stand(policy, *c))
        .max()
}

/// Whether a user-chosen prefix rule may be made from an action of this risk.
pub fn may_remember_prefix(risk: &Risk, policy: &Policy) -> Result<(), RuleError> {
    let class = risk.class;
    if prefix_may_cover(class) && !user_may_stand(policy, class) {
        return Err(RuleError::NotStanding { class });
    }
    if !prefix_may_cover(class) {
        return Err(RuleError::ExactOnly { class });
    }
    if !risk.secrets.is_empty() {
        return Err(RuleError::ReachesSecrets);
    }
    Ok(())
}

/// Every command line an action amounts to, with the directory it runs in, for deny
/// rules: its argv (and the argv inside its words: `sh -c "rm -r /"`), each command of
/// a shell script (following `cd`), a file operation as the command that would do it.
/// `~`, `$HOME` and `${HOME}` are the caller's home.
fn command_lines(action: &Action, cwd: &Path, home: &Path) -> Vec<(Vec<String>, PathBuf)> {
    let home_s = home.to_string_lossy();
    let expand = |w: &str| -> String {
        let w = w.replace("${HOME}", &home_s).replace("$HOME", &home_s);
        match w.strip_prefix('~') {
            Some(rest) if rest.is_empty() || rest.starts_with('/') => format!("{home_s}{rest}"),
            _ => w,
        }
    };
    let words = |ws: &[&str]| ws.iter().map(|w| expand(w)).collect::<Vec<String>>();
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let script = |text: &str| -> Vec<(Vec<String>, PathBuf)> {
        let mut dir = cwd.to_path_buf();
        let mut out = Vec::new();
        for command in text.split(['\n', ';', '&', '|']) {
            let command = command
                .replace("${HOME}", &home_s)
                .replace("$HOME", &home_s);
            let ws: Vec<String> = crate::action::loose_words(&command)
                .iter()
                .map(|w| expand(w))
                .collect();
            match ws.split_first() {
                Some((cd, rest)) if cd == "cd" => {
                    dir = rest.first().map_or_else(
                        || home.to_path_buf(),
                        |d| crate::risk::programs::lexical_path(d, &dir),
                    );
                }
                Some(_) => {
                    // As the shell would split it before expanding: words that are
                    // only known when it runs stay visible (`$X`, `$(...)`, `{}`).
                    let raw: Vec<String> = command
                        .split(|c: char| c.is_whitespace() || c == '"' || c == '\'')
                        .filter(|w| !w.is_empty())
                        .map(expand)
                        .collect();
                    if raw != ws {
                        out.push((raw, dir.clone()));
                    }
                    out.push((ws, dir.clone()));
                }
                None => {}
            }
        }
        out
    };
    let mut lines = match action {
        Action::Shell { script: text } => script(text),
        Action::Delete { path: p } => vec![(words(&["rm", "-r", "-f", &path(p)]), cwd.into())],
        Action::Move { from, to } => vec![(words(&["mv", &path(from), &path(to)]), cwd.into())],
        Action::Copy { from, to } => {
            vec![(words(&["cp", "-r", &path(from), &path(to)]), cwd.into())]
        }
        Action::Mkdir { path: p } => vec![(words(&["mkdir", "-p", &path(p)]), cwd.into())],
        Action::Write { path: p, .. } => vec![(words(&["tee", &path(p)]), cwd.into())],
        Action::Read { path: p } => vec![(words(&["cat", &path(p)]), cwd.into())],
        other => {
            let argv = other.argv().unwrap_or_default();
            let mut lines = vec![(argv.iter().map(|w| expand(w)).collect(), cwd.to_path_buf())];
            lines.extend(script(&argv.join(" ")));
            lines
        }
    };
    // `find PATH... -delete` is `rm -r -f PATH...`.
    let deletes: Vec<(Vec<String>, PathBuf)> = lines
        .iter()
        .filter_map(|(ws, dir)| {
            let at = ws
                .iter()
                .position(|w| w.rsplit('/').next() == Some("find"))?;
            let rest = &ws[at + 1..];
            rest.iter().any(|w| w == "-delete").then_some(())?;
            let mut argv: Vec<String> = ["rm", "-r", "-f"].map(String::from).to_vec();
            let starts = rest
                .iter()
                .take_while(|w| !w.starts_with('-') && *w != "(" && *w != "!");
            argv.extend(starts.cloned());
            if argv.len() == 3 {
                argv.push(".".into());
            }
            Some((argv, dir.clone()))
        })
        .collect();
    lines.extend(deletes);
    lines
}

/// Whether a deny rule matches an action: for `certain`, as it is spelled; otherwise
/// also once what it leaves to run time is known (command rules only: paths named by
/// the administrator's path rules are absent from every sandbox anyway).
fn deny_matches(
    rule: &DenyRule,
    action: &Action,
    risk: &Risk,
    cwd: &Path,
    home: &Path,
    certain: bool,
) -> bool {
    let lines = command_lines(action, cwd, home);
    if let Some(prefix) = &rule.path_prefix {
        if !certain {
            return false;
        }
        // Real paths from classification, and every word (or `--opt=` value) as a path
        // too, so nothing spelled another way gets past; the rule's path as written,
        // where root's links lead (an administrator's `/home/x` is `/var/home/x` in
        // DevOS images; a link a user planted on the way leads nowhere here), and the
        // other names bind mounts give it.
        let real = crate::risk::paths::resolve_trusted(prefix).0;
        // (Never `/` but as written: a rule on a user's place that leads there would
        // refuse every action of every user.)
        let names: Vec<PathBuf> = std::iter::once(prefix.clone())
            .chain(
                crate::risk::paths::mount_aliases(&real)
                    .into_iter()
                    .chain([real])
                    .filter(|n| n.parent().is_some()),
            )
            .collect();
        let under = |p: &Path| names.iter().any(|n| p.starts_with(n));
        return under(cwd)
            || risk.paths.iter().any(|p| under(p))
            || risk.program.as_ref().is_some_and(|p| under(p))
            || lines.iter().any(|(words, dir)| {
                under(dir)
                    || words
                        .iter()
                        .flat_map(|w| [w.as_str(), w.rsplit('=').next().unwrap_or(w)])
                        .filter(|w| crate::risk::programs::looks_like_path(w))
                        .any(|w| under(&crate::risk::programs::lexical_path(w, dir)))
            });
    }
    let Some(rule) = Normalized::of_rule(&rule.command_prefix) else {
        return false;
    };
    if !certain {
        return lines.iter().any(|(words, dir)| {
            Normalized::views(words, dir)
                .iter()
                .any(|v| v.might_be(&rule))
        });
    }
    risk.normalized.iter().any(|n| n.contains(&rule))
        || lines
            .iter()
            .any(|(words, dir)| Normalized::views(words, dir).iter().any(|v| v.is(&rule)))
}

/// Whether a remembered rule covers an action.
pub fn rule_matches(rule: &Rule, action: &Action, risk: &Risk, cwd: &Path) -> bool {
    // An allow rule never lets an action reach more than the one it was made from:
    // the same argv may now lead through a symlink to somewhere else.
    let reaches_no_more = || match &rule.approved {
        Some(approved) if rule.exact.is_some() => risk.within(approved).is_ok(),
        approved => {
            risk.writes_outside.iter().all(|w| {
                approved
                    .as_ref()
                    .is_some_and(|a| a.writes_outside.contains(w))
                    || rule.path_prefix.as_ref().is_some_and(|p| w.starts_with(p))
            }) && (!risk.network
                || approved
                    .as_ref()
                    .map_or(rule.max_class >= Some(RiskClass::Network), |a| a.network))
        }
    };
    if let Some(exact) = &rule.exact {
        return exact.action == *action
            && exact.cwd == cwd
            && (!rule.allow
                || (rule.max_class.is_none_or(|c| risk.class <= c) && reaches_no_more()));
    }
    if rule.command_prefix.is_empty() && rule.path_prefix.is_none() {
        return false;
    }
    if rule.allow
        && (!prefix_may_cover(risk.class)
            || !risk.secrets.is_empty()
            || rule.max_class.is_none_or(|c| risk.class > c))
    {
        return false;
    }
    let command_ok = match rule.command_prefix.split_first() {
        None => true,
        Some((first, rest)) => match (&risk.normalized, action.argv()) {
            (Some(n), Some(argv)) => {
                let name = first.rsplit('/').next().unwrap_or(first);
                n.program == name && argv.len() > rest.len() && argv[1..=rest.len()] == *rest
            }
            _ => false,
        },
    };
    let path_ok = rule
        .path_prefix
        .as_ref()
        .is_none_or(|prefix| all_under(prefix, risk, cwd));
    command_ok && path_ok && (!rule.allow || reaches_no_more())
}

/// Whether `cwd` and every path the action names are at or below `prefix` (a
/// remembered rule's path scope).
fn all_under(prefix: &Path, risk: &Risk, cwd: &Path) -> bool {
    cwd.starts_with(prefix) && risk.paths.iter().all(|p| p.starts_with(prefix))
}

/// Whether a remembered deny rule covers an action: where [`rule_matches`] says so,
/// and also wherever the policy's deny rules would ([`deny_matches`]): its command
/// prefix compared normalised (options in any order and spelling, git's global options
/// and runners like `env` in front, and what is only known when it runs), so that
/// `git --no-pager commit` does not get past a rule on `git commit`; its path prefix
/// matching when the working directory, the program or *any* path the action names is
/// below it (an allow rule's scope needs them all), so naming one more path elsewhere
/// does not get past it. Only deny rules: an allow rule matched this loosely would
/// approve more than the user approved.
fn remembered_deny_matches(
    rule: &Rule,
    action: &Action,
    risk: &Risk,
    cwd: &Path,
    home: &Path,
) -> bool {
    if rule.allow {
        return false;
    }
    if rule_matches(rule, action, risk, cwd) {
        return true;
    }
    if rule.exact.is_some() || (rule.command_prefix.is_empty() && rule.path_prefix.is_none()) {
        return false;
    }
    let as_policy = |command_prefix: Vec<String>, path_prefix: Option<PathBuf>, certain| {
        let rule = DenyRule {
            command_prefix,
            path_prefix,
            reason: None,
        };
        deny_matches(&rule, action, risk, cwd, home, certain)
    };
    let command = rule.command_prefix.is_empty()
        || [true, false]
            .into_iter()
            .any(|certain| as_policy(rule.command_prefix.clone(), None, certain));
    let path = rule
        .path_prefix
        .as_ref()
        .is_none_or(|prefix| as_policy(Vec::new(), Some(prefix.clone()), true));
    command && path
}

pub fn describe_rule(rule: &Rule) -> String {
    let mut parts = Vec::new();
    if let Some(Exact { action, cwd }) = &rule.exact {
        parts.push(format!(
            "exactly `{}` in {}",
            action.describe(),
            cwd.display()
        ));
    }
    if !rule.command_prefix.is_empty() {
        parts.push(format!(
            "commands starting `{}`",
            rule.command_prefix.join(" ")
        ));
    }
    if let Some(p) = &rule.path_prefix {
        parts.push(format!("paths under {}", p.display()));
    }
    let mut text = parts.join(" and ");
    if rule.allow
        && rule.exact.is_none()
        && let Some(c) = rule.max_class
    {
        text.push_str(&format!(", up to {c}"));
    }
    text
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
    use crate::risk::{Scope, classify};

    fn rule(id: i64, allow: bool, cmd: &[&str], path: Option<&Path>, max: RiskClass) -> Rule {
        Rule {
            id,
            uid: 1000,
            allow,
            lifetime: Remember::Always,
            command_prefix: cmd.iter().map(|s| (*s).to_owned()).collect(),
            path_prefix: path.map(Path::to_path_buf),
            exact: None,
            max_class: Some(max),
            approved: None,
            created: String::new(),
        }
    }

    fn classify_in(action: &Action, cwd: &Path) -> Risk {
        classify(
            action,
            &Scope {
                cwd,
                home: Path::new("/nonexistent"),
                uid: 0,
                secrets: &[],
            },
        )
    }

    fn run(argv: &[&str]) -> Action {
        Action::Run {
            argv: argv.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    fn decide_argv(argv: &[&str], cwd: &Path, rules: &[Rule], user: &UserPolicy) -> Decision {
        let action = run(argv);
        let risk = classify_in(&action, cwd);
        decide(
            &action,
            &risk,
            cwd,
            &Policy::default(),
            &developer(user),
            rules,
        )
    }

    /// uid 1000 with its home in /home/dev, no administrator.
    fn developer(user_policy: &UserPolicy) -> Subject<'_> {
        Subject {
            uid: 1000,
            home: Path::new("/home/dev"),
            is_admin: false,
            user_policy,
        }
    }

    fn approved(d: &Decision) -> bool {
        matches!(d, Decision::Approved { .. })
    }

    #[test]
    fn a_program_that_is_not_installed_is_refused_not_asked_about() {
        let dir = tempfile::tempdir().unwrap();
        let cwd = &std::fs::canonicalize(dir.path()).unwrap();
        let none = UserPolicy::default();
        for argv in [
            &["devos-no-such-program", "status"][..],
            &["devos-no-such-program"],
        ] {
            match decide_argv(argv, cwd, &[], &none) {
                Decision::Denied { by, reason } => {
                    assert_eq!(by, "this machine");
                    assert!(
                        reason.contains("`devos-no-such-program` is not installed"),
                        "{reason}"
                    );
                    assert!(reason.contains("[packages] include"), "{reason}");
                }
                other => panic!("{argv:?}: {other:?}"),
            }
        }
        // Installed programs, and words of a shell script (a function of its own,
        // say), are decided as before.
        assert_eq!(
            decide_argv(&["ls"], cwd, &[], &none),
            Decision::Approved {
                by: "policy: read-only runs without asking".into()
            }
        );
        let action = Action::Shell {
            script: "f() { echo hi; }; f; devos-no-such-program".into(),
        };
        let risk = classify_in(&action, cwd);
        assert_eq!(risk.not_installed, None);
        let decided = decide(
            &action,
            &risk,
            cwd,
            &Policy::default(),
            &developer(&none),
            &[],
        );
        assert_eq!(decided, Decision::Ask);
    }

    #[test]
    fn what_is_only_known_when_it_runs_could_be_denied() {
        let dir = tempfile::tempdir().unwrap();
        let cwd = &std::fs::canonicalize(dir.path()).unwrap();
        let none = UserPolicy::default();
        let subject = developer(&none);
        let decide_script = |script: &str| {
            let action = Action::Shell {
                script: script.to_owned(),
            };
            let risk = classify_in(&action, cwd);
            decide(&action, &risk, cwd, &Policy::default(), &subject, &[])
        };
        for script in [
            "X=/; rm -r $X",
            "rm -r ${X:-/}",
            "$R -r /",
            "env $R -r /",
            "rm -r $(dirname /x)",
            "echo / | xargs rm -r",
            "find / -exec rm -r {} +",
            "find / -delete",
        ] {
            assert!(
                matches!(decide_script(script), Decision::Denied { .. }),
                "{script}"
            );
        }
        for script in [
            "echo $PATH",
            "ls $X",
            "echo a | xargs echo",
            "find . -name '*.rs'",
        ] {
            assert!(
                !matches!(decide_script(script), Decision::Denied { .. }),
                "{script}"
            );
        }
    }

    #[test]
    fn deny_wins_then_policy_then_rules_else_ask() {
        let dir = tempfile::tempdir().unwrap();
        let cwd = &std::fs::canonicalize(dir.path()).unwrap();
        let none = UserPolicy::default();
        assert!(approved(&decide_argv(&["ls"], cwd, &[], &none)));
        assert_eq!(decide_argv(&["mkdir", "x"], cwd, &[], &none), Decision::Ask);
        let allow = [rule(1, true, &["mkdir"], None, RiskClass::WritesWorkdir)];
        assert!(approved(&decide_argv(&["mkdir", "x"], cwd, &allow, &none)));
        let deny = [
            rule(2, false, &["ls"], None, RiskClass::ReadOnly),
            rule(3, true, &["ls"], None, RiskClass::ReadOnly),
        ];
        assert!(matches!(
            decide_argv(&["ls"], cwd, &deny, &none),
            Decision::Denied { .. }
        ));
        // The admin's deny list wins over everything, in every spelling.
        let all = [rule(4, true, &["rm"], None, RiskClass::Network)];
        for argv in [
            &["rm", "-rf", "/"][..],
            &["rm", "-fr", "/"],
            &["rm", "-r", "-f", "/"],
            &["rm", "-rf", "//"],
            &["rm", "-rf", "/."],
            &["/bin/rm", "--recursive", "--force", "/"],
            &["rm", "-R", "/"],
        ] {
            assert!(
                matches!(decide_argv(argv, cwd, &all, &none), Decision::Denied { .. }),
                "{argv:?}"
            );
        }
        assert!(matches!(
            decide_argv(&["ls", "/boot"], cwd, &[], &none),
            Decision::Denied { .. }
        ));
        // Users may widen auto-approval only as far as the admin allows.
        let user = UserPolicy {
            auto_approve: vec![RiskClass::WritesWorkdir, RiskClass::Destructive],
            deny: Vec::new(),
        };
        assert!(approved(&decide_argv(&["mkdir", "x"], cwd, &[], &user)));
        std::fs::write(cwd.join("f"), "").unwrap();
        assert_eq!(decide_argv(&["rm", "f"], cwd, &[], &user), Decision::Ask);
        assert_eq!(
            decide_argv(&["bash", "-c", "ls"], cwd, &[], &none),
            Decision::Ask
        );
        let install = Action::PackageInstall {
            packages: vec!["jq".into()],
        };
        let risk = classify_in(&install, cwd);
        let subject = developer(&none);
        assert!(matches!(
            decide(&install, &risk, cwd, &Policy::default(), &subject, &[]),
            Decision::Denied { .. }
        ));
    }

    #[test]
    fn an_administrators_path_rule_is_compared_where_its_links_lead() {
        // The rule says `.../home/dev/data`; `home` is a link (as `/home` is to
        // `/var/home` in DevOS images), and what runs names the real place.
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let real_home = root.join("var-home/dev");
        std::fs::create_dir_all(real_home.join("data")).unwrap();
        std::fs::write(real_home.join("data/f"), "secret").unwrap();
        std::os::unix::fs::symlink("var-home", root.join("home")).unwrap();
        let denying = |path: PathBuf| Policy {
            deny: vec![crate::config::DenyRule {
                command_prefix: Vec::new(),
                path_prefix: Some(path),
                reason: None,
            }],
            ..Policy::default()
        };
        let policy = denying(root.join("home/dev/data"));
        let none = UserPolicy::default();
        let subject = Subject {
            uid: 1000,
            home: &real_home,
            is_admin: false,
            user_policy: &none,
        };
        for (argv, cwd) in [
            (&["cat", "data/f"][..], real_home.clone()),
            (&["ls"][..], real_home.join("data")),
        ] {
            let action = run(argv);
            let risk = classify_in(&action, &cwd);
            assert!(
                matches!(
                    decide(&action, &risk, &cwd, &policy, &subject, &[]),
                    Decision::Denied { .. }
                ),
                "{argv:?} in {}",
                cwd.display()
            );
        }
        // A link a user planted on a rule's path (in a directory others may write)
        // does not turn the rule into one on where it leads (`/`: every action).
        use std::os::unix::fs::PermissionsExt;
        let open = root.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::os::unix::fs::symlink("/", open.join("evil")).unwrap();
        let policy = denying(open.join("evil"));
        let action = run(&["ls"]);
        let risk = classify_in(&action, &real_home);
        assert!(!matches!(
            decide(&action, &risk, &real_home, &policy, &subject, &[]),
            Decision::Denied { .. }
        ));
    }

    #[test]
    fn a_remembered_deny_rule_holds_whatever_global_options_come_first() {
        let dir = tempfile::tempdir().unwrap();
        let cwd = &std::fs::canonicalize(dir.path()).unwrap();
        let git = std::process::Command::new("git")
            .args(["init", "--quiet"])
            .current_dir(cwd)
            .status()
            .unwrap();
        assert!(git.success());
        // Commits run without asking: they write only the working directory.
        let user = UserPolicy {
            auto_approve: vec![RiskClass::WritesWorkdir],
            deny: Vec::new(),
        };
        let commit = ["git", "commit", "-m", "x"];
        let spelled_otherwise: [&[&str]; 4] = [
            &["git", "--no-pager", "commit", "-m", "x"],
            &["git", "-P", "commit", "-m", "x"],
            &[
                "git",
                "--no-optional-locks",
                "--no-pager",
                "commit",
                "-m",
                "x",
            ],
            &["git", "commit", "--message=x"],
        ];
        assert!(approved(&decide_argv(&commit, cwd, &[], &user)));
        for argv in spelled_otherwise {
            assert!(approved(&decide_argv(argv, cwd, &[], &user)), "{argv:?}");
        }
        let deny = [rule(1, false, &["git", "commit"], None, RiskClass::Unknown)];
        for argv in std::iter::once(&commit[..]).chain(spelled_otherwise) {
            assert_eq!(
                decide_argv(argv, cwd, &deny, &user),
                Decision::Denied {
                    by: "remembered rule 1".into(),
                    reason: "you chose to always deny this".into(),
                },
                "{argv:?}"
            );
        }
        // Other git commands are not its business.
        assert!(approved(&decide_argv(
            &["git", "status"],
            cwd,
            &deny,
            &user
        )));
        // A deny rule scoped to a directory still holds only there.
        let elsewhere = tempfile::tempdir().unwrap();
        let scoped = [rule(
            2,
            false,
            &["git", "commit"],
            Some(elsewhere.path()),
            RiskClass::Unknown,
        )];
        assert!(approved(&decide_argv(
            spelled_otherwise[0],
            cwd,
            &scoped,
            &user
        )));
        // A deny rule on a place holds for an action that names a path there, whatever
        // else it names and wherever it runs (read-only runs without asking).
        let private = tempfile::tempdir().unwrap();
        let private = std::fs::canonicalize(private.path()).unwrap();
        std::fs::write(private.join("key"), "k").unwrap();
        std::fs::write(cwd.join("notes"), "n").unwrap();
        let placed = [Rule {
            command_prefix: Vec::new(),
            ..rule(4, false, &["x"], Some(&private), RiskClass::Unknown)
        }];
        let key = private.join("key");
        let key = key.to_str().unwrap();
        for argv in [
            &["cat", key][..],
            &["cat", "notes", key],
            &["ls", "-l", key],
        ] {
            assert!(
                matches!(
                    decide_argv(argv, cwd, &placed, &user),
                    Decision::Denied { .. }
                ),
                "{argv:?}"
            );
        }
        assert!(approved(&decide_argv(
            &["cat", "notes"],
            cwd,
            &placed,
            &user
        )));

        // An allow rule is matched no more loosely than before: what it names, as
        // spelled, from the start of the argv.
        let none = UserPolicy::default();
        let allow = [rule(
            3,
            true,
            &["git", "commit"],
            None,
            RiskClass::WritesWorkdir,
        )];
        assert!(approved(&decide_argv(&commit, cwd, &allow, &none)));
        for argv in &spelled_otherwise[..3] {
            assert_eq!(
                decide_argv(argv, cwd, &allow, &none),
                Decision::Ask,
                "{argv:?}"
            );
        }
    }

    #[test]
    fn shell_scripts_unknown_and_privileged_actions_are_never_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let cwd = &std::fs::canonicalize(dir.path()).unwrap();
        let script = Action::Shell {
            script: "echo a | cat".into(),
        };
        let mut risk = classify_in(&script, cwd);
        assert_eq!(may_remember(&script, &risk), Err(RuleError::ShellScript));
        // A script is refused as a script, not only for the class it has today.
        risk.class = RiskClass::ReadOnly;
        assert_eq!(may_remember(&script, &risk), Err(RuleError::ShellScript));
        let python = run(&["python3", "-c", "print(1)"]);
        let risk = classify_in(&python, cwd);
        assert_eq!(may_remember(&python, &risk), Err(RuleError::Unknown));
        let install = Action::PackageInstall {
            packages: vec!["jq".into()],
        };
        let risk = classify_in(&install, cwd);
        assert_eq!(may_remember(&install, &risk), Err(RuleError::Privileged));
        let mkdir = run(&["mkdir", "x"]);
        let risk = classify_in(&mkdir, cwd);
        assert_eq!(may_remember(&mkdir, &risk), Ok(()));
    }

    #[test]
    fn prefix_rules_cover_only_the_classes_users_may_auto_approve_when_used() {
        let dir = tempfile::tempdir().unwrap();
        let cwd = &std::fs::canonicalize(dir.path()).unwrap();
        let none = UserPolicy::default();
        let subject = developer(&none);
        let rules = [
            rule(1, true, &["ls"], None, RiskClass::WritesWorkdir),
            rule(2, true, &["mkdir"], None, RiskClass::WritesWorkdir),
        ];
        let decide_with = |policy: &Policy, argv: &[&str]| {
            let action = run(argv);
            let risk = classify_in(&action, cwd);
            decide(&action, &risk, cwd, policy, &subject, &rules)
        };
        // Nothing runs on the policy alone here: only the rules can approve.
        let standing = |classes: &[RiskClass]| Policy {
            auto_approve: Vec::new(),
            user_may_auto_approve: classes.to_vec(),
            ..Policy::default()
        };
        // The default lets users approve read-only and writes-workdir standing.
        let default = standing(&Policy::default().user_may_auto_approve);
        assert!(approved(&decide_with(&default, &["ls"])));
        assert!(approved(&decide_with(&default, &["mkdir", "x"])));
        assert_eq!(
            widest_standing_class(&default),
            Some(RiskClass::WritesWorkdir)
        );
        // An admin who narrows the list narrows rules made before.
        let read_only = standing(&[RiskClass::ReadOnly]);
        assert!(approved(&decide_with(&read_only, &["ls"])));
        assert_eq!(decide_with(&read_only, &["mkdir", "x"]), Decision::Ask);
        // Read-only too, when the admin removes it.
        let nothing = standing(&[]);
        assert_eq!(decide_with(&nothing, &["ls"]), Decision::Ask);
        assert_eq!(decide_with(&nothing, &["mkdir", "x"]), Decision::Ask);
        assert_eq!(widest_standing_class(&nothing), None);
        let ls = run(&["ls"]);
        assert_eq!(
            may_remember_prefix(&classify_in(&ls, cwd), &nothing),
            Err(RuleError::NotStanding {
                class: RiskClass::ReadOnly
            })
        );
        // An exact rule is not a standing approval: it still holds.
        let exact = [Rule {
            exact: Some(Exact {
                action: ls.clone(),
                cwd: cwd.clone(),
            }),
            ..rule(3, true, &[], None, RiskClass::ReadOnly)
        }];
        let risk = classify_in(&ls, cwd);
        assert!(approved(&decide(
            &ls, &risk, cwd, &nothing, &subject, &exact
        )));
    }

    #[test]
    fn rules_cover_only_what_was_approved() {
        let dir = tempfile::tempdir().unwrap();
        let cwd = &std::fs::canonicalize(dir.path()).unwrap();
        std::fs::write(cwd.join("f"), "").unwrap();
        let none = UserPolicy::default();
        // A prefix rule never covers destructive, unknown or privileged actions, nor
        // more than the class it was made for.
        let wide = [
            rule(1, true, &["rm"], None, RiskClass::Network),
            rule(2, true, &["python3"], None, RiskClass::Network),
            rule(3, true, &[], Some(cwd), RiskClass::WritesWorkdir),
            rule(4, true, &["git", "fetch"], None, RiskClass::Network),
            rule(5, true, &["git"], None, RiskClass::ReadOnly),
        ];
        for argv in [
            &["rm", "-rf", "f"][..],
            &["python3", "-c", "print(1)"],
            &["git", "fetch", "--upload-pack=touch /tmp/x"],
            &["git", "push"],
            &["rm", "f"],
        ] {
            assert_eq!(
                decide_argv(argv, cwd, &wide, &none),
                Decision::Ask,
                "{argv:?}"
            );
        }
        assert!(approved(&decide_argv(&["mkdir", "new"], cwd, &wide, &none)));
        // An exact rule covers that action in that directory, nothing else.
        let action = run(&["rm", "f"]);
        let exact = Rule {
            exact: Some(Exact {
                action: action.clone(),
                cwd: cwd.clone(),
            }),
            max_class: Some(RiskClass::Destructive),
            ..rule(6, true, &[], None, RiskClass::Destructive)
        };
        let risk = classify_in(&action, cwd);
        assert!(rule_matches(&exact, &action, &risk, cwd));
        assert!(!rule_matches(&exact, &run(&["rm", "g"]), &risk, cwd));
        assert!(!rule_matches(&exact, &action, &risk, Path::new("/srv")));
        // A path scope compares real paths.
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), cwd.join("link")).unwrap();
        let escape = Action::Mkdir {
            path: cwd.join("link/x"),
        };
        let risk = classify_in(&escape, cwd);
        assert!(!rule_matches(&wide[2], &escape, &risk, cwd));
    }
}
