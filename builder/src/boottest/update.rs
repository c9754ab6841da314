//! `image test FROM --update-to NAME@VERSION`: the update path as a machine takes it.
//! The host serves the newer version's feed (signed with the builder's key, as
//! `publish updates` lays it out) on its loopback; FROM boots with a network that
//! reaches it and its self-test runs `devos update` against it (the image's own
//! transfers, pointed at the host's feed); then the same disk boots again, and that
//! boot is the test: the newer version must run, on a counted boot that gets blessed.
//! A newer version that does not become healthy reboots; the disk is booted again for
//! each of its tries, and the report says what the machine started after them (the
//! previous version, by itself, when boot counting works). A newer version that came
//! up healthy then goes back (`devos update --rollback`), and the disk boots once more:
//! the target's version must run again.
//! Before the real feed, the guest is pointed at two that must be refused with nothing
//! installed: one whose `SHA256SUMS` changed after it was signed, one whose root image
//! changed after its sum was signed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};

use super::{Check, Scratch, Target, TestOptions, boot_and_report};
use crate::model::manifest::Manifest;

/// The version to update to: its output directory and manifest.
pub(crate) struct UpdateTo {
    pub(crate) dir: PathBuf,
    pub(crate) manifest: Manifest,
}

impl UpdateTo {
    /// Refuse, before anything boots, an update a machine of `target` would not make:
    /// to another image, or to a version that is not newer than the one it runs
    /// (systemd-sysupdate installs only newer versions).
    pub(crate) fn check_from(&self, target: &Target) -> Result<()> {
        let Some(from) = &target.manifest else {
            return Ok(());
        };
        let to = &self.manifest;
        if from.name != to.name {
            bail!(
                "--update-to {}@{} is another image than {}@{}: a machine updates only to versions of its own image\n  hint: name a version of {}",
                to.name,
                to.version,
                from.name,
                from.version,
                from.name
            );
        }
        let parse = |v: &str| semver::Version::parse(v).ok();
        if let (Some(old), Some(new)) = (parse(&from.version), parse(&to.version))
            && new.cmp_precedence(&old).is_le()
        {
            bail!(
                "--update-to {}@{} is not a newer version than {} (the version tested): an update goes to a higher `[image] version` (systemd-sysupdate takes only a newer one, and orders two builds of one version by their build ids alone, not by age)\n  hint: raise `[image] version` in the spec and build again, then test {}@{} --update-to the new one",
                to.name,
                to.version,
                from.version,
                from.name,
                from.version
            );
        }
        Ok(())
    }
}

/// The host as the guest of the boot test's user network sees it (QEMU's user
/// network forwards it to the host's loopback).
const HOST_ADDR: &str = "169.254.169.2";

/// The feed, served from a directory on 127.0.0.1 while it lives.
struct FeedServer {
    server: Arc<tiny_http::Server>,
    thread: Option<std::thread::JoinHandle<()>>,
    port: u16,
}

impl FeedServer {
    fn start(dir: &Path) -> Result<Self> {
        let server = Arc::new(
            tiny_http::Server::http("127.0.0.1:0")
                .map_err(|e| anyhow::anyhow!("cannot serve the update feed: {e}"))?,
        );
        let port = server
            .server_addr()
            .to_ip()
            .context("the update feed's server has no TCP address")?
            .port();
        let serving = Arc::clone(&server);
        let dir = dir.to_path_buf();
        let thread = std::thread::spawn(move || {
            for request in serving.incoming_requests() {
                // Only the feeds' own files: FEED/NAME, plain names, no way out.
                let plain = |s: &str| !s.is_empty() && !s.starts_with('.') && !s.contains('\\');
                let file = match request.url().trim_start_matches('/').split_once('/') {
                    Some((feed, name)) if plain(feed) && plain(name) && !name.contains('/') => {
                        std::fs::File::open(dir.join(feed).join(name)).ok()
                    }
                    _ => None,
                };
                let _ = match file {
                    Some(f) => request.respond(tiny_http::Response::from_file(f)),
                    None => request.respond(tiny_http::Response::empty(404)),
                };
            }
        });
        Ok(Self {
            server,
            thread: Some(thread),
            port,
        })
    }

    /// The URL of the feed `name` as the guest reaches it.
    fn guest_url(&self, name: &str) -> String {
        format!("http://{HOST_ADDR}:{}/{name}/", self.port)
    }
}

impl Drop for FeedServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A user network for a guest that has none from the EC2 stand-in.
pub(super) fn network() -> Vec<String> {
    vec![
        "-nic".into(),
        format!("user,model=virtio-net-pci,net={}", super::ec2::GUEST_NET),
    ]
}

/// Boot `target` once and install `to` from a feed on the host: the checks that say
/// how it went (`update`, and any check that failed before the update).
pub(super) fn install(
    scratch: &mut Scratch,
    target: &Target,
    opts: &TestOptions,
    to: &UpdateTo,
) -> Result<Vec<Check>> {
    let dir = scratch.dir.path().join("feeds");
    let good = crate::update::DirFeed::new(dir.join("good"));
    // A new feed: nothing in it to vouch for.
    let known = std::collections::BTreeMap::new();
    crate::update::add_to_feed(&good, &to.dir, &to.manifest, &known).with_context(|| {
        format!(
            "cannot lay out the feed of {}@{}",
            to.manifest.name, to.manifest.version
        )
    })?;
    forged_feeds(&dir, &to.manifest)?;
    let server = FeedServer::start(&dir)?;
    let feeds = Feeds {
        install: server.guest_url("good"),
        refuse: ["forged-signature", "changed-root"]
            .map(|f| server.guest_url(f))
            .join(" "),
    };
    let run = boot_and_report(scratch, target, opts, Some(&feeds), false)?;
    let checks = run.checks;
    let refused: Vec<Check> = checks
        .iter()
        .filter(|c| c.check == "update-refused")
        .cloned()
        .collect();
    let mut out: Vec<Check> = checks
        .iter()
        .filter(|c| !c.ok && c.check != "update" && c.check != "update-refused")
        .map(|c| Check {
            check: format!("before-update:{}", c.check),
            ..c.clone()
        })
        .collect();
    let from = target
        .manifest
        .as_ref()
        .map_or_else(|| target.disk.display().to_string(), |m| m.version.clone());
    out.insert(
        0,
        match (
            checks.into_iter().find(|c| c.check == "update"),
            run.outcome,
        ) {
            (Some(update), _) => Check {
                detail: format!("{from} → {}: {}", to.manifest.version, update.detail),
                ..update
            },
            (None, Err(e)) => Check {
                check: "update".into(),
                ok: false,
                detail: format!("{from} did not get to its update: {e}"),
                ms: 0,
            },
            (None, Ok(())) => Check {
                check: "update".into(),
                ok: false,
                detail: format!("{from} reported no update result"),
                ms: 0,
            },
        },
    );
    if refused.len() != 2 {
        out.push(Check {
            check: "update-refused".into(),
            ok: false,
            detail: format!("{} of the 2 forged feeds were tried", refused.len()),
            ms: 0,
        });
    }
    out.splice(1..1, refused);
    Ok(out)
}

/// The feeds of an update test, as the guest reaches them: the one to install from,
/// and (space-separated) those it must refuse.
pub(super) struct Feeds {
    pub(super) install: String,
    pub(super) refuse: String,
}

/// Beside the feed `dir/good`, two that must be refused: `forged-signature` (a line
/// added to SHA256SUMS after it was signed) and `changed-root` (one byte of the root
/// image changed after its sum was signed). Files are hard links where unchanged.
fn forged_feeds(dir: &Path, manifest: &Manifest) -> Result<()> {
    let good = dir.join("good");
    let root = manifest
        .update
        .iter()
        .find(|f| f.file.ends_with(".root"))
        .context("the update bundle has no root image")?;
    for (feed, changed) in [
        ("forged-signature", "SHA256SUMS"),
        ("changed-root", root.file.as_str()),
    ] {
        let feed = dir.join(feed);
        std::fs::create_dir_all(&feed)?;
        for entry in std::fs::read_dir(&good)? {
            let name = entry?.file_name();
            if name != changed {
                std::fs::hard_link(good.join(&name), feed.join(&name))?;
            }
        }
        let mut bytes = std::fs::read(good.join(changed))?;
        if changed == "SHA256SUMS" {
            bytes.extend_from_slice(
                format!("{}  {}.efi\n", "0".repeat(64), manifest.name).as_bytes(),
            );
        } else {
            let middle = bytes.len() / 2;
            bytes[middle] ^= 0x01;
        }
        std::fs::write(feed.join(changed), bytes)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::registry::tests::manifest;

    /// An update test a machine would never make is refused before anything boots:
    /// to the same or an older version, or to another image.
    #[test]
    fn an_update_test_goes_only_to_a_newer_version_of_the_same_image() {
        let target = |version: &str| Target {
            disk: PathBuf::from("x.raw"),
            manifest: Some(manifest(version, &[])),
            tests: Vec::new(),
        };
        let to = |version: &str| UpdateTo {
            dir: PathBuf::from("out"),
            manifest: manifest(version, &[]),
        };
        to("0.2.1+bbb").check_from(&target("0.2.0+aaa")).unwrap();
        to("0.10.0+bbb").check_from(&target("0.9.0+aaa")).unwrap();
        to("1.0.0+bbb")
            .check_from(&target("1.0.0-rc.1+aaa"))
            .unwrap();
        for (from, new) in [
            ("0.2.1+aaa", "0.2.0+bbb"),
            ("0.2.0+aaa", "0.2.0+aaa"),
            ("0.2.0+aaa", "0.2.0+bbb"),
            ("1.0.0+aaa", "1.0.0-rc.1+bbb"),
        ] {
            let e = to(new).check_from(&target(from)).unwrap_err().to_string();
            assert!(
                e.contains(&format!("is not a newer version than {from}"))
                    && e.contains("hint: raise"),
                "{from} → {new}: {e}"
            );
        }
        let mut other = to("0.3.0+ccc");
        other.manifest.name = "other".into();
        let e = other
            .check_from(&target("0.2.0+aaa"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("is another image than devos-test@0.2.0+aaa"),
            "{e}"
        );
        // A disk without a manifest: nothing to compare, the boot says.
        let bare = Target {
            manifest: None,
            ..target("0.2.0+aaa")
        };
        to("0.1.0+aaa").check_from(&bare).unwrap();
    }
}
