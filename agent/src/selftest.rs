//! The guest side of the boot test: checks run inside a booted image, reported as JSON
//! lines to the host. Started by `devos-selftest.service` only when the host passes the
//! `devos.selftest` credential, so the runner ships in every image and stays off in
//! production.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::bootloader::LoaderState;
use crate::client::Agent1Proxy;

/// One result line. The host parses these; keep the field names stable.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    pub check: String,
    pub ok: bool,
    pub detail: String,
    pub ms: u128,
}

/// The final line: the host stops waiting when it sees it.
#[derive(Debug, Serialize)]
pub struct Done {
    pub done: bool,
    pub ok: bool,
}

/// Run the built-in checks and write each result to `report` as it completes.
pub async fn run(report: &Path) -> anyhow::Result<bool> {
    let mut out = open_report(report).await?;
    let all_ok = std::cell::Cell::new(true);
    let mut emit = |r: CheckResult| -> anyhow::Result<()> {
        all_ok.set(all_ok.get() && r.ok);
        let line = serde_json::to_string(&r)?;
        println!("{line}");
        writeln!(out, "{line}")?;
        out.flush()?;
        Ok(())
    };

    // First, so that even a boot whose agent fails says which version it is.
    if let Some(entry) = boot_entry() {
        emit(entry)?;
    }
    let mut agent_answered = false;
    let conn = timed("system-bus", zbus::Connection::system()).await;
    emit(conn.result(|_| "connected".to_owned()))?;
    if let Ok(conn) = conn.value {
        let ping = match Agent1Proxy::new(&conn).await {
            Ok(agent) => {
                let ping = timed("agent-ping", agent.ping())
                    .await
                    .result(|p| p.clone());
                if ping.ok {
                    emit(ping)?;
                    emit(
                        timed("agent-version", agent.version())
                            .await
                            .result(|v| v.clone()),
                    )?;
                    None
                } else {
                    Some(ping)
                }
            }
            Err(e) => Some(CheckResult {
                check: "agent-ping".into(),
                ok: false,
                detail: e.to_string(),
                ms: 0,
            }),
        };
        // The agent did not answer: say why, from its unit's journal.
        agent_answered = ping.is_none();
        if let Some(mut ping) = ping {
            ping.detail.push_str(&journal("devos-agent.service").await);
            emit(ping)?;
        }
    }

    // Taken now: the agent has answered.
    if let Ok(conn) = zbus::Connection::system().await {
        emit(boot_time(&conn).await)?;
    }
    emit(bus_policy().await)?;
    emit(agent_request().await)?;
    // (Each `devos` call to an agent that does not answer waits for the bus's timeout;
    // the failure is already on record.)
    emit(if agent_answered {
        context_index().await
    } else {
        failed("context-index", "not run: the agent did not answer".into())
    })?;
    emit(packages_refused().await)?;
    emit(audit_anchors().await)?;
    emit(root_read_only())?;
    if let Some(hash) = verity_hash().await {
        emit(hash)?;
    }
    emit(var_writable())?;
    emit(var_fills_disk().await)?;
    emit(hardening().await)?;
    // The host booted a Secure Boot image: the firmware enforces it, the kernel knows.
    match credential("devos.secure-boot") {
        Ok(Some(_)) => emit(secure_boot())?,
        Ok(None) => {}
        Err(e) => emit(failed("secure-boot", e.to_string()))?,
    }
    if let Some(time) = time_sync().await {
        emit(time)?;
    }
    emit(os_release())?;
    emit(system_state().await)?;
    emit(critical_chain().await)?;
    match spec_tests() {
        Ok(tests) => {
            for test in tests {
                emit(run_test(&test).await)?;
            }
        }
        Err(e) => emit(CheckResult {
            check: "spec-tests".into(),
            ok: false,
            detail: e.to_string(),
            ms: 0,
        })?,
    }

    // A version on trial (a counted boot) must be blessed once the agent is healthy.
    if let Some(blessed) = boot_blessed().await {
        emit(blessed)?;
    }
    if let Some(status) = update_status().await {
        emit(status)?;
    }
    // The host serves feeds that must be refused (a forged signature, a changed
    // file): each is, and nothing is installed.
    match credential("devos.update-refuse") {
        Ok(Some((_, urls))) => {
            for url in String::from_utf8_lossy(&urls).split_whitespace() {
                emit(update_refused(url).await)?;
            }
        }
        Ok(None) => {}
        Err(e) => emit(failed("update-refused", e.to_string()))?,
    }
    // The host serves a newer version's feed: install it, as root would.
    match credential("devos.update-feed") {
        Ok(Some((_, url))) => emit(update_from(String::from_utf8_lossy(&url).trim()).await)?,
        Ok(None) => {}
        Err(e) => emit(failed("update", e.to_string()))?,
    }
    // The host asks for the way back: `devos update --rollback`, as root would.
    match credential("devos.update-rollback") {
        Ok(Some(_)) if all_ok.get() => emit(rollback().await)?,
        Ok(Some(_)) => emit(failed(
            "rollback",
            "not run: this boot failed a check before it".into(),
        ))?,
        Ok(None) => {}
        Err(e) => emit(failed("rollback", e.to_string()))?,
    }

    // After a failed check (a broken agent cannot hand the key in), wait only briefly:
    // the report is failed either way, and the host's timeout must not run out first.
    let wait = if all_ok.get() {
        SSH_LOGIN_WAIT
    } else {
        Duration::from_secs(15)
    };
    if let Some(login) = ssh_login(wait).await {
        emit(login)?;
        emit(ssh_host_keys())?;
        // (Instance metadata is there exactly when the host logs in the EC2 way.)
        emit(metadata_root_only().await)?;
    }

    let done = serde_json::to_string(&Done {
        done: true,
        ok: all_ok.get(),
    })?;
    println!("{done}");
    writeln!(out, "{done}")?;
    out.flush()?;
    Ok(all_ok.get())
}

struct Timed<T> {
    check: &'static str,
    value: T,
    ms: u128,
}

impl<T, E: std::fmt::Display> Timed<Result<T, E>> {
    fn result(&self, detail: impl Fn(&T) -> String) -> CheckResult {
        CheckResult {
            check: self.check.to_owned(),
            ok: self.value.is_ok(),
            detail: match &self.value {
                Ok(v) => detail(v),
                Err(e) => e.to_string(),
            },
            ms: self.ms,
        }
    }
}

async fn timed<T>(check: &'static str, fut: impl std::future::Future<Output = T>) -> Timed<T> {
    let start = Instant::now();
    let value = fut.await;
    Timed {
        check,
        value,
        ms: start.elapsed().as_millis(),
    }
}

/// The report port appears when udev has set up virtio-console; wait for it briefly.
async fn open_report(path: &Path) -> anyhow::Result<std::fs::File> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
        {
            Ok(f) => return Ok(f),
            Err(e) if Instant::now() >= deadline => {
                anyhow::bail!("cannot open the report channel {}: {e}", path.display())
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// systemd's manager object on the bus `conn`.
pub(crate) async fn systemd_manager(conn: &zbus::Connection) -> zbus::Result<zbus::Proxy<'static>> {
    zbus::Proxy::new(
        conn,
        "org.freedesktop.systemd1",
        "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager",
    )
    .await
}

/// Where the boot's time went, as `systemd-analyze time` splits it, up to now (the
/// agent has answered): firmware, loader, kernel, initrd, userspace.
async fn boot_time(conn: &zbus::Connection) -> CheckResult {
    let start = Instant::now();
    let result = async {
        let manager = systemd_manager(conn).await?;
        let mut t = Vec::new();
        for name in [
            "FirmwareTimestampMonotonic",
            "LoaderTimestampMonotonic",
            "InitRDTimestampMonotonic",
            "UserspaceTimestampMonotonic",
        ] {
            t.push(manager.get_property::<u64>(name).await?);
        }
        Ok::<_, zbus::Error>(t)
    }
    .await;
    // (Without /proc/uptime only the userspace and total times are off.)
    let now_us = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0, |s| (s * 1e6) as u64);
    let (ok, detail) = match result {
        Ok(t) => (true, boot_split(t[0], t[1], t[2], t[3], now_us)),
        Err(e) => (false, e.to_string()),
    };
    CheckResult {
        check: "boot-time".into(),
        ok,
        detail,
        ms: start.elapsed().as_millis(),
    }
}

/// `firmware=… loader=… kernel=… initrd=… userspace=… total=…` in seconds. Firmware
/// and loader timestamps count backwards from the kernel's start.
pub fn boot_split(firmware: u64, loader: u64, initrd: u64, userspace: u64, now: u64) -> String {
    let s = |us: u64| format!("{:.1}s", us as f64 / 1e6);
    let kernel_end = if initrd > 0 { initrd } else { userspace };
    format!(
        "firmware={} loader={} kernel={} initrd={} userspace={} total={}",
        s(firmware.saturating_sub(loader)),
        s(loader),
        s(kernel_end),
        s(if initrd > 0 {
            userspace.saturating_sub(initrd)
        } else {
            0
        }),
        s(now.saturating_sub(userspace)),
        s(now + firmware),
    )
}

/// A spec `[[tests]]` entry, as the host passes it in the `devos.tests` credential.
#[derive(Debug, serde::Deserialize)]
pub struct SpecTest {
    pub name: String,
    pub run: String,
    pub expect_exit: i32,
}

/// Where systemd puts the credentials the host passed in (SMBIOS type 11).
const SYSTEM_CREDENTIALS: &str = "/run/credentials/@system";

/// The spec's tests; none when the host passed none. A credential that cannot be
/// read or parsed is an error: its tests would otherwise pass unseen.
fn spec_tests() -> Result<Vec<SpecTest>, SelfTestError> {
    match credential("devos.tests")? {
        Some((path, bytes)) => serde_json::from_slice(&bytes)
            .map_err(|source| SelfTestError::BadTests { path, source }),
        None => Ok(Vec::new()),
    }
}

/// A credential the host passed in: its path and bytes, or None if it passed none.
fn credential(name: &str) -> Result<Option<(std::path::PathBuf, Vec<u8>)>, SelfTestError> {
    let dirs = [
        std::env::var_os("CREDENTIALS_DIRECTORY").map(std::path::PathBuf::from),
        Some(SYSTEM_CREDENTIALS.into()),
    ];
    for path in dirs.into_iter().flatten().map(|d| d.join(name)) {
        match std::fs::read(&path) {
            Ok(bytes) => return Ok(Some((path, bytes))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(SelfTestError::UnreadableTests { path, source }),
        }
    }
    Ok(None)
}

/// Where the host's SSH login leaves the nonce it was given (`devos.ssh-login`).
const SSH_LOGIN_MARK: &str = "/tmp/devos-ssh-login";

/// How long the guest waits for the host's SSH login once its own checks are done.
const SSH_LOGIN_WAIT: Duration = Duration::from_secs(120);

/// The host logs in over SSH with a key it handed in the way EC2 does (instance
/// metadata) and leaves the nonce of the `devos.ssh-login` credential in
/// [`SSH_LOGIN_MARK`]: wait for it. None when the host asked for no login.
async fn ssh_login(wait: Duration) -> Option<CheckResult> {
    let nonce = match credential("devos.ssh-login") {
        Ok(Some((_, bytes))) => String::from_utf8_lossy(&bytes).trim().to_owned(),
        Ok(None) => return None,
        Err(e) => return Some(failed("ssh-login", e.to_string())),
    };
    let start = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(SSH_LOGIN_MARK)
            && text.lines().next() == Some(nonce.as_str())
        {
            use std::os::unix::fs::MetadataExt;
            let uid = std::fs::metadata(SSH_LOGIN_MARK)
                .map(|m| m.uid())
                .unwrap_or(0);
            let user = nix::unistd::User::from_uid(uid.into())
                .ok()
                .flatten()
                .map_or(uid.to_string(), |u| u.name);
            let sudo = text.lines().nth(1) == Some("sudo");
            let expected = sudo_expected(&user);
            let mut detail =
                format!("{user} logged in over SSH with the key from instance metadata");
            detail.push_str(match (sudo, expected) {
                (true, true) => "; sudo without a password, as the spec says",
                (false, false) => "; no sudo without a password",
                (true, false) => {
                    "; sudo let them in WITHOUT a password, which the spec does not give them"
                }
                (false, true) => {
                    "; sudo asked for a password, though the spec gives them sudo without one"
                }
            });
            return Some(CheckResult {
                check: "ssh-login".into(),
                ok: uid != 0 && sudo == expected,
                detail,
                ms: start.elapsed().as_millis(),
            });
        }
        if start.elapsed() > wait {
            let mut detail = format!("no SSH login from the host within {}s", wait.as_secs());
            for unit in [
                "ssh.service",
                "devos-ssh-host-keys.service",
                "devos-ec2-keys.service",
            ] {
                detail.push_str(&journal(unit).await);
            }
            return Some(failed("ssh-login", detail));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Whether `user` should use sudo without a password: exactly when the image's sudoers
/// has the line the builder writes for a spec's `sudo-without-password` user (Debian:
/// /etc/sudoers.d/devos-users; NixOS: in /etc/sudoers). Any other way in without a
/// password is one nobody asked for.
fn sudo_expected(user: &str) -> bool {
    let mut sudoers = std::fs::read_to_string("/etc/sudoers").unwrap_or_default();
    for entry in std::fs::read_dir("/etc/sudoers.d")
        .into_iter()
        .flatten()
        .flatten()
    {
        sudoers.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
    }
    sudo_rule_applies(&sudoers, user)
}

/// [`sudo_expected`] from sudoers text.
fn sudo_rule_applies(sudoers: &str, user: &str) -> bool {
    let line = format!("{user} {SUDO_WITHOUT_PASSWORD}");
    sudoers.lines().any(|l| l.trim() == line)
}

/// The sudoers line (after the user's name) of a spec's `sudo-without-password` user:
/// the builder writes it, the self-test looks for it.
pub const SUDO_WITHOUT_PASSWORD: &str = "ALL=(ALL:ALL) NOPASSWD: ALL";

/// Instance metadata answers root (the agent, the key hand-over) and refuses every
/// other user at once, on EC2's IPv4 address and, where the kernel has IPv6, on its
/// IPv6 one: the instance role's credentials are the system's (the image's routing
/// rules, docs/agent.md "Instance metadata"). (No stand-in answers on IPv6, so only
/// the refusal is checked there: without the rule a user's connect would not say
/// "Permission denied".)
async fn metadata_root_only() -> CheckResult {
    const V4: &str = "exec 3<>/dev/tcp/169.254.169.254/80";
    const V6: &str = "exec 3<>/dev/tcp/fd00:ec2::254/80";
    const USER: &[&str] = &[
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ];
    let start = Instant::now();
    let refused = |(user_in, said): (bool, String)| match user_in {
        true => {
            Err("it reaches instance metadata: any user could use the instance role".to_owned())
        }
        false if said.contains("Permission denied") => Ok(()),
        false => Err(format!("it is not refused at once: {said}")),
    };
    let (root_in, root_said) = connect_as(&["env"], V4).await;
    let v4 = refused(connect_as(USER, V4).await);
    let ipv6 = std::path::Path::new("/proc/sys/net/ipv6").exists();
    let v6 = match ipv6 {
        true => refused(connect_as(USER, V6).await),
        false => Ok(()),
    };
    CheckResult {
        check: "metadata-root-only".into(),
        ok: root_in && v4.is_ok() && v6.is_ok(),
        detail: match (root_in, v4, v6) {
            (false, _, _) => format!("root cannot reach instance metadata: {root_said}"),
            (true, Err(e), _) => format!("uid 65534 on 169.254.169.254: {e}"),
            (true, Ok(()), Err(e)) => format!("uid 65534 on fd00:ec2::254: {e}"),
            (true, Ok(()), Ok(())) if ipv6 => "root reaches instance metadata; uid 65534 is refused on 169.254.169.254 and fd00:ec2::254 (Permission denied)".into(),
            (true, Ok(()), Ok(())) => "root reaches instance metadata; uid 65534 is refused (Permission denied); this kernel has no IPv6".into(),
        },
        ms: start.elapsed().as_millis(),
    }
}

/// Run `bash -c script` under `runner` (argv before it): whether it succeeded, and
/// what it said on stderr.
async fn connect_as(runner: &[&str], script: &str) -> (bool, String) {
    let output = tokio::process::Command::new(runner[0])
        .args(&runner[1..])
        .args(["bash", "-c", script])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(Duration::from_secs(20), output).await {
        Ok(Ok(out)) => (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ),
        Ok(Err(e)) => (false, format!("cannot run {}: {e}", runner[0])),
        Err(_) => (false, "no answer within 20 s".to_owned()),
    }
}

/// The machine's SSH host keys are its own: made in /var, none in the image's /etc.
fn ssh_host_keys() -> CheckResult {
    let baked: Vec<String> = std::fs::read_dir("/etc/ssh")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("ssh_host_"))
        .collect();
    let made = std::fs::read_to_string("/var/lib/devos/ssh/ssh_host_ed25519_key.pub");
    let (ok, detail) = match (&made, baked.is_empty()) {
        (Ok(key), true) => (
            true,
            format!("made on this machine in /var: {}", key.trim()),
        ),
        (_, false) => (
            false,
            format!(
                "host keys baked into the image: /etc/ssh/{}",
                baked.join(", /etc/ssh/")
            ),
        ),
        (Err(e), true) => (false, format!("no host key in /var/lib/devos/ssh: {e}")),
    };
    CheckResult {
        check: "ssh-host-keys".into(),
        ok,
        detail,
        ms: 0,
    }
}

/// The boot loader entry (the kernel image) this boot started from, and whether the
/// boot is counted (a version on trial). None when systemd-boot did not start it.
fn boot_entry() -> Option<CheckResult> {
    let loader = LoaderState::read();
    let entry = loader.selected.clone()?;
    Some(CheckResult {
        check: "boot-entry".into(),
        ok: true,
        detail: if loader.counted() {
            format!("{entry} (counted: a version on trial)")
        } else {
            entry
        },
        ms: 0,
    })
}

/// On a counted boot: wait for systemd-bless-boot to mark this version good (after
/// devos-boot-complete.service found the agent healthy). None on other boots.
async fn boot_blessed() -> Option<CheckResult> {
    if !LoaderState::read().counted() {
        return None;
    }
    let start = Instant::now();
    loop {
        let state = tokio::process::Command::new("systemctl")
            .args(["show", "-P", "ActiveState", "systemd-bless-boot.service"])
            .output()
            .await
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        if state == "active" {
            return Some(CheckResult {
                check: "boot-blessed".into(),
                ok: true,
                detail: "a counted boot reached boot-complete.target (the agent is healthy); systemd-bless-boot marked this version good".into(),
                ms: start.elapsed().as_millis(),
            });
        }
        if start.elapsed() > Duration::from_secs(150) || state == "failed" {
            let mut detail = format!("systemd-bless-boot.service is {state}, not active");
            detail.push_str(&journal("devos-boot-complete.service").await);
            return Some(failed("boot-blessed", detail));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// What is installed: the partitions' names (the root slots carry their version) and
/// the ESP's kernel images.
async fn installed() -> String {
    let labels = tokio::process::Command::new("lsblk")
        .args(["-rno", "PARTLABEL"])
        .output()
        .await
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    let mut images: Vec<String> = std::fs::read_dir("/efi/EFI/Linux")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    images.sort();
    format!("partitions: {labels}; EFI/Linux: {}", images.join(" "))
}

/// `devos update` from `feed` must fail and leave what is installed as it was.
async fn update_refused(feed: &str) -> CheckResult {
    let start = Instant::now();
    if let Err(e) = redirect_transfers(feed) {
        return failed(
            "update-refused",
            format!("cannot point the transfers at {feed}: {e}"),
        );
    }
    let before = installed().await;
    let result = devos_json(&["update"]).await;
    let after = installed().await;
    match result {
        Err(e) if before == after => CheckResult {
            check: "update-refused".into(),
            ok: true,
            detail: format!("{feed} refused, nothing installed ({after}): {e}"),
            ms: start.elapsed().as_millis(),
        },
        Err(e) => failed(
            "update-refused",
            format!("{feed} was refused ({e}), but what is installed changed: {before} → {after}"),
        ),
        Ok(v) => failed("update-refused", format!("{feed} was not refused: {v}")),
    }
}

/// Point the image's transfers at `feed`: copies in /run/sysupdate.d, which take the
/// place of those in /usr/lib. How many there are.
fn redirect_transfers(feed: &str) -> std::io::Result<usize> {
    std::fs::create_dir_all("/run/sysupdate.d")?;
    let mut n = 0;
    for entry in std::fs::read_dir("/usr/lib/sysupdate.d")? {
        let path = entry?.path();
        let Some(name) = path.file_name() else {
            continue;
        };
        let text: String = std::fs::read_to_string(&path)?
            .lines()
            .map(|l| match l.strip_prefix("Path=http") {
                Some(_) => format!("Path={feed}\n"),
                None => format!("{l}\n"),
            })
            .collect();
        std::fs::write(Path::new("/run/sysupdate.d").join(name), text)?;
        n += 1;
    }
    Ok(n)
}

/// Point the image's transfers at `feed` and run `devos update`, as root would; then
/// flush, for the host stops the VM once the report is complete.
async fn update_from(feed: &str) -> CheckResult {
    let start = Instant::now();
    match redirect_transfers(feed) {
        Ok(0) => {
            return failed(
                "update",
                "the image has no transfers in /usr/lib/sysupdate.d (no `[update]` in its spec)"
                    .into(),
            );
        }
        Ok(_) => {}
        Err(e) => {
            return failed(
                "update",
                format!("cannot point the transfers at {feed}: {e}"),
            );
        }
    }
    let result = devos_json(&["update"]).await;
    let _ = tokio::process::Command::new("sync").status().await;
    match result {
        Ok(v) if v["reboot"] == true => {
            match next_boot_said(&v["next"], "(installed, not booted yet").await {
                Ok(next) => CheckResult {
                    check: "update".into(),
                    ok: true,
                    detail: format!(
                        "{}; devos status: next boot {next}",
                        v["message"].as_str().unwrap_or_default()
                    ),
                    ms: start.elapsed().as_millis(),
                },
                Err(e) => failed("update", e),
            }
        }
        Ok(v) => failed("update", format!("nothing was installed from {feed}: {v}")),
        Err(e) => failed("update", format!("{e}")),
    }
}

/// `devos update --rollback`: the next boot must start the version installed before
/// this one, and the audit log must hold the update to this version and the rollback.
async fn rollback() -> CheckResult {
    let start = Instant::now();
    let result = devos_json(&["update", "--rollback"]).await;
    let _ = tokio::process::Command::new("sync").status().await;
    let v = match result {
        Ok(v) if v["reboot"] == true => v,
        Ok(v) => return failed("rollback", format!("nothing to go back to: {v}")),
        Err(e) => return failed("rollback", e.to_string()),
    };
    let audit_dir = crate::config::AgentConfig::load(Path::new(crate::config::DEFAULT_PATH))
        .unwrap_or_default()
        .state_dir
        .join("audit");
    let os_release = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let Some(running) = crate::os_release::field(&os_release, "IMAGE_VERSION") else {
        return failed("rollback", "os-release has no IMAGE_VERSION".into());
    };
    if let Err(missing) = update_then_rollback_audited(&audit_dir, &running) {
        return failed(
            "rollback",
            format!("the audit log in {}: {missing}", audit_dir.display()),
        );
    }
    let next = match next_boot_said(&v["next"], "(good): the boot loader's default").await {
        Ok(next) => next,
        Err(e) => return failed("rollback", e),
    };
    CheckResult {
        check: "rollback".into(),
        ok: true,
        detail: format!(
            "{} (the update and the rollback are in the audit log); devos status: next boot {next}",
            v["message"].as_str().unwrap_or_default()
        ),
        ms: start.elapsed().as_millis(),
    }
}

/// What `devos status` says the next boot starts, when it is `version` followed by
/// `then`; an error saying what it said otherwise.
async fn next_boot_said(version: &serde_json::Value, then: &str) -> Result<String, String> {
    let version = version.as_str().unwrap_or_default();
    let status = devos_json(&["status"]).await.map_err(|e| e.to_string())?;
    let next = status["next-boot"].as_str().unwrap_or_default();
    if next.starts_with(&format!("{version} {then}")) {
        Ok(next.to_owned())
    } else {
        Err(format!(
            "devos status does not say that {version} boots next {then}…: next-boot is {}",
            status["next-boot"]
        ))
    }
}

/// What `devos status` says about updates, where systemd-boot started one of the
/// image's kernel images: the version it started, which must be the one the boot loader
/// names (`LoaderEntrySelected`) and the one running, and how it stands; what the next
/// boot starts; the other versions installed.
async fn update_status() -> Option<CheckResult> {
    let start = Instant::now();
    let selected = LoaderState::read().selected?;
    let (image, running) = crate::os_release::image_identity(Path::new("/etc/os-release"));
    // (systemd-boot lowercases the ids it names.)
    let started = crate::bootloader::Entry::parse(
        &image?.to_ascii_lowercase(),
        &selected.to_ascii_lowercase(),
    )?;
    let running = running.unwrap_or_default();
    let status = match devos_json(&["status"]).await {
        Ok(status) => status,
        Err(e) => return Some(failed("update-status", e.to_string())),
    };
    let word = |key: &str| status[key].as_str().unwrap_or("(none)").to_owned();
    let booted = word("booted");
    let ok = started.version == crate::update::sysupdate_version(&running).to_ascii_lowercase()
        && booted.starts_with(&format!("{running}: "))
        && status["next-boot"].is_string()
        && status["other-versions"].is_string();
    Some(CheckResult {
        check: "update-status".into(),
        ok,
        detail: format!(
            "booted {booted}; next boot {}; other versions {}; feed {} (the boot loader started {selected}, os-release says {running})",
            word("next-boot"),
            word("other-versions"),
            word("update-feed"),
        ),
        ms: start.elapsed().as_millis(),
    })
}

/// The audit log holds the install of the running version (from the boot before,
/// which asked for a reboot to start it) and, after it, a rollback that did the same.
/// Refused installs (the forged feeds) are in the log too and do not count.
fn update_then_rollback_audited(dir: &Path, running: &str) -> Result<(), String> {
    // As the agent that installed it wrote it: the builder's spelling, or (agents of
    // before 2026-12-07) systemd-sysupdate's.
    let spellings = [
        running.to_owned(),
        crate::update::sysupdate_version(running),
    ];
    let mut entries: Vec<crate::audit::Entry> = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot list it: {e}"))?
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .flat_map(|text| {
            text.lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect::<Vec<_>>()
        })
        .collect();
    entries.sort_by_key(|e| e.seq);
    let done =
        |e: &crate::audit::Entry, event: &str| e.event == event && e.detail["reboot"] == true;
    let install = entries
        .iter()
        .position(|e| {
            done(e, "update.install") && spellings.iter().any(|v| e.detail["next"] == v.as_str())
        })
        .ok_or(format!("no update.install entry that installed {running}"))?;
    entries[install..]
        .iter()
        .any(|e| done(e, "update.rollback"))
        .then_some(())
        .ok_or(format!(
            "no update.rollback entry after the install of {running}"
        ))
}

fn failed(check: &str, detail: String) -> CheckResult {
    CheckResult {
        check: check.into(),
        ok: false,
        detail,
        ms: 0,
    }
}

/// What kept a self-test check from finding out.
#[derive(Debug, thiserror::Error)]
enum SelfTestError {
    #[error("cannot read {path}: {source}")]
    UnreadableTests {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not the spec's tests: {source}")]
    BadTests {
        path: std::path::PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot run devos: {0}")]
    RunDevos(std::io::Error),
    #[error("`devos {args}` failed ({status}): {stderr}")]
    DevosFailed {
        args: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("`devos {args}` gave no JSON ({source}): {stderr}")]
    NoJson {
        args: String,
        source: serde_json::Error,
        stderr: String,
    },
}

/// How long one spec test may run.
const TEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Run one spec test with `sh -c` as root; it passes if it exits as expected.
async fn run_test(test: &SpecTest) -> CheckResult {
    let start = Instant::now();
    let out = tokio::time::timeout(
        TEST_TIMEOUT,
        tokio::process::Command::new("/bin/sh")
            .args(["-c", &test.run])
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await;
    let (ok, detail) = match out {
        Err(_) => (
            false,
            format!("did not finish within {}s", TEST_TIMEOUT.as_secs()),
        ),
        Ok(Err(e)) => (false, format!("cannot run /bin/sh: {e}")),
        Ok(Ok(o)) => {
            let code = o.status.code().unwrap_or(-1);
            let mut text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&o.stderr));
            let tail: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
            let tail = tail[tail.len().saturating_sub(5)..].join(" | ");
            (
                code == test.expect_exit,
                format!(
                    "exit {code} (expected {}){}",
                    test.expect_exit,
                    if tail.is_empty() {
                        String::new()
                    } else {
                        format!(": {tail}")
                    }
                ),
            )
        }
    };
    CheckResult {
        check: format!("test:{}", test.name),
        ok,
        detail,
        ms: start.elapsed().as_millis(),
    }
}

/// A user other than root must not be able to own the agent's bus name.
async fn bus_policy() -> CheckResult {
    let start = Instant::now();
    let out = tokio::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "busctl",
            "--system",
            "call",
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "RequestName",
            "su",
            crate::BUS_NAME,
            "4",
        ])
        .output()
        .await;
    let (ok, detail) = match out {
        Err(e) => (false, format!("cannot run setpriv/busctl: {e}")),
        Ok(o) if o.status.success() => (
            false,
            format!("uid 65534 was allowed to own {}", crate::BUS_NAME),
        ),
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr).trim().to_owned();
            let refused = err.contains("not allowed") || err.contains("Access denied");
            (
                refused,
                if refused {
                    format!("uid 65534 may not own {}", crate::BUS_NAME)
                } else {
                    format!("unexpected busctl failure: {err}")
                },
            )
        }
    };
    CheckResult {
        check: "bus-policy".into(),
        ok,
        detail,
        ms: start.elapsed().as_millis(),
    }
}

/// A real request through the whole pipeline, as an unprivileged user: planned,
/// classified read-only, auto-approved, run in the sandbox with Landlock enforced.
async fn agent_request() -> CheckResult {
    let start = Instant::now();
    let out = tokio::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "devos",
            "--json",
            "run",
            "--cwd",
            "/",
            "list",
            "files",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .await;
    let (ok, mut detail) = match out {
        Err(e) => (false, format!("cannot run setpriv/devos: {e}")),
        Ok(o) => match serde_json::from_slice::<crate::request::Request>(&o.stdout) {
            Err(e) => (
                false,
                format!(
                    "`devos run` gave no request ({e}): {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
            ),
            Ok(r) => {
                let action = r.actions.first();
                let sandbox = action.and_then(|a| a.sandbox.clone()).unwrap_or_default();
                let listed = action.is_some_and(|a| a.output.contains("usr"));
                // The whole sandbox: namespaces, Landlock, and cgroup limits (the
                // image runs the agent under systemd, which delegates a cgroup).
                let ok = r.state == crate::request::State::Done
                    && listed
                    && sandbox.starts_with("namespaces: mount, pid")
                    && sandbox.contains("landlock V")
                    && sandbox.contains("cgroup memory.max=");
                let detail = if ok {
                    format!("uid 65534: `list files` in / ran sandboxed ({sandbox})")
                } else {
                    format!(
                        "uid 65534: `list files` ended {} (sandbox: {sandbox:?}; error: {:?}; output: {:?})",
                        r.state.as_str(),
                        r.error.or_else(|| action.and_then(|a| a.error.clone())),
                        action.map(|a| a.output.chars().take(300).collect::<String>())
                    )
                };
                (ok, detail)
            }
        },
    };
    if !ok {
        detail.push_str(&journal("devos-agent.service").await);
    }
    CheckResult {
        check: "agent-request".into(),
        ok,
        detail,
        ms: start.elapsed().as_millis(),
    }
}

/// The context engine under the image's own unit: a directory on /var is indexed, a
/// file made after is found through inotify, and `devos context ps` lists this
/// process.
async fn context_index() -> CheckResult {
    let start = Instant::now();
    let dir = Path::new("/var/lib/devos-selftest-context");
    let result = async {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir.join("src")).map_err(|e| e.to_string())?;
        std::fs::write(dir.join("src/first.txt"), "x").map_err(|e| e.to_string())?;
        let root = dir.to_string_lossy();
        devos_json(&["context", "add", &root])
            .await
            .map_err(|e| e.to_string())?;
        let found = |name: &'static str| async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(v) = devos_json(&["context", "find", name]).await
                    && v["results"].as_array().is_some_and(|r| !r.is_empty())
                {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            false
        };
        if !found("first.txt").await {
            return Err("the first scan did not index src/first.txt within 20 s".to_owned());
        }
        let changed = Instant::now();
        std::fs::write(dir.join("src/second.txt"), "x").map_err(|e| e.to_string())?;
        if !found("second.txt").await {
            return Err("a file made after the scan was not indexed within 20 s (inotify?)".into());
        }
        let seen_ms = changed.elapsed().as_millis();
        let ps = devos_json(&["context", "ps"]).await.map_err(|e| e.to_string())?;
        let me = std::process::id();
        if !ps["processes"]
            .as_array()
            .is_some_and(|l| l.iter().any(|p| p["pid"] == me))
        {
            return Err(format!("`devos context ps` does not list the self-test (pid {me}): {ps}"));
        }
        let _ = devos_json(&["context", "remove", &root]).await;
        let _ = std::fs::remove_dir_all(dir);
        Ok(format!(
            "indexed {root}; a new file was found {seen_ms} ms after it was made; `context ps` lists {} processes",
            ps["total"]
        ))
    }
    .await;
    let (ok, mut detail) = match result {
        Ok(d) => (true, d),
        Err(e) => (false, e),
    };
    if !ok {
        detail.push_str(&journal("devos-agent.service").await);
    }
    CheckResult {
        check: "context-index".into(),
        ok,
        detail,
        ms: start.elapsed().as_millis(),
    }
}

/// `devos` as root with these arguments, its request or report as JSON.
async fn devos_json(args: &[&str]) -> Result<serde_json::Value, SelfTestError> {
    let out = tokio::process::Command::new("devos")
        .arg("--json")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(SelfTestError::RunDevos)?;
    // (A refused request still answers in JSON, with a status that is not success.)
    if !out.status.success() && out.stdout.trim_ascii().is_empty() {
        return Err(SelfTestError::DevosFailed {
            args: args.join(" "),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    serde_json::from_slice(&out.stdout).map_err(|source| SelfTestError::NoJson {
        args: args.join(" "),
        source,
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    })
}

/// A package install on the read-only root is refused up front, naming the spec.
async fn packages_refused() -> CheckResult {
    let start = Instant::now();
    let (ok, detail) = match devos_json(&["run", "--cwd", "/", "install", "jq"]).await {
        Err(e) => (false, e.to_string()),
        Ok(r) => {
            let reason = r["actions"][0]["decision"]["reason"].as_str().unwrap_or("");
            let ok = r["state"] == "denied" && reason.contains("[packages]");
            (
                ok,
                format!("`install jq` as root: {} ({reason})", r["state"]),
            )
        }
    };
    CheckResult {
        check: "packages-refused".into(),
        ok,
        detail,
        ms: start.elapsed().as_millis(),
    }
}

/// The audit log verifies against its anchors, the journal's among them.
async fn audit_anchors() -> CheckResult {
    let start = Instant::now();
    let (ok, detail) = match devos_json(&["audit", "verify"]).await {
        Err(e) => (false, e.to_string()),
        Ok(v) => {
            let journal = v["journal-anchors"].as_u64().unwrap_or(0);
            (
                v["ok"] == true && journal > 0 && v["anchors"].as_u64().unwrap_or(0) > 0,
                format!(
                    "{} entries; {} anchors in the anchor file, {journal} in the journal; first bad: {}",
                    v["entries"], v["anchors"], v["first-bad"]
                ),
            )
        }
    };
    CheckResult {
        check: "audit-anchors".into(),
        ok,
        detail,
        ms: start.elapsed().as_millis(),
    }
}

/// The mount options of the filesystem mounted at `target`, from mountinfo.
fn mount_options(target: &str) -> Option<String> {
    // (Unreadable, it shows no options: the root check then fails.)
    mount_field(target, 5).ok().flatten()
}

/// Field `field` of mountinfo's line for what is mounted at `target` (the last one
/// mounted there): 2 is the device's `major:minor`, 5 the mount options.
fn mount_field(target: &str, field: usize) -> std::io::Result<Option<String>> {
    Ok(std::fs::read_to_string("/proc/self/mountinfo")?
        .lines()
        .rev()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(4) == Some(&target)).then(|| f.get(field).map(|o| (*o).to_owned()))?
        }))
}

/// The image's immutable tree is mounted read-only and cannot be written: the root (and
/// /usr on it) on Debian images; the store on NixOS images, whose root is a tmpfs
/// rebuilt at every boot (nixos/image.nix).
fn root_read_only() -> CheckResult {
    let (tree, dir) = match mount_options(NIX_STORE) {
        Some(_) => (NIX_STORE, NIX_STORE),
        None => ("/", "/usr"),
    };
    let options = mount_options(tree).unwrap_or_default();
    let written = std::fs::write(Path::new(dir).join(".devos-selftest"), "x").is_ok();
    read_only_result(tree, &options, dir, written)
}

/// Where NixOS images keep everything they run.
const NIX_STORE: &str = "/nix/store";

/// [`root_read_only`] from what it found: `tree` mounted with `options`, and whether
/// writing a file in `dir` on it worked.
fn read_only_result(tree: &str, options: &str, dir: &str, written: bool) -> CheckResult {
    let ro = options.split(',').any(|o| o == "ro");
    CheckResult {
        check: "root-read-only".into(),
        ok: ro && !written,
        detail: format!(
            "{tree} mounted {options}; writing to {dir} {}",
            if written { "SUCCEEDED" } else { "fails" }
        ),
        ms: 0,
    }
}

/// Which SHA-256 code dm-verity checks the root with, as the kernel said when the root
/// was opened; `None` when no root is verified. dm-verity keeps the code it found then:
/// the generic C code on a CPU with SSSE3 means the initrd opened the root before it
/// loaded the x86 module (`rd.modules_load=`), and every block read from the root costs
/// more for as long as the machine runs. It reports; the image tests judge.
async fn verity_hash() -> Option<CheckResult> {
    let log = tokio::process::Command::new("journalctl")
        .args(["--no-pager", "-o", "cat", "-k", "-b", "0"])
        .output()
        .await
        .ok()?;
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    verity_hash_result(&String::from_utf8_lossy(&log.stdout), &cpuinfo)
}

/// [`verity_hash`] from the kernel's log and /proc/cpuinfo. The kernel's words:
/// `device-mapper: verity: sha256 using shash "sha256-ssse3"` (older kernels:
/// `using implementation "..."`).
fn verity_hash_result(kernel_log: &str, cpuinfo: &str) -> Option<CheckResult> {
    let line = kernel_log
        .lines()
        .rfind(|l| l.contains("device-mapper: verity: ") && l.contains(" using "))?;
    let driver = line.rsplit(' ').next()?.trim_matches('"');
    let ssse3 = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "ssse3"));
    let detail = if driver.ends_with("-generic") && ssse3 {
        format!(
            "dm-verity checks the root with {driver}, although the CPU has SSSE3: the initrd \
             opened the root before it loaded {}",
            VERITY_HASH_MODULE
        )
    } else {
        format!("dm-verity checks the root with {driver}")
    };
    Some(CheckResult {
        check: "verity-hash".into(),
        ok: true,
        detail,
        ms: 0,
    })
}

/// The x86 SHA-256 module the builder's images load in the initrd for dm-verity.
const VERITY_HASH_MODULE: &str = "sha256_ssse3";

fn var_writable() -> CheckResult {
    let path = Path::new("/var/.devos-selftest");
    let result = std::fs::write(path, "x").and_then(|()| std::fs::remove_file(path));
    CheckResult {
        check: "var-writable".into(),
        ok: result.is_ok(),
        detail: match result {
            Ok(()) => format!(
                "/var mounted {}",
                mount_options("/var").unwrap_or_else(|| "(not a mount point)".into())
            ),
            Err(e) => format!("cannot write to /var: {e}"),
        },
        ms: 0,
    }
}

/// The systemd-repart definition of a Debian image's var partition, relative to the
/// root: the builder writes it, the self-test looks for it.
pub const REPART_VAR: &str = "usr/lib/repart.d/50-devos-var.conf";
/// Where an image's systemd-repart is, relative to the root (merged /usr, or
/// bookworm's /bin): the builder warns without it, the self-test does not check then.
pub const SYSTEMD_REPART: [&str; 2] = ["usr/bin/systemd-repart", "bin/systemd-repart"];
/// How long growing /var into a larger disk may take after the agent answers.
const VAR_GROW_WAIT: Duration = Duration::from_secs(30);

/// On a disk larger than the image (the host boots its tests so, as EC2 launches
/// larger volumes), /var took the free space: its partition reaches the disk's end and
/// its filesystem fills the partition. Images without the builder's definition (NixOS
/// makes /var on its first boot) or without systemd-repart say so and pass.
async fn var_fills_disk() -> CheckResult {
    let check = "var-fills-disk".to_owned();
    let root = Path::new("/");
    if !root.join(REPART_VAR).exists() {
        return CheckResult {
            check,
            ok: true,
            detail: format!("not checked: the image has no /{REPART_VAR}"),
            ms: 0,
        };
    }
    if !SYSTEMD_REPART.iter().any(|f| root.join(f).exists()) {
        return CheckResult {
            check,
            ok: true,
            detail: "not checked: the image has no systemd-repart (/var keeps the image's size; add `systemd-repart` to the spec)".into(),
            ms: 0,
        };
    }
    let start = Instant::now();
    loop {
        let layout = var_layout();
        let done = layout.as_ref().is_ok_and(VarLayout::fills_disk);
        if done || start.elapsed() >= VAR_GROW_WAIT {
            return CheckResult {
                check,
                ok: done,
                detail: match layout {
                    Ok(l) if done => l.to_string(),
                    Ok(l) => format!(
                        "/var did not take the disk's free space within {} s: {l}{}{}",
                        VAR_GROW_WAIT.as_secs(),
                        journal("systemd-repart.service").await,
                        journal("systemd-growfs@var.service").await
                    ),
                    Err(e) => format!("cannot tell /var's partition: {e}"),
                },
                ms: start.elapsed().as_millis(),
            };
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// /var's partition on its disk and its filesystem, in bytes.
#[derive(Debug, PartialEq)]
struct VarLayout {
    disk: u64,
    start: u64,
    partition: u64,
    filesystem: u64,
}

impl VarLayout {
    /// What systemd-repart and the image's layout may leave unused after /var: a
    /// partition alignment's grain and the backup GPT.
    const SLACK: u64 = 2 << 20;

    /// The partition reaches the disk's end, and the filesystem (less what ext4 keeps
    /// for itself) fills it.
    fn fills_disk(&self) -> bool {
        self.start + self.partition + Self::SLACK >= self.disk
            && self.filesystem >= self.partition / 10 * 9
    }
}

impl std::fmt::Display for VarLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const MIB: u64 = 1 << 20;
        write!(
            f,
            "disk {} MiB; /var's partition {} MiB from {} MiB ({} MiB after it); its filesystem {} MiB",
            self.disk / MIB,
            self.partition / MIB,
            self.start / MIB,
            self.disk.saturating_sub(self.start + self.partition) / MIB,
            self.filesystem / MIB
        )
    }
}

/// [`VarLayout`] from sysfs (the mounted device's partition and its disk) and statvfs.
fn var_layout() -> Result<VarLayout, String> {
    let device = mount_field("/var", 2)
        .map_err(|e| format!("/proc/self/mountinfo: {e}"))?
        .ok_or("/var is not a mount point")?;
    let part = std::fs::canonicalize(format!("/sys/dev/block/{device}"))
        .map_err(|e| format!("/sys/dev/block/{device}: {e}"))?;
    let sectors = |file: &Path| -> Result<u64, String> {
        std::fs::read_to_string(file)
            .map_err(|e| format!("{}: {e}", file.display()))?
            .trim()
            .parse::<u64>()
            .map(|n| n * 512)
            .map_err(|e| format!("{}: {e}", file.display()))
    };
    let disk = part.parent().ok_or("a partition without a disk")?;
    let filesystem =
        nix::sys::statvfs::statvfs("/var").map_err(|e| format!("statvfs /var: {e}"))?;
    Ok(VarLayout {
        disk: sectors(&disk.join("size"))?,
        start: sectors(&part.join("start"))?,
        partition: sectors(&part.join("size"))?,
        filesystem: filesystem.blocks() as u64 * filesystem.fragment_size() as u64,
    })
}

/// What the image's build hardens and a later change could quietly lose: owners kept
/// in the read-only root (`root:shadow` on /etc/shadow, where the group exists), `/var`
/// (writable, unverified) mounted `nosuid,nodev`, the kernel's protection of files and
/// FIFOs in sticky directories, no LLMNR or mDNS responder on the links, and an SSH
/// server that takes keys only, no root and no X11.
async fn hardening() -> CheckResult {
    use std::os::unix::fs::MetadataExt;
    let mut wrong = Vec::new();
    let mut found = Vec::new();
    let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
    if let Some(shadow) = group_id(&groups, "shadow") {
        match std::fs::metadata("/etc/shadow").map(|m| m.gid()) {
            Ok(gid) if gid == shadow => found.push("/etc/shadow in group shadow".to_owned()),
            Ok(gid) => wrong.push(format!(
                "/etc/shadow is in group {gid}, not shadow ({shadow}): the root lost its owners"
            )),
            Err(e) => wrong.push(format!("/etc/shadow: {e}")),
        }
    }
    match mount_options("/var") {
        Some(options) => {
            let has = |o: &str| options.split(',').any(|x| x == o);
            if has("nosuid") && has("nodev") {
                found.push("/var nosuid,nodev".to_owned());
            } else {
                wrong.push(format!("/var is mounted {options}, without nosuid,nodev"));
            }
        }
        None => wrong.push("/var is not a mount point".to_owned()),
    }
    for name in ["protected_regular", "protected_fifos"] {
        let value = std::fs::read_to_string(format!("/proc/sys/fs/{name}")).unwrap_or_default();
        match value.trim().parse::<u32>() {
            Ok(v) if v >= 1 => found.push(format!("fs.{name}={v}")),
            _ => wrong.push(format!(
                "fs.{name} is {:?}: no sysctl.d default set it (Debian's linux-sysctl-defaults does)",
                value.trim()
            )),
        }
    }
    let sockets: String = ["tcp", "tcp6", "udp", "udp6"]
        .iter()
        .map(|t| std::fs::read_to_string(format!("/proc/net/{t}")).unwrap_or_default())
        .collect();
    for (port, what) in [(LLMNR_PORT, "LLMNR"), (MDNS_PORT, "mDNS")] {
        if bound_to_port(&sockets, port) {
            wrong.push(format!("something listens on {what}'s port {port}"));
        }
    }
    if let Some(sshd) = ["/usr/sbin/sshd", "/run/current-system/sw/bin/sshd"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    {
        match tokio::process::Command::new(sshd)
            .arg("-T")
            .stdin(std::process::Stdio::null())
            .output()
            .await
        {
            Ok(o) if o.status.success() => {
                let problems = sshd_problems(&String::from_utf8_lossy(&o.stdout));
                if problems.is_empty() {
                    found.push("sshd: keys only, no root, no X11".to_owned());
                }
                wrong.extend(problems);
            }
            Ok(o) => wrong.push(format!(
                "sshd -T: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => wrong.push(format!("cannot run sshd -T: {e}")),
        }
    }
    CheckResult {
        check: "hardening".into(),
        ok: wrong.is_empty(),
        detail: if wrong.is_empty() {
            found.join("; ")
        } else {
            wrong.join("; ")
        },
        ms: 0,
    }
}

/// The UEFI global variables' vendor GUID (SecureBoot, SetupMode).
const EFI_GLOBAL: &str = "8be4df61-93ca-11d2-aa0d-00e098032b8c";

/// Secure Boot as the firmware reports it (`SecureBoot` 1, `SetupMode` 0: keys enrolled
/// and enforced), the kernel's lockdown, which Debian's kernel turns on under it, and
/// the entry systemd-boot started: a signed unified kernel image (`EFI/Linux/*.efi`),
/// not a Type #1 entry from the unsigned ESP that could add an initrd of its own.
pub(crate) fn secure_boot() -> CheckResult {
    let efivar = |name: &str| {
        std::fs::read(format!("/sys/firmware/efi/efivars/{name}-{EFI_GLOBAL}"))
            .ok()
            .and_then(|b| b.get(4).copied())
    };
    let lockdown = std::fs::read_to_string("/sys/kernel/security/lockdown").ok();
    let entry = crate::bootloader::loader_var("LoaderEntrySelected");
    secure_boot_result(
        efivar("SecureBoot"),
        efivar("SetupMode"),
        lockdown.as_deref(),
        entry.as_deref(),
    )
}

/// [`secure_boot`] from the two variables' values, the lockdown file's text and the
/// started entry's name.
fn secure_boot_result(
    secure: Option<u8>,
    setup: Option<u8>,
    lockdown: Option<&str>,
    entry: Option<&str>,
) -> CheckResult {
    let lockdown = lockdown
        .and_then(|l| l.split_whitespace().find(|w| w.starts_with('[')))
        .map(|w| w.trim_matches(|c| c == '[' || c == ']').to_owned());
    let (ok, detail) = match (secure, setup, lockdown.as_deref(), entry) {
        (Some(1), Some(0), Some(mode @ ("integrity" | "confidentiality")), Some(e))
            if e.ends_with(".efi") =>
        {
            (
                true,
                format!(
                    "Secure Boot enforced by the firmware; kernel lockdown {mode}; started the signed {e}"
                ),
            )
        }
        (Some(1), Some(0), Some(mode @ ("integrity" | "confidentiality")), entry) => (
            false,
            format!(
                "Secure Boot enforced (lockdown {mode}), but systemd-boot started {}, not a unified kernel image from EFI/Linux",
                entry.unwrap_or("no entry it names")
            ),
        ),
        (Some(1), Some(0), mode, _) => (
            false,
            format!(
                "Secure Boot enforced by the firmware, but the kernel is not locked down ({})",
                mode.unwrap_or("no /sys/kernel/security/lockdown")
            ),
        ),
        (_, Some(1), _, _) => (
            false,
            "the firmware is still in setup mode: no keys were enrolled".to_owned(),
        ),
        (None, _, _, _) => (
            false,
            "the firmware has no SecureBoot variable (not booted by UEFI with Secure Boot)"
                .to_owned(),
        ),
        (Some(1), None, _, _) => (
            false,
            "the firmware says Secure Boot is on but has no SetupMode variable".to_owned(),
        ),
        _ => (false, "Secure Boot is off".to_owned()),
    };
    CheckResult {
        check: "secure-boot".into(),
        ok,
        detail,
        ms: 0,
    }
}

/// Where the image has systemd-timesyncd: it runs and names the servers it asks, as
/// `timedatectl` hears from it (the default image's test requires EC2's time service
/// first). Whether a server answers is not checked.
async fn time_sync() -> Option<CheckResult> {
    [
        "/usr/lib/systemd/systemd-timesyncd",
        "/run/current-system/systemd/lib/systemd/systemd-timesyncd",
    ]
    .iter()
    .find(|p| Path::new(p).exists())?;
    let start = Instant::now();
    let out = tokio::process::Command::new("timedatectl")
        .args(["show-timesync", "--property=SystemNTPServers", "--value"])
        .stdin(std::process::Stdio::null())
        .output()
        .await;
    let (ok, detail) = match out {
        Ok(o) if o.status.success() => {
            let servers = String::from_utf8_lossy(&o.stdout).trim().to_owned();
            (
                !servers.is_empty(),
                if servers.is_empty() {
                    "systemd-timesyncd has no servers to ask".to_owned()
                } else {
                    format!("systemd-timesyncd asks {servers}")
                },
            )
        }
        Ok(o) => (
            false,
            format!(
                "timedatectl show-timesync: {}{}",
                String::from_utf8_lossy(&o.stderr).trim(),
                journal("systemd-timesyncd.service").await
            ),
        ),
        Err(e) => (false, format!("cannot run timedatectl: {e}")),
    };
    Some(CheckResult {
        check: "time-sync".into(),
        ok,
        detail,
        ms: start.elapsed().as_millis(),
    })
}

/// LLMNR's port (RFC 4795).
const LLMNR_PORT: u16 = 5355;
/// mDNS's port (RFC 6762).
const MDNS_PORT: u16 = 5353;

/// A group's id in group(5) text.
fn group_id(groups: &str, name: &str) -> Option<u32> {
    groups.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&name)).then(|| f.get(2)?.parse().ok())?
    })
}

/// Whether a socket in /proc/net/{tcp,udp}[6] text is bound to `port` locally.
fn bound_to_port(table: &str, port: u16) -> bool {
    let port = format!("{port:04X}");
    table.lines().any(|l| {
        l.split_whitespace()
            .nth(1)
            .and_then(|local| local.rsplit(':').next())
            .is_some_and(|p| p == port)
    })
}

/// What `sshd -T` shows that lets more in than keys for users.
fn sshd_problems(effective: &str) -> Vec<String> {
    [
        ("passwordauthentication", "no"),
        ("kbdinteractiveauthentication", "no"),
        ("permitrootlogin", "no"),
        ("x11forwarding", "no"),
    ]
    .iter()
    .filter_map(|(key, want)| {
        let value = effective.lines().find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == *key).then_some(v.trim())
        });
        (value != Some(want)).then(|| format!("sshd has {key} {}", value.unwrap_or("(unset)")))
    })
    .collect()
}

/// os-release's IMAGE_ID and IMAGE_VERSION (the host compares the version).
fn os_release() -> CheckResult {
    match crate::os_release::image_identity(Path::new(crate::os_release::DEFAULT_PATH)) {
        (Some(id), Some(version)) => CheckResult {
            check: "os-release".into(),
            ok: true,
            detail: format!("{id} {version}"),
            ms: 0,
        },
        _ => CheckResult {
            check: "os-release".into(),
            ok: false,
            detail: format!(
                "{} has no IMAGE_ID or IMAGE_VERSION",
                crate::os_release::DEFAULT_PATH
            ),
            ms: 0,
        },
    }
}

/// The last journal lines of `unit`, as ` — journal: a | b | c`.
async fn journal(unit: &str) -> String {
    let out = tokio::process::Command::new("journalctl")
        .args(["--no-pager", "-o", "cat", "-n", "12", "-u", unit])
        .output()
        .await;
    match out {
        Ok(o) => {
            let text = String::from_utf8_lossy(&o.stdout);
            let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
            format!(" — journal of {unit}: {}", lines.join(" | "))
        }
        Err(e) => format!(" — journalctl: {e}"),
    }
}

/// Wait (bounded) for the boot to finish, then fail if any unit failed, naming them.
async fn system_state() -> CheckResult {
    let start = Instant::now();
    let state = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::process::Command::new("systemctl")
            .args(["is-system-running", "--wait"])
            .output(),
    )
    .await;
    let (ok, detail) = match state {
        Err(_) => (false, "the boot did not finish within 90s".to_owned()),
        Ok(Err(e)) => (false, format!("systemctl: {e}")),
        Ok(Ok(o)) => {
            let state = String::from_utf8_lossy(&o.stdout).trim().to_owned();
            if state == "running" {
                (true, state)
            } else {
                let failed = tokio::process::Command::new("systemctl")
                    .args(["--failed", "--plain", "--no-legend", "--no-pager"])
                    .output()
                    .await
                    .map(|f| String::from_utf8_lossy(&f.stdout).into_owned())
                    .unwrap_or_default();
                let mut detail = format!("{state}; failed units:");
                for unit in failed.lines().filter_map(|l| l.split_whitespace().next()) {
                    detail.push_str(&format!("\n  {unit}{}", journal(unit).await));
                }
                (false, detail)
            }
        }
    };
    CheckResult {
        check: "system-state".into(),
        ok,
        detail,
        ms: start.elapsed().as_millis(),
    }
}

/// What the agent waited for: `systemd-analyze critical-chain` for its unit. Always
/// passes; it is there to explain slow boots.
async fn critical_chain() -> CheckResult {
    let start = Instant::now();
    let out = tokio::process::Command::new("systemd-analyze")
        .args(["critical-chain", "--no-pager", "devos-agent.service"])
        .output()
        .await;
    let detail = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| {
                l.contains(".service")
                    || l.contains(".target")
                    || l.contains(".socket")
                    || l.contains(".mount")
            })
            .map(|l| {
                l.trim_start_matches(|c: char| !c.is_alphanumeric())
                    .to_owned()
            })
            .collect::<Vec<_>>()
            .join(" <- "),
        Ok(o) => format!(
            "systemd-analyze: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => format!("systemd-analyze: {e}"),
    };
    CheckResult {
        check: "critical-chain".into(),
        ok: true,
        detail,
        ms: start.elapsed().as_millis(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn var_fills_the_disk_only_when_partition_and_filesystem_reach_its_end() {
        use super::VarLayout;
        const MIB: u64 = 1 << 20;
        // The default image (2 GiB) booted on a disk 1 GiB larger, grown.
        let grown = VarLayout {
            disk: 3072 * MIB,
            start: 600 * MIB,
            partition: 2471 * MIB,
            filesystem: 2420 * MIB,
        };
        assert!(grown.fills_disk(), "{grown}");
        // The partition left as built: the free GiB after it.
        let not_repartitioned = VarLayout {
            partition: 1447 * MIB,
            filesystem: 1420 * MIB,
            ..grown
        };
        assert!(!not_repartitioned.fills_disk());
        assert!(
            not_repartitioned
                .to_string()
                .contains("(1025 MiB after it)"),
            "{not_repartitioned}"
        );
        // The partition grown, its filesystem not.
        let not_resized = VarLayout {
            filesystem: 1420 * MIB,
            ..grown
        };
        assert!(!not_resized.fills_disk());
    }

    /// The install of the running version counts however its agent spelled the
    /// version; a refused install, another version's, or one without a rollback after
    /// it does not.
    #[test]
    fn the_update_and_the_rollback_are_found_in_the_audit_log() {
        let dir = tempfile::tempdir().unwrap();
        let entry = |seq: u64, event: &str, next: &str, reboot: bool| {
            serde_json::json!({
                "seq": seq, "time": "t", "prev": "p", "event": event, "hash": "h",
                "detail": {"next": next, "reboot": reboot},
            })
            .to_string()
        };
        let check = |lines: &[String]| {
            std::fs::write(dir.path().join("log-000001.jsonl"), lines.join("\n")).unwrap();
            super::update_then_rollback_audited(dir.path(), "0.2.1+abc")
        };
        for spelling in ["0.2.1+abc", "0.2.1_abc"] {
            let lines = [
                entry(1, "update.install", "0.2.1+zzz", false),
                entry(2, "update.install", spelling, true),
                entry(3, "update.rollback", "0.2.0+old", true),
            ];
            check(&lines).unwrap();
            let e = check(&lines[..2]).unwrap_err();
            assert!(e.contains("no update.rollback entry"), "{e}");
        }
        let refused = [
            entry(1, "update.install", "0.2.1+abc", false),
            entry(2, "update.rollback", "0.2.0+old", true),
        ];
        let e = check(&refused).unwrap_err();
        assert!(
            e.contains("no update.install entry that installed 0.2.1+abc"),
            "{e}"
        );
    }

    #[test]
    fn the_root_s_hash_code_is_read_from_the_kernel_s_words() {
        let cpu = "processor\t: 0\nflags\t\t: fpu sse2 ssse3 sse4_1\n";
        let log = "x\ndevice-mapper: verity: sha256 using shash \"sha256-ssse3\"\ny\n";
        let r = super::verity_hash_result(log, cpu).unwrap();
        assert_eq!(r.detail, "dm-verity checks the root with sha256-ssse3");
        let generic = "device-mapper: verity: sha256 using implementation \"sha256-generic\"\n";
        let r = super::verity_hash_result(generic, cpu).unwrap();
        assert!(
            r.detail
                .contains("sha256-generic, although the CPU has SSSE3")
                && r.detail.contains("sha256_ssse3"),
            "{}",
            r.detail
        );
        let old_cpu = "flags\t\t: fpu sse2\n";
        let r = super::verity_hash_result(generic, old_cpu).unwrap();
        assert_eq!(r.detail, "dm-verity checks the root with sha256-generic");
        assert!(super::verity_hash_result("no verity here\n", cpu).is_none());
    }

    #[test]
    fn the_immutable_tree_must_be_read_only_and_unwritable() {
        let debian = super::read_only_result("/", "ro,relatime", "/usr", false);
        assert!(debian.ok, "{}", debian.detail);
        assert_eq!(
            debian.detail,
            "/ mounted ro,relatime; writing to /usr fails"
        );
        let nixos = super::read_only_result("/nix/store", "ro,nosuid,nodev", "/nix/store", false);
        assert!(nixos.ok, "{}", nixos.detail);
        assert!(
            nixos.detail.starts_with("/nix/store mounted ro"),
            "{}",
            nixos.detail
        );
        assert!(!super::read_only_result("/", "rw,relatime", "/usr", false).ok);
        assert!(!super::read_only_result("/", "ro", "/usr", true).ok);
        assert!(!super::read_only_result("/", "", "/usr", false).ok);
    }

    #[test]
    fn secure_boot_is_enforced_only_with_keys_lockdown_and_a_signed_kernel_image() {
        let lockdown = Some("none [integrity] confidentiality\n");
        let uki = Some("devos-debian_0.2.0_x.efi");
        let on = super::secure_boot_result(Some(1), Some(0), lockdown, uki);
        assert!(on.ok, "{}", on.detail);
        assert_eq!(
            on.detail,
            "Secure Boot enforced by the firmware; kernel lockdown integrity; started the signed devos-debian_0.2.0_x.efi"
        );
        let entry = super::secure_boot_result(Some(1), Some(0), lockdown, Some("devos.conf"));
        assert!(!entry.ok && entry.detail.contains("started devos.conf"));
        let open = super::secure_boot_result(Some(1), Some(0), Some("[none] integrity\n"), uki);
        assert!(!open.ok && open.detail.contains("not locked down (none)"));
        assert!(!super::secure_boot_result(Some(0), Some(1), lockdown, uki).ok);
        assert!(!super::secure_boot_result(Some(0), Some(0), lockdown, uki).ok);
        assert!(!super::secure_boot_result(None, None, None, None).ok);
        let no_setup = super::secure_boot_result(Some(1), None, lockdown, uki);
        assert!(!no_setup.ok && no_setup.detail.contains("no SetupMode"));
    }

    #[test]
    fn hardening_reads_groups_sockets_and_sshd_settings() {
        let groups = "root:x:0:\nshadow:x:42:\nsudo:x:27:dev\n";
        assert_eq!(super::group_id(groups, "shadow"), Some(42));
        assert_eq!(super::group_id(groups, "wheel"), None);
        let udp = "  sl  local_address rem_address   st\n\
            \x20 12: 00000000:14EB 00000000:0000 07 00000000:00000000\n";
        assert!(super::bound_to_port(udp, 5355));
        assert!(!super::bound_to_port(udp, 22));
        let udp6 = "   0: 00000000000000000000000000000000:14EB 00000000000000000000000000000000:0000 07\n";
        assert!(super::bound_to_port(udp6, 5355));
        assert!(!super::bound_to_port("  sl  local_address\n", 5355));
        let good = "port 22\npasswordauthentication no\nkbdinteractiveauthentication no\npermitrootlogin no\nx11forwarding no\n";
        assert!(super::sshd_problems(good).is_empty());
        let debian = "passwordauthentication yes\nkbdinteractiveauthentication no\npermitrootlogin without-password\nx11forwarding yes\n";
        assert_eq!(
            super::sshd_problems(debian),
            [
                "sshd has passwordauthentication yes",
                "sshd has permitrootlogin without-password",
                "sshd has x11forwarding yes"
            ]
        );
    }

    #[test]
    fn sudo_without_a_password_is_expected_of_the_users_the_builder_named() {
        let sudoers = "%sudo\tALL=(ALL:ALL) ALL\n@includedir /etc/sudoers.d\n\
            # the spec's users\ndev ALL=(ALL:ALL) NOPASSWD: ALL\n";
        assert!(super::sudo_rule_applies(sudoers, "dev"));
        assert!(!super::sudo_rule_applies(sudoers, "ops"));
        assert!(!super::sudo_rule_applies(sudoers, "de"));
        assert!(!super::sudo_rule_applies(sudoers, "sudo"));
    }

    #[test]
    fn boot_split_reads_like_systemd_analyze() {
        let line = super::boot_split(7_000_000, 2_000_000, 3_000_000, 8_000_000, 20_000_000);
        assert_eq!(
            line,
            "firmware=5.0s loader=2.0s kernel=3.0s initrd=5.0s userspace=12.0s total=27.0s"
        );
    }
}
