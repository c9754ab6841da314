//! `image test FROM --update-to NAME@VERSION`: the update path as a machine takes it.
//! The host serves the newer version's feed (signed with the builder's key, as
//! `publish updates` lays it out) on its loopback; FROM boots with a network that
//! reaches it and its self-test runs `devos update` against it (the image's own
//! transfers, pointed at the host's feed); then the same disk boots again, and that
//! boot is the test: the newer version must run, on a counted boot that gets blessed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};

use super::{Check, Scratch, Target, TestOptions, read_report, run_vm};
use crate::model::manifest::Manifest;

/// The version to update to: its output directory and manifest.
pub(crate) struct UpdateTo {
    pub(crate) dir: PathBuf,
    pub(crate) manifest: Manifest,
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
                let name = request.url().trim_start_matches('/').to_owned();
                // Only the feed's own files: a plain name, no way out of the directory.
                let file =
                    (!name.is_empty() && !name.contains(['/', '\\']) && !name.starts_with('.'))
                        .then(|| std::fs::File::open(dir.join(&name)).ok())
                        .flatten();
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

    /// The feed's URL as the guest reaches it.
    fn guest_url(&self) -> String {
        format!("http://{HOST_ADDR}:{}/", self.port)
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
    let feed = scratch.dir.path().join("feed");
    crate::update::add_to_feed(&feed, &to.dir, &to.manifest).with_context(|| {
        format!(
            "cannot lay out the feed of {}@{}",
            to.manifest.name, to.manifest.version
        )
    })?;
    let server = FeedServer::start(&feed)?;
    let url = server.guest_url();
    let mut run = run_vm(scratch, target, opts, Some(&url))?;
    if let Some(error) = run.kvm_failed.take() {
        scratch.fall_back_to_tcg(target, &error)?;
        run = run_vm(scratch, target, opts, Some(&url))?;
    }
    let (checks, _) = read_report(&scratch.dir.path().join("selftest.jsonl"));
    let mut out: Vec<Check> = checks
        .iter()
        .filter(|c| !c.ok && c.check != "update")
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
    Ok(out)
}
