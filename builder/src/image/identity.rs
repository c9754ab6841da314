//! The `resolve` stage's result: the build id (sha256 over every input), the version
//! derived from it, and the GUIDs/UUIDs/serials derived from the build id so that the
//! same inputs always give the same disk.

use sha2::{Digest, Sha256};

use crate::model::manifest::{Input, Package};
use crate::model::spec::Spec;
use crate::store::cache;
use crate::support::digest::sha256_hex;

#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Identity {
    pub(crate) build_id: String,
    /// `<spec version>+<first 12 hex of the build id>`.
    pub(crate) version: String,
    pub(crate) inputs: Vec<Input>,
    pub(crate) source_date_epoch: u64,
    pub(crate) disk_guid: String,
    pub(crate) esp_partuuid: String,
    pub(crate) root_partuuid: String,
    pub(crate) var_partuuid: String,
    /// The empty second root slot of a verified image and its hash partition.
    pub(crate) root_b_partuuid: String,
    pub(crate) verity_b_partuuid: String,
    /// dm-verity's salt (hex) and superblock UUID, so the same root hashes the same.
    pub(crate) verity_salt: String,
    pub(crate) verity_uuid: String,
    pub(crate) root_fs_uuid: String,
    pub(crate) var_fs_uuid: String,
    /// FAT volume id of the ESP.
    pub(crate) esp_serial: String,
    /// Cache key of the base tree (before the agent and configuration).
    pub(crate) base_key: String,
    /// Cache key of the finished tree.
    pub(crate) tree_key: String,
}

/// The version a build of `spec` gets: `<spec version>+<first 12 hex of the build id>`.
pub(crate) fn built_version(spec: &Spec, build_id: &str) -> String {
    format!(
        "{}+{}",
        spec.version,
        build_id.get(..12).unwrap_or(build_id)
    )
}

/// The builder's own version: a new builder may build differently.
pub(crate) const BUILDER_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Every source file of `image/`, the code that shapes an image's bytes, by name.
/// Hashing the source (not the binary) means any change to what is built changes the
/// build id, while the same source compiled anywhere gives the same id. A test
/// compares the names with the folder, so a new file cannot be left out.
const SHAPING_SOURCES: &[(&str, &str)] = &[
    ("access.rs", include_str!("access.rs")),
    ("apt.rs", include_str!("apt.rs")),
    ("convert.rs", include_str!("convert.rs")),
    ("customize.rs", include_str!("customize.rs")),
    ("disk.rs", include_str!("disk.rs")),
    ("files.rs", include_str!("files.rs")),
    ("identity.rs", include_str!("identity.rs")),
    ("mod.rs", include_str!("mod.rs")),
    ("rootfs.rs", include_str!("rootfs.rs")),
    ("secure_boot.rs", include_str!("secure_boot.rs")),
    ("sysupdate.rs", include_str!("sysupdate.rs")),
];

/// The files that make the base tree (its cache key): package resolution and rootfs.
const BASE_SOURCES: &[&str] = &["apt.rs", "rootfs.rs"];

/// A source file without its unit tests (the `#[cfg(test)] mod tests` at its end):
/// tests do not shape the image, so changing them rebuilds nothing.
fn shaping_part(source: &str) -> &str {
    source
        .find("\n#[cfg(test)]\nmod tests")
        .map_or(source, |end| &source[..end])
}

fn sources_digest(sources: &[(&str, &str)], names: Option<&[&str]>) -> String {
    let mut hasher = Sha256::new();
    hasher.update(BUILDER_VERSION);
    for (name, source) in sources {
        if names.is_none_or(|n| n.contains(name)) {
            hasher.update(sha256_hex(shaping_part(source).as_bytes()));
        }
    }
    hex::encode(hasher.finalize())
}

/// Everything that determines an image, gathered by the `resolve` stage.
pub(crate) struct Inputs<'a> {
    pub(crate) spec: &'a Spec,
    pub(crate) agent_sha256: Option<&'a str>,
    pub(crate) sources_deb822: &'a str,
    pub(crate) packages: &'a [Package],
    /// The archive's date, used when neither the spec nor the environment set one.
    pub(crate) archive_date: u64,
    /// `SOURCE_DATE_EPOCH` from the environment ([`source_date_epoch`]).
    pub(crate) env_source_date_epoch: Option<u64>,
    /// `name=version` of the host tools that write the image (mmdebstrap, mkfs, ...).
    pub(crate) host_tools: &'a str,
    /// [`crate::model::spec::trees_digest`] of the spec's extra trees (None: none).
    pub(crate) extra_trees: Option<&'a str>,
    /// SHA-256 of the Secure Boot certificate that signs the boot chain (None: the
    /// spec has no `secure-boot`).
    pub(crate) secure_boot_cert: Option<&'a str>,
}

/// Compute the identity of a build from its inputs.
pub(crate) fn resolve(i: &Inputs) -> Identity {
    resolve_with(i, SHAPING_SOURCES)
}

/// [`resolve`] as if `sources` were the shaping code (tests change it).
fn resolve_with(i: &Inputs, sources: &[(&str, &str)]) -> Identity {
    let spec = i.spec;
    let source_date_epoch = spec
        .source_date_epoch
        .or(i.env_source_date_epoch)
        .unwrap_or(i.archive_date);
    let packages: String = i
        .packages
        .iter()
        .map(|p| format!("{}={}\n", p.name, p.version))
        .collect();
    let input = |name: &str, data: &str| Input {
        name: name.into(),
        sha256: sha256_hex(data.as_bytes()),
    };
    let mut inputs = vec![
        input("spec", &crate::model::spec::canonical(spec)),
        input("packages", &packages),
        Input {
            name: "agent-package".into(),
            sha256: i.agent_sha256.unwrap_or("none").to_owned(),
        },
        input("package-sources", i.sources_deb822),
        input("source-date-epoch", &source_date_epoch.to_string()),
        input("host-tools", i.host_tools),
        // The file customize writes to /etc/devos/agent.toml, as rendered by the agent
        // crate (its header and key order are not in the canonical spec).
        input(
            "agent-config",
            &if spec.agent_enabled {
                spec.agent_config.to_file()
            } else {
                String::new()
            },
        ),
        Input {
            name: "builder".into(),
            sha256: sources_digest(sources, None),
        },
    ];
    // The files of the extra trees (their paths are in the spec).
    if let Some(digest) = i.extra_trees {
        inputs.push(Input {
            name: "extra-trees".into(),
            sha256: digest.to_owned(),
        });
    }
    // The key the boot chain is signed with: another key, other bytes on the ESP.
    if let Some(cert) = i.secure_boot_cert {
        inputs.push(Input {
            name: "secure-boot-certificate".into(),
            sha256: cert.to_owned(),
        });
    }
    let mut hasher = Sha256::new();
    for i in &inputs {
        hasher.update(format!("{}={}\n", i.name, i.sha256));
    }
    let build_id = hex::encode(hasher.finalize());
    let version = built_version(spec, &build_id);
    let base_key = sha256_hex(
        format!(
            "base\n{}\n{}\n{}\n{packages}{source_date_epoch}\n{}\n{}\n{}",
            spec.distro.name(),
            spec.suite,
            i.sources_deb822,
            i.host_tools,
            sources_digest(sources, Some(BASE_SOURCES)),
            cache::format_digest()
        )
        .as_bytes(),
    );
    Identity {
        disk_guid: derived_uuid(&build_id, "disk"),
        esp_partuuid: derived_uuid(&build_id, "esp-partition"),
        root_partuuid: derived_uuid(&build_id, "root-partition"),
        // An updatable (verified) image keeps its /var across versions: every version
        // of the image names the same partition.
        var_partuuid: if spec.verity {
            derived_uuid(&spec.name, "var-partition")
        } else {
            derived_uuid(&build_id, "var-partition")
        },
        root_b_partuuid: derived_uuid(&build_id, "root-b-partition"),
        verity_b_partuuid: derived_uuid(&build_id, "verity-b-partition"),
        verity_salt: sha256_hex(format!("{build_id}:verity-salt").as_bytes()),
        verity_uuid: derived_uuid(&build_id, "verity"),
        root_fs_uuid: derived_uuid(&build_id, "root-fs"),
        var_fs_uuid: derived_uuid(&build_id, "var-fs"),
        esp_serial: sha256_hex(format!("{build_id}:esp-serial").as_bytes())[..8].to_uppercase(),
        tree_key: sha256_hex(format!("tree\n{build_id}\n{}", cache::format_digest()).as_bytes()),
        base_key,
        build_id,
        version,
        inputs,
        source_date_epoch,
    }
}

/// `SOURCE_DATE_EPOCH` from the environment; `None` when unset or empty. Set to
/// anything but whole seconds it is an error: ignoring it would quietly give an image
/// of another date than the one asked for.
pub(crate) fn source_date_epoch() -> anyhow::Result<Option<u64>> {
    let value = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) if v.is_empty() => return Ok(None),
        Ok(v) => v,
        Err(std::env::VarError::NotPresent) => return Ok(None),
        Err(std::env::VarError::NotUnicode(v)) => v.to_string_lossy().into_owned(),
    };
    match value.parse::<u64>() {
        Ok(secs) if crate::model::spec::SOURCE_DATE_EPOCHS.contains(&secs) => Ok(Some(secs)),
        Ok(_) => anyhow::bail!(
            "SOURCE_DATE_EPOCH is {value}, outside 1980 to 2107, the dates the image's EFI system partition (FAT) can hold\n  hint: set it to a Unix time in that range such as 1700000000, or unset it to use the archive's date"
        ),
        _ => anyhow::bail!(
            "SOURCE_DATE_EPOCH is {value:?}, not a Unix time in seconds\n  hint: set it to a number such as 1700000000, or unset it to use the archive's date"
        ),
    }
}

/// A random-looking (version 4 layout) UUID that is a pure function of the build id
/// and what it names.
fn derived_uuid(build_id: &str, label: &str) -> String {
    let h = Sha256::digest(format!("{build_id}:{label}").as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&h[..16]);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    uuid_text(&hex::encode(b))
}

/// 32 hex digits written as a UUID (8-4-4-4-12).
pub(crate) fn uuid_text(x: &str) -> String {
    format!(
        "{}-{}-{}-{}-{}",
        &x[..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = include_str!("../../../images/devos-debian.toml");

    fn spec(text: &str) -> Spec {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/x.toml");
        crate::model::spec::parse(&dir, text).unwrap()
    }

    fn pkgs(list: &[(&str, &str)]) -> Vec<Package> {
        list.iter()
            .map(|(n, v)| Package {
                name: (*n).into(),
                version: (*v).into(),
            })
            .collect()
    }

    /// The build id with one input varied.
    fn id(
        spec_text: &str,
        agent: &str,
        sources: &str,
        packages: &[Package],
        date: u64,
        tools: &str,
    ) -> Identity {
        id_with_trees(spec_text, agent, sources, packages, date, tools, None)
    }

    /// [`id`] with extra trees' digest.
    fn id_with_trees(
        spec_text: &str,
        agent: &str,
        sources: &str,
        packages: &[Package],
        date: u64,
        tools: &str,
        extra_trees: Option<&str>,
    ) -> Identity {
        resolve(&Inputs {
            spec: &spec(spec_text),
            agent_sha256: Some(agent),
            sources_deb822: sources,
            packages,
            archive_date: date,
            env_source_date_epoch: None,
            host_tools: tools,
            extra_trees,
            secure_boot_cert: None,
        })
    }

    #[test]
    fn the_files_of_extra_trees_change_the_id_and_the_tree_key() {
        let p = pkgs(&[("bash", "5.2")]);
        let with =
            |trees: Option<&str>| id_with_trees(SPEC, "a", "deb", &p, 100, "mmdebstrap=1", trees);
        let (none, one, other) = (with(None), with(Some("1")), with(Some("2")));
        assert_ne!(none.build_id, one.build_id);
        assert_ne!(one.build_id, other.build_id);
        assert_ne!(one.tree_key, other.tree_key);
        // The base tree (packages only) is shared.
        assert_eq!(one.base_key, other.base_key);
    }

    #[test]
    fn every_input_changes_the_id_and_irrelevant_edits_do_not() {
        let p = pkgs(&[("bash", "5.2"), ("dbus", "1.14")]);
        let base = id(SPEC, "a", "deb", &p, 100, "mmdebstrap=1");
        let same = id(
            &format!("# a new comment\n{SPEC}\n[[tests]]\nname = \"extra\"\nrun = \"true\"\n"),
            "a",
            "deb",
            &p,
            100,
            "mmdebstrap=1",
        );
        assert_eq!(
            base.build_id, same.build_id,
            "comments and tests must not change the id"
        );
        assert_eq!(base.base_key, same.base_key);

        let variants = [
            (
                "spec value",
                id(
                    &SPEC.replace("\"devos\"", "\"devos2\""),
                    "a",
                    "deb",
                    &p,
                    100,
                    "mmdebstrap=1",
                ),
            ),
            (
                "agent package",
                id(SPEC, "b", "deb", &p, 100, "mmdebstrap=1"),
            ),
            (
                "package sources",
                id(SPEC, "a", "deb2", &p, 100, "mmdebstrap=1"),
            ),
            (
                "package version",
                id(
                    SPEC,
                    "a",
                    "deb",
                    &pkgs(&[("bash", "5.3"), ("dbus", "1.14")]),
                    100,
                    "mmdebstrap=1",
                ),
            ),
            (
                "package set",
                id(
                    SPEC,
                    "a",
                    "deb",
                    &pkgs(&[("bash", "5.2")]),
                    100,
                    "mmdebstrap=1",
                ),
            ),
            (
                "archive date",
                id(SPEC, "a", "deb", &p, 101, "mmdebstrap=1"),
            ),
            ("host tools", id(SPEC, "a", "deb", &p, 100, "mmdebstrap=2")),
        ];
        for (what, v) in &variants {
            assert_ne!(v.build_id, base.build_id, "{what} must change the build id");
            assert_eq!(v.version, format!("0.2.0+{}", &v.build_id[..12]));
        }
        // The base tree depends only on what mmdebstrap sees: not on the agent or
        // the image's own settings.
        let base_unchanged = ["spec value", "agent package"];
        for (what, v) in &variants {
            assert_eq!(
                v.base_key == base.base_key,
                base_unchanged.contains(what),
                "base cache key and {what}"
            );
        }
        // A spec's own source-date-epoch wins over the archive date.
        let pinned_spec = SPEC.replace(
            "version = \"0.2.0\"",
            "version = \"0.2.0\"\nsource-date-epoch = 1700000000",
        );
        let pinned = id(&pinned_spec, "a", "deb", &p, 100, "mmdebstrap=1");
        assert_eq!(pinned.source_date_epoch, 1_700_000_000);
        assert_eq!(base.source_date_epoch, 100);
        // SOURCE_DATE_EPOCH from the environment wins over the archive date, not
        // over the spec.
        let with_env = |spec_text: &str| {
            resolve(&Inputs {
                spec: &spec(spec_text),
                agent_sha256: Some("a"),
                sources_deb822: "deb",
                packages: &p,
                archive_date: 100,
                env_source_date_epoch: Some(1_600_000_000),
                host_tools: "mmdebstrap=1",
                extra_trees: None,
                secure_boot_cert: None,
            })
            .source_date_epoch
        };
        assert_eq!(with_env(SPEC), 1_600_000_000);
        assert_eq!(with_env(&pinned_spec), 1_700_000_000);
    }

    #[test]
    fn derived_uuids_are_stable_and_distinct() {
        let a = derived_uuid("abc", "root-fs");
        assert_eq!(a, derived_uuid("abc", "root-fs"));
        assert_ne!(a, derived_uuid("abc", "var-fs"));
        assert_ne!(a, derived_uuid("abd", "root-fs"));
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
    }

    #[test]
    fn every_file_of_the_image_folder_is_hashed_and_nothing_else() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/image");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap())
            .inspect(|e| {
                assert!(
                    e.file_type().unwrap().is_file(),
                    "{e:?}: a folder in image/"
                )
            })
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        on_disk.sort();
        let hashed: Vec<&str> = SHAPING_SOURCES.iter().map(|(name, _)| *name).collect();
        assert_eq!(
            hashed, on_disk,
            "SHAPING_SOURCES must name exactly the files of src/image"
        );
        for name in BASE_SOURCES {
            assert!(hashed.contains(name), "{name}");
        }
        // What is left out of each file is its unit-test module and nothing else: it
        // ends the file, and no other item follows it.
        for (name, source) in SHAPING_SOURCES {
            let rest = &source[shaping_part(source).len()..];
            if rest.is_empty() {
                continue;
            }
            let closing = rest.lines().filter(|l| *l == "}").count();
            let outline = rest.starts_with("\n#[cfg(test)]\nmod tests;") && closing == 0;
            let block = rest.starts_with("\n#[cfg(test)]\nmod tests {")
                && closing == 1
                && rest.trim_end().ends_with('}');
            assert!(
                outline || block,
                "{name}: code after its tests module would not be hashed; keep `mod tests` last"
            );
        }
    }

    #[test]
    fn only_unit_tests_are_left_out_of_the_hash() {
        let source = "fn shape() {}\n#[cfg(test)]\nmod tests {\n    fn t() {}\n}\n";
        assert_eq!(shaping_part(source), "fn shape() {}");
        assert_eq!(shaping_part("fn shape() {}\n"), "fn shape() {}\n");
    }

    /// A change to how partition UUIDs are derived (which customize writes into
    /// /etc/fstab) makes another version, whose finished tree is not the cached one;
    /// the base tree, which holds no UUID, is still reused.
    #[test]
    fn changing_uuid_derivation_changes_the_version_and_the_tree_key() {
        let p = pkgs(&[("bash", "5.2")]);
        let inputs = Inputs {
            spec: &spec(SPEC),
            agent_sha256: Some("a"),
            sources_deb822: "deb",
            packages: &p,
            archive_date: 100,
            env_source_date_epoch: None,
            host_tools: "mmdebstrap=1",
            extra_trees: None,
            secure_boot_cert: None,
        };
        let before = resolve_with(&inputs, SHAPING_SOURCES);
        let uuid_input = "format!(\"{build_id}:{label}\")";
        let changed: Vec<(&str, String)> = SHAPING_SOURCES
            .iter()
            .map(|(name, text)| {
                let text = if *name == "identity.rs" {
                    assert!(text.contains(uuid_input), "derived_uuid's input moved");
                    text.replacen(uuid_input, "format!(\"{build_id}/{label}\")", 1)
                } else {
                    (*text).to_owned()
                };
                (*name, text)
            })
            .collect();
        let changed: Vec<(&str, &str)> = changed.iter().map(|(n, t)| (*n, t.as_str())).collect();
        let after = resolve_with(&inputs, &changed);
        assert_ne!(before.version, after.version);
        assert_ne!(
            before.tree_key, after.tree_key,
            "the cached tree would be reused"
        );
        assert_eq!(before.base_key, after.base_key);
    }
}
