//! `[files]` and `[system] enable-units`: directories of the user's own files copied
//! into the image (mkosi's ExtraTrees), and units to enable.

use std::path::{Path, PathBuf};

use toml::Spanned;

use super::{Source, SpecError};

/// A directory copied over the image's root (or into `target`) after the packages and
/// the builder's own configuration, so its files win.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct ExtraTree {
    /// As written in the spec, relative to the spec's directory (and inside it).
    pub(crate) source: String,
    /// Where the tree's top goes in the image: an absolute path, `/` by default.
    pub(crate) target: String,
    /// `source` resolved (canonical, so inside the spec's directory); its files are
    /// hashed into the build id, not its location.
    #[serde(skip)]
    pub(crate) path: PathBuf,
}

/// `[files]`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawFiles {
    /// Directories copied into the image: `DIR` (over `/`) or `DIR:/TARGET`, relative
    /// to the spec and inside its directory. Owned by root in the image, modes as in DIR.
    #[serde(default)]
    extra_trees: Vec<Spanned<String>>,
}

impl RawFiles {
    /// The first tree named, where it is written.
    pub(super) fn first_tree(&self) -> Option<&Spanned<String>> {
        self.extra_trees.first()
    }
}

pub(super) fn extra_trees(src: &Source, raw: &RawFiles) -> Result<Vec<ExtraTree>, SpecError> {
    raw.extra_trees.iter().map(|t| extra_tree(src, t)).collect()
}

fn extra_tree(src: &Source, raw: &Spanned<String>) -> Result<ExtraTree, SpecError> {
    let text = raw.get_ref();
    let (source, target) = match text.split_once(':') {
        Some((s, t)) => (s, t),
        None => (text.as_str(), "/"),
    };
    let bad_target = !target.starts_with('/')
        || target.split('/').any(|c| c == "..")
        || target.chars().any(char::is_control);
    if source.is_empty() || bad_target {
        return Err(src.error(
            raw,
            format!("invalid extra tree `{text}`"),
            "write `DIR` or `DIR:/absolute/target`, DIR relative to the spec's directory and inside it (e.g. `files/` or `tools:/opt/tools`)",
        ));
    }
    // The builder runs under sudo: a tree from anywhere on the host (`/etc/ssh`,
    // `../../etc`, or a link to them) would copy the host's secrets into the image.
    if Path::new(source).is_absolute() {
        return Err(src.error(
            raw,
            format!("extra tree `{source}` is an absolute path"),
            "an extra tree must be a directory inside the spec's directory, named relative to it; copy the files you want in the image into a directory beside the spec (e.g. `files/`)",
        ));
    }
    let spec_dir = match src.file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let path = spec_dir.join(source);
    if !path.is_dir() {
        return Err(src.error(
            raw,
            format!(
                "extra tree `{source}` is not a directory ({})",
                path.display()
            ),
            "paths are relative to the spec's directory; create it or fix the path",
        ));
    }
    let resolved = spec_dir.canonicalize().and_then(|dir| {
        let tree = path.canonicalize()?;
        Ok((dir, tree))
    });
    let path = match resolved {
        Ok((dir, tree)) if tree.starts_with(&dir) => tree,
        Ok((dir, tree)) => {
            return Err(src.error(
                raw,
                format!(
                    "extra tree `{source}` leads outside the spec's directory {} (to {})",
                    dir.display(),
                    tree.display()
                ),
                "an extra tree must stay inside the spec's directory (no `..` climbing out, no symlink leading out); copy the files you want in the image into a directory beside the spec (e.g. `files/`)",
            ));
        }
        Err(e) => {
            return Err(src.error(
                raw,
                format!("cannot resolve extra tree `{source}` ({}): {e}", path.display()),
                "paths are relative to the spec's directory; check that it and the tree can be read",
            ));
        }
    };
    let tree = ExtraTree {
        source: source.to_owned(),
        target: target.to_owned(),
        path,
    };
    match tree.bad_entry() {
        Ok(None) => Ok(tree),
        Ok(Some(bad)) => Err(src.error(
            raw,
            format!("extra tree `{source}`: {} {}", bad.path.display(), bad.what),
            bad.hint,
        )),
        Err(e) => Err(src.error(
            raw,
            format!(
                "cannot read extra tree `{source}` ({}): {e}",
                tree.path.display()
            ),
            "check that the tree and everything in it can be read",
        )),
    }
}

/// An entry of an extra tree the builder does not copy, what it is, and what to do.
pub(crate) struct BadEntry {
    pub(crate) path: PathBuf,
    pub(crate) what: String,
    pub(crate) hint: &'static str,
}

/// What to do about a symlink of an extra tree that leads out of the image.
const LINK_OUT_HINT: &str =
    "make it relative and inside the image (e.g. `../lib/x`), or put the file itself in the tree";

/// What to do about a device node, FIFO or socket in an extra tree.
const SPECIAL_FILE_HINT: &str = "remove it from the tree; device nodes come from the image's udev and devtmpfs, FIFOs and sockets from the units that use them (systemd's tmpfiles.d or a socket unit)";

impl ExtraTree {
    /// The first entry of the tree the builder will not copy: a symlink that leads
    /// outside the image — an absolute target, or `..` climbing above the image's root
    /// from where the link sits (the builder reads and writes the tree's files from
    /// the host: a link inside the image resolves inside it there too, one like
    /// `/etc/passwd` would not) — or anything but a file, directory or symlink (a
    /// device node would reach the image's root as root made it: a world-writable
    /// `/dev/mem` put in a tree by whoever wrote the tree).
    pub(crate) fn bad_entry(&self) -> std::io::Result<Option<BadEntry>> {
        use std::os::unix::fs::FileTypeExt;
        let target_depth = self.target.split('/').filter(|c| !c.is_empty()).count();
        for entry in walkdir::WalkDir::new(&self.path) {
            let entry = entry?;
            let ty = entry.file_type();
            let bad = |what: String, hint| {
                Ok(Some(BadEntry {
                    path: entry.path().to_path_buf(),
                    what,
                    hint,
                }))
            };
            if ty.is_file() || ty.is_dir() {
                continue;
            }
            if !ty.is_symlink() {
                let kind = if ty.is_char_device() {
                    "a character device"
                } else if ty.is_block_device() {
                    "a block device"
                } else if ty.is_fifo() {
                    "a FIFO"
                } else if ty.is_socket() {
                    "a socket"
                } else {
                    "not a file, directory or symlink"
                };
                return bad(
                    format!("is {kind}: an extra tree holds only files, directories and symlinks"),
                    SPECIAL_FILE_HINT,
                );
            }
            let link = std::fs::read_link(entry.path())?;
            let rel = entry
                .path()
                .strip_prefix(&self.path)
                .unwrap_or(entry.path());
            if escapes_root(
                target_depth + rel.components().count().saturating_sub(1),
                &link,
            ) {
                return bad(
                    format!(
                        "is a symlink to {}, which leads outside the image",
                        link.display()
                    ),
                    LINK_OUT_HINT,
                );
            }
        }
        Ok(None)
    }
}

/// Whether a symlink `depth` directories below the root, pointing at `link`, leads
/// above the root (or is absolute).
fn escapes_root(mut depth: usize, link: &Path) -> bool {
    if link.is_absolute() {
        return true;
    }
    for c in link.components() {
        match c {
            std::path::Component::ParentDir if depth == 0 => return true,
            std::path::Component::ParentDir => depth -= 1,
            std::path::Component::Normal(_) => depth += 1,
            _ => {}
        }
    }
    false
}

/// `[system] enable-units`: unit names, checked for shape (that they exist in the
/// image is checked when they are enabled).
pub(super) fn units(src: &Source, raw: &[Spanned<String>]) -> Result<Vec<String>, SpecError> {
    const KINDS: &[&str] = &[
        ".service", ".socket", ".timer", ".path", ".mount", ".target",
    ];
    raw.iter()
        .map(|u| {
            let name = u.get_ref();
            let ok = KINDS.iter().any(|k| name.ends_with(k))
                && !name.starts_with(['-', '.', '@'])
                && !name.contains("..")
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || ":_.@-\\".contains(c));
            if ok {
                Ok(name.clone())
            } else {
                Err(src.error(
                    u,
                    format!("`{name}` is not a unit name"),
                    "name a systemd unit such as `my-tool.service` or `backup.timer`",
                ))
            }
        })
        .collect()
}

/// sha256 over what the trees put into the image: each entry's path, type, mode and
/// content (owners and times are the builder's: root, clamped).
pub(crate) fn trees_digest(trees: &[ExtraTree]) -> std::io::Result<String> {
    let mut text = String::new();
    for tree in trees {
        text.push_str(&format!("tree {} -> {}\n", tree.source, tree.target));
        for f in crate::support::digest::file_index(&tree.path)? {
            text.push_str(&format!(
                "{} {} {:o} {}\n",
                f.path, f.kind, f.mode, f.content
            ));
        }
    }
    Ok(crate::support::digest::sha256_hex(text.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_of_extra_trees_must_stay_in_the_image() {
        for (depth, link, out) in [
            (1, "/etc/passwd", true),
            (1, "../../etc/passwd", true),
            (2, "../../../x", true),
            (0, "..", true),
            (1, "../usr/lib/x", false),
            (2, "../../etc/x", false),
            (1, "x/../../y", false),
            (0, "usr/bin", false),
        ] {
            assert_eq!(escapes_root(depth, Path::new(link)), out, "{depth} {link}");
        }
    }
}
