//! `image build` of a NixOS spec: what Nix needs is checked, the spec is rendered as a
//! module beside the output (`NAME/nixos/NAME.nix`), the image's derivation names the
//! version (its store path's hash is the build id: input-addressed, it already says
//! what went in), `nix build` makes the disk, and the disk goes through the same
//! output directory, conversions, manifest and registry as a Debian image's.

use std::fs;
use std::time::Instant;

use anyhow::{Context, Result};

use super::{
    BuildOptions, Built, agent_pkg, already_built, convert_all, final_dir, images_dir,
    lock_version, publish_dir, write_outputs,
};
use crate::model::manifest::{AgentInfo, CacheKeys, Input, Manifest, StageTiming};
use crate::model::spec::Spec;
use crate::store::registry;
use crate::support::digest::sha256_hex;
use crate::support::ui::Ui;
use crate::support::workdir::{WorkDir, remove_stale_work_dirs};

pub(super) fn build(opts: &BuildOptions, spec: &Spec, ui: &mut Ui) -> Result<Built> {
    let mut stages = Vec::new();
    let mut timed = |name: &str, start: Instant| {
        stages.push(StageTiming {
            name: name.to_owned(),
            seconds: start.elapsed().as_secs_f64(),
        });
    };
    // The store and its hash tree are named NAME_VERSION on the disk (nixos/image.nix),
    // which nixpkgs refuses past the 36 characters a GPT name holds, and only once it
    // evaluates the final version: the spec's check refused a longer one already.
    let start = Instant::now();
    let source = agent_pkg::agent_source(&spec.path);
    let flake = crate::nixos::check_host(spec, source.as_deref())?;
    let images = images_dir(opts, spec);
    // One build of a NixOS image at a time: its module (rendered per name) is written
    // and evaluated before the version is known. A second one waits, then finds its
    // version up to date if the first built it.
    fs::create_dir_all(&images).with_context(|| format!("cannot create {}", images.display()))?;
    let _lock = lock_version(&images, &spec.name, ui)?;
    let config = images.join("nixos").join(format!("{}.nix", spec.name));
    ui.info(&format!(
        "evaluating the NixOS configuration {}",
        config.display()
    ));
    let plain = spec.version.to_string();
    let drv = crate::nixos::derivation(&flake, spec, &config, &plain)?;
    let build_id = crate::nixos::build_id(&drv)?;
    let version = format!("{plain}+{build_id}");
    timed("evaluate", start);
    let final_dir = final_dir(opts, spec, &version);
    let registry_path = opts.registry.clone().unwrap_or_else(registry::default_path);
    if !opts.force
        && let Some(built) =
            already_built(spec, &version, &build_id, &final_dir, &registry_path, ui)?
    {
        return Ok(built);
    }

    let start = Instant::now();
    ui.info(&format!("building {} {version} with nix build", spec.name));
    let built = crate::nixos::build(&flake, spec, &config, &version)?;
    timed("nix-build", start);

    let start = Instant::now();
    remove_stale_work_dirs(&images);
    let work = WorkDir::new(&images)?;
    let staged = work.path().join("out");
    fs::create_dir(&staged)?;
    // The store's disk is read-only and as small as its contents: a writable copy
    // grown to `[disk] size`, where systemd-repart makes /var on the first boot.
    let raw = work.path().join("disk.raw");
    let mut file = fs::File::create(&raw)?;
    let len = crate::image::files::copy_sparse(&built, &mut file, 0, None)?;
    file.set_len(len.max(spec.disk_size))?;
    drop(file);
    let partitions = crate::nixos::partitions(&raw)?;
    let artifacts = convert_all(spec, &version, &raw, &staged)?;
    fs::remove_file(&raw)?;
    timed("convert", start);

    let lock = fs::read(flake.join("flake.lock"))
        .with_context(|| format!("cannot read {}", flake.join("flake.lock").display()))?;
    let drv_bytes = fs::read(&drv).with_context(|| format!("cannot read {drv}"))?;
    let manifest = Manifest {
        name: spec.name.clone(),
        version: version.clone(),
        build_id,
        description: spec.description.clone(),
        distro: spec.distro.name().to_owned(),
        suite: spec.suite.clone(),
        builder_version: crate::image::identity::BUILDER_VERSION.to_owned(),
        source_date_epoch: crate::nixos::locked_time(&lock),
        kernel_cmdline: spec.kernel_cmdline.clone(),
        root_hash: None,
        update: Vec::new(),
        update_feed: None,
        secure_boot: None,
        inputs: vec![
            Input {
                name: drv.clone(),
                sha256: sha256_hex(&drv_bytes),
            },
            Input {
                name: "flake.lock".into(),
                sha256: sha256_hex(&lock),
            },
        ],
        package_sources: crate::nixos::substituter(spec),
        agent: agent_info(spec),
        users: spec.users.iter().map(|u| u.name.clone()).collect(),
        packages: Vec::new(),
        partitions,
        artifacts,
        stages,
        cache_keys: CacheKeys::default(),
    };
    write_outputs(&staged, &manifest)?;
    publish_dir(&staged, &final_dir)?;
    registry::Registry::open(&registry_path)?.record_build(
        &final_dir,
        &spec.path,
        &manifest,
        &[],
    )?;
    Ok(Built {
        dir: final_dir,
        manifest,
        fresh: true,
        files: Vec::new(),
    })
}

/// The agent of a NixOS image, built into it by Nix (no package beside it): its version
/// and the models it calls, which its instance role may invoke.
fn agent_info(spec: &Spec) -> Option<AgentInfo> {
    let version = env!("CARGO_PKG_VERSION").to_owned();
    (spec.agent_enabled)
        .then(|| AgentInfo::new(String::new(), version, String::new(), &spec.agent_config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nixos_image_records_its_agent_and_the_models_it_calls() {
        let spec = |extra: &str| {
            let text = format!(
                "[image]\nname = \"n\"\nversion = \"0.1.0\"\n[base]\ndistro = \"nixos\"\n{extra}"
            );
            crate::model::spec::parse(std::path::Path::new("n.toml"), &text).unwrap()
        };
        let agent = agent_info(&spec("")).expect("the agent is on by default");
        assert!(agent.file.is_empty() && agent.sha256.is_empty());
        let models = agent.models.unwrap();
        assert!(!models.is_empty() && models.iter().all(|m| m.contains("anthropic")));
        let off = spec("[agent.config.model]\nenabled = false\n");
        assert_eq!(agent_info(&off).unwrap().models, Some(Vec::new()));
        assert!(agent_info(&spec("[agent]\nenable = false\n")).is_none());
    }
}
