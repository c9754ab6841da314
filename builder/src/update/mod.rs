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

pub(crate) mod boot_key;
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
    let dir = keys::dir();
    let key = keys::current(&dir)?;
    let wanted = keys::fingerprint_of(image_key)?;
    if key.fingerprint != wanted {
        bail!(
            "the image trusts the key {wanted} ({}), but this builder signs with {} (in {})\n  hint: set `[update] key` to the builder's key (`devos-build keys export FILE`), or {}",
            image_key.display(),
            key.fingerprint,
            dir.display(),
            keys::OTHER_DIR_HINT
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
            self.versions
                .iter()
                .map(|v| crate::image::sysupdate::builder_version(v))
                .collect::<Vec<_>>()
                .join(", ")
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
    /// The bytes of the feed's `file` (`SHA256SUMS`, its signature), None when it has
    /// none.
    fn read(&self, file: &str) -> Result<Option<Vec<u8>>>;
    /// Add `file` with the bytes of `src`; a reader sees it whole or not at all.
    fn put(&self, file: &str, src: &Path, sha256: &str) -> Result<()>;
    /// Replace `SHA256SUMS` and its signature, once everything they list is there.
    fn put_index(&self, sums: &Path, sig: &Path) -> Result<()>;
    /// The feed's directory or URL, for messages.
    fn location(&self) -> String;
    /// What names this feed however `--to` spelled it, for its lock: a directory's
    /// device and inode (made if there is none: two first publishes make one), a
    /// bucket's URL.
    fn identity(&self) -> Result<String>;
    /// Remove what earlier publishes that were cut short left (none in S3, where an
    /// object is there whole or not at all); the names removed.
    fn sweep(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
}

/// Whether `name` is a temporary file a publish writes into a feed
/// ([`crate::support::paths::replacing`]) for a file a feed holds: `SHA256SUMS`, its
/// signature, or a bundle file (`NAME_VERSION…`).
fn is_publish_leftover(name: &str) -> bool {
    crate::support::paths::replacing(name)
        .is_some_and(|file| file == "SHA256SUMS" || file == "SHA256SUMS.gpg" || file.contains('_'))
}

/// A feed in a directory of this machine. The directory is opened once, at the first
/// call that finds it (or the first `put`, which makes it), and every file after that
/// is read and written through that handle: a directory swapped in under its name
/// mid-publish gets nothing.
pub(crate) struct DirFeed {
    path: PathBuf,
    dir: std::sync::OnceLock<fs::File>,
}

impl DirFeed {
    pub(crate) fn new(path: PathBuf) -> Self {
        DirFeed {
            path,
            dir: std::sync::OnceLock::new(),
        }
    }

    /// The feed's directory, None while there is none (a read makes nothing).
    fn opened(&self) -> Result<Option<&fs::File>> {
        if let Some(dir) = self.dir.get() {
            return Ok(Some(dir));
        }
        match crate::support::paths::open_dir(&self.path) {
            Ok(fd) => Ok(Some(self.dir.get_or_init(|| fd.into()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(anyhow::anyhow!(
                "cannot open the feed {}: {e}\n  hint: `--to` names a directory (made if missing) or s3://BUCKET/PREFIX; {}",
                self.path.display(),
                match e.raw_os_error() {
                    Some(libc::ENOTDIR) => "a file is in its place",
                    _ => "check that it is a directory this user may read",
                }
            )),
        }
    }

    /// The feed's directory, made if there is none.
    fn made(&self) -> Result<&fs::File> {
        use std::os::unix::fs::PermissionsExt;
        if let Some(dir) = self.opened()? {
            return Ok(dir);
        }
        let (made, new) =
            crate::support::paths::create_user_dirs_made(&self.path).map_err(|e| {
                anyhow::anyhow!(
                    "{e:#}\n  hint: `--to` names a directory to make (with its parents) on a file system this user may write, e.g. `--to ./feed`, or s3://BUCKET/PREFIX"
                )
            })?;
        // A directory this call makes is served by a web server, whatever this
        // process's umask (set through its handle; one that was there keeps its mode).
        if new {
            made.set_permissions(fs::Permissions::from_mode(0o755))
                .with_context(|| format!("cannot make {} readable", self.path.display()))?;
        }
        Ok(self.dir.get_or_init(|| made))
    }

    /// The feed's own plain `file`, never what a link there points at; None when there
    /// is none.
    fn open(&self, file: &str) -> Result<Option<fs::File>> {
        use rustix::fs::{Mode, OFlags};
        let Some(dir) = self.opened()? else {
            return Ok(None);
        };
        let path = self.path.join(file);
        let open = || -> std::io::Result<fs::File> {
            let f = fs::File::from(rustix::fs::openat(
                dir,
                file,
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                Mode::empty(),
            )?);
            if !f.metadata()?.is_file() {
                return Err(rustix::io::Errno::LOOP.into());
            }
            Ok(f)
        };
        match open() {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            // O_NOFOLLOW met a link (or it is no file at all).
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => bail!(
                "cannot read {}: it is not a plain file (a feed holds plain files, not links)\n  hint: replace it with the file itself, or remove it and publish again",
                path.display()
            ),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }
}

impl FeedStore for DirFeed {
    fn holds(&self, file: &str, sha256: &str) -> Result<bool> {
        let Some(mut f) = self.open(file)? else {
            return Ok(false);
        };
        let sha = digest::reader_sha256(&mut f)
            .with_context(|| format!("cannot read {}", self.path.join(file).display()))?;
        Ok(sha == sha256)
    }

    fn has(&self, file: &str) -> Result<bool> {
        Ok(self.open(file)?.is_some())
    }

    fn read(&self, file: &str) -> Result<Option<Vec<u8>>> {
        let Some(mut f) = self.open(file)? else {
            return Ok(None);
        };
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut bytes)
            .with_context(|| format!("cannot read {}", self.path.join(file).display()))?;
        Ok(Some(bytes))
    }

    fn put(&self, file: &str, src: &Path, _sha256: &str) -> Result<()> {
        let dir = self.made()?;
        let mut src =
            fs::File::open(src).with_context(|| format!("cannot read {}", src.display()))?;
        // 0644: served by a web server, whatever this process's umask.
        crate::support::paths::replace_in(dir, &self.path.join(file), &mut src, 0o644)
    }

    fn put_index(&self, sums: &Path, sig: &Path) -> Result<()> {
        self.put("SHA256SUMS", sums, "")?;
        self.put("SHA256SUMS.gpg", sig, "")
    }

    fn location(&self) -> String {
        self.path.display().to_string()
    }

    fn identity(&self) -> Result<String> {
        use std::os::unix::fs::MetadataExt;
        let meta = self
            .made()?
            .metadata()
            .with_context(|| format!("cannot read {}", self.path.display()))?;
        Ok(format!("dir {}:{}", meta.dev(), meta.ino()))
    }

    fn sweep(&self) -> Result<Vec<String>> {
        let Some(dir) = self.opened()? else {
            return Ok(Vec::new());
        };
        crate::support::paths::sweep_leftovers(dir, &self.path, is_publish_leftover)
    }
}

/// Refuse `to` for machines that run `from` when their firmware would refuse its kernel:
/// `from` was signed for Secure Boot, so its machines enrolled that certificate and
/// start only what it signed, and `to` is not signed with it. Such a machine would stop
/// in its firmware (systemd-boot cannot start the refused kernel and does not reboot),
/// not fall back by boot counting.
pub(crate) fn boots_after(from: &Manifest, to: &Manifest) -> Result<()> {
    let Some(enrolled) = &from.secure_boot else {
        return Ok(());
    };
    let what = match &to.secure_boot {
        Some(s) if s.certificate_sha256 == enrolled.certificate_sha256 => return Ok(()),
        Some(s) => format!(
            "is signed with another one ({}, sha256 {})",
            s.subject, s.certificate_sha256
        ),
        None => "is not signed for Secure Boot (its spec has no `[disk] secure-boot`)".to_owned(),
    };
    bail!(
        "{}@{} cannot update machines that run {}: they enrolled the Secure Boot certificate {} (sha256 {}) and their firmware starts only kernels it signed, but {} {what}; such a machine would stop in its firmware, not fall back\n  hint: build {} with the key that signed {} (`[disk] secure-boot = true`, the same key directory), or replace the machines instead of updating them",
        to.name,
        to.version,
        from.version,
        enrolled.subject,
        enrolled.certificate_sha256,
        to.version,
        to.version,
        from.version
    )
}

/// The builder's key, when it is the one `manifest`'s version trusts.
pub(crate) fn feed_key(manifest: &Manifest) -> Result<keys::KeyInfo> {
    let (name, version) = (&manifest.name, &manifest.version);
    let Some(update) = &manifest.update_feed else {
        bail!(
            "{name}@{version} cannot update machines: its spec has no `[update]`\n  hint: add `[update] url` and `key` (with `[disk] verity = true`) and build it again"
        );
    };
    let dir = keys::dir();
    let key = keys::current(&dir)?;
    if key.fingerprint != update.key_fingerprint {
        bail!(
            "{name}@{version} trusts updates signed by {}, but this builder's key is {} (in {})\n  hint: {}",
            update.key_fingerprint,
            key.fingerprint,
            dir.display(),
            keys::OTHER_DIR_HINT
        );
    }
    Ok(key)
}

/// Add the version built in `dir` (its `manifest`) to `feed`, signed with the
/// builder's key, which must be the key the version trusts. Files are added first and
/// the signed `SHA256SUMS` replaced last, so a client never sees a listed file that is
/// not there. `known`: the update files (and their sha256) of every version this
/// builder's registry holds, which vouch for entries of an index whose signature does
/// not verify ([`next_index`]).
pub(crate) fn add_to_feed(
    feed: &dyn FeedStore,
    dir: &Path,
    manifest: &Manifest,
    known: &BTreeMap<String, String>,
) -> Result<FeedPublished> {
    let (name, version) = (&manifest.name, &manifest.version);
    let key = feed_key(manifest)?;
    for leftover in feed.sweep()? {
        eprintln!(
            "removed {leftover} from {}, left by a publish that was cut short",
            feed.location()
        );
    }
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

    let index = next_index(feed, manifest, &key, known)?;
    if let Some(warning) = index.warning(feed) {
        eprintln!("warning: {warning}");
    }
    if index.changed {
        let scratch = tempfile::tempdir().context("cannot make a temporary directory")?;
        let (sums_path, sig) = (
            scratch.path().join("SHA256SUMS"),
            scratch.path().join("SHA256SUMS.gpg"),
        );
        fs::write(&sums_path, sums_text(index.sums.iter()))
            .with_context(|| format!("cannot write {}", sums_path.display()))?;
        keys::sign(&key, &sums_path, &sig, crate::support::time::now())?;
        feed.put_index(&sums_path, &sig)?;
    }

    let prefix = format!("{name}_");
    let mut versions: Vec<String> = index
        .sums
        .keys()
        .filter_map(|f| f.strip_prefix(&prefix)?.strip_suffix(".efi"))
        .map(str::to_owned)
        .collect();
    versions.sort_by(|a, b| newest_first(a, b));
    Ok(FeedPublished {
        name: name.clone(),
        version: version.clone(),
        feed: feed.location(),
        added,
        versions,
        signed_by: key.fingerprint,
    })
}

/// Order feed versions (systemd-sysupdate's spelling, `1.10.0_BUILD`) newest first, as
/// versions compare (1.10.0 after 1.9.0), those that are not semver last.
fn newest_first(a: &str, b: &str) -> std::cmp::Ordering {
    let semver =
        |v: &str| semver::Version::parse(&crate::image::sysupdate::builder_version(v)).ok();
    match (semver(a), semver(b)) {
        (Some(a), Some(b)) => b.cmp(&a),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => b.cmp(a),
    }
}

/// A feed's next `SHA256SUMS`, as [`next_index`] makes it.
pub(crate) struct NextIndex {
    /// file → sha256: every entry kept, and the version's own.
    pub(crate) sums: BTreeMap<String, String>,
    /// Whether it differs from the signed index the feed has (else the feed is left
    /// alone: publishing again changes nothing).
    pub(crate) changed: bool,
    /// Whether the feed's index verified with the builder's key (true for a new feed).
    pub(crate) verified: bool,
    /// Entries of an index that did not verify, left out (each with why): nothing
    /// vouches for them.
    pub(crate) dropped: Vec<String>,
}

impl NextIndex {
    /// What a user must hear about the feed's old index, if anything.
    pub(crate) fn warning(&self, feed: &dyn FeedStore) -> Option<String> {
        if self.verified {
            return None;
        }
        let mut text = format!(
            "{}: SHA256SUMS is not signed by this builder's key (its signature is missing or does not verify): an earlier publish was cut off, or someone else changed the feed; it is made again from the versions this registry built",
            feed.location()
        );
        if !self.dropped.is_empty() {
            text.push_str(&format!(
                "; left out, as nothing vouches for them (their files stay): {}\n  hint: publish those versions again from the registry that built them",
                self.dropped.join(", ")
            ));
        }
        Some(text)
    }
}

/// The feed's index once `manifest`'s version is in it. An entry of the feed's current
/// `SHA256SUMS` stays while the feed still has its file, and only if that index is
/// trusted: its signature verifies with `key` — or, when it does not (a publish cut off
/// between the index and its signature, or a feed changed by someone without the key),
/// if `known` (versions this builder built) lists the same file with the same hash and
/// the feed holds those bytes. Re-signing an index nobody checked would make whatever
/// was slipped into it installable.
pub(crate) fn next_index(
    feed: &dyn FeedStore,
    manifest: &Manifest,
    key: &keys::KeyInfo,
    known: &BTreeMap<String, String>,
) -> Result<NextIndex> {
    let (listed, verified) = match feed.read("SHA256SUMS")? {
        None => (BTreeMap::new(), true),
        Some(bytes) => {
            let listed: BTreeMap<String, String> = parse_sums(&String::from_utf8_lossy(&bytes))
                .into_iter()
                .collect();
            let verified = match feed.read("SHA256SUMS.gpg")? {
                None => false,
                Some(sig) => keys::verifies(key, &bytes, &sig)?,
            };
            (listed, verified)
        }
    };
    let mut sums = BTreeMap::new();
    let mut dropped = Vec::new();
    for (file, sha) in &listed {
        let keep = if verified {
            feed.has(file)?
        } else {
            known.get(file) == Some(sha) && feed.holds(file, sha)?
        };
        if keep {
            sums.insert(file.clone(), sha.clone());
        } else if !verified && !manifest.update.iter().any(|f| f.file == *file) {
            dropped.push(match known.get(file) {
                None => format!("{file} (not built here)"),
                Some(built) if built != sha => {
                    format!("{file} (listed with another hash than built)")
                }
                Some(_) => format!("{file} (the feed's copy is not the file built)"),
            });
        }
    }
    for f in &manifest.update {
        sums.insert(f.file.clone(), f.sha256.clone());
    }
    Ok(NextIndex {
        changed: sums != listed || !verified,
        sums,
        verified,
        dropped,
    })
}

/// `SHA256SUMS` lines as (file, sha256).
fn parse_sums(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.split_once("  "))
        .map(|(sha, file)| (file.trim_start_matches('*').to_owned(), sha.to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Machines that enrolled a certificate take only versions signed with it; machines
    /// of an unsigned version take anything.
    #[test]
    fn an_update_must_be_signed_with_the_certificate_its_machines_enrolled() {
        use crate::model::manifest::SecureBoot;
        use crate::store::registry::tests::manifest;
        let signed = |version: &str, cert: &str| Manifest {
            secure_boot: Some(SecureBoot {
                certificate_sha256: cert.into(),
                subject: format!("CN = {cert}"),
                certificate: String::new(),
            }),
            ..manifest(version, &[])
        };
        let plain = manifest("0.1.0", &[]);
        assert!(boots_after(&plain, &signed("0.2.0", "a")).is_ok());
        assert!(boots_after(&plain, &manifest("0.2.0", &[])).is_ok());
        assert!(boots_after(&signed("0.1.0", "a"), &signed("0.2.0", "a")).is_ok());
        let other = boots_after(&signed("0.1.0", "a"), &signed("0.2.0", "b")).unwrap_err();
        assert!(
            format!("{other:#}").contains("is signed with another one (CN = b"),
            "{other:#}"
        );
        let unsigned = boots_after(&signed("0.1.0", "a"), &manifest("0.2.0", &[])).unwrap_err();
        assert!(
            format!("{unsigned:#}").contains("would stop in its firmware"),
            "{unsigned:#}"
        );
    }

    /// One directory feed is one feed for its lock however `--to` names it (trailing
    /// slash, `..`, a link to it); another directory is another feed; the first
    /// publish's identity makes the directory, so two of them make and lock one.
    #[test]
    fn a_directory_feed_is_named_by_the_directory_not_the_spelling() {
        let tmp = tempfile::tempdir().unwrap();
        let feed = tmp.path().join("feed");
        let identity = |p: PathBuf| DirFeed::new(p).identity().unwrap();
        let first = identity(feed.clone());
        assert!(
            feed.is_dir(),
            "the identity of a new feed made no directory"
        );
        std::os::unix::fs::symlink(&feed, tmp.path().join("link")).unwrap();
        fs::create_dir(tmp.path().join("other")).unwrap();
        for same in [
            tmp.path().join("feed/"),
            tmp.path().join("other/../feed"),
            tmp.path().join("link"),
        ] {
            assert_eq!(identity(same.clone()), first, "{}", same.display());
        }
        assert_ne!(identity(tmp.path().join("other")), first);
    }

    /// A directory feed reads and writes through the directory it first found or made:
    /// another directory put in its place later gets nothing and serves nothing; links
    /// in the feed are not read through; a feed directory it makes is 0755, one that
    /// was there keeps its mode.
    #[test]
    fn a_directory_feed_works_through_the_directory_it_opened() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("a/feed");
        let src = tmp.path().join("src");
        fs::write(&src, b"bytes").unwrap();
        let sha = digest::sha256_hex(b"bytes");

        let feed = DirFeed::new(path.clone());
        assert!(!feed.has("x.efi").unwrap());
        assert!(!path.exists(), "a read made the feed");
        feed.put("x.efi", &src, &sha).unwrap();
        assert!(feed.holds("x.efi", &sha).unwrap());
        assert_eq!(path.metadata().unwrap().permissions().mode() & 0o777, 0o755);
        assert_eq!(
            path.join("x.efi").metadata().unwrap().permissions().mode() & 0o777,
            0o644
        );

        // Swapped under its name mid-publish.
        let moved = tmp.path().join("a/moved");
        fs::rename(&path, &moved).unwrap();
        fs::create_dir(&path).unwrap();
        fs::write(path.join("y.efi"), b"planted").unwrap();
        feed.put("z.efi", &src, &sha).unwrap();
        assert!(moved.join("z.efi").is_file());
        assert!(!path.join("z.efi").exists());
        assert!(!feed.has("y.efi").unwrap());
        assert_eq!(feed.read("x.efi").unwrap().unwrap(), b"bytes");

        // Hashes are of the opened directory's files too.
        fs::write(path.join("x.efi"), b"planted").unwrap();
        assert!(feed.holds("x.efi", &sha).unwrap());

        // A link in the feed is not read through, by any reader.
        std::os::unix::fs::symlink(&src, moved.join("l.efi")).unwrap();
        assert!(feed.holds("l.efi", &sha).is_err());
        assert!(feed.has("l.efi").is_err());
        assert!(
            feed.read("l.efi")
                .unwrap_err()
                .to_string()
                .contains("not links")
        );

        // A feed directory that was there keeps its mode.
        let kept = tmp.path().join("kept");
        fs::create_dir(&kept).unwrap();
        fs::set_permissions(&kept, fs::Permissions::from_mode(0o750)).unwrap();
        DirFeed::new(kept.clone()).put("x.efi", &src, &sha).unwrap();
        assert_eq!(kept.metadata().unwrap().permissions().mode() & 0o777, 0o750);
    }

    /// A publish cut short leaves a temporary file only its writer reads; the next
    /// publish to the feed removes it once nothing has touched it for a while, and
    /// leaves everything else (a file being written now, the feed's own files, other
    /// hidden files) alone.
    #[test]
    fn a_directory_feed_sweeps_what_a_publish_cut_short_left() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let feed = DirFeed::new(tmp.path().join("feed"));
        let src = tmp.path().join("src");
        fs::write(&src, b"bytes").unwrap();
        feed.put("img_1.0.0_abc.root", &src, "").unwrap();
        let old = std::time::SystemTime::now() - 2 * crate::support::paths::LEFTOVER_AGE;
        let leftover = |name: &str, modified: std::time::SystemTime| {
            let f = fs::File::create(feed.path.join(name)).unwrap();
            f.set_modified(modified).unwrap();
        };
        let stale = [
            ".img_1.0.1_def.root.AbC12x.tmp",
            ".SHA256SUMS.q1W2e3.tmp",
            ".SHA256SUMS.gpg.Zz9Yy8.tmp",
        ];
        for name in stale {
            leftover(name, old);
        }
        let kept = [
            ".img_1.0.2_fed.root.Fresh1.tmp",
            ".htaccess",
            ".notes.AbC12x.tmp",
            "img_1.0.0_abc.root",
        ];
        leftover(kept[0], std::time::SystemTime::now());
        leftover(kept[1], old);
        leftover(kept[2], old);
        let mut removed = feed.sweep().unwrap();
        removed.sort();
        let mut expected = stale.map(String::from).to_vec();
        expected.sort();
        assert_eq!(removed, expected);
        for name in kept {
            assert!(feed.path.join(name).exists(), "{name}");
        }
        // Renamed into place, what a publish wrote is the web server's to read.
        assert_eq!(
            feed.path
                .join("img_1.0.0_abc.root")
                .metadata()
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o644
        );
        // A feed not made yet has nothing to sweep, and is not made by the sweep.
        let none = DirFeed::new(tmp.path().join("none"));
        assert!(none.sweep().unwrap().is_empty());
        assert!(!tmp.path().join("none").exists());
    }

    #[test]
    fn feed_versions_are_said_as_the_builder_writes_them() {
        use crate::image::sysupdate::{builder_version, sysupdate_version};
        for v in ["0.2.0+0123456789ab", "1.0.0-rc.1+0123456789ab", "3.0.0"] {
            assert_eq!(builder_version(&sysupdate_version(v)), v);
        }
        assert_eq!(builder_version("0.2.0_0123456789ab"), "0.2.0+0123456789ab");
    }

    #[test]
    fn feed_versions_are_listed_newest_first_as_versions_compare() {
        let mut v = ["1.9.0_b", "1.10.0_a", "0.2.0_c", "not-semver"];
        v.sort_by(|a, b| newest_first(a, b));
        assert_eq!(v[..3], ["1.10.0_a", "1.9.0_b", "0.2.0_c"]);
    }

    #[test]
    fn sums_lines_are_read_as_written() {
        let sha = |c: char| c.to_string().repeat(64);
        let text = sums_text(
            [
                ("a.root".to_owned(), sha('1')),
                ("b.efi".to_owned(), sha('2')),
            ]
            .iter()
            .map(|(f, s)| (f, s)),
        );
        assert_eq!(
            parse_sums(&text),
            [
                ("a.root".to_owned(), sha('1')),
                ("b.efi".to_owned(), sha('2'))
            ]
        );
    }
}
