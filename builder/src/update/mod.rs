//! Updates of verified images by systemd-sysupdate: each version's update bundle, the
//! feed `publish updates` lays out, and the key that signs both (`keys`). The names
//! systemd-sysupdate sees and the transfers an image carries are in
//! `image::sysupdate` (they shape the image's bytes).
//!
//! A feed is a directory served over HTTP(S): every published version's root image,
//! hash tree and unified kernel image, one `SHA256SUMS` over all of them and its
//! detached signature `SHA256SUMS.gpg` by the builder's key. systemd-sysupdate in the
//! image fetches `SHA256SUMS` and its signature, checks it with the key the image
//! carries, picks the newest version, downloads its files (checking each hash), writes
//! the inactive root slot and its hash partition, and installs the UKI with three
//! boot tries.

pub(crate) mod keys;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::model::manifest::{Manifest, UpdateFile};
use crate::support::digest;

/// Write the update bundle of the version `stem` (`NAME_VERSION`, systemd-sysupdate's
/// spelling) into `dir`: the disk stage's root image, hash tree (named with the
/// partition UUIDs the new slot must get) and UKI, as the transfers match them, their
/// `SHA256SUMS`, and with a `key` (`[update]`) its signature, made at the build's
/// `source_date_epoch`.
pub(crate) fn write_bundle(
    bundle: &crate::image::disk::Bundle,
    stem: &str,
    dir: &Path,
    key: Option<&keys::KeyInfo>,
    source_date_epoch: u64,
) -> Result<Vec<UpdateFile>> {
    fs::create_dir_all(dir)?;
    let mut files = Vec::new();
    for (src, name) in [
        (&bundle.root, format!("{stem}+{}.root", bundle.root_uuid)),
        (
            &bundle.verity,
            format!("{stem}+{}.verity", bundle.verity_uuid),
        ),
        (&bundle.uki, format!("{stem}.efi")),
    ] {
        let dest = dir.join(&name);
        fs::rename(src, &dest).or_else(|_| fs::copy(src, &dest).map(drop))?;
        // Published as they are (veritysetup makes its file owner-only).
        fs::set_permissions(&dest, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
        let size = fs::metadata(&dest)?.len();
        files.push(UpdateFile {
            sha256: digest::file_sha256(&dest)?,
            file: name,
            size,
        });
    }
    let sums = dir.join("SHA256SUMS");
    fs::write(&sums, sums_text(files.iter().map(|f| (&f.file, &f.sha256))))?;
    if let Some(key) = key {
        keys::sign(key, &sums, &dir.join("SHA256SUMS.gpg"), source_date_epoch)?;
    }
    Ok(files)
}

/// `SHA256SUMS` lines (`HASH  FILE`), in the order given.
fn sums_text<'a>(entries: impl Iterator<Item = (&'a String, &'a String)>) -> String {
    entries
        .map(|(file, sha)| format!("{sha}  {file}\n"))
        .collect()
}

/// The builder's key, which must be the one whose public half `image_key` holds (the
/// key the image will check signatures with).
pub(crate) fn signing_key_for(image_key: &Path) -> Result<keys::KeyInfo> {
    let key = keys::current(&keys::dir())?;
    let wanted = keys::fingerprint_of(image_key)?;
    if key.fingerprint != wanted {
        bail!(
            "the image trusts the key {wanted} ({}), but this builder signs with {}\n  hint: set `[update] key` to the builder's key (`devos-build keys export FILE`), or sign where that key is",
            image_key.display(),
            key.fingerprint
        );
    }
    Ok(key)
}

/// What `publish updates` did.
#[derive(Debug, Serialize)]
pub(crate) struct FeedPublished {
    pub(crate) name: String,
    pub(crate) version: String,
    /// The feed's directory or `s3://` URL.
    pub(crate) feed: String,
    /// The files this version added (those already there with the same bytes are kept).
    pub(crate) added: Vec<String>,
    /// Every version the feed now offers, newest first.
    pub(crate) versions: Vec<String>,
    pub(crate) signed_by: String,
}

impl FeedPublished {
    pub(crate) fn human(&self) -> String {
        format!(
            "{}@{} is in the feed {} ({} file(s) added; signed by {})\nthe feed offers: {}\n",
            self.name,
            self.version,
            self.feed,
            self.added.len(),
            self.signed_by,
            self.versions.join(", ")
        )
    }
}

/// Where a feed is kept: a directory (served by a web server) or the objects under an
/// S3 prefix (served by S3 or a CDN in front of it).
pub(crate) trait FeedStore {
    /// Whether the feed holds `file` with these bytes.
    fn holds(&self, file: &str, sha256: &str) -> Result<bool>;
    /// Whether the feed holds `file` at all.
    fn has(&self, file: &str) -> Result<bool>;
    /// The feed's `SHA256SUMS`, None when it has none yet.
    fn index(&self) -> Result<Option<String>>;
    /// Add `file` with the bytes of `src`; a reader sees it whole or not at all.
    fn put(&self, file: &str, src: &Path, sha256: &str) -> Result<()>;
    /// Replace `SHA256SUMS` and its signature, once everything they list is there.
    fn put_index(&self, sums: &Path, sig: &Path) -> Result<()>;
    /// The feed's directory or URL, for messages.
    fn location(&self) -> String;
}

/// A feed in a directory of this machine.
pub(crate) struct DirFeed(pub(crate) PathBuf);

impl FeedStore for DirFeed {
    fn holds(&self, file: &str, sha256: &str) -> Result<bool> {
        let path = self.0.join(file);
        Ok(path.is_file() && digest::file_sha256(&path)? == sha256)
    }

    fn has(&self, file: &str) -> Result<bool> {
        Ok(self.0.join(file).is_file())
    }

    fn index(&self) -> Result<Option<String>> {
        match fs::read_to_string(self.0.join("SHA256SUMS")) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => {
                Err(e).with_context(|| format!("cannot read {}/SHA256SUMS", self.0.display()))
            }
        }
    }

    fn put(&self, file: &str, src: &Path, _sha256: &str) -> Result<()> {
        crate::support::paths::create_user_dirs(&self.0)?;
        let tmp = self.0.join(format!(".{file}.tmp"));
        fs::copy(src, &tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
        fs::rename(&tmp, self.0.join(file))?;
        Ok(())
    }

    fn put_index(&self, sums: &Path, sig: &Path) -> Result<()> {
        self.put("SHA256SUMS", sums, "")?;
        self.put("SHA256SUMS.gpg", sig, "")
    }

    fn location(&self) -> String {
        self.0.display().to_string()
    }
}

/// The builder's key, when it is the one `manifest`'s version trusts.
pub(crate) fn feed_key(manifest: &Manifest) -> Result<keys::KeyInfo> {
    let (name, version) = (&manifest.name, &manifest.version);
    let Some(update) = &manifest.update_feed else {
        bail!(
            "{name}@{version} cannot update machines: its spec has no `[update]`\n  hint: add `[update] url` and `key` (with `[disk] verity = true`) and build it again"
        );
    };
    let key = keys::current(&keys::dir())?;
    if key.fingerprint != update.key_fingerprint {
        bail!(
            "{name}@{version} trusts updates signed by {}, but this builder's key is {}\n  hint: publish from the builder whose key built it",
            update.key_fingerprint,
            key.fingerprint
        );
    }
    Ok(key)
}

/// Add the version built in `dir` (its `manifest`) to `feed`, signed with the
/// builder's key, which must be the key the version trusts. Files are added first and
/// the signed `SHA256SUMS` replaced last, so a client never sees a listed file that is
/// not there.
pub(crate) fn add_to_feed(
    feed: &dyn FeedStore,
    dir: &Path,
    manifest: &Manifest,
) -> Result<FeedPublished> {
    let (name, version) = (&manifest.name, &manifest.version);
    let key = feed_key(manifest)?;
    let bundle = dir.join("update");
    let mut added = Vec::new();
    for f in &manifest.update {
        if feed.holds(&f.file, &f.sha256)? {
            continue;
        }
        let src = bundle.join(&f.file);
        let sha = digest::file_sha256(&src)
            .with_context(|| format!("cannot read the update bundle's {}", src.display()))?;
        if sha != f.sha256 {
            bail!(
                "{} changed since it was built (sha256 {sha}, the manifest says {})\n  hint: `devos-build image verify {name}@{version}` checks the whole version; build it again",
                src.display(),
                f.sha256,
            );
        }
        feed.put(&f.file, &src, &f.sha256)?;
        added.push(f.file.clone());
    }

    let (sums, changed) = next_index(feed, manifest)?;
    if changed {
        let scratch = tempfile::tempdir().context("cannot make a temporary directory")?;
        let (sums_path, sig) = (
            scratch.path().join("SHA256SUMS"),
            scratch.path().join("SHA256SUMS.gpg"),
        );
        fs::write(&sums_path, sums_text(sums.iter()))?;
        keys::sign(&key, &sums_path, &sig, crate::support::time::now())?;
        feed.put_index(&sums_path, &sig)?;
    }

    let prefix = format!("{name}_");
    let mut versions: Vec<String> = sums
        .keys()
        .filter_map(|f| f.strip_prefix(&prefix)?.strip_suffix(".efi"))
        .map(str::to_owned)
        .collect();
    versions.sort_by(|a, b| b.cmp(a));
    Ok(FeedPublished {
        name: name.clone(),
        version: version.clone(),
        feed: feed.location(),
        added,
        versions,
        signed_by: key.fingerprint,
    })
}

/// The feed's index once `manifest`'s version is in it — every file it lists and still
/// holds, with this version's — and whether that differs from the signed index it has
/// (which is then left alone: publishing again changes nothing).
pub(crate) fn next_index(
    feed: &dyn FeedStore,
    manifest: &Manifest,
) -> Result<(BTreeMap<String, String>, bool)> {
    let listed: BTreeMap<String, String> = feed
        .index()?
        .iter()
        .flat_map(|text| parse_sums(text))
        .collect();
    let mut sums = BTreeMap::new();
    for (file, sha) in &listed {
        if feed.has(file)? {
            sums.insert(file.clone(), sha.clone());
        }
    }
    for f in &manifest.update {
        sums.insert(f.file.clone(), f.sha256.clone());
    }
    let changed = sums != listed || !feed.has("SHA256SUMS.gpg")?;
    Ok((sums, changed))
}

/// `SHA256SUMS` lines as (file, sha256).
fn parse_sums(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.split_once("  "))
        .map(|(sha, file)| (file.trim_start_matches('*').to_owned(), sha.to_owned()))
        .collect()
}
