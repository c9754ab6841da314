//! How a verified image meets systemd-sysupdate and systemd-boot: the names they see
//! (partition labels, kernel images, bundle files) and, with `[update]`, the transfer
//! files and key the image carries. Here because it shapes the image's bytes.

/// Where the image keeps its transfer files, and the key systemd-pull trusts (the
/// `/etc` one is read before the vendor keyring systemd-container ships).
pub(crate) const TRANSFER_DIR: &str = "usr/lib/sysupdate.d";
pub(crate) const KEYRING: &str = "etc/systemd/import-pubring.gpg";
/// How often a new version may fail to come up before systemd-boot goes back.
pub(crate) const BOOT_TRIES: u32 = 3;
/// Seconds an updatable image waits after a kernel panic before it reboots (`panic=`
/// on its command line): a version on trial that panics uses up a try and the next
/// one starts, where without it the machine would hang at the panic for good.
pub(crate) const PANIC_REBOOT_SECONDS: u32 = 10;

/// A version as systemd-sysupdate sees it: `+` (which its patterns and systemd-boot's
/// boot counting use as a separator) as `_`. `0.2.0+abc` → `0.2.0_abc`.
pub(crate) fn sysupdate_version(version: &str) -> String {
    version.replace('+', "_")
}

/// A version in systemd-sysupdate's spelling as the builder writes it: the inverse of
/// [`sysupdate_version`] (a semver version has at most one `+`, and no `_`).
/// `0.2.0_abc` → `0.2.0+abc`.
pub(crate) fn builder_version(sysupdate_version: &str) -> String {
    sysupdate_version.replacen('_', "+", 1)
}

/// `NAME_VERSION` (systemd-sysupdate's spelling): the root slot's partition name and
/// the stem of every bundle file.
pub(crate) fn stem(name: &str, version: &str) -> String {
    format!("{name}_{}", sysupdate_version(version))
}

/// The transfer files of an image that updates from `url`: (file name, contents).
/// Applied in name order: the root, its hash tree, then the UKI, so a version is
/// bootable only once its slot is written. `version` (the image's own) is never
/// removed to make room.
pub(crate) fn transfers(name: &str, version: &str, url: &str) -> Vec<(String, String)> {
    let own = sysupdate_version(version);
    // systemd-sysupdate expands specifiers in `Path=` (`%H` is the hostname): a `%`
    // of the URL itself (`%7E`) is written `%%`.
    let url = url.replace('%', "%%");
    let header = |what: &str| {
        format!(
            "# Written by devos-build: {what} of a newer {name} from its feed.\n\
             [Transfer]\nProtectVersion={own}\nVerify=yes\n\n"
        )
    };
    let partition = |file: &str, kind: &str, what: &str| {
        format!(
            "{}[Source]\nType=url-file\nPath={url}\nMatchPattern={name}_@v+@u.{file}\n\n\
             [Target]\nType=partition\nPath=auto\nMatchPattern={name}_@v\n\
             MatchPartitionType={kind}\nReadOnly=yes\n",
            header(what)
        )
    };
    vec![
        (
            format!("10-{name}-root.transfer"),
            partition("root", "root", "the root filesystem"),
        ),
        (
            format!("20-{name}-verity.transfer"),
            partition("verity", "root-verity", "the root's dm-verity hash tree"),
        ),
        (
            format!("30-{name}-uki.transfer"),
            format!(
                "{}[Source]\nType=url-file\nPath={url}\nMatchPattern={name}_@v.efi\n\n\
                 [Target]\nType=regular-file\nPath=/EFI/Linux\nPathRelativeTo=esp\n\
                 MatchPattern={name}_@v+@l-@d.efi {name}_@v+@l.efi {name}_@v.efi\n\
                 Mode=0444\nTriesLeft={BOOT_TRIES}\nTriesDone=0\nInstancesMax=2\n",
                header("the unified kernel image")
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_lose_the_plus_that_sysupdate_and_boot_counting_split_on() {
        assert_eq!(sysupdate_version("0.2.0+abc"), "0.2.0_abc");
        assert_eq!(
            stem("devos-debian", "1.0.0-rc.1+abc"),
            "devos-debian_1.0.0-rc.1_abc"
        );
    }

    #[test]
    fn transfers_write_root_then_hash_then_a_counted_kernel_image() {
        let t = transfers("img", "1.0.0+abc", "https://u.example/img/");
        let names: Vec<&str> = t.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "10-img-root.transfer",
                "20-img-verity.transfer",
                "30-img-uki.transfer"
            ]
        );
        let escaped = transfers("img", "1.0.0+abc", "https://u.example/%7Edev/%H/");
        assert!(
            escaped[0]
                .1
                .contains("Path=https://u.example/%%7Edev/%%H/\n"),
            "{}",
            escaped[0].1
        );
        for (_, text) in &t {
            assert!(text.contains("ProtectVersion=1.0.0_abc\n"), "{text}");
            assert!(text.contains("Verify=yes\n"), "{text}");
            assert!(text.contains("Path=https://u.example/img/\n"), "{text}");
        }
        assert!(t[0].1.contains("MatchPattern=img_@v+@u.root\n"));
        assert!(t[0].1.contains("MatchPartitionType=root\n"));
        assert!(t[1].1.contains("MatchPartitionType=root-verity\n"));
        assert!(t[2].1.contains("TriesLeft=3\n"));
        assert!(
            t[2].1
                .contains("MatchPattern=img_@v+@l-@d.efi img_@v+@l.efi img_@v.efi\n")
        );
    }
}
