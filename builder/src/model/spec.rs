//! The image spec: TOML on disk → raw serde structs → a validated, immutable [`Spec`].
//!
//! Every option is defined once, in the raw structs below (their doc comments are the
//! reference; `docs/spec.md` is tested against them). Errors a user can make are
//! reported as `file:line:col: message` with a hint saying what to do.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_spanned::Spanned;

/// The default spec `devos-build image build` uses when none is given.
pub(crate) const DEFAULT_SPEC: &str = "images/devos-debian.toml";

/// An error in a spec or layer file, located at the offending text.
#[derive(Debug, thiserror::Error)]
pub(crate) struct SpecError {
    pub(crate) file: PathBuf,
    pub(crate) line: usize,
    pub(crate) col: usize,
    pub(crate) message: String,
    pub(crate) hint: Option<String>,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Line 0: the error is about the file as a whole (it cannot be read), not a place in it.
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.message)?;
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file.display(),
                self.line,
                self.col,
                self.message
            )?;
        }
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

/// Where a value came from, so validation errors can point at it.
pub(crate) struct Source<'a> {
    pub(crate) file: &'a Path,
    pub(crate) text: &'a str,
}

impl Source<'_> {
    fn error_at(&self, offset: usize, message: impl Into<String>, hint: Option<&str>) -> SpecError {
        let (line, col) = line_col(self.text, offset);
        SpecError {
            file: self.file.to_path_buf(),
            line,
            col,
            message: message.into(),
            hint: hint.map(str::to_owned),
        }
    }

    pub(crate) fn error<T>(
        &self,
        value: &Spanned<T>,
        message: impl Into<String>,
        hint: &str,
    ) -> SpecError {
        self.error_at(value.span().start, message, Some(hint))
    }

    /// Parse the text as a spec or layer file (documented in docs/spec.md).
    pub(crate) fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, SpecError> {
        self.parse_documented("docs/spec.md")
    }

    /// Parse the text; hints send the reader to `doc` for the keys and their types.
    pub(crate) fn parse_documented<T: serde::de::DeserializeOwned>(
        &self,
        doc: &str,
    ) -> Result<T, SpecError> {
        toml::from_str(self.text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            let mut message = plain_words(e.message().trim());
            if message == "duplicate key" {
                // toml does not say which key; the span is the second one.
                let key = self.text.get(span.clone()).unwrap_or_default().trim();
                if !key.is_empty() {
                    message = format!("duplicate key `{key}`");
                }
            }
            let hint = parse_hint(&message, doc);
            self.error_at(span.start, message, hint.as_deref())
        })
    }
}

/// A serde or toml message in the words a spec's reader uses: `i64` is an integer,
/// a sequence is a list, a variant is a value.
pub(crate) fn plain_words(message: &str) -> String {
    const WORDS: &[(&str, &str)] = &[
        ("expected i8", "expected an integer"),
        ("expected i16", "expected an integer"),
        ("expected i32", "expected an integer"),
        ("expected i64", "expected an integer"),
        ("expected isize", "expected an integer"),
        ("expected u8", "expected a whole number (0 or more)"),
        ("expected u16", "expected a whole number (0 or more)"),
        ("expected u32", "expected a whole number (0 or more)"),
        ("expected u64", "expected a whole number (0 or more)"),
        ("expected usize", "expected a whole number (0 or more)"),
        ("expected f64", "expected a number"),
        ("expected a sequence", "expected a list"),
        ("expected a map", "expected a table"),
        ("expected a borrowed string", "expected a string"),
        ("expected a boolean", "expected `true` or `false`"),
        ("invalid type: sequence", "invalid type: list"),
        ("invalid type: map", "invalid type: table"),
        ("unknown variant", "unknown value"),
    ];
    let mut out = message.to_owned();
    for (jargon, plain) in WORDS {
        let mut from = 0;
        while let Some(i) = out[from..].find(jargon).map(|i| i + from) {
            let end = i + jargon.len();
            // Whole words only: `expected u8` is not `expected u80`.
            if out[end..]
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                from = end;
                continue;
            }
            out.replace_range(i..end, plain);
            from = i + plain.len();
        }
    }
    // `expected struct RawImage`: the name is the parser's, the thing is a table.
    if let Some(i) = out.find("expected struct ") {
        let rest = &out[i + "expected struct ".len()..];
        let name_len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let end = i + "expected struct ".len() + name_len;
        out.replace_range(i..end, "expected a table");
    }
    out
}

fn parse_hint(message: &str, doc: &str) -> Option<String> {
    if message.starts_with("unknown field") {
        Some(if message.contains("there are no fields") {
            format!("remove the key: this table takes none (see {doc})")
        } else if message.contains("expected") {
            format!(
                "remove the key or fix its spelling; the valid keys are named in the message and in {doc}"
            )
        } else {
            format!("remove the key or fix its spelling; the valid keys are in {doc}")
        })
    } else if message.starts_with("unknown value") {
        Some(format!(
            "use one of the values the message names; {doc} describes them"
        ))
    } else if message.starts_with("invalid type") || message.starts_with("invalid value") {
        Some(format!("see {doc} for the type each key takes"))
    } else if message.starts_with("missing field") {
        Some(format!(
            "add the key; {doc} lists the required keys of each table"
        ))
    } else if message.contains("duplicate key") {
        Some("each key may appear once per table: remove one of them".to_owned())
    } else {
        // The rest are TOML's own syntax errors (an unclosed table, a key with no
        // value, a string not closed, …), at the line and column given.
        Some("this is not valid TOML at the line and column given: `key = value` lines under `[table]` headers, strings in double quotes, lists in `[...]` (https://toml.io)".to_owned())
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, col)
}

// ---------------------------------------------------------------------------------
// Raw structs: exactly what the TOML may contain.
// ---------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawSpec {
    image: RawImage,
    base: RawBase,
    #[serde(default)]
    packages: RawPackages,
    #[serde(default)]
    system: RawSystem,
    #[serde(default)]
    users: Vec<RawUser>,
    #[serde(default)]
    disk: RawDisk,
    #[serde(default)]
    output: RawOutput,
    #[serde(default)]
    agent: RawAgent,
    #[serde(default)]
    tests: Vec<RawTest>,
    #[serde(default)]
    files: files::RawFiles,
    update: Option<RawUpdate>,
}

/// `[update]`: where machines running this image look for newer versions
/// (systemd-sysupdate), and the key that signs them. Needs `[disk] verity = true`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawUpdate {
    /// The feed's URL (`http://` or `https://`), where `devos-build publish updates`
    /// output is served.
    url: Spanned<String>,
    /// The OpenPGP public key (binary, as `gpg --export` writes it; relative to the spec) whose
    /// signature on the feed's SHA256SUMS the image accepts: `devos-build keys show
    /// --export FILE` writes the builder's.
    key: Spanned<String>,
}

/// `[image]`: what the image is called and which version of it this spec describes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawImage {
    /// Lower-case letters, digits and dashes; names the image in the registry and os-release `IMAGE_ID`.
    name: Spanned<String>,
    /// Semantic version (`MAJOR.MINOR.PATCH[-PRE]`); the build appends `+<build id>`.
    version: Spanned<String>,
    /// One line for humans.
    #[serde(default)]
    description: String,
    /// Unix time every file in the image is clamped to; default: the archive's date.
    source_date_epoch: Option<Spanned<i64>>,
}

/// `[base]`: the distribution the root filesystem is bootstrapped from.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawBase {
    /// `debian`, `ubuntu` or `nixos`.
    distro: Spanned<String>,
    /// Release codename, e.g. `bookworm` or `noble`. Default: the distro's current stable.
    suite: Option<Spanned<String>>,
    /// Package mirror URL. Default: the host's apt sources when they carry the suite,
    /// otherwise the distro's official mirror.
    mirror: Option<Spanned<String>>,
    /// Archive components. Default: `["main"]`.
    components: Option<Spanned<Vec<Spanned<String>>>>,
    /// OpenPGP keyring that signs the archive. Default: the distro's keyring package
    /// (`debian-archive-keyring`, `ubuntu-keyring`) on the build host.
    keyring: Option<Spanned<String>>,
}

/// `[packages]`: what is installed on top of the base.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawPackages {
    /// Package names, installed with their dependencies.
    #[serde(default)]
    include: Vec<Spanned<String>>,
    /// Layer files (relative to the spec), each adding packages.
    #[serde(default)]
    layers: Vec<Spanned<String>>,
}

/// `[system]`: machine identity and boot settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawSystem {
    /// Static hostname. Default: the image name.
    hostname: Option<Spanned<String>>,
    /// Extra kernel command line, after the root= and ro the builder sets.
    #[serde(default)]
    kernel_cmdline: Option<Spanned<String>>,
    /// A zoneinfo name such as `UTC` or `Europe/Berlin`. Default: `UTC`.
    timezone: Option<Spanned<String>>,
    /// Boot through an initramfs (default). Without one the kernel mounts the root
    /// itself, which needs the disk driver and root filesystem built into the kernel.
    initrd: Option<Spanned<bool>>,
    /// Units to enable (as `systemctl enable` does, from their `[Install]` section),
    /// e.g. ones an extra tree adds.
    #[serde(default)]
    enable_units: Vec<Spanned<String>>,
}

/// `[[users]]`: a login user, created with a home on the writable data partition.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawUser {
    name: Spanned<String>,
    /// Supplementary groups; they must exist in the image.
    #[serde(default)]
    groups: Vec<Spanned<String>>,
    /// OpenSSH public keys written to `~/.ssh/authorized_keys`.
    #[serde(default)]
    ssh_authorized_keys: Vec<Spanned<String>>,
    /// A crypt(5) password hash for the console; without it the password is locked.
    password_hash: Option<Spanned<String>>,
    /// sudo without a password (the user must be in `sudo`).
    sudo_without_password: Option<Spanned<bool>>,
}

/// `[disk]`: the disk image's size and root filesystem.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawDisk {
    /// Total size, e.g. `2G` or `1536M`. The read-only root is sized to its contents;
    /// the writable data partition (`/var`) takes the rest.
    size: Option<Spanned<String>>,
    /// `ext4` or `erofs`.
    root_fs: Option<Spanned<String>>,
    /// Verify every block of the root with dm-verity: a hash partition beside it, the
    /// root hash on the kernel command line inside a unified kernel image.
    verity: Option<Spanned<bool>>,
    /// Sign systemd-boot and the unified kernel image with the builder's Secure Boot
    /// key and enroll its certificate on the first boot (needs `verity = true`).
    secure_boot: Option<Spanned<bool>>,
}

/// `[output]`: artifact formats.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawOutput {
    /// Any of `raw`, `qcow2`, `vmdk`, `vhd`. The raw image is always kept: it is what
    /// is tested and published.
    formats: Option<Vec<Spanned<String>>>,
}

/// `[agent]`: the DevOS agent baked into the image.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawAgent {
    /// Install and enable `devos-agent`. Default: true.
    enable: Option<bool>,
    /// Written to `/etc/devos/agent.toml`; same keys as that file.
    config: Option<Spanned<toml::Table>>,
}

/// `[[tests]]`: a command the boot test runs inside the booted image.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawTest {
    name: Spanned<String>,
    /// A shell command line, run by `/bin/sh -c` as root.
    run: Spanned<String>,
    /// The exit status that counts as a pass. Default: 0.
    expect_exit: Option<Spanned<i64>>,
}

/// A layer file: a reusable set of packages.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawLayer {
    #[serde(default)]
    description: String,
    packages: RawLayerPackages,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawLayerPackages {
    include: Vec<Spanned<String>>,
}

// ---------------------------------------------------------------------------------
// Validated types.
// ---------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Distro {
    Debian,
    Ubuntu,
    Nixos,
}

impl Distro {
    /// The name specs use (`debian`, `ubuntu`, `nixos`).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Distro::Debian => "debian",
            Distro::Ubuntu => "ubuntu",
            Distro::Nixos => "nixos",
        }
    }

    pub(crate) fn default_suite(self) -> &'static str {
        match self {
            Distro::Debian => "trixie",
            Distro::Ubuntu => "noble",
            Distro::Nixos => "25.11",
        }
    }

    /// The kernel package a hint names when a spec has none (what images/ use). A
    /// NixOS image gets its kernel from nixpkgs without asking.
    pub(crate) fn kernel_package(self) -> &'static str {
        match self {
            Distro::Debian => "linux-image-cloud-amd64",
            Distro::Ubuntu => "linux-image-virtual",
            Distro::Nixos => "linuxPackages (nixpkgs)",
        }
    }

    /// The distro's official mirror, used when neither the spec nor the host names one.
    pub(crate) fn default_mirror(self) -> &'static str {
        match self {
            Distro::Debian => "http://deb.debian.org/debian",
            Distro::Ubuntu => "http://archive.ubuntu.com/ubuntu",
            Distro::Nixos => "https://cache.nixos.org",
        }
    }

    /// The distro as prose names it.
    pub(crate) fn title(self) -> &'static str {
        match self {
            Distro::Debian => "Debian",
            Distro::Ubuntu => "Ubuntu",
            Distro::Nixos => "NixOS",
        }
    }

    /// The suites devos-build knows (none for NixOS, whose channel is no suite).
    pub(crate) fn known_suites(self) -> &'static [&'static str] {
        match self {
            Distro::Debian => DEBIAN_SUITES,
            Distro::Ubuntu => UBUNTU_SUITES,
            Distro::Nixos => &[],
        }
    }

    /// The suites a message names as examples: the current ones.
    pub(crate) fn recent_suites(self) -> &'static str {
        match self {
            Distro::Debian => "bookworm, trixie, forky, sid",
            Distro::Ubuntu => "jammy, noble, questing, resolute",
            Distro::Nixos => "",
        }
    }

    /// The known suite within two edits of `name` (a typo of it), if there is one.
    pub(crate) fn nearest_suite(self, name: &str) -> Option<&'static str> {
        self.known_suites()
            .iter()
            .map(|k| (edit_distance(name, k), *k))
            .min()
            .filter(|(d, _)| *d <= 2)
            .map(|(_, k)| k)
    }
}

/// Debian codenames (and the archive's aliases) devos-build knows, oldest first.
const DEBIAN_SUITES: &[&str] = &[
    "jessie",
    "stretch",
    "buster",
    "bullseye",
    "bookworm",
    "trixie",
    "forky",
    "duke",
    "sid",
    "oldoldstable",
    "oldstable",
    "stable",
    "testing",
    "unstable",
];

/// Ubuntu codenames devos-build knows, oldest first.
const UBUNTU_SUITES: &[&str] = &[
    "xenial", "bionic", "focal", "jammy", "kinetic", "lunar", "mantic", "noble", "oracular",
    "plucky", "questing", "resolute",
];

/// Levenshtein distance between two short words.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RootFs {
    Ext4,
    Erofs,
}

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Format {
    Raw,
    Qcow2,
    Vmdk,
    Vhd,
}

/// Stored by its extension (`raw`, `qcow2`, ...), as `--json` prints it.
impl rusqlite::ToSql for Format {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(self.extension().into())
    }
}

impl rusqlite::types::FromSql for Format {
    fn column_result(value: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        let name = value.as_str()?;
        <Format as clap::ValueEnum>::from_str(name, false).map_err(|_| {
            rusqlite::types::FromSqlError::Other(format!("unknown artifact format `{name}`").into())
        })
    }
}

impl Format {
    pub(crate) fn extension(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vmdk => "vmdk",
            Format::Vhd => "vhd",
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Layer {
    /// The path as written in the spec, relative to the spec's directory.
    pub(crate) name: String,
    pub(crate) description: String,
    pub(crate) packages: Vec<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct User {
    pub(crate) name: String,
    pub(crate) groups: Vec<String>,
    pub(crate) ssh_authorized_keys: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) password_hash: Option<String>,
    /// sudo asks this member of `sudo` for no password.
    pub(crate) sudo_without_password: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Test {
    pub(crate) name: String,
    pub(crate) run: String,
    pub(crate) expect_exit: u8,
}

/// A loaded, validated image spec. Immutable once built.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Spec {
    /// The spec file, as given.
    #[serde(skip)]
    pub(crate) path: PathBuf,
    pub(crate) name: String,
    pub(crate) version: semver::Version,
    pub(crate) description: String,
    /// `None`: derived from the package archive's `InRelease` date (or the
    /// `SOURCE_DATE_EPOCH` environment variable, when set).
    pub(crate) source_date_epoch: Option<u64>,
    pub(crate) distro: Distro,
    pub(crate) suite: String,
    /// `None`: use the host's apt sources if they carry the suite, else the default mirror.
    pub(crate) mirror: Option<String>,
    pub(crate) components: Vec<String>,
    /// `None`: the distro's default keyring on the build host.
    pub(crate) keyring: Option<PathBuf>,
    /// Packages named directly in the spec (layers' packages are in `layers`).
    pub(crate) packages: Vec<String>,
    pub(crate) layers: Vec<Layer>,
    pub(crate) hostname: String,
    pub(crate) kernel_cmdline: String,
    /// Whether the boot loader entry loads the initramfs.
    pub(crate) initrd: bool,
    pub(crate) timezone: String,
    pub(crate) users: Vec<User>,
    pub(crate) disk_size: u64,
    pub(crate) root_fs: RootFs,
    /// A dm-verity hash partition for the root and a unified kernel image carrying the
    /// root hash.
    pub(crate) verity: bool,
    /// systemd-boot and the unified kernel image signed with the builder's Secure Boot
    /// key, whose certificate systemd-boot enrolls on the first boot (in setup mode).
    pub(crate) secure_boot: bool,
    pub(crate) formats: Vec<Format>,
    pub(crate) agent_enabled: bool,
    /// The full agent configuration written to `/etc/devos/agent.toml`.
    pub(crate) agent_config: devos_agent::config::AgentConfig,
    /// `[agent.config]` as written (what a NixOS image merges over the module's
    /// defaults, which name the store's programs rather than /usr's).
    #[serde(skip)]
    pub(crate) agent_settings: toml::Table,
    pub(crate) tests: Vec<Test>,
    pub(crate) extra_trees: Vec<ExtraTree>,
    pub(crate) enable_units: Vec<String>,
    /// Where updates come from, and the key they must be signed with.
    pub(crate) update: Option<Update>,
    /// What may fail the build but may also be right (a suite newer than this builder
    /// knows, a group a package creates): `file:line:col: message` and a hint line each.
    #[serde(skip)]
    pub(crate) warnings: Vec<String>,
}

/// `[update]`, validated: the feed URL (ending in `/`) and the key file's contents.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Update {
    pub(crate) url: String,
    /// The key file, as resolved against the spec's directory.
    #[serde(skip)]
    pub(crate) key_path: PathBuf,
    #[serde(skip)]
    pub(crate) key: Vec<u8>,
    /// In the canonical spec (and so the build id) in place of the key's bytes.
    pub(crate) key_sha256: String,
}

impl Spec {
    /// What can be known without the network about whether this spec builds a
    /// bootable image: a distribution this builder bootstraps, and a package set
    /// with a kernel, an initramfs tool, systemd as init, D-Bus and systemd-boot.
    /// Every problem is named, each with what to do.
    pub(crate) fn check_buildable(&self) -> anyhow::Result<()> {
        // nixpkgs has what a NixOS image needs (nixos/image.nix names it).
        if self.distro == Distro::Nixos {
            return Ok(());
        }
        let packages = self.all_packages();
        let has = |p: &dyn Fn(&str) -> bool| packages.iter().any(|n| p(n));
        let needs: [(&str, bool, &str); 5] = [
            (
                "no kernel",
                has(&|n| n.starts_with("linux-image-")),
                self.distro.kernel_package(),
            ),
            (
                "no initramfs tool (the kernel package depends on one)",
                has(&|n| n == "initramfs-tools" || n == "dracut"),
                "initramfs-tools",
            ),
            (
                "no systemd as init",
                has(&|n| n == "systemd-sysv"),
                "systemd-sysv",
            ),
            (
                "no D-Bus daemon",
                has(&|n| n == "dbus" || n == "dbus-broker"),
                "dbus",
            ),
            (
                "no systemd-boot EFI binary",
                has(&|n| n == "systemd-boot-efi"),
                "systemd-boot-efi",
            ),
        ];
        // A verified root is opened by systemd in the initrd (the disk stage checks
        // the tree for the same, after the packages are in).
        let verity_needs = [
            (
                "no dracut for `[disk] verity = true` (systemd in the initrd opens the verified root; initramfs-tools cannot)",
                has(&|n| n == "dracut"),
                "dracut",
            ),
            (
                "no systemd veritysetup for `[disk] verity = true`",
                has(&|n| n == "systemd-cryptsetup"),
                "systemd-cryptsetup",
            ),
        ];
        let verity_needs = if self.verity { &verity_needs[..] } else { &[] };
        let missing: Vec<String> = needs
            .iter()
            .chain(verity_needs)
            .filter(|(_, found, _)| !found)
            .map(|(what, _, package)| format!("  - {what}: add `{package}`"))
            .collect();
        if !missing.is_empty() {
            anyhow::bail!(
                "{}: the package set cannot boot:\n{}\n  hint: add them to `[packages] include` (or a layer's)",
                self.path.display(),
                missing.join("\n")
            );
        }
        Ok(())
    }

    /// Every package to install, spec and layers together, with what the agent needs
    /// when it is enabled, sorted and unique.
    pub(crate) fn all_packages(&self) -> Vec<String> {
        // (A NixOS image's agent and updates bring what they need through Nix.)
        let debian = self.distro != Distro::Nixos;
        let agent: Vec<String> = if self.agent_enabled && debian {
            devos_agent::PACKAGE_DEPENDS
                .iter()
                .map(|p| (*p).to_owned())
                .collect()
        } else {
            Vec::new()
        };
        let update: Vec<String> = match &self.update {
            Some(_) if debian => UPDATE_PACKAGES.iter().map(|p| (*p).to_owned()).collect(),
            _ => Vec::new(),
        };
        let set: BTreeSet<&String> = self
            .packages
            .iter()
            .chain(self.layers.iter().flat_map(|l| &l.packages))
            .chain(&agent)
            .chain(&update)
            .collect();
        set.into_iter().cloned().collect()
    }
}

/// What an image that updates itself needs beyond its spec's packages.
/// systemd-sysupdate and systemd-pull (systemd-container), the gpg that checks a feed's
/// signature, and systemd-boot's boot counting (systemd-bless-boot) and bootctl.
pub(crate) const UPDATE_PACKAGES: &[&str] = &["systemd-container", "gpg", "systemd-boot"];

const MIN_DISK: u64 = 512 << 20;
/// The largest disk an image may have: the largest general-purpose (gp3) EBS volume,
/// 16 TiB.
const MAX_DISK: u64 = 16 << 40;
/// The source dates a spec or SOURCE_DATE_EPOCH may give: what the ESP's FAT can stamp
/// on its files, 1980-01-01 to the end of 2107 (outside it mtools wraps the year
/// around, and the image would carry another date than the one asked for).
pub(crate) const SOURCE_DATE_EPOCHS: std::ops::RangeInclusive<u64> = 315_532_800..=4_354_819_199;
/// The most a spec, a layer or an update key file may hold: a few KiB each in
/// practice; a device or a huge file named by mistake must not fill memory.
const MAX_SPEC_FILE: u64 = 1 << 20;

/// Load and validate a spec file and the layers it includes.
pub(crate) fn load(path: &Path) -> Result<Spec, SpecError> {
    let text = read_text(path).map_err(|e| SpecError {
        file: path.to_path_buf(),
        line: 0,
        col: 0,
        message: format!("cannot read the spec: {e}"),
        hint: Some(unreadable_hint(path, &e)),
    })?;
    parse(path, &text)
}

/// A regular file of at most [`MAX_SPEC_FILE`] bytes, read without blocking (a FIFO or
/// a device given as a spec, layer or key is an error, not a read that waits or fills
/// memory).
fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    devos_agent::context::read_regular(path, MAX_SPEC_FILE)
}

/// [`read_bounded`], as UTF-8 text (also the builder's settings file).
pub(crate) fn read_text(path: &Path) -> std::io::Result<String> {
    utf8(read_bounded(path)?)
}

/// Bytes read from a spec's file as text.
fn utf8(bytes: Vec<u8>) -> std::io::Result<String> {
    String::from_utf8(bytes)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"))
}

/// The spec in images/ that `path` names as an image (`devos-debian`,
/// `devos-debian@0.2.0`), when there is one.
fn shipped_spec(path: &Path) -> Option<PathBuf> {
    let text = path.to_str()?;
    let name = text.split_once('@').map_or(text, |(n, _)| n);
    let spec = Path::new("images").join(format!("{name}.toml"));
    (is_image_name(name) && spec.is_file()).then_some(spec)
}

/// What to do about a spec file that cannot be read, by cause.
fn unreadable_hint(path: &Path, e: &std::io::Error) -> String {
    use std::io::ErrorKind;
    let shipped = format!(
        "pass the path of an image spec, e.g. `{DEFAULT_SPEC}`; the specs shipped are in images/"
    );
    if path.is_dir() {
        return format!(
            "{} is a directory: pass a .toml spec file, e.g. `{DEFAULT_SPEC}`",
            path.display()
        );
    }
    if e.kind() == ErrorKind::NotFound
        && let Some(spec) = shipped_spec(path)
    {
        return format!(
            "`{}` is not a file: pass the spec's path, e.g. `{}`",
            path.display(),
            spec.display()
        );
    }
    match e.kind() {
        ErrorKind::PermissionDenied => format!(
            "check the file's permissions (`ls -l {}`), or run as its owner",
            path.display()
        ),
        ErrorKind::InvalidData => {
            "the file is not UTF-8 text: save it as UTF-8 (`iconv -t UTF-8`)".to_owned()
        }
        ErrorKind::NotFound if path == Path::new(DEFAULT_SPEC) => format!(
            "`{DEFAULT_SPEC}`, the default spec, is relative to the current directory: run from the repository root, or pass the path of a spec"
        ),
        _ => shipped,
    }
}

/// Validate spec text; `path` locates errors and anchors relative layer paths.
pub(crate) fn parse(path: &Path, text: &str) -> Result<Spec, SpecError> {
    let src = Source { file: path, text };
    let raw: RawSpec = src.parse().map_err(|e| {
        // A layer file given where a spec goes: say what it is, not which keys it lacks.
        if toml::from_str::<RawLayer>(text).is_ok() {
            src.error_at(
                0,
                "this is a layer file (a set of packages), not an image spec",
                Some(
                    "name it in a spec's `[packages] layers` and give that spec instead (docs/spec.md, \"Layer files\")",
                ),
            )
        } else {
            e
        }
    })?;

    let name = image_name(&src, &raw.image.name)?;
    let version = parse_version(&src, &raw.image.version)?;
    let source_date_epoch = source_date_epoch(&src, raw.image.source_date_epoch.as_ref())?;

    let distro: Distro = pick(&src, &raw.base.distro, "distro")?;
    if distro == Distro::Nixos {
        nixos::check_keys(&src, &raw)?;
    }
    let Base {
        suite,
        mirror,
        components,
        keyring,
    } = base(&src, &raw.base, distro)?;

    let packages = if distro == Distro::Nixos {
        nixos::package_names(&src, &raw.packages.include)?
    } else {
        package_names(&src, &raw.packages.include)?
    };
    let mut layers = Vec::new();
    for layer in &raw.packages.layers {
        layers.push(load_layer(&src, layer)?);
    }

    let (hostname, kernel_cmdline, timezone) = system(&src, &raw.system, &name)?;

    let users = users(&src, &raw.users, distro)?;

    // Values that parse but that a build would fail on later (errors), or may (warnings).
    let mut warnings = Vec::new();
    if let Some(s) = &raw.base.suite {
        lint::suite(&src, s, distro, &mut warnings)?;
    }
    if let Some(t) = &raw.system.timezone {
        let all: Vec<String> = packages
            .iter()
            .chain(layers.iter().flat_map(|l| &l.packages))
            .cloned()
            .collect();
        lint::timezone(
            &src,
            t,
            distro,
            &all,
            Path::new("/usr/share/zoneinfo"),
            &mut warnings,
        )?;
    }
    for u in &raw.users {
        lint::groups(&src, &u.groups, distro, &mut warnings);
    }
    if let Some(c) = &raw.system.kernel_cmdline {
        lint::kernel_cmdline(&src, c, &mut warnings);
    }
    if let (Some(false), Some(config)) = (raw.agent.enable, &raw.agent.config) {
        lint::agent_config_unused(&src, config, &mut warnings);
    }

    let disk_size = disk_size(&src, raw.disk.size.as_ref())?;
    // What a NixOS image always is (spec/nixos.rs refuses anything else).
    let nixos = distro == Distro::Nixos;
    let root_fs = match &raw.disk.root_fs {
        None if nixos => RootFs::Erofs,
        None => RootFs::Ext4,
        Some(f) => pick(&src, f, "root-fs")?,
    };

    let initrd = raw.system.initrd.as_ref().is_none_or(|i| *i.get_ref());
    let verity = match &raw.disk.verity {
        Some(v) if *v.get_ref() && !initrd => {
            return Err(src.error(
                v,
                "`verity = true` needs an initrd: systemd in the initrd opens the verified root",
                "remove `[system] initrd = false`, or set `verity = false`",
            ));
        }
        Some(v) => *v.get_ref(),
        None => nixos,
    };
    let secure_boot = match &raw.disk.secure_boot {
        Some(b) if *b.get_ref() && !verity => {
            return Err(src.error(
                b,
                "`secure-boot = true` needs `verity = true`: the signature covers the unified kernel image, and through the root hash on its command line every block of the root",
                "set `verity = true` in `[disk]`, or remove `secure-boot`",
            ));
        }
        Some(b) => *b.get_ref(),
        None => false,
    };

    if verity || nixos {
        check_slot_name(&src, &raw.image.name, &version, nixos)?;
    }
    let update = match &raw.update {
        Some(u) => Some(update(&src, u, verity)?),
        None => None,
    };
    let formats = formats(&src, raw.output.formats.as_deref())?;

    let mut agent_config = agent_config(&src, raw.agent.config.as_ref())?;
    // NixOS's administrators are `wheel`: its module's default (nixos/module.nix).
    let admin_groups_set = raw
        .agent
        .config
        .as_ref()
        .and_then(|c| c.get_ref().get("policy"))
        .and_then(|p| p.get("admin-groups"))
        .is_some();
    if distro == Distro::Nixos && !admin_groups_set {
        agent_config.policy.admin_groups = vec!["wheel".into()];
    }
    if let Some(config) = &raw.agent.config {
        lint::model_profiles(&src, config, &agent_config.model, &mut warnings);
    }

    let tests = tests(&src, &raw.tests)?;
    let extra_trees = files::extra_trees(&src, &raw.files)?;
    let enable_units = files::units(&src, &raw.system.enable_units)?;

    Ok(Spec {
        path: path.to_path_buf(),
        name,
        version,
        description: raw.image.description,
        source_date_epoch,
        distro,
        suite,
        mirror,
        components,
        keyring,
        packages,
        layers,
        hostname,
        kernel_cmdline,
        initrd,
        timezone,
        users,
        disk_size,
        root_fs,
        verity,
        secure_boot,
        formats,
        agent_enabled: raw.agent.enable.unwrap_or(true),
        agent_config,
        agent_settings: raw
            .agent
            .config
            .as_ref()
            .map(|t| t.get_ref().clone())
            .unwrap_or_default(),
        tests,
        extra_trees,
        enable_units,
        update,
        warnings,
    })
}

/// `[update]`, checked: an A/B image (verity), an HTTP(S) URL, a readable key file
/// that holds an OpenPGP public key.
fn update(src: &Source, raw: &RawUpdate, verity: bool) -> Result<Update, SpecError> {
    if !verity {
        return Err(src.error(
            &raw.url,
            "`[update]` needs `[disk] verity = true`: updates are written into the second root slot of a verified image",
            "set `verity = true` (and `root-fs = \"erofs\"`) in `[disk]`, or remove `[update]`",
        ));
    }
    let url = raw.url.get_ref().trim();
    let valid = devos_aws::is_http_url(url) && !url.contains(['?', '#']);
    if !valid {
        return Err(src.error(
            &raw.url,
            format!("invalid update feed URL `{url}`"),
            "give an http:// or https:// URL of the directory `devos-build publish updates` fills, e.g. `https://updates.example.com/devos-debian/`",
        ));
    }
    let url = if url.ends_with('/') {
        url.to_owned()
    } else {
        format!("{url}/")
    };
    let key_path = src
        .file
        .parent()
        .unwrap_or(Path::new("."))
        .join(raw.key.get_ref());
    let key = read_bounded(&key_path).map_err(|e| {
        src.error(
            &raw.key,
            format!("cannot read the update key {}: {e}", key_path.display()),
            "export the builder's public key there with `devos-build keys export FILE` (after `devos-build keys generate`)",
        )
    })?;
    if !is_openpgp_public_key(&key) {
        return Err(src.error(
            &raw.key,
            format!("{} is not a binary OpenPGP public key", key_path.display()),
            "export one with `devos-build keys export FILE` (an armored key: `gpg --dearmor`); a secret key never goes into an image",
        ));
    }
    Ok(Update {
        url,
        key_sha256: crate::support::digest::sha256_hex(&key),
        key_path,
        key,
    })
}

/// Whether `data` is a binary OpenPGP public key (transferable, RFC 9580 section
/// 10.1): packets that parse to the end, the first a public key (tag 6), the others
/// only what a public key is made of — signatures (2), user ids (13), user attributes
/// (17), public subkeys (14). A secret key or subkey (5, 7: `gpg --export-secret-keys`,
/// or a public key with one appended), compressed data that could hold one (8), or
/// anything else is refused.
fn is_openpgp_public_key(data: &[u8]) -> bool {
    openpgp_packet_tags(data).is_some_and(|tags| {
        tags.first() == Some(&6) && tags.iter().all(|t| matches!(t, 2 | 6 | 13 | 14 | 17))
    })
}

/// The tags of the OpenPGP packets `data` holds (RFC 9580 section 4.2: old and new
/// headers), or `None` when it does not parse to its end. Lengths that only data
/// packets may have (old-format indeterminate, new-format partial) do not parse.
fn openpgp_packet_tags(mut data: &[u8]) -> Option<Vec<u8>> {
    let take = |data: &mut &[u8], n: usize| -> Option<usize> {
        let (head, rest) = data.split_at_checked(n)?;
        *data = rest;
        Some(
            head.iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b)),
        )
    };
    let mut tags = Vec::new();
    while let Some(&header) = data.first() {
        data = &data[1..];
        if header & 0x80 == 0 {
            return None;
        }
        if header & 0x40 == 0 {
            // Old format: tag in bits 5-2, the length's size in bits 1-0.
            tags.push((header >> 2) & 0x0F);
            let len = match header & 0x03 {
                0 => take(&mut data, 1)?,
                1 => take(&mut data, 2)?,
                2 => take(&mut data, 4)?,
                _ => return None,
            };
            take(&mut data, len)?;
            continue;
        }
        tags.push(header & 0x3F);
        let first = take(&mut data, 1)?;
        let len = match first {
            0..=191 => first,
            192..=223 => ((first - 192) << 8) + take(&mut data, 1)? + 192,
            255 => take(&mut data, 4)?,
            _ => return None,
        };
        take(&mut data, len)?;
    }
    Some(tags)
}

/// `[image] name`, checked: it names the image in the registry and in os-release.
fn image_name(src: &Source, raw: &Spanned<String>) -> Result<String, SpecError> {
    let name = raw.get_ref().clone();
    if !is_image_name(&name) {
        return Err(src.error(
            raw,
            format!("invalid image name `{name}`"),
            "use lower-case letters, digits and dashes, starting with a letter and not ending with a dash, at most 63 characters (it is the default hostname), e.g. `devos-debian`",
        ));
    }
    Ok(name)
}

/// `[image] source-date-epoch`, checked (none: the build takes the archive's date).
fn source_date_epoch(src: &Source, raw: Option<&Spanned<i64>>) -> Result<Option<u64>, SpecError> {
    let Some(t) = raw else {
        return Ok(None);
    };
    match u64::try_from(*t.get_ref()) {
        Ok(secs) if SOURCE_DATE_EPOCHS.contains(&secs) => Ok(Some(secs)),
        _ => Err(src.error(
            t,
            format!("invalid source-date-epoch {}", t.get_ref()),
            "give a Unix time in seconds from 1980 to 2107 (the dates the ESP's FAT holds), e.g. `source-date-epoch = 1700000000`, or remove the key to use the archive's date",
        )),
    }
}

/// `[output] formats`: raw always (the others are made from it), qcow2 by default.
fn formats(src: &Source, raw: Option<&[Spanned<String>]>) -> Result<Vec<Format>, SpecError> {
    let mut formats = BTreeSet::from([Format::Raw]);
    if let Some(list) = raw {
        for f in list {
            formats.insert(pick(src, f, "format")?);
        }
    } else {
        formats.insert(Format::Qcow2);
    }
    Ok(formats.into_iter().collect())
}

/// `[agent.config]`, checked by the agent's own parser; absent, the agent's defaults.
fn agent_config(
    src: &Source,
    raw: Option<&Spanned<toml::Table>>,
) -> Result<devos_agent::config::AgentConfig, SpecError> {
    match raw {
        None => Ok(devos_agent::config::AgentConfig::default()),
        Some(table) => devos_agent::config::AgentConfig::from_table(table.get_ref().clone())
            .map_err(|e| {
                let message = format!("[agent.config]: {}", plain_words(&e.to_string()));
                let hint =
                    "the keys are those of /etc/devos/agent.toml, documented in docs/spec.md";
                match agent_config_position(src.text, &e) {
                    Some(at) => src.error_at(at, message, Some(hint)),
                    None => src.error(table, message, hint),
                }
            }),
    }
}

/// Where in the spec's `text` the `[agent.config]` error `e` is: the key or value serde
/// refused, or the key a check names (`model.temperature: ...`), as deep as it is
/// written; `None` where no position is known (the table's then serves).
fn agent_config_position(text: &str, e: &devos_agent::config::InvalidConfig) -> Option<usize> {
    use toml::de::DeValue;
    if let devos_agent::config::InvalidConfig::Schema(_) = e {
        // The agent's parser got the table without positions: parse the text again, for
        // the position of the error only.
        #[derive(serde::Deserialize)]
        #[allow(dead_code)]
        struct Doc {
            agent: Option<Agent>,
        }
        #[derive(serde::Deserialize)]
        #[allow(dead_code)]
        struct Agent {
            config: Option<devos_agent::config::AgentConfig>,
        }
        return toml::from_str::<Doc>(text).err()?.span().map(|s| s.start);
    }
    let message = e.to_string();
    let named = message.split([':', ' ', '[']).next().unwrap_or_default();
    let doc = toml::de::DeTable::parse(text).ok()?;
    let mut table = doc.get_ref();
    let mut at = None;
    for name in ["agent", "config"].into_iter().chain(named.split('.')) {
        let Some((key, value)) = table.iter().find(|(k, _)| k.get_ref().as_ref() == name) else {
            break;
        };
        at = Some(key.span().start);
        match value.get_ref() {
            DeValue::Table(t) => table = t,
            _ => break,
        }
    }
    at
}

/// `[system]`: hostname (default: the image's name), kernel command line, timezone.
fn system(
    src: &Source,
    raw: &RawSystem,
    name: &str,
) -> Result<(String, String, String), SpecError> {
    let hostname = match &raw.hostname {
        Some(h) if !is_hostname(h.get_ref()) => {
            return Err(src.error(
                h,
                format!("invalid hostname `{}`", h.get_ref()),
                "use letters, digits and dashes, at most 63 characters",
            ));
        }
        Some(h) => h.get_ref().clone(),
        None => name.to_owned(),
    };
    let kernel_cmdline = match &raw.kernel_cmdline {
        Some(c) if c.get_ref().contains(char::is_control) => {
            return Err(src.error(
                c,
                "the kernel command line must be one line of printable characters",
                "join the arguments with spaces (no newlines, tabs or other control characters)",
            ));
        }
        Some(c) if c.get_ref().trim().len() > MAX_SPEC_CMDLINE => {
            return Err(src.error(
                c,
                format!(
                    "the kernel command line is {} bytes long, more than {MAX_SPEC_CMDLINE}",
                    c.get_ref().trim().len()
                ),
                "the kernel takes 2048 bytes in all and cuts the rest off silently; the builder's own arguments need the rest: keep only what the image needs",
            ));
        }
        Some(c) => c.get_ref().trim().to_owned(),
        None => String::new(),
    };
    let timezone = match &raw.timezone {
        Some(t) if !is_timezone(t.get_ref()) => {
            return Err(src.error(
                t,
                format!("invalid timezone `{}`", t.get_ref()),
                "use a zoneinfo name such as `UTC` or `Europe/Berlin`",
            ));
        }
        Some(t) => t.get_ref().clone(),
        None => "UTC".to_owned(),
    };
    Ok((hostname, kernel_cmdline, timezone))
}

/// The longest `[system] kernel-cmdline` (the kernel takes 2048 bytes in all; the
/// builder's own arguments come first).
const MAX_SPEC_CMDLINE: usize = 1024;

/// `[disk] size` in bytes (default 2 GiB, at least 512 MiB).
fn disk_size(src: &Source, raw: Option<&Spanned<String>>) -> Result<u64, SpecError> {
    Ok(match raw {
        None => 2 << 30,
        Some(s) => match parse_size(s.get_ref()) {
            Some(n) if (MIN_DISK..=MAX_DISK).contains(&n) => n,
            Some(n) if n > MAX_DISK => {
                return Err(src.error(
                    s,
                    format!("disk size `{}` is too large", s.get_ref()),
                    "an image's disk is at most 16T (the largest gp3 EBS volume); its `/var` takes what the root leaves",
                ));
            }
            Some(_) => {
                return Err(src.error(
                    s,
                    format!("disk size `{}` is too small", s.get_ref()),
                    "an image needs at least 512M",
                ));
            }
            None => {
                return Err(src.error(
                    s,
                    format!("invalid disk size `{}`", s.get_ref()),
                    "write a number with a unit: `2G`, `1536M` (binary units; `GiB`/`MiB` also work)",
                ));
            }
        },
    })
}

/// base-passwd's users that have no group of their name in [`lint::BASE_GROUPS`]
/// (which holds the rest of its users' names).
const BASE_USERS_WITHOUT_GROUP: &[&str] = &["sync", "gnats", "nobody", "_apt"];

/// Accounts the packages every image has (or commonly adds) create: D-Bus's, OpenSSH's,
/// polkit's, the TPM's (and systemd's, `systemd-*`). A [[users]] entry of the same
/// name would fail the build once the packages are in.
const PACKAGE_ACCOUNTS: &[&str] = &["messagebus", "sshd", "polkitd", "tss", "_chrony"];

/// The `[[users]]` entries, checked.
fn users(src: &Source, raw: &[RawUser], distro: Distro) -> Result<Vec<User>, SpecError> {
    let mut users = Vec::new();
    let mut seen = BTreeSet::new();
    for u in raw {
        let uname = u.name.get_ref();
        if !is_user_name(uname) {
            return Err(src.error(
                &u.name,
                format!("invalid user name `{uname}`"),
                "use lower-case letters, digits, `_` and `-`, starting with a letter, at most 32 characters",
            ));
        }
        if uname == "root" {
            return Err(src.error(
                &u.name,
                "user `root` is a system user and cannot be a [[users]] entry",
                "root exists in every image: remove this entry, or name a user of your own and give it `groups = [\"sudo\"]`",
            ));
        }
        // Each user gets a group of its own name: neither may be one the base system
        // has (a second `nobody` or `sudo` line would corrupt /etc/passwd or /etc/group).
        // Accounts packages add are checked against the image's files when it is built.
        if lint::BASE_GROUPS.contains(&uname.as_str())
            || BASE_USERS_WITHOUT_GROUP.contains(&uname.as_str())
        {
            return Err(src.error(
                &u.name,
                format!("`{uname}` is a user or group of Debian's base system, so it cannot be a [[users]] entry"),
                "name a user of your own (e.g. `dev`) and give it the groups it needs, e.g. `groups = [\"sudo\"]`",
            ));
        }
        if PACKAGE_ACCOUNTS.contains(&uname.as_str()) || uname.starts_with("systemd-") {
            return Err(src.error(
                &u.name,
                format!("`{uname}` is an account a package of the image creates (D-Bus, systemd, OpenSSH), so it cannot be a [[users]] entry"),
                "name a user of your own (e.g. `dev`) and give it the groups it needs, e.g. `groups = [\"sudo\"]`",
            ));
        }
        if !seen.insert(uname.clone()) {
            return Err(src.error(
                &u.name,
                format!("user `{uname}` is defined twice"),
                "give each [[users]] entry its own name, or merge the two entries",
            ));
        }
        for g in &u.groups {
            if !is_user_name(g.get_ref()) {
                return Err(src.error(
                    g,
                    format!("invalid group name `{}`", g.get_ref()),
                    "name an existing group such as `sudo` or `adm`",
                ));
            }
        }
        for k in &u.ssh_authorized_keys {
            if !is_ssh_key(k.get_ref()) {
                return Err(src.error(
                    k,
                    "not an OpenSSH public key",
                    "paste one line of a `.pub` file, e.g. `ssh-ed25519 AAAA... user@host`",
                ));
            }
        }
        if let Some(h) = &u.password_hash
            && !is_password_hash(h.get_ref())
        {
            return Err(src.error(
                h,
                "not a crypt(5) password hash (yescrypt, sha512crypt, sha256crypt or bcrypt)",
                "write a hash, never the password: `mkpasswd --method=yescrypt` (package whois) or `openssl passwd -6` prints one",
            ));
        }
        // (NixOS's administrators are `wheel`; `sudo` becomes `wheel` there.)
        let admin = |g: &str| g == "sudo" || (distro == Distro::Nixos && g == "wheel");
        let sudo_without_password = match &u.sudo_without_password {
            Some(flag) if *flag.get_ref() && !u.groups.iter().any(|g| admin(g.get_ref())) => {
                return Err(src.error(
                    flag,
                    format!("user `{uname}` is not an administrator: sudo without a password is for members of `sudo`"),
                    "add \"sudo\" to the user's `groups`, or remove `sudo-without-password`",
                ));
            }
            Some(flag) => *flag.get_ref(),
            None => false,
        };
        users.push(User {
            name: uname.clone(),
            sudo_without_password,
            password_hash: u.password_hash.as_ref().map(|h| h.get_ref().clone()),
            groups: u.groups.iter().map(|g| g.get_ref().clone()).collect(),
            ssh_authorized_keys: u
                .ssh_authorized_keys
                .iter()
                .map(|k| k.get_ref().trim().to_owned())
                .collect(),
        });
    }
    Ok(users)
}

/// A package mirror apt can read: a web URL, or `file:///` a directory on the host.
fn is_mirror_url(url: &str) -> bool {
    devos_aws::is_http_url(url)
        || url.strip_prefix("file:///").is_some_and(|rest| {
            !rest.is_empty() && !url.contains(|c: char| c.is_whitespace() || c.is_control())
        })
}

/// A NixOS release as `lib.trivial.release` spells it: `YY.MM`.
fn is_nixos_release(s: &str) -> bool {
    s.split_once('.').is_some_and(|(y, m)| {
        [y, m]
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// `[base]` beyond the distro: suite, mirror, components and keyring, checked.
struct Base {
    suite: String,
    mirror: Option<String>,
    components: Vec<String>,
    keyring: Option<PathBuf>,
}

fn base(src: &Source, raw: &RawBase, distro: Distro) -> Result<Base, SpecError> {
    let suite = match &raw.suite {
        Some(s) if !is_word(s.get_ref()) => {
            return Err(src.error(
                s,
                format!("invalid suite `{}`", s.get_ref()),
                "use a release codename such as `bookworm` or `noble`",
            ));
        }
        Some(s) if distro == Distro::Nixos && !is_nixos_release(s.get_ref()) => {
            return Err(src.error(
                s,
                format!("`{}` is not a NixOS release", s.get_ref()),
                "a NixOS suite is the release the pinned nixpkgs is, such as `25.11`; remove the key for the default",
            ));
        }
        Some(s) => s.get_ref().clone(),
        None => distro.default_suite().to_owned(),
    };
    let mirror = match &raw.mirror {
        Some(m) if !is_mirror_url(m.get_ref()) => {
            return Err(src.error(
                m,
                format!("invalid mirror `{}`", m.get_ref()),
                "give an http://, https:// or file:/// URL such as `http://deb.debian.org/debian`, or remove the key to use the host's apt sources",
            ));
        }
        Some(m) => Some(m.get_ref().trim_end_matches('/').to_owned()),
        None => None,
    };
    let components = match &raw.components {
        None if distro == Distro::Nixos => Vec::new(),
        None => vec!["main".to_owned()],
        Some(list) if list.get_ref().is_empty() => {
            return Err(src.error(
                list,
                "`components = []` names no archive area: apt would find no packages",
                "list at least one, e.g. `components = [\"main\"]`, or remove the key for the default",
            ));
        }
        Some(list) => {
            for c in list.get_ref() {
                if !is_word(c.get_ref()) {
                    return Err(src.error(
                        c,
                        format!("invalid component `{}`", c.get_ref()),
                        "components are archive areas such as `main`, `contrib` or `universe`",
                    ));
                }
            }
            list.get_ref().iter().map(|c| c.get_ref().clone()).collect()
        }
    };

    let keyring = match &raw.keyring {
        Some(k) if !k.get_ref().starts_with('/') => {
            return Err(src.error(
                k,
                format!("keyring `{}` is not an absolute path", k.get_ref()),
                "give the full path of a .gpg keyring file, e.g. `/usr/share/keyrings/ubuntu-archive-keyring.gpg`",
            ));
        }
        // It becomes apt's `Signed-By:` field: a space separates fingerprints there,
        // and a newline would start another field (`Trusted: yes`).
        Some(k)
            if k.get_ref()
                .contains(|c: char| c.is_whitespace() || c.is_control()) =>
        {
            return Err(src.error(
                k,
                "the keyring's path holds a space or a control character",
                "apt cannot name such a file in its sources: copy the keyring to a path without them, e.g. under /usr/share/keyrings/",
            ));
        }
        Some(k) => Some(PathBuf::from(k.get_ref())),
        None => None,
    };
    Ok(Base {
        suite,
        mirror,
        components,
        keyring,
    })
}

/// The `[[tests]]` entries, checked.
fn tests(src: &Source, raw: &[RawTest]) -> Result<Vec<Test>, SpecError> {
    let mut tests = Vec::new();
    let mut seen = BTreeSet::new();
    for t in raw {
        let tname = t.name.get_ref();
        if tname.trim().is_empty() {
            return Err(src.error(
                &t.name,
                "a [[tests]] entry has an empty name",
                "give the test a name, e.g. `name = \"agent-running\"`; it names the test in the report",
            ));
        }
        if !seen.insert(tname.clone()) {
            return Err(src.error(
                &t.name,
                format!("test name `{tname}` is used twice"),
                "give each [[tests]] entry its own name",
            ));
        }
        if t.run.get_ref().trim().is_empty() {
            return Err(src.error(
                &t.run,
                "empty test command",
                "`run` is a shell command line, e.g. `systemctl is-active devos-agent`",
            ));
        }
        let expect_exit = match &t.expect_exit {
            None => 0,
            Some(code) => u8::try_from(*code.get_ref()).map_err(|_| {
                src.error(
                    code,
                    format!("exit status {} is out of range", code.get_ref()),
                    "an exit status is between 0 and 255",
                )
            })?,
        };
        tests.push(Test {
            name: tname.clone(),
            run: t.run.get_ref().clone(),
            expect_exit,
        });
    }
    Ok(tests)
}

/// The characters (UTF-16 code units) a GPT partition name holds.
const GPT_NAME_MAX: usize = 36;

/// A verified root's slot is named `NAME_VERSION_<12 hex of the build id>` (and a NixOS
/// image's store partition `NAME_VERSION+<12 hex>`): refused here, at the name, when a
/// GPT cannot hold it, rather than by the disk stage after the tree is built.
fn check_slot_name(
    src: &Source,
    name: &Spanned<String>,
    version: &semver::Version,
    nixos: bool,
) -> Result<(), SpecError> {
    let slot = format!("{}_{version}", name.get_ref());
    // Names and versions are ASCII (both are checked before).
    let chars = slot.len() + "_".len() + 12;
    let shown = format!("{slot}_<12 hex of the build id>");
    if chars <= GPT_NAME_MAX {
        return Ok(());
    }
    let which = match nixos {
        true => "the Nix store's partition name",
        false => "the root slot's partition name",
    };
    Err(src.error(
        name,
        format!("{which} `{shown}` ({chars} characters) is longer than the {GPT_NAME_MAX} characters a GPT holds"),
        &format!(
            "shorten `[image] name` or `version` by {} character(s)",
            chars - GPT_NAME_MAX
        ),
    ))
}

/// The longest version: it names files (`NAME-VERSION+BUILD.raw`, at most 255 bytes)
/// and, with the name, the root partitions' labels.
const MAX_VERSION: usize = 64;

fn parse_version(src: &Source, v: &Spanned<String>) -> Result<semver::Version, SpecError> {
    match semver::Version::parse(v.get_ref()) {
        Ok(version) if !version.build.is_empty() => Err(src.error(
            v,
            format!("version `{}` has build metadata", v.get_ref()),
            "drop the `+...` part: the build appends `+<build id>` itself",
        )),
        Ok(_) if v.get_ref().len() > MAX_VERSION => Err(src.error(
            v,
            format!(
                "version `{}` is {} characters long, more than {MAX_VERSION}",
                v.get_ref(),
                v.get_ref().len()
            ),
            "shorten it: the version names the image's files and partitions (with the name and a build id)",
        )),
        Ok(version) => Ok(version),
        Err(e) => Err(src.error(
            v,
            format!("invalid version `{}`: {e}", v.get_ref()),
            "use a semantic version such as `1.2.0` or `1.2.0-rc.1`",
        )),
    }
}

/// The variant of `T` named `value`, or an error listing the names.
fn pick<T: clap::ValueEnum + Copy>(
    src: &Source,
    value: &Spanned<String>,
    what: &str,
) -> Result<T, SpecError> {
    T::from_str(value.get_ref(), false).map_err(|_| {
        let valid: Vec<_> = T::value_variants()
            .iter()
            .filter_map(|v| v.to_possible_value())
            .map(|p| format!("`{}`", p.get_name()))
            .collect();
        src.error(
            value,
            format!("unknown {what} `{}`", value.get_ref()),
            &format!("use one of {}", valid.join(", ")),
        )
    })
}

fn package_names(src: &Source, names: &[Spanned<String>]) -> Result<Vec<String>, SpecError> {
    names
        .iter()
        .map(|p| {
            if is_package_name(p.get_ref()) {
                Ok(p.get_ref().clone())
            } else {
                Err(src.error(
                    p,
                    format!("invalid package name `{}`", p.get_ref()),
                    "Debian package names are lower-case letters, digits and `+-.`, e.g. `build-essential`",
                ))
            }
        })
        .collect()
}

fn load_layer(src: &Source, layer: &Spanned<String>) -> Result<Layer, SpecError> {
    let rel = layer.get_ref();
    let base = match src.file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let path = base.join(rel);
    let text = read_beneath(base, rel).map_err(|e| {
        if e.raw_os_error() == Some(rustix::io::Errno::XDEV.raw_os_error()) {
            return src.error(
                layer,
                format!(
                    "a layer `{rel}` lies outside the spec's directory {}",
                    base.display()
                ),
                "name a file inside the spec's directory, relative to it (copy it there; no `..` climbing out, no absolute path, no symlink leading out)",
            );
        }
        let available = list_layers(&base.join("layers"));
        src.error(
            layer,
            format!("cannot read layer `{rel}` ({}): {e}", path.display()),
            &format!(
                "layer paths are relative to the spec; available layers: {}",
                if available.is_empty() {
                    "none found".to_owned()
                } else {
                    available.join(", ")
                }
            ),
        )
    })?;
    let lsrc = Source {
        file: &path,
        text: &text,
    };
    let raw: RawLayer = lsrc.parse()?;
    Ok(Layer {
        name: rel.clone(),
        description: raw.description,
        packages: package_names(&lsrc, &raw.packages.include)?,
    })
}

/// `rel`, read from within the directory `base` and never from outside it: the kernel
/// resolves it beneath `base` as it opens it (`RESOLVE_BENEATH`: no absolute path, no
/// `..` or symlink leading out, `EXDEV` otherwise), so nothing swapped in between a
/// check and the read can make the builder, root under sudo, read and show a host file
/// (`/etc/shadow`) in a parse error. Opened as a path first and read only when it is
/// a regular file (opening a device can act by itself), at most [`MAX_SPEC_FILE`].
fn read_beneath(base: &Path, rel: &str) -> std::io::Result<String> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    use std::os::fd::AsRawFd;
    let dir = rustix::fs::open(
        base,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let handle = std::fs::File::from(rustix::fs::openat2(
        &dir,
        rel,
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
    )?);
    let path = base.join(rel);
    if !handle.metadata()?.is_file() {
        return Err(devos_agent::context::not_regular(&path));
    }
    // The file the handle holds, opened for reading (never the path again).
    let file = std::fs::File::open(format!("/proc/self/fd/{}", handle.as_raw_fd()))?;
    utf8(devos_agent::context::read_opened(
        file,
        &path,
        MAX_SPEC_FILE,
    )?)
}

/// The layers in `dir`, for the hint of an error about a missing one: what cannot be
/// listed (or named in TOML, not being UTF-8) is left out of the hint.
fn list_layers(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.ends_with(".toml").then(|| format!("layers/{name}"))
        })
        .collect();
    names.sort();
    names
}

/// Parse `2G`, `1536M`, `2GiB`, `512MiB`, `1T` (binary units) into bytes; `None`
/// (the caller's error) for anything else or too large.
fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(digits);
    // (A number too large for 64 bits is a size too large, not a malformed one.)
    let num: u64 = match num.parse() {
        Ok(n) => n,
        Err(e) if *e.kind() == std::num::IntErrorKind::PosOverflow => u64::MAX,
        Err(_) => return None,
    };
    let shift = match unit.trim() {
        "" | "B" => 0,
        "K" | "KiB" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        "T" | "TiB" => 40,
        _ => return None,
    };
    Some(num.saturating_mul(1u64 << shift))
}

fn is_image_name(s: &str) -> bool {
    s.len() <= 63
        && !s.ends_with('-')
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn is_word(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(['-', '.'])
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

fn is_package_name(s: &str) -> bool {
    s.len() >= 2
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c))
}

fn is_hostname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

fn is_timezone(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('/')
        && !s.split('/').any(|p| p.is_empty() || p == "." || p == "..")
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/_-+".contains(c))
}

pub(crate) use devos_agent::accounts::is_user_name;

/// A crypt(5) hash of a method Debian's libcrypt verifies and that is not broken:
/// yescrypt (`$y$`, `$gy$`), scrypt (`$7$`), bcrypt (`$2b$`, `$2y$`), sha512crypt
/// (`$6$`) or sha256crypt (`$5$`). Nothing that would break a shadow(5) line.
fn is_password_hash(s: &str) -> bool {
    let fields: Vec<&str> = s.split('$').collect();
    // `$id$...$hash`: the last field is the hash, and it is never short.
    let hash_ok =
        fields.len() >= 4 && fields[0].is_empty() && fields.last().is_some_and(|h| h.len() >= 22);
    ["$y$", "$gy$", "$7$", "$2b$", "$2y$", "$6$", "$5$"]
        .iter()
        .any(|p| s.starts_with(p))
        && hash_ok
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "$./=".contains(c))
}

pub(crate) use devos_agent::accounts::is_ssh_public_key as is_ssh_key;

/// The spec's canonical form: every resolved value as JSON with sorted keys
/// (serde_json's map is ordered). Comments, key order and formatting of the file
/// do not change it.
/// `[[tests]]` are left out: they do not change the image (the boot test reads them
/// from the spec), so editing a test never rebuilds anything.
pub(crate) fn canonical(spec: &Spec) -> String {
    // A spec is plain data with string keys: serializing cannot fail, and a silent
    // `null` here would give every spec the same build id.
    let mut v = serde_json::to_value(spec).expect("a spec always serializes to JSON");
    if let Some(map) = v.as_object_mut() {
        map.remove("tests");
    }
    v.to_string()
}

mod files;
mod lint;
pub(crate) use files::{ExtraTree, trees_digest};
pub(crate) mod nixos;

#[cfg(test)]
mod tests;
