//! `publish updates`: a tested version's update bundle into a feed, a directory or an
//! S3 prefix (see [`crate::update`] for the feed's layout and signing).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use devos_aws::AwsOptions;
use devos_aws::s3::{Caching, Feed};

use crate::model::manifest::Manifest;
use crate::store::registry::Registry;
use crate::update::{DirFeed, FeedPublished, FeedStore};

/// The feed `--to` names: `s3://BUCKET/PREFIX` (reached with `aws`'s options), or a
/// directory. Call [`prepare`] first: what can be refused locally is, before AWS is asked.
pub(crate) fn open_feed(to: &str, aws: impl FnOnce() -> AwsOptions) -> Result<Box<dyn FeedStore>> {
    check_to(to)?;
    if to.starts_with("s3://") {
        return Ok(Box::new(S3Feed::open(to, &aws())?));
    }
    Ok(Box::new(DirFeed::new(PathBuf::from(to))))
}

/// `--to`: a directory or `s3://BUCKET/PREFIX`, nothing else.
fn check_to(to: &str) -> Result<()> {
    if to.trim().is_empty() {
        bail!(
            "`--to` is empty: a feed is published to a directory or to s3://BUCKET/PREFIX\n  hint: name the directory (never the current one by omission), e.g. `--to ./feed`"
        );
    }
    // `s3:/bucket`, `S3://bucket`: meant for S3, and never a local directory by accident.
    if !to.starts_with("s3://") && to.to_ascii_lowercase().starts_with("s3:") {
        bail!(
            "`--to {to}` is not an S3 URL: write s3://BUCKET/PREFIX (lower-case s3, two slashes)\n  hint: a local directory whose name starts with `s3:` can be named `./{to}`"
        );
    }
    if to.contains("://") && !to.starts_with("s3://") {
        bail!(
            "`--to {to}`: a feed is published to a directory or to s3://BUCKET/PREFIX\n  hint: publish to a directory your web server serves, or to the S3 prefix behind the feed's URL"
        );
    }
    Ok(())
}

/// What `publish updates` checks before it opens the feed (so before AWS credentials
/// are needed): `--to`'s form, the version (tested, unless `--force`), that its spec
/// has `[update]` and that this builder's key is the one it trusts.
pub(crate) struct Prepared {
    v: crate::store::registry::VersionInfo,
    manifest: Manifest,
    key: crate::update::keys::KeyInfo,
}

pub(crate) fn prepare(reg: &Registry, reference: &str, to: &str, force: bool) -> Result<Prepared> {
    check_to(to)?;
    // Before the test gate, tested or not: a version no machine takes from a feed (no
    // `[update]`, another key than this builder's), and one the feed's machines could
    // not start (`--force`: no machine runs those versions).
    let checked_key = match reg.manifest(&reg.find(reference)?) {
        Ok(manifest) => {
            let key = crate::update::feed_key(&manifest)?;
            if !force {
                startable_by_the_feeds_machines(reg, &manifest)?;
            }
            Some(key)
        }
        Err(_) => None,
    };
    let v = super::gate(
        reg,
        reference,
        force,
        "nothing in the feed marks it: machines reading the feed install it like any other",
    )?;
    if v.state != crate::model::states::VersionState::Built {
        bail!(
            "the files of {}@{} were removed (`image gc`), its update bundle with them\n  hint: build the version again (`devos-build image build {}`): the same inputs make the same bundle",
            v.name,
            v.version,
            v.spec
        );
    }
    let manifest = reg.manifest(&v)?;
    // (The gate found the same version: its key is the one checked above.)
    let key = match checked_key {
        Some(key) => key,
        None => crate::update::feed_key(&manifest)?,
    };
    Ok(Prepared { v, manifest, key })
}

/// Refuse `manifest`'s version when machines of another version of the same image and
/// feed enrolled a Secure Boot certificate that did not sign it.
fn startable_by_the_feeds_machines(reg: &Registry, manifest: &Manifest) -> Result<()> {
    let feed = |m: &Manifest| m.update_feed.as_ref().map(|f| f.url.clone());
    for other in reg.versions(Some(&manifest.name))? {
        let Ok(m) = reg.manifest(&other) else {
            continue;
        };
        if m.version != manifest.version && feed(&m) == feed(manifest) {
            crate::update::boots_after(&m, manifest).map_err(|e| {
                anyhow::anyhow!(
                    "{e:#}\n  hint: if no machine runs {} (nor another version signed as it is), publish with --force",
                    m.version
                )
            })?;
        }
    }
    Ok(())
}

/// `publish updates REF --to FEED`: add a tested version's bundle to the feed and sign
/// the feed's new `SHA256SUMS`.
pub(crate) fn publish_feed(
    reg: &Registry,
    prepared: &Prepared,
    feed: &dyn FeedStore,
) -> Result<FeedPublished> {
    let v = &prepared.v;
    reg.lock_feed(&feed.identity()?, &feed.location())?;
    crate::update::add_to_feed(
        feed,
        &v.dir,
        &prepared.manifest,
        &known_files(reg, &v.name)?,
    )
}

/// The update files (file → sha256) of every version of `image` the registry holds:
/// what may stay in a feed whose index does not verify.
fn known_files(reg: &Registry, image: &str) -> Result<BTreeMap<String, String>> {
    let mut known = BTreeMap::new();
    for v in reg.versions(Some(image))? {
        // A manifest this builder cannot read vouches for nothing.
        for f in reg.manifest(&v).map(|m| m.update).unwrap_or_default() {
            known.insert(f.file, f.sha256);
        }
    }
    Ok(known)
}

/// `publish updates --dry-run`: the same checks, and the files that would be added.
pub(crate) fn publish_dry_run(
    reg: &Registry,
    prepared: &Prepared,
    feed: &dyn FeedStore,
) -> Result<crate::support::dry_run::DryRun> {
    let Prepared { v, manifest, key } = prepared;
    let mut dry = crate::support::dry_run::DryRun::new();
    for f in &manifest.update {
        if !feed.holds(&f.file, &f.sha256)? {
            dry.would(format!(
                "copy {} ({} bytes) to {}",
                f.file,
                f.size,
                feed.location()
            ));
        }
    }
    let index = crate::update::next_index(feed, manifest, key, &known_files(reg, &v.name)?)?;
    if let Some(warning) = index.warning(feed) {
        eprintln!("warning: {warning}");
    }
    if index.changed {
        dry.would(format!(
            "sign the feed's SHA256SUMS in {} with {}",
            feed.location(),
            key.fingerprint
        ));
    }
    Ok(dry)
}

/// A feed in S3, driven from this synchronous command through one runtime.
struct S3Feed {
    rt: tokio::runtime::Runtime,
    feed: Feed,
}

impl S3Feed {
    fn open(url: &str, opts: &AwsOptions) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        let feed = rt.block_on(async {
            let aws = devos_aws::Aws::load(opts).await?;
            let region = aws.default_region()?;
            Feed::open(&aws, &region, url).await
        })?;
        Ok(Self { rt, feed })
    }
}

impl FeedStore for S3Feed {
    fn holds(&self, file: &str, sha256: &str) -> Result<bool> {
        Ok(self.rt.block_on(self.feed.sha256_of(file))?.as_deref() == Some(sha256))
    }

    fn has(&self, file: &str) -> Result<bool> {
        Ok(self.rt.block_on(self.feed.sha256_of(file))?.is_some())
    }

    fn read(&self, file: &str) -> Result<Option<Vec<u8>>> {
        self.rt.block_on(self.feed.read(file))
    }

    fn put(&self, file: &str, src: &Path, sha256: &str) -> Result<()> {
        self.rt
            .block_on(self.feed.put(file, src, sha256, Caching::Immutable))
    }

    fn put_index(&self, sums: &Path, sig: &Path) -> Result<()> {
        let sha = |p: &Path| crate::support::digest::file_sha256(p);
        self.rt.block_on(
            self.feed
                .put("SHA256SUMS", sums, &sha(sums)?, Caching::Index),
        )?;
        self.rt.block_on(
            self.feed
                .put("SHA256SUMS.gpg", sig, &sha(sig)?, Caching::Index),
        )
    }

    fn location(&self) -> String {
        self.feed.url()
    }

    fn identity(&self) -> Result<String> {
        Ok(self.feed.url().trim_end_matches('/').to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A version no machine could take from a feed (its spec has no `[update]`) is
    /// refused for that, before the boot-test gate sends its user off to test it.
    #[test]
    fn a_version_without_update_is_refused_for_that_tested_or_not() {
        let tmp = tempfile::tempdir().unwrap();
        let mut reg = Registry::open(&tmp.path().join("r.db")).unwrap();
        let plain = crate::store::registry::tests::manifest("0.1.0+aaa111", &[]);
        reg.record_build(Path::new("/o"), Path::new("s"), &plain, &[])
            .unwrap();
        for force in [false, true] {
            let e = super::prepare(&reg, "devos-test@0.1.0", "./feed", force)
                .err()
                .unwrap();
            let e = format!("{e:#}");
            assert!(
                e.contains("cannot update machines: its spec has no `[update]`")
                    && !e.contains("boot-tested"),
                "{e}"
            );
        }
    }

    #[test]
    fn to_is_a_directory_or_an_s3_url_never_nothing_or_a_near_miss() {
        for good in [
            "feed",
            "./feed",
            "/srv/feed/",
            "s3://bucket/prefix",
            "./s3:x",
        ] {
            super::check_to(good).unwrap();
        }
        for (bad, said) in [
            ("", "`--to` is empty"),
            ("  ", "`--to` is empty"),
            ("s3:/bucket/x", "is not an S3 URL"),
            ("S3://bucket/x", "is not an S3 URL"),
            ("s3:bucket", "is not an S3 URL"),
            ("https://x/feed", "to a directory or to s3://"),
        ] {
            let e = format!("{:#}", super::check_to(bad).unwrap_err());
            assert!(e.contains(said) && e.contains("hint:"), "{bad}: {e}");
        }
    }
}
