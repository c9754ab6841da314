//! AMIs: register an uploaded snapshot (UEFI, ENA, IMDSv2 required, gp3, x86_64),
//! tag it, wait until it is available, copy it to more regions, write SSM parameters,
//! and take it all down again.
//!
//! Idempotent by the `devos:build-id` tag: a re-run finds the AMI (and the snapshot)
//! of the same build in each region and creates nothing. A run that fails removes
//! what it created; a snapshot left by a run that was killed outright is found by
//! its tag and removed by the next run before it uploads again.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use aws_sdk_ec2::client::Waiters;
use aws_sdk_ec2::types::{
    ArchitectureValues, BlockDeviceMapping, BootModeValues, EbsBlockDevice, Filter, ImageState,
    ImdsSupportValues, ResourceType, Tag, TagSpecification, VolumeType,
};
use aws_smithy_runtime_api::client::waiters::error::WaiterError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use futures_util::future::try_join_all;
use serde::Serialize;

use crate::ebs::{self, Upload};
use crate::{Aws, Signals, explain};

pub const TAG_BUILD_ID: &str = "devos:build-id";
/// On what another route than the direct upload made (Packer: `packer`).
pub const TAG_BUILT_BY: &str = "devos:built-by";
const AVAILABLE_TIMEOUT: Duration = Duration::from_secs(40 * 60);

/// The image version being published.
#[derive(Debug, Clone)]
pub struct Image {
    pub name: String,
    pub version: String,
    pub build_id: String,
    /// sha256 of the raw image.
    pub sha256: String,
    /// The spec file it was built from.
    pub spec: String,
    pub raw: PathBuf,
    /// The AMI name (unique per account and region).
    pub ami_name: String,
    /// Whether it passed its boot test (false only with `--force`).
    pub tested: bool,
    /// The UEFI variable store instances start with (base64, EC2's format): a Secure
    /// Boot image's keys, so that its instances enforce it from their first boot.
    pub uefi_data: Option<String>,
}

impl Image {
    fn tags(&self) -> Vec<(String, String)> {
        [
            ("Name", self.ami_name.as_str()),
            ("devos:image", &self.name),
            ("devos:version", &self.version),
            (TAG_BUILD_ID, &self.build_id),
            ("devos:sha256", &self.sha256),
            ("devos:spec", &self.spec),
            (
                "devos:boot-test",
                if self.tested {
                    "passed"
                } else {
                    "skipped-with-force"
                },
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    fn description(&self) -> String {
        format!(
            "DevOS {} {} (build {})",
            self.name, self.version, self.build_id
        )
    }
}

/// Where to publish.
#[derive(Debug, Clone)]
pub struct Target {
    pub region: String,
    pub copy_to: Vec<String>,
    pub ssm_prefix: String,
    pub workers: usize,
}

/// The AMI of one region.
#[derive(Debug, Clone, Serialize)]
pub struct Regional {
    pub region: String,
    pub ami_id: String,
    pub snapshot_ids: Vec<String>,
    /// False when a previous run had already made it.
    pub created: bool,
    pub parameter: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub regions: Vec<Regional>,
    /// None when the AMI already existed and nothing was uploaded.
    pub upload: Option<Upload>,
}

/// AMI names allow letters, digits, spaces and `()[]./-'@_`: the `+` of a version
/// becomes `-`.
pub fn ami_name(name: &str, version: &str) -> String {
    sanitize(&format!("{name}-{version}"), AMI_NAME_CHARS, '-')
}

/// Why `name` cannot be an AMI name, if it cannot: EC2 takes 3 to 128 characters,
/// each a letter, a digit, a space or one of `()[]./-'@_`.
pub fn ami_name_problem(name: &str) -> Option<String> {
    let len = name.chars().count();
    if !(3..=128).contains(&len) {
        return Some(format!("it has {len} characters; EC2 takes 3 to 128"));
    }
    let bad: String = name
        .chars()
        .filter(|c| !(c.is_ascii_alphanumeric() || AMI_NAME_CHARS.contains(*c)))
        .collect();
    (!bad.is_empty()).then(|| {
        format!(
            "EC2 does not take {} in an AMI name; it takes letters, digits, spaces and ()[]./-'@_",
            bad.chars()
                .map(|c| format!("`{c}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

/// What an AMI name may hold besides ASCII letters and digits.
const AMI_NAME_CHARS: &str = "()[]./-'@_ ";

/// SSM parameter names allow letters, digits and `_.-/`: the `+` becomes `_`.
pub fn version_parameter(prefix: &str, name: &str, version: &str) -> String {
    format!(
        "{}/{}/{}/image_id",
        prefix.trim_end_matches('/'),
        name,
        sanitize(version, "_.-", '_')
    )
}

pub fn latest_parameter(prefix: &str, name: &str) -> String {
    format!("{}/{}/latest", prefix.trim_end_matches('/'), name)
}

/// Replace every character that is not alphanumeric or in `allowed` by `with`.
fn sanitize(s: &str, allowed: &str, with: char) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || allowed.contains(c) {
                c
            } else {
                with
            }
        })
        .collect()
}

/// What this run created, so that a failure can take it down again.
#[derive(Default)]
struct Created(Mutex<Vec<(String, Resource)>>);

#[derive(Clone)]
enum Resource {
    Snapshot(String),
    Image(String),
    /// An SSM parameter that names an image this run made.
    Parameter(String),
}

impl Created {
    fn push(&self, region: &str, r: Resource) {
        if let Ok(mut v) = self.0.lock() {
            v.push((region.to_owned(), r));
        }
    }

    /// Remove everything, newest first; returns what could not be removed.
    async fn undo(&self, aws: &Aws) -> Vec<String> {
        let items: Vec<_> = self.0.lock().map(|v| v.clone()).unwrap_or_default();
        let mut left = Vec::new();
        for (region, r) in items.into_iter().rev() {
            let ec2 = aws.ec2(&region);
            let res = match &r {
                Resource::Image(id) => deregister(&ec2, &region, id).await.map(|_| ()),
                Resource::Snapshot(id) => delete_snapshot(&ec2, &region, id).await,
                Resource::Parameter(name) => {
                    delete_parameter(&aws.ssm(&region), &region, name).await
                }
            };
            if let Err(e) = res {
                let id = match r {
                    Resource::Image(id) | Resource::Snapshot(id) | Resource::Parameter(id) => id,
                };
                left.push(format!("{id} in {region} ({e:#})"));
            }
        }
        left
    }
}

/// Publish `image`: upload and register in `target.region` (unless a previous run
/// did), copy to `target.copy_to` in parallel, write the SSM parameters. A failure,
/// or a SIGINT or SIGTERM before the end, removes what this run created; a signal
/// while that runs stops it (the next run removes the rest: all is tagged) — except a
/// SIGTERM after a SIGINT, which a CI system sends a few seconds after its SIGINT.
pub async fn publish(
    aws: &Aws,
    image: &Image,
    target: &Target,
    progress: &(dyn Fn(u64, u64) + Sync),
    log: &(dyn Fn(String) + Sync),
) -> Result<Outcome> {
    let created = Created::default();
    // Listening from the start, so no signal falls between two listeners.
    let mut signals = Signals::listen();
    let (e, first) = tokio::select! {
        done = publish_tracked(aws, image, target, progress, log, &created) => match done {
            Ok(outcome) => return Ok(outcome),
            Err(e) => (e, None),
        },
        signal = signals.next(true) => {
            log(format!("interrupted by {signal}: removing what this run created (Ctrl-C again stops that)"));
            (anyhow!("interrupted by {signal}"), Some(signal))
        }
    };
    let left = tokio::select! {
        left = created.undo(aws) => left,
        signal = signals.next(first != Some("SIGINT")) => {
            return Err(e.context(format!(
                "publishing stopped; removing what it created was stopped by {signal}: what is left carries the tag {TAG_BUILD_ID}={}, and the next `publish ami` of this version removes its snapshots or keeps and finishes its AMIs",
                image.build_id
            )));
        }
    };
    if left.is_empty() {
        Err(e.context("publishing failed; everything this run created was removed"))
    } else {
        Err(e.context(format!(
            "publishing failed, and these could not be removed: {}; they carry the tag {TAG_BUILD_ID}={} and the next run removes them",
            left.join(", "),
            image.build_id
        )))
    }
}

async fn publish_tracked(
    aws: &Aws,
    image: &Image,
    target: &Target,
    progress: &(dyn Fn(u64, u64) + Sync),
    log: &(dyn Fn(String) + Sync),
    created: &Created,
) -> Result<Outcome> {
    let region = target.region.as_str();
    let ec2 = aws.ec2(region);
    let tags = image.tags();
    let (primary, upload) = match find_image(&ec2, region, &image.build_id).await? {
        Some(found) => {
            log(format!(
                "{region}: {} already holds build {}; nothing to upload",
                found.ami_id, image.build_id
            ));
            wait_available(&ec2, region, &found.ami_id).await?;
            (found, None)
        }
        None => {
            for leftover in build_snapshots(&ec2, region, &image.build_id).await? {
                log(format!(
                    "{region}: removing {leftover}, left by an earlier run that did not finish"
                ));
                delete_snapshot(&ec2, region, &leftover).await?;
            }
            let ebs = aws.ebs(region);
            let snapshot_id =
                ebs::start(&ebs, region, &image.raw, &image.description(), &tags).await?;
            created.push(region, Resource::Snapshot(snapshot_id.clone()));
            let up = ebs::upload(
                &ebs,
                region,
                &snapshot_id,
                &image.raw,
                &image.sha256,
                target.workers,
                progress,
            )
            .await?;
            log(format!(
                "{region}: uploaded {} of {} bytes into {} in {:.1}s",
                up.bytes_sent, up.image_bytes, up.snapshot_id, up.seconds
            ));
            let ami_id = register(&ec2, region, image, &up).await?;
            created.push(region, Resource::Image(ami_id.clone()));
            tag(&ec2, region, &[&ami_id, &up.snapshot_id], &tags).await?;
            wait_available(&ec2, region, &ami_id).await?;
            log(format!("{region}: registered {ami_id}"));
            let found = Found {
                ami_id,
                snapshot_ids: vec![up.snapshot_id.clone()],
                created: true,
            };
            (found, Some(up))
        }
    };
    let copies = try_join_all(
        target
            .copy_to
            .iter()
            .filter(|r| *r != region)
            .map(|to| copy(aws, region, &primary.ami_id, to, image, &tags, log, created)),
    )
    .await?;
    let parameter = version_parameter(&target.ssm_prefix, &image.name, &image.version);
    let mut regions = Vec::new();
    for (r, found) in std::iter::once((region.to_owned(), primary)).chain(copies) {
        let wrote = put_parameter(&aws.ssm(&r), &r, &parameter, &found.ami_id, log).await?;
        if wrote && found.created {
            // It names an image a failure takes down again: it goes with it.
            created.push(&r, Resource::Parameter(parameter.clone()));
        }
        regions.push(Regional {
            region: r,
            ami_id: found.ami_id,
            snapshot_ids: found.snapshot_ids,
            created: found.created,
            parameter: parameter.clone(),
        });
    }
    Ok(Outcome { regions, upload })
}

struct Found {
    ami_id: String,
    snapshot_ids: Vec<String>,
    created: bool,
}

#[allow(clippy::too_many_arguments)]
async fn copy(
    aws: &Aws,
    from: &str,
    ami_id: &str,
    to: &str,
    image: &Image,
    tags: &[(String, String)],
    log: &(dyn Fn(String) + Sync),
    created: &Created,
) -> Result<(String, Found)> {
    let ec2 = aws.ec2(to);
    if let Some(found) = find_image(&ec2, to, &image.build_id).await? {
        log(format!(
            "{to}: {} already holds build {}",
            found.ami_id, image.build_id
        ));
        wait_available(&ec2, to, &found.ami_id).await?;
        return Ok((to.to_owned(), found));
    }
    let out = ec2
        .copy_image()
        .source_region(from)
        .source_image_id(ami_id)
        .name(&image.ami_name)
        .description(image.description())
        .copy_image_tags(true)
        .send()
        .await
        .map_err(|e| explain("ec2:CopyImage", to, e))?;
    let copy_id = out
        .image_id()
        .context("CopyImage returned no image id")?
        .to_owned();
    created.push(to, Resource::Image(copy_id.clone()));
    tag(&ec2, to, &[&copy_id], tags).await?;
    wait_available(&ec2, to, &copy_id).await?;
    log(format!("{to}: copied {ami_id} from {from} as {copy_id}"));
    let snapshot_ids = image_snapshots(&ec2, to, &copy_id).await?;
    Ok((
        to.to_owned(),
        Found {
            ami_id: copy_id,
            snapshot_ids,
            created: true,
        },
    ))
}

/// The RegisterImage request for an uploaded snapshot.
pub fn register_request(
    ec2: &aws_sdk_ec2::Client,
    image: &Image,
    snapshot_id: &str,
    volume_gib: u64,
) -> aws_sdk_ec2::operation::register_image::builders::RegisterImageFluentBuilder {
    let root = "/dev/xvda";
    ec2.register_image()
        .name(&image.ami_name)
        .description(image.description())
        .architecture(ArchitectureValues::X8664)
        .boot_mode(BootModeValues::Uefi)
        .ena_support(true)
        .sriov_net_support("simple")
        .imds_support(ImdsSupportValues::V20)
        .set_uefi_data(image.uefi_data.clone())
        .virtualization_type("hvm")
        .root_device_name(root)
        .block_device_mappings(
            BlockDeviceMapping::builder()
                .device_name(root)
                .ebs(
                    EbsBlockDevice::builder()
                        .snapshot_id(snapshot_id)
                        .volume_type(VolumeType::Gp3)
                        .volume_size(volume_gib as i32)
                        .delete_on_termination(true)
                        .build(),
                )
                .build(),
        )
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Image)
                .set_tags(Some(sdk_tags(&image.tags())))
                .build(),
        )
}

async fn register(
    ec2: &aws_sdk_ec2::Client,
    region: &str,
    image: &Image,
    up: &Upload,
) -> Result<String> {
    let out = register_request(ec2, image, &up.snapshot_id, up.volume_gib)
        .send()
        .await
        .map_err(|e| explain("ec2:RegisterImage", region, e))?;
    Ok(out
        .image_id()
        .context("RegisterImage returned no image id")?
        .to_owned())
}

fn sdk_tags(tags: &[(String, String)]) -> Vec<Tag> {
    tags.iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect()
}

/// Tag resources (again: not every endpoint honours tags given at creation).
async fn tag(
    ec2: &aws_sdk_ec2::Client,
    region: &str,
    ids: &[&str],
    tags: &[(String, String)],
) -> Result<()> {
    ec2.create_tags()
        .set_resources(Some(ids.iter().map(|s| (*s).to_owned()).collect()))
        .set_tags(Some(sdk_tags(tags)))
        .send()
        .await
        .map_err(|e| explain("ec2:CreateTags", region, e))?;
    Ok(())
}

fn build_filter(build_id: &str) -> Filter {
    Filter::builder()
        .name(format!("tag:{TAG_BUILD_ID}"))
        .values(build_id)
        .build()
}

/// Whether an AMI or snapshot was made by another route than the direct upload (Packer
/// tags its AMIs and snapshots `devos:built-by`): never the direct upload's.
fn made_elsewhere(tags: &[aws_sdk_ec2::types::Tag]) -> bool {
    tags.iter().any(|t| t.key() == Some(TAG_BUILT_BY))
}

/// The AMIs this account holds tagged with `build_id` in this region, whoever made them.
async fn build_images(
    ec2: &aws_sdk_ec2::Client,
    region: &str,
    build_id: &str,
) -> Result<Vec<aws_sdk_ec2::types::Image>> {
    let out = ec2
        .describe_images()
        .owners("self")
        .filters(build_filter(build_id))
        .send()
        .await
        .map_err(|e| explain("ec2:DescribeImages", region, e))?;
    Ok(out.images().to_vec())
}

/// The AMI this account holds for `build_id` in this region, if any (one the direct
/// upload made: not Packer's of the same build).
async fn find_image(
    ec2: &aws_sdk_ec2::Client,
    region: &str,
    build_id: &str,
) -> Result<Option<Found>> {
    let images = build_images(ec2, region, build_id).await?;
    let usable = images.iter().find(|i| {
        !made_elsewhere(i.tags())
            && !matches!(
                i.state(),
                Some(
                    ImageState::Deregistered
                        | ImageState::Failed
                        | ImageState::Invalid
                        | ImageState::Error
                )
            )
    });
    Ok(usable.and_then(|i| {
        Some(Found {
            ami_id: i.image_id()?.to_owned(),
            snapshot_ids: snapshots_of(i),
            created: false,
        })
    }))
}

fn snapshots_of(image: &aws_sdk_ec2::types::Image) -> Vec<String> {
    image
        .block_device_mappings()
        .iter()
        .filter_map(|m| m.ebs()?.snapshot_id().map(str::to_owned))
        .collect()
}

async fn image_snapshots(
    ec2: &aws_sdk_ec2::Client,
    region: &str,
    ami_id: &str,
) -> Result<Vec<String>> {
    let out = ec2
        .describe_images()
        .image_ids(ami_id)
        .send()
        .await
        .map_err(|e| explain("ec2:DescribeImages", region, e))?;
    Ok(out.images().first().map(snapshots_of).unwrap_or_default())
}

/// Snapshots this account holds tagged with `build_id` by the direct upload (not
/// Packer's of the same build: neither one tagged so nor one behind a Packer AMI, as
/// Packer's snapshots were tagged with the build id alone before).
pub async fn build_snapshots(
    ec2: &aws_sdk_ec2::Client,
    region: &str,
    build_id: &str,
) -> Result<Vec<String>> {
    let packers: Vec<String> = build_images(ec2, region, build_id)
        .await?
        .iter()
        .filter(|i| made_elsewhere(i.tags()))
        .flat_map(snapshots_of)
        .collect();
    let out = ec2
        .describe_snapshots()
        .owner_ids("self")
        .filters(build_filter(build_id))
        .send()
        .await
        .map_err(|e| explain("ec2:DescribeSnapshots", region, e))?;
    Ok(out
        .snapshots()
        .iter()
        .filter(|s| !made_elsewhere(s.tags()))
        .filter_map(|s| s.snapshot_id().map(str::to_owned))
        .filter(|id| !packers.contains(id))
        .collect())
}

/// Wait until the AMI is available, with the SDK's `image_available` waiter (the one
/// behind `aws ec2 wait image-available`: polls with backoff from 15 s up to 2 min).
/// It gives up early only on `failed`, the state a RegisterImage or CopyImage that
/// cannot complete ends in; an AMI in any other state keeps it polling until the
/// deadline, whose error then names the state.
async fn wait_available(ec2: &aws_sdk_ec2::Client, region: &str, ami_id: &str) -> Result<()> {
    let waited = ec2
        .wait_until_image_available()
        .image_ids(ami_id)
        .wait(AVAILABLE_TIMEOUT)
        .await;
    match waited {
        Ok(_) => Ok(()),
        Err(WaiterError::FailureState(failure)) => {
            let image = failure
                .final_poll()
                .as_result()
                .ok()
                .and_then(|out| out.images().first());
            bail!("{ami_id} in {region} is {}", state_of(image))
        }
        Err(WaiterError::ExceededMaxWait(_)) => {
            // Only to say what the AMI is stuck in: a failure to ask changes nothing.
            let now = ec2.describe_images().image_ids(ami_id).send().await;
            let state = match &now {
                Ok(out) => format!(" (it is {})", state_of(out.images().first())),
                Err(_) => String::new(),
            };
            bail!(
                "{ami_id} in {region} did not become available within {} minutes{state}\n  hint: look at it with `aws ec2 describe-images --region {region} --image-ids {ami_id}`",
                AVAILABLE_TIMEOUT.as_secs() / 60
            )
        }
        Err(WaiterError::OperationFailed(failed)) => {
            Err(explain("ec2:DescribeImages", region, failed.into_error()))
        }
        Err(other) => bail!(
            "cannot wait for {ami_id} in {region}: {}\n  hint: check the network and the endpoint (AWS_ENDPOINT_URL, `[aws] endpoint-url`), then look at it with `aws ec2 describe-images --region {region} --image-ids {ami_id}`",
            crate::error_chain(&other)
        ),
    }
}

/// An AMI's state and why, as `STATE instead of available: REASON`.
fn state_of(image: Option<&aws_sdk_ec2::types::Image>) -> String {
    format!(
        "{} instead of available: {}",
        image
            .and_then(|i| i.state())
            .map_or("missing", |s| s.as_str()),
        image
            .and_then(|i| i.state_reason())
            .and_then(|r| r.message())
            .unwrap_or("no reason given")
    )
}

/// Deregister an AMI and delete its snapshots; returns the snapshot ids deleted. An AMI
/// already gone (deregistered by hand) is not an error.
pub async fn deregister(
    ec2: &aws_sdk_ec2::Client,
    region: &str,
    ami_id: &str,
) -> Result<Vec<String>> {
    let gone = |code: Option<&str>| {
        matches!(
            code,
            Some("InvalidAMIID.NotFound" | "InvalidAMIID.Unavailable")
        )
    };
    let snapshots = match ec2.describe_images().image_ids(ami_id).send().await {
        Ok(out) => out.images().first().map(snapshots_of).unwrap_or_default(),
        Err(e) if gone(e.code()) => Vec::new(),
        Err(e) => return Err(explain("ec2:DescribeImages", region, e)),
    };
    match ec2.deregister_image().image_id(ami_id).send().await {
        Ok(_) => {}
        Err(e) if gone(e.code()) => {}
        Err(e) => return Err(explain("ec2:DeregisterImage", region, e)),
    }
    for s in &snapshots {
        delete_snapshot(ec2, region, s).await?;
    }
    Ok(snapshots)
}

/// Delete a snapshot; one that is already gone is fine.
pub async fn delete_snapshot(ec2: &aws_sdk_ec2::Client, region: &str, id: &str) -> Result<()> {
    match ec2.delete_snapshot().snapshot_id(id).send().await {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some("InvalidSnapshot.NotFound") => Ok(()),
        Err(e) => Err(explain("ec2:DeleteSnapshot", region, e)),
    }
}

/// The value of an SSM parameter, None if it does not exist.
pub async fn get_parameter(
    ssm: &aws_sdk_ssm::Client,
    region: &str,
    name: &str,
) -> Result<Option<String>> {
    match ssm.get_parameter().name(name).send().await {
        Ok(out) => Ok(out.parameter().and_then(|p| p.value()).map(str::to_owned)),
        Err(e) if e.code() == Some("ParameterNotFound") => Ok(None),
        Err(e) => Err(explain("ssm:GetParameter", region, e)),
    }
}

/// Point `name` at `ami_id` unless it already does (no new parameter version); true
/// when it wrote.
pub async fn put_parameter(
    ssm: &aws_sdk_ssm::Client,
    region: &str,
    name: &str,
    ami_id: &str,
    log: &(dyn Fn(String) + Sync),
) -> Result<bool> {
    if get_parameter(ssm, region, name).await?.as_deref() == Some(ami_id) {
        return Ok(false);
    }
    ssm.put_parameter()
        .name(name)
        .value(ami_id)
        .r#type(aws_sdk_ssm::types::ParameterType::String)
        .data_type("aws:ec2:image")
        .overwrite(true)
        .send()
        .await
        .map_err(|e| explain("ssm:PutParameter", region, e))?;
    log(format!("{region}: {name} = {ami_id}"));
    Ok(true)
}

pub async fn delete_parameter(ssm: &aws_sdk_ssm::Client, region: &str, name: &str) -> Result<()> {
    match ssm.delete_parameter().name(name).send().await {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some("ParameterNotFound") => Ok(()),
        Err(e) => Err(explain("ssm:DeleteParameter", region, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> Image {
        Image {
            name: "devos-debian".into(),
            version: "0.1.0+0123456789ab".into(),
            build_id: "ab".repeat(32),
            sha256: "cd".repeat(32),
            spec: "images/devos-debian.toml".into(),
            raw: PathBuf::from("disk.raw"),
            ami_name: ami_name("devos-debian", "0.1.0+0123456789ab"),
            tested: true,
            uefi_data: None,
        }
    }

    #[test]
    fn names_follow_aws_character_rules() {
        assert_eq!(
            ami_name("devos-debian", "0.1.0+0123456789ab"),
            "devos-debian-0.1.0-0123456789ab"
        );
        assert_eq!(
            version_parameter("/devos/images/", "devos-debian", "0.1.0+0123456789ab"),
            "/devos/images/devos-debian/0.1.0_0123456789ab/image_id"
        );
        assert_eq!(latest_parameter("/devos", "x"), "/devos/x/latest");
        let made = ami_name("devos-debian", "0.1.0+0123456789ab");
        assert_eq!(ami_name_problem(&made), None);
        assert_eq!(ami_name_problem("My image (v1) [test] 'a'@b_c/d."), None);
        let plus = ami_name_problem("bad name+with/plus").unwrap();
        assert!(plus.contains("`+`") && !plus.contains("`/`"), "{plus}");
        assert!(ami_name_problem("ab").unwrap().contains("3 to 128"));
        assert!(ami_name_problem(&"a".repeat(129)).is_some());
        assert!(ami_name_problem("caf\u{e9}").unwrap().contains("`\u{e9}`"));
    }

    #[test]
    fn register_request_asks_for_uefi_ena_imdsv2_gp3_x86_64() {
        let conf = aws_sdk_ec2::Config::builder()
            .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
            .region(aws_sdk_ec2::config::Region::new("us-east-1"))
            .build();
        let ec2 = aws_sdk_ec2::Client::from_conf(conf);
        let req = register_request(&ec2, &image(), "snap-1", 2);
        let input = req.as_input();
        assert_eq!(input.get_boot_mode(), &Some(BootModeValues::Uefi));
        assert_eq!(input.get_ena_support(), &Some(true));
        assert_eq!(input.get_imds_support(), &Some(ImdsSupportValues::V20));
        assert_eq!(input.get_architecture(), &Some(ArchitectureValues::X8664));
        // No keys: instances start in setup mode.
        assert_eq!(input.get_uefi_data(), &None);
        let bdm = input
            .get_block_device_mappings()
            .as_ref()
            .expect("mappings");
        let ebs = bdm[0].ebs().expect("ebs");
        assert_eq!(
            bdm[0].device_name(),
            input.get_root_device_name().as_deref()
        );
        assert_eq!(ebs.volume_type(), Some(&VolumeType::Gp3));
        assert_eq!(ebs.snapshot_id(), Some("snap-1"));
        let tags = input.get_tag_specifications().as_ref().expect("tags")[0].tags();
        assert!(tags.iter().any(|t| t.key() == Some(TAG_BUILD_ID)));
        // A Secure Boot image's keys go with the AMI.
        let signed = Image {
            uefi_data: Some("QU1aTlVFRkk=".into()),
            ..image()
        };
        let req = register_request(&ec2, &signed, "snap-1", 2);
        assert_eq!(
            req.as_input().get_uefi_data().as_deref(),
            Some("QU1aTlVFRkk=")
        );
    }

    /// An EC2 endpoint on 127.0.0.1 that gives every request the same answer, and a
    /// client of it. The server thread lives as long as the test process.
    fn ec2_answering(status: u16, body: String) -> aws_sdk_ec2::Client {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some((name, value)) = line.split_once(':')
                        && name.eq_ignore_ascii_case("content-length")
                    {
                        length = value.trim().parse().unwrap_or(0);
                    }
                }
                let mut request = vec![0; length];
                let _ = reader.read_exact(&mut request);
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status} X\r\ncontent-type: text/xml\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        let conf = aws_sdk_ec2::Config::builder()
            .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
            .region(aws_sdk_ec2::config::Region::new("us-east-1"))
            .endpoint_url(format!("http://{addr}"))
            .credentials_provider(crate::Credentials::new("k", "s", None, None, "test"))
            .build();
        aws_sdk_ec2::Client::from_conf(conf)
    }

    fn wait_for(ec2: &aws_sdk_ec2::Client) -> Result<()> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(wait_available(ec2, "us-east-1", "ami-1"))
    }

    fn images_in(state: &str) -> String {
        format!(
            r#"<DescribeImagesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
  <requestId>r-1</requestId>
  <imagesSet><item>
    <imageId>ami-1</imageId><imageState>{state}</imageState>
    <stateReason><code>Client.InvalidSnapshot</code><message>the snapshot is not usable</message></stateReason>
  </item></imagesSet>
</DescribeImagesResponse>"#
        )
    }

    #[test]
    fn waiting_ends_at_once_when_the_ami_is_available() {
        let ec2 = ec2_answering(200, images_in("available"));
        wait_for(&ec2).unwrap();
    }

    #[test]
    fn waiting_fails_at_once_on_a_failed_ami_with_its_reason() {
        let ec2 = ec2_answering(200, images_in("failed"));
        let started = std::time::Instant::now();
        let err = wait_for(&ec2).unwrap_err().to_string();
        assert_eq!(
            err,
            "ami-1 in us-east-1 is failed instead of available: the snapshot is not usable"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn waiting_fails_with_the_explained_error_of_describe_images() {
        let ec2 = ec2_answering(
            403,
            "<Response><Errors><Error><Code>UnauthorizedOperation</Code><Message>You are not authorized</Message></Error></Errors><RequestID>r-1</RequestID></Response>".to_owned(),
        );
        let err = wait_for(&ec2).unwrap_err().to_string();
        assert!(
            err.starts_with("ec2:DescribeImages in us-east-1 failed: UnauthorizedOperation")
                && err.contains("IAM permission ec2:DescribeImages"),
            "{err}"
        );
    }
}
