//! The guest side of the boot test: checks run inside a booted image, reported as JSON
//! lines to the host. Started by `devos-selftest.service` only when the host passes the
//! `devos.selftest` credential, so the runner ships in every image and stays off in
//! production.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::service::Agent1Proxy;

/// One result line. The host parses these; keep the field names stable.
#[derive(Debug, Serialize)]
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
    let mut all_ok = true;
    let mut emit = |r: CheckResult| -> anyhow::Result<()> {
        all_ok &= r.ok;
        let line = serde_json::to_string(&r)?;
        println!("{line}");
        writeln!(out, "{line}")?;
        out.flush()?;
        Ok(())
    };

    let conn = timed("system-bus", zbus::Connection::system()).await;
    emit(conn.result(|_| "connected".to_owned()))?;
    if let Ok(conn) = conn.value {
        match Agent1Proxy::new(&conn).await {
            Ok(agent) => {
                emit(
                    timed("agent-ping", agent.ping())
                        .await
                        .result(|p| p.clone()),
                )?;
                emit(
                    timed("agent-version", agent.version())
                        .await
                        .result(|v| v.clone()),
                )?;
            }
            Err(e) => emit(CheckResult {
                check: "agent-ping".into(),
                ok: false,
                detail: e.to_string(),
                ms: 0,
            })?,
        }
    }

    // Taken now: the agent has answered.
    if let Ok(conn) = zbus::Connection::system().await {
        emit(boot_time(&conn).await)?;
    }
    emit(system_state().await)?;
    emit(critical_chain().await)?;

    let done = serde_json::to_string(&Done {
        done: true,
        ok: all_ok,
    })?;
    println!("{done}");
    writeln!(out, "{done}")?;
    out.flush()?;
    Ok(all_ok)
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

/// Where the boot's time went, as `systemd-analyze time` splits it, up to now (the
/// agent has answered): firmware, loader, kernel, initrd, userspace.
async fn boot_time(conn: &zbus::Connection) -> CheckResult {
    let start = Instant::now();
    let result = async {
        let manager = zbus::Proxy::new(
            conn,
            "org.freedesktop.systemd1",
            "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager",
        )
        .await?;
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
                    .map(|f| {
                        String::from_utf8_lossy(&f.stdout)
                            .trim()
                            .replace('\n', "; ")
                    })
                    .unwrap_or_default();
                (false, format!("{state}; failed units: {failed}"))
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
    fn boot_split_reads_like_systemd_analyze() {
        let line = super::boot_split(7_000_000, 2_000_000, 3_000_000, 8_000_000, 20_000_000);
        assert_eq!(
            line,
            "firmware=5.0s loader=2.0s kernel=3.0s initrd=5.0s userspace=12.0s total=27.0s"
        );
    }
}
