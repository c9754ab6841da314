//! What a build says about itself: `manifest.json` in every output directory, the
//! registry's record of a version.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::model::spec::Format;

/// One named input to the build id, as shown by `--json` and the manifest.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Input {
    pub(crate) name: String,
    pub(crate) sha256: String,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub(crate) struct Artifact {
    pub(crate) file: String,
    pub(crate) format: Format,
    pub(crate) sha256: String,
    pub(crate) size: u64,
    /// Bytes actually allocated on disk (sparse files use less than `size`).
    pub(crate) used_bytes: u64,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub(crate) struct StageTiming {
    pub(crate) name: String,
    pub(crate) seconds: f64,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub(crate) struct Package {
    pub(crate) name: String,
    pub(crate) version: String,
}

/// `manifest.json` in every output directory.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Manifest {
    pub(crate) name: String,
    pub(crate) version: String,
    pub(crate) build_id: String,
    pub(crate) description: String,
    pub(crate) distro: String,
    pub(crate) suite: String,
    pub(crate) builder_version: String,
    pub(crate) source_date_epoch: u64,
    pub(crate) kernel_cmdline: String,
    /// The dm-verity root hash of a verified root (also on the command line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) root_hash: Option<String>,
    /// A verified image's update bundle (`update/` in the output directory): what
    /// systemd-sysupdate fetches to move a machine to this version.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) update: Vec<UpdateFile>,
    /// Where the image looks for updates and whose signature it accepts (`[update]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) update_feed: Option<UpdateFeed>,
    /// The certificate systemd-boot and the unified kernel image are signed with, and
    /// that the image enrolls on its first boot (`[disk] secure-boot`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) secure_boot: Option<SecureBoot>,
    pub(crate) inputs: Vec<crate::model::manifest::Input>,
    pub(crate) package_sources: String,
    pub(crate) agent: Option<AgentInfo>,
    /// The spec's login users; the first is the default user (who gets the EC2 key
    /// pair's key and the console autologin of `image boot`).
    #[serde(default)]
    pub(crate) users: Vec<String>,
    pub(crate) packages: Vec<Package>,
    pub(crate) partitions: Vec<PartitionInfo>,
    pub(crate) artifacts: Vec<Artifact>,
    pub(crate) stages: Vec<StageTiming>,
    /// Cache keys of the stage outputs this version was built from.
    pub(crate) cache_keys: CacheKeys,
}

/// The Secure Boot certificate an image's boot chain is signed with.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub(crate) struct SecureBoot {
    pub(crate) certificate_sha256: String,
    pub(crate) subject: String,
    /// The certificate itself (PEM, public), for firmware given its keys instead of
    /// enrolling them from the ESP (an AMI's UEFI data). Empty in manifests of builds
    /// made before it was recorded.
    #[serde(default)]
    pub(crate) certificate: String,
}

impl SecureBoot {
    /// What signed the image, as the builder's summaries say it.
    pub(crate) fn describe(&self) -> String {
        format!(
            "signed by {} (certificate sha256 {})",
            self.subject, self.certificate_sha256
        )
    }
}

/// `[update]` as built into the image.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub(crate) struct UpdateFeed {
    pub(crate) url: String,
    pub(crate) key_fingerprint: String,
}

impl UpdateFeed {
    /// Where the image updates from and whose signature it takes, as the builder's
    /// summaries say it.
    pub(crate) fn describe(&self) -> String {
        format!("from {}, signed by {}", self.url, self.key_fingerprint)
    }
}

/// One file of an update bundle.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub(crate) struct UpdateFile {
    pub(crate) file: String,
    pub(crate) sha256: String,
    pub(crate) size: u64,
}

#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub(crate) struct CacheKeys {
    pub(crate) base: String,
    pub(crate) tree: String,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub(crate) struct AgentInfo {
    /// The agent's package beside the image (`devos-agent_VERSION_amd64.deb`) and its
    /// sha256; both empty where Nix built the agent into the image (NixOS).
    pub(crate) file: String,
    pub(crate) version: String,
    pub(crate) sha256: String,
    /// The Bedrock models (or inference profiles) the agent's configuration calls:
    /// what its instance role may invoke. Empty with the model route off; `None` in
    /// manifests of builds made before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) models: Option<Vec<String>>,
    /// The region the agent calls Bedrock in (`[model] region`); empty: the instance's.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) model_region: String,
}

impl AgentInfo {
    /// The agent of an image: its package (`file`, `sha256`; both empty where Nix built
    /// it into the image), its version, and the models and region of its `config`.
    pub(crate) fn new(
        file: String,
        version: String,
        sha256: String,
        config: &devos_agent::config::AgentConfig,
    ) -> Self {
        Self {
            file,
            version,
            sha256,
            models: Some(Self::models_of(config)),
            model_region: config.model.region.clone(),
        }
    }

    /// The models `config` calls, each once.
    pub(crate) fn models_of(config: &devos_agent::config::AgentConfig) -> Vec<String> {
        let m = &config.model;
        let mut models = Vec::new();
        if m.enabled {
            for id in [&m.small, &m.large] {
                if !models.contains(id) {
                    models.push(id.clone());
                }
            }
        }
        models
    }
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub(crate) struct PartitionInfo {
    pub(crate) label: String,
    pub(crate) filesystem: String,
    pub(crate) offset: u64,
    pub(crate) size: u64,
}

impl Manifest {
    /// Whether the image holds the package `name`.
    pub(crate) fn has_package(&self, name: &str) -> bool {
        self.packages.iter().any(|p| p.name == name)
    }

    pub(crate) fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("manifest.json");
        let text = fs::read_to_string(&path).map_err(|e| {
            anyhow::anyhow!(
                "cannot read {}: {e}\n  hint: {} is not an image output directory: pass the image as NAME@VERSION (`devos-build image list` shows them) or a directory that `devos-build image build` wrote",
                path.display(),
                dir.display()
            )
        })?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid manifest", path.display()))
    }

    /// The raw artifact's path in `dir`.
    pub(crate) fn raw(&self, dir: &Path) -> Option<PathBuf> {
        self.artifacts
            .iter()
            .find(|a| a.format == Format::Raw)
            .map(|a| dir.join(&a.file))
    }
}
