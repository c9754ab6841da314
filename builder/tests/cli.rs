//! The command line's handling of its input and output, with commands that start no
//! build, no VM and no network: closed pipes, registry paths, key export destinations.

// Test helpers fail the test by panicking, like the tests themselves.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Output;

use common::devos_build_command;

/// Run with stdout on a pipe whose reader has already gone, as `| head -1` leaves it.
fn with_closed_stdout(args: &[&str]) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    devos_build_command()
        .args(args)
        .stdout(writer)
        .output()
        .unwrap()
}

#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    for args in [
        &["completions", "bash"][..],
        &["cache", "status", "--json"],
        &["man"],
    ] {
        let out = with_closed_stdout(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }
}

fn image_list(registry: Option<&std::ffi::OsStr>) -> (Option<i32>, String, String) {
    let mut cmd = devos_build_command();
    match registry {
        Some(path) => cmd.env("DEVOS_REGISTRY", path),
        None => cmd.env_remove("DEVOS_REGISTRY"),
    };
    let out = cmd.args(["image", "list"]).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_registry_named_by_the_user_must_exist_for_commands_that_read() {
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("typo/reg.db");
    let (code, _, err) = image_list(Some(typo.as_os_str()));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("the registry {} does not exist", typo.display())),
        "{err}"
    );
    // The flag is checked the same way.
    let out = devos_build_command()
        .args(["image", "list", "--registry"])
        .arg(&typo)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    // A directory is named as one.
    let (code, _, err) = image_list(Some(dir.path().as_os_str()));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("is a directory, not a registry file") && err.contains("hint:"),
        "{err}"
    );
    // So does `image gc`, real run or dry (it has nothing to collect without one).
    for dry in [&[][..], &["--dry-run"]] {
        let out = devos_build_command()
            .env("DEVOS_REGISTRY", &typo)
            .args(["image", "gc"])
            .args(dry)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{dry:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("does not exist"),
            "{dry:?}"
        );
    }
    // Nothing was created for it.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    // An empty DEVOS_REGISTRY means the default (here, one not created yet: empty).
    let (code, out, err) = image_list(Some("".as_ref()));
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("no images"), "{out}");
    // So does an empty DEVOS_CONFIG (the settings file).
    let out = devos_build_command()
        .env("DEVOS_CONFIG", "")
        .env_remove("DEVOS_REGISTRY")
        .args(["image", "list"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_key_export_destination_is_checked_before_anything_is_made_or_overwritten() {
    devos_tests::require("gpg", "gnupg");
    let dir = tempfile::tempdir().unwrap();
    let keys = |args: &[&std::ffi::OsStr]| {
        let out = devos_build_command()
            .env("DEVOS_KEYS", dir.path().join("keys"))
            .arg("keys")
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let path = |name: &str| dir.path().join(name).into_os_string();
    // No directory for the export: refused before a key is made.
    let (code, _, err) = keys(&["generate".as_ref(), "--export".as_ref(), &path("no/k.pgp")]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("there is no directory"), "{err}");
    assert!(!dir.path().join("keys").exists(), "no key was made");

    let (code, out, err) = keys(&["generate".as_ref(), "--export".as_ref(), &path("k.pgp")]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains(&format!(
        "written to:  {}",
        dir.path().join("k.pgp").display()
    )));
    // The same public key again is fine; another file is left alone.
    let (code, _, err) = keys(&["export".as_ref(), &path("k.pgp")]);
    assert_eq!(code, Some(0), "{err}");
    std::fs::write(dir.path().join("victim.toml"), "keep = true\n").unwrap();
    let (code, _, err) = keys(&["export".as_ref(), &path("victim.toml")]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("victim.toml exists and is not the public key"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("victim.toml")).unwrap(),
        "keep = true\n"
    );
    // The file already holds the key: a dry run has nothing to do and says why, and
    // the real run leaves the file as it is.
    let (code, out, err) = keys(&["export".as_ref(), &path("k.pgp"), "--dry-run".as_ref()]);
    assert_eq!(code, Some(3), "{err}");
    assert!(
        out.contains("nothing to do") && out.contains("k.pgp already holds the public key"),
        "{out}"
    );
    let before = std::fs::metadata(dir.path().join("k.pgp"))
        .unwrap()
        .modified()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let (code, out, err) = keys(&["export".as_ref(), &path("k.pgp")]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("already in:"), "{out}");
    let after = std::fs::metadata(dir.path().join("k.pgp"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after, "the file was not rewritten");
    // A dry run refuses what the real run would.
    let (code, _, err) = keys(&[
        "export".as_ref(),
        dir.path().as_os_str(),
        "--dry-run".as_ref(),
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("it is a directory"), "{err}");
    // Never over a device or a FIFO (written as a file in its place, as root over
    // /dev/null), nor read to compare: refused at once, dry run or not.
    let (code, _, err) = keys(&["export".as_ref(), &path("newdir/")]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("it is a directory"), "{err}");
    assert!(!dir.path().join("newdir").exists());
    for special in ["/dev/null", "/dev/stdout"] {
        for dry in [&[][..], &["--dry-run".as_ref()]] {
            let mut args = vec!["export".as_ref(), special.as_ref()];
            args.extend_from_slice(dry);
            let (code, _, err) = keys(&args);
            assert_eq!(code, Some(1), "{special}: {err}");
            assert!(err.contains("it is not a regular file"), "{special}: {err}");
        }
    }
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(
        &Path::new("/dev/null").metadata().unwrap().file_type()
    ));

    // The Secure Boot key beside it: made with it, private; a directory that lacks it
    // gets only it (the update signing key stays); half a pair is refused, named.
    let shown = || {
        let (code, out, err) = keys(&["show".as_ref(), "--json".as_ref()]);
        assert_eq!(code, Some(0), "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    let first = shown();
    let boot_key = dir.path().join("keys/secure-boot.key");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&boot_key.metadata().unwrap().permissions())
            & 0o077,
        0,
        "the Secure Boot key is readable by others"
    );
    assert_eq!(first["secure_boot"]["sha256"].as_str().unwrap().len(), 64);
    // Times in ISO 8601, as everywhere in --json.
    let not_after = first["secure_boot"]["not_after"].as_str().unwrap();
    assert!(
        not_after.len() == 20 && not_after.as_bytes()[10] == b'T' && not_after.ends_with('Z'),
        "{not_after}"
    );
    std::fs::remove_file(&boot_key).unwrap();
    let (code, _, err) = keys(&["show".as_ref()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("holds secure-boot.crt without secure-boot.key"),
        "{err}"
    );
    std::fs::remove_file(dir.path().join("keys/secure-boot.crt")).unwrap();
    let (code, out, err) = keys(&["generate".as_ref(), "--dry-run".as_ref()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("Secure Boot key") && !out.contains("Ed25519"),
        "{out}"
    );
    let (code, _, err) = keys(&["generate".as_ref()]);
    assert_eq!(code, Some(0), "{err}");
    let second = shown();
    assert_eq!(second["fingerprint"], first["fingerprint"]);
    assert_ne!(
        second["secure_boot"]["sha256"],
        first["secure_boot"]["sha256"]
    );
    // The public keyring lost: the secret key is still there, so no new key is made
    // in its place (images trust the old one); both commands say what to restore.
    let ring = dir.path().join("keys/pubring.kbx");
    std::fs::rename(&ring, dir.path().join("pubring.kbx.bak")).unwrap();
    for args in [
        &["show".as_ref()][..],
        &["generate".as_ref()],
        &["generate".as_ref(), "--dry-run".as_ref()],
    ] {
        let (code, _, err) = keys(args);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(
            err.contains("pubring.kbx is missing or damaged")
                && err.contains("restore pubring.kbx"),
            "{args:?}: {err}"
        );
    }
    // As a `keys generate` cut short leaves it (gpg had not yet written the public
    // key or the revocation certificate): said as such, with what to do.
    let revocs = dir.path().join("keys/openpgp-revocs.d");
    std::fs::rename(&revocs, dir.path().join("revocs.bak")).unwrap();
    let (code, _, err) = keys(&["generate".as_ref()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("its making was cut short")
            && err.contains("restore both from a backup")
            && err.contains(".unfinished"),
        "{err}"
    );
    std::fs::rename(dir.path().join("revocs.bak"), &revocs).unwrap();
    std::fs::rename(dir.path().join("pubring.kbx.bak"), &ring).unwrap();
    assert_eq!(shown()["fingerprint"], first["fingerprint"]);
    // A key directory that is a file, or holds other files: the dry run refuses it as
    // the real run does.
    std::fs::write(dir.path().join("plain"), "x").unwrap();
    std::fs::create_dir(dir.path().join("busy")).unwrap();
    std::fs::write(dir.path().join("busy/notes.txt"), "x").unwrap();
    for (keys_dir, said) in [("plain", "is not a directory"), ("busy", "holds files")] {
        let out = devos_build_command()
            .env("DEVOS_KEYS", dir.path().join(keys_dir))
            .args(["keys", "generate", "--dry-run"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{keys_dir}: {err}");
        assert!(err.contains(said), "{keys_dir}: {err}");
    }
    // `keys show` does not send the user to a `keys generate` that would refuse.
    let out = devos_build_command()
        .env("DEVOS_KEYS", dir.path().join("busy"))
        .args(["keys", "show"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("would refuse it") && err.contains("name a new or empty directory"),
        "{err}"
    );

    // A dry run of a build refuses what the build's first stage would: a Secure Boot
    // key others can read, an `[update] key` this builder does not sign with.
    let default_spec = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/devos-debian.toml"),
    )
    .unwrap();
    let spec = |key: &str| {
        let path = dir.path().join("signed.toml");
        let text = default_spec.replace("verity = true\n", "verity = true\nsecure-boot = true\n")
            + &format!(
                "\n[update]\nurl = \"https://updates.example.com/devos/\"\nkey = \"{key}\"\n"
            );
        std::fs::write(&path, text).unwrap();
        path
    };
    let dry_build = |spec: &Path, keys_dir: &str| {
        let out = devos_build_command()
            .env("DEVOS_KEYS", dir.path().join(keys_dir))
            .args(["image", "build"])
            .arg(spec)
            .arg("--dry-run")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let set_mode = |mode| {
        std::fs::set_permissions(
            &boot_key,
            std::os::unix::fs::PermissionsExt::from_mode(mode),
        )
        .unwrap()
    };
    set_mode(0o644);
    let (code, err) = dry_build(&spec("k.pgp"), "keys");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("can be read by others (mode 644)"), "{err}");
    set_mode(0o600);
    let other = |args: &[&std::ffi::OsStr]| {
        devos_build_command()
            .env("DEVOS_KEYS", dir.path().join("other-keys"))
            .arg("keys")
            .args(args)
            .output()
            .unwrap()
    };
    assert!(
        other(&["generate".as_ref(), "--export".as_ref(), &path("other.pgp")])
            .status
            .success()
    );
    let (code, err) = dry_build(&spec("other.pgp"), "keys");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("but this builder signs with"), "{err}");

    // A certificate that is not the key's (two backups mixed): `keys show` and the dry
    // run refuse it, before anything is signed.
    let cert = dir.path().join("keys/secure-boot.crt");
    let ours = std::fs::read(&cert).unwrap();
    std::fs::copy(dir.path().join("other-keys/secure-boot.crt"), &cert).unwrap();
    let (code, _, err) = keys(&["show".as_ref()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("is not the certificate of secure-boot.key"),
        "{err}"
    );
    let (code, err) = dry_build(&spec("k.pgp"), "keys");
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("is not the certificate of secure-boot.key"),
        "{err}"
    );
    // The key kept in the certificate's file too (a common combined layout): refused,
    // so that no private key is ever recorded in a manifest.
    let key_pem = std::fs::read(&boot_key).unwrap();
    std::fs::write(&cert, [key_pem.as_slice(), ours.as_slice()].concat()).unwrap();
    let (code, _, err) = keys(&["show".as_ref()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("must hold one PEM certificate and nothing else"),
        "{err}"
    );
    std::fs::write(&cert, &ours).unwrap();
    // The key as a link (root would say what lies where it points) or a FIFO (which
    // would hang a reader): refused.
    let kept = dir.path().join("kept.key");
    std::fs::rename(&boot_key, &kept).unwrap();
    std::os::unix::fs::symlink(&kept, &boot_key).unwrap();
    let (code, err) = dry_build(&spec("k.pgp"), "keys");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("is not a plain file"), "{err}");
    std::fs::remove_file(&boot_key).unwrap();
    devos_tests::mkfifo(&boot_key);
    let (code, _, err) = keys(&["show".as_ref()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("it is not a file"), "{err}");
    std::fs::remove_file(&boot_key).unwrap();
    std::fs::rename(&kept, &boot_key).unwrap();
    let (code, _, err) = keys(&["show".as_ref()]);
    assert_eq!(code, Some(0), "{err}");
    // No Secure Boot key at all: `keys show` says so and how to make one.
    for f in ["secure-boot.key", "secure-boot.crt"] {
        std::fs::remove_file(dir.path().join("other-keys").join(f)).unwrap();
    }
    let shown = other(&["show".as_ref()]);
    assert!(shown.status.success());
    assert!(
        String::from_utf8_lossy(&shown.stdout).contains("secure boot: no key yet"),
        "{}",
        String::from_utf8_lossy(&shown.stdout)
    );
}

/// Under sudo the signing key stays the invoking user's: gpg runs as them, so all it
/// makes is theirs and their own `keys show` reads it. A key directory in their home
/// that leads to a directory not theirs is refused and left as it was; two
/// `keys generate` at once make one key.
#[test]
fn the_signing_key_made_under_sudo_is_the_invoking_users() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    devos_tests::require("gpg", "gnupg");
    devos_tests::require("setpriv", "util-linux");
    let user = devos_tests::sudo::SudoUser::new("k");
    let bin = user.install(Path::new(env!("CARGO_BIN_EXE_devos-build")));
    let text = |out: &Output| String::from_utf8_lossy(&out.stderr).into_owned();
    let keys = user.home().join(".local/share/devos/keys");
    let public = user.home().join("update-key.pgp");

    let made = user.sudo(
        &bin,
        &["keys", "generate", "--export", public.to_str().unwrap()],
    );
    assert!(made.status.success(), "{}", text(&made));
    for entry in walkdir::WalkDir::new(user.home().join(".local")) {
        let entry = entry.unwrap();
        let meta = entry.path().symlink_metadata().unwrap();
        assert_eq!(
            meta.uid(),
            user.uid,
            "{} is not the user's",
            entry.path().display()
        );
    }
    assert_eq!(keys.metadata().unwrap().mode() & 0o777, 0o700);
    assert_eq!(
        keys.join("secure-boot.key").metadata().unwrap().mode() & 0o777,
        0o600
    );
    assert_eq!(public.metadata().unwrap().uid(), user.uid);
    // With a key there, a dry run refuses as the real run does.
    let dry = user.sudo(&bin, &["keys", "generate", "--dry-run"]);
    assert_eq!(dry.status.code(), Some(1), "{}", text(&dry));
    assert!(
        text(&dry).contains("already holds the signing key"),
        "{}",
        text(&dry)
    );
    let shown = user.run(&bin, &["keys", "show", "--json"]);
    assert!(shown.status.success(), "{}", text(&shown));
    let shown = user.sudo(&bin, &["keys", "export", public.to_str().unwrap()]);
    assert!(shown.status.success(), "{}", text(&shown));

    // Exported through a link in their home to root's directory: the file stays root's
    // (what is given to the user is what lies in their home, not what is named there).
    let elsewhere = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(elsewhere.path(), user.home().join("elsewhere")).unwrap();
    let through = user.home().join("elsewhere/k.pgp");
    let out = user.sudo(&bin, &["keys", "export", through.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(elsewhere.path().join("k.pgp").metadata().unwrap().uid(), 0);

    // Their key directory replaced by a link to root's: refused, nothing changed there.
    let theirs = user.home().join("keys.moved");
    std::fs::rename(&keys, &theirs).unwrap();
    let roots = tempfile::tempdir().unwrap();
    std::fs::set_permissions(roots.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink(roots.path(), &keys).unwrap();
    user.give(&keys);
    let refused = user.sudo(&bin, &["keys", "generate"]);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(
        text(&refused).contains("belongs to uid 0, not to uid"),
        "{}",
        text(&refused)
    );
    let meta = roots.path().metadata().unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o755));
    assert_eq!(std::fs::read_dir(roots.path()).unwrap().count(), 0);

    // Named (DEVOS_KEYS kept by sudo) in a directory that is not theirs: not given to
    // them, refused, and not left there.
    let out = user
        .sudo_command(&bin)
        .args(["keys", "generate"])
        .env("DEVOS_KEYS", roots.path().join("new/keys.d"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("would be made in a directory that is not yours"),
        "{}",
        text(&out)
    );
    assert!(!roots.path().join("new").exists(), "left behind");

    // Two at once, in a new directory of their own: one key, one refusal.
    std::fs::remove_file(&keys).unwrap();
    // (Both started before either is waited for.)
    let started: Vec<_> = (0..2)
        .map(|_| {
            let mut c = std::process::Command::new(&bin);
            c.args(["keys", "generate", "--json"])
                .env("DEVOS_KEYS", &keys)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            c.spawn().unwrap()
        })
        .collect();
    let both: Vec<_> = started
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let made: Vec<_> = both.iter().filter(|o| o.status.success()).collect();
    assert_eq!(
        made.len(),
        1,
        "{:?}",
        both.iter().map(text).collect::<Vec<_>>()
    );
    let refused = both.iter().find(|o| !o.status.success()).unwrap();
    assert!(
        text(refused).contains("already holds the signing key"),
        "{}",
        text(refused)
    );
}

/// A registry that `sudo devos-build` had to leave root's (something above it in the
/// user's home is root's, e.g. a `~/.local` an older tool made as root) is named with the
/// `chown` that gives it back, under sudo and again when the user's own run cannot
/// write it (the same directory both times); following that hint is enough. A
/// registry reached through a link in the home to root's directory gets no chown hint.
#[test]
fn a_registry_left_roots_in_the_users_home_says_how_to_give_it_back() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let user = devos_tests::sudo::SudoUser::new("r");
    let bin = user.install(Path::new(env!("CARGO_BIN_EXE_devos-build")));
    let text = |out: &Output| String::from_utf8_lossy(&out.stderr).into_owned();
    let local = user.home().join(".local");
    std::fs::create_dir(&local).unwrap();

    let out = user.sudo(&bin, &["image", "gc"]);
    assert!(out.status.success(), "{}", text(&out));
    let registry = local.join("share/devos/registry.db");
    assert_eq!(registry.metadata().unwrap().uid(), 0);
    let warned = format!("hint: sudo chown -R {}: {}", user.name, local.display());
    assert!(
        text(&out).contains("warning: the registry") && text(&out).contains(&warned),
        "{}",
        text(&out)
    );

    // Their own run: refused before SQLite opens it read-only, naming the same
    // directory. Reading it works and writes nothing, nor anything beside it (no -wal
    // or -shm file: they cannot make one there); root's reading under sudo leaves the
    // registry as it was, SQLite's files beside it the registry owner's.
    let hint = format!("sudo chown -R \"$(id -un):\" {}", local.display());
    let out = user.run(&bin, &["image", "gc"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    for said in ["cannot be written by you", "belongs to root", &hint] {
        assert!(text(&out).contains(said), "{said}: {}", text(&out));
    }
    let beside = || {
        let mut names: Vec<_> = std::fs::read_dir(registry.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names
    };
    let before = (beside(), std::fs::read(&registry).unwrap());
    let out = user.run(&bin, &["image", "list"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("no images in the registry yet"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!((beside(), std::fs::read(&registry).unwrap()), before);
    let out = user.sudo(&bin, &["image", "list", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::read(&registry).unwrap(), before.1);
    for name in beside() {
        let meta = registry.with_file_name(&name).metadata().unwrap();
        assert_eq!(meta.uid(), 0, "{name:?}");
    }
    // And the user reads it again beside root's -wal and -shm.
    let out = user.run(&bin, &["image", "list"]);
    assert!(out.status.success(), "{}", text(&out));

    // Following the hint is enough, and sudo no longer warns.
    let given = std::process::Command::new("chown")
        .args(["-R", &format!("{}:", user.name)])
        .arg(&local)
        .status()
        .unwrap();
    assert!(given.success());
    let out = user.run(&bin, &["image", "gc"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = user.sudo(&bin, &["image", "gc"]);
    assert!(
        out.status.success() && !text(&out).contains("warning"),
        "{}",
        text(&out)
    );

    // Through a link of theirs to root's directory: that directory is not theirs to
    // take, so no chown of it is suggested.
    let roots = tempfile::tempdir().unwrap();
    std::fs::set_permissions(roots.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let devos = local.join("share/devos");
    std::fs::remove_dir_all(&devos).unwrap();
    std::os::unix::fs::symlink(roots.path(), &devos).unwrap();
    user.give(&devos);
    let out = user.sudo(&bin, &["image", "gc"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains("chown"), "{}", text(&out));
    assert_eq!(
        roots.path().join("registry.db").metadata().unwrap().uid(),
        0
    );
    let out = user.run(&bin, &["image", "gc"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("ask root for write access") && !text(&out).contains("chown"),
        "{}",
        text(&out)
    );
}

#[test]
fn validate_refuses_what_a_build_would_refuse_later() {
    let dir = tempfile::tempdir().unwrap();
    let shipped =
        std::fs::read_to_string(devos_tests::repo_root().join("images/devos-debian.toml")).unwrap();
    let validate = |from: &str, to: &str| {
        assert!(shipped.contains(from), "{from}");
        let path = dir.path().join("spec.toml");
        std::fs::write(&path, shipped.replacen(from, to, 1)).unwrap();
        let out = devos_build_command()
            .args(["image", "validate"])
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // NAME_0.2.0_<12 hex>, the verified root's slot name, fits 36 characters up to
    // a 17-character name.
    let name = "name = \"devos-debian\"";
    let (code, err) = validate(name, "name = \"devos-debian-1234\"");
    assert_eq!(code, Some(0), "{err}");
    let (code, err) = validate(name, "name = \"devos-debian-12345\"");
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("spec.toml:7:8: the root slot's partition name `devos-debian-12345_0.2.0_<12 hex of the build id>` (37 characters) is longer than the 36 characters a GPT holds")
            && err.contains("shorten `[image] name` or `version` by 1 character(s)"),
        "{err}"
    );

    let (code, err) = validate("components = [\"main\"]", "components = []");
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("spec.toml:16:14: `components = []` names no archive area"),
        "{err}"
    );
    // With --json, stdout answers too: `valid` false and the error.
    let out = devos_build_command()
        .args(["image", "validate", "--json"])
        .arg(dir.path().join("spec.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["valid"], false, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("names no archive area"),
        "{answer}"
    );

    let (code, err) = validate(
        "components = [\"main\"]",
        "components = [\"main\"]\nkeyring = \"/nonexistent/x.gpg\"",
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("the archive keyring /nonexistent/x.gpg for Debian is missing on this host (`[base] keyring` in"),
        "{err}"
    );

    // What parses but would fail mid-build, found offline: an error where the build
    // surely fails; a warning where it may not (a package may bring tzdata, a suite
    // may be newer than devos-build, a package may make a group).
    // (The shipped spec's timezone line, wherever it is.)
    let timezone_line = 1 + shipped
        .lines()
        .position(|l| l == "timezone = \"UTC\"")
        .unwrap();
    let tzdata = format!(
        "spec.toml:{timezone_line}:12: timezone `Europe/Berlin` needs the package `tzdata`"
    );
    let cases: &[(&str, &str, i32, &[&str])] = &[
        (
            "timezone = \"UTC\"",
            "timezone = \"Europe/Berlin\"",
            0,
            &[&tzdata, "\n  hint: add `tzdata` to `[packages] include`"],
        ),
        (
            "timezone = \"UTC\"",
            "timezone = \"Mars/Olympus\"",
            0,
            &["timezone `Mars/Olympus` is not in"],
        ),
        (
            "timezone = \"UTC\"",
            "timezone = \"../../etc/shadow\"",
            1,
            &["invalid timezone `../../etc/shadow`"],
        ),
        (
            "suite = \"trixie\"",
            "suite = \"noble\"",
            1,
            &["spec.toml:13:9: `noble` is a suite of Ubuntu, not of Debian"],
        ),
        (
            "suite = \"trixie\"",
            "suite = \"trixy\"",
            0,
            &[
                "warning: ",
                "spec.toml:13:9: `trixy` is not a suite devos-build knows for Debian",
                "did you mean `trixie`?",
            ],
        ),
        (
            "groups = [\"sudo\"]",
            "groups = [\"wheel\"]",
            0,
            &["group `wheel` is not in Debian's base system"],
        ),
    ];
    for (from, to, want, said) in cases {
        let (code, err) = validate(from, to);
        assert_eq!(code, Some(*want), "{to}: {err}");
        for s in *said {
            assert!(err.contains(s), "{to}: {err}");
        }
    }

    // A plan and a dry run say the spec's warnings too, before whatever else they meet
    // (here a mirror that does not answer).
    let path = dir.path().join("spec.toml");
    let warned = shipped
        .replacen("timezone = \"UTC\"", "timezone = \"Mars/Olympus\"", 1)
        .replacen(
            "suite = \"trixie\"",
            "suite = \"trixie\"\nmirror = \"http://127.0.0.1:9/debian\"",
            1,
        );
    std::fs::write(&path, warned).unwrap();
    for args in [&["image", "plan"][..], &["image", "build", "--dry-run"]] {
        let (_, _, err) = run(devos_build_command().args(args).arg(&path));
        assert!(
            err.contains("warning: ") && err.contains("timezone `Mars/Olympus` is not in"),
            "{args:?}: {err}"
        );
    }
}

fn run(cmd: &mut std::process::Command) -> (Option<i32>, String, String) {
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn an_empty_devos_config_means_the_default_settings_file() {
    // `publish list` reads the settings (AWS commands all do) and asks AWS nothing.
    let (code, out, err) = run(devos_build_command()
        .env("DEVOS_CONFIG", "")
        .env("DEVOS_REGISTRY", "")
        .args(["publish", "list"]));
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("nothing published"), "{out}");
    assert!(!err.contains("settings file"), "{err}");
    // A named file that is missing is an error that says what to do.
    let (code, _, err) = run(devos_build_command()
        .env("DEVOS_CONFIG", "/nonexistent/devos.toml")
        .env("DEVOS_REGISTRY", "")
        .args(["publish", "list"]));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("cannot read the settings file /nonexistent/devos.toml")
            && err.contains("hint:"),
        "{err}"
    );
}

#[test]
fn stack_and_region_names_are_checked_where_the_command_line_is_read() {
    for (args, said) in [
        (
            &["fleet", "status", "--stack", "my stack"][..],
            "`my stack` is not a CloudFormation stack name",
        ),
        (
            &["fleet", "rollout", "--stack", "dev_fleet", "--to", "1.0.0"],
            "`dev_fleet` is not a CloudFormation stack name",
        ),
        (
            &[
                "fleet",
                "rollout",
                "--stack",
                "devfleet",
                "--to",
                "1.0.0",
                "--canary-stack",
                "1canary",
            ],
            "`1canary` is not a CloudFormation stack name",
        ),
        (
            &["fleet", "history", "--stack", "x".repeat(129).leak()],
            "is not a CloudFormation stack name",
        ),
        (
            &[
                "fleet",
                "status",
                "--stack",
                "devfleet",
                "--region",
                "eu west 1",
            ],
            "`eu west 1` is not a region name",
        ),
        (
            &[
                "publish",
                "promote",
                "x@1.0.0",
                "--region",
                "us-east-1,,eu-west-1",
            ],
            "an empty region name",
        ),
        (
            &[
                "publish", "updates", "x@1.0.0", "--to", "s3://b/p", "--region", "EU",
            ],
            "`EU` is not a region name",
        ),
        (
            &["publish", "updates", "x@1.0.0", "--to", ""],
            "`` is not a feed",
        ),
        (
            &["publish", "packer", "x@1.0.0", "--var", "region=eu-west-1"],
            "the region is not a --var",
        ),
        (
            &["publish", "packer", "x@1.0.0", "--var", "nokv"],
            "`nokv` is not NAME=VALUE",
        ),
        (
            &[
                "publish",
                "packer",
                "x@1.0.0",
                "--var",
                "instance_typo=t3.large",
            ],
            "the Packer template has no variable `instance_typo`",
        ),
    ] {
        let (code, _, err) = run(devos_build_command().args(args));
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(
            err.contains(said) && err.contains("hint: "),
            "{args:?}: {err}"
        );
    }
    // A region from the environment is checked as the flag is, naming where it came
    // from: by the commands that need one without AWS and those that ask AWS alike.
    for (var, args) in [
        ("AWS_REGION", &["packer", "render", "x@1.0.0"][..]),
        ("AWS_REGION", &["fleet", "status", "--stack", "s1"][..]),
        (
            "AWS_DEFAULT_REGION",
            &["fleet", "status", "--stack", "s1"][..],
        ),
    ] {
        // (An empty file reads as an empty registry.)
        let registry = tempfile::NamedTempFile::new().unwrap();
        let (code, _, err) = run(devos_build_command()
            .env_remove("AWS_REGION")
            .env_remove("AWS_DEFAULT_REGION")
            .env("DEVOS_REGISTRY", registry.path())
            .env("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
            .env("AWS_SECRET_ACCESS_KEY", "secret")
            .env(var, "eu west 1")
            .args(args));
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(
            err.contains(&format!(
                "{var} names `eu west 1`, which is not a region name"
            )) && err.contains("hint:"),
            "{args:?}: {err}"
        );
    }
    // What CloudFormation takes passes (and fails later, on what is not there).
    let (_, _, err) = run(devos_build_command().args([
        "fleet",
        "history",
        "--stack",
        "Dev-Fleet-2",
        "--region",
        "us-gov-west-1",
    ]));
    assert!(!err.contains("is not a"), "{err}");
}

#[test]
fn an_endpoint_url_that_is_not_a_web_url_is_refused_before_aws_is_asked() {
    for args in [
        &[
            "publish",
            "ami",
            "devos-debian",
            "--endpoint-url",
            "not-a-url",
        ][..],
        &[
            "publish",
            "deregister",
            "x@1.0.0",
            "--endpoint-url",
            "localhost:4566",
        ],
        &[
            "fleet",
            "status",
            "--stack",
            "x",
            "--endpoint-url",
            "ftp://host",
        ],
    ] {
        let (code, _, err) = run(devos_build_command().args(args));
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(
            err.contains("is not an http(s) URL") && err.contains("hint: write it as https://"),
            "{args:?}: {err}"
        );
        // The message, not the SDK's structures.
        assert!(
            !err.contains('{') && !err.contains("SdkBody"),
            "{args:?}: {err}"
        );
    }
    // The SDK's own variable is checked before any request (the SDK would put the whole
    // request in its error).
    let (code, _, err) = run(devos_build_command()
        .env("DEVOS_REGISTRY", "")
        .env("AWS_ENDPOINT_URL", "not-a-url")
        .env("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
        .env("AWS_SECRET_ACCESS_KEY", "secret")
        .args(["fleet", "status", "--stack", "x", "--region", "eu-west-1"]));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("AWS_ENDPOINT_URL=`not-a-url` is not an http(s) URL")
            && err.contains("hint:")
            && !err.contains("SdkBody"),
        "{err}"
    );
}

#[test]
fn image_builds_boot_test_flags_need_test() {
    // clap refuses these before anything is read or built.
    for flag in [
        &["--junit", "x.xml"][..],
        &["--keep-vm"],
        &["--timeout", "10"],
        &["--disk-bus", "nvme"],
        &["--memory", "512"],
        &["--cpus", "1"],
    ] {
        let (code, _, err) = run(devos_build_command()
            .args(["image", "build"])
            .args(flag)
            .arg("/nonexistent/spec.toml"));
        assert_eq!(code, Some(2), "{flag:?}: {err}");
        assert!(
            err.contains("required arguments were not provided") && err.contains("--test"),
            "{flag:?}: {err}"
        );
        // A dry run boots nothing: they are refused there too, not ignored.
        let (code, _, err) = run(devos_build_command()
            .args(["image", "build", "--dry-run"])
            .args(flag)
            .arg("/nonexistent/spec.toml"));
        assert_eq!(code, Some(2), "--dry-run {flag:?}: {err}");
        assert!(
            err.contains("cannot be used with") && err.contains("--dry-run"),
            "--dry-run {flag:?}: {err}"
        );
    }
}

#[test]
fn a_junit_path_that_cannot_be_written_fails_before_anything_boots() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("no/such/dir/report.xml");
    // The target does not exist either: the flag is checked first, so nothing could
    // boot even if the target were found.
    let (code, _, err) = run(devos_build_command()
        .args(["image", "test", "/nonexistent/disk.raw", "--junit"])
        .arg(&report));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("--junit {}", report.display()))
            && err.contains("does not exist")
            && err.contains("hint:"),
        "{err}"
    );
    let (code, _, err) = run(devos_build_command()
        .args(["image", "build", "--test", "--junit"])
        .arg(&report)
        .arg("/nonexistent/spec.toml"));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("--junit") && err.contains("does not exist"),
        "{err}"
    );
}

#[test]
fn an_agent_package_that_cannot_be_read_is_refused_before_anything_is_resolved() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("agent.deb");
    std::fs::write(&junk, "junk").unwrap();
    let spec = devos_tests::repo_root().join("images/devos-debian.toml");
    for (deb, said) in [
        (dir.path().join("none.deb"), "no such file"),
        (junk, "not a Debian package dpkg-deb can read"),
    ] {
        for command in ["build", "plan"] {
            let (code, _, err) = run(devos_build_command()
                .env("DEVOS_REGISTRY", dir.path().join("r.db"))
                .args(["image", command])
                .arg(&spec)
                .arg("--agent-deb")
                .arg(&deb));
            assert_eq!(code, Some(1), "{command}: {err}");
            assert!(
                err.contains(&format!("--agent-deb {}: {said}", deb.display()))
                    && err.contains("hint: "),
                "{command}: {err}"
            );
            // Nothing was resolved: no mirror was asked.
            assert!(!err.contains("packages from"), "{command}: {err}");
        }
    }
}

/// One `--out` used for two versions holds only the newer: testing the older by name
/// would boot the newer's disk and record it against the older.
#[test]
fn a_version_whose_output_now_holds_another_is_not_booted_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("current");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("disk.raw"), vec![0u8; 4096]).unwrap();
    let registry = dir.path().join("r.db");
    let spec = devos_tests::repo_root().join("images/devos-debian.toml");
    let mut reg = devos_build::store::registry::Registry::open(&registry).unwrap();
    for version in ["0.1.0+aaaaaaaaaaaa", "0.1.1+bbbbbbbbbbbb"] {
        let manifest = serde_json::json!({
            "name": "devos-debian", "version": version,
            "build_id": format!("{:0>64}", version.replace(['.', '+'], "")),
            "description": "test", "distro": "debian", "suite": "trixie",
            "builder_version": "test", "source_date_epoch": 0, "kernel_cmdline": "",
            "inputs": [], "package_sources": "", "packages": [], "partitions": [],
            "artifacts": [{"file": "disk.raw", "format": "raw", "sha256": "0", "size": 4096, "used_bytes": 0}],
            "stages": [], "cache_keys": {"base": "", "tree": ""}
        });
        std::fs::write(out.join("manifest.json"), manifest.to_string()).unwrap();
        reg.record_build(&out, &spec, &serde_json::from_value(manifest).unwrap(), &[])
            .unwrap();
    }
    drop(reg);
    let (code, _, err) = run(devos_build_command()
        .env("DEVOS_REGISTRY", &registry)
        .args(["image", "test", "devos-debian@0.1.0"]));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "devos-debian@0.1.0+aaaaaaaaaaaa's output directory {} now holds devos-debian@0.1.1+bbbbbbbbbbbb",
            out.display()
        )) && err.contains("hint: test devos-debian@0.1.1+bbbbbbbbbbbb"),
        "{err}"
    );
}

#[test]
fn a_file_that_is_no_disk_image_is_refused_before_anything_boots() {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in [
        ("key.pgp", b"junk\n".to_vec()),
        ("disk.raw", vec![0u8; 4096]),
        ("disk.qcow2", b"QFI".to_vec()),
        ("disk.vmdk", vec![7u8; 2048]),
        ("disk.vhd", vec![0u8; 1024]),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        for command in ["test", "boot"] {
            let (code, _, err) = run(devos_build_command().args(["image", command]).arg(&path));
            assert_eq!(code, Some(1), "{command} {name}: {err}");
            assert!(
                err.contains(&format!("{} is not a disk image", path.display()))
                    && err.contains("hint: pass an image output directory"),
                "{command} {name}: {err}"
            );
        }
    }
}

#[test]
fn publish_ami_checks_regions_and_the_ami_name_up_front() {
    // Dry runs, with a reference the registry does not have: the flags are checked
    // before the registry (or AWS) is asked.
    let ami = |extra: &[&str]| {
        run(devos_build_command()
            .env("DEVOS_REGISTRY", "")
            .args(["publish", "ami", "devos-debian", "--dry-run"])
            .args(extra))
    };
    // A region given on the command line is checked where the command line is read
    // (exit 2, as for any flag clap refuses).
    for (extra, want) in [
        (
            &["--region", "bad region"][..],
            "`bad region` is not a region name",
        ),
        (
            &[
                "--region",
                "eu-west-1",
                "--copy-to",
                "us-east-1,,eu-central-1",
            ],
            "an empty region name",
        ),
        (
            &["--region", "eu-west-1", "--copy-to", "us-east-1,bad region"],
            "`bad region` is not a region name",
        ),
        (
            &["--region", "eu-west-1", "--name", "bad name+with/plus"],
            "`bad name+with/plus` is not a valid AMI name",
        ),
        (&["--region", "eu-west-1", "--name", "ab"], "3 to 128"),
    ] {
        let (code, _, err) = ami(extra);
        assert_eq!(code, Some(2), "{extra:?}: {err}");
        assert!(
            err.contains(extra[extra.len() - 2]) && err.contains(want) && err.contains("hint:"),
            "{extra:?}: {err}"
        );
    }
    // Good values get past the checks, to the registry.
    let (code, _, err) = ami(&[
        "--region",
        "eu-west-1",
        "--copy-to",
        "us-east-1",
        "--name",
        "My AMI (v1)",
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        !err.contains("hint: a region name") && !err.contains("AMI name"),
        "{err}"
    );
}

#[test]
fn image_test_of_a_directory_without_a_manifest_says_what_to_pass() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = run(devos_build_command()
        .args(["image", "test"])
        .arg(dir.path()));
    assert_eq!(code, Some(1), "{err}");
    let last = err.trim_end().lines().last().unwrap_or_default();
    assert!(
        err.contains(&format!(
            "cannot read {}",
            dir.path().join("manifest.json").display()
        )) && last.starts_with("  hint:")
            && last.contains("NAME@VERSION")
            && last.contains("image build"),
        "{err}"
    );
}

#[test]
fn a_spec_that_is_a_directory_has_no_fake_position() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = run(devos_build_command()
        .args(["image", "plan"])
        .arg(dir.path()));
    assert_eq!(code, Some(1), "{err}");
    assert!(!err.contains(":0:0"), "{err}");
    assert!(
        err.contains("hint:") && err.contains("pass a .toml spec file"),
        "{err}"
    );
    // The default spec is relative to the current directory.
    let (code, _, err) = run(devos_build_command()
        .current_dir(dir.path())
        .args(["image", "plan"]));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("images/devos-debian.toml: cannot read the spec")
            && err.contains("run from the repository root"),
        "{err}"
    );
}

#[test]
fn image_boot_checks_its_arguments_before_it_boots_anything() {
    // The image does not exist either: the key is checked first, and nothing is probed
    // or announced.
    let (code, _, err) = run(devos_build_command().args([
        "image",
        "boot",
        "no-such-image",
        "--ssh-port",
        "2222",
        "--ssh-key",
        "/nonexistent/key.pub",
    ]));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("cannot read the SSH public key /nonexistent/key.pub")
            && err
                .trim_end()
                .lines()
                .last()
                .unwrap_or_default()
                .starts_with("  hint:"),
        "{err}"
    );
    assert!(
        !err.contains("booting") && !err.contains("accelerator"),
        "{err}"
    );
    // Zero, and a machine no firmware boots or QEMU makes, are refused where the
    // command line is read.
    for (command, flag, value) in [
        (&["image", "boot", "x"][..], "--ssh-port", "0"),
        (&["image", "boot", "x"], "--memory", "0"),
        (&["image", "boot", "x"], "--memory", "16"),
        (&["image", "boot", "x"], "--cpus", "0"),
        (&["image", "boot", "x"], "--cpus", "999"),
        (&["image", "test", "x"], "--memory", "0"),
        (&["image", "test", "x"], "--memory", "255"),
        (&["image", "test", "x"], "--cpus", "0"),
        (&["image", "test", "x"], "--cpus", "289"),
        (&["image", "test", "x"], "--timeout", "0"),
    ] {
        let (code, _, err) = run(devos_build_command().args(command).args([flag, value]));
        assert_eq!(code, Some(2), "{command:?} {flag} {value}: {err}");
        assert!(
            err.contains(flag) && err.contains(value),
            "{command:?} {flag} {value}: {err}"
        );
    }
}

/// devos-build with the default registry, in a data directory `dir` of the test's.
fn with_empty_registry(dir: &Path) -> std::process::Command {
    let mut c = devos_build_command();
    c.env("DEVOS_REGISTRY", "").env("XDG_DATA_HOME", dir);
    c
}

#[test]
fn local_checks_come_before_aws_credentials() {
    // No AWS credentials anywhere (devos_build_command isolates them), an empty registry:
    // every command below must fail on what it can tell locally, never on credentials.
    let dir = tempfile::tempdir().unwrap();
    let run_args = |args: &[&str]| {
        run(with_empty_registry(dir.path())
            .env("AWS_REGION", "eu-west-1")
            .args(args))
    };
    let local = |args: &[&str], expect: &str| {
        let (code, out, err) = run_args(args);
        assert_eq!(code, Some(1), "{args:?}: {out}{err}");
        assert!(!err.contains("credentials"), "{args:?}: {err}");
        assert!(err.contains(expect), "{args:?}: {err}");
        assert!(err.contains("\n  hint: "), "{args:?}: {err}");
    };
    local(
        &[
            "publish",
            "updates",
            "devos-debian@9.9.9",
            "--to",
            "s3://bucket/prefix",
            "--dry-run",
        ],
        "no image `devos-debian` in the registry",
    );
    let deploy = |param: &'static str| {
        vec![
            "fleet",
            "deploy",
            "--stack",
            "s",
            "--template",
            "fleet",
            "--image",
            "devos-debian@9.9.9",
            "--param",
            param,
        ]
    };
    // Not KEY=VALUE at all: refused where the command line is read.
    let (code, _, err) = run_args(&deploy("Foo"));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("`Foo` is not KEY=VALUE") && err.contains("hint:"),
        "{err}"
    );
    // The workspaces template cannot be deployed by this command: wrong usage.
    let mut workspaces = deploy("InstanceType=t3.small");
    workspaces[5] = "workspaces";
    let (code, _, err) = run_args(&workspaces);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("the workspaces template needs a WorkSpaces bundle")
            && err.contains("hint: follow docs/fleet.md")
            && !err.contains("credentials"),
        "{err}"
    );
    local(
        &deploy("ImageId=ami-12345678"),
        "--param ImageId: set by --image, not by --param",
    );
    local(
        &deploy("NoSuchParam=1"),
        "--param NoSuchParam: the fleet template has no such parameter",
    );
    // Parameters that are right: the registry is asked next (still before AWS).
    local(
        &deploy("InstanceType=t3.small"),
        "no image `devos-debian` in the registry",
    );
    local(
        &[
            "fleet",
            "rollout",
            "--stack",
            "s",
            "--to",
            "1.0.0",
            "--canary-stack",
            "s",
        ],
        "--canary-stack s is the stack being rolled out (--stack s)",
    );
    local(
        &[
            "fleet",
            "rollout",
            "--stack",
            "s",
            "--to",
            "devos-debian@9.9.9",
        ],
        "no image `devos-debian` in the registry",
    );
}

#[test]
fn empty_results_and_odd_arguments_are_said_plainly() {
    let dir = tempfile::tempdir().unwrap();
    let run_args = |args: &[&str]| run(with_empty_registry(dir.path()).args(args));
    // Nothing recorded: a line says so, as `publish list` does; JSON stays a list.
    let (code, out, err) = run_args(&["fleet", "history"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "no deploys, rollouts or rollbacks recorded yet\n");
    let (code, out, err) = run_args(&["fleet", "history", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.trim(), "[]");
    // An empty version after `@` is no prefix of every version, nor an empty name
    // any image: refused as the command line is read (exit 2), on every command that
    // takes a version; a manual page of no command is wrong usage too.
    for (args, said) in [
        (
            &["image", "show", "devos-debian@"][..],
            "`devos-debian@` names no version after the `@`",
        ),
        (
            &["image", "diff", "devos-debian", "@0.2.0"],
            "`@0.2.0` names no image before the `@`",
        ),
        (&["publish", "ami", "devos-debian@"], "names no version"),
        (
            &["fleet", "render", "fleet", "--image", "@1"],
            "names no image",
        ),
        (
            &["fleet", "rollback", "--stack", "s", "--to", "x@"],
            "names no version",
        ),
        (&["image", "test", "x@"], "names no version"),
        (&["image", "boot", "@1"], "names no image"),
        (
            &["fleet", "rollout", "--stack", "s", "--to", "x@"],
            "names no version",
        ),
        (
            &["man", "image", "nope"],
            "`devos-build image nope` is not a command",
        ),
    ] {
        let (code, _, err) = run_args(args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(
            err.contains(said) && err.contains("  hint: "),
            "{args:?}: {err}"
        );
    }
    // `cache prune` names what it freed as `image gc` does; `cache status`'s
    // `entries` is the list.
    let cache = dir.path().join("cache");
    let out = with_empty_registry(dir.path())
        .env("DEVOS_CACHE_DIR", &cache)
        .args(["cache", "prune", "--dry-run", "--json"])
        .output()
        .unwrap();
    let pruned: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(pruned["entries_removed"], 0, "{pruned}");
    assert_eq!(pruned["freed_bytes"], 0, "{pruned}");
    let out = with_empty_registry(dir.path())
        .env("DEVOS_CACHE_DIR", &cache)
        .args(["cache", "status", "--json"])
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(status["entries"].is_array(), "{status}");
    // A negative --keep is a count that is wrong, not a flag to escape with `--`.
    for args in [
        &["image", "gc", "--keep", "-1", "--dry-run"][..],
        &["cache", "prune", "--keep=-1", "--dry-run"],
    ] {
        let (code, _, err) = run_args(args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(
            err.contains("`-1` is not a count of versions or entries to keep")
                && err.contains("hint: give a whole number, 0 or more")
                && !err.contains("-- -1"),
            "{args:?}: {err}"
        );
    }
}
