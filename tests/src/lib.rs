//! Shared fixtures for DevOS's slow and cross-crate tests: a private system bus with
//! the agent's real bus policy, commands with a deadline, moto_server, a clean AWS
//! environment for every child, the repository root, and a stand-in Amazon Bedrock
//! Runtime ([`bedrock`]).
//!
//! Fixtures never skip: if a tool is missing the test fails and says what to install.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub mod bedrock;
pub mod sudo;

/// The repository root (this crate lives in `tests/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Fail loudly unless `program` is on PATH.
pub fn require(program: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|p| p.join(program).is_file()));
    assert!(
        found,
        "`{program}` is required by this test and is missing: run tests/setup-host (or apt-get install {package})"
    );
}

/// Fail loudly unless the tests run as root (image builds and bus policy checks need it).
pub fn require_root() {
    assert!(
        current_uid() == 0,
        "this test must run as root (it builds images and switches users): run the test command from README.md as root"
    );
}

fn current_uid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(u32::MAX)
}

/// Run a command to completion, killing it after `limit`.
pub fn run_with_timeout(cmd: &mut Command, limit: Duration) -> Result<Output> {
    let line = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {line}"))?;
    let out_thread = drain(child.stdout.take());
    let err_thread = drain(child.stderr.take());
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err_thread.join().unwrap_or_default();
            bail!(
                "{line} did not finish within {}s; its stderr:\n{}",
                limit.as_secs(),
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Ok(Output {
        status,
        stdout: out_thread.join().unwrap_or_default(),
        stderr: err_thread.join().unwrap_or_default(),
    })
}

fn drain<R: std::io::Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        buf
    })
}

/// A private dbus-daemon configured like Debian's system bus (deny by default) plus
/// the agent's bus policy from `agent/dist/`. Killed on drop.
pub struct SystemBus {
    child: Child,
    pub address: String,
    _dir: tempfile::TempDir,
}

impl SystemBus {
    pub fn start() -> Result<Self> {
        require("dbus-daemon", "dbus-daemon");
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("system_bus_socket");
        let policy = repo_root().join("agent/dist/org.devos.Agent1.conf");
        let config = dir.path().join("bus.conf");
        std::fs::write(
            &config,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Peer"/>
  </policy>
  <include>{policy}</include>
</busconfig>
"#,
                socket = socket.display(),
                policy = policy.display()
            ),
        )?;
        let mut child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", config.display()))
            .args(["--nofork", "--nopidfile", "--print-address=1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start dbus-daemon")?;
        let mut line = String::new();
        let stdout = child.stdout.take().context("dbus-daemon has no stdout")?;
        BufReader::new(stdout).read_line(&mut line)?;
        let address = line.trim().to_owned();
        if address.is_empty() {
            let _ = child.kill();
            bail!(
                "dbus-daemon printed no address (bad config {}?)",
                config.display()
            );
        }
        Ok(Self {
            child,
            address,
            _dir: dir,
        })
    }
}

impl SystemBus {
    /// Stop the bus daemon, as when it crashes: every connection to it ends.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for SystemBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A FIFO at `path` (mode 0600), where a test puts one in place of a file.
pub fn mkfifo(path: &Path) {
    let made = Command::new("mkfifo").arg("-m600").arg(path).status();
    assert!(
        made.as_ref().is_ok_and(|s| s.success()),
        "mkfifo {}: {made:?}",
        path.display()
    );
}

/// Copy `program` to `to` as an executable (mode 0755). `install` writes it, not this
/// process: a file this process held open for writing could be inherited by a child
/// another test thread forks meanwhile, and running the copy would then fail with
/// "text file busy".
pub fn install_executable(program: &Path, to: &Path) {
    let installed = Command::new("install")
        .arg("-m755")
        .arg(program)
        .arg(to)
        .status();
    assert!(
        installed.as_ref().is_ok_and(|s| s.success()),
        "install {} {}: {installed:?}",
        program.display(),
        to.display()
    );
}

/// An executable file at `path` (mode 0755, its directory made) holding `text`,
/// written as [`install_executable`] says.
pub fn write_executable(path: &Path, text: &str) {
    let dir = path
        .parent()
        .expect("an executable's path names its directory");
    let draft = std::fs::create_dir_all(dir)
        .and_then(|()| tempfile::NamedTempFile::new_in(dir))
        .and_then(|draft| std::fs::write(draft.path(), text).map(|()| draft))
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    install_executable(draft.path(), path);
}

/// Wait until `check` passes or `limit` runs out.
pub fn wait_for(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Keep a child away from the developer's (or the CI machine's) AWS setup: it inherits
/// no `AWS_*` variable, reads empty config and credentials files instead of
/// `~/.aws/config` and `~/.aws/credentials`, and never asks instance metadata for a
/// role. Set the variables a test means (endpoint, test credentials) after this call.
pub fn isolate_aws(cmd: &mut Command) -> &mut Command {
    isolate_aws_from(cmd, std::env::vars_os().map(|(name, _)| name))
}

fn isolate_aws_from(
    cmd: &mut Command,
    inherited: impl Iterator<Item = std::ffi::OsString>,
) -> &mut Command {
    for name in inherited {
        if name.as_encoded_bytes().starts_with(b"AWS_") {
            cmd.env_remove(name);
        }
    }
    // /dev/null rather than a missing file: the SDK warns about a configured file that
    // does not exist.
    cmd.env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("AWS_EC2_METADATA_DISABLED", "true")
}

/// A command running one of the Python tools of [`python_tool`], isolated from the
/// developer's AWS setup (boto3 reads it too).
pub fn python_command(program: &str) -> Command {
    let mut cmd = Command::new(python_tool(program));
    isolate_aws(&mut cmd);
    cmd
}

/// Where `tests/setup-host` installs the Python tools (moto, cfn-lint): a venv under
/// The steps of a long scenario test: `steps.at("...")` names the step that runs
/// now, and a failure anywhere says which step it was in, so one test can share an
/// expensive set-up across many checks and still say what broke.
#[derive(Default)]
pub struct Steps(std::cell::RefCell<&'static str>);

impl Steps {
    pub fn at(&self, step: &'static str) {
        eprintln!("==> step: {step}");
        *self.0.borrow_mut() = step;
    }
}

impl Drop for Steps {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("FAILED in step: {}", self.0.borrow());
        }
    }
}

/// `$DEVOS_TOOLS`, default `~/.cache/devos/tools`.
pub fn python_tool(program: &str) -> PathBuf {
    let tools = std::env::var_os("DEVOS_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default()
                .join(".cache/devos/tools")
        });
    let path = tools.join("venv/bin").join(program);
    assert!(
        path.is_file(),
        "`{program}` is required by this test and is missing ({}): run tests/setup-host",
        path.display()
    );
    path
}

/// A moto_server on 127.0.0.1 (an in-memory AWS: EC2, EBS direct, SSM, ...), on a
/// port the kernel chose when it bound (read from its log, so no other server can be
/// taken for it), killed on drop. `kill` and `restart` simulate an outage; a restart keeps
/// the port and loses every resource, as a real outage of a test endpoint would.
pub struct Moto {
    child: Option<Child>,
    pub port: u16,
    log: PathBuf,
    server_env: Vec<(String, String)>,
    _dir: tempfile::TempDir,
}

impl Moto {
    pub fn start() -> Result<Self> {
        Self::start_with(&[])
    }

    /// With moto's own settings, e.g. `INITIAL_NO_AUTH_ACTION_COUNT` to make it check
    /// credentials and IAM policies as AWS does.
    pub fn start_with(env: &[(&str, &str)]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut moto = Self {
            child: None,
            port: 0,
            log: dir.path().join("moto.log"),
            server_env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            _dir: dir,
        };
        moto.restart()?;
        Ok(moto)
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Environment for a client of this server: fixed test credentials, the endpoint,
    /// no instance metadata lookups.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ]
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// (Re)start the server on the same port (any free one the first time) and wait
    /// until it says it listens. A port someone else took meanwhile fails the start.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let said_before = log.metadata()?.len() as usize;
        let mut child = python_command("moto_server")
            .args(["-H", "127.0.0.1", "-p", &self.port.to_string()])
            .envs(self.server_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start moto_server")?;
        let mut listening = None;
        let mut exited = None;
        wait_for(Duration::from_secs(30), || {
            let said = std::fs::read(&self.log).unwrap_or_default();
            listening = moto_port(&String::from_utf8_lossy(
                &said[said_before.min(said.len())..],
            ));
            exited = child.try_wait().ok().flatten();
            listening.is_some() || exited.is_some()
        });
        self.child = Some(child);
        match (listening, exited) {
            (Some(port), None) if self.port == 0 || port == self.port => {
                self.port = port;
                Ok(())
            }
            _ => bail!(
                "moto_server did not listen on 127.0.0.1:{} ({}); its log:\n{}",
                self.port,
                exited.map_or("still not listening after 30 s".into(), |s| format!(
                    "it exited: {s}"
                )),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            ),
        }
    }
}

/// The port a moto_server's log says it listens on (werkzeug's `Running on` line).
fn moto_port(log: &str) -> Option<u16> {
    log.lines()
        .find_map(|l| l.trim().strip_prefix("* Running on http://127.0.0.1:"))
        .and_then(|port| port.trim().parse().ok())
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::ffi::{OsStr, OsString};
    use std::process::Command;

    /// moto listens where its log says; a restart on a port another server took
    /// meanwhile fails, naming it, instead of talking to that server.
    #[test]
    fn moto_listens_where_it_says_and_a_taken_port_fails_its_restart() {
        assert_eq!(
            super::moto_port(
                "WARNING: dev server\n * Running on http://127.0.0.1:46453\nPress CTRL+C"
            ),
            Some(46453)
        );
        assert_eq!(super::moto_port(" * Running on http://127.0.0.1:x\n"), None);
        let mut moto = super::Moto::start().unwrap();
        assert_ne!(moto.port, 0);
        std::net::TcpStream::connect(("127.0.0.1", moto.port)).unwrap();
        moto.kill();
        let taken = std::net::TcpListener::bind(("127.0.0.1", moto.port)).unwrap();
        let err = moto.restart().unwrap_err().to_string();
        assert!(
            err.contains(&format!("did not listen on 127.0.0.1:{}", moto.port)),
            "{err}"
        );
        drop(taken);
    }

    #[test]
    fn isolated_children_inherit_no_aws_setting_and_read_no_aws_files() {
        let mut cmd = Command::new("true");
        let inherited = ["AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_CA_BUNDLE", "HOME"];
        super::isolate_aws_from(&mut cmd, inherited.into_iter().map(OsString::from));
        cmd.env("AWS_REGION", "us-east-1");
        let env: HashMap<&OsStr, Option<&OsStr>> = cmd.get_envs().collect();
        for removed in ["AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_CA_BUNDLE"] {
            assert_eq!(env.get(OsStr::new(removed)), Some(&None), "{removed}");
        }
        assert_eq!(
            env.get(OsStr::new("HOME")),
            None,
            "other variables are left alone"
        );
        for (name, value) in [
            ("AWS_CONFIG_FILE", "/dev/null"),
            ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
            ("AWS_REGION", "us-east-1"),
        ] {
            assert_eq!(
                env.get(OsStr::new(name)),
                Some(&Some(OsStr::new(value))),
                "{name}"
            );
        }
    }
}
