//! `devos-build publish ...`: tested versions from the registry → AMIs in one or many
//! regions (the AWS side is the `devos-aws` crate), SSM parameters, promotion,
//! deregistration, read-back verification; each change recorded in the registry.

pub(crate) mod packer;

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use devos_aws::ami::{self, Image, Outcome, Target};
use devos_aws::{Aws, AwsOptions, ebs};
use serde::Serialize;

use crate::inventory::{raw_artifact, raw_path};
use crate::model::settings::Settings;
use crate::model::states::PublicationState;
use crate::store::registry::{Publication, Registry, VersionInfo};
use crate::support::ui::Ui;

/// How to reach AWS: flags over the settings file over the standard chain.
pub(crate) fn aws_options(
    settings: &Settings,
    profile: Option<String>,
    endpoint: Option<String>,
) -> AwsOptions {
    AwsOptions {
        profile: profile.or_else(|| settings.aws.profile.clone()),
        region: settings.aws.region.clone(),
        endpoint_url: endpoint.or_else(|| {
            settings
                .aws
                .endpoint_url
                .as_ref()
                .map(|u| u.get_ref().clone())
        }),
    }
}

/// The version to publish: it must have passed its boot test, unless forced.
fn gate(reg: &Registry, reference: &str, force: bool) -> Result<VersionInfo> {
    if !force {
        return reg.require_passing(reference);
    }
    let v = reg.find(reference)?;
    if v.tested != Some(true) {
        eprintln!(
            "WARNING: publishing {}@{} WITHOUT a passing boot test (--force); its AMIs are tagged devos:boot-test=skipped-with-force",
            v.name, v.version
        );
    }
    Ok(v)
}

pub(crate) struct AmiRequest {
    pub(crate) reference: String,
    pub(crate) region: Option<String>,
    pub(crate) copy_to: Vec<String>,
    pub(crate) name: Option<String>,
    pub(crate) force: bool,
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

pub(crate) fn ami(
    reg: &mut Registry,
    settings: &Settings,
    aws: &AwsOptions,
    req: &AmiRequest,
    ui: &Ui,
) -> Result<Published> {
    let v = gate(reg, &req.reference, req.force)?;
    let (raw, sha256) = raw_path(&v)?;
    let mut copy_to = settings.publish.copy_to.clone();
    copy_to.extend(req.copy_to.iter().cloned());
    copy_to.sort();
    copy_to.dedup();
    let image = Image {
        ami_name: req
            .name
            .clone()
            .unwrap_or_else(|| ami::ami_name(&v.name, &v.version)),
        name: v.name.clone(),
        version: v.version.clone(),
        build_id: v.build_id.clone(),
        sha256,
        spec: v.spec.clone(),
        raw,
        tested: v.tested == Some(true),
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

/// The live publications of a version, optionally only in `regions`.
fn live(reg: &Registry, v: &VersionInfo, regions: &[String]) -> Result<Vec<Publication>> {
    let pubs: Vec<_> = reg
        .publications(Some(&v.name), Some(&v.version))?
        .into_iter()
        .filter(|p| p.state == PublicationState::Available && p.ami_id.is_some())
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

/// Point PREFIX/NAME/latest at this version's AMI in every region it is published in.
pub(crate) fn promote(
    reg: &Registry,
    settings: &Settings,
    aws: &AwsOptions,
    reference: &str,
    regions: &[String],
) -> Result<Promoted> {
    let v = reg.require_passing(reference)?;
    let pubs = live(reg, &v, regions)?;
    let parameter = ami::latest_parameter(settings.publish.ssm_prefix.get_ref(), &v.name);
    devos_aws::block_on(async {
        let aws = Aws::load(aws).await?;
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

/// Deregister every AMI of a version, delete their snapshots and SSM parameters.
/// A version that `latest` points at is kept unless forced.
pub(crate) fn deregister(
    reg: &mut Registry,
    settings: &Settings,
    aws: &AwsOptions,
    reference: &str,
    force: bool,
) -> Result<Vec<Publication>> {
    let v = reg.find(reference)?;
    let pubs = live(reg, &v, &[])?;
    let prefix = settings.publish.ssm_prefix.get_ref().clone();
    let latest = ami::latest_parameter(&prefix, &v.name);
    let removed = devos_aws::block_on(async {
        let aws = Aws::load(aws).await?;
        for p in &pubs {
            let id = p.ami_id.as_deref().unwrap_or_default();
            let points = ami::get_parameter(&aws.ssm(&p.region), &p.region, &latest).await?;
            if points.as_deref() == Some(id) && !force {
                bail!(
                    "{latest} in {} points at {id} ({}@{})\n  hint: promote another version first (`devos-build publish promote NAME@VERSION`), or pass --force",
                    p.region,
                    v.name,
                    v.version
                );
            }
        }
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
            removed.push(Publication {
                snapshot_ids: snapshots,
                state: PublicationState::Deregistered,
                ..p
            });
        }
        Ok(removed)
    })?;
    for p in &removed {
        reg.record_publication(&v, p)?;
    }
    Ok(removed)
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
    let p = live(reg, &v, &[region.to_owned()])?.remove(0);
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
