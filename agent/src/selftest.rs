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
