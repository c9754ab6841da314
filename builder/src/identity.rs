//! The `resolve` stage's result: the build id (sha256 over every input), the version
//! derived from it, and the GUIDs/UUIDs/serials derived from the build id so that the
//! same inputs always give the same disk.

use sha2::{Digest, Sha256};

use crate::spec::Spec;

/// One named input to the build id, as shown by `--json` and the manifest.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Input {
    pub name: String,
    pub sha256: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Identity {
    pub build_id: String,
    /// `<spec version>+<first 12 hex of the build id>`.
    pub version: String,
    pub inputs: Vec<Input>,
    pub source_date_epoch: u64,
    pub disk_guid: String,
    pub esp_partuuid: String,
    pub root_partuuid: String,
    pub var_partuuid: String,
    pub root_fs_uuid: String,
    pub var_fs_uuid: String,
    /// FAT volume id of the ESP.
    pub esp_serial: String,
}

/// The builder's own version: a new builder may build differently.
pub const BUILDER_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The source of every stage that shapes the image's bytes. Hashing the source (not
/// the binary) means any change to what is built changes the build id, while the same
/// source compiled anywhere gives the same id.
const STAGE_SOURCES: &[&str] = &[
    include_str!("rootfs.rs"),
    include_str!("customize.rs"),
    include_str!("disk.rs"),
    include_str!("convert.rs"),
];

fn builder_digest() -> String {
    let mut hasher = Sha256::new();
    hasher.update(BUILDER_VERSION);
    for source in STAGE_SOURCES {
        hasher.update(sha256_hex(source.as_bytes()));
    }
    hex::encode(hasher.finalize())
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Compute the identity of a build from its inputs.
pub fn resolve(spec: &Spec, agent_sha256: &str, sources_deb822: &str) -> Identity {
    let inputs = vec![
        Input {
            name: "spec".into(),
            sha256: sha256_hex(crate::spec::canonical(spec).as_bytes()),
        },
        Input {
            name: "agent-package".into(),
            sha256: agent_sha256.to_owned(),
        },
        Input {
            name: "package-sources".into(),
            sha256: sha256_hex(sources_deb822.as_bytes()),
        },
        Input {
            name: "builder".into(),
            sha256: builder_digest(),
        },
    ];
    let mut hasher = Sha256::new();
    for i in &inputs {
        hasher.update(format!("{}={}\n", i.name, i.sha256));
    }
    let build_id = hex::encode(hasher.finalize());
    let version = format!("{}+{}", spec.version, &build_id[..12]);
    let source_date_epoch = source_date_epoch().unwrap_or_else(now);
    Identity {
        disk_guid: derived_uuid(&build_id, "disk"),
        esp_partuuid: derived_uuid(&build_id, "esp-partition"),
        root_partuuid: derived_uuid(&build_id, "root-partition"),
        var_partuuid: derived_uuid(&build_id, "var-partition"),
        root_fs_uuid: derived_uuid(&build_id, "root-fs"),
        var_fs_uuid: derived_uuid(&build_id, "var-fs"),
        esp_serial: sha256_hex(format!("{build_id}:esp-serial").as_bytes())[..8].to_uppercase(),
        build_id,
        version,
        inputs,
        source_date_epoch,
    }
}

/// `SOURCE_DATE_EPOCH` from the environment, if set to a number.
pub fn source_date_epoch() -> Option<u64> {
    std::env::var("SOURCE_DATE_EPOCH").ok()?.parse().ok()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A random-looking (version 4 layout) UUID that is a pure function of the build id
/// and what it names.
pub fn derived_uuid(build_id: &str, label: &str) -> String {
    let h = Sha256::digest(format!("{build_id}:{label}").as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&h[..16]);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let x = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &x[..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_uuids_are_stable_and_distinct() {
        let a = derived_uuid("abc", "root-fs");
        assert_eq!(a, derived_uuid("abc", "root-fs"));
        assert_ne!(a, derived_uuid("abc", "var-fs"));
        assert_ne!(a, derived_uuid("abd", "root-fs"));
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
    }
}
