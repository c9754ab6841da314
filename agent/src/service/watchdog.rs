//! systemd's watchdog (`WatchdogSec=` in the unit): the agent tells it every half
//! interval that it still runs, from a task on the same runtime the bus is served
//! on. An agent whose runtime threads all hang stops telling, and systemd restarts
//! it (`Restart=on-failure`) instead of leaving every caller without an answer.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

/// Feed the watchdog for as long as the runtime runs, if systemd asked for it (for
/// this process: `WATCHDOG_PID`, when set, names it).
pub(super) async fn feed() {
    let env = |name| std::env::var(name).ok();
    let Some(usec) = env("WATCHDOG_USEC").and_then(|v| v.parse::<u64>().ok()) else {
        return;
    };
    let ours = env("WATCHDOG_PID")
        .and_then(|p| p.parse::<u32>().ok())
        .is_none_or(|p| p == std::process::id());
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET").filter(|_| ours && usec > 0) else {
        return;
    };
    let every = Duration::from_micros(usec / 2);
    loop {
        if let Err(e) = notify(&socket, "WATCHDOG=1") {
            tracing::warn!("cannot tell systemd's watchdog the agent runs: {e}");
        }
        tokio::time::sleep(every).await;
    }
}

/// Send `state` to the notification socket `socket` (a path, or `@` and an abstract
/// name).
fn notify(socket: &OsStr, state: &str) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let addr = match socket.as_bytes().strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(Path::new(socket))?,
    };
    UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};

    #[test]
    fn the_watchdog_is_told_on_a_path_or_an_abstract_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let systemd = UnixDatagram::bind(&path).unwrap();
        notify(path.as_os_str(), "WATCHDOG=1").unwrap();
        let mut buf = [0u8; 64];
        let n = systemd.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");

        let name = format!("devos-test-notify-{}", std::process::id());
        let systemd =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        notify(OsStr::new(&format!("@{name}")), "WATCHDOG=1").unwrap();
        let n = systemd.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");
    }
}
