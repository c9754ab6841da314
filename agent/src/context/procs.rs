//! Processes from /proc, sampled when asked (nothing polls in the background): a
//! user's own (root: everyone's), with the project each works in.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Processes listed at most.
pub const MAX_LISTED: usize = 50;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Process {
    pub pid: u32,
    pub uid: u32,
    pub command: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<PathBuf>,
    /// The registered project its working directory is in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<PathBuf>,
    /// CPU use over the sampling interval (over its whole life without one), percent
    /// of one CPU.
    pub cpu_percent: f64,
    pub rss_kib: u64,
    /// Seconds since the epoch.
    pub started: i64,
}

/// What one read of /proc/PID/stat says.
struct Stat {
    busy_ticks: u64,
    start_ticks: u64,
}

fn ticks_per_sec() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64
}

fn boot_time() -> i64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .collect()
}

fn owner_and_rss(pid: u32) -> Option<(u32, u64, String)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    let uid = field("Uid:")?.split_whitespace().next()?.parse().ok()?;
    let rss = field("VmRSS:")
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    Some((uid, rss, field("Name:").unwrap_or("?").to_owned()))
}

fn stat(pid: u32) -> Option<Stat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces:
    // utime, stime and starttime are fields 14, 15 and 22 of stat (11, 12, 19 here).
    let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let num = |i: usize| rest.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Some(Stat {
        busy_ticks: num(11) + num(12),
        start_ticks: num(19),
    })
}

/// The processes of `uid` (every process for root), busiest first. With an
/// `interval`, CPU use is measured over it (two reads of /proc); without, it is the
/// average over each process's life, as `ps` shows it.
pub fn list(uid: u32, projects: &[PathBuf], interval: Option<Duration>) -> Vec<Process> {
    let ticks = ticks_per_sec();
    let boot = boot_time();
    let mine: Vec<(u32, u32, u64, String)> = pids()
        .into_iter()
        .filter_map(|pid| {
            let (owner, rss, name) = owner_and_rss(pid)?;
            (uid == 0 || owner == uid).then_some((pid, owner, rss, name))
        })
        .collect();
    let first: HashMap<u32, Stat> = mine
        .iter()
        .filter_map(|(pid, ..)| Some((*pid, stat(*pid)?)))
        .collect();
    let started = Instant::now();
    if let Some(i) = interval {
        std::thread::sleep(i);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let mut list: Vec<Process> = mine
        .into_iter()
        .filter_map(|(pid, owner, rss, name)| {
            let before = first.get(&pid)?;
            let now = stat(pid)?;
            let cpu = match interval {
                Some(_) if elapsed > 0.0 => {
                    now.busy_ticks.saturating_sub(before.busy_ticks) as f64 / ticks / elapsed
                }
                _ => {
                    let age = uptime - now.start_ticks as f64 / ticks;
                    if age > 0.0 {
                        now.busy_ticks as f64 / ticks / age
                    } else {
                        0.0
                    }
                }
            };
            let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok();
            let project = cwd.as_deref().and_then(|c| project_of(c, projects));
            Some(Process {
                pid,
                uid: owner,
                command: command(pid, &name),
                cwd,
                project,
                cpu_percent: (cpu * 1000.0).round() / 10.0,
                rss_kib: rss,
                started: boot + (now.start_ticks as f64 / ticks) as i64,
            })
        })
        .collect();
    list.sort_by(|a, b| {
        b.cpu_percent
            .total_cmp(&a.cpu_percent)
            .then(b.rss_kib.cmp(&a.rss_kib))
    });
    list
}

fn command(pid: u32, name: &str) -> String {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let mut command = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    if command.trim().is_empty() {
        command = format!("[{name}]");
    }
    let end = command.trim_end().len();
    command.truncate(end);
    command.truncate(crate::executor::head(&command, 200).len());
    command
}

/// The project (the deepest registered root) `dir` is in.
pub fn project_of(dir: &Path, projects: &[PathBuf]) -> Option<PathBuf> {
    projects
        .iter()
        .filter(|root| dir.starts_with(root))
        .max_by_key(|root| root.as_os_str().len())
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_among_its_users_processes_with_its_project() {
        let me = nix::unistd::getuid().as_raw();
        let cwd = std::env::current_dir().unwrap();
        let list = list(
            me,
            std::slice::from_ref(&cwd),
            Some(Duration::from_millis(20)),
        );
        let this = list
            .iter()
            .find(|p| p.pid == std::process::id())
            .expect("this process is listed");
        assert_eq!(this.project.as_deref(), Some(cwd.as_path()));
        assert!(this.rss_kib > 0);
        assert!(list.iter().all(|p| me == 0 || p.uid == me));
    }

    #[test]
    fn the_deepest_project_wins() {
        let roots = [PathBuf::from("/a"), PathBuf::from("/a/b")];
        assert_eq!(
            project_of(Path::new("/a/b/c"), &roots),
            Some(PathBuf::from("/a/b"))
        );
        assert_eq!(project_of(Path::new("/ab"), &roots), None);
    }
}
