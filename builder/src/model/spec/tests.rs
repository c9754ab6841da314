use super::*;

const FULL: &str = r#"
[image]
name = "devos-test"
version = "1.2.3-rc.1"
description = "every field"

[base]
distro = "debian"
suite = "bookworm"
mirror = "http://mirror.example/debian/"
components = ["main", "contrib"]
keyring = "/usr/share/keyrings/test.gpg"

[packages]
include = ["systemd-sysv", "dbus", "tzdata"]
layers = ["layers/one.toml"]

[system]
hostname = "box-1"
kernel-cmdline = " console=ttyS0 "
timezone = "Europe/Berlin"

[[users]]
name = "dev"
groups = ["sudo", "adm"]
ssh-authorized-keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDevOsTestKey dev@host"]

[disk]
size = "3G"
root-fs = "erofs"

[output]
formats = ["qcow2", "vmdk", "vhd"]

[agent]
enable = false

[agent.config]
log-level = "debug"

[[tests]]
name = "true"
run = "true"

[[tests]]
name = "exit-3"
run = "exit 3"
expect-exit = 3
"#;

/// A spec directory with `layers/one.toml`, and the spec written as `spec.toml`.
fn fixture(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("layers")).unwrap();
    std::fs::write(
        dir.path().join("layers/one.toml"),
        "description = \"one\"\n[packages]\ninclude = [\"git\", \"dbus\"]\n",
    )
    .unwrap();
    let path = dir.path().join("spec.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

fn error(text: &str) -> SpecError {
    let (_dir, path) = fixture(text);
    load(&path).expect_err("the spec should be rejected")
}

/// Replace `from` (which must occur once) in the full spec.
fn with(from: &str, to: &str) -> String {
    assert_eq!(FULL.matches(from).count(), 1, "{from}");
    FULL.replace(from, to)
}

#[test]
fn every_field_is_read() {
    let (_dir, path) = fixture(FULL);
    let s = load(&path).unwrap();
    assert_eq!(s.name, "devos-test");
    assert_eq!(s.version.to_string(), "1.2.3-rc.1");
    assert_eq!(s.description, "every field");
    assert_eq!(s.distro, Distro::Debian);
    assert_eq!(s.suite, "bookworm");
    assert_eq!(s.mirror.as_deref(), Some("http://mirror.example/debian"));
    assert_eq!(s.components, ["main", "contrib"]);
    assert_eq!(
        s.keyring.as_deref(),
        Some(Path::new("/usr/share/keyrings/test.gpg"))
    );
    assert_eq!(s.packages, ["systemd-sysv", "dbus", "tzdata"]);
    assert_eq!(s.layers[0].name, "layers/one.toml");
    assert_eq!(s.layers[0].packages, ["git", "dbus"]);
    // The agent is off here, so nothing of its is added.
    assert_eq!(s.all_packages(), ["dbus", "git", "systemd-sysv", "tzdata"]);
    let with_agent = crate::model::spec::Spec {
        agent_enabled: true,
        ..s.clone()
    };
    // With it, what it needs comes too (bubblewrap builds its sandboxes).
    assert_eq!(
        with_agent.all_packages(),
        [
            "bubblewrap",
            "ca-certificates",
            "dbus",
            "git",
            "libsqlite3-0",
            "systemd-sysv",
            "tzdata"
        ]
    );
    assert_eq!(s.hostname, "box-1");
    assert_eq!(s.kernel_cmdline, "console=ttyS0");
    assert_eq!(s.timezone, "Europe/Berlin");
    assert_eq!(s.users[0].name, "dev");
    assert_eq!(s.users[0].groups, ["sudo", "adm"]);
    assert_eq!(s.users[0].ssh_authorized_keys.len(), 1);
    assert_eq!(s.users[0].password_hash, None);
    assert_eq!(s.disk_size, 3 << 30);
    assert_eq!(s.root_fs, RootFs::Erofs);
    assert_eq!(
        s.formats,
        [Format::Raw, Format::Qcow2, Format::Vmdk, Format::Vhd]
    );
    assert!(!s.agent_enabled);
    assert_eq!(
        s.agent_config.log_level,
        devos_agent::config::LogLevel::Debug
    );
    assert_eq!(s.tests.len(), 2);
    assert_eq!(s.tests[1].expect_exit, 3);
}

#[test]
fn defaults_fill_a_minimal_spec() {
    let (_dir, path) =
        fixture("[image]\nname = \"m\"\nversion = \"0.1.0\"\n[base]\ndistro = \"ubuntu\"\n");
    let s = load(&path).unwrap();
    assert_eq!(s.suite, "noble");
    assert_eq!(s.mirror, None);
    assert_eq!(s.components, ["main"]);
    assert_eq!(s.hostname, "m");
    assert_eq!(s.timezone, "UTC");
    assert_eq!(s.disk_size, 2 << 30);
    assert_eq!(s.root_fs, RootFs::Ext4);
    assert_eq!(s.formats, [Format::Raw, Format::Qcow2]);
    assert!(s.agent_enabled);
}

#[test]
fn shipped_specs_load() {
    let images = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images");
    for spec in ["devos-debian.toml", "devos-ubuntu.toml", "devos-nixos.toml"] {
        load(&images.join(spec)).unwrap_or_else(|e| panic!("{spec}: {e}"));
    }
    for layer in std::fs::read_dir(images.join("layers")).unwrap() {
        let path = layer.unwrap().path();
        let text = format!(
            "[image]\nname = \"l\"\nversion = \"0.1.0\"\n[base]\ndistro = \"debian\"\n[packages]\nlayers = [\"layers/{}\"]\n",
            path.file_name().unwrap().to_string_lossy()
        );
        parse(&images.join("probe.toml"), &text)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

/// (what is broken, the spec text, line, column, words the message must contain)
fn cases() -> Vec<(&'static str, String, usize, usize, &'static str)> {
    vec![
        (
            "unknown key",
            with("description = \"every field\"", "descripton = \"x\""),
            5,
            1,
            "unknown field `descripton`",
        ),
        (
            "unknown table",
            format!("{FULL}\n[extra]\nx = 1\n"),
            50,
            2,
            "unknown field `extra`",
        ),
        (
            "wrong type",
            with("hostname = \"box-1\"", "hostname = 7"),
            19,
            12,
            "invalid type",
        ),
        (
            "no components",
            with("components = [\"main\", \"contrib\"]", "components = []"),
            11,
            14,
            "`components = []` names no archive area",
        ),
        (
            "bad version",
            with("\"1.2.3-rc.1\"", "\"1.2\""),
            4,
            11,
            "invalid version `1.2`",
        ),
        (
            "version with build metadata",
            with("\"1.2.3-rc.1\"", "\"1.2.3+x\""),
            4,
            11,
            "build metadata",
        ),
        (
            "unknown distro",
            with("distro = \"debian\"", "distro = \"fedora\""),
            8,
            10,
            "unknown distro `fedora`",
        ),
        (
            "missing layer",
            with("layers/one.toml", "layers/nope.toml"),
            16,
            11,
            "cannot read layer `layers/nope.toml`",
        ),
        (
            "bad package",
            with("\"dbus\", \"tzdata\"]", "\"Dbus\", \"tzdata\"]"),
            15,
            28,
            "invalid package name `Dbus`",
        ),
        (
            "bad name",
            with("name = \"devos-test\"", "name = \"Devos Test\""),
            3,
            8,
            "invalid image name",
        ),
        (
            "bad size",
            with("\"3G\"", "\"3 lots\""),
            29,
            8,
            "invalid disk size",
        ),
        ("tiny disk", with("\"3G\"", "\"100M\""), 29, 8, "too small"),
        ("huge disk", with("\"3G\"", "\"65T\""), 29, 8, "too large"),
        (
            "disk past 64 bits",
            with("\"3G\"", "\"99999999999999999999999T\""),
            29,
            8,
            "too large",
        ),
        (
            "bad root-fs",
            with("\"erofs\"", "\"btrfs\""),
            30,
            11,
            "unknown root-fs `btrfs`",
        ),
        (
            "bad format",
            with("\"vhd\"", "\"iso\""),
            33,
            29,
            "unknown format `iso`",
        ),
        (
            "bad ssh key",
            with(
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDevOsTestKey dev@host",
                "hunter2",
            ),
            26,
            24,
            "not an OpenSSH public key",
        ),
        (
            "plain-text password",
            with(
                "groups = [\"sudo\", \"adm\"]",
                "password-hash = \"hunter2\"",
            ),
            25,
            17,
            "not a crypt(5) password hash",
        ),
        (
            "verity without an initrd",
            with("root-fs = \"erofs\"", "root-fs = \"erofs\"\nverity = true").replace(
                "timezone = \"Europe/Berlin\"",
                "timezone = \"Europe/Berlin\"\ninitrd = false",
            ),
            32,
            10,
            "`verity = true` needs an initrd",
        ),
        (
            "secure boot without verity",
            with(
                "root-fs = \"erofs\"",
                "root-fs = \"erofs\"\nsecure-boot = true",
            ),
            31,
            15,
            "`secure-boot = true` needs `verity = true`",
        ),
        (
            "bad exit",
            with("expect-exit = 3", "expect-exit = 300"),
            48,
            15,
            "out of range",
        ),
        (
            "duplicate test",
            with("name = \"exit-3\"", "name = \"true\""),
            46,
            8,
            "used twice",
        ),
        (
            "bad agent config",
            with("log-level = \"debug\"", "log-levels = \"debug\""),
            39,
            1,
            "[agent.config]: unknown field `log-levels`",
        ),
        (
            "agent config value refused by its check",
            with(
                "log-level = \"debug\"",
                "log-level = \"debug\"\nmodel = { temperature = 3.0 }",
            ),
            40,
            11,
            "model.temperature: 3 is outside",
        ),
        (
            "agent config value of the wrong type",
            with(
                "log-level = \"debug\"",
                "log-level = \"debug\"\n[agent.config.sandbox]\ntasks-max = \"lots\"",
            ),
            41,
            13,
            "invalid type",
        ),
        (
            "bad timezone",
            with("Europe/Berlin", "../etc/passwd"),
            21,
            12,
            "invalid timezone",
        ),
        (
            "relative keyring",
            with("/usr/share/keyrings/test.gpg", "test.gpg"),
            12,
            11,
            "not an absolute path",
        ),
        (
            "bad mirror",
            with("http://mirror.example/debian/", "mirror.example"),
            10,
            10,
            "invalid mirror",
        ),
        (
            "a mirror with no host",
            with("http://mirror.example/debian/", "http://"),
            10,
            10,
            "invalid mirror",
        ),
        (
            "a mirror apt cannot read",
            with("http://mirror.example/debian/", "ftp://x/"),
            10,
            10,
            "invalid mirror",
        ),
        (
            "missing table",
            "[image]\nname = \"x\"\nversion = \"1.0.0\"\n".to_owned(),
            1,
            1,
            "missing field `base`",
        ),
        ("not toml", "[image\n".to_owned(), 1, 7, ""),
    ]
}

#[test]
fn every_error_class_is_located_and_hinted() {
    for (what, text, line, col, words) in cases() {
        let e = error(&text);
        let shown = e.to_string();
        assert!(shown.contains(words), "{what}: {shown}");
        assert_eq!((e.line, e.col), (line, col), "{what}: {shown}");
        assert!(
            shown.starts_with(&format!("{}:{line}:{col}: ", e.file.display())),
            "{what}: {shown}"
        );
        if what != "not toml" {
            assert!(e.hint.is_some(), "{what} has no hint: {shown}");
        }
    }
}

#[test]
fn errors_in_a_layer_name_the_layer_file() {
    let (dir, path) = fixture(FULL);
    std::fs::write(
        dir.path().join("layers/one.toml"),
        "[packages]\ninclude = [\"ok\"]\nextra = 1\n",
    )
    .unwrap();
    let e = load(&path).unwrap_err();
    assert!(e.file.ends_with("layers/one.toml"), "{e}");
    assert_eq!(e.line, 3);
}

#[test]
fn missing_spec_file_says_what_to_pass() {
    let e = load(Path::new("/nonexistent/spec.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cannot read the spec") && e.contains("images/devos-debian.toml"),
        "{e}"
    );
}

#[test]
fn a_file_that_cannot_be_read_has_no_position_and_a_hint_for_its_cause() {
    let dir = tempfile::tempdir().unwrap();
    // A directory.
    let e = load(dir.path()).unwrap_err().to_string();
    assert!(!e.contains(":0:0"), "{e}");
    assert!(
        e.starts_with(&format!("{}: cannot read the spec", dir.path().display())),
        "{e}"
    );
    assert!(e.contains("is a directory: pass a .toml spec file"), "{e}");
    // Not UTF-8.
    let latin1 = dir.path().join("latin1.toml");
    std::fs::write(&latin1, b"[image]\nname = \"caf\xe9\"\n").unwrap();
    let e = load(&latin1).unwrap_err().to_string();
    assert!(!e.contains(":0:0"), "{e}");
    assert!(
        e.contains("hint: the file is not UTF-8 text: save it as UTF-8"),
        "{e}"
    );
    // Unreadable (tested by kind: root reads every file).
    let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
    assert!(
        unreadable_hint(&latin1, &denied).contains("check the file's permissions"),
        "{}",
        unreadable_hint(&latin1, &denied)
    );
    // The default spec, from a directory that has none.
    let missing = std::io::Error::from(std::io::ErrorKind::NotFound);
    let hint = unreadable_hint(Path::new(DEFAULT_SPEC), &missing);
    assert!(
        hint.contains("relative to the current directory")
            && hint.contains("run from the repository root"),
        "{hint}"
    );
}

#[test]
fn arbitrary_input_never_panics() {
    // A cheap fuzz: every prefix of the full spec, and byte-level corruptions of it.
    let path = Path::new("fuzz.toml");
    for end in 0..FULL.len() {
        if FULL.is_char_boundary(end) {
            let _ = parse(path, &FULL[..end]);
        }
    }
    let bytes = FULL.as_bytes();
    for (i, garbage) in (0..bytes.len())
        .step_by(7)
        .zip([b'"', b'[', b'=', b'\n', 0xff, b'\\'].iter().cycle())
    {
        let mut b = bytes.to_vec();
        b[i] = *garbage;
        let _ = parse(path, &String::from_utf8_lossy(&b));
    }
}

#[test]
fn canonical_form_ignores_comments_and_key_order() {
    let (_d, a) = fixture(FULL);
    let reordered = FULL.replace(
        "hostname = \"box-1\"\nkernel-cmdline = \" console=ttyS0 \"",
        "# a comment\nkernel-cmdline = \" console=ttyS0 \"\nhostname = \"box-1\"",
    );
    let (_e, b) = fixture(&reordered);
    assert_eq!(canonical(&load(&a).unwrap()), canonical(&load(&b).unwrap()));
    let (_f, c) = fixture(&with("\"box-1\"", "\"box-2\""));
    assert_ne!(canonical(&load(&a).unwrap()), canonical(&load(&c).unwrap()));
}

#[test]
fn sizes() {
    assert_eq!(parse_size("2G"), Some(2 << 30));
    assert_eq!(parse_size("1536M"), Some(1536 << 20));
    assert_eq!(parse_size("2GiB"), Some(2 << 30));
    assert_eq!(parse_size("12"), Some(12));
    assert_eq!(parse_size("G"), None);
    assert_eq!(
        parse_size("99999999999T"),
        Some(u64::MAX),
        "too large, not malformed"
    );
}

/// The keys a table accepts, read from the parser's own "unknown field" error.
fn accepted_keys(text_with_bogus_key: &str) -> Vec<String> {
    let e = parse(Path::new("keys.toml"), text_with_bogus_key).unwrap_err();
    let list = e
        .message
        .split("expected one of ")
        .nth(1)
        .or_else(|| e.message.split("expected ").nth(1));
    list.unwrap_or_else(|| panic!("{e}"))
        .split(", ")
        .flat_map(|k| k.split(" or "))
        .map(|k| k.trim_matches('`').to_owned())
        .collect()
}

#[test]
fn every_key_is_documented_in_docs_spec_md() {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/spec.md"))
            .unwrap();
    let head = "[image]\nname = \"d\"\nversion = \"0.1.0\"\n[base]\ndistro = \"debian\"\n";
    let tables = [
        ("image", "[image]\nbogus = 1\n".to_owned()),
        (
            "base",
            "[image]\nname = \"d\"\nversion = \"0.1.0\"\n[base]\nbogus = 1\n".to_owned(),
        ),
        ("packages", format!("{head}[packages]\nbogus = 1\n")),
        ("system", format!("{head}[system]\nbogus = 1\n")),
        (
            "users",
            format!("{head}[[users]]\nname = \"u\"\nbogus = 1\n"),
        ),
        ("disk", format!("{head}[disk]\nbogus = 1\n")),
        ("output", format!("{head}[output]\nbogus = 1\n")),
        ("agent", format!("{head}[agent]\nbogus = 1\n")),
        ("agent.config", format!("{head}[agent.config]\nbogus = 1\n")),
        (
            "tests",
            format!("{head}[[tests]]\nname = \"t\"\nrun = \"true\"\nbogus = 1\n"),
        ),
        ("files", format!("{head}[files]\nbogus = 1\n")),
        ("update", format!("{head}[update]\nbogus = 1\n")),
    ];
    let mut checked = 0;
    for (table, text) in tables {
        for key in accepted_keys(&text) {
            assert!(
                doc.contains(&format!("`{table}.{key}`")),
                "docs/spec.md does not document `{table}.{key}`"
            );
            checked += 1;
        }
    }
    for key in accepted_keys(&format!("bogus = 1\n{head}")) {
        assert!(
            doc.contains(&format!("## `[{key}]`")) || doc.contains(&format!("## `[[{key}]]`")),
            "no section for [{key}]"
        );
    }
    assert!(checked > 20);
}

/// sudo without a password is asked for, for a member of `sudo` only.
#[test]
fn sudo_without_a_password_is_for_members_of_sudo_who_ask() {
    let (_dir, path) = fixture(FULL);
    assert!(!load(&path).unwrap().users[0].sudo_without_password);
    let (_dir, path) = fixture(&with(
        "groups = [\"sudo\", \"adm\"]",
        "groups = [\"sudo\", \"adm\"]\nsudo-without-password = true",
    ));
    assert!(load(&path).unwrap().users[0].sudo_without_password);
    let e = error(&with(
        "groups = [\"sudo\", \"adm\"]",
        "groups = [\"adm\"]\nsudo-without-password = true",
    ));
    let text = e.to_string();
    assert!(
        text.contains("is not an administrator") && text.contains("sudo-without-password"),
        "{text}"
    );
}

/// On NixOS the administrators' group is `wheel`.
#[test]
fn sudo_without_a_password_takes_wheel_on_nixos() {
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/devos-nixos.toml"),
    )
    .unwrap();
    assert!(shipped.contains("groups = [\"wheel\"]"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("n.toml");
    std::fs::write(
        &path,
        shipped.replacen(
            "groups = [\"wheel\"]",
            "groups = [\"wheel\"]\nsudo-without-password = true",
            1,
        ),
    )
    .unwrap();
    assert!(load(&path).unwrap().users[0].sudo_without_password);
}

#[test]
fn a_password_hash_is_taken_and_only_a_hash() {
    let hash = "$y$j9T$ZS.PTvqAQiVaGuDx6YGKX0$9OOGUIhSZTqoDVr5XVsHZ1Sm2IUaxmZOmxYsgSN8mZ4";
    let (_dir, path) = fixture(&with(
        "groups = [\"sudo\", \"adm\"]",
        &format!("password-hash = \"{hash}\""),
    ));
    assert_eq!(
        load(&path).unwrap().users[0].password_hash.as_deref(),
        Some(hash)
    );
    for bad in [
        "$1$abc$0123456789abcdefghij",
        "$6$salt$a:b0123456789abcdefghij",
        "!",
        "*",
        // No hash after the salt, nothing between the fields, a password after `$6$`.
        "$6$aaaaaaaaaaaaaaaaaaaaaaaa",
        "$6$$$$$$$$$$$$$$$$$$$$$$$$$$",
        "$6$correct.horse.battery.staple",
    ] {
        let e = error(&with(
            "groups = [\"sudo\", \"adm\"]",
            &format!("password-hash = \"{bad}\""),
        ));
        assert!(e.to_string().contains("crypt(5)"), "{bad}: {e}");
    }
}

#[test]
fn extra_trees_and_units_are_checked_where_they_are_written() {
    let (dir, path) = fixture(&format!(
        "{FULL}\n[files]\nextra-trees = [\"tree\", \"tools:/opt/tools\"]\n"
    ));
    std::fs::create_dir_all(dir.path().join("tree/etc")).unwrap();
    std::fs::create_dir(dir.path().join("tools")).unwrap();
    let spec = load(&path).unwrap();
    assert_eq!(spec.extra_trees.len(), 2);
    assert_eq!(spec.extra_trees[0].target, "/");
    assert_eq!(spec.extra_trees[1].target, "/opt/tools");
    assert_eq!(
        spec.extra_trees[1].path,
        dir.path().join("tools").canonicalize().unwrap()
    );
    // The trees' location is not in the canonical form (the build id does not depend
    // on where the checkout is), their contents are (through trees_digest).
    assert!(!canonical(&spec).contains(&dir.path().display().to_string()));
    let before = trees_digest(&spec.extra_trees).unwrap();
    std::fs::write(dir.path().join("tree/etc/x"), "1").unwrap();
    let after = trees_digest(&spec.extra_trees).unwrap();
    assert_ne!(before, after);
    std::fs::set_permissions(
        dir.path().join("tree/etc/x"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    assert_ne!(after, trees_digest(&spec.extra_trees).unwrap());

    for (bad, want) in [
        ("[\"missing\"]", "is not a directory"),
        ("[\"tree:relative\"]", "invalid extra tree"),
        ("[\"tree:/opt/../etc\"]", "invalid extra tree"),
        ("[\":/x\"]", "invalid extra tree"),
    ] {
        let (d, p) = fixture(&format!("{FULL}\n[files]\nextra-trees = {bad}\n"));
        std::fs::create_dir(d.path().join("tree")).unwrap();
        let e = load(&p).unwrap_err();
        assert!(e.message.contains(want), "{bad}: {e}");
        assert!(e.line > 0 && e.hint.is_some(), "{bad}: {e}");
    }
    // A device node, FIFO or socket in a tree would reach the image's root as root
    // made it: only files, directories and symlinks are copied.
    devos_tests::mkfifo(&dir.path().join("tools/pipe"));
    let e = load(&path).unwrap_err();
    assert!(
        e.message.contains("tools/pipe is a FIFO") && e.hint.is_some(),
        "{e}"
    );
    std::fs::remove_file(dir.path().join("tools/pipe")).unwrap();
    for bad in [
        "\"x\"",
        "\"../x.service\"",
        "\"a b.service\"",
        "\"--root=x.service\"",
    ] {
        let e = error(&with(
            "timezone = \"Europe/Berlin\"",
            &format!("timezone = \"Europe/Berlin\"\nenable-units = [{bad}]"),
        ));
        assert!(e.message.contains("is not a unit name"), "{bad}: {e}");
    }
    let ok = fixture(&with(
        "timezone = \"Europe/Berlin\"",
        "timezone = \"Europe/Berlin\"\nenable-units = [\"getty@tty1.service\", \"fstrim.timer\"]",
    ));
    assert_eq!(load(&ok.1).unwrap().enable_units.len(), 2);
}

/// The builder runs under sudo: an extra tree from outside the spec's directory would
/// copy host files (SSH host keys, /etc/shadow) into the image.
#[test]
fn extra_trees_stay_inside_the_spec_directory() {
    // The spec lives in `<tmp>/specs/`; `<tmp>/host` stands for the rest of the host.
    let load_with = |trees: &str| {
        let (dir, _) = fixture("");
        let specs = dir.path().join("specs");
        std::fs::create_dir_all(specs.join("layers")).unwrap();
        std::fs::copy(
            dir.path().join("layers/one.toml"),
            specs.join("layers/one.toml"),
        )
        .unwrap();
        std::fs::create_dir_all(dir.path().join("host/etc")).unwrap();
        std::fs::create_dir_all(specs.join("files/etc")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("host"), specs.join("out")).unwrap();
        std::os::unix::fs::symlink("files", specs.join("in")).unwrap();
        let path = specs.join("spec.toml");
        std::fs::write(&path, format!("{FULL}\n[files]\nextra-trees = [{trees}]\n")).unwrap();
        (load(&path), dir)
    };
    for (bad, want) in [
        ("\"/etc\"", "is an absolute path"),
        ("\"/etc/ssh:/etc/ssh\"", "is an absolute path"),
        ("\"../host\"", "leads outside the spec's directory"),
        (
            "\"files/../../host/etc:/etc\"",
            "leads outside the spec's directory",
        ),
        ("\"out\"", "leads outside the spec's directory"),
        ("\"out/etc:/etc\"", "leads outside the spec's directory"),
    ] {
        let (result, _dir) = load_with(bad);
        let e = result.expect_err(bad);
        assert!(e.message.contains(want), "{bad}: {e}");
        // Named where it is written, with what to do.
        assert_eq!(e.line, FULL.lines().count() + 3, "{bad}: {e}");
        assert!(e.file.ends_with("specs/spec.toml"), "{bad}: {e}");
        assert!(
            e.hint
                .as_deref()
                .is_some_and(|h| h.contains("into a directory beside the spec")),
            "{bad}: {e}"
        );
    }
    // Relative trees inside the directory work, through a link that stays inside and
    // through `..` that comes back in.
    let (result, dir) = load_with("\"files\", \"in:/opt/x\", \"../specs/files/etc:/etc\"");
    let spec = result.unwrap();
    let files = dir.path().join("specs/files").canonicalize().unwrap();
    assert_eq!(spec.extra_trees[0].path, files);
    assert_eq!(spec.extra_trees[1].path, files);
    assert_eq!(spec.extra_trees[1].source, "in");
    assert_eq!(spec.extra_trees[2].path, files.join("etc"));
    // A link in a tree that leads out of the image is refused when the spec is read
    // (`validate`, `plan`), not only when the build copies the tree.
    std::os::unix::fs::symlink("/etc/shadow", dir.path().join("specs/files/etc/sh")).unwrap();
    let e = load(&dir.path().join("specs/spec.toml")).expect_err("a link out");
    assert!(
        e.message
            .contains("files/etc/sh is a symlink to /etc/shadow")
            && e.message.contains("leads outside the image"),
        "{e}"
    );
    assert_eq!(e.line, FULL.lines().count() + 3, "{e}");
}

#[test]
fn update_needs_verity_a_web_url_and_a_public_key() {
    let verified = with("root-fs = \"erofs\"", "root-fs = \"erofs\"\nverity = true");
    let spec_with = |base: &str, url: &str| {
        format!("{base}\n[update]\nurl = \"{url}\"\nkey = \"update.pgp\"\n")
    };
    let (dir, path) = fixture(&spec_with(&verified, "https://u.example/feed"));
    let message = |path: &Path| load(path).expect_err("rejected").to_string();
    assert!(
        message(&path).contains("cannot read the update key"),
        "{}",
        message(&path)
    );
    let key = dir.path().join("update.pgp");
    // Not a key; a secret key (packet tag 5) never goes into an image, nor does a
    // public key with a secret key or subkey (tag 7) after it; a packet cut short.
    for bytes in [
        b"hello".as_slice(),
        &[0x95, 0x01, 0x02],
        &[0xC5, 0x01, 0x02],
        &[0x98, 0x01, 0x04, 0x95, 0x01, 0x02],
        &[0xC6, 0x01, 0x04, 0xCD, 0x01, 0x41, 0xC7, 0x01, 0x02],
        &[0x99, 0x00, 0x33, 0x04],
        &[0xC6, 0xE1, 0x04, 0x00],
        // Compressed data (that could hold a secret key), a private tag, an
        // indeterminate length, a partial one: none belongs in a public key.
        &[0xC6, 0x01, 0x04, 0xC8, 0x01, 0x00],
        &[0xC6, 0x01, 0x04, 0xFC, 0x01, 0x00],
        &[0xC6, 0x01, 0x04, 0xB7, 0x00],
        &[0xC6, 0x01, 0x04, 0xC2, 0xE1, 0x05, 0x06, 0x01, 0x07],
    ] {
        std::fs::write(&key, bytes).unwrap();
        assert!(
            message(&path).contains("not a binary OpenPGP public key"),
            "{}",
            message(&path)
        );
    }
    // Old and new packet formats of a public key; with a user id, a signature and a
    // subkey (old-format two-byte length, new-format two-octet length) after it.
    let mut long = vec![
        0x99, 0x00, 0x01, 0x04, 0xB4, 0x01, 0x41, 0xC2, 0x01, 0x07, 0xCE, 0xC0, 0x00,
    ];
    long.extend([0x05; 192]);
    for bytes in [vec![0x98, 0x01, 0x04], vec![0xC6, 0x01, 0x04], long] {
        std::fs::write(&key, &bytes).unwrap();
        let spec = load(&path).unwrap();
        let u = spec.update.as_ref().unwrap();
        assert_eq!(u.url, "https://u.example/feed/");
        assert_eq!(u.key, bytes);
        for p in UPDATE_PACKAGES {
            assert!(spec.all_packages().iter().any(|n| n == p), "{p}");
        }
        // The key is an input of the build id.
        assert!(canonical(&spec).contains(&u.key_sha256));
    }
    for bad in [
        "ftp://u.example/",
        "https://",
        "https:///feed",
        "https://u.example/a b",
        "u.example",
    ] {
        std::fs::write(&path, spec_with(&verified, bad)).unwrap();
        assert!(
            message(&path).contains("invalid update feed URL"),
            "{bad}: {}",
            message(&path)
        );
    }
    std::fs::write(&path, spec_with(FULL, "https://u.example/")).unwrap();
    assert!(message(&path).contains("`[update]` needs `[disk] verity = true`"));
}

#[test]
fn nixos_specs_refuse_what_has_no_nixos_meaning_where_it_is_written() {
    let nixos = |extra: &str| {
        format!("[image]\nname = \"n\"\nversion = \"0.1.0\"\n[base]\ndistro = \"nixos\"\n{extra}")
    };
    let (_dir, path) = fixture(&nixos(
        "[packages]\ninclude = [\"python3Packages.requests\"]\n",
    ));
    let s = load(&path).unwrap();
    assert_eq!(s.packages, ["python3Packages.requests"]);
    // Only what the spec asks for (Nix brings the agent's own), and the agent's
    // administrators as NixOS names them.
    assert_eq!(s.all_packages(), ["python3Packages.requests"]);
    assert_eq!(s.agent_config.policy.admin_groups, ["wheel"]);
    assert_eq!(s.suite, "25.11");
    // What a NixOS image always is, said as such (`validate --json` shows it).
    assert_eq!(
        (s.root_fs, s.verity, s.components.len()),
        (RootFs::Erofs, true, 0)
    );
    for (extra, key) in [
        ("suite = \"trixie\"\n", "`trixie` is not a NixOS release"),
        ("components = [\"main\"]\n", "[base] components"),
        ("keyring = \"/k.gpg\"\n", "[base] keyring"),
        (
            "[packages]\nlayers = [\"layers/python.toml\"]\n",
            "[packages] layers",
        ),
        (
            "[system]\nenable-units = [\"x.service\"]\n",
            "[system] enable-units",
        ),
        ("[system]\ninitrd = false\n", "[system] initrd = false"),
        ("[disk]\nroot-fs = \"ext4\"\n", "[disk] root-fs"),
        ("[disk]\nverity = false\n", "[disk] verity = false"),
        ("[disk]\nsecure-boot = true\n", "[disk] secure-boot"),
        ("[files]\nextra-trees = [\"t\"]\n", "[files] extra-trees"),
        ("[update]\nurl = \"https://u/\"\nkey = \"k\"\n", "[update]"),
        (
            "[packages]\ninclude = [\"git;rm\"]\n",
            "invalid nixpkgs attribute",
        ),
    ] {
        let e = error(&nixos(extra));
        assert!(e.message.contains(key), "{key}: {e}");
        assert!(e.line >= 6, "{key}: not located: {e}");
        assert!(e.hint.is_some(), "{key}: no hint");
    }
    // Nix dates what it builds from nixpkgs' locked revision: a date of the spec's
    // would be silently ignored.
    let e = error(
        "[image]\nname = \"n\"\nversion = \"0.1.0\"\nsource-date-epoch = 1700000000\n[base]\ndistro = \"nixos\"\n",
    );
    assert!(e.message.contains("[image] source-date-epoch"), "{e}");
    assert_eq!(e.line, 4, "{e}");
    assert!(e.hint.unwrap().contains("flake.lock"));
}

#[test]
fn a_missing_kernel_is_named_with_the_distros_package() {
    for (distro, kernel, not) in [
        ("debian", "linux-image-cloud-amd64", "linux-image-virtual"),
        ("ubuntu", "linux-image-virtual", "linux-image-cloud-amd64"),
    ] {
        let (_dir, path) = fixture(&format!(
            "[image]\nname = \"k\"\nversion = \"0.1.0\"\n[base]\ndistro = \"{distro}\"\n"
        ));
        let e = load(&path).unwrap().check_buildable().unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains(&format!("no kernel: add `{kernel}`")), "{e}");
        assert!(!e.contains(not), "{e}");
    }
}

#[test]
fn parser_messages_are_in_plain_words() {
    let message = |from: &str, to: &str| error(&with(from, to)).to_string();
    let e = message("expect-exit = 3", "expect-exit = \"x\"");
    assert!(
        e.contains("expected an integer") && !e.contains("i64"),
        "{e}"
    );
    let e = message(
        "components = [\"main\", \"contrib\"]",
        "components = \"main\"",
    );
    assert!(
        e.contains("expected a list") && !e.contains("sequence"),
        "{e}"
    );
    let e = message(
        "hostname = \"box-1\"",
        "hostname = \"box-1\"\nhostname = \"b\"",
    );
    assert!(e.contains(":20:1: duplicate key `hostname`"), "{e}");
    let e = message("log-level = \"debug\"", "log-level = \"loud\"");
    assert!(
        e.contains("unknown value `loud`") && !e.contains("variant"),
        "{e}"
    );
    assert_eq!(
        plain_words("unknown variant `loud`, expected one of `error`, `warn`"),
        "unknown value `loud`, expected one of `error`, `warn`"
    );
    assert_eq!(
        plain_words("invalid value: integer `-1`, expected u64"),
        "invalid value: integer `-1`, expected a whole number (0 or more)"
    );
    assert_eq!(plain_words("expected u80"), "expected u80");
    assert_eq!(
        plain_words("invalid type: string \"x\", expected struct RawImage"),
        "invalid type: string \"x\", expected a table"
    );
}

#[test]
fn root_and_a_repeated_user_get_their_own_messages() {
    let root = "[[users]]\nname = \"root\"\n";
    let e = error(&format!("{FULL}\n{root}")).to_string();
    assert!(e.contains("user `root` is a system user"), "{e}");
    assert!(!e.contains("twice"), "{e}");
    for base in ["nobody", "sudo", "users", "_apt", "www-data"] {
        let e = error(&format!("{FULL}\n[[users]]\nname = \"{base}\"\n")).to_string();
        assert!(
            e.contains(&format!(
                "`{base}` is a user or group of Debian's base system"
            )),
            "{e}"
        );
    }
    let twice = "[[users]]\nname = \"dev\"\n";
    let e = error(&format!("{FULL}\n{twice}")).to_string();
    assert!(e.contains("user `dev` is defined twice"), "{e}");
    assert!(!e.contains("root") && !e.contains("system user"), "{e}");
    let e = error(&with("name = \"exit-3\"", "name = \" \"")).to_string();
    assert!(e.contains("a [[tests]] entry has an empty name"), "{e}");
    assert!(!e.contains("twice"), "{e}");
}

#[test]
fn a_mistyped_suite_is_near_the_known_one() {
    assert_eq!(edit_distance("bookwrom", "bookworm"), 2);
    assert_eq!(edit_distance("noble", "noble"), 0);
    assert_eq!(Distro::Debian.nearest_suite("trixy"), Some("trixie"));
    assert_eq!(Distro::Debian.nearest_suite("potato"), None);
}

/// Values that parse but would fail a build late, break what is built, or reach a
/// later command's syntax are refused where they are written, each with a hint.
#[test]
fn values_that_would_fail_or_harm_later_are_refused_where_written() {
    let cmdline = "kernel-cmdline = \" console=ttyS0 \"";
    let long = format!("kernel-cmdline = \"{}\"", "a ".repeat(600));
    let hash = "password-hash = \"$6$aaaaaaaaaaaaaaaaaaaaaaaa\"";
    let cases: Vec<(String, &str)> = vec![
        (with(cmdline, "kernel-cmdline = \"a\\u0000b\""), "printable"),
        (with(cmdline, "kernel-cmdline = \"a\\tb\""), "printable"),
        (with(cmdline, &long), "more than 1024"),
        (
            with(
                "keyring = \"/usr/share/keyrings/test.gpg\"",
                "keyring = \"/k\\nTrusted: yes\"",
            ),
            "control character",
        ),
        (
            with(
                "keyring = \"/usr/share/keyrings/test.gpg\"",
                "keyring = \"/my keys/k.gpg\"",
            ),
            "a space",
        ),
        (
            with("suite = \"bookworm\"", "suite = \"--dry-run\""),
            "invalid suite",
        ),
        (
            with("suite = \"bookworm\"", "suite = \"..\""),
            "invalid suite",
        ),
        (
            with(
                "components = [\"main\", \"contrib\"]",
                "components = [\"main\", \"-x\"]",
            ),
            "invalid component",
        ),
        (
            with("description = \"every field\"", "source-date-epoch = 0"),
            "1980 to 2107",
        ),
        (
            with(
                "description = \"every field\"",
                "source-date-epoch = 4354819200",
            ),
            "1980 to 2107",
        ),
        (
            with(
                "name = \"devos-test\"",
                &format!("name = \"{}\"", "a".repeat(64)),
            ),
            "at most 63",
        ),
        (
            with("name = \"devos-test\"", "name = \"a-\""),
            "invalid image name",
        ),
        (
            with("hostname = \"box-1\"", "hostname = \"box-\""),
            "invalid hostname",
        ),
        (
            with(
                "version = \"1.2.3-rc.1\"",
                &format!("version = \"1.0.0-{}\"", "a".repeat(60)),
            ),
            "more than 64",
        ),
        (with("size = \"3G\"", "size = \"17T\""), "at most 16T"),
        (with("groups = [\"sudo\", \"adm\"]", hash), "crypt(5)"),
        (
            with("name = \"dev\"", "name = \"messagebus\""),
            "a package of the image creates",
        ),
        (
            with("name = \"dev\"", "name = \"systemd-network\""),
            "a package of the image creates",
        ),
    ];
    for (text, words) in cases {
        let e = error(&text);
        let shown = e.to_string();
        assert!(shown.contains(words), "{words}: {shown}");
        assert!(e.line > 0 && e.hint.is_some(), "{words}: {shown}");
    }
    for unit in ["\".service\"", "\"..service\"", "\"@.service\""] {
        let e = error(&with(
            "timezone = \"Europe/Berlin\"",
            &format!("timezone = \"Europe/Berlin\"\nenable-units = [{unit}]"),
        ));
        assert!(e.message.contains("is not a unit name"), "{unit}: {e}");
    }
    // Arguments that override the builder's root are taken, with a warning (a boot
    // test of a missing root needs one).
    let (_dir, path) = fixture(&with(
        cmdline,
        "kernel-cmdline = \"quiet root=/dev/sda2 rw systemd.verity=0\"",
    ));
    let spec = load(&path).unwrap();
    assert!(
        spec.warnings.iter().any(|w| w
            .contains("`root=/dev/sda2 rw systemd.verity=0` on the kernel command line overrides")),
        "{:?}",
        spec.warnings
    );
    // What the builder's own arguments are not: taken as written, no warning.
    let (_dir, path) = fixture(&with(
        cmdline,
        "kernel-cmdline = \"console=ttyS0 panic=5 rootdelay=1 systemd.show_status=error\"",
    ));
    let spec = load(&path).unwrap();
    assert_eq!(
        spec.kernel_cmdline,
        "console=ttyS0 panic=5 rootdelay=1 systemd.show_status=error"
    );
    assert!(
        !spec
            .warnings
            .iter()
            .any(|w| w.contains("kernel command line")),
        "{:?}",
        spec.warnings
    );
}

/// Files a spec names (itself, its layers, the update key) are regular files inside
/// the spec's directory, read up to a bound: a device, a FIFO or a host file named by
/// mistake or on purpose is an error, never a read that hangs, fills memory or shows
/// what it holds.
#[test]
fn files_a_spec_names_are_bounded_regular_files_beside_it() {
    use devos_tests::mkfifo;
    // The spec itself.
    for (spec, words) in [
        (Path::new("/dev/zero"), "not a regular file"),
        (Path::new("/dev/null"), "not a regular file"),
    ] {
        let e = load(spec).unwrap_err().to_string();
        assert!(e.contains(words), "{e}");
    }
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("spec.toml");
    mkfifo(&fifo);
    let e = load(&fifo).unwrap_err().to_string();
    assert!(e.contains("not a regular file"), "{e}");
    let big = dir.path().join("big.toml");
    std::fs::write(&big, "#".repeat(2 << 20)).unwrap();
    let e = load(&big).unwrap_err().to_string();
    assert!(e.contains("larger than"), "{e}");

    // Layers: outside the spec's directory (climbing out, absolute, through a link),
    // or not a file.
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("x.toml"), "secret = 1\n").unwrap();
    for layer in [
        "/etc/passwd".to_owned(),
        outside.path().join("x.toml").display().to_string(),
        "../../../../../../../../etc/hostname".to_owned(),
        "link.toml".to_owned(),
        "/dev/zero".to_owned(),
    ] {
        let (d, p) = fixture(&with(
            "layers = [\"layers/one.toml\"]",
            &format!("layers = [\"{layer}\"]"),
        ));
        std::os::unix::fs::symlink(outside.path().join("x.toml"), d.path().join("link.toml"))
            .unwrap();
        let e = load(&p).unwrap_err();
        let shown = e.to_string();
        assert!(
            shown.contains("lies outside the spec's directory")
                || shown.contains("not a regular file"),
            "{layer}: {shown}"
        );
        assert!(
            !shown.contains("secret") && !shown.contains("root:"),
            "{shown}"
        );
        assert!(e.line > 0 && e.hint.is_some(), "{layer}: {shown}");
    }
    let (d, p) = fixture(&with(
        "layers = [\"layers/one.toml\"]",
        "layers = [\"layers/pipe.toml\"]",
    ));
    mkfifo(&d.path().join("layers/pipe.toml"));
    let e = load(&p).unwrap_err().to_string();
    assert!(e.contains("not a regular file"), "{e}");

    // The update key: anywhere (it is never shown; a secret key is refused), but a
    // bounded regular file.
    let verified = with("root-fs = \"erofs\"", "root-fs = \"erofs\"\nverity = true");
    for key in ["/dev/zero", "pipe.pgp"] {
        let (d, p) = fixture(&format!(
            "{verified}\n[update]\nurl = \"https://u.example/\"\nkey = \"{key}\"\n"
        ));
        mkfifo(&d.path().join("pipe.pgp"));
        let e = load(&p).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{key}: {e}");
    }
}

#[test]
fn a_verified_root_needs_dracut_and_systemds_veritysetup() {
    let (_dir, path) = fixture(
        "[image]\nname = \"k\"\nversion = \"0.1.0\"\n[base]\ndistro = \"debian\"\n\
         [packages]\ninclude = [\"linux-image-cloud-amd64\", \"initramfs-tools\", \"systemd-sysv\", \"dbus\", \"systemd-boot-efi\"]\n\
         [disk]\nroot-fs = \"erofs\"\nverity = true\n",
    );
    let e = format!("{:#}", load(&path).unwrap().check_buildable().unwrap_err());
    assert!(
        e.contains("add `dracut`") && e.contains("add `systemd-cryptsetup`"),
        "{e}"
    );
    let without = std::fs::read_to_string(&path)
        .unwrap()
        .replace("verity = true\n", "");
    std::fs::write(&path, without).unwrap();
    load(&path).unwrap().check_buildable().unwrap();
}

#[test]
fn agent_settings_without_an_agent_are_a_warning() {
    let (_dir, path) = fixture(FULL);
    let spec = load(&path).unwrap();
    assert!(
        spec.warnings
            .iter()
            .any(|w| w.contains("`[agent.config]` is ignored")),
        "{:?}",
        spec.warnings
    );
}

#[test]
fn a_layer_file_given_as_a_spec_is_named_as_one() {
    for layer in [
        "description = \"Python\"\n[packages]\ninclude = [\"python3\"]\n",
        "[packages]\ninclude = []\n",
    ] {
        let e = error(layer);
        assert!(e.message.contains("this is a layer file"), "{e}");
        assert!(
            e.hint
                .as_deref()
                .unwrap_or_default()
                .contains("`[packages] layers`"),
            "{e}"
        );
    }
    // A spec with a wrong key is still told about the key.
    let e = error(&with("description = \"every field\"", "descripton = \"x\""));
    assert!(e.message.contains("unknown field `descripton`"), "{e}");
}
