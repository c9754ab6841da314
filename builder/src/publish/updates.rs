//! `publish updates`: a tested version's update bundle into a feed directory
//! (see [`crate::update`] for the feed's layout and signing).

use std::path::Path;

use anyhow::{Result, bail};

use crate::model::manifest::Manifest;
use crate::store::registry::Registry;
use crate::support::digest;
use crate::update::FeedPublished;

/// `publish updates REF --to DIR`: add a tested version's bundle to the feed in `dir`
/// and sign the feed's new `SHA256SUMS`. Files are copied under temporary names and
/// renamed; `SHA256SUMS` and its signature are replaced last, so a client never sees a
/// listed file that is not there.
pub(crate) fn publish_feed(
    reg: &Registry,
    reference: &str,
    feed: &Path,
    force: bool,
) -> Result<FeedPublished> {
    check_feed_dir(feed)?;
    let v = super::gate(reg, reference, force)?;
    crate::update::add_to_feed(feed, &v.dir, &Manifest::load(&v.dir)?)
}

/// A feed is a directory (S3 and other stores: sync the directory there).
fn check_feed_dir(feed: &Path) -> Result<()> {
    if feed.to_str().is_some_and(|s| s.contains("://")) {
        bail!(
            "`--to {}`: only a directory can be published to so far\n  hint: publish to a directory your web server (or `aws s3 sync`) serves",
            feed.display()
        );
    }
    Ok(())
}

/// `publish updates --dry-run`: the same checks, and the files that would be added.
pub(crate) fn publish_dry_run(
    reg: &Registry,
    reference: &str,
    feed: &Path,
    force: bool,
) -> Result<crate::support::dry_run::DryRun> {
    check_feed_dir(feed)?;
    let v = super::gate(reg, reference, force)?;
    let manifest = Manifest::load(&v.dir)?;
    let key = crate::update::feed_key(&manifest)?;
    let mut dry = crate::support::dry_run::DryRun::new();
    for f in &manifest.update {
        let dest = feed.join(&f.file);
        if !(dest.is_file() && digest::file_sha256(&dest)? == f.sha256) {
            dry.would(format!(
                "copy {} ({} bytes) to {}",
                f.file,
                f.size,
                feed.display()
            ));
        }
    }
    if !dry.nothing_to_do() {
        dry.would(format!(
            "sign {} with {}",
            feed.join("SHA256SUMS").display(),
            key.fingerprint
        ));
    }
    Ok(dry)
}
