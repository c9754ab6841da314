//! What a build says about itself: `manifest.json` in every output directory, the
//! registry's record of a version.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::model::spec::Format;

/// One named input to the build id, as shown by `--json` and the manifest.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Input {
    pub name: String,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Artifact {
    pub file: String,
    pub format: Format,
    pub sha256: String,
    pub size: u64,
    /// Bytes actually allocated on disk (sparse files use less than `size`).
    pub used_bytes: u64,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct StageTiming {
    pub name: String,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Package {
    pub name: String,
    pub version: String,
}

/// `manifest.json` in every output directory.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Manifest {
    pub name: String,
    pub version: String,
    pub build_id: String,
    pub description: String,
    pub distro: String,
    pub suite: String,
    pub builder_version: String,
    pub source_date_epoch: u64,
    pub kernel_cmdline: String,
    pub inputs: Vec<crate::model::manifest::Input>,
    pub package_sources: String,
    pub agent: Option<AgentInfo>,
    pub packages: Vec<Package>,
    pub partitions: Vec<PartitionInfo>,
    pub artifacts: Vec<Artifact>,
    pub stages: Vec<StageTiming>,
    /// Cache keys of the stage outputs this version was built from.
    pub cache_keys: CacheKeys,
}

#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct CacheKeys {
    pub base: String,
    pub tree: String,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct AgentInfo {
    pub file: String,
    pub version: String,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct PartitionInfo {
    pub label: String,
    pub filesystem: String,
    pub offset: u64,
    pub size: u64,
}

impl Manifest {
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("manifest.json");
        let text = fs::read_to_string(&path).with_context(|| {
            format!(
                "cannot read {}: is this an image output directory?",
                path.display()
            )
        })?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid manifest", path.display()))
    }

    /// The raw artifact's path in `dir`.
    pub fn raw(&self, dir: &Path) -> Option<PathBuf> {
        self.artifacts
            .iter()
            .find(|a| a.format == Format::Raw)
            .map(|a| dir.join(&a.file))
    }
}
