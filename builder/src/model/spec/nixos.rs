//! What a `distro = "nixos"` spec may say. The image is a NixOS configuration built by
//! `nix build` (nixos/image.nix), so the keys that steer Debian's bootstrap have no
//! meaning there; each is refused where it is written, with what to do instead.

use serde_spanned::Spanned;

use super::{RawSpec, Source, SpecError};

/// The first key of `raw` that a NixOS image cannot honour, as an error located on it.
pub(super) fn check_keys(src: &Source, raw: &RawSpec) -> Result<(), SpecError> {
    let refuse = |at: usize, key: &str, hint: &str| {
        Err(src.error_at(
            at,
            format!("`{key}` has no meaning for a NixOS image"),
            Some(hint),
        ))
    };
    if let Some(t) = &raw.image.source_date_epoch {
        return refuse(
            t.span().start,
            "[image] source-date-epoch",
            "a NixOS image's timestamps come from nixpkgs' locked revision (flake.lock); move it with `nix flake update` and remove the key",
        );
    }
    if let Some(c) = &raw.base.components {
        return refuse(
            c.span().start,
            "[base] components",
            "NixOS images take every package from nixpkgs; remove the key",
        );
    }
    if let Some(k) = &raw.base.keyring {
        return refuse(
            k.span().start,
            "[base] keyring",
            "Nix checks what it substitutes with the substituter's public key (nix.conf `trusted-public-keys`); remove the key",
        );
    }
    if let Some(l) = raw.packages.layers.first() {
        return refuse(
            l.span().start,
            "[packages] layers",
            "layers name Debian packages; list nixpkgs attribute names in `[packages] include` instead",
        );
    }
    if let Some(u) = raw.system.enable_units.first() {
        return refuse(
            u.span().start,
            "[system] enable-units",
            "enable a unit in NixOS with a module (`systemd.services.NAME.wantedBy`); remove the key",
        );
    }
    if let Some(i) = raw.system.initrd.as_ref().filter(|i| !*i.get_ref()) {
        return refuse(
            i.span().start,
            "[system] initrd = false",
            "a NixOS image's verified store is opened by systemd in the initrd; remove the key",
        );
    }
    if let Some(f) = raw.disk.root_fs.as_ref().filter(|f| f.get_ref() != "erofs") {
        return refuse(
            f.span().start,
            "[disk] root-fs",
            "a NixOS image's store is always erofs (its root is a tmpfs NixOS fills at boot); remove the key or say `erofs`",
        );
    }
    if let Some(v) = raw.disk.verity.as_ref().filter(|v| !*v.get_ref()) {
        return refuse(
            v.span().start,
            "[disk] verity = false",
            "a NixOS image's store is always verified with dm-verity; remove the key",
        );
    }
    if let Some(b) = raw.disk.secure_boot.as_ref().filter(|b| *b.get_ref()) {
        return refuse(
            b.span().start,
            "[disk] secure-boot",
            "Secure Boot signing is built for Debian images only so far; remove the key",
        );
    }
    if let Some(t) = raw.files.first_tree() {
        return refuse(
            t.span().start,
            "[files] extra-trees",
            "put files into a NixOS image with a module (`environment.etc`, a package); remove the key",
        );
    }
    if let Some(u) = &raw.update {
        return refuse(
            u.url.span().start,
            "[update]",
            "A/B updates are built for Debian images only so far; remove `[update]`",
        );
    }
    Ok(())
}

/// `[packages] include` of a NixOS spec: nixpkgs attribute paths (`git`,
/// `python3Packages.requests`).
pub(super) fn package_names(
    src: &Source,
    names: &[Spanned<String>],
) -> Result<Vec<String>, SpecError> {
    names
        .iter()
        .map(|p| {
            if is_attr_path(p.get_ref()) {
                Ok(p.get_ref().clone())
            } else {
                Err(src.error(
                    p,
                    format!("invalid nixpkgs attribute `{}`", p.get_ref()),
                    "NixOS specs name packages by nixpkgs attribute, e.g. `git` or `python3Packages.requests`",
                ))
            }
        })
        .collect()
}

/// A dotted path of Nix identifiers (`[A-Za-z_][A-Za-z0-9_'-]*`).
pub(crate) fn is_attr_path(s: &str) -> bool {
    s.split('.').all(|part| {
        let mut chars = part.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || "_'-".contains(c))
    })
}

#[cfg(test)]
mod tests {
    use super::is_attr_path;

    #[test]
    fn attribute_paths_are_nix_identifiers_joined_by_dots() {
        for ok in [
            "git",
            "python3Packages.requests",
            "gcc_14",
            "nerd-fonts.fira-code",
        ] {
            assert!(is_attr_path(ok), "{ok}");
        }
        for bad in [
            "",
            "1password",
            "a..b",
            "git;rm",
            "pkgs.${x}",
            "a b",
            ".git",
        ] {
            assert!(!is_attr_path(bad), "{bad}");
        }
    }
}
