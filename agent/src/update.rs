//! `devos update`: move this machine to the newest version in its image's update feed,
//! or back to the version it ran before. systemd-sysupdate does the update (it checks
//! the feed's signature and every file's hash, writes the inactive root slot and
//! installs the new unified kernel image with boot tries); systemd-boot's default
//! entry (bootctl) does the rollback. Both take effect at the next boot.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::bootloader::{self, Entry, version_cmp};

/// `[update]` of agent.toml: the programs `devos update` runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct UpdateConfig {
    /// systemd-sysupdate (in images whose spec has `[update]`).
    pub sysupdate: PathBuf,
    /// bootctl, which sets the boot loader's default entry for a rollback.
    pub bootctl: PathBuf,
    /// The ESP's kernel images (`EFI/Linux` where systemd mounts the ESP).
    pub kernel_images: PathBuf,
    /// The command that runs those programs: by default a transient unit of systemd's
    /// (`systemd-run --wait --pipe`), outside the agent's own unit, whose sandbox has
    /// no block devices and a read-only /sys; empty: run them directly.
    pub launcher: Vec<String>,
    /// The command that reboots the machine into the version an in-place fleet
    /// rollout installed (run through `launcher`).
    pub reboot: Vec<String>,
    /// How often the agent of an EC2 instance reads its instance's tags for an
    /// in-place fleet rollout (`devos:update-to`), in seconds.
    pub fleet_poll_seconds: u64,
}

impl Default for UpdateConfig {
    fn default() -> Self {
        Self {
            sysupdate: PathBuf::from("/usr/lib/systemd/systemd-sysupdate"),
            bootctl: PathBuf::from("/usr/bin/bootctl"),
            kernel_images: PathBuf::from("/efi/EFI/Linux"),
            launcher: [
                "/usr/bin/systemd-run",
                "--wait",
                "--pipe",
                "--quiet",
                "--collect",
                // One at a time: a second install (the agent restarted while one ran)
                // fails to start instead of writing the same slot.
                "--unit=devos-update",
                "--property=Description=DevOS update (devos update)",
                "--",
            ]
            .map(String::from)
            .to_vec(),
            reboot: ["/usr/bin/systemctl", "reboot"].map(String::from).to_vec(),
            fleet_poll_seconds: 60,
        }
    }
}

/// What `Update` was asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpdateAction {
    /// Say whether the feed has a newer version; change nothing.
    Check,
    /// Install the newest version into the other slot.
    Install,
    /// Boot the version installed before this one from now on.
    Rollback,
}

impl UpdateAction {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "check" => Some(Self::Check),
            "install" => Some(Self::Install),
            "rollback" => Some(Self::Rollback),
            _ => None,
        }
    }
}

/// What happened, as `devos update` prints it and the audit log keeps it.
#[derive(Debug, Clone, Serialize)]
pub struct UpdateOutcome {
    pub action: UpdateAction,
    /// The version running now (os-release `IMAGE_VERSION`).
    pub running: Option<String>,
    /// The version the next boot starts, when it changes; for `check`, the newer
    /// version the feed offers.
    pub next: Option<String>,
    /// Whether a reboot is needed for `next` to run.
    pub reboot: bool,
    /// In words.
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error(
        "this image cannot update itself: {0} is missing (only images built with `[update]` in their spec carry systemd-sysupdate)"
    )]
    NotUpdatable(PathBuf),
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
    #[error("{program} failed ({status}): {output}")]
    Failed {
        program: PathBuf,
        status: std::process::ExitStatus,
        output: String,
    },
    #[error("another update is running ({0}); try again when it is done")]
    Busy(String),
    #[error("{0}")]
    NoRollback(String),
    #[error("{0}")]
    Misconfigured(String),
}

/// How often a launch is tried while the launcher's unit name is taken, a second apart:
/// the unit of the previous step is unloaded just after it ends, and an install that
/// really runs takes far longer.
const BUSY_TRIES: u32 = 5;

/// What a program run through the launcher did.
struct Ran {
    status: std::process::ExitStatus,
    stdout: String,
    /// Its stdout and stderr together, the last 4 KiB: what it said, for errors.
    output: String,
}

/// Run `program args` through `launcher`. The launcher's unit has one name, taken
/// while another update runs: then [`UpdateError::Busy`].
fn run(launcher: &[String], program: &Path, args: &[&str]) -> Result<Ran, UpdateError> {
    let mut tries = 1;
    loop {
        let ran = run_once(launcher, program, args)?;
        if ran.status.success() || !busy(launcher, &ran.output) {
            return Ok(ran);
        }
        if tries == BUSY_TRIES {
            return Err(UpdateError::Busy(ran.output));
        }
        tries += 1;
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

/// Whether `output` of a launch says the launcher's unit is taken by another update.
fn busy(launcher: &[String], output: &str) -> bool {
    !launcher.is_empty() && output.contains("already loaded")
}

fn run_once(launcher: &[String], program: &Path, args: &[&str]) -> Result<Ran, UpdateError> {
    let mut command = match launcher.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(program);
            c
        }
        None => Command::new(program),
    };
    let out = command
        .args(args)
        .env("SYSTEMD_COLORS", "0")
        .env("SYSTEMD_PAGER", "")
        .output()
        .map_err(|source| UpdateError::Spawn {
            program: program.to_owned(),
            source,
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut text = stdout.clone();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    let text = text.trim();
    let tail = match text.char_indices().rev().nth(4095) {
        Some((i, _)) => &text[i..],
        None => text,
    };
    Ok(Ran {
        status: out.status,
        stdout,
        output: tail.to_owned(),
    })
}

/// Run `program args` through `launcher`; what it said if it succeeded.
fn run_ok(launcher: &[String], program: &Path, args: &[&str]) -> Result<Ran, UpdateError> {
    let ran = run(launcher, program, args)?;
    if !ran.status.success() {
        return Err(UpdateError::Failed {
            program: program.to_owned(),
            status: ran.status,
            output: ran.output,
        });
    }
    Ok(ran)
}

/// The newer version the feed offers, in systemd-sysupdate's spelling, or None when it
/// offers nothing newer than what is installed. Only systemd-sysupdate's JSON answer
/// `{"available": null}` says "nothing newer": a feed it cannot reach, one whose
/// signature or sums are wrong, fails the check with what went wrong. (A
/// systemd-sysupdate before 257 ignores `--json` here and prints the newer version
/// alone: taken as such. When nothing is newer it fails silently, as it does for a
/// broken feed: an error then too, never "newest".)
fn check_new(config: &UpdateConfig) -> Result<Option<String>, UpdateError> {
    let ran = run_ok(
        &config.launcher,
        &config.sysupdate,
        &["check-new", "--json=short"],
    )?;
    let answer = ran.stdout.trim();
    let unexpected = || UpdateError::Failed {
        program: config.sysupdate.clone(),
        status: ran.status,
        output: format!(
            "its answer is neither `{{\"available\": VERSION|null}}` nor a version: {}",
            ran.output
        ),
    };
    match serde_json::from_str::<serde_json::Value>(answer) {
        Ok(serde_json::Value::Object(o)) => match o.get("available") {
            Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(v)) if is_version(v) => Ok(Some(v.clone())),
            _ => Err(unexpected()),
        },
        _ if is_version(answer) => Ok(Some(answer.to_owned())),
        _ => Err(unexpected()),
    }
}

/// Whether `v` can be a version systemd-sysupdate offers: one word, starting with a
/// digit (DevOS versions are semantic versions).
fn is_version(v: &str) -> bool {
    v.starts_with(|c: char| c.is_ascii_digit())
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-+~^".contains(c))
}

/// The version as systemd-sysupdate and the boot loader name it (`+` as `_`).
pub(crate) fn sysupdate_version(version: &str) -> String {
    version.replace('+', "_")
}

/// A version in systemd-sysupdate's spelling as everything else writes it: the inverse
/// of [`sysupdate_version`] (a DevOS version has at most one `+`, and no `_`).
fn builder_version(sysupdate_version: &str) -> String {
    sysupdate_version.replacen('_', "+", 1)
}

/// Do `action`. `running` is this machine's `IMAGE_VERSION`, `image` its `IMAGE_ID`.
pub fn apply(
    config: &UpdateConfig,
    action: UpdateAction,
    image: Option<&str>,
    running: Option<&str>,
) -> Result<UpdateOutcome, UpdateError> {
    if action != UpdateAction::Rollback && !config.sysupdate.exists() {
        return Err(UpdateError::NotUpdatable(config.sysupdate.clone()));
    }
    let outcome = |next: Option<String>, reboot, message: String| UpdateOutcome {
        action,
        running: running.map(str::to_owned),
        next,
        reboot,
        message,
    };
    match action {
        UpdateAction::Check => match check_new(config)? {
            Some(version) => {
                let version = builder_version(&version);
                Ok(outcome(
                    Some(version.clone()),
                    false,
                    format!("{version} is available: `devos update` installs it"),
                ))
            }
            None => Ok(outcome(None, false, up_to_date(config, image, running))),
        },
        UpdateAction::Install => {
            let Some(version) = check_new(config)? else {
                return Ok(outcome(None, false, up_to_date(config, image, running)));
            };
            // The version just offered, by name: what a fleet's `move_to` asks for too.
            run_ok(&config.launcher, &config.sysupdate, &["update", &version])?;
            // A rollback chose a default entry; the new version must be the one that boots.
            if config.bootctl.exists() {
                run_ok(&config.launcher, &config.bootctl, &["set-default", ""])?;
            }
            let version = builder_version(&version);
            Ok(outcome(
                Some(version.clone()),
                true,
                format!(
                    "{version} is installed in the other slot and boots next (three tries; if it does not come up healthy the machine goes back to this version by itself): reboot to start it"
                ),
            ))
        }
        UpdateAction::Rollback => rollback(config, image, running).map(|(entry, version)| {
            let version = builder_version(&version);
            outcome(
                Some(version.clone()),
                true,
                format!("the next boot starts {version} ({entry}): reboot to go back to it"),
            )
        }),
    }
}

/// Make `target` the version the next boot starts (an in-place fleet rollout, or
/// its rollback): the boot loader's default when that version is installed in the
/// other slot and can still boot, else systemd-sysupdate installs it there from the
/// feed (with boot tries). What was done, in words.
pub fn move_to(
    config: &UpdateConfig,
    image: Option<&str>,
    running: Option<&str>,
    target: &str,
) -> Result<String, UpdateError> {
    let wanted = sysupdate_version(target);
    if let (Some(image), Some(running)) = (image, running)
        && config.kernel_images.is_dir()
        && let Some(other) = other_versions(config, image, running)?
            .into_iter()
            .find(|o| o.version == wanted)
    {
        run_ok(
            &config.launcher,
            &config.bootctl,
            &["set-default", &other.file],
        )?;
        return Ok(format!(
            "{target} is installed in the other slot ({}) and boots next",
            other.file
        ));
    }
    if !config.sysupdate.exists() {
        return Err(UpdateError::NotUpdatable(config.sysupdate.clone()));
    }
    run_ok(&config.launcher, &config.sysupdate, &["update", &wanted])?;
    if config.bootctl.exists() {
        run_ok(&config.launcher, &config.bootctl, &["set-default", ""])?;
    }
    Ok(format!(
        "{target} is installed in the other slot and boots next (three tries)"
    ))
}

/// Point the boot loader at the running version again, after a move that is no longer
/// wanted (`bootctl set-default @current`).
pub fn stay(config: &UpdateConfig) -> Result<(), UpdateError> {
    run_ok(
        &config.launcher,
        &config.bootctl,
        &["set-default", "@current"],
    )
    .map(|_| ())
}

/// Reboot the machine (`reboot` of the configuration, through its launcher).
pub fn reboot(config: &UpdateConfig) -> Result<(), UpdateError> {
    let Some((program, args)) = config.reboot.split_first() else {
        return Err(UpdateError::Misconfigured(
            "[update] reboot is empty: nothing reboots the machine".into(),
        ));
    };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_ok(&config.launcher, Path::new(program), &args).map(|_| ())
}

/// Where systemd-sysupdate reads transfer files, the first place first (a file there
/// takes the place of one of the same name further down).
pub const TRANSFER_DIRS: [&str; 4] = [
    "/etc/sysupdate.d",
    "/run/sysupdate.d",
    "/usr/local/lib/sysupdate.d",
    "/usr/lib/sysupdate.d",
];

/// The feed this machine updates from: the `Path=` URL of the first transfer (by
/// name) whose source is a URL, read as systemd-sysupdate reads it (the file of that
/// name in the first of `dirs` that has one, then its drop-ins `NAME.transfer.d/*.conf`
/// in name order; the last value of a key wins), without any user name or password
/// in it (anyone may ask `Status`). None when it has no such transfers.
pub fn feed(dirs: &[&Path]) -> Option<String> {
    let files = |suffix: &str, sub: Option<&std::ffi::OsStr>| {
        let mut found: Vec<(std::ffi::OsString, PathBuf)> = Vec::new();
        for dir in dirs {
            let dir = match sub {
                Some(sub) => dir.join(sub),
                None => dir.to_path_buf(),
            };
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let name = entry.file_name();
                if name.to_string_lossy().ends_with(suffix)
                    && !found.iter().any(|(n, _)| *n == name)
                {
                    found.push((name, entry.path()));
                }
            }
        }
        found.sort();
        found
    };
    files(".transfer", None)
        .into_iter()
        .find_map(|(name, path)| {
            let mut drop_in = name.clone();
            drop_in.push(".d");
            let texts = std::iter::once(path)
                .chain(files(".conf", Some(&drop_in)).into_iter().map(|(_, p)| p))
                .filter_map(|p| std::fs::read(p).ok())
                .map(|bytes| String::from_utf8_lossy(&bytes).into_owned());
            let (mut kind, mut url) = (None, None);
            for text in texts {
                let mut section = String::new();
                for line in text.lines().map(str::trim) {
                    if line.is_empty() || line.starts_with(['#', ';']) {
                        continue;
                    }
                    if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                        section = name.to_owned();
                    } else if let (Some((key, value)), "Source") =
                        (line.split_once('='), section.as_str())
                    {
                        match key.trim() {
                            "Type" => kind = Some(value.trim().to_owned()),
                            "Path" => url = Some(value.trim().to_owned()),
                            _ => {}
                        }
                    }
                }
            }
            // (The builder writes a `%` of the URL as `%%`, systemd's specifier escape.)
            let url = url?;
            kind?
                .starts_with("url-")
                .then(|| without_user(&url.replace("%%", "%")))
        })
}

/// `url` without the `user:password@` part of its authority.
fn without_user(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..end].rsplit_once('@') {
        Some((_, host)) => format!("{scheme}://{host}{}", &rest[end..]),
        None => url.to_owned(),
    }
}

/// What `devos status` says about updates: the feed, the version this boot started
/// and how it stands, what the next boot starts and why, the other installed
/// versions. Only the feed when systemd-boot did not start this machine from one of
/// `image`'s kernel images.
pub fn status(
    config: &UpdateConfig,
    image: Option<&str>,
    running: Option<&str>,
    loader: &bootloader::LoaderState,
    feed: Option<String>,
) -> serde_json::Map<String, serde_json::Value> {
    let mut out = serde_json::Map::new();
    out.insert("update-feed".into(), feed.into());
    let (Some(image), Some(running)) = (image, running) else {
        return out;
    };
    let entries = bootloader::entries(&config.kernel_images, image).unwrap_or_default();
    let this = sysupdate_version(running);
    let Some(current) = entries.iter().find(|e| e.version == this) else {
        return out;
    };
    let others_can_boot = entries.iter().any(|e| e.version != this && !e.failed());
    let booted = match current.tries {
        None => format!("{running}: good"),
        Some((0, done)) if loader.counted_name() == Some(current.file.as_str()) => format!(
            "{running}: on its last try ({}), not marked good yet: if its health checks fail, {}",
            ordinal(done),
            if others_can_boot {
                "the next boot starts another version"
            } else {
                "no other version is left to go back to"
            }
        ),
        Some((0, _)) => format!(
            "{running}: marked bad (it did not come up healthy){}",
            if others_can_boot {
                ": the next boot starts another version"
            } else {
                ", but no other version is left to go back to"
            }
        ),
        Some((left, 0)) => format!(
            "{running}: on trial, not counted this boot, not marked good ({} left)",
            tries(left)
        ),
        Some((left, done)) => format!(
            "{running}: on trial, try {} of {}: marked good once the agent's health checks pass",
            done,
            u64::from(left) + u64::from(done)
        ),
    };
    out.insert("booted".into(), booted.into());
    let next = match bootloader::next_boot(&entries, loader) {
        Some(bootloader::NextBoot::Entry(next, why)) if next.version == this => {
            Some(format!("{running} again: {why}"))
        }
        Some(bootloader::NextBoot::Entry(next, why)) => Some(format!(
            "{} ({}): {why}",
            builder_version(&next.version),
            entry_state(next)
        )),
        Some(bootloader::NextBoot::Other(id, why)) => Some(format!(
            "`{id}`, which names none of this image's kernel images: {why}"
        )),
        None => None,
    };
    if let Some(next) = next {
        out.insert("next-boot".into(), next.into());
    }
    let others: Vec<String> = entries
        .iter()
        .filter(|e| e.version != this)
        .map(|e| format!("{} ({})", builder_version(&e.version), entry_state(e)))
        .collect();
    out.insert(
        "other-versions".into(),
        if others.is_empty() {
            "none: the other slot is empty".to_owned()
        } else {
            others.join("; ")
        }
        .into(),
    );
    out
}

/// A version's state in words, from its kernel image's tries.
fn entry_state(e: &Entry) -> String {
    match e.tries {
        None => "good".into(),
        Some((0, done)) => format!("failed: {} used up", tries(done)),
        Some((left, 0)) => format!("installed, not booted yet: {}", tries(left)),
        Some((left, done)) => format!("on trial: {} done, {left} left", tries(done)),
    }
}

/// `n tries`, or `1 try`.
fn tries(n: u32) -> String {
    match n {
        1 => "1 try".into(),
        n => format!("{n} tries"),
    }
}

/// `1st`, `2nd`, `3rd`, `4th` … try.
fn ordinal(n: u32) -> String {
    let suffix = match (n % 10, n % 100) {
        (1, x) if x != 11 => "st",
        (2, x) if x != 12 => "nd",
        (3, x) if x != 13 => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

/// What `check` and `install` say when the feed has nothing newer than what is
/// installed. After a rollback the newest installed version is not the running one, and
/// systemd-sysupdate does not install it again: say so, and how to boot it.
fn up_to_date(config: &UpdateConfig, image: Option<&str>, running: Option<&str>) -> String {
    let newer = match (image, running) {
        (Some(image), Some(running)) => {
            let running_version = sysupdate_version(running);
            other_versions(config, image, running)
                .unwrap_or_default()
                .into_iter()
                .find(|o| version_cmp(&o.version, &running_version).is_gt())
        }
        _ => None,
    };
    match newer {
        Some(o) if o.untried() => format!(
            "{} is installed and boots next (its first try): reboot to start it",
            builder_version(&o.version)
        ),
        Some(o) => format!(
            "the feed has nothing newer than what is installed, but this machine went back from {}, which is still installed: `devos update --rollback` boots it again",
            builder_version(&o.version)
        ),
        None => "this machine runs the newest version".into(),
    }
}

/// The other installed kernel images of `image` that can still boot, newest first.
fn other_versions(
    config: &UpdateConfig,
    image: &str,
    running: &str,
) -> Result<Vec<Entry>, UpdateError> {
    let running = sysupdate_version(running);
    let entries = bootloader::entries(&config.kernel_images, image).map_err(|e| {
        UpdateError::NoRollback(format!(
            "cannot list {}: {e}",
            config.kernel_images.display()
        ))
    })?;
    // One whose tries are used up failed to boot and is no place to go back to.
    Ok(entries
        .into_iter()
        .filter(|e| e.version != running && !e.failed())
        .collect())
}

/// Make the newest other installed kernel image of this image the boot loader's
/// default: (its file name, its version).
fn rollback(
    config: &UpdateConfig,
    image: Option<&str>,
    running: Option<&str>,
) -> Result<(String, String), UpdateError> {
    let (Some(image), Some(running)) = (image, running) else {
        return Err(UpdateError::NoRollback(
            "os-release has no IMAGE_ID and IMAGE_VERSION: this is not a DevOS image".into(),
        ));
    };
    let Some(Entry {
        file: entry,
        version,
        ..
    }) = other_versions(config, image, running)?.into_iter().next()
    else {
        return Err(UpdateError::NoRollback(format!(
            "no other version of {image} is installed in {}: nothing to go back to",
            config.kernel_images.display()
        )));
    };
    run_ok(&config.launcher, &config.bootctl, &["set-default", &entry])?;
    Ok((entry, version))
}

/// How often the agent's unit may have been restarted during a boot before the check
/// gives up at once: a healthy agent does not crash on start, and a version on trial
/// whose agent keeps crashing should use up its try now, not after the whole wait.
const AGENT_RESTARTS_TOLERATED: u32 = 2;

/// Wait until the agent answers on the system bus and its audit log verifies, at most
/// `wait`; the last reason it did not, after that — or at once when the agent's unit
/// has failed or keeps being restarted.
pub async fn boot_check(wait: std::time::Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if let Some(broken) = agent_unit_broken().await {
            anyhow::bail!("{broken}");
        }
        let attempt = async {
            let conn = zbus::Connection::system().await?;
            let agent = crate::client::Agent1Proxy::new(&conn).await?;
            agent.ping().await?;
            let report: serde_json::Value =
                serde_json::from_str(&agent.verify_audit_since_last().await?)?;
            if report["ok"] != true {
                anyhow::bail!("the audit log does not verify: {report}");
            }
            Ok(())
        };
        let error = match tokio::time::timeout_at(deadline, attempt).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => e,
            Err(_) => anyhow::anyhow!("no answer"),
        };
        if tokio::time::Instant::now() + std::time::Duration::from_secs(2) >= deadline {
            return Err(error.context(format!(
                "the agent did not become healthy within {} s",
                wait.as_secs()
            )));
        }
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
}

/// Why the agent's unit cannot become healthy in this boot, when systemd says so.
async fn agent_unit_broken() -> Option<String> {
    let out = tokio::process::Command::new("systemctl")
        .args([
            "show",
            "--property=ActiveState,NRestarts,Result",
            "devos-agent.service",
        ])
        .output()
        .await
        .ok()?;
    unit_broken(&String::from_utf8_lossy(&out.stdout))
}

/// `systemctl show`'s properties of the agent's unit, judged.
fn unit_broken(show: &str) -> Option<String> {
    let get = |key: &str| {
        show.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .unwrap_or("")
    };
    let restarts: u32 = get("NRestarts").parse().unwrap_or(0);
    if get("ActiveState") == "failed" {
        Some(format!(
            "devos-agent.service failed ({}) after {restarts} restarts",
            get("Result")
        ))
    } else if restarts > AGENT_RESTARTS_TOLERATED {
        Some(format!(
            "devos-agent.service keeps failing: restarted {restarts} times in this boot ({})",
            get("Result")
        ))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An executable script.
    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let path = dir.join(name);
        devos_tests::write_executable(&path, &format!("#!/bin/sh\n{body}\n"));
        path
    }

    #[test]
    fn a_failed_or_crashing_agent_fails_the_boot_check_at_once() {
        let healthy = "ActiveState=active\nNRestarts=0\nResult=success\n";
        assert_eq!(unit_broken(healthy), None);
        // Starting, or restarted once while the bus came up: keep waiting.
        assert_eq!(unit_broken("ActiveState=activating\nNRestarts=1\n"), None);
        assert_eq!(unit_broken(""), None);
        let failed = unit_broken("ActiveState=failed\nNRestarts=5\nResult=exit-code\n");
        assert!(
            failed
                .unwrap()
                .contains("failed (exit-code) after 5 restarts")
        );
        let looping = unit_broken("ActiveState=activating\nNRestarts=3\nResult=exit-code\n");
        assert!(looping.unwrap().contains("restarted 3 times"));
    }

    #[test]
    fn rollback_picks_the_newest_other_version_that_did_not_fail() {
        let dir = tempfile::tempdir().unwrap();
        let esp = dir.path().join("Linux");
        std::fs::create_dir(&esp).unwrap();
        for f in [
            "img_1.0.0_aaa.efi",
            "img_1.1.0_bbb.efi",
            "img_1.2.0_ccc+0-3.efi",
            "img_2.0.0_ddd+2-1.efi",
            "other_9.0.0_eee.efi",
        ] {
            std::fs::write(esp.join(f), "").unwrap();
        }
        let log = dir.path().join("log");
        let config = UpdateConfig {
            sysupdate: dir.path().join("none"),
            bootctl: script(
                dir.path(),
                "bootctl",
                &format!("echo \"$@\" >> {}", log.display()),
            ),
            kernel_images: esp.clone(),
            launcher: Vec::new(),
            ..UpdateConfig::default()
        };
        let out = apply(
            &config,
            UpdateAction::Rollback,
            Some("img"),
            Some("2.0.0+ddd"),
        )
        .unwrap();
        assert_eq!(out.next.as_deref(), Some("1.1.0+bbb"));
        assert!(out.reboot);
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "set-default img_1.1.0_bbb.efi\n"
        );
        // Running the oldest: nothing older that boots.
        for f in ["img_1.1.0_bbb.efi", "img_2.0.0_ddd+2-1.efi"] {
            std::fs::remove_file(esp.join(f)).unwrap();
        }
        let e = apply(
            &config,
            UpdateAction::Rollback,
            Some("img"),
            Some("1.0.0+aaa"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("nothing to go back to"), "{e}");
    }

    #[test]
    fn a_fleet_moves_to_an_installed_version_by_the_boot_loader_and_to_others_by_sysupdate() {
        let dir = tempfile::tempdir().unwrap();
        let esp = dir.path().join("Linux");
        std::fs::create_dir(&esp).unwrap();
        for f in [
            "img_1.0.0_aaa.efi",
            "img_2.0.0_bbb+0-3.efi",
            "img_3.0.0_ccc.efi",
        ] {
            std::fs::write(esp.join(f), "").unwrap();
        }
        let log = dir.path().join("log");
        let record = |name: &str| {
            script(
                dir.path(),
                name,
                &format!("echo \"{name} $*\" >> {}", log.display()),
            )
        };
        let config = UpdateConfig {
            sysupdate: record("sysupdate"),
            bootctl: record("bootctl"),
            kernel_images: esp.clone(),
            launcher: Vec::new(),
            reboot: vec![record("reboot").display().to_string(), "now".into()],
            ..UpdateConfig::default()
        };
        let calls = || std::fs::read_to_string(&log).unwrap_or_default();
        // Back to the version in the other slot: the boot loader's default, no download.
        let done = move_to(&config, Some("img"), Some("3.0.0+ccc"), "1.0.0+aaa").unwrap();
        assert!(done.contains("img_1.0.0_aaa.efi"), "{done}");
        assert_eq!(calls(), "bootctl set-default img_1.0.0_aaa.efi\n");
        // A version that failed its tries is not booted again from the slot: sysupdate.
        std::fs::remove_file(&log).unwrap();
        move_to(&config, Some("img"), Some("3.0.0+ccc"), "2.0.0+bbb").unwrap();
        assert_eq!(
            calls(),
            "sysupdate update 2.0.0_bbb\nbootctl set-default \n"
        );
        std::fs::remove_file(&log).unwrap();
        reboot(&config).unwrap();
        assert_eq!(calls(), "reboot now\n");
        // An image without systemd-sysupdate says so.
        let bare = UpdateConfig {
            sysupdate: dir.path().join("none"),
            ..config.clone()
        };
        let e = move_to(&bare, Some("img"), Some("3.0.0+ccc"), "4.0.0+ddd").unwrap_err();
        assert!(matches!(e, UpdateError::NotUpdatable(_)), "{e}");
        let e = reboot(&UpdateConfig {
            reboot: Vec::new(),
            ..config
        })
        .unwrap_err();
        assert!(e.to_string().contains("[update] reboot is empty"), "{e}");
    }

    #[test]
    fn versions_compare_by_number_and_a_rolled_back_machine_is_told_so() {
        use std::cmp::Ordering::*;
        assert_eq!(version_cmp("0.2.10_a", "0.2.9_b"), Greater);
        assert_eq!(version_cmp("0.2.1_a", "0.2.1_a"), Equal);
        assert_eq!(version_cmp("0.2.0_ff", "0.2.1_00"), Less);
        assert_eq!(version_cmp("1.0.01", "1.0.1"), Equal);

        let dir = tempfile::tempdir().unwrap();
        for f in ["img_0.2.9_a.efi", "img_0.2.10_b.efi"] {
            std::fs::write(dir.path().join(f), "").unwrap();
        }
        let config = UpdateConfig {
            sysupdate: script(
                dir.path(),
                "sysupdate",
                r#"case $1 in check-new) echo '{"available":null}';; update) echo 'No update needed.' >&2;; esac"#,
            ),
            bootctl: dir.path().join("bootctl"),
            kernel_images: dir.path().into(),
            launcher: Vec::new(),
            ..UpdateConfig::default()
        };
        // Running 0.2.9 with 0.2.10 installed (it went back): neither action says it
        // runs the newest version.
        for action in [UpdateAction::Check, UpdateAction::Install] {
            let out = apply(&config, action, Some("img"), Some("0.2.9+a")).unwrap();
            assert!(!out.reboot, "{out:?}");
            assert!(
                out.message.contains("went back from 0.2.10+b")
                    && out.message.contains("devos update --rollback"),
                "{}",
                out.message
            );
        }
        let out = apply(&config, UpdateAction::Check, Some("img"), Some("0.2.10+b")).unwrap();
        assert_eq!(out.message, "this machine runs the newest version");
        // Installed by an update and not booted yet: it boots next.
        for untried in ["img_0.2.11_c+3.efi", "img_0.2.11_c+3-0.efi"] {
            std::fs::write(dir.path().join(untried), "").unwrap();
            let out = apply(&config, UpdateAction::Check, Some("img"), Some("0.2.10+b")).unwrap();
            assert!(
                out.message.contains("0.2.11+c is installed and boots next"),
                "{}",
                out.message
            );
            std::fs::remove_file(dir.path().join(untried)).unwrap();
        }
    }

    #[test]
    fn status_says_what_runs_what_boots_next_and_what_else_is_installed() {
        let dir = tempfile::tempdir().unwrap();
        let config = UpdateConfig {
            kernel_images: dir.path().into(),
            ..UpdateConfig::default()
        };
        let put = |files: &[&str]| {
            for e in std::fs::read_dir(dir.path()).unwrap() {
                std::fs::remove_file(e.unwrap().path()).unwrap();
            }
            for f in files {
                std::fs::write(dir.path().join(f), "").unwrap();
            }
        };
        let words = |running: &str, loader: &bootloader::LoaderState| {
            let s = status(&config, Some("img"), Some(running), loader, None);
            let word = |k: &str| s.get(k).and_then(|v| v.as_str()).unwrap_or("").to_owned();
            (word("booted"), word("next-boot"), word("other-versions"))
        };
        let none = bootloader::LoaderState {
            loader_version: Some(257),
            ..Default::default()
        };
        let counted = |file: &str| bootloader::LoaderState {
            count_path: Some(format!("\\EFI\\Linux\\{file}")),
            ..none.clone()
        };
        // A fresh image: one version, good, the other slot empty.
        put(&["img_0.2.0_a.efi", "other_9.9.9.efi"]);
        assert_eq!(
            words("0.2.0+a", &none),
            (
                "0.2.0+a: good".into(),
                "0.2.0+a again: the newest version with tries left".into(),
                "none: the other slot is empty".into()
            )
        );
        // Just updated: the new version boots next, with its tries.
        put(&["img_0.2.0_a.efi", "img_0.2.1_b+3-0.efi"]);
        let (_, next, others) = words("0.2.0+a", &none);
        assert_eq!(
            next,
            "0.2.1+b (installed, not booted yet: 3 tries): the newest version with tries left"
        );
        assert_eq!(others, "0.2.1+b (installed, not booted yet: 3 tries)");
        // Its first counted boot, not yet healthy; then rolled back on purpose.
        put(&["img_0.2.0_a.efi", "img_0.2.1_b+2-1.efi"]);
        let (booted, next, others) = words("0.2.1+b", &counted("img_0.2.1_b+2-1.efi"));
        assert_eq!(
            booted,
            "0.2.1+b: on trial, try 1 of 3: marked good once the agent's health checks pass"
        );
        assert!(next.starts_with("0.2.1+b again"), "{next}");
        assert_eq!(others, "0.2.0+a (good)");
        let rolled_back = bootloader::LoaderState {
            default: Some("img_0.2.0_a.efi".into()),
            ..none.clone()
        };
        let (_, next, _) = words("0.2.1+b", &rolled_back);
        assert!(
            next.starts_with("0.2.0+a (good): the boot loader's default"),
            "{next}"
        );
        // Its last try, before and after systemd-bless-boot marked it bad; and with
        // nothing to go back to.
        put(&["img_0.2.0_a.efi", "img_0.2.1_b+0-3.efi"]);
        let (booted, _, _) = words("0.2.1+b", &counted("img_0.2.1_b+0-3.efi"));
        assert!(
            booted.starts_with("0.2.1+b: on its last try (3rd), not marked good yet")
                && booted.ends_with("the next boot starts another version"),
            "{booted}"
        );
        put(&["img_0.2.0_a.efi", "img_0.2.1_b+0-1.efi"]);
        let (booted, next, _) = words("0.2.1+b", &counted("img_0.2.1_b+2-1.efi"));
        assert_eq!(
            booted,
            "0.2.1+b: marked bad (it did not come up healthy): the next boot starts another version"
        );
        assert!(
            next.starts_with("0.2.0+a (good): the newest version with tries left"),
            "{next}"
        );
        put(&["img_0.2.1_b+0-1.efi"]);
        let (booted, _, _) = words("0.2.1+b", &counted("img_0.2.1_b+2-1.efi"));
        assert!(
            booted.ends_with("but no other version is left to go back to"),
            "{booted}"
        );
        // A version that failed its tries: the machine came back by itself.
        put(&["img_0.2.0_a.efi", "img_0.2.2_c+0-3.efi"]);
        let (booted, next, others) = words("0.2.0+a", &none);
        assert_eq!(booted, "0.2.0+a: good");
        assert!(next.starts_with("0.2.0+a again"), "{next}");
        assert_eq!(others, "0.2.2+c (failed: 3 tries used up)");
        // A default set by hand that names none of the image's kernel images.
        let by_hand = bootloader::LoaderState {
            default: Some("windows.efi".into()),
            ..none.clone()
        };
        let (_, next, _) = words("0.2.0+a", &by_hand);
        assert!(
            next.starts_with(
                "`windows.efi`, which names none of this image's kernel images: the boot loader's default"
            ),
            "{next}"
        );
        // Not started from one of the image's kernel images: the feed alone.
        put(&["img_0.2.0_a.efi"]);
        let s = status(&config, Some("img"), Some("0.3.0+z"), &none, None);
        assert_eq!(s.keys().collect::<Vec<_>>(), ["update-feed"]);
        let s = status(&config, None, None, &none, Some("https://u/".into()));
        assert_eq!(
            serde_json::Value::Object(s),
            serde_json::json!({"update-feed": "https://u/"})
        );
    }

    #[test]
    fn the_feed_is_read_from_the_transfers_systemd_sysupdate_reads() {
        let root = tempfile::tempdir().unwrap();
        let (etc, usr) = (root.path().join("etc"), root.path().join("usr"));
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::create_dir_all(&usr).unwrap();
        let missing = root.path().join("missing");
        let dirs = [etc.as_path(), missing.as_path(), usr.as_path()];
        assert_eq!(feed(&dirs), None);
        let transfer = |url: &str| {
            format!(
                "# [Source] in a comment\n[Transfer]\nVerify=yes\n\n[Source]\nType=url-file\nPath={url}\nMatchPattern=x_@v\n\n[Target]\nType=partition\nPath=auto\n"
            )
        };
        let write = |path: PathBuf, text: String| std::fs::write(path, text).unwrap();
        write(
            usr.join("10-img-root.transfer"),
            transfer("https://u.example/%%7Ea/"),
        );
        write(usr.join("20-img-uki.transfer"), transfer("https://other/"));
        write(
            usr.join("10-img-root.conf"),
            transfer("https://not-a-transfer/"),
        );
        assert_eq!(feed(&dirs).as_deref(), Some("https://u.example/%7Ea/"));
        // One of the same name further up takes its place; a drop-in changes it.
        write(
            etc.join("10-img-root.transfer"),
            transfer("http://10.0.2.2:8080/"),
        );
        assert_eq!(feed(&dirs).as_deref(), Some("http://10.0.2.2:8080/"));
        std::fs::create_dir(usr.join("10-img-root.transfer.d")).unwrap();
        write(
            usr.join("10-img-root.transfer.d/mirror.conf"),
            "[Source]\nPath = https://me:s3cret@mirror.example/feed/?t=1\n".into(),
        );
        // (Without who it logs in as: anyone may ask.)
        assert_eq!(
            feed(&dirs).as_deref(),
            Some("https://mirror.example/feed/?t=1")
        );
        std::fs::remove_dir_all(usr.join("10-img-root.transfer.d")).unwrap();
        // A source that is not a URL names no feed; a masked transfer (empty) neither.
        write(
            etc.join("10-img-root.transfer"),
            "[Source]\nType=regular-file\nPath=/var/updates\n\n[Target]\nPath=https://x/\nType=url-file\n".into(),
        );
        assert_eq!(feed(&dirs).as_deref(), Some("https://other/"));
        write(etc.join("20-img-uki.transfer"), String::new());
        assert_eq!(feed(&dirs), None);
    }

    #[test]
    fn install_says_what_boots_next_and_failures_carry_the_output() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let sysupdate = |body: &str| script(dir.path(), "sysupdate", body);
        let mut config = UpdateConfig {
            sysupdate: sysupdate(
                r#"case $1 in check-new) echo '{"available":"2.0.0_b"}';; update) echo done >&2;; esac"#,
            ),
            bootctl: script(
                dir.path(),
                "bootctl",
                &format!("echo \"$@\" >> {}", log.display()),
            ),
            kernel_images: dir.path().into(),
            launcher: Vec::new(),
            ..UpdateConfig::default()
        };
        let out = apply(&config, UpdateAction::Install, Some("img"), Some("1.0.0+a")).unwrap();
        assert_eq!(out.next.as_deref(), Some("2.0.0+b"));
        assert!(out.reboot);
        // A rollback's default entry is cleared: the new version boots.
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "set-default \n");

        // Nothing newer: systemd-sysupdate's JSON answer says so, and nothing runs.
        config.sysupdate = sysupdate(
            r#"case $1 in check-new) echo '{"available":null}';; *) echo 'the update ran' >&2; exit 1;; esac"#,
        );
        let out = apply(&config, UpdateAction::Install, None, None).unwrap();
        assert!(!out.reboot && out.next.is_none(), "{out:?}");
        let out = apply(&config, UpdateAction::Check, None, None).unwrap();
        assert!(out.next.is_none());
        assert_eq!(out.message, "this machine runs the newest version");

        // A feed that cannot be reached, or whose manifest's signature is wrong, fails
        // the check (exit 1, as when nothing is newer without JSON): never "newest".
        for failing in [
            "echo 'Transfer failed: Could not connect to server' >&2; exit 1",
            "echo 'DOWNLOAD INVALID: Signature verification failed.' >&2; exit 1",
            "exit 1",
            // Answers that are not what was asked for.
            "echo '{}'",
            r#"echo '{"available":""}'"#,
            r#"echo '{"available":5}'"#,
            "echo '[null]'",
            "echo 'No candidate found.'",
            "true",
        ] {
            config.sysupdate = sysupdate(&format!(
                "case $1 in check-new) {failing};; *) echo 'the update ran' >&2; exit 1;; esac"
            ));
            for action in [UpdateAction::Check, UpdateAction::Install] {
                let e = apply(&config, action, None, None).unwrap_err();
                assert!(matches!(e, UpdateError::Failed { .. }), "{failing}: {e}");
                assert!(!e.to_string().contains("the update ran"), "{failing}: {e}");
            }
        }

        // A systemd-sysupdate before 257 answers with the version alone.
        config.sysupdate = sysupdate("case $1 in check-new) echo 2.0.0_b;; esac");
        let out = apply(&config, UpdateAction::Check, None, None).unwrap();
        assert_eq!(out.next.as_deref(), Some("2.0.0+b"));

        config.sysupdate = sysupdate(
            r#"case $1 in check-new) echo '{"available":"2.0.0_b"}';; update) echo 'Signature verification failed.' >&2; exit 1;; esac"#,
        );
        let e = apply(&config, UpdateAction::Install, None, None).unwrap_err();
        assert!(
            e.to_string().contains("Signature verification failed"),
            "{e}"
        );

        config.sysupdate = dir.path().join("missing");
        let e = apply(&config, UpdateAction::Check, None, None).unwrap_err();
        assert!(e.to_string().contains("cannot update itself"), "{e}");
    }

    #[test]
    fn one_update_at_a_time_a_launch_waits_briefly_for_the_unit_name_then_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let taken = "echo 'Failed to start transient service unit: Unit devos-update.service was already loaded or has a fragment file.' >&2; exit 1";
        // The name is free again after one try (the last step's unit was unloaded).
        let tries = dir.path().join("tries");
        let launcher = script(
            dir.path(),
            "launcher",
            &format!(
                "echo x >> {t}; [ $(wc -l < {t}) -ge 2 ] || {{ {taken}; }}; exec \"$@\"",
                t = tries.display()
            ),
        );
        let config = UpdateConfig {
            sysupdate: script(dir.path(), "sysupdate", r#"echo '{"available":"2.0.0_b"}'"#),
            launcher: vec![launcher.display().to_string()],
            ..UpdateConfig::default()
        };
        let out = apply(&config, UpdateAction::Check, None, None).unwrap();
        assert_eq!(out.next.as_deref(), Some("2.0.0+b"));
        // Taken all along (an install runs): refused, saying so.
        let busy = script(dir.path(), "busy", taken);
        let config = UpdateConfig {
            launcher: vec![busy.display().to_string()],
            ..config
        };
        let e = apply(&config, UpdateAction::Check, None, None).unwrap_err();
        assert!(matches!(e, UpdateError::Busy(_)), "{e}");
        assert!(
            e.to_string().starts_with("another update is running"),
            "{e}"
        );
    }
}
