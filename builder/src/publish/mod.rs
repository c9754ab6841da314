//! `devos-build publish ...`: tested versions from the registry → AMIs in one or many
//! regions (the AWS side is the `devos-aws` crate), SSM parameters, promotion,
//! deregistration, read-back verification; each change recorded in the registry.

pub(crate) mod packer;
pub(crate) mod updates;

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use devos_aws::ami::{self, Image, Outcome, Target};
use devos_aws::{Aws, AwsOptions, ebs};
use serde::Serialize;

use crate::inventory::{raw_artifact, raw_path};
use crate::model::manifest::SecureBoot;
use crate::model::settings::Settings;
use crate::model::states::PublicationState;
use crate::store::registry::{Publication, Registry, VersionInfo};
use crate::support::dry_run::DryRun;
use crate::support::ui::Ui;

/// How to reach AWS: flags over the settings file over the standard chain. A region
/// given here (flag or settings) also spares the SDK its region probe, which asks
/// instance metadata and waits for it off EC2.
pub(crate) fn aws_options(
    settings: &Settings,
    region: Option<String>,
    profile: Option<String>,
    endpoint: Option<String>,
) -> AwsOptions {
    AwsOptions {
        profile: profile.or_else(|| settings.aws.profile.clone()),
        region: region.or_else(|| settings.aws.region()),
        endpoint_url: endpoint.or_else(|| {
            settings
                .aws
                .endpoint_url
                .as_ref()
                .map(|u| u.get_ref().clone())
        }),
    }
}

/// The region of a command that must know it without asking AWS: the flag, `[aws]
/// region` of the settings, AWS_REGION, AWS_DEFAULT_REGION.
pub(crate) fn region(flag: Option<String>, settings: &Settings) -> Result<String> {
    // `.ok()`: a variable that is unset (or not UTF-8, which no region is) is not
    // given, as the AWS SDK reads it.
    let env = |name: &'static str| std::env::var(name).ok().map(|r| (r, name));
    let (region, from) = flag
        .map(|r| (r, "--region"))
        .or_else(|| settings.aws.region().map(|r| (r, "`[aws] region` of the settings file")))
        .or_else(|| env("AWS_REGION"))
        .or_else(|| env("AWS_DEFAULT_REGION"))
        .context("no AWS region is set\n  hint: pass --region REGION (e.g. --region eu-west-1), set AWS_REGION, or set `region` under `[aws]` in the settings file (docs/publish.md, \"The settings file\")")?;
    if !devos_aws::is_region_name(&region) {
        bail!(
            "{from} names `{region}`, which is not a region name\n  hint: {}",
            devos_aws::REGION_HINT
        );
    }
    Ok(region)
}

/// The version to publish: it must have passed its boot test, unless forced; a forced
/// one is announced with what marks it (`marked`, e.g. the AMIs' tag).
pub(crate) fn gate(
    reg: &Registry,
    reference: &str,
    force: bool,
    marked: &str,
) -> Result<VersionInfo> {
    if !force {
        return reg.require_passing(reference);
    }
    let v = reg.find(reference)?;
    if v.tested != Some(true) {
        eprintln!(
            "WARNING: publishing {}@{} WITHOUT a passing boot test (--force); {marked}",
            v.name, v.version
        );
    }
    Ok(v)
}

/// What marks an AMI published with `--force`.
pub(crate) const AMI_FORCED: &str = "AMIs of it are tagged devos:boot-test=skipped-with-force";

pub(crate) struct AmiRequest {
    pub(crate) reference: String,
    pub(crate) region: Option<String>,
    pub(crate) copy_to: Vec<String>,
    pub(crate) name: Option<String>,
    pub(crate) force: bool,
}

impl AmiRequest {
    /// The regions of the settings file, checked before the registry or AWS is asked,
    /// in dry runs as in real ones: a typo fails here, naming where it is, instead of
    /// after an upload (or as an error from AWS). (`--region`, `--copy-to` and `--name`
    /// are checked where the command line is read.)
    fn check(&self, settings: &Settings) -> Result<()> {
        let region_hint = devos_aws::REGION_HINT;
        if let Some(r) = &self.region
            && !devos_aws::is_region_name(r)
        {
            bail!(
                "`[aws] region` of the settings file names `{r}`, which is not a region name\n  hint: {region_hint}"
            );
        }
        for r in &settings.publish.copy_to {
            if !devos_aws::is_region_name(r) {
                bail!(
                    "`[publish] copy-to` of the settings file names `{r}`, which is not a region name\n  hint: {region_hint}"
                );
            }
        }
        Ok(())
    }

    fn ami_name(&self, v: &VersionInfo) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| ami::ami_name(&v.name, &v.version))
    }

    /// The regions to copy to: the settings' and the flag's.
    fn copy_to(&self, settings: &Settings) -> Vec<String> {
        let mut copy_to = settings.publish.copy_to.clone();
        copy_to.extend(self.copy_to.iter().cloned());
        copy_to.sort();
        copy_to.dedup();
        copy_to
    }
}

/// What `publish ami --dry-run` says: the uploads and copies the registry does not
/// record as done (the same gate as a real run; AWS is not asked).
pub(crate) fn ami_dry_run(reg: &Registry, settings: &Settings, req: &AmiRequest) -> Result<DryRun> {
    req.check(settings)?;
    let v = gate(reg, &req.reference, req.force, AMI_FORCED)?;
    let (raw, _) = raw_path(&v)?;
    let region = region(req.region.clone(), settings)?;
    let done: Vec<String> = available(reg, &v)?
        .into_iter()
        .filter(|p| p.kind == "ami")
        .map(|p| p.region)
        .collect();
    let prefix = settings.publish.ssm_prefix.get_ref();
    let parameter = ami::version_parameter(prefix, &v.name, &v.version);
    let mut dry = DryRun::new();
    if !done.contains(&region) {
        let size = std::fs::metadata(&raw).map_or(0, |m| m.len());
        dry.would(format!(
            "upload {} ({} MiB) to an EBS snapshot in {region}, register it as AMI `{}` and write {parameter} there",
            raw.display(),
            size >> 20,
            req.ami_name(&v)
        ));
        // Made as the real run makes them (the same refusals), then dropped.
        if let Some(sb) = reg.manifest(&v)?.secure_boot {
            uefi_data(&v, &sb)?;
            dry.would(format!(
                "give the AMI the Secure Boot certificate {} (sha256 {}) as PK, KEK and db: its instances enforce Secure Boot from their first boot",
                sb.subject, sb.certificate_sha256
            ));
        }
    }
    for r in req.copy_to(settings) {
        if r != region && !done.contains(&r) {
            dry.would(format!("copy the AMI to {r} and write {parameter} there"));
        }
    }
    dry.note = Some("from what the registry records as published; AWS was not asked".into());
    Ok(dry)
}

#[derive(Serialize)]
pub(crate) struct Published {
    pub(crate) name: String,
    pub(crate) version: String,
    pub(crate) build_id: String,
    #[serde(flatten)]
    pub(crate) outcome: Outcome,
}

impl Published {
    pub(crate) fn human(&self) -> String {
        let mut s = format!("{}@{} (build {})\n", self.name, self.version, self.build_id);
        if let Some(u) = &self.outcome.upload {
            s.push_str(&format!(
                "  uploaded {} MiB of {} MiB ({:.1}%: all-zero blocks skipped) in {:.1}s, {:.1} MiB/s\n",
                u.bytes_sent >> 20,
                u.image_bytes >> 20,
                100.0 * u.bytes_sent as f64 / u.image_bytes.max(1) as f64,
                u.seconds,
                (u.bytes_sent as f64 / 1048576.0) / u.seconds.max(0.001)
            ));
        }
        for r in &self.outcome.regions {
            s.push_str(&format!(
                "  {:<16} {:<22} {} {}\n",
                r.region,
                r.ami_id,
                if r.created { "created " } else { "existing" },
                r.parameter
            ));
        }
        s
    }
}

/// The UEFI variables the AMI of `v`, a Secure Boot image signed as `sb` says, is
/// registered with: the certificate as PK, KEK and db (other images get none: their
/// instances start in setup mode). Made before anything is uploaded, so a missing
/// tool costs nothing.
fn uefi_data(v: &VersionInfo, sb: &SecureBoot) -> Result<String> {
    if sb.certificate.is_empty() {
        bail!(
            "{}@{} is signed for Secure Boot, but its manifest does not hold the certificate its AMI must be given\n  hint: it was built by an older devos-build; build the version again (`devos-build image build --force`) and test it",
            v.name,
            v.version
        );
    }
    let work = tempfile::tempdir().context("cannot make a temporary directory")?;
    crate::image::secure_boot::uefi_data(&sb.certificate, &sb.certificate_sha256, work.path())
        .with_context(|| {
            format!(
                "cannot give the AMI of {}@{} its Secure Boot keys",
                v.name, v.version
            )
        })
}

pub(crate) fn ami(
    reg: &mut Registry,
    settings: &Settings,
    aws: &AwsOptions,
    req: &AmiRequest,
    ui: &Ui,
) -> Result<Published> {
    req.check(settings)?;
    let v = gate(reg, &req.reference, req.force, AMI_FORCED)?;
    reg.lock_publication(&v)?;
    let (raw, sha256) = raw_path(&v)?;
    let copy_to = req.copy_to(settings);
    // Only for an AMI still to be registered: copies to more regions take the
    // registered one's, and an AMI published before manifests held the certificate
    // is still copied.
    // (The region as the settings name it; else AWS's chain decides later, and the
    // data is made anyway.)
    let primary = region(req.region.clone(), settings).ok();
    let registered = available(reg, &v)?
        .iter()
        .any(|p| p.kind == "ami" && Some(&p.region) == primary.as_ref());
    let uefi_data = match reg.manifest(&v)?.secure_boot {
        Some(sb) if !registered => Some(uefi_data(&v, &sb)?),
        _ => None,
    };
    let image = Image {
        ami_name: req.ami_name(&v),
        name: v.name.clone(),
        version: v.version.clone(),
        build_id: v.build_id.clone(),
        sha256,
        spec: v.spec.clone(),
        raw,
        tested: v.tested == Some(true),
        uefi_data,
    };
    let bar = ui.transfer("upload");
    let outcome = devos_aws::block_on(async {
        let aws = Aws::load(aws).await?;
        let region = match &req.region {
            Some(r) => r.clone(),
            None => aws.default_region()?,
        };
        let target = Target {
            region,
            copy_to,
            ssm_prefix: settings.publish.ssm_prefix.get_ref().clone(),
            workers: settings.publish.workers,
        };
        ami::publish(
            &aws,
            &image,
            &target,
            &|n, total| bar.advance(n, total),
            &|m| bar.log(&m),
        )
        .await
    });
    bar.finish();
    let outcome = outcome?;
    for r in &outcome.regions {
        reg.record_publication(
            &v,
            &Publication::available(
                &v,
                &r.region,
                "ami",
                &r.ami_id,
                r.snapshot_ids.clone(),
                Some(r.parameter.clone()),
            ),
        )?;
    }
    Ok(Published {
        name: v.name,
        version: v.version,
        build_id: v.build_id,
        outcome,
    })
}

/// A version's publications that are up: available, with an AMI (none is no error).
fn available(reg: &Registry, v: &VersionInfo) -> Result<Vec<Publication>> {
    Ok(reg
        .publications(Some(&v.name), Some(&v.version))?
        .into_iter()
        .filter(|p| p.state == PublicationState::Available && p.ami_id.is_some())
        .collect())
}

/// The live publications of a version, optionally only in `regions`.
fn live(reg: &Registry, v: &VersionInfo, regions: &[String]) -> Result<Vec<Publication>> {
    let pubs: Vec<_> = available(reg, v)?
        .into_iter()
        .filter(|p| regions.is_empty() || regions.contains(&p.region))
        .collect();
    if pubs.is_empty() {
        bail!(
            "{}@{} is not published{}\n  hint: run `devos-build publish ami {}@{} --region REGION` first",
            v.name,
            v.version,
            if regions.is_empty() {
                String::new()
            } else {
                format!(" in {}", regions.join(", "))
            },
            v.name,
            v.version
        );
    }
    Ok(pubs)
}

#[derive(Serialize)]
pub(crate) struct Promoted {
    pub(crate) parameter: String,
    pub(crate) regions: Vec<(String, String)>,
}

/// What a promotion works on: the version's live publications (in `regions`, or all),
/// its `latest` parameter, and AWS options for those regions.
fn promotion(
    reg: &Registry,
    settings: &Settings,
    aws: &AwsOptions,
    reference: &str,
    regions: &[String],
) -> Result<(Vec<Publication>, String, AwsOptions)> {
    let v = reg.require_passing(reference)?;
    let pubs = live(reg, &v, regions)?;
    let parameter = ami::latest_parameter(settings.publish.ssm_prefix.get_ref(), &v.name);
    let aws = with_region(aws, &pubs);
    Ok((pubs, parameter, aws))
}

/// Point PREFIX/NAME/latest at this version's AMI in every region it is published in.
pub(crate) fn promote(
    reg: &Registry,
    settings: &Settings,
    aws: &AwsOptions,
    reference: &str,
    regions: &[String],
) -> Result<Promoted> {
    let (pubs, parameter, aws) = promotion(reg, settings, aws, reference, regions)?;
    devos_aws::block_on(async {
        let aws = Aws::load(&aws).await?;
        let mut done = Vec::new();
        for p in &pubs {
            let id = p.ami_id.clone().unwrap_or_default();
            ami::put_parameter(&aws.ssm(&p.region), &p.region, &parameter, &id, &|m| {
                eprintln!("    {m}")
            })
            .await?;
            done.push((p.region.clone(), id));
        }
        Ok(Promoted {
            parameter: parameter.clone(),
            regions: done,
        })
    })
}

/// What `publish promote --dry-run` says: the regions whose `latest` parameter would
/// change (read from SSM; nothing is written).
pub(crate) fn promote_dry_run(
    reg: &Registry,
    settings: &Settings,
    aws: &AwsOptions,
    reference: &str,
    regions: &[String],
) -> Result<DryRun> {
    let (pubs, parameter, aws) = promotion(reg, settings, aws, reference, regions)?;
    devos_aws::block_on(async {
        let aws = Aws::load(&aws).await?;
        let mut dry = DryRun::new();
        for p in &pubs {
            let id = p.ami_id.clone().unwrap_or_default();
            let now = ami::get_parameter(&aws.ssm(&p.region), &p.region, &parameter).await?;
            if now.as_deref() != Some(id.as_str()) {
                dry.would(format!(
                    "point {parameter} in {} at {id} (now {})",
                    p.region,
                    now.as_deref().unwrap_or("unset")
                ));
            }
        }
        Ok(dry)
    })
}

/// AWS options for work in the regions of `pubs`: a region for the SDK's own
/// configuration when none is set, so it does not probe for one.
fn with_region(aws: &AwsOptions, pubs: &[Publication]) -> AwsOptions {
    AwsOptions {
        region: aws
            .region
            .clone()
            .or_else(|| pubs.first().map(|p| p.region.clone())),
        ..aws.clone()
    }
}

/// Refuse to remove a version that `latest` points at in any of its regions, unless
/// forced.
async fn refuse_if_latest(
    aws: &Aws,
    v: &VersionInfo,
    pubs: &[Publication],
    latest: &str,
    force: bool,
) -> Result<()> {
    for p in pubs {
        let id = p.ami_id.as_deref().unwrap_or_default();
        let points = ami::get_parameter(&aws.ssm(&p.region), &p.region, latest).await?;
        if points.as_deref() == Some(id) && !force {
            bail!(
                "{latest} in {} points at {id} ({}@{})\n  hint: promote another version first (`devos-build publish promote NAME@VERSION`), or pass --force",
                p.region,
                v.name,
                v.version
            );
        }
    }
    Ok(())
}

/// Refuse (unless forced) to deregister a version that a stack this registry changed
/// runs now: its launch template could start no instance afterwards. The stacks are
/// locked first (and stay so until the process ends), so none moves onto it meanwhile.
async fn refuse_if_running(
    reg: &Registry,
    aws: &Aws,
    v: &VersionInfo,
    pubs: &[Publication],
    force: bool,
    dry_run: bool,
) -> Result<()> {
    if force {
        return Ok(());
    }
    let mut regions: Vec<&str> = pubs.iter().map(|p| p.region.as_str()).collect();
    regions.sort();
    regions.dedup();
    for region in regions {
        // The stacks of this image this registry has changed there.
        let mut names: Vec<String> = reg
            .rollouts(None, Some(region))?
            .into_iter()
            .filter(|r| r.image == v.name)
            .map(|r| r.stack)
            .collect();
        names.sort();
        names.dedup();
        // Held until the deregister ends: a change of one of them cannot start
        // meanwhile and move it onto the version (one under way refuses this). A dry
        // run changes nothing and takes no lock.
        if !dry_run {
            for name in &names {
                reg.lock_stack(name, region)?;
            }
        }
        let stacks =
            devos_aws::stack::running_version(aws, region, &names, &v.name, &v.version).await?;
        if let Some(first) = stacks.first() {
            bail!(
                "{}@{} is what {} in {region} run{}: without its AMI they could start no new instance\n  hint: roll them to another version first (`devos-build fleet rollout --stack {first} --to VERSION --region {region}`), or pass --force",
                v.name,
                v.version,
                if stacks.len() == 1 {
                    format!("stack {first}")
                } else {
                    format!("stacks {}", stacks.join(", "))
                },
                if stacks.len() == 1 { "s" } else { "" }
            );
        }
    }
    Ok(())
}

/// What `publish deregister --dry-run` says: the AMIs, snapshots and parameters it
/// would delete (nothing when the version is published nowhere); it refuses as a real
/// run would when `latest` points at the version.
pub(crate) fn deregister_dry_run(
    reg: &Registry,
    settings: &Settings,
    aws: &AwsOptions,
    reference: &str,
    force: bool,
) -> Result<DryRun> {
    let v = reg.find(reference)?;
    let mut dry = DryRun::new();
    let pubs = available(reg, &v)?;
    if pubs.is_empty() {
        return Ok(dry);
    }
    let latest = ami::latest_parameter(settings.publish.ssm_prefix.get_ref(), &v.name);
    let aws = with_region(aws, &pubs);
    devos_aws::block_on(async {
        let aws = Aws::load(&aws).await?;
        refuse_if_latest(&aws, &v, &pubs, &latest, force).await?;
        refuse_if_running(reg, &aws, &v, &pubs, force, true).await
    })?;
    for p in &pubs {
        dry.would(format!(
            "deregister {} in {} and delete its snapshots ({}, and any tagged with build {}){}",
            p.ami_id.as_deref().unwrap_or_default(),
            p.region,
            p.snapshot_ids.join(", "),
            v.build_id,
            p.parameter
                .as_ref()
                .map(|param| format!(" and {param}"))
                .unwrap_or_default()
        ));
    }
    Ok(dry)
}

/// Deregister every AMI of a version, delete their snapshots and SSM parameters,
/// recording each region as it is done (a failure in one leaves the others recorded).
/// A version that `latest` points at, or that a stack runs, is kept unless forced.
pub(crate) fn deregister(
    reg: &mut Registry,
    settings: &Settings,
    aws: &AwsOptions,
    reference: &str,
    force: bool,
) -> Result<Vec<Publication>> {
    let v = reg.find(reference)?;
    reg.lock_publication(&v)?;
    let pubs = live(reg, &v, &[])?;
    let prefix = settings.publish.ssm_prefix.get_ref().clone();
    let latest = ami::latest_parameter(&prefix, &v.name);
    let aws = with_region(aws, &pubs);
    devos_aws::block_on(async {
        let aws = Aws::load(&aws).await?;
        refuse_if_latest(&aws, &v, &pubs, &latest, force).await?;
        refuse_if_running(reg, &aws, &v, &pubs, force, false).await?;
        let mut removed = Vec::new();
        for p in pubs {
            let ec2 = aws.ec2(&p.region);
            let id = p.ami_id.clone().unwrap_or_default();
            let mut snapshots = ami::deregister(&ec2, &p.region, &id).await?;
            // Also the snapshots tagged with the build (the uploaded one, whatever
            // the AMI's mapping says).
            let tagged = ami::build_snapshots(&ec2, &p.region, &v.build_id).await?;
            for s in p.snapshot_ids.iter().chain(&tagged) {
                if !snapshots.contains(s) {
                    ami::delete_snapshot(&ec2, &p.region, s).await?;
                    snapshots.push(s.clone());
                }
            }
            if let Some(param) = &p.parameter {
                ami::delete_parameter(&aws.ssm(&p.region), &p.region, param).await?;
            }
            eprintln!(
                "    {}: deregistered {id}, deleted {}",
                p.region,
                snapshots.join(", ")
            );
            let gone = Publication {
                snapshot_ids: snapshots,
                state: PublicationState::Deregistered,
                ..p
            };
            reg.record_publication(&v, &gone)?;
            removed.push(gone);
        }
        Ok(removed)
    })
}

#[derive(Serialize)]
pub(crate) struct Verified {
    pub(crate) region: String,
    pub(crate) snapshot_id: String,
    pub(crate) raw: PathBuf,
    pub(crate) blocks: u64,
}

/// Read the uploaded snapshot back through the EBS direct API and compare it with the
/// raw image, block by block.
pub(crate) fn verify(
    reg: &Registry,
    aws: &AwsOptions,
    reference: &str,
    region: &str,
) -> Result<Verified> {
    let v = reg.find(reference)?;
    let Some(p) = live(reg, &v, &[region.to_owned()])?
        .into_iter()
        .find(|p| p.kind == "ami")
    else {
        bail!(
            "{}@{} in {region} was published by Packer only: there is no uploaded snapshot to compare with the raw image\n  hint: `devos-build publish ami {}@{} --region {region}` uploads one",
            v.name,
            v.version,
            v.name,
            v.version
        );
    };
    let snapshot_id = p
        .snapshot_ids
        .first()
        .with_context(|| {
            format!(
                "the registry holds no snapshot for {}@{} in {region}",
                v.name, v.version
            )
        })?
        .clone();
    let (raw, _) = raw_artifact(&v)?;
    let blocks = devos_aws::block_on(async {
        let aws = Aws::load(aws).await?;
        ebs::verify(&aws.ebs(region), region, &snapshot_id, &raw).await
    })?;
    Ok(Verified {
        region: region.to_owned(),
        snapshot_id,
        raw,
        blocks,
    })
}

pub(crate) fn list_human(pubs: &[Publication]) -> String {
    if pubs.is_empty() {
        return "nothing published yet\n".to_owned();
    }
    let mut s = String::new();
    for p in pubs {
        s.push_str(&format!(
            "{}@{}  {:<14} {:<6} {:<22} {:<12} {}\n",
            p.name,
            p.version,
            p.region,
            p.kind,
            p.ami_id.as_deref().unwrap_or("-"),
            p.state,
            crate::support::time::utc(p.updated_at)
        ));
    }
    s
}
