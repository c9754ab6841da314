//! Memory and task limits per action, through cgroup v2 — where the agent has a
//! delegated cgroup of its own (systemd's `Delegate=yes`). The daemon moves itself to
//! a `daemon` leaf (cgroup v2 keeps processes out of inner nodes), enables the memory
//! and pids controllers for its children, and gives each action a cgroup with
//! `memory.max`, `memory.swap.max` and `pids.max`; the action's end kills what is
//! left in it (`cgroup.kill`). Without such a cgroup (no systemd, cgroup v1) actions
//! keep their rlimits and namespaces, and the record says there were no cgroup
//! limits.

use std::path::{Path, PathBuf};

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Why the agent has no cgroup to give actions, or an action gets none.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("not on cgroup v2")]
    NotV2,
    #[error("cgroup v2 is not mounted at /sys/fs/cgroup")]
    NotMounted,
    #[error("the agent runs in the root cgroup (no delegated cgroup)")]
    RootCgroup,
    #[error("the {controller} controller is not delegated to {base}")]
    NotDelegated {
        controller: &'static str,
        base: PathBuf,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The agent's delegated cgroup.
#[derive(Debug, Clone)]
pub struct Cgroups {
    base: PathBuf,
}

impl Cgroups {
    /// Take over our own cgroup when it is a cgroup v2 directory we can manage, with
    /// the memory and pids controllers available.
    pub fn setup() -> Result<Cgroups, CgroupError> {
        let own_path = Path::new("/proc/self/cgroup");
        let own = std::fs::read_to_string(own_path).map_err(io(own_path))?;
        let path = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or(CgroupError::NotV2)?;
        if !Path::new(CGROUP_ROOT).join("cgroup.controllers").exists() {
            return Err(CgroupError::NotMounted);
        }
        let base = Path::new(CGROUP_ROOT).join(path.trim_start_matches('/'));
        if path == "/" {
            return Err(CgroupError::RootCgroup);
        }
        let controllers =
            std::fs::read_to_string(base.join("cgroup.controllers")).map_err(io(&base))?;
        for controller in ["memory", "pids"] {
            if !controllers.split_whitespace().any(|x| x == controller) {
                return Err(CgroupError::NotDelegated { controller, base });
            }
        }
        let daemon = base.join("daemon");
        std::fs::create_dir_all(&daemon).map_err(io(&daemon))?;
        write(
            &daemon.join("cgroup.procs"),
            &std::process::id().to_string(),
        )?;
        write(&base.join("cgroup.subtree_control"), "+memory +pids")?;
        Ok(Cgroups { base })
    }

    /// A cgroup for one action, with its limits.
    pub fn action(&self, name: &str, memory_mib: u64, tasks: u64) -> Result<PathBuf, CgroupError> {
        let dir = self.base.join(name);
        std::fs::create_dir(&dir).map_err(io(&dir))?;
        write(
            &dir.join("memory.max"),
            &(memory_mib * 1024 * 1024).to_string(),
        )?;
        // Absent where the kernel does not account swap; memory.max holds either way.
        let _ = write(&dir.join("memory.swap.max"), "0");
        write(&dir.join("pids.max"), &tasks.to_string())?;
        Ok(dir)
    }
}

/// Put the calling process into `cgroup` (before it execs the action).
pub fn join(cgroup: &Path) -> Result<(), CgroupError> {
    write(&cgroup.join("cgroup.procs"), "0")
}

/// Kill whatever is left in an action's cgroup and remove it.
pub fn remove(cgroup: &Path) {
    // (Before Linux 5.14 there is no cgroup.kill: the action's PID namespace has ended
    // its processes already. Whether the cgroup could go is what is logged below.)
    let _ = std::fs::write(cgroup.join("cgroup.kill"), "1");
    for _ in 0..50 {
        if std::fs::remove_dir(cgroup).is_ok() || !cgroup.exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    tracing::warn!(cgroup = %cgroup.display(), "could not remove an action's cgroup");
}

/// The limits of an action's cgroup, for the record.
pub fn describe(cgroup: &Path) -> String {
    let read = |f: &str| {
        std::fs::read_to_string(cgroup.join(f))
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "?".into())
    };
    format!(
        "memory.max={} pids.max={}",
        read("memory.max"),
        read("pids.max")
    )
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(io(path))
}
