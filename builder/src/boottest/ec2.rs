//! EC2's side of a VM, stood in for on the host: instance metadata (IMDSv2, at
//! 169.254.169.254 as the guest sees it) that hands in a key pair's public key, the
//! DMI vendor of a Nitro instance, and the guest's SSH port forwarded to the host. The
//! boot test logs in over SSH with a throw-away key handed in this way, so a tested
//! image is known to be reachable as an EC2 instance launched with a key pair is;
//! `image boot --ssh-port` hands in the user's own key the same way.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::support::cmd;

/// The guest's network: QEMU's user-mode network moved to the link-local range, so
/// that instance metadata's address is inside it and can be forwarded to the host.
pub(super) const GUEST_NET: &str = "169.254.169.0/24";
const METADATA_ADDR: &str = "169.254.169.254";

/// Instance metadata for one VM: a local HTTP server speaking IMDSv2 (a session token
/// from `PUT /latest/api/token`, required on every read).
pub(crate) struct StandIn {
    server: Arc<tiny_http::Server>,
    thread: Option<std::thread::JoinHandle<()>>,
    imds_port: u16,
    /// The host port forwarded to the guest's port 22.
    pub(crate) ssh_port: u16,
}

impl StandIn {
    /// Serve `public_key` as key pair 0 (none: an instance launched without a key pair)
    /// and forward `ssh_port` (a free one when not given).
    pub(crate) fn start(public_key: Option<String>, ssh_port: Option<u16>) -> Result<Self> {
        // A free port, held until the server below has its own: the kernel may hand a
        // port just let go of to the next bind of port 0, and QEMU's forward to SSH
        // would then find the server on it.
        let (held, ssh_port) = match ssh_port {
            Some(port) => (None, port),
            None => {
                let listener = std::net::TcpListener::bind("127.0.0.1:0")
                    .context("cannot find a free port on 127.0.0.1 for SSH")?;
                let port = listener.local_addr()?.port();
                (Some(listener), port)
            }
        };
        let server =
            Arc::new(tiny_http::Server::http("127.0.0.1:0").map_err(|e| {
                anyhow::anyhow!("cannot start the stand-in instance metadata: {e}")
            })?);
        let imds_port = server
            .server_addr()
            .to_ip()
            .context("the stand-in instance metadata has no TCP address")?
            .port();
        drop(held);
        let token = random_hex()?;
        let serving = Arc::clone(&server);
        let thread = std::thread::spawn(move || {
            for request in serving.incoming_requests() {
                let response = metadata_response(&request, &token, public_key.as_deref());
                let _ = request.respond(response);
            }
        });
        Ok(Self {
            server,
            thread: Some(thread),
            imds_port,
            ssh_port,
        })
    }

    /// QEMU arguments: the DMI vendor EC2's Nitro instances report, and a virtio NIC on
    /// a user-mode network with SSH forwarded from the host and instance metadata's
    /// address forwarded to this server (one `devos-build relay` per connection).
    pub(crate) fn qemu_args(&self) -> Result<Vec<String>> {
        // This very executable, through /proc: still there when the file was replaced
        // or removed while a test runs (a `cargo build`, an upgrade), and a path
        // without the spaces or commas QEMU's options cannot carry wherever it lives.
        let exe = format!("/proc/{}/exe", std::process::id());
        Ok(vec![
            "-smbios".into(),
            "type=1,manufacturer=Amazon EC2,product=devos-build stand-in".into(),
            "-nic".into(),
            format!(
                "user,model=virtio-net-pci,net={GUEST_NET},hostfwd=tcp:127.0.0.1:{}-:22,guestfwd=tcp:{METADATA_ADDR}:80-cmd:{exe} relay 127.0.0.1:{}",
                self.ssh_port, self.imds_port
            ),
        ])
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn metadata_response(
    request: &tiny_http::Request,
    token: &str,
    public_key: Option<&str>,
) -> tiny_http::Response<std::io::Cursor<Vec<u8>>> {
    let header = |name: &str| {
        request
            .headers()
            .iter()
            .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
            .map(|h| h.value.as_str().to_owned())
    };
    let text =
        |code: u16, body: &str| tiny_http::Response::from_string(body).with_status_code(code);
    let path = request.url().split('?').next().unwrap_or("");
    if path == "/latest/api/token" {
        if *request.method() != tiny_http::Method::Put {
            return text(405, "");
        }
        let Some(ttl) = header("x-aws-ec2-metadata-token-ttl-seconds") else {
            return text(400, "missing x-aws-ec2-metadata-token-ttl-seconds");
        };
        let ttl_header =
            tiny_http::Header::from_bytes("x-aws-ec2-metadata-token-ttl-seconds", ttl.as_bytes())
                .expect("a valid header");
        return text(200, token).with_header(ttl_header);
    }
    if header("x-aws-ec2-metadata-token").as_deref() != Some(token) {
        return text(401, "");
    }
    match (path, public_key) {
        ("/latest/meta-data/instance-id", _) => text(200, "i-0devosbuildstandin"),
        ("/latest/meta-data/public-keys/", Some(_)) => text(200, "0=devos-build"),
        ("/latest/meta-data/public-keys/0/openssh-key", Some(key)) => text(200, key),
        _ => text(404, ""),
    }
}

/// `devos-build relay HOST:PORT`: what QEMU runs for each guest connection to instance
/// metadata, joining the connection (this process's stdin and stdout) to the server.
pub(crate) fn relay(addr: &str) -> Result<()> {
    let stream =
        std::net::TcpStream::connect(addr).with_context(|| format!("cannot connect to {addr}"))?;
    let mut to_server = stream.try_clone()?;
    let upstream = std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut to_server);
        let _ = to_server.shutdown(std::net::Shutdown::Write);
    });
    let mut from_server = stream;
    let mut out = std::io::stdout().lock();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = from_server.read(&mut buf)?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
        out.flush()?;
    }
    drop(upstream);
    Ok(())
}

fn random_hex() -> Result<String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("cannot read /dev/urandom")?;
    Ok(hex::encode(bytes))
}

/// The boot test's SSH login: a throw-away key pair (its public half handed in through
/// the stand-in metadata), a private known_hosts, and a nonce the login leaves in the
/// guest for its self-test to see.
pub(crate) struct Login {
    pub(crate) user: String,
    key: PathBuf,
    known_hosts: PathBuf,
    pub(crate) nonce: String,
    pub(crate) public_key: String,
}

/// What the host's login found.
pub(crate) struct LoggedIn {
    /// The host key's fingerprint (`SHA256:...`) the guest presented.
    pub(crate) host_key: String,
    pub(crate) seconds: f64,
}

impl Login {
    /// A key pair in `dir` for logging in as `user`.
    pub(crate) fn prepare(dir: &Path, user: &str) -> Result<Self> {
        for (tool, package) in [("ssh", "openssh-client"), ("ssh-keygen", "openssh-client")] {
            if cmd::which(tool).is_none() {
                bail!(
                    "`{tool}` is not installed: the boot test logs in to images with an SSH server\n  hint: apt-get install {package}"
                );
            }
        }
        // A run before a fall-back from KVM to TCG left its key: each run makes its own.
        let key = dir.join("ssh-login-key");
        for stale in [
            key.clone(),
            key.with_extension("pub"),
            dir.join("ssh-known-hosts"),
        ] {
            crate::support::remove::file_if_present(&stale)?;
        }
        cmd::run(
            Command::new("ssh-keygen")
                .args([
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-C",
                    "devos-build-boot-test",
                    "-f",
                ])
                .arg(&key),
        )
        .context("while making the boot test's SSH key")?;
        let public_key = std::fs::read_to_string(key.with_extension("pub"))?
            .trim()
            .to_owned();
        Ok(Self {
            user: user.to_owned(),
            known_hosts: dir.join("ssh-known-hosts"),
            key,
            nonce: random_hex()?,
            public_key,
        })
    }

    /// Log in on `port` once, leave the nonce, and read the host key the guest showed.
    fn attempt(&self, port: u16) -> Result<String, String> {
        let out = Command::new("ssh")
            .args(["-F", "/dev/null", "-i"])
            .arg(&self.key)
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", self.known_hosts.display()))
            .args([
                "-o",
                "StrictHostKeyChecking=accept-new",
                "-o",
                "BatchMode=yes",
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "ConnectTimeout=20",
                "-o",
                "LogLevel=ERROR",
                "-p",
            ])
            .arg(port.to_string())
            .arg(format!("{}@127.0.0.1", self.user))
            // The nonce, and whether sudo lets the user in without a password (the
            // guest judges that against its sudoers), put in place whole.
            .arg(format!(
                "s=$(sudo -n true 2>/dev/null && echo sudo); printf '%s\\n%s\\n' {} \"$s\" > /tmp/.devos-ssh-login.$$ && mv /tmp/.devos-ssh-login.$$ /tmp/devos-ssh-login && id -un",
                self.nonce
            ))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run ssh: {e}"))?;
        let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !out.status.success() || said != self.user {
            return Err(format!(
                "ssh {}@127.0.0.1 -p {port}: {} {}{}",
                self.user,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                if said.is_empty() {
                    String::new()
                } else {
                    format!(" (said `{said}`)")
                }
            ));
        }
        let listed = Command::new("ssh-keygen")
            .arg("-l")
            .arg("-f")
            .arg(&self.known_hosts)
            .output()
            .map_err(|e| format!("cannot run ssh-keygen: {e}"))?;
        String::from_utf8_lossy(&listed.stdout)
            .split_whitespace()
            .find(|w| w.starts_with("SHA256:"))
            .map(str::to_owned)
            .ok_or_else(|| "the guest's host key is not in known_hosts".to_owned())
    }

    /// Try to log in every second until it works, `stop` is set or `timeout` passes;
    /// the last failure when it never worked.
    pub(crate) fn until_in(
        &self,
        port: u16,
        stop: &AtomicBool,
        timeout: Duration,
    ) -> Result<LoggedIn, String> {
        let start = Instant::now();
        let mut last = "the VM stopped before sshd answered".to_owned();
        while !stop.load(Ordering::Relaxed) && start.elapsed() < timeout {
            match self.attempt(port) {
                Ok(host_key) => {
                    return Ok(LoggedIn {
                        host_key,
                        seconds: start.elapsed().as_secs_f64(),
                    });
                }
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        Err(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stand-in speaks IMDSv2 as the agent's client (the AWS SDK's) expects: no
    /// read without the session token, the key pair's key with it.
    #[test]
    fn metadata_needs_the_session_token() {
        let standin = StandIn::start(
            Some("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAITest t".into()),
            None,
        )
        .unwrap();
        let base = format!("http://127.0.0.1:{}", standin.imds_port);
        let agent = ureq::Agent::new_with_defaults();
        let key_url = format!("{base}/latest/meta-data/public-keys/0/openssh-key");
        let err = agent.get(&key_url).call().unwrap_err();
        assert!(matches!(err, ureq::Error::StatusCode(401)), "{err}");
        let mut token = agent
            .put(format!("{base}/latest/api/token"))
            .header("x-aws-ec2-metadata-token-ttl-seconds", "21600")
            .send_empty()
            .unwrap();
        assert_eq!(
            token.headers()["x-aws-ec2-metadata-token-ttl-seconds"],
            "21600"
        );
        let token = token.body_mut().read_to_string().unwrap();
        let key = agent
            .get(&key_url)
            .header("x-aws-ec2-metadata-token", &token)
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap();
        assert!(key.starts_with("ssh-ed25519 "));
        let none = StandIn::start(None, None).unwrap();
        let err = agent
            .get(format!(
                "http://127.0.0.1:{}/latest/meta-data/public-keys/",
                none.imds_port
            ))
            .header("x-aws-ec2-metadata-token", "wrong")
            .call()
            .unwrap_err();
        assert!(matches!(err, ureq::Error::StatusCode(401)), "{err}");
    }

    /// The relay QEMU starts per connection is this process's own executable, by a
    /// path that outlives a rebuild of the file (`current_exe` then says `(deleted)`).
    #[test]
    fn the_relay_runs_this_executable_whatever_became_of_its_file() {
        let standin = StandIn::start(None, None).unwrap();
        let args = standin.qemu_args().unwrap();
        let exe = format!("/proc/{}/exe", std::process::id());
        assert!(
            args[3].contains(&format!("-cmd:{exe} relay 127.0.0.1:")),
            "{args:?}"
        );
        assert!(std::path::Path::new(&exe).exists());
    }
}
