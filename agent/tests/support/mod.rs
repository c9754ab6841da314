//! The real daemon on a private system bus with the shipped bus policy, its state in
//! a temporary directory, and real users to call it as.

#![allow(clippy::unwrap_used, dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::Duration;

pub use devos_tests::{SystemBus, require, require_root, run_with_timeout, wait_for};

pub const AGENT: &str = env!("CARGO_BIN_EXE_devos-agent");
pub const DEVOS: &str = env!("CARGO_BIN_EXE_devos");

/// A running agent; killed on drop.
pub struct Daemon {
    pub bus: SystemBus,
    child: Child,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    env: Vec<(String, String)>,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The agent runs with the capabilities its systemd unit gives it, no more: what the
/// sandbox asks bubblewrap for must be among them.
fn spawn(config: &Path, bus: &SystemBus, env: &[(String, String)]) -> Child {
    Command::new("setpriv")
        .args(["--bounding-set", &unit_bounding_set(), "--", AGENT])
        .arg("--config")
        .arg(config)
        .arg("serve")
        .env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .spawn()
        .unwrap()
}

/// The unit's `CapabilityBoundingSet=`, as `setpriv --bounding-set` takes it.
fn unit_bounding_set() -> String {
    let unit = include_str!("../../dist/devos-agent.service");
    let caps = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the agent's unit names its capabilities");
    let mut set = "-all".to_owned();
    for cap in caps.split_whitespace() {
        set.push_str(",+");
        set.push_str(&cap.trim_start_matches("CAP_").to_lowercase());
    }
    set
}

/// Make a directory (and its temporary parents) reachable by other users.
pub fn open_up(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

impl Daemon {
    /// Start the agent with `os-release` as its os-release file and `extra` appended
    /// to its config.
    pub fn start_with(os_release: &str, extra: &str) -> Daemon {
        // No instance metadata, even on a CI machine that is an EC2 instance.
        Self::start_with_env(os_release, extra, &[("AWS_EC2_METADATA_DISABLED", "true")])
    }

    /// [`Daemon::start_with`] with these environment variables for the agent.
    pub fn start_with_env(os_release: &str, extra: &str, env: &[(&str, &str)]) -> Daemon {
        Self::start_prepared(os_release, extra, env, |_| {})
    }

    /// Start the agent after `prepare` has seen its (still empty) directory: the
    /// state lives in `DIR/state`, the audit log in `DIR/state/audit`.
    pub fn start_prepared(
        os_release: &str,
        extra: &str,
        env: &[(&str, &str)],
        prepare: impl FnOnce(&Path),
    ) -> Daemon {
        require("busctl", "systemd");
        require("setpriv", "util-linux");
        require_root();
        let bus = SystemBus::start().unwrap();
        // Where the system's state lives, not below `/tmp` (every action has its own
        // `/tmp`, so nothing of the agent's below it would be in sight to cover).
        let dir = tempfile::tempdir_in("/var/lib").unwrap();
        open_up(dir.path(), 0o755);
        let release = dir.path().join("os-release");
        std::fs::write(&release, os_release).unwrap();
        let config = dir.path().join("agent.toml");
        // The agent's own files stay in this test's directory: its state, each
        // action's private directory (inside the state) and the audit anchors
        // (outside it), laid out as in production.
        let anchors = if extra.contains("[audit]") {
            String::new()
        } else {
            format!(
                "[audit]\nanchor-file = \"{}\"\n",
                dir.path().join("anchors/audit-anchors.jsonl").display()
            )
        };
        std::fs::write(
            &config,
            format!(
                "os-release = \"{}\"\nstate-dir = \"{}\"\nactions-dir = \"{}\"\n{extra}\n{anchors}",
                release.display(),
                dir.path().join("state").display(),
                dir.path().join("state/actions").display(),
            ),
        )
        .unwrap();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        prepare(dir.path());
        let child = spawn(&config, &bus, &env);
        let daemon = Daemon {
            bus,
            child,
            dir,
            config,
            env,
        };
        daemon.wait_owned();
        daemon
    }

    fn wait_owned(&self) {
        let owned = wait_for(Duration::from_secs(60), || {
            self.busctl(None, &["status", "org.devos.Agent1"])
                .status
                .success()
        });
        assert!(owned, "the agent did not take org.devos.Agent1 within 60s");
    }

    /// Stop the agent (its state stays).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stop the agent and start it again with the same configuration and state.
    pub fn restart(&mut self) {
        self.stop();
        self.child = spawn(&self.config, &self.bus, &self.env);
        self.wait_owned();
    }

    /// How the agent exited, once it did within `limit` (None: still running).
    pub fn exited_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let mut status = None;
        wait_for(limit, || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        status
    }

    pub fn start() -> Daemon {
        Self::start_with("ID=debian\nIMAGE_VERSION=\"0.1.0+abcdef012345\"\n", "")
    }

    /// busctl against the private bus, optionally as another user.
    pub fn busctl(&self, user: Option<&User>, args: &[&str]) -> Output {
        let mut cmd = as_user(user, "busctl");
        cmd.arg(format!("--address={}", self.bus.address))
            .args(args);
        run_with_timeout(&mut cmd, Duration::from_secs(20)).unwrap()
    }

    /// The `devos` CLI as `user` (root if `None`) in `cwd`.
    pub fn devos(&self, user: Option<&User>, cwd: &Path, args: &[&str]) -> Output {
        let mut cmd = as_user(user, DEVOS);
        cmd.args(args)
            .current_dir(cwd)
            .env("DBUS_SYSTEM_BUS_ADDRESS", &self.bus.address)
            .stdin(Stdio::null());
        if let Some(u) = user {
            cmd.env("HOME", &u.home);
        }
        run_with_timeout(&mut cmd, Duration::from_secs(60)).unwrap()
    }

    /// Wait (20 s at most) until `user`'s request `id` is in `state`; its JSON.
    pub fn wait_state(&self, user: &User, cwd: &Path, id: &str, state: &str) -> serde_json::Value {
        let mut last = serde_json::Value::Null;
        let reached = wait_for(Duration::from_secs(20), || {
            last = json(&self.devos(Some(user), cwd, &["--json", "show", id]));
            last["state"] == state
        });
        assert!(reached, "request {id} did not become {state}: {last}");
        last
    }

    /// Approve the waiting action of `user`'s request `id`, then wait for `state`.
    pub fn approve_and_wait(
        &self,
        user: &User,
        cwd: &Path,
        id: &str,
        state: &str,
    ) -> serde_json::Value {
        let out = self.devos(Some(user), cwd, &["approve", id]);
        assert!(out.status.success(), "approve {id}: {}", stderr(&out));
        self.wait_state(user, cwd, id, state)
    }

    /// Approve `user`'s waiting request `id`, then require it to fail with an error
    /// that says `why`.
    pub fn approve_and_fail(&self, user: &User, cwd: &Path, id: &str, why: &str) {
        let r = self.approve_and_wait(user, cwd, id, "failed");
        let error = r["error"].as_str().unwrap_or_default();
        assert!(error.contains(why), "expected an error saying {why:?}: {r}");
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }
}

fn as_user(user: Option<&User>, program: &str) -> Command {
    match user {
        Some(u) => {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={}", u.uid))
                .arg(format!("--regid={}", u.uid))
                .arg("--init-groups")
                .arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// A real local user (created once, kept between runs).
pub struct User {
    pub name: String,
    pub uid: u32,
    pub home: PathBuf,
}

static USERADD: Mutex<()> = Mutex::new(());

impl User {
    pub fn ensure(name: &str) -> User {
        let _one_at_a_time = USERADD.lock().unwrap_or_else(|e| e.into_inner());
        let id = |name: &str| {
            Command::new("id")
                .args(["-u", name])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .and_then(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .trim()
                        .parse::<u32>()
                        .ok()
                })
        };
        if id(name).is_none() {
            let out = Command::new("useradd")
                .args(["--create-home", "--user-group", "--shell", "/bin/sh", name])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "useradd {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let uid = id(name).unwrap();
        User {
            name: name.to_owned(),
            uid,
            home: PathBuf::from(format!("/home/{name}")),
        }
    }

    /// A fresh, private project directory owned by this user.
    pub fn project(&self) -> tempfile::TempDir {
        let dir = tempfile::Builder::new()
            .prefix("devos-project-")
            .tempdir_in(&self.home)
            .unwrap();
        std::os::unix::fs::chown(dir.path(), Some(self.uid), Some(self.uid)).unwrap();
        open_up(dir.path(), 0o700);
        dir
    }

    /// Write a file as root and give it to this user.
    pub fn write(&self, path: &Path, content: &str) {
        std::fs::write(path, content).unwrap();
        self.give(path);
    }

    /// Make `path` the user's.
    pub fn give(&self, path: &Path) {
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.uid)).unwrap();
    }

    /// Write the user's own policy file (`~/.config/devos/agent.toml`, the user's own
    /// directories and file, as a user makes them); its path.
    pub fn write_policy(&self, text: &str) -> PathBuf {
        let config_dir = self.home.join(".config/devos");
        std::fs::create_dir_all(&config_dir).unwrap();
        for d in [self.home.join(".config"), config_dir.clone()] {
            std::os::unix::fs::chown(&d, Some(self.uid), Some(self.uid)).unwrap();
        }
        let policy = config_dir.join("agent.toml");
        let _ = std::fs::remove_file(&policy);
        self.write(&policy, text);
        policy
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Parse `devos --json ...` output.
pub fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", stdout(o), stderr(o)))
}

/// The id of the request a non-interactive `devos run` left waiting (from its
/// "devos approve ID N" hint).
pub fn waiting_id(o: &Output) -> String {
    let err = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(3),
        "expected a request waiting for approval: {err}\n{}",
        stdout(o)
    );
    err.lines()
        .find_map(|l| l.trim().strip_prefix("approve: devos approve "))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no approval hint in: {err}"))
        .to_owned()
}

/// The agent, configured for the stand-in Bedrock (models `test.small` and
/// `test.large`, priced at $5/$25 per million input/output tokens), with more
/// `[model]` keys and more tables.
pub fn model_agent(
    standin: &devos_tests::bedrock::StandIn,
    model_keys: &str,
    tables: &str,
) -> Daemon {
    let config = format!(
        "[model]\nregion = \"us-east-1\"\nendpoint-url = \"{}\"\nsmall = \"test.small\"\nlarge = \"test.large\"\nmax-attempts = 2\n{model_keys}\n\
         [model.prices.\"test.small\"]\ninput = 5.0\noutput = 25.0\n\
         [model.prices.\"test.large\"]\ninput = 5.0\noutput = 25.0\n{tables}",
        standin.endpoint()
    );
    Daemon::start_with_env(
        "IMAGE_VERSION=1.0\n",
        &config,
        &[
            ("AWS_EC2_METADATA_DISABLED", "true"),
            ("AWS_ACCESS_KEY_ID", "AKIDDEVOSTEST"),
            ("AWS_SECRET_ACCESS_KEY", "devos-test-secret"),
            ("AWS_CONFIG_FILE", "/dev/null"),
            ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
        ],
    )
}

/// Root appends `table` to the agent's configuration file and reloads it.
pub fn reload_with(agent: &Daemon, table: &str) {
    let mut config = std::fs::read_to_string(&agent.config).unwrap();
    config.push('\n');
    config.push_str(table);
    std::fs::write(&agent.config, config).unwrap();
    let out = bus_call(agent, None, "org.devos.Agent1.Admin", &["ReloadConfig"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// `devos --json run ARGS...` as `user` in `cwd`: the request it printed.
pub fn run_json(agent: &Daemon, user: &User, cwd: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json", "run"];
    all.extend_from_slice(args);
    json(&agent.devos(Some(user), cwd, &all))
}

/// `sh -c SCRIPT` as `user` in `cwd` (with a git identity), whatever it exits with.
pub fn sh_try(user: &User, cwd: &Path, script: &str) -> Output {
    Command::new("setpriv")
        .arg(format!("--reuid={}", user.uid))
        .arg(format!("--regid={}", user.uid))
        .arg("--init-groups")
        .args(["sh", "-c", script])
        .current_dir(cwd)
        .env("HOME", &user.home)
        .env("GIT_AUTHOR_NAME", "Dev")
        .env("GIT_AUTHOR_EMAIL", "dev@example.com")
        .env("GIT_COMMITTER_NAME", "Dev")
        .env("GIT_COMMITTER_EMAIL", "dev@example.com")
        .output()
        .unwrap()
}

/// [`sh_try`], which must succeed.
pub fn sh(user: &User, cwd: &Path, script: &str) -> Output {
    let out = sh_try(user, cwd, script);
    assert!(out.status.success(), "{script}: {}", stderr(&out));
    out
}

/// `devos --json context ARGS...` as `user`, which must succeed.
pub fn context(agent: &Daemon, user: &User, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json", "context"];
    all.extend_from_slice(args);
    let out = agent.devos(Some(user), Path::new("/"), &all);
    assert!(
        out.status.success(),
        "devos context {args:?}: {}",
        stderr(&out)
    );
    json(&out)
}

/// The paths `devos context find QUERY` gives `user`.
pub fn found(agent: &Daemon, user: &User, query: &str) -> Vec<String> {
    context(agent, user, &["find", query, "-n", "100"])["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["path"].as_str().unwrap().to_owned())
        .collect()
}

/// `user`'s first project's status, once its first scan is done.
pub fn project_status(agent: &Daemon, user: &User) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let done = wait_for(Duration::from_secs(30), || {
        last = context(agent, user, &["status"]);
        last["projects"][0]["scanned-at"].is_number()
    });
    assert!(done, "the first scan did not finish: {last}");
    last["projects"][0].clone()
}

/// A call on the agent's `interface` (`args`: the method, then its signature and
/// arguments if it takes any), through busctl as `user` (root if `None`).
pub fn bus_call(agent: &Daemon, user: Option<&User>, interface: &str, args: &[&str]) -> Output {
    let mut all = vec!["call", "org.devos.Agent1", "/org/devos/Agent1", interface];
    all.extend_from_slice(args);
    agent.busctl(user, &all)
}

/// A method of `org.devos.Agent1` (see [`bus_call`]).
pub fn agent_call(agent: &Daemon, user: Option<&User>, args: &[&str]) -> Output {
    bus_call(agent, user, "org.devos.Agent1", args)
}

/// A method of `org.devos.Agent1.Context`, through busctl as `user`.
pub fn context_call(
    agent: &Daemon,
    user: Option<&User>,
    method: &str,
    signature: &str,
    args: &[&str],
) -> Output {
    let mut all = vec![method, signature];
    all.extend_from_slice(args);
    bus_call(agent, user, "org.devos.Agent1.Context", &all)
}
